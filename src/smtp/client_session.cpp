// smtp::ClientSession: the I/O-free SMTP client core used for delivery (RFC 5321), with
// STARTTLS (RFC 3207), PIPELINING (RFC 2920), SIZE (RFC 1870), 8BITMIME (RFC 6152),
// SMTPUTF8 (RFC 6531), DSN (RFC 3461: RET/ENVID/NOTIFY/ORCPT passed on when offered),
// enhanced status codes (RFC 2034, RFC 3463) and, towards a
// smarthost, AUTH PLAIN / LOGIN (RFC 4954, RFC 4616).
//
// Replies are assembled from whole lines only, so the way the bytes are split never
// changes what happens. Every command we send is ASCII or UTF-8 without controls and
// ends in CRLF; content goes through dotStuff(), so nothing on the wire is a bare CR or LF.
//
// Not here: the socket, timers, the TLS engine, MX choice, retry decisions (delivery/).
#include "smtp/client_session.h"

#include <string.h>  // explicit_bzero

#include <deque>
#include <utility>

#include "smtp/command.h"
#include "smtp/reply.h"
#include "util/base64.h"
#include "util/strings.h"

namespace subrelay::smtp {
namespace {

using util::hasNonAscii;
using util::iequals;

// What a sent command (or the connection itself) waits for, in the order the replies
// must come back (RFC 2920 section 3.1: responses are matched by counting, never by code).
enum class Expect { Greeting, Ehlo, Helo, StartTls, Auth, Rset, Mail, Rcpt, Data, DataEnd, Quit };

const char* stageOf(Expect e) {
  switch (e) {
    case Expect::Greeting:
      return "connect";
    case Expect::Ehlo:
      return "ehlo";
    case Expect::Helo:
      return "ehlo";
    case Expect::StartTls:
      return "starttls";
    case Expect::Auth:
      return "auth";
    case Expect::Rset:
      return "rset";
    case Expect::Mail:
      return "mail";
    case Expect::Rcpt:
      return "rcpt";
    case Expect::Data:
      return "data";
    case Expect::DataEnd:
      return "data-end";
    case Expect::Quit:
      return "quit";
  }
  return "connect";
}

const char* describe(Expect e) {
  switch (e) {
    case Expect::Greeting:
      return "the greeting";
    case Expect::Ehlo:
      return "the EHLO reply";
    case Expect::Helo:
      return "the HELO reply";
    case Expect::StartTls:
      return "the STARTTLS reply";
    case Expect::Auth:
      return "the AUTH reply";
    case Expect::Rset:
      return "the RSET reply";
    case Expect::Mail:
      return "the MAIL reply";
    case Expect::Rcpt:
      return "the RCPT reply";
    case Expect::Data:
      return "the DATA reply";
    case Expect::DataEnd:
      return "the reply to the end of data";
    case Expect::Quit:
      return "the QUIT reply";
  }
  return "a reply";
}

Outcome outcomeOf(int code) {
  if (code >= 200 && code < 300) return Outcome::Delivered;
  if (code >= 500 && code < 600) return Outcome::PermFail;
  return Outcome::TempFail;
}

ServerReply localReply(std::string enhanced, std::string text) {
  ServerReply r;
  r.enhanced = std::move(enhanced);
  r.text = std::move(text);
  return r;
}

// RFC 5321 4.1.2 paths: we refuse to send what could end the command line early or
// break out of the angle brackets (CR, LF, other controls, '<', '>'), and what cannot
// fit (4.5.3.1.3: a path is at most 256 octets including the brackets).
bool sendableAddress(std::string_view a) {
  if (a.size() > 254) return false;
  for (char ch : a) {
    auto c = static_cast<unsigned char>(ch);
    if (c < 0x20 || c == 0x7f || c == '<' || c == '>') return false;
  }
  return true;
}

// dotStuff with the count of dots it added, so the SIZE estimate (RFC 1870 section 3:
// the size of the message with CRLF line ends, before transparency) can be derived.
std::string stuff(std::string_view content, size_t* addedDots) {
  std::string out;
  out.reserve(content.size() + content.size() / 64 + 5);
  bool lineStart = true;
  size_t dots = 0;
  for (size_t i = 0; i < content.size(); ++i) {
    char c = content[i];
    if (c == '\r' || c == '\n') {
      // CRLF, bare CR and bare LF all end a line; a CRLF pair counts once.
      if (c == '\r' && i + 1 < content.size() && content[i + 1] == '\n') ++i;
      out += "\r\n";
      lineStart = true;
      continue;
    }
    if (lineStart && c == '.') {
      out += '.';
      ++dots;
    }
    out += c;
    lineStart = false;
  }
  if (!lineStart) out += "\r\n";
  out += ".\r\n";
  if (addedDots) *addedDots = dots;
  return out;
}

}  // namespace

std::string dotStuff(std::string_view content) { return stuff(content, nullptr); }

std::string ServerReply::summary() const {
  std::string out;
  if (code != 0) out += std::to_string(code);
  if (!enhanced.empty()) {
    if (!out.empty()) out += ' ';
    out += sanitizeReplyText(enhanced);
  }
  std::string_view first = text;
  if (size_t nl = first.find('\n'); nl != std::string_view::npos) first = first.substr(0, nl);
  if (!first.empty()) {
    if (!out.empty()) out += ' ';
    out += sanitizeReplyText(first);
  }
  return out;
}

struct ClientSession::Impl {
  enum class Phase { Init, Connected, TlsHandshake, Closed };

