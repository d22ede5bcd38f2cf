// submission/: the cleanup stage (RFC 6409 section 8) and the end-of-data decisions as pure functions.
#include <doctest/doctest.h>

#include <chrono>
#include <initializer_list>
#include <string>
#include <utility>

#include "message/headers.h"
#include "submission/cleanup.h"
#include "submission/content_scan.h"
#include "submission/decide.h"

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

// cleanup() with request() refuses `message` with 550 and this enhanced code (and text).
void checkRefused(const std::string& message, const std::string& enhanced, const std::string& text = "") {
  CAPTURE(message);
  auto r = cleanup(message, request());
  CHECK_FALSE(r.ok);
  CHECK(r.code == 550);
  CHECK(r.enhanced == enhanced);
  if (!text.empty()) CHECK(r.text == text);
}

}  // namespace

TEST_CASE("cleanup: From ownership, count and syntax") {
  auto ok = cleanup("From: Shop <orders@shop.test>\r\nSubject: x\r\n\r\nbody\r\n", request());
  CHECK(ok.ok);
  CHECK(ok.signingDomain == "shop.test");
  checkRefused("Subject: x\r\n\r\nbody\r\n", "5.6.0");
  checkRefused("From: orders@shop.test\r\nFrom: orders@shop.test\r\n\r\nb\r\n", "5.6.0");
  checkRefused("From: ceo@paypal.com\r\n\r\nb\r\n", "5.7.1",
               "From header address <ceo@paypal.com> not owned by this account");
}

