// delivery/: MX ordering and classification (RFC 5321 5.1, RFC 7505) through a fake
// resolver whose answers are pumped by hand (so the order of answers is ours to choose),
// the retry schedule, and DSNs (RFC 3464, RFC 6522, RFC 6533) checked with a small MIME
// reader written here.
#include <doctest/doctest.h>

#include <algorithm>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "delivery/attempt.h"
#include "delivery/destination.h"
#include "delivery/dsn.h"
#include "delivery/retry.h"
#include "delivery/routing.h"
#include "util/clock.h"

using namespace subrelay;
using namespace subrelay::delivery;
using dns::QType;
using dns::Status;

namespace {

// ---------------------------------------------------------------------------------------
// A resolver whose answers come from a table, delivered only when the test pumps them.

class FakeResolver : public dns::Resolver {
 public:
  void set(const std::string& name, QType type, dns::Answer a) {
    a.name = name;
    a.canonicalName = name;
    a.type = type;
    table_[{name, type}] = std::move(a);
  }
  void setStatus(const std::string& name, QType type, Status s) {
    dns::Answer a;
    a.status = s;
    a.detail = std::string("fake ") + (s == Status::ServFail ? "SERVFAIL" : "failure");
    set(name, type, std::move(a));
  }
  void setMx(const std::string& name, std::vector<dns::MxRecord> mx) {
    dns::Answer a;
    a.status = Status::Ok;
    a.mx = std::move(mx);
    set(name, QType::MX, std::move(a));
  }
  void setAddrs(const std::string& name, QType type, std::vector<std::string> addrs) {
    dns::Answer a;
    a.status = Status::Ok;
    a.addresses = std::move(addrs);
    set(name, type, std::move(a));
  }

  // The answer already in the table (set* first) carries the AD bit.
  void authenticate(const std::string& name, QType type) { table_.at({name, type}).authenticated = true; }

  void query(const std::string& name, QType type, dns::Callback cb) override {
    queries.emplace_back(name, type);
    pending_.push_back({name, type, std::move(cb)});
  }

  size_t pendingCount() const { return pending_.size(); }

  // Answers the oldest (or, with newestFirst, the newest) query. False when none is left.
  bool pumpOne(bool newestFirst = false) {
    if (pending_.empty()) return false;
    Pending p;
    if (newestFirst) {
      p = std::move(pending_.back());
      pending_.pop_back();
    } else {
      p = std::move(pending_.front());
      pending_.pop_front();
    }
    dns::Answer a;
    auto it = table_.find({p.name, p.type});
    if (it != table_.end()) {
      a = it->second;
    } else {  // not in the table: the name does not exist
      a.status = Status::NxDomain;
      a.name = p.name;
      a.canonicalName = p.name;
      a.type = p.type;
    }
    p.cb(a);
    return true;
  }
  size_t pumpAll(bool newestFirst = false) {
    size_t n = 0;
    while (pumpOne(newestFirst)) ++n;
    return n;
  }

  size_t queriesFor(QType type) const {
    return static_cast<size_t>(
        std::count_if(queries.begin(), queries.end(), [&](const auto& q) { return q.second == type; }));
  }

  std::vector<std::pair<std::string, QType>> queries;

 private:
  struct Pending {
    std::string name;
    QType type = QType::A;
    dns::Callback cb;
  };
  std::map<std::pair<std::string, QType>, dns::Answer> table_;
  std::deque<Pending> pending_;
};

// Collects the callbacks of one resolve.
struct Outcome {
  int calls = 0;
  Route route;
  RouteCallback callback() {
    return [this](Route r) {
      ++calls;
      route = std::move(r);
    };
  }
};

std::vector<std::string> names(const std::vector<dns::MxRecord>& v) {
  std::vector<std::string> out;
  out.reserve(v.size());
  for (const auto& r : v) out.push_back(r.exchange);
  return out;
}

using Strings = std::vector<std::string>;

}  // namespace

// ---------------------------------------------------------------------------------------
// orderMx / isNullMx

TEST_CASE("orderMx: by preference, lowest first") {
  std::mt19937_64 rng(1);
  auto out = orderMx({{20, "b.example"}, {10, "a.example"}, {30, "c.example"}, {15, "d.example"}}, rng);
  CHECK(names(out) == Strings{"a.example", "d.example", "b.example", "c.example"});
  CHECK(out[0].preference == 10);
  CHECK(out[3].preference == 30);
  CHECK(orderMx({}, rng).empty());
}

TEST_CASE("orderMx: equal preferences are shuffled, deterministically for a seed") {
  std::set<Strings> seen;
  for (uint64_t seed = 0; seed < 200; ++seed) {
    std::mt19937_64 rng(seed);
    auto out = orderMx({{10, "a.example"}, {10, "b.example"}, {5, "first.example"}, {20, "last.example"}}, rng);
    REQUIRE(out.size() == 4);
    CHECK(out[0].exchange == "first.example");
    CHECK(out[3].exchange == "last.example");
    seen.insert(names(out));
  }
  CHECK(seen.size() == 2);  // both orders of a/b appear
  CHECK(seen.count(Strings{"first.example", "a.example", "b.example", "last.example"}) == 1);
  CHECK(seen.count(Strings{"first.example", "b.example", "a.example", "last.example"}) == 1);

  // Three at one preference: all six orders show up over many seeds.
  std::set<Strings> three;
  for (uint64_t seed = 0; seed < 500; ++seed) {
    std::mt19937_64 rng(seed);
    three.insert(names(orderMx({{0, "x"}, {0, "y"}, {0, "z"}}, rng)));
  }
  CHECK(three.size() == 6);

  // The same seed gives the same order.
  for (uint64_t seed : {1u, 7u, 42u}) {
    std::mt19937_64 r1(seed), r2(seed);
    std::vector<dns::MxRecord> in = {{10, "a"}, {10, "b"}, {10, "c"}, {10, "d"}, {10, "e"}};
    CHECK(names(orderMx(in, r1)) == names(orderMx(in, r2)));
  }
}

TEST_CASE("orderMx: duplicates keep their best preference; names are normalised") {
  std::mt19937_64 rng(3);
  auto out = orderMx({{20, "mx.example"}, {10, "MX.Example."}, {30, "other.example"}, {30, "mx.example"}}, rng);
  REQUIRE(out.size() == 2);
  CHECK(out[0].exchange == "mx.example");
  CHECK(out[0].preference == 10);
  CHECK(out[1].exchange == "other.example");
}

TEST_CASE("isNullMx: RFC 7505") {
  CHECK(isNullMx({{0, ""}}));
  CHECK(isNullMx({{10, ""}}));                     // any preference, in practice
  CHECK(isNullMx({{0, "."}}));                     // not normalised yet
  CHECK(isNullMx({{0, ""}, {10, "mx.example"}}));  // mixed: refuse to guess
  CHECK_FALSE(isNullMx({{10, "mx.example"}}));
  CHECK_FALSE(isNullMx({}));
}

TEST_CASE("routeForAddressLiteral") {
  CHECK_FALSE(routeForAddressLiteral("example.com").has_value());
  auto v4 = routeForAddressLiteral("[192.0.2.1]");
  REQUIRE(v4.has_value());
  CHECK(v4->status == RouteStatus::Ok);
  REQUIRE(v4->hosts.size() == 1);
  CHECK(v4->hosts[0].addresses == Strings{"192.0.2.1"});
  auto v6 = routeForAddressLiteral("[IPv6:2001:DB8:0:0::1]");
  REQUIRE(v6.has_value());
  CHECK(v6->status == RouteStatus::Ok);
  CHECK(v6->hosts[0].addresses == Strings{"2001:db8::1"});
  for (const char* bad : {"[300.0.0.1]", "[2001:db8::1]", "[tag:whatever]", "[]"}) {
    auto r = routeForAddressLiteral(bad);
    REQUIRE(r.has_value());
    CHECK(r->status == RouteStatus::PermFail);
    CHECK(r->enhanced == "5.1.2");
  }
}

// ---------------------------------------------------------------------------------------
// RouteResolver

