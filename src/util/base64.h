// Base64 (RFC 4648 section 4) for SASL (RFC 4954) and DKIM. Decoding is strict:
// padding required, no whitespace, no characters outside the alphabet.
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace subrelay::util {

std::string base64Encode(std::string_view in);
std::optional<std::string> base64Decode(std::string_view in);

}  // namespace subrelay::util
