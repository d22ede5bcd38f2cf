// SMTP reply formatting: RFC 5321 4.2, RFC 2034, RFC 3463.
#include "smtp/reply.h"

namespace subrelay::smtp {
namespace {

void appendCode(std::string& out, int code) {
  // Codes outside 200..599 never come from this server; clamp rather than print junk.
  if (code < 200 || code > 599) code = 451;
  out += static_cast<char>('0' + code / 100);
  out += static_cast<char>('0' + code / 10 % 10);
  out += static_cast<char>('0' + code % 10);
}

void appendLine(std::string& out, int code, char sep, std::string_view enhanced, std::string_view text) {
  appendCode(out, code);
  out += sep;
  if (!enhanced.empty()) {
    out += sanitizeReplyText(enhanced);
    if (!text.empty()) out += ' ';
  }
  out += sanitizeReplyText(text);
  out += "\r\n";
}

bool isDigits(std::string_view s, size_t maxLen) {
  if (s.empty() || s.size() > maxLen) return false;
  for (char c : s)
    if (c < '0' || c > '9') return false;
  return true;
}

}  // namespace

std::string sanitizeReplyText(std::string_view text) {
  std::string out;
  size_t n = text.size() < kMaxReplyText ? text.size() : kMaxReplyText;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    unsigned char c = static_cast<unsigned char>(text[i]);
    out += (c >= 0x20 && c < 0x7f) ? static_cast<char>(c) : '?';
  }
  return out;
}

std::string formatReply(int code, std::string_view enhanced, std::string_view text) {
  std::string out;
  appendLine(out, code, ' ', enhanced, text);
  return out;
}

std::string formatMultilineReply(int code, std::string_view enhanced, const std::vector<std::string>& lines) {
  if (lines.empty()) return formatReply(code, enhanced, {});
  std::string out;
  for (size_t i = 0; i < lines.size(); ++i)
    appendLine(out, code, i + 1 == lines.size() ? ' ' : '-', enhanced, lines[i]);
  return out;
}

bool isValidEnhancedCode(std::string_view enhanced, int code) {
  if (enhanced.size() < 5) return false;
  char cls = enhanced[0];
  if (cls != '2' && cls != '4' && cls != '5') return false;
  if (enhanced[1] != '.') return false;
  std::string_view rest = enhanced.substr(2);
  size_t dot = rest.find('.');
  if (dot == std::string_view::npos) return false;
  if (!isDigits(rest.substr(0, dot), 3) || !isDigits(rest.substr(dot + 1), 3)) return false;
  if (code != 0) {
    if (code < 100 || code > 599) return false;
    if (cls != static_cast<char>('0' + code / 100)) return false;
  }
  return true;
}

std::optional<ReplyLine> parseReplyLine(std::string_view line) {
  if (line.size() < 3) return std::nullopt;
  if (line[0] < '2' || line[0] > '5' || line[1] < '0' || line[1] > '9' || line[2] < '0' || line[2] > '9')
    return std::nullopt;
  ReplyLine r;
  r.code = (line[0] - '0') * 100 + (line[1] - '0') * 10 + (line[2] - '0');
  if (line.size() == 3) return r;
  if (line[3] == '-') {
    r.last = false;
  } else if (line[3] != ' ') {
    return std::nullopt;
  }
  r.text = line.substr(4);
  return r;
}

}  // namespace subrelay::smtp
