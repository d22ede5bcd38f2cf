// Unit tests for smtp::ClientSession (RFC 5321 client side, RFC 3207, RFC 2920, RFC 1870,
// RFC 6152, RFC 6531) and dotStuff(): a scripted server feeds replies and the tests check
// the exact bytes the client sends and the actions it returns. Scenarios that depend on
// how replies are split run whole, one byte at a time and in irregular pieces, and must
// give the same log each time.
#include <doctest/doctest.h>

#include <memory>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "smtp/client_session.h"
#include "smtp/command.h"

using namespace subrelay::smtp;
using namespace std::chrono_literals;

namespace {

enum class Split { Whole, Bytewise, Irregular };
constexpr Split kSplits[] = {Split::Whole, Split::Bytewise, Split::Irregular};

const char* outcomeName(Outcome o) {
  switch (o) {
    case Outcome::Delivered:
      return "ok";
    case Outcome::TempFail:
      return "temp";
    case Outcome::PermFail:
      return "perm";
  }
  return "?";
}

ClientConfig testConfig(ClientTls tls = ClientTls::Opportunistic) {
  ClientConfig c;
  c.heloName = "relay.example.net";
  c.tls = tls;
  return c;
}

// A scripted server around one ClientSession.
struct Harness {
  ClientSession s;
  Split split;
  std::string sent;  // client bytes not yet checked
  std::string log;   // every action, in order, for comparing splits
  std::vector<TransactionDone> dones;
  std::vector<SessionFailed> fails;
  int startTls = 0, closes = 0, readies = 0;
  uint32_t rng = 12345;

  explicit Harness(ClientConfig cfg = testConfig(), Split sp = Split::Whole) : s(std::move(cfg)), split(sp) {
    s.onConnected();
    pump();
  }

  void pump() {
    for (auto& a : s.takeActions()) {
      if (auto* b = std::get_if<SendBytes>(&a)) {
        sent += b->bytes;
        log += "C[" + b->bytes + "]";
      } else if (std::holds_alternative<StartTls>(a)) {
        ++startTls;
        log += "<starttls>";
      } else if (std::holds_alternative<CloseConnection>(a)) {
        ++closes;
        log += "<close>";
      } else if (std::holds_alternative<SessionReady>(a)) {
        ++readies;
        log += "<ready>";
      } else if (auto* d = std::get_if<TransactionDone>(&a)) {
        log += "<done";
        for (auto& r : d->results)
          log += " " + r.recipient + "=" + outcomeName(r.outcome) + "/" + r.stage + "/" + r.reply.summary();
        log += ">";
        dones.push_back(*d);
      } else if (auto* f = std::get_if<SessionFailed>(&a)) {
        log += "<failed " + f->stage + " " + outcomeName(f->outcome) + " " + f->reply.summary() + ">";
        fails.push_back(*f);
      }
    }
  }

  // The server writes bytes (\n in the script becomes CRLF unless raw).
  void srv(std::string_view text, bool raw = false) {
    std::string bytes;
    if (raw) {
      bytes = text;
    } else {
      for (char c : text) {
        if (c == '\n') bytes += '\r';
        bytes += c;
      }
    }
    switch (split) {
      case Split::Whole:
        s.onBytes(bytes);
        pump();
        break;
      case Split::Bytewise:
        for (char c : bytes) {
          s.onBytes(std::string_view(&c, 1));
          pump();
        }
        break;
      case Split::Irregular:
        for (size_t i = 0; i < bytes.size();) {
          rng = rng * 1103515245u + 12345u;
          size_t n = 1 + (rng >> 16) % 13;
          if (n > bytes.size() - i) n = bytes.size() - i;
          s.onBytes(std::string_view(bytes).substr(i, n));
          pump();
          i += n;
        }
        break;
    }
  }

  // What the client sent since the last call.
  std::string take() {
    std::string out;
    out.swap(sent);
    return out;
  }

  void send(OutboundMessage m) {
    s.send(std::move(m));
    pump();
  }
  void quit() {
    s.quit();
    pump();
  }
  void tlsUp() {
    s.onTlsEstablished();
    pump();
  }
};

OutboundMessage message(std::vector<std::string> rcpts, std::string content = "Subject: hi\r\n\r\nbody\r\n",
                        std::string from = "alice@example.com") {
  OutboundMessage m;
  m.mailFrom = std::move(from);
  m.recipients = std::move(rcpts);
  m.content = std::make_shared<const std::string>(std::move(content));
  return m;
}

// A 250 EHLO reply naming `server` with the comma-separated capability lines.
std::string ehloReply(std::string_view server, std::string_view caps) {
  std::string reply = "250";
  reply += caps.empty() ? " " : "-";
  reply += std::string(server) + "\n";
  std::string c(caps);
  size_t pos = 0;
  while (pos < c.size()) {
    size_t e = c.find(',', pos);
    if (e == std::string::npos) e = c.size();
    reply += "250" + std::string(e == c.size() ? " " : "-") + c.substr(pos, e - pos) + "\n";
    pos = e + 1;
  }
  return reply;
}

// Greeting and EHLO with the given capability lines (no STARTTLS unless listed).
void handshake(Harness& h, std::string_view caps) {
  h.srv("220 mx.example.org ESMTP\n");
  CHECK(h.take() == "EHLO relay.example.net\r\n");
  h.srv(ehloReply("mx.example.org hello", caps));
}

bool onlyCrlf(std::string_view s) {
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\r' && (i + 1 >= s.size() || s[i + 1] != '\n')) return false;
    if (s[i] == '\n' && (i == 0 || s[i - 1] != '\r')) return false;
  }
  return true;
}

}  // namespace

// ---- dotStuff and ServerReply -------------------------------------------------------

TEST_CASE("dotStuff: RFC 5321 4.5.2 transparency and line ends") {
  CHECK(dotStuff("") == ".\r\n");
  CHECK(dotStuff("a\r\n") == "a\r\n.\r\n");
  CHECK(dotStuff("a") == "a\r\n.\r\n");  // final CRLF added
  CHECK(dotStuff(".") == "..\r\n.\r\n");
  CHECK(dotStuff(".\r\n") == "..\r\n.\r\n");  // a lone dot line is not the end
  CHECK(dotStuff("..x\r\n.y\r\nz.\r\n") == "...x\r\n..y\r\nz.\r\n.\r\n");
  CHECK(dotStuff("a\nb\rc\r\n") == "a\r\nb\r\nc\r\n.\r\n");  // bare LF / CR become CRLF
  CHECK(dotStuff("a\n.\nb") == "a\r\n..\r\nb\r\n.\r\n");
  CHECK(dotStuff("\r\n.\r\n") == "\r\n..\r\n.\r\n");
  CHECK(dotStuff("\r") == "\r\n.\r\n");
  CHECK(dotStuff("\n") == "\r\n.\r\n");
  CHECK(dotStuff("a\r\r\nb") == "a\r\n\r\nb\r\n.\r\n");  // CR then CRLF: two line ends
  CHECK(dotStuff("x.\r\n. \r\n") == "x.\r\n.. \r\n.\r\n");
  std::string smuggle = "Hi\n.\r\nMAIL FROM:<x>\r\n";
  std::string out = dotStuff(smuggle);
  CHECK(onlyCrlf(out));
  CHECK(out.find("\r\n.\r\n") == out.size() - 5);  // the only terminator is ours
}

