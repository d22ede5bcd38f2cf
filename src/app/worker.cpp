#include "app/worker.h"

#include <string.h>

#include <chrono>
#include <memory>
#include <optional>
#include <utility>

#include "message/fixups.h"
#include "message/headers.h"
#include "net/connection.h"
#include "net/uv_handle.h"
#include "smtp/reply.h"
#include "smtp/server_session.h"
#include "util/clock.h"
#include "util/log.h"
#include "util/strings.h"

namespace subrelay::app {

namespace {

std::optional<smtp::PolicyRefusal> toRefusal(const policy::Decision& d) {
  if (d.allowed) return std::nullopt;
  policy::PolicyReply r = policy::rateLimitReply(d);
  return smtp::PolicyRefusal{r.code, r.enhanced, r.text};
}

smtp::SessionConfig sessionConfigFor(const Settings& st, Runtime& rt, const config::Listener& l) {
  const auto& cfg = *st.config;
  smtp::SessionConfig sc;
  sc.hostname = cfg.hostname;
  sc.starttlsAvailable = l.tls == config::ListenerTls::StartTls;
  // A "none" listener exists only on loopback (config enforces it): AUTH in clear there
  // never crosses a network.
  sc.authWithoutTls = l.tls == config::ListenerTls::None;
  sc.maxMessageBytes = cfg.limits.maxMessageBytes;
  sc.maxRecipients = cfg.limits.maxRecipients;
  sc.maxBadCommands = cfg.limits.maxBadCommands;
  sc.maxAuthFailures = cfg.limits.maxAuthFailures;
  sc.commandTimeout = cfg.limits.commandTimeout;
  sc.dataBlockTimeout = cfg.limits.dataTimeout;
  // The Settings outlive the session: the connection holds them (settings_).
  const Settings* stp = &st;
  Runtime* rtp = &rt;
  sc.senderAllowed = [stp](std::string_view account, std::string_view address) {
    return stp->senderAllowed(account, address);
  };
  // accounts[].rate_limits: a message is checked at MAIL (with SIZE= when given) and
  // again at the end of data with its real size; a recipient counts once accepted.
  sc.mailPolicy = [rtp](std::string_view account, uint64_t declaredSize) -> std::optional<smtp::PolicyRefusal> {
    auto d = rtp->limits.checkMessage(account, declaredSize, policy::Instant::from(rtp->clock));
    if (!d.allowed) rtp->meter.addRefusedByLimit(account);
    return toRefusal(d);
  };
  sc.rcptPolicy = [rtp](std::string_view account, std::string_view) -> std::optional<smtp::PolicyRefusal> {
    auto d = rtp->limits.tryConsume(account, policy::Metric::Recipients, 1, policy::Instant::from(rtp->clock));
    if (!d.allowed) {
      rtp->meter.addRefusedByLimit(account);
      return toRefusal(d);
    }
    rtp->meter.addRecipients(account);
    return std::nullopt;
  };
  return sc;
}

using StreamingDigests = dkim::StreamingBodyHash::Digests;

void wipe(std::string& s) {
  if (!s.empty()) explicit_bzero(s.data(), s.size());
  s.clear();
}

}  // namespace

// ---------------------------------------------------------------------------------
// SmtpConnection: one client. Owns the socket (net::Connection) and the protocol core
// (smtp::ServerSession) and runs the actions the core asks for.
// ---------------------------------------------------------------------------------
class SmtpConnection final : public net::ConnectionHandler {
 public:
  SmtpConnection(Worker& w, const config::Listener& l, uint64_t id)
      : worker_(w),
        listener_(l),
        id_(id),
        settings_(w.runtime().settings()),
        conn_(w.loop(), this),
        session_(withContentObserver(sessionConfigFor(*settings_, w.runtime(), l)), id) {}