  struct Transaction {
    OutboundMessage msg;
    std::vector<RecipientResult> results;
    std::vector<bool> decided;      // refused (or failed locally): result is final
    std::vector<size_t> rcptOrder;  // indices of recipients sent with RCPT, in order
    size_t rcptReplies = 0;
    size_t accepted = 0;
    bool mailFailed = false;
    bool discardData = false;  // 354 with nothing accepted: send "." only (RFC 2920 3.1)
    std::string stuffed;
  };

  ClientConfig cfg;
  ClientTimeouts to;
  Phase phase = Phase::Init;
  std::vector<ClientAction> actions;
  std::string inbuf;
  std::deque<Expect> expects;
  bool pipelinedTxn = false;
  uint64_t progress = 0;  // replies handled and handshakes done (see progress())

  // Reply being assembled (RFC 5321 4.2.1 multi-line).
  int partCode = 0;
  size_t partLines = 0;
  ServerReply part;

  // Capabilities from the last EHLO (forgotten after STARTTLS, RFC 3207 section 4.2).
  bool ready = false;
  bool capStartTls = false, capPipelining = false, capSize = false, cap8bit = false, capUtf8 = false,
       capEnhanced = false, capChunking = false, capAuth = false, authPlain = false, authLogin = false,
       capRequireTls = false, capDsn = false;
  uint64_t sizeLimit = 0;
  // AUTH towards a smarthost: LOGIN answers two 334 challenges (user, then password).
  bool authenticated = false;
  bool authLoginMech = false;
  int authStep = 0;
  bool tlsActive = false;
  bool startTlsRefused = false;  // Opportunistic: 454 to STARTTLS, continue in clear
  bool needRset = false;
  std::optional<Expect> handling;  // the reply being handled, for error stages
  std::optional<Transaction> txn;

  Impl(ClientConfig c, ClientTimeouts t) : cfg(std::move(c)), to(t) {
    if (cfg.tls == ClientTls::Implicit) tlsActive = true;
  }

  bool closed() const { return phase == Phase::Closed; }

  void sendLine(std::string line) {
    line += "\r\n";
    actions.emplace_back(SendBytes{std::move(line)});
  }

  void resetCaps() {
    capStartTls = capPipelining = capSize = cap8bit = capUtf8 = capEnhanced = capChunking = false;
    capAuth = authPlain = authLogin = capRequireTls = capDsn = false;
    sizeLimit = 0;
  }

  // ---- failing -----------------------------------------------------------------

  // The session ends: a transaction in progress gets a result for every recipient first.
  void fail(ServerReply reply, std::string stage, Outcome outcome, bool sayQuit) {
    if (closed()) return;
    if (txn) {
      for (size_t i = 0; i < txn->results.size(); ++i) {
        if (txn->decided[i]) continue;
        txn->results[i].outcome = outcome == Outcome::Delivered ? Outcome::TempFail : outcome;
        txn->results[i].reply = reply;
        txn->results[i].stage = stage;
      }
      finishTransaction();
    }
    if (sayQuit) sendLine("QUIT");
    actions.emplace_back(SessionFailed{std::move(reply), outcome, std::move(stage)});
    actions.emplace_back(CloseConnection{});
    phase = Phase::Closed;
    expects.clear();
    inbuf.clear();
  }

  void protocolError(std::string text) {
    std::string stage = handling                       ? stageOf(*handling)
                        : phase == Phase::TlsHandshake ? "starttls"
                        : expects.empty()              ? (ready ? "idle" : "connect")
                                                       : stageOf(expects.front());
    fail(localReply("4.5.0", "protocol error: " + std::move(text)), std::move(stage), Outcome::TempFail, false);
  }

  void finishTransaction() {
    for (auto& r : txn->results) r.dsnPassedOn = capDsn;
    TransactionDone done{std::move(txn->results)};
    txn.reset();
    actions.emplace_back(std::move(done));
  }

  // ---- reply assembly ----------------------------------------------------------

  void onBytes(std::string_view data) {
    if (closed()) return;
    inbuf.append(data);
    if (phase == Phase::Init) return;  // kept until onConnected()
    drain();
  }

  void drain() {
    size_t pos = 0;
    while (!closed()) {
      if (phase == Phase::TlsHandshake && pos < inbuf.size()) {
        // RFC 3207 section 4.2/5: anything after the 220 to STARTTLS arrived in clear and
        // must not be taken as a reply inside TLS (response injection).
        protocolError("data received after the STARTTLS reply, before TLS");
        return;
      }
      size_t nl = inbuf.find('\n', pos);
      if (nl == std::string::npos) {
        // A partial line longer than a complete one may be (content plus CR) is already
        // an error; deciding now or when the LF arrives gives the same result.
        if (inbuf.size() - pos > cfg.maxReplyLine + 1) {
          protocolError("reply line longer than " + std::to_string(cfg.maxReplyLine) + " octets");
          return;
        }
        break;
      }
      std::string_view line(inbuf.data() + pos, nl - pos);
      pos = nl + 1;
      // RFC 5321 2.3.8 lines end in CRLF; a bare LF from the server is tolerated on input
      // (robustness, 4.1.1 / Postel), it never reaches the wire from us.
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      if (line.size() > cfg.maxReplyLine) {
        protocolError("reply line longer than " + std::to_string(cfg.maxReplyLine) + " octets");
        return;
      }
      handleLine(line);
    }
    if (closed()) return;
    inbuf.erase(0, pos);
  }

