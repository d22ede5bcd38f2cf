// AuthGuard's sliding-window failure counts, progressive delays and address locks, and
// Meter's per-account counters (see brute_force.h).
#include "policy/brute_force.h"

#include <arpa/inet.h>

#include <algorithm>
#include <array>
#include <cstdio>

namespace subrelay::policy {

namespace {

using std::chrono::milliseconds;

std::chrono::seconds ceilSeconds(std::chrono::steady_clock::duration d) {
  auto s = std::chrono::ceil<std::chrono::seconds>(d);
  return std::max(s, std::chrono::seconds(1));
}

}  // namespace

PolicyReply authRefusalReply(const Verdict& v, bool atConnect) {
  PolicyReply r;
  if (v.kind != Verdict::Kind::Refuse) return r;
  r.code = atConnect ? 421 : 454;
  r.enhanced = "4.7.0";
  const int64_t s = v.retryAfter.count();
  r.text = "Too many authentication failures from your address; try again in " + std::to_string(s) +
           (s == 1 ? " second" : " seconds");
  return r;
}

std::string addressKey(std::string_view ip) {
  std::string s(ip);
  if (s.size() >= 2 && s.front() == '[' && s.back() == ']') s = s.substr(1, s.size() - 2);
  if (auto pct = s.find('%'); pct != std::string::npos) s.resize(pct);
  std::array<unsigned char, 16> b{};
  if (inet_pton(AF_INET, s.c_str(), b.data()) == 1) return s;
  if (inet_pton(AF_INET6, s.c_str(), b.data()) != 1) return std::string(ip);
  // ::ffff:a.b.c.d is an IPv4 client on a dual-stack socket: count it as that address.
  static constexpr std::array<unsigned char, 12> kMapped{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  if (std::equal(kMapped.begin(), kMapped.end(), b.begin())) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "%u.%u.%u.%u", b[12], b[13], b[14], b[15]);
    return buf;
  }
  char buf[48];
  std::snprintf(buf, sizeof buf, "%x:%x:%x:%x::/64", (b[0] << 8) | b[1], (b[2] << 8) | b[3], (b[4] << 8) | b[5],
                (b[6] << 8) | b[7]);
  return buf;
}

AuthGuard::AuthGuard(AuthGuardConfig config) { applyConfig(config); }

void AuthGuard::applyConfig(AuthGuardConfig config) {
  config_ = config;
  // Keep enough timestamps to reach both the lock threshold and the delay cap; more
  // would only cost memory, since the verdict saturates there.
  size_t steps = 0;
  for (milliseconds d = config_.baseDelay; d.count() > 0 && d < config_.maxDelay && steps < 32; d *= 2) ++steps;
  kept_ = std::max<size_t>({config_.lockoutThreshold, config_.delayAfter + steps + 1, 1});
  if (config_.maxEntries == 0) config_.maxEntries = 1;
}

void AuthGuard::reconfigure(AuthGuardConfig config) {
  std::lock_guard lk(mu_);
  applyConfig(config);
}

void AuthGuard::prune(Entry& e, TimePoint now) const {
  const TimePoint horizon = now - config_.window;
  auto firstKept = std::find_if(e.failures.begin(), e.failures.end(), [&](TimePoint t) { return t > horizon; });
  e.failures.erase(e.failures.begin(), firstKept);
}

AuthGuard::Entry* AuthGuard::find(Table& t, const std::string& key, TimePoint now) {
  auto it = t.map.find(key);
  if (it == t.map.end()) return nullptr;
  prune(it->second, now);
  // Forgotten entirely: drop it now rather than waiting for eviction.
  if (it->second.failures.empty() && it->second.lockedUntil <= now) {
    t.order.erase(it->second.lru);
    t.map.erase(it);
    return nullptr;
  }
  return &it->second;
}

AuthGuard::Entry& AuthGuard::touch(Table& t, const std::string& key) {
  auto it = t.map.find(key);
  if (it != t.map.end()) {
    t.order.splice(t.order.end(), t.order, it->second.lru);
    return it->second;
  }
  // Bounded memory: a spray of addresses or usernames evicts the stalest entries. An
  // attacker with that many addresses could evict a lock; the per-username delays
  // still hold for the names it targets.
  while (t.map.size() >= config_.maxEntries && !t.order.empty()) {
    t.map.erase(t.order.front());
    t.order.pop_front();
  }
  t.order.push_back(key);
  Entry& e = t.map[key];
  e.lru = std::prev(t.order.end());
  return e;
}

milliseconds AuthGuard::delayFor(size_t failures, milliseconds cap) const {
  if (failures < config_.delayAfter) return milliseconds(0);
  milliseconds d = config_.baseDelay;
  for (size_t i = config_.delayAfter; i < failures && d < cap; ++i) d *= 2;
  return std::min(d, cap);
}

Verdict AuthGuard::lockVerdict(const Entry& e, TimePoint now) const {
  Verdict v;
  if (e.lockedUntil > now) {
    v.kind = Verdict::Kind::Refuse;
    v.until = e.lockedUntil;
    v.retryAfter = ceilSeconds(e.lockedUntil - now);
  }
  return v;
}

