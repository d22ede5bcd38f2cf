// Routing (RFC 5321 section 5.1, RFC 7505): which hosts, in which order, receive mail for
// a domain. The ordering and classification are pure functions; RouteResolver runs the
// lookups through a dns::Resolver (real or fake) and calls back once.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "dns/resolver.h"

namespace subrelay::delivery {

struct MxHost {
  std::string name;       // the exchange (or the domain itself for an implicit MX)
  uint16_t preference = 0;
  bool implicit = false;  // no MX records: the domain's own A/AAAA (RFC 5321 5.1)
  std::vector<std::string> addresses;  // IPv6 first then IPv4, in the order to try
  std::string lookupError;             // why addresses is empty, when it is
  // Both the AAAA and the A answer were authenticated (dns::Answer::authenticated: the
  // records, or their denial). RFC 7672 2.2.2: TLSA records are looked up only for hosts
  // whose address records are secure.
  bool addressesSecure = false;
};

enum class RouteStatus {
  Ok,         // hosts has at least one host with addresses
  TempFail,   // SERVFAIL, timeout, no address for any MX yet some lookups failed temporarily
  PermFail,   // NXDOMAIN, null MX (5.1.10), no MX and no A/AAAA, MX hosts that do not exist
};

struct Route {
  RouteStatus status = RouteStatus::TempFail;
  // For failures: "5.1.10" null MX, "5.1.2" the domain does not exist, "5.4.4" no MX host
  // (or, without MX, the domain itself) has an address, "4.4.3" DNS trouble.
  std::string enhanced;
  std::string detail;    // human-readable, for logs and DSNs
  // In the order to try. Hosts whose lookups found no address stay in the list with
  // lookupError set (for logs and DSNs); callers try only the addresses.
  std::vector<MxHost> hosts;
  // The MX answer was authenticated (or, for an implicit MX, the authenticated NoData
  // that made it one): RFC 7672 2.2.1, the MX host names came from a signed zone. Set by
  // RouteResolver::resolve only; false for relays and address literals.
  bool mxSecure = false;
  // The MX host names are authenticated: DNSSEC (the resolver's AD bit on the MX answer)
  // or a matching MTA-STS policy. RFC 8689 4.2.1 step 2: a REQUIRETLS message goes only
  // to validated MX hosts. Set by the Scheduler from the domain's TLS policy
  // (Scheduler::onTlsPolicy, tls_policy.h), never by RouteResolver.
  bool validated = false;
};

// Sorts by preference; hosts with equal preference are shuffled with rng (RFC 5321 5.1:
// "randomize them to spread the load"); duplicates by name are dropped (keep the best
// preference). Null MX is not handled here (see isNullMx).
std::vector<dns::MxRecord> orderMx(std::vector<dns::MxRecord> records, std::mt19937_64& rng);

// RFC 7505 section 3: a single MX record with preference 0 (any preference, in practice)
// and exchange "." (empty here). Domains with a null MX among other MX records are treated
// as null MX too (section 3: "MUST NOT" publish others; we refuse to guess).
bool isNullMx(const std::vector<dns::MxRecord>& records);

// RFC 5321 4.1.3 address literal as a mailbox domain ("[192.0.2.1]", "[IPv6:2001:db8::1]"):
// no DNS at all, the route is that address. nullopt when domain is not a literal (then use
// RouteResolver); a PermFail "5.1.2" route for a literal that is not an IPv4/IPv6 address.
// RouteResolver::resolve expects a domain name: callers check literals here first.
std::optional<Route> routeForAddressLiteral(const std::string& domain);

// Also used by RFC 5321 5.1 "if the MX list contains the local host": never route to an
// address that is loopback unless allowLoopback (tests) is set. Left to the caller.

// Configured relays given only as IP addresses or "localhost" (RFC 6761 6.3: loopback,
// never asked of DNS): the route, hosts in order, with no lookup. nullopt when any name
// needs DNS (then RouteResolver::resolveHosts).
std::optional<Route> relayRouteWithoutDns(const std::vector<std::string>& names);

using RouteCallback = std::function<void(Route)>;

class RouteResolver {
 public:
  RouteResolver(dns::Resolver& resolver, uint64_t seed);
  // Lookups still in flight are abandoned: their callbacks are never called.
  ~RouteResolver();
  RouteResolver(const RouteResolver&) = delete;
  RouteResolver& operator=(const RouteResolver&) = delete;

  // Looks up MX; for each exchange (or the domain, when there is no MX) AAAA and A in
  // parallel; calls back once with the whole route. The callback always runs from a
  // resolver callback, never inside resolve(). Several resolves may run at once.
  void resolve(const std::string& domain, RouteCallback cb);
  // Configured relays (delivery.relay): no MX step. Each name in order becomes one host
  // of the route (hosts[i] is names[i]); an IP address or "localhost" needs no DNS,
  // others get AAAA and A. Addresses are not de-duplicated across hosts, and a route with
  // no address at all is TempFail 4.4.3 (never permanent). Calls back like resolve(), but
  // inside the call when no name needs DNS (use relayRouteWithoutDns() for those lists).
  void resolveHosts(const std::vector<std::string>& names, RouteCallback cb);

 private:
  dns::Resolver& resolver_;
  std::mt19937_64 rng_;
  // Shared with every lookup in flight; cleared by the destructor so late answers are dropped.
  std::shared_ptr<bool> alive_;
};

}  // namespace subrelay::delivery
