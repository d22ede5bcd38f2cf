// SMTP command line parsing: RFC 5321 4.1.1 (commands), 4.1.2 (path and parameter
// grammar), 4.1.3 (address literals), 4.5.3.1 (size limits); RFC 6531 3.3 (UTF-8 in
// atext, qtextSMTP, sub-domain and esmtp-value).
#include "smtp/command.h"

#include <array>
#include <cstdint>

#include "util/strings.h"

namespace subrelay::smtp {
namespace {
using util::hasNonAscii;
using util::isAtext;

// RFC 5321 4.5.3.1.3: a path is at most 256 octets including "<" and ">".
constexpr size_t kMaxMailbox = 254;
constexpr size_t kMaxDomain = 255;
constexpr size_t kMaxLabel = 63;

bool isAlpha(unsigned char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
bool isDigit(unsigned char c) { return c >= '0' && c <= '9'; }
bool isAlnum(unsigned char c) { return isAlpha(c) || isDigit(c); }
bool isHex(unsigned char c) { return isDigit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }


// RFC 5321 4.1.2 qtextSMTP = %d32-33 / %d35-91 / %d93-126 (+ UTF-8 per RFC 6531).
bool isQtext(unsigned char c) { return (c >= 32 && c <= 126 && c != '"' && c != '\\') || c >= 0x80; }

bool isDotString(std::string_view s) {
  if (s.empty()) return false;
  bool atomStart = true;
  for (unsigned char c : s) {
    if (c == '.') {
      if (atomStart) return false;  // leading dot or ".."
      atomStart = true;
    } else if (isAtext(c)) {
      atomStart = false;
    } else {
      return false;
    }
  }
  return !atomStart;  // no trailing dot
}

// 1*3DIGIT with a value up to 255 (RFC 5321 4.1.3 Snum).
bool isSnum(std::string_view s) {
  if (s.empty() || s.size() > 3) return false;
  int v = 0;
  for (unsigned char c : s) {
    if (!isDigit(c)) return false;
    v = v * 10 + (c - '0');
  }
  return v <= 255;
}

bool isIpv4(std::string_view s) {
  auto parts = util::split(s, '.');
  if (parts.size() != 4) return false;
  for (auto p : parts)
    if (!isSnum(p)) return false;
  return true;
}

bool isHexGroups(std::string_view s, size_t& count) {
  count = 0;
  if (s.empty()) return true;
  for (auto g : util::split(s, ':')) {
    if (g.empty() || g.size() > 4) return false;
    for (unsigned char c : g)
      if (!isHex(c)) return false;
    ++count;
  }
  return true;
}

// RFC 5321 4.1.3 IPv6-addr: full, compressed ("::"), and either with a trailing IPv4.
bool isIpv6(std::string_view s) {
  size_t groupsAvailable = 8;
  // A trailing dotted quad counts as two groups.
  size_t lastColon = s.rfind(':');
  if (lastColon != std::string_view::npos && s.find('.', lastColon) != std::string_view::npos) {
    if (!isIpv4(s.substr(lastColon + 1))) return false;
    // Keep the colon when it is part of "::" so the compression is still seen below.
    s = (lastColon > 0 && s[lastColon - 1] == ':') ? s.substr(0, lastColon + 1) : s.substr(0, lastColon);
    groupsAvailable = 6;
  }
  size_t dc = s.find("::");
  if (dc == std::string_view::npos) {
    size_t n = 0;
    return isHexGroups(s, n) && n == groupsAvailable;
  }
  if (s.find("::", dc + 1) != std::string_view::npos) return false;
  size_t a = 0;
  size_t b = 0;
  if (!isHexGroups(s.substr(0, dc), a) || !isHexGroups(s.substr(dc + 2), b)) return false;
  return a + b < groupsAvailable;
}

bool isLdhStr(std::string_view s) {
  if (s.empty() || !isAlnum(static_cast<unsigned char>(s.back()))) return false;
  for (unsigned char c : s)
    if (!isAlnum(c) && c != '-') return false;
  return true;
}

struct MailboxParse {
  bool ok = false;
  bool noDomain = false;
  std::string normalized;
};

// Local-part "@" (Domain / address-literal); a well-formed bare local part
// ("<postmaster>") is reported as noDomain rather than as a syntax error.
MailboxParse parseMailbox(std::string_view s) {
  MailboxParse r;
  if (s.empty() || s.size() > kMaxMailbox || !isValidUtf8(s)) return r;
  std::string local;
  size_t i = 0;
  if (s[0] == '"') {
    // RFC 5321 4.1.2 Quoted-string = DQUOTE *QcontentSMTP DQUOTE.
    std::string content;
    i = 1;
    bool closed = false;
    while (i < s.size()) {
      unsigned char c = static_cast<unsigned char>(s[i]);
      if (c == '"') {
        closed = true;
        ++i;
        break;
      }
      if (c == '\\') {
        // quoted-pairSMTP = %d92 %d32-126
        if (i + 1 >= s.size()) return r;
        unsigned char n = static_cast<unsigned char>(s[i + 1]);
        if (n < 32 || n > 126) return r;
        content += static_cast<char>(n);
        i += 2;
        continue;
      }
      if (!isQtext(c)) return r;
      content += static_cast<char>(c);
      ++i;
    }
    if (!closed) return r;
    // "Systems MUST NOT define mailboxes in such a way as to require the use in SMTP of
    // non-atom characters" (RFC 5321 4.1.2): a quoted dot-string is the same mailbox as
    // the unquoted one, so it is stored (and checked against sender rules) unquoted.
    local = isDotString(content) ? content : std::string(s.substr(0, i));
  } else {
    size_t at = s.find('@');
    std::string_view dot = s.substr(0, at);
    if (!isDotString(dot)) return r;
    local = std::string(dot);
    i = dot.size();
  }
  if (i == s.size()) {
    r.noDomain = true;
    r.normalized = local;
    return r;
  }
  if (s[i] != '@') return r;
  std::string_view domain = s.substr(i + 1);
  bool domainOk = !domain.empty() && domain[0] == '[' ? isValidAddressLiteral(domain) : isValidDomain(domain, true);
  if (!domainOk) return r;
  r.ok = true;
  r.normalized = local + "@" + std::string(domain);
  return r;
}

// RFC 5321 4.1.2 A-d-l = At-domain *( "," At-domain ); the route is parsed and dropped
// (4.1.1.3: "servers MUST be prepared to encounter" it and SHOULD ignore it).
bool isSourceRoute(std::string_view route) {
  for (auto part : util::split(route, ',')) {
    if (part.size() < 2 || part[0] != '@') return false;
    if (!isValidDomain(part.substr(1), true)) return false;
  }
  return true;
}

struct VerbName {
  std::string_view name;
  Verb verb;
};
constexpr std::array<VerbName, 14> kVerbs{{
    {"HELO", Verb::Helo},
    {"EHLO", Verb::Ehlo},
    {"MAIL", Verb::Mail},
    {"RCPT", Verb::Rcpt},
    {"DATA", Verb::Data},
    {"BDAT", Verb::Bdat},
    {"RSET", Verb::Rset},
    {"NOOP", Verb::Noop},
    {"QUIT", Verb::Quit},
    {"HELP", Verb::Help},
    {"VRFY", Verb::Vrfy},
    {"EXPN", Verb::Expn},
    {"STARTTLS", Verb::StartTls},
    {"AUTH", Verb::Auth},
}};

// Postfix's smtpd_forbidden_commands idea: a browser or proxy talking to the SMTP port.
constexpr std::array<std::string_view, 9> kHttpMethods{
    {"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "DELETE", "TRACE", "PATCH"}};

}  // namespace

Command parseCommand(std::string_view line) {
  while (!line.empty() && (line.back() == ' ' || line.back() == '\t')) line.remove_suffix(1);
  Command cmd;
  size_t sp = line.find(' ');
  cmd.name = line.substr(0, sp);
  if (sp != std::string_view::npos) {
    std::string_view args = line.substr(sp + 1);
    while (!args.empty() && args.front() == ' ') args.remove_prefix(1);
    cmd.args = args;
  }
  for (const auto& v : kVerbs) {
    if (util::iequals(cmd.name, v.name)) {
      cmd.verb = v.verb;
      return cmd;
    }
  }
  for (auto m : kHttpMethods) {
    if (cmd.name == m) {
      cmd.verb = Verb::Http;
      return cmd;
    }
  }
  // "Host: ...", "User-Agent: ...": a header line, never an SMTP verb.
  if (cmd.name.size() > 1 && cmd.name.back() == ':' && sp != std::string_view::npos) {
    bool token = true;
    for (size_t i = 0; i + 1 < cmd.name.size(); ++i) {
      unsigned char c = static_cast<unsigned char>(cmd.name[i]);
      if (!isAlnum(c) && c != '-') token = false;
    }
    if (token) cmd.verb = Verb::Http;
  }
  return cmd;
}

bool parseEsmtpParams(std::string_view text, std::vector<EsmtpParam>& out, bool allowRepeats) {
  out.clear();
  for (auto tok : util::split(text, ' ')) {
    if (tok.empty()) continue;  // several spaces between parameters: tolerated
    size_t eq = tok.find('=');
    std::string_view key = tok.substr(0, eq);
    // esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
    if (key.empty() || !isAlnum(static_cast<unsigned char>(key[0]))) return false;
    for (unsigned char c : key)
      if (!isAlnum(c) && c != '-') return false;
    EsmtpParam p;
    p.keyword = std::string(key);
    for (auto& c : p.keyword) c = static_cast<char>(c >= 'a' && c <= 'z' ? c - 32 : c);
    if (eq != std::string_view::npos) {
      std::string_view value = tok.substr(eq + 1);
      // esmtp-value = 1*(%d33-60 / %d62-126), RFC 6531 3.3 adds UTF8-non-ascii.
      if (value.empty() || !isValidUtf8(value)) return false;
      for (unsigned char c : value)
        if (c < 33 || c == '=' || c == 127) return false;
      p.value = std::string(value);
      p.hasValue = true;
    }
    if (!allowRepeats)
      for (const auto& q : out)
        if (q.keyword == p.keyword) return false;  // a repeated parameter is ambiguous
    out.push_back(std::move(p));
  }
  return true;
}

PathArgument parsePathArgument(std::string_view args, std::string_view keyword) {
  PathArgument r;
  if (args.size() <= keyword.size() || !util::istartsWith(args, keyword) || args[keyword.size()] != ':') {
    r.status = PathStatus::BadKeyword;
    return r;
  }
  std::string_view rest = args.substr(keyword.size() + 1);
  while (!rest.empty() && rest.front() == ' ') rest.remove_prefix(1);
  if (rest.empty() || rest[0] != '<') {
    r.status = PathStatus::BadPath;
    return r;
  }
  // Find the closing '>' outside a quoted local part (a quoted "a>b" is legal).
  size_t end = std::string_view::npos;
  bool quoted = false;
  for (size_t i = 1; i < rest.size(); ++i) {
    char c = rest[i];
    if (quoted) {
      if (c == '\\') {
        ++i;
      } else if (c == '"') {
        quoted = false;
      }
    } else if (c == '"') {
      quoted = true;
    } else if (c == '>') {
      end = i;
      break;
    }
  }
  if (end == std::string_view::npos) {
    r.status = PathStatus::BadPath;
    return r;
  }
  std::string_view inner = rest.substr(1, end - 1);
  std::string_view after = rest.substr(end + 1);
  if (!after.empty() && after[0] != ' ') {
    r.status = PathStatus::BadPath;
    return r;
  }
  if (!parseEsmtpParams(after, r.params, true)) {
    r.status = PathStatus::BadParams;
    return r;
  }
  // A repeated parameter is ambiguous (RFC 3461 4.5 says so for RET, ENVID, NOTIFY and
  // ORCPT): refused with its name, so the client sees which one.
  for (size_t i = 0; i < r.params.size() && r.duplicate.empty(); ++i)
    for (size_t j = 0; j < i; ++j)
      if (r.params[j].keyword == r.params[i].keyword) {
        r.duplicate = r.params[i].keyword;
        break;
      }
  if (!r.duplicate.empty()) {
    r.status = PathStatus::DuplicateParam;
    return r;
  }
  if (inner.empty()) {
    r.nullPath = true;
    r.status = PathStatus::Ok;
    return r;
  }
  if (inner[0] == '@') {
    size_t colon = inner.find(':');
    if (colon == std::string_view::npos || !isSourceRoute(inner.substr(0, colon))) {
      r.status = PathStatus::BadPath;
      return r;
    }
    inner = inner.substr(colon + 1);
  }
  MailboxParse m = parseMailbox(inner);
  if (!m.ok) {
    r.status = m.noDomain ? PathStatus::NoDomain : PathStatus::BadPath;
    if (m.noDomain) r.address = std::move(m.normalized);
    return r;
  }
  r.address = std::move(m.normalized);
  r.nonAscii = hasNonAscii(r.address);
  r.status = PathStatus::Ok;
  return r;
}

bool isValidUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len = 0;
    uint32_t cp = 0;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
      cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;  // continuation byte, C0/C1 overlong lead, or above U+10FFFF
    }
    if (i + len > s.size()) return false;
    for (size_t k = 1; k < len; ++k) {
      auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
      return false;
    i += len;
  }
  return true;
}

bool isValidDomain(std::string_view domain, bool utf8) {
  if (domain.empty() || domain.size() > kMaxDomain) return false;
  if (utf8 ? !isValidUtf8(domain) : hasNonAscii(domain)) return false;
  for (auto label : util::split(domain, '.')) {
    // sub-domain = Let-dig [Ldh-str] (RFC 5321 4.1.2); RFC 6531 3.3 adds U-label, which
    // we check only for UTF-8 well-formedness and the LDH rules of its ASCII part.
    if (label.empty() || label.size() > kMaxLabel) return false;
    auto first = static_cast<unsigned char>(label.front());
    auto last = static_cast<unsigned char>(label.back());
    if (!(isAlnum(first) || first >= 0x80) || !(isAlnum(last) || last >= 0x80)) return false;
    for (unsigned char c : label)
      if (!isAlnum(c) && c != '-' && c < 0x80) return false;
  }
  return true;
}

bool isValidAddressLiteral(std::string_view literal) {
  if (literal.size() < 3 || literal.front() != '[' || literal.back() != ']') return false;
  std::string_view in = literal.substr(1, literal.size() - 2);
  if (isIpv4(in)) return true;
  if (util::istartsWith(in, "IPv6:")) return isIpv6(in.substr(5));
  // General-address-literal = Standardized-tag ":" 1*dcontent
  size_t colon = in.find(':');
  if (colon == std::string_view::npos || !isLdhStr(in.substr(0, colon))) return false;
  std::string_view content = in.substr(colon + 1);
  if (content.empty()) return false;
  for (unsigned char c : content)
    if (c < 33 || c > 126 || c == '[' || c == '\\' || c == ']') return false;
  return true;
}

bool isValidMailbox(std::string_view mailbox, bool utf8) {
  if (!utf8 && hasNonAscii(mailbox)) return false;
  return parseMailbox(mailbox).ok;
}

// --- DSN extension (RFC 3461) ----------------------------------------------------------

namespace {

bool isXchar(unsigned char c) { return c >= '!' && c <= '~' && c != '+' && c != '='; }

int upperHex(unsigned char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;  // RFC 3461 4: "two upper case hexadecimal digits"
}

// RFC 3461 4.2 / 4.4: the decoded value "MUST consist entirely of printable (graphic and
// white space) characters from the US-ASCII repertoire".
bool printableAscii(std::string_view s) {
  for (unsigned char c : s)
    if ((c < 0x20 && c != '\t') || c >= 0x7f) return false;
  return true;
}

}  // namespace

std::optional<std::string> decodeXtext(std::string_view xtext) {
  std::string out;
  for (size_t i = 0; i < xtext.size(); ++i) {
    const auto c = static_cast<unsigned char>(xtext[i]);
    if (c == '+') {
      if (i + 2 >= xtext.size()) return std::nullopt;
      const int hi = upperHex(static_cast<unsigned char>(xtext[i + 1]));
      const int lo = upperHex(static_cast<unsigned char>(xtext[i + 2]));
      if (hi < 0 || lo < 0) return std::nullopt;
      out += static_cast<char>(hi * 16 + lo);
      i += 2;
    } else if (isXchar(c)) {
      out += static_cast<char>(c);
    } else {
      return std::nullopt;
    }
  }
  return out;
}

std::string encodeXtext(std::string_view value) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : value) {
    if (isXchar(c)) {
      out += static_cast<char>(c);
    } else {
      out += '+';
      out += kHex[c >> 4];
      out += kHex[c & 0xf];
    }
  }
  return out;
}

