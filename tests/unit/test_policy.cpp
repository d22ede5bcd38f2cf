// policy/: scrypt password hashes (RFC 7914), sender authorisation (RFC 6409 8.1) and
// the Authenticator (dummy hash for unknown users, HMAC cache, thread safety).
// Most hashes use ln=10 so the suite stays fast; one round trip uses the default ln=15.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "policy/authenticator.h"
#include "policy/password.h"
#include "policy/senders.h"

using namespace subrelay::policy;

namespace {
const ScryptParams kFast{10, 8, 1};

std::string fastHash(std::string_view pw) {
  auto r = hashPassword(pw, kFast);
  REQUIRE(r.ok());
  return *r;
}

template <typename F>
double averageMs(int runs, F&& f) {
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < runs; ++i) f();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / runs;
}
}  // namespace

TEST_CASE("hash and verify round trip") {
  std::string h = fastHash("correct horse");
  CHECK(h.rfind("$scrypt$ln=10,r=8,p=1$", 0) == 0);
  CHECK(checkHashFormat(h).empty());
  CHECK(verifyPassword("correct horse", h));
  CHECK_FALSE(verifyPassword("correct horse ", h));
  CHECK_FALSE(verifyPassword("Correct horse", h));
  CHECK_FALSE(verifyPassword("", h));

  std::string empty = fastHash("");
  CHECK(verifyPassword("", empty));
  CHECK_FALSE(verifyPassword("x", empty));

  std::string binary("a\0b\xff", 4);
  std::string hb = fastHash(binary);
  CHECK(verifyPassword(binary, hb));
  CHECK_FALSE(verifyPassword("a", hb));

  auto params = hashParams(h);
  REQUIRE(params.ok());
  CHECK(params->logN == 10);
  CHECK(params->r == 8);
  CHECK(params->p == 1);
}

TEST_CASE("default parameters (ln=15) round trip and cost") {
  auto r = hashPassword("s3cret");
  REQUIRE(r.ok());
  CHECK(r->rfind("$scrypt$ln=15,r=8,p=1$", 0) == 0);
  bool ok = false;
  double ms = averageMs(3, [&] { ok = verifyPassword("s3cret", *r); });
  CHECK(ok);
  CHECK_FALSE(verifyPassword("s3cret!", *r));
  MESSAGE("scrypt verify at ln=15,r=8,p=1: " << ms << " ms");
}

TEST_CASE("every hash has its own salt") {
  std::set<std::string> seen;
  for (int i = 0; i < 5; ++i) seen.insert(fastHash("same password"));
  CHECK(seen.size() == 5);
  for (const auto& h : seen) CHECK(verifyPassword("same password", h));
}

TEST_CASE("hashPassword refuses out-of-range parameters") {
  CHECK_FALSE(hashPassword("x", {9, 8, 1}).ok());
  CHECK_FALSE(hashPassword("x", {21, 8, 1}).ok());
  CHECK_FALSE(hashPassword("x", {10, 0, 1}).ok());
  CHECK_FALSE(hashPassword("x", {10, 33, 1}).ok());
  CHECK_FALSE(hashPassword("x", {10, 8, 0}).ok());
  CHECK_FALSE(hashPassword("x", {10, 8, 17}).ok());
  CHECK_FALSE(hashPassword("x", {20, 32, 1}).ok());  // 4 GiB
  CHECK(hashPassword("x", {10, 1, 16}).ok());
}