TEST_CASE("ServerReply::summary") {
  ServerReply r;
  r.code = 550;
  r.enhanced = "5.1.1";
  r.text = "no such user\nsecond line";
  CHECK(r.summary() == "550 5.1.1 no such user");
  r.enhanced = "";
  CHECK(r.summary() == "550 no such user");
  ServerReply local;
  local.enhanced = "5.3.4";
  local.text = "too big";
  CHECK(local.summary() == "5.3.4 too big");
  ServerReply ctl;
  ctl.code = 250;
  ctl.text = "a\rb\x01";
  CHECK(ctl.summary() == "250 a?b?");
  CHECK(ServerReply{}.summary().empty());
}

// ---- session set-up -------------------------------------------------------------------

TEST_CASE("plain EHLO path and a non-pipelined transaction") {
  for (Split sp : kSplits) {
    CAPTURE(static_cast<int>(sp));
    Harness h(testConfig(), sp);
    CHECK(h.s.timeout() == 300s);  // 4.5.3.2.1 greeting
    CHECK_FALSE(h.s.idle());
    handshake(h, "8BITMIME,SIZE 10000,ENHANCEDSTATUSCODES,CHUNKING");
    CHECK(h.readies == 1);
    CHECK(h.s.idle());
    CHECK(h.take().empty());
    CHECK_FALSE(h.s.offersPipelining());
    CHECK_FALSE(h.s.offersStartTls());
    CHECK_FALSE(h.s.tlsActive());
    CHECK(h.s.serverSizeLimit() == 10000u);
    CHECK(h.s.timeout() == std::nullopt);

    auto m = message({"bob@example.org", "carol@example.org"}, ".hidden\r\nline");
    m.eightBit = true;
    h.send(std::move(m));
    CHECK(h.take() == "MAIL FROM:<alice@example.com> SIZE=15 BODY=8BITMIME\r\n");
    CHECK(h.s.timeout() == 300s);
    h.srv("250 2.1.0 ok\n");
    CHECK(h.take() == "RCPT TO:<bob@example.org>\r\n");
    h.srv("250 2.1.5 ok\n");
    CHECK(h.take() == "RCPT TO:<carol@example.org>\r\n");
    h.srv("250 2.1.5 ok\n");
    CHECK(h.take() == "DATA\r\n");
    CHECK(h.s.timeout() == 120s);
    h.srv("354 go ahead\n");
    CHECK(h.take() == "..hidden\r\nline\r\n.\r\n");
    CHECK(h.s.timeout() == 600s);
    h.srv("250 2.0.0 queued as X1\n");
    REQUIRE(h.dones.size() == 1);
    auto& res = h.dones[0].results;
    REQUIRE(res.size() == 2);
    CHECK(res[0].recipient == "bob@example.org");
    CHECK(res[0].outcome == Outcome::Delivered);
    CHECK(res[0].stage == "data-end");
    CHECK(res[0].reply.code == 250);
    CHECK(res[0].reply.enhanced == "2.0.0");
    CHECK(res[0].reply.text == "queued as X1");
    CHECK(res[1].outcome == Outcome::Delivered);
    CHECK(h.s.idle());

    h.quit();
    CHECK(h.take() == "QUIT\r\n");
    CHECK(h.closes == 0);
    h.srv("221 2.0.0 bye\n");
    CHECK(h.closes == 1);
    CHECK(h.s.closed());
    CHECK(h.fails.empty());
    CHECK(h.s.timeout() == std::nullopt);
  }
}

TEST_CASE("HELO fallback when EHLO is refused") {
  for (int code : {500, 502, 501}) {
    Harness h;
    h.srv("220 old.example.org\n");
    CHECK(h.take() == "EHLO relay.example.net\r\n");
    h.srv(std::to_string(code) + " command not recognized\n");
    CHECK(h.take() == "HELO relay.example.net\r\n");
    CHECK(h.readies == 0);
    h.srv("250 old.example.org\n");
    CHECK(h.readies == 1);
    CHECK_FALSE(h.s.offersPipelining());
    CHECK(h.s.serverSizeLimit() == std::nullopt);
    h.send(message({"bob@example.org"}));
    CHECK(h.take() == "MAIL FROM:<alice@example.com>\r\n");  // no SIZE= without the extension
  }
  SUBCASE("HELO refused too") {
    Harness h;
    h.srv("220 x\n");
    h.srv("502 no\n");
    h.take();
    h.srv("550 go away\n");
    REQUIRE(h.fails.size() == 1);
    CHECK(h.fails[0].stage == "ehlo");
    CHECK(h.fails[0].outcome == Outcome::TempFail);
    CHECK(h.take() == "QUIT\r\n");
    CHECK(h.closes == 1);
  }
  SUBCASE("EHLO 554 and 421 fail without HELO") {
    Harness h;
    h.srv("220 x\n554 no service\n");
    h.take();
    REQUIRE(h.fails.size() == 1);
    CHECK(h.fails[0].reply.code == 554);
    Harness h2;
    h2.srv("220 x\n");
    h2.take();
    h2.srv("421 4.3.2 shutting down\n");
    REQUIRE(h2.fails.size() == 1);
    CHECK(h2.fails[0].reply.enhanced == "4.3.2");
    CHECK(h2.take().empty());  // no QUIT after 421 (RFC 5321 3.8)
  }
}

TEST_CASE("greeting refusals") {
  SUBCASE("554: QUIT, failed as TempFail so the next MX is tried") {
    Harness h;
    h.srv("554-5.7.1 no mail\n554 5.7.1 from you\n");
    CHECK(h.take() == "QUIT\r\n");
    REQUIRE(h.fails.size() == 1);
    CHECK(h.fails[0].outcome == Outcome::TempFail);
    CHECK(h.fails[0].stage == "connect");
    CHECK(h.fails[0].reply.code == 554);
    CHECK(h.fails[0].reply.text == "no mail\nfrom you");
    CHECK(h.closes == 1);
    CHECK(h.s.closed());
  }
  SUBCASE("421: no QUIT") {
    Harness h;
    h.srv("421 busy\n");
    CHECK(h.take().empty());
    REQUIRE(h.fails.size() == 1);
    CHECK(h.fails[0].reply.code == 421);
    CHECK(h.closes == 1);
  }
  SUBCASE("multi-line greeting") {
    Harness h;
    h.srv("220-mx.example.org\n220-second\n220 third\n");
    CHECK(h.take() == "EHLO relay.example.net\r\n");
  }
}

