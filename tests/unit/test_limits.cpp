// policy/: per-account rate limits (token buckets, UTC day/month windows, persistence
// snapshots), the AUTH brute-force guard and the per-account Meter, all on a FakeClock.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "policy/brute_force.h"
#include "policy/rate_limiter.h"
#include "util/clock.h"

using namespace subrelay::policy;
using namespace std::chrono_literals;
using subrelay::util::FakeClock;

namespace {

RateRule rule(const std::string& key, uint64_t amount) {
  const auto us = key.find("_per_");
  auto r = makeRateRule(key, key.substr(0, us), key.substr(us + 5), amount);
  REQUIRE(r.has_value());
  return *r;
}

std::chrono::system_clock::time_point utc(int y, unsigned mo, unsigned d, int h = 0, int mi = 0, int s = 0) {
  using namespace std::chrono;
  return sys_days{year{y} / month{mo} / day{d}} + hours{h} + minutes{mi} + seconds{s};
}

Instant at(const FakeClock& c) { return Instant::from(c); }

// Consumes until refused; returns how many fit.
int drain(RateLimiter& l, Metric m, const FakeClock& c, int limit = 100000) {
  int n = 0;
  while (n < limit && l.tryConsume(m, 1, at(c)).allowed) ++n;
  return n;
}

}  // namespace

TEST_CASE("makeRateRule parses what and period, rejects the rest") {
  auto r = makeRateRule("bytes_per_day", "bytes", "day", 5);
  REQUIRE(r);
  CHECK(r->what == Metric::Bytes);
  CHECK(r->period == Period::Day);
  CHECK(r->amount == 5);
  CHECK(makeRateRule("recipients_per_month", "recipients", "month", 1)->period == Period::Month);
  CHECK_FALSE(makeRateRule("x", "mails", "day", 1));
  CHECK_FALSE(makeRateRule("x", "messages", "week", 1));
}

TEST_CASE("per-second bucket: burst, refusal, fractional refill") {
  FakeClock c;
  RateLimiter l({rule("messages_per_second", 10)}, at(c));
  CHECK(drain(l, Metric::Messages, c) == 10);
  Decision d = l.check(Metric::Messages, 1, at(c));
  CHECK_FALSE(d.allowed);
  CHECK(d.ruleKey == "messages_per_second");
  CHECK(d.retryAfter == 1s);  // 100 ms rounded up: never "0 seconds"
  c.advance(99ms);
  CHECK_FALSE(l.check(Metric::Messages, 1, at(c)).allowed);
  c.advance(1ms);
  CHECK(drain(l, Metric::Messages, c) == 1);
}

TEST_CASE("per-minute bucket: full burst then the right retry time") {
  FakeClock c;
  RateLimiter l({rule("messages_per_minute", 5)}, at(c));
  CHECK(drain(l, Metric::Messages, c) == 5);
  Decision d = l.check(Metric::Messages, 1, at(c));
  CHECK_FALSE(d.allowed);
  CHECK(d.retryAfter == 12s);  // one token per 60/5 s
  c.advance(11s);
  d = l.check(Metric::Messages, 1, at(c));
  CHECK_FALSE(d.allowed);
  CHECK(d.retryAfter == 1s);
  c.advance(1s);
  CHECK(drain(l, Metric::Messages, c) == 1);
  // Refill is continuous and capped at the amount: a long idle allows one burst only.
  c.advance(24h);
  CHECK(drain(l, Metric::Messages, c) == 5);
}

TEST_CASE("per-hour bucket") {
  FakeClock c;
  RateLimiter l({rule("recipients_per_hour", 2)}, at(c));
  CHECK(drain(l, Metric::Recipients, c) == 2);
  Decision d = l.check(Metric::Recipients, 1, at(c));
  CHECK(d.retryAfter == 1800s);
  c.advance(30min);
  CHECK(drain(l, Metric::Recipients, c) == 1);
  c.advance(1h);
  CHECK(drain(l, Metric::Recipients, c) == 2);
}

