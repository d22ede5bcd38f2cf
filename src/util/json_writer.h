// Minimal JSON output for the CLI (`queue list --json`): string escaping and a small
// object builder. Parsing JSON stays in config/ (nlohmann) as docs/architecture.md says.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace subrelay::util {

// Length of the valid UTF-8 sequence starting at s[i] (RFC 3629 4), 0 when there is none.
inline size_t utf8SequenceLength(std::string_view s, size_t i) {
  const auto c = static_cast<unsigned char>(s[i]);
  const size_t n = c >= 0xF0 && c <= 0xF4 ? 4 : c >= 0xE0 && c < 0xF0 ? 3 : c >= 0xC2 && c < 0xE0 ? 2 : 0;
  if (n == 0 || i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k)
    if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return 0;
  const auto c1 = static_cast<unsigned char>(s[i + 1]);
  if ((c == 0xE0 && c1 < 0xA0) || (c == 0xF0 && c1 < 0x90)) return 0;  // overlong
  if (c == 0xED && c1 >= 0xA0) return 0;                                // surrogates
  if (c == 0xF4 && c1 >= 0x90) return 0;                                // above U+10FFFF
  return n;
}

// A JSON string for s: ", \ and control bytes escaped, UTF-8 kept, and any byte that
// is not part of valid UTF-8 replaced by U+FFFD, so the output is always valid JSON.
inline void jsonEscapeTo(std::string& out, std::string_view s) {
  static constexpr char kHex[] = "0123456789abcdef";
  out += '"';
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x80) {
      const size_t n = utf8SequenceLength(s, i);
      if (n == 0) {
        out += "\xEF\xBF\xBD";
        ++i;
      } else {
        out.append(s.substr(i, n));
        i += n;
      }
      continue;
    }
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20 || c == 0x7f) {
          out += "\\u00";
          out += kHex[c >> 4];
          out += kHex[c & 15];
        } else {
          out += static_cast<char>(c);
        }
    }
    ++i;
  }
  out += '"';
}

// Appends "key":value pairs with commas handled.
class JsonObject {
 public:
  JsonObject& str(std::string_view key, std::string_view v) { keyTo(key); jsonEscapeTo(out_, v); return *this; }
  JsonObject& num(std::string_view key, int64_t v) { keyTo(key); out_ += std::to_string(v); return *this; }
  JsonObject& boolean(std::string_view key, bool v) { keyTo(key); out_ += v ? "true" : "false"; return *this; }
  JsonObject& raw(std::string_view key, std::string_view json) { keyTo(key); out_ += json; return *this; }
  std::string finish() { return out_ + "}"; }

 private:
  void keyTo(std::string_view key) {
    out_ += first_ ? "" : ",";
    first_ = false;
    jsonEscapeTo(out_, key);
    out_ += ':';
  }
  std::string out_ = "{";
  bool first_ = true;
};

}  // namespace subrelay::util
