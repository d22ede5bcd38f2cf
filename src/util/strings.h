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
// RFC 5322 3.2.3 atext, extended with every non-ASCII byte (RFC 6531 3.3 / RFC 6532
// UTF-8; callers validate UTF-8 sequences as a whole where it matters).
bool isAtext(unsigned char c);
// True when any octet is >= 0x80 (8BITMIME content, SMTPUTF8 addresses, U-labels).
bool hasNonAscii(std::string_view s);
// The domain of a mailbox address: what follows its last '@' (a quoted local part may hold
// an '@', a domain never does). Empty when there is no '@'. As written: not case-folded.
std::string_view domainPart(std::string_view address);
// Renders untrusted bytes for a log line: printable ASCII kept, the rest as \xNN, cut at max.
std::string sanitizeForLog(std::string_view s, size_t max = 200);

}  // namespace subrelay::util
