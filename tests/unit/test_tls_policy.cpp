// delivery/tls_policy.h: DANE (RFC 7672 2.2) and MTA-STS (RFC 8461 4, 5) decided per MX
// host, DANE first (RFC 8461 section 2), and what counts as validated for REQUIRETLS
// (RFC 8689 4.2.1).
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "delivery/tls_explain.h"
#include "delivery/tls_policy.h"

using namespace subrelay;
using namespace subrelay::delivery;

namespace {

Route routeOf(std::vector<std::string> names, bool mxSecure) {
  Route r;
  r.status = RouteStatus::Ok;
  r.mxSecure = mxSecure;
  uint16_t pref = 10;
  for (auto& n : names) {
    MxHost h;
    h.name = n;
    h.preference = pref;
    pref += 10;
    h.addresses = {"192.0.2.1"};
    h.addressesSecure = mxSecure;
    r.hosts.push_back(std::move(h));
  }
  return r;
}

dns::TlsaRecord daneEe() { return {3, 1, 1, std::vector<uint8_t>(32, 0xab)}; }

TlsaLookup secureTlsa(const std::string& host, std::vector<dns::TlsaRecord> records) {
  return {host, dns::Status::Ok, true, std::move(records)};
}

mtasts::CachedPolicy policy(mtasts::Mode mode, std::vector<std::string> mx) {
  mtasts::CachedPolicy p;
  p.domain = "example.com";
  p.id = "20260101";
  p.policy.mode = mode;
  p.policy.maxAge = 86400;
  p.policy.mx = std::move(mx);
  return p;
}

}  // namespace

TEST_CASE("tls policy: nothing known -> every host Default, not validated") {
  TlsDecision d = decideTls("example.com", routeOf({"mx1.example.com", "mx2.example.com"}, false), {});
  REQUIRE(d.hosts.size() == 2);
  for (const auto& h : d.hosts) {
    CHECK(h.tls == HostTls::Default);
    CHECK(h.label.empty());
    CHECK_FALSE(h.dane);
    CHECK_FALSE(h.validated);
  }
  CHECK(d.anyUsable());
  CHECK(d.hosts[0].host == "mx1.example.com");
}

TEST_CASE("tls policy: DANE with a usable secure TLSA RRset; reference names host then domain") {
  TlsPolicyInputs in;
  in.tlsa.push_back(secureTlsa("mx1.example.com", {daneEe(), {0, 0, 1, std::vector<uint8_t>(32, 1)}}));
  TlsDecision d = decideTls("example.com", routeOf({"mx1.example.com", "mx2.example.com"}, true), in);
  REQUIRE(d.hosts.size() == 2);
  CHECK(d.hosts[0].tls == HostTls::Dane);
  CHECK(d.hosts[0].label == "dane");
  CHECK(d.hosts[0].validated);  // secure MX RRset
  REQUIRE(d.hosts[0].dane);
  CHECK(d.hosts[0].dane->tlsa.size() == 2);  // all handed over: the handshake skips PKIX-TA
  CHECK(d.hosts[0].dane->tlsa[0].usage == 3);
  CHECK(d.hosts[0].dane->referenceNames == std::vector<std::string>{"mx1.example.com", "example.com"});
  // mx2 had no TLSA lookup (or NoData): pre-DANE opportunistic TLS, still validated.
  CHECK(d.hosts[1].tls == HostTls::Default);
  CHECK(d.hosts[1].validated);
}

