// DeliveryService (delivery_service.h): the scheduler loop and the outbound connections.
#include "app/delivery_service.h"

#include <uv.h>

#include <algorithm>
#include <cstdio>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "delivery/destination.h"
#include "delivery/dsn.h"
#include "delivery/retry.h"
#include "delivery/routing.h"
#include "dns/resolv_conf.h"
#include "dns/uv_resolver.h"
#include "message/headers.h"
#include "net/connection.h"
#include "net/listener.h"
#include "net/uv_handle.h"
#include "net/uv_timer.h"
#include "queue/sqlite_store.h"
#include "smtp/client_session.h"
#include "tls/tls_context.h"
#include "util/clock.h"
#include "util/log.h"
#include "util/strings.h"
#include "util/time_fmt.h"

namespace subrelay::app {

namespace {

using Clock = std::chrono::steady_clock;

// RFC 5321 4.5.3.2 gives no connect timeout; 30 s is what Postfix uses
// (smtp_connect_timeout) and keeps a dead MX from holding a connection slot for long.
constexpr auto kConnectTimeout = std::chrono::seconds(30);
// Longer than the longest attempt (connect + DATA termination 10 min): a lease only
// expires by itself when this process is gone, and start-up clears those anyway.
constexpr int64_t kLeaseSeconds = 20 * 60;
constexpr size_t kLeaseBatch = 200;
constexpr size_t kMaxQueuedJobs = 2000;
constexpr auto kFlushInterval = std::chrono::milliseconds(20);
constexpr size_t kFlushBatch = 256;

int64_t nowUnix() { return util::unixSeconds(std::chrono::system_clock::now()); }

std::string domainOf(const std::string& address) {
  size_t at = address.rfind('@');
  return at == std::string::npos ? std::string() : util::toLower(address.substr(at + 1));
}

struct Settings {
  std::string hostname;
  uint16_t port = 25;
  config::DeliveryTls tls = config::DeliveryTls::Opportunistic;
  std::map<std::string, config::DeliveryTls> overrides;
  delivery::RetryPolicy retry;
  uint32_t maxConnections = 200;
  uint32_t maxConnectionsPerDomain = 10;
  delivery::DestinationPolicy destinations;
  queue::RetentionPolicy retention;  // retention.*: maybePrune()
};

Settings settingsFrom(const config::Config& cfg) {
  Settings s;
  s.destinations.allowPrivate = cfg.delivery.allowPrivateDestinations;
  if (!s.destinations.allowPrivate) s.destinations.ownAddresses = net::hostAddresses();
  s.hostname = cfg.hostname;
  s.port = cfg.delivery.port;
  s.tls = cfg.delivery.tls;
  for (const auto& o : cfg.delivery.tlsOverrides) s.overrides[util::toLower(o.domain)] = o.tls;
  s.retry.schedule = cfg.delivery.retrySchedule.empty() ? config::defaultRetrySchedule() : cfg.delivery.retrySchedule;
  s.retry.maxQueueTime = cfg.delivery.maxQueueTime;
  s.retry.delayNotice = cfg.delivery.delayNotice;
  s.maxConnections = cfg.delivery.maxConnections;
  s.maxConnectionsPerDomain = cfg.delivery.maxConnectionsPerDomain;
  s.retention.finishedBodies = cfg.retention.finishedBodies.count();
  s.retention.history = cfg.retention.history.count();
  s.retention.captured = cfg.retention.captured.count();
  return s;
}

// The message a job belongs to; the content is read once, when the first job needs it.
struct MessageMeta {
  queue::DueMessage due;
  std::shared_ptr<const std::string> content;
};

struct Job {
  std::shared_ptr<MessageMeta> meta;
  std::string domain;
  std::vector<queue::DueRecipient> rcpts;
};

}  // namespace

class OutboundSession;

struct DeliveryService::Impl {
  // --- set up before the thread starts ---
  std::unique_ptr<queue::SqliteStore> store;
  std::shared_ptr<tls::TlsContext> plainCtx;   // no verification (opportunistic, required)
  std::shared_ptr<tls::TlsContext> verifyCtx;  // chain + host name (verify)
  std::vector<dns::ServerAddress> servers;
  util::SystemClock clock;

  // --- cross-thread ---
  std::mutex mu;
  std::optional<Settings> pendingSettings;
  bool wake = false;
  bool stopRequested = false;
  std::chrono::seconds grace{30};
  std::thread thread;

  // --- loop thread only ---
  uv_loop_t loop{};
  bool loopStarted = false;
  uv_async_t* async = nullptr;
  uv_timer_t* tick = nullptr;
  uv_timer_t* flushTimer = nullptr;
  uv_timer_t* graceTimer = nullptr;
  uv_timer_t* refillTimer = nullptr;
  bool moreDue = false;  // the last lease was a full batch: more may be waiting
  Settings settings;
  std::unique_ptr<dns::UvResolver> resolver;
  std::unique_ptr<delivery::RouteResolver> routes;
  std::map<std::string, std::deque<Job>> queued;  // by recipient domain
  std::map<std::string, uint32_t> activePerDomain;
  std::set<OutboundSession*> sessions;
  size_t queuedJobs = 0;
  std::vector<queue::AttemptRecord> pending;  // results waiting for the next flush
  bool stopping = false;
  Clock::time_point lastPull{};
  // --- retention (maybePrune) ---
  std::unique_ptr<net::Timer> pruneTimer;  // the next batch; created on the loop thread
  queue::PrunePacer prunePacer;
  struct PruneStats {
    queue::PruneCounts counts;
    int64_t batches = 0, pages = 0;
    Clock::duration maxPrune{}, maxVacuum{}, sumPrune{};
    Clock::time_point since{};
  } pruneStats;