TEST_CASE("check does not count; commit does; rules of other metrics are ignored") {
  FakeClock c;
  RateLimiter l({rule("messages_per_minute", 2), rule("recipients_per_minute", 1)}, at(c));
  for (int i = 0; i < 10; ++i) CHECK(l.check(Metric::Messages, 1, at(c)).allowed);
  l.commit(Metric::Messages, 1, at(c));
  l.commit(Metric::Messages, 1, at(c));
  CHECK_FALSE(l.check(Metric::Messages, 1, at(c)).allowed);
  CHECK(l.check(Metric::Recipients, 1, at(c)).allowed);
  CHECK(l.check(Metric::Bytes, 1'000'000, at(c)).allowed);  // no bytes rule
}

TEST_CASE("day window resets at 00:00 UTC") {
  FakeClock c;
  c.setWall(utc(2027, 3, 10, 23, 59, 50));
  RateLimiter l({rule("messages_per_day", 3)}, at(c));
  CHECK(drain(l, Metric::Messages, c) == 3);
  Decision d = l.check(Metric::Messages, 1, at(c));
  CHECK_FALSE(d.allowed);
  CHECK(d.ruleKey == "messages_per_day");
  CHECK(d.retryAfter == 10s);
  c.advance(9s);
  CHECK_FALSE(l.check(Metric::Messages, 1, at(c)).allowed);
  c.advance(1s);  // 2027-03-11 00:00:00
  CHECK(drain(l, Metric::Messages, c) == 3);
  // A fixed window, not a bucket: nothing comes back during the day.
  c.advance(23h);
  d = l.check(Metric::Messages, 1, at(c));
  CHECK_FALSE(d.allowed);
  CHECK(d.retryAfter == 1h);
}

TEST_CASE("month window: Jan 31 -> Feb 1, Dec -> Jan, leap February") {
  FakeClock c;
  SUBCASE("January into February") {
    c.setWall(utc(2027, 1, 31, 23, 0, 0));
    RateLimiter l({rule("messages_per_month", 2)}, at(c));
    CHECK(drain(l, Metric::Messages, c) == 2);
    Decision d = l.check(Metric::Messages, 1, at(c));
    CHECK_FALSE(d.allowed);
    CHECK(d.retryAfter == 1h);
    c.advance(1h);
    CHECK(drain(l, Metric::Messages, c) == 2);
    d = l.check(Metric::Messages, 1, at(c));
    CHECK(d.retryAfter == std::chrono::seconds(28 * 86400));  // February 2027: 28 days
  }
  SUBCASE("December into January of the next year") {
    c.setWall(utc(2027, 12, 31, 23, 59, 59));
    RateLimiter l({rule("recipients_per_month", 1)}, at(c));
    CHECK(drain(l, Metric::Recipients, c) == 1);
    CHECK(l.check(Metric::Recipients, 1, at(c)).retryAfter == 1s);
    c.advance(1s);
    CHECK(drain(l, Metric::Recipients, c) == 1);
    CHECK(l.check(Metric::Recipients, 1, at(c)).retryAfter == std::chrono::seconds(31 * 86400));
  }
  SUBCASE("leap February") {
    c.setWall(utc(2028, 2, 28, 12, 0, 0));
    RateLimiter l({rule("messages_per_month", 1)}, at(c));
    CHECK(drain(l, Metric::Messages, c) == 1);
    CHECK(l.check(Metric::Messages, 1, at(c)).retryAfter == 36h);
  }
  SUBCASE("mid-month start counts from the calendar month, not from start-up") {
    c.setWall(utc(2027, 4, 20));
    RateLimiter l({rule("messages_per_month", 1)}, at(c));
    CHECK(drain(l, Metric::Messages, c) == 1);
    c.setWall(utc(2027, 5, 1));
    CHECK(drain(l, Metric::Messages, c) == 1);
  }
}

TEST_CASE("a wall clock stepping back does not hand out a fresh window") {
  FakeClock c;
  c.setWall(utc(2027, 6, 2, 0, 0, 5));
  RateLimiter l({rule("messages_per_day", 1)}, at(c));
  CHECK(drain(l, Metric::Messages, c) == 1);
  c.setWall(utc(2027, 6, 1, 23, 59, 0));
  CHECK_FALSE(l.check(Metric::Messages, 1, at(c)).allowed);
}

