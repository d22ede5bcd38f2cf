// IDNA2008 normalisation through libidn2 (idna.h).
#include "idna/idna.h"

#include <idn2.h>

#include <cstdlib>

#include "util/strings.h"

namespace subrelay::idna {

bool needsIdna(std::string_view domain) {
  if (util::hasNonAscii(domain)) return true;
  // An A-label is a label that starts with the ACE prefix (RFC 5890 2.3.2.1).
  size_t pos = 0;
  while (pos <= domain.size()) {
    if (domain.size() - pos >= 4 && util::iequals(domain.substr(pos, 4), "xn--")) return true;
    size_t dot = domain.find('.', pos);
    if (dot == std::string_view::npos) break;
    pos = dot + 1;
  }
  return false;
}

std::optional<std::string> toAscii(std::string_view domain, std::string* why) {
  if (!needsIdna(domain)) return util::toLower(domain);
  if (domain.find('\0') != std::string_view::npos) {
    if (why) *why = "NUL in domain";
    return std::nullopt;
  }
  const std::string in(domain);
  char* out = nullptr;
  // NFC first (RFC 5891 5.2), then UTS #46 non-transitional mapping (lower case,
  // ß and ς kept), then IDNA2008 validity of every label, A-labels decoded and checked.
  int rc = idn2_lookup_u8(reinterpret_cast<const uint8_t*>(in.c_str()), reinterpret_cast<uint8_t**>(&out),
                          IDN2_NFC_INPUT | IDN2_NONTRANSITIONAL);
  if (rc != IDN2_OK) {
    if (why) *why = idn2_strerror(rc);
    return std::nullopt;
  }
  std::string result = util::toLower(out);
  idn2_free(out);
  return result;
}

}  // namespace subrelay::idna
