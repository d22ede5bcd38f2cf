// `subrelay tls-policy DOMAIN`: what the delivery engine decides about TLS for a recipient
// in DOMAIN, and why, step by step: smarthost, operator override, MX route, DANE, MTA-STS,
// the decision per MX host. I/O-free: the wiring (app/tls_policy_cmd.cpp) runs the lookups
// and fills in their answers; the rules are the scheduler's own (scheduler.h: relayFor,
// tlsFor, domainPolicyApplies, routeAsUsed; tls_policy.h: tlsaHosts, decideTls), so the
// explanation cannot drift from what delivery does.
//
//   TlsExplanation e = startExplanation(settings, mtaSts, domain, account);
//   if (needsRoute(e)) { ... RouteResolver::resolve ... applyRoute(e, settings, route); }
//   if (e.lookups) { ... TLSA for e.tlsaHosts into e.inputs.tlsa, MTA-STS into e.sts ... }
//   finishExplanation(e);   // decideTls and the one-line summary
//   print renderText(e) or renderJson(e)
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "delivery/mta_sts.h"
#include "delivery/routing.h"
#include "delivery/scheduler.h"
#include "delivery/tls_policy.h"
#include "dns/resolver.h"

namespace subrelay::delivery {

// What the MTA-STS lookups found (RFC 8461 3.1-3.3), for display; the policy that applies
// is TlsPolicyInputs::sts.
struct StsLookup {
  bool answered = false;   // the fetcher answered within the deadline
  dns::Status txtStatus = dns::Status::Error;  // "_mta-sts.<domain>" TXT
  bool txtAnswered = false;
  std::vector<std::string> txt;
  std::string source;      // PolicyAnswer::source: "fetched", "cache", "unchanged", "none"
  std::string detail;      // PolicyAnswer::detail: the last problem, "" when none
  // The answer took longer than the delivery engine waits for the domain's policy
  // (app/delivery_settings.h kTlsPolicyBudget): delivery would go on as without MTA-STS.
  bool overBudget = false;
};

struct TlsExplanation {
  std::string domain;   // A-labels, lower case (as the scheduler keys it)
  std::string account;  // the sending account evaluated; "" when none was given

  // 1. Smarthost (relayFor).
  std::shared_ptr<const RelaySet> relay;  // nullptr: direct MX delivery
  std::string relayWhy;       // "delivery.relay_overrides", "accounts[].relay", "delivery.relay"
  bool directOverride = false;  // delivery.relay_overrides says "direct" for the domain
  // Accounts with their own relay that would apply for their mail (no --account given and
  // no relay_overrides entry for the domain).
  std::vector<std::string> accountRelays;

  // 2. TLS policy names.
  TlsPolicy tls = TlsPolicy::Opportunistic;  // tlsFor(domain)
  bool tlsOverride = false;                  // from delivery.tls_policy_overrides
  bool addressLiteral = false;
  bool trustDnssec = false;  // delivery.dnssec
  bool mtaSts = false;       // delivery.mta_sts
  bool lookups = false;      // domainPolicyApplies: DANE / MTA-STS are consulted

  // 3. The MX route: as resolved (the resolver's AD bits) and as the scheduler uses it.
  std::optional<Route> dnsRoute;
  std::optional<Route> route;

  // 4. DANE: the hosts whose TLSA records are looked up (tlsaHosts(route)); the answers
  // (with the MTA-STS policy) are the inputs of decideTls.
  std::vector<std::string> tlsaHosts;
  TlsPolicyInputs inputs;

  // 5. MTA-STS.
  StsLookup sts;

  // 6. The decision (an Ok route and lookups) and the summary.
  std::optional<TlsDecision> decision;
  std::string policy;   // "dane", "mta-sts enforce", "override required", "relay delivery.relay", ...
  std::string error;    // why no answer could be given (a failed route): exit status 1
};

// Steps 1-2 (no DNS): the relay and the TLS policy names for a recipient in `domain` sent
// by `account` ("" = any account without a relay of its own). An address literal gets its
// route here too (RFC 5321 4.1.3, no DNS).
TlsExplanation startExplanation(const SchedulerSettings& s, bool mtaSts, const std::string& domain,
                                const std::string& account);
// An MX lookup is needed (no relay, not an address literal).
bool needsRoute(const TlsExplanation& e);
// Step 3: the route RouteResolver found. Sets `route`, `tlsaHosts` (when lookups apply)
// and `error` when delivery would fail or defer here.
void applyRoute(TlsExplanation& e, const SchedulerSettings& s, Route resolved);
// Whether steps 4-5 run: an Ok route and the domain's policy is consulted.
bool wantsPolicyLookups(const TlsExplanation& e);
// Step 6: decideTls on the inputs found, and the summary.
void finishExplanation(TlsExplanation& e);

// The summary for one host decision: "dane", "mta-sts enforce", "mta-sts testing",
// "unusable", or the default policy name.
std::string hostPolicyName(const TlsExplanation& e, const HostTlsDecision& h);

std::string renderText(const TlsExplanation& e);
std::string renderJson(const TlsExplanation& e);  // one object, no newline

}  // namespace subrelay::delivery