TEST_CASE("several rules: all must allow; the longest wait is reported") {
  FakeClock c;
  RateLimiter l({rule("messages_per_second", 1), rule("messages_per_minute", 2)}, at(c));
  CHECK(l.tryConsume(Metric::Messages, 1, at(c)).allowed);
  Decision d = l.check(Metric::Messages, 1, at(c));
  CHECK_FALSE(d.allowed);
  CHECK(d.ruleKey == "messages_per_second");
  CHECK(d.retryAfter == 1s);
  c.advance(1s);
  CHECK(l.tryConsume(Metric::Messages, 1, at(c)).allowed);
  // Second bucket needs 1 s, minute bucket has 1/30 token and needs 29 s more.
  d = l.check(Metric::Messages, 1, at(c));
  CHECK_FALSE(d.allowed);
  CHECK(d.ruleKey == "messages_per_minute");
  CHECK(d.retryAfter == 29s);
  c.advance(29s);
  CHECK(l.tryConsume(Metric::Messages, 1, at(c)).allowed);

  SUBCASE("a day window with a bucket") {
    FakeClock c2;
    c2.setWall(utc(2027, 8, 8, 20, 0, 0));
    RateLimiter m({rule("messages_per_minute", 10), rule("messages_per_day", 12)}, at(c2));
    CHECK(drain(m, Metric::Messages, c2) == 10);
    CHECK(m.check(Metric::Messages, 1, at(c2)).ruleKey == "messages_per_minute");
    c2.advance(1min);
    CHECK(drain(m, Metric::Messages, c2) == 2);
    Decision dd = m.check(Metric::Messages, 1, at(c2));
    CHECK(dd.ruleKey == "messages_per_day");
    CHECK(dd.retryAfter == std::chrono::seconds(4 * 3600 - 60));
  }
}

TEST_CASE("recipients are counted per accepted RCPT, with 452 4.5.3") {
  FakeClock c;
  AccountLimits reg;
  reg.configure({{"shop", {rule("recipients_per_minute", 3), rule("messages_per_minute", 100)}}}, at(c));
  for (int i = 0; i < 3; ++i) CHECK(reg.tryConsume("shop", Metric::Recipients, 1, at(c)).allowed);
  Decision d = reg.tryConsume("shop", Metric::Recipients, 1, at(c));
  CHECK_FALSE(d.allowed);
  CHECK(d.what == Metric::Recipients);
  PolicyReply r = rateLimitReply(d);
  CHECK(r.code == 452);
  CHECK(r.enhanced == "4.5.3");
  CHECK(r.text == "Rate limit recipients_per_minute exceeded; try again in 20 seconds");
  // The session stays usable: messages are unaffected, and a refused RCPT cost nothing.
  CHECK(reg.checkMessage("shop", 0, at(c)).allowed);
  c.advance(20s);
  CHECK(reg.tryConsume("shop", Metric::Recipients, 1, at(c)).allowed);
  CHECK_FALSE(reg.tryConsume("shop", Metric::Recipients, 1, at(c)).allowed);
}

TEST_CASE("message flow: check at MAIL, commit after the store; reply text") {
  FakeClock c;
  AccountLimits reg;
  reg.configure({{"app", {rule("messages_per_minute", 5)}}}, at(c));
  for (int i = 0; i < 5; ++i) {
    REQUIRE(reg.checkMessage("app", 0, at(c)).allowed);
    reg.commitMessage("app", 100, at(c));
  }
  Decision d = reg.checkMessage("app", 0, at(c));
  CHECK_FALSE(d.allowed);
  PolicyReply r = rateLimitReply(d);
  CHECK(r.code == 451);
  CHECK(r.enhanced == "4.7.1");
  CHECK(r.text == "Rate limit messages_per_minute exceeded; try again in 12 seconds");
  CHECK(rateLimitReply(Decision{}).code == 0);
  // A message refused at MAIL (or lost before the store) is never committed.
  c.advance(12s);
  CHECK(reg.checkMessage("app", 0, at(c)).allowed);
  CHECK(reg.checkMessage("app", 0, at(c)).allowed);
}