TEST_CASE("RouteResolver: MX hosts in order, IPv6 before IPv4, every host looked up in parallel") {
  FakeResolver dns;
  dns.setMx("example.com", {{20, "mx2.example.com"}, {10, "mx1.example.com"}});
  dns.setAddrs("mx1.example.com", QType::A, {"192.0.2.1", "192.0.2.2"});
  dns.setAddrs("mx1.example.com", QType::AAAA, {"2001:db8::1"});
  dns.setAddrs("mx2.example.com", QType::A, {"192.0.2.3"});
  dns.setAddrs("mx2.example.com", QType::AAAA, {"2001:db8::3"});

  RouteResolver rr(dns, 1);
  Outcome o;
  rr.resolve("Example.COM.", o.callback());
  CHECK(o.calls == 0);  // never inside resolve()
  REQUIRE(dns.pendingCount() == 1);
  CHECK(dns.queries[0] == std::make_pair(std::string("example.com"), QType::MX));
  REQUIRE(dns.pumpOne());
  CHECK(o.calls == 0);
  CHECK(dns.pendingCount() == 4);  // AAAA + A for both hosts, all at once
  // Answer in the reverse order: A before AAAA, mx2 before mx1. The route must not care.
  dns.pumpAll(/*newestFirst=*/true);
  REQUIRE(o.calls == 1);
  const Route& r = o.route;
  CHECK(r.status == RouteStatus::Ok);
  CHECK(r.enhanced.empty());
  REQUIRE(r.hosts.size() == 2);
  CHECK(r.hosts[0].name == "mx1.example.com");
  CHECK(r.hosts[0].preference == 10);
  CHECK_FALSE(r.hosts[0].implicit);
  CHECK(r.hosts[0].addresses == Strings{"2001:db8::1", "192.0.2.1", "192.0.2.2"});
  CHECK(r.hosts[1].name == "mx2.example.com");
  CHECK(r.hosts[1].addresses == Strings{"2001:db8::3", "192.0.2.3"});
  CHECK(dns.queriesFor(QType::AAAA) == 2);
  CHECK(dns.queriesFor(QType::A) == 2);
}

TEST_CASE("RouteResolver: mxSecure and addressesSecure follow the AD bit of each answer") {
  FakeResolver dns;
  dns.setMx("signed.example", {{10, "mx1.signed.example"}, {20, "mx2.other.example"}});
  dns.authenticate("signed.example", QType::MX);
  dns.setAddrs("mx1.signed.example", QType::A, {"192.0.2.1"});
  dns.authenticate("mx1.signed.example", QType::A);
  dns.set("mx1.signed.example", QType::AAAA, dns::Answer{.status = Status::NoData, .authenticated = true});
  // mx2: its A answer is signed but its AAAA is not: not secure (RFC 7672 2.2.2).
  dns.setAddrs("mx2.other.example", QType::A, {"192.0.2.2"});
  dns.authenticate("mx2.other.example", QType::A);
  dns.setAddrs("mx2.other.example", QType::AAAA, {"2001:db8::2"});
  RouteResolver rr(dns, 1);
  Outcome o;
  rr.resolve("signed.example", o.callback());
  dns.pumpAll();
  REQUIRE(o.calls == 1);
  REQUIRE(o.route.status == RouteStatus::Ok);
  CHECK(o.route.mxSecure);
  REQUIRE(o.route.hosts.size() == 2);
  CHECK(o.route.hosts[0].addressesSecure);
  CHECK_FALSE(o.route.hosts[1].addressesSecure);

  // An authenticated NoData for MX: the implicit MX is as secure as that denial.
  FakeResolver dns2;
  dns2.set("implicit.example", QType::MX, dns::Answer{.status = Status::NoData, .authenticated = true});
  dns2.setAddrs("implicit.example", QType::A, {"192.0.2.3"});
  dns2.authenticate("implicit.example", QType::A);
  dns2.set("implicit.example", QType::AAAA, dns::Answer{.status = Status::NoData, .authenticated = true});
  RouteResolver rr2(dns2, 1);
  Outcome o2;
  rr2.resolve("implicit.example", o2.callback());
  dns2.pumpAll();
  REQUIRE(o2.calls == 1);
  CHECK(o2.route.mxSecure);
  REQUIRE(o2.route.hosts.size() == 1);
  CHECK(o2.route.hosts[0].implicit);
  CHECK(o2.route.hosts[0].addressesSecure);

  // Nothing authenticated (the usual case): neither flag.
  FakeResolver dns3;
  dns3.setMx("plain.example", {{10, "mx.plain.example"}});
  dns3.setAddrs("mx.plain.example", QType::A, {"192.0.2.4"});
  RouteResolver rr3(dns3, 1);
  Outcome o3;
  rr3.resolve("plain.example", o3.callback());
  dns3.pumpAll();
  REQUIRE(o3.calls == 1);
  CHECK_FALSE(o3.route.mxSecure);
  REQUIRE(o3.route.hosts.size() == 1);
  CHECK_FALSE(o3.route.hosts[0].addressesSecure);  // AAAA was NXDOMAIN (not in the table), unsigned
}

TEST_CASE("RouteResolver: null MX -> 5.1.10, no address lookups") {
  FakeResolver dns;
  dns.setMx("nomail.example", {{0, ""}});
  dns.setAddrs("nomail.example", QType::A, {"192.0.2.9"});  // must not be used (RFC 7505 4.3)
  RouteResolver rr(dns, 1);
  Outcome o;
  rr.resolve("nomail.example", o.callback());
  dns.pumpAll();
  REQUIRE(o.calls == 1);
  CHECK(o.route.status == RouteStatus::PermFail);
  CHECK(o.route.enhanced == "5.1.10");
  CHECK(o.route.hosts.empty());
  CHECK(dns.queries.size() == 1);

  // A null MX mixed with real ones is treated as null MX too.
  FakeResolver dns2;
  dns2.setMx("mixed.example", {{0, ""}, {10, "mx.mixed.example"}});
  RouteResolver rr2(dns2, 1);
  Outcome o2;
  rr2.resolve("mixed.example", o2.callback());
  dns2.pumpAll();
  REQUIRE(o2.calls == 1);
  CHECK(o2.route.enhanced == "5.1.10");
  CHECK(dns2.queries.size() == 1);
}

TEST_CASE("RouteResolver: no MX records -> implicit MX (the domain's own AAAA/A)") {
  for (bool emptyOk : {false, true}) {
    CAPTURE(emptyOk);
    FakeResolver dns;
    if (emptyOk)
      dns.setMx("plain.example", {});  // Ok with an empty list: same as NODATA
    else
      dns.setStatus("plain.example", QType::MX, Status::NoData);
    dns.setAddrs("plain.example", QType::A, {"198.51.100.7"});
    dns.setAddrs("plain.example", QType::AAAA, {"2001:db8::7"});
    RouteResolver rr(dns, 1);
    Outcome o;
    rr.resolve("plain.example", o.callback());
    dns.pumpAll();
    REQUIRE(o.calls == 1);
    CHECK(o.route.status == RouteStatus::Ok);
    REQUIRE(o.route.hosts.size() == 1);
    CHECK(o.route.hosts[0].name == "plain.example");
    CHECK(o.route.hosts[0].implicit);
    CHECK(o.route.hosts[0].preference == 0);
    CHECK(o.route.hosts[0].addresses == Strings{"2001:db8::7", "198.51.100.7"});
  }
}

TEST_CASE("RouteResolver: implicit MX without addresses -> permanent 5.4.4") {
  FakeResolver dns;
  dns.setStatus("bare.example", QType::MX, Status::NoData);
  dns.setStatus("bare.example", QType::A, Status::NoData);
  dns.setStatus("bare.example", QType::AAAA, Status::NoData);
  RouteResolver rr(dns, 1);
  Outcome o;
  rr.resolve("bare.example", o.callback());
  dns.pumpAll();
  REQUIRE(o.calls == 1);
  CHECK(o.route.status == RouteStatus::PermFail);
  CHECK(o.route.enhanced == "5.4.4");
  REQUIRE(o.route.hosts.size() == 1);
  CHECK(o.route.hosts[0].addresses.empty());
  CHECK_FALSE(o.route.hosts[0].lookupError.empty());
}

TEST_CASE("RouteResolver: NXDOMAIN -> permanent 5.1.2") {
  FakeResolver dns;  // nothing in the table: every name is NXDOMAIN
  RouteResolver rr(dns, 1);
  Outcome o;
  rr.resolve("nonexistent.example", o.callback());
  dns.pumpAll();
  REQUIRE(o.calls == 1);
  CHECK(o.route.status == RouteStatus::PermFail);
  CHECK(o.route.enhanced == "5.1.2");
  CHECK(o.route.detail.find("nonexistent.example") != std::string::npos);
  CHECK(dns.queries.size() == 1);
}

