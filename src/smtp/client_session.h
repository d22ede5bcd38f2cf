// smtp::ClientSession: the delivery side of SMTP (RFC 5321), free of I/O. Server replies
// go in as bytes (any split), commands come out as actions; the transport (delivery/)
// owns the socket, the TLS engine and the timers.
//
//   onConnected() -> greeting -> EHLO (HELO when EHLO is refused) -> STARTTLS when
//   offered (or required) -> EHLO again -> AUTH (smarthost credentials, inside TLS
//   only) -> Idle
//   Idle + send(message) -> MAIL, RCPT..., DATA (or pipelined when PIPELINING) ->
//   per-recipient results -> Idle (RSET first when a transaction failed half-way)
//   Idle + quit() -> QUIT -> Close
//
// Not here: MX choice, retries, the socket, the TLS library.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace subrelay::smtp {

enum class ClientTls {
  Opportunistic,  // STARTTLS when offered, plaintext otherwise; a failed handshake -> retry in clear is NOT done here
  Required,       // no STARTTLS offered -> the session fails (temporary) instead of sending in clear
  Implicit,       // the transport already runs TLS from the first byte: no STARTTLS
};

// Credentials for an upstream relay (RFC 4954). Sent only inside TLS, with PLAIN
// (RFC 4616) when offered, else LOGIN.
struct ClientAuth {
  std::string username;
  std::string password;
};

struct ClientConfig {
  std::string heloName;  // our host name for EHLO/HELO
  ClientTls tls = ClientTls::Opportunistic;
  // Set: authenticate after the EHLO inside TLS, before SessionReady. The transport sets it
  // only for a verified relay connection.
  std::shared_ptr<const ClientAuth> auth;
  size_t maxReplyLine = 4096;   // longer server lines -> protocol error (temporary)
  size_t maxReplyLines = 1000;  // lines in one multi-line reply
};

// One message to send in one transaction: every recipient is for the same destination.
struct OutboundMessage {
  std::string mailFrom;                 // "" = null sender "<>"
  std::vector<std::string> recipients;  // addresses without angle brackets
  std::shared_ptr<const std::string> content;  // CRLF lines as stored; dot-stuffed here
  bool eightBit = false;                // BODY=8BITMIME when the server offers it
  bool smtputf8 = false;                // SMTPUTF8 needed: refused (5.6.7) when not offered
  // DSN extension (RFC 3461 5.2.1), sent only to a server that offers DSN: RET= ("FULL",
  // "HDRS", "" = none), ENVID= (xtext as received, "" = none), and per recipient
  // (parallel to recipients, or empty) NOTIFY= and ORCPT=. Without an ORCPT from the
  // client, an ASCII recipient gets ORCPT=rfc822;<its address> (5.2.1 (d)).
  std::string dsnRet;
  std::string envId;
  struct RcptDsn {
    uint8_t notify = 0;   // kNotify* bits (command.h), 0 = none
    std::string orcpt;    // as received, "" = none
  };
  std::vector<RcptDsn> rcptDsn;
  // RFC 8689 4.2.1: MAIL FROM ... REQUIRETLS. Sent only inside TLS to a server that offers
  // REQUIRETLS; otherwise the message is refused (5.7.10 / 5.7.30). A bounce (null
  // sender) carries it when offered and is sent anyway when not (RFC 8689 5).
  bool requireTls = false;
};

// A server reply as received (multi-line joined with "\n" in text).
struct ServerReply {
  int code = 0;                // 0: no reply (connection lost, timeout, local decision)
  std::string enhanced;        // "5.1.1" when the reply carried one, else ""
  std::string text;            // without code and enhanced code
  std::string summary() const; // "550 5.1.1 no such user" (first line, for logs and DSNs)
};

enum class Outcome { Delivered, TempFail, PermFail };

struct RecipientResult {
  std::string recipient;
  Outcome outcome = Outcome::TempFail;
  ServerReply reply;  // the reply that decided (RCPT's, or DATA's / MAIL's for all)
  std::string stage;  // "connect" "ehlo" "starttls" "auth" "rset" "mail" "rcpt" "data" "data-end" "local"
  // The server offers DSN, so the RCPT carried the DSN request (NOTIFY) on and the next
  // hop reports success itself (RFC 3461 5.2.1); false: we owe any "relayed" DSN.
  bool dsnPassedOn = false;
};