  void handleLine(std::string_view line) {
    auto parsed = parseReplyLine(line);
    if (!parsed) {
      protocolError("malformed reply line \"" + util::sanitizeForLog(line, 80) + "\"");
      return;
    }
    if (partLines == 0) {
      partCode = parsed->code;
      part = ServerReply{};
      part.code = parsed->code;
    } else if (parsed->code != partCode) {
      // RFC 5321 4.2.1: every line of a multi-line reply carries the same code.
      protocolError("multi-line reply changes its code from " + std::to_string(partCode) + " to " +
                    std::to_string(parsed->code));
      return;
    }
    if (++partLines > cfg.maxReplyLines) {
      protocolError("reply longer than " + std::to_string(cfg.maxReplyLines) + " lines");
      return;
    }
    std::string_view text = parsed->text;
    // RFC 2034 section 4 / RFC 3463 section 2: the enhanced code leads each line's text,
    // and its class matches the reply code's first digit. Taken whenever it is valid, so
    // servers that use the codes without advertising ENHANCEDSTATUSCODES are understood.
    size_t sp = text.find(' ');
    std::string_view head = text.substr(0, sp);
    if (isValidEnhancedCode(head, parsed->code)) {
      if (partLines == 1) part.enhanced = std::string(head);
      text = sp == std::string_view::npos ? std::string_view{} : text.substr(sp + 1);
    }
    if (partLines > 1) part.text += '\n';
    part.text.append(text);
    if (!parsed->last) return;
    partLines = 0;
    ServerReply reply = std::move(part);
    part = ServerReply{};
    handleReply(std::move(reply));
  }

  // ---- replies -----------------------------------------------------------------

  void handleReply(ServerReply r) {
    ++progress;
    if (expects.empty()) {
      // RFC 5321 3.8: a server may give up with 421 at any time, even between commands
      // (an idle pooled connection); anything else unrequested is a protocol error.
      if (r.code == 421) {
        fail(std::move(r), ready ? "idle" : "connect", Outcome::TempFail, false);
      } else {
        protocolError("unexpected reply \"" + r.summary() + "\" while no command was pending");
      }
      return;
    }
    Expect e = expects.front();
    expects.pop_front();
    handling = e;
    dispatch(e, std::move(r));
    handling.reset();
  }

  void dispatch(Expect e, ServerReply r) {
    switch (e) {
      case Expect::Greeting:
        return onGreeting(std::move(r));
      case Expect::Ehlo:
        return onEhlo(std::move(r));
      case Expect::Helo:
        return onHelo(std::move(r));
      case Expect::StartTls:
        return onStartTlsReply(std::move(r));
      case Expect::Auth:
        return onAuth(std::move(r));
      case Expect::Rset:
        return onRset(std::move(r));
      case Expect::Mail:
        return onMail(std::move(r));
      case Expect::Rcpt:
        return onRcpt(std::move(r));
      case Expect::Data:
        return onData(std::move(r));
      case Expect::DataEnd:
        return onDataEnd(std::move(r));
      case Expect::Quit:
        return onQuit();
    }
  }

  void sendEhlo() {
    sendLine("EHLO " + cfg.heloName);
    expects.push_back(Expect::Ehlo);
  }

  void onGreeting(ServerReply r) {
    if (r.code == 220) {
      sendEhlo();
      return;
    }
    // RFC 5321 3.1: 554 instead of 220 refuses service, and the server waits for QUIT.
    // Our choice: a refusing host is a failure of this host, not of the recipients, so
    // the session fails with TempFail and the reply as received (the next MX is tried;
    // delivery/ may look at reply.code if it wants a stricter policy). RFC 5321 3.8: 421
    // means the server is closing: no QUIT.
    bool quit = r.code >= 500;
    fail(std::move(r), "connect", Outcome::TempFail, quit);
  }

  void onEhlo(ServerReply r) {
    if (r.code == 250) {
      resetCaps();
      parseCapabilities(r.text);
      afterHello();
      return;
    }
    // RFC 5321 3.2 / 4.1.4: a server that does not know EHLO answers 500 or 502 (some
    // say 501/504); fall back to HELO then. 554 means no service, like a 554 greeting;
    // 4xx (421 ...) is a temporary refusal.
    if (r.code >= 500 && r.code != 554) {
      sendLine("HELO " + cfg.heloName);
      expects.push_back(Expect::Helo);
      return;
    }
    bool quit = r.code >= 500;
    fail(std::move(r), "ehlo", Outcome::TempFail, quit);
  }