TEST_CASE("RouteResolver: SERVFAIL, REFUSED, timeout, error on MX -> temporary 4.4.3") {
  for (Status s : {Status::ServFail, Status::Refused, Status::Timeout, Status::Error}) {
    CAPTURE(static_cast<int>(s));
    FakeResolver dns;
    dns.setStatus("flaky.example", QType::MX, s);
    dns.setAddrs("flaky.example", QType::A, {"192.0.2.1"});  // never a fallback on a temporary error
    RouteResolver rr(dns, 1);
    Outcome o;
    rr.resolve("flaky.example", o.callback());
    dns.pumpAll();
    REQUIRE(o.calls == 1);
    CHECK(o.route.status == RouteStatus::TempFail);
    CHECK(o.route.enhanced == "4.4.3");
    CHECK_FALSE(o.route.detail.empty());
    CHECK(dns.queries.size() == 1);
  }
}

TEST_CASE("RouteResolver: an MX host without addresses is skipped") {
  FakeResolver dns;
  dns.setMx("example.org", {{10, "gone.example.org"}, {20, "mx.example.org"}});
  dns.setStatus("gone.example.org", QType::A, Status::NxDomain);
  dns.setStatus("gone.example.org", QType::AAAA, Status::NxDomain);
  dns.setAddrs("mx.example.org", QType::A, {"192.0.2.20"});
  dns.setStatus("mx.example.org", QType::AAAA, Status::NoData);
  RouteResolver rr(dns, 1);
  Outcome o;
  rr.resolve("example.org", o.callback());
  dns.pumpAll();
  REQUIRE(o.calls == 1);
  CHECK(o.route.status == RouteStatus::Ok);
  REQUIRE(o.route.hosts.size() == 2);
  CHECK(o.route.hosts[0].name == "gone.example.org");
  CHECK(o.route.hosts[0].addresses.empty());
  CHECK(o.route.hosts[0].lookupError.find("nxdomain") != std::string::npos);
  CHECK(o.route.hosts[1].addresses == Strings{"192.0.2.20"});
  CHECK(o.route.hosts[1].lookupError.empty());
}

TEST_CASE("RouteResolver: one address family failing temporarily still gives a route") {
  FakeResolver dns;
  dns.setMx("example.net", {{10, "mx.example.net"}});
  dns.setAddrs("mx.example.net", QType::A, {"192.0.2.30"});
  dns.setStatus("mx.example.net", QType::AAAA, Status::ServFail);
  RouteResolver rr(dns, 1);
  Outcome o;
  rr.resolve("example.net", o.callback());
  dns.pumpAll();
  REQUIRE(o.calls == 1);
  CHECK(o.route.status == RouteStatus::Ok);
  CHECK(o.route.hosts.at(0).addresses == Strings{"192.0.2.30"});
}

TEST_CASE("RouteResolver: no MX host has an address") {
  SUBCASE("every lookup a definite negative -> permanent 5.4.4") {
    FakeResolver dns;
    dns.setMx("example.org", {{10, "a.example.org"}, {20, "b.example.org"}});
    dns.setStatus("a.example.org", QType::AAAA, Status::NoData);
    dns.setStatus("a.example.org", QType::A, Status::NoData);
    // b.example.org: not in the table -> NXDOMAIN for both
    RouteResolver rr(dns, 1);
    Outcome o;
    rr.resolve("example.org", o.callback());
    dns.pumpAll();
    REQUIRE(o.calls == 1);
    CHECK(o.route.status == RouteStatus::PermFail);
    CHECK(o.route.enhanced == "5.4.4");
    CHECK(o.route.hosts.size() == 2);
    CHECK(o.route.detail.find("a.example.org") != std::string::npos);
    CHECK(o.route.detail.find("b.example.org") != std::string::npos);
  }
  SUBCASE("any temporary failure -> temporary 4.4.3") {
    FakeResolver dns;
    dns.setMx("example.org", {{10, "a.example.org"}, {20, "b.example.org"}});
    dns.setStatus("a.example.org", QType::AAAA, Status::NoData);
    dns.setStatus("a.example.org", QType::A, Status::NoData);
    dns.setStatus("b.example.org", QType::AAAA, Status::NxDomain);
    dns.setStatus("b.example.org", QType::A, Status::Timeout);
    RouteResolver rr(dns, 1);
    Outcome o;
    rr.resolve("example.org", o.callback());
    dns.pumpAll();
    REQUIRE(o.calls == 1);
    CHECK(o.route.status == RouteStatus::TempFail);
    CHECK(o.route.enhanced == "4.4.3");
    CHECK(o.route.hosts.at(1).lookupError.find("timeout") != std::string::npos);
  }
}

TEST_CASE("RouteResolver: an MX exchange that is an IP address is not used") {
  FakeResolver dns;
  dns.setMx("example.org", {{10, "192.0.2.1"}, {20, "mx.example.org"}});
  dns.setAddrs("mx.example.org", QType::A, {"192.0.2.2"});
  RouteResolver rr(dns, 1);
  Outcome o;
  rr.resolve("example.org", o.callback());
  dns.pumpAll();
  REQUIRE(o.calls == 1);
  CHECK(o.route.status == RouteStatus::Ok);
  REQUIRE(o.route.hosts.size() == 2);
  CHECK(o.route.hosts[0].addresses.empty());
  CHECK_FALSE(o.route.hosts[0].lookupError.empty());
  CHECK(o.route.hosts[1].addresses == Strings{"192.0.2.2"});
  for (const auto& q : dns.queries) CHECK(q.first != "192.0.2.1");

  FakeResolver only;
  only.setMx("example.org", {{10, "192.0.2.1"}});
  RouteResolver rr2(only, 1);
  Outcome o2;
  rr2.resolve("example.org", o2.callback());
  only.pumpAll();
  REQUIRE(o2.calls == 1);  // called back from the MX answer, with no address lookups
  CHECK(o2.route.status == RouteStatus::PermFail);
  CHECK(o2.route.enhanced == "5.4.4");
  CHECK(only.queries.size() == 1);
}

TEST_CASE("RouteResolver: an address shared by two MX hosts is listed once") {
  FakeResolver dns;
  dns.setMx("example.org", {{10, "a.example.org"}, {20, "b.example.org"}});
  dns.setAddrs("a.example.org", QType::A, {"192.0.2.1"});
  dns.setAddrs("b.example.org", QType::A, {"192.0.2.1", "192.0.2.2"});
  RouteResolver rr(dns, 1);
  Outcome o;
  rr.resolve("example.org", o.callback());
  dns.pumpAll();
  REQUIRE(o.calls == 1);
  CHECK(o.route.hosts.at(0).addresses == Strings{"192.0.2.1"});
  CHECK(o.route.hosts.at(1).addresses == Strings{"192.0.2.2"});
}

TEST_CASE("RouteResolver: equal preferences shuffled per seed") {
  std::set<std::string> firsts;
  for (uint64_t seed = 0; seed < 64; ++seed) {
    FakeResolver dns;
    dns.setMx("example.org", {{10, "a.example.org"}, {10, "b.example.org"}});
    dns.setAddrs("a.example.org", QType::A, {"192.0.2.1"});
    dns.setAddrs("b.example.org", QType::A, {"192.0.2.2"});
    RouteResolver rr(dns, seed);
    Outcome o;
    rr.resolve("example.org", o.callback());
    dns.pumpAll();
    REQUIRE(o.calls == 1);
    firsts.insert(o.route.hosts.at(0).name);
  }
  CHECK(firsts.size() == 2);
}

TEST_CASE("RouteResolver: several resolves at once, answered interleaved") {
  FakeResolver dns;
  dns.setMx("one.example", {{10, "mx.one.example"}});
  dns.setAddrs("mx.one.example", QType::A, {"192.0.2.1"});
  dns.setStatus("two.example", QType::MX, Status::NoData);
  dns.setAddrs("two.example", QType::AAAA, {"2001:db8::2"});
  RouteResolver rr(dns, 9);
  Outcome o1, o2, o3;
  rr.resolve("one.example", o1.callback());
  rr.resolve("two.example", o2.callback());
  rr.resolve("three.example", o3.callback());
  dns.pumpAll(/*newestFirst=*/true);
  CHECK(o1.calls == 1);
  CHECK(o2.calls == 1);
  CHECK(o3.calls == 1);
  CHECK(o1.route.hosts.at(0).addresses == Strings{"192.0.2.1"});
  CHECK(o2.route.hosts.at(0).addresses == Strings{"2001:db8::2"});
  CHECK(o3.route.enhanced == "5.1.2");
}

