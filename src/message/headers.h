// RFC 5322 header scanning: finds the header fields of a message (name, raw value with
// folding, position) and where the body starts. Tolerant of what real clients send;
// never reads past the input.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace subrelay::message {

struct HeaderField {
  std::string_view name;   // as written
  std::string_view value;  // raw, after the colon, folding CRLFs kept, without final CRLF
  size_t offset = 0;       // start of the field in the message
  size_t length = 0;       // including its final CRLF
};

struct HeaderBlock {
  std::vector<HeaderField> fields;
  size_t bodyOffset = 0;   // first byte after the empty line (or message size)
  bool hasBodySeparator = false;
};

HeaderBlock scanHeaders(std::string_view message);
// The header section alone, without the empty line that ends it (when there is one), as
// HeaderScanner bounds it: a message without an empty line has its body start at the
// first line that is not a header field. Reads no further than that line.
std::string_view headerSection(std::string_view message);
const HeaderField* findField(const HeaderBlock& block, std::string_view name);
size_t countFields(const HeaderBlock& block, std::string_view name);

// Unfolds and extracts the addr-specs of an address-list / mailbox-list value
// (RFC 5322 3.4): display names, comments, quoted strings, angle addresses and groups.
// Returns them as "local@domain" (quotes of the local part kept). Empty on garbage.
std::vector<std::string> parseAddressList(std::string_view value);

}  // namespace subrelay::message