// What the transport must do next.
struct SendBytes { std::string bytes; };
struct StartTls {};    // begin the TLS handshake as client, then call onTlsEstablished()/onTlsFailed()
struct CloseConnection {};
struct SessionReady {};  // greeting/EHLO/STARTTLS done: send() may be called (once per Idle)
struct TransactionDone { std::vector<RecipientResult> results; };
// The session failed as a whole before or between transactions (greeting refused, TLS
// required but not offered, protocol error, lost connection). If a transaction was in
// progress, a TransactionDone with every recipient's result comes first.
// stage: as in RecipientResult, or "idle" (421 or garbage between transactions).
// Outcome is TempFail even for a 5xx greeting (554, RFC 5321 3.1): a host refusing
// service says nothing final about the recipients, so the next MX is tried; reply.code
// keeps the server's code for callers that want a stricter policy. When the server is
// in a sane state (5xx greeting, EHLO/HELO refused, TLS required but unavailable) a
// SendBytes "QUIT" comes before the SessionFailed: flush it before closing.
struct SessionFailed { ServerReply reply; Outcome outcome = Outcome::TempFail; std::string stage; };
using ClientAction = std::variant<SendBytes, StartTls, CloseConnection, SessionReady, TransactionDone, SessionFailed>;

// RFC 5321 4.5.3.2 timeouts, by what the session is waiting for.
struct ClientTimeouts {
  std::chrono::seconds greeting{300};    // 4.5.3.2.1 initial 220: 5 min
  std::chrono::seconds mail{300};        // 4.5.3.2.2 MAIL: 5 min (also EHLO, STARTTLS, RSET, QUIT)
  std::chrono::seconds rcpt{300};        // 4.5.3.2.3 RCPT: 5 min
  std::chrono::seconds dataInit{120};    // 4.5.3.2.4 DATA initiation: 2 min
  std::chrono::seconds dataBlock{180};   // 4.5.3.2.5 data block: 3 min (per write: applied by the
                                         // transport while it flushes the content; not returned by timeout())
  std::chrono::seconds dataTerm{600};    // 4.5.3.2.6 DATA termination: 10 min
};

class ClientSession {
 public:
  explicit ClientSession(ClientConfig config, ClientTimeouts timeouts = {});
  ~ClientSession();

  void onConnected();                 // TCP (and implicit TLS) is up: wait for the greeting
  void onBytes(std::string_view data);
  void onTlsEstablished();
  void onTlsFailed(std::string_view why);
  void onConnectionLost(std::string_view why);
  void onTimeout();                   // the timer for timeout() fired

  // Only after SessionReady (and after each TransactionDone). Checks SIZE, SMTPUTF8.
  void send(OutboundMessage message);
  // Idle: QUIT, then CloseConnection on any reply, on loss or on timeout. Not idle
  // (connecting, mid-transaction): no QUIT (the server's state is unknown), the
  // transaction gets TempFail results and CloseConnection follows at once.
  void quit();

  std::vector<ClientAction> takeActions();

  // How long the transport should wait for the next reply; nullopt when not waiting.
  // After DATA's 354 this is dataTerm, counted from the end of the content's write.
  // During the TLS handshake it is `mail` (RFC 5321 has no value for it).
  std::optional<std::chrono::seconds> timeout() const;
  // Grows by one for every whole reply handled (and the connection and TLS handshake
  // being up): the transport restarts the timer for timeout() only when this changed, so
  // each RFC 5321 4.5.3.2 timeout is a total for its stage. Bytes of a reply that never
  // completes (an MX trickling one byte a minute) do not extend it.
  uint64_t progress() const;

  // What the server offered (valid after SessionReady).
  bool offersPipelining() const;
  bool offersStartTls() const;
  bool tlsActive() const;
  bool authenticated() const;  // AUTH succeeded (ClientConfig::auth)
  bool offersRequireTls() const;  // REQUIRETLS (RFC 8689)
  bool offersDsn() const;         // DSN (RFC 3461)
  std::optional<uint64_t> serverSizeLimit() const;  // SIZE n, n > 0
  bool idle() const;    // ready for send()
  bool closed() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// RFC 5321 4.5.2: lines starting with "." get one more "."; the content must end in CRLF
// (one is added when missing) and the terminator "." CRLF is appended. Bare CR or LF in
// the input become CRLF, so nothing on the wire is a bare line ending (SPEC: smuggling).
std::string dotStuff(std::string_view content);

}  // namespace subrelay::smtp