TEST_CASE("RouteResolver: destroyed while lookups are in flight -> no callback") {
  SUBCASE("during the MX lookup") {
    FakeResolver dns;
    dns.setMx("example.com", {{10, "mx.example.com"}});
    dns.setAddrs("mx.example.com", QType::A, {"192.0.2.1"});
    Outcome o;
    {
      RouteResolver rr(dns, 1);
      rr.resolve("example.com", o.callback());
    }
    dns.pumpAll();
    CHECK(o.calls == 0);
    CHECK(dns.queries.size() == 1);  // no address lookups started after destruction
  }
  SUBCASE("during the address lookups") {
    FakeResolver dns;
    dns.setMx("example.com", {{10, "mx.example.com"}});
    dns.setAddrs("mx.example.com", QType::A, {"192.0.2.1"});
    Outcome o;
    auto rr = std::make_unique<RouteResolver>(dns, 1);
    rr->resolve("example.com", o.callback());
    REQUIRE(dns.pumpOne());  // the MX answer
    REQUIRE(dns.pumpOne());  // one address answer of two
    rr.reset();
    dns.pumpAll();
    CHECK(o.calls == 0);
  }
  SUBCASE("a callback may destroy the RouteResolver") {
    FakeResolver dns;
    dns.setMx("example.com", {{10, "mx.example.com"}});
    dns.setAddrs("mx.example.com", QType::A, {"192.0.2.1"});
    auto rr = std::make_unique<RouteResolver>(dns, 1);
    int calls = 0;
    rr->resolve("example.com", [&](const Route&) {
      ++calls;
      rr.reset();
    });
    dns.pumpAll();
    CHECK(calls == 1);
    CHECK(rr == nullptr);
  }
}

// ---------------------------------------------------------------------------------------
// Retry maths

TEST_CASE("retry: each step of the default schedule, the last one repeating") {
  RetryPolicy p;  // defaults: 5m 10m 20m 40m 1h 2h 4h 8h, 5 days
  REQUIRE(p.schedule.size() == 8);
  const int64_t received = 1'795'863'890;
  const int64_t now = received + 60;
  const int64_t steps[] = {300, 600, 1200, 2400, 3600, 7200, 14400, 28800};
  for (int64_t k = 1; k <= 8; ++k) {
    CAPTURE(k);
    auto next = nextAttemptAt(k, now, received, p);
    REQUIRE(next.has_value());
    CHECK(*next == now + steps[k - 1]);
  }
  for (int64_t k : {9, 10, 50, 100000}) {
    CAPTURE(k);
    CHECK(nextAttemptAt(k, now, received, p) == std::optional<int64_t>(now + 28800));
  }
  CHECK(nextAttemptAt(0, now, received, p) == std::optional<int64_t>(now + 300));  // treated as the 1st
}

TEST_CASE("retry: expiry at max_queue_time, with a final attempt at the expiry instant") {
  RetryPolicy p;
  const int64_t received = 1'000'000;
  const int64_t deadline = received + int64_t{5} * 24 * 3600;
  // The 8h step lands exactly on the deadline: that is still a try.
  CHECK(nextAttemptAt(12, deadline - 28800, received, p) == std::optional<int64_t>(deadline));
  // It overshoots: one last try at the expiry instant.
  CHECK(nextAttemptAt(12, deadline - 3600, received, p) == std::optional<int64_t>(deadline));
  CHECK(nextAttemptAt(12, deadline - 1, received, p) == std::optional<int64_t>(deadline));
  // That final attempt failed: give up.
  CHECK_FALSE(nextAttemptAt(13, deadline, received, p).has_value());
  CHECK_FALSE(nextAttemptAt(13, deadline + 10, received, p).has_value());
  // expired(): not yet at the instant of the final try, expired after it.
  CHECK_FALSE(expired(received, received, p));
  CHECK_FALSE(expired(deadline, received, p));
  CHECK(expired(deadline + 1, received, p));

  // A whole life with the defaults: the attempts end at the deadline, never after.
  int64_t t = received;
  int64_t attempts = 0;
  std::vector<int64_t> tries;
  while (true) {
    tries.push_back(t);
    ++attempts;
    auto next = nextAttemptAt(attempts, t, received, p);
    if (!next) break;
    REQUIRE(*next > t);
    t = *next;
    REQUIRE(tries.size() < 100);
  }
  CHECK(tries.back() == deadline);
  CHECK(tries[1] == received + 300);
  CHECK(tries[2] == received + 900);
}

TEST_CASE("retry: custom and degenerate schedules") {
  RetryPolicy p;
  p.schedule = {std::chrono::seconds(30)};
  p.maxQueueTime = std::chrono::seconds(100);
  CHECK(nextAttemptAt(1, 0, 0, p) == std::optional<int64_t>(30));
  CHECK(nextAttemptAt(7, 90, 0, p) == std::optional<int64_t>(100));
  CHECK_FALSE(nextAttemptAt(8, 100, 0, p).has_value());

  p.schedule.clear();  // empty: the defaults
  p.maxQueueTime = std::chrono::hours(24);
  CHECK(nextAttemptAt(1, 0, 0, p) == std::optional<int64_t>(300));

  p.schedule = {std::chrono::seconds(0)};  // never a zero delay
  CHECK(nextAttemptAt(1, 10, 0, p) == std::optional<int64_t>(11));
}

TEST_CASE("retry: delay notice") {
  RetryPolicy p;  // 4h notice, 5 days
  CHECK_FALSE(delayNoticeDue(1000 + 3 * 3600, 1000, p));
  CHECK(delayNoticeDue(1000 + 4 * 3600, 1000, p));
  CHECK_FALSE(delayNoticeDue(1000 + 6 * 24 * 3600, 1000, p));  // expired: a bounce instead
  p.delayNotice = std::chrono::seconds(0);
  CHECK_FALSE(delayNoticeDue(1000 + 4 * 3600, 1000, p));
}

// ---------------------------------------------------------------------------------------
// DSN

