// Durations in the config are strings with a unit: "30s", "5m", "1h", "5d" (README.md).
//
// Extension: "ms" (milliseconds) is accepted where a setting has sub-second granularity
// (limits.auth_failure_delay); second-granular settings refuse it rather than rounding.
// Syntax: decimal digits immediately followed by one unit, no sign, no spaces, no
// fractions, no compound forms ("1h30m"). Values are capped at kMaxDuration so that a
// later conversion to std::chrono::nanoseconds (int64, ~292 years) cannot overflow.
#pragma once

#include <chrono>
#include <optional>
#include <string_view>

namespace subrelay::config {

inline constexpr std::chrono::seconds kMaxDuration{100LL * 365 * 24 * 3600};  // 100 years

// Positive duration with unit s, m, h or d; nullopt on anything else.
std::optional<std::chrono::seconds> parseDuration(std::string_view s);
// Positive duration with unit ms, s, m, h or d; nullopt on anything else.
std::optional<std::chrono::milliseconds> parseDurationMs(std::string_view s);

// Why a duration string was refused; the loader turns this into its error message.
enum class DurationProblem { None, Syntax, Zero, TooLong, Milliseconds };
// The common core of the two functions above. allowMs: accept the "ms" unit (otherwise
// "250ms" gives Milliseconds). Zero is reported as Zero (with out set to 0) so callers that
// accept zero can.
DurationProblem checkDuration(std::string_view s, bool allowMs, std::chrono::milliseconds& out);

}  // namespace subrelay::config
