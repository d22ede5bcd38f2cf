// Domain names in one comparable form: IDNA2008 A-labels in lower case (RFC 5890,
// RFC 5891), with the UTS #46 non-transitional mapping that browsers and mail clients
// apply first (so "EXÄMPLE.com", "exämple.com" and "xn--exmple-cua.com" are one name).
// An account that owns "@exämple.com" owns the domain whatever form a client writes:
// the UTF-8 form of an SMTPUTF8 client (RFC 6531) or the A-label form of any other.
//
// libidn2 does the Unicode work (Debian's maintained IDNA2008/TR46 library); this is
// the only module that includes it. Not here: address syntax (smtp/, config/).
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace subrelay::idna {

// True when the name needs IDNA processing: non-ASCII octets or an "xn--" label.
bool needsIdna(std::string_view domain);

// The A-label, lower-case form of a domain. Plain ASCII names are lower-cased only
// (no lookup needed). nullopt, with `why` filled when given, for a name IDNA2008
// refuses (bad Punycode, disallowed code points, bad hyphens, not UTF-8).
std::optional<std::string> toAscii(std::string_view domain, std::string* why = nullptr);

}  // namespace subrelay::idna
