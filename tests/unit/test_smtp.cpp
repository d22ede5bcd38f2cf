// Unit tests for src/smtp/: command parser (RFC 5321 4.1), reply builder (RFC 5321 4.2,
// RFC 3463), and ServerSession driven with bytes (every reply, limits, SMTP smuggling,
// pipelining, STARTTLS injection, AUTH, BDAT), plus the transcript replays in
// tests/transcripts/*.txt (format: tests/transcripts/README.md), each run whole, one
// byte at a time and in irregular pieces, with identical replies required.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "smtp/command.h"
#include "smtp/reply.h"
#include "smtp/server_session.h"
#include "util/base64.h"

using namespace subrelay::smtp;
using subrelay::util::base64Encode;

namespace {

// ---- helpers -------------------------------------------------------------------------

SessionConfig testConfig() {
  SessionConfig c;
  c.hostname = "relay.test";
  c.starttlsAvailable = true;
  c.authWithoutTls = false;
  c.senderAllowed = [](std::string_view account, std::string_view addr) {
    if (account != "alice") return false;
    return addr.size() > 12 && addr.substr(addr.size() - 12) == "@example.com";
  };
  return c;
}

TlsInfo tls13() { return TlsInfo{"TLSv1.3", "TLS_AES_256_GCM_SHA384"}; }

std::vector<std::string> splitLines(const std::string& s) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < s.size()) {
    size_t e = s.find("\r\n", pos);
    if (e == std::string::npos) {
      out.push_back(s.substr(pos) + "<no CRLF>");
      break;
    }
    out.push_back(s.substr(pos, e - pos));
    pos = e + 2;
  }
  return out;
}

// Drives a session and sorts its actions: reply bytes into out, the rest into other.
struct Harness {
  ServerSession s;
  std::string out;
  std::vector<Action> other;
  bool closed = false;

  explicit Harness(SessionConfig c = testConfig()) : s(std::move(c), 7) {}

  void collect() {
    for (auto& a : s.takeActions()) {
      if (auto* send = std::get_if<Send>(&a)) {
        CHECK_FALSE(closed);  // nothing may follow Close
        out += send->bytes;
      } else {
        if (std::holds_alternative<Close>(a)) closed = true;
        other.push_back(std::move(a));
      }
    }
  }
  // Replies produced by this step, as lines.
  std::vector<std::string> step() {
    std::string before = out;
    collect();
    return splitLines(out.substr(before.size()));
  }
  std::vector<std::string> connect(bool tls = false) {
    Peer p{"192.0.2.7", 40000, false};
    s.onConnect(p, tls ? std::optional<TlsInfo>(tls13()) : std::nullopt);
    return step();
  }
  std::vector<std::string> feed(std::string_view bytes) {
    s.onBytes(bytes);
    return step();
  }
  std::vector<std::string> feedBytewise(std::string_view bytes) {
    for (char c : bytes) s.onBytes(std::string_view(&c, 1));
    return step();
  }
  std::string last(std::string_view bytes) {
    auto l = feed(bytes);
    return l.empty() ? std::string("<none>") : l.back();
  }
  template <typename T>
  T* takeAction() {
    for (auto it = other.begin(); it != other.end(); ++it) {
      if (std::holds_alternative<T>(*it)) {
        static T keep;
        keep = std::get<T>(std::move(*it));
        other.erase(it);
        return &keep;
      }
    }
    return nullptr;
  }
  bool hasClose() const {
    return std::any_of(other.begin(), other.end(), [](const Action& a) { return std::holds_alternative<Close>(a); });
  }
  // TLS session, EHLO, AUTH PLAIN alice, verdict Ok.
  void login(std::string user = "alice") {
    connect(true);
    feed("EHLO client.test\r\n");
    feed("AUTH PLAIN " + base64Encode(std::string("\0", 1) + user + std::string("\0pw", 3)) + "\r\n");
    auto* a = takeAction<Authenticate>();
    REQUIRE(a != nullptr);
    s.onAuthResult(AuthVerdict::Ok);
    auto r = step();
    REQUIRE(r.size() == 1);
    REQUIRE(r[0] == "235 2.7.0 Authentication successful");
  }
  // login + MAIL + one RCPT.
  void envelope() {
    login();
    REQUIRE(last("MAIL FROM:<alice@example.com>\r\n") == "250 2.1.0 Ok");
    REQUIRE(last("RCPT TO:<bob@example.net>\r\n") == "250 2.1.5 Ok");
  }
};

std::string plainIr(std::string_view authz, std::string_view user, std::string_view pass) {
  std::string m(authz);
  m += '\0';
  m += user;
  m += '\0';
  m += pass;
  return base64Encode(m);
}

}  // namespace

// ---- command parser ------------------------------------------------------------------

TEST_CASE("parseCommand: verbs, arguments, HTTP") {
  auto c = parseCommand("mail FROM:<a@b.c>  ");
  CHECK(c.verb == Verb::Mail);
  CHECK(c.name == "mail");
  CHECK(c.args == "FROM:<a@b.c>");
  CHECK(parseCommand("EhLo x").verb == Verb::Ehlo);
  CHECK(parseCommand("STARTTLS").verb == Verb::StartTls);
  CHECK(parseCommand("STARTTLS").args.empty());
  CHECK(parseCommand("QUIT").verb == Verb::Quit);
  CHECK(parseCommand("BDAT 10 LAST").verb == Verb::Bdat);
  CHECK(parseCommand("XYZZY").verb == Verb::Unknown);
  CHECK(parseCommand("").verb == Verb::Unknown);
  CHECK(parseCommand("MAILFROM:<a@b>").verb == Verb::Unknown);
  CHECK(parseCommand("GET / HTTP/1.1").verb == Verb::Http);
  CHECK(parseCommand("POST /x HTTP/1.0").verb == Verb::Http);
  CHECK(parseCommand("CONNECT a:25 HTTP/1.1").verb == Verb::Http);
  CHECK(parseCommand("Host: example.com").verb == Verb::Http);
  CHECK(parseCommand("User-Agent: curl").verb == Verb::Http);
  CHECK(parseCommand("Host:").verb == Verb::Unknown);
}

TEST_CASE("parsePathArgument: addresses") {
  auto p = parsePathArgument("FROM:<alice@example.com>", "FROM");
  CHECK(p.status == PathStatus::Ok);
  CHECK(p.address == "alice@example.com");
  CHECK_FALSE(p.nullPath);
  CHECK(p.params.empty());

  p = parsePathArgument("from:<>", "FROM");
  CHECK(p.status == PathStatus::Ok);
  CHECK(p.nullPath);
  CHECK(p.address.empty());

  p = parsePathArgument("TO: <bob@example.net>", "TO");  // space after colon tolerated
  CHECK(p.status == PathStatus::Ok);
  CHECK(p.address == "bob@example.net");

  SUBCASE("quoted local parts") {
    p = parsePathArgument("TO:<\"john smith\"@example.net>", "TO");
    CHECK(p.status == PathStatus::Ok);
    CHECK(p.address == "\"john smith\"@example.net");
    p = parsePathArgument("TO:<\"a>b\\\"c\"@example.net>", "TO");
    CHECK(p.status == PathStatus::Ok);
    CHECK(p.address == "\"a>b\\\"c\"@example.net");
    // A quoted dot-string is the same mailbox unquoted.
    p = parsePathArgument("TO:<\"bob.smith\"@example.net>", "TO");
    CHECK(p.status == PathStatus::Ok);
    CHECK(p.address == "bob.smith@example.net");
    p = parsePathArgument("TO:<\"unterminated@example.net>", "TO");
    CHECK(p.status == PathStatus::BadPath);
    p = parsePathArgument("TO:<\"a\x01\"@example.net>", "TO");
    CHECK(p.status == PathStatus::BadPath);
  }
  SUBCASE("source routes are stripped") {
    p = parsePathArgument("TO:<@hosta.int,@jkl.org:userc@d.bar.org>", "TO");
    CHECK(p.status == PathStatus::Ok);
    CHECK(p.address == "userc@d.bar.org");
    CHECK(parsePathArgument("TO:<@:u@d.org>", "TO").status == PathStatus::BadPath);
    CHECK(parsePathArgument("TO:<@a,b:u@d.org>", "TO").status == PathStatus::BadPath);
    CHECK(parsePathArgument("TO:<@a.org u@d.org>", "TO").status == PathStatus::BadPath);
  }
  SUBCASE("syntax errors") {
    CHECK(parsePathArgument("TO:bob@example.net", "TO").status == PathStatus::BadPath);
    CHECK(parsePathArgument("TO:<bob@example.net", "TO").status == PathStatus::BadPath);
    CHECK(parsePathArgument("TO <bob@example.net>", "TO").status == PathStatus::BadKeyword);
    CHECK(parsePathArgument("FROM:<a@b.c>", "TO").status == PathStatus::BadKeyword);
    CHECK(parsePathArgument("TO:<bob@example.net>x", "TO").status == PathStatus::BadPath);
    CHECK(parsePathArgument("TO:<bob>", "TO").status == PathStatus::NoDomain);
    CHECK(parsePathArgument("TO:<bob@>", "TO").status == PathStatus::BadPath);
    CHECK(parsePathArgument("TO:<@example.net>", "TO").status == PathStatus::BadPath);
    CHECK(parsePathArgument("TO:<.bob@example.net>", "TO").status == PathStatus::BadPath);
    CHECK(parsePathArgument("TO:<bob.@example.net>", "TO").status == PathStatus::BadPath);
    CHECK(parsePathArgument("TO:<bo..b@example.net>", "TO").status == PathStatus::BadPath);
    CHECK(parsePathArgument("TO:<bob@exa_mple.net>", "TO").status == PathStatus::BadPath);
    CHECK(parsePathArgument("TO:<bob@-example.net>", "TO").status == PathStatus::BadPath);
    CHECK(parsePathArgument("TO:<bob@example.net.>", "TO").status == PathStatus::BadPath);
    CHECK(parsePathArgument("TO:<bob@exa..net>", "TO").status == PathStatus::BadPath);
    CHECK(parsePathArgument("TO:<b ob@example.net>", "TO").status == PathStatus::BadPath);
    CHECK(parsePathArgument("TO:<bob@example.net@x.org>", "TO").status == PathStatus::BadPath);
    std::string longLocal(250, 'a');
    CHECK(parsePathArgument("TO:<" + longLocal + "@example.net>", "TO").status == PathStatus::BadPath);
  }
  SUBCASE("address literals") {
    CHECK(parsePathArgument("TO:<u@[192.0.2.1]>", "TO").status == PathStatus::Ok);
    CHECK(parsePathArgument("TO:<u@[192.0.2.256]>", "TO").status == PathStatus::BadPath);
    CHECK(parsePathArgument("TO:<u@[IPv6:2001:db8::1]>", "TO").status == PathStatus::Ok);
    CHECK(isValidAddressLiteral("[IPv6:2001:db8:0:0:0:0:0:1]"));
    CHECK(isValidAddressLiteral("[IPv6:::1]"));
    CHECK(isValidAddressLiteral("[IPv6:::ffff:192.0.2.1]"));
    CHECK(isValidAddressLiteral("[IPv6:1:2:3:4:5:6:192.0.2.1]"));
    CHECK_FALSE(isValidAddressLiteral("[IPv6:1:2:3:4:5:6:7:8:9]"));
    CHECK_FALSE(isValidAddressLiteral("[IPv6:1::2::3]"));
    CHECK_FALSE(isValidAddressLiteral("[IPv6:12345::1]"));
    CHECK_FALSE(isValidAddressLiteral("[IPv6:1:2:3:4:5:6:7]"));
    CHECK(isValidAddressLiteral("[x-tag:content]"));
    CHECK_FALSE(isValidAddressLiteral("[x-tag:]"));
    CHECK_FALSE(isValidAddressLiteral("[1.2.3]"));
  }
  SUBCASE("UTF-8 (RFC 6531)") {
    p = parsePathArgument(
        "TO:<j\xc3\xb6rg@b\xc3\xbc"
        "cher.example>",
        "TO");
    CHECK(p.status == PathStatus::Ok);
    CHECK(p.nonAscii);
    p = parsePathArgument("TO:<j\xc3rg@example.net>", "TO");  // truncated sequence
    CHECK(p.status == PathStatus::BadPath);
    p = parsePathArgument("TO:<a@example.net>", "TO");
    CHECK_FALSE(p.nonAscii);
    CHECK(isValidMailbox("j\xc3\xb6rg@example.net", true));
    CHECK_FALSE(isValidMailbox("j\xc3\xb6rg@example.net", false));
    CHECK(
        isValidDomain("b\xc3\xbc"
                      "cher.example",
                      true));
    CHECK_FALSE(
        isValidDomain("b\xc3\xbc"
                      "cher.example",
                      false));
  }
}

