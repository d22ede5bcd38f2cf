// ServerSession: the I/O-free SMTP submission server.
//
// RFC 5321 (commands 4.1.1, ordering 4.1.4, DATA transparency 4.5.2, limits 4.5.3,
// line endings 2.3.8), RFC 6409 (submission: AUTH before MAIL), RFC 2920 (pipelining:
// replies in order), RFC 1870 (SIZE), RFC 6152 (8BITMIME), RFC 6531 (SMTPUTF8),
// RFC 3030 (CHUNKING/BDAT), RFC 3207 (STARTTLS), RFC 4954 + RFC 4616 (AUTH PLAIN,
// AUTH LOGIN), RFC 2034 + RFC 3463 (enhanced status codes).
//
// Input is consumed from in_ by process(); nothing is answered while an outcome is
// pending, so pipelined commands are answered strictly in order. Memory use is bounded
// for any input: a command line by maxCommandLine/maxAuthLine, a message by
// maxMessageBytes (bytes beyond it are counted, not kept), and input buffered while
// waiting by kMaxPendingInput.
#include "smtp/server_session.h"

#include <cstring>

#include "smtp/command.h"
#include "smtp/reply.h"
#include "util/base64.h"
#include "util/strings.h"

namespace subrelay::smtp {
namespace {

// Input accepted while an outcome is pending (RFC 2920 lets a client send ahead of the
// replies, but only so far: past this the session answers 421 once it resumes).
constexpr size_t kMaxPendingInput = size_t{256} * 1024;

// RFC 4954 4 examples / the de-facto LOGIN mechanism prompts.
constexpr std::string_view kLoginUserPrompt = "VXNlcm5hbWU6";  // "Username:"
constexpr std::string_view kLoginPassPrompt = "UGFzc3dvcmQ6";  // "Password:"

constexpr std::string_view kSizeExceeded = "Message size exceeds fixed maximum message size";
constexpr std::string_view kBareLineEnd = "Message contains bare CR or LF (RFC 5321 2.3.8); send CRLF line endings";
// RFC 5322 2.3 / RFC 5321 2.3.8 and 4.1.1.4: NUL is not text. A NUL before a "." line
// is also a known way to make filters and the next hop disagree about where data ends.
constexpr std::string_view kNulInContent = "Message contains NUL characters";
// What ends a run of ordinary content in DATA: a line end or a NUL (explicit length:
// the NUL is part of the set).
constexpr std::string_view kDataSpecials{"\r\n\0", 3};

bool parseDecimal(std::string_view s, uint64_t& out) {
  // 19 digits always fit in uint64_t; longer is more than any limit anyway.
  if (s.empty() || s.size() > 19) return false;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<uint64_t>(c - '0');
  }
  out = v;
  return true;
}

// EHLO/HELO argument: a domain or address literal (RFC 5321 4.1.1.1). Clients send all
// sorts of names ("localhost", names with underscores), so like Postfix we only require
// one printable token of sane length; it ends up in the Received header.
bool isAcceptableHelo(std::string_view s) {
  if (s.empty() || s.size() > 255) return false;
  for (unsigned char c : s)
    if (c <= 0x20 || c >= 0x7f) return false;
  return true;
}

// Commands that move no mail: counted against maxJunkCommands.
bool isJunk(Verb v) {
  return v == Verb::Helo || v == Verb::Ehlo || v == Verb::Rset || v == Verb::Noop || v == Verb::Help ||
         v == Verb::Vrfy;
}

bool hasControlChars(std::string_view s) {
  for (unsigned char c : s)
    if (c < 0x20 || c == 0x7f) return true;
  return false;
}

// The SASL initial response "=" stands for an empty one (RFC 4954 4).
std::optional<std::string> decodeSasl(std::string_view b64) {
  if (b64 == "=") return std::string();
  return util::base64Decode(b64);
}

}  // namespace

ServerSession::ServerSession(SessionConfig config, SessionId id) : cfg_(std::move(config)), id_(id) {}

// ---- outcomes and events --------------------------------------------------------------

void ServerSession::onConnect(const Peer& peer, std::optional<TlsInfo> tls) {
  if (phase_ != Phase::Greeting) return;
  peer_ = peer;
  tls_ = std::move(tls);
  phase_ = Phase::Command;
  // RFC 5321 4.2 / RFC 2034 3: the greeting carries no enhanced code.
  reply(220, {}, cfg_.hostname + " ESMTP subrelay");
  if (closeIfDeferred()) return;
  process();  // a client that spoke before the greeting is simply answered in order
}

void ServerSession::onBytes(std::string_view bytes) {
  // After STARTTLS no plaintext may be interpreted (RFC 3207 4.2 / CVE-2011-0411).
  if (phase_ == Phase::Closed || phase_ == Phase::TlsPending) return;
  if (inputOverflow_) return;
  in_.append(bytes);
  process();
  // process() leaves at most one partial command line (bounded there) unless it is
  // waiting for an outcome; bound what accumulates meanwhile.
  if (in_.size() > kMaxPendingInput) {
    in_.clear();
    in_.shrink_to_fit();
    inputOverflow_ = true;
  }
}

void ServerSession::onTlsEstablished(const TlsInfo& info) {
  if (phase_ != Phase::TlsPending) return;
  tls_ = info;
  phase_ = Phase::Command;
  // RFC 3207 4.2: "The server MUST discard any knowledge obtained from the client, such
  // as the argument to the EHLO command, which was not obtained from the TLS negotiation
  // itself." That includes an identity from AUTH (possible with authWithoutTls).
  helo_.clear();
  ehloSeen_ = false;
  esmtp_ = false;
  account_.clear();
  authStep_ = AuthStep::None;
  resetTransaction();
  in_.clear();
  discardingLongLine_ = false;
  inputOverflow_ = false;
  resume();
}