namespace {

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// A header block (no blank line) -> lower-case name -> unfolded values, in order.
std::multimap<std::string, std::string> parseFields(const std::string& block) {
  std::multimap<std::string, std::string> out;
  std::string name, value;
  auto flush = [&] {
    if (!name.empty()) out.emplace(lower(name), value);
    name.clear();
    value.clear();
  };
  size_t pos = 0;
  while (pos < block.size()) {
    size_t end = block.find("\r\n", pos);
    if (end == std::string::npos) end = block.size();
    std::string line = block.substr(pos, end - pos);
    pos = end + 2;
    if (line.empty()) continue;
    if (line[0] == ' ' || line[0] == '\t') {
      value += line;  // unfolding removes the CRLF only
      continue;
    }
    flush();
    const size_t colon = line.find(':');
    REQUIRE(colon != std::string::npos);
    name = line.substr(0, colon);
    value = line.substr(colon + 1);
    while (!value.empty() && value[0] == ' ') value.erase(0, 1);
  }
  flush();
  return out;
}

std::string field(const std::multimap<std::string, std::string>& f, const std::string& name) {
  auto it = f.find(lower(name));
  return it == f.end() ? std::string() : it->second;
}

struct Part {
  std::multimap<std::string, std::string> headers;
  std::string body;
};

struct Mime {
  std::multimap<std::string, std::string> headers;
  std::string boundary;
  std::vector<Part> parts;
};

// Line discipline of the whole message: CRLF only, at most 998 octets per line.
void checkLines(const std::string& m) {
  for (size_t i = 0; i < m.size(); ++i) {
    if (m[i] == '\n') REQUIRE_MESSAGE((i > 0 && m[i - 1] == '\r'), "bare LF at ", i);
    if (m[i] == '\r') REQUIRE_MESSAGE((i + 1 < m.size() && m[i + 1] == '\n'), "bare CR at ", i);
  }
  REQUIRE(m.size() >= 2);
  CHECK(m.substr(m.size() - 2) == "\r\n");
  size_t start = 0;
  while (start < m.size()) {
    size_t end = m.find("\r\n", start);
    REQUIRE(end != std::string::npos);
    CHECK(end - start <= 998);
    start = end + 2;
  }
}

// Just enough of RFC 2045/2046 to take a multipart/report apart.
Mime parseMime(const std::string& m) {
  checkLines(m);
  Mime out;
  const size_t sep = m.find("\r\n\r\n");
  REQUIRE(sep != std::string::npos);
  out.headers = parseFields(m.substr(0, sep + 2));
  const std::string ct = field(out.headers, "Content-Type");
  REQUIRE(ct.find("multipart/report") == 0);
  CHECK(ct.find("report-type=delivery-status") != std::string::npos);
  const size_t b = ct.find("boundary=\"");
  REQUIRE(b != std::string::npos);
  const size_t bEnd = ct.find('"', b + 10);
  REQUIRE(bEnd != std::string::npos);
  out.boundary = ct.substr(b + 10, bEnd - b - 10);
  REQUIRE(!out.boundary.empty());
  CHECK(out.boundary.size() <= 70);

  const std::string body = m.substr(sep + 4);
  const std::string delim = "--" + out.boundary;
  std::vector<std::string> chunks;  // between delimiter lines
  bool closed = false;
  size_t pos = 0;
  std::string current;
  bool inPart = false;
  while (pos < body.size()) {
    size_t end = body.find("\r\n", pos);
    REQUIRE(end != std::string::npos);
    const std::string line = body.substr(pos, end - pos);
    pos = end + 2;
    if (line == delim || line == delim + "--") {
      if (inPart) {
        // The CRLF before a delimiter belongs to the delimiter (RFC 2046 5.1.1).
        REQUIRE(current.size() >= 2);
        chunks.push_back(current.substr(0, current.size() - 2));
      }
      current.clear();
      inPart = true;
      if (line == delim + "--") {
        closed = true;
        break;
      }
      continue;
    }
    CHECK(line.find(delim) == std::string::npos);  // the boundary occurs nowhere else
    if (inPart) current += line + "\r\n";
  }
  CHECK(closed);
  for (const auto& c : chunks) {
    Part p;
    const size_t hs = c.find("\r\n\r\n");
    REQUIRE(hs != std::string::npos);
    p.headers = parseFields(c.substr(0, hs + 2));
    p.body = c.substr(hs + 4);
    out.parts.push_back(std::move(p));
  }
  return out;
}

// message/delivery-status body -> groups of fields (the first is per-message).
std::vector<std::multimap<std::string, std::string>> statusGroups(const std::string& body) {
  std::vector<std::multimap<std::string, std::string>> out;
  size_t pos = 0;
  while (pos < body.size()) {
    size_t end = body.find("\r\n\r\n", pos);
    if (end == std::string::npos) end = body.size();
    std::string group = body.substr(pos, end - pos);
    if (!group.empty() && group != "\r\n") out.push_back(parseFields(group + "\r\n"));
    pos = end + 4;
  }
  return out;
}

// The human-readable part with its word wrapping undone (line breaks and indents -> one space).
std::string flat(const std::string& text) {
  std::string out;
  bool space = false;
  for (char c : text) {
    if (c == '\r' || c == '\n' || c == ' ') {
      space = true;
      continue;
    }
    if (space && !out.empty()) out += ' ';
    space = false;
    out += c;
  }
  return out;
}

DsnInput sampleInput() {
  DsnInput in;
  in.reportingMta = "relay.example.net";
  in.queueId = "0190a1b2c3d4e5f6";
  in.originalSender = "app@shop.example.com";
  in.arrivalDate = 1'795'863'890;  // Sat, 28 Nov 2026 11:04:50 +0000
  in.now = 1'795'867'490;
  in.messageId = "<dsn.0190a1b2c3d4e5f6@relay.example.net>";
  in.originalHeaders =
      "From: Shop <app@shop.example.com>\r\n"
      "To: alice@example.org\r\n"
      "Subject: Your order\r\n"
      "Message-ID: <order-1@shop.example.com>\r\n";
  DsnRecipient r;
  r.address = "alice@example.org";
  r.action = DsnAction::Failed;
  r.status = "5.1.1";
  r.remoteMta = "dns; mx1.example.org";
  r.diagnostic = "smtp; 550 5.1.1 <alice@example.org>: Recipient address rejected: User unknown";
  r.lastAttempt = 1'795'867'400;
  in.recipients.push_back(r);
  return in;
}

}  // namespace

TEST_CASE("dsn: a failed recipient") {
  const DsnInput in = sampleInput();
  const std::string dsn = buildDsn(in);
  const Mime m = parseMime(dsn);

  CHECK(field(m.headers, "From") == "\"Mail Delivery System\" <MAILER-DAEMON@relay.example.net>");
  CHECK(field(m.headers, "To") == "<app@shop.example.com>");
  CHECK(field(m.headers, "Subject") == "Undelivered Mail Returned to Sender");
  CHECK(field(m.headers, "Date") == "Sat, 28 Nov 2026 12:04:50 +0000");
  CHECK(field(m.headers, "Message-ID") == "<dsn.0190a1b2c3d4e5f6@relay.example.net>");
  CHECK(field(m.headers, "MIME-Version") == "1.0");
  CHECK(field(m.headers, "Auto-Submitted") == "auto-replied");
  CHECK(field(m.headers, "Content-Transfer-Encoding").empty());  // all 7bit
  // Every top-level field once.
  for (const char* name : {"From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type"})
    CHECK(m.headers.count(lower(name)) == 1);

  REQUIRE(m.parts.size() == 3);
  CHECK(field(m.parts[0].headers, "Content-Type") == "text/plain; charset=us-ascii");
  CHECK(field(m.parts[1].headers, "Content-Type") == "message/delivery-status");
  CHECK(field(m.parts[2].headers, "Content-Type") == "text/rfc822-headers");

  const std::string text = flat(m.parts[0].body);
  CHECK(text.find("<alice@example.org>") != std::string::npos);
  CHECK(text.find("mx1.example.org said: 550 5.1.1") != std::string::npos);
  CHECK(text.find("0190a1b2c3d4e5f6") != std::string::npos);

  auto groups = statusGroups(m.parts[1].body);
  REQUIRE(groups.size() == 2);
  CHECK(field(groups[0], "Reporting-MTA") == "dns; relay.example.net");
  CHECK(field(groups[0], "X-Subrelay-Queue-ID") == "0190a1b2c3d4e5f6");
  CHECK(field(groups[0], "Arrival-Date") == "Sat, 28 Nov 2026 11:04:50 +0000");
  CHECK(field(groups[1], "Final-Recipient") == "rfc822; alice@example.org");
  CHECK(field(groups[1], "Action") == "failed");
  CHECK(field(groups[1], "Status") == "5.1.1");
  CHECK(field(groups[1], "Remote-MTA") == "dns; mx1.example.org");
  CHECK(field(groups[1], "Diagnostic-Code") ==
        "smtp; 550 5.1.1 <alice@example.org>: Recipient address rejected: User unknown");
  CHECK(field(groups[1], "Last-Attempt-Date") == "Sat, 28 Nov 2026 12:03:20 +0000");
  CHECK(groups[1].count("will-retry-until") == 0);

  CHECK(m.parts[2].body == in.originalHeaders);
}

TEST_CASE("dsn: a delayed recipient") {
  DsnInput in = sampleInput();
  in.recipients[0].action = DsnAction::Delayed;
  in.recipients[0].status = "4.4.1";
  in.recipients[0].remoteMta = "mx1.example.org";  // without the type: "dns; " is added
  in.recipients[0].diagnostic = "421 4.4.1 Service not available, try later";
  in.recipients[0].willRetryUntil = 1'795'863'890 + 5 * 86400;
  const Mime m = parseMime(buildDsn(in));
  CHECK(field(m.headers, "Subject") == "Delayed Mail (still being retried)");
  REQUIRE(m.parts.size() == 3);
  CHECK(flat(m.parts[0].body).find("will keep trying until Thu, 3 Dec 2026 11:04:50 +0000") != std::string::npos);
  CHECK(flat(m.parts[0].body).find("do not need to send the message again") != std::string::npos);
  auto groups = statusGroups(m.parts[1].body);
  REQUIRE(groups.size() == 2);
  CHECK(field(groups[1], "Action") == "delayed");
  CHECK(field(groups[1], "Status") == "4.4.1");
  CHECK(field(groups[1], "Remote-MTA") == "dns; mx1.example.org");
  CHECK(field(groups[1], "Diagnostic-Code") == "smtp; 421 4.4.1 Service not available, try later");
  CHECK(field(groups[1], "Will-Retry-Until") == "Thu, 3 Dec 2026 11:04:50 +0000");
}