std::optional<uint8_t> parseNotify(std::string_view value) {
  // RFC 3461 4.1: notify-esmtp-value = "NEVER" / 1#notify-list-element,
  // notify-list-element = "SUCCESS" / "FAILURE" / "DELAY".
  if (util::iequals(value, "NEVER")) return kNotifyNever;
  uint8_t bits = 0;
  for (std::string_view item : util::split(value, ',')) {
    uint8_t bit = 0;
    if (util::iequals(item, "SUCCESS"))
      bit = kNotifySuccess;
    else if (util::iequals(item, "FAILURE"))
      bit = kNotifyFailure;
    else if (util::iequals(item, "DELAY"))
      bit = kNotifyDelay;
    else
      return std::nullopt;  // empty, unknown, or NEVER in a list
    if (bits & bit) return std::nullopt;
    bits |= bit;
  }
  if (bits == 0) return std::nullopt;
  return bits;
}

std::string notifyValue(uint8_t bits) {
  if (bits & kNotifyNever) return "NEVER";
  std::string out;
  auto add = [&](uint8_t bit, const char* name) {
    if (!(bits & bit)) return;
    if (!out.empty()) out += ',';
    out += name;
  };
  add(kNotifySuccess, "SUCCESS");
  add(kNotifyFailure, "FAILURE");
  add(kNotifyDelay, "DELAY");
  return out;
}