void ServerSession::onAuthResult(AuthVerdict verdict, std::string_view text) {
  if (phase_ != Phase::Waiting || pending_ != Pending::Auth) return;
  pending_ = Pending::None;
  phase_ = Phase::Command;
  std::string user = std::move(pendingUser_);
  pendingUser_.clear();
  switch (verdict) {
    case AuthVerdict::Ok:
      account_ = std::move(user);
      reply(235, "2.7.0", "Authentication successful");
      break;
    case AuthVerdict::Failed:
      authFailed("Authentication credentials invalid");
      break;
    case AuthVerdict::TempFail:
      reply(454, "4.7.0", text.empty() ? "Temporary authentication failure" : text);
      break;
    case AuthVerdict::Refused:
      reply(454, "4.7.0", text.empty() ? "Authentication temporarily refused" : text);
      break;
  }
  if (phase_ == Phase::Closed) return;
  resume();
}

void ServerSession::onStored(const StoreOutcome& outcome) {
  if (phase_ != Phase::Waiting || pending_ != Pending::Store) return;
  pending_ = Pending::None;
  phase_ = Phase::Command;
  if (outcome.ok) {
    junkCommands_ = 0;  // mail moved: the commands before it were not junk
    reply(250, "2.0.0", "Ok: queued as " + outcome.queueId);
  } else {
    // The outcome comes from another module: never let it turn into a success or a
    // malformed reply.
    int code = (outcome.code >= 400 && outcome.code <= 599) ? outcome.code : 451;
    std::string_view enhanced = outcome.enhanced;
    if (!isValidEnhancedCode(enhanced, code)) enhanced = code >= 500 ? "5.3.0" : "4.3.0";
    reply(code, enhanced, outcome.text.empty() ? std::string_view("Error storing message") : outcome.text);
  }
  resetTransaction();
  resume();
}

void ServerSession::onTimeout() {
  switch (phase_) {
    case Phase::Closed:
      return;
    case Phase::TlsPending:
      // A plaintext reply cannot be sent in the middle of a handshake.
      actions_.emplace_back(Close{});
      phase_ = Phase::Closed;
      in_.clear();
      return;
    case Phase::Waiting:
      // Our own work is pending; its reply comes first, then the 421.
      timedOut_ = true;
      return;
    default:
      closeWith(421, "4.4.2", cfg_.hostname + " Error: timeout exceeded");
  }
}

void ServerSession::onShutdown() {
  if (phase_ == Phase::Closed) return;
  shutdownRequested_ = true;
  // Idle (reading commands; an envelope without data loses nothing acknowledged):
  // now. Receiving data, waiting for an outcome, or in a handshake: at the next
  // command boundary (closeIfDeferred).
  if (phase_ == Phase::Command || phase_ == Phase::Greeting) closeIfDeferred();
}

void ServerSession::onPeerClosed() {
  phase_ = Phase::Closed;
  in_.clear();
  in_.shrink_to_fit();
  content_.clear();
  content_.shrink_to_fit();
}

std::vector<Action> ServerSession::takeActions() {
  std::vector<Action> out;
  out.swap(actions_);
  return out;
}

std::chrono::seconds ServerSession::timeoutFor() const {
  // RFC 5321 4.5.3.2.5 (data block) vs 4.5.3.2.7 (server waiting for a command).
  if (phase_ == Phase::Data || phase_ == Phase::Bdat) return cfg_.dataBlockTimeout;
  return cfg_.commandTimeout;
}

bool ServerSession::inTransaction() const {
  return mailGiven_ || phase_ == Phase::Data || phase_ == Phase::Bdat || pending_ == Pending::Store;
}

bool ServerSession::wantsInput() const {
  return phase_ == Phase::Command || phase_ == Phase::Data || phase_ == Phase::Bdat;
}

// ---- input processing -----------------------------------------------------------------

// Called at a command boundary: a timeout or shutdown that arrived while something was
// in flight takes effect now. Returns true when the session closed.
bool ServerSession::closeIfDeferred() {
  if (phase_ != Phase::Command && phase_ != Phase::Greeting) return false;
  if (inputOverflow_) {
    closeWith(421, "4.7.0", "Too much pipelined input");
    return true;
  }
  if (timedOut_) {
    closeWith(421, "4.4.2", cfg_.hostname + " Error: timeout exceeded");
    return true;
  }
  if (shutdownRequested_) {
    closeWith(421, "4.3.2", "Service shutting down");
    return true;
  }
  return false;
}

void ServerSession::resume() {
  if (closeIfDeferred()) return;
  process();
}

size_t ServerSession::lineLimit(std::string_view lineStart) const {
  // RFC 4954 4: an AUTH command with an initial response, and each SASL response, may
  // be up to 12288 octets; every other command line gets the ordinary limit.
  if (authStep_ != AuthStep::None || util::istartsWith(lineStart, "AUTH ")) {
    return cfg_.maxAuthLine;
  }
  return cfg_.maxCommandLine;
}

