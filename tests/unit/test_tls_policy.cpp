// delivery/tls_policy.h: DANE (RFC 7672 2.2) and MTA-STS (RFC 8461 4, 5) decided per MX
// host, DANE first (RFC 8461 section 2), and what counts as validated for REQUIRETLS
// (RFC 8689 4.2.1).
#include <doctest/doctest.h>

#include <string>
#include <vector>

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