  bool accept(uv_stream_t* server) {
    if (!conn_.accept(server)) return false;
    Runtime& rt = worker_.runtime();
    if (!rt.admitConnection(conn_.peerAddress())) {
      util::logWarn("smtpd", "connection refused client=" + conn_.peerAddress() +
                                 " reason=too-many-connections");
      // RFC 5321 3.1: a server may answer 421 instead of 220 and close.
      conn_.write("421 4.7.0 " + settings_->config->hostname + " Too many connections, try again later\r\n");
      conn_.closeAfterWrite();
      return true;
    }
    admitted_ = true;
    // Brute-force defence: an address locked for failed AUTHs is refused at once.
    policy::Verdict v = rt.guard.checkAddress(conn_.peerAddress(), rt.clock.now());
    if (v.kind == policy::Verdict::Kind::Refuse) {
      policy::PolicyReply r = policy::authRefusalReply(v, true);
      util::logWarn("smtpd", "connection refused client=" + conn_.peerAddress() + " reason=auth-lockout retry_after=" +
                                 std::to_string(v.retryAfter.count()) + "s");
      refusal_ = smtp::formatReply(r.code, r.enhanced, r.text);
      if (listener_.tls == config::ListenerTls::Implicit) {
        // RFC 8314 3.3: on an implicit-TLS port even the refusal is sent inside TLS, so
        // the client can read why (a plaintext 421 would be a TLS protocol error).
        conn_.startTls(settings_->tlsServer);
        conn_.setIdleTimeout(std::chrono::seconds(10));
        return true;
      }
      conn_.write(refusal_);
      conn_.closeAfterWrite();
      return true;
    }
    peer_.address = conn_.peerAddress();
    peer_.port = conn_.peerPort();
    peer_.loopback = conn_.peerLoopback();
    util::logDebug("smtpd", "connect conn=" + tag() + " client=" + peer_.address);
    if (listener_.tls == config::ListenerTls::Implicit) {
      // RFC 8314 3.3: TLS from the first byte; the greeting comes after the handshake.
      conn_.startTls(settings_->tlsServer);
      conn_.setIdleTimeout(std::chrono::seconds(60));
    } else {
      session_.onConnect(peer_);
      drive();
    }
    return true;
  }

  void onPlaintext(std::string_view data) override {
    if (!refusal_.empty()) return;
    session_.onBytes(data);
    drive();
  }

  void onTlsEstablished() override {
    if (!refusal_.empty()) {
      conn_.write(refusal_);
      conn_.closeAfterWrite();
      return;
    }
    const tls::TlsEngine* e = conn_.tls();
    smtp::TlsInfo info{e->version(), e->cipher()};
    if (listener_.tls == config::ListenerTls::Implicit && session_.phase() == smtp::Phase::Greeting) {
      session_.onConnect(peer_, info);
    } else {
      session_.onTlsEstablished(info);
    }
    drive();
  }

  void onTlsFailed(std::string_view why) override {
    util::logInfo("smtpd", "TLS handshake failed conn=" + tag() + " client=" + peer_.address +
                               " error=" + util::sanitizeForLog(why));
  }

  void onIdleTimeout() override {
    util::logInfo("smtpd", "timeout conn=" + tag() + " client=" + peer_.address);
    if (session_.phase() == smtp::Phase::Greeting || session_.phase() == smtp::Phase::TlsPending) {
      conn_.close();
      return;
    }
    session_.onTimeout();
    drive();
  }

  void onPeerClosed() override { session_.onPeerClosed(); }

  void onClosed() override {
    if (admitted_) worker_.runtime().releaseConnection(peer_.address);
    if (accountCounted_) worker_.runtime().releaseAccountSession(session_.account());
    // An AUTH whose delay was still running counts as a failure. (A client that gives up
    // early is normally not noticed before the delay ends: reading is paused meanwhile,
    // so the guess is still checked and counted; this covers shutdown and errors.)
    if (authDelayPending_) worker_.runtime().guard.recordFailure(peer_.address, authUser_, worker_.runtime().clock.now());
    wipe(pendingPassword_);
    if (authTimer_) {
      authTimer_->data = nullptr;
      net::closeHandle(authTimer_);
      authTimer_ = nullptr;
    }
    Worker& w = worker_;
    uint64_t id = id_;
    delete this;
    w.forget(id);
  }