void ServerSession::process() {
  size_t pos = 0;
  while (pos < in_.size()) {
    if (phase_ == Phase::Command) {
      if (closeIfDeferred()) break;
      size_t lf = in_.find('\n', pos);
      if (discardingLongLine_) {
        if (lf == std::string::npos) {
          pos = in_.size();
          break;
        }
        pos = lf + 1;
        discardingLongLine_ = false;
        continue;
      }
      if (lf == std::string::npos) break;
      std::string_view raw(in_.data() + pos, lf + 1 - pos);
      pos = lf + 1;
      handleLine(raw);
      if (dropInput_ || phase_ == Phase::Closed) break;
    } else if (phase_ == Phase::Data) {
      pos = consumeData(pos);
    } else if (phase_ == Phase::Bdat) {
      pos = consumeBdat(pos);
    } else {
      break;  // Waiting, TlsPending, Closed: keep the rest for later (or drop it)
    }
  }
  if (phase_ == Phase::Closed || dropInput_) {
    // STARTTLS: whatever followed the command in the same read was sent before TLS
    // and must not be executed after it (RFC 3207 4.2, CVE-2011-0411).
    dropInput_ = false;
    in_.clear();
    in_.shrink_to_fit();
    return;
  }
  in_.erase(0, pos);
  if (phase_ == Phase::Command) {
    if (closeIfDeferred()) {
      in_.clear();
      return;
    }
    // A partial line longer than the limit is answered now and its rest skipped up to
    // the next LF, without buffering it. "+ 1" leaves room for the CR of the CRLF so
    // that the verdict does not depend on how the input was split.
    if (!in_.empty() && in_.size() > lineLimit(in_) + 1) {
      in_.clear();
      discardingLongLine_ = true;
      authStep_ = AuthStep::None;
      badCommand(500, "5.5.2", "Line too long");
      if (phase_ == Phase::Closed) in_.clear();
    }
  }
}

void ServerSession::handleLine(std::string_view raw) {
  ++linesHandled_;
  // raw ends with LF. RFC 5321 2.3.8: lines end with CRLF, and a bare CR or LF must not
  // be treated as one; refusing the line keeps us from reading it differently than a
  // downstream server would.
  bool bare = raw.size() < 2 || raw[raw.size() - 2] != '\r';
  std::string_view line = raw.substr(0, raw.size() - (bare ? 1 : 2));
  stage_ = nullptr;  // set again below for MAIL, RCPT, DATA and BDAT
  if (line.size() > lineLimit(line)) {
    authStep_ = AuthStep::None;
    badCommand(500, "5.5.2", "Line too long");
    return;
  }
  if (bare || line.find('\r') != std::string_view::npos) {
    authStep_ = AuthStep::None;
    badCommand(500, "5.5.2", "Bare CR or LF in command; use CRLF");
    return;
  }
  if (authStep_ != AuthStep::None) {
    handleAuthResponse(line);
    return;
  }
  Command cmd = parseCommand(line);
  if (isJunk(cmd.verb) && !countJunk()) return;
  stage_ = cmd.verb == Verb::Mail   ? "mail"
           : cmd.verb == Verb::Rcpt ? "rcpt"
           : (cmd.verb == Verb::Data || cmd.verb == Verb::Bdat) ? "data"
                                                                : nullptr;
  switch (cmd.verb) {
    case Verb::Helo:
      handleEhlo(cmd.args, false);
      break;
    case Verb::Ehlo:
      handleEhlo(cmd.args, true);
      break;
    case Verb::Mail:
      handleMail(cmd.args);
      break;
    case Verb::Rcpt:
      handleRcpt(cmd.args);
      break;
    case Verb::Data:
      handleData(cmd.args);
      break;
    case Verb::Bdat:
      handleBdat(cmd.args);
      break;
    case Verb::Rset:
      if (!cmd.args.empty()) {
        badCommand(501, "5.5.4", "Syntax: RSET");
        break;
      }
      resetTransaction();
      reply(250, "2.0.0", "Ok");
      break;
    case Verb::Noop:
      // RFC 5321 4.1.1.9: NOOP may carry a string, which is ignored.
      reply(250, "2.0.0", "Ok");
      break;
    case Verb::Quit:
      closeWith(221, "2.0.0", "Bye");
      break;
    case Verb::Help:
      reply(214, "2.0.0", "Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA BDAT RSET NOOP VRFY QUIT");
      break;
    case Verb::Vrfy:
      if (cmd.args.empty()) {
        badCommand(501, "5.5.4", "Syntax: VRFY address");
        break;
      }
      // RFC 5321 3.5.3 / 7.3: no address probing; 252 says "try sending".
      reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery");
      break;
    case Verb::Expn:
      // RFC 5321 7.3: EXPN may be disabled; it reveals list membership.
      reply(502, "5.5.1", "EXPN not supported");
      break;
    case Verb::StartTls:
      handleStartTls(cmd.args);
      break;
    case Verb::Auth:
      handleAuth(cmd.args);
      break;
    case Verb::Http:
      // A browser or an HTTP proxy exploit (cross-protocol request): not a mail client.
      closeWith(421, "4.7.0", "HTTP requests are not accepted");
      break;
    case Verb::Unknown:
      badCommand(500, "5.5.2", "Command unrecognized");
      break;
  }
}

