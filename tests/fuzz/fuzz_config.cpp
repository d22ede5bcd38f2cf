// Fuzz target for the config loader: any bytes into parseConfig() must give a LoadResult
// (a Config or errors), never an exception, a crash or a sanitizer report. The host:port,
// loopback and duration parsers get the same bytes.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "config/config.h"
#include "config/duration.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  subrelay::config::LoadResult r = subrelay::config::parseConfig(text, "fuzz.json");
  // Exactly one of: a config, or errors.
  if (r.config.has_value() == !r.errors.empty()) __builtin_trap();
  for (const std::string& line : r.formatErrors())
    if (line.empty()) __builtin_trap();

  if (size <= 256) {
    std::string host;
    uint16_t port = 0;
    if (subrelay::config::parseHostPort(text, host, port) && host.empty()) __builtin_trap();
    (void)subrelay::config::isLoopbackHost(text);
    auto s = subrelay::config::parseDuration(text);
    if (s && (s->count() <= 0 || *s > subrelay::config::kMaxDuration)) __builtin_trap();
    auto ms = subrelay::config::parseDurationMs(text);
    if (ms && ms->count() <= 0) __builtin_trap();
  }
  return 0;
}