TEST_CASE("parsePathArgument: ESMTP parameters") {
  auto p = parsePathArgument("FROM:<a@b.c> size=100 BODY=8BITMIME SMTPUTF8", "FROM");
  REQUIRE(p.status == PathStatus::Ok);
  REQUIRE(p.params.size() == 3);
  CHECK(p.params[0].keyword == "SIZE");
  CHECK(p.params[0].value == "100");
  CHECK(p.params[1].keyword == "BODY");
  CHECK(p.params[2].keyword == "SMTPUTF8");
  CHECK_FALSE(p.params[2].hasValue);
  CHECK(parsePathArgument("FROM:<a@b.c> SIZE=1 SIZE=2", "FROM").status == PathStatus::DuplicateParam);
  CHECK(parsePathArgument("FROM:<a@b.c> SIZE=1 size=2", "FROM").duplicate == "SIZE");
  CHECK(parsePathArgument("FROM:<a@b.c> SIZE=", "FROM").status == PathStatus::BadParams);
  CHECK(parsePathArgument("FROM:<a@b.c> -X=1", "FROM").status == PathStatus::BadParams);
  CHECK(parsePathArgument("FROM:<a@b.c> X=a=b", "FROM").status == PathStatus::BadParams);
  CHECK(parsePathArgument("FROM:<a@b.c> AUTH=<>", "FROM").status == PathStatus::Ok);
  std::vector<EsmtpParam> ps;
  CHECK(parseEsmtpParams("", ps));
  CHECK(ps.empty());
  CHECK(parseEsmtpParams("A  B=1", ps));
  CHECK(ps.size() == 2);
}

TEST_CASE("isValidUtf8") {
  CHECK(isValidUtf8("plain"));
  CHECK(isValidUtf8("\xe2\x82\xac"));
  CHECK(isValidUtf8("\xf0\x9f\x98\x80"));
  CHECK_FALSE(isValidUtf8("\xc0\x80"));          // overlong NUL
  CHECK_FALSE(isValidUtf8("\xe0\x80\xaf"));      // overlong
  CHECK_FALSE(isValidUtf8("\xed\xa0\x80"));      // surrogate
  CHECK_FALSE(isValidUtf8("\xf4\x90\x80\x80"));  // above U+10FFFF
  CHECK_FALSE(isValidUtf8("\x80"));
  CHECK_FALSE(isValidUtf8("\xe2\x82"));
  CHECK(isValidDomain(std::string(63, 'a') + ".example", false));
  CHECK_FALSE(isValidDomain(std::string(64, 'a') + ".example", false));
}

// ---- replies -------------------------------------------------------------------------

TEST_CASE("reply builder") {
  CHECK(formatReply(250, "2.1.0", "Ok") == "250 2.1.0 Ok\r\n");
  CHECK(formatReply(220, "", "host ESMTP") == "220 host ESMTP\r\n");
  CHECK(formatReply(334, "", "") == "334 \r\n");
  CHECK(formatMultilineReply(250, "", {"a", "B C", "D"}) == "250-a\r\n250-B C\r\n250 D\r\n");
  CHECK(formatMultilineReply(550, "5.7.1", {"x", "y"}) == "550-5.7.1 x\r\n550 5.7.1 y\r\n");
  // Reply-line injection from a text that came from elsewhere is neutralised.
  CHECK(formatReply(451, "4.3.0", "a\r\n250 ok") == "451 4.3.0 a??250 ok\r\n");
  CHECK(sanitizeReplyText(std::string(1000, 'x')).size() == kMaxReplyText);
  CHECK(isValidEnhancedCode("2.0.0", 250));
  CHECK(isValidEnhancedCode("5.7.11", 538));
  CHECK(isValidEnhancedCode("4.5.3"));
  CHECK_FALSE(isValidEnhancedCode("2.0.0", 550));
  CHECK_FALSE(isValidEnhancedCode("3.0.0"));
  CHECK_FALSE(isValidEnhancedCode("5.0"));
  CHECK_FALSE(isValidEnhancedCode("5.1000.0"));
  CHECK_FALSE(isValidEnhancedCode("5..0"));
  auto r = parseReplyLine("250-PIPELINING");
  REQUIRE(r);
  CHECK(r->code == 250);
  CHECK_FALSE(r->last);
  CHECK(r->text == "PIPELINING");
  r = parseReplyLine("221");
  REQUIRE(r);
  CHECK(r->last);
  CHECK_FALSE(parseReplyLine("25"));
  CHECK_FALSE(parseReplyLine("2x0 ok"));
  CHECK_FALSE(parseReplyLine("250_ok"));
}

// ---- session: greeting, EHLO ---------------------------------------------------------

TEST_CASE("greeting and EHLO advertisement") {
  Harness h;
  CHECK(h.s.phase() == Phase::Greeting);
  CHECK(h.connect() == std::vector<std::string>{"220 relay.test ESMTP subrelay"});
  auto lines = h.feed("EHLO client.test\r\n");
  CHECK(lines == std::vector<std::string>{"250-relay.test", "250-PIPELINING", "250-SIZE 26214400", "250-8BITMIME",
                                          "250-ENHANCEDSTATUSCODES", "250-SMTPUTF8", "250-CHUNKING", "250-DSN", "250 STARTTLS"});
  SUBCASE("after STARTTLS: AUTH, no STARTTLS") {
    CHECK(h.last("STARTTLS\r\n") == "220 2.0.0 Ready to start TLS");
    REQUIRE(h.takeAction<StartTls>() != nullptr);
    CHECK(h.s.phase() == Phase::TlsPending);
    h.s.onTlsEstablished(tls13());
    CHECK(h.step().empty());  // no second greeting (RFC 3207 4.2)
    CHECK(h.s.tlsActive());
    lines = h.feed("EHLO client.test\r\n");
    CHECK(lines.back() == "250 AUTH PLAIN LOGIN");
    CHECK(std::find(lines.begin(), lines.end(), "250-STARTTLS") == lines.end());
    CHECK(std::find(lines.begin(), lines.end(), "250-REQUIRETLS") != lines.end());  // RFC 8689 2, inside TLS
  }
  SUBCASE("HELO") { CHECK(h.feed("HELO client.test\r\n") == std::vector<std::string>{"250 relay.test"}); }
  SUBCASE("missing or bad argument") {
    CHECK(h.last("EHLO\r\n") == "501 5.5.4 Syntax: EHLO hostname");
    CHECK(h.last("HELO\r\n") == "501 5.5.4 Syntax: HELO hostname");
    CHECK(h.last("EHLO a b\r\n") == "501 5.5.4 Invalid EHLO/HELO hostname");
  }
}

TEST_CASE("EHLO variants by listener") {
  SUBCASE("no STARTTLS offered") {
    auto c = testConfig();
    c.starttlsAvailable = false;
    Harness h(c);
    h.connect();
    auto lines = h.feed("EHLO x\r\n");
    CHECK(lines.back() == "250 DSN");
    CHECK(h.last("STARTTLS\r\n") == "502 5.5.1 Error: command not implemented");
  }
  SUBCASE("loopback listener without TLS") {
    auto c = testConfig();
    c.starttlsAvailable = false;
    c.authWithoutTls = true;
    c.maxMessageBytes = 1000;
    Harness h(c);
    h.connect();
    auto lines = h.feed("EHLO x\r\n");
    CHECK(std::find(lines.begin(), lines.end(), "250-SIZE 1000") != lines.end());
    CHECK(lines.back() == "250 AUTH PLAIN LOGIN");
    CHECK(std::find(lines.begin(), lines.end(), "250-REQUIRETLS") == lines.end());  // never in clear
  }
  SUBCASE("implicit TLS") {
    Harness h;
    h.connect(true);
    auto lines = h.feed("EHLO x\r\n");
    CHECK(lines.back() == "250 AUTH PLAIN LOGIN");
    CHECK(std::find(lines.begin(), lines.end(), "250-STARTTLS") == lines.end());
    CHECK(h.last("STARTTLS\r\n") == "503 5.5.1 Error: TLS already active");
  }
}

TEST_CASE("simple commands") {
  Harness h;
  h.connect();
  CHECK(h.last("NOOP\r\n") == "250 2.0.0 Ok");
  CHECK(h.last("NOOP anything at all\r\n") == "250 2.0.0 Ok");
  CHECK(h.last("RSET\r\n") == "250 2.0.0 Ok");
  CHECK(h.last("RSET x\r\n") == "501 5.5.4 Syntax: RSET");
  CHECK(h.last("HELP\r\n").rfind("214 2.0.0 ", 0) == 0);
  CHECK(h.last("VRFY root\r\n") == "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery");
  CHECK(h.last("VRFY\r\n") == "501 5.5.4 Syntax: VRFY address");
  CHECK(h.last("EXPN staff\r\n") == "502 5.5.1 EXPN not supported");
  CHECK(h.last("FOO\r\n") == "500 5.5.2 Command unrecognized");
  CHECK(h.last("\r\n") == "500 5.5.2 Command unrecognized");
  CHECK(h.last("MAIL FROM:<a@example.com>\r\n") == "503 5.5.1 Error: send HELO/EHLO first");
  CHECK(h.last("QUIT\r\n") == "221 2.0.0 Bye");
  CHECK(h.hasClose());
  CHECK(h.s.phase() == Phase::Closed);
  CHECK(h.feed("NOOP\r\n").empty());
}

// ---- session: AUTH -------------------------------------------------------------------