// RFC 5321 4.5.2 transparency and 4.1.1.4 end of data, byte by byte so that any split
// of the input gives the same result. Only CRLF "." CRLF ends the data (2.3.8, and the
// SMTP smuggling family, CVE-2023-51764): a "." line after a bare LF, or ending in a
// bare CR, is content, and marks the message as refused.
size_t ServerSession::consumeData(size_t pos) {
  const size_t n = in_.size();
  dataBytesSeen_ += n - pos;  // all of it is data up to the end marker at most
  while (pos < n) {
    const char c = in_[pos];
    switch (dataState_) {
      case DataState::LineStart:
        if (c == '.') {
          dataState_ = DataState::Dot;
          ++pos;
        } else {
          dataState_ = DataState::Mid;  // c is handled as ordinary line content
        }
        break;
      case DataState::Dot:
        if (c == '\r') {
          dataState_ = DataState::DotCr;
          ++pos;
        } else {
          // "If the first character is a period and there are other characters on the
          // line, the first character is deleted." (4.5.2)
          dataState_ = DataState::Mid;
        }
        break;
      case DataState::DotCr:
        if (c == '\n') {
          ++pos;
          dataState_ = DataState::LineStart;
          finishData();
          return pos;
        }
        markBareLineEnd();
        appendContent("\r");
        dataState_ = DataState::Mid;
        break;
      case DataState::Mid: {
        size_t end = std::string_view(in_).find_first_of(kDataSpecials, pos);
        if (end == std::string::npos) end = n;
        appendContent(std::string_view(in_.data() + pos, end - pos));
        pos = end;
        if (pos < n) {
          if (in_[pos] == '\r') {
            dataState_ = DataState::Cr;
          } else if (in_[pos] == '\n') {
            markBareLineEnd();
            appendContent("\n");
          } else {
            markNul();  // stays Mid: a NUL is not a line end
          }
          ++pos;
        }
        break;
      }
      case DataState::Cr:
        if (c == '\n') {
          appendContent("\r\n");
          dataState_ = DataState::LineStart;
          ++pos;
        } else {
          markBareLineEnd();  // the previous CR; c is looked at again as content
          appendContent("\r");
          dataState_ = DataState::Mid;
        }
        break;
    }
  }
  return pos;
}

// RFC 3030 2: exactly bdatRemaining_ octets, no dot-stuffing. Line ends are checked as
// for DATA (we do not offer BINARYMIME), across chunk boundaries.
size_t ServerSession::consumeBdat(size_t pos) {
  uint64_t avail = in_.size() - pos;
  size_t take = static_cast<size_t>(avail < bdatRemaining_ ? avail : bdatRemaining_);
  dataBytesSeen_ += take;
  if (!bdatDiscard_) {
    std::string_view chunk(in_.data() + pos, take);
    for (char c : chunk) {
      if (bdatCr_ && c != '\n') markBareLineEnd();
      if (c == '\n' && !bdatCr_) markBareLineEnd();
      if (c == '\0') markNul();
      bdatCr_ = (c == '\r');
    }
    appendContent(chunk);
  }
  pos += take;
  bdatRemaining_ -= take;
  if (bdatRemaining_ == 0) finishBdatChunk();
  return pos;
}

void ServerSession::appendContent(std::string_view bytes) {
  contentBytes_ += bytes.size();
  if (!contentTooBig_ && contentBytes_ > cfg_.maxMessageBytes) {
    // Keep counting, stop keeping: memory stays bounded and the 552 comes after the
    // client has finished sending (RFC 1870 6, RFC 5321 4.5.3.1.10).
    contentTooBig_ = true;
    content_.clear();
    content_.shrink_to_fit();
  }
  if (contentTooBig_ || bareLineEnd_ || nulSeen_ || contentRefusal_) return;
  content_.append(bytes);
  if (cfg_.onContent) {
    if (auto refusal = cfg_.onContent(bytes)) {
      contentRefusal_ = std::move(*refusal);
      dropContent();
    }
  }
}

void ServerSession::dropContent() {
  content_.clear();  // the message will be refused; keep nothing of it
  content_.shrink_to_fit();
}

void ServerSession::markBareLineEnd() {
  if (bareLineEnd_) return;
  bareLineEnd_ = true;
  dropContent();
}

void ServerSession::markNul() {
  if (nulSeen_) return;
  nulSeen_ = true;
  dropContent();
}

// True: go on with the command. False: the junk limit was passed and the session closed.
bool ServerSession::countJunk() {
  if (cfg_.maxJunkCommands == 0) return true;
  if (++junkCommands_ <= cfg_.maxJunkCommands) return true;
  notice("reason=junk-commands limit=" + std::to_string(cfg_.maxJunkCommands));
  closeWith(421, "4.7.0", "Too many commands without a mail transaction");
  return false;
}

void ServerSession::notice(std::string what) { actions_.emplace_back(Notice{std::move(what)}); }

// ---- replies --------------------------------------------------------------------------

void ServerSession::send(std::string bytes) {
  if (phase_ == Phase::Closed) return;
  // Consecutive replies go out in one write (RFC 2920 3.2 encourages batching).
  if (!actions_.empty()) {
    if (auto* last = std::get_if<Send>(&actions_.back())) {
      last->bytes += bytes;
      return;
    }
  }
  actions_.emplace_back(Send{std::move(bytes)});
}

void ServerSession::reply(int code, std::string_view enhanced, std::string_view text) {
  if (code >= 400 && stage_ != nullptr && cfg_.onRefusal) cfg_.onRefusal(stage_, code, enhanced);
  send(formatReply(code, enhanced, text));
}

void ServerSession::replyMulti(int code, std::string_view enhanced, const std::vector<std::string>& lines) {
  send(formatMultilineReply(code, enhanced, lines));
}

void ServerSession::badCommand(int code, std::string_view enhanced, std::string_view text) {
  ++badCommands_;
  reply(code, enhanced, text);
  if (badCommands_ >= cfg_.maxBadCommands) closeWith(421, "4.7.0", "Too many errors");
}

void ServerSession::closeWith(int code, std::string_view enhanced, std::string_view text) {
  if (phase_ == Phase::Closed) return;
  reply(code, enhanced, text);
  actions_.emplace_back(Close{});
  phase_ = Phase::Closed;
  authStep_ = AuthStep::None;
}

void ServerSession::resetTransaction() {
  mailGiven_ = false;
  env_ = Envelope{};
  content_.clear();
  content_.shrink_to_fit();
  contentBytes_ = 0;
  contentTooBig_ = false;
  bareLineEnd_ = false;
  nulSeen_ = false;
  contentRefusal_.reset();
  dataState_ = DataState::LineStart;
  bdatActive_ = false;
  bdatCr_ = false;
  if (cfg_.onContentReset) cfg_.onContentReset();
}