TEST_CASE("dsn: several recipients, failed and delayed, with and without a remote reply") {
  DsnInput in = sampleInput();
  DsnRecipient nullMx;
  nullMx.address = "bob@nomail.example";
  nullMx.status = "5.1.10";
  nullMx.diagnostic = "x-subrelay; domain nomail.example does not accept mail (null MX)";
  in.recipients.push_back(nullMx);
  DsnRecipient later;
  later.address = "carol@slow.example";
  later.action = DsnAction::Delayed;
  later.status = "";  // no code known: 4.0.0
  later.willRetryUntil = in.arrivalDate + 86400;
  in.recipients.push_back(later);

  const Mime m = parseMime(buildDsn(in));
  CHECK(field(m.headers, "Subject") == "Undelivered Mail Returned to Sender");
  REQUIRE(m.parts.size() == 3);
  auto groups = statusGroups(m.parts[1].body);
  REQUIRE(groups.size() == 4);
  CHECK(field(groups[1], "Final-Recipient") == "rfc822; alice@example.org");
  CHECK(field(groups[2], "Final-Recipient") == "rfc822; bob@nomail.example");
  CHECK(field(groups[2], "Status") == "5.1.10");
  CHECK(field(groups[2], "Diagnostic-Code") == "x-subrelay; domain nomail.example does not accept mail (null MX)");
  CHECK(groups[2].count("remote-mta") == 0);
  CHECK(groups[2].count("last-attempt-date") == 0);
  CHECK(field(groups[3], "Final-Recipient") == "rfc822; carol@slow.example");
  CHECK(field(groups[3], "Action") == "delayed");
  CHECK(field(groups[3], "Status") == "4.0.0");
  CHECK(groups[3].count("will-retry-until") == 1);
  const std::string text = flat(m.parts[0].body);
  CHECK(text.find("<bob@nomail.example>") != std::string::npos);
  CHECK(text.find("null MX") != std::string::npos);
  CHECK(text.find("<carol@slow.example>") != std::string::npos);
  CHECK(text.find("delayed") != std::string::npos);
}

TEST_CASE("dsn: a non-ASCII recipient -> message/global-delivery-status, utf-8 address type") {
  DsnInput in = sampleInput();
  in.recipients[0].address = "j\u00f6rg+tag@b\u00fccher.example";  // jörg+tag@bücher.example
  const std::string dsn = buildDsn(in);
  const Mime m = parseMime(dsn);
  REQUIRE(m.parts.size() == 3);
  CHECK(field(m.headers, "Content-Transfer-Encoding") == "8bit");
  CHECK(field(m.parts[0].headers, "Content-Type") == "text/plain; charset=utf-8");
  CHECK(field(m.parts[1].headers, "Content-Type") == "message/global-delivery-status");
  CHECK(field(m.parts[1].headers, "Content-Transfer-Encoding") == "8bit");
  auto groups = statusGroups(m.parts[1].body);
  REQUIRE(groups.size() == 2);
  // RFC 6533 utf-8-addr-unitext: '+' is not a QUCHAR.
  CHECK(field(groups[1], "Final-Recipient") == "utf-8; j\u00f6rg\\x{2B}tag@b\u00fccher.example");
  CHECK(flat(m.parts[0].body).find("j\u00f6rg+tag@b\u00fccher.example") != std::string::npos);

  // ASCII report: no 8bit anywhere.
  const std::string ascii = buildDsn(sampleInput());
  CHECK(std::none_of(ascii.begin(), ascii.end(), [](char c) { return static_cast<unsigned char>(c) >= 0x80; }));
}

TEST_CASE("dsn: hostile reply texts and headers cannot break lines") {
  DsnInput in = sampleInput();
  in.recipients[0].diagnostic =
      "smtp; 550-5.7.1 first line\r\n550-5.7.1 second\nline\rthird\x01\x7f " + std::string(3000, 'x') + " end";
  in.recipients[0].remoteMta = "mx1.example.org\r\nInjected: yes";
  in.reportingMta = "relay.example.net\r\n";
  in.originalHeaders =
      "From: a@b.example\nX-Long: " + std::string(2500, 'y') + "\rSubject: bare CR\r\n\r\nbody must not appear\r\n";
  in.originalSender = "app@shop.example.com\r\nBcc: victim@example.org";
  const std::string dsn = buildDsn(in);
  const Mime m = parseMime(dsn);  // checks CRLF only and line lengths
  REQUIRE(m.parts.size() == 3);
  CHECK(m.headers.count("bcc") == 0);
  CHECK(dsn.find("\r\nInjected:") == std::string::npos);
  CHECK(dsn.find("\r\nBcc:") == std::string::npos);
  CHECK(dsn.find("body must not appear") == std::string::npos);
  auto groups = statusGroups(m.parts[1].body);
  REQUIRE(groups.size() == 2);
  const std::string diag = field(groups[1], "Diagnostic-Code");
  CHECK(diag.find("smtp; 550-5.7.1 first line 550-5.7.1 second line third") == 0);
  CHECK(diag.find(std::string(3000, 'x')) == std::string::npos);  // cut into lines...
  CHECK(diag.substr(diag.size() - 4) == " end");
  CHECK(field(groups[0], "Reporting-MTA") == "dns; relay.example.net");
  auto headers = parseFields(m.parts[2].body);
  CHECK(field(headers, "Subject") == "bare CR");
  CHECK(field(headers, "From") == "a@b.example");
}

TEST_CASE("dsn: defaults for missing pieces") {
  DsnInput in = sampleInput();
  in.messageId.clear();
  in.originalHeaders.clear();
  in.arrivalDate = 0;
  in.recipients[0].status = "5.01.1";  // invalid (leading zero): the class default
  in.recipients[0].remoteMta.clear();
  in.recipients[0].diagnostic.clear();
  in.recipients[0].lastAttempt = 0;
  const Mime m = parseMime(buildDsn(in));
  const std::string mid = field(m.headers, "Message-ID");
  CHECK(mid.front() == '<');
  CHECK(mid.find("@relay.example.net>") != std::string::npos);
  REQUIRE(m.parts.size() == 2);  // no headers to return
  auto groups = statusGroups(m.parts[1].body);
  REQUIRE(groups.size() == 2);
  CHECK(groups[0].count("arrival-date") == 0);
  CHECK(field(groups[1], "Status") == "5.0.0");
  CHECK(groups[1].count("diagnostic-code") == 0);

  // Two DSNs of the same input differ only in the boundary (and the generated id).
  DsnInput fixed = sampleInput();
  CHECK(parseMime(buildDsn(fixed)).boundary != parseMime(buildDsn(fixed)).boundary);
}

TEST_CASE("statusFromReply") {
  CHECK(statusFromReply(550, "5.1.1") == "5.1.1");
  CHECK(statusFromReply(552, "5.2.2") == "5.2.2");
  CHECK(statusFromReply(421, "4.4.2") == "4.4.2");
  CHECK(statusFromReply(250, "2.0.0") == "2.0.0");
  CHECK(statusFromReply(550, "") == "5.0.0");
  CHECK(statusFromReply(451, "") == "4.0.0");
  CHECK(statusFromReply(554, "5.1.10") == "5.1.10");
  CHECK(statusFromReply(550, "5.123.456") == "5.123.456");
  // Class disagreeing with the reply code: the reply code wins.
  CHECK(statusFromReply(550, "4.1.1") == "5.1.1");
  CHECK(statusFromReply(450, "5.7.1") == "4.7.1");
  // Malformed enhanced codes.
  CHECK(statusFromReply(550, "5.01.1") == "5.0.0");
  CHECK(statusFromReply(550, "5.1") == "5.0.0");
  CHECK(statusFromReply(550, "5.1.1000") == "5.0.0");
  CHECK(statusFromReply(550, "3.1.1") == "5.0.0");
  CHECK(statusFromReply(450, "4.1.1 ") == "4.0.0");
  CHECK(statusFromReply(550, "x.y.z") == "5.0.0");
  // No reply (connection lost, local decision): the enhanced code alone, else temporary.
  CHECK(statusFromReply(0, "4.4.1") == "4.4.1");
  CHECK(statusFromReply(0, "5.1.10") == "5.1.10");
  CHECK(statusFromReply(0, "") == "4.0.0");
  CHECK(statusFromReply(354, "") == "4.0.0");
}