TEST_CASE("STARTTLS flow forgets pre-TLS capabilities (RFC 3207 4.2)") {
  for (Split sp : kSplits) {
    Harness h(testConfig(), sp);
    handshake(h, "PIPELINING,STARTTLS,SIZE 1000,SMTPUTF8");
    CHECK(h.take() == "STARTTLS\r\n");
    CHECK(h.readies == 0);
    CHECK(h.s.offersStartTls());
    CHECK(h.s.timeout() == 300s);
    h.srv("220 2.0.0 ready to start TLS\n");
    CHECK(h.startTls == 1);
    CHECK(h.take().empty());
    CHECK(h.s.timeout() == 300s);  // the handshake is bounded like a command
    h.tlsUp();
    CHECK(h.s.tlsActive());
    CHECK(h.take() == "EHLO relay.example.net\r\n");
    CHECK_FALSE(h.s.offersPipelining());  // forgotten
    CHECK(h.s.serverSizeLimit() == std::nullopt);
    h.srv("250-mx.example.org\n250 SIZE 2000\n");
    CHECK(h.take().empty());  // no second STARTTLS
    CHECK(h.readies == 1);
    CHECK_FALSE(h.s.offersPipelining());
    CHECK_FALSE(h.s.offersStartTls());
    CHECK(h.s.serverSizeLimit() == 2000u);
    auto m = message({"bob@example.org"});
    m.smtputf8 = true;  // SMTPUTF8 was offered only before TLS
    h.send(std::move(m));
    REQUIRE(h.dones.size() == 1);
    CHECK(h.dones[0].results[0].reply.enhanced == "5.6.7");
    CHECK(h.take().empty());
  }
}

TEST_CASE("STARTTLS: bytes after the 220 are an injection, not replies") {
  for (Split sp : kSplits) {
    Harness h(testConfig(), sp);
    handshake(h, "STARTTLS");
    h.take();
    h.srv("220 go\n250-injected\n250 PIPELINING\n");
    CHECK(h.startTls == 1);
    REQUIRE(h.fails.size() == 1);
    CHECK(h.fails[0].stage == "starttls");
    CHECK(h.fails[0].reply.text.find("after the STARTTLS reply") != std::string::npos);
    CHECK(h.closes == 1);
    h.tlsUp();
    CHECK(h.take().empty());
  }
}

TEST_CASE("TLS required, refused or failed") {
  SUBCASE("not offered") {
    Harness h(testConfig(ClientTls::Required));
    handshake(h, "PIPELINING");
    CHECK(h.take() == "QUIT\r\n");
    REQUIRE(h.fails.size() == 1);
    CHECK(h.fails[0].stage == "starttls");
    CHECK(h.fails[0].outcome == Outcome::TempFail);
    CHECK(h.fails[0].reply.code == 0);
    CHECK(h.fails[0].reply.text == "TLS required but the server does not offer STARTTLS");
    CHECK(h.readies == 0);
    CHECK(h.closes == 1);
  }
  SUBCASE("HELO fallback cannot satisfy Required") {
    Harness h(testConfig(ClientTls::Required));
    h.srv("220 x\n502 no\n250 x\n");
    CHECK(h.take() == "EHLO relay.example.net\r\nHELO relay.example.net\r\nQUIT\r\n");
    REQUIRE(h.fails.size() == 1);
  }
  SUBCASE("454 to STARTTLS, Opportunistic: continue in clear") {
    Harness h;
    handshake(h, "STARTTLS,PIPELINING");
    CHECK(h.take() == "STARTTLS\r\n");
    h.srv("454 4.7.0 TLS not available\n");
    CHECK(h.readies == 1);
    CHECK(h.s.offersPipelining());
    CHECK_FALSE(h.s.tlsActive());
    CHECK(h.take().empty());
  }
  SUBCASE("454 to STARTTLS, Required: fail") {
    Harness h(testConfig(ClientTls::Required));
    handshake(h, "STARTTLS");
    h.take();
    h.srv("454 4.7.0 TLS not available\n");
    REQUIRE(h.fails.size() == 1);
    CHECK(h.fails[0].reply.code == 454);
    CHECK(h.take() == "QUIT\r\n");
  }
  SUBCASE("handshake failure") {
    Harness h(testConfig(ClientTls::Required));
    handshake(h, "STARTTLS");
    h.take();
    h.srv("220 go\n");
    h.s.onTlsFailed("certificate verify failed");
    h.pump();
    REQUIRE(h.fails.size() == 1);
    CHECK(h.fails[0].stage == "starttls");
    CHECK(h.fails[0].outcome == Outcome::TempFail);
    CHECK(h.fails[0].reply.text == "TLS handshake failed: certificate verify failed");
    CHECK(h.closes == 1);
  }
  SUBCASE("implicit TLS: no STARTTLS even when offered") {
    Harness h(testConfig(ClientTls::Implicit));
    CHECK(h.s.tlsActive());
    handshake(h, "STARTTLS");
    CHECK(h.take().empty());
    CHECK(h.readies == 1);
  }
}

// ---- pipelining -------------------------------------------------------------------------

TEST_CASE("pipelined MAIL/RCPT/DATA with mixed RCPT results (RFC 2920)") {
  std::string logs[3];
  int n = 0;
  for (Split sp : kSplits) {
    Harness h(testConfig(), sp);
    handshake(h, "PIPELINING,SIZE,ENHANCEDSTATUSCODES,8BITMIME");
    CHECK(h.s.serverSizeLimit() == std::nullopt);  // SIZE without a number: no limit
    auto m = message({"a@x.org", "b@x.org", "c@x.org", "d@x.org"});
    h.send(std::move(m));
    CHECK(h.take() ==
          "MAIL FROM:<alice@example.com> SIZE=21\r\nRCPT TO:<a@x.org>\r\nRCPT TO:<b@x.org>\r\n"
          "RCPT TO:<c@x.org>\r\nRCPT TO:<d@x.org>\r\nDATA\r\n");
    CHECK(h.s.timeout() == 300s);
    h.srv(
        "250 2.1.0 sender ok\n250 2.1.5 ok\n550-5.1.1 no such\n550 5.1.1 user here\n452 4.2.2 mailbox full\n"
        "250-2.1.5 fine\n250 2.1.5 really\n354 go\n");
    CHECK(h.take() == "Subject: hi\r\n\r\nbody\r\n.\r\n");
    CHECK(h.dones.empty());
    h.srv("250 2.0.0 queued\n");
    REQUIRE(h.dones.size() == 1);
    auto& r = h.dones[0].results;
    REQUIRE(r.size() == 4);
    CHECK(r[0].outcome == Outcome::Delivered);
    CHECK(r[1].outcome == Outcome::PermFail);
    CHECK(r[1].stage == "rcpt");
    CHECK(r[1].reply.code == 550);
    CHECK(r[1].reply.enhanced == "5.1.1");
    CHECK(r[1].reply.text == "no such\nuser here");
    CHECK(r[2].outcome == Outcome::TempFail);
    CHECK(r[2].reply.summary() == "452 4.2.2 mailbox full");
    CHECK(r[3].outcome == Outcome::Delivered);
    CHECK(r[3].reply.summary() == "250 2.0.0 queued");
    CHECK(h.s.idle());
    logs[n++] = h.log;
  }
  CHECK(logs[0] == logs[1]);
  CHECK(logs[0] == logs[2]);
}

