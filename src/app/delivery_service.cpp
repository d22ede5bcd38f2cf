// DeliveryService (delivery_service.h): wires delivery::Scheduler to libuv, TLS, DNS and
// the queue. Every decision is the scheduler's (delivery/scheduler.h); this file carries
// out its requests and reports what happened.
#include "app/delivery_service.h"
#include "app/delivery_settings.h"
#include "app/webhook_settings.h"

#include <map>
#include <mutex>
#include <optional>
#include <random>

#include "delivery/attempt.h"
#include "delivery/mta_sts_fetcher.h"
#include "delivery/routing.h"
#include "delivery/scheduler.h"
#include "delivery/tls_policy.h"
#include "delivery/tls_rpt_reporter.h"
#include "app/dkim_cmd.h"
#include "dns/resolv_conf.h"
#include "dns/uv_resolver.h"
#include "metrics/server_metrics.h"
#include "net/connection.h"
#include "net/listener.h"
#include "net/uv_handle.h"
#include "net/uv_loop.h"
#include "net/uv_timer.h"
#include "queue/pruner.h"
#include "queue/sqlite_store.h"
#include "queue/write_behind.h"
#include "smtp/client_session.h"
#include "tls/tls_context.h"
#include "util/clock.h"
#include "util/log.h"
#include "util/strings.h"

namespace subrelay::app {

namespace {

constexpr auto kTickInterval = std::chrono::milliseconds(1000);
constexpr auto kFlushInterval = std::chrono::milliseconds(20);
// serve's settings: the shared conversion plus the TLS-RPT reporter (its DKIM keys).
DeliverySettings settingsFrom(const config::Config& cfg) {
  DeliverySettings s = deliverySettingsFrom(cfg);
  addTlsRptReporter(cfg, s);
  return s;
}

using Settings = DeliverySettings;

}  // namespace

class OutboundConnection;

struct DeliveryService::Impl final : delivery::Transport {
  // --- set up before the thread starts ---
  std::unique_ptr<queue::SqliteStore> store;
  std::unique_ptr<queue::SqliteStore> writeStore;  // the write-behind thread's connection
  std::shared_ptr<tls::TlsContext> plainCtx;   // no verification (opportunistic, required)
  std::shared_ptr<tls::TlsContext> verifyCtx;  // chain + host name (verify)
  std::vector<dns::ServerAddress> servers;
  util::SystemClock clock;

  // --- cross-thread (under mu); the loop thread is reached only through lt.post() ---
  std::mutex mu;
  std::optional<Settings> pendingSettings;
  std::optional<webhook::DispatcherSettings> pendingWebhooks;
  webhook::DispatcherSettings webhookSettings;  // until start()
  bool wake = false;          // a wake-up is posted and has not run yet
  bool started = false;
  bool stopRequested = false;
  std::chrono::seconds grace{30};
  net::LoopThread lt;
  util::Heartbeat heartbeat;  // stamped on the loop thread, read by serve's main thread

  // --- loop thread only ---
  std::unique_ptr<net::Timer> tick, flushTimer, graceTimer, refillTimer, pruneTimer, heartbeatTimer;
  Settings settings;
  std::unique_ptr<dns::UvResolver> resolver;
  std::unique_ptr<delivery::RouteResolver> routes;
  std::unique_ptr<queue::WriteBehindQueue> queue;  // results committed off the loop
  std::unique_ptr<delivery::Scheduler> scheduler;
  std::unique_ptr<queue::Pruner> pruner;
  std::map<delivery::SessionId, std::unique_ptr<OutboundConnection>> connections;
  std::unique_ptr<delivery::mtasts::SqlitePolicyStore> stsStore;
  std::unique_ptr<delivery::mtasts::HttpsPolicyGetter> stsGetter;
  std::unique_ptr<delivery::mtasts::StsFetcher> sts;
  // delivery.tls_rpt: made at start when configured then (or at the first SIGHUP that
  // turns it on).
  std::unique_ptr<delivery::tlsrpt::DailyReports> tlsRpt;
  void tlsRptTick();
  // The webhook outbox's dispatcher (webhook/dispatcher.h): always made (an account may get
  // a webhook at the next SIGHUP); it only reads the outbox, which is empty without one.
  std::unique_ptr<webhook::Dispatcher> webhooks;
  std::unique_ptr<net::Timer> webhooksDrained;  // shutdown: the last POST ended, look again
  // MTA-STS fetcher per delivery.mta_sts: made when it is on (at start or by a SIGHUP),
  // remade when the CA file or the port changes, dropped when it is turned off.
  void updateSts();
  delivery::mtasts::HttpsGetterSettings stsMadeWith;
  // lookupTlsPolicy() in flight, by domain: the answers so far and the budget's timer.
  struct PolicyLookup {
    delivery::TlsPolicyInputs inputs;
    size_t outstanding = 0;
    bool done = false;
    std::unique_ptr<net::Timer> budget;
  };
  std::map<std::string, std::shared_ptr<PolicyLookup>> policyLookups;
  bool stopping = false;

