#include "app/worker.h"

#include <string.h>

#include <chrono>
#include <memory>
#include <optional>
#include <utility>

#include "delivery/destination.h"
#include "message/fixups.h"
#include "net/connection.h"
#include "net/uv_loop.h"
#include "net/uv_timer.h"
#include "policy/password.h"
#include "policy/suppression.h"
#include "smtp/reply.h"
#include "smtp/server_session.h"
#include "submission/content_scan.h"
#include "submission/decide.h"
#include "util/clock.h"
#include "metrics/server_metrics.h"
#include "util/log.h"
#include "util/strings.h"
#include "util/time_fmt.h"

namespace subrelay::app {

namespace {

double secondsSince(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// Unsent output per connection: past the high mark reading stops until it drains to the
// low mark (a client that pipelines and never reads cannot make us queue its replies).
constexpr size_t kOutputHigh = 64 * 1024;
constexpr size_t kOutputLow = 16 * 1024;

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
  sc.maxJunkCommands = cfg.limits.maxJunkCommands;
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
    // RFC 3463 4.3.1 / RFC 5321 4.5.3.1.10: a temporary refusal while the queue's file
    // system cannot take the message, before the client sends it.
    if (!rtp->storageAvailable(declaredSize))
      return smtp::PolicyRefusal{452, "4.3.1", "Insufficient system storage, try again later"};
    auto d = rtp->limits.checkMessage(account, declaredSize, policy::Instant::from(rtp->clock));
    if (!d.allowed) {
      rtp->meter.addRefusedByLimit(account);
      metrics::server().rateLimited.with(account).inc();
    }
    return toRefusal(d);
  };
  sc.rcptPolicy = [rtp, stp](std::string_view account, std::string_view rcpt) -> std::optional<smtp::PolicyRefusal> {
    // user@[192.0.2.1] names a host, not a domain with an MX: a tenant could aim it at
    // internal services. Only where delivery.allow_private_destinations says so.
    if (!stp->config->delivery.allowPrivateDestinations) {
      if (delivery::isAddressLiteralDomain(util::domainPart(rcpt)))
        return smtp::PolicyRefusal{550, "5.7.1",
                                   "Address-literal recipients are not accepted "
                                   "(delivery.allow_private_destinations)"};
    }
    // accounts[].suppression: a listed recipient is refused at once, before it counts
    // against a rate limit and before anything is queued.
    if (const AccountRuntime* a = stp->account(account); a != nullptr && a->suppression) {
      const int64_t now = util::unixSeconds(rtp->clock.wallNow());
      if (auto hit = rtp->suppressions.find(account, rcpt, now)) {
        metrics::server().suppressedRcpts.with(account).inc();
        util::LogEvent ev(util::LogLevel::Info, "smtpd", "suppressed");
        ev.account(account).recipient(rcpt).field("since", util::isoUtc(hit->createdAt)).reply(hit->reason);
        ev.emit();
        return smtp::PolicyRefusal{policy::kRefusalCode, policy::kRefusalEnhanced,
                                   policy::suppressionRefusalText(hit->address, hit->createdAt, hit->reason)};
      }
    }
    auto d = rtp->limits.tryConsume(account, policy::Metric::Recipients, 1, policy::Instant::from(rtp->clock));
    if (!d.allowed) {
      rtp->meter.addRefusedByLimit(account);
      metrics::server().rateLimited.with(account).inc();
      return toRefusal(d);
    }
    rtp->meter.addRecipients(account);
    return std::nullopt;
  };
  sc.onRefusal = [](std::string_view stage, int, std::string_view enhanced) {
    metrics::server().messagesRefused.with(stage, metrics::statusLabel(enhanced)).inc();
  };
  return sc;
}

// Capture mode: recipients at the reserved local part (policy::isSimulatedBounceAddress)
// "bounce" at once, with a DSN to the sender and, when the account keeps one, an entry in
// its suppression list, as a real hard bounce would.
void addSimulatedBounces(queue::NewMessage& m, bool suppress, std::chrono::seconds ttl) {
  for (size_t i = 0; i < m.recipients.size(); ++i) {
    if (!policy::isSimulatedBounceAddress(m.recipients[i])) continue;
    queue::SimulatedBounce b;
    b.index = static_cast<int64_t>(i);
    b.reply = policy::kSimulatedBounceReply;
    if (suppress) {
      if (auto e = policy::bounceEntry(m.account, m.recipients[i], b.reply, m.receivedAt, ttl.count()))
        b.suppress = queue::SuppressionRow{std::move(e->account), std::move(e->address), std::move(e->reason),
                                           e->createdAt, e->expiresAt, std::move(e->source)};
    }
    m.simulatedBounces.push_back(std::move(b));
  }
}

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
    // Known before anything is counted: onClosed() releases what was admitted under it.
    peer_.address = conn_.peerAddress();
    peer_.port = conn_.peerPort();
    peer_.loopback = conn_.peerLoopback();
    // A client that does not read its replies: reading stops past kOutputHigh, and if
    // nothing drains within the command timeout (a total) the connection is closed.
    conn_.setOutputLimits(kOutputHigh, kOutputLow,
                          std::chrono::duration_cast<std::chrono::milliseconds>(settings_->config->limits.commandTimeout));
    if (!rt.admitConnection(peer_.address)) {
      metrics::server().connectionsRefused.with("too-many-connections").inc();
      util::logWarn("smtpd", "connection refused client=" + conn_.peerAddress() +
                                 " reason=too-many-connections");
      // RFC 5321 3.1: a server may answer 421 instead of 220 and close.
      conn_.write("421 4.7.0 " + settings_->config->hostname + " Too many connections, try again later\r\n");
      conn_.closeAfterWrite();
      return true;
    }
    admitted_ = true;
    metrics::server().connectionsAccepted.with(config::jsonName(listener_.tls)).inc();
    // Brute-force defence: an address locked for failed AUTHs is refused at once.
    policy::Verdict v = rt.guard.checkAddress(conn_.peerAddress(), rt.clock.now());
    if (v.kind == policy::Verdict::Kind::Refuse) {
      policy::PolicyReply r = policy::authRefusalReply(v, true);
      metrics::server().connectionsRefused.with("auth-lockout").inc();
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
    metrics::server().tlsHandshakes.with(info.version).inc();
    if (listener_.tls == config::ListenerTls::Implicit && session_.phase() == smtp::Phase::Greeting) {
      session_.onConnect(peer_, info);
    } else {
      session_.onTlsEstablished(info);
    }
    drive();
  }