TEST_CASE("tls policy: insecure or denied TLSA -> Default; lookup error -> Unusable (RFC 7672 2.2.1)") {
  TlsPolicyInputs in;
  in.tlsa.push_back({"a.example.com", dns::Status::Ok, false, {daneEe()}});     // insecure
  in.tlsa.push_back({"b.example.com", dns::Status::NxDomain, true, {}});        // denial
  in.tlsa.push_back({"c.example.com", dns::Status::ServFail, false, {}});       // error
  in.tlsa.push_back({"d.example.com", dns::Status::Ok, true, {{0, 0, 1, {1}}}});  // secure, unusable
  TlsDecision d =
      decideTls("example.com", routeOf({"a.example.com", "b.example.com", "c.example.com", "d.example.com"}, true), in);
  REQUIRE(d.hosts.size() == 4);
  CHECK(d.hosts[0].tls == HostTls::Default);
  CHECK(d.hosts[1].tls == HostTls::Default);
  CHECK(d.hosts[2].tls == HostTls::Unusable);
  CHECK(d.hosts[2].why.find("TLSA lookup") != std::string::npos);
  // Secure but no usable record: TLS is mandatory, unauthenticated (the handshake's
  // NoUsableRecords), so still a DANE connection.
  CHECK(d.hosts[3].tls == HostTls::Dane);
  CHECK(d.unusableWhy() == "c.example.com: " + d.hosts[2].why);
  CHECK(d.anyUsable());

  TlsPolicyInputs failing;
  failing.tlsa.push_back({"a.example.com", dns::Status::Timeout, false, {}});
  TlsDecision none = decideTls("example.com", routeOf({"a.example.com"}, true), failing);
  CHECK_FALSE(none.anyUsable());
}

TEST_CASE("tls policy: MTA-STS enforce, testing and none") {
  Route r = routeOf({"mx1.example.com", "backup.other.net"}, false);
  SUBCASE("enforce: matching hosts verified, others unusable") {
    TlsPolicyInputs in;
    in.sts = policy(mtasts::Mode::Enforce, {"*.example.com"});
    TlsDecision d = decideTls("example.com", r, in);
    REQUIRE(d.hosts.size() == 2);
    CHECK(d.hosts[0].tls == HostTls::StsVerify);
    CHECK(d.hosts[0].label == "mta-sts enforce id=20260101");
    CHECK(d.hosts[0].validated);
    CHECK(d.hosts[1].tls == HostTls::Unusable);
    CHECK(d.hosts[1].why.find("MTA-STS") != std::string::npos);
    CHECK_FALSE(d.hosts[1].validated);
    CHECK(d.anyUsable());
  }
  SUBCASE("enforce with no matching host: none usable") {
    TlsPolicyInputs in;
    in.sts = policy(mtasts::Mode::Enforce, {"mx.elsewhere.example"});
    CHECK_FALSE(decideTls("example.com", r, in).anyUsable());
  }
  SUBCASE("testing: delivered as usual, labelled; a match still validates") {
    TlsPolicyInputs in;
    in.sts = policy(mtasts::Mode::Testing, {"mx1.example.com"});
    TlsDecision d = decideTls("example.com", r, in);
    CHECK(d.hosts[0].tls == HostTls::Default);
    CHECK(d.hosts[0].label == "mta-sts testing id=20260101");
    CHECK(d.hosts[0].validated);
    CHECK(d.hosts[1].tls == HostTls::Default);
    CHECK_FALSE(d.hosts[1].validated);
  }
  SUBCASE("none: as without a policy") {
    TlsPolicyInputs in;
    in.sts = policy(mtasts::Mode::None, {});
    TlsDecision d = decideTls("example.com", r, in);
    CHECK(d.hosts[0].tls == HostTls::Default);
    CHECK(d.hosts[0].label.empty());
    CHECK_FALSE(d.hosts[0].validated);
  }
}

TEST_CASE("tls policy: DANE takes precedence over MTA-STS (RFC 8461 section 2)") {
  Route r = routeOf({"mx1.example.com", "mx2.example.com"}, true);
  TlsPolicyInputs in;
  in.tlsa.push_back(secureTlsa("mx1.example.com", {daneEe()}));
  in.tlsa.push_back(secureTlsa("mx2.example.com", {{1, 0, 1, std::vector<uint8_t>(32, 2)}}));  // PKIX-EE only
  in.sts = policy(mtasts::Mode::Enforce, {"mx2.example.com"});
  TlsDecision d = decideTls("example.com", r, in);
  REQUIRE(d.hosts.size() == 2);
  // mx1 is not in the policy, yet DANE authenticates it: the policy does not override DANE.
  CHECK(d.hosts[0].tls == HostTls::Dane);
  CHECK(d.hosts[0].label == "dane");
  // mx2's TLSA records are all unusable: MTA-STS verification is the stronger check.
  CHECK(d.hosts[1].tls == HostTls::StsVerify);
  CHECK_FALSE(d.hosts[1].dane);
}

