// Durations in the config are strings with a unit: "30s", "5m", "1h", "5d".
#pragma once

#include <chrono>
#include <optional>
#include <string_view>

namespace subrelay::config {

std::optional<std::chrono::seconds> parseDuration(std::string_view s);

}  // namespace subrelay::config