  void onPosted();
  void afterEvent();
  void finishStop();
  void prune();
  void maybeEndLoop();
  // OutboundConnection is gone: tells the scheduler (after this, `c` is deleted).
  void connectionEnded(delivery::SessionId id, std::optional<delivery::SessionFailure> failure);

  // --- delivery::Transport ---
  void resolve(const std::string& domain) override;
  void resolveRelay(const std::string& key, const std::vector<std::string>& hosts) override;
  void lookupTlsPolicy(const std::string& domain, const delivery::Route& route) override;
  void finishPolicyLookup(const std::string& domain, const std::shared_ptr<PolicyLookup>& p);
  void recheckStsPolicy(const std::string& domain) override;
  void connect(const delivery::ConnectRequest& request) override;
  void send(delivery::SessionId id, smtp::OutboundMessage message) override;
  void quit(delivery::SessionId id) override;
  void abort(delivery::SessionId id, const std::string& why) override;
  void flushSoon() override;
};

// ---------------------------------------------------------------------------------------
// OutboundConnection: one TCP connection for one scheduler session: net::Connection for
// the bytes and TLS, smtp::ClientSession for the protocol, one timer for the deadline
// delivery::AttemptClock decides, the failure texts from delivery/attempt.h.
// ---------------------------------------------------------------------------------------
class OutboundConnection final : public net::ConnectionHandler {
 public:
  OutboundConnection(DeliveryService::Impl& svc, const delivery::ConnectRequest& req)
      : svc_(svc), req_(req), timer_(svc.lt.loop()), soon_(svc.lt.loop()) {
    smtp::ClientConfig cc;
    cc.heloName = svc.settings.scheduler.hostname;
    cc.tls = req.implicitTls                                 ? smtp::ClientTls::Implicit
             : req.tls == delivery::TlsPolicy::Opportunistic ? smtp::ClientTls::Opportunistic
                                                             : smtp::ClientTls::Required;
    // Credentials go only to a relay whose certificate is verified (the config refuses
    // username without verify; this is the second lock).
    if (req.tls == delivery::TlsPolicy::Verify) cc.auth = req.auth;
    session_ = std::make_unique<smtp::ClientSession>(cc, svc.settings.timeouts);
    conn_ = std::make_unique<net::Connection>(svc.lt.loop(), this);
  }

  void start() {
    // delivery.timeouts.connect (30 s, as Postfix's smtp_connect_timeout) keeps a dead MX
    // from holding a slot for long.
    const auto now = svc_.clock.now();
    clock_.connecting(now, std::chrono::duration_cast<std::chrono::milliseconds>(svc_.settings.connectTimeout));
    armTimer(now);
    conn_->connect(req_.ip, req_.port);
  }

  // Scheduler requests. Their effects on the session are handled on the next loop turn,
  // never inside the scheduler's call (scheduler.h: no re-entrancy).
  void send(smtp::OutboundMessage m) {
    session_->send(std::move(m));
    pumpSoon();
  }
  void quit() {
    if (session_->closed()) return;
    session_->quit();
    pumpSoon();
  }
  void abort(const std::string& why) { fail(why); }

