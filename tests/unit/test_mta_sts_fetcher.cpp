// delivery/mta_sts_fetcher.h: StsFetcher on a real libuv loop with a fake resolver, a fake
// HTTPS getter and an in-memory policy store, on a fake clock: one discovery per domain
// (concurrent callers share it), answers from memory and from the store after a restart,
// background refresh, failures, and no callback inside policyFor() or after destruction.
#include <doctest/doctest.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "delivery/mta_sts_fetcher.h"
#include "net/uv_loop.h"
#include "net/uv_timer.h"
#include "util/clock.h"

using namespace subrelay;
using namespace subrelay::delivery::mtasts;
using dns::QType;
using dns::Status;

namespace {

// Answers on the loop (a 0 ms timer), never inside query().
class FakeResolver : public dns::Resolver {
 public:
  explicit FakeResolver(uv_loop_t* loop) : timer_(loop) {}
  void set(const std::string& name, QType type, Status status, std::vector<std::string> values = {}) {
    dns::Answer a;
    a.status = status;
    a.name = a.canonicalName = name;
    a.type = type;
    (type == QType::TXT ? a.texts : a.addresses) = std::move(values);
    table_[{name, type}] = std::move(a);
  }
  void query(const std::string& name, QType type, dns::Callback cb) override {
    queries.emplace_back(name, type);
    dns::Answer a;
    a.status = Status::NxDomain;
    a.name = name;
    if (auto it = table_.find({name, type}); it != table_.end()) a = it->second;
    pending_.emplace_back(std::move(cb), std::move(a));
    timer_.start(std::chrono::milliseconds(0), [this] {
      auto run = std::move(pending_);
      pending_.clear();
      for (auto& [fn, answer] : run) fn(answer);
    });
  }
  size_t count(QType type) const {
    size_t n = 0;
    for (const auto& q : queries) n += q.second == type;
    return n;
  }
  std::vector<std::pair<std::string, QType>> queries;

 private:
  net::Timer timer_;
  std::map<std::pair<std::string, QType>, dns::Answer> table_;
  std::vector<std::pair<dns::Callback, dns::Answer>> pending_;
};

class FakeGetter : public PolicyGetter {
 public:
  explicit FakeGetter(uv_loop_t* loop) : timer_(loop) {}
  void get(const std::string& url, const std::vector<std::string>& addresses,
           std::function<void(FetchOutcome)> cb) override {
    requests.emplace_back(url, addresses);
    FetchOutcome f = outcome;
    pending_.emplace_back(std::move(cb), std::move(f));
    timer_.start(std::chrono::milliseconds(0), [this] {
      auto run = std::move(pending_);
      pending_.clear();
      for (auto& [fn, outcome] : run) fn(outcome);
    });
  }
  void serve(std::string body, std::string type = "text/plain") {
    outcome = FetchOutcome{};
    outcome.transportOk = true;
    outcome.status = 200;
    outcome.contentType = std::move(type);
    outcome.body = std::move(body);
  }
  FetchOutcome outcome;
  std::vector<std::pair<std::string, std::vector<std::string>>> requests;

 private:
  net::Timer timer_;
  std::vector<std::pair<std::function<void(FetchOutcome)>, FetchOutcome>> pending_;
};

class MemoryStore : public PolicyStore {
 public:
  std::optional<CachedPolicy> load(const std::string& domain) override {
    ++loads;
    auto it = rows.find(domain);
    if (it == rows.end()) return std::nullopt;
    return it->second;
  }
  void save(const CachedPolicy& p) override { rows[p.domain] = p; }
  void touch(const std::string& domain, int64_t at) override {
    ++touches;
    if (auto it = rows.find(domain); it != rows.end()) it->second.checkedAt = at;
  }
  std::map<std::string, CachedPolicy> rows;
  int loads = 0, touches = 0;
};

const char* kPolicy = "version: STSv1\r\nmode: enforce\r\nmx: mx.example.com\r\nmax_age: 604800\r\n";

struct Bed {
  net::Loop loop;
  util::FakeClock clock;
  FakeResolver dns{loop.get()};
  FakeGetter http{loop.get()};
  MemoryStore store;