  void shutdown() {
    // Nothing to finish before the greeting or in the middle of a TLS handshake: a client
    // stuck there must not hold the shutdown for the whole grace time.
    auto ph = session_.phase();
    if (ph == smtp::Phase::Greeting || ph == smtp::Phase::TlsPending) {
      conn_.close();
      return;
    }
    session_.onShutdown();
    drive();
  }
  void forceClose() { conn_.close(); }

  // The verifier's answer. A failure is answered after limits.auth_failure_delay, on a
  // timer, never on the loop.
  void authDone(bool ok, bool cached) {
    if (conn_.closing()) return;
    Runtime& rt = worker_.runtime();
    const auto now = rt.clock.now();
    if (ok) {
      rt.guard.recordSuccess(peer_.address, authUser_, now);
      uint32_t maxSessions = settings_->config->limits.maxSessionsPerAccount;
      if (!rt.admitAccountSession(authUser_, maxSessions)) {
        util::logWarn("smtpd", "auth refused conn=" + tag() + " client=" + peer_.address +
                                   " user=" + util::sanitizeForLog(authUser_, 64) + " reason=max-sessions-per-account");
        session_.onAuthResult(smtp::AuthVerdict::Refused,
                              "Too many concurrent sessions for this account (limit " + std::to_string(maxSessions) +
                                  "), try again later");
        drive();
        return;
      }
      accountCounted_ = true;
      util::logInfo("smtpd", "auth ok conn=" + tag() + " client=" + peer_.address +
                                 " user=" + util::sanitizeForLog(authUser_, 64) + (cached ? " cached=yes" : ""));
      session_.onAuthResult(smtp::AuthVerdict::Ok);
      drive();
      return;
    }
    rt.guard.recordFailure(peer_.address, authUser_, now);
    // Counted under the account only when it exists: arbitrary names must not grow the
    // meters.
    rt.meter.addAuthFailure(settings_->account(authUser_) ? std::string_view(authUser_) : "(unknown)");
    util::logWarn("smtpd", "auth failed conn=" + tag() + " client=" + peer_.address +
                               " user=" + util::sanitizeForLog(authUser_, 64));
    auto delay = settings_->config->limits.authFailureDelay;
    if (delay.count() <= 0) {
      session_.onAuthResult(smtp::AuthVerdict::Failed);
      drive();
      return;
    }
    startAuthTimer(delay, [this]() {
      session_.onAuthResult(smtp::AuthVerdict::Failed);
      drive();
    });
  }

  void stored(const util::Result<std::string>& r, size_t size, size_t rcpts, std::string from, bool captured) {
    smtp::StoreOutcome out;
    if (r.ok()) {
      out.ok = true;
      out.queueId = r.value();
      // Charged only now that it is stored (rate_limiter.h: never for mail not accepted).
      Runtime& rt = worker_.runtime();
      rt.limits.commitMessage(session_.account(), size, policy::Instant::from(rt.clock));
      rt.meter.addAccepted(session_.account(), size);
      util::logInfo("queue", "accepted id=" + r.value() + " account=" + util::sanitizeForLog(session_.account(), 64) +
                                 " from=<" + util::sanitizeForLog(from, 200) + "> rcpts=" + std::to_string(rcpts) +
                                 " size=" + std::to_string(size) + " client=" + peer_.address +
                                 " tls=" + (conn_.tls() ? conn_.tls()->version() : std::string("none")) +
                                 (captured ? " captured=yes" : ""));
    } else {
      util::logError("queue", "store failed conn=" + tag() + " error=" + r.error().message);
      out.ok = false;
      out.code = 451;
      out.enhanced = "4.3.0";
      out.text = "Temporary failure storing message, try again later";
    }
    if (conn_.closing()) return;
    session_.onStored(out);
    drive();
  }

