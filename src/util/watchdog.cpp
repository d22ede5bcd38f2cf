#include "util/watchdog.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace subrelay::util {

namespace {

// A decimal number without sign, spaces or trailing junk; nullopt otherwise.
std::optional<uint64_t> parseDecimal(const char* s) {
  if (s == nullptr || *s == '\0') return std::nullopt;
  uint64_t v = 0;
  for (const char* p = s; *p != '\0'; ++p) {
    if (*p < '0' || *p > '9') return std::nullopt;
    uint64_t digit = static_cast<uint64_t>(*p - '0');
    if (v > (UINT64_MAX - digit) / 10) return std::nullopt;
    v = v * 10 + digit;
  }
  return v;
}

std::string formatAge(int64_t ms) {
  if (ms >= 10'000) return std::to_string(ms / 1000) + "s";
  // Below 10 s one decimal: "1.5s".
  return std::to_string(ms / 1000) + "." + std::to_string((ms % 1000) / 100) + "s";
}

}  // namespace

std::optional<std::chrono::microseconds> watchdogTimeout(const char* usec, const char* pid, long selfPid) {
  auto us = parseDecimal(usec);
  if (!us || *us == 0) return std::nullopt;
  if (pid != nullptr) {
    auto p = parseDecimal(pid);
    if (!p || *p != static_cast<uint64_t>(selfPid)) return std::nullopt;
  }
  // Anything beyond a year is as good as no watchdog and would overflow later arithmetic.
  constexpr uint64_t kYearUs = 366ull * 24 * 3600 * 1'000'000;
  return std::chrono::microseconds(static_cast<int64_t>(std::min(*us, kYearUs)));
}

std::chrono::milliseconds heartbeatPeriod(std::chrono::milliseconds maxAge) {
  return std::clamp(maxAge / 4, std::chrono::milliseconds(10), std::chrono::milliseconds(1000));
}

int64_t steadyMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

LoopWatch::Step LoopWatch::check(const std::vector<LoopBeat>& beats, int64_t nowMs) {
  Step s;
  const LoopBeat* oldest = nullptr;
  for (const auto& b : beats)
    if (oldest == nullptr || b.lastMs < oldest->lastMs) oldest = &b;
  const int64_t age = oldest ? std::max<int64_t>(0, nowMs - oldest->lastMs) : 0;
  s.ping = oldest == nullptr || age <= maxAgeMs_;
  if (!s.ping) {
    s.stuckLoop = oldest->name;
    s.stuckForMs = age;
    if (!stuck_)
      s.logError = "watchdog: " + s.stuckLoop + " loop has not run for " + formatAge(age) + "; not pinging systemd";
    stuck_ = true;
  } else if (stuck_) {
    s.logInfo = std::string("watchdog: every loop runs again; pinging systemd");
    stuck_ = false;
  }
  return s;
}

}  // namespace subrelay::util