TEST_CASE("malformed hashes never verify and never crash") {
  std::string good = fastHash("pw");
  // Pieces of the good hash to build near-misses from.
  size_t d3 = good.find('$', 8);
  size_t d4 = good.find('$', d3 + 1);
  std::string params = good.substr(8, d3 - 8);
  std::string salt = good.substr(d3 + 1, d4 - d3 - 1);
  std::string key = good.substr(d4 + 1);
  REQUIRE(params == "ln=10,r=8,p=1");

  const std::vector<std::string> bad = {
      "",
      "$",
      "$$$$",
      "pw",
      "$scrypt$",
      "$scrypt$ln=10,r=8,p=1",
      "$scrypt$ln=10,r=8,p=1$" + salt,
      "$scrypt$ln=10,r=8,p=1$" + salt + "$",
      "$scrypt$ln=10,r=8,p=1$$" + key,
      "$scrypt$ln=10,r=8,p=1$" + salt + "$" + key + "$",
      "$scrypt$ln=10,r=8,p=1$" + salt + "$" + key + "$extra",
      "$scrypt$$" + salt + "$" + key,
      "$scrypt$ln=10,r=8$" + salt + "$" + key,
      "$scrypt$ln=10,r=8,p=1,x=2$" + salt + "$" + key,
      "$scrypt$r=8,ln=10,p=1$" + salt + "$" + key,
      "$scrypt$ln=010,r=8,p=1$" + salt + "$" + key,
      "$scrypt$ln=+10,r=8,p=1$" + salt + "$" + key,
      "$scrypt$ln=-10,r=8,p=1$" + salt + "$" + key,
      "$scrypt$ln=10 ,r=8,p=1$" + salt + "$" + key,
      "$scrypt$ln=,r=8,p=1$" + salt + "$" + key,
      "$scrypt$ln=9,r=8,p=1$" + salt + "$" + key,
      "$scrypt$ln=21,r=8,p=1$" + salt + "$" + key,
      "$scrypt$ln=99999999999999999999,r=8,p=1$" + salt + "$" + key,
      "$scrypt$ln=10,r=0,p=1$" + salt + "$" + key,
      "$scrypt$ln=10,r=33,p=1$" + salt + "$" + key,
      "$scrypt$ln=10,r=8,p=0$" + salt + "$" + key,
      "$scrypt$ln=10,r=8,p=17$" + salt + "$" + key,
      "$scrypt$ln=20,r=32,p=1$" + salt + "$" + key,
      "$scrypt$ln=10,r=8,p=1$" + salt.substr(0, salt.size() - 2) + "$" + key,  // no padding
      "$scrypt$ln=10,r=8,p=1$" + salt + "$" + key.substr(0, key.size() - 1),
      "$scrypt$ln=10,r=8,p=1$" + salt + "==$" + key,
      "$scrypt$ln=10,r=8,p=1$" + salt + "$" + key + "AAAA",  // data after the padding
      "$scrypt$ln=10,r=8,p=1$AAAA$" + key,                   // 3-byte salt
      "$scrypt$ln=10,r=8,p=1$" + salt + "$" + std::string(key.size(), '!'),
      "$scrypt$ln=10,r=8,p=1$" + salt + "$" + key + "\n",
      " $scrypt$ln=10,r=8,p=1$" + salt + "$" + key,
      "$SCRYPT$ln=10,r=8,p=1$" + salt + "$" + key,
      "$argon2id$v=19$m=65536,t=3,p=4$" + salt + "$" + key,
      "$2b$12$abcdefghijklmnopqrstuuABCDEFGHIJKLMNOPQRSTUVWXYZ01234",
      std::string("$scrypt$ln=10,r=8,p=1$\0", 23) + salt + "$" + key,
      std::string(100000, '$'),
  };
  for (const auto& h : bad) {
    CAPTURE(h.substr(0, 80));
    CHECK_FALSE(verifyPassword("pw", h));
    std::string why = checkHashFormat(h);
    CHECK(why.rfind("password_hash: expected the output of `subrelay hash-password`", 0) == 0);
    CHECK_FALSE(hashParams(h).ok());
  }
  // The pieces themselves were fine.
  CHECK(verifyPassword("pw", "$scrypt$" + params + "$" + salt + "$" + key));
}

TEST_CASE("constantTimeEquals") {
  CHECK(constantTimeEquals("", ""));
  CHECK(constantTimeEquals("abc", "abc"));
  CHECK_FALSE(constantTimeEquals("abc", "abd"));
  CHECK_FALSE(constantTimeEquals("abc", "ab"));
  CHECK_FALSE(constantTimeEquals("", "a"));
  CHECK(constantTimeEquals(std::string("a\0b", 3), std::string("a\0b", 3)));
  CHECK_FALSE(constantTimeEquals(std::string("a\0b", 3), std::string("a\0c", 3)));
}

TEST_CASE("unmatchableHash is well formed and matches nothing") {
  std::string d = unmatchableHash(kFast);
  CHECK(checkHashFormat(d).empty());
  CHECK_FALSE(verifyPassword("", d));
  CHECK_FALSE(verifyPassword("pw", d));
  CHECK(unmatchableHash(kFast) != d);
  // Out-of-range parameters fall back to the defaults rather than to something cheap.
  CHECK(unmatchableHash({1, 1, 1}).rfind("$scrypt$ln=15,r=8,p=1$", 0) == 0);
}

TEST_CASE("splitAddress") {
  std::string_view l, d;
  CHECK(splitAddress("a@b", l, d));
  CHECK(l == "a");
  CHECK(d == "b");
  CHECK(splitAddress("\"x@y\"@b.example", l, d));
  CHECK(l == "\"x@y\"");
  CHECK(d == "b.example");
  CHECK_FALSE(splitAddress("ab", l, d));
  CHECK_FALSE(splitAddress("@b", l, d));
  CHECK_FALSE(splitAddress("a@", l, d));
  CHECK_FALSE(splitAddress("", l, d));
}