Verdict AuthGuard::checkAddress(std::string_view ip, TimePoint now) {
  std::lock_guard lock(mu_);
  const Entry* e = find(addresses_, addressKey(ip), now);
  return e ? lockVerdict(*e, now) : Verdict{};
}

Verdict AuthGuard::check(std::string_view ip, std::string_view username, TimePoint now, bool knownGood) {
  std::lock_guard lock(mu_);
  Verdict v;
  milliseconds delay{0};
  bool addressFailed = false;
  if (const Entry* e = find(addresses_, addressKey(ip), now)) {
    v = lockVerdict(*e, now);
    if (v.kind == Verdict::Kind::Refuse) return v;
    delay = delayFor(e->failures.size(), config_.maxDelay);
    addressFailed = !e->failures.empty();
  }
  // The username's count only slows addresses that have failed themselves: the guesser
  // pays for the guesses at that name, its owner logging in from a clean address does
  // not (otherwise anyone could make every login of a known username wait).
  const Entry* u = (knownGood || !addressFailed) ? nullptr : find(usernames_, std::string(username), now);
  if (u != nullptr) delay = std::max(delay, delayFor(u->failures.size(), config_.maxUsernameDelay));
  if (delay > milliseconds(0)) {
    v.kind = Verdict::Kind::Delay;
    v.delay = delay;
  }
  return v;
}

void AuthGuard::recordFailure(std::string_view ip, std::string_view username, TimePoint now) {
  std::lock_guard lock(mu_);
  const std::string key = addressKey(ip);
  find(addresses_, key, now);  // prunes (or drops) a stale entry first
  Entry& a = touch(addresses_, key);
  if (a.lockedUntil <= now) {
    a.failures.push_back(now);
    if (a.failures.size() > kept_) a.failures.erase(a.failures.begin());
    if (config_.lockoutThreshold > 0 && a.failures.size() >= config_.lockoutThreshold) {
      a.lockedUntil = now + config_.lockoutDuration;
      // The lock is the penalty for these failures; once it ends the address starts
      // over instead of being locked again by its first mistake.
      a.failures.clear();
    }
  }
  const std::string user(username);
  find(usernames_, user, now);
  Entry& u = touch(usernames_, user);
  u.failures.push_back(now);
  if (u.failures.size() > kept_) u.failures.erase(u.failures.begin());
}

void AuthGuard::recordSuccess(std::string_view ip, std::string_view username, TimePoint now) {
  std::lock_guard lock(mu_);
  // The account's owner proved the password: the username's failures were someone
  // else's, or forgiven typos; either way its next login should not wait.
  if (auto it = usernames_.map.find(std::string(username)); it != usernames_.map.end()) {
    usernames_.order.erase(it->second.lru);
    usernames_.map.erase(it);
  }
  if (!config_.successClearsAddress) return;
  if (auto it = addresses_.map.find(addressKey(ip)); it != addresses_.map.end() && it->second.lockedUntil <= now) {
    addresses_.order.erase(it->second.lru);
    addresses_.map.erase(it);
  }
}

size_t AuthGuard::addressEntries() const {
  std::lock_guard lock(mu_);
  return addresses_.map.size();
}

size_t AuthGuard::usernameEntries() const {
  std::lock_guard lock(mu_);
  return usernames_.map.size();
}

uint32_t AuthGuard::addressFailures(std::string_view ip, TimePoint now) {
  std::lock_guard lock(mu_);
  const Entry* e = find(addresses_, addressKey(ip), now);
  return e ? static_cast<uint32_t>(e->failures.size()) : 0;
}

MeterCounts& Meter::slot(std::string_view username) {
  auto it = counts_.find(username);
  if (it != counts_.end()) return it->second;
  if (counts_.size() >= maxAccounts_) return counts_["*"];
  return counts_.emplace(std::string(username), MeterCounts{}).first->second;
}

void Meter::addAccepted(std::string_view username, uint64_t bytes) {
  std::lock_guard lock(mu_);
  MeterCounts& c = slot(username);
  ++c.accepted;
  c.bytes += bytes;
}

void Meter::addRefusedByLimit(std::string_view username) {
  std::lock_guard lock(mu_);
  ++slot(username).refusedByLimit;
}

void Meter::addRecipients(std::string_view username, uint64_t n) {
  std::lock_guard lock(mu_);
  slot(username).recipients += n;
}

void Meter::addAuthFailure(std::string_view username) {
  std::lock_guard lock(mu_);
  ++slot(username).authFailures;
}

MeterCounts Meter::get(std::string_view username) const {
  std::lock_guard lock(mu_);
  auto it = counts_.find(username);
  return it == counts_.end() ? MeterCounts{} : it->second;
}

std::map<std::string, MeterCounts> Meter::snapshot() const {
  std::lock_guard lock(mu_);
  return {counts_.begin(), counts_.end()};
}

}  // namespace subrelay::policy