TEST_CASE("pipelined: timeouts follow the reply awaited") {
  Harness h;
  handshake(h, "PIPELINING");
  h.send(message({"a@x.org"}));
  CHECK(h.s.timeout() == 300s);
  h.srv("250 ok\n");
  CHECK(h.s.timeout() == 300s);  // RCPT
  h.srv("250 ok\n");
  CHECK(h.s.timeout() == 120s);  // DATA initiation
  h.srv("354 go\n");
  CHECK(h.s.timeout() == 600s);  // DATA termination
}

TEST_CASE("custom timeouts") {
  ClientTimeouts t;
  t.greeting = 7s;
  t.mail = 8s;
  t.rcpt = 9s;
  t.dataInit = 10s;
  t.dataTerm = 11s;
  ClientSession s(testConfig(), t);
  CHECK(s.timeout() == std::nullopt);  // not connected yet
  s.onConnected();
  CHECK(s.timeout() == 7s);
  s.onBytes("220 x\r\n");
  CHECK(s.timeout() == 8s);
  s.onBytes("250 x\r\n");
  CHECK(s.timeout() == std::nullopt);
  s.send(message({"a@x.org"}));
  CHECK(s.timeout() == 8s);
  s.onBytes("250 x\r\n");
  CHECK(s.timeout() == 9s);
  s.onBytes("250 x\r\n");
  CHECK(s.timeout() == 10s);
  s.onBytes("354 x\r\n");
  CHECK(s.timeout() == 11s);
}

TEST_CASE("pipelined: MAIL refused, the RCPT and DATA replies are consumed") {
  for (Split sp : kSplits) {
    Harness h(testConfig(), sp);
    handshake(h, "PIPELINING");
    h.send(message({"a@x.org", "b@x.org"}));
    h.take();
    h.srv("550 5.7.1 sender rejected\n503 5.5.1 no sender\n503 5.5.1 no sender\n");
    CHECK(h.dones.empty());
    h.srv("503 5.5.1 no valid recipients\n");
    REQUIRE(h.dones.size() == 1);
    for (auto& r : h.dones[0].results) {
      CHECK(r.outcome == Outcome::PermFail);
      CHECK(r.stage == "mail");
      CHECK(r.reply.summary() == "550 5.7.1 sender rejected");
    }
    CHECK(h.s.idle());
    CHECK(h.fails.empty());
    // The next transaction starts with RSET in the same group.
    h.send(message({"c@x.org"}));
    CHECK(h.take() == "RSET\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<c@x.org>\r\nDATA\r\n");
    h.srv("250 reset\n250 ok\n250 ok\n354 go\n");
    h.take();
    h.srv("250 ok\n");
    REQUIRE(h.dones.size() == 2);
    CHECK(h.dones[1].results[0].outcome == Outcome::Delivered);
  }
}

TEST_CASE("pipelined: all RCPT refused") {
  SUBCASE("DATA refused as it should be") {
    Harness h;
    handshake(h, "PIPELINING");
    h.send(message({"a@x.org", "b@x.org"}));
    h.take();
    h.srv("250 ok\n550 no\n450 later\n554 5.5.1 no valid recipients\n");
    CHECK(h.take().empty());
    REQUIRE(h.dones.size() == 1);
    CHECK(h.dones[0].results[0].outcome == Outcome::PermFail);
    CHECK(h.dones[0].results[0].reply.code == 550);
    CHECK(h.dones[0].results[1].outcome == Outcome::TempFail);
    CHECK(h.dones[0].results[1].stage == "rcpt");
    CHECK(h.s.idle());
  }
  SUBCASE("354 anyway: a single dot, its reply decides nothing") {
    Harness h;
    handshake(h, "PIPELINING");
    h.send(message({"a@x.org"}));
    h.take();
    h.srv("250 ok\n550 no\n354 go\n");
    CHECK(h.take() == ".\r\n");
    CHECK(h.dones.empty());
    h.srv("554 no valid recipients\n");
    REQUIRE(h.dones.size() == 1);
    CHECK(h.dones[0].results[0].reply.code == 550);
    CHECK(h.dones[0].results[0].stage == "rcpt");
    h.send(message({"b@x.org"}));
    CHECK(h.take().rfind("RSET\r\nMAIL FROM:", 0) == 0);
  }
}

// ---- without pipelining ---------------------------------------------------------------

TEST_CASE("MAIL 452 and 550 without pipelining, then RSET before the next message") {
  for (int code : {452, 550}) {
    Harness h;
    handshake(h, "SIZE 5000");
    h.send(message({"a@x.org", "b@x.org"}));
    CHECK(h.take() == "MAIL FROM:<alice@example.com> SIZE=21\r\n");
    h.srv(std::to_string(code) + " nope\n");
    CHECK(h.take().empty());
    REQUIRE(h.dones.size() == 1);
    for (auto& r : h.dones[0].results) {
      CHECK(r.outcome == (code == 452 ? Outcome::TempFail : Outcome::PermFail));
      CHECK(r.stage == "mail");
      CHECK(r.reply.code == code);
    }
    CHECK(h.s.idle());
    h.send(message({"c@x.org"}, "x\r\n", ""));
    CHECK(h.take() == "RSET\r\n");
    h.srv("250 ok\n");
    CHECK(h.take() == "MAIL FROM:<> SIZE=3\r\n");
    h.srv("250 ok\n");
    CHECK(h.take() == "RCPT TO:<c@x.org>\r\n");
  }
}

TEST_CASE("all RCPT refused without pipelining: no DATA") {
  Harness h;
  handshake(h, "");
  h.send(message({"a@x.org", "b@x.org"}));
  h.take();
  h.srv("250 ok\n");
  CHECK(h.take() == "RCPT TO:<a@x.org>\r\n");
  h.srv("550 5.1.1 unknown\n");
  CHECK(h.take() == "RCPT TO:<b@x.org>\r\n");
  h.srv("551 5.1.6 moved\n");
  CHECK(h.take().empty());
  REQUIRE(h.dones.size() == 1);
  CHECK(h.dones[0].results[0].reply.enhanced == "5.1.1");
  CHECK(h.dones[0].results[1].reply.enhanced == "5.1.6");
  CHECK(h.s.idle());
}

