// Clock: the one seam through which protocol cores and policy read time, so tests
// can drive them with a fake clock.
#pragma once

#include <chrono>
#include <cstdint>

namespace subrelay::util {

class Clock {
 public:
  virtual ~Clock() = default;
  // Monotonic time for timeouts and rate limits.
  virtual std::chrono::steady_clock::time_point now() const = 0;
  // Wall-clock time for headers and records.
  virtual std::chrono::system_clock::time_point wallNow() const = 0;
};

class SystemClock final : public Clock {
 public:
  std::chrono::steady_clock::time_point now() const override { return std::chrono::steady_clock::now(); }
  std::chrono::system_clock::time_point wallNow() const override { return std::chrono::system_clock::now(); }
};

class FakeClock final : public Clock {
 public:
  std::chrono::steady_clock::time_point now() const override { return mono_; }
  std::chrono::system_clock::time_point wallNow() const override { return wall_; }
  void advance(std::chrono::nanoseconds d) {
    mono_ += d;
    wall_ += std::chrono::duration_cast<std::chrono::system_clock::duration>(d);
  }
  void setWall(std::chrono::system_clock::time_point t) { wall_ = t; }

 private:
  std::chrono::steady_clock::time_point mono_{std::chrono::hours(1000)};
  std::chrono::system_clock::time_point wall_{std::chrono::seconds(1'800'000'000)};
};

// Seconds since the Unix epoch, the unit the queue stores.
inline int64_t unixSeconds(std::chrono::system_clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::seconds>(t.time_since_epoch()).count();
}

}  // namespace subrelay::util