  void run();
  void onAsync();
  void onTick();
  void maybePrune();
  void pull();
  void dispatch();
  void processDsns();
  void flush();
  void scheduleFlush();
  void finishStop();
  void maybeEndLoop();

  std::optional<Job> nextJob(const std::string& domain);
  void record(const Job& job, const std::vector<smtp::RecipientResult>& results, const std::string& mx,
              const std::string& tlsVersion, const std::string& tlsCipher);
  // Every queued job of the domain (and `held`, when given) gets the same outcome.
  void failDomain(const std::string& domain, std::optional<Job> held, smtp::Outcome outcome, int code,
                  const std::string& enhanced, const std::string& text, const std::string& mx);
  void sessionEnded(OutboundSession* s);
  config::DeliveryTls tlsFor(const std::string& domain) const {
    auto it = settings.overrides.find(domain);
    return it == settings.overrides.end() ? settings.tls : it->second;
  }
};

// ---------------------------------------------------------------------------------------
// OutboundSession: one connection (or a series of attempts over the MX list) for one
// recipient domain. It takes jobs of that domain one after the other once the server is
// ready, so queued messages for the same MX reuse the connection.
// ---------------------------------------------------------------------------------------
class OutboundSession final : public net::ConnectionHandler {
 public:
  OutboundSession(DeliveryService::Impl& svc, std::string domain)
      : svc_(svc), domain_(std::move(domain)), policy_(svc.tlsFor(domain_)), settings_(svc.settings) {}

  void start() {
    // user@[192.0.2.1]: the address literal is the route (RFC 5321 4.1.3), no DNS.
    if (auto literal = delivery::routeForAddressLiteral(domain_)) {
      onRoute(std::move(*literal));
      return;
    }
    std::weak_ptr<bool> weak = alive_;
    svc_.routes->resolve(domain_, [this, weak](delivery::Route route) {
      if (weak.expired()) return;
      onRoute(std::move(route));
    });
  }

  void forceClose() {
    giveUp_ = true;
    if (conn_) conn_->close();
  }
  // Shutdown: finish the transaction in hand, take no new job.
  void drain() {
    if (session_ && session_->idle() && !job_) {
      session_->quit();
      pump();
    }
  }
  const std::string& domain() const { return domain_; }

  // --- net::ConnectionHandler ---
  void onConnected(int status) override {
    stopTimer();
    if (status != 0) {
      lastError_ = "connect to " + mxLabel() + ": " + uv_strerror(status);
      conn_->close();
      return;
    }
    session_->onConnected();
    pump();
  }
  void onPlaintext(std::string_view data) override {
    session_->onBytes(data);
    pump();
  }
  void onTlsEstablished() override {
    tlsVersion_ = conn_->tls()->version();
    tlsCipher_ = conn_->tls()->cipher();
    session_->onTlsEstablished();
    pump();
  }
  void onTlsFailed(std::string_view why) override {
    std::string detail(why);
    if (conn_->tls() && !conn_->tls()->peerVerifyError().empty())
      detail = "certificate: " + conn_->tls()->peerVerifyError();
    session_->onTlsFailed(detail);
    pump();
  }
  void onIdleTimeout() override {}
  void onPeerClosed() override {
    if (session_ && !session_->closed()) {
      session_->onConnectionLost("connection closed by " + mxLabel());
      pump();
    }
  }
  void onClosed() override {
    stopTimer();
    if (session_ && !session_->closed()) {
      session_->onConnectionLost("connection to " + mxLabel() + " closed");
      pumpActions();  // results only; nothing can be written any more
    }
    conn_.reset();
    session_.reset();
    // A job still in hand had no result (cannot happen after onConnectionLost, but a
    // job must never vanish): defer it.
    if (job_) {
      svc_.failDomain(domain_, std::move(job_), smtp::Outcome::TempFail, 0, "4.4.2",
                      lastError_.empty() ? "connection lost" : lastError_, mxLabel());
      job_.reset();
    }
    if (!giveUp_ && !ready_ && !svc_.stopping) {
      tryNext();
      return;
    }
    end();
  }

