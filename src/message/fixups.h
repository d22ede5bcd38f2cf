// Submission fix-ups, RFC 6409 section 8: a Received trace field (RFC 5321 4.4) naming
// the account and TLS session is prepended; Message-ID (8.3) and Date (8.2) are added
// when missing. Nothing else in the message changes (DKIM must sign what leaves).
#pragma once

#include <chrono>
#include <string>
#include <string_view>

namespace subrelay::message {

struct TraceInfo {
  std::string hostname;       // ours, "by"
  std::string heloName;       // "from"
  std::string clientAddress;  // "[1.2.3.4]"
  std::string account;        // authenticated username
  std::string tlsVersion;     // "" = no TLS
  std::string tlsCipher;
  std::string queueId;
  std::string recipient;      // "for <...>" only when exactly one recipient
  bool smtputf8 = false;
  std::chrono::system_clock::time_point when;
};

// Returns the message with Received prepended and Message-ID/Date added (at the end of
// the header block) when missing. The Message-ID is "<queueId.random@hostname>".
std::string applySubmissionFixups(std::string_view message, const TraceInfo& info);
// The same with the header section already scanned (scanHeaders(message)), so a caller
// that has looked at the fields does not make the scan a second time.
struct HeaderBlock;
std::string applySubmissionFixups(std::string_view message, const HeaderBlock& block, const TraceInfo& info);

// The transmission type of RFC 3848 / RFC 6531: ESMTPSA, ESMTPA, UTF8SMTPSA, UTF8SMTPA.
std::string withProtocol(bool tls, bool smtputf8);

}  // namespace subrelay::message
