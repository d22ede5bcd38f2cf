// Shared by the fuzz targets: an always-on invariant check (libFuzzer reports the abort)
// and the "CRLF only" test for anything that goes on the wire.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string_view>

namespace subrelay::fuzz {

[[noreturn]] inline void fail(const char* target, const char* what) {
  std::fprintf(stderr, "%s invariant violated: %s\n", target, what);
  std::abort();
}

// Every CR is followed by LF and every LF preceded by CR.
inline bool onlyCrlf(std::string_view s) {
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\r' && (i + 1 >= s.size() || s[i + 1] != '\n')) return false;
    if (s[i] == '\n' && (i == 0 || s[i - 1] != '\r')) return false;
  }
  return true;
}

}  // namespace subrelay::fuzz

#define FUZZ_CHECK(cond)                                   \
  do {                                                     \
    if (!(cond)) ::subrelay::fuzz::fail(kFuzzTarget, #cond); \
  } while (0)