  void onTlsFailed(std::string_view why) override {
    const bool rejected = tls::TlsEngine::isCertificateRejection(why);
    metrics::server().tlsHandshakeFailures.with(rejected ? "client-rejected-certificate" : "handshake-error").inc();
    if (rejected) {
      // Not the client's fault in the usual case: it was told our certificate is not to
      // be trusted. Say so, so the operator looks at tls.certificate.
      util::logWarn("smtpd", "TLS handshake failed conn=" + tag() + " client=" + peer_.address +
                                 " reason=client-rejected-certificate: client rejected our certificate (" +
                                 util::sanitizeForLog(why) +
                                 "); check that tls.certificate holds the full chain for the name clients use");
      return;
    }
    util::logInfo("smtpd", "TLS handshake failed conn=" + tag() + " client=" + peer_.address +
                               " error=" + util::sanitizeForLog(why));
  }

  void onOutputStalled() override {
    metrics::server().connectionsClosed.with("output-stalled").inc();
    util::logInfo("smtpd", "closing conn=" + tag() + " client=" + peer_.address +
                               " reason=output-stalled pending=" + std::to_string(conn_.pendingWriteBytes()) +
                               ": the client has not read its replies");
  }

  void onIdleTimeout() override {
    metrics::server().connectionsClosed.with("timeout").inc();
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
    authTimer_.reset();
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
  // failed: the fingerprint of a credential that failed (computed off the loop).
  void authDone(bool ok, bool cached, std::string failed = {}) {
    if (conn_.closing()) return;
    Runtime& rt = worker_.runtime();
    const auto now = rt.clock.now();
    if (ok) {
      rt.guard.recordSuccess(peer_.address, authUser_, now);
      uint32_t maxSessions = settings_->config->limits.maxSessionsPerAccount;
      if (!rt.admitAccountSession(authUser_, maxSessions)) {
        metrics::server().auth.with("refused").inc();
        util::logWarn("smtpd", "auth refused conn=" + tag() + " client=" + peer_.address +
                                   " user=" + util::sanitizeForLog(authUser_, 64) + " reason=max-sessions-per-account");
        session_.onAuthResult(smtp::AuthVerdict::Refused,
                              "Too many concurrent sessions for this account (limit " + std::to_string(maxSessions) +
                                  "), try again later");
        drive();
        return;
      }
      accountCounted_ = true;
      metrics::server().auth.with("success").inc();
      util::logInfo("smtpd", "auth ok conn=" + tag() + " client=" + peer_.address +
                                 " user=" + util::sanitizeForLog(authUser_, 64) + (cached ? " cached=yes" : ""));
      session_.onAuthResult(smtp::AuthVerdict::Ok);
      drive();
      return;
    }
    rt.guard.recordFailure(peer_.address, authUser_, now);
    metrics::server().auth.with("failure").inc();
    // Counted under the account only when it exists: arbitrary names must not grow the
    // meters.
    rt.meter.addAuthFailure(settings_->account(authUser_) ? std::string_view(authUser_) : "(unknown)");
    util::logWarn("smtpd", "auth failed conn=" + tag() + " client=" + peer_.address +
                               " user=" + util::sanitizeForLog(authUser_, 64));
    lastFailedCredential_ = std::move(failed);
    answerAuthFailure();
  }

  // The failure reply, after limits.auth_failure_delay (a timer, never the loop).
  void answerAuthFailure() {
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

  // `duplicate`: the message repeated an idempotency key (`key`) and was not stored; r
  // holds the first message's id, which the client gets as if this one were stored.
  void stored(const util::Result<std::string>& r, size_t size, size_t rcpts, std::string from, bool captured,
              bool duplicate = false, const std::string& key = {}) {
    smtp::StoreOutcome out;
    if (r.ok() && duplicate) {
      // The same 250 as the first time. Nothing is charged or counted again: no message was
      // added (the rate check at the end of data did run, so a full account may still be
      // refused its retry).
      out.ok = true;
      out.queueId = r.value();
      util::LogEvent ev(util::LogLevel::Info, "queue", "duplicate");
      ev.queueId(r.value()).account(session_.account());
      ev.field("key", "idempotency_key", key, util::LogEvent::Style::Quoted, 40);
      ev.field("from", "sender", from, util::LogEvent::Style::Angle).number("rcpts", static_cast<long long>(rcpts));
      ev.client(peer_.address);
      ev.emit();
    } else if (r.ok()) {
      out.ok = true;
      out.queueId = r.value();
      // Charged only now that it is stored (rate_limiter.h: never for mail not accepted).
      Runtime& rt = worker_.runtime();
      rt.limits.commitMessage(session_.account(), size, policy::Instant::from(rt.clock));
      rt.meter.addAccepted(session_.account(), size);
      // The account's counters are looked up once per session (its account cannot change).
      auto& m = metrics::server();
      if (!acctMetrics_.accepted)
        acctMetrics_ = {&m.messagesAccepted.with(session_.account()), &m.messageBytes.with(session_.account()),
                        &m.messageRecipients.with(session_.account()), &m.acceptLatency.get()};
      acctMetrics_.accepted->inc();
      acctMetrics_.bytes->inc(size);
      acctMetrics_.recipients->inc(rcpts);
      acctMetrics_.acceptLatency->observe(secondsSince(endOfData_));
      util::LogEvent ev(util::LogLevel::Info, "queue", "accepted");
      ev.queueId(r.value()).account(session_.account());
      ev.field("from", "sender", from, util::LogEvent::Style::Angle).number("rcpts", static_cast<long long>(rcpts));
      ev.number("size", static_cast<long long>(size)).client(peer_.address);
      ev.tls(conn_.tls() ? conn_.tls()->version() : std::string());
      if (captured) ev.field("captured", "yes");
      ev.emit();
    } else if (r.error().storageFull) {
      // RFC 3463 4.3.1 "mail system full": the client should try again later, and MAIL is
      // refused up front until there is room again (Runtime::storageAvailable).
      worker_.runtime().noteStoreFull(true);
      util::logError("queue", "store failed conn=" + tag() + " reason=storage-full error=" + r.error().message);
      out.ok = false;
      out.code = 452;
      out.enhanced = "4.3.1";
      out.text = "Insufficient system storage, try again later";
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
  // Every message streams through a submission::ContentScan: the header limits as the
  // data arrives and, with DKIM keys configured, the body hash (content_scan.h).
  smtp::SessionConfig withContentObserver(smtp::SessionConfig sc) {
    sc.onContent = [this](std::string_view chunk) -> std::optional<smtp::PolicyRefusal> {
      if (auto r = contentScan().feed(chunk)) return smtp::PolicyRefusal{r->code, r->enhanced, r->text};
      return std::nullopt;
    };
    sc.onContentReset = [this]() { contentScan_.reset(); };
    return sc;
  }

  submission::ContentScan& contentScan() {
    if (!contentScan_) {
      const auto& lim = settings_->config->limits;
      contentScan_.emplace(submission::ContentScan::Limits{lim.maxHeaderBytes, lim.maxHeaderFields},
                           !settings_->dkimKeys.empty());
    }
    return *contentScan_;
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
        } else if (auto* n = std::get_if<smtp::Notice>(&a)) {
          util::logInfo("smtpd", "refused conn=" + tag() + " client=" + peer_.address + " " + n->what);
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
    // RFC 5321 4.5.3.2 timeouts as deadlines: restarted when the client completed a
    // command or another block of data (or the phase changed), never by a trickle of
    // single bytes.
    const uint64_t progress = session_.progress();
    const smtp::Phase phase = session_.phase();
    if (progress != timerProgress_ || phase != timerPhase_) {
      timerProgress_ = progress;
      timerPhase_ = phase;
      conn_.setIdleTimeout(phase == smtp::Phase::TlsPending ? std::chrono::milliseconds(std::chrono::seconds(60))
                                                            : std::chrono::milliseconds(session_.timeoutFor()));
    }
  }

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
      metrics::server().auth.with("lockout").inc();
      util::logWarn("smtpd", "auth refused conn=" + tag() + " client=" + peer_.address + " user=" +
                                 util::sanitizeForLog(authUser_, 64) + " reason=auth-lockout retry_after=" +
                                 std::to_string(v.retryAfter.count()) + "s");
      session_.onAuthResult(smtp::AuthVerdict::Refused, r.text);
      drive();
      return;
    }
    // The same credential that just failed in this session (smtplib retries a failed
    // PLAIN with LOGIN): the same answer, without a second check, counted once.
    // (Only after a failure in this session is there anything to compare: no HMAC for
    // the usual login.)
    if (!lastFailedCredential_.empty() &&
        policy::constantTimeEquals(settings_->auth->fingerprint(au.username, au.password), lastFailedCredential_)) {
      wipe(au.password);
      metrics::server().auth.with("failure").inc();
      util::logInfo("smtpd", "auth failed conn=" + tag() + " client=" + peer_.address +
                                 " user=" + util::sanitizeForLog(authUser_, 64) + " repeat=yes");
      answerAuthFailure();
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
    // scrypt takes tens of milliseconds: run it on libuv's thread pool. The job holds
    // its own copies (the connection may be gone when it ends) and is freed by `done`.
    struct AuthJob {
      std::shared_ptr<policy::Authenticator> auth;
      std::string user;
      std::string password;
      bool ok = false;
      std::string failed;  // fingerprint of the credential when it failed
    };
    auto* job = new AuthJob{settings_->auth, user, password};
    net::queueWork(
        worker_.loop(),
        [job] {
          job->ok = job->auth->verify(job->user, job->password) == policy::AuthCheck::Ok;
          if (!job->ok) job->failed = job->auth->fingerprint(job->user, job->password);
          wipe(job->password);
        },
        [job, worker = &worker_, sid = id_](bool) {
          std::unique_ptr<AuthJob> own(job);
          wipe(own->password);  // not yet when the job was cancelled
          if (SmtpConnection* c = worker->find(sid)) c->authDone(own->ok, false, std::move(own->failed));
        });
  }

  // One timer per connection for the AUTH delays (never two at once: the session waits).
  void startAuthTimer(std::chrono::milliseconds delay, std::function<void()> fn) {
    if (!authTimer_) authTimer_ = std::make_unique<net::Timer>(worker_.loop());
    authTimer_->start(delay, [this, due = std::move(fn)] {
      if (conn_.closing()) return;
      due();
    });
  }

  void startStore(smtp::Store& st) {
    endOfData_ = std::chrono::steady_clock::now();
    Runtime& rt = worker_.runtime();
    const Settings& set = *settings_;
    const AccountRuntime* acct = set.account(st.account);
    // accounts[].rate_limits, now with the real size (MAIL only knew SIZE=, if that).
    if (auto refused = submission::admit(
            rt.limits.checkMessage(st.account, st.content.size(), policy::Instant::from(rt.clock)))) {
      rt.meter.addRefusedByLimit(st.account);
      metrics::server().rateLimited.with(st.account).inc();
      refuseStore(std::move(*refused));
      return;
    }

    auto* w = new CleanupWork{};
    w->worker = &worker_;
    w->sessionId = id_;
    w->settings = settings_;
    w->content = std::move(st.content);
    // What the streaming scan saw of the header section decides where cleanup runs.
    const uint64_t headerBytes = contentScan().headerBytes();
    w->digests = contentScan().finish();
    contentScan_.reset();

    queue::NewMessage& m = w->msg;
    m.id = queue::newQueueId();
    m.account = st.account;
    m.mailFrom = st.envelope.mailFrom;
    m.recipients = st.envelope.recipients;
    // RFC 3461: RET, ENVID, NOTIFY, ORCPT as the client gave them (recipientDsn runs
    // parallel to recipients; the values of the NOTIFY bits are the same on both sides).
    static_assert(smtp::kNotifySuccess == queue::kDsnNotifySuccess && smtp::kNotifyFailure == queue::kDsnNotifyFailure &&
                  smtp::kNotifyDelay == queue::kDsnNotifyDelay && smtp::kNotifyNever == queue::kDsnNotifyNever);
    m.dsnRet = static_cast<queue::DsnRet>(static_cast<int>(st.envelope.ret));
    m.dsnEnvid = st.envelope.envid;
    for (const auto& d : st.envelope.recipientDsn) m.recipientDsn.push_back(queue::RecipientDsn{d.notify, d.orcpt});
    m.captured = acct != nullptr && acct->mode == config::AccountMode::Capture;
    m.eightBit = st.envelope.eightBitMime;
    m.clientAddress = st.peer.address;
    m.heloName = st.heloName;
    if (st.tls) {
      m.tlsVersion = st.tls->version;
      m.tlsCipher = st.tls->cipher;
    }
    auto now = std::chrono::system_clock::now();
    m.receivedAt = util::unixSeconds(now);
    m.idempotencyWindow = set.config->idempotency.window.count();
    if (m.captured) addSimulatedBounces(m, acct != nullptr && acct->suppression, set.config->suppression.ttl);

    w->request.keys = set.signer ? &set.dkimKeys : nullptr;
    submission::CleanupRequest& cr = w->request.cleanup;
    cr.mailFrom = st.envelope.mailFrom;
    cr.recipients = st.envelope.recipients;
    cr.requireTls = st.envelope.requireTls;
    cr.idempotencyHeader = set.config->idempotency.header;
    // The Settings generation is held by the job, so the predicate stays valid there.
    cr.owns = [stp = settings_.get(), account = st.account](std::string_view address) {
      return stp->senderAllowed(account, address);
    };
    message::TraceInfo& ti = cr.trace;
    ti.hostname = set.config->hostname;
    ti.heloName = st.heloName;
    ti.clientAddress = st.peer.address;
    ti.account = st.account;
    ti.tlsVersion = m.tlsVersion;
    ti.tlsCipher = m.tlsCipher;
    ti.queueId = m.id;
    if (st.envelope.recipients.size() == 1) ti.recipient = st.envelope.recipients.front();
    ti.smtputf8 = st.envelope.smtputf8;  // how it was submitted (Received "with")
    ti.when = now;

    // The header checks, fix-ups and DKIM signing (RSA-2048 about a millisecond, RSA-4096
    // several; a 1 MiB header section a scan) run on libuv's thread pool, like the scrypt
    // of AUTH, so other sessions on this loop are not held up. The session is Waiting
    // meanwhile, so nothing changes under the job.
    if (headerBytes > kInlineCleanupHeaderBytes) {
      net::queueWork(
          worker_.loop(),
          [w] {
            w->decide();
            if (w->signs()) w->sign();
          },
          [w](bool cancelled) { CleanupWork::done(std::unique_ptr<CleanupWork>(w), cancelled); });
      return;
    }
    // The usual header section (a few KiB) is checked here, in microseconds: no thread
    // hop for mail that needs no signature; signing alone goes to the pool.
    // (Outcomes here go back through the caller's drive() loop, which takes the
    // session's new actions.)
    w->decide();
    if (w->verdict.refused()) {
      std::unique_ptr<CleanupWork> done(w);
      refuseStore(std::move(*done->verdict.refusal));
      return;
    }
    if (!w->signs()) {
      std::unique_ptr<CleanupWork> done(w);
      commit(std::move(done->msg));
      return;
    }
    net::queueWork(
        worker_.loop(), [w] { w->sign(); },
        [w](bool cancelled) { CleanupWork::done(std::unique_ptr<CleanupWork>(w), cancelled); });
  }

  // Header sections up to this size are cleaned up on the loop (a scan of 64 KiB takes
  // tens of microseconds); larger ones, up to limits.max_header_bytes, on the thread pool.
  static constexpr uint64_t kInlineCleanupHeaderBytes = 64 * 1024;

  // One message from the end of data to the commit: the verdict (submission/decide.h),
  // then the signatures, wherever they run.
  struct CleanupWork {
    Worker* worker;
    uint64_t sessionId;
    std::shared_ptr<const Settings> settings;  // holds the key ring the verdict points into
    std::string content;                       // as received
    std::optional<dkim::StreamingBodyHash::Digests> digests;
    submission::StoreRequest request;
    submission::Verdict verdict;  // its content moves into msg
    queue::NewMessage msg;
    std::string signError;
    size_t signatures = 0;

    void decide() {
      verdict = submission::decide(content, request);
      content.clear();
      content.shrink_to_fit();
      if (verdict.refused()) return;
      msg.content = std::move(verdict.content);
      msg.smtputf8 = verdict.smtputf8;
      msg.tlsRequirement = verdict.tlsRequired   ? queue::TlsRequirement::Required
                           : verdict.tlsOptional ? queue::TlsRequirement::Optional
                                                 : queue::TlsRequirement::Default;
      msg.idempotencyKey = std::move(verdict.idempotencyKey);
    }

    bool signs() const { return !verdict.refused() && verdict.keys != nullptr; }

    void sign() {
      const Settings& set = *settings;
      dkim::SignOptions opts;
      opts.timestamp = msg.receivedAt;  // t= (RFC 6376 3.5)
      if (auto pol = set.dkimDomains.find(verdict.signingDomain); pol != set.dkimDomains.end()) {
        if (pol->second.expiry) opts.expiresAfter = pol->second.expiry->count();
        opts.headerCanon = pol->second.headerCanon;
        opts.bodyCanon = pol->second.bodyCanon;
      }
      const auto started = std::chrono::steady_clock::now();
      auto sigs = set.signer->sign(msg.content, *verdict.keys, opts, digests ? &*digests : nullptr);
      auto& m = metrics::server();
      m.dkimSignLatency.get().observe(secondsSince(started));
      if (!sigs.ok()) {
        signError = sigs.error().message;
        return;
      }
      // RFC 6376 5.6: the DKIM-Signature is prepended; ours go above our Received, so
      // what is stored is exactly what leaves.
      msg.content.insert(0, sigs.value());
      signatures = verdict.keys->size();
      for (const auto& k : *verdict.keys) m.dkimSignatures.with(dkim::algorithmName(k.key->algorithm())).inc();
    }

    static void done(std::unique_ptr<CleanupWork> w, bool cancelled) {
      SmtpConnection* c = w->worker->find(w->sessionId);
      // Gone: the client left before its 250, so nothing was promised.
      if (c == nullptr || c->conn_.closing()) return;
      if (cancelled || !w->signError.empty()) {
        std::string why = cancelled ? std::string("cancelled") : w->signError;
        util::logError("dkim", "signing failed conn=" + c->tag() + " domain=" + w->verdict.signingDomain +
                                   " error=" + util::sanitizeForLog(why));
        c->refuseStore({451, "4.3.0", "Temporary failure signing message, try again later"});
        c->drive();
        return;
      }
      if (w->verdict.refused()) {
        c->refuseStore(std::move(*w->verdict.refusal));
        c->drive();
        return;
      }
      if (w->signatures > 0) {
        // One line per message event; the queue id is already chosen.
        std::string selectors;
        for (const auto& k : *w->verdict.keys)
          selectors += (selectors.empty() ? "" : ",") + k.selector + ":" + std::string(dkim::algorithmName(k.key->algorithm()));
        util::LogEvent(util::LogLevel::Info, "dkim", "signed")
            .queueId(w->msg.id)
            .account(w->msg.account)
            .field("domain", w->verdict.signingDomain)
            .field("selectors", selectors)
            .emit();
      }
      c->commit(std::move(w->msg));
    }
  };

  void commit(queue::NewMessage m) {
    Runtime& rt = worker_.runtime();
    size_t size = m.content.size();
    size_t rcpts = m.recipients.size();
    std::string fromAddr = m.mailFrom;
    bool captured = m.captured;
    Worker* w = &worker_;
    uint64_t sid = id_;
    Runtime* rtp = &rt;
    // A repeated idempotency key comes back with another message's id (store.h); a
    // message without a key cannot be a duplicate and keeps nothing for it.
    std::string id = m.idempotencyKey.empty() ? std::string() : m.id;
    std::string key = m.idempotencyKey;
    rt.committer->submit(std::move(m), [w, rtp, sid, size, rcpts, fromAddr, captured, id = std::move(id),
                                        key = std::move(key)](util::Result<std::string> r) {
      const bool duplicate = !id.empty() && r.ok() && r.value() != id;
      // Runs on the committer thread: wake the delivery service (not for a duplicate: it
      // added no work), then hop back to this connection's loop.
      if (r.ok() && !duplicate && !captured && rtp->onQueued) rtp->onQueued();
      w->post([w, sid, size, rcpts, fromAddr, captured, duplicate, key, r = std::move(r)]() {
        if (SmtpConnection* c = w->find(sid)) c->stored(r, size, rcpts, fromAddr, captured, duplicate, key);
      });
    });
  }

  void refuseStore(submission::Refusal r) {
    util::logInfo("smtpd", "refused conn=" + tag() + " account=" +
                               util::sanitizeForLog(session_.account(), 64) + " reason=\"" + r.text + "\"");
    smtp::StoreOutcome out;
    out.ok = false;
    out.code = r.code;
    out.enhanced = std::move(r.enhanced);
    out.text = std::move(r.text);
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
  std::unique_ptr<net::Timer> authTimer_;
  std::string pendingPassword_;  // held only while a progressive AUTH delay runs
  bool authDelayPending_ = false;
  bool accountCounted_ = false;  // holds a slot of limits.max_sessions_per_account
  // The keyed fingerprint (Authenticator::fingerprint), never the password, of the last
  // credential that failed in this session.
  std::string lastFailedCredential_;
  std::string refusal_;          // refused at connect (implicit TLS: sent after the handshake)
  std::optional<submission::ContentScan> contentScan_;  // the message streaming in
  std::chrono::steady_clock::time_point endOfData_{};  // for the accept latency
  struct {
    metrics::Counter* accepted = nullptr;
    metrics::Counter* bytes = nullptr;
    metrics::Counter* recipients = nullptr;
    metrics::Histogram* acceptLatency = nullptr;
  } acctMetrics_;
  uint64_t timerProgress_ = ~uint64_t{0};
  smtp::Phase timerPhase_ = smtp::Phase::Closed;
};

// ---------------------------------------------------------------------------------
// Worker
// ---------------------------------------------------------------------------------
Worker::Worker(Runtime& rt, int index) : rt_(rt), index_(index) {}

Worker::~Worker() { join(); }

util::Result<uint16_t> Worker::addListener(const config::Listener& l, uint16_t port) {
  auto entry = std::make_unique<ListenerEntry>();
  entry->cfg = l;
  ListenerEntry* e = entry.get();
  entry->listener = std::make_unique<net::Listener>(loop(), [this, e](uv_stream_t* s) { onAccept(s, e->cfg); });
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

void Worker::post(std::function<void()> fn) { loop_.post(std::move(fn)); }

void Worker::start(std::chrono::milliseconds heartbeatEvery) {
  // Made before the thread runs the loop (as every handle of a LoopThread's loop is).
  heartbeatTimer_ = std::make_unique<net::Timer>(loop());
  heartbeat_.stamp(util::steadyMs());
  heartbeatTimer_->start(heartbeatEvery, [this] { heartbeat_.stamp(util::steadyMs()); }, heartbeatEvery);
  loop_.start();
}

void Worker::requestShutdown() {
  loop_.post([this] {
    if (!shuttingDown_) beginShutdown();
  });
}

void Worker::beginShutdown() {
  shuttingDown_ = true;
  for (auto& l : listeners_) l->listener->close();
  // Sessions finish the transaction in flight, then get 421 4.3.2 (RFC 5321 3.8).
  std::vector<SmtpConnection*> all;
  for (auto& [id, c] : sessions_) all.push_back(c);
  for (auto* c : all) c->shutdown();
  auto grace = std::chrono::duration_cast<std::chrono::milliseconds>(rt_.settings()->config->limits.shutdownGrace);
  graceTimer_ = std::make_unique<net::Timer>(loop());
  graceTimer_->start(grace, [this] {
    std::vector<SmtpConnection*> left;
    for (auto& [id, c] : sessions_) left.push_back(c);
    if (!left.empty()) util::logWarn("serve", "shutdown grace over: closing " + std::to_string(left.size()) + " sessions");
    for (auto* c : left) c->forceClose();
  });
  maybeFinish();
}

void Worker::maybeFinish() {
  if (!sessions_.empty()) return;
  graceTimer_.reset();
  heartbeatTimer_.reset();
  // Pending posts (store answers for sessions now gone) are dropped; with every handle
  // closed, the loop ends once outstanding thread-pool work is done.
  loop_.stop();
}

void Worker::join() { loop_.join(); }

}  // namespace subrelay::app
