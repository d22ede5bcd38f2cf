// Sender authorisation, RFC 6409 section 8.1. Rules:
// - "@domain" allows any local part at exactly that domain (not its subdomains: owning
//   example.com does not mean owning every host under it).
// - "local@domain" allows that address. Domains compare case-insensitively (RFC 5321
//   2.4). Local parts are case-sensitive in theory (RFC 5321 2.4) but no real mailbox
//   provider treats them so, and an account that owns "alerts@" must be able to write
//   "Alerts@": unquoted local parts compare with ASCII case folding; bytes >= 0x80
//   (SMTPUTF8) compare exactly, since case folding them needs Unicode tables and a
//   mismatch there only refuses mail, never lets it through. Quoted local parts
//   ("a b"@x) compare byte for byte, and are not unquoted, for the same reason.
// - The null sender, and any address whose shape is ambiguous (two '@' outside
//   quotes, an unterminated quote, CR, LF or NUL) never matches: a check that might
//   read the domain differently from the next hop must fail closed.
// - Domains compare in their IDNA2008 A-label form, so "@exämple.com" owns
//   a@xn--exmple-cua.com and a@EXÄMPLE.com alike (RFC 5891, UTS #46 mapping).
// Syntax validation of MAIL FROM itself lives in smtp/; this only decides ownership.
#include "policy/senders.h"

#include "idna/idna.h"
#include "util/strings.h"

namespace subrelay::policy {
namespace {

// Splits an address, honouring a quoted local part; false when ambiguous or malformed.
bool splitStrict(std::string_view address, std::string_view& local, std::string_view& domain, bool& quoted) {
  if (address.empty()) return false;
  for (char c : address) {
    if (c == '\r' || c == '\n' || c == '\0') return false;
  }
  size_t at;
  quoted = address.front() == '"';
  if (quoted) {
    // RFC 5321 4.1.2 Quoted-string: '"' *(qtextSMTP / "\" any) '"'.
    size_t i = 1;
    for (; i < address.size(); ++i) {
      if (address[i] == '\\') {
        ++i;
      } else if (address[i] == '"') {
        break;
      }
    }
    if (i >= address.size()) return false;  // unterminated
    at = i + 1;
    if (at >= address.size() || address[at] != '@') return false;
  } else {
    at = address.find('@');
    if (at == std::string_view::npos) return false;
  }
  local = address.substr(0, at);
  domain = address.substr(at + 1);
  if (local.empty() || domain.empty() || domain.find('@') != std::string_view::npos) {
    return false;
  }
  return true;
}

bool localPartsMatch(std::string_view want, bool wantQuoted, std::string_view got, bool gotQuoted) {
  if (wantQuoted || gotQuoted) return want == got;
  return util::iequals(want, got);  // folds ASCII only; other bytes compare exactly
}

}  // namespace

bool splitAddress(std::string_view address, std::string_view& local, std::string_view& domain) {
  std::string_view d = util::domainPart(address);
  if (d.empty()) return false;  // no '@', or nothing after it
  std::string_view l = address.substr(0, address.size() - d.size() - 1);
  if (l.empty()) return false;
  local = l;
  domain = d;
  return true;
}

bool senderAllowed(const std::vector<std::string>& senders, std::string_view address) {
  std::string_view local, domain;
  bool quoted = false;
  if (!splitStrict(address, local, domain, quoted)) return false;
  // Internationalised domains compare as A-labels (idna.h): the UTF-8 form an SMTPUTF8
  // client writes and the xn-- form are the same domain. A name IDNA2008 refuses owns
  // nothing. Plain ASCII names skip this (the common case costs nothing).
  std::string normalized;
  if (idna::needsIdna(domain)) {
    auto a = idna::toAscii(domain);
    if (!a) return false;
    normalized = std::move(*a);
    domain = normalized;
  }
  auto sameDomain = [&](std::string_view want) {
    if (!idna::needsIdna(want)) return util::iequals(want, domain);
    auto a = idna::toAscii(want);  // entries from config are A-labels already
    return a && *a == util::toLower(domain);
  };
  for (const std::string& entry : senders) {
    if (entry.size() > 1 && entry.front() == '@') {
      std::string_view want = std::string_view(entry).substr(1);
      if (want.find('@') == std::string_view::npos && sameDomain(want)) return true;
      continue;
    }
    std::string_view wantLocal, wantDomain;
    bool wantQuoted = false;
    if (!splitStrict(entry, wantLocal, wantDomain, wantQuoted)) continue;
    if (sameDomain(wantDomain) && localPartsMatch(wantLocal, wantQuoted, local, quoted)) {
      return true;
    }
  }
  return false;
}

}  // namespace subrelay::policy