  void onHelo(ServerReply r) {
    if (r.code == 250) {
      resetCaps();
      afterHello();
      return;
    }
    bool quit = r.code >= 500;
    fail(std::move(r), "ehlo", Outcome::TempFail, quit);
  }

  void parseCapabilities(std::string_view text) {
    // RFC 5321 4.1.1.1: the first line is the domain; each further line is
    // "keyword [params]". Keywords are case-insensitive.
    bool first = true;
    for (std::string_view line : util::split(text, '\n')) {
      if (first) {
        first = false;
        continue;
      }
      line = util::trim(line);
      size_t sp = line.find(' ');
      std::string_view kw = line.substr(0, sp);
      std::string_view arg = sp == std::string_view::npos ? std::string_view{} : util::trim(line.substr(sp + 1));
      if (iequals(kw, "STARTTLS")) {
        capStartTls = true;
      } else if (iequals(kw, "PIPELINING")) {
        capPipelining = true;
      } else if (iequals(kw, "8BITMIME")) {
        cap8bit = true;
      } else if (iequals(kw, "SMTPUTF8")) {
        capUtf8 = true;
      } else if (iequals(kw, "ENHANCEDSTATUSCODES")) {
        capEnhanced = true;
      } else if (iequals(kw, "AUTH") || (kw.size() > 5 && iequals(kw.substr(0, 5), "AUTH="))) {
        // RFC 4954 3: "AUTH mech...". "AUTH=mech..." is the pre-standard form some old
        // servers still send next to it.
        capAuth = true;
        std::string_view mechs = kw.size() > 5 ? line.substr(5) : arg;
        for (std::string_view m : util::split(mechs, ' ')) {
          m = util::trim(m);
          if (iequals(m, "PLAIN")) authPlain = true;
          if (iequals(m, "LOGIN")) authLogin = true;
        }
      } else if (iequals(kw, "REQUIRETLS")) {
        capRequireTls = true;  // RFC 8689 2
      } else if (iequals(kw, "DSN")) {
        capDsn = true;  // RFC 3461 4
      } else if (iequals(kw, "CHUNKING")) {
        capChunking = true;  // RFC 3030: recognised, not used (DATA is enough for us)
      } else if (iequals(kw, "SIZE")) {
        // RFC 1870 section 4: "SIZE" alone or "SIZE 0" means no fixed limit.
        capSize = true;
        uint64_t n = 0;
        bool ok = !arg.empty();
        for (char c : arg) {
          if (c < '0' || c > '9' || n > (UINT64_MAX - 9) / 10) {
            ok = false;
            break;
          }
          n = n * 10 + static_cast<uint64_t>(c - '0');
        }
        sizeLimit = ok ? n : 0;
      }
    }
  }

  void afterHello() {
    // RFC 3207 section 4: STARTTLS only once, not inside TLS, and never with implicit TLS.
    if (!tlsActive && !startTlsRefused && cfg.tls != ClientTls::Implicit) {
      if (capStartTls) {
        sendLine("STARTTLS");
        expects.push_back(Expect::StartTls);
        return;
      }
      if (cfg.tls == ClientTls::Required) {
        fail(localReply("4.7.10", "TLS required but the server does not offer STARTTLS"), "starttls", Outcome::TempFail,
             true);
        return;
      }
    }
    if (cfg.auth && !authenticated) {
      startAuth();
      return;
    }
    ready = true;
    actions.emplace_back(SessionReady{});
  }

  // ---- AUTH (RFC 4954) towards a smarthost ---------------------------------------

  // Sends a line holding a credential and wipes our copies of it (the action keeps one
  // until the transport writes it; the TLS engine encrypts it at once).
  void sendSecretLine(std::string line) {
    sendLine(line);
    ::explicit_bzero(line.data(), line.size());
  }

  void startAuth() {
    // RFC 4954 4: credentials never travel in clear. The transport only sets auth with a
    // verified TLS policy, so this is a second lock.
    if (!tlsActive) {
      fail(localReply("4.7.10", "AUTH needs TLS, and this connection is not encrypted"), "auth", Outcome::TempFail,
           true);
      return;
    }
    if (!capAuth) {
      fail(localReply("4.7.0", "the relay does not offer AUTH (credentials are configured for it)"), "auth",
           Outcome::TempFail, true);
      return;
    }
    if (authPlain) {
      // RFC 4616 2: authzid NUL authcid NUL passwd, with an empty authzid; sent as the
      // initial response (RFC 4954 4) to save a round trip.
      std::string msg;
      msg.reserve(cfg.auth->username.size() + cfg.auth->password.size() + 2);
      msg += '\0';
      msg += cfg.auth->username;
      msg += '\0';
      msg += cfg.auth->password;
      std::string encoded = util::base64Encode(msg);
      ::explicit_bzero(msg.data(), msg.size());
      sendSecretLine("AUTH PLAIN " + encoded);
      ::explicit_bzero(encoded.data(), encoded.size());
      authLoginMech = false;
    } else if (authLogin) {
      sendLine("AUTH LOGIN");
      authLoginMech = true;
    } else {
      fail(localReply("4.7.0", "the relay offers no AUTH mechanism we support (PLAIN, LOGIN)"), "auth",
           Outcome::TempFail, true);
      return;
    }
    authStep = 0;
    expects.push_back(Expect::Auth);
  }