void ServerSession::startContent() {
  content_.clear();
  if (cfg_.onContentReset) cfg_.onContentReset();
  contentBytes_ = 0;
  contentTooBig_ = false;
  bareLineEnd_ = false;
  nulSeen_ = false;
  contentRefusal_.reset();
  dataState_ = DataState::LineStart;
  bdatCr_ = false;
}

// ---- commands -------------------------------------------------------------------------

void ServerSession::handleEhlo(std::string_view args, bool extended) {
  if (args.empty()) {
    badCommand(501, "5.5.4", extended ? "Syntax: EHLO hostname" : "Syntax: HELO hostname");
    return;
  }
  if (!isAcceptableHelo(args)) {
    badCommand(501, "5.5.4", "Invalid EHLO/HELO hostname");
    return;
  }
  // RFC 5321 4.1.4: EHLO/HELO in a session resets the transaction like RSET. The
  // authenticated identity stays (RFC 4954 has no rule that EHLO drops it).
  resetTransaction();
  helo_ = std::string(args);
  ehloSeen_ = true;
  esmtp_ = extended;
  if (!extended) {
    reply(250, {}, cfg_.hostname);
    return;
  }
  // RFC 2034 3: no enhanced code on the EHLO reply.
  std::vector<std::string> lines;
  lines.push_back(cfg_.hostname);
  lines.emplace_back("PIPELINING");
  lines.push_back("SIZE " + std::to_string(cfg_.maxMessageBytes));
  lines.emplace_back("8BITMIME");
  lines.emplace_back("ENHANCEDSTATUSCODES");
  lines.emplace_back("SMTPUTF8");
  lines.emplace_back("CHUNKING");
  lines.emplace_back("DSN");  // RFC 3461 section 4
  // RFC 3207 4.2: not offered again once TLS is up.
  if (cfg_.starttlsAvailable && !tls_) lines.emplace_back("STARTTLS");
  // RFC 8689 2: REQUIRETLS is for sessions that use TLS; advertised after STARTTLS (or on
  // an implicit-TLS listener), never in clear.
  if (tls_) lines.emplace_back("REQUIRETLS");
  if (tls_ || cfg_.authWithoutTls) lines.emplace_back("AUTH PLAIN LOGIN");
  replyMulti(250, {}, lines);
}

void ServerSession::handleMail(std::string_view args) {
  if (!ehloSeen_) {
    badCommand(503, "5.5.1", "Error: send HELO/EHLO first");
    return;
  }
  // RFC 6409 4.3 / SPEC "Open relay: impossible": no transaction without AUTH.
  if (account_.empty()) {
    badCommand(530, "5.7.0", "Authentication required");
    return;
  }
  if (mailGiven_) {
    badCommand(503, "5.5.1", "Error: nested MAIL command");
    return;
  }
  PathArgument p = parsePathArgument(args, "FROM");
  switch (p.status) {
    case PathStatus::Ok:
      break;
    case PathStatus::BadKeyword:
      badCommand(501, "5.5.4", "Syntax: MAIL FROM:<address>");
      return;
    case PathStatus::BadPath:
    case PathStatus::NoDomain:
      badCommand(501, "5.1.7", "Bad sender address syntax");
      return;
    case PathStatus::BadParams:
      badCommand(501, "5.5.4", "Bad MAIL parameter syntax");
      return;
    case PathStatus::DuplicateParam:
      badCommand(501, "5.5.4", "Duplicate " + p.duplicate + " parameter");
      return;
  }
  Envelope env;
  for (const auto& prm : p.params) {
    if (prm.keyword == "SIZE") {
      // RFC 1870 6: refuse up front what will not fit.
      uint64_t size = 0;
      if (!prm.hasValue || !parseDecimal(prm.value, size)) {
        badCommand(501, "5.5.4", "Bad SIZE parameter");
        return;
      }
      if (size > cfg_.maxMessageBytes) {
        reply(552, "5.3.4", kSizeExceeded);
        return;
      }
      env.declaredSize = size;
    } else if (prm.keyword == "BODY") {
      // RFC 6152 / RFC 3030 3: BINARYMIME needs CHUNKING *and* its own keyword, which we
      // do not offer, since stored messages must be CRLF text for DKIM and delivery.
      if (util::iequals(prm.value, "7BIT")) {
        env.eightBitMime = false;
      } else if (util::iequals(prm.value, "8BITMIME")) {
        env.eightBitMime = true;
      } else if (util::iequals(prm.value, "BINARYMIME")) {
        badCommand(555, "5.5.4", "BODY=BINARYMIME is not supported");
        return;
      } else {
        badCommand(501, "5.5.4", "Bad BODY parameter");
        return;
      }
    } else if (prm.keyword == "SMTPUTF8") {
      if (prm.hasValue) {
        badCommand(501, "5.5.4", "SMTPUTF8 takes no value");
        return;
      }
      env.smtputf8 = true;
    } else if (prm.keyword == "REQUIRETLS") {
      // RFC 8689 2 (item 8): no value. The option needs a TLS session (section 2: "MUST
      // only be specified in the context of an SMTP session meeting the security
      // requirements"), which a loopback "none" listener is not.
      if (prm.hasValue) {
        badCommand(501, "5.5.4", "REQUIRETLS takes no value");
        return;
      }
      if (!tls_) {
        reply(530, "5.7.10", "REQUIRETLS needs a TLS session (use STARTTLS or the implicit-TLS port)");
        return;
      }
      env.requireTls = true;
    } else if (prm.keyword == "RET") {
      // RFC 3461 4.3: RET=FULL or RET=HDRS.
      auto ret = prm.hasValue ? parseRet(prm.value) : std::nullopt;
      if (!ret) {
        badCommand(501, "5.5.4", "Bad RET parameter (RET=FULL or RET=HDRS)");
        return;
      }
      env.ret = *ret;
    } else if (prm.keyword == "ENVID") {
      // RFC 3461 4.4: xtext, at most 100 characters, printable US-ASCII once decoded.
      if (!prm.hasValue || !validEnvid(prm.value)) {
        badCommand(501, "5.5.4", "Bad ENVID parameter (xtext of printable ASCII, at most 100 characters)");
        return;
      }
      env.envid = prm.value;
    } else if (prm.keyword == "AUTH") {
      // RFC 4954 5: accepted; we never trust an AUTH= identity from the client.
    } else {
      badCommand(555, "5.5.4", "Unsupported MAIL parameter " + prm.keyword);
      return;
    }
  }
  // RFC 6531 3.5: non-ASCII sender without SMTPUTF8 -> 550 5.6.7.
  if (p.nonAscii && !env.smtputf8) {
    reply(550, "5.6.7", "Non-ASCII addresses not permitted for that sender (use SMTPUTF8)");
    return;
  }
  // RFC 6409 8.1 / SPEC: refuse senders the account does not own.
  if (cfg_.senderAllowed && !cfg_.senderAllowed(account_, p.address)) {
    // The null sender (RFC 5321 4.5.5) is how an MTA relaying through us sends its own
    // bounces; it is no address an account can own, so it is a switch of its own.
    if (p.address.empty())
      reply(550, "5.7.1", "Null sender <> not allowed for this account (accounts[].allow_null_sender)");
    else
      reply(553, "5.7.1", "Sender address not owned by this account");
    return;
  }
  if (cfg_.mailPolicy) {
    if (auto r = cfg_.mailPolicy(account_, env.declaredSize.value_or(0))) {
      reply(r->code, r->enhanced, r->text);
      return;
    }
  }
  env.mailFrom = std::move(p.address);
  env_ = std::move(env);
  mailGiven_ = true;
  startContent();
  reply(250, "2.1.0", "Ok");
}

