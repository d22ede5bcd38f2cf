// DNS packet codec: builds queries and reads responses, with no I/O (docs/architecture.md,
// "The I/O-free protocol core"). ldns does the wire work and nothing else
// (notes/tls-backends.md); its types stay in codec.cpp.
//
// Implements: RFC 1035 4.1 (message format: one question, RD set), RFC 6891 6.1 (an OPT
// record advertising a 1232-byte UDP payload, the DNS flag day 2020 value), RFC 5452
// section 9.1 (a response is accepted only when its ID, question name, type and class
// match what was asked; anything else is ignored, not treated as an error), RFC 2181 10.1
// (CNAME chains in one answer section), RFC 2308 (NXDOMAIN vs NODATA, negative TTL from
// the SOA in the authority section) and RFC 6604 (the RCODE refers to the end of a chain),
// RFC 6698 2.1 (TLSA rdata) and the DNSSEC header bits of a stub resolver: AD=1 in every
// query (RFC 6840 5.7), DO on request (RFC 3225), AD read from the response (RFC 4035 3.2.3).
//
// Not here: sockets, timers, retries, the cache (uv_resolver.h, cache.h).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "dns/resolver.h"
#include "util/result.h"

namespace subrelay::dns {

inline constexpr uint16_t kEdnsUdpSize = 1232;  // RFC 6891 6.2.5; DNS flag day 2020
inline constexpr int kMaxCnameHops = 8;

// Lower-case, without the trailing dot; rejects empty labels, labels over 63 octets,
// names over 253 characters and characters outside letters, digits, '-' and '_'
// (host names per RFC 1123 2.1, plus '_' for _domainkey and friends).
std::optional<std::string> normalizeName(std::string_view name);

// How a query asks for DNSSEC information. We never check signatures ourselves: ldns is
// for packets only (docs/tls-backends.md), and RFC 7672 2.1.1 lets an SMTP client rely on
// the AD bit of a validating resolver it trusts (a local one). So every query carries AD=1,
// the RFC 6840 5.7 signal "I understand the AD bit, tell me", which makes a validating
// resolver report AD without sending RRSIGs and NSEC records we would only throw away
// (smaller answers, fewer TC=1 retries over TCP). dnssecOk additionally sets DO in the OPT
// record (RFC 3225 3), which is what Postfix asks for (RES_USE_DNSSEC): for resolvers
// that only report AD to DO queries, at the price of the signatures in every answer.
struct QueryOptions {
  bool dnssecOk = false;
};

// RFC 1035 4.1: a standard query for (name, type, IN) with RD=1, AD=1, ID `id` and an EDNS0
// OPT record (DO per `opts`). Fails only for a name normalizeName rejects.
util::Result<std::string> buildQuery(std::string_view name, QType type, uint16_t id, QueryOptions opts = {});

// One resource record of a response, decoded. Names are lower-case without the trailing dot;
// bytes outside printable ASCII (and '.' or '\' inside a label) appear as \DDD (RFC 1035 5.1).
struct Record {
  std::string owner;
  uint16_t type = 0;
  uint32_t ttl = 0;
  uint16_t preference = 0;  // MX
  std::string target;       // MX exchange ("" for the root), CNAME target
  std::string address;      // A / AAAA, textual
  std::string text;         // TXT: the character-strings concatenated
  TlsaRecord tlsa;          // TLSA
};

struct Response {
  uint16_t id = 0;
  uint8_t rcode = 0;       // RFC 1035 4.1.1 (the 4 low bits; EDNS extended bits ignored)
  bool truncated = false;  // TC: ask again over TCP (RFC 7766 section 5)
  bool authoritative = false;
  bool authenticated = false;  // AD (RFC 4035 3.2.3): the resolver validated every RRset in it
  std::vector<Record> answers;          // MX, A, AAAA, CNAME, TXT, TLSA of class IN only
  std::optional<uint32_t> negativeTtl;  // RFC 2308 5: min(SOA TTL, SOA MINIMUM) if an SOA is present
};

enum class ParseStatus {
  Ok,         // a response to our question (check `truncated` and `rcode`)
  Mismatch,   // not ours: wrong ID, not a response, other question. Ignore it, keep waiting.
  Malformed,  // ours (the header matched) but unusable
};

struct ParseResult {
  ParseStatus status = ParseStatus::Malformed;
  Response response;
  std::string error;  // why, for Mismatch / Malformed
};

// Never throws or crashes on any input. A response whose header matches (ID, QR=1) and
// has TC=1 but does not parse completely (a server that cut the packet mid-record) is
// returned as Ok with truncated set and no records, so the caller retries over TCP.
ParseResult parseResponse(std::string_view wire, uint16_t expectedId, std::string_view qname, QType qtype);

// What a parsed response means for the question (qname, qtype).
struct Interpretation {
  Answer answer;            // status Ok / NoData / NxDomain / ServFail / Refused / Error
  std::string followCname;  // non-empty: the chain ends in a CNAME whose target has no records
                            // here; ask again for this name (answer holds the partial chain)
};

// Follows the CNAME chain from qname inside the answer section (at most kMaxCnameHops,
// loops are an Error), then collects the records of qtype at the end of the chain. For
// QType::CNAME the chain is not followed: canonicalName is the target of qname's CNAME.
// answer.authenticated is the response's AD bit for Ok / NoData / NxDomain, else false.
// `server` only goes into detail strings.
Interpretation interpretResponse(const Response& r, std::string_view qname, QType qtype, std::string_view server = {});

const char* typeName(QType t);                           // "A", "MX", ...
std::optional<QType> parseTypeName(std::string_view s);  // case-insensitive
const char* rcodeName(uint8_t rcode);                    // "NOERROR", "SERVFAIL", ...

}  // namespace subrelay::dns
