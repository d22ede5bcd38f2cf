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

TEST_CASE("domainPart: after the last '@', as written") {
  CHECK(util::domainPart("user@example.org") == "example.org");
  CHECK(util::domainPart("User@Example.ORG") == "Example.ORG");  // no case folding
  CHECK(util::domainPart("\"a@b\"@example.org") == "example.org");  // quoted local part with '@'
  CHECK(util::domainPart("user@[192.0.2.1]") == "[192.0.2.1]");
  CHECK(util::domainPart("j\xc3\xb6rg@b\xc3\xbc" "cher.example") == "b\xc3\xbc" "cher.example");
  CHECK(util::domainPart("@example.org") == "example.org");
  CHECK(util::domainPart("user@").empty());
  CHECK(util::domainPart("postmaster").empty());  // no '@'
  CHECK(util::domainPart("").empty());
}