TEST_CASE("DATA refused and final replies 451/554") {
  SUBCASE("DATA 451") {
    Harness h;
    handshake(h, "");
    h.send(message({"a@x.org", "b@x.org"}));
    h.srv("250 ok\n250 ok\n550 no\n451 4.3.0 try later\n");
    REQUIRE(h.dones.size() == 1);
    CHECK(h.dones[0].results[0].outcome == Outcome::TempFail);
    CHECK(h.dones[0].results[0].stage == "data");
    CHECK(h.dones[0].results[1].outcome == Outcome::PermFail);
    CHECK(h.dones[0].results[1].stage == "rcpt");
  }
  for (int code : {451, 554}) {
    Harness h;
    handshake(h, "PIPELINING");
    h.send(message({"a@x.org", "b@x.org"}));
    h.srv("250 ok\n250 ok\n450 busy\n354 go\n");
    h.take();
    h.srv(std::to_string(code) + (code == 451 ? " 4.7.1 greylisted\n" : " 5.7.1 spam\n"));
    REQUIRE(h.dones.size() == 1);
    auto& r = h.dones[0].results;
    CHECK(r[0].outcome == (code == 451 ? Outcome::TempFail : Outcome::PermFail));
    CHECK(r[0].stage == "data-end");
    CHECK(r[0].reply.code == code);
    CHECK(r[1].outcome == Outcome::TempFail);
    CHECK(r[1].reply.code == 450);
    CHECK(h.s.idle());
    h.send(message({"c@x.org"}));
    CHECK(h.take().rfind("MAIL FROM:", 0) == 0);  // the transaction ended: no RSET
  }
}

// ---- local refusals ---------------------------------------------------------------------

TEST_CASE("SIZE: a message over the server's limit is not sent (RFC 1870)") {
  Harness h;
  handshake(h, "SIZE 20");
  h.send(message({"a@x.org", "b@x.org"}, std::string(25, 'x')));
  CHECK(h.take().empty());
  REQUIRE(h.dones.size() == 1);
  for (auto& r : h.dones[0].results) {
    CHECK(r.outcome == Outcome::PermFail);
    CHECK(r.reply.code == 0);
    CHECK(r.reply.enhanced == "5.3.4");
    CHECK(r.stage == "local");
  }
  CHECK(h.s.idle());
  // Exactly at the limit (18 octets + CRLF added = 20; the dot stuffing does not count).
  h.send(message({"a@x.org"}, "." + std::string(17, 'y')));
  CHECK(h.take() == "MAIL FROM:<alice@example.com> SIZE=20\r\n");
}

TEST_CASE("SMTPUTF8 needed but not offered: 5.6.7 (RFC 6531 3.5)") {
  Harness h;
  handshake(h, "8BITMIME");
  auto m = message({"a@x.org"});
  m.smtputf8 = true;
  h.send(std::move(m));
  CHECK(h.take().empty());
  REQUIRE(h.dones.size() == 1);
  CHECK(h.dones[0].results[0].reply.enhanced == "5.6.7");
  CHECK(h.dones[0].results[0].outcome == Outcome::PermFail);
  // A non-ASCII address needs it as well.
  h.send(message({"j\xc3\xb6rg@x.org"}));
  REQUIRE(h.dones.size() == 2);
  CHECK(h.dones[1].results[0].reply.enhanced == "5.6.7");
  CHECK(h.take().empty());
}

TEST_CASE("SMTPUTF8 offered: the parameter is sent") {
  Harness h;
  handshake(h, "SMTPUTF8,8BITMIME");
  h.send(message({"j\xc3\xb6rg@x.org"}));
  CHECK(h.take() == "MAIL FROM:<alice@example.com> SMTPUTF8\r\n");
}

TEST_CASE("8-bit without 8BITMIME: sent without BODY=") {
  Harness h;
  handshake(h, "");
  auto m = message({"a@x.org"});
  m.eightBit = true;
  h.send(std::move(m));
  CHECK(h.take() == "MAIL FROM:<alice@example.com>\r\n");
}

TEST_CASE("addresses that cannot be sent are refused locally") {
  Harness h;
  handshake(h, "PIPELINING");
  h.send(message({"ok@x.org", "bad\r\nRCPT TO:<evil@x.org>", "a>b@x.org", "", "c\x01@x.org", "ok2@x.org"}));
  CHECK(h.take() == "MAIL FROM:<alice@example.com>\r\nRCPT TO:<ok@x.org>\r\nRCPT TO:<ok2@x.org>\r\nDATA\r\n");
  h.srv("250 ok\n250 ok\n250 ok\n354 go\n");
  h.take();
  h.srv("250 ok\n");
  REQUIRE(h.dones.size() == 1);
  auto& r = h.dones[0].results;
  REQUIRE(r.size() == 6);
  CHECK(r[0].outcome == Outcome::Delivered);
  for (int i : {1, 2, 3, 4}) {
    CHECK(r[i].outcome == Outcome::PermFail);
    CHECK(r[i].stage == "local");
    CHECK(r[i].reply.enhanced == "5.1.3");
  }
  CHECK(r[5].outcome == Outcome::Delivered);

  h.send(message({"a@x.org"}, "x", "evil>\r\nRSET"));
  CHECK(h.take().empty());
  REQUIRE(h.dones.size() == 2);
  CHECK(h.dones[1].results[0].reply.enhanced == "5.1.7");
  CHECK(h.dones[1].results[0].stage == "local");

  h.send(message({"\n"}));
  REQUIRE(h.dones.size() == 3);
  CHECK(h.take().empty());
  CHECK(h.s.idle());
}

TEST_CASE("send() when not idle is answered, not sent") {
  Harness h;
  h.send(message({"a@x.org"}));
  REQUIRE(h.dones.size() == 1);
  CHECK(h.dones[0].results[0].outcome == Outcome::TempFail);
  CHECK(h.dones[0].results[0].stage == "local");
  CHECK(h.take().empty());
}

// ---- reuse, quit, loss --------------------------------------------------------------------

TEST_CASE("connection reuse: two messages, RSET after the failed one") {
  for (Split sp : kSplits) {
    Harness h(testConfig(), sp);
    handshake(h, "");
    h.send(message({"a@x.org"}));
    h.srv("250 ok\n");
    h.srv("550 unknown\n");
    REQUIRE(h.dones.size() == 1);
    CHECK(h.take() == "MAIL FROM:<alice@example.com>\r\nRCPT TO:<a@x.org>\r\n");
    h.send(message({"b@x.org"}, "second\r\n", "bob@example.com"));
    CHECK(h.take() == "RSET\r\n");
    h.srv("250 2.0.0 flushed\n");
    CHECK(h.take() == "MAIL FROM:<bob@example.com>\r\n");
    h.srv("250 ok\n");
    h.srv("250 ok\n");
    h.srv("354 go\n");
    CHECK(h.take() == "RCPT TO:<b@x.org>\r\nDATA\r\nsecond\r\n.\r\n");
    h.srv("250 ok\n");
    REQUIRE(h.dones.size() == 2);
    CHECK(h.dones[1].results[0].outcome == Outcome::Delivered);
    h.send(message({"c@x.org"}));
    CHECK(h.take() == "MAIL FROM:<alice@example.com>\r\n");  // no RSET after a success
  }
}

TEST_CASE("RSET refused fails the session") {
  Harness h;
  handshake(h, "");
  h.send(message({"a@x.org"}));
  h.srv("451 later\n");
  h.send(message({"b@x.org"}));
  h.take();
  h.srv("500 what\n");
  REQUIRE(h.dones.size() == 2);
  CHECK(h.dones[1].results[0].outcome == Outcome::TempFail);
  CHECK(h.dones[1].results[0].stage == "rset");
  REQUIRE(h.fails.size() == 1);
  CHECK(h.take() == "QUIT\r\n");
}

