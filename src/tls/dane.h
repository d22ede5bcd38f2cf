// DANE for SMTP (RFC 7672): does the certificate chain an MX host presented match the
// "secure" TLSA RRset of its TLSA base domain? I/O-free: records, DER certificates and a
// clock reading in, a verdict out. TlsEngine (tls_engine.h) runs it on the peer's chain
// when the client is given DaneParams; delivery only has to find the records.
//
// Implements:
//  - which records are usable (RFC 7672 3.1, RFC 6698 4.1): DANE-TA(2) and DANE-EE(3) with
//    selector Cert(0) or SPKI(1) and matching type Full(0), SHA2-256(1) or SHA2-512(2);
//    PKIX-TA(0) and PKIX-EE(1) are unusable for SMTP (3.1.3), so are unknown values and
//    digests of the wrong length;
//  - digest algorithm agility (RFC 7672 5, RFC 7671 9): for one usage and selector, records
//    with a weaker digest than the strongest one published are not used;
//  - DANE-EE(3) (3.1.1, 3.2.1): the leaf certificate or its public key matches; no name
//    check, no validity dates;
//  - DANE-TA(2) (3.1.2, 3.2.2, 3.2.3): an issuer certificate in the presented chain matches
//    (or, selector SPKI(1) with Full(0), the published key itself signed a certificate of the
//    chain); the chain from the leaf to it validates (signatures, validity dates, CA
//    constraints); and the leaf's DNS-IDs (the CN-ID only without any) match one of the
//    reference identifiers, a wildcard standing for exactly one whole left-most label.
//
// Not here: finding the TLSA base domain and the records (DNS, RFC 7672 2.2.3), deciding
// what a verdict means for delivery (2.2: Mismatch = try the next MX or defer, NoUsable-
// Records = TLS still required, but unauthenticated).
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace subrelay::tls {

// RFC 6698 2.1 (names from RFC 7218). The same fields as dns::TlsaRecord, which tls/ may
// not include: the wiring copies one into the other.
struct TlsaRecord {
  uint8_t usage = 0;          // 0 PKIX-TA, 1 PKIX-EE, 2 DANE-TA, 3 DANE-EE
  uint8_t selector = 0;       // 0 Cert, 1 SPKI
  uint8_t matchingType = 0;   // 0 Full, 1 SHA2-256, 2 SHA2-512
  std::vector<uint8_t> data;  // certificate association data
  bool operator==(const TlsaRecord&) const = default;
};

inline constexpr uint8_t kUsageDaneTa = 2;
inline constexpr uint8_t kUsageDaneEe = 3;

// What one connection to an MX host must satisfy.
struct DaneParams {
  // The "secure" (DNSSEC-validated) TLSA RRset found for the host. Never insecure records:
  // RFC 7672 2.2 says those mean plain opportunistic TLS, with no DANE at all.
  std::vector<TlsaRecord> tlsa;
  // RFC 7672 3.2.2, for DANE-TA(2) name checks: the TLSA base domain first (the MX host name,
  // CNAME-expanded when the expansion was secure), then the next-hop (email) domain and its
  // CNAME expansion when the MX lookup was secure. Lower-case, no trailing dot.
  std::vector<std::string> referenceNames;
};

enum class DaneStatus {
  Verified,         // a usable record authenticated the chain
  Mismatch,         // usable records exist, none authenticated the chain: do not deliver
  NoUsableRecords,  // RFC 7672 2.2: TLS is mandatory, authentication is not possible
};
const char* daneStatusName(DaneStatus s);  // "verified", "mismatch", "no usable records"

struct DaneResult {
  DaneStatus status = DaneStatus::Mismatch;
  // One line for a delivery log: which record matched and how, or why none did
  // ("DANE-EE 3 1 1 8cb0fc6c...: leaf SPKI matches" /
  //  "no TLSA record matched: 3 1 1 8cb0fc6c... vs leaf SPKI sha256 5d41402a...").
  std::string reason;
  int matchedRecord = -1;  // index into DaneParams::tlsa when Verified
  int matchedDepth = -1;   // depth in the chain of what matched (0 = leaf; for a TA key not
                           // in the chain, the depth of the certificate it signed)
};

// Empty when `r` is usable for SMTP (RFC 7672 3.1), else why not ("PKIX-TA(0) is not used
// for SMTP (RFC 7672 3.1.3)").
std::string unusableReason(const TlsaRecord& r);
inline bool isUsable(const TlsaRecord& r) { return unusableReason(r).empty(); }

// Presentation form for logs, the data cut after `maxHex` hex digits: "3 1 1 8cb0fc6c...".
std::string tlsaText(const TlsaRecord& r, size_t maxHex = 16);

// The verdict for a chain the server presented (DER, leaf first, as sent). `now` is the
// clock for DANE-TA(2) validity dates (DANE-EE(3) ignores dates, RFC 7672 3.1.1).
DaneResult verifyDane(const DaneParams& params, const std::vector<std::string>& chainDer,
                      std::chrono::system_clock::time_point now);

}  // namespace subrelay::tls
