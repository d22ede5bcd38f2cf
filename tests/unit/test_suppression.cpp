// policy/suppression: address forms, reasons, the refusal text, which failures are hard
// bounces (RFC 3463), the reserved capture-mode address, and the bounded in-memory table
// on a FakeClock.
#include <doctest/doctest.h>

#include <chrono>
#include <string>
#include <vector>

#include "policy/suppression.h"
#include "util/clock.h"

using namespace subrelay::policy;
using namespace std::chrono_literals;
using subrelay::util::FakeClock;
using subrelay::util::unixSeconds;

namespace {

Suppression row(std::string account, std::string address, int64_t created, int64_t expires = 0) {
  Suppression s;
  s.account = std::move(account);
  s.address = *normalizeSuppressedAddress(address);
  s.reason = "550 5.1.1 user unknown";
  s.createdAt = created;
  s.expiresAt = expires;
  s.source = "bounce";
  return s;
}

}  // namespace

TEST_CASE("addresses: domain lower-cased (IDNA A-label), local part kept, brackets removed") {
  CHECK(normalizeSuppressedAddress("Bob@Example.COM").value() == "Bob@example.com");
  CHECK(normalizeSuppressedAddress(" <bob@example.com> ").value() == "bob@example.com");
  CHECK(normalizeSuppressedAddress("bob@EXÄMPLE.com").value() == "bob@xn--exmple-cua.com");
  CHECK(normalizeSuppressedAddress("bob@xn--exmple-cua.com").value() == "bob@xn--exmple-cua.com");
  CHECK(normalizeSuppressedAddress("\"a@b\"@example.com").value() == "\"a@b\"@example.com");
  CHECK(normalizeSuppressedAddress("bob@[IPv6:::1]").value() == "bob@[ipv6:::1]");
  CHECK_FALSE(normalizeSuppressedAddress("bob").has_value());
  CHECK_FALSE(normalizeSuppressedAddress("@example.com").has_value());
  CHECK_FALSE(normalizeSuppressedAddress("bob@").has_value());
  CHECK_FALSE(normalizeSuppressedAddress("bo b@example.com").has_value());
  CHECK_FALSE(normalizeSuppressedAddress("bob\r\n@example.com").has_value());
}

TEST_CASE("reasons: one line, no control characters, at most 300 bytes on a character boundary") {
  CHECK(cleanSuppressionReason("550 5.1.1 <bob@example.com>:\r\n  user\tunknown ") ==
        "550 5.1.1 <bob@example.com>: user unknown");
  CHECK(cleanSuppressionReason("") == "");
  CHECK(cleanSuppressionReason(std::string("a\0b", 3)) == "a b");
  const std::string long1(400, 'x');
  CHECK(cleanSuppressionReason(long1).size() == kMaxReasonBytes);
  // 299 ASCII bytes then a 2-byte character: the cut never splits it.
  std::string u(299, 'y');
  u += "\xc3\xa4\xc3\xa4";
  const std::string c = cleanSuppressionReason(u);
  CHECK(c.size() == 299);
  CHECK(c == std::string(299, 'y'));
}