TEST_CASE("no transaction without AUTH; AUTH needs TLS") {
  Harness h;
  h.connect();
  h.feed("EHLO x\r\n");
  CHECK(h.last("MAIL FROM:<alice@example.com>\r\n") == "530 5.7.0 Authentication required");
  CHECK(h.last("AUTH PLAIN " + plainIr("", "alice", "pw") + "\r\n") ==
        "538 5.7.11 Encryption required for requested authentication mechanism");
  CHECK(h.takeAction<Authenticate>() == nullptr);
  CHECK(h.last("RCPT TO:<b@example.net>\r\n") == "503 5.5.1 Error: need MAIL command");
  CHECK(h.last("DATA\r\n") == "503 5.5.1 Error: need MAIL command");
}

TEST_CASE("AUTH PLAIN") {
  Harness h;
  h.connect(true);
  SUBCASE("needs EHLO") {
    CHECK(h.last("AUTH PLAIN " + plainIr("", "alice", "pw") + "\r\n") == "503 5.5.1 Error: send EHLO first");
    h.feed("HELO x\r\n");
    CHECK(h.last("AUTH PLAIN " + plainIr("", "alice", "pw") + "\r\n") == "503 5.5.1 Error: send EHLO first");
  }
  h.feed("EHLO x\r\n");
  SUBCASE("initial response, Ok") {
    CHECK(h.feed("AUTH PLAIN " + plainIr("", "alice", "s3cret") + "\r\n").empty());
    CHECK(h.s.phase() == Phase::Waiting);
    auto* a = h.takeAction<Authenticate>();
    REQUIRE(a);
    CHECK(a->mechanism == "PLAIN");
    CHECK(a->username == "alice");
    CHECK(a->password == "s3cret");
    h.s.onAuthResult(AuthVerdict::Ok);
    CHECK(h.step() == std::vector<std::string>{"235 2.7.0 Authentication successful"});
    CHECK(h.s.account() == "alice");
    CHECK(h.last("AUTH PLAIN " + plainIr("", "alice", "pw") + "\r\n") == "503 5.5.1 Error: already authenticated");
    // Stray outcomes are ignored.
    h.s.onAuthResult(AuthVerdict::Ok);
    h.s.onStored(StoreOutcome{true, "X", 250, "2.0.0", ""});
    CHECK(h.step().empty());
  }
  SUBCASE("challenge, then response") {
    CHECK(h.feed("auth plain\r\n") == std::vector<std::string>{"334 "});
    CHECK(h.feed(plainIr("alice", "alice", "pw") + "\r\n").empty());
    auto* a = h.takeAction<Authenticate>();
    REQUIRE(a);
    CHECK(a->username == "alice");
  }
  SUBCASE("empty initial response '='") { CHECK(h.last("AUTH PLAIN =\r\n") == "501 5.5.2 Malformed PLAIN response"); }
  SUBCASE("authzid must be empty or equal") {
    CHECK(h.last("AUTH PLAIN " + plainIr("bob", "alice", "pw") + "\r\n") ==
          "535 5.7.8 Authorization identity must be empty or equal to the username");
    CHECK(h.takeAction<Authenticate>() == nullptr);
  }
  SUBCASE("malformed and undecodable") {
    CHECK(h.last("AUTH PLAIN " + base64Encode("nonul") + "\r\n") == "501 5.5.2 Malformed PLAIN response");
    CHECK(h.last("AUTH PLAIN !!!!\r\n") == "501 5.5.2 Cannot decode response");
    CHECK(h.feed("AUTH PLAIN\r\n") == std::vector<std::string>{"334 "});
    CHECK(h.last("not base64\r\n") == "501 5.5.2 Cannot decode response");
    CHECK(h.feed("AUTH PLAIN\r\n") == std::vector<std::string>{"334 "});
    CHECK(h.last("*\r\n") == "501 5.7.0 Authentication cancelled");
    CHECK(h.last("AUTH PLAIN " + plainIr("", "", "pw") + "\r\n") == "535 5.7.8 Authentication credentials invalid");
    CHECK(h.last("AUTH CRAM-MD5\r\n") == "504 5.5.4 Unrecognized authentication type");
    CHECK(h.last("AUTH\r\n") == "501 5.5.4 Syntax: AUTH mechanism [initial-response]");
  }
  SUBCASE("failures, then 421") {
    for (int i = 0; i < 2; ++i) {
      h.feed("AUTH PLAIN " + plainIr("", "alice", "bad") + "\r\n");
      REQUIRE(h.takeAction<Authenticate>());
      h.s.onAuthResult(AuthVerdict::Failed);
      CHECK(h.step() == std::vector<std::string>{"535 5.7.8 Authentication credentials invalid"});
    }
    h.feed("AUTH PLAIN " + plainIr("", "alice", "bad") + "\r\n");
    REQUIRE(h.takeAction<Authenticate>());
    h.s.onAuthResult(AuthVerdict::Failed);
    CHECK(h.step() == std::vector<std::string>{"535 5.7.8 Authentication credentials invalid",
                                               "421 4.7.0 Too many authentication failures"});
    CHECK(h.hasClose());
  }
  SUBCASE("tempfail and refused") {
    h.feed("AUTH PLAIN " + plainIr("", "alice", "pw") + "\r\n");
    h.s.onAuthResult(AuthVerdict::TempFail);
    CHECK(h.step() == std::vector<std::string>{"454 4.7.0 Temporary authentication failure"});
    h.feed("AUTH PLAIN " + plainIr("", "alice", "pw") + "\r\n");
    h.s.onAuthResult(AuthVerdict::Refused, "Too many failures from your address; try later");
    CHECK(h.step() == std::vector<std::string>{"454 4.7.0 Too many failures from your address; try later"});
    h.feed("AUTH PLAIN " + plainIr("", "alice", "pw") + "\r\n");
    h.s.onAuthResult(AuthVerdict::Refused);
    CHECK(h.step() == std::vector<std::string>{"454 4.7.0 Authentication temporarily refused"});
    CHECK(h.s.account().empty());
  }
}

TEST_CASE("AUTH LOGIN") {
  Harness h;
  h.connect(true);
  h.feed("EHLO x\r\n");
  SUBCASE("two steps") {
    CHECK(h.feed("AUTH LOGIN\r\n") == std::vector<std::string>{"334 VXNlcm5hbWU6"});
    CHECK(h.feed(base64Encode("alice") + "\r\n") == std::vector<std::string>{"334 UGFzc3dvcmQ6"});
    CHECK(h.feed(base64Encode("pw") + "\r\n").empty());
    auto* a = h.takeAction<Authenticate>();
    REQUIRE(a);
    CHECK(a->mechanism == "LOGIN");
    CHECK(a->username == "alice");
    CHECK(a->password == "pw");
  }
  SUBCASE("initial response") {
    CHECK(h.feed("AUTH LOGIN " + base64Encode("alice") + "\r\n") == std::vector<std::string>{"334 UGFzc3dvcmQ6"});
    CHECK(h.feed("*\r\n") == std::vector<std::string>{"501 5.7.0 Authentication cancelled"});
    CHECK(h.takeAction<Authenticate>() == nullptr);
  }
  SUBCASE("long SASL lines use maxAuthLine") {
    std::string pw(6000, 'p');
    auto big = testConfig();
    big.maxPasswordBytes = 8192;
    Harness hb(big);
    hb.connect(true);
    hb.feed("EHLO client.test\r\n");
    hb.feed("AUTH LOGIN " + base64Encode("alice") + "\r\n");
    CHECK(hb.feed(base64Encode(pw) + "\r\n").empty());
    auto* a = hb.takeAction<Authenticate>();
    REQUIRE(a);
    CHECK(a->password == pw);
  }
}

TEST_CASE("pipelined commands wait for the auth outcome") {
  Harness h;
  h.connect(true);
  auto lines = h.feed("EHLO x\r\nAUTH PLAIN " + plainIr("", "alice", "pw") +
                      "\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<b@example.net>\r\n");
  CHECK(lines.back() == "250 AUTH PLAIN LOGIN");
  CHECK(h.s.phase() == Phase::Waiting);
  CHECK_FALSE(h.s.wantsInput());
  CHECK(h.s.bufferedBytes() > 0);
  h.s.onAuthResult(AuthVerdict::Ok);
  CHECK(h.step() == std::vector<std::string>{"235 2.7.0 Authentication successful", "250 2.1.0 Ok", "250 2.1.5 Ok"});
  CHECK(h.s.inTransaction());
}

// ---- session: MAIL / RCPT ------------------------------------------------------------

TEST_CASE("MAIL FROM") {
  Harness h;
  h.login();
  CHECK(h.last("MAIL FROM:alice@example.com\r\n") == "501 5.1.7 Bad sender address syntax");
  CHECK(h.last("MAIL FROM:<alice>\r\n") == "501 5.1.7 Bad sender address syntax");
  CHECK(h.last("MAIL TO:<alice@example.com>\r\n") == "501 5.5.4 Syntax: MAIL FROM:<address>");
  CHECK(h.last("MAIL FROM:<alice@example.com> SIZE=x\r\n") == "501 5.5.4 Bad SIZE parameter");
  CHECK(h.last("MAIL FROM:<alice@example.com> SIZE=26214401\r\n") ==
        "552 5.3.4 Message size exceeds fixed maximum message size");
  CHECK(h.last("MAIL FROM:<alice@example.com> BODY=BINARYMIME\r\n") == "555 5.5.4 BODY=BINARYMIME is not supported");
  CHECK(h.last("MAIL FROM:<alice@example.com> BODY=9BIT\r\n") == "501 5.5.4 Bad BODY parameter");
  CHECK(h.last("MAIL FROM:<alice@example.com> XRET=HDRS\r\n") == "555 5.5.4 Unsupported MAIL parameter XRET");
  CHECK(h.last("MAIL FROM:<alice@example.com> SMTPUTF8=yes\r\n") == "501 5.5.4 SMTPUTF8 takes no value");
  CHECK(h.last("MAIL FROM:<alice@example.com> SIZE=1 SIZE=1\r\n") == "501 5.5.4 Duplicate SIZE parameter");
  CHECK(h.last("MAIL FROM:<mallory@evil.example>\r\n") == "553 5.7.1 Sender address not owned by this account");
  CHECK(h.last("MAIL FROM:<\xc3\xa5sa@example.com>\r\n") ==
        "550 5.6.7 Non-ASCII addresses not permitted for that sender (use SMTPUTF8)");
  CHECK_FALSE(h.s.inTransaction());
  CHECK(h.last("MAIL FROM:<alice@example.com> SIZE=1000 BODY=8BITMIME AUTH=<>\r\n") == "250 2.1.0 Ok");
  CHECK(h.s.inTransaction());
  CHECK(h.last("MAIL FROM:<alice@example.com>\r\n") == "503 5.5.1 Error: nested MAIL command");
  CHECK(h.last("AUTH PLAIN " + plainIr("", "alice", "pw") + "\r\n") == "503 5.5.1 Error: already authenticated");
  CHECK(h.last("STARTTLS\r\n") == "503 5.5.1 Error: TLS already active");
  CHECK(h.last("RSET\r\n") == "250 2.0.0 Ok");
  CHECK_FALSE(h.s.inTransaction());
  CHECK(h.last("MAIL FROM:<\xc3\xa5sa@example.com> SMTPUTF8\r\n") == "250 2.1.0 Ok");
}