 private:
  void onRoute(delivery::Route resolved) {
    // delivery.allow_private_destinations: internal, loopback and our own addresses are
    // no destination for a tenant's mail (address literals included).
    delivery::Route route = delivery::applyDestinationPolicy(std::move(resolved), settings_.destinations);
    if (route.status != delivery::RouteStatus::Ok) {
      bool perm = route.status == delivery::RouteStatus::PermFail;
      util::logInfo("delivery", "route domain=" + domain_ + " result=" + (perm ? "failed" : "deferred") +
                                    " detail=\"" + util::sanitizeForLog(route.detail) + "\"");
      svc_.failDomain(domain_, std::nullopt, perm ? smtp::Outcome::PermFail : smtp::Outcome::TempFail, 0,
                      route.enhanced.empty() ? (perm ? "5.1.2" : "4.4.3") : route.enhanced, route.detail, "");
      end();
      return;
    }
    route_ = std::move(route);
    tryNext();
  }

  // The next address of the current MX, else the first of the next MX (RFC 5321 5.1:
  // every address of every MX, in order, until one accepts a connection).
  void tryNext() {
    ready_ = false;
    tlsVersion_.clear();
    tlsCipher_.clear();
    for (;;) {
      if (host_ >= route_.hosts.size()) {
        std::string why = lastError_.empty() ? "no reachable mail exchanger" : lastError_;
        util::logInfo("delivery", "unreachable domain=" + domain_ + " error=\"" + util::sanitizeForLog(why) + "\"");
        svc_.failDomain(domain_, std::nullopt, smtp::Outcome::TempFail, lastCode_, lastEnhanced_.empty() ? "4.4.1" : lastEnhanced_,
                        why, lastMx_);
        end();
        return;
      }
      const auto& h = route_.hosts[host_];
      if (addr_ < h.addresses.size()) break;
      ++host_;
      addr_ = 0;
    }
    const auto& h = route_.hosts[host_];
    ip_ = h.addresses[addr_++];
    hostName_ = h.name;
    lastMx_ = mxLabel();
    smtp::ClientConfig cc;
    cc.heloName = settings_.hostname;
    cc.tls = policy_ == config::DeliveryTls::Opportunistic ? smtp::ClientTls::Opportunistic : smtp::ClientTls::Required;
    session_ = std::make_unique<smtp::ClientSession>(cc);
    conn_ = std::make_unique<net::Connection>(&svc_.loop, this);
    armTimer(kConnectTimeout);
    conn_->connect(ip_, settings_.port);
  }

  std::string mxLabel() const {
    if (ip_.empty()) return "";
    std::string a = ip_.find(':') != std::string::npos ? "[" + ip_ + "]" : ip_;
    return hostName_ + " [" + a + "]:" + std::to_string(settings_.port);
  }

  void pump() {
    pumpActions();
    if (session_ && conn_ && !conn_->closing()) {
      if (auto t = session_->timeout()) armTimer(*t);
      else stopTimer();
    }
  }

  void pumpActions() {
    if (!session_) return;
    for (;;) {
      auto actions = session_->takeActions();
      if (actions.empty()) return;
      for (auto& a : actions) {
        if (auto* sb = std::get_if<smtp::SendBytes>(&a)) {
          if (conn_) conn_->write(sb->bytes);
        } else if (std::holds_alternative<smtp::StartTls>(a)) {
          if (conn_)
            conn_->startTlsClient(policy_ == config::DeliveryTls::Verify ? svc_.verifyCtx : svc_.plainCtx, hostName_);
        } else if (std::holds_alternative<smtp::CloseConnection>(a)) {
          if (conn_) conn_->closeAfterWrite();
        } else if (std::holds_alternative<smtp::SessionReady>(a)) {
          ready_ = true;
          takeJob();
        } else if (auto* td = std::get_if<smtp::TransactionDone>(&a)) {
          if (job_) {
            svc_.record(*job_, td->results, mxLabel(), tlsVersion_, tlsCipher_);
            job_.reset();
          }
          if (session_ && session_->idle()) takeJob();
        } else if (auto* sf = std::get_if<smtp::SessionFailed>(&a)) {
          lastError_ = sf->reply.code ? mxLabel() + " said: " + sf->reply.summary()
                                      : (sf->reply.text.empty() ? sf->stage : sf->reply.text) + " (" + mxLabel() + ")";
          lastCode_ = sf->reply.code;
          lastEnhanced_ = sf->reply.enhanced;
          if (conn_) conn_->close();
        }
      }
    }
  }

  void takeJob() {
    if (!session_ || !session_->idle()) return;
    std::optional<Job> j = svc_.stopping ? std::nullopt : svc_.nextJob(domain_);
    if (!j) {
      session_->quit();
      return;
    }
    job_ = std::move(j);
    MessageMeta& m = *job_->meta;
    if (!m.content) {
      auto c = svc_.store->content(m.due.id);
      if (!c.ok()) {
        util::logError("delivery", "cannot read message id=" + m.due.id + ": " + c.error().message);
        svc_.failDomain(domain_, std::move(job_), smtp::Outcome::TempFail, 0, "4.3.0",
                        "local error reading the queue: " + c.error().message, "");
        job_.reset();
        session_->quit();
        return;
      }
      m.content = std::make_shared<const std::string>(std::move(c.value()));
    }
    smtp::OutboundMessage om;
    om.mailFrom = m.due.mailFrom;
    for (const auto& r : job_->rcpts) om.recipients.push_back(r.address);
    om.content = m.content;
    om.eightBit = m.due.eightBit;
    om.smtputf8 = m.due.smtputf8;
    session_->send(std::move(om));
  }

