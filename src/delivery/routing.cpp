// Routing (RFC 5321 section 5.1, RFC 7505): MX ordering, null MX, the implicit MX, and
// RouteResolver, which runs the MX and address lookups through a dns::Resolver.
//
// Classification of failures, by what a retry could change:
//   - the domain does not exist (NXDOMAIN on MX): permanent, "5.1.2" (RFC 3463 X.1.2).
//   - null MX: permanent, "5.1.10" (RFC 7505 section 4.1), and no address lookups at all.
//   - no host has an address: permanent "5.4.4" (X.4.4 unable to route) only when every
//     lookup was a definite negative (NXDOMAIN / NODATA); any temporary failure among
//     them makes it "4.4.3", because the host that failed may be the one that works.
//   - SERVFAIL, REFUSED, timeouts and malformed answers: temporary, "4.4.3" (X.4.3).
//
// Not here: connecting, TLS policy, skipping our own addresses (the scheduler's job).
#include "delivery/routing.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <algorithm>
#include <set>
#include <utility>

#include "util/strings.h"

namespace subrelay::delivery {

namespace {

// Our own copy of dns::statusName, so this library does not need the dns library's
// object code (only its header).
const char* statusText(dns::Status s) {
  switch (s) {
    case dns::Status::Ok:
      return "ok";
    case dns::Status::NoData:
      return "nodata";
    case dns::Status::NxDomain:
      return "nxdomain";
    case dns::Status::ServFail:
      return "servfail";
    case dns::Status::Refused:
      return "refused";
    case dns::Status::Timeout:
      return "timeout";
    case dns::Status::Error:
      return "error";
  }
  return "error";
}

// Lower case, without the trailing dot of an absolute name ("MX1.Example.COM." ->
// "mx1.example.com"; "." -> "", the RFC 7505 null exchange).
std::string normaliseName(std::string_view name) {
  std::string out = util::toLower(name);
  if (!out.empty() && out.back() == '.') out.pop_back();
  return out;
}

// RFC 5321 5.1: the exchange "MUST contain a domain name". An address in its place is
// a broken record; like Postfix ("malformed domain name in resource data of MX record")
// we skip that host instead of connecting to the address.
bool looksLikeAddress(const std::string& exchange) {
  if (exchange.empty()) return false;
  if (exchange.front() == '[' || exchange.find(':') != std::string::npos) return true;
  in_addr v4{};
  return inet_pton(AF_INET, exchange.c_str(), &v4) == 1;
}

// A definite negative: asking again later gives the same answer.
bool isDefiniteNegative(dns::Status s) { return s == dns::Status::NxDomain || s == dns::Status::NoData; }

struct HostLookup {
  MxHost host;
  bool literal = false;  // exchange is an address: not looked up (see looksLikeAddress)
  bool preset = false;   // relay host given as an address (or localhost): v6/v4 filled, no lookup
  dns::Status aaaa = dns::Status::Error;
  dns::Status a = dns::Status::Error;
  std::string aaaaDetail;
  std::string aDetail;
  std::vector<std::string> v6;
  std::vector<std::string> v4;
  bool aaaaSecure = false;  // the answers' dns::Answer::authenticated
  bool aSecure = false;
};

// One resolve() call. Owned by the callbacks handed to the resolver; the RouteResolver
// only shares the alive flag with it, so destroying the RouteResolver drops late answers.
struct Pending {
  std::shared_ptr<bool> alive;
  dns::Resolver* resolver = nullptr;  // valid while *alive
  std::string domain;
  RouteCallback cb;
  std::mt19937_64 rng;
  std::vector<HostLookup> hosts;
  size_t outstanding = 0;
  bool done = false;
  // resolveHosts(): configured relays. Every host keeps all its addresses (two relays on
  // one IP with different ports are different upstreams), and no answer is permanent.
  bool relay = false;
  bool mxSecure = false;  // the MX answer (or its NoData) was authenticated
};

void deliver(const std::shared_ptr<Pending>& p, Route route) {
  p->done = true;
  RouteCallback cb = std::move(p->cb);
  p->cb = nullptr;
  if (cb) cb(std::move(route));
}

void fail(const std::shared_ptr<Pending>& p, RouteStatus status, std::string enhanced, std::string detail) {
  Route r;
  r.status = status;
  r.enhanced = std::move(enhanced);
  r.detail = std::move(detail);
  for (auto& h : p->hosts) r.hosts.push_back(std::move(h.host));
  deliver(p, std::move(r));
}

std::string lookupText(const char* type, dns::Status s, const std::string& detail) {
  std::string out = std::string(type) + " " + statusText(s);
  if (!detail.empty()) out += " (" + detail + ")";
  return out;
}

void finish(const std::shared_ptr<Pending>& p) {
  Route route;
  bool anyUsable = false;
  bool anyTemporary = false;
  std::set<std::string> seen;  // an address reached through two MX hosts is tried once
  std::string why;             // per-host reasons, for the detail of a failure
  for (auto& h : p->hosts) {
    MxHost& host = h.host;
    host.addressesSecure = h.aaaaSecure && h.aSecure;
    bool hadAddresses = false;
    for (const auto* list : {&h.v6, &h.v4}) {
      for (const auto& addr : *list) {
        hadAddresses = true;
        if (p->relay || seen.insert(addr).second) host.addresses.push_back(addr);
      }
    }
    if (!host.addresses.empty()) {
      anyUsable = true;
      continue;
    }
    if (h.literal) {
      host.lookupError = "MX exchange is an address, not a host name (RFC 5321 5.1)";
    } else if (hadAddresses) {
      host.lookupError = "every address already listed for a preferred MX host";
    } else {
      host.lookupError = lookupText("AAAA", h.aaaa, h.aaaaDetail) + ", " + lookupText("A", h.a, h.aDetail);
      if (!isDefiniteNegative(h.aaaa) || !isDefiniteNegative(h.a)) anyTemporary = true;
    }
    if (!why.empty()) why += "; ";
    why += host.name + ": " + host.lookupError;
  }
  for (auto& h : p->hosts) route.hosts.push_back(std::move(h.host));
  route.mxSecure = p->mxSecure;

  if (anyUsable) {
    route.status = RouteStatus::Ok;
  } else if (p->relay) {
    // A relay name that does not resolve is our configuration (or DNS) failing, never a
    // fact about the recipients: always temporary.
    route.status = RouteStatus::TempFail;
    route.enhanced = "4.4.3";
    route.detail = "no address for any configured relay host: " + why;
  } else if (anyTemporary) {
    route.status = RouteStatus::TempFail;
    route.enhanced = "4.4.3";
    route.detail = "no address for any mail host of " + p->domain + " (temporary DNS failure): " + why;
  } else {
    route.status = RouteStatus::PermFail;
    route.enhanced = "5.4.4";
    const bool implicit = !route.hosts.empty() && route.hosts.front().implicit;
    route.detail = implicit ? p->domain + " has no MX and no address records: " + why
                            : "no MX host of " + p->domain + " has an address: " + why;
  }
  deliver(p, std::move(route));
}

void onAddress(const std::shared_ptr<Pending>& p, size_t index, dns::QType type, const dns::Answer& a) {
  if (!*p->alive || p->done) return;
  HostLookup& h = p->hosts[index];
  // Ok with an empty answer cannot come from a well-behaved resolver; it means NODATA.
  const dns::Status status = (a.status == dns::Status::Ok && a.addresses.empty()) ? dns::Status::NoData : a.status;
  if (type == dns::QType::AAAA) {
    h.aaaa = status;
    h.aaaaDetail = a.detail;
    h.aaaaSecure = a.authenticated;
    if (status == dns::Status::Ok) h.v6 = a.addresses;
  } else {
    h.a = status;
    h.aDetail = a.detail;
    h.aSecure = a.authenticated;
    if (status == dns::Status::Ok) h.v4 = a.addresses;
  }
  if (--p->outstanding == 0) finish(p);
}

void startAddressLookups(const std::shared_ptr<Pending>& p) {
  // Count first: a resolver that answered inside query() (the interface forbids it)
  // must still not see the count reach zero before every query is out.
  for (const auto& h : p->hosts)
    if (!h.literal && !h.preset) p->outstanding += 2;
  if (p->outstanding == 0) {
    finish(p);
    return;
  }
  for (size_t i = 0; i < p->hosts.size(); ++i) {
    if (p->hosts[i].literal || p->hosts[i].preset) continue;
    const std::string name = p->hosts[i].host.name;
    p->resolver->query(name, dns::QType::AAAA, [p, i](const dns::Answer& a) { onAddress(p, i, dns::QType::AAAA, a); });
    p->resolver->query(name, dns::QType::A, [p, i](const dns::Answer& a) { onAddress(p, i, dns::QType::A, a); });
  }
}

void onMx(const std::shared_ptr<Pending>& p, const dns::Answer& a) {
  if (!*p->alive || p->done) return;
  switch (a.status) {
    case dns::Status::Ok:
      if (!a.mx.empty()) break;
      [[fallthrough]];  // an empty MX list is "no MX": the implicit MX below
    case dns::Status::NoData: {
      // RFC 5321 5.1: "If an empty list of MXs is returned, the address is treated as if
      // it was associated with an implicit MX RR, with a preference of 0, pointing to
      // that host." The resolver follows CNAMEs for the A/AAAA lookups itself.
      HostLookup h;
      h.host.name = p->domain;
      h.host.preference = 0;
      h.host.implicit = true;
      p->mxSecure = a.authenticated;
      p->hosts.push_back(std::move(h));
      startAddressLookups(p);
      return;
    }
    case dns::Status::NxDomain:
      fail(p, RouteStatus::PermFail, "5.1.2",
           "domain " + p->domain + " does not exist" + (a.detail.empty() ? "" : " (" + a.detail + ")"));
      return;
    case dns::Status::ServFail:
    case dns::Status::Refused:
    case dns::Status::Timeout:
    case dns::Status::Error:
      fail(p, RouteStatus::TempFail, "4.4.3",
           "temporary DNS failure for " + p->domain + ": " + lookupText("MX", a.status, a.detail));
      return;
  }
  if (isNullMx(a.mx)) {
    // RFC 7505 section 3/4: the domain accepts no mail; no fallback to its A/AAAA.
    fail(p, RouteStatus::PermFail, "5.1.10", "domain " + p->domain + " does not accept mail (null MX, RFC 7505)");
    return;
  }
  p->mxSecure = a.authenticated;
  for (auto& r : orderMx(a.mx, p->rng)) {
    HostLookup h;
    h.host.name = r.exchange;
    h.host.preference = r.preference;
    h.literal = looksLikeAddress(r.exchange);
    p->hosts.push_back(std::move(h));
  }
  startAddressLookups(p);
}

}  // namespace

std::vector<dns::MxRecord> orderMx(std::vector<dns::MxRecord> records, std::mt19937_64& rng) {
  for (auto& r : records) r.exchange = normaliseName(r.exchange);
  std::stable_sort(records.begin(), records.end(),
                   [](const dns::MxRecord& x, const dns::MxRecord& y) { return x.preference < y.preference; });
  // Sorted, so the first occurrence of a name carries its best preference.
  std::set<std::string> seen;
  std::vector<dns::MxRecord> out;
  out.reserve(records.size());
  for (auto& r : records)
    if (seen.insert(r.exchange).second) out.push_back(std::move(r));
  // RFC 5321 5.1: equal preferences "MUST randomize them to spread the load". A plain
  // Fisher-Yates over rng() (not std::shuffle, whose use of the engine differs between
  // standard libraries) so a fixed seed gives the same order everywhere.
  size_t begin = 0;
  while (begin < out.size()) {
    size_t end = begin + 1;
    while (end < out.size() && out[end].preference == out[begin].preference) ++end;
    for (size_t i = end - begin; i > 1; --i) {
      const size_t j = static_cast<size_t>(rng() % i);
      std::swap(out[begin + i - 1], out[begin + j]);
    }
    begin = end;
  }
  return out;
}

bool isNullMx(const std::vector<dns::MxRecord>& records) {
  return std::any_of(records.begin(), records.end(),
                     [](const dns::MxRecord& r) { return r.exchange.empty() || r.exchange == "."; });
}

std::optional<Route> routeForAddressLiteral(const std::string& domain) {
  if (domain.size() < 2 || domain.front() != '[' || domain.back() != ']') return std::nullopt;
  const std::string inner = domain.substr(1, domain.size() - 2);
  Route r;
  char text[INET6_ADDRSTRLEN] = {};
  bool ok = false;
  if (util::istartsWith(inner, "IPv6:")) {
    in6_addr v6{};
    ok = inet_pton(AF_INET6, inner.c_str() + 5, &v6) == 1 && inet_ntop(AF_INET6, &v6, text, sizeof text) != nullptr;
  } else {
    in_addr v4{};
    ok = inet_pton(AF_INET, inner.c_str(), &v4) == 1 && inet_ntop(AF_INET, &v4, text, sizeof text) != nullptr;
  }
  if (!ok) {
    r.status = RouteStatus::PermFail;
    r.enhanced = "5.1.2";
    r.detail = "unusable address literal " + util::sanitizeForLog(domain);
    return r;
  }
  MxHost host;
  host.name = domain;
  host.implicit = true;
  host.addresses.emplace_back(text);
  r.status = RouteStatus::Ok;
  r.hosts.push_back(std::move(host));
  return r;
}

RouteResolver::RouteResolver(dns::Resolver& resolver, uint64_t seed)
    : resolver_(resolver), rng_(seed), alive_(std::make_shared<bool>(true)) {}

RouteResolver::~RouteResolver() { *alive_ = false; }

void RouteResolver::resolve(const std::string& domain, RouteCallback cb) {
  auto p = std::make_shared<Pending>();
  p->alive = alive_;
  p->resolver = &resolver_;
  p->domain = normaliseName(domain);
  p->cb = std::move(cb);
  p->rng.seed(rng_());  // one stream per resolve: answers may come back in any order
  resolver_.query(p->domain, dns::QType::MX, [p](const dns::Answer& a) { onMx(p, a); });
}

namespace {

// A relay host that needs no DNS: an IP address (itself), or "localhost" (RFC 6761 6.3: the
// loopback addresses, never asked of DNS). v6 and v4 in the order to try; nullopt for a name.
struct KnownAddresses {
  std::vector<std::string> v6, v4;
};
std::optional<KnownAddresses> knownAddresses(const std::string& name) {
  in6_addr v6{};
  in_addr v4{};
  if (inet_pton(AF_INET6, name.c_str(), &v6) == 1) return KnownAddresses{{name}, {}};
  if (inet_pton(AF_INET, name.c_str(), &v4) == 1) return KnownAddresses{{}, {name}};
  if (util::iequals(name, "localhost")) return KnownAddresses{{"::1"}, {"127.0.0.1"}};
  return std::nullopt;
}

}  // namespace

void RouteResolver::resolveHosts(const std::vector<std::string>& names, RouteCallback cb) {
  auto p = std::make_shared<Pending>();
  p->alive = alive_;
  p->resolver = &resolver_;
  p->relay = true;
  p->cb = std::move(cb);
  for (const auto& name : names) {
    HostLookup h;
    h.host.name = name;
    if (auto known = knownAddresses(name)) {
      h.preset = true;
      h.v6 = std::move(known->v6);
      h.v4 = std::move(known->v4);
    } else {
      h.host.name = normaliseName(name);
    }
    p->domain += (p->domain.empty() ? "" : ", ") + h.host.name;
    p->hosts.push_back(std::move(h));
  }
  // With nothing to look up this finishes at once; the scheduler never asks for such a
  // list (relayRouteWithoutDns() answers it without the resolver).
  startAddressLookups(p);
}

std::optional<Route> relayRouteWithoutDns(const std::vector<std::string>& names) {
  Route r;
  for (const auto& name : names) {
    auto known = knownAddresses(name);
    if (!known) return std::nullopt;
    MxHost h;
    h.name = name;
    h.addresses = std::move(known->v6);
    h.addresses.insert(h.addresses.end(), known->v4.begin(), known->v4.end());
    r.hosts.push_back(std::move(h));
  }
  if (r.hosts.empty()) return std::nullopt;
  r.status = RouteStatus::Ok;
  return r;
}

}  // namespace subrelay::delivery
