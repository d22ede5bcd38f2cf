// util/: the small string helpers shared by the parsers, the cleanup stage and delivery.
#include <doctest/doctest.h>

#include <string>

#include "util/strings.h"

using namespace subrelay;

TEST_CASE("hasNonAscii: any octet >= 0x80") {
  CHECK_FALSE(util::hasNonAscii(""));
  CHECK_FALSE(util::hasNonAscii("user@example.org"));
  CHECK_FALSE(util::hasNonAscii(std::string("\x00\x01\x7f", 3)));  // controls and DEL are ASCII
  CHECK(util::hasNonAscii("\x80"));
  CHECK(util::hasNonAscii("\xff"));
  CHECK(util::hasNonAscii("j\xc3\xb6rg@example.org"));  // UTF-8 local part
  CHECK(util::hasNonAscii("Subject: plain\r\n\r\nbody \xe2\x82\xac"));  // only at the end
  CHECK(util::hasNonAscii(std::string("\x00\xc3", 2)));  // after a NUL
}