 private:
  // With DKIM keys configured, the body hash is fed while the message streams in
  // (RFC 6376 3.7), so signing needs no second pass over the body.
  smtp::SessionConfig withContentObserver(smtp::SessionConfig sc) {
    if (settings_->dkimKeys.empty()) return sc;
    sc.onContent = [this](std::string_view chunk) {
      if (!bodyHash_) bodyHash_.emplace();
      bodyHash_->update(chunk);
    };
    sc.onContentReset = [this]() { bodyHash_.reset(); };
    return sc;
  }

  // "worker.counter", short and unique per process, for log lines.
  std::string tag() const { return std::to_string(id_ >> 48) + "." + std::to_string(id_ & 0xffffffffffffULL); }

  void drive() {
    std::string out;
    for (;;) {
      auto actions = session_.takeActions();
      if (actions.empty()) break;
      for (auto& a : actions) {
        if (auto* s = std::get_if<smtp::Send>(&a)) {
          out += s->bytes;
        } else if (std::holds_alternative<smtp::StartTls>(a)) {
          // The 220 goes out in clear; everything after it through the engine.
          conn_.write(out);
          out.clear();
          conn_.startTls(settings_->tlsServer);
        } else if (auto* au = std::get_if<smtp::Authenticate>(&a)) {
          conn_.write(out);
          out.clear();
          startAuth(*au);
        } else if (auto* st = std::get_if<smtp::Store>(&a)) {
          conn_.write(out);
          out.clear();
          startStore(*st);
        } else if (std::holds_alternative<smtp::Close>(a)) {
          conn_.write(out);
          out.clear();
          conn_.closeAfterWrite();
        }
      }
    }
    conn_.write(out);
    if (conn_.closing()) return;
    // While an outcome is pending we stop reading: the client waits for our reply, and
    // a pipelining flood cannot grow our buffers.
    // During a STARTTLS handshake the session waits too, but the bytes it waits for are
    // the handshake's, which the connection consumes itself: keep reading then.
    if (!session_.wantsInput() && session_.phase() != smtp::Phase::TlsPending) conn_.pauseReading();
    else conn_.resumeReading();
    conn_.setIdleTimeout(session_.phase() == smtp::Phase::TlsPending
                             ? std::chrono::milliseconds(std::chrono::seconds(60))
                             : std::chrono::milliseconds(session_.timeoutFor()));
  }

  struct AuthWork {
    uv_work_t req;
    Worker* worker;
    std::shared_ptr<policy::Authenticator> auth;
    uint64_t sessionId;
    std::string user;
    std::string password;
    bool ok = false;
  };

  void startAuth(smtp::Authenticate& au) {
    Runtime& rt = worker_.runtime();
    authUser_ = au.username;
    // Brute-force defence first: a locked address gets 454 without a password check. A
    // credential verified before (HMAC cache) does not pay for guesses made at its
    // username from elsewhere: the owner of an attacked account still logs in at once.
    const bool knownGood = settings_->auth->cachedOk(au.username, au.password);
    policy::Verdict v = rt.guard.check(peer_.address, au.username, rt.clock.now(), knownGood);
    if (v.kind == policy::Verdict::Kind::Refuse) {
      wipe(au.password);
      policy::PolicyReply r = policy::authRefusalReply(v, false);
      util::logWarn("smtpd", "auth refused conn=" + tag() + " client=" + peer_.address + " user=" +
                                 util::sanitizeForLog(authUser_, 64) + " reason=auth-lockout retry_after=" +
                                 std::to_string(v.retryAfter.count()) + "s");
      session_.onAuthResult(smtp::AuthVerdict::Refused, r.text);
      drive();
      return;
    }
    if (v.kind == policy::Verdict::Kind::Delay && v.delay.count() > 0) {
      // The progressive delay is served BEFORE the password check, so a guesser with many
      // parallel connections gets one scrypt per delay and connection, not one per
      // attempt; the reply (right or wrong password alike) comes after it.
      pendingPassword_ = std::move(au.password);
      wipe(au.password);
      authDelayPending_ = true;
      startAuthTimer(v.delay, [this]() {
        authDelayPending_ = false;
        std::string pw = std::move(pendingPassword_);
        wipe(pendingPassword_);
        verify(authUser_, pw);
        wipe(pw);
      });
      return;
    }
    verify(au.username, au.password);
    wipe(au.password);
  }

