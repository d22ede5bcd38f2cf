// Duration strings for the config ("30s", "5m", "1h", "5d", and the "ms" extension).
#include "config/duration.h"

#include <cstdint>

namespace subrelay::config {

DurationProblem checkDuration(std::string_view s, bool allowMs, std::chrono::milliseconds& out) {
  constexpr uint64_t kMaxMs = static_cast<uint64_t>(kMaxDuration.count()) * 1000;
  out = std::chrono::milliseconds{0};
  size_t i = 0;
  uint64_t count = 0;
  bool tooLong = false;
  while (i < s.size() && s[i] >= '0' && s[i] <= '9') {
    // Stop accumulating once past the cap: keeps the arithmetic far from uint64 overflow
    // however many digits follow, while still checking the rest of the syntax.
    if (!tooLong) {
      count = count * 10 + static_cast<uint64_t>(s[i] - '0');
      if (count > kMaxMs) tooLong = true;
    }
    ++i;
  }
  if (i == 0) return DurationProblem::Syntax;
  std::string_view unit = s.substr(i);
  uint64_t unitMs = 0;
  if (unit == "ms") {
    if (!allowMs) return DurationProblem::Milliseconds;
    unitMs = 1;
  } else if (unit == "s") {
    unitMs = 1000;
  } else if (unit == "m") {
    unitMs = uint64_t{60} * 1000;
  } else if (unit == "h") {
    unitMs = uint64_t{3600} * 1000;
  } else if (unit == "d") {
    unitMs = uint64_t{24} * 3600 * 1000;
  } else {
    return DurationProblem::Syntax;
  }
  if (tooLong || count > kMaxMs / unitMs) return DurationProblem::TooLong;
  if (count == 0) return DurationProblem::Zero;
  out = std::chrono::milliseconds{static_cast<int64_t>(count * unitMs)};
  return DurationProblem::None;
}

std::optional<std::chrono::seconds> parseDuration(std::string_view s) {
  std::chrono::milliseconds ms{0};
  if (checkDuration(s, false, ms) != DurationProblem::None) return std::nullopt;
  // Without "ms" every accepted unit is a whole number of seconds.
  return std::chrono::duration_cast<std::chrono::seconds>(ms);
}

std::optional<std::chrono::milliseconds> parseDurationMs(std::string_view s) {
  std::chrono::milliseconds ms{0};
  if (checkDuration(s, true, ms) != DurationProblem::None) return std::nullopt;
  return ms;
}

}  // namespace subrelay::config