  void armTimer(std::chrono::seconds after) {
    if (!timer_) {
      timer_ = net::newHandle<uv_timer_t>();
      uv_timer_init(&svc_.loop, timer_);
      timer_->data = this;
    }
    uv_timer_start(
        timer_,
        [](uv_timer_t* t) {
          auto* self = static_cast<OutboundSession*>(t->data);
          if (self == nullptr) return;
          if (self->session_ && !self->session_->closed() && self->ready_) {
            self->session_->onTimeout();
            self->pumpActions();
          } else if (self->session_ && !self->session_->closed()) {
            self->lastError_ = "timeout talking to " + self->mxLabel();
            self->session_->onTimeout();
            self->pumpActions();
          }
          if (self->conn_) self->conn_->close();
        },
        static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(after).count()), 0);
  }
  void stopTimer() {
    if (timer_) uv_timer_stop(timer_);
  }

  void end() {
    if (timer_) {
      timer_->data = nullptr;
      net::closeHandle(timer_);
      timer_ = nullptr;
    }
    alive_.reset();
    svc_.sessionEnded(this);  // deletes this
  }

  DeliveryService::Impl& svc_;
  std::string domain_;
  config::DeliveryTls policy_;
  Settings settings_;  // as when the session started (reload does not change it)
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
  delivery::Route route_;
  size_t host_ = 0;
  size_t addr_ = 0;
  std::string ip_;
  std::string hostName_;
  std::unique_ptr<net::Connection> conn_;
  std::unique_ptr<smtp::ClientSession> session_;
  uv_timer_t* timer_ = nullptr;
  std::optional<Job> job_;
  bool ready_ = false;
  bool giveUp_ = false;
  std::string tlsVersion_;
  std::string tlsCipher_;
  std::string lastError_;
  std::string lastMx_;
  int lastCode_ = 0;
  std::string lastEnhanced_;
};

// ---------------------------------------------------------------------------------------
// The scheduler
// ---------------------------------------------------------------------------------------
void DeliveryService::Impl::run() {
  uv_run(&loop, UV_RUN_DEFAULT);
}

void DeliveryService::Impl::onAsync() {
  bool doWake = false, doStop = false;
  std::optional<Settings> fresh;
  {
    std::lock_guard lk(mu);
    doWake = wake;
    wake = false;
    doStop = stopRequested && !stopping;
    fresh = std::move(pendingSettings);
    pendingSettings.reset();
  }
  if (fresh) settings = std::move(*fresh);
  if (doStop) {
    stopping = true;
    finishStop();
    return;
  }
  if (doWake && !stopping) {
    // Many commits in a burst: one lease transaction per 50 ms is plenty.
    if (Clock::now() - lastPull >= std::chrono::milliseconds(50)) {
      pull();
      dispatch();
    }
  }
}

void DeliveryService::Impl::onTick() {
  if (stopping) return;
  pull();
  processDsns();
  dispatch();
  maybePrune();  // retention: see maybePrune()
}

// ---- retention: queue pruning (one method, so it moves as a whole) -------------------
// Runs one small prune() batch (a few hundred messages in one short write transaction on
// this thread's own connection), gives some free pages back (incrementalVacuum), and lets
// queue::PrunePacer say when the next batch runs: 50 ms later while batches come back
// full, seconds later otherwise. onTick() calls it every second; it does nothing while the
// next batch is already scheduled. Never on an SMTP loop: submission only waits for the
// write lock for as long as one batch holds it.
void DeliveryService::Impl::maybePrune() {
  // Free pages kept for new messages to reuse instead of shrinking the file and growing
  // it again: 8 MiB of 4 KiB pages.
  constexpr int64_t kKeepFreePages = 2048;
  if (stopping) return;
  if (!pruneTimer) {
    pruneTimer = std::make_unique<net::Timer>(&loop);
    pruneStats.since = Clock::now();
  }
  if (pruneTimer->active()) return;
  auto& st = pruneStats;
  const auto t0 = Clock::now();
  auto counts = store->prune(nowUnix(), settings.retention, prunePacer.maxRows);
  const auto t1 = Clock::now();
  int64_t pages = 0;
  bool failed = !counts.ok();
  if (failed) {
    util::logError("retention", "cannot prune the queue: " + counts.error().message);
  } else {
    auto v = store->incrementalVacuum(prunePacer.maxVacuumPages, kKeepFreePages);
    if (v.ok()) pages = v.value();
    else util::logWarn("retention", "incremental vacuum: " + v.error().message);
  }
  const auto t2 = Clock::now();
  if (!failed && (counts->rows() > 0 || pages > 0)) {
    ++st.batches;
    st.counts.bodiesRemoved += counts->bodiesRemoved;
    st.counts.finishedDeleted += counts->finishedDeleted;
    st.counts.capturedDeleted += counts->capturedDeleted;
    st.pages += pages;
    st.sumPrune += t1 - t0;
    st.maxPrune = std::max(st.maxPrune, t1 - t0);
    st.maxVacuum = std::max(st.maxVacuum, t2 - t1);
  }
  if (t2 - st.since >= std::chrono::seconds(60) && st.batches > 0) {
    using Ms = std::chrono::duration<double, std::milli>;
    char times[160];
    std::snprintf(times, sizeof times, "prune %.1f ms average, %.1f ms longest; vacuum %.1f ms longest",
                  Ms(st.sumPrune).count() / static_cast<double>(st.batches), Ms(st.maxPrune).count(),
                  Ms(st.maxVacuum).count());
    util::logInfo("retention", "last " + std::to_string(std::chrono::duration_cast<std::chrono::seconds>(t2 - st.since).count()) +
                                   " s: " + std::to_string(st.batches) + " batches, " +
                                   std::to_string(st.counts.bodiesRemoved) + " bodies removed, " +
                                   std::to_string(st.counts.finishedDeleted) + " finished and " +
                                   std::to_string(st.counts.capturedDeleted) + " captured messages deleted, " +
                                   std::to_string(st.pages) + " pages released; " + times);
    st = PruneStats{};
    st.since = t2;
  } else if (st.batches == 0 && t2 - st.since >= std::chrono::seconds(60)) {
    st.since = t2;
  }
  pruneTimer->start(prunePacer.next(failed ? queue::PruneCounts{} : counts.value(), pages, failed),
                    [this] { maybePrune(); });
}
// ---- end of retention ------------------------------------------------------------------