TEST_CASE("bytes: SIZE= at MAIL, the real size at end of data, permanent when too big") {
  FakeClock c;
  c.setWall(utc(2027, 5, 5, 18, 0, 0));
  AccountLimits reg;
  reg.configure({{"ci", {rule("bytes_per_day", 1000)}}}, at(c));
  CHECK(reg.checkMessage("ci", 600, at(c)).allowed);
  reg.commitMessage("ci", 600, at(c));
  Decision d = reg.checkMessage("ci", 500, at(c));  // SIZE=500 no longer fits today
  CHECK_FALSE(d.allowed);
  CHECK(d.what == Metric::Bytes);
  CHECK(d.retryAfter == 6h);
  CHECK(rateLimitReply(d).code == 451);
  CHECK(reg.checkMessage("ci", 0, at(c)).allowed);  // no SIZE=: decided at end of data
  CHECK_FALSE(reg.check("ci", Metric::Bytes, 401, at(c)).allowed);
  CHECK(reg.check("ci", Metric::Bytes, 400, at(c)).allowed);
  d = reg.checkMessage("ci", 5000, at(c));
  CHECK(d.permanent);
  PolicyReply r = rateLimitReply(d);
  CHECK(r.code == 552);
  CHECK(r.enhanced == "5.3.4");
  CHECK(r.text == "Message size exceeds rate limit bytes_per_day");

  SUBCASE("a bucket overdrawn by a stored message pays the debt back") {
    FakeClock c2;
    RateLimiter l({rule("bytes_per_minute", 600)}, at(c2));
    CHECK(l.checkMessage(100, at(c2)).allowed);
    l.commitMessage(900, at(c2));  // bigger than the hint: level -300
    Decision dd = l.check(Metric::Bytes, 1, at(c2));
    CHECK_FALSE(dd.allowed);
    CHECK(dd.retryAfter == 31s);  // 301 bytes at 10 bytes/s
    c2.advance(31s);
    CHECK(l.check(Metric::Bytes, 1, at(c2)).allowed);
  }
}

TEST_CASE("unknown accounts have no limits") {
  FakeClock c;
  AccountLimits reg;
  reg.configure({{"a", {rule("messages_per_minute", 1)}}}, at(c));
  for (int i = 0; i < 5; ++i) CHECK(reg.tryConsume("nobody", Metric::Messages, 1, at(c)).allowed);
}

TEST_CASE("snapshot and restore day/month windows across a restart") {
  FakeClock c;
  c.setWall(utc(2027, 9, 14, 10, 0, 0));
  const std::vector<AccountRules> accounts{
      {"shop", {rule("messages_per_day", 10), rule("recipients_per_month", 100), rule("messages_per_minute", 1000)}},
      {"ci", {rule("bytes_per_day", 5000)}}};
  std::vector<WindowState> saved;
  {
    AccountLimits reg;
    reg.configure(accounts, at(c));
    for (int i = 0; i < 4; ++i) reg.commitMessage("shop", 10, at(c));
    reg.commit("shop", Metric::Recipients, 30, at(c));
    reg.commitMessage("ci", 1234, at(c));
    saved = reg.snapshot();
  }
  REQUIRE(saved.size() == 3);  // buckets are not persisted
  for (const WindowState& w : saved) {
    if (w.key == "messages_per_day") {
      CHECK(w.username == "shop");
      CHECK(w.windowStart == subrelay::util::unixSeconds(utc(2027, 9, 14)));
      CHECK(w.count == 4);
    } else if (w.key == "recipients_per_month") {
      CHECK(w.windowStart == subrelay::util::unixSeconds(utc(2027, 9, 1)));
      CHECK(w.count == 30);
    } else {
      CHECK(w.username == "ci");
      CHECK(w.count == 1234);
    }
  }
  c.advance(10min);  // the restart
  AccountLimits reg;
  reg.configure(accounts, at(c));
  std::vector<WindowState> rows = saved;
  rows.push_back({"gone", "messages_per_day", rows[0].windowStart, 99});  // ignored
  rows.push_back({"shop", "messages_per_minute", 0, 99});                 // not a window
  reg.restore(rows);
  int more = 0;
  while (reg.tryConsume("shop", Metric::Messages, 1, at(c)).allowed) ++more;
  CHECK(more == 6);
  CHECK(reg.check("shop", Metric::Recipients, 70, at(c)).allowed);
  CHECK_FALSE(reg.check("shop", Metric::Recipients, 71, at(c)).allowed);
  CHECK_FALSE(reg.check("ci", Metric::Bytes, 5000 - 1233, at(c)).allowed);

  SUBCASE("rows from an earlier window are stale") {
    c.setWall(utc(2027, 9, 15, 0, 0, 1));
    AccountLimits later;
    later.configure(accounts, at(c));
    later.restore(saved);
    int n = 0;
    while (later.tryConsume("shop", Metric::Messages, 1, at(c)).allowed) ++n;
    CHECK(n == 10);                                                           // new day
    CHECK_FALSE(later.check("shop", Metric::Recipients, 71, at(c)).allowed);  // same month
  }
}