  Bed() {
    dns.set("_mta-sts.example.com", QType::TXT, Status::Ok, {"v=spf1 -all", "v=STSv1; id=a1;"});
    dns.set("mta-sts.example.com", QType::A, Status::Ok, {"192.0.2.10"});
    dns.set("mta-sts.example.com", QType::AAAA, Status::Ok, {"2001:db8::10"});
    http.serve(kPolicy);
  }
  std::optional<PolicyAnswer> ask(StsFetcher& f, const std::string& domain) {
    std::optional<PolicyAnswer> out;
    f.policyFor(domain, [&](const PolicyAnswer& a) { out = a; });
    CHECK_FALSE(out.has_value());  // never inside policyFor()
    loop.run();
    return out;
  }
};

}  // namespace

TEST_CASE("StsFetcher: discovers once, then answers from memory; concurrent callers share a discovery") {
  Bed bed;
  {
    StsFetcher f(bed.loop.get(), bed.dns, bed.http, bed.clock, Settings{}, &bed.store);
    int answered = 0;
    std::vector<PolicyAnswer> answers;
    for (int i = 0; i < 3; ++i) f.policyFor(i == 1 ? "Example.COM." : "example.com", [&](const PolicyAnswer& a) {
      ++answered;
      answers.push_back(a);
    });
    CHECK(answered == 0);
    bed.loop.run();
    REQUIRE(answered == 3);
    for (const auto& a : answers) {
      CHECK(a.domain == "example.com");
      CHECK(a.source == "fetched");
      REQUIRE(a.policy.has_value());
      CHECK(a.policy->id == "a1");
      CHECK(a.policy->policy.mode == Mode::Enforce);
    }
    CHECK(bed.dns.count(QType::TXT) == 1);
    CHECK(bed.dns.count(QType::A) == 1);
    CHECK(bed.dns.count(QType::AAAA) == 1);
    REQUIRE(bed.http.requests.size() == 1);
    CHECK(bed.http.requests[0].first == "https://mta-sts.example.com/.well-known/mta-sts.txt");
    CHECK(bed.http.requests[0].second == std::vector<std::string>{"2001:db8::10", "192.0.2.10"});
    REQUIRE(bed.store.rows.count("example.com") == 1);
    CHECK(bed.store.rows["example.com"].text == kPolicy);

    // Second call: from memory, no lookup, no fetch.
    auto again = bed.ask(f, "example.com");
    REQUIRE(again.has_value());
    CHECK(again->source == "cache");
    CHECK(again->policy->id == "a1");
    CHECK(bed.dns.queries.size() == 3);
    CHECK(bed.http.requests.size() == 1);
    CHECK(f.stats().fetches == 1);
    CHECK(f.stats().stored == 1);

    // A day later: answers from the cache at once and refreshes behind; same id: no fetch.
    bed.clock.advance(std::chrono::hours(25));
    auto later = bed.ask(f, "example.com");
    REQUIRE(later.has_value());
    CHECK(later->source == "cache");
    CHECK(bed.dns.count(QType::TXT) == 2);
    CHECK(bed.http.requests.size() == 1);
    CHECK(bed.store.touches == 1);
    CHECK(bed.store.rows["example.com"].checkedAt == util::unixSeconds(bed.clock.wallNow()));

    // The id changes: the next refresh fetches, and the new policy is answered afterwards.
    bed.clock.advance(std::chrono::hours(25));
    bed.dns.set("_mta-sts.example.com", QType::TXT, Status::Ok, {"v=STSv1; id=b2"});
    bed.http.serve("version: STSv1\nmode: testing\nmx: *.example.com\nmax_age: 86400\n", "text/plain; charset=utf-8");
    CHECK(bed.ask(f, "example.com")->policy->id == "a1");  // answered before the refresh
    CHECK(bed.http.requests.size() == 2);
    auto fresh = bed.ask(f, "example.com");
    CHECK(fresh->policy->id == "b2");
    CHECK(fresh->policy->policy.mode == Mode::Testing);
    CHECK(bed.store.rows["example.com"].id == "b2");
  }
  bed.loop.run();

  // A restart: the store answers, no lookup until the refresh is due.
  StsFetcher f2(bed.loop.get(), bed.dns, bed.http, bed.clock, Settings{}, &bed.store);
  const size_t queries = bed.dns.queries.size();
  auto a = bed.ask(f2, "example.com");
  REQUIRE(a.has_value());
  CHECK(a->source == "cache");
  CHECK(a->policy->id == "b2");
  CHECK(bed.dns.queries.size() == queries);
}