void ServerSession::handleRcpt(std::string_view args) {
  if (!mailGiven_) {
    badCommand(503, "5.5.1", "Error: need MAIL command");
    return;
  }
  if (bdatActive_) {
    badCommand(503, "5.5.1", "Error: RCPT after message data");
    return;
  }
  PathArgument p = parsePathArgument(args, "TO");
  switch (p.status) {
    case PathStatus::Ok:
      break;
    case PathStatus::BadKeyword:
      badCommand(501, "5.5.4", "Syntax: RCPT TO:<address>");
      return;
    case PathStatus::NoDomain:
      badCommand(501, "5.1.3", "Recipient address must include a domain");
      return;
    case PathStatus::BadPath:
      badCommand(501, "5.1.3", "Bad recipient address syntax");
      return;
    case PathStatus::BadParams:
      badCommand(501, "5.5.4", "Bad RCPT parameter syntax");
      return;
    case PathStatus::DuplicateParam:
      badCommand(501, "5.5.4", "Duplicate " + p.duplicate + " parameter");
      return;
  }
  if (p.nullPath) {
    badCommand(501, "5.1.3", "Bad recipient address syntax");
    return;
  }
  Envelope::RecipientDsn dsn;
  for (const auto& prm : p.params) {
    if (prm.keyword == "NOTIFY") {
      // RFC 3461 4.1: NEVER, or any of SUCCESS, FAILURE, DELAY.
      auto bits = prm.hasValue ? parseNotify(prm.value) : std::nullopt;
      if (!bits) {
        badCommand(501, "5.5.4", "Bad NOTIFY parameter (NEVER, or a list of SUCCESS, FAILURE, DELAY)");
        return;
      }
      dsn.notify = *bits;
    } else if (prm.keyword == "ORCPT") {
      // RFC 3461 4.2: addr-type ";" xtext, at most 500 characters.
      if (!prm.hasValue || !validOrcpt(prm.value)) {
        badCommand(501, "5.5.4", "Bad ORCPT parameter (addr-type;xtext, at most 500 characters)");
        return;
      }
      dsn.orcpt = prm.value;
    } else {
      badCommand(555, "5.5.4", "Unsupported RCPT parameter " + prm.keyword);
      return;
    }
  }
  if (p.nonAscii && !env_.smtputf8) {
    reply(553, "5.6.7", "Non-ASCII addresses not permitted for that recipient (use SMTPUTF8)");
    return;
  }
  for (const auto& r : env_.recipients) {
    if (r == p.address) {  // the same mailbox twice: one delivery
      reply(250, "2.1.5", "Ok");
      return;
    }
  }
  // RFC 5321 4.5.3.1.10: "452 too many recipients", and the client sends the rest later.
  if (env_.recipients.size() >= cfg_.maxRecipients) {
    reply(452, "4.5.3", "Too many recipients");
    return;
  }
  if (cfg_.rcptPolicy) {
    if (auto r = cfg_.rcptPolicy(account_, p.address)) {
      reply(r->code, r->enhanced, r->text);
      return;
    }
  }
  env_.recipients.push_back(std::move(p.address));
  env_.recipientDsn.push_back(std::move(dsn));
  reply(250, "2.1.5", "Ok");
}