  void verify(const std::string& user, std::string& password) {
    // Fast path: this exact credential verified before (HMAC cache) -> no scrypt.
    if (settings_->auth->cachedOk(user, password)) {
      authDone(true, true);
      return;
    }
    auto* w = new AuthWork{};
    w->req.data = w;
    w->worker = &worker_;
    w->auth = settings_->auth;
    w->sessionId = id_;
    w->user = user;
    w->password = password;
    // scrypt takes tens of milliseconds: run it on libuv's thread pool.
    uv_queue_work(
        worker_.loop(), &w->req,
        [](uv_work_t* req) {
          auto* work = static_cast<AuthWork*>(req->data);
          work->ok = work->auth->verify(work->user, work->password) == policy::AuthCheck::Ok;
          wipe(work->password);
        },
        [](uv_work_t* req, int) {
          auto* work = static_cast<AuthWork*>(req->data);
          if (SmtpConnection* c = work->worker->find(work->sessionId)) c->authDone(work->ok, false);
          delete work;
        });
  }

  // One timer per connection for the AUTH delays (never two at once: the session waits).
  void startAuthTimer(std::chrono::milliseconds delay, std::function<void()> fn) {
    authTimerFn_ = std::move(fn);
    authTimer_ = net::newHandle<uv_timer_t>();
    uv_timer_init(worker_.loop(), authTimer_);
    authTimer_->data = this;
    uv_timer_start(
        authTimer_,
        [](uv_timer_t* t) {
          auto* self = static_cast<SmtpConnection*>(t->data);
          if (self == nullptr) return;
          self->authTimer_->data = nullptr;
          net::closeHandle(self->authTimer_);
          self->authTimer_ = nullptr;
          auto due = std::move(self->authTimerFn_);
          self->authTimerFn_ = nullptr;
          if (self->conn_.closing()) return;
          due();
        },
        static_cast<uint64_t>(delay.count()), 0);
  }