  void onAuth(ServerReply r) {
    if (r.code == 235) {
      // RFC 4954 4: no security layer with PLAIN/LOGIN, so no second EHLO is needed.
      authenticated = true;
      ready = true;
      actions.emplace_back(SessionReady{});
      return;
    }
    if (r.code == 334 && authLoginMech && authStep < 2) {
      // LOGIN: the first challenge asks for the user name, the second for the password
      // (draft-murchison-sasl-login); the challenge text itself is not needed.
      const std::string& value = authStep == 0 ? cfg.auth->username : cfg.auth->password;
      ++authStep;
      std::string encoded = util::base64Encode(value);
      sendSecretLine(encoded);
      ::explicit_bzero(encoded.data(), encoded.size());
      expects.push_back(Expect::Auth);
      return;
    }
    if (r.code == 334) {
      // A challenge PLAIN (initial response given) or a third LOGIN step never expects.
      // RFC 4954 4: "*" cancels the exchange; we just leave.
      protocolError("unexpected AUTH challenge");
      return;
    }
    if (r.code == 421) {
      fail(std::move(r), "auth", Outcome::TempFail, false);
      return;
    }
    if (r.code >= 500) {
      // 535 5.7.8 and friends: our credentials are wrong, which is our configuration and
      // not the recipients' fault. Recorded as a temporary failure with 4.7.8 so the
      // mail waits for the operator instead of bouncing; the server's reply is kept in
      // the text (the password never is: it is not in any reply).
      ServerReply mapped;
      mapped.code = 0;
      mapped.enhanced = "4.7.8";
      mapped.text = "the relay refused authentication as user " + util::sanitizeForLog(cfg.auth->username, 80) +
                    ": " + r.summary();
      fail(std::move(mapped), "auth", Outcome::TempFail, true);
      return;
    }
    fail(std::move(r), "auth", Outcome::TempFail, true);
  }

  void onStartTlsReply(ServerReply r) {
    if (r.code == 220) {
      // RFC 3207 section 4.2: the TLS handshake starts right after this reply.
      phase = Phase::TlsHandshake;
      actions.emplace_back(StartTls{});
      return;
    }
    // RFC 3207 section 4: on 454 (or another refusal) the client decides whether to go
    // on. Opportunistic: continue in clear with the capabilities already known.
    // Required: fail, and never send the message in clear.
    if (cfg.tls == ClientTls::Required) {
      bool quit = r.code != 421;
      fail(std::move(r), "starttls", Outcome::TempFail, quit);
      return;
    }
    if (r.code == 421) {
      fail(std::move(r), "starttls", Outcome::TempFail, false);
      return;
    }
    startTlsRefused = true;
    afterHello();
  }

  void onTlsEstablished() {
    if (phase != Phase::TlsHandshake) return;
    ++progress;
    phase = Phase::Connected;
    tlsActive = true;
    // RFC 3207 section 4.2: forget everything learned before TLS and start with EHLO.
    resetCaps();
    sendEhlo();
    drain();
  }

  void onTlsFailed(std::string_view why) {
    if (phase != Phase::TlsHandshake) return;
    fail(localReply("4.7.5", "TLS handshake failed: " + util::sanitizeForLog(why)), "starttls", Outcome::TempFail,
         false);
  }

  // ---- transactions --------------------------------------------------------------