TEST_CASE("drainChanged returns only windows committed since the last drain") {
  FakeClock c;
  AccountLimits reg;
  reg.configure({{"a", {rule("messages_per_day", 100), rule("messages_per_month", 1000)}},
                 {"b", {rule("messages_per_day", 100)}}},
                at(c));
  CHECK(reg.drainChanged().empty());
  reg.commitMessage("a", 1, at(c));
  reg.commitMessage("a", 1, at(c));
  auto changed = reg.drainChanged();
  CHECK(changed.size() == 2);
  for (const auto& w : changed) {
    CHECK(w.username == "a");
    CHECK(w.count == 2);
  }
  CHECK(reg.drainChanged().empty());
  reg.check("b", Metric::Messages, 1, at(c));  // a check is not a change
  CHECK(reg.drainChanged().empty());
  reg.commitMessage("b", 1, at(c));
  changed = reg.drainChanged();
  REQUIRE(changed.size() == 1);
  CHECK(changed[0].username == "b");
}

TEST_CASE("configure on reload keeps the counts of surviving rules") {
  FakeClock c;
  AccountLimits reg;
  reg.configure({{"a", {rule("messages_per_day", 10), rule("messages_per_minute", 5)}}}, at(c));
  for (int i = 0; i < 5; ++i) reg.commitMessage("a", 1, at(c));
  // Minute bucket empty, day count 5. Raise the day limit, lower the minute one.
  reg.configure({{"a", {rule("messages_per_day", 20), rule("messages_per_minute", 3)}}}, at(c));
  CHECK_FALSE(reg.check("a", Metric::Messages, 1, at(c)).allowed);
  c.advance(1h);
  int n = 0;
  while (reg.tryConsume("a", Metric::Messages, 1, at(c)).allowed) ++n;
  CHECK(n == 3);  // new capacity, not the old one
  auto snap = reg.snapshot();
  REQUIRE(snap.size() == 1);
  CHECK(snap[0].count == 8);
}

TEST_CASE("AccountLimits is safe from two worker threads") {
  FakeClock c;
  AccountLimits reg;
  reg.configure({{"a", {rule("recipients_per_day", 1000)}}}, at(c));
  std::atomic<int> allowed{0};
  auto work = [&] {
    for (int i = 0; i < 800; ++i) {
      if (reg.tryConsume("a", Metric::Recipients, 1, at(c)).allowed) ++allowed;
      if (i % 50 == 0) (void)reg.snapshot();
    }
  };
  std::thread t1(work), t2(work);
  t1.join();
  t2.join();
  CHECK(allowed.load() == 1000);
}

// ---- AuthGuard ----

TEST_CASE("addressKey groups IPv6 by /64 and unwraps v4-mapped addresses") {
  CHECK(addressKey("192.0.2.7") == "192.0.2.7");
  CHECK(addressKey("2001:db8:1:2::1") == "2001:db8:1:2::/64");
  CHECK(addressKey("[2001:db8:1:2:ffff:ffff:ffff:ffff]") == "2001:db8:1:2::/64");
  CHECK(addressKey("fe80::1%eth0") == "fe80:0:0:0::/64");
  CHECK(addressKey("2001:db8:1:3::1") != addressKey("2001:db8:1:2::1"));
  CHECK(addressKey("::ffff:192.0.2.7") == "192.0.2.7");
  CHECK(addressKey("not an address") == "not an address");
}

