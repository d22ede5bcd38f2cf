// DNS packet codec (see codec.h). ldns builds and parses the wire format; everything it
// returns is checked again here (sizes, types, counts) before use, because the input is
// whatever arrived on a UDP socket. Only packet functions of ldns are called: the list in
// tests/check_ldns_symbols.sh must name every one of them.
#include "dns/codec.h"

#include <arpa/inet.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <set>

#include "util/cptr.h"

// Last: ldns/common.h defines bool macros for C that must not reach the C++ headers.
#include <ldns/ldns.h>

namespace subrelay::dns {

namespace {

using PktPtr = util::CPtr<ldns_pkt, ldns_pkt_free>;

constexpr uint8_t kRcodeNoError = 0;
constexpr uint8_t kRcodeServFail = 2;
constexpr uint8_t kRcodeNxDomain = 3;
constexpr uint8_t kRcodeRefused = 5;

char lowerAscii(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

// RFC 1035 3.1: a sequence of length-prefixed labels ending with the root label. ldns
// hands us the uncompressed form; the bounds are checked anyway.
std::optional<std::string> decodeDname(const uint8_t* d, size_t n) {
  std::string out;
  size_t i = 0;
  if (d == nullptr || n == 0) return std::nullopt;
  while (true) {
    if (i >= n) return std::nullopt;
    const size_t len = d[i++];
    if (len == 0) break;
    if (len > 63 || i + len > n) return std::nullopt;
    if (!out.empty()) out += '.';
    for (size_t k = 0; k < len; ++k) {
      const auto c = static_cast<unsigned char>(d[i + k]);
      if (c > 0x20 && c < 0x7f && c != '.' && c != '\\') {
        out += lowerAscii(static_cast<char>(c));
      } else {
        char esc[5];
        esc[0] = '\\';
        esc[1] = static_cast<char>('0' + c / 100);
        esc[2] = static_cast<char>('0' + (c / 10) % 10);
        esc[3] = static_cast<char>('0' + c % 10);
        esc[4] = 0;
        out += esc;
      }
    }
    i += len;
    if (out.size() > 1024) return std::nullopt;
  }
  return out;
}

std::optional<std::string> rdfDname(const ldns_rdf* rdf) {
  if (rdf == nullptr || ldns_rdf_get_type(rdf) != LDNS_RDF_TYPE_DNAME) return std::nullopt;
  return decodeDname(ldns_rdf_data(rdf), ldns_rdf_size(rdf));
}

std::optional<uint32_t> rdfU32(const ldns_rdf* rdf) {
  if (rdf == nullptr || ldns_rdf_size(rdf) != 4) return std::nullopt;
  const uint8_t* d = ldns_rdf_data(rdf);
  return (uint32_t{d[0]} << 24) | (uint32_t{d[1]} << 16) | (uint32_t{d[2]} << 8) | d[3];
}

std::optional<uint16_t> rdfU16(const ldns_rdf* rdf) {
  if (rdf == nullptr || ldns_rdf_size(rdf) != 2) return std::nullopt;
  const uint8_t* d = ldns_rdf_data(rdf);
  return static_cast<uint16_t>((d[0] << 8) | d[1]);
}

// RFC 2181 8: a TTL with the most significant bit set is treated as zero.
uint32_t clampTtl(uint32_t ttl) { return ttl > 0x7fffffffU ? 0 : ttl; }

bool knownType(uint16_t t) {
  return t == static_cast<uint16_t>(QType::A) || t == static_cast<uint16_t>(QType::AAAA) ||
         t == static_cast<uint16_t>(QType::MX) || t == static_cast<uint16_t>(QType::CNAME) ||
         t == static_cast<uint16_t>(QType::TXT) || t == static_cast<uint16_t>(QType::TLSA);
}

// Decodes one answer record of a type we use. nullopt: malformed rdata.
std::optional<Record> decodeRecord(const ldns_rr* rr, std::string owner) {
  Record rec;
  rec.owner = std::move(owner);
  rec.type = static_cast<uint16_t>(ldns_rr_get_type(rr));
  rec.ttl = clampTtl(ldns_rr_ttl(rr));
  const size_t n = ldns_rr_rd_count(rr);
  switch (static_cast<QType>(rec.type)) {
    case QType::A:
    case QType::AAAA: {
      const bool v6 = rec.type == static_cast<uint16_t>(QType::AAAA);
      const ldns_rdf* rdf = n == 1 ? ldns_rr_rdf(rr, 0) : nullptr;
      if (rdf == nullptr || ldns_rdf_size(rdf) != (v6 ? 16U : 4U)) return std::nullopt;
      char buf[INET6_ADDRSTRLEN] = {0};
      if (inet_ntop(v6 ? AF_INET6 : AF_INET, ldns_rdf_data(rdf), buf, sizeof buf) == nullptr) return std::nullopt;
      rec.address = buf;
      return rec;
    }
    case QType::MX: {
      if (n != 2) return std::nullopt;
      auto pref = rdfU16(ldns_rr_rdf(rr, 0));
      auto exch = rdfDname(ldns_rr_rdf(rr, 1));
      if (!pref || !exch) return std::nullopt;
      rec.preference = *pref;
      rec.target = std::move(*exch);
      return rec;
    }
    case QType::CNAME: {
      auto target = n == 1 ? rdfDname(ldns_rr_rdf(rr, 0)) : std::nullopt;
      if (!target || target->empty()) return std::nullopt;
      rec.target = std::move(*target);
      return rec;
    }
    case QType::TXT: {
      // RFC 1035 3.3.14: one or more <character-string>s, each a length octet and data.
      for (size_t i = 0; i < n; ++i) {
        const ldns_rdf* rdf = ldns_rr_rdf(rr, i);
        if (rdf == nullptr || ldns_rdf_size(rdf) < 1) return std::nullopt;
        const uint8_t* d = ldns_rdf_data(rdf);
        const size_t len = d[0];
        if (len + 1 != ldns_rdf_size(rdf)) return std::nullopt;
        rec.text.append(reinterpret_cast<const char*>(d + 1), len);
      }
      return rec;
    }
    case QType::TLSA: {
      // RFC 6698 2.1: usage, selector and matching type (one octet each), then the
      // association data up to the end of the rdata. Read from the rdata as a whole,
      // whatever fields ldns split it into; a record without association data is malformed
      // (2.2: the data field is required in the presentation format too).
      std::string rdata;
      for (size_t i = 0; i < n; ++i) {
        const ldns_rdf* rdf = ldns_rr_rdf(rr, i);
        if (rdf == nullptr) return std::nullopt;
        rdata.append(reinterpret_cast<const char*>(ldns_rdf_data(rdf)), ldns_rdf_size(rdf));
      }
      if (rdata.size() < 4) return std::nullopt;
      rec.tlsa.usage = static_cast<uint8_t>(rdata[0]);
      rec.tlsa.selector = static_cast<uint8_t>(rdata[1]);
      rec.tlsa.matchingType = static_cast<uint8_t>(rdata[2]);
      rec.tlsa.data.assign(rdata.begin() + 3, rdata.end());
      return rec;
    }
  }
  return std::nullopt;
}

std::string statusDetail(const char* what, std::string_view name, std::string_view server) {
  std::string s = what;
  if (!name.empty()) {
    s += " for ";
    s += name;
  }
  if (!server.empty()) {
    s += " from ";
    s += server;
  }
  return s;
}

}  // namespace

const char* statusName(Status s) {
  switch (s) {
    case Status::Ok:
      return "ok";
    case Status::NoData:
      return "nodata";
    case Status::NxDomain:
      return "nxdomain";
    case Status::ServFail:
      return "servfail";
    case Status::Refused:
      return "refused";
    case Status::Timeout:
      return "timeout";
    case Status::Error:
      return "error";
  }
  return "error";
}

const char* typeName(QType t) {
  switch (t) {
    case QType::A:
      return "A";
    case QType::CNAME:
      return "CNAME";
    case QType::MX:
      return "MX";
    case QType::TXT:
      return "TXT";
    case QType::AAAA:
      return "AAAA";
    case QType::TLSA:
      return "TLSA";
  }
  return "?";
}

std::optional<QType> parseTypeName(std::string_view s) {
  std::string up;
  for (char c : s) up += (c >= 'a' && c <= 'z') ? static_cast<char>(c - 'a' + 'A') : c;
  for (QType t : {QType::A, QType::CNAME, QType::MX, QType::TXT, QType::AAAA, QType::TLSA})
    if (up == typeName(t)) return t;
  return std::nullopt;
}

const char* rcodeName(uint8_t rcode) {
  static const char* const kNames[] = {"NOERROR",  "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED",
                                       "YXDOMAIN", "YXRRSET", "NXRRSET",  "NOTAUTH",  "NOTZONE"};
  return rcode < std::size(kNames) ? kNames[rcode] : "RCODE?";
}

std::optional<std::string> normalizeName(std::string_view name) {
  if (!name.empty() && name.back() == '.') name.remove_suffix(1);
  if (name.empty() || name.size() > 253) return std::nullopt;
  std::string out;
  out.reserve(name.size());
  size_t label = 0;
  for (char c : name) {
    if (c == '.') {
      if (label == 0) return std::nullopt;
      label = 0;
      out += c;
      continue;
    }
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
    if (!ok || ++label > 63) return std::nullopt;
    out += lowerAscii(c);
  }
  return out;
}

util::Result<std::string> buildQuery(std::string_view name, QType type, uint16_t id, QueryOptions opts) {
  auto norm = normalizeName(name);
  if (!norm) return util::makeError("invalid domain name \"" + std::string(name) + "\"");
  // normalizeName leaves no character that ldns' presentation-format parser treats
  // specially, so the text form is safe to hand over.
  ldns_rdf* owner = ldns_dname_new_frm_str((*norm + ".").c_str());
  if (owner == nullptr) return util::makeError("cannot encode \"" + *norm + "\"");
  // ldns_pkt_query_new takes ownership of owner. RFC 6840 5.7: AD=1 in the query asks a
  // validating resolver to tell us, through AD in the response, whether it validated.
  PktPtr pkt(ldns_pkt_query_new(owner, static_cast<ldns_rr_type>(type), LDNS_RR_CLASS_IN, LDNS_RD | LDNS_AD));
  if (!pkt) return util::makeError("cannot build query");
  ldns_pkt_set_id(pkt.get(), id);
  ldns_pkt_set_edns_udp_size(pkt.get(), kEdnsUdpSize);  // RFC 6891 6.1.1: adds the OPT RR
  if (opts.dnssecOk) ldns_pkt_set_edns_do(pkt.get(), true);  // RFC 3225 3
  uint8_t* wire = nullptr;
  size_t size = 0;
  if (ldns_pkt2wire(&wire, pkt.get(), &size) != LDNS_STATUS_OK || wire == nullptr) {
    std::free(wire);
    return util::makeError("cannot encode query");
  }
  std::string out(reinterpret_cast<const char*>(wire), size);
  std::free(wire);  // ldns allocates with malloc (LDNS_XMALLOC)
  return out;
}

ParseResult parseResponse(std::string_view wire, uint16_t expectedId, std::string_view qname, QType qtype) {
  ParseResult res;
  const auto* w = reinterpret_cast<const uint8_t*>(wire.data());
  // RFC 5452 9.1: match the ID and the QR bit from the raw header first, so nothing that
  // is not addressed to this query goes further.
  if (wire.size() < 12) {
    res.status = ParseStatus::Mismatch;
    res.error = "shorter than a DNS header";
    return res;
  }
  const auto id = static_cast<uint16_t>((w[0] << 8) | w[1]);
  if (id != expectedId || (w[2] & 0x80) == 0) {
    res.status = ParseStatus::Mismatch;
    res.error = id != expectedId ? "wrong ID" : "not a response";
    return res;
  }
  Response& r = res.response;
  r.id = id;
  r.truncated = (w[2] & 0x02) != 0;
  r.authoritative = (w[2] & 0x04) != 0;
  r.authenticated = (w[3] & 0x20) != 0;  // RFC 4035 3.2.3 / RFC 6840 5.7: AD
  r.rcode = w[3] & 0x0f;

  auto norm = normalizeName(qname);
  if (!norm) {
    res.status = ParseStatus::Malformed;
    res.error = "invalid question name";
    return res;
  }

  ldns_pkt* raw = nullptr;
  const ldns_status st = ldns_wire2pkt(&raw, w, wire.size());
  PktPtr pkt(raw);
  if (st != LDNS_STATUS_OK || !pkt) {
    if (r.truncated) {  // cut mid-record by the server: still a reason to use TCP
      res.status = ParseStatus::Ok;
      return res;
    }
    res.status = ParseStatus::Malformed;
    res.error = "undecodable packet";
    return res;
  }

  const ldns_rr_list* question = ldns_pkt_question(pkt.get());
  const size_t qd = question ? ldns_rr_list_rr_count(question) : 0;
  if (qd == 0) {
    // RFC 1035 allows an error reply without the question (FORMERR, NOTIMP). Accept it as
    // an error only; an empty question cannot prove that records belong to our name.
    if (r.rcode != kRcodeNoError && r.rcode != kRcodeNxDomain) {
      res.status = ParseStatus::Ok;
      return res;
    }
    res.status = ParseStatus::Mismatch;
    res.error = "no question";
    return res;
  }
  const ldns_rr* q = ldns_rr_list_rr(question, 0);
  auto qowner = q ? rdfDname(ldns_rr_owner(q)) : std::nullopt;
  if (qd != 1 || !qowner || *qowner != *norm || ldns_rr_get_type(q) != static_cast<ldns_rr_type>(qtype) ||
      ldns_rr_get_class(q) != LDNS_RR_CLASS_IN) {
    res.status = ParseStatus::Mismatch;
    res.error = "question does not match";
    return res;
  }

  if (const ldns_rr_list* an = ldns_pkt_answer(pkt.get())) {
    const size_t count = ldns_rr_list_rr_count(an);
    for (size_t i = 0; i < count; ++i) {
      const ldns_rr* rr = ldns_rr_list_rr(an, i);
      if (rr == nullptr || ldns_rr_get_class(rr) != LDNS_RR_CLASS_IN) continue;
      if (!knownType(static_cast<uint16_t>(ldns_rr_get_type(rr)))) continue;  // RRSIG, DNAME...
      auto owner = rdfDname(ldns_rr_owner(rr));
      auto rec = owner ? decodeRecord(rr, std::move(*owner)) : std::nullopt;
      if (!rec) {
        res.status = ParseStatus::Malformed;
        res.error = "malformed record in the answer section";
        return res;
      }
      r.answers.push_back(std::move(*rec));
    }
  }
  if (const ldns_rr_list* ns = ldns_pkt_authority(pkt.get())) {
    const size_t count = ldns_rr_list_rr_count(ns);
    for (size_t i = 0; i < count; ++i) {
      const ldns_rr* rr = ldns_rr_list_rr(ns, i);
      if (rr == nullptr || ldns_rr_get_type(rr) != LDNS_RR_TYPE_SOA) continue;
      if (ldns_rr_rd_count(rr) != 7) continue;
      // RFC 2308 5: the negative TTL is the smaller of the SOA's own TTL and MINIMUM.
      auto minimum = rdfU32(ldns_rr_rdf(rr, 6));
      if (!minimum) continue;
      const uint32_t neg = std::min(clampTtl(ldns_rr_ttl(rr)), clampTtl(*minimum));
      r.negativeTtl = r.negativeTtl ? std::min(*r.negativeTtl, neg) : neg;
    }
  }
  res.status = ParseStatus::Ok;
  return res;
}

Interpretation interpretResponse(const Response& r, std::string_view qname, QType qtype, std::string_view server) {
  Interpretation out;
  Answer& a = out.answer;
  a.name = normalizeName(qname).value_or(std::string(qname));
  a.canonicalName = a.name;
  a.type = qtype;
  a.ttl = 0;

  if (r.truncated) {
    a.status = Status::Error;
    a.detail = statusDetail("truncated answer", a.name, server);
    return out;
  }
  if (r.rcode == kRcodeServFail) {
    a.status = Status::ServFail;
    a.detail = statusDetail("SERVFAIL", a.name, server);
    return out;
  }
  if (r.rcode == kRcodeRefused) {
    a.status = Status::Refused;
    a.detail = statusDetail("REFUSED", a.name, server);
    return out;
  }
  if (r.rcode != kRcodeNoError && r.rcode != kRcodeNxDomain) {
    a.status = Status::Error;
    a.detail = statusDetail(rcodeName(r.rcode), a.name, server);
    return out;
  }

  const auto qt = static_cast<uint16_t>(qtype);
  const auto cnameT = static_cast<uint16_t>(QType::CNAME);
  uint32_t ttl = std::numeric_limits<uint32_t>::max();

  if (qtype == QType::CNAME) {
    for (const auto& rec : r.answers) {
      if (rec.type == cnameT && rec.owner == a.name) {
        a.status = Status::Ok;
        a.canonicalName = rec.target;
        a.ttl = rec.ttl;
        a.authenticated = r.authenticated;
        return out;
      }
    }
  } else {
    // RFC 2181 10.1 / RFC 1034 3.6.2: follow the chain inside this answer section.
    std::set<std::string> seen{a.name};
    std::string current = a.name;
    for (int hop = 0;; ++hop) {
      const Record* next = nullptr;
      for (const auto& rec : r.answers)
        if (rec.type == cnameT && rec.owner == current) {
          next = &rec;
          break;
        }
      if (next == nullptr) break;
      if (hop >= kMaxCnameHops) {
        a.status = Status::Error;
        a.detail = statusDetail("CNAME chain longer than 8", a.name, server);
        return out;
      }
      ttl = std::min(ttl, next->ttl);
      current = next->target;
      if (!seen.insert(current).second) {
        a.status = Status::Error;
        a.detail = statusDetail("CNAME loop", a.name, server);
        return out;
      }
    }
    a.canonicalName = current;
    if (r.rcode == kRcodeNoError) {
      for (const auto& rec : r.answers) {
        if (rec.type != qt || rec.owner != current) continue;
        ttl = std::min(ttl, rec.ttl);
        if (qtype == QType::MX) {
          a.mx.push_back(MxRecord{rec.preference, rec.target});
        } else if (qtype == QType::TXT) {
          a.texts.push_back(rec.text);
        } else if (qtype == QType::TLSA) {
          a.tlsa.push_back(rec.tlsa);
        } else {
          a.addresses.push_back(rec.address);
        }
      }
      if (!a.mx.empty() || !a.addresses.empty() || !a.texts.empty() || !a.tlsa.empty()) {
        a.status = Status::Ok;
        a.ttl = ttl;
        // RFC 4035 3.2.3: AD covers every RRset of the answer section, so the CNAMEs of the
        // chain as well as the records at its end.
        a.authenticated = r.authenticated;
        return out;
      }
      // A chain that stops at a CNAME with neither records nor an SOA: the server gave
      // only part of the chain (RFC 1034 3.6.2 allows it); the caller asks for the rest.
      if (current != a.name && !r.negativeTtl) {
        out.followCname = current;
        a.status = Status::NoData;
        a.ttl = ttl;
        a.authenticated = r.authenticated;  // of this part of the chain; the caller ANDs the rest
        a.detail = "CNAME to " + current;
        return out;
      }
    }
  }

  // RFC 2308 2.1 / 2.2; RFC 6604 3: the RCODE describes the last name of the chain.
  const uint32_t neg = r.negativeTtl.value_or(0);
  a.ttl = std::min(ttl, neg);
  // RFC 4035 3.2.3: for a negative answer AD also covers the denial (NSEC/NSEC3) in the
  // authority section: an authenticated NoData TLSA is what RFC 7672 2.2 calls "no TLSA
  // records" of a signed zone.
  a.authenticated = r.authenticated;
  if (r.rcode == kRcodeNxDomain) {
    a.status = Status::NxDomain;
    a.detail = statusDetail("NXDOMAIN", a.canonicalName, server);
  } else {
    a.status = Status::NoData;
    a.detail = std::string("no ") + typeName(qtype) + " records for " + a.canonicalName;
  }
  return out;
}

}  // namespace subrelay::dns