  void send(OutboundMessage msg) {
    const bool canSend = !closed() && idle();
    Transaction t;
    t.results.resize(msg.recipients.size());
    t.decided.assign(msg.recipients.size(), false);
    for (size_t i = 0; i < msg.recipients.size(); ++i) t.results[i].recipient = msg.recipients[i];
    t.msg = std::move(msg);
    txn = std::move(t);
    Transaction& x = *txn;

    auto refuseAll = [&](const std::string& enhanced, const std::string& text) {
      for (size_t i = 0; i < x.results.size(); ++i) {
        if (x.decided[i]) continue;
        x.results[i].outcome = Outcome::PermFail;
        x.results[i].reply = localReply(enhanced, text);
        x.results[i].stage = "local";
        x.decided[i] = true;
      }
      finishTransaction();
    };

    if (!canSend) {
      // A caller bug, answered rather than asserted: nothing was sent, try again later.
      for (auto& res : x.results) {
        res.outcome = Outcome::TempFail;
        res.reply = localReply("4.3.0", "session not ready for a new message");
        res.stage = "local";
      }
      finishTransaction();
      return;
    }

    if (!sendableAddress(x.msg.mailFrom)) {
      refuseAll("5.1.7", "sender address cannot be sent in SMTP (control characters, <, > or too long)");
      return;
    }
    // RFC 8689 4.2.1 steps 4 and 5: TLS (the transport verified the certificate), then
    // REQUIRETLS in the EHLO inside it; otherwise the message must not be sent here. A
    // bounce goes anyway (section 5).
    const bool bounce = x.msg.mailFrom.empty();
    if (x.msg.requireTls && !bounce && !tlsActive) {
      refuseAll("5.7.10", "REQUIRETLS: the message needs TLS and this connection is not encrypted");
      return;
    }
    if (x.msg.requireTls && !bounce && !capRequireTls) {
      refuseAll("5.7.30", "REQUIRETLS: the server does not offer REQUIRETLS (RFC 8689)");
      return;
    }
    bool needUtf8 = x.msg.smtputf8 || hasNonAscii(x.msg.mailFrom);
    for (size_t i = 0; i < x.results.size(); ++i) {
      const std::string& r = x.msg.recipients[i];
      if (r.empty() || !sendableAddress(r)) {
        x.results[i].outcome = Outcome::PermFail;
        x.results[i].reply = localReply("5.1.3", "recipient address cannot be sent in SMTP");
        x.results[i].stage = "local";
        x.decided[i] = true;
      } else if (hasNonAscii(r)) {
        needUtf8 = true;
      }
    }
    // RFC 6531 section 3.5: without SMTPUTF8 at the server, a message that needs it is
    // not sent; 5.6.7 per RFC 6531 section 3.6.
    if (needUtf8 && !capUtf8) {
      refuseAll("5.6.7", "message needs SMTPUTF8 but the server does not offer it");
      return;
    }
    size_t dots = 0;
    x.stuffed = stuff(x.msg.content ? std::string_view(*x.msg.content) : std::string_view{}, &dots);
    uint64_t size = x.stuffed.size() - 3 - dots;  // without the "." CRLF terminator
    // RFC 1870 section 6.1 (client): do not send a message larger than the server's
    // fixed limit; 5.3.4 "message too big for system" (RFC 3463).
    if (capSize && sizeLimit > 0 && size > sizeLimit) {
      refuseAll("5.3.4", "message size " + std::to_string(size) + " exceeds the server's limit of " +
                             std::to_string(sizeLimit) + " (SIZE)");
      return;
    }
    for (size_t i = 0; i < x.results.size(); ++i)
      if (!x.decided[i]) x.rcptOrder.push_back(i);
    if (x.rcptOrder.empty()) {
      finishTransaction();
      return;
    }

    std::string mail = "MAIL FROM:<" + x.msg.mailFrom + ">";
    if (capSize) mail += " SIZE=" + std::to_string(size);  // RFC 1870 section 6
    // RFC 6152 section 3: BODY=8BITMIME when offered. When it is not offered the message
    // goes as it is: we cannot convert here (a SHOULD, deliberately not followed, as most
    // MTAs do with MIME conversion off; refusing would bounce mail to old servers).
    if (x.msg.eightBit && cap8bit) mail += " BODY=8BITMIME";
    if (needUtf8) mail += " SMTPUTF8";  // RFC 6531 section 3.4
    if (x.msg.requireTls && tlsActive && capRequireTls) mail += " REQUIRETLS";  // RFC 8689 4.2.1
    // RFC 3461 5.2.1 (a), (b): RET and ENVID exactly as received; 5.2.2 (a): never to a
    // server without DSN.
    if (capDsn && !x.msg.dsnRet.empty()) mail += " RET=" + x.msg.dsnRet;
    if (capDsn && !x.msg.envId.empty()) mail += " ENVID=" + x.msg.envId;

    pipelinedTxn = capPipelining;
    if (pipelinedTxn) {
      // RFC 2920 section 3.1: RSET, MAIL and RCPT may be anywhere in a group, DATA last.
      std::string group;
      if (needRset) {
        group += "RSET\r\n";
        expects.push_back(Expect::Rset);
        needRset = false;
      }
      group += mail + "\r\n";
      expects.push_back(Expect::Mail);
      for (size_t i : x.rcptOrder) {
        group += rcptLine(i) + "\r\n";
        expects.push_back(Expect::Rcpt);
      }
      group += "DATA\r\n";
      expects.push_back(Expect::Data);
      actions.emplace_back(SendBytes{std::move(group)});
    } else {
      if (needRset) {
        needRset = false;
        sendLine("RSET");
        expects.push_back(Expect::Rset);
        pendingMail = std::move(mail);
        return;
      }
      sendLine(std::move(mail));
      expects.push_back(Expect::Mail);
    }
  }

  std::string pendingMail;  // MAIL waiting for the RSET reply (no pipelining)

  void onRset(ServerReply r) {
    // RFC 5321 4.1.1.5: RSET must be answered 250. A server that cannot reset is not
    // worth another transaction.
    if (r.code != 250) {
      bool quit = r.code != 421;
      fail(std::move(r), "rset", Outcome::TempFail, quit);
      return;
    }
    if (!pendingMail.empty()) {
      sendLine(std::move(pendingMail));
      pendingMail.clear();
      expects.push_back(Expect::Mail);
    }
  }

  void onMail(ServerReply r) {
    Transaction& x = *txn;
    if (r.code >= 200 && r.code < 300) {
      if (!pipelinedTxn) sendNextRcpt();
      return;
    }
    if (r.code == 421) return fail(std::move(r), "mail", Outcome::TempFail, false);
    if (r.code < 400) return protocolError("unexpected reply \"" + r.summary() + "\" to MAIL");
    // The sender was refused: that reply decides for every recipient sent.
    x.mailFailed = true;
    for (size_t i : x.rcptOrder) {
      x.results[i].outcome = outcomeOf(r.code);
      x.results[i].reply = r;
      x.results[i].stage = "mail";
      x.decided[i] = true;
    }
    needRset = true;
    if (!pipelinedTxn) finishTransaction();
    // Pipelined: the RCPT and DATA replies still come and are consumed.
  }