TEST_CASE("progressive delays, then lockout, then expiry") {
  FakeClock c;
  AuthGuard g;  // defaults: delay after 3, lock after 10 in 15 min for 15 min
  const char* ip = "198.51.100.9";
  std::vector<long long> delays;
  for (int i = 0; i < 9; ++i) {
    Verdict v = g.check(ip, "alice", c.now());
    REQUIRE(v.kind != Verdict::Kind::Refuse);
    delays.push_back(v.delay.count());
    g.recordFailure(ip, "alice", c.now());
    c.advance(1s);
  }
  CHECK(delays == std::vector<long long>{0, 0, 0, 1000, 2000, 4000, 8000, 16000, 30000});
  CHECK(g.check(ip, "alice", c.now()).kind == Verdict::Kind::Delay);
  g.recordFailure(ip, "alice", c.now());  // the 10th
  Verdict v = g.check(ip, "bob", c.now());
  CHECK(v.kind == Verdict::Kind::Refuse);
  CHECK(v.retryAfter == 900s);
  CHECK(v.until == c.now() + 900s);
  CHECK(g.checkAddress(ip, c.now()).kind == Verdict::Kind::Refuse);
  PolicyReply r = authRefusalReply(v, false);
  CHECK(r.code == 454);
  CHECK(r.enhanced == "4.7.0");
  CHECK(r.text == "Too many authentication failures from your address; try again in 900 seconds");
  CHECK(authRefusalReply(g.checkAddress(ip, c.now()), true).code == 421);
  CHECK(authRefusalReply(Verdict{}, true).code == 0);
  c.advance(899s);
  CHECK(g.checkAddress(ip, c.now()).retryAfter == 1s);
  c.advance(1s);
  CHECK(g.checkAddress(ip, c.now()).kind == Verdict::Kind::Allow);
  // The address starts over (the username's failures have decayed by now as well).
  CHECK(g.check(ip, "alice", c.now()).kind == Verdict::Kind::Allow);
  CHECK(g.addressFailures(ip, c.now()) == 0);
}

TEST_CASE("other addresses and usernames are unaffected") {
  FakeClock c;
  AuthGuard g;
  for (int i = 0; i < 10; ++i) g.recordFailure("203.0.113.1", "alice", c.now());
  CHECK(g.check("203.0.113.1", "carol", c.now()).kind == Verdict::Kind::Refuse);
  CHECK(g.checkAddress("203.0.113.2", c.now()).kind == Verdict::Kind::Allow);
  CHECK(g.check("203.0.113.2", "carol", c.now()).kind == Verdict::Kind::Allow);
  // Same /64 is the same client; the next /64 is not.
  for (int i = 0; i < 10; ++i) g.recordFailure("2001:db8:0:1::a", "x", c.now());
  CHECK(g.checkAddress("2001:db8:0:1::b", c.now()).kind == Verdict::Kind::Refuse);
  CHECK(g.checkAddress("2001:db8:0:2::a", c.now()).kind == Verdict::Kind::Allow);
}

TEST_CASE("failures older than the window are forgotten") {
  FakeClock c;
  AuthGuard g;
  for (int i = 0; i < 9; ++i) g.recordFailure("192.0.2.1", "u", c.now());
  CHECK(g.addressFailures("192.0.2.1", c.now()) == 9);
  c.advance(15min);
  CHECK(g.addressFailures("192.0.2.1", c.now()) == 0);
  CHECK(g.check("192.0.2.1", "u", c.now()).kind == Verdict::Kind::Allow);
  g.recordFailure("192.0.2.1", "u", c.now());  // 1, not 10: no lock
  CHECK(g.checkAddress("192.0.2.1", c.now()).kind == Verdict::Kind::Allow);
  // Sliding: failures spread so that no 15 minutes hold 10 never lock.
  AuthGuard h;
  for (int i = 0; i < 30; ++i) {
    h.recordFailure("192.0.2.2", "v", c.now());
    c.advance(2min);
  }
  CHECK(h.checkAddress("192.0.2.2", c.now()).kind == Verdict::Kind::Allow);
}

