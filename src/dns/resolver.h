// dns::Resolver: asynchronous lookups for delivery (MX, A, AAAA, TLSA, following CNAME chains).
//
// The interface is the seam between delivery/ and the network: UvResolver (uv_resolver.h)
// is the real one, tests use a fake. Every callback runs on the loop thread of the
// resolver, never inside query() itself (so callers may start a query while holding
// state they touch in the callback).
//
// Not here: routing decisions (null MX, implicit MX, ordering): delivery/routing.h.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace subrelay::dns {

enum class QType : uint16_t { A = 1, CNAME = 5, MX = 15, TXT = 16, AAAA = 28, TLSA = 52 };

// Outcome of a lookup, classified the way delivery needs it (RFC 5321 section 5).
enum class Status {
  Ok,           // answers present
  NoData,       // the name exists but has no records of this type (NOERROR, empty answer)
  NxDomain,     // RCODE 3: the name does not exist (permanent for delivery)
  ServFail,     // RCODE 2 (temporary)
  Refused,      // RCODE 5 (temporary: another server may answer)
  Timeout,      // no usable answer from any server in time (temporary)
  Error,        // FORMERR, malformed answers, network errors, CNAME loops (temporary)
};

// "ok", "nodata", "nxdomain", "servfail", "refused", "timeout", "error"
const char* statusName(Status s);

struct MxRecord {
  uint16_t preference = 0;
  std::string exchange;  // lower-case, no trailing dot; "" for the RFC 7505 null MX "."
};

// RFC 6698 2.1: one TLSA record. The fields are kept as published, whether or not this
// program knows what they mean: which records are usable for SMTP is decided by
// tls/dane.h (RFC 7672 3.1.3), not here.
struct TlsaRecord {
  uint8_t usage = 0;         // 2.1.1: 0 PKIX-TA, 1 PKIX-EE, 2 DANE-TA, 3 DANE-EE
  uint8_t selector = 0;      // 2.1.2: 0 full certificate, 1 SubjectPublicKeyInfo
  uint8_t matchingType = 0;  // 2.1.3: 0 exact, 1 SHA-256, 2 SHA-512
  std::vector<uint8_t> data;  // 2.1.4: certificate association data, raw bytes
  bool operator==(const TlsaRecord&) const = default;
};

struct Answer {
  Status status = Status::Error;
  std::string name;                    // the name asked (lower-case, no trailing dot)
  std::string canonicalName;           // after following CNAMEs (== name when none)
  QType type = QType::A;
  uint32_t ttl = 0;                    // min TTL over the records used (negative: SOA min)
  std::vector<MxRecord> mx;            // for MX
  std::vector<std::string> addresses;  // for A / AAAA: textual ("127.0.0.11", "::1")
  std::vector<std::string> texts;      // for TXT: each record's strings concatenated
  std::vector<TlsaRecord> tlsa;        // for TLSA
  // The resolver set AD (RFC 4035 3.2.3, RFC 6840 5.7) on every response this answer was
  // built from: the whole CNAME chain and the records (or, for NoData / NxDomain, their
  // denial) were validated by it. Only as trustworthy as the path to that resolver (RFC
  // 7672 2.1.1 assumes a local, trusted one). Always false for failures.
  bool authenticated = false;
  std::string detail;                  // human-readable reason when not Ok ("SERVFAIL from 127.0.0.1:5353")
};

using Callback = std::function<void(const Answer&)>;

class Resolver {
 public:
  virtual ~Resolver() = default;
  // name: a domain or host name, with or without the trailing dot, any case.
  virtual void query(const std::string& name, QType type, Callback cb) = 0;
};

}  // namespace subrelay::dns
