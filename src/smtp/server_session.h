// ServerSession: the I/O-free SMTP submission server (RFC 5321, RFC 6409).
//
// Bytes in, actions out. The session never touches a socket, TLS, a clock or the disk:
// it returns Send / StartTls / Authenticate / Store / Close actions and is told the
// outcome of the asynchronous ones by a call (onTlsEstablished, onAuthResult, onStored).
// While such an outcome is pending, further input is buffered, not processed
// (RFC 2920 pipelining stays correct, and nothing is answered out of order).
//
// Implements: EHLO/HELO, MAIL, RCPT, DATA, BDAT (RFC 3030 CHUNKING), RSET, NOOP, QUIT,
// HELP, VRFY/EXPN (252, no probing), STARTTLS (RFC 3207), AUTH PLAIN/LOGIN (RFC 4954,
// RFC 4616), SIZE (RFC 1870), 8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531), PIPELINING
// (RFC 2920), ENHANCEDSTATUSCODES (RFC 2034/3463), DSN (RFC 3461: RET, ENVID, NOTIFY,
// ORCPT are parsed and carried in the Envelope).
//
// Not here: password checks (policy/), storing (queue/), message fix-ups (message/),
// timers (the driver calls onTimeout when timeoutFor() has elapsed without input).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "smtp/command.h"