void DeliveryService::Impl::pull() {
  lastPull = Clock::now();
  if (queuedJobs >= kMaxQueuedJobs) return;
  auto due = store->leaseDue(nowUnix(), kLeaseSeconds, kLeaseBatch);
  if (!due.ok()) {
    util::logError("delivery", "cannot read the queue: " + due.error().message);
    return;
  }
  moreDue = due.value().size() >= kLeaseBatch;
  for (auto& m : due.value()) {
    auto meta = std::make_shared<MessageMeta>();
    meta->due = std::move(m);
    // One job per recipient domain: those recipients share the MX and one transaction.
    std::map<std::string, std::vector<queue::DueRecipient>> byDomain;
    for (const auto& r : meta->due.recipients) byDomain[domainOf(r.address)].push_back(r);
    for (auto& [domain, rcpts] : byDomain) {
      queued[domain].push_back(Job{meta, domain, std::move(rcpts)});
      ++queuedJobs;
    }
  }
}

void DeliveryService::Impl::dispatch() {
  if (stopping) return;
  // Sessions are created first and started after the walk: a start can end at once (an
  // address literal that is refused) and that re-enters dispatch() and edits `queued`.
  std::vector<OutboundSession*> fresh;
  for (auto& [domain, jobs] : queued) {
    if (jobs.empty()) continue;
    uint32_t& active = activePerDomain[domain];
    uint32_t want = static_cast<uint32_t>(std::min<size_t>(jobs.size(), settings.maxConnectionsPerDomain));
    while (active < want && sessions.size() < settings.maxConnections) {
      auto* s = new OutboundSession(*this, domain);
      sessions.insert(s);
      ++active;
      fresh.push_back(s);
    }
  }
  for (auto* s : fresh) s->start();
}

std::optional<Job> DeliveryService::Impl::nextJob(const std::string& domain) {
  auto it = queued.find(domain);
  if (it == queued.end() || it->second.empty()) return std::nullopt;
  Job j = std::move(it->second.front());
  it->second.pop_front();
  --queuedJobs;
  // A backlog: lease the next batch before this one runs dry instead of waiting for the
  // tick (which alone would cap delivery at one batch per second).
  if (moreDue && !stopping && queuedJobs < kLeaseBatch / 2 && !uv_is_active(reinterpret_cast<uv_handle_t*>(refillTimer)))
    uv_timer_start(
        refillTimer,
        [](uv_timer_t* t) {
          auto* self = static_cast<Impl*>(t->data);
          if (self == nullptr || self->stopping) return;
          self->pull();
          self->dispatch();
        },
        0, 0);
  return j;
}