  void startStore(smtp::Store& st) {
    Runtime& rt = worker_.runtime();
    const Settings& set = *settings_;
    const AccountRuntime* acct = set.account(st.account);
    // accounts[].rate_limits, now with the real size (MAIL only knew SIZE=, if that).
    policy::Decision rd = rt.limits.checkMessage(st.account, st.content.size(), policy::Instant::from(rt.clock));
    if (!rd.allowed) {
      rt.meter.addRefusedByLimit(st.account);
      policy::PolicyReply r = policy::rateLimitReply(rd);
      refuseStore(r.code, r.enhanced.c_str(), r.text);
      return;
    }
    // RFC 6409 8.1: the MSA may check that the submitter is allowed to use the
    // addresses it claims; we require every header From mailbox to be the account's.
    auto headers = message::scanHeaders(st.content);
    size_t fromCount = message::countFields(headers, "From");
    if (fromCount != 1) {
      refuseStore(550, "5.6.0",
                  fromCount == 0 ? "Message has no From header field (RFC 5322 3.6)"
                                 : "Message has more than one From header field (RFC 5322 3.6)");
      return;
    }
    const message::HeaderField* from = message::findField(headers, "From");
    auto addrs = message::parseAddressList(from->value);
    if (addrs.empty()) {
      refuseStore(550, "5.6.0", "Cannot parse the From header field (RFC 5322 3.6.2)");
      return;
    }
    for (const auto& a : addrs) {
      if (acct == nullptr || !set.senderAllowed(st.account, a)) {
        refuseStore(550, "5.7.1", "From header address <" + util::sanitizeForLog(a, 100) +
                                      "> not owned by this account");
        return;
      }
    }

    queue::NewMessage m;
    m.id = queue::newQueueId();
    m.account = st.account;
    m.mailFrom = st.envelope.mailFrom;
    m.recipients = st.envelope.recipients;
    m.captured = acct->mode == config::AccountMode::Capture;
    m.smtputf8 = st.envelope.smtputf8;
    m.eightBit = st.envelope.eightBitMime;
    m.clientAddress = st.peer.address;
    m.heloName = st.heloName;
    if (st.tls) {
      m.tlsVersion = st.tls->version;
      m.tlsCipher = st.tls->cipher;
    }
    auto now = std::chrono::system_clock::now();
    m.receivedAt = util::unixSeconds(now);
    message::TraceInfo ti;
    ti.hostname = set.config->hostname;
    ti.heloName = st.heloName;
    ti.clientAddress = st.peer.address;
    ti.account = st.account;
    ti.tlsVersion = m.tlsVersion;
    ti.tlsCipher = m.tlsCipher;
    ti.queueId = m.id;
    if (st.envelope.recipients.size() == 1) ti.recipient = st.envelope.recipients.front();
    ti.smtputf8 = st.envelope.smtputf8;
    ti.when = now;
    m.content = message::applySubmissionFixups(st.content, ti);
    st.content.clear();
    st.content.shrink_to_fit();

    // RFC 6376 3.5 / issue: the signing domain is the header From domain; subdomains
    // only with their own key. The first From mailbox decides (all are the account's).
    std::optional<StreamingDigests> digests;
    if (bodyHash_) {
      digests = bodyHash_->finish();
      bodyHash_.reset();
    }
    std::string_view first = addrs.front();
    size_t at = first.rfind('@');
    std::string domain = at == std::string_view::npos ? std::string() : util::toLower(first.substr(at + 1));
    const std::vector<dkim::SignerKey>* keys = domain.empty() ? nullptr : set.dkimKeys.forDomain(domain);
    if (keys != nullptr && !keys->empty() && set.signer) {
      dkim::SignOptions opts;
      opts.timestamp = m.receivedAt;  // t= (RFC 6376 3.5)
      if (auto pol = set.dkimDomains.find(domain); pol != set.dkimDomains.end()) {
        if (pol->second.expiry) opts.expiresAfter = pol->second.expiry->count();
        opts.headerCanon = pol->second.headerCanon;
        opts.bodyCanon = pol->second.bodyCanon;
      }
      startSign(std::move(m), *keys, opts, std::move(digests), domain);
      return;
    }
    commit(std::move(m));
  }

  struct SignWork {
    uv_work_t req;
    Worker* worker;
    uint64_t sessionId;
    std::shared_ptr<const dkim::Signer> signer;
    std::vector<dkim::SignerKey> keys;
    dkim::SignOptions opts;
    std::optional<StreamingDigests> digests;
    queue::NewMessage msg;
    std::string domain;
    util::Result<std::string> sigs = util::Error{"not signed"};
  };