TEST_CASE("MAIL FROM with no sender policy, null sender") {
  auto c = testConfig();
  c.senderAllowed = nullptr;
  Harness h(c);
  h.login("anyone");
  CHECK(h.last("MAIL FROM:<>\r\n") == "250 2.1.0 Ok");
}

TEST_CASE("RCPT TO") {
  auto c = testConfig();
  c.maxRecipients = 3;
  Harness h(c);
  h.login();
  CHECK(h.last("RCPT TO:<b@example.net>\r\n") == "503 5.5.1 Error: need MAIL command");
  CHECK(h.last("MAIL FROM:<alice@example.com>\r\n") == "250 2.1.0 Ok");
  CHECK(h.last("RCPT TO:<postmaster>\r\n") == "501 5.1.3 Recipient address must include a domain");
  CHECK(h.last("RCPT TO:<>\r\n") == "501 5.1.3 Bad recipient address syntax");
  CHECK(h.last("RCPT TO:<a b@example.net>\r\n") == "501 5.1.3 Bad recipient address syntax");
  CHECK(h.last("RCPT <b@example.net>\r\n") == "501 5.5.4 Syntax: RCPT TO:<address>");
  CHECK(h.last("RCPT TO:<b@example.net> XFOO=1\r\n") == "555 5.5.4 Unsupported RCPT parameter XFOO");
  CHECK(h.last("RCPT TO:<\xc3\xa5@example.net>\r\n") ==
        "553 5.6.7 Non-ASCII addresses not permitted for that recipient (use SMTPUTF8)");
  CHECK(h.last("RCPT TO:<r1@example.net>\r\n") == "250 2.1.5 Ok");
  CHECK(h.last("RCPT TO:<r1@example.net>\r\n") == "250 2.1.5 Ok");  // duplicate, kept once
  CHECK(h.last("RCPT TO:<r2@example.net>\r\n") == "250 2.1.5 Ok");
  CHECK(h.last("rcpt to:<@relay.example:r3@example.net>\r\n") == "250 2.1.5 Ok");
  CHECK(h.last("RCPT TO:<r4@example.net>\r\n") == "452 4.5.3 Too many recipients");
  CHECK(h.last("DATA\r\n") == "354 End data with <CR><LF>.<CR><LF>");
  h.feed("x\r\n.\r\n");
  auto* st = h.takeAction<Store>();
  REQUIRE(st);
  CHECK(st->envelope.recipients == std::vector<std::string>{"r1@example.net", "r2@example.net", "r3@example.net"});
}

TEST_CASE("account policy seams: MAIL and RCPT refusals keep the session usable") {
  auto c = testConfig();
  int mailCalls = 0;
  uint64_t lastSize = 99;
  bool refuseMail = true;
  c.mailPolicy = [&](std::string_view account, uint64_t declared) -> std::optional<PolicyRefusal> {
    ++mailCalls;
    CHECK(account == "alice");
    lastSize = declared;
    if (refuseMail) return PolicyRefusal{451, "4.7.1", "Rate limit messages_per_minute exceeded; try again in 7 seconds"};
    return std::nullopt;
  };
  std::vector<std::string> seen;
  c.rcptPolicy = [&](std::string_view, std::string_view rcpt) -> std::optional<PolicyRefusal> {
    seen.emplace_back(rcpt);
    if (seen.size() > 2) return PolicyRefusal{452, "4.5.3", "Rate limit recipients_per_hour exceeded; try again in 60 seconds"};
    return std::nullopt;
  };
  Harness h(c);
  h.login();
  // Refused senders never reach the policy; a refused MAIL leaves no transaction.
  CHECK(h.last("MAIL FROM:<mallory@evil.test>\r\n") == "553 5.7.1 Sender address not owned by this account");
  CHECK(mailCalls == 0);
  CHECK(h.last("MAIL FROM:<alice@example.com> SIZE=1234\r\n") ==
        "451 4.7.1 Rate limit messages_per_minute exceeded; try again in 7 seconds");
  CHECK(lastSize == 1234);
  CHECK(h.last("RCPT TO:<b@example.net>\r\n") == "503 5.5.1 Error: need MAIL command");
  refuseMail = false;
  CHECK(h.last("MAIL FROM:<alice@example.com>\r\n") == "250 2.1.0 Ok");
  CHECK(lastSize == 0);
  // Syntax errors and duplicates are not charged; the third distinct recipient is refused.
  CHECK(h.last("RCPT TO:<postmaster>\r\n") == "501 5.1.3 Recipient address must include a domain");
  CHECK(h.last("RCPT TO:<r1@example.net>\r\n") == "250 2.1.5 Ok");
  CHECK(h.last("RCPT TO:<r1@example.net>\r\n") == "250 2.1.5 Ok");
  CHECK(h.last("RCPT TO:<r2@example.net>\r\n") == "250 2.1.5 Ok");
  CHECK(h.last("RCPT TO:<r3@example.net>\r\n") == "452 4.5.3 Rate limit recipients_per_hour exceeded; try again in 60 seconds");
  CHECK(seen == std::vector<std::string>{"r1@example.net", "r2@example.net", "r3@example.net"});
  CHECK(h.last("DATA\r\n") == "354 End data with <CR><LF>.<CR><LF>");
  h.feed("x\r\n.\r\n");
  auto* st = h.takeAction<Store>();
  REQUIRE(st);
  CHECK(st->envelope.recipients == std::vector<std::string>{"r1@example.net", "r2@example.net"});
  CHECK_FALSE(h.closed);
}

// ---- session: DATA -------------------------------------------------------------------

TEST_CASE("DATA: store, unstuffing, outcome") {
  Harness h;
  h.login();
  CHECK(h.last("DATA\r\n") == "503 5.5.1 Error: need MAIL command");
  h.feed("MAIL FROM:<alice@example.com> BODY=8BITMIME SIZE=50\r\n");
  CHECK(h.last("DATA\r\n") == "554 5.5.1 Error: no valid recipients");
  h.feed("RCPT TO:<bob@example.net>\r\n");
  CHECK(h.last("DATA now\r\n") == "501 5.5.4 Syntax: DATA");
  CHECK(h.last("DATA\r\n") == "354 End data with <CR><LF>.<CR><LF>");
  CHECK(h.s.phase() == Phase::Data);
  CHECK(h.s.timeoutFor() == std::chrono::seconds(180));
  CHECK(h.feed("Subject: hi\r\n\r\n..leading dot\r\n.x\r\n...\r\nQUIT\r\n.\r\n").empty());
  CHECK(h.s.phase() == Phase::Waiting);
  auto* st = h.takeAction<Store>();
  REQUIRE(st);
  CHECK(st->content == "Subject: hi\r\n\r\n.leading dot\r\nx\r\n..\r\nQUIT\r\n");
  CHECK(st->envelope.mailFrom == "alice@example.com");
  CHECK(st->envelope.recipients == std::vector<std::string>{"bob@example.net"});
  CHECK(st->envelope.eightBitMime);
  CHECK(st->envelope.declaredSize == 50);
  CHECK_FALSE(st->envelope.smtputf8);
  CHECK(st->account == "alice");
  CHECK(st->heloName == "client.test");
  CHECK(st->peer.address == "192.0.2.7");
  REQUIRE(st->tls);
  CHECK(st->tls->version == "TLSv1.3");
  CHECK(h.s.inTransaction());
  SUBCASE("ok") {
    h.s.onStored(StoreOutcome{true, "Q1234", 0, "", ""});
    CHECK(h.step() == std::vector<std::string>{"250 2.0.0 Ok: queued as Q1234"});
    CHECK_FALSE(h.s.inTransaction());
    CHECK(h.last("RCPT TO:<bob@example.net>\r\n") == "503 5.5.1 Error: need MAIL command");
    CHECK(h.last("MAIL FROM:<alice@example.com>\r\n") == "250 2.1.0 Ok");  // still authed
  }
  SUBCASE("failure outcome") {
    StoreOutcome o;
    o.code = 550;
    o.enhanced = "5.7.1";
    o.text = "Header From not owned by this account";
    h.s.onStored(o);
    CHECK(h.step() == std::vector<std::string>{"550 5.7.1 Header From not owned by this account"});
  }
  SUBCASE("default failure outcome") {
    h.s.onStored(StoreOutcome{});
    CHECK(h.step() == std::vector<std::string>{"451 4.3.0 Temporary failure storing message"});
  }
  SUBCASE("nonsense outcome is made safe") {
    h.s.onStored(StoreOutcome{false, "", 250, "2.0.0", "fine\r\n250 really"});
    CHECK(h.step() == std::vector<std::string>{"451 4.3.0 fine??250 really"});
  }
}

TEST_CASE("DATA: empty message and bytewise feeding") {
  Harness h;
  h.envelope();
  h.feed("DATA\r\n");
  CHECK(h.feedBytewise(".\r\n").empty());
  auto* st = h.takeAction<Store>();
  REQUIRE(st);
  CHECK(st->content.empty());
  h.s.onStored(StoreOutcome{true, "E", 0, "", ""});
  h.step();
  h.feed("MAIL FROM:<alice@example.com>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n");
  h.feedBytewise("a\r\n..b\r\n.\r\n");
  st = h.takeAction<Store>();
  REQUIRE(st);
  CHECK(st->content == "a\r\n.b\r\n");
}

TEST_CASE("DATA: SMTP smuggling attempts are content and refused") {
  const char* attacks[] = {
      "Subject: a\r\n\r\nbody\n.\nMAIL FROM:<x@evil.example>\r\n",
      "Subject: a\r\n\r\nbody\r.\rMAIL FROM:<x@evil.example>\r\n",
      "Subject: a\r\n\r\nbody\n.\r\nMAIL FROM:<x@evil.example>\r\n",
      "Subject: a\r\n\r\nbody\r\n.\rMAIL FROM:<x@evil.example>\r\n",
      "Subject: a\r\n\r\nbody\r\n.\nMAIL FROM:<x@evil.example>\r\n",
      "Subject: a\r\n\r\nbare\rcr mid-line\r\n",
      "Subject: a\r\n\r\nbare\nlf mid-line\r\n",
      "Subject: a\r\n\r\ntrailing CR\r\r\n",
  };
  for (const char* attack : attacks) {
    CAPTURE(attack);
    for (int bytewise = 0; bytewise < 2; ++bytewise) {
      Harness h;
      h.envelope();
      h.feed("DATA\r\n");
      std::string in = std::string(attack) + ".\r\n";
      auto lines = bytewise ? h.feedBytewise(in) : h.feed(in);
      CHECK(lines == std::vector<std::string>{"550 5.6.0 Message contains bare CR or LF (RFC 5321 2.3.8); send "
                                              "CRLF line endings"});
      CHECK(h.takeAction<Store>() == nullptr);
      CHECK(h.s.phase() == Phase::Command);
      CHECK_FALSE(h.s.inTransaction());
      // The smuggled MAIL was never a command.
      CHECK(h.last("RCPT TO:<b@example.net>\r\n") == "503 5.5.1 Error: need MAIL command");
    }
  }
}

TEST_CASE("DATA: a dot line after a bare LF is content") {
  Harness h;
  h.envelope();
  h.feed("DATA\r\n");
  CHECK(h.feed("\n.\r\n").empty());
  CHECK(h.s.phase() == Phase::Data);
  CHECK(h.feed("\r\n.\r\n").back().rfind("550 5.6.0 ", 0) == 0);
}