TEST_CASE("StsFetcher: no record, bad policies and failures give no policy") {
  Bed bed;
  StsFetcher f(bed.loop.get(), bed.dns, bed.http, bed.clock, Settings{}, &bed.store);

  auto none = bed.ask(f, "plain.example");  // NXDOMAIN for the TXT
  REQUIRE(none.has_value());
  CHECK(none->source == "none");
  CHECK_FALSE(none->policy.has_value());
  CHECK(bed.http.requests.empty());
  // Known to have none: no lookup for a while.
  CHECK(bed.ask(f, "plain.example")->source == "none");
  CHECK(bed.dns.count(QType::TXT) == 1);

  // A TXT record but no address for the policy host.
  bed.dns.set("_mta-sts.noaddr.example", QType::TXT, Status::Ok, {"v=STSv1; id=1"});
  auto noaddr = bed.ask(f, "noaddr.example");
  CHECK_FALSE(noaddr->policy.has_value());
  CHECK(noaddr->detail.find("no address for mta-sts.noaddr.example") != std::string::npos);
  CHECK(bed.http.requests.empty());

  // Wrong content type: not a policy.
  bed.http.serve(kPolicy, "text/html");
  auto html = bed.ask(f, "example.com");
  CHECK_FALSE(html->policy.has_value());
  CHECK(html->detail.find("content type") != std::string::npos);
  CHECK(bed.store.rows.empty());
  // Within the fetch holdoff: no new lookup or fetch (3.3).
  CHECK_FALSE(bed.ask(f, "example.com")->policy.has_value());
  CHECK(bed.http.requests.size() == 1);
  bed.clock.advance(std::chrono::minutes(6));
  bed.http.outcome = FetchOutcome{};
  bed.http.outcome.error = "tls: certificate verify failed";
  auto tls = bed.ask(f, "example.com");
  CHECK_FALSE(tls->policy.has_value());
  CHECK(tls->detail == "tls: certificate verify failed");
  CHECK(bed.http.requests.size() == 2);
  CHECK(f.stats().fetchFailures == 3);  // with the missing address

  // SERVFAIL for the TXT: no policy, nothing fetched.
  bed.dns.set("_mta-sts.broken.example", QType::TXT, Status::ServFail);
  auto broken = bed.ask(f, "broken.example");
  CHECK_FALSE(broken->policy.has_value());
  CHECK(broken->detail.find("servfail") != std::string::npos);
}

TEST_CASE("StsFetcher: recheck looks the TXT record up whatever the cache says (5.1 step 3)") {
  Bed bed;
  StsFetcher f(bed.loop.get(), bed.dns, bed.http, bed.clock, Settings{}, &bed.store);
  REQUIRE(bed.ask(f, "example.com")->source == "fetched");
  CHECK(bed.ask(f, "example.com")->source == "cache");
  CHECK(bed.dns.count(QType::TXT) == 1);
  // Same id: a lookup, no fetch.
  std::optional<PolicyAnswer> a;
  f.recheck("example.com", [&](const PolicyAnswer& x) { a = x; });
  CHECK_FALSE(a.has_value());
  bed.loop.run();
  REQUIRE(a.has_value());
  CHECK(a->source == "unchanged");
  CHECK(a->policy->id == "a1");
  CHECK(bed.dns.count(QType::TXT) == 2);
  CHECK(bed.http.requests.size() == 1);
  // A new id: fetched before the answer.
  bed.dns.set("_mta-sts.example.com", QType::TXT, Status::Ok, {"v=STSv1; id=b2"});
  bed.http.serve("version: STSv1\nmode: none\nmax_age: 86400\n");
  a.reset();
  f.recheck("example.com", [&](const PolicyAnswer& x) { a = x; });
  bed.loop.run();
  REQUIRE(a.has_value());
  CHECK(a->source == "fetched");
  CHECK(a->policy->id == "b2");
  CHECK(a->policy->policy.mode == Mode::None);
  CHECK(bed.http.requests.size() == 2);
}

