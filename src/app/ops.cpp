#include "app/ops.h"

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>

#include "app/runtime.h"
#include "metrics/server_metrics.h"
#include "subrelay_build_config.h"
#include "util/clock.h"
#include "util/file.h"
#include "util/log.h"
#include "util/time_fmt.h"

namespace subrelay::app {

namespace {
int64_t nowSeconds() { return util::unixSeconds(std::chrono::system_clock::now()); }

}  // namespace

Operations::Operations(Runtime& rt, std::string dbPath, std::string dataDir)
    : rt_(rt), dbPath_(std::move(dbPath)), dataDir_(std::move(dataDir)) {}

Operations::~Operations() = default;

void Operations::setListeners(std::vector<std::pair<std::string, std::string>> listeners) {
  snapshot_.listeners = std::move(listeners);
  tick();
}

util::Result<void> Operations::start(const config::Config& cfg) {
  auto& m = metrics::server();
  m.buildInfo.with(SUBRELAY_VERSION, SUBRELAY_TLS_BACKEND).set(1);
  m.startTime.get().set(static_cast<double>(nowSeconds()));
  m.registry.onCollect([this, &m] { m.connectionsOpen.get().set(rt_.connections()); });

  auto st = queue::SqliteStore::open(dbPath_);
  if (!st.ok()) return st.error();
  store_ = std::move(st.value());

  snapshot_.pid = ::getpid();
  snapshot_.version = SUBRELAY_VERSION;
  snapshot_.startedAt = nowSeconds();
  if (!cfg.metrics.address.empty()) {
    metrics::Endpoints ep;
    ep.metrics = [&m](metrics::Format f) { return m.registry.render(f); };
    ep.notReady = [this] { return notReady(); };
    auto ex = metrics::HttpExporter::start(cfg.metrics.host, cfg.metrics.port, std::move(ep));
    if (!ex.ok()) return ex.error();
    exporter_ = std::move(ex.value());
    snapshot_.metricsAddress = cfg.metrics.address;
    if (!config::isLoopbackHost(cfg.metrics.host))
      util::logWarn("serve", "metrics on " + cfg.metrics.address +
                                 " can be read from the network (account names, volumes); "
                                 "firewall it or use a loopback address");
    util::logInfo("serve", "metrics on http://" + cfg.metrics.address + "/metrics (/healthz, /readyz)");
  }
  return {};
}

std::string Operations::notReady() const {
  if (!ready_.load()) return "starting or stopping";
  if (!queueOk_.load()) return "the queue database cannot be read";
  if (!rt_.storageAvailable()) return "data_dir is out of space (new mail is refused with 452 4.3.1)";
  if (::access(dbPath_.c_str(), W_OK) != 0) return "the queue database is not writable";
  return "";
}

void Operations::reloaded(bool ok) { metrics::server().configReloads.with(ok ? "ok" : "refused").inc(); }

void Operations::tick() {
  auto& m = metrics::server();
  const int64_t now = nowSeconds();
  if (store_) {
    auto q = store_->queueStats();
    queueOk_.store(q.ok());
    if (q.ok()) {
      m.queueRecipients.with("queued").set(static_cast<double>(q->queued));
      m.queueRecipients.with("deferred").set(static_cast<double>(q->deferred));
      m.queueRecipients.with("in_flight").set(static_cast<double>(q->inFlight));
      m.queueOldestAge.get().set(q->oldestReceivedAt ? static_cast<double>(now - q->oldestReceivedAt) : 0.0);
    }
  }
  if (store_) {
    // `queue drop` from the command line: logged here, where the other events of the
    // message are.
    if (auto evs = store_->takeOperatorEvents(100); evs.ok()) {
      for (const auto& e : evs.value())
        util::LogEvent(util::LogLevel::Info, "queue", e.event)
            .queueId(e.messageId)
            .field("by", "operator")
            .number("rcpts", static_cast<long long>(e.recipients))
            .field("at", util::isoUtc(e.at))
            .account(e.account)
            .emit();
    }
  }
  metrics::RecentCounts::Totals t;
  m.messagesAccepted.forEach([&](const std::vector<std::string>& labels, const metrics::Counter& c) {
    t.accepted += c.value();
    if (!labels.empty()) t.perAccount[labels[0]] += c.value();
  });
  m.deliveryAttempts.forEach([&](const std::vector<std::string>& labels, const metrics::Counter& c) {
    if (!labels.empty() && labels[0] == "delivered") t.delivered += c.value();
  });
  recent_.sample(std::chrono::duration_cast<std::chrono::milliseconds>(
                     std::chrono::system_clock::now().time_since_epoch())
                     .count(),
                 std::move(t));
  snapshot_.updatedAt = now;
  snapshot_.sessions = rt_.connections();
  snapshot_.deliveryConnections = static_cast<uint64_t>(m.deliveryConnections.get().value());
  metrics::fillCounts(snapshot_, recent_);
  util::replaceFile((std::filesystem::path(dataDir_) / "status").string(), metrics::serialize(snapshot_), 0600, false);
}

void Operations::stop() {
  ready_.store(false);
  exporter_.reset();
  std::error_code ec;
  std::filesystem::remove(std::filesystem::path(dataDir_) / "status", ec);
}

}  // namespace subrelay::app