// ---- destination policy (issue 10: no delivery to internal addresses) --------------------

TEST_CASE("classifyAddress: special-purpose ranges") {
  struct Row {
    const char* ip;
    AddressKind kind;
  };
  const Row rows[] = {
      {"192.0.2.1", AddressKind::Public},      {"8.8.8.8", AddressKind::Public},
      {"2001:db8::1", AddressKind::Public},    {"2a00:1450::1", AddressKind::Public},
      {"0.0.0.0", AddressKind::Unspecified},   {"0.1.2.3", AddressKind::Unspecified},
      {"::", AddressKind::Unspecified},        {"127.0.0.1", AddressKind::Loopback},
      {"127.255.0.9", AddressKind::Loopback},  {"::1", AddressKind::Loopback},
      {"10.1.2.3", AddressKind::Private},      {"172.16.0.1", AddressKind::Private},
      {"172.31.255.255", AddressKind::Private}, {"172.32.0.1", AddressKind::Public},
      {"192.168.1.1", AddressKind::Private},   {"fd00::5", AddressKind::Private},
      {"fc00::1", AddressKind::Private},       {"100.64.0.1", AddressKind::SharedCgnat},
      {"100.127.255.255", AddressKind::SharedCgnat}, {"100.128.0.1", AddressKind::Public},
      {"169.254.169.254", AddressKind::LinkLocal}, {"fe80::1", AddressKind::LinkLocal},
      {"224.0.0.1", AddressKind::Multicast},   {"ff02::1", AddressKind::Multicast},
      {"240.0.0.1", AddressKind::Reserved},    {"255.255.255.255", AddressKind::Reserved},
      {"::ffff:127.0.0.1", AddressKind::Loopback}, {"::ffff:10.0.0.1", AddressKind::Private},
      {"[127.0.0.1]", AddressKind::Loopback},  {"[IPv6:::1]", AddressKind::Loopback},
      {"not-an-ip", AddressKind::Invalid},
  };
  for (const auto& r : rows) {
    CAPTURE(r.ip);
    CHECK(classifyAddress(r.ip) == r.kind);
  }
  CHECK(classifyAddress("198.51.100.7", {"198.51.100.7"}) == AddressKind::Own);
  CHECK(classifyAddress("2001:db8:0::7", {"2001:db8::7"}) == AddressKind::Own);
}

TEST_CASE("applyDestinationPolicy: refused addresses dropped, none left is a permanent failure") {
  Route r;
  r.status = RouteStatus::Ok;
  MxHost a;
  a.name = "mx1.evil.test";
  a.addresses = {"10.0.0.5", "192.0.2.10"};
  MxHost b;
  b.name = "mx2.evil.test";
  b.addresses = {"127.0.0.1"};
  r.hosts = {a, b};
  DestinationPolicy p;
  Route kept = applyDestinationPolicy(r, p);
  CHECK(kept.status == RouteStatus::Ok);
  CHECK(kept.hosts[0].addresses == std::vector<std::string>{"192.0.2.10"});
  CHECK(kept.hosts[1].addresses.empty());

  r.hosts[0].addresses = {"169.254.169.254"};
  Route none = applyDestinationPolicy(r, p);
  CHECK(none.status == RouteStatus::PermFail);
  CHECK(none.enhanced == "5.4.4");
  CHECK(none.detail.find("link-local") != std::string::npos);
  CHECK(none.detail.find("allow_private_destinations") != std::string::npos);

  p.allowPrivate = true;
  CHECK(applyDestinationPolicy(r, p).status == RouteStatus::Ok);

  Route failed;
  failed.status = RouteStatus::TempFail;
  failed.enhanced = "4.4.3";
  CHECK(applyDestinationPolicy(failed, DestinationPolicy{}).enhanced == "4.4.3");
  CHECK(isAddressLiteralDomain("[192.0.2.1]"));
  CHECK(isAddressLiteralDomain("[IPv6:::1]"));
  CHECK_FALSE(isAddressLiteralDomain("example.com"));
}

// ---------------------------------------------------------------------------------------
// AttemptClock: one outbound connection's deadline on a fake clock.

TEST_CASE("AttemptClock: the connect deadline, then stage totals restarted only by progress") {
  using std::chrono::milliseconds;
  using std::chrono::seconds;
  using Kind = AttemptClock::Kind;
  util::FakeClock fc;
  AttemptClock c;
  CHECK_FALSE(c.deadline());
  CHECK_FALSE(c.expired(fc.now()));

  c.connecting(fc.now(), seconds(30));
  REQUIRE(c.deadline());
  CHECK(c.deadline()->kind == Kind::Connect);
  CHECK(c.remaining(fc.now()) == seconds(30));
  fc.advance(seconds(29));
  CHECK_FALSE(c.expired(fc.now()));
  CHECK(c.remaining(fc.now()) == seconds(1));

  // Connected, waiting for the greeting: the stage deadline replaces the connect one,
  // whatever the progress count.
  CHECK(c.update(fc.now(), seconds(300), 0));
  CHECK(c.deadline()->kind == Kind::Stage);
  CHECK(c.remaining(fc.now()) == seconds(300));
  const auto greetingDue = c.deadline()->at;

  // Events without progress (bytes of a reply that never completes) do not extend it,
  // nor does a different timeout for the same stage.
  fc.advance(seconds(100));
  CHECK_FALSE(c.update(fc.now(), seconds(300), 0));
  CHECK_FALSE(c.update(fc.now(), seconds(600), 0));
  CHECK(c.deadline()->at == greetingDue);
  CHECK(c.remaining(fc.now()) == seconds(200));
  fc.advance(seconds(199));
  CHECK_FALSE(c.expired(fc.now()));
  fc.advance(milliseconds(1000));
  CHECK(c.expired(fc.now()));
  CHECK(c.remaining(fc.now()) == milliseconds(0));

  // Progress moved: a new total from now.
  CHECK(c.update(fc.now(), seconds(300), 1));
  CHECK(c.deadline()->at == fc.now() + seconds(300));
  CHECK_FALSE(c.expired(fc.now()));

  // Waiting for nothing (idle between transactions): no deadline, the timer stops.
  CHECK(c.update(fc.now(), std::nullopt, 1));
  CHECK_FALSE(c.deadline());
  CHECK_FALSE(c.update(fc.now(), std::nullopt, 1));
  CHECK_FALSE(c.expired(fc.now() + std::chrono::hours(1)));
  // Waiting again without a new reply (a new transaction from idle): a fresh deadline.
  fc.advance(seconds(5));
  CHECK(c.update(fc.now(), seconds(300), 1));
  CHECK(c.deadline()->at == fc.now() + seconds(300));
  CHECK(c.deadline()->kind == Kind::Stage);
}

TEST_CASE("AttemptClock driven by a ClientSession: a trickling greeting does not extend the deadline") {
  using std::chrono::seconds;
  util::FakeClock fc;
  smtp::ClientConfig cfg;
  cfg.heloName = "relay.example.net";
  smtp::ClientTimeouts t;
  smtp::ClientSession s(cfg, t);
  AttemptClock c;
  auto update = [&] {
    std::optional<std::chrono::milliseconds> stage;
    if (auto to = s.timeout()) stage = *to;
    return c.update(fc.now(), stage, s.progress());
  };
  c.connecting(fc.now(), seconds(30));
  fc.advance(seconds(1));
  s.onConnected();
  CHECK(update());
  const auto due = c.deadline()->at;
  CHECK(due == fc.now() + t.greeting);
  for (char ch : std::string("220 mx.example.org ESMTP")) {
    fc.advance(seconds(10));
    s.onBytes(std::string_view(&ch, 1));
    CHECK_FALSE(update());
  }
  CHECK(c.deadline()->at == due);
  s.onBytes("\r\n");  // a whole reply: EHLO goes out, a new stage begins
  CHECK(update());
  CHECK(c.deadline()->at == fc.now() + t.mail);
}