TEST_CASE("StsFetcher: destroyed before answering: no callback") {
  Bed bed;
  bool called = false;
  {
    StsFetcher f(bed.loop.get(), bed.dns, bed.http, bed.clock, Settings{}, nullptr);
    f.policyFor("example.com", [&](const PolicyAnswer&) { called = true; });
  }
  bed.loop.run();
  CHECK_FALSE(called);
  // With a cached answer pending on the loop.
  {
    StsFetcher f(bed.loop.get(), bed.dns, bed.http, bed.clock, Settings{}, nullptr);
    REQUIRE(bed.ask(f, "example.com")->policy.has_value());
    f.policyFor("example.com", [&](const PolicyAnswer&) { called = true; });
  }
  bed.loop.run();
  CHECK_FALSE(called);
}

TEST_CASE("toRow / fromRow") {
  CachedPolicy p;
  p.domain = "example.com";
  p.id = "a1";
  p.policy = parsePolicy(kPolicy).value();
  p.text = kPolicy;
  p.fetchedAt = 10;
  p.expiresAt = 20;
  p.checkedAt = 15;
  auto r = toRow(p);
  CHECK(r.mode == "enforce");
  auto back = fromRow(r);
  REQUIRE(back.has_value());
  CHECK(back->policy.mx == p.policy.mx);
  CHECK(back->policy.maxAge == 604800);
  CHECK(back->checkedAt == 15);
  r.mode = "bogus";
  CHECK_FALSE(fromRow(r).has_value());
}

TEST_CASE("StsFetcher: the policy host's private addresses are never fetched from, unless allowed") {
  SUBCASE("only private and loopback: no request, no policy") {
    Bed bed;
    bed.dns.set("mta-sts.example.com", QType::A, Status::Ok, {"10.1.2.3"});
    bed.dns.set("mta-sts.example.com", QType::AAAA, Status::Ok, {"::1"});
    StsFetcher f(bed.loop.get(), bed.dns, bed.http, bed.clock, Settings{}, &bed.store);
    auto a = bed.ask(f, "example.com");
    REQUIRE(a.has_value());
    CHECK_FALSE(a->policy.has_value());
    CHECK(a->detail.find("(delivery.allow_private_destinations is false)") != std::string::npos);
    CHECK(bed.http.requests.empty());
  }
  SUBCASE("mixed: only the public address is asked") {
    Bed bed;
    bed.dns.set("mta-sts.example.com", QType::A, Status::Ok, {"192.168.1.1", "192.0.2.10"});
    bed.dns.set("mta-sts.example.com", QType::AAAA, Status::Ok, {"fe80::1"});
    StsFetcher f(bed.loop.get(), bed.dns, bed.http, bed.clock, Settings{}, &bed.store);
    auto a = bed.ask(f, "example.com");
    REQUIRE(a.has_value());
    CHECK(a->policy.has_value());
    REQUIRE(bed.http.requests.size() == 1);
    CHECK(bed.http.requests[0].second == std::vector<std::string>{"192.0.2.10"});
  }
  SUBCASE("delivery.allow_private_destinations: every address") {
    Bed bed;
    bed.dns.set("mta-sts.example.com", QType::A, Status::Ok, {"127.0.0.5"});
    StsFetcher f(bed.loop.get(), bed.dns, bed.http, bed.clock, Settings{}, &bed.store);
    delivery::DestinationPolicy allow;
    allow.allowPrivate = true;
    f.setDestinationPolicy(allow);
    auto a = bed.ask(f, "example.com");
    REQUIRE(a.has_value());
    CHECK(a->policy.has_value());
    REQUIRE(bed.http.requests.size() == 1);
    CHECK(bed.http.requests[0].second == std::vector<std::string>{"2001:db8::10", "127.0.0.5"});
  }
}
