// Fuzz target for smtp::ServerSession (RFC 5321 submission server, I/O-free).
//
// The input is the client's byte stream. The target answers every action the way a
// driver would, deterministically from the action itself (password "s3cret" is right,
// "temp" is a temporary failure, "lock" is refused; content containing "FAILSTORE" is
// not stored), and checks invariants after every step:
//   - every Send is whole CRLF reply lines "ddd[ -]text" with no bare CR or LF;
//   - nothing follows Close; buffered input stays bounded;
//   - a Store has recipients, an account, and CRLF-only content ending in CRLF, within
//     the size limit (what we send downstream never contains a bare CR or LF);
//   - the same input fed whole, one byte at a time and in irregular pieces gives the
//     same replies and actions (unless STARTTLS, which discards pipelined input by
//     design, happened).
// Two configurations are run: a permissive one over cleartext, and a strict one with
// small limits (junk commands, credential lengths, header limits through the server's
// streaming HeaderScanner) over implicit TLS.
#include "fuzz_check.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include <memory>
#include <optional>

#include "message/header_scanner.h"
#include "smtp/server_session.h"

using namespace subrelay::smtp;

namespace {

constexpr size_t kMaxBuffered = size_t{256} * 1024;  // kMaxPendingInput in server_session.cpp

constexpr const char* kFuzzTarget = "fuzz_session";
using subrelay::fuzz::onlyCrlf;


void checkReplies(std::string_view bytes) {
  FUZZ_CHECK(!bytes.empty());
  FUZZ_CHECK(bytes.size() >= 2 && bytes.substr(bytes.size() - 2) == "\r\n");
  FUZZ_CHECK(onlyCrlf(bytes));
  size_t pos = 0;
  while (pos < bytes.size()) {
    size_t e = bytes.find("\r\n", pos);
    std::string_view line = bytes.substr(pos, e - pos);
    FUZZ_CHECK(line.size() >= 3 && line.size() <= 510);
    FUZZ_CHECK(line[0] >= '2' && line[0] <= '5');
    FUZZ_CHECK(line[1] >= '0' && line[1] <= '9' && line[2] >= '0' && line[2] <= '9');
    FUZZ_CHECK(line.size() == 3 || line[3] == ' ' || line[3] == '-');
    for (char c : line) FUZZ_CHECK(static_cast<unsigned char>(c) >= 0x20 && c != 0x7f);
    pos = e + 2;
  }
}

SessionConfig makeConfig(int variant) {
  SessionConfig c;
  c.hostname = "fuzz.test";
  c.senderAllowed = [](std::string_view account, std::string_view addr) {
    return !account.empty() && addr.find("deny") == std::string_view::npos;
  };
  if (variant == 0) {
    c.starttlsAvailable = true;
    c.authWithoutTls = true;
  } else {
    c.starttlsAvailable = false;
    c.authWithoutTls = false;
    c.maxMessageBytes = 300;
    c.maxRecipients = 2;
    c.maxCommandLine = 64;
    c.maxAuthLine = 128;
    c.maxBadCommands = 8;
    c.maxAuthFailures = 2;
    c.maxJunkCommands = 5;
    c.maxUsernameBytes = 16;
    c.maxPasswordBytes = 16;
    // The server's content observer: header limits from a streaming HeaderScanner. Its
    // verdict must not depend on how the input is split either.
    auto scan = std::make_shared<std::optional<subrelay::message::HeaderScanner>>();
    c.onContent = [scan](std::string_view chunk) -> std::optional<PolicyRefusal> {
      if (!*scan) *scan = subrelay::message::HeaderScanner({200, 5});
      (*scan)->feed(chunk);
      if ((*scan)->violation() != subrelay::message::HeaderScanner::Violation::None)
        return PolicyRefusal{552, "5.3.4", "Header limit"};
      return std::nullopt;
    };
    c.onContentReset = [scan] { scan->reset(); };
  }
  return c;
}

enum class Split { Whole, Bytewise, Irregular };

struct Run {
  std::string log;
  bool sawStartTls = false;
};

Run drive(std::string_view input, int variant, Split split) {
  SessionConfig cfg = makeConfig(variant);
  const uint64_t maxBytes = cfg.maxMessageBytes;
  const uint32_t maxRcpt = cfg.maxRecipients;
  ServerSession s(std::move(cfg), 42);
  Run run;
  bool closed = false;

  auto pump = [&] {
    for (int rounds = 0; rounds < 1000; ++rounds) {
      auto actions = s.takeActions();
      if (actions.empty()) return;
      for (auto& a : actions) {
        FUZZ_CHECK(!closed);
        if (auto* send = std::get_if<Send>(&a)) {
          checkReplies(send->bytes);
          run.log += send->bytes;
        } else if (std::holds_alternative<StartTls>(a)) {
          run.log += "<starttls>";
          run.sawStartTls = true;
          s.onTlsEstablished(TlsInfo{"TLSv1.3", "TLS_AES_128_GCM_SHA256"});
        } else if (auto* au = std::get_if<Authenticate>(&a)) {
          FUZZ_CHECK(au->mechanism == "PLAIN" || au->mechanism == "LOGIN");
          FUZZ_CHECK(!au->username.empty() && !au->password.empty());
          run.log += "<auth " + au->username + ">";
          if (au->password == "s3cret") {
            s.onAuthResult(AuthVerdict::Ok);
          } else if (au->password == "temp") {
            s.onAuthResult(AuthVerdict::TempFail);
          } else if (au->password == "lock") {
            s.onAuthResult(AuthVerdict::Refused, "Locked\r\n250 injected");
          } else {
            s.onAuthResult(AuthVerdict::Failed);
          }
        } else if (auto* st = std::get_if<Store>(&a)) {
          FUZZ_CHECK(!st->envelope.recipients.empty());
          FUZZ_CHECK(st->envelope.recipients.size() <= maxRcpt);
          FUZZ_CHECK(!st->account.empty());
          FUZZ_CHECK(onlyCrlf(st->content));
          FUZZ_CHECK(st->content.empty() || st->content.substr(st->content.size() - 2) == "\r\n");
          FUZZ_CHECK(st->content.size() <= maxBytes + 2);
          run.log += "<store " + st->envelope.mailFrom + " " + std::to_string(st->envelope.recipients.size()) + " " +
                     std::to_string(st->content.size()) + ">";
          StoreOutcome o;
          if (st->content.find("FAILSTORE") != std::string::npos) {
            o.ok = false;
            o.code = 451;
            o.enhanced = "4.3.0";
            o.text = "try again";
          } else {
            o.ok = true;
            o.queueId = "Q" + std::to_string(st->content.size());
          }
          s.onStored(o);
        } else if (std::holds_alternative<Close>(a)) {
          run.log += "<close>";
          closed = true;
        }
      }
    }
    subrelay::fuzz::fail(kFuzzTarget, "actions never settle");
  };

  s.onConnect(Peer{"203.0.113.9", 1234, false},
              variant == 1 ? std::optional<TlsInfo>(TlsInfo{"TLSv1.3", "X"}) : std::nullopt);
  pump();

  auto feed = [&](std::string_view chunk) {
    s.onBytes(chunk);
    FUZZ_CHECK(s.bufferedBytes() <= kMaxBuffered);
    pump();
  };
  switch (split) {
    case Split::Whole:
      feed(input);
      break;
    case Split::Bytewise:
      for (size_t i = 0; i < input.size(); ++i) feed(input.substr(i, 1));
      break;
    case Split::Irregular: {
      uint32_t x = 2463534242u ^ static_cast<uint32_t>(input.size());
      for (size_t i = 0; i < input.size();) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        size_t n = 1 + x % 97;
        if (n > input.size() - i) n = input.size() - i;
        feed(input.substr(i, n));
        i += n;
      }
      break;
    }
  }
  FUZZ_CHECK(s.timeoutFor().count() > 0);
  if (input.size() % 3 == 0) {
    s.onShutdown();
  } else if (input.size() % 3 == 1) {
    s.onTimeout();
  }
  pump();
  s.onPeerClosed();
  s.onBytes("NOOP\r\n");
  FUZZ_CHECK(s.takeActions().empty());
  return run;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view input(reinterpret_cast<const char*>(data), size);
  for (int variant = 0; variant < 2; ++variant) {
    Run whole = drive(input, variant, Split::Whole);
    Run irregular = drive(input, variant, Split::Irregular);
    // Input buffered while waiting is capped (421 past the cap), which depends on how
    // much arrived at once: compare only inputs well below the cap.
    bool comparable = !whole.sawStartTls && size < kMaxBuffered / 2;
    if (comparable) FUZZ_CHECK(whole.log == irregular.log);
    if (size <= 16384) {
      Run bytewise = drive(input, variant, Split::Bytewise);
      if (comparable) FUZZ_CHECK(whole.log == bytewise.log);
    }
  }
  return 0;
}