  // "RCPT TO:<addr>", with NOTIFY and ORCPT when the server offers DSN (RFC 3461 5.2.1
  // (c), (d)): NOTIFY only when the client gave one; ORCPT the client's, else (MAY) the
  // recipient as received when it is ASCII (xtext cannot carry UTF-8, RFC 3461 4.2).
  std::string rcptLine(size_t i) const {
    const Transaction& x = *txn;
    std::string line = "RCPT TO:<" + x.msg.recipients[i] + ">";
    if (!capDsn) return line;
    const OutboundMessage::RcptDsn* d = i < x.msg.rcptDsn.size() ? &x.msg.rcptDsn[i] : nullptr;
    if (d && d->notify != 0) line += " NOTIFY=" + notifyValue(d->notify);
    if (d && !d->orcpt.empty())
      line += " ORCPT=" + d->orcpt;
    else if (!util::hasNonAscii(x.msg.recipients[i]))
      line += " ORCPT=rfc822;" + encodeXtext(x.msg.recipients[i]);
    return line;
  }

  void sendNextRcpt() {
    Transaction& x = *txn;
    if (x.rcptReplies < x.rcptOrder.size()) {
      sendLine(rcptLine(x.rcptOrder[x.rcptReplies]));
      expects.push_back(Expect::Rcpt);
      return;
    }
    if (x.accepted == 0) {
      // MAIL was accepted, so a transaction is open: reset it before the next one.
      needRset = true;
      finishTransaction();
      return;
    }
    sendLine("DATA");
    expects.push_back(Expect::Data);
  }

  void onRcpt(ServerReply r) {
    Transaction& x = *txn;
    size_t i = x.rcptOrder[x.rcptReplies++];
    if (r.code == 421) return fail(std::move(r), "rcpt", Outcome::TempFail, false);
    if (!x.mailFailed) {
      if (r.code >= 200 && r.code < 300) {
        ++x.accepted;
        x.results[i].reply = std::move(r);  // provisional until the end of data
        x.results[i].stage = "rcpt";
      } else if (r.code >= 400) {
        // RFC 5321 4.2.5 / 3.3: a refused recipient keeps its RCPT reply.
        x.results[i].outcome = outcomeOf(r.code);
        x.results[i].reply = std::move(r);
        x.results[i].stage = "rcpt";
        x.decided[i] = true;
      } else {
        return protocolError("unexpected reply \"" + r.summary() + "\" to RCPT");
      }
    }
    if (!pipelinedTxn) sendNextRcpt();
  }

  void onData(ServerReply r) {
    Transaction& x = *txn;
    if (r.code == 354) {
      if (x.accepted == 0) {
        // RFC 2920 section 3.1: DATA accepted with no valid recipient: "the client SMTP
        // should send a single dot". Its reply is consumed and decides nothing.
        x.discardData = true;
        needRset = true;
        sendLine(".");
      } else {
        actions.emplace_back(SendBytes{std::move(x.stuffed)});
        x.stuffed.clear();
      }
      expects.push_back(Expect::DataEnd);
      return;
    }
    if (r.code == 421) return fail(std::move(r), "data", Outcome::TempFail, false);
    if (x.accepted == 0) {
      // Pipelined and nothing accepted: the 503/554 to DATA is expected (RFC 2920 3.1
      // "If the DATA command was properly rejected the client SMTP can just issue RSET").
      needRset = true;
      finishTransaction();
      return;
    }
    if (r.code < 400) return protocolError("unexpected reply \"" + r.summary() + "\" to DATA");
    decideAccepted(r, "data");
    needRset = true;
    finishTransaction();
  }

  void onDataEnd(ServerReply r) {
    Transaction& x = *txn;
    if (!x.discardData) {
      if (r.code >= 300 && r.code < 400)
        return protocolError("unexpected reply \"" + r.summary() + "\" to end of data");
      // RFC 5321 4.1.1.4: the reply to the end of data decides for every recipient
      // accepted at RCPT; 421 here too is only a temporary failure of this message.
      decideAccepted(r, "data-end");
    }
    finishTransaction();
    if (r.code == 421) fail(std::move(r), "data-end", Outcome::TempFail, false);  // RFC 5321 3.8
  }

  void decideAccepted(const ServerReply& r, const char* stage) {
    Transaction& x = *txn;
    for (size_t i : x.rcptOrder) {
      if (x.decided[i]) continue;
      x.results[i].outcome = outcomeOf(r.code);
      x.results[i].reply = r;
      x.results[i].stage = stage;
      x.decided[i] = true;
    }
  }

  // ---- ending ------------------------------------------------------------------