TEST_CASE("cleanup: Sender must be owned too, Reply-To stays free") {
  checkRefused("From: orders@shop.test\r\nSender: ceo@paypal.com\r\n\r\nb\r\n", "5.7.1",
               "Sender header address <ceo@paypal.com> not owned by this account");
  CHECK(cleanup("From: orders@shop.test\r\nSender: Ops <ops@shop.test>\r\n\r\nb\r\n", request()).ok);
  CHECK(cleanup("From: orders@shop.test\r\nReply-To: visitor@gmail.com\r\n\r\nb\r\n", request()).ok);
  checkRefused("From: orders@shop.test\r\nSender: ops@shop.test\r\nSender: ops@shop.test\r\n\r\nb\r\n", "5.6.0");
  checkRefused("From: orders@shop.test\r\nSender: ops@shop.test, orders@shop.test\r\n\r\nb\r\n", "5.6.0");
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

// ---- submission/decide.h: the end-of-data decisions ----

namespace {

std::shared_ptr<const subrelay::dkim::PrivateKey> edKey() {
  static auto k = [] {
    auto r = subrelay::dkim::generateKey(subrelay::dkim::Algorithm::Ed25519Sha256);
    REQUIRE(r.ok());
    return *r;
  }();
  return k;
}

// A rate verdict that refuses.
subrelay::policy::Decision refusedBy(const char* rule, subrelay::policy::Metric what, std::chrono::seconds retry) {
  subrelay::policy::Decision d;
  d.allowed = false;
  d.ruleKey = rule;
  d.what = what;
  d.retryAfter = retry;
  return d;
}

// A store request with request()'s cleanup and a key ring of Ed25519 keys
// (domain, selector).
struct Signing {
  subrelay::dkim::KeyRing ring;
  StoreRequest req;
  explicit Signing(std::initializer_list<std::pair<const char*, const char*>> keys) {
    for (const auto& [domain, selector] : keys) ring.add({domain, selector, edKey()});
    req.cleanup = request();
    req.keys = &ring;
  }
  Signing(const Signing&) = delete;  // req points into ring
};

}  // namespace

TEST_CASE("admit: the rate verdict with the real size, as the reply to the end of data") {
  using subrelay::policy::Decision;
  using subrelay::policy::Metric;
  CHECK_FALSE(admit(Decision{}).has_value());

  auto r = admit(refusedBy("messages_per_hour", Metric::Messages, std::chrono::seconds(42)));
  REQUIRE(r.has_value());
  CHECK(r->code == 451);
  CHECK(r->enhanced == "4.7.1");
  CHECK(r->text == "Rate limit messages_per_hour exceeded; try again in 42 seconds");

  Decision bytes = refusedBy("bytes_per_day", Metric::Bytes, std::chrono::seconds(1));
  auto wait = admit(bytes);
  REQUIRE(wait.has_value());
  CHECK(wait->code == 451);
  CHECK(wait->text == "Rate limit bytes_per_day exceeded; try again in 1 second");
  // Larger than the rule allows at all: waiting cannot help.
  bytes.permanent = true;
  auto never = admit(bytes);
  REQUIRE(never.has_value());
  CHECK(never->code == 552);
  CHECK(never->enhanced == "5.3.4");
  CHECK(never->text == "Message size exceeds rate limit bytes_per_day");
}

TEST_CASE("decide: keys chosen by the A-label signing domain, none -> unsigned") {
  Signing sg{{"shop.test", "s1"}, {"xn--exmple-cua.com", "s2"}};
  const subrelay::dkim::KeyRing& ring = sg.ring;
  StoreRequest& req = sg.req;

  auto shop = decide("From: Shop <orders@shop.test>\r\nSubject: x\r\n\r\nbody\r\n", req);
  CHECK_FALSE(shop.refused());
  CHECK(shop.signingDomain == "shop.test");
  REQUIRE(shop.keys != nullptr);
  REQUIRE(shop.keys->size() == 1);
  CHECK((*shop.keys)[0].selector == "s1");
  CHECK(shop.keys == ring.forDomain("shop.test"));  // points into the ring, no copy
  CHECK(shop.content.find("body\r\n") != std::string::npos);
  CHECK(shop.content.find("Received: ") == 0);
  CHECK_FALSE(shop.smtputf8);

  // A U-label From domain signs with the key configured for its A-label.
  auto idn = decide("From: a@ex\xc3\xa4mple.com\r\n\r\nb\r\n", req);
  CHECK_FALSE(idn.refused());
  CHECK(idn.signingDomain == "xn--exmple-cua.com");
  REQUIRE(idn.keys != nullptr);
  CHECK((*idn.keys)[0].selector == "s2");
  CHECK(idn.smtputf8);
  auto alabel = decide("From: a@xn--exmple-cua.com\r\n\r\nb\r\n", req);
  REQUIRE(alabel.keys != nullptr);
  CHECK((*alabel.keys)[0].selector == "s2");
  CHECK_FALSE(alabel.smtputf8);

  // An owned address of a domain without keys (a subdomain needs its own): unsigned.
  req.cleanup.owns = [](std::string_view) { return true; };
  auto sub = decide("From: x@mail.shop.test\r\n\r\nb\r\n", req);
  CHECK_FALSE(sub.refused());
  CHECK(sub.keys == nullptr);
  CHECK(sub.signingDomain.empty());
  CHECK_FALSE(sub.content.empty());

  // No key ring (no signer): never signed.
  req.keys = nullptr;
  auto off = decide("From: Shop <orders@shop.test>\r\n\r\nbody\r\n", req);
  CHECK_FALSE(off.refused());
  CHECK(off.keys == nullptr);
}

TEST_CASE("decide: a cleanup refusal is the verdict, nothing to store or sign") {
  Signing sg{{"shop.test", "s1"}};
  auto v = decide("From: ceo@paypal.com\r\n\r\nb\r\n", sg.req);
  REQUIRE(v.refused());
  CHECK(v.refusal->code == 550);
  CHECK(v.refusal->enhanced == "5.7.1");
  CHECK(v.refusal->text == "From header address <ceo@paypal.com> not owned by this account");
  CHECK(v.content.empty());
  CHECK(v.keys == nullptr);
}

// ---------------------------------------------------------------------------------------
// ContentScan: the header limits and the DKIM body hash while the message streams in.

namespace {

subrelay::dkim::StreamingBodyHash::Digests digestsOf(std::string_view body) {
  subrelay::dkim::StreamingBodyHash h;
  h.updateBody(body);
  return h.finish();
}

// Feeds `m` in pieces of `step` octets (0: whole) and returns the scan's digests.
std::optional<subrelay::dkim::StreamingBodyHash::Digests> scanned(std::string_view m, size_t step) {
  ContentScan scan({0, 0}, true);
  if (step == 0) step = m.size() + 1;
  for (size_t i = 0; i < m.size(); i += step) CHECK_FALSE(scan.feed(m.substr(i, step)));
  return scan.finish();
}

}  // namespace

TEST_CASE("ContentScan: the body hash starts at HeaderScanner's boundary, however the message is split") {
  struct Case {
    const char* message;
    const char* body;
  };
  const Case cases[] = {
      {"Subject: x\r\n\r\nHello  world \r\n\r\n\r\n", "Hello  world \r\n\r\n\r\n"},
      {"Subject: x\r\nnot a field\r\nmore\r\n", "not a field\r\nmore\r\n"},  // no empty line
      {"Subject: x\r\nunfinished", "unfinished"},  // an open line at the end is body
      {"Subject: x\r\n", ""},
      {"", ""},
  };
  for (const auto& c : cases) {
    CAPTURE(c.message);
    const auto want = digestsOf(c.body);
    for (size_t step : {size_t(0), size_t(1), size_t(3), size_t(7)}) {
      CAPTURE(step);
      auto got = scanned(c.message, step);
      REQUIRE(got);
      CHECK(got->simple == want.simple);
      CHECK(got->relaxed == want.relaxed);
    }
  }
  // Nothing fed at all: the empty body's digests.
  ContentScan none({0, 0}, true);
  auto empty = none.finish();
  REQUIRE(empty);
  CHECK(empty->relaxed == digestsOf("").relaxed);
}

TEST_CASE("ContentScan: header limits refuse with 552 5.3.4; no hashing without keys") {
  struct Case {
    ContentScan::Limits limits;
    const char* fits;     // within the limit
    uint64_t fitsBytes;   // headerBytes() after it
    const char* breaks;   // passes it
    const char* text;
  };
  const Case cases[] = {
      {{0, 2}, "A: 1\r\nB: 2\r\n", 12, "C: 3\r\n\r\nbody\r\n", "Too many header fields (limit 2)"},
      {{20, 0}, "Subject: short\r\n", 16, "X-Long: 0123456789\r\n",
       "Message header section too large (limit 20 bytes)"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.text);
    ContentScan scan(c.limits, false);
    CHECK_FALSE(scan.feed(c.fits));
    CHECK(scan.headerBytes() == c.fitsBytes);
    auto r = scan.feed(c.breaks);
    REQUIRE(r);
    CHECK(r->code == 552);
    CHECK(r->enhanced == "5.3.4");
    CHECK(r->text == c.text);
  }
  ContentScan within({1000, 10}, false);
  CHECK_FALSE(within.feed("Subject: x\r\n\r\nbody\r\n"));
  CHECK(within.headerBytes() == 14);
  CHECK_FALSE(within.finish());
}

TEST_CASE("cleanup: REQUIRETLS and the TLS-Required header (RFC 8689 3, 4.1)") {
  const std::string plain = "From: orders@shop.test\r\n\r\nb\r\n";
  const std::string optional = "From: orders@shop.test\r\nTLS-Required: No\r\n\r\nb\r\n";
  auto none = cleanup(plain, request());
  CHECK_FALSE(none.tlsRequired);
  CHECK_FALSE(none.tlsOptional);
  auto opt = cleanup(optional, request());
  CHECK(opt.tlsOptional);
  CHECK(opt.content.find("TLS-Required: No\r\n") != std::string::npos);  // it travels on
  CHECK(cleanup("From: orders@shop.test\r\ntls-required:\r\n  no \r\n\r\nb\r\n", request()).tlsOptional);
  CleanupRequest req = request();
  req.requireTls = true;
  auto both = cleanup(optional, req);  // REQUIRETLS wins; the header is ignored
  CHECK(both.tlsRequired);
  CHECK_FALSE(both.tlsOptional);
  checkRefused("From: orders@shop.test\r\nTLS-Required: No\r\nTLS-Required: No\r\n\r\nb\r\n", "5.6.0",
               "Message has more than one TLS-Required header field (RFC 8689 3)");
  checkRefused("From: orders@shop.test\r\nTLS-Required: Yes\r\n\r\nb\r\n", "5.6.0",
               "The TLS-Required header field takes only the value \"No\" (RFC 8689 3)");
}

TEST_CASE("cleanup: the idempotency key is taken out of the message") {
  // Date and Message-ID present: the fix-ups add nothing random, so contents compare.
  const std::string head = "From: orders@shop.test\r\nDate: Mon, 1 Dec 2026 10:00:00 +0000\r\n";
  const std::string tail = "Message-ID: <1@shop.test>\r\nSubject: hi\r\n\r\nbody\r\nIdempotency-Key: in the body\r\n";
  const auto plain = cleanup(head + tail, request());
  REQUIRE(plain.ok);
  CHECK(plain.idempotencyKey.empty());

  SUBCASE("present: the key, and the stored bytes are the message without the field") {
    auto r = cleanup(head + "Idempotency-Key: ci-run-42/job-7\r\n" + tail, request());
    REQUIRE(r.ok);
    CHECK(r.idempotencyKey == "ci-run-42/job-7");
    CHECK(r.content == plain.content);
    CHECK(r.content.find("Idempotency-Key: in the body") != std::string::npos);  // the body is not touched
  }
  SUBCASE("first or last field, name in any case, folded value") {
    auto first = cleanup("idempotency-KEY:   abc  \r\n" + head + tail, request());
    REQUIRE(first.ok);
    CHECK(first.idempotencyKey == "abc");
    CHECK(first.content == plain.content);
    auto folded = cleanup(head + tail.substr(0, tail.find("\r\n\r\n") + 2) + "Idempotency-Key:\r\n\tabc\r\n def\r\n\r\nbody\r\n",
                          request());
    REQUIRE(folded.ok);
    CHECK(folded.idempotencyKey == "abc def");
    CHECK(folded.content.find("abc") == std::string::npos);
    CHECK(folded.content.find("\r\n\r\nbody\r\n") != std::string::npos);
  }
  SUBCASE("exactly 200 characters is allowed") {
    auto r = cleanup(head + "Idempotency-Key: " + std::string(200, 'k') + "\r\n" + tail, request());
    REQUIRE(r.ok);
    CHECK(r.idempotencyKey == std::string(200, 'k'));
  }
  SUBCASE("a malformed key or two fields are refused") {
    const std::string malformed = "The Idempotency-Key header field must hold 1 to 200 printable ASCII characters";
    checkRefused(head + "Idempotency-Key:\r\n" + tail, "5.6.0", malformed);
    checkRefused(head + "Idempotency-Key:  \r\n \r\n" + tail, "5.6.0", malformed);
    checkRefused(head + "Idempotency-Key: " + std::string(201, 'k') + "\r\n" + tail, "5.6.0", malformed);
    checkRefused(head + "Idempotency-Key: cl\xc3\xa9\r\n" + tail, "5.6.0", malformed);
    checkRefused(head + "Idempotency-Key: a\x01" "b\r\n" + tail, "5.6.0", malformed);
    checkRefused(head + "Idempotency-Key: a\r\nIDEMPOTENCY-KEY: a\r\n" + tail, "5.6.0",
                 "Message has more than one Idempotency-Key header field");
  }
  SUBCASE("a configured name replaces the default") {
    CleanupRequest req = request();
    req.idempotencyHeader = "X-Submission-Key";
    auto custom = cleanup(head + "x-submission-key: k1\r\n" + tail, req);
    REQUIRE(custom.ok);
    CHECK(custom.idempotencyKey == "k1");
    CHECK(custom.content == plain.content);
    // The default name is then an ordinary field: kept, not a key.
    auto other = cleanup(head + "Idempotency-Key: k2\r\n" + tail, req);
    REQUIRE(other.ok);
    CHECK(other.idempotencyKey.empty());
    CHECK(other.content.find("Idempotency-Key: k2\r\n") != std::string::npos);
    req.idempotencyHeader.clear();  // none looked for
    auto off = cleanup(head + "Idempotency-Key: k2\r\nIdempotency-Key: k3\r\n" + tail, req);
    REQUIRE(off.ok);
    CHECK(off.idempotencyKey.empty());
  }
  SUBCASE("decide() hands the key on") {
    StoreRequest sr;
    sr.cleanup = request();
    auto v = decide(head + "Idempotency-Key: abc\r\n" + tail, sr);
    REQUIRE_FALSE(v.refused());
    CHECK(v.idempotencyKey == "abc");
    CHECK(v.content == plain.content);
  }
}