TEST_CASE("success resets the username and the address") {
  FakeClock c;
  AuthGuard g;
  for (int i = 0; i < 5; ++i) g.recordFailure("192.0.2.5", "dave", c.now());
  CHECK(g.check("192.0.2.5", "dave", c.now()).kind == Verdict::Kind::Delay);
  g.recordSuccess("192.0.2.5", "dave", c.now());
  CHECK(g.check("192.0.2.5", "dave", c.now()).kind == Verdict::Kind::Allow);
  CHECK(g.addressEntries() == 0);
  CHECK(g.usernameEntries() == 0);

  SUBCASE("but never lifts a lock") {
    for (int i = 0; i < 10; ++i) g.recordFailure("192.0.2.5", "dave", c.now());
    g.recordSuccess("192.0.2.5", "dave", c.now());
    CHECK(g.checkAddress("192.0.2.5", c.now()).kind == Verdict::Kind::Refuse);
  }
  SUBCASE("successClearsAddress = false keeps the address count") {
    AuthGuardConfig cfg;
    cfg.successClearsAddress = false;
    AuthGuard k(cfg);
    for (int i = 0; i < 4; ++i) k.recordFailure("192.0.2.6", "eve", c.now());
    k.recordSuccess("192.0.2.6", "eve", c.now());
    CHECK(k.addressFailures("192.0.2.6", c.now()) == 4);
    CHECK(k.check("192.0.2.6", "other", c.now()).delay == 2000ms);
  }
}

TEST_CASE("a username attacked from many addresses is slowed, never locked") {
  FakeClock c;
  AuthGuard g;
  for (int i = 0; i < 500; ++i) {
    const std::string ip = "10.0." + std::to_string(i / 250) + "." + std::to_string(i % 250);
    g.recordFailure(ip, "admin", c.now());
  }
  // The legitimate owner from a clean address: no delay at all, never refused.
  CHECK(g.check("192.0.2.200", "admin", c.now()).kind == Verdict::Kind::Allow);
  CHECK(g.checkAddress("192.0.2.200", c.now()).kind == Verdict::Kind::Allow);
  // A guessing address pays for the name's failures (capped) once it has failed itself.
  Verdict v = g.check("10.0.0.1", "admin", c.now());
  CHECK(v.kind == Verdict::Kind::Delay);
  CHECK(v.delay == 8000ms);
  g.recordFailure("192.0.2.200", "admin", c.now());
  CHECK(g.check("192.0.2.200", "admin", c.now()).delay == 8000ms);
  g.recordSuccess("192.0.2.200", "admin", c.now());
  CHECK(g.check("192.0.2.200", "admin", c.now()).kind == Verdict::Kind::Allow);
  // Another user from a clean address never noticed.
  CHECK(g.check("192.0.2.201", "bob", c.now()).kind == Verdict::Kind::Allow);
}

TEST_CASE("a known-good credential does not pay for guesses at its username") {
  FakeClock c;
  AuthGuard g;
  for (int i = 0; i < 50; ++i) g.recordFailure("10.1.0." + std::to_string(i), "ci", c.now());
  g.recordFailure("192.0.2.9", "ci", c.now());  // the owner mistyped once
  CHECK(g.check("192.0.2.9", "ci", c.now()).kind == Verdict::Kind::Delay);
  CHECK(g.check("192.0.2.9", "ci", c.now(), true).kind == Verdict::Kind::Allow);
  // The address's own failures still count, known-good or not.
  for (int i = 0; i < 3; ++i) g.recordFailure("192.0.2.9", "other", c.now());
  Verdict v = g.check("192.0.2.9", "ci", c.now(), true);
  CHECK(v.kind == Verdict::Kind::Delay);
  CHECK(v.delay == 2000ms);
}

TEST_CASE("unknown usernames cost the same as wrong passwords") {
  FakeClock c;
  AuthGuard g;
  // The guard knows no accounts: a name that exists and one that does not earn the
  // same verdicts, so its replies reveal nothing.
  for (int i = 0; i < 6; ++i) {
    g.recordFailure("192.0.2.10", "alice", c.now());
    g.recordFailure("192.0.2.11", "no-such-user", c.now());
    CHECK(g.check("192.0.2.10", "alice", c.now()).delay == g.check("192.0.2.11", "no-such-user", c.now()).delay);
  }
}