TEST_CASE("sender rules") {
  const std::vector<std::string> rules = {"@shop.example.com", "alerts@example.org", "\"Quoted Name\"@example.net",
                                          "@Mixed.Example"};
  struct Row {
    const char* address;
    bool allowed;
  };
  const Row table[] = {
      // "@domain": any local part, exactly that domain, any case.
      {"orders@shop.example.com", true},
      {"ORDERS@SHOP.EXAMPLE.COM", true},
      {"x.y+tag@shop.example.com", true},
      {"orders@mixed.example", true},
      {"orders@sub.shop.example.com", false},
      {"orders@example.com", false},
      {"orders@shop.example.com.evil", false},
      {"orders@evilshop.example.com", false},
      {"orders@shop.example.com.", false},
      // Full addresses: domain and (ASCII) local part case-insensitive.
      {"alerts@example.org", true},
      {"Alerts@Example.ORG", true},
      {"alerts+x@example.org", false},
      {"alert@example.org", false},
      {"other@example.org", false},
      {"alerts@sub.example.org", false},
      // Quoted local parts compare exactly.
      {"\"Quoted Name\"@example.net", true},
      {"\"Quoted Name\"@EXAMPLE.NET", true},
      {"\"quoted name\"@example.net", false},
      {"QuotedName@example.net", false},
      {"\"alerts\"@example.org", false},  // not unquoted: refused, never widened
      // Null sender and ambiguous shapes never match.
      {"", false},
      {"@shop.example.com", false},
      {"orders", false},
      {"orders@", false},
      {"a@b@shop.example.com", false},
      {"orders@shop.example.com@evil.example", false},
      {"orders@evil.example@shop.example.com", false},
      {"\"a@b\"@shop.example.com", true},  // the '@' is inside quotes: unambiguous
      {"\"unterminated@shop.example.com", false},
      {"\"a\"b@shop.example.com", false},
      {"orders@shop.example.com\r\n", false},
      {"orders\n@shop.example.com", false},
  };
  for (const Row& row : table) {
    CAPTURE(row.address);
    CHECK(senderAllowed(rules, row.address) == row.allowed);
  }
  CHECK(senderAllowed(rules, std::string("orders@shop.example.com", 23)));
  CHECK_FALSE(senderAllowed(rules, std::string("orders\0@shop.example.com", 24)));
  CHECK_FALSE(senderAllowed(rules, std::string("orders@shop.example.com\0", 24)));

  // Non-ASCII local parts (SMTPUTF8): ASCII letters fold, other bytes compare exactly.
  const std::vector<std::string> utf8 = {"J\xc3\xb6rg@example.de"};
  CHECK(senderAllowed(utf8, "j\xc3\xb6rg@EXAMPLE.de"));
  CHECK_FALSE(senderAllowed(utf8, "J\xc3\x96rg@example.de"));

  // IDN domains (issue 9): the A-label entry owns the UTF-8, mixed-case and A-label
  // forms; a name IDNA2008 refuses owns nothing.
  const std::vector<std::string> idn = {"@xn--exmple-cua.com", "info@xn--exmple-cua.org"};
  CHECK(senderAllowed(idn, "a@xn--exmple-cua.com"));
  CHECK(senderAllowed(idn, "a@XN--EXMPLE-CUA.COM"));
  CHECK(senderAllowed(idn, "a@ex\xc3\xa4mple.com"));
  CHECK(senderAllowed(idn, "a@EX\xc3\x84MPLE.com"));
  CHECK(senderAllowed(idn, "Info@ex\xc3\xa4mple.org"));
  CHECK_FALSE(senderAllowed(idn, "other@ex\xc3\xa4mple.org"));
  CHECK_FALSE(senderAllowed(idn, "a@ex\xc3\xa4mple.net"));
  CHECK_FALSE(senderAllowed(idn, "a@xn--zz.com"));
  CHECK_FALSE(senderAllowed(idn, "a@example.com"));
  // An entry written in UTF-8 (not through the config loader) still compares.
  CHECK(senderAllowed({"@ex\xc3\xa4mple.com"}, "a@xn--exmple-cua.com"));

  // Malformed rules never match anything.
  const std::vector<std::string> junk = {"", "@", "example.org", "a@b@c", "@a@b"};
  CHECK_FALSE(senderAllowed(junk, "x@example.org"));
  CHECK_FALSE(senderAllowed(junk, "x@b"));
  CHECK_FALSE(senderAllowed(junk, "a@b@c"));
  CHECK_FALSE(senderAllowed({}, "x@example.org"));
}

