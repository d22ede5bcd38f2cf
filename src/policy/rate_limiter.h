// Per-account rate limits (accounts[].rate_limits, keys "<what>_per_<period>"), free of
// I/O: callers pass the time in, read from the injected util::Clock.
//
// Short periods (second, minute, hour) are token buckets: capacity = amount, refilled
// continuously at amount per period, so a client may burst the whole amount and then
// proceeds at the average rate. Day and month are fixed calendar windows in UTC
// (00:00 UTC, calendar month) counted on the wall clock: that is what operators mean by
// "per day", and a (window start, count) pair is all a restart has to persist.
//
// A message is checked at MAIL (messages + bytes from SIZE=), checked again at the end
// of data with the real size, and committed only once it is stored; a recipient is
// counted per accepted RCPT (tryConsume). Check and commit are separate, so two sessions
// of one account racing between them can overshoot by the messages in flight: the price
// of never charging an account for mail that was not accepted.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "util/clock.h"

namespace subrelay::policy {

// 128-bit so an hour's bytes in nanosecond units cannot overflow (__extension__: no
// -Wpedantic noise for the GCC/Clang builtin type).
__extension__ typedef __int128 Int128;

enum class Metric { Messages, Recipients, Bytes };
enum class Period { Second, Minute, Hour, Day, Month };

// policy/'s own copy of config::RateLimit, typed (policy/ does not include config/).
struct RateRule {
  std::string key;  // as configured, e.g. "messages_per_minute": named in replies
  Metric what = Metric::Messages;
  Period period = Period::Minute;
  uint64_t amount = 0;
};

// Builds a rule from config's strings ("messages"|"recipients"|"bytes",
// "second"|"minute"|"hour"|"day"|"month"); nullopt for anything else.
std::optional<RateRule> makeRateRule(std::string key, std::string_view what, std::string_view period, uint64_t amount);

// Both clocks at one instant: buckets run on the monotonic clock (immune to wall-clock
// steps), calendar windows on the wall clock (they must line up with UTC midnight).
struct Instant {
  std::chrono::steady_clock::time_point mono;
  std::chrono::system_clock::time_point wall;
  static Instant from(const util::Clock& clock) { return {clock.now(), clock.wallNow()}; }
};

struct Decision {
  bool allowed = true;
  std::string ruleKey;  // the rule that needs the longest wait (empty when allowed)
  Metric what = Metric::Messages;
  std::chrono::seconds retryAfter{0};  // >= 1 s when refused
  // The request alone exceeds the rule's amount (e.g. a 30 MB message against
  // bytes_per_day 10 MB): waiting will not help.
  bool permanent = false;
};

// A reply as data; the SMTP layer formats it.
struct PolicyReply {
  int code = 0;
  std::string enhanced;  // "4.7.1"
  std::string text;
};

// 451 4.7.1 (messages, bytes) or 452 4.5.3 (recipients, RFC 3463 "too many recipients")
// with the wait in the text; 552 5.3.4 for a message that can never fit a bytes rule.
PolicyReply rateLimitReply(const Decision& d);

// Unix seconds of the first instant of the day/month window (UTC) that holds `wall`.
int64_t windowStart(Period p, std::chrono::system_clock::time_point wall);

// Persisted form of one day/month window (later a SQLite row).
struct WindowState {
  std::string username;
  std::string key;
  int64_t windowStart = 0;  // unix seconds of the window's first instant (UTC)
  uint64_t count = 0;
};

// One account's rules. Not thread-safe: AccountLimits serialises access.
class RateLimiter {
 public:
  RateLimiter() = default;
  RateLimiter(std::vector<RateRule> rules, Instant now);

  // Would n more units of `what` fit every rule? Does not count anything.
  Decision check(Metric what, uint64_t n, Instant now);
  // Counts n units against every rule for `what` (may overdraw: the message is stored).
  void commit(Metric what, uint64_t n, Instant now);
  // check + commit when allowed (one RCPT).
  Decision tryConsume(Metric what, uint64_t n, Instant now);

  // MAIL / end of data: one message of sizeHint bytes (0 = unknown) fits?
  Decision checkMessage(uint64_t sizeHint, Instant now);
  // After the store: one message and its bytes.
  void commitMessage(uint64_t bytes, Instant now);

  // Day/month windows (username left empty; AccountLimits fills it in).
  std::vector<WindowState> windows() const;
  // Windows committed to since the last call (for cheap periodic persistence).
  std::vector<WindowState> drainChanged();
  // Restores a window by rule key; ignored for unknown keys or non-window rules.
  void restoreWindow(std::string_view key, int64_t windowStart, uint64_t count);
  // Takes over the state of rules with the same key (config reload keeps the counts).
  void inheritFrom(const RateLimiter& old);

  const std::vector<RateRule>& rules() const { return rules_; }

 private:
  struct State {
    // Token bucket: level in token-nanoseconds-per-period units (1 token = periodNs
    // units, refill = amount units per ns) so every step is exact integer arithmetic.
    Int128 level = 0;
    std::chrono::steady_clock::time_point last{};
    // Calendar window.
    int64_t windowStart = 0;
    uint64_t count = 0;
    bool dirty = false;
  };
  void refill(const RateRule& r, State& s, Instant now) const;
  Decision checkOne(const RateRule& r, State& s, uint64_t n, Instant now) const;
  void commitOne(const RateRule& r, State& s, uint64_t n, Instant now);

  std::vector<RateRule> rules_;
  std::vector<State> states_;  // parallel to rules_
};

struct AccountRules {
  std::string username;
  std::vector<RateRule> rules;
};

// Registry of RateLimiters keyed by username, shared by the worker loops (one mutex:
// every operation is a few integer steps). Unknown usernames have no limits.
class AccountLimits {
 public:
  // Replaces the set of accounts; state of surviving (username, key) pairs is kept.
  void configure(const std::vector<AccountRules>& accounts, Instant now);

  Decision check(std::string_view username, Metric what, uint64_t n, Instant now);
  void commit(std::string_view username, Metric what, uint64_t n, Instant now);
  Decision tryConsume(std::string_view username, Metric what, uint64_t n, Instant now);
  Decision checkMessage(std::string_view username, uint64_t sizeHint, Instant now);
  void commitMessage(std::string_view username, uint64_t bytes, Instant now);

  // All day/month windows, e.g. at shutdown.
  std::vector<WindowState> snapshot() const;
  // Windows changed since the last drain: a timer writes these every few seconds, so
  // persistence costs one small transaction per interval, not one write per message.
  std::vector<WindowState> drainChanged();
  // At start-up, after configure(): rows for unknown accounts/keys are ignored, and
  // windows that have since ended count as empty.
  void restore(const std::vector<WindowState>& rows);

 private:
  mutable std::mutex mu_;
  std::map<std::string, RateLimiter, std::less<>> limiters_;
};

}  // namespace subrelay::policy
