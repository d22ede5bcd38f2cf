// Submission fix-ups (RFC 6409 section 8): the Received trace field (RFC 5321 section
// 4.4, with the transmission types of RFC 3848 and RFC 6531 section 3.7.4), Date
// (RFC 5322 3.6.1, RFC 6409 8.2) and Message-ID (RFC 5322 3.6.4, RFC 6409 8.3).
//
// Everything the client wrote is passed through byte for byte; we only insert. The one
// exception is structural: a header section that ends without a line break gets one, and
// a body that follows the header section without the empty line gets the empty line,
// because otherwise the fields we add would merge into the client's text.
#include "message/fixups.h"

#include <random>
#include <vector>

#include "message/headers.h"
#include "util/time_fmt.h"

namespace subrelay::message {

namespace {

// RFC 5322 2.1.1: lines SHOULD stay within 78 characters (excluding CRLF).
constexpr size_t kFoldAt = 78;

bool isLetDig(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'); }

// RFC 5321 4.1.2 Domain: sub-domain *("." sub-domain), sub-domain = Let-dig [Ldh-str].
bool isDomain(std::string_view s) {
  if (s.empty() || s.size() > 255) return false;
  size_t labelStart = 0;
  for (size_t i = 0; i <= s.size(); ++i) {
    if (i == s.size() || s[i] == '.') {
      const size_t len = i - labelStart;
      if (len == 0 || len > 63) return false;
      if (!isLetDig(s[labelStart]) || !isLetDig(s[i - 1])) return false;
      labelStart = i + 1;
    } else if (!isLetDig(s[i]) && s[i] != '-') {
      return false;
    }
  }
  return true;
}

// RFC 5321 4.1.3 address-literal, loosely: "[" then digits, hex, ".", ":" or the
// "IPv6:" tag, then "]". Enough to keep a client's EHLO from breaking the field.
bool isAddressLiteral(std::string_view s) {
  if (s.size() < 3 || s.front() != '[' || s.back() != ']') return false;
  for (char c : s.substr(1, s.size() - 2))
    if (!isLetDig(c) && c != '.' && c != ':') return false;
  return true;
}

// Text for inside a comment: ctext or quoted-pair (RFC 5322 3.2.2). Control characters
// can only come from a bug upstream, but must never reach a header as a line break.
std::string commentText(std::string_view s) {
  std::string out;
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) {
      out += '?';
    } else {
      if (c == '(' || c == ')' || c == '\\') out += '\\';
      out += c;
    }
  }
  return out;
}

// The client's address as an RFC 5321 address-literal: "[192.0.2.1]", "[IPv6:2001:db8::1]".
std::string addressLiteral(std::string_view addr) {
  if (!addr.empty() && addr.front() == '[') return isAddressLiteral(addr) ? std::string(addr) : "[unknown]";
  if (addr.empty()) return "[unknown]";
  std::string out = addr.find(':') != std::string_view::npos ? "[IPv6:" : "[";
  out += addr;
  out += ']';
  return isAddressLiteral(out) ? out : "[unknown]";
}

// A recipient path is printable ASCII (or UTF-8 with SMTPUTF8) without angle brackets;
// anything else is left out of the trace rather than escaped.
bool isPrintablePath(std::string_view s) {
  if (s.empty() || s.size() > 512) return false;
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x21 || u == 0x7f || c == '<' || c == '>') {
      // SP is legal only inside a quoted local part; keep it simple and refuse.
      return false;
    }
  }
  return true;
}

// Splits a template line into the places where folding is allowed: at spaces outside
// quoted strings and angle brackets (inside comments FWS is allowed, 3.2.2).
std::vector<std::string> foldUnits(const std::string& line) {
  std::vector<std::string> units;
  std::string cur;
  bool quoted = false;
  int angle = 0;
  for (size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (c == '\\' && i + 1 < line.size()) {
      cur += c;
      cur += line[++i];
      continue;
    }
    if (c == '"') quoted = !quoted;
    if (!quoted && c == '<') ++angle;
    if (!quoted && c == '>' && angle > 0) --angle;
    if (c == ' ' && !quoted && angle == 0) {
      if (!cur.empty()) units.push_back(std::move(cur));
      cur.clear();
      continue;
    }
    cur += c;
  }
  if (!cur.empty()) units.push_back(std::move(cur));
  return units;
}

// Emits a field as "Name: " + lines, each template line starting a continuation line
// (HTAB) and breaking further only when it would pass 78 characters.
std::string foldField(std::string_view name, const std::vector<std::vector<std::string>>& lines) {
  std::string out(name);
  out += ':';
  size_t col = out.size();
  bool first = true;
  for (const auto& units : lines) {
    bool lineStart = true;
    for (const auto& u : units) {
      if (first) {
        out += ' ';
        col += 1;
        first = false;
      } else if (lineStart || col + 1 + u.size() > kFoldAt) {
        out += "\r\n\t";
        col = 1;
      } else {
        out += ' ';
        col += 1;
      }
      out += u;
      col += u.size();
      lineStart = false;
    }
  }
  out += "\r\n";
  return out;
}