TEST_CASE("Authenticator: ok, wrong password, unknown user, cache") {
  Authenticator auth({{"alice", fastHash("wonderland")}, {"bob", fastHash("builder")}, {"broken", "not a hash"}});
  CHECK_FALSE(auth.cachedOk("alice", "wonderland"));
  CHECK(auth.verify("alice", "wonderland") == AuthCheck::Ok);
  CHECK(auth.cachedOk("alice", "wonderland"));
  CHECK_FALSE(auth.cachedOk("alice", "Wonderland"));
  CHECK(auth.verify("alice", "Wonderland") == AuthCheck::BadCredentials);
  // A failure does not evict the cached success.
  CHECK(auth.cachedOk("alice", "wonderland"));
  CHECK(auth.verify("alice", "wonderland") == AuthCheck::Ok);

  CHECK(auth.verify("bob", "wonderland") == AuthCheck::BadCredentials);
  CHECK_FALSE(auth.cachedOk("bob", "wonderland"));
  CHECK(auth.verify("bob", "builder") == AuthCheck::Ok);

  CHECK(auth.verify("carol", "wonderland") == AuthCheck::BadCredentials);
  CHECK(auth.verify("", "") == AuthCheck::BadCredentials);
  CHECK(auth.verify("ALICE", "wonderland") == AuthCheck::BadCredentials);  // usernames exact
  CHECK(auth.verify("broken", "not a hash") == AuthCheck::BadCredentials);
  CHECK(auth.verify("broken", "") == AuthCheck::BadCredentials);
  // The separator keeps (user, password) pairs apart in the cache MAC.
  CHECK_FALSE(auth.cachedOk("alicew", "onderland"));
  CHECK_FALSE(auth.cachedOk(std::string("alice\0wonderland", 16), ""));

  Authenticator empty({});
  CHECK(empty.verify("alice", "wonderland") == AuthCheck::BadCredentials);
}

TEST_CASE("Authenticator: cache hit is fast") {
  Authenticator auth({{"alice", fastHash("wonderland")}});
  REQUIRE(auth.verify("alice", "wonderland") == AuthCheck::Ok);
  double cold = averageMs(3, [&] { (void)auth.verify("alice", "nope"); });
  double hit = averageMs(100, [&] { (void)auth.verify("alice", "wonderland"); });
  MESSAGE("verify: cache hit " << hit << " ms, scrypt (ln=10) " << cold << " ms");
  CHECK(hit < cold);
}

TEST_CASE("Authenticator: unknown user costs what a wrong password costs") {
  // ln=12 makes scrypt dominate the measurement without slowing the suite much.
  auto h = hashPassword("wonderland", {12, 8, 1});
  REQUIRE(h.ok());
  Authenticator auth({{"alice", *h}});
  double wrong = 0, unknown = 0;
  for (int round = 0; round < 2; ++round) {  // interleaved, second round counts
    wrong = averageMs(5, [&] { CHECK(auth.verify("alice", "nope") == AuthCheck::BadCredentials); });
    unknown = averageMs(5, [&] { CHECK(auth.verify("mallory", "nope") == AuthCheck::BadCredentials); });
  }
  MESSAGE("wrong password: " << wrong << " ms, unknown user: " << unknown << " ms (ln=12)");
}

TEST_CASE("Authenticator: several threads verifying at once") {
  Authenticator auth({{"alice", fastHash("a-pass")}, {"bob", fastHash("b-pass")}});
  std::atomic<int> ok{0}, bad{0}, wrongAnswers{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 20; ++i) {
        bool right = (i + t) % 3 != 0;
        const char* user = (i % 2) ? "alice" : "bob";
        std::string pw = std::string(user[0] == 'a' ? "a" : "b") + (right ? "-pass" : "-nope");
        if (i % 7 == 0) user = "nobody";
        bool expectOk = right && std::string(user) != "nobody";
        AuthCheck r = auth.verify(user, pw);
        if ((r == AuthCheck::Ok) != expectOk) ++wrongAnswers;
        (r == AuthCheck::Ok ? ok : bad)++;
        (void)auth.cachedOk(user, pw);
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(wrongAnswers == 0);
  CHECK(ok > 0);
  CHECK(bad > 0);
  CHECK(auth.cachedOk("alice", "a-pass"));
  CHECK(auth.cachedOk("bob", "b-pass"));
}