TEST_CASE("DATA: size limit keeps reading, stores nothing") {
  auto c = testConfig();
  c.maxMessageBytes = 1000;
  Harness h(c);
  h.envelope();
  h.feed("DATA\r\n");
  std::string line(98, 'x');
  line += "\r\n";
  for (int i = 0; i < 500; ++i) {
    CHECK(h.feed(line).empty());
    REQUIRE(h.s.bufferedBytes() == 0);
  }
  CHECK(h.feed(".\r\n") == std::vector<std::string>{"552 5.3.4 Message size exceeds fixed maximum message size"});
  CHECK(h.takeAction<Store>() == nullptr);
  CHECK_FALSE(h.s.inTransaction());
  // Exactly at the limit is fine.
  h.feed("MAIL FROM:<alice@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n");
  for (int i = 0; i < 10; ++i) h.feed(line);
  CHECK(h.feed(".\r\n").empty());
  auto* st = h.takeAction<Store>();
  REQUIRE(st);
  CHECK(st->content.size() == 1000);
}

// ---- session: command line limits -----------------------------------------------------

TEST_CASE("command lines: bare CR/LF, length, error limit") {
  auto c = testConfig();
  c.maxCommandLine = 100;
  c.maxBadCommands = 6;
  Harness h(c);
  h.connect();
  CHECK(h.last("NOOP\n") == "500 5.5.2 Bare CR or LF in command; use CRLF");
  CHECK(h.last("NOOP\rRSET\r\n") == "500 5.5.2 Bare CR or LF in command; use CRLF");
  CHECK(h.last(std::string(101, 'N') + "\r\n") == "500 5.5.2 Line too long");
  // Streamed: answered once the bound is passed, the rest skipped without buffering.
  CHECK(h.feed(std::string(100, 'N')).empty());
  CHECK(h.feed(std::string(50, 'N')) == std::vector<std::string>{"500 5.5.2 Line too long"});
  for (int i = 0; i < 100; ++i) {
    CHECK(h.feed(std::string(1000, 'N')).empty());
    REQUIRE(h.s.bufferedBytes() == 0);
  }
  CHECK(h.feed("tail\r\nNOOP\r\n") == std::vector<std::string>{"250 2.0.0 Ok"});
  CHECK(h.last(std::string(100, 'N') + "\r\n") == "500 5.5.2 Command unrecognized");
  CHECK(h.feed("XX\r\n") == std::vector<std::string>{"500 5.5.2 Command unrecognized", "421 4.7.0 Too many errors"});
  CHECK(h.hasClose());
}

TEST_CASE("HTTP on the SMTP port closes") {
  Harness h;
  h.connect();
  CHECK(h.feed("GET / HTTP/1.1\r\nHost: relay.test\r\n\r\n") ==
        std::vector<std::string>{"421 4.7.0 HTTP requests are not accepted"});
  CHECK(h.hasClose());
}

// ---- session: STARTTLS ---------------------------------------------------------------

TEST_CASE("STARTTLS discards pipelined plaintext (CVE-2011-0411)") {
  Harness h;
  h.connect();
  h.feed("EHLO x\r\n");
  CHECK(h.feed("STARTTLS\r\nRSET\r\nMAIL FROM:<alice@example.com>\r\n") ==
        std::vector<std::string>{"220 2.0.0 Ready to start TLS"});
  REQUIRE(h.takeAction<StartTls>());
  CHECK(h.s.bufferedBytes() == 0);
  CHECK(h.feed("NOOP\r\n").empty());  // plaintext during the handshake: ignored
  h.s.onTlsEstablished(tls13());
  CHECK(h.step().empty());
  // RFC 3207 4.2: back to the state before EHLO.
  CHECK(h.last("MAIL FROM:<alice@example.com>\r\n") == "503 5.5.1 Error: send HELO/EHLO first");
  CHECK(h.last("STARTTLS\r\n") == "503 5.5.1 Error: TLS already active");
}

TEST_CASE("STARTTLS errors and state reset of AUTH") {
  auto c = testConfig();
  c.authWithoutTls = true;
  Harness h(c);
  h.connect();
  h.feed("EHLO x\r\n");
  CHECK(h.last("STARTTLS now\r\n") == "501 5.5.4 Syntax: STARTTLS");
  h.feed("AUTH PLAIN " + plainIr("", "alice", "pw") + "\r\n");
  h.s.onAuthResult(AuthVerdict::Ok);
  h.step();
  h.feed("MAIL FROM:<alice@example.com>\r\n");
  CHECK(h.last("STARTTLS\r\n") == "503 5.5.1 Error: MAIL transaction in progress");
  h.feed("RSET\r\n");
  CHECK(h.last("STARTTLS\r\n") == "220 2.0.0 Ready to start TLS");
  h.s.onTlsEstablished(tls13());
  CHECK(h.s.account().empty());
  h.feed("EHLO x\r\n");
  CHECK(h.last("MAIL FROM:<alice@example.com>\r\n") == "530 5.7.0 Authentication required");
}

// ---- session: BDAT -------------------------------------------------------------------

TEST_CASE("BDAT (RFC 3030)") {
  Harness h;
  h.envelope();
  SUBCASE("chunks and LAST") {
    CHECK(h.feed("BDAT 5\r\nHello") == std::vector<std::string>{"250 2.0.0 Ok: 5 octets received"});
    CHECK(h.feed("BDAT 8\r\n, world\r") == std::vector<std::string>{"250 2.0.0 Ok: 8 octets received"});
    CHECK(h.last("DATA\r\n") == "503 5.5.1 Error: DATA after BDAT");
    CHECK(h.last("RCPT TO:<x@example.net>\r\n") == "503 5.5.1 Error: RCPT after message data");
    CHECK(h.feed("BDAT 1 LAST\r\n\n").empty());
    auto* st = h.takeAction<Store>();
    REQUIRE(st);
    CHECK(st->content == "Hello, world\r\n");
    h.s.onStored(StoreOutcome{true, "B1", 0, "", ""});
    CHECK(h.step() == std::vector<std::string>{"250 2.0.0 Ok: queued as B1"});
    // After LAST: no transaction; the chunk is still read and discarded.
    CHECK(h.feed("BDAT 6\r\nQUIT\r\n") == std::vector<std::string>{"503 5.5.1 Error: need MAIL command"});
    CHECK_FALSE(h.hasClose());
  }
  SUBCASE("BDAT 0 LAST; missing final CRLF added") {
    h.feed("BDAT 3\r\nabc");
    CHECK(h.feed("BDAT 0 LAST\r\n").empty());
    auto* st = h.takeAction<Store>();
    REQUIRE(st);
    CHECK(st->content == "abc\r\n");
  }
  SUBCASE("bare LF in a chunk") {
    CHECK(h.feed("BDAT 4 LAST\r\na\nb\n") ==
          std::vector<std::string>{"550 5.6.0 Message contains bare CR or LF (RFC 5321 2.3.8); "
                                   "send CRLF line endings"});
    CHECK(h.takeAction<Store>() == nullptr);
  }
  SUBCASE("trailing CR in the last chunk") {
    h.feed("BDAT 2\r\na\r");
    CHECK(h.last("BDAT 0 LAST\r\n").rfind("550 5.6.0", 0) == 0);
  }
  SUBCASE("syntax") {
    CHECK(h.last("BDAT\r\n") == "501 5.5.4 Syntax: BDAT chunk-size [LAST]");
    CHECK(h.last("BDAT x\r\n") == "501 5.5.4 Syntax: BDAT chunk-size [LAST]");
    CHECK(h.last("BDAT 5 FIRST\r\n") == "501 5.5.4 Syntax: BDAT chunk-size [LAST]");
    CHECK(h.last("BDAT 99999999999999999999\r\n") == "501 5.5.4 Syntax: BDAT chunk-size [LAST]");
  }
}

TEST_CASE("content observer sees exactly the stored content (DATA and BDAT, bytewise)") {
  // The app feeds a DKIM body hash from onContent (RFC 6376 3.7: no second pass), so
  // the concatenation of the pieces since the last reset must equal Store::content.
  auto seen = std::make_shared<std::string>();
  auto resets = std::make_shared<int>(0);
  SessionConfig c = testConfig();
  c.onContent = [seen](std::string_view chunk) -> std::optional<PolicyRefusal> {
    seen->append(chunk);
    return std::nullopt;
  };
  c.onContentReset = [seen, resets]() {
    seen->clear();
    ++*resets;
  };
  Harness h(std::move(c));
  h.envelope();
  SUBCASE("DATA with dot-stuffed lines") {
    h.feedBytewise("DATA\r\n");
    h.feedBytewise("Subject: dots\r\n\r\n..leading\r\n...\r\n.x\r\nlast line\r\n.\r\n");
    auto* st = h.takeAction<Store>();
    REQUIRE(st);
    CHECK(st->content == "Subject: dots\r\n\r\n.leading\r\n..\r\nx\r\nlast line\r\n");
    CHECK(*seen == st->content);
    h.s.onStored(StoreOutcome{true, "O1", 0, "", ""});
    h.step();
    // A new transaction starts from nothing; RSET too.
    h.feed("MAIL FROM:<alice@example.com>\r\nRCPT TO:<c@example.net>\r\n");
    CHECK(seen->empty());
    h.feed("DATA\r\nabandoned\r\n.\r\n");
    REQUIRE(h.takeAction<Store>());
    h.s.onStored(StoreOutcome{});
    h.step();
    int before = *resets;
    h.feed("RSET\r\n");
    CHECK(*resets > before);
    CHECK(seen->empty());
  }
  SUBCASE("BDAT chunks, missing final CRLF") {
    h.feedBytewise("BDAT 9\r\nSubject: ");
    h.feedBytewise("BDAT 9\r\nb\r\n\r\n.a\r\n");
    h.feedBytewise("BDAT 3 LAST\r\nend");
    auto* st = h.takeAction<Store>();
    REQUIRE(st);
    CHECK(st->content == "Subject: b\r\n\r\n.a\r\nend\r\n");
    CHECK(*seen == st->content);
  }
}

TEST_CASE("BDAT size limit and pipelined chunks after a failure") {
  auto c = testConfig();
  c.maxMessageBytes = 10;
  Harness h(c);
  h.envelope();
  CHECK(h.feed("BDAT 8\r\n12345678BDAT 8\r\n12345678BDAT 2 LAST\r\nab") ==
        std::vector<std::string>{"250 2.0.0 Ok: 8 octets received",
                                 "552 5.3.4 Message size exceeds fixed maximum message size",
                                 "503 5.5.1 Error: need MAIL command"});
  CHECK(h.takeAction<Store>() == nullptr);
  CHECK(h.last("NOOP\r\n") == "250 2.0.0 Ok");
}

TEST_CASE("BDAT before AUTH or recipients discards the chunk") {
  Harness h;
  h.connect(true);
  h.feed("EHLO x\r\n");
  CHECK(h.feed("BDAT 6\r\nQUIT\r\n") == std::vector<std::string>{"530 5.7.0 Authentication required"});
  CHECK_FALSE(h.hasClose());
  h.feed("AUTH PLAIN " + plainIr("", "alice", "pw") + "\r\n");
  h.s.onAuthResult(AuthVerdict::Ok);
  h.step();
  h.feed("MAIL FROM:<alice@example.com>\r\n");
  CHECK(h.feed("BDAT 3 LAST\r\nabc") == std::vector<std::string>{"554 5.5.1 Error: no valid recipients"});
  CHECK_FALSE(h.s.inTransaction());
}