TEST_CASE("connection failure texts") {
  const std::string peer = "mx.example.org [192.0.2.10]:25";
  CHECK(connectionEndText(ConnectionEnd::ConnectTimeout, peer) == "timeout connecting to " + peer);
  CHECK(connectionEndText(ConnectionEnd::ConnectError, peer, "connection refused") ==
        "connect to " + peer + ": connection refused");
  CHECK(connectionEndText(ConnectionEnd::PeerClosed, peer) == "connection closed by " + peer);
  CHECK(connectionEndText(ConnectionEnd::Closed, peer) == "connection to " + peer + " closed");

  SessionFailure local = localFailure("aborted by operator");
  CHECK(local.code == 0);
  CHECK(local.enhanced.empty());
  CHECK(local.text == "aborted by operator");

  smtp::SessionFailed said;
  said.reply.code = 554;
  said.reply.enhanced = "5.7.1";
  said.reply.text = "go away\nsecond line";
  said.stage = "greeting";
  SessionFailure f = sessionFailure(said, peer);
  CHECK(f.code == 554);
  CHECK(f.enhanced == "5.7.1");
  CHECK(f.text == peer + " said: 554 5.7.1 go away");

  smtp::SessionFailed quiet;  // no reply: the session's own words, else the stage
  quiet.reply.text = "TLS required but not offered";
  quiet.stage = "ehlo";
  CHECK(sessionFailure(quiet, peer).text == "TLS required but not offered (" + peer + ")");
  CHECK(sessionFailure(quiet, peer).code == 0);
  quiet.reply.text.clear();
  CHECK(sessionFailure(quiet, peer).text == "ehlo (" + peer + ")");
}

TEST_CASE("relay hosts: addresses and localhost need no DNS; names get AAAA and A, in list order, no de-duplication") {
  CHECK_FALSE(relayRouteWithoutDns({"10.0.0.1", "smtp.provider.example"}).has_value());
  auto direct = relayRouteWithoutDns({"localhost", "10.0.0.1", "::1"});
  REQUIRE(direct.has_value());
  REQUIRE(direct->hosts.size() == 3);
  CHECK(direct->hosts[0].addresses == std::vector<std::string>{"::1", "127.0.0.1"});
  CHECK(direct->hosts[1].addresses == std::vector<std::string>{"10.0.0.1"});
  CHECK(direct->hosts[2].addresses == std::vector<std::string>{"::1"});

  FakeResolver dns;
  dns.setAddrs("smtp.provider.example", QType::A, {"10.0.0.1"});
  dns.setStatus("smtp.provider.example", QType::AAAA, Status::NoData);
  RouteResolver rr(dns, 1);
  Outcome o;
  rr.resolveHosts({"SMTP.Provider.Example", "10.0.0.1", "localhost"}, o.callback());
  CHECK(o.calls == 0);
  CHECK(dns.pendingCount() == 2);  // only the name is asked
  dns.pumpAll();
  REQUIRE(o.calls == 1);
  REQUIRE(o.route.status == RouteStatus::Ok);
  REQUIRE(o.route.hosts.size() == 3);
  CHECK(o.route.hosts[0].name == "smtp.provider.example");
  CHECK(o.route.hosts[0].addresses == std::vector<std::string>{"10.0.0.1"});
  CHECK(o.route.hosts[1].addresses == std::vector<std::string>{"10.0.0.1"});  // kept: another upstream
  CHECK(o.route.hosts[2].addresses == std::vector<std::string>{"::1", "127.0.0.1"});
}

// ---- RFC 3461 decisions and fields -------------------------------------------------

TEST_CASE("dsn: which NOTIFY wants which notice (RFC 3461 4.1, 5.2.2)") {
  using namespace subrelay::queue;
  // No NOTIFY: failures and delays as before, never a success.
  CHECK(wantsFailureDsn(0));
  CHECK(wantsDelayDsn(0));
  CHECK_FALSE(wantsSuccessDsn(0, false));
  // NEVER: nothing at all.
  CHECK_FALSE(wantsFailureDsn(kDsnNotifyNever));
  CHECK_FALSE(wantsDelayDsn(kDsnNotifyNever));
  CHECK_FALSE(wantsSuccessDsn(kDsnNotifyNever, false));
  // Each keyword only its own.
  CHECK(wantsFailureDsn(kDsnNotifyFailure));
  CHECK_FALSE(wantsDelayDsn(kDsnNotifyFailure));
  CHECK_FALSE(wantsFailureDsn(kDsnNotifySuccess));
  CHECK_FALSE(wantsDelayDsn(kDsnNotifySuccess));
  CHECK(wantsDelayDsn(kDsnNotifyDelay | kDsnNotifyFailure));
  CHECK_FALSE(wantsFailureDsn(kDsnNotifyDelay));
  // SUCCESS: "relayed" from us only when the next hop did not take the request on.
  CHECK(wantsSuccessDsn(kDsnNotifySuccess, false));
  CHECK(wantsSuccessDsn(kDsnNotifySuccess | kDsnNotifyFailure, false));
  CHECK_FALSE(wantsSuccessDsn(kDsnNotifySuccess, true));
  CHECK_FALSE(wantsSuccessDsn(kDsnNotifyFailure, false));
}

TEST_CASE("dsn: what RET returns (RFC 3461 6.2)") {
  using queue::DsnRet;
  CHECK(returnPart(DsnRet::Unspecified, true, 100) == ReturnPart::Headers);
  CHECK(returnPart(DsnRet::Hdrs, true, 100) == ReturnPart::Headers);
  CHECK(returnPart(DsnRet::Full, true, 100) == ReturnPart::Full);
  CHECK(returnPart(DsnRet::Full, true, kMaxReturnedMessage) == ReturnPart::Full);
  CHECK(returnPart(DsnRet::Full, true, kMaxReturnedMessage + 1) == ReturnPart::HeadersTooLarge);
  CHECK(returnPart(DsnRet::Full, false, 100) == ReturnPart::Headers);  // success or delay only: headers
}

TEST_CASE("dsn: ENVID and ORCPT come back decoded; RET=FULL returns the message") {
  DsnInput in = sampleInput();
  in.envid = "QQ+2B314+20x";
  in.recipients[0].orcpt = "rfc822;Alice+2Bshop@example.org";
  in.originalMessage = in.originalHeaders + "\r\nThe body line\r\n";
  const Mime m = parseMime(buildDsn(in));
  REQUIRE(m.parts.size() == 3);
  auto groups = statusGroups(m.parts[1].body);
  REQUIRE(groups.size() == 2);
  CHECK(field(groups[0], "Original-Envelope-Id") == "QQ+314 x");
  CHECK(field(groups[1], "Original-Recipient") == "rfc822; Alice+shop@example.org");
  CHECK(field(groups[1], "Final-Recipient") == "rfc822; alice@example.org");
  CHECK(field(m.parts[2].headers, "Content-Type") == "message/rfc822");
  CHECK(m.parts[2].body.find("The body line") != std::string::npos);
  CHECK(flat(m.parts[0].body).find("Your message is attached below") != std::string::npos);

  // Without them: no such fields, headers only.
  const Mime plain = parseMime(buildDsn(sampleInput()));
  auto pg = statusGroups(plain.parts[1].body);
  CHECK(pg[0].count("original-envelope-id") == 0);
  CHECK(pg[1].count("original-recipient") == 0);
  CHECK(plain.parts[2].body.find("The body line") == std::string::npos);
}

TEST_CASE("dsn: RET=FULL too large says so; a relayed (success) report") {
  DsnInput in = sampleInput();
  in.fullTooLarge = true;
  CHECK(flat(parseMime(buildDsn(in)).parts[0].body).find("only its headers are attached") != std::string::npos);

  DsnInput ok = sampleInput();
  ok.recipients[0].action = DsnAction::Relayed;
  ok.recipients[0].status = "2.0.0";
  ok.recipients[0].diagnostic = "smtp; 250 2.0.0 queued as 123";
  const Mime m = parseMime(buildDsn(ok));
  CHECK(field(m.headers, "Subject") == "Successful Mail Delivery Report");
  auto groups = statusGroups(m.parts[1].body);
  CHECK(field(groups[1], "Action") == "relayed");
  CHECK(field(groups[1], "Status") == "2.0.0");
  CHECK(flat(m.parts[0].body).find("do not offer delivery notifications") != std::string::npos);
  CHECK(flat(m.parts[0].body).find("What you can do") == std::string::npos);
}