namespace subrelay::smtp {

using SessionId = uint64_t;

// A refusal decided by policy outside the session (rate limits): the reply to send.
struct PolicyRefusal {
  int code = 451;
  std::string enhanced = "4.7.1";
  std::string text;
};

struct SessionConfig {
  std::string hostname = "localhost";
  // The listener advertises STARTTLS (listeners[].tls == "starttls").
  bool starttlsAvailable = false;
  // AUTH may be used without TLS (only loopback "none" listeners).
  bool authWithoutTls = false;
  uint64_t maxMessageBytes = 26214400;  // SIZE, enforced at MAIL and during DATA/BDAT
  uint32_t maxRecipients = 100;
  // RFC 5321 4.5.3.1.4 says 512; like Postfix we accept up to 2048 before answering 500.
  size_t maxCommandLine = 2048;
  // RFC 4954 section 4: an AUTH command line (with initial response) up to 12288 octets.
  size_t maxAuthLine = 12288;
  uint32_t maxBadCommands = 20;   // then 421 4.7.0 and close
  uint32_t maxAuthFailures = 3;   // then 421 4.7.0 and close
  // Commands that move no mail (NOOP, RSET, HELP, VRFY, EHLO, HELO) allowed per session
  // between accepted messages (Postfix's smtpd_junk_command_limit); beyond it 421 4.7.0
  // and close, so one connection cannot stay forever doing nothing. 0 = no limit.
  uint32_t maxJunkCommands = 100;
  // AUTH identities and secrets longer than these are refused before any work (no
  // password check, no brute-force table entry): RFC 4616 puts no bound on them, but
  // no real account name or password comes near (a username over 255 octets could not
  // even be an email address, RFC 5321 4.5.3.1.3).
  size_t maxUsernameBytes = 255;
  size_t maxPasswordBytes = 1024;
  // RFC 5321 4.5.3.2 timeouts the driver applies (see timeoutFor()).
  std::chrono::seconds commandTimeout{300};
  std::chrono::seconds dataBlockTimeout{180};
  std::chrono::seconds dataTerminationTimeout{600};
  // Synchronous policy seam: may this authenticated account use this envelope sender?
  // Empty function = any sender allowed.
  std::function<bool(std::string_view account, std::string_view address)> senderAllowed;
  // Account limits (issue 5), synchronous: nullopt = go on. mailPolicy runs after the
  // sender check of an otherwise valid MAIL (declaredSize from SIZE=, 0 if none);
  // rcptPolicy after every other check of a RCPT that would be accepted (it may count
  // the recipient: it is accepted when nullopt comes back). A refusal is a reply; the
  // session stays usable.
  std::function<std::optional<PolicyRefusal>(std::string_view account, uint64_t declaredSize)> mailPolicy;
  std::function<std::optional<PolicyRefusal>(std::string_view account, std::string_view recipient)> rcptPolicy;
  // Optional content observer, so a driver can hash the message while it streams in
  // (DKIM body hash, RFC 6376 3.7) instead of making a second pass over Store::content.
  // onContent sees every piece of dot-unstuffed content in the order it is appended to
  // what Store::content will hold (DATA and BDAT alike, including the CRLF a BDAT
  // message without a final line end gets). onContentReset: the content seen so far is
  // void (a new DATA/BDAT transaction, RSET, a refused or stored message); start over.
  // The pieces are only meaningful when a Store follows before the next reset.
  // A refusal returned by onContent ends the keeping of this message (no more pieces are
  // passed on, nothing is stored): the rest of the data is read and dropped, and the
  // refusal is the reply at its end (header limits live in the driver's observer).
  std::function<std::optional<PolicyRefusal>(std::string_view chunk)> onContent;
  std::function<void()> onContentReset;
  // Observes every 4xx/5xx answer to MAIL ("mail"), RCPT ("rcpt") and to the end of a
  // message ("data": DATA, BDAT), with its enhanced status code (metrics).
  std::function<void(std::string_view stage, int code, std::string_view enhanced)> onRefusal;
};

struct Peer {
  std::string address;  // textual IP
  uint16_t port = 0;
  bool loopback = false;
};

struct TlsInfo {
  std::string version;  // "TLSv1.3"
  std::string cipher;   // "TLS_AES_256_GCM_SHA384"
};

// ---- actions -----------------------------------------------------------------------

// Bytes to write to the client (one or more complete reply lines, CRLF-terminated).
struct Send {
  std::string bytes;
};
// The "220 2.0.0 Ready to start TLS" reply has been emitted as a Send before this.
// From now on the driver passes bytes through a TLS engine; it calls onTlsEstablished
// when the handshake completes (or Close on failure). Input buffered after the STARTTLS
// line was discarded by the session (CVE-2011-0411 command injection).
struct StartTls {};
// Verify credentials; the driver answers with onAuthResult().
struct Authenticate {
  std::string mechanism;  // "PLAIN" or "LOGIN"
  std::string username;   // authcid
  std::string password;
};
struct Envelope {
  std::string mailFrom;                // addr-spec without <>, "" for the null sender
  std::vector<std::string> recipients; // addr-specs without <>
  bool smtputf8 = false;
  bool eightBitMime = false;           // BODY=8BITMIME or BINARYMIME
  // MAIL FROM:<...> REQUIRETLS (RFC 8689 4.1): every hop must use verified TLS, or the
  // message bounces. Only accepted inside TLS.
  bool requireTls = false;
  std::optional<uint64_t> declaredSize;
  // DSN extension (RFC 3461): MAIL FROM RET= and ENVID= (the xtext as sent, validated;
  // "" when not given), and per recipient NOTIFY= / ORCPT=. recipientDsn runs parallel to
  // recipients (same order, same size): whoever removes a recipient removes its entry.
  DsnRet ret = DsnRet::Unspecified;
  std::string envid;
  struct RecipientDsn {
    uint8_t notify = 0;   // kNotify* bits, 0 = no NOTIFY
    std::string orcpt;    // "rfc822;user+40example.com" as sent, "" = none
  };
  std::vector<RecipientDsn> recipientDsn;
};
// A complete message: store it durably, then call onStored().
struct Store {
  Envelope envelope;
  std::string account;     // authenticated username
  std::string heloName;
  Peer peer;
  std::optional<TlsInfo> tls;
  std::string content;     // dot-unstuffed message, CRLF line ends, no terminating "."
};
// Flush pending Sends, then close the connection.
struct Close {};
// Something the session refused on its own that an operator may want to see in the log
// (the driver logs it; the session never logs). `what` is "key=value" words, no secrets
// and nothing the client wrote.
struct Notice {
  std::string what;
};

using Action = std::variant<Send, StartTls, Authenticate, Store, Close, Notice>;

// ---- outcomes ----------------------------------------------------------------------

enum class AuthVerdict {
  Ok,          // 235 2.7.0
  Failed,      // 535 5.7.8 (the driver has already applied its delay)
  TempFail,    // 454 4.7.0
  Refused,     // 454 4.7.0 with the text given in onAuthResult (brute-force lock, issue 5)
};

// The result of a Store. ok: "250 2.0.0 Ok: queued as <queueId>". Otherwise the reply
// to send (e.g. 451 4.3.0 on a database error, 550 5.7.1 on a header From the account
// does not own).
struct StoreOutcome {
  bool ok = false;
  std::string queueId;
  int code = 451;
  std::string enhanced = "4.3.0";
  std::string text = "Temporary failure storing message";
};

enum class Phase {
  Greeting,   // before onConnect
  Command,    // reading commands
  Data,       // inside DATA
  Bdat,       // reading a BDAT chunk
  Waiting,    // an async outcome is pending
  TlsPending, // StartTls emitted, waiting for onTlsEstablished
  Closed,
};

class ServerSession {
 public:
  ServerSession(SessionConfig config, SessionId id);

  // The connection is up (for implicit TLS: after the handshake, with tls set).
  // Emits the 220 greeting.
  void onConnect(const Peer& peer, std::optional<TlsInfo> tls = std::nullopt);
  // Plaintext bytes from the client, any split, any size.
  void onBytes(std::string_view bytes);
  void onTlsEstablished(const TlsInfo& info);
  void onAuthResult(AuthVerdict verdict, std::string_view text = {});
  void onStored(const StoreOutcome& outcome);
  // No input for timeoutFor(): emits 421 4.4.2 and Close.
  void onTimeout();
  // The server is shutting down: emits 421 4.3.2 and Close at the next point where no
  // transaction is in flight (immediately if idle; after the pending Store otherwise).
  void onShutdown();
  // The peer closed its side; nothing more is emitted.
  void onPeerClosed();

  std::vector<Action> takeActions();

