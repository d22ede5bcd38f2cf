// Small ASCII string helpers shared by the parsers.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace subrelay::util {

bool iequals(std::string_view a, std::string_view b);
bool istartsWith(std::string_view s, std::string_view prefix);
std::string toLower(std::string_view s);
std::string_view trim(std::string_view s);  // spaces and tabs
std::vector<std::string_view> split(std::string_view s, char sep);
std::string hexEncode(std::string_view bytes);
// Renders untrusted bytes for a log line: printable ASCII kept, the rest as \xNN, cut at max.
std::string sanitizeForLog(std::string_view s, size_t max = 200);

}  // namespace subrelay::util