void DeliveryService::Impl::record(const Job& job, const std::vector<smtp::RecipientResult>& results,
                                   const std::string& mx, const std::string& tlsVersion,
                                   const std::string& tlsCipher) {
  const int64_t now = nowUnix();
  const auto& m = job.meta->due;
  for (const auto& rr : results) {
    const queue::DueRecipient* rcpt = nullptr;
    for (const auto& r : job.rcpts)
      if (r.address == rr.recipient) rcpt = &r;
    if (rcpt == nullptr) continue;
    queue::AttemptRecord rec;
    rec.messageId = m.id;
    rec.index = rcpt->index;
    rec.attempt.at = now;
    rec.attempt.mx = mx;
    rec.attempt.tlsVersion = tlsVersion;
    rec.attempt.tlsCipher = tlsCipher;
    rec.attempt.code = rr.reply.code;
    // No server reply (DNS, network, local decision): the enhanced code still leads, so
    // the DSN and `queue show` carry it ("5.1.10 domain ... null MX").
    std::string summary = rr.reply.code ? rr.reply.summary()
                                        : (rr.reply.enhanced.empty() ? rr.reply.text : rr.reply.enhanced + " " + rr.reply.text);
    rec.attempt.reply = summary;
    std::string result;
    switch (rr.outcome) {
      case smtp::Outcome::Delivered:
        rec.newState = queue::kStateDelivered;
        result = "delivered";
        break;
      case smtp::Outcome::PermFail:
        rec.newState = queue::kStateFailed;
        rec.lastError = summary;
        result = "failed";
        break;
      case smtp::Outcome::TempFail: {
        auto next = delivery::nextAttemptAt(rcpt->attempts + 1, now, m.receivedAt, settings.retry);
        if (next) {
          rec.newState = queue::kStateDeferred;
          rec.nextAttempt = *next;
          rec.lastError = summary;
          result = "deferred";
        } else {
          // RFC 3463 4.4.7: delivery time expired.
          rec.newState = queue::kStateFailed;
          rec.lastError = "expired after " + std::to_string(settings.retry.maxQueueTime.count() / 3600) +
                          " hours in the queue; last error: " + summary;
          result = "expired";
        }
        break;
      }
    }
    rec.attempt.result = result == "expired" ? "failed" : result;
    util::logInfo("delivery", result + " id=" + m.id + " rcpt=<" + util::sanitizeForLog(rr.recipient, 200) +
                                  "> mx=" + (mx.empty() ? std::string("-") : mx) +
                                  " tls=" + (tlsVersion.empty() ? std::string("none") : tlsVersion) +
                                  " attempt=" + std::to_string(rcpt->attempts + 1) +
                                  (rec.newState == queue::kStateDeferred ? " next=" + util::isoUtc(rec.nextAttempt) : "") +
                                  " reply=\"" + util::sanitizeForLog(summary, 300) + "\"");
    pending.push_back(std::move(rec));
  }
  scheduleFlush();
}

void DeliveryService::Impl::failDomain(const std::string& domain, std::optional<Job> held, smtp::Outcome outcome,
                                       int code, const std::string& enhanced, const std::string& text,
                                       const std::string& mx) {
  auto results = [&](const Job& j) {
    std::vector<smtp::RecipientResult> rs;
    for (const auto& r : j.rcpts) {
      smtp::RecipientResult rr;
      rr.recipient = r.address;
      rr.outcome = outcome;
      rr.reply.code = code;
      rr.reply.enhanced = enhanced;
      rr.reply.text = text;
      rr.stage = "connect";
      rs.push_back(std::move(rr));
    }
    return rs;
  };
  if (held) record(*held, results(*held), mx, "", "");
  // The other jobs of this domain share the verdict only if no other connection to the
  // domain is working (another session may be delivering to a second MX just fine).
  if (activePerDomain[domain] > 1) return;
  while (auto j = nextJob(domain)) record(*j, results(*j), mx, "", "");
}

void DeliveryService::Impl::sessionEnded(OutboundSession* s) {
  std::string domain = s->domain();
  sessions.erase(s);
  delete s;
  if (auto it = activePerDomain.find(domain); it != activePerDomain.end() && --it->second == 0)
    activePerDomain.erase(it);
  if (auto q = queued.find(domain); q != queued.end() && q->second.empty()) queued.erase(q);
  if (stopping) {
    maybeEndLoop();
    return;
  }
  dispatch();
}

void DeliveryService::Impl::scheduleFlush() {
  if (pending.size() >= kFlushBatch) {
    flush();
    return;
  }
  if (!uv_is_active(reinterpret_cast<uv_handle_t*>(flushTimer)))
    uv_timer_start(
        flushTimer,
        [](uv_timer_t* t) {
          auto* self = static_cast<Impl*>(t->data);
          if (self) self->flush();
        },
        static_cast<uint64_t>(kFlushInterval.count()), 0);
}

void DeliveryService::Impl::flush() {
  if (flushTimer) uv_timer_stop(flushTimer);
  if (pending.empty()) return;
  auto r = store->recordAttempts(pending);
  if (!r.ok()) {
    // Kept for the next flush; the leases keep the recipients from being taken again.
    util::logError("delivery", "cannot record delivery results: " + r.error().message);
    return;
  }
  pending.clear();
}

