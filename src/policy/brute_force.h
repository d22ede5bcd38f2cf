// AuthGuard: brute-force defence for AUTH, free of I/O and timers (the caller serves a
// delay with a loop timer, never by sleeping). Also Meter, the per-account counters.
//
// Failed AUTH is counted per client address (IPv6 grouped by /64, since one host
// usually owns the whole /64) and per username, over a sliding window: failures older
// than `window` are forgotten. After `delayAfter` failures the AUTH reply is delayed,
// doubling from `baseDelay` up to a cap; after `lockoutThreshold` failures in the
// window the address is refused for `lockoutDuration` (421 4.7.0 at connect, 454 4.7.0
// at AUTH).
//
// Only addresses are ever locked. A username attacked from many addresses only earns
// delays, capped lower (`maxUsernameDelay`), and only for addresses that have failed
// themselves within the window: locking or slowing the username for everyone would let
// anyone lock its owner out, so its legitimate client from a clean address logs in with
// no added delay while the attack lasts. Usernames are counted
// whether or not the account exists, so unknown names cost the same as wrong passwords
// (the Authenticator already equalises the scrypt time); nothing here reveals which
// names exist.
//
// Callers: at connect, checkAddress(); at AUTH, check() first: Refuse -> 454, else
// verify, and send the reply (success or failure alike, so timing leaks nothing) after
// the verdict's delay; then recordSuccess()/recordFailure().
#pragma once

#include <chrono>
#include <cstdint>
#include <list>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "policy/rate_limiter.h"

namespace subrelay::policy {

struct AuthGuardConfig {
  uint32_t delayAfter = 3;                           // failures before replies slow down
  std::chrono::milliseconds baseDelay{1000};         // first delay, then doubling
  std::chrono::milliseconds maxDelay{30000};         // cap for an address
  std::chrono::milliseconds maxUsernameDelay{8000};  // cap from the username's count
  uint32_t lockoutThreshold = 10;                    // failures from one address in the window; 0: never lock
  std::chrono::seconds window{900};
  std::chrono::seconds lockoutDuration{900};
  size_t maxEntries = 100000;  // per table; least recently touched evicted beyond it
  // A success clears the address's failures too (a user who mistyped twice is not
  // penalised later). An attacker owning one valid account could use it to reset its
  // address between guesses, but then still pays the username delays of each target.
  bool successClearsAddress = true;
};

struct Verdict {
  enum class Kind { Allow, Delay, Refuse };
  Kind kind = Kind::Allow;
  std::chrono::milliseconds delay{0};             // Delay: serve the AUTH reply after this
  std::chrono::steady_clock::time_point until{};  // Refuse: the lock ends then
  std::chrono::seconds retryAfter{0};             // Refuse: whole seconds until `until`
};

// "421 4.7.0" (at connect) or "454 4.7.0" (at AUTH) for a Refuse verdict.
PolicyReply authRefusalReply(const Verdict& v, bool atConnect);

// Counting key for an address: IPv4 (also v4-mapped IPv6) as is, IPv6 as its /64
// ("2001:db8:1:2::/64"); brackets and a zone suffix are dropped. Unparsable input is
// used verbatim.
std::string addressKey(std::string_view ip);

class AuthGuard {
 public:
  using TimePoint = std::chrono::steady_clock::time_point;
  explicit AuthGuard(AuthGuardConfig config = {});
  // New thresholds (config reload); the failures counted so far are kept.
  void reconfigure(AuthGuardConfig config);

  // At connect: only whether the address is locked.
  Verdict checkAddress(std::string_view ip, TimePoint now);
  // At AUTH: lock, else the delay due to the address's and the username's failures.
  // knownGood: the credential equals one verified before (the Authenticator's cache), so
  // the guesses others make at this username are not charged to its owner; the address's
  // own failures still are. (Callers count an AUTH abandoned during its delay as a
  // failure, so the fast answer for a known-good credential is no oracle: guessing it
  // needs the password already.)
  Verdict check(std::string_view ip, std::string_view username, TimePoint now, bool knownGood = false);
  void recordFailure(std::string_view ip, std::string_view username, TimePoint now);
  void recordSuccess(std::string_view ip, std::string_view username, TimePoint now);

  // For tests and metrics.
  size_t addressEntries() const;
  size_t usernameEntries() const;
  uint32_t addressFailures(std::string_view ip, TimePoint now);

 private:
  struct Entry {
    std::vector<TimePoint> failures;  // oldest first, at most kept_ entries
    TimePoint lockedUntil{};
    std::list<std::string>::iterator lru;
  };
  // A bounded table with least-recently-touched eviction.
  struct Table {
    std::unordered_map<std::string, Entry> map;
    std::list<std::string> order;  // front = least recently touched
  };

  void applyConfig(AuthGuardConfig config);
  Entry* find(Table& t, const std::string& key, TimePoint now);
  Entry& touch(Table& t, const std::string& key);
  void prune(Entry& e, TimePoint now) const;
  std::chrono::milliseconds delayFor(size_t failures, std::chrono::milliseconds cap) const;
  Verdict lockVerdict(const Entry& e, TimePoint now) const;

  AuthGuardConfig config_;
  size_t kept_;  // failure timestamps kept per entry: enough to reach lock and cap
  mutable std::mutex mu_;
  Table addresses_;
  Table usernames_;
};

// Per-account counters for metrics. Thread-safe; bounded (accounts beyond the cap,
// which only a misuse with arbitrary usernames could produce, fold into "*").
struct MeterCounts {
  uint64_t accepted = 0;
  uint64_t refusedByLimit = 0;
  uint64_t recipients = 0;
  uint64_t bytes = 0;
  uint64_t authFailures = 0;
};

class Meter {
 public:
  explicit Meter(size_t maxAccounts = 10000) : maxAccounts_(maxAccounts) {}
  void addAccepted(std::string_view username, uint64_t bytes);  // one stored message
  void addRefusedByLimit(std::string_view username);
  void addRecipients(std::string_view username, uint64_t n = 1);  // per accepted RCPT
  void addAuthFailure(std::string_view username);
  MeterCounts get(std::string_view username) const;
  std::map<std::string, MeterCounts> snapshot() const;

 private:
  MeterCounts& slot(std::string_view username);
  size_t maxAccounts_;
  mutable std::mutex mu_;
  std::map<std::string, MeterCounts, std::less<>> counts_;
};

}  // namespace subrelay::policy