// ---- session: timeouts, shutdown, overflow ---------------------------------------------

TEST_CASE("timeouts") {
  Harness h;
  h.connect();
  CHECK(h.s.timeoutFor() == std::chrono::seconds(300));
  h.s.onTimeout();
  CHECK(h.step() == std::vector<std::string>{"421 4.4.2 relay.test Error: timeout exceeded"});
  CHECK(h.hasClose());
}

TEST_CASE("timeout while a store is pending is answered after it") {
  Harness h;
  h.envelope();
  h.feed("DATA\r\nx\r\n.\r\n");
  REQUIRE(h.takeAction<Store>());
  h.s.onTimeout();
  CHECK(h.step().empty());
  h.s.onStored(StoreOutcome{true, "T1", 0, "", ""});
  CHECK(h.step() ==
        std::vector<std::string>{"250 2.0.0 Ok: queued as T1", "421 4.4.2 relay.test Error: timeout exceeded"});
  CHECK(h.hasClose());
}

TEST_CASE("shutdown") {
  SUBCASE("idle") {
    Harness h;
    h.connect();
    h.s.onShutdown();
    CHECK(h.step() == std::vector<std::string>{"421 4.3.2 Service shutting down"});
    CHECK(h.hasClose());
  }
  SUBCASE("during DATA: after the store answer") {
    Harness h;
    h.envelope();
    h.feed("DATA\r\nabc\r\n");
    h.s.onShutdown();
    CHECK(h.step().empty());
    h.feed(".\r\nNOOP\r\n");
    REQUIRE(h.takeAction<Store>());
    CHECK_FALSE(h.hasClose());
    h.s.onStored(StoreOutcome{true, "S1", 0, "", ""});
    CHECK(h.step() == std::vector<std::string>{"250 2.0.0 Ok: queued as S1", "421 4.3.2 Service shutting down"});
    CHECK(h.hasClose());
  }
  SUBCASE("between BDAT chunks") {
    Harness h;
    h.envelope();
    h.feed("BDAT 10\r\n12345");
    h.s.onShutdown();
    CHECK(h.feed("67890") ==
          std::vector<std::string>{"250 2.0.0 Ok: 10 octets received", "421 4.3.2 Service shutting down"});
  }
}

TEST_CASE("input while waiting is bounded") {
  Harness h;
  h.envelope();
  h.feed("DATA\r\nx\r\n.\r\n");
  REQUIRE(h.takeAction<Store>());
  std::string junk(64 * 1024, 'j');
  for (int i = 0; i < 10; ++i) h.feed(junk);
  CHECK(h.s.bufferedBytes() <= 256 * 1024);
  h.s.onStored(StoreOutcome{true, "O1", 0, "", ""});
  CHECK(h.step() == std::vector<std::string>{"250 2.0.0 Ok: queued as O1", "421 4.7.0 Too much pipelined input"});
}

TEST_CASE("peer closed: nothing more") {
  Harness h;
  h.envelope();
  h.feed("DATA\r\nx\r\n.\r\n");
  h.s.onPeerClosed();
  h.s.onStored(StoreOutcome{true, "P", 0, "", ""});
  h.s.onTimeout();
  h.s.onShutdown();
  h.feed("NOOP\r\n");
  auto before = h.out;
  h.collect();
  CHECK(h.out == before);
  CHECK(h.s.phase() == Phase::Closed);
}

TEST_CASE("random bytes never break the session") {
  uint64_t x = 0x9e3779b97f4a7c15ull;
  auto next = [&x] {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return x;
  };
  const std::string alphabet = "\r\n.:<>@ \"\\ABDEHILMNOPRSTQU0123456789=\x80\xff";
  for (int round = 0; round < 300; ++round) {
    auto c = testConfig();
    c.authWithoutTls = true;
    c.maxBadCommands = 1000;
    c.maxCommandLine = 64;
    Harness h(c);
    h.connect();
    h.feed("EHLO x\r\nAUTH PLAIN " + plainIr("", "alice", "pw") + "\r\n");
    h.s.onAuthResult(AuthVerdict::Ok);
    std::string in;
    size_t n = next() % 3000;
    for (size_t i = 0; i < n; ++i) in += alphabet[next() % alphabet.size()];
    h.feed(in);
    h.s.onStored(StoreOutcome{true, "R", 0, "", ""});
    h.s.onAuthResult(AuthVerdict::Failed);
    h.s.onTlsEstablished(tls13());
    h.collect();
    for (const auto& l : splitLines(h.out)) {
      CAPTURE(l);
      REQUIRE(l.size() >= 3);
      REQUIRE(parseReplyLine(l));
    }
  }
}

// ---- transcripts -----------------------------------------------------------------------

namespace {

std::string unescape(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '\\' || i + 1 >= s.size()) {
      out += s[i];
      continue;
    }
    char e = s[++i];
    switch (e) {
      case 'r':
        out += '\r';
        break;
      case 'n':
        out += '\n';
        break;
      case 't':
        out += '\t';
        break;
      case '0':
        out += '\0';
        break;
      case '\\':
        out += '\\';
        break;
      case 'x': {
        auto hex = [](char h) {
          return h >= '0' && h <= '9' ? h - '0' : (h | 0x20) >= 'a' && (h | 0x20) <= 'f' ? (h | 0x20) - 'a' + 10 : -1;
        };
        if (i + 2 < s.size() && hex(s[i + 1]) >= 0 && hex(s[i + 2]) >= 0) {
          out += static_cast<char>(hex(s[i + 1]) * 16 + hex(s[i + 2]));
          i += 2;
        } else {
          out += "\\x";
        }
        break;
      }
      default:
        out += '\\';
        out += e;
    }
  }
  return out;
}

std::vector<std::string> words(std::string_view s) {
  std::vector<std::string> out;
  std::istringstream is{std::string(s)};
  std::string w;
  while (is >> w) out.push_back(w);
  return out;
}

enum class Split { Whole, Bytewise, Irregular };

// Runs one transcript; returns every reply byte it produced (for the cross-mode check).
std::string runTranscript(const std::filesystem::path& file, Split split) {
  std::ifstream f(file);
  REQUIRE(f.good());
  SessionConfig cfg = testConfig();
  std::unique_ptr<ServerSession> s;
  std::string pending;  // client bytes not yet given to the session
  std::deque<std::string> lines;
  std::deque<Action> actions;
  std::string all;
  std::string partial;
  std::optional<Store> lastStore;
  uint64_t rng = 12345;
  bool closed = false;

  auto collect = [&] {
    for (auto& a : s->takeActions()) {
      if (auto* send = std::get_if<Send>(&a)) {
        REQUIRE_FALSE(closed);
        all += send->bytes;
        partial += send->bytes;
        size_t e;
        while ((e = partial.find("\r\n")) != std::string::npos) {
          lines.push_back(partial.substr(0, e));
          partial.erase(0, e + 2);
        }
      } else {
        if (std::holds_alternative<Close>(a)) closed = true;
        actions.push_back(std::move(a));
      }
    }
    REQUIRE(partial.empty());  // replies are whole CRLF lines
  };
  auto flush = [&] {
    if (pending.empty()) return;
    REQUIRE(s);
    switch (split) {
      case Split::Whole:
        s->onBytes(pending);
        break;
      case Split::Bytewise:
        for (char c : pending) s->onBytes(std::string_view(&c, 1));
        break;
      case Split::Irregular:
        for (size_t i = 0; i < pending.size();) {
          rng = rng * 6364136223846793005ull + 1442695040888963407ull;
          size_t n = 1 + (rng >> 33) % 17;
          if (n > pending.size() - i) n = pending.size() - i;
          s->onBytes(std::string_view(pending).substr(i, n));
          i += n;
        }
        break;
    }
    pending.clear();
    collect();
  };
  auto popAction = [&](auto tag) -> decltype(tag) {
    using T = decltype(tag);
    REQUIRE_MESSAGE(!actions.empty(), "expected an action, none left");
    auto* p = std::get_if<T>(&actions.front());
    REQUIRE_MESSAGE(p != nullptr, "unexpected action kind, index ", actions.front().index());
    T v = std::move(*p);
    actions.pop_front();
    return v;
  };

  std::string line;
  int lineNo = 0;
  while (std::getline(f, line)) {
    ++lineNo;
    CAPTURE(lineNo);
    CAPTURE(line);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || line[0] == '#') continue;
    if (line.rfind("C:", 0) == 0) {
      std::string_view t = std::string_view(line).substr(2);
      if (!t.empty() && t[0] == ' ') t.remove_prefix(1);
      pending += unescape(t) + "\r\n";
      continue;
    }
    if (line.rfind("R:", 0) == 0) {
      std::string_view t = std::string_view(line).substr(2);
      if (!t.empty() && t[0] == ' ') t.remove_prefix(1);
      pending += unescape(t);
      continue;
    }
    if (s) flush();
    if (line.rfind("S:", 0) == 0) {
      std::string_view t = std::string_view(line).substr(2);
      if (!t.empty() && t[0] == ' ') t.remove_prefix(1);
      REQUIRE_MESSAGE(!lines.empty(), "expected reply: ", std::string(t));
      CHECK(lines.front() == unescape(t));
      lines.pop_front();
      continue;
    }
    REQUIRE_MESSAGE(line[0] == '!', "unknown transcript line");
    auto w = words(std::string_view(line).substr(1));
    REQUIRE(!w.empty());
    const std::string& d = w[0];
    if (d == "config") {
      REQUIRE_FALSE(s);
      for (size_t i = 1; i < w.size(); ++i) {
        size_t eq = w[i].find('=');
        REQUIRE(eq != std::string::npos);
        std::string k = w[i].substr(0, eq);
        std::string v = w[i].substr(eq + 1);
        if (k == "starttls")
          cfg.starttlsAvailable = v == "yes";
        else if (k == "auth-without-tls")
          cfg.authWithoutTls = v == "yes";
        else if (k == "hostname")
          cfg.hostname = v;
        else if (k == "max-message-bytes")
          cfg.maxMessageBytes = std::stoull(v);
        else if (k == "max-recipients")
          cfg.maxRecipients = static_cast<uint32_t>(std::stoul(v));
        else if (k == "max-command-line")
          cfg.maxCommandLine = std::stoul(v);
        else if (k == "max-auth-line")
          cfg.maxAuthLine = std::stoul(v);
        else if (k == "max-bad-commands")
          cfg.maxBadCommands = static_cast<uint32_t>(std::stoul(v));
        else if (k == "max-auth-failures")
          cfg.maxAuthFailures = static_cast<uint32_t>(std::stoul(v));
        else if (k == "any-sender")
          cfg.senderAllowed = nullptr;
        else
          FAIL("unknown config key " << k);
      }
    } else if (d == "connect") {
      REQUIRE(w.size() == 2);
      s = std::make_unique<ServerSession>(cfg, 1);
      s->onConnect(Peer{"198.51.100.5", 51000, false}, w[1] == "tls" ? std::optional<TlsInfo>(tls13()) : std::nullopt);
      collect();
    } else if (d == "expect-starttls") {
      popAction(StartTls{});
    } else if (d == "tls") {
      s->onTlsEstablished(TlsInfo{w.size() > 1 ? w[1] : "TLSv1.3", "TLS_AES_128_GCM_SHA256"});
      collect();
    } else if (d == "expect-auth") {
      auto a = popAction(Authenticate{});
      REQUIRE(w.size() == 4);
      CHECK(a.mechanism == w[1]);
      CHECK(a.username == unescape(w[2]));
      CHECK(a.password == unescape(w[3]));
    } else if (d == "auth") {
      REQUIRE(w.size() >= 2);
      std::string text;
      for (size_t i = 2; i < w.size(); ++i) text += (i > 2 ? " " : "") + w[i];
      AuthVerdict v = w[1] == "ok"         ? AuthVerdict::Ok
                      : w[1] == "fail"     ? AuthVerdict::Failed
                      : w[1] == "tempfail" ? AuthVerdict::TempFail
                                           : AuthVerdict::Refused;
      s->onAuthResult(v, text);
      collect();
    } else if (d == "expect-store") {
      auto st = popAction(Store{});
      REQUIRE(w.size() >= 3);
      CHECK(st.envelope.mailFrom == (w[1] == "<>" ? "" : unescape(w[1])));
      std::string rcpts;
      for (const auto& r : st.envelope.recipients) rcpts += (rcpts.empty() ? "" : ",") + r;
      CHECK(rcpts == unescape(w[2]));
      for (size_t i = 3; i < w.size(); ++i) {
        if (w[i] == "utf8") CHECK(st.envelope.smtputf8);
        if (w[i] == "8bit") CHECK(st.envelope.eightBitMime);
        if (w[i] == "tls") CHECK(st.tls.has_value());
        if (w[i].rfind("account=", 0) == 0) CHECK(st.account == w[i].substr(8));
        if (w[i].rfind("helo=", 0) == 0) CHECK(st.heloName == w[i].substr(5));
      }
      lastStore = std::move(st);
    } else if (d == "expect-content") {
      REQUIRE(lastStore);
      std::string_view t = std::string_view(line).substr(line.find("expect-content") + 14);
      if (!t.empty() && t[0] == ' ') t.remove_prefix(1);
      CHECK(lastStore->content == unescape(t));
    } else if (d == "stored") {
      StoreOutcome o;
      if (w.size() >= 3 && w[1] == "ok") {
        o.ok = true;
        o.queueId = w[2];
      } else {
        REQUIRE(w.size() >= 4);
        o.ok = false;
        o.code = std::stoi(w[2]);
        o.enhanced = w[3];
        o.text.clear();
        for (size_t i = 4; i < w.size(); ++i) o.text += (i > 4 ? " " : "") + w[i];
      }
      s->onStored(o);
      collect();
    } else if (d == "expect-close") {
      popAction(Close{});
    } else if (d == "timeout") {
      s->onTimeout();
      collect();
    } else if (d == "shutdown") {
      s->onShutdown();
      collect();
    } else if (d == "phase") {
      static const char* names[] = {"greeting", "command", "data", "bdat", "waiting", "tlspending", "closed"};
      REQUIRE(w.size() == 2);
      CHECK(names[static_cast<int>(s->phase())] == w[1]);
    } else {
      FAIL("unknown directive " << d);
    }
  }
  if (s) flush();
  CHECK_MESSAGE(lines.empty(), "unexpected reply: ", lines.empty() ? "" : lines.front());
  CHECK_MESSAGE(actions.empty(), "unexpected action, index ", actions.empty() ? 0 : actions.front().index());
  return all;
}

}  // namespace