void ServerSession::handleData(std::string_view args) {
  if (!args.empty()) {
    badCommand(501, "5.5.4", "Syntax: DATA");
    return;
  }
  if (!mailGiven_) {
    badCommand(503, "5.5.1", "Error: need MAIL command");
    return;
  }
  // RFC 3030 2: DATA and BDAT cannot be mixed in one transaction.
  if (bdatActive_) {
    badCommand(503, "5.5.1", "Error: DATA after BDAT");
    return;
  }
  // RFC 5321 3.3: no valid recipients -> 503 or 554.
  if (env_.recipients.empty()) {
    badCommand(554, "5.5.1", "Error: no valid recipients");
    return;
  }
  startContent();
  reply(354, {}, "End data with <CR><LF>.<CR><LF>");
  phase_ = Phase::Data;
}

void ServerSession::finishData() {
  phase_ = Phase::Command;
  if (contentTooBig_) {
    reply(552, "5.3.4", kSizeExceeded);
    resetTransaction();
    return;
  }
  if (refuseBadContent()) return;
  emitStore();
}

// The content-level refusals, in the order a client can act on them. True: answered.
bool ServerSession::refuseBadContent() {
  if (bareLineEnd_) {
    reply(550, "5.6.0", kBareLineEnd);
  } else if (nulSeen_) {
    reply(550, "5.6.0", kNulInContent);
  } else if (contentRefusal_) {
    PolicyRefusal r = std::move(*contentRefusal_);
    int code = (r.code >= 400 && r.code <= 599) ? r.code : 554;
    if (!isValidEnhancedCode(r.enhanced, code)) r.enhanced = code >= 500 ? "5.6.0" : "4.6.0";
    reply(code, r.enhanced, r.text);
  } else {
    return false;
  }
  resetTransaction();
  return true;
}

void ServerSession::emitStore() {
  Store s;
  s.envelope = env_;
  s.account = account_;
  s.heloName = helo_;
  s.peer = peer_;
  s.tls = tls_;
  s.content = std::move(content_);
  content_.clear();
  actions_.emplace_back(std::move(s));
  pending_ = Pending::Store;
  phase_ = Phase::Waiting;
}

void ServerSession::handleBdat(std::string_view args) {
  // RFC 3030 2: "BDAT" SP chunk-size [ SP end-marker ].
  auto parts = util::split(args, ' ');
  uint64_t size = 0;
  bool last = false;
  bool ok = !parts.empty() && parts.size() <= 2 && parseDecimal(parts[0], size);
  if (ok && parts.size() == 2) {
    ok = util::iequals(parts[1], "LAST");
    last = true;
  }
  if (!ok) {
    // Without a size the chunk cannot be skipped; what follows is read as commands
    // and will run into the error limit if it is not.
    badCommand(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]");
    return;
  }
  ErrorReply err;
  if (!ehloSeen_) {
    err = {503, "5.5.1", "Error: send HELO/EHLO first"};
  } else if (account_.empty()) {
    err = {530, "5.7.0", "Authentication required"};
  } else if (!mailGiven_) {
    // Also any BDAT after BDAT LAST (RFC 3030 2: 503).
    err = {503, "5.5.1", "Error: need MAIL command"};
  } else if (env_.recipients.empty()) {
    err = {554, "5.5.1", "Error: no valid recipients"};
  }
  bdatChunk_ = size;
  bdatRemaining_ = size;
  bdatLast_ = last;
  if (err.code != 0) {
    // RFC 3030 2: "the receiver-SMTP MUST accept and discard the associated message
    // data before sending the appropriate 5XX or 4XX code"; the transaction failed.
    resetTransaction();
    bdatDiscard_ = true;
    bdatError_ = std::move(err);
  } else {
    bdatActive_ = true;
  }
  if (size == 0) {
    finishBdatChunk();
  } else {
    phase_ = Phase::Bdat;
  }
}

void ServerSession::finishBdatChunk() {
  phase_ = Phase::Command;
  if (bdatDiscard_) {
    bdatDiscard_ = false;
    ErrorReply err = std::move(bdatError_);
    badCommand(err.code, err.enhanced, err.text);
    return;
  }
  if (contentTooBig_) {
    // RFC 3030 2 / RFC 1870: 552 after the chunk; later chunks in the pipeline find no
    // transaction and are discarded with 503.
    reply(552, "5.3.4", kSizeExceeded);
    resetTransaction();
    return;
  }
  if (bdatLast_ && bdatCr_) markBareLineEnd();  // a CR as the very last octet
  if (refuseBadContent()) return;
  if (!bdatLast_) {
    reply(250, "2.0.0", "Ok: " + std::to_string(bdatChunk_) + " octets received");
    return;
  }
  // Stored messages end with CRLF (the DATA path guarantees it by construction).
  if (!content_.empty() && content_.back() != '\n') {
    // Not counted against SIZE: the client did not send it.
    content_ += "\r\n";
    if (cfg_.onContent) {
      if (auto refusal = cfg_.onContent("\r\n")) {
        contentRefusal_ = std::move(*refusal);
        dropContent();
      }
    }
    if (refuseBadContent()) return;
  }
  emitStore();
}

void ServerSession::handleStartTls(std::string_view args) {
  if (tls_) {
    badCommand(503, "5.5.1", "Error: TLS already active");
    return;
  }
  if (!cfg_.starttlsAvailable) {
    badCommand(502, "5.5.1", "Error: command not implemented");
    return;
  }
  if (!args.empty()) {
    badCommand(501, "5.5.4", "Syntax: STARTTLS");
    return;
  }
  if (mailGiven_) {
    badCommand(503, "5.5.1", "Error: MAIL transaction in progress");
    return;
  }
  reply(220, "2.0.0", "Ready to start TLS");
  actions_.emplace_back(StartTls{});
  phase_ = Phase::TlsPending;
  dropInput_ = true;
}