TEST_CASE("QUIT") {
  SUBCASE("any reply closes") {
    Harness h;
    handshake(h, "");
    h.quit();
    CHECK(h.take() == "QUIT\r\n");
    h.srv("500 whatever\n");
    CHECK(h.closes == 1);
    CHECK(h.fails.empty());
  }
  SUBCASE("the server closes first") {
    Harness h;
    handshake(h, "");
    h.quit();
    h.s.onConnectionLost("EOF");
    h.pump();
    CHECK(h.closes == 1);
    CHECK(h.fails.empty());
    CHECK(h.s.closed());
  }
  SUBCASE("timeout waiting for 221") {
    Harness h;
    handshake(h, "");
    h.quit();
    CHECK(h.s.timeout() == 300s);
    h.s.onTimeout();
    h.pump();
    CHECK(h.closes == 1);
    CHECK(h.fails.empty());
  }
  SUBCASE("quit while a transaction runs: close, temporary results") {
    Harness h;
    handshake(h, "");
    h.send(message({"a@x.org"}));
    h.quit();
    REQUIRE(h.dones.size() == 1);
    CHECK(h.dones[0].results[0].outcome == Outcome::TempFail);
    CHECK(h.closes == 1);
    CHECK(h.take() == "MAIL FROM:<alice@example.com>\r\n");
    h.quit();
    h.srv("250 ok\n");
    CHECK(h.take().empty());
    CHECK(h.closes == 1);
  }
}

TEST_CASE("connection lost mid-DATA") {
  Harness h;
  handshake(h, "PIPELINING");
  h.send(message({"a@x.org", "b@x.org"}));
  h.srv("250 ok\n250 ok\n550 no\n354 go\n");
  h.take();
  h.s.onConnectionLost("connection reset by peer");
  h.pump();
  REQUIRE(h.dones.size() == 1);
  auto& r = h.dones[0].results;
  CHECK(r[0].outcome == Outcome::TempFail);
  CHECK(r[0].reply.code == 0);
  CHECK(r[0].reply.text == "connection lost: connection reset by peer");
  CHECK(r[0].stage == "data-end");
  CHECK(r[1].outcome == Outcome::PermFail);  // keeps its RCPT result
  CHECK(r[1].reply.code == 550);
  REQUIRE(h.fails.size() == 1);
  CHECK(h.fails[0].stage == "data-end");
  CHECK(h.fails[0].outcome == Outcome::TempFail);
  CHECK(h.log.find("<done") < h.log.find("<failed"));  // results first
  CHECK(h.s.closed());
  h.s.onConnectionLost("again");
  h.srv("250 ok\n");
  CHECK(h.dones.size() == 1);
  CHECK(h.fails.size() == 1);
}

TEST_CASE("timeouts fail the session with the stage waited for") {
  SUBCASE("greeting") {
    Harness h;
    h.s.onTimeout();
    h.pump();
    REQUIRE(h.fails.size() == 1);
    CHECK(h.fails[0].stage == "connect");
    CHECK(h.fails[0].reply.text == "timeout after 300s waiting for the greeting");
    CHECK(h.closes == 1);
  }
  SUBCASE("RCPT, pipelined") {
    Harness h;
    handshake(h, "PIPELINING");
    h.send(message({"a@x.org", "b@x.org"}));
    h.srv("250 ok\n250 ok\n");
    h.s.onTimeout();
    h.pump();
    REQUIRE(h.dones.size() == 1);
    CHECK(h.dones[0].results[0].stage == "rcpt");
    CHECK(h.dones[0].results[0].outcome == Outcome::TempFail);
    REQUIRE(h.fails.size() == 1);
    CHECK(h.closes == 1);
  }
  SUBCASE("TLS handshake") {
    Harness h;
    handshake(h, "STARTTLS");
    h.srv("220 go\n");
    h.s.onTimeout();
    h.pump();
    REQUIRE(h.fails.size() == 1);
    CHECK(h.fails[0].stage == "starttls");
  }
  SUBCASE("stale timer while idle is ignored") {
    Harness h;
    handshake(h, "");
    h.s.onTimeout();
    h.pump();
    CHECK(h.fails.empty());
    CHECK(h.s.idle());
  }
}

// ---- malformed replies ---------------------------------------------------------------------

TEST_CASE("malformed replies are protocol errors (temporary)") {
  const char* bad[] = {
      "hello there\n",         // no code
      "22 short\n",            // two digits
      "220x bad separator\n",  // fourth char not ' ' or '-'
      "620 bad class\n",       // RFC 5321 4.2: first digit 2..5
      "220-one\n250 two\n",    // multi-line with changing codes
  };
  for (const char* b : bad) {
    for (Split sp : kSplits) {
      CAPTURE(b);
      Harness h(testConfig(), sp);
      h.srv(b);
      REQUIRE(h.fails.size() == 1);
      CHECK(h.fails[0].outcome == Outcome::TempFail);
      CHECK(h.fails[0].stage == "connect");
      CHECK(h.fails[0].reply.text.rfind("protocol error", 0) == 0);
      CHECK(h.closes == 1);
      CHECK(h.take().empty());
    }
  }
}

TEST_CASE("over-long lines and too many lines") {
  ClientConfig cfg = testConfig();
  cfg.maxReplyLine = 100;
  cfg.maxReplyLines = 5;
  std::string logs[3];
  int n = 0;
  for (Split sp : kSplits) {
    Harness h(cfg, sp);
    h.srv("220 " + std::string(96, 'a') + "\n");  // exactly 100: fine
    CHECK(h.take() == "EHLO relay.example.net\r\n");
    h.srv("250 " + std::string(97, 'b') + "\n");  // 101
    REQUIRE(h.fails.size() == 1);
    CHECK(h.fails[0].stage == "ehlo");
    CHECK(h.fails[0].reply.text.find("longer than 100") != std::string::npos);
    logs[n++] = h.log;
  }
  CHECK(logs[0] == logs[1]);
  CHECK(logs[0] == logs[2]);
  for (Split sp : kSplits) {
    Harness h(cfg, sp);
    h.srv("220-a\n220-a\n220-a\n220-a\n220-a\n220 a\n");
    REQUIRE(h.fails.size() == 1);
    CHECK(h.fails[0].reply.text.find("lines") != std::string::npos);
  }
  SUBCASE("a partial line without LF is cut off too") {
    Harness h(cfg);
    h.srv(std::string(500, '2'), true);
    REQUIRE(h.fails.size() == 1);
  }
}

TEST_CASE("bare LF line ends from the server are tolerated") {
  Harness h;
  h.srv("220 x\n", true);
  CHECK(h.take() == "EHLO relay.example.net\r\n");
  h.srv("250-x\n250 PIPELINING\n", true);
  CHECK(h.s.offersPipelining());
}