  // RSA-2048 signing takes about a millisecond, RSA-4096 several: on libuv's thread pool,
  // like the scrypt of AUTH, so other sessions on this loop are not held up. The
  // session is Waiting meanwhile, so the message cannot change under the job.
  void startSign(queue::NewMessage m, const std::vector<dkim::SignerKey>& keys, const dkim::SignOptions& opts,
                 std::optional<StreamingDigests> digests, const std::string& domain) {
    auto* w = new SignWork{};
    w->req.data = w;
    w->worker = &worker_;
    w->sessionId = id_;
    w->signer = settings_->signer;
    w->keys = keys;
    w->opts = opts;
    w->digests = std::move(digests);
    w->msg = std::move(m);
    w->domain = domain;
    uv_queue_work(
        worker_.loop(), &w->req,
        [](uv_work_t* req) {
          auto* work = static_cast<SignWork*>(req->data);
          work->sigs = work->signer->sign(work->msg.content, work->keys, work->opts,
                                          work->digests ? &*work->digests : nullptr);
        },
        [](uv_work_t* req, int status) {
          std::unique_ptr<SignWork> work(static_cast<SignWork*>(req->data));
          SmtpConnection* c = work->worker->find(work->sessionId);
          // Gone: the client left before its 250, so nothing was promised.
          if (c == nullptr || c->conn_.closing()) return;
          if (status != 0 || !work->sigs.ok()) {
            std::string why = status != 0 ? std::string("cancelled") : work->sigs.error().message;
            util::logError("dkim", "signing failed conn=" + c->tag() + " domain=" + work->domain + " error=" +
                                       util::sanitizeForLog(why));
            c->refuseStore(451, "4.3.0", "Temporary failure signing message, try again later");
            c->drive();
            return;
          }
          // RFC 6376 5.6: the DKIM-Signature is prepended; ours go above our Received,
          // so what is stored is exactly what leaves.
          work->msg.content.insert(0, work->sigs.value());
          util::logDebug("dkim", "signed conn=" + c->tag() + " domain=" + work->domain +
                                     " signatures=" + std::to_string(work->keys.size()));
          c->commit(std::move(work->msg));
        });
  }

  void commit(queue::NewMessage m) {
    Runtime& rt = worker_.runtime();
    size_t size = m.content.size();
    size_t rcpts = m.recipients.size();
    std::string fromAddr = m.mailFrom;
    bool captured = m.captured;
    Worker* w = &worker_;
    uint64_t sid = id_;
    Runtime* rtp = &rt;
    rt.committer->submit(std::move(m), [w, rtp, sid, size, rcpts, fromAddr, captured](util::Result<std::string> r) {
      // Runs on the committer thread: wake the delivery service, then hop back to this
      // connection's loop.
      if (r.ok() && !captured && rtp->onQueued) rtp->onQueued();
      w->post([w, sid, size, rcpts, fromAddr, captured, r = std::move(r)]() {
        if (SmtpConnection* c = w->find(sid)) c->stored(r, size, rcpts, fromAddr, captured);
      });
    });
  }

  void refuseStore(int code, const char* enhanced, std::string text) {
    util::logInfo("smtpd", "refused conn=" + tag() + " account=" +
                               util::sanitizeForLog(session_.account(), 64) + " reason=\"" + text + "\"");
    smtp::StoreOutcome out;
    out.ok = false;
    out.code = code;
    out.enhanced = enhanced;
    out.text = std::move(text);
    session_.onStored(out);
  }