std::string randomToken() {
  // Not a secret: only has to make the Message-ID unique where the queue id alone might
  // not be (two relays, a restored database).
  thread_local std::mt19937_64 rng{(static_cast<uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}()};
  static constexpr char kAlphabet[] = "0123456789abcdefghijklmnopqrstuvwxyz";
  uint64_t v = rng();
  std::string out;
  for (int i = 0; i < 12; ++i, v /= 36) out += kAlphabet[v % 36];
  return out;
}

// id-right of a msg-id must be a dot-atom-text (3.6.4); the configured hostname is one
// unless the configuration is broken, in which case we still produce a valid field.
std::string idLeft(std::string_view queueId) {
  std::string out;
  for (char c : queueId)
    if (isLetDig(c)) out += c;
  return out.empty() ? "msg" : out;
}

std::string idRight(std::string_view host) { return isDomain(host) ? std::string(host) : "subrelay.invalid"; }

std::string buildReceived(const TraceInfo& info) {
  const bool tls = !info.tlsVersion.empty();
  // A client's EHLO argument is its own claim; one that is not a domain or an address
  // literal would break the field's syntax, so it is replaced (the queue keeps the original).
  std::string helo = info.heloName;
  if (!isDomain(helo) && !isAddressLiteral(helo)) helo = "unknown";
  std::string by = isDomain(info.hostname) ? info.hostname : "localhost";
  std::string qid = commentText(info.queueId);
  for (char& c : qid)
    if (c == ' ' || c == '(' || c == ')' || c == '\\') c = '_';

  std::vector<std::vector<std::string>> lines;
  lines.push_back(foldUnits("from " + helo + " (" + addressLiteral(info.clientAddress) + ")"));
  lines.push_back(foldUnits("by " + by + " (subrelay) with " + withProtocol(tls, info.smtputf8) + " id " + qid));
  if (tls) {
    std::string t = "(version=" + commentText(info.tlsVersion);
    if (!info.tlsCipher.empty()) t += " cipher=" + commentText(info.tlsCipher);
    lines.push_back(foldUnits(t + ")"));
  }
  lines.push_back(foldUnits("(authenticated account=" + commentText(info.account) + ")"));
  // The date is one unit: breaking inside it is legal but makes it hard to read.
  const std::string date = util::rfc5322Date(info.when);
  if (isPrintablePath(info.recipient)) {
    lines.push_back({"for", "<" + info.recipient + ">;", date});
  } else {
    lines.back().back() += ';';
    lines.back().push_back(date);
  }
  return foldField("Received", lines);
}

}  // namespace

std::string withProtocol(bool tls, bool smtputf8) {
  // RFC 3848: ESMTP + "S" for TLS + "A" for AUTH; RFC 6531 3.7.4: UTF8SMTP likewise.
  // subrelay never accepts mail without AUTH, so the "A" is always there.
  std::string p = smtputf8 ? "UTF8SMTP" : "ESMTP";
  if (tls) p += 'S';
  p += 'A';
  return p;
}

std::string applySubmissionFixups(std::string_view message, const TraceInfo& info) {
  return applySubmissionFixups(message, scanHeaders(message), info);
}

std::string applySubmissionFixups(std::string_view message, const HeaderBlock& block, const TraceInfo& info) {
  // Where the client's header fields end: the added fields go there (after the client's,
  // so any signature or ordering it relies on stays intact).
  const size_t headerEnd = block.fields.empty() ? 0 : block.fields.back().offset + block.fields.back().length;

  std::string added;
  if (!findField(block, "Date")) added += "Date: " + util::rfc5322Date(info.when) + "\r\n";
  if (!findField(block, "Message-ID"))
    added += "Message-ID: <" + idLeft(info.queueId) + "." + randomToken() + "@" + idRight(info.hostname) + ">\r\n";

  const std::string received = buildReceived(info);
  std::string out;
  out.reserve(received.size() + message.size() + added.size() + 4);
  out += received;
  out.append(message.substr(0, headerEnd));
  const bool lastEndsLine = headerEnd > 0 && message[headerEnd - 1] == '\n';
  const bool needSeparator = !block.hasBodySeparator && headerEnd < message.size();
  if (headerEnd > 0 && !lastEndsLine && (!added.empty() || needSeparator)) {
    // The last field ends without a line break: end it, completing a lone CR rather than
    // leaving a bare CR behind.
    out += message[headerEnd - 1] == '\r' ? "\n" : "\r\n";
  }
  out += added;
  // Text that is not a header field and follows without the empty line is the body
  // (2.1); give it the separator, or the rescanned message would differ.
  if (needSeparator) out += "\r\n";
  out.append(message.substr(headerEnd));
  return out;
}

}  // namespace subrelay::message