  void quit() {
    if (closed()) return;
    if (idle()) {
      // RFC 5321 4.1.1.10: QUIT, then wait for 221 before closing.
      sendLine("QUIT");
      expects.push_back(Expect::Quit);
      return;
    }
    if (!expects.empty() && expects.back() == Expect::Quit) return;
    // Not idle (mid-transaction, or still connecting): the server's state is unknown,
    // so no QUIT; just close, with a temporary result for a transaction in progress.
    ServerReply why = localReply("4.3.0", "session closed by the client");
    if (txn) {
      for (size_t i = 0; i < txn->results.size(); ++i) {
        if (txn->decided[i]) continue;
        txn->results[i].outcome = Outcome::TempFail;
        txn->results[i].reply = why;
        txn->results[i].stage = "local";
      }
      finishTransaction();
    }
    actions.emplace_back(CloseConnection{});
    phase = Phase::Closed;
    expects.clear();
    inbuf.clear();
  }

  void onQuit() {
    // Whatever the server says to QUIT (221, or anything), the session is over.
    actions.emplace_back(CloseConnection{});
    phase = Phase::Closed;
    expects.clear();
    inbuf.clear();
  }

  bool quitting() const { return !expects.empty() && expects.front() == Expect::Quit; }

  void onConnectionLost(std::string_view why) {
    if (closed()) return;
    if (quitting()) {
      onQuit();  // the server closed before (or instead of) its 221: fine
      return;
    }
    std::string stage = expects.empty() ? (phase == Phase::TlsHandshake ? "starttls"
                                           : ready                      ? "idle"
                                                                        : "connect")
                                        : stageOf(expects.front());
    fail(localReply("", "connection lost: " + util::sanitizeForLog(why)), std::move(stage), Outcome::TempFail, false);
  }

  void onTimeout() {
    if (closed()) return;
    auto t = timeout();
    if (!t) return;  // no timer should be running: ignore a stale one
    if (quitting()) {
      onQuit();
      return;
    }
    std::string what = phase == Phase::TlsHandshake ? "the TLS handshake" : describe(expects.front());
    std::string stage = phase == Phase::TlsHandshake ? "starttls" : stageOf(expects.front());
    fail(localReply("4.4.2", "timeout after " + std::to_string(t->count()) + "s waiting for " + what), std::move(stage),
         Outcome::TempFail, false);
  }

  std::optional<std::chrono::seconds> timeout() const {
    if (closed() || phase == Phase::Init) return std::nullopt;
    // The handshake is bounded like a command (RFC 5321 has no value for it).
    if (phase == Phase::TlsHandshake) return to.mail;
    if (expects.empty()) return std::nullopt;
    switch (expects.front()) {
      case Expect::Greeting:
        return to.greeting;  // 4.5.3.2.1
      case Expect::Rcpt:
        return to.rcpt;  // 4.5.3.2.3
      case Expect::Data:
        return to.dataInit;  // 4.5.3.2.4
      case Expect::DataEnd:
        return to.dataTerm;  // 4.5.3.2.6
      default:
        return to.mail;  // 4.5.3.2.2 (EHLO, STARTTLS, RSET, QUIT alike)
    }
  }

  bool idle() const { return phase == Phase::Connected && ready && expects.empty() && !txn; }
};

ClientSession::ClientSession(ClientConfig config, ClientTimeouts timeouts)
    : impl_(std::make_unique<Impl>(std::move(config), timeouts)) {}
ClientSession::~ClientSession() = default;

void ClientSession::onConnected() {
  if (impl_->phase != Impl::Phase::Init) return;
  impl_->phase = Impl::Phase::Connected;
  ++impl_->progress;
  impl_->expects.push_back(Expect::Greeting);
  impl_->drain();
}

void ClientSession::onBytes(std::string_view data) { impl_->onBytes(data); }
void ClientSession::onTlsEstablished() { impl_->onTlsEstablished(); }
void ClientSession::onTlsFailed(std::string_view why) { impl_->onTlsFailed(why); }
void ClientSession::onConnectionLost(std::string_view why) { impl_->onConnectionLost(why); }
void ClientSession::onTimeout() { impl_->onTimeout(); }
void ClientSession::send(OutboundMessage message) { impl_->send(std::move(message)); }
void ClientSession::quit() { impl_->quit(); }

std::vector<ClientAction> ClientSession::takeActions() {
  std::vector<ClientAction> out;
  out.swap(impl_->actions);
  return out;
}

std::optional<std::chrono::seconds> ClientSession::timeout() const { return impl_->timeout(); }
uint64_t ClientSession::progress() const { return impl_->progress; }
bool ClientSession::offersPipelining() const { return impl_->capPipelining; }
bool ClientSession::offersStartTls() const { return impl_->capStartTls; }
bool ClientSession::tlsActive() const { return impl_->tlsActive; }
bool ClientSession::authenticated() const { return impl_->authenticated; }
bool ClientSession::offersRequireTls() const { return impl_->capRequireTls; }
bool ClientSession::offersDsn() const { return impl_->capDsn; }
std::optional<uint64_t> ClientSession::serverSizeLimit() const {
  if (impl_->capSize && impl_->sizeLimit > 0) return impl_->sizeLimit;
  return std::nullopt;
}
bool ClientSession::idle() const { return impl_->idle(); }
bool ClientSession::closed() const { return impl_->closed(); }

}  // namespace subrelay::smtp