TEST_CASE("tls policy: an insecure MX RRset pointing at a host with secure addresses still gets DANE (RFC 7672 2.2.1)") {
  Route r = routeOf({"mx.provider.example"}, false);
  r.hosts[0].addressesSecure = true;  // the provider's zone is signed, the domain's is not
  CHECK(tlsaHosts(r) == std::vector<std::string>{"mx.provider.example"});
  TlsPolicyInputs in;
  in.tlsa.push_back(secureTlsa("mx.provider.example", {daneEe()}));
  TlsDecision d = decideTls("hosted.example", r, in);
  REQUIRE(d.hosts.size() == 1);
  CHECK(d.hosts[0].tls == HostTls::Dane);
  REQUIRE(d.hosts[0].dane);
  // Only the host name is a reference identifier: the next-hop domain came from insecure DNS.
  CHECK(d.hosts[0].dane->referenceNames == std::vector<std::string>{"mx.provider.example"});
  CHECK_FALSE(d.hosts[0].validated);  // not enough for REQUIRETLS
  // Insecure addresses: no lookup at all.
  r.hosts[0].addressesSecure = false;
  CHECK(tlsaHosts(r).empty());
}

// ---------------------------------------------------------------------------------------
// delivery/tls_explain.h: `subrelay tls-policy DOMAIN` on fabricated lookups.
// ---------------------------------------------------------------------------------------
namespace {

SchedulerSettings explainSettings(bool dnssec = true, bool mtaSts = true) {
  SchedulerSettings s;
  s.recipientTlsPolicy = dnssec || mtaSts;
  s.trustDnssec = dnssec;
  s.destinations.allowPrivate = true;
  return s;
}

std::shared_ptr<const RelaySet> relaySetOf(const std::string& id, const std::string& host) {
  auto set = std::make_shared<RelaySet>();
  set->id = id;
  RelayHost h;
  h.host = host;
  h.port = 587;
  h.origin = "delivery.relay[0]";
  set->hosts.push_back(h);
  return set;
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// The whole command without I/O: start, route, lookups filled by `fill`, finish.
template <typename Fill>
TlsExplanation explainWith(const SchedulerSettings& s, bool mtaSts, const std::string& domain, Route route,
                           Fill fill, const std::string& account = "") {
  TlsExplanation e = startExplanation(s, mtaSts, domain, account);
  REQUIRE(needsRoute(e));
  applyRoute(e, s, std::move(route));
  if (wantsPolicyLookups(e)) fill(e);
  finishExplanation(e);
  return e;
}

TlsExplanation explain(const SchedulerSettings& s, bool mtaSts, const std::string& domain, Route route) {
  return explainWith(s, mtaSts, domain, std::move(route), [](TlsExplanation&) {});
}

}  // namespace

TEST_CASE("tls-policy explain: delivery.relay applies, nothing is looked up") {
  SchedulerSettings s = explainSettings();
  s.relay = relaySetOf("delivery.relay", "smtp.relay.test");
  TlsExplanation e = startExplanation(s, true, "example.com", "");
  CHECK_FALSE(needsRoute(e));
  CHECK_FALSE(e.lookups);
  finishExplanation(e);
  CHECK(e.policy == "relay delivery.relay");
  CHECK(e.relayWhy == "delivery.relay");
  const std::string text = renderText(e);
  CHECK(contains(text, "MX, DANE and MTA-STS are not consulted"));
  CHECK(contains(text, "smtp.relay.test:587 STARTTLS, certificate verified"));
  CHECK(contains(text, "policy: relay delivery.relay\n"));
  const std::string json = renderJson(e);
  CHECK(contains(json, "\"policy\":\"relay delivery.relay\""));
  CHECK(contains(json, "\"host\":\"smtp.relay.test\""));
  CHECK(contains(json, "\"route\":null"));
}

TEST_CASE("tls-policy explain: relay_overrides before the account's relay before delivery.relay") {
  SchedulerSettings s = explainSettings();
  s.relay = relaySetOf("delivery.relay", "smtp.relay.test");
  s.accountRelays["tenant"] = relaySetOf("account:tenant", "smtp.tenant.test");
  s.domainRelays["partner.test"] = relaySetOf("domain:partner.test", "smtp.partner.test");
  s.domainRelays["direct.test"] = nullptr;

  TlsExplanation e = startExplanation(s, true, "partner.test", "tenant");
  CHECK(e.relay->id == "domain:partner.test");
  CHECK(e.relayWhy == "delivery.relay_overrides");
  CHECK(e.accountRelays.empty());

  e = startExplanation(s, true, "example.com", "tenant");
  CHECK(e.relay->id == "account:tenant");
  CHECK(e.relayWhy == "accounts[].relay of tenant");

  // No account given: delivery.relay, with a note naming the accounts that differ.
  e = startExplanation(s, true, "example.com", "");
  CHECK(e.relay->id == "delivery.relay");
  CHECK(e.accountRelays == std::vector<std::string>{"tenant"});
  finishExplanation(e);
  CHECK(contains(renderText(e), "tenant (use --account NAME"));

  // "direct" wins over every relay: MX delivery and the domain's own policy.
  e = startExplanation(s, true, "direct.test", "tenant");
  CHECK_FALSE(e.relay);
  CHECK(e.directOverride);
  CHECK(e.lookups);
  CHECK(needsRoute(e));
  CHECK(contains(renderText(e), "delivery.relay_overrides sends direct.test direct"));
}

TEST_CASE("tls-policy explain: tls_policy_overrides wins over DANE and MTA-STS") {
  SchedulerSettings s = explainSettings();
  s.tlsOverrides["override.test"] = TlsPolicy::Required;
  TlsExplanation e = explain(s, true, "override.test", routeOf({"mx.override.test"}, true));
  CHECK_FALSE(e.lookups);
  CHECK(e.tlsaHosts.empty());
  CHECK_FALSE(e.decision);
  CHECK(e.policy == "override required");
  const std::string text = renderText(e);
  CHECK(contains(text, "2. override: delivery.tls_policy_overrides: required"));
  CHECK(contains(text, "4. DANE: not consulted"));
  CHECK(contains(text, "mx.override.test: required (tls_policy_overrides)"));
  CHECK(contains(renderJson(e), "\"tls_override\":true"));
}

TEST_CASE("tls-policy explain: a secure MX with a usable TLSA record -> dane") {
  SchedulerSettings s = explainSettings();
  TlsExplanation e = explainWith(s, true, "signed.test", routeOf({"mx.signed.test"}, true), [](TlsExplanation& x) {
    REQUIRE(x.tlsaHosts == std::vector<std::string>{"mx.signed.test"});
    REQUIRE(x.inputs.tlsa.size() == 1);
    CHECK(x.inputs.tlsa[0].status == dns::Status::Timeout);  // placeholder until answered
    x.inputs.tlsa[0] = secureTlsa("mx.signed.test", {daneEe()});
    x.sts.txtAnswered = true;
    x.sts.txtStatus = dns::Status::NxDomain;
    x.sts.answered = true;
    x.sts.source = "none";
  });
  REQUIRE(e.decision);
  CHECK(e.decision->hosts[0].tls == HostTls::Dane);
  CHECK(e.policy == "dane");
  const std::string text = renderText(e);
  CHECK(contains(text, "MX RRset DNSSEC-secure (AD)"));
  CHECK(contains(text, "_25._tcp.mx.signed.test TLSA: ok, secure"));
  CHECK(contains(text, "3 1 1 abab"));
  CHECK(contains(text, ": usable"));
  CHECK(contains(text, "mx.signed.test: dane: TLS required, the certificate must match a TLSA record"));
  CHECK(contains(text, "policy: dane\n"));
  const std::string json = renderJson(e);
  CHECK(contains(json, "\"policy\":\"dane\""));
  CHECK(contains(json, "\"usable\":true"));
  CHECK(contains(json, "\"mx_secure\":true"));
}

TEST_CASE("tls-policy explain: only unusable TLSA records -> dane without authentication") {
  TlsExplanation e = explainWith(explainSettings(true, false), false, "signed.test", routeOf({"mx.signed.test"}, true),
                                 [](TlsExplanation& x) {
                                   x.inputs.tlsa[0] = secureTlsa("mx.signed.test", {{0, 0, 1, {1, 2, 3}}});
                                 });
  CHECK(e.policy == "dane");
  const std::string text = renderText(e);
  CHECK(contains(text, "unusable: "));
  CHECK(contains(text, "without authentication"));
  CHECK(contains(text, "5. MTA-STS: off (delivery.mta_sts is false)"));
}

TEST_CASE("tls-policy explain: delivery.dnssec false -> the AD bit is not trusted, no DANE") {
  SchedulerSettings s = explainSettings(false, true);
  TlsExplanation e = explainWith(s, true, "signed.test", routeOf({"mx.signed.test"}, true), [](TlsExplanation& x) {
    x.sts.answered = true;
    x.sts.source = "none";
  });
  CHECK(e.dnsRoute->mxSecure);  // as the resolver said
  CHECK_FALSE(e.route->mxSecure);  // as delivery uses it
  CHECK(e.tlsaHosts.empty());
  CHECK(e.policy == "opportunistic");
  const std::string text = renderText(e);
  CHECK(contains(text, "delivery.dnssec is false: AD bit not trusted, no DANE"));
  CHECK(contains(text, "policy: opportunistic\n"));
  CHECK(contains(text, "MX RRset with AD (not trusted)"));
  CHECK(contains(text, "192.0.2.1 (AD, not trusted)"));
}

TEST_CASE("tls-policy explain: an unsigned zone without MTA-STS -> delivery.tls") {
  SchedulerSettings s = explainSettings();
  s.tls = TlsPolicy::Required;
  TlsExplanation e = explainWith(s, true, "unsigned.test", routeOf({"mx.unsigned.test"}, false), [](TlsExplanation& x) {
    CHECK(x.tlsaHosts.empty());
    x.sts.txtAnswered = true;
    x.sts.txtStatus = dns::Status::NxDomain;
    x.sts.answered = true;
    x.sts.source = "none";
  });
  CHECK(e.policy == "required");
  const std::string text = renderText(e);
  CHECK(contains(text, "4. DANE: no: no MX host has DNSSEC-secure address records"));
  CHECK(contains(text, "_mta-sts.unsigned.test TXT: nxdomain"));
  CHECK(contains(text, "no policy (none)"));
  CHECK(contains(text, "mx.unsigned.test: required: delivery.tls: no DANE or MTA-STS policy applies"));
}

TEST_CASE("tls-policy explain: MTA-STS enforce, testing, and an enforce policy listing no MX") {
  SchedulerSettings s = explainSettings(false, true);
  auto withPolicy = [](mtasts::CachedPolicy p) {
    return [p](TlsExplanation& e) {
      e.sts.answered = true;
      e.sts.source = "fetched";
      e.sts.txtAnswered = true;
      e.sts.txtStatus = dns::Status::Ok;
      e.sts.txt = {"v=STSv1; id=20260101;"};
      e.inputs.sts = p;
    };
  };
  TlsExplanation e = explainWith(s, true, "example.com", routeOf({"mx1.example.com", "mx2.example.com"}, false),
                                 withPolicy(policy(mtasts::Mode::Enforce, {"mx1.example.com"})));
  CHECK(e.policy == "mta-sts enforce");
  std::string text = renderText(e);
  CHECK(contains(text, "policy (fetched): mode enforce, id 20260101, max_age 86400, mx mx1.example.com"));
  CHECK(contains(text, "mx1.example.com: matches"));
  CHECK(contains(text, "mx2.example.com: does not match"));
  CHECK(contains(text, "mx2.example.com: unusable: not used: not listed in the MTA-STS policy"));
  std::string json = renderJson(e);
  CHECK(contains(json, "\"matching_hosts\":[\"mx1.example.com\"]"));
  CHECK(contains(json, "\"mode\":\"enforce\""));

  e = explainWith(s, true, "example.com", routeOf({"mx1.example.com"}, false),
                  withPolicy(policy(mtasts::Mode::Testing, {"mx.elsewhere.test"})));
  CHECK(e.policy == "mta-sts testing");
  CHECK(contains(renderText(e), "failures are only reported"));

  e = explainWith(s, true, "example.com", routeOf({"mx1.example.com"}, false),
                  withPolicy(policy(mtasts::Mode::Enforce, {"mx.elsewhere.test"})));
  CHECK_FALSE(e.decision->anyUsable());
  CHECK(e.policy == "none usable (delivery deferred, 4.7.5)");
}

TEST_CASE("tls-policy explain: a TLSA lookup error makes that host unusable, as in delivery") {
  SchedulerSettings s = explainSettings(true, false);
  TlsExplanation e = explainWith(s, false, "signed.test", routeOf({"mx1.signed.test", "mx2.signed.test"}, true),
                                 [](TlsExplanation& x) {
                                   REQUIRE(x.inputs.tlsa.size() == 2);
                                   x.inputs.tlsa[0].status = dns::Status::ServFail;
                                   x.inputs.tlsa[1] = {"mx2.signed.test", dns::Status::NxDomain, true, {}};
                                 });
  CHECK(e.decision->hosts[0].tls == HostTls::Unusable);
  CHECK(e.policy == "opportunistic");
  const std::string text = renderText(e);
  CHECK(contains(text, "_25._tcp.mx1.signed.test TLSA: servfail\n"));
  CHECK(contains(text, "mx1.signed.test: unusable: not used: TLSA lookup for _25._tcp.mx1.signed.test failed"));
  CHECK(contains(text, "_25._tcp.mx2.signed.test TLSA: nxdomain, secure"));
}

TEST_CASE("tls-policy explain: a failed route is an error; the destination policy is applied") {
  SchedulerSettings s = explainSettings();
  Route failed;
  failed.status = RouteStatus::TempFail;
  failed.enhanced = "4.4.3";
  failed.detail = "MX lookup for example.com: SERVFAIL from 127.0.0.1:53";
  TlsExplanation e = explain(s, true, "example.com", failed);
  CHECK(contains(e.error, "SERVFAIL"));
  CHECK(contains(e.error, "deferred"));
  CHECK(e.policy.empty());
  CHECK(contains(renderText(e), "policy: none: no route to example.com"));
  CHECK(contains(renderJson(e), "\"status\":\"tempfail\""));

  s.destinations.allowPrivate = false;
  Route loopback = routeOf({"mx.example.com"}, false);
  loopback.hosts[0].addresses = {"127.0.0.1"};
  e = explain(s, true, "example.com", loopback);
  CHECK(e.route->status == RouteStatus::PermFail);
  CHECK_FALSE(e.error.empty());
  const std::string text = renderText(e);
  CHECK(contains(text, "refused by the destination policy (delivery.allow_private_destinations): 127.0.0.1"));
}

TEST_CASE("tls-policy explain: an address literal has its route without DNS and no domain policy") {
  SchedulerSettings s = explainSettings();
  TlsExplanation e = startExplanation(s, true, "[192.0.2.7]", "");
  CHECK_FALSE(needsRoute(e));
  CHECK_FALSE(e.lookups);
  REQUIRE(e.route);
  finishExplanation(e);
  CHECK(e.policy == "opportunistic");
  CHECK(contains(renderText(e), "4. DANE: not consulted: an address literal has no DNS"));

  // Without allow_private_destinations such a recipient is refused at RCPT.
  s.destinations.allowPrivate = false;
  e = startExplanation(s, true, "[192.0.2.7]", "");
  finishExplanation(e);
  CHECK(contains(e.error, "refused at RCPT"));
  CHECK(e.policy.empty());
}

TEST_CASE("tls-policy explain: an insecure MX RRset, an MX host with secure addresses -> dane") {
  Route r = routeOf({"mx.provider.example"}, false);
  r.hosts[0].addressesSecure = true;
  TlsExplanation e = explainWith(explainSettings(true, false), false, "hosted.example", r, [](TlsExplanation& x) {
    REQUIRE(x.tlsaHosts == std::vector<std::string>{"mx.provider.example"});
    x.inputs.tlsa[0] = secureTlsa("mx.provider.example", {daneEe()});
  });
  CHECK(e.policy == "dane");
  const std::string text = renderText(e);
  CHECK(contains(text, "MX RRset not DNSSEC-secure"));
  CHECK(contains(text, "only the MX host name is a reference identifier"));
  CHECK(contains(text, "_25._tcp.mx.provider.example TLSA: ok, secure"));
}
