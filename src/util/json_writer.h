// Minimal JSON output for the CLI (`queue list --json`): string escaping and a small
// object builder. Parsing JSON stays in config/ (nlohmann) as docs/architecture.md says.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace subrelay::util {

inline void jsonEscapeTo(std::string& out, std::string_view s) {
  static constexpr char kHex[] = "0123456789abcdef";
  out += '"';
  for (unsigned char c : s) {
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
          out += static_cast<char>(c);  // UTF-8 passes through
        }
    }
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