  std::chrono::seconds timeoutFor() const;
  Phase phase() const { return phase_; }
  SessionId id() const { return id_; }
  bool tlsActive() const { return tls_.has_value(); }
  const std::string& account() const { return account_; }
  bool inTransaction() const;
  // False while an outcome is pending or after Close: a driver may stop reading the
  // socket then (backpressure); input given anyway is buffered up to a fixed bound.
  bool wantsInput() const;
  // Unprocessed input held by the session (bounded; for metrics and tests).
  size_t bufferedBytes() const { return in_.size(); }
  // Grows when the client has done something worth waiting for again: a complete
  // command line, or each further 64 KiB of message data. A driver restarts its
  // RFC 5321 4.5.3.2 timer only when this (or the phase) changes, so the timeouts are
  // deadlines that a client trickling single bytes cannot stretch.
  uint64_t progress() const { return linesHandled_ + (dataBytesSeen_ >> 16); }

 private:
  // Implementation state lives in server_session.cpp; members are listed here so the
  // object can be held by value.
  enum class AuthStep { None, PlainResponse, LoginUser, LoginPass };
  enum class Pending { None, Auth, Store };
  // DATA framing state (RFC 5321 4.1.1.4, 4.5.2): where we are relative to a CRLF.
  enum class DataState { LineStart, Dot, DotCr, Mid, Cr };
  struct ErrorReply {
    int code = 0;
    std::string enhanced;
    std::string text;
  };

  void process();
  bool closeIfDeferred();
  void resume();
  void handleLine(std::string_view raw);
  size_t consumeData(size_t pos);
  size_t consumeBdat(size_t pos);
  void appendContent(std::string_view bytes);
  void markBareLineEnd();
  void markNul();
  void dropContent();
  bool countJunk();
  void notice(std::string what);
  void reply(int code, std::string_view enhanced, std::string_view text);
  void replyMulti(int code, std::string_view enhanced, const std::vector<std::string>& lines);
  void send(std::string bytes);
  void resetTransaction();
  void startContent();
  void handleEhlo(std::string_view args, bool extended);
  void handleMail(std::string_view args);
  void handleRcpt(std::string_view args);
  void handleData(std::string_view args);
  void handleBdat(std::string_view args);
  void finishBdatChunk();
  void handleAuth(std::string_view args);
  void handleAuthResponse(std::string_view line);
  void handlePlain(std::string_view message);
  void requestAuth(std::string_view mechanism, std::string username, std::string password);
  void authFailed(std::string_view text);
  void usernameTooLong();
  bool refuseBadContent();
  void handleStartTls(std::string_view args);
  void badCommand(int code, std::string_view enhanced, std::string_view text);
  void finishData();
  void emitStore();
  void closeWith(int code, std::string_view enhanced, std::string_view text);
  size_t lineLimit(std::string_view lineStart) const;

  // Objects first, then counters, then flags (keeps the padding small).
  SessionConfig cfg_;
  SessionId id_;
  std::vector<Action> actions_;
  std::string in_;  // unprocessed input
  Peer peer_;
  std::optional<TlsInfo> tls_;
  std::string helo_;
  std::string account_;
  std::string loginUser_;
  std::string pendingUser_;
  Envelope env_;
  std::string content_;
  ErrorReply bdatError_;
  uint64_t contentBytes_ = 0;
  uint64_t bdatRemaining_ = 0;
  uint64_t bdatChunk_ = 0;
  uint32_t badCommands_ = 0;
  uint32_t authFailures_ = 0;
  uint64_t linesHandled_ = 0;
  uint64_t dataBytesSeen_ = 0;  // DATA/BDAT octets over the session, kept or not
  uint32_t junkCommands_ = 0;
  std::optional<PolicyRefusal> contentRefusal_;
  const char* stage_ = nullptr;  // "mail", "rcpt", "data" while answering those (onRefusal)  // from onContent: the reply at end of data
  Phase phase_ = Phase::Greeting;
  AuthStep authStep_ = AuthStep::None;
  Pending pending_ = Pending::None;
  DataState dataState_ = DataState::LineStart;
  bool discardingLongLine_ = false;  // skipping the rest of an over-long line
  bool dropInput_ = false;           // STARTTLS: forget buffered input (CVE-2011-0411)
  bool inputOverflow_ = false;       // too much input buffered while Waiting
  bool ehloSeen_ = false;            // HELO or EHLO given
  bool esmtp_ = false;               // EHLO given (AUTH needs it: RFC 4954 4)
  bool mailGiven_ = false;
  bool contentTooBig_ = false;
  bool bareLineEnd_ = false;
  bool nulSeen_ = false;      // a NUL octet in the content (refused like bare CR/LF)
  bool bdatActive_ = false;   // this transaction has received BDAT data (no DATA now)
  bool bdatCr_ = false;       // the last BDAT byte so far was a CR
  bool bdatLast_ = false;
  bool bdatDiscard_ = false;  // the current chunk is read and dropped, then bdatError_
  bool shutdownRequested_ = false;
  bool timedOut_ = false;
};

}  // namespace subrelay::smtp