TEST_CASE("tables are bounded: least recently touched entries are evicted") {
  FakeClock c;
  AuthGuardConfig cfg;
  cfg.maxEntries = 100;
  AuthGuard g(cfg);
  for (int i = 0; i < 5000; ++i) {
    g.recordFailure("10.1." + std::to_string(i / 256) + "." + std::to_string(i % 256), "u" + std::to_string(i),
                    c.now());
  }
  CHECK(g.addressEntries() == 100);
  CHECK(g.usernameEntries() == 100);
  // The most recent survive.
  CHECK(g.addressFailures("10.1.19.135", c.now()) == 1);  // i = 4999
  CHECK(g.addressFailures("10.1.0.0", c.now()) == 0);
  // Lookups of clean addresses allocate nothing.
  for (int i = 0; i < 1000; ++i) (void)g.check("172.16.0." + std::to_string(i % 256), "z", c.now());
  CHECK(g.addressEntries() == 100);
}

TEST_CASE("AuthGuard from two threads") {
  FakeClock c;
  AuthGuard g;
  auto work = [&](int base) {
    for (int i = 0; i < 2000; ++i) {
      const std::string ip = "10.2." + std::to_string(base) + "." + std::to_string(i % 200);
      (void)g.check(ip, "user", c.now());
      g.recordFailure(ip, "user", c.now());
      if (i % 7 == 0) g.recordSuccess(ip, "user", c.now());
    }
  };
  std::thread t1(work, 1), t2(work, 2);
  t1.join();
  t2.join();
  CHECK(g.addressEntries() <= 400);
}

// ---- Meter ----

TEST_CASE("Meter counts per account and snapshots") {
  Meter m(2);
  m.addAccepted("a", 100);
  m.addAccepted("a", 50);
  m.addRecipients("a", 3);
  m.addRecipients("a");
  m.addRefusedByLimit("a");
  m.addAuthFailure("b");
  m.addAuthFailure("c");  // over the cap: folded into "*"
  MeterCounts a = m.get("a");
  CHECK(a.accepted == 2);
  CHECK(a.bytes == 150);
  CHECK(a.recipients == 4);
  CHECK(a.refusedByLimit == 1);
  CHECK(a.authFailures == 0);
  CHECK(m.get("b").authFailures == 1);
  CHECK(m.get("c").authFailures == 0);
  auto snap = m.snapshot();
  CHECK(snap.size() == 3);
  CHECK(snap["*"].authFailures == 1);

  Meter shared;
  auto work = [&] {
    for (int i = 0; i < 1000; ++i) shared.addAccepted("x", 2);
  };
  std::thread t1(work), t2(work);
  t1.join();
  t2.join();
  CHECK(shared.get("x").accepted == 2000);
  CHECK(shared.get("x").bytes == 4000);
}

TEST_CASE("lockoutThreshold 0 disables the lock but keeps the delays") {
  FakeClock c;
  AuthGuardConfig cfg;
  cfg.lockoutThreshold = 0;
  AuthGuard g(cfg);
  for (int i = 0; i < 50; ++i) g.recordFailure("192.0.2.77", "u", c.now());
  Verdict v = g.check("192.0.2.77", "u", c.now());
  CHECK(v.kind == Verdict::Kind::Delay);
  CHECK(v.delay == 30000ms);
}

TEST_CASE("issue 9: a username under attack from one address does not slow its owner elsewhere") {
  FakeClock c;
  AuthGuard g;
  for (int i = 0; i < 8; ++i) g.recordFailure("198.51.100.7", "webshop", c.now());
  // The guesser is slowed by its address and the name...
  CHECK(g.check("198.51.100.7", "webshop", c.now()).kind == Verdict::Kind::Delay);
  // ...the owner at a clean address is not, whether or not its credential was cached.
  CHECK(g.check("192.0.2.44", "webshop", c.now()).kind == Verdict::Kind::Allow);
  CHECK(g.check("192.0.2.44", "webshop", c.now(), false).delay == 0ms);
  // A new address of the attacker gets its first guess undelayed, then the name's delay.
  CHECK(g.check("198.51.100.8", "webshop", c.now()).kind == Verdict::Kind::Allow);
  g.recordFailure("198.51.100.8", "webshop", c.now());
  CHECK(g.check("198.51.100.8", "webshop", c.now()).kind == Verdict::Kind::Delay);
}
