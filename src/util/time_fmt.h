// RFC 5322 section 3.3 date-time ("Sat, 28 Nov 2026 11:04:50 +0000") and ISO 8601 UTC.
#pragma once

#include <chrono>
#include <string>

namespace subrelay::util {

std::string rfc5322Date(std::chrono::system_clock::time_point t);
std::string isoUtc(std::chrono::system_clock::time_point t);
std::string isoUtc(long long unixSeconds);

}  // namespace subrelay::util
