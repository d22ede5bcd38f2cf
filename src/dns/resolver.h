// dns::Resolver: asynchronous lookups for delivery (MX, A, AAAA, following CNAME chains).
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

enum class QType : uint16_t { A = 1, CNAME = 5, MX = 15, TXT = 16, AAAA = 28 };

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

struct Answer {
  Status status = Status::Error;
  std::string name;                    // the name asked (lower-case, no trailing dot)
  std::string canonicalName;           // after following CNAMEs (== name when none)
  QType type = QType::A;
  uint32_t ttl = 0;                    // min TTL over the records used (negative: SOA min)
  std::vector<MxRecord> mx;            // for MX
  std::vector<std::string> addresses;  // for A / AAAA: textual ("127.0.0.11", "::1")
  std::vector<std::string> texts;      // for TXT: each record's strings concatenated
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