TEST_CASE("unsolicited replies") {
  SUBCASE("garbage while idle") {
    Harness h;
    handshake(h, "");
    h.srv("250 surprise\n");
    REQUIRE(h.fails.size() == 1);
    CHECK(h.fails[0].stage == "idle");
    CHECK(h.closes == 1);
  }
  SUBCASE("421 while idle: the server gave up") {
    Harness h;
    handshake(h, "");
    h.srv("421 4.4.2 idle too long\n");
    REQUIRE(h.fails.size() == 1);
    CHECK(h.fails[0].reply.code == 421);
    CHECK(h.fails[0].reply.text == "idle too long");
    CHECK(h.take().empty());
  }
  SUBCASE("extra reply in the same read as the last expected one") {
    Harness h;
    h.srv("220 x\n250 x\n250 extra\n");
    CHECK(h.readies == 1);
    REQUIRE(h.fails.size() == 1);
  }
  SUBCASE("421 in the middle of a transaction") {
    Harness h;
    handshake(h, "PIPELINING");
    h.send(message({"a@x.org", "b@x.org"}));
    h.srv("250 ok\n250 ok\n421 4.3.2 shutting down\n");
    REQUIRE(h.dones.size() == 1);
    CHECK(h.dones[0].results[0].reply.code == 421);
    CHECK(h.dones[0].results[0].outcome == Outcome::TempFail);
    CHECK(h.dones[0].results[1].reply.code == 421);
    REQUIRE(h.fails.size() == 1);
  }
}

TEST_CASE("enhanced codes: taken only when valid and of the reply's class") {
  Harness h;
  handshake(h, "");
  h.send(message({"a@x.org", "b@x.org", "c@x.org"}));
  h.srv("250 ok\n");
  h.srv("550 4.1.1 wrong class\n");
  h.srv("550 5.1 short\n");
  h.srv("550 5.1.10\n");
  REQUIRE(h.dones.size() == 1);
  auto& r = h.dones[0].results;
  CHECK(r[0].reply.enhanced.empty());
  CHECK(r[0].reply.text == "4.1.1 wrong class");
  CHECK(r[1].reply.enhanced.empty());
  CHECK(r[2].reply.enhanced == "5.1.10");
  CHECK(r[2].reply.text.empty());
}

TEST_CASE("nothing on the wire is a bare CR or LF") {
  Harness h;
  handshake(h, "PIPELINING,8BITMIME");
  std::string content = "a\rb\nc\r\n.\n..\r\r\n";
  h.send(message({"a@x.org"}, content));
  h.srv("250 ok\n250 ok\n354 go\n");
  h.srv("250 ok\n");
  CHECK(onlyCrlf(h.log));  // SendBytes only; the log's action markers carry no CR/LF
}

// ---- AUTH towards a smarthost (RFC 4954, RFC 4616) -------------------------------------

namespace {

ClientConfig authConfig(ClientTls tls = ClientTls::Required, std::string user = "user", std::string pass = "pass") {
  ClientConfig c = testConfig(tls);
  c.auth = std::make_shared<ClientAuth>(ClientAuth{std::move(user), std::move(pass)});
  return c;
}

// Greeting, EHLO offering STARTTLS, the handshake and the EHLO inside TLS with `caps`.
void tlsHandshake(Harness& h, std::string_view caps) {
  handshake(h, "STARTTLS,AUTH PLAIN LOGIN");
  CHECK(h.take() == "STARTTLS\r\n");  // no AUTH before TLS, although it was offered
  h.srv("220 go\n");
  h.tlsUp();
  CHECK(h.take() == "EHLO relay.example.net\r\n");
  h.srv(ehloReply("smtp.provider.example", caps));
}

}  // namespace

TEST_CASE("AUTH PLAIN after STARTTLS, kept across transactions") {
  for (Split sp : kSplits) {
    Harness h(authConfig(), sp);
    tlsHandshake(h, "PIPELINING,AUTH LOGIN PLAIN CRAM-MD5");
    // RFC 4616 2: NUL user NUL pass, base64, as the initial response.
    CHECK(h.take() == "AUTH PLAIN AHVzZXIAcGFzcw==\r\n");
    CHECK(h.readies == 0);
    CHECK(h.s.timeout() == 300s);
    h.srv("235 2.7.0 Authentication successful\n");
    CHECK(h.readies == 1);
    CHECK(h.s.authenticated());
    CHECK(h.take().empty());  // no EHLO again: PLAIN has no security layer (RFC 4954 4)
    h.send(message({"a@x.org"}));
    h.srv("250 ok\n250 ok\n354 go\n");
    h.srv("250 queued\n");
    REQUIRE(h.dones.size() == 1);
    CHECK(h.dones[0].results[0].outcome == Outcome::Delivered);
    h.take();
    h.send(message({"b@x.org"}));
    CHECK(h.take().rfind("MAIL FROM:", 0) == 0);  // no second AUTH on a reused connection
  }
}

TEST_CASE("AUTH LOGIN answers two challenges; the old AUTH= form is understood") {
  for (Split sp : kSplits) {
    Harness h(authConfig(ClientTls::Required, "relayuser", "s3cret"), sp);
    tlsHandshake(h, "AUTH=LOGIN");
    CHECK(h.take() == "AUTH LOGIN\r\n");
    h.srv("334 VXNlcm5hbWU6\n");
    CHECK(h.take() == "cmVsYXl1c2Vy\r\n");
    h.srv("334 UGFzc3dvcmQ6\n");
    CHECK(h.take() == "czNjcmV0\r\n");
    h.srv("235 ok\n");
    CHECK(h.readies == 1);
  }
}

TEST_CASE("AUTH refused: 535 is a temporary 4.7.8 without the password") {
  Harness h(authConfig(ClientTls::Required, "relayuser", "hunter2"));
  tlsHandshake(h, "AUTH PLAIN");
  h.take();
  h.srv("535 5.7.8 Error: authentication failed: hunter2-free text\n");
  REQUIRE(h.fails.size() == 1);
  CHECK(h.fails[0].stage == "auth");
  CHECK(h.fails[0].outcome == Outcome::TempFail);
  CHECK(h.fails[0].reply.code == 0);
  CHECK(h.fails[0].reply.enhanced == "4.7.8");
  CHECK(h.fails[0].reply.text.find("relayuser") != std::string::npos);
  CHECK(h.fails[0].reply.text.find("535 5.7.8") != std::string::npos);
  CHECK(h.take() == "QUIT\r\n");
  CHECK(h.closes == 1);
  CHECK(h.readies == 0);
}