std::optional<DsnRet> parseRet(std::string_view value) {
  if (util::iequals(value, "FULL")) return DsnRet::Full;
  if (util::iequals(value, "HDRS")) return DsnRet::Hdrs;
  return std::nullopt;
}

const char* retValue(DsnRet ret) {
  switch (ret) {
    case DsnRet::Full:
      return "FULL";
    case DsnRet::Hdrs:
      return "HDRS";
    case DsnRet::Unspecified:
      break;
  }
  return "";
}

bool validEnvid(std::string_view value) {
  if (value.empty() || value.size() > kMaxEnvid) return false;
  auto decoded = decodeXtext(value);
  return decoded && printableAscii(*decoded);
}

bool validOrcpt(std::string_view value) {
  if (value.size() > kMaxOrcpt) return false;
  const size_t semi = value.find(';');
  if (semi == std::string_view::npos || semi == 0) return false;
  // addr-type = atom (RFC 5322 atext; in practice "rfc822", "utf-8", "x400").
  for (unsigned char c : value.substr(0, semi))
    if (!(isAlnum(c) || std::string_view("!#$%&'*+-/=?^_`{|}~").find(static_cast<char>(c)) != std::string_view::npos))
      return false;
  const std::string_view x = value.substr(semi + 1);
  if (x.empty()) return false;
  auto decoded = decodeXtext(x);
  return decoded && printableAscii(*decoded);
}

std::string orcptField(std::string_view value) {
  if (!validOrcpt(value)) return {};
  const size_t semi = value.find(';');
  return std::string(value.substr(0, semi)) + "; " + *decodeXtext(value.substr(semi + 1));
}

}  // namespace subrelay::smtp
