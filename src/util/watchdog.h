// The systemd watchdog (WatchdogSec=, sd_watchdog_enabled(3)) as decisions without I/O:
// whether the environment asks for pings and how often, and whether every event loop has
// run recently enough for `serve` to send the next WATCHDOG=1. server.cpp reads the
// environment, sends the datagrams and writes the log lines these functions return.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace subrelay::util {

// WATCHDOG_USEC and WATCHDOG_PID as given (nullptr: unset). The watchdog is on when USEC is
// a positive decimal number and PID is unset or equal to selfPid (systemd sets PID so that
// a child that inherits the environment does not ping for its parent).
std::optional<std::chrono::microseconds> watchdogTimeout(const char* usec, const char* pid, long selfPid);

// How often a loop stamps its heartbeat so that a healthy loop is never older than
// maxAge: every second, or a quarter of maxAge when that is shorter (at least 10 ms).
std::chrono::milliseconds heartbeatPeriod(std::chrono::milliseconds maxAge);

// Milliseconds of std::chrono::steady_clock, the time base of heartbeats.
int64_t steadyMs();

// One event loop's sign of life: stamped by a repeating timer on the loop's thread, read
// by the main thread.
class Heartbeat {
 public:
  explicit Heartbeat(int64_t nowMs = steadyMs()) : lastMs_(nowMs) {}
  void stamp(int64_t nowMs) { lastMs_.store(nowMs, std::memory_order_relaxed); }
  int64_t lastMs() const { return lastMs_.load(std::memory_order_relaxed); }

 private:
  std::atomic<int64_t> lastMs_;
};

struct LoopBeat {
  std::string name;  // "worker 1", "delivery"
  int64_t lastMs;
};

// Remembers whether the last check found a stuck loop, so that each change is logged once.
class LoopWatch {
 public:
  explicit LoopWatch(std::chrono::milliseconds maxAge) : maxAgeMs_(maxAge.count()) {}

  struct Step {
    bool ping = false;           // send WATCHDOG=1 now
    std::string stuckLoop;       // the loop that has gone longest without a beat (when !ping)
    int64_t stuckForMs = 0;
    std::optional<std::string> logError;  // first check that found a loop stuck
    std::optional<std::string> logInfo;   // first check after that with every loop fine again
  };
  // Ping when every loop beat within maxAge of nowMs (no loops: nothing is stuck).
  Step check(const std::vector<LoopBeat>& beats, int64_t nowMs);

 private:
  int64_t maxAgeMs_;
  bool stuck_ = false;
};

}  // namespace subrelay::util
