// Token buckets for second/minute/hour, UTC calendar windows for day/month, and the
// mutex-guarded per-account registry (see rate_limiter.h for the semantics).
#include "policy/rate_limiter.h"

#include <algorithm>
#include <utility>

namespace subrelay::policy {

namespace {

using std::chrono::nanoseconds;
using std::chrono::seconds;

bool isWindow(Period p) { return p == Period::Day || p == Period::Month; }

int64_t periodNs(Period p) {
  switch (p) {
    case Period::Second:
      return 1'000'000'000LL;
    case Period::Minute:
      return 60LL * 1'000'000'000LL;
    case Period::Hour:
      return 3600LL * 1'000'000'000LL;
    case Period::Day:
    case Period::Month:
      break;  // calendar windows, not buckets
  }
  return 86400LL * 1'000'000'000LL;
}

// [start, next) of the UTC calendar window holding `wall`, as unix seconds.
std::pair<int64_t, int64_t> windowBounds(Period p, std::chrono::system_clock::time_point wall) {
  using namespace std::chrono;
  const sys_days day = floor<days>(wall);
  if (p == Period::Day) return {util::unixSeconds(day), util::unixSeconds(day + days{1})};
  const year_month_day ymd{day};
  const year_month ym = ymd.year() / ymd.month();
  const sys_days start{ym / 1};
  const sys_days next{(ym + months{1}) / 1};  // December rolls into January of year + 1
  return {util::unixSeconds(start), util::unixSeconds(next)};
}

}  // namespace

int64_t windowStart(Period p, std::chrono::system_clock::time_point wall) { return windowBounds(p, wall).first; }

namespace {

// Whole seconds, rounded up, at least 1: "try again in 0 seconds" would invite a retry
// that fails again.
seconds ceilSeconds(Int128 ns) {
  Int128 s = (ns + 999'999'999) / 1'000'000'000;
  if (s < 1) s = 1;
  return seconds(static_cast<int64_t>(s));
}

// Merges one rule's verdict into the overall one: refused if any refuses; the reported
// rule is the one needing the longest wait, since only then do all rules allow again.
void merge(Decision& into, const Decision& d) {
  if (d.allowed) return;
  if (into.allowed || d.permanent > into.permanent ||
      (d.permanent == into.permanent && d.retryAfter > into.retryAfter)) {
    into = d;
  }
}

}  // namespace

std::optional<RateRule> makeRateRule(std::string key, std::string_view what, std::string_view period, uint64_t amount) {
  RateRule r;
  r.key = std::move(key);
  r.amount = amount;
  if (what == "messages")
    r.what = Metric::Messages;
  else if (what == "recipients")
    r.what = Metric::Recipients;
  else if (what == "bytes")
    r.what = Metric::Bytes;
  else
    return std::nullopt;
  if (period == "second")
    r.period = Period::Second;
  else if (period == "minute")
    r.period = Period::Minute;
  else if (period == "hour")
    r.period = Period::Hour;
  else if (period == "day")
    r.period = Period::Day;
  else if (period == "month")
    r.period = Period::Month;
  else
    return std::nullopt;
  return r;
}

PolicyReply rateLimitReply(const Decision& d) {
  PolicyReply r;
  if (d.allowed) return r;
  if (d.permanent && d.what == Metric::Bytes) {
    // Waiting cannot help, so a transient code would only make the client retry forever.
    r.code = 552;
    r.enhanced = "5.3.4";
    r.text = "Message size exceeds rate limit " + d.ruleKey;
    return r;
  }
  const bool rcpt = d.what == Metric::Recipients;
  r.code = rcpt ? 452 : 451;
  r.enhanced = rcpt ? "4.5.3" : "4.7.1";
  const int64_t s = d.retryAfter.count();
  r.text =
      "Rate limit " + d.ruleKey + " exceeded; try again in " + std::to_string(s) + (s == 1 ? " second" : " seconds");
  return r;
}

RateLimiter::RateLimiter(std::vector<RateRule> rules, Instant now) : rules_(std::move(rules)) {
  states_.resize(rules_.size());
  for (size_t i = 0; i < rules_.size(); ++i) {
    const RateRule& r = rules_[i];
    State& s = states_[i];
    if (isWindow(r.period)) {
      s.windowStart = windowBounds(r.period, now.wall).first;
    } else {
      // Start full: a freshly started relay lets an account send its burst.
      s.level = static_cast<Int128>(r.amount) * periodNs(r.period);
      s.last = now.mono;
    }
  }
}

void RateLimiter::refill(const RateRule& r, State& s, Instant now) const {
  if (isWindow(r.period)) {
    const int64_t start = windowBounds(r.period, now.wall).first;
    // Only forward: if the wall clock steps back, keep counting in the newer window
    // rather than handing out a fresh allowance.
    if (start > s.windowStart) {
      s.windowStart = start;
      s.count = 0;
      s.dirty = true;  // the reset must reach the database too
    }
    return;
  }
  const Int128 cap = static_cast<Int128>(r.amount) * periodNs(r.period);
  if (now.mono > s.last) {
    const Int128 elapsed = std::chrono::duration_cast<nanoseconds>(now.mono - s.last).count();
    s.level = std::min(cap, s.level + elapsed * static_cast<Int128>(r.amount));
    s.last = now.mono;
  }
}

Decision RateLimiter::checkOne(const RateRule& r, State& s, uint64_t n, Instant now) const {
  Decision d;
  refill(r, s, now);
  if (isWindow(r.period)) {
    if (n <= r.amount && s.count <= r.amount - n) return d;
    d.allowed = false;
    d.ruleKey = r.key;
    d.what = r.what;
    d.permanent = n > r.amount;
    const int64_t next = windowBounds(r.period, now.wall).second;
    const auto untilNext = std::chrono::system_clock::time_point(seconds(next)) - now.wall;
    d.retryAfter = ceilSeconds(std::chrono::duration_cast<nanoseconds>(untilNext).count());
    return d;
  }
  const int64_t pns = periodNs(r.period);
  const Int128 need = static_cast<Int128>(n) * pns;
  if (s.level >= need) return d;
  d.allowed = false;
  d.ruleKey = r.key;
  d.what = r.what;
  d.permanent = n > r.amount;
  if (r.amount == 0) {
    d.retryAfter = ceilSeconds(pns);  // never refills; say "a period" rather than divide by 0
  } else {
    // Continuous refill: the wait is the missing units over the refill rate.
    d.retryAfter = ceilSeconds((need - s.level + r.amount - 1) / r.amount);
  }
  return d;
}

void RateLimiter::commitOne(const RateRule& r, State& s, uint64_t n, Instant now) {
  refill(r, s, now);
  if (isWindow(r.period)) {
    s.count += n;
    s.dirty = true;
  } else {
    // May go below zero (a stored message larger than its SIZE= hint): the debt is paid
    // back by refill before the next message fits.
    s.level -= static_cast<Int128>(n) * periodNs(r.period);
  }
}

Decision RateLimiter::check(Metric what, uint64_t n, Instant now) {
  Decision out;
  for (size_t i = 0; i < rules_.size(); ++i) {
    if (rules_[i].what == what) merge(out, checkOne(rules_[i], states_[i], n, now));
  }
  return out;
}

void RateLimiter::commit(Metric what, uint64_t n, Instant now) {
  for (size_t i = 0; i < rules_.size(); ++i) {
    if (rules_[i].what == what) commitOne(rules_[i], states_[i], n, now);
  }
}

Decision RateLimiter::tryConsume(Metric what, uint64_t n, Instant now) {
  Decision d = check(what, n, now);
  if (d.allowed) commit(what, n, now);
  return d;
}

Decision RateLimiter::checkMessage(uint64_t sizeHint, Instant now) {
  Decision d = check(Metric::Messages, 1, now);
  merge(d, check(Metric::Bytes, sizeHint, now));
  return d;
}

void RateLimiter::commitMessage(uint64_t bytes, Instant now) {
  commit(Metric::Messages, 1, now);
  commit(Metric::Bytes, bytes, now);
}

std::vector<WindowState> RateLimiter::windows() const {
  std::vector<WindowState> out;
  for (size_t i = 0; i < rules_.size(); ++i) {
    if (isWindow(rules_[i].period)) out.push_back({{}, rules_[i].key, states_[i].windowStart, states_[i].count});
  }
  return out;
}

std::vector<WindowState> RateLimiter::drainChanged() {
  std::vector<WindowState> out;
  for (size_t i = 0; i < rules_.size(); ++i) {
    if (!isWindow(rules_[i].period) || !states_[i].dirty) continue;
    out.push_back({{}, rules_[i].key, states_[i].windowStart, states_[i].count});
    states_[i].dirty = false;
  }
  return out;
}

void RateLimiter::restoreWindow(std::string_view key, int64_t windowStart, uint64_t count) {
  for (size_t i = 0; i < rules_.size(); ++i) {
    if (rules_[i].key != key || !isWindow(rules_[i].period)) continue;
    State& s = states_[i];
    // A row from an older window is stale (the first check would reset it anyway); one
    // from the current or a later window (clock stepped back) is kept.
    if (windowStart >= s.windowStart) {
      s.windowStart = windowStart;
      s.count = count;
      s.dirty = false;
    }
  }
}

void RateLimiter::inheritFrom(const RateLimiter& old) {
  for (size_t i = 0; i < rules_.size(); ++i) {
    for (size_t j = 0; j < old.rules_.size(); ++j) {
      if (old.rules_[j].key != rules_[i].key) continue;
      const State& o = old.states_[j];
      State& s = states_[i];
      if (isWindow(rules_[i].period)) {
        s.windowStart = std::max(s.windowStart, o.windowStart);
        s.count = o.windowStart >= s.windowStart ? o.count : 0;
        s.dirty = o.dirty;
      } else {
        // A lowered amount must not leave more tokens than the new capacity.
        const Int128 cap = static_cast<Int128>(rules_[i].amount) * periodNs(rules_[i].period);
        s.level = std::min(cap, o.level);
        s.last = o.last;
      }
    }
  }
}

void AccountLimits::configure(const std::vector<AccountRules>& accounts, Instant now) {
  std::lock_guard lock(mu_);
  std::map<std::string, RateLimiter, std::less<>> next;
  for (const AccountRules& a : accounts) {
    RateLimiter fresh(a.rules, now);
    if (auto it = limiters_.find(a.username); it != limiters_.end()) fresh.inheritFrom(it->second);
    next.insert_or_assign(a.username, std::move(fresh));
  }
  limiters_ = std::move(next);
}

Decision AccountLimits::check(std::string_view username, Metric what, uint64_t n, Instant now) {
  std::lock_guard lock(mu_);
  auto it = limiters_.find(username);
  return it == limiters_.end() ? Decision{} : it->second.check(what, n, now);
}

void AccountLimits::commit(std::string_view username, Metric what, uint64_t n, Instant now) {
  std::lock_guard lock(mu_);
  if (auto it = limiters_.find(username); it != limiters_.end()) it->second.commit(what, n, now);
}

Decision AccountLimits::tryConsume(std::string_view username, Metric what, uint64_t n, Instant now) {
  std::lock_guard lock(mu_);
  auto it = limiters_.find(username);
  return it == limiters_.end() ? Decision{} : it->second.tryConsume(what, n, now);
}

Decision AccountLimits::checkMessage(std::string_view username, uint64_t sizeHint, Instant now) {
  std::lock_guard lock(mu_);
  auto it = limiters_.find(username);
  return it == limiters_.end() ? Decision{} : it->second.checkMessage(sizeHint, now);
}

void AccountLimits::commitMessage(std::string_view username, uint64_t bytes, Instant now) {
  std::lock_guard lock(mu_);
  if (auto it = limiters_.find(username); it != limiters_.end()) it->second.commitMessage(bytes, now);
}

std::vector<WindowState> AccountLimits::snapshot() const {
  std::lock_guard lock(mu_);
  std::vector<WindowState> out;
  for (const auto& [user, limiter] : limiters_) {
    for (WindowState& w : limiter.windows()) {
      w.username = user;
      out.push_back(std::move(w));
    }
  }
  return out;
}

std::vector<WindowState> AccountLimits::drainChanged() {
  std::lock_guard lock(mu_);
  std::vector<WindowState> out;
  for (auto& [user, limiter] : limiters_) {
    for (WindowState& w : limiter.drainChanged()) {
      w.username = user;
      out.push_back(std::move(w));
    }
  }
  return out;
}

void AccountLimits::restore(const std::vector<WindowState>& rows) {
  std::lock_guard lock(mu_);
  for (const WindowState& w : rows) {
    if (auto it = limiters_.find(w.username); it != limiters_.end()) {
      it->second.restoreWindow(w.key, w.windowStart, w.count);
    }
  }
}

}  // namespace subrelay::policy