  Worker& worker_;
  config::Listener listener_;
  uint64_t id_;
  // This session's generation of the configuration, kept to the end (reload).
  std::shared_ptr<const Settings> settings_;
  net::Connection conn_;
  smtp::ServerSession session_;
  smtp::Peer peer_;
  bool admitted_ = false;
  std::string authUser_;
  uv_timer_t* authTimer_ = nullptr;
  std::function<void()> authTimerFn_;
  std::string pendingPassword_;  // held only while a progressive AUTH delay runs
  bool authDelayPending_ = false;
  bool accountCounted_ = false;  // holds a slot of limits.max_sessions_per_account
  std::string refusal_;          // refused at connect (implicit TLS: sent after the handshake)
  std::optional<dkim::StreamingBodyHash> bodyHash_;
};

// ---------------------------------------------------------------------------------
// Worker
// ---------------------------------------------------------------------------------
Worker::Worker(Runtime& rt, int index) : rt_(rt), index_(index) {
  uv_loop_init(&loop_);
  async_ = net::newHandle<uv_async_t>();
  uv_async_init(&loop_, async_, [](uv_async_t* a) {
    auto* self = static_cast<Worker*>(a->data);
    if (self) self->runPosted();
  });
  async_->data = this;
}

Worker::~Worker() {
  join();
  uv_loop_close(&loop_);
}

util::Result<uint16_t> Worker::addListener(const config::Listener& l, uint16_t port) {
  auto entry = std::make_unique<ListenerEntry>();
  entry->cfg = l;
  ListenerEntry* e = entry.get();
  entry->listener = std::make_unique<net::Listener>(&loop_, [this, e](uv_stream_t* s) { onAccept(s, e->cfg); });
  auto r = entry->listener->listen(l.host, port);
  if (!r.ok()) return r.error();
  uint16_t bound = entry->listener->boundPort();
  listeners_.push_back(std::move(entry));
  return bound;
}

void Worker::onAccept(uv_stream_t* server, const config::Listener& l) {
  if (shuttingDown_) return;
  uint64_t id = nextSessionId();
  auto* c = new SmtpConnection(*this, l, id);
  sessions_[id] = c;
  if (!c->accept(server)) {
    // Nothing accepted (another loop took it): the handles close, onClosed deletes.
    c->forceClose();
  }
}

SmtpConnection* Worker::find(uint64_t sessionId) {
  auto it = sessions_.find(sessionId);
  return it == sessions_.end() ? nullptr : it->second;
}

void Worker::forget(uint64_t sessionId) {
  sessions_.erase(sessionId);
  if (shuttingDown_) maybeFinish();
}

void Worker::post(std::function<void()> fn) {
  // uv_async_send under the lock: maybeFinish() marks the loop ended under the same lock
  // before it closes the async handle, so we never signal a freed handle.
  std::lock_guard lk(mu_);
  if (loopEnded_) return;
  posted_.push_back(std::move(fn));
  uv_async_send(async_);
}

void Worker::runPosted() {
  std::vector<std::function<void()>> batch;
  bool shutdown;
  {
    std::lock_guard lk(mu_);
    batch.swap(posted_);
    shutdown = shutdownRequested_;
  }
  for (auto& fn : batch) fn();
  if (shutdown && !shuttingDown_) beginShutdown();
}

void Worker::start() {
  thread_ = std::thread([this] {
    uv_run(&loop_, UV_RUN_DEFAULT);
  });
}

void Worker::requestShutdown() {
  std::lock_guard lk(mu_);
  if (loopEnded_) return;
  shutdownRequested_ = true;
  uv_async_send(async_);
}

void Worker::beginShutdown() {
  shuttingDown_ = true;
  for (auto& l : listeners_) l->listener->close();
  // Sessions finish the transaction in flight, then get 421 4.3.2 (RFC 5321 3.8).
  std::vector<SmtpConnection*> all;
  for (auto& [id, c] : sessions_) all.push_back(c);
  for (auto* c : all) c->shutdown();
  graceTimer_ = net::newHandle<uv_timer_t>();
  uv_timer_init(&loop_, graceTimer_);
  graceTimer_->data = this;
  auto grace = std::chrono::duration_cast<std::chrono::milliseconds>(rt_.settings()->config->limits.shutdownGrace);
  uv_timer_start(
      graceTimer_,
      [](uv_timer_t* t) {
        auto* self = static_cast<Worker*>(t->data);
        if (self == nullptr) return;
        std::vector<SmtpConnection*> left;
        for (auto& [id, c] : self->sessions_) left.push_back(c);
        if (!left.empty())
          util::logWarn("serve", "shutdown grace over: closing " + std::to_string(left.size()) + " sessions");
        for (auto* c : left) c->forceClose();
      },
      static_cast<uint64_t>(grace.count()), 0);
  maybeFinish();
}

void Worker::maybeFinish() {
  if (!sessions_.empty()) return;
  if (graceTimer_) {
    graceTimer_->data = nullptr;
    net::closeHandle(graceTimer_);
    graceTimer_ = nullptr;
  }
  if (async_) {
    // Pending posts (store answers for sessions now gone) are dropped.
    {
      std::lock_guard lk(mu_);
      posted_.clear();
      loopEnded_ = true;
    }
    async_->data = nullptr;
    net::closeHandle(async_);
    async_ = nullptr;
  }
  // With every handle closed, uv_run returns once outstanding thread-pool work is done.
}

void Worker::join() {
  if (thread_.joinable()) thread_.join();
}

}  // namespace subrelay::app