void ServerSession::handleAuth(std::string_view args) {
  if (!esmtp_) {
    badCommand(503, "5.5.1", "Error: send EHLO first");
    return;
  }
  // RFC 4954 4 / 6: PLAIN and LOGIN send the password in the clear.
  if (!tls_ && !cfg_.authWithoutTls) {
    badCommand(538, "5.7.11", "Encryption required for requested authentication mechanism");
    return;
  }
  // RFC 4954 4: "After a successful AUTH command completes, a server MUST reject any
  // further AUTH commands with a 503 reply."
  if (!account_.empty()) {
    badCommand(503, "5.5.1", "Error: already authenticated");
    return;
  }
  // RFC 4954 4: "The AUTH command is not permitted during a mail transaction."
  if (mailGiven_) {
    badCommand(503, "5.5.1", "Error: MAIL transaction in progress");
    return;
  }
  auto parts = util::split(args, ' ');
  if (args.empty() || parts.size() > 2 || parts[0].empty()) {
    badCommand(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]");
    return;
  }
  std::string_view mech = parts[0];
  bool hasInitial = parts.size() == 2;
  std::optional<std::string> initial;
  if (hasInitial) {
    initial = decodeSasl(parts[1]);
    if (!initial) {
      badCommand(501, "5.5.2", "Cannot decode response");
      return;
    }
  }
  if (util::iequals(mech, "PLAIN")) {
    if (!hasInitial) {
      authStep_ = AuthStep::PlainResponse;
      reply(334, {}, {});
      return;
    }
    handlePlain(*initial);
  } else if (util::iequals(mech, "LOGIN")) {
    if (!hasInitial) {
      authStep_ = AuthStep::LoginUser;
      reply(334, {}, kLoginUserPrompt);
      return;
    }
    if (initial->size() > cfg_.maxUsernameBytes) {
      usernameTooLong();
      return;
    }
    loginUser_ = std::move(*initial);
    authStep_ = AuthStep::LoginPass;
    reply(334, {}, kLoginPassPrompt);
  } else {
    badCommand(504, "5.5.4", "Unrecognized authentication type");
  }
}

void ServerSession::handleAuthResponse(std::string_view line) {
  AuthStep step = authStep_;
  authStep_ = AuthStep::None;
  // RFC 4954 4: "*" cancels the exchange with a 501.
  if (line == "*") {
    loginUser_.clear();
    badCommand(501, "5.7.0", "Authentication cancelled");
    return;
  }
  std::optional<std::string> decoded = util::base64Decode(line);
  if (!decoded) {
    loginUser_.clear();
    badCommand(501, "5.5.2", "Cannot decode response");
    return;
  }
  switch (step) {
    case AuthStep::PlainResponse:
      handlePlain(*decoded);
      break;
    case AuthStep::LoginUser:
      if (decoded->size() > cfg_.maxUsernameBytes) {
        usernameTooLong();
        break;
      }
      loginUser_ = std::move(*decoded);
      authStep_ = AuthStep::LoginPass;
      reply(334, {}, kLoginPassPrompt);
      break;
    case AuthStep::LoginPass: {
      std::string user = std::move(loginUser_);
      loginUser_.clear();
      requestAuth("LOGIN", std::move(user), std::move(*decoded));
      break;
    }
    case AuthStep::None:
      break;
  }
}

void ServerSession::handlePlain(std::string_view message) {
  // RFC 4616 2: message = [authzid] UTF8NUL authcid UTF8NUL passwd
  size_t nul1 = message.find('\0');
  size_t nul2 = nul1 == std::string_view::npos ? nul1 : message.find('\0', nul1 + 1);
  if (nul2 == std::string_view::npos || message.find('\0', nul2 + 1) != std::string_view::npos) {
    badCommand(501, "5.5.2", "Malformed PLAIN response");
    return;
  }
  std::string_view authzid = message.substr(0, nul1);
  std::string_view authcid = message.substr(nul1 + 1, nul2 - nul1 - 1);
  std::string_view passwd = message.substr(nul2 + 1);
  // We do not let one account act for another: the authorization identity must be
  // absent or the same as the authentication identity.
  if (!authzid.empty() && authzid != authcid) {
    authFailed("Authorization identity must be empty or equal to the username");
    return;
  }
  requestAuth("PLAIN", std::string(authcid), std::string(passwd));
}

void ServerSession::requestAuth(std::string_view mechanism, std::string username, std::string password) {
  // RFC 4616 2: authcid and passwd are 1*SAFE (no NUL). Control characters in a user
  // name are never legitimate and would reach logs; refuse without asking the verifier.
  if (username.size() > cfg_.maxUsernameBytes) {
    usernameTooLong();
    return;
  }
  if (username.empty() || password.empty() || hasControlChars(username) || password.find('\0') != std::string::npos) {
    authFailed("Authentication credentials invalid");
    return;
  }
  if (password.size() > cfg_.maxPasswordBytes) {
    // Answered like a wrong password, without the verifier: no account has a password
    // this long, so there is nothing to check and nothing to count.
    notice("reason=password-too-long");
    authFailed("Authentication credentials invalid");
    return;
  }
  pendingUser_ = username;
  actions_.emplace_back(Authenticate{std::string(mechanism), std::move(username), std::move(password)});
  pending_ = Pending::Auth;
  phase_ = Phase::Waiting;
}

void ServerSession::usernameTooLong() {
  notice("reason=username-too-long");
  badCommand(501, "5.5.2", "Username too long (at most " + std::to_string(cfg_.maxUsernameBytes) + " bytes)");
}

void ServerSession::authFailed(std::string_view text) {
  ++authFailures_;
  reply(535, "5.7.8", text);
  if (authFailures_ >= cfg_.maxAuthFailures) {
    closeWith(421, "4.7.0", "Too many authentication failures");
  }
}

}  // namespace subrelay::smtp
