// Webhook signatures: HMAC-SHA256 (RFC 2104, FIPS 180-4) with the account's secret over
// "<timestamp>.<body>", sent as
//   X-Subrelay-Event-Id: evt_...
//   X-Subrelay-Timestamp: <unix seconds>
//   X-Subrelay-Signature: v1=<64 lower-case hex digits>
// The timestamp is inside the signed bytes, so a receiver that rejects old timestamps
// (verify()'s tolerance) cannot be fed a recorded request later (replay), and the event
// id lets it drop a repeat sent after a lost response (delivery is at-least-once).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace subrelay::webhook {

inline constexpr const char* kEventIdHeader = "X-Subrelay-Event-Id";
inline constexpr const char* kTimestampHeader = "X-Subrelay-Timestamp";
inline constexpr const char* kSignatureHeader = "X-Subrelay-Signature";

// HMAC-SHA256(key, data) as 64 lower-case hex digits.
std::string hmacSha256Hex(std::string_view key, std::string_view data);

// "v1=" + hmacSha256Hex(secret, "<timestamp>.<body>")
std::string sign(std::string_view secret, int64_t timestamp, std::string_view body);

// Equal length and bytes, in time that depends on the length only.
bool constantTimeEqual(std::string_view a, std::string_view b);

// What a receiver does: the signature header matches and |now - timestamp| <= toleranceSeconds.
bool verify(std::string_view secret, std::string_view timestampHeader, std::string_view body,
            std::string_view signatureHeader, int64_t now, int64_t toleranceSeconds);

}  // namespace subrelay::webhook