  // --- net::ConnectionHandler ---
  void onConnected(int status) override {
    if (status != 0) {
      fail(delivery::connectionEndText(delivery::ConnectionEnd::ConnectError, req_.label(), net::errorText(status)));
      return;
    }
    if (req_.implicitTls) {
      // RFC 8314 3.3: TLS from the first byte; the greeting comes inside it. The connect
      // deadline keeps bounding the handshake until the session starts.
      conn_->startTlsClient(tlsContext(), req_.host);
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
    if (req_.implicitTls && !implicitUp_) {
      implicitUp_ = true;
      session_->onConnected();
    } else {
      session_->onTlsEstablished();
    }
    pump();
  }
  void onTlsFailed(std::string_view why) override {
    std::string detail(why);
    // RFC 7672 2.2: a DANE mismatch fails the handshake; the next MX or a later retry.
    if (conn_->tls() && !conn_->tls()->peerVerifyError().empty())
      detail = "certificate: " + conn_->tls()->peerVerifyError();
    if (req_.implicitTls && !implicitUp_) {
      // No session yet (it waits for the greeting inside TLS): fail the connection.
      failure_ = delivery::localFailure("TLS handshake with " + req_.label() + " failed: " + detail, "4.7.5");
      fail(failure_->text);
      return;
    }
    session_->onTlsFailed(detail);
    pump();
  }
  void onIdleTimeout() override {}
  void onPeerClosed() override {
    if (!session_->closed()) {
      session_->onConnectionLost(delivery::connectionEndText(delivery::ConnectionEnd::PeerClosed, req_.label()));
      pump();
    }
  }
  void onClosed() override {
    timer_.stop();
    soon_.stop();
    if (!session_->closed()) {
      session_->onConnectionLost(failure_ ? failure_->text
                                          : delivery::connectionEndText(delivery::ConnectionEnd::Closed, req_.label()));
      pumpActions();  // results only; nothing can be written any more
    }
    auto& svc = svc_;
    const delivery::SessionId id = req_.id;
    auto failure = failure_;
    svc.connectionEnded(id, std::move(failure));  // deletes this
  }

 private:
  // A local reason to end the connection (timeout, connect error, abort).
  void fail(std::string why) {
    if (!failure_) failure_ = delivery::localFailure(std::move(why));
    if (!session_->closed()) {
      session_->onConnectionLost(failure_->text);
      pumpActions();
    }
    if (!conn_->closing()) conn_->close();
  }

  void pumpSoon() {
    soon_.start(std::chrono::milliseconds(0), [this] { pump(); });
  }

  void pump() {
    pumpActions();
    if (conn_->closing() || session_->closed()) return;
    const auto now = svc_.clock.now();
    std::optional<std::chrono::milliseconds> stage;
    if (auto t = session_->timeout()) stage = std::chrono::duration_cast<std::chrono::milliseconds>(*t);
    if (clock_.update(now, stage, session_->progress())) armTimer(now);
  }

  // The one timer follows the clock's deadline.
  void armTimer(delivery::AttemptClock::Time now) {
    if (!clock_.deadline()) {
      timer_.stop();
      return;
    }
    timer_.start(clock_.remaining(now), [this] { onDeadline(); });
  }

  void onDeadline() {
    if (!clock_.deadline()) return;
    if (clock_.deadline()->kind == delivery::AttemptClock::Kind::Connect) {
      fail(delivery::connectionEndText(delivery::ConnectionEnd::ConnectTimeout, req_.label()));
      return;
    }
    session_->onTimeout();
    pumpActions();
    if (!conn_->closing()) conn_->close();
  }

  void pumpActions() {
    for (;;) {
      auto actions = session_->takeActions();
      if (actions.empty()) return;
      for (auto& a : actions) {
        if (auto* sb = std::get_if<smtp::SendBytes>(&a)) {
          if (!conn_->closing()) conn_->write(sb->bytes);
        } else if (std::holds_alternative<smtp::StartTls>(a)) {
          if (!conn_->closing())
            conn_->startTlsClient(tlsContext(), req_.host, req_.dane);
        } else if (std::holds_alternative<smtp::CloseConnection>(a)) {
          if (!conn_->closing()) conn_->closeAfterWrite();
        } else if (std::holds_alternative<smtp::SessionReady>(a)) {
          svc_.scheduler->onReady(req_.id, tlsVersion_, tlsCipher_);
        } else if (auto* td = std::get_if<smtp::TransactionDone>(&a)) {
          svc_.scheduler->onTransactionDone(req_.id, td->results, !session_->closed() && !conn_->closing());
        } else if (auto* sf = std::get_if<smtp::SessionFailed>(&a)) {
          if (!failure_) failure_ = delivery::sessionFailure(*sf, req_.label());
        }
      }
    }
  }

  const std::shared_ptr<tls::TlsContext>& tlsContext() const {
    return req_.tls == delivery::TlsPolicy::Verify ? svc_.verifyCtx : svc_.plainCtx;
  }

  DeliveryService::Impl& svc_;
  delivery::ConnectRequest req_;
  bool implicitUp_ = false;  // implicit TLS: the handshake finished, the session started
  delivery::AttemptClock clock_;  // which deadline applies, and when
  net::Timer timer_;  // fires at clock_'s deadline: connect, then the stage's
  net::Timer soon_;   // runs pump() on the next loop turn
  std::unique_ptr<net::Connection> conn_;
  std::unique_ptr<smtp::ClientSession> session_;
  std::string tlsVersion_, tlsCipher_;
  std::optional<delivery::SessionFailure> failure_;
};

// ---------------------------------------------------------------------------------------
// Transport
// ---------------------------------------------------------------------------------------
void DeliveryService::Impl::resolve(const std::string& domain) {
  routes->resolve(domain, [this, domain](delivery::Route route) {
    scheduler->onRoute(domain, std::move(route));
    afterEvent();
  });
}

void DeliveryService::Impl::resolveRelay(const std::string& key, const std::vector<std::string>& hosts) {
  routes->resolveHosts(hosts, [this, key](delivery::Route route) {
    scheduler->onRoute(key, std::move(route));
    afterEvent();
  });
}

// RFC 7672 2.2.1-2.2.2: TLSA records at "_25._tcp.<host>" for the MX hosts whose MX and
// address records were secure (only delivery.dnssec trusts the AD bit); RFC 8461 5.1: the
// domain's MTA-STS policy (delivery.mta_sts). Every lookup runs at once; the scheduler hears
// once, when all have answered or the budget ran out.
void DeliveryService::Impl::lookupTlsPolicy(const std::string& domain, const delivery::Route& route) {
  auto p = std::make_shared<PolicyLookup>();
  policyLookups[domain] = p;
  const std::vector<std::string> tlsaHosts = delivery::tlsaHosts(route);
  const bool withSts = settings.mtaSts && sts != nullptr;
  p->outstanding = tlsaHosts.size() + (withSts ? 1 : 0);
  // Placeholders: a lookup that does not answer within the budget is a lookup error for
  // DANE (the host is not used) and no policy for MTA-STS.
  for (const auto& h : tlsaHosts) {
    delivery::TlsaLookup t;
    t.host = h;
    t.status = dns::Status::Timeout;
    p->inputs.tlsa.push_back(std::move(t));
  }
  p->budget = std::make_unique<net::Timer>(lt.loop());
  p->budget->start(std::chrono::duration_cast<std::chrono::milliseconds>(kTlsPolicyBudget), [this, domain, p] {
    util::logInfo("delivery", "tls-policy domain=" + domain + " result=budget-exceeded pending=" +
                                  std::to_string(p->outstanding));
    finishPolicyLookup(domain, p);
  });
  // Even with nothing to look up, the answer comes from the loop, never inside this call.
  if (p->outstanding == 0) {
    p->budget->start(std::chrono::milliseconds(0), [this, domain, p] { finishPolicyLookup(domain, p); });
    return;
  }
  for (size_t i = 0; i < tlsaHosts.size(); ++i) {
    resolver->query("_25._tcp." + tlsaHosts[i], dns::QType::TLSA, [this, domain, p, i](const dns::Answer& a) {
      if (p->done) return;
      delivery::TlsaLookup& t = p->inputs.tlsa[i];
      t.status = a.status;
      t.authenticated = a.authenticated;
      t.records = a.tlsa;
      if (--p->outstanding == 0) finishPolicyLookup(domain, p);
    });
  }
  if (withSts) {
    sts->policyFor(domain, [this, domain, p](const delivery::mtasts::PolicyAnswer& a) {
      if (p->done) return;
      metrics::server().mtaStsAnswers.with(a.source).inc();
      if (!a.detail.empty())
        util::logInfo("delivery", "mta-sts domain=" + domain + " source=" + a.source + " detail=\"" +
                                      util::sanitizeForLog(a.detail) + "\"");
      p->inputs.sts = a.policy;
      if (--p->outstanding == 0) finishPolicyLookup(domain, p);
    });
  }
}

void DeliveryService::Impl::finishPolicyLookup(const std::string& domain, const std::shared_ptr<PolicyLookup>& p) {
  if (p->done) return;
  p->done = true;
  if (auto it = policyLookups.find(domain); it != policyLookups.end() && it->second == p) policyLookups.erase(it);
  p->budget.reset();  // safe inside its own callback (net::Timer runs a copy)
  if (!scheduler) return;
  scheduler->onTlsPolicy(domain, p->inputs);
  afterEvent();
}

void DeliveryService::Impl::recheckStsPolicy(const std::string& domain) {
  if (!sts || !settings.mtaSts) return;
  sts->recheck(domain, [domain](const delivery::mtasts::PolicyAnswer& a) {
    util::logInfo("delivery", "mta-sts recheck domain=" + domain + " source=" + a.source +
                                  (a.policy ? " id=" + a.policy->id : std::string(" policy=none")));
  });
}

void DeliveryService::Impl::connect(const delivery::ConnectRequest& request) {
  auto c = std::make_unique<OutboundConnection>(*this, request);
  OutboundConnection* raw = c.get();
  connections[request.id] = std::move(c);
  raw->start();
}

void DeliveryService::Impl::send(delivery::SessionId id, smtp::OutboundMessage message) {
  if (auto it = connections.find(id); it != connections.end()) it->second->send(std::move(message));
}

void DeliveryService::Impl::quit(delivery::SessionId id) {
  if (auto it = connections.find(id); it != connections.end()) it->second->quit();
}

void DeliveryService::Impl::abort(delivery::SessionId id, const std::string& why) {
  if (auto it = connections.find(id); it != connections.end()) it->second->abort(why);
}

void DeliveryService::Impl::flushSoon() {
  if (!flushTimer->active()) flushTimer->start(kFlushInterval, [this] { scheduler->flush(); });
}

void DeliveryService::Impl::connectionEnded(delivery::SessionId id, std::optional<delivery::SessionFailure> failure) {
  // The connection object is deleted only after the scheduler heard of it (it may ask for
  // a new connection with the same session id at once).
  std::unique_ptr<OutboundConnection> gone;
  if (auto it = connections.find(id); it != connections.end()) {
    gone = std::move(it->second);
    connections.erase(it);
  }
  scheduler->onSessionEnded(id, std::move(failure));
  afterEvent();
  // `gone` (the caller) is deleted here, as its last act.
}

// After any event: a backlog is leased ahead of running dry instead of waiting for the
// tick (which alone would cap delivery at one batch per second); at shutdown, the end.
void DeliveryService::Impl::afterEvent() {
  if (stopping) {
    maybeEndLoop();
    return;
  }
  if (scheduler->refillWanted() && !refillTimer->active())
    refillTimer->start(std::chrono::milliseconds(0), [this] {
      scheduler->refill();
      afterEvent();
    });
}

// ---------------------------------------------------------------------------------------
// The service thread
// ---------------------------------------------------------------------------------------
void DeliveryService::Impl::onPosted() {
  if (!scheduler) return;  // the service already ended (a post queued behind its end)
  bool doWake = false, doStop = false;
  std::optional<Settings> fresh;
  {
    std::lock_guard lk(mu);
    doWake = wake;
    wake = false;
    doStop = stopRequested && !stopping;
    fresh = std::move(pendingSettings);
    pendingSettings.reset();
    if (pendingWebhooks && webhooks) webhooks->reconfigure(std::move(*pendingWebhooks));
    pendingWebhooks.reset();
  }
  if (fresh) {
    settings = std::move(*fresh);
    scheduler->reconfigure(settings.scheduler);
    if (tlsRpt && settings.tlsRpt) tlsRpt->reconfigure(*settings.tlsRpt, settings.tlsRptMaxDelay);
    updateSts();
  }
  if (doStop) {
    stopping = true;
    finishStop();
    return;
  }
  if (doWake && !stopping) {
    scheduler->wake();
    afterEvent();
  }
}

// Retention: one small batch, then the pacer says when the next one runs.
void DeliveryService::Impl::prune() {
  if (stopping) return;
  pruneTimer->start(pruner->run(settings.retention), [this] { prune(); });
}

void DeliveryService::Impl::updateSts() {
  const auto& want = settings.stsGetter;
  const bool same = sts && stsMadeWith.caFile == want.caFile && stsMadeWith.port == want.port;
  if (!settings.mtaSts || !same) {
    // Answers not yet given are dropped; their lookups end at the policy budget.
    sts.reset();
    stsGetter.reset();
    stsStore.reset();
  }
  if (settings.mtaSts && !sts) {
    stsStore = std::make_unique<delivery::mtasts::SqlitePolicyStore>(*store);
    stsGetter = std::make_unique<delivery::mtasts::HttpsPolicyGetter>(lt.loop(), want);
    sts = std::make_unique<delivery::mtasts::StsFetcher>(lt.loop(), *resolver, *stsGetter, clock,
                                                         delivery::mtasts::Settings{}, stsStore.get());
    stsMadeWith = want;
  }
  if (sts) sts->setDestinationPolicy(settings.scheduler.destinations);
}

void DeliveryService::Impl::tlsRptTick() {
  const int64_t now = util::unixSeconds(clock.wallNow());
  if (settings.tlsRpt && !tlsRpt) {
    std::random_device rd;
    tlsRpt = std::make_unique<delivery::tlsrpt::DailyReports>(*store, *resolver, *settings.tlsRpt,
                                                              settings.tlsRptMaxDelay, rd(), now);
  }
  if (tlsRpt && !settings.tlsRpt) {
    // SIGHUP turned delivery.tls_rpt off: keep what was counted, make no more reports.
    tlsRpt->flush(scheduler->takeTlsRpt());
    tlsRpt.reset();
  }
  if (tlsRpt) tlsRpt->tick(now, scheduler->takeTlsRpt());
}

void DeliveryService::Impl::finishStop() {
  tick->stop();
  pruneTimer->stop();
  scheduler->stop();
  // Sessions with work in hand finish it and quit; after the grace period they are cut.
  if (webhooks) webhooks->stop();  // POSTs in flight may finish within the grace period
  graceTimer->start(std::chrono::duration_cast<std::chrono::milliseconds>(grace), [this] {
    scheduler->abortAll("shutting down");
    if (webhooks) {
      webhooks->abort();  // their claims are cleared at the next start
      maybeEndLoop();
    }
  });
  maybeEndLoop();
}

void DeliveryService::Impl::maybeEndLoop() {
  if (!scheduler || !scheduler->drained() || !connections.empty()) return;
  if (webhooks && !webhooks->drained()) return;
  webhooks.reset();  // before the resolver it uses
  webhooksDrained.reset();
  scheduler->finish();
  if (tlsRpt) {
    tlsRpt->flush(scheduler->takeTlsRpt());
    tlsRpt.reset();  // before the resolver it uses
  }
  scheduler.reset();
  queue.reset();  // waits for the results handed to the writer
  for (auto& [domain, p] : policyLookups) {
    p->done = true;
    p->budget.reset();
  }
  policyLookups.clear();
  sts.reset();  // before the resolver and the getter it uses
  stsGetter.reset();
  stsStore.reset();
  resolver.reset();  // closes its handles
  routes.reset();
  tick.reset();
  flushTimer.reset();
  graceTimer.reset();
  refillTimer.reset();
  pruneTimer.reset();
  heartbeatTimer.reset();
  pruner.reset();
  lt.stop();  // the loop ends once the handles above have closed
}

// ---------------------------------------------------------------------------------------
DeliveryService::DeliveryService(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

DeliveryService::~DeliveryService() { stop(std::chrono::seconds(0)); }

util::Result<std::unique_ptr<DeliveryService>> DeliveryService::create(const config::Config& cfg,
                                                                       const std::string& dbPath) {
  auto impl = std::make_unique<Impl>();
  auto st = queue::SqliteStore::open(dbPath);
  if (!st.ok()) return st.error();
  impl->store = std::move(st.value());
  // Before clearLeases(): bounces waiting for a dead lease are bounced there, with events.
  impl->store->setWebhookEvents(webhookEventSets(cfg));
  // One serve per data_dir (server.cpp holds the lock): leases left by a previous process
  // are void, so what it was delivering when it died is due again now.
  if (auto r = impl->store->clearLeases(); !r.ok()) return r.error();
  auto ws = queue::SqliteStore::open(dbPath);
  if (!ws.ok()) return ws.error();
  impl->writeStore = std::move(ws.value());
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
  // Delivery results, lease releases (write-behind) and the loop's own connection all write
  // state changes: each says which events the accounts' webhooks want.
  impl->writeStore->setWebhookEvents(webhookEventSets(cfg));
  impl->webhookSettings = webhookDispatcherSettings(cfg);
  return std::unique_ptr<DeliveryService>(new DeliveryService(std::move(impl)));
}

void DeliveryService::start(std::chrono::milliseconds heartbeatEvery) {
  Impl& d = *impl_;
  uv_loop_t* loop = d.lt.loop();  // handles are made before the thread runs the loop
  d.heartbeatTimer = std::make_unique<net::Timer>(loop);
  d.heartbeat.stamp(util::steadyMs());
  d.heartbeatTimer->start(heartbeatEvery, [&d] { d.heartbeat.stamp(util::steadyMs()); }, heartbeatEvery);
  d.tick = std::make_unique<net::Timer>(loop);
  d.flushTimer = std::make_unique<net::Timer>(loop);
  d.graceTimer = std::make_unique<net::Timer>(loop);
  d.refillTimer = std::make_unique<net::Timer>(loop);
  d.pruneTimer = std::make_unique<net::Timer>(loop);
  d.pruner = std::make_unique<queue::Pruner>(*d.store, d.clock);
  d.resolver = std::make_unique<dns::UvResolver>(loop, d.servers, d.clock);
  std::random_device rd;
  const uint64_t seed = (static_cast<uint64_t>(rd()) << 32) | rd();
  d.routes = std::make_unique<delivery::RouteResolver>(*d.resolver, seed);
  d.updateSts();
  d.queue = std::make_unique<queue::WriteBehindQueue>(*d.store, *d.writeStore);
  d.scheduler = std::make_unique<delivery::Scheduler>(*d.queue, d, d.clock, d.settings.scheduler, seed ^ 0x9e3779b9u);
  d.tick->start(
      std::chrono::milliseconds(0),
      [&d] {
        d.scheduler->tick();
        d.tlsRptTick();
        d.afterEvent();
      },
      kTickInterval);
  d.pruneTimer->start(std::chrono::seconds(1), [&d] { d.prune(); });
  d.webhooks = std::make_unique<webhook::Dispatcher>(loop, *d.store, *d.resolver, d.clock, std::move(d.webhookSettings));
  d.webhooksDrained = std::make_unique<net::Timer>(loop);
  d.webhooks->onDrained([&d] {
    // Not from inside the dispatcher's callback: maybeEndLoop() destroys it.
    if (d.stopping) d.webhooksDrained->start(std::chrono::milliseconds(0), [&d] { d.maybeEndLoop(); });
  });
  d.webhooks->start();
  {
    std::lock_guard lk(d.mu);
    d.started = true;
  }
  d.lt.start();
}

const util::Heartbeat& DeliveryService::heartbeat() const { return impl_->heartbeat; }

void DeliveryService::notify() {
  Impl& d = *impl_;
  std::lock_guard lk(d.mu);
  // One wake-up posted at a time: a burst of commits costs one post.
  if (!d.started || d.stopRequested || d.wake) return;
  d.wake = true;
  d.lt.post([&d] { d.onPosted(); });
}

void DeliveryService::reconfigure(const config::Config& cfg) {
  Impl& d = *impl_;
  std::lock_guard lk(d.mu);
  if (!d.started || d.stopRequested) return;
  d.pendingSettings = settingsFrom(cfg);
  d.pendingWebhooks = webhookDispatcherSettings(cfg);
  // Thread-safe (each store takes its own lock): later state changes use the new sets.
  d.store->setWebhookEvents(webhookEventSets(cfg));
  d.writeStore->setWebhookEvents(webhookEventSets(cfg));
  d.lt.post([&d] { d.onPosted(); });
}

void DeliveryService::stop(std::chrono::seconds grace) {
  Impl& d = *impl_;
  {
    std::lock_guard lk(d.mu);
    if (!d.started) return;  // serve may fail between create() and start()
    if (!d.stopRequested) {
      d.stopRequested = true;
      d.grace = grace;
      d.lt.post([&d] { d.onPosted(); });
    }
  }
  d.lt.join();
}

}  // namespace subrelay::app