TEST_CASE("transcripts: whole, byte by byte, irregular pieces") {
  namespace fs = std::filesystem;
  fs::path dir = fs::path(SUBRELAY_TEST_DIR) / "transcripts";
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".txt") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  CHECK(files.size() >= 20);
  for (const auto& file : files) {
    CAPTURE(file.filename().string());
    std::string whole = runTranscript(file, Split::Whole);
    std::string bytewise = runTranscript(file, Split::Bytewise);
    std::string irregular = runTranscript(file, Split::Irregular);
    CHECK(whole == bytewise);
    CHECK(whole == irregular);
  }
}

// ---- hardening (issue 9) ------------------------------------------------------------------

TEST_CASE("junk commands: limit, 421, reset by an accepted message") {
  auto c = testConfig();
  c.maxJunkCommands = 5;
  SUBCASE("NOOP/RSET/HELP/VRFY/EHLO all count; the sixth closes") {
    Harness h(c);
    h.connect();
    CHECK(h.last("EHLO a\r\n").rfind("250 ", 0) == 0);
    CHECK(h.last("NOOP\r\n") == "250 2.0.0 Ok");
    CHECK(h.last("RSET\r\n") == "250 2.0.0 Ok");
    CHECK(h.last("HELP\r\n").rfind("214 ", 0) == 0);
    CHECK(h.last("VRFY x\r\n").rfind("252 ", 0) == 0);
    CHECK(h.last("NOOP\r\n") == "421 4.7.0 Too many commands without a mail transaction");
    CHECK(h.closed);
    auto* n = h.takeAction<Notice>();
    REQUIRE(n);
    CHECK(n->what.find("reason=junk-commands") != std::string::npos);
  }
  SUBCASE("pipelined flood: answered up to the limit, then one 421, nothing more") {
    Harness h(c);
    h.connect();
    std::string flood;
    for (int i = 0; i < 1000; ++i) flood += "EHLO a\r\n";
    h.feed(flood);
    CHECK(h.closed);
    auto lines = splitLines(h.out);
    CHECK(lines.back() == "421 4.7.0 Too many commands without a mail transaction");
    CHECK(h.out.size() < 2000);
  }
  SUBCASE("an accepted message starts the count over") {
    Harness h(c);
    h.login();  // EHLO = 1
    for (int round = 0; round < 3; ++round) {
      for (int i = 0; i < 4; ++i) REQUIRE(h.last("NOOP\r\n") == "250 2.0.0 Ok");
      h.feed("MAIL FROM:<alice@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n");
      h.feed("Subject: x\r\n\r\nx\r\n.\r\n");
      REQUIRE(h.takeAction<Store>());
      h.s.onStored(StoreOutcome{true, "Q1"});
      REQUIRE(h.step().back() == "250 2.0.0 Ok: queued as Q1");
    }
    CHECK_FALSE(h.closed);
  }
  SUBCASE("0 means no limit") {
    c.maxJunkCommands = 0;
    Harness h(c);
    h.connect();
    for (int i = 0; i < 500; ++i) REQUIRE(h.last("NOOP\r\n") == "250 2.0.0 Ok");
  }
}

TEST_CASE("AUTH: overlong username and password are refused without the verifier") {
  Harness h;
  h.connect(true);
  h.feed("EHLO c\r\n");
  std::string longUser(9000, 'u');
  CHECK(h.last("AUTH PLAIN " + plainIr("", longUser, "pw") + "\r\n") == "501 5.5.2 Username too long (at most 255 bytes)");
  CHECK(h.takeAction<Authenticate>() == nullptr);
  auto* n = h.takeAction<Notice>();
  REQUIRE(n);
  CHECK(n->what == "reason=username-too-long");
  // LOGIN: refused at the username, no password prompt.
  CHECK(h.last("AUTH LOGIN\r\n") == "334 VXNlcm5hbWU6");
  CHECK(h.last(base64Encode(longUser) + "\r\n") == "501 5.5.2 Username too long (at most 255 bytes)");
  CHECK(h.last("AUTH LOGIN " + base64Encode(longUser) + "\r\n") == "501 5.5.2 Username too long (at most 255 bytes)");
  CHECK(h.takeAction<Authenticate>() == nullptr);
  // 255 bytes is fine.
  h.feed("AUTH PLAIN " + plainIr("", std::string(255, 'u'), "pw") + "\r\n");
  REQUIRE(h.takeAction<Authenticate>());
  h.s.onAuthResult(AuthVerdict::Failed);
  h.step();
  // A password over the bound: 535 at once, like a wrong one.
  CHECK(h.last("AUTH PLAIN " + plainIr("", "alice", std::string(1025, 'p')) + "\r\n") ==
        "535 5.7.8 Authentication credentials invalid");
  CHECK(h.takeAction<Authenticate>() == nullptr);
  bool sawPw = false;
  while (auto* nn = h.takeAction<Notice>()) sawPw = sawPw || nn->what == "reason=password-too-long";
  CHECK(sawPw);
}

TEST_CASE("NUL in content is refused like bare CR/LF (DATA and BDAT)") {
  for (int bytewise = 0; bytewise < 2; ++bytewise) {
    CAPTURE(bytewise);
    Harness h;
    h.envelope();
    h.feed("DATA\r\n");
    std::string msg = std::string("Subject: a\r\n\r\na\0b\r\n", 19) + std::string("\r\n\0.\r\nMAIL FROM:<x@evil.example>\r\n", 34) + ".\r\n";
    auto lines = bytewise ? h.feedBytewise(msg) : h.feed(msg);
    CHECK(lines == std::vector<std::string>{"550 5.6.0 Message contains NUL characters"});
    CHECK(h.takeAction<Store>() == nullptr);
    CHECK(h.last("RCPT TO:<b@example.net>\r\n") == "503 5.5.1 Error: need MAIL command");
    // The next message in the session is fine.
    h.feed("MAIL FROM:<alice@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nSubject: ok\r\n\r\nok\r\n.\r\n");
    REQUIRE(h.takeAction<Store>());
  }
  Harness h;
  h.envelope();
  std::string chunk("Subject: a\r\n\r\n\0\r\n", 17);
  CHECK(h.last("BDAT " + std::to_string(chunk.size()) + " LAST\r\n" + chunk) == "550 5.6.0 Message contains NUL characters");
  CHECK(h.takeAction<Store>() == nullptr);
}

TEST_CASE("content observer refusal: rest of the data read and dropped, refusal at the end") {
  auto c = testConfig();
  auto pieces = std::make_shared<size_t>(0);
  c.onContent = [pieces](std::string_view) -> std::optional<PolicyRefusal> {
    if (++*pieces == 3) return PolicyRefusal{552, "5.3.4", "Message header section too large (limit 10 bytes)"};
    return std::nullopt;
  };
  Harness h(c);
  h.envelope();
  h.feed("DATA\r\n");
  CHECK(h.feed("a: 1\r\nb: 2\r\nc: 3\r\nd: 4\r\n\r\nbody\r\n").empty());
  size_t seen = *pieces;
  CHECK(h.feed("more body\r\n").empty());
  CHECK(*pieces == seen);  // nothing passed on after the refusal
  CHECK(h.feed(".\r\n") == std::vector<std::string>{"552 5.3.4 Message header section too large (limit 10 bytes)"});
  CHECK(h.takeAction<Store>() == nullptr);
  CHECK_FALSE(h.s.inTransaction());
}

