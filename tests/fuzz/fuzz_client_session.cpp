// Fuzz target for smtp::ClientSession (RFC 5321 client, I/O-free).
//
// Input: byte 0 picks the configuration (TLS mode, small reply limits); the rest is split
// at NUL bytes into segments. Each segment's first byte is a driver step, applied when it
// makes sense in the current state (send a message when idle, quit, timeout, connection
// lost, TLS handshake done or failed); the remaining bytes are the server's, fed whole,
// one byte at a time or in irregular pieces. Invariants checked after every step:
//   - every SendBytes is non-empty, ends in CRLF and holds no bare CR or LF;
//   - nothing follows CloseConnection; SessionFailed is followed by CloseConnection;
//   - every send() gets exactly one TransactionDone, with one result per recipient,
//     and a final connection loss leaves the session closed with nothing outstanding;
//   - the three ways of splitting the server bytes give the same actions.
#include "fuzz_check.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "smtp/client_session.h"

using namespace subrelay::smtp;

namespace {

constexpr const char* kFuzzTarget = "fuzz_client_session";
using subrelay::fuzz::onlyCrlf;


enum class Split { Whole, Bytewise, Irregular };

OutboundMessage makeMessage(unsigned n) {
  static const char* const kContents[] = {
      "Subject: x\r\n\r\nbody\r\n",
      ".\r\n..\r\n.x\nbare LF\rbare CR",
      "",
      "\r\n.\r\nQUIT\r\n",
  };
  OutboundMessage m;
  m.mailFrom = n % 7 == 6 ? "" : "sender@example.com";
  size_t count = 1 + n % 4;
  for (size_t i = 0; i < count; ++i) m.recipients.push_back("r" + std::to_string(i) + "@example.org");
  if (n % 5 == 3) m.recipients.push_back("bad\r\nRCPT TO:<x@y>");
  if (n % 11 == 10) m.recipients.push_back("j\xc3\xb6rg@example.org");
  m.content = std::make_shared<const std::string>(kContents[n % 4]);
  m.eightBit = n % 2 == 1;
  m.smtputf8 = n % 9 == 8;
  return m;
}

struct Run {
  std::string log;
};

Run drive(std::string_view input, Split split) {
  Run run;
  if (input.empty()) return run;
  unsigned variant = static_cast<unsigned char>(input[0]);
  input.remove_prefix(1);
  ClientConfig cfg;
  cfg.heloName = "fuzz.example.net";
  cfg.tls = variant % 3 == 0 ? ClientTls::Opportunistic : variant % 3 == 1 ? ClientTls::Required : ClientTls::Implicit;
  if (variant & 4) {
    cfg.maxReplyLine = 40;
    cfg.maxReplyLines = 4;
  }
  // Smarthost credentials: AUTH must never go out before TLS is up.
  if (variant & 8) cfg.auth = std::make_shared<ClientAuth>(ClientAuth{"fuzzuser", "fuzzpass"});
  ClientSession s(cfg);
  bool closed = false, failed = false, tlsPending = false;
  size_t sends = 0, dones = 0;
  std::vector<size_t> expectedResults;

  auto pump = [&] {
    auto actions = s.takeActions();
    for (size_t i = 0; i < actions.size(); ++i) {
      auto& a = actions[i];
      FUZZ_CHECK(!closed);
      if (failed) FUZZ_CHECK(std::holds_alternative<CloseConnection>(a));
      if (auto* b = std::get_if<SendBytes>(&a)) {
        FUZZ_CHECK(!b->bytes.empty());
        FUZZ_CHECK(b->bytes.size() >= 2 && b->bytes.substr(b->bytes.size() - 2) == "\r\n");
        FUZZ_CHECK(onlyCrlf(b->bytes));
        if (b->bytes.rfind("AUTH", 0) == 0) FUZZ_CHECK(cfg.auth && s.tlsActive());
        run.log += "C[" + b->bytes + "]";
      } else if (std::holds_alternative<StartTls>(a)) {
        FUZZ_CHECK(!tlsPending);
        FUZZ_CHECK(cfg.tls != ClientTls::Implicit);
        tlsPending = true;
        run.log += "<starttls>";
      } else if (std::holds_alternative<CloseConnection>(a)) {
        closed = true;
        run.log += "<close>";
      } else if (std::holds_alternative<SessionReady>(a)) {
        run.log += "<ready>";
      } else if (auto* d = std::get_if<TransactionDone>(&a)) {
        FUZZ_CHECK(dones < expectedResults.size());
        FUZZ_CHECK(d->results.size() == expectedResults[dones]);
        ++dones;
        run.log += "<done";
        for (auto& r : d->results) {
          FUZZ_CHECK(!r.stage.empty());
          run.log += " " + std::to_string(static_cast<int>(r.outcome)) + r.stage + r.reply.summary();
        }
        run.log += ">";
      } else if (auto* f = std::get_if<SessionFailed>(&a)) {
        FUZZ_CHECK(f->outcome != Outcome::Delivered);
        FUZZ_CHECK(dones == sends);  // the transaction's results come first
        failed = true;
        run.log += "<failed " + f->stage + " " + f->reply.summary() + ">";
      }
    }
    if (failed) FUZZ_CHECK(closed);
    FUZZ_CHECK(s.closed() == closed);
  };

  auto feed = [&](std::string_view bytes) {
    switch (split) {
      case Split::Whole:
        s.onBytes(bytes);
        pump();
        break;
      case Split::Bytewise:
        for (size_t i = 0; i < bytes.size(); ++i) {
          s.onBytes(bytes.substr(i, 1));
          pump();
        }
        break;
      case Split::Irregular: {
        uint32_t x = 2463534242u ^ static_cast<uint32_t>(bytes.size());
        for (size_t i = 0; i < bytes.size();) {
          x ^= x << 13;
          x ^= x >> 17;
          x ^= x << 5;
          size_t n = 1 + x % 23;
          if (n > bytes.size() - i) n = bytes.size() - i;
          s.onBytes(bytes.substr(i, n));
          pump();
          i += n;
        }
        break;
      }
    }
  };

  s.onConnected();
  pump();
  bool first = true;
  unsigned step = 0;
  while (true) {
    size_t nul = input.find('\0');
    std::string_view seg = input.substr(0, nul);
    if (!first && !seg.empty()) {
      unsigned op = static_cast<unsigned char>(seg[0]) % 8;
      seg.remove_prefix(1);
      if (op <= 1 && s.idle()) {
        OutboundMessage m = makeMessage(step);
        expectedResults.push_back(m.recipients.size());
        ++sends;
        s.send(std::move(m));
      } else if (op == 2) {
        s.quit();
      } else if (op == 3) {
        s.onTimeout();
      } else if (op == 4 && tlsPending) {
        tlsPending = false;
        s.onTlsEstablished();
      } else if (op == 5 && tlsPending) {
        tlsPending = false;
        s.onTlsFailed("handshake failure");
      } else if (op == 6) {
        FUZZ_CHECK(!s.timeout() || s.timeout()->count() > 0);
      }
      pump();
      ++step;
    }
    first = false;
    feed(seg);
    if (nul == std::string_view::npos) break;
    input.remove_prefix(nul + 1);
  }
  s.onConnectionLost("end of input");
  pump();
  FUZZ_CHECK(s.closed());
  FUZZ_CHECK(dones == sends);
  FUZZ_CHECK(!s.timeout());
  s.onBytes("250 late\r\n");
  s.quit();
  s.onTimeout();
  FUZZ_CHECK(s.takeActions().empty());
  return run;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view input(reinterpret_cast<const char*>(data), size);
  Run whole = drive(input, Split::Whole);
  Run irregular = drive(input, Split::Irregular);
  FUZZ_CHECK(whole.log == irregular.log);
  if (size <= 16384) {
    Run bytewise = drive(input, Split::Bytewise);
    FUZZ_CHECK(whole.log == bytewise.log);
  }
  return 0;
}
