// submission/: the cleanup stage (RFC 6409 section 8) as a pure function.
#include <doctest/doctest.h>

#include <chrono>
#include <string>

#include "message/headers.h"
#include "submission/cleanup.h"

using namespace subrelay::submission;

namespace {

CleanupRequest request() {
  CleanupRequest r;
  r.mailFrom = "orders@shop.test";
  r.recipients = {"alice@example.org"};
  r.owns = [](std::string_view a) {
    return a == "orders@shop.test" || a == "ops@shop.test" || a == "a@xn--exmple-cua.com" ||
           a == "a@ex\xc3\xa4mple.com";
  };
  r.trace.hostname = "relay.example.net";
  r.trace.heloName = "app.example.com";
  r.trace.clientAddress = "[192.0.2.10]";
  r.trace.account = "webshop";
  r.trace.queueId = "0190a1b2c3d4e5f6";
  r.trace.when = std::chrono::system_clock::time_point(std::chrono::seconds(1'795'863'890));
  return r;
}

}  // namespace

TEST_CASE("cleanup: From ownership, count and syntax") {
  auto ok = cleanup("From: Shop <orders@shop.test>\r\nSubject: x\r\n\r\nbody\r\n", request());
  CHECK(ok.ok);
  CHECK(ok.signingDomain == "shop.test");
  auto none = cleanup("Subject: x\r\n\r\nbody\r\n", request());
  CHECK_FALSE(none.ok);
  CHECK(none.code == 550);
  CHECK(none.enhanced == "5.6.0");
  auto two = cleanup("From: orders@shop.test\r\nFrom: orders@shop.test\r\n\r\nb\r\n", request());
  CHECK(two.code == 550);
  CHECK(two.enhanced == "5.6.0");
  auto foreign = cleanup("From: ceo@paypal.com\r\n\r\nb\r\n", request());
  CHECK(foreign.code == 550);
  CHECK(foreign.enhanced == "5.7.1");
  CHECK(foreign.text == "From header address <ceo@paypal.com> not owned by this account");
}

TEST_CASE("cleanup: Sender must be owned too, Reply-To stays free") {
  auto spoof = cleanup("From: orders@shop.test\r\nSender: ceo@paypal.com\r\n\r\nb\r\n", request());
  CHECK_FALSE(spoof.ok);
  CHECK(spoof.code == 550);
  CHECK(spoof.enhanced == "5.7.1");
  CHECK(spoof.text == "Sender header address <ceo@paypal.com> not owned by this account");
  CHECK(cleanup("From: orders@shop.test\r\nSender: Ops <ops@shop.test>\r\n\r\nb\r\n", request()).ok);
  CHECK(cleanup("From: orders@shop.test\r\nReply-To: visitor@gmail.com\r\n\r\nb\r\n", request()).ok);
  auto two = cleanup("From: orders@shop.test\r\nSender: ops@shop.test\r\nSender: ops@shop.test\r\n\r\nb\r\n", request());
  CHECK(two.code == 550);
  CHECK(two.enhanced == "5.6.0");
  auto list = cleanup("From: orders@shop.test\r\nSender: ops@shop.test, orders@shop.test\r\n\r\nb\r\n", request());
  CHECK(list.code == 550);
  CHECK(list.enhanced == "5.6.0");
}

TEST_CASE("cleanup: SMTPUTF8 is decided from the envelope and header octets") {
  CHECK_FALSE(cleanup("From: orders@shop.test\r\n\r\nb\r\n", request()).smtputf8);
  // 8-bit body only: 8BITMIME's business, not SMTPUTF8's.
  CHECK_FALSE(cleanup("From: orders@shop.test\r\n\r\nGr\xc3\xbc\xc3\x9f""e\r\n", request()).smtputf8);
  CHECK(cleanup("From: orders@shop.test\r\nSubject: Gr\xc3\xbc\xc3\x9f""e\r\n\r\nb\r\n", request()).smtputf8);
  auto r = request();
  r.recipients.push_back("j\xc3\xb6rg@example.de");
  CHECK(cleanup("From: orders@shop.test\r\n\r\nb\r\n", r).smtputf8);
  auto s = request();
  s.mailFrom = "a@ex\xc3\xa4mple.com";
  CHECK(cleanup("From: orders@shop.test\r\n\r\nb\r\n", s).smtputf8);
}

TEST_CASE("cleanup: a body without the empty line gets one where the header ends") {
  auto r = cleanup("From: orders@shop.test\r\nSubject: x\r\nThis line is body text\r\n", request());
  REQUIRE(r.ok);
  const auto block = subrelay::message::scanHeaders(r.content);
  CHECK(block.hasBodySeparator);
  CHECK(r.content.substr(block.bodyOffset) == "This line is body text\r\n");
}

TEST_CASE("cleanup: the signing domain is the From domain as an A-label") {
  auto r = cleanup("From: a@ex\xc3\xa4mple.com\r\n\r\nb\r\n", request());
  REQUIRE(r.ok);
  CHECK(r.signingDomain == "xn--exmple-cua.com");
  CHECK(cleanup("From: orders@SHOP.test\r\n\r\nb\r\n",
                [] {
                  auto q = request();
                  q.owns = [](std::string_view) { return true; };
                  return q;
                }())
            .signingDomain == "shop.test");
}