TEST_CASE("null sender: its own reply when the account may not use it") {
  Harness h;
  h.login();
  CHECK(h.last("MAIL FROM:<>\r\n") == "550 5.7.1 Null sender <> not allowed for this account (accounts[].allow_null_sender)");
  auto c = testConfig();
  c.senderAllowed = [](std::string_view, std::string_view addr) { return addr.empty() || addr == "alice@example.com"; };
  Harness h2(c);
  h2.login();
  CHECK(h2.last("MAIL FROM:<>\r\n") == "250 2.1.0 Ok");
}

TEST_CASE("MAIL FROM ... REQUIRETLS (RFC 8689)") {
  SUBCASE("inside TLS: tagged") {
    Harness h;
    h.login();
    CHECK(h.last("MAIL FROM:<alice@example.com> REQUIRETLS=yes\r\n") == "501 5.5.4 REQUIRETLS takes no value");
    CHECK(h.last("MAIL FROM:<alice@example.com> requiretls\r\n") == "250 2.1.0 Ok");
    CHECK(h.last("RCPT TO:<bob@example.net>\r\n") == "250 2.1.5 Ok");
    h.feed("DATA\r\n");
    h.feed("Subject: x\r\n\r\nbody\r\n.\r\n");
    auto* st = h.takeAction<Store>();
    REQUIRE(st != nullptr);
    CHECK(st->envelope.requireTls);
  }
  SUBCASE("a loopback listener without TLS refuses it") {
    auto c = testConfig();
    c.starttlsAvailable = false;
    c.authWithoutTls = true;
    Harness h(c);
    h.connect();
    h.feed("EHLO x\r\n");
    h.feed("AUTH PLAIN " + plainIr("", "alice", "pw") + "\r\n");
    REQUIRE(h.takeAction<Authenticate>() != nullptr);
    h.s.onAuthResult(AuthVerdict::Ok);
    h.step();
    CHECK(h.last("MAIL FROM:<alice@example.com> REQUIRETLS\r\n") ==
          "530 5.7.10 REQUIRETLS needs a TLS session (use STARTTLS or the implicit-TLS port)");
    CHECK_FALSE(h.s.inTransaction());
  }
}

// ---- DSN extension (RFC 3461) ----------------------------------------------------------

TEST_CASE("xtext (RFC 3461 section 4)") {
  CHECK(decodeXtext("abc") == std::optional<std::string>("abc"));
  CHECK(decodeXtext("a+2Bb+3Dc") == std::optional<std::string>("a+b=c"));
  CHECK(decodeXtext("") == std::optional<std::string>(""));
  CHECK_FALSE(decodeXtext("a+2b"));  // lower-case hex
  CHECK_FALSE(decodeXtext("a+2"));   // cut short
  CHECK_FALSE(decodeXtext("a+"));
  CHECK_FALSE(decodeXtext("a=b"));
  CHECK_FALSE(decodeXtext("a b"));
  CHECK_FALSE(decodeXtext("\xc3\xa5"));
  CHECK(encodeXtext("a+b=c d") == "a+2Bb+3Dc+20d");
  CHECK(decodeXtext(encodeXtext("x+y=z\t")) == std::optional<std::string>("x+y=z\t"));
}

TEST_CASE("NOTIFY, RET, ENVID, ORCPT values") {
  CHECK(parseNotify("NEVER") == std::optional<uint8_t>(kNotifyNever));
  CHECK(parseNotify("never") == std::optional<uint8_t>(kNotifyNever));
  CHECK(parseNotify("SUCCESS") == std::optional<uint8_t>(kNotifySuccess));
  CHECK(parseNotify("FAILURE,DELAY") == std::optional<uint8_t>(kNotifyFailure | kNotifyDelay));
  CHECK(parseNotify("delay,Success,FAILURE") == std::optional<uint8_t>(kNotifyFailure | kNotifyDelay | kNotifySuccess));
  CHECK_FALSE(parseNotify("NEVER,SUCCESS"));
  CHECK_FALSE(parseNotify("SUCCESS,NEVER"));
  CHECK_FALSE(parseNotify("SUCCESS,SUCCESS"));
  CHECK_FALSE(parseNotify("SUCCESS,"));
  CHECK_FALSE(parseNotify(""));
  CHECK_FALSE(parseNotify("ALWAYS"));
  CHECK(notifyValue(kNotifySuccess | kNotifyDelay) == "SUCCESS,DELAY");
  CHECK(notifyValue(kNotifyNever) == "NEVER");
  CHECK(notifyValue(0).empty());
  CHECK(parseRet("full") == std::optional<DsnRet>(DsnRet::Full));
  CHECK(parseRet("HDRS") == std::optional<DsnRet>(DsnRet::Hdrs));
  CHECK_FALSE(parseRet("BODY"));
  CHECK(validEnvid("QQ314159"));
  CHECK(validEnvid("a+20b"));
  CHECK_FALSE(validEnvid(""));
  CHECK_FALSE(validEnvid(std::string(101, 'x')));
  CHECK(validEnvid(std::string(100, 'x')));
  CHECK_FALSE(validEnvid("a+00b"));  // decodes to a control character
  CHECK_FALSE(validEnvid("a+C3+A5"));  // decodes to non-ASCII
  CHECK(validOrcpt("rfc822;bob@example.net"));
  CHECK(validOrcpt("rfc822;bob+2Bx@example.net"));
  CHECK_FALSE(validOrcpt("rfc822;"));
  CHECK_FALSE(validOrcpt(";bob@example.net"));
  CHECK_FALSE(validOrcpt("bob@example.net"));
  CHECK_FALSE(validOrcpt("rfc 822;bob@example.net"));
  CHECK_FALSE(validOrcpt("rfc822;bob+2bx@example.net"));
  CHECK_FALSE(validOrcpt("rfc822;" + std::string(494, 'x')));
  CHECK(validOrcpt("rfc822;" + std::string(493, 'x')));
  CHECK(orcptField("rfc822;bob+2Bx@example.net") == "rfc822; bob+x@example.net");
  CHECK(orcptField("rfc822").empty());
}

TEST_CASE("DSN: EHLO offers it; MAIL and RCPT parameters reach the envelope") {
  Harness h;
  h.connect();
  auto lines = h.feed("EHLO client.test\r\n");
  CHECK(std::find(lines.begin(), lines.end(), "250-DSN") != lines.end());
  Harness t;
  t.login();
  CHECK(t.last("MAIL FROM:<alice@example.com> RET=PART\r\n") == "501 5.5.4 Bad RET parameter (RET=FULL or RET=HDRS)");
  CHECK(t.last("MAIL FROM:<alice@example.com> RET\r\n") == "501 5.5.4 Bad RET parameter (RET=FULL or RET=HDRS)");
  CHECK(t.last("MAIL FROM:<alice@example.com> RET=FULL RET=HDRS\r\n") == "501 5.5.4 Duplicate RET parameter");
  CHECK(t.last("MAIL FROM:<alice@example.com> ENVID=a+2x\r\n") ==
        "501 5.5.4 Bad ENVID parameter (xtext of printable ASCII, at most 100 characters)");
  CHECK(t.last("MAIL FROM:<alice@example.com> ENVID=" + std::string(101, 'e') + "\r\n") ==
        "501 5.5.4 Bad ENVID parameter (xtext of printable ASCII, at most 100 characters)");
  CHECK(t.last("MAIL FROM:<alice@example.com> ENVID=a ENVID=b\r\n") == "501 5.5.4 Duplicate ENVID parameter");
  CHECK_FALSE(t.s.inTransaction());
  CHECK(t.last("MAIL FROM:<alice@example.com> RET=hdrs ENVID=QQ+2B1\r\n") == "250 2.1.0 Ok");
  CHECK(t.last("RCPT TO:<a@example.net> NOTIFY=NEVER,SUCCESS\r\n") ==
        "501 5.5.4 Bad NOTIFY parameter (NEVER, or a list of SUCCESS, FAILURE, DELAY)");
  CHECK(t.last("RCPT TO:<a@example.net> NOTIFY\r\n") ==
        "501 5.5.4 Bad NOTIFY parameter (NEVER, or a list of SUCCESS, FAILURE, DELAY)");
  CHECK(t.last("RCPT TO:<a@example.net> NOTIFY=NEVER NOTIFY=NEVER\r\n") == "501 5.5.4 Duplicate NOTIFY parameter");
  CHECK(t.last("RCPT TO:<a@example.net> ORCPT=bob@example.net\r\n") ==
        "501 5.5.4 Bad ORCPT parameter (addr-type;xtext, at most 500 characters)");
  CHECK(t.last("RCPT TO:<a@example.net> ORCPT=rfc822;" + std::string(494, 'x') + "\r\n") ==
        "501 5.5.4 Bad ORCPT parameter (addr-type;xtext, at most 500 characters)");
  CHECK(t.last("RCPT TO:<a@example.net> ORCPT=rfc822;a ORCPT=rfc822;a\r\n") == "501 5.5.4 Duplicate ORCPT parameter");
  CHECK(t.last("RCPT TO:<a@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+2B1@example.net\r\n") ==
        "250 2.1.5 Ok");
  CHECK(t.last("RCPT TO:<b@example.net>\r\n") == "250 2.1.5 Ok");
  CHECK(t.last("RCPT TO:<c@example.net> notify=never\r\n") == "250 2.1.5 Ok");
  t.feed("DATA\r\n");
  t.feed("Subject: x\r\n\r\nbody\r\n.\r\n");
  auto* st = t.takeAction<Store>();
  REQUIRE(st != nullptr);
  const Envelope& e = st->envelope;
  CHECK(e.ret == DsnRet::Hdrs);
  CHECK(e.envid == "QQ+2B1");
  REQUIRE(e.recipientDsn.size() == e.recipients.size());
  REQUIRE(e.recipients.size() == 3);
  CHECK(e.recipientDsn[0].notify == (kNotifySuccess | kNotifyFailure));
  CHECK(e.recipientDsn[0].orcpt == "rfc822;a+2B1@example.net");
  CHECK(e.recipientDsn[1].notify == 0);
  CHECK(e.recipientDsn[1].orcpt.empty());
  CHECK(e.recipientDsn[2].notify == kNotifyNever);
}

TEST_CASE("DSN: a new transaction starts without the last one's parameters") {
  Harness t;
  t.login();
  CHECK(t.last("MAIL FROM:<alice@example.com> RET=FULL ENVID=x\r\n") == "250 2.1.0 Ok");
  CHECK(t.last("RCPT TO:<a@example.net> NOTIFY=DELAY\r\n") == "250 2.1.5 Ok");
  CHECK(t.last("RSET\r\n") == "250 2.0.0 Ok");
  CHECK(t.last("MAIL FROM:<alice@example.com>\r\n") == "250 2.1.0 Ok");
  CHECK(t.last("RCPT TO:<a@example.net>\r\n") == "250 2.1.5 Ok");
  t.feed("DATA\r\n");
  t.feed("Subject: x\r\n\r\nbody\r\n.\r\n");
  auto* st = t.takeAction<Store>();
  REQUIRE(st != nullptr);
  CHECK(st->envelope.ret == DsnRet::Unspecified);
  CHECK(st->envelope.envid.empty());
  REQUIRE(st->envelope.recipientDsn.size() == 1);
  CHECK(st->envelope.recipientDsn[0].notify == 0);
}