// RFC 3464 DSNs for recipients that failed (dsn_pending) and "delayed" notices.
void DeliveryService::Impl::processDsns() {
  auto makeDsn = [&](const queue::DsnWork& w, delivery::DsnAction action) -> std::optional<queue::NewMessage> {
    const auto& m = w.message;
    if (m.mailFrom.empty() || m.isDsn) return std::nullopt;  // never to <>, never a bounce of a bounce
    auto full = store->show(m.id);
    auto content = store->content(m.id);
    delivery::DsnInput in;
    in.reportingMta = settings.hostname;
    in.queueId = m.id;
    in.originalSender = m.mailFrom;
    in.arrivalDate = m.receivedAt;
    in.now = nowUnix();
    in.messageId = "<" + queue::newQueueId() + ".dsn@" + settings.hostname + ">";
    if (content.ok()) {
      const std::string& c = content.value();
      size_t end = c.find("\r\n\r\n");
      in.originalHeaders = end == std::string::npos ? c : c.substr(0, end + 2);
    }
    for (const auto& r : m.recipients) {
      delivery::DsnRecipient dr;
      dr.address = r.address;
      dr.action = action;
      const queue::AttemptInfo* last = nullptr;
      if (full.ok())
        for (const auto& a : full.value().attempts)
          if (a.index == r.index) last = &a;
      if (last != nullptr) {
        dr.lastAttempt = last->at;
        if (!last->mx.empty()) {
          std::string host = last->mx.substr(0, last->mx.find(' '));
          dr.remoteMta = "dns; " + host;
        }
        if (last->code) {
          dr.diagnostic = "smtp; " + last->reply;
        }
        std::string enh;
        // "550 5.1.1 text": the enhanced code is the second word.
        if (last->code && last->reply.size() > 4) enh = last->reply.substr(4, last->reply.find(' ', 4) - 4);
        if (!last->code) enh = last->reply.substr(0, last->reply.find(' '));
        int cls = last->code ? last->code
                              : (!enh.empty() && enh[0] == '5' ? 550 : 450);
        dr.status = delivery::statusFromReply(cls, enh);
      } else {
        dr.status = action == delivery::DsnAction::Failed ? "5.0.0" : "4.0.0";
      }
      if (r.lastError.rfind("expired", 0) == 0) dr.status = "4.4.7";
      if (r.lastError == "bounced by operator") dr.status = "5.0.0", dr.diagnostic.clear();
      if (action == delivery::DsnAction::Delayed)
        dr.willRetryUntil = m.receivedAt + settings.retry.maxQueueTime.count();
      if (dr.diagnostic.empty() && !r.lastError.empty()) dr.diagnostic = "x-subrelay; " + r.lastError;
      in.recipients.push_back(std::move(dr));
    }
    queue::NewMessage dsn;
    dsn.id = queue::newQueueId();
    dsn.account = m.account;
    dsn.mailFrom = "";
    dsn.recipients = {m.mailFrom};
    dsn.content = delivery::buildDsn(in);
    dsn.isDsn = true;
    dsn.eightBit = std::any_of(dsn.content.begin(), dsn.content.end(),
                               [](char c) { return static_cast<unsigned char>(c) >= 0x80; });
    dsn.smtputf8 = std::any_of(m.mailFrom.begin(), m.mailFrom.end(), [](char c) { return static_cast<unsigned char>(c) >= 0x80; });
    dsn.receivedAt = in.now;
    return dsn;
  };
  auto indexes = [](const queue::DsnWork& w) {
    std::vector<int64_t> out;
    for (const auto& r : w.message.recipients) out.push_back(r.index);
    return out;
  };
  if (auto work = store->pendingDsns(50); work.ok()) {
    for (const auto& w : work.value()) {
      auto dsn = makeDsn(w, delivery::DsnAction::Failed);
      if (auto r = store->completeDsn(w.message.id, indexes(w), dsn); !r.ok()) {
        util::logError("delivery", "cannot queue the DSN for id=" + w.message.id + ": " + r.error().message);
        continue;
      }
      if (dsn)
        util::logInfo("delivery", "bounced id=" + w.message.id + " dsn=" + dsn->id + " to=<" +
                                      util::sanitizeForLog(w.message.mailFrom, 200) + "> rcpts=" +
                                      std::to_string(w.message.recipients.size()));
      else
        util::logInfo("delivery", "failed id=" + w.message.id + " (no DSN: null sender or a DSN itself)");
    }
  }
  if (settings.retry.delayNotice.count() > 0) {
    if (auto work = store->pendingDelayNotices(nowUnix() - settings.retry.delayNotice.count(), 50); work.ok()) {
      for (const auto& w : work.value()) {
        auto dsn = makeDsn(w, delivery::DsnAction::Delayed);
        if (store->completeDelayNotice(w.message.id, indexes(w), dsn).ok() && dsn)
          util::logInfo("delivery", "delay notice id=" + w.message.id + " dsn=" + dsn->id + " to=<" +
                                        util::sanitizeForLog(w.message.mailFrom, 200) + ">");
      }
    }
  }
}

void DeliveryService::Impl::finishStop() {
  uv_timer_stop(tick);
  for (auto* s : std::vector<OutboundSession*>(sessions.begin(), sessions.end())) s->drain();
  graceTimer = net::newHandle<uv_timer_t>();
  uv_timer_init(&loop, graceTimer);
  graceTimer->data = this;
  uv_timer_start(
      graceTimer,
      [](uv_timer_t* t) {
        auto* self = static_cast<Impl*>(t->data);
        if (self == nullptr) return;
        for (auto* s : std::vector<OutboundSession*>(self->sessions.begin(), self->sessions.end())) s->forceClose();
      },
      static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(grace).count()), 0);
  maybeEndLoop();
}