TEST_CASE("AUTH: 454, 421, no AUTH offered, no usable mechanism, odd challenges") {
  SUBCASE("454 is temporary with the server's reply") {
    Harness h(authConfig());
    tlsHandshake(h, "AUTH PLAIN");
    h.take();
    h.srv("454 4.7.0 Temporary authentication failure\n");
    REQUIRE(h.fails.size() == 1);
    CHECK(h.fails[0].reply.code == 454);
    CHECK(h.take() == "QUIT\r\n");
  }
  SUBCASE("421: no QUIT") {
    Harness h(authConfig());
    tlsHandshake(h, "AUTH PLAIN");
    h.take();
    h.srv("421 4.3.2 shutting down\n");
    REQUIRE(h.fails.size() == 1);
    CHECK(h.take().empty());
  }
  SUBCASE("no AUTH offered") {
    Harness h(authConfig());
    tlsHandshake(h, "PIPELINING");
    REQUIRE(h.fails.size() == 1);
    CHECK(h.fails[0].stage == "auth");
    CHECK(h.fails[0].reply.text.find("does not offer AUTH") != std::string::npos);
    CHECK(h.take() == "QUIT\r\n");
  }
  SUBCASE("only mechanisms we do not speak") {
    Harness h(authConfig());
    tlsHandshake(h, "AUTH CRAM-MD5 SCRAM-SHA-256");
    REQUIRE(h.fails.size() == 1);
    CHECK(h.fails[0].reply.text.find("PLAIN, LOGIN") != std::string::npos);
  }
  SUBCASE("a challenge after PLAIN's initial response is a protocol error") {
    Harness h(authConfig());
    tlsHandshake(h, "AUTH PLAIN");
    h.take();
    h.srv("334 \n");
    REQUIRE(h.fails.size() == 1);
    CHECK(h.fails[0].reply.enhanced == "4.5.0");
  }
}

TEST_CASE("AUTH with implicit TLS follows the first EHLO; never in clear") {
  SUBCASE("implicit") {
    Harness h(authConfig(ClientTls::Implicit));
    h.srv("220 smtp.provider.example ESMTP\n");
    CHECK(h.take() == "EHLO relay.example.net\r\n");
    h.srv("250-smtp.provider.example\n250 AUTH PLAIN\n");
    CHECK(h.take() == "AUTH PLAIN AHVzZXIAcGFzcw==\r\n");
    h.srv("235 ok\n");
    CHECK(h.readies == 1);
  }
  SUBCASE("opportunistic without STARTTLS: refused locally, no credentials sent") {
    Harness h(authConfig(ClientTls::Opportunistic));
    handshake(h, "AUTH PLAIN LOGIN");
    REQUIRE(h.fails.size() == 1);
    CHECK(h.fails[0].reply.enhanced == "4.7.10");
    CHECK(h.take() == "QUIT\r\n");
  }
}

TEST_CASE("REQUIRETLS (RFC 8689 4.2.1): sent only inside TLS to a server offering it") {
  SUBCASE("offered inside TLS: MAIL carries it") {
    Harness h(testConfig(ClientTls::Required));
    handshake(h, "STARTTLS");
    h.take();
    h.srv("220 go\n");
    h.tlsUp();
    h.take();
    h.srv("250-mx\n250-REQUIRETLS\n250 PIPELINING\n");
    CHECK(h.s.offersRequireTls());
    auto m = message({"a@x.org"});
    m.requireTls = true;
    h.send(std::move(m));
    CHECK(h.take() == "MAIL FROM:<alice@example.com> REQUIRETLS\r\nRCPT TO:<a@x.org>\r\nDATA\r\n");
  }
  SUBCASE("not offered: refused with 5.7.30, nothing sent") {
    Harness h(testConfig(ClientTls::Required));
    handshake(h, "STARTTLS,REQUIRETLS");  // before TLS it means nothing (RFC 3207 4.2)
    h.take();
    h.srv("220 go\n");
    h.tlsUp();
    h.take();
    h.srv("250-mx\n250 PIPELINING\n");
    auto m = message({"a@x.org"});
    m.requireTls = true;
    h.send(std::move(m));
    REQUIRE(h.dones.size() == 1);
    CHECK(h.dones[0].results[0].outcome == Outcome::PermFail);
    CHECK(h.dones[0].results[0].reply.enhanced == "5.7.30");
    CHECK(h.take().empty());
  }
  SUBCASE("no TLS: 5.7.10") {
    Harness h;
    handshake(h, "REQUIRETLS");
    auto m = message({"a@x.org"});
    m.requireTls = true;
    h.send(std::move(m));
    REQUIRE(h.dones.size() == 1);
    CHECK(h.dones[0].results[0].reply.enhanced == "5.7.10");
  }
  SUBCASE("a bounce of a REQUIRETLS message goes anyway, without the option") {
    Harness h;
    handshake(h, "PIPELINING");
    auto m = message({"a@x.org"}, "Subject: bounce\r\n\r\nx\r\n", "");
    m.requireTls = true;
    h.send(std::move(m));
    CHECK(h.take() == "MAIL FROM:<>\r\nRCPT TO:<a@x.org>\r\nDATA\r\n");
  }
}

TEST_CASE("DSN offered: RET, ENVID, NOTIFY and ORCPT are passed on (RFC 3461 5.2.1)") {
  Harness h;
  handshake(h, "PIPELINING,DSN,SMTPUTF8");
  CHECK(h.s.offersDsn());
  auto m = message({"a@x.org", "b@x.org", "j\xc3\xb6rg@x.org"});
  m.smtputf8 = true;
  m.dsnRet = "HDRS";
  m.envId = "QQ+2B1";
  m.rcptDsn = {{static_cast<uint8_t>(kNotifySuccess | kNotifyFailure), "rfc822;A+2B1@x.org"}, {0, ""}, {kNotifyNever, ""}};
  h.send(std::move(m));
  CHECK(h.take() ==
        "MAIL FROM:<alice@example.com> SMTPUTF8 RET=HDRS ENVID=QQ+2B1\r\n"
        "RCPT TO:<a@x.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;A+2B1@x.org\r\n"
        "RCPT TO:<b@x.org> ORCPT=rfc822;b@x.org\r\n"  // no NOTIFY given: none sent; ORCPT added
        "RCPT TO:<j\xc3\xb6rg@x.org> NOTIFY=NEVER\r\n"  // UTF-8: no ORCPT added (xtext is ASCII)
        "DATA\r\n");
  h.srv("250 ok\n250 ok\n250 ok\n250 ok\n354 go\n");
  h.take();
  h.srv("250 queued\n");
  REQUIRE(h.dones.size() == 1);
  for (const auto& r : h.dones[0].results) {
    CHECK(r.outcome == Outcome::Delivered);
    CHECK(r.dsnPassedOn);
  }
}

TEST_CASE("DSN not offered: no DSN parameter is sent, and nothing was passed on (RFC 3461 5.2.2)") {
  Harness h;
  handshake(h, "PIPELINING");
  CHECK_FALSE(h.s.offersDsn());
  auto m = message({"a@x.org"});
  m.dsnRet = "FULL";
  m.envId = "QQ1";
  m.rcptDsn = {{kNotifySuccess, "rfc822;a@x.org"}};
  h.send(std::move(m));
  CHECK(h.take() == "MAIL FROM:<alice@example.com>\r\nRCPT TO:<a@x.org>\r\nDATA\r\n");
  h.srv("250 ok\n250 ok\n354 go\n");
  h.take();
  h.srv("250 queued\n");
  REQUIRE(h.dones.size() == 1);
  CHECK(h.dones[0].results[0].outcome == Outcome::Delivered);
  CHECK_FALSE(h.dones[0].results[0].dsnPassedOn);
}