TEST_CASE("the refusal names the address, the date in UTC and the reason") {
  CHECK(suppressionDate(1'800'000'000) == "2027-01-15 08:00:00 UTC");
  CHECK(suppressionRefusalText("bob@example.com", 1'800'000'000, "550 5.1.1 user unknown") ==
        "<bob@example.com>: recipient suppressed since 2027-01-15 08:00:00 UTC: 550 5.1.1 user unknown");
  CHECK(suppressionRefusalText("bob@example.com", 0, "").find("added by an operator") != std::string::npos);
  CHECK(std::string(kRefusalEnhanced) == "5.1.1");
  CHECK(kRefusalCode == 550);
}

TEST_CASE("hard bounces: RFC 3463 X.1.x address failures and 5.2.1, at RCPT or end of data") {
  for (const char* e : {"5.1.0", "5.1.1", "5.1.2", "5.1.3", "5.1.4", "5.1.6", "5.1.10", "5.2.1"}) {
    CAPTURE(e);
    CHECK(isHardBounce(550, e, "rcpt"));
    CHECK(isHardBounce(550, e, "data-end"));
  }
  // The sender's address, "destination valid", a full mailbox, an existing mailbox with a
  // problem, policy (spam, DMARC, TLS), system and protocol codes: not the recipient's fault.
  for (const char* e : {"5.1.5", "5.1.7", "5.1.8", "5.2.0", "5.2.2", "5.2.3", "5.7.1", "5.7.26", "5.3.4", "5.4.4",
                        "5.5.2", "5.0.0", "5.6.0"}) {
    CAPTURE(e);
    CHECK_FALSE(isHardBounce(550, e, "rcpt"));
  }
  // Temporary failures never are, whatever their enhanced code.
  CHECK_FALSE(isHardBounce(450, "4.1.1", "rcpt"));
  CHECK_FALSE(isHardBounce(452, "4.2.2", "rcpt"));
  CHECK_FALSE(isHardBounce(550, "4.1.1", "rcpt"));  // a code of the wrong class is not trusted
  // No server reply: DNS, connection, TLS, expiry, a local decision.
  CHECK_FALSE(isHardBounce(0, "5.1.10", "connect"));
  CHECK_FALSE(isHardBounce(0, "5.1.1", "rcpt"));
  // Stages that are not about the recipient.
  CHECK_FALSE(isHardBounce(550, "5.1.1", "mail"));
  CHECK_FALSE(isHardBounce(554, "5.1.1", "data"));
  CHECK_FALSE(isHardBounce(550, "5.1.1", "connect"));
  CHECK_FALSE(isHardBounce(550, "5.1.1", "starttls"));
  // Without an enhanced code: 550, 551, 553 at RCPT; a bare 550 after the data is too
  // often about the content.
  CHECK(isHardBounce(550, "", "rcpt"));
  CHECK(isHardBounce(551, "", "rcpt"));
  CHECK(isHardBounce(553, "", "rcpt"));
  CHECK_FALSE(isHardBounce(554, "", "rcpt"));
  CHECK_FALSE(isHardBounce(552, "", "rcpt"));
  CHECK_FALSE(isHardBounce(550, "", "data-end"));
  // Malformed enhanced codes are not trusted.
  CHECK_FALSE(isHardBounce(550, "5.1", "rcpt"));
  CHECK_FALSE(isHardBounce(550, "5.1.x", "rcpt"));
  CHECK_FALSE(isHardBounce(550, "5.1.1000", "rcpt"));
}

TEST_CASE("the reserved capture-mode address: subrelay-bounce and subrelay-bounce+TAG at any domain") {
  CHECK(isSimulatedBounceAddress("subrelay-bounce@example.com"));
  CHECK(isSimulatedBounceAddress("<Subrelay-Bounce+ci-42@test.invalid>"));
  CHECK(isSimulatedBounceAddress("subrelay-bounce+@x.y"));
  CHECK_FALSE(isSimulatedBounceAddress("subrelay-bounces@example.com"));
  CHECK_FALSE(isSimulatedBounceAddress("xsubrelay-bounce@example.com"));
  CHECK_FALSE(isSimulatedBounceAddress("bob@subrelay-bounce"));
  CHECK_FALSE(isSimulatedBounceAddress("subrelay-bounce"));
  CHECK(isHardBounce(550, "5.1.1", "rcpt"));  // what the simulated reply amounts to
  CHECK(std::string(kSimulatedBounceReply).rfind("550 5.1.1 ", 0) == 0);
}

TEST_CASE("the table: per account, any address form, expiry on the clock") {
  FakeClock clock;
  auto now = [&] { return unixSeconds(clock.wallNow()); };
  SuppressionTable t;
  const int64_t t0 = now();
  t.replace({row("shop", "bob@example.com", t0), row("shop", "ann@example.com", t0, t0 + 60),
             row("blog", "old@example.com", t0 - 100, t0 - 1)},
            now());
  CHECK(t.size() == 2);  // the expired row is not loaded
  auto hit = t.find("shop", "<bob@EXAMPLE.com>", now());
  REQUIRE(hit.has_value());
  CHECK(hit->reason == "550 5.1.1 user unknown");
  CHECK(hit->createdAt == t0);
  CHECK_FALSE(t.find("blog", "bob@example.com", now()).has_value());   // another account
  CHECK_FALSE(t.find("shop", "BOB@example.com", now()).has_value());   // local part kept
  CHECK_FALSE(t.find("shop", "not an address", now()).has_value());
  CHECK(t.find("shop", "ann@example.com", now()).has_value());
  CHECK(t.countsByAccount(now()) == std::map<std::string, uint64_t>{{"shop", 2}});

  clock.advance(60s);  // ann's entry expires exactly at t0 + 60
  CHECK_FALSE(t.find("shop", "ann@example.com", now()).has_value());
  CHECK(t.find("shop", "bob@example.com", now()).has_value());
  CHECK(t.countsByAccount(now()) == std::map<std::string, uint64_t>{{"shop", 1}});

  // A reload replaces everything: a removed row is gone.
  t.replace({row("shop", "ann@example.com", now())}, now());
  CHECK_FALSE(t.find("shop", "bob@example.com", now()).has_value());
  CHECK(t.find("shop", "ann@example.com", now()).has_value());
  CHECK(suppressionExpiry(100, 0) == 0);
  CHECK(suppressionExpiry(100, 30) == 130);
}

TEST_CASE("the table is bounded: a load keeps the newest rows, put refuses a new key when full") {
  SuppressionTable t(3);
  std::vector<Suppression> rows;
  for (int i = 0; i < 5; ++i) rows.push_back(row("a", "u" + std::to_string(i) + "@example.com", 1000 + i));
  CHECK(t.replace(rows, 900) == 3);
  CHECK_FALSE(t.find("a", "u0@example.com", 900).has_value());
  CHECK_FALSE(t.find("a", "u1@example.com", 900).has_value());
  CHECK(t.find("a", "u4@example.com", 900).has_value());
  CHECK_FALSE(t.put(row("a", "new@example.com", 2000)));
  CHECK(t.put(row("a", "u4@example.com", 2000)));  // replacing an entry is always fine
  CHECK(t.find("a", "u4@example.com", 2100)->createdAt == 2000);
  CHECK(SuppressionTable::kDefaultMaxEntries == 1'000'000);
}

TEST_CASE("a bounce's entry: normal address, clean reason, expiry from the ttl") {
  auto e = bounceEntry("shop", "<Bob@EXAMPLE.com>", "550 5.1.1 no\r\n such user", 1000, 60);
  REQUIRE(e.has_value());
  CHECK(e->account == "shop");
  CHECK(e->address == "Bob@example.com");
  CHECK(e->reason == "550 5.1.1 no such user");
  CHECK(e->createdAt == 1000);
  CHECK(e->expiresAt == 1060);
  CHECK(e->source == "bounce");
  CHECK(bounceEntry("shop", "bob@example.com", "x", 1000, 0)->expiresAt == 0);
  CHECK_FALSE(bounceEntry("shop", "no-domain", "x", 1000, 0).has_value());
}