void DeliveryService::Impl::maybeEndLoop() {
  if (!sessions.empty()) return;
  flush();
  // Jobs never attempted: give their recipients back at once (no attempt counted).
  for (auto& [domain, jobs] : queued)
    for (auto& j : jobs) {
      std::vector<int64_t> idx;
      for (const auto& r : j.rcpts) idx.push_back(r.index);
      (void)store->releaseLeases(j.meta->due.id, idx);
    }
  queued.clear();
  queuedJobs = 0;
  resolver.reset();  // closes its handles
  routes.reset();
  pruneTimer.reset();  // retention (maybePrune)
  for (uv_timer_t** t : {&tick, &flushTimer, &graceTimer, &refillTimer}) {
    if (*t) {
      (*t)->data = nullptr;
      net::closeHandle(*t);
      *t = nullptr;
    }
  }
  std::lock_guard lk(mu);  // notify() reads `async` under the same lock
  if (async) {
    async->data = nullptr;
    net::closeHandle(async);
    async = nullptr;
  }
}

// ---------------------------------------------------------------------------------------
DeliveryService::DeliveryService(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

DeliveryService::~DeliveryService() {
  if (impl_->thread.joinable()) stop(std::chrono::seconds(0));
  // Only a started service has a loop (serve may fail between create() and start(), e.g.
  // on a port in use).
  if (impl_->loopStarted) uv_loop_close(&impl_->loop);
}

util::Result<std::unique_ptr<DeliveryService>> DeliveryService::create(const config::Config& cfg,
                                                                       const std::string& dbPath) {
  auto impl = std::make_unique<Impl>();
  auto st = queue::SqliteStore::open(dbPath);
  if (!st.ok()) return st.error();
  impl->store = std::move(st.value());
  // One serve per data_dir (server.cpp holds the lock): leases left by a previous process
  // are void, so what it was delivering when it died is due again now.
  if (auto r = impl->store->clearLeases(); !r.ok()) return r.error();
  auto servers = dns::chooseServers(cfg.delivery.resolvers);
  if (!servers.ok()) return util::makeError("delivery.resolvers: " + servers.error().message);
  impl->servers = servers.value();
  tls::ClientOptions plain;
  auto pc = tls::TlsContext::client(plain);
  if (!pc.ok()) return util::makeError("TLS client context: " + pc.error().message);
  impl->plainCtx = pc.value();
  tls::ClientOptions verify;
  verify.verifyPeer = true;
  verify.caFile = cfg.delivery.tlsCaFile;
  auto vc = tls::TlsContext::client(verify);
  if (!vc.ok()) return util::makeError("TLS client context (verify): " + vc.error().message);
  impl->verifyCtx = vc.value();
  impl->settings = settingsFrom(cfg);
  return std::unique_ptr<DeliveryService>(new DeliveryService(std::move(impl)));
}

void DeliveryService::start() {
  Impl& d = *impl_;
  uv_loop_init(&d.loop);
  d.loopStarted = true;
  d.async = net::newHandle<uv_async_t>();
  uv_async_init(&d.loop, d.async, [](uv_async_t* a) {
    auto* self = static_cast<Impl*>(a->data);
    if (self) self->onAsync();
  });
  d.async->data = &d;
  d.tick = net::newHandle<uv_timer_t>();
  uv_timer_init(&d.loop, d.tick);
  d.tick->data = &d;
  d.flushTimer = net::newHandle<uv_timer_t>();
  uv_timer_init(&d.loop, d.flushTimer);
  d.flushTimer->data = &d;
  d.refillTimer = net::newHandle<uv_timer_t>();
  uv_timer_init(&d.loop, d.refillTimer);
  d.refillTimer->data = &d;
  d.resolver = std::make_unique<dns::UvResolver>(&d.loop, d.servers, d.clock);
  std::random_device rd;
  d.routes = std::make_unique<delivery::RouteResolver>(*d.resolver, (static_cast<uint64_t>(rd()) << 32) | rd());
  uv_timer_start(
      d.tick,
      [](uv_timer_t* t) {
        auto* self = static_cast<Impl*>(t->data);
        if (self) self->onTick();
      },
      0, 1000);
  d.thread = std::thread([&d] { d.run(); });
}

void DeliveryService::notify() {
  std::lock_guard lk(impl_->mu);
  if (impl_->stopRequested || impl_->async == nullptr) return;
  impl_->wake = true;
  uv_async_send(impl_->async);
}

void DeliveryService::reconfigure(const config::Config& cfg) {
  std::lock_guard lk(impl_->mu);
  if (impl_->stopRequested || impl_->async == nullptr) return;
  impl_->pendingSettings = settingsFrom(cfg);
  uv_async_send(impl_->async);
}

void DeliveryService::stop(std::chrono::seconds grace) {
  {
    std::lock_guard lk(impl_->mu);
    if (!impl_->thread.joinable()) return;
    if (!impl_->stopRequested) {
      impl_->stopRequested = true;
      impl_->grace = grace;
      if (impl_->async) uv_async_send(impl_->async);
    }
  }
  impl_->thread.join();
}

}  // namespace subrelay::app
