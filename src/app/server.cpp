#include "app/server.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <thread>
#include <vector>

#include "app/dev_config.h"
#include "app/delivery_service.h"
#include "app/dkim_cmd.h"
#include "app/ops.h"
#include "app/suppression_sync.h"
#include "app/runtime.h"
#include "app/webhook_settings.h"
#include "app/worker.h"
#include "net/listener.h"
#include "queue/sqlite_store.h"
#include "util/log.h"
#include "util/watchdog.h"

namespace subrelay::app {

namespace {

// sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET.
void sdNotify(const char* state) {
  const char* path = std::getenv("NOTIFY_SOCKET");
  if (path == nullptr || path[0] == '\0') return;
  int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return;
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  size_t len = std::strlen(path);
  if (len >= sizeof(sa.sun_path)) {
    ::close(fd);
    return;
  }
  std::memcpy(sa.sun_path, path, len);
  if (sa.sun_path[0] == '@') sa.sun_path[0] = '\0';  // abstract socket
  ::sendto(fd, state, std::strlen(state), MSG_NOSIGNAL, reinterpret_cast<sockaddr*>(&sa),
           static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + len));
  ::close(fd);
}

std::string joinHostPort(const std::string& host, uint16_t port) {
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
  return host + ":" + std::to_string(port);
}

// Writes the rate windows and meters changed since the last call into the queue
// database through its own connection (WAL: no contention with the committer beyond the
// write lock for a moment).
class PolicyPersister {
 public:
  PolicyPersister(Runtime& rt, std::string dbPath) : rt_(rt), dbPath_(std::move(dbPath)) {}

  util::Result<void> restore() {
    auto st = queue::SqliteStore::open(dbPath_);
    if (!st.ok()) return st.error();
    store_ = std::move(st.value());
    auto windows = store_->loadRateWindows();
    if (!windows.ok()) return windows.error();
    std::vector<policy::WindowState> rows;
    for (const auto& w : windows.value()) rows.push_back({w.username, w.rule, w.windowStart, w.count});
    rt_.limits.restore(rows);
    // The meters in the database are totals; this process adds its own deltas.
    last_ = rt_.meter.snapshot();
    return {};
  }

  void flush() {
    if (!store_) return;
    auto changed = rt_.limits.drainChanged();
    if (!changed.empty()) {
      std::vector<queue::RateWindowRow> rows;
      for (const auto& w : changed) rows.push_back({w.username, w.key, w.windowStart, w.count});
      if (auto r = store_->saveRateWindows(rows); !r.ok())
        util::logError("serve", "cannot save rate-limit windows: " + r.error().message);
    }
    auto now = rt_.meter.snapshot();
    std::vector<queue::MeterRow> deltas;
    for (const auto& [user, c] : now) {
      policy::MeterCounts before;
      if (auto it = last_.find(user); it != last_.end()) before = it->second;
      queue::MeterRow d;
      d.username = user;
      d.accepted = c.accepted - before.accepted;
      d.refusedByLimit = c.refusedByLimit - before.refusedByLimit;
      d.recipients = c.recipients - before.recipients;
      d.bytes = c.bytes - before.bytes;
      d.authFailures = c.authFailures - before.authFailures;
      if (d.accepted || d.refusedByLimit || d.recipients || d.bytes || d.authFailures) deltas.push_back(d);
    }
    if (deltas.empty()) return;
    if (auto r = store_->addMeters(deltas, util::unixSeconds(std::chrono::system_clock::now())); !r.ok()) {
      util::logError("serve", "cannot save account meters: " + r.error().message);
      return;  // retried with the next flush: last_ stays where it was
    }
    last_ = std::move(now);
  }

 private:
  Runtime& rt_;
  std::string dbPath_;
  std::unique_ptr<queue::SqliteStore> store_;
  std::map<std::string, policy::MeterCounts> last_;
};

// SIGHUP: accounts, limits, keys and certificates from the file, all or nothing. A
// broken file is refused with its errors logged, and the running config stays.
// Listeners, data_dir and workers need a restart (they own sockets and files).
std::shared_ptr<const config::Config> reloadConfig(Runtime& rt, const std::string& path) {
  util::logInfo("serve", "SIGHUP: reloading " + path);
  auto lr = config::loadConfigFile(path);
  if (!lr.config) {
    for (const auto& line : lr.formatErrors()) util::logError("serve", "reload: " + line);
    util::logError("serve", "reload refused: the configuration above is invalid; still running the previous one");
    return nullptr;
  }
  std::vector<std::string> errors;
  auto fresh = buildSettings(*lr.config, false, errors);
  if (!fresh) {
    for (const auto& e : errors) util::logError("serve", "reload: " + e);
    util::logError("serve", "reload refused; still running the previous configuration");
    return nullptr;
  }
  auto old = rt.settings();
  const auto& oc = *old->config;
  const auto& nc = *fresh->config;
  bool listenersChanged = oc.listeners.size() != nc.listeners.size();
  for (size_t i = 0; !listenersChanged && i < nc.listeners.size(); ++i)
    listenersChanged = oc.listeners[i].address != nc.listeners[i].address || oc.listeners[i].tls != nc.listeners[i].tls;
  if (listenersChanged || oc.dataDir != nc.dataDir || oc.workers != nc.workers)
    util::logWarn("serve", "reload: listeners, data_dir and workers keep their running values until a restart");
  auto next = std::make_shared<Settings>(*fresh);
  next->generation = old->generation + 1;
  rt.install(next);
  util::setLogLevel(util::parseLogLevel(nc.log.level));
  util::logInfo("serve", "reload done: generation " + std::to_string(next->generation) + ", " +
                             std::to_string(nc.accounts.size()) + " accounts, " + std::to_string(nc.dkim.size()) +
                             " DKIM keys; sessions in progress keep the previous configuration");
  return next->config;
}

}  // namespace

int runServe(const ServeOptions& opts) {
  // Signals are taken synchronously by this thread (sigwait); block them before any
  // thread starts so every thread inherits the mask.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  ::signal(SIGPIPE, SIG_IGN);
  // Everything serve creates (data_dir, queue.db and its WAL, the dev certificate and
  // key, serve.lock) holds mail or secrets: private from the first byte, whatever umask
  // we were started with (not chmod-ed afterwards, which leaves a window).
  ::umask(::umask(0) | 077);

  config::Config cfg;
  bool dev = opts.dev;
  std::string devPassword;
  if (dev) {
    auto ds = makeDevSetup();
    if (!ds.ok()) {
      std::fprintf(stderr, "subrelay: %s\n", ds.error().message.c_str());
      return 1;
    }
    cfg = std::move(ds->config);
    devPassword = ds->password;
  } else {
    auto lr = config::loadConfigFile(opts.configPath);
    if (!lr.config) {
      for (const auto& line : lr.formatErrors()) std::fprintf(stderr, "%s\n", line.c_str());
      std::fprintf(stderr, "subrelay: invalid configuration; run `subrelay check-config -c %s` after fixing it\n",
                   opts.configPath.c_str());
      return 1;
    }
    cfg = std::move(*lr.config);
  }
  util::setLogLevel(util::parseLogLevel(cfg.log.level));
  util::setLogFormat(cfg.log.format == "json" ? util::LogFormat::Json : util::LogFormat::Text);

  auto rt = std::make_unique<Runtime>();
  {
    std::vector<std::string> errors;
    auto settings = buildSettings(cfg, dev, errors);
    if (!settings) {
      for (const auto& e : errors) std::fprintf(stderr, "%s\n", e.c_str());
      return 1;
    }
    rt->install(settings);
    for (size_t i = 0; i < cfg.dkim.size(); ++i)
      util::logInfo("serve", "dkim key loaded domain=" + cfg.dkim[i].domain + " selector=" + cfg.dkim[i].selector +
                                 " algorithm=" + cfg.dkim[i].algorithm);
  }

  std::error_code ec;
  std::filesystem::create_directories(cfg.dataDir, ec);
  if (ec) {
    std::fprintf(stderr, "subrelay: cannot create data_dir %s: %s\n", cfg.dataDir.c_str(), ec.message().c_str());
    return 1;
  }
  struct stat dst {};
  if (::stat(cfg.dataDir.c_str(), &dst) == 0 && (dst.st_mode & 077) != 0)
    util::logWarn("serve", "data_dir " + cfg.dataDir + " can be read by other users (mode " +
                               std::to_string((dst.st_mode >> 6) & 7) + std::to_string((dst.st_mode >> 3) & 7) +
                               std::to_string(dst.st_mode & 7) + "); run `chmod 700 " + cfg.dataDir + "`");
  std::string dbPath = (std::filesystem::path(cfg.dataDir) / "queue.db").string();
  // A queue.db made by an older version with the default umask: close it to others.
  for (const char* suffix : {"", "-wal", "-shm"}) {
    const std::string f = dbPath + suffix;
    struct stat fst {};
    if (::stat(f.c_str(), &fst) == 0 && (fst.st_mode & 077) != 0) ::chmod(f.c_str(), fst.st_mode & 0700);
  }
  auto store = queue::SqliteStore::open(dbPath);
  if (!store.ok()) {
    std::fprintf(stderr, "subrelay: queue %s: %s\n", dbPath.c_str(), store.error().message.c_str());
    return 1;
  }
  // Accepted messages write their webhook events in the same transaction.
  store.value()->setWebhookEvents(webhookEventSets(cfg));
  // One serve per data_dir: the delivery service treats every lease in the queue as left
  // by a dead process, which is only true if no other serve uses this queue.
  int lockFd = ::open((std::filesystem::path(cfg.dataDir) / "serve.lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (lockFd < 0 || ::flock(lockFd, LOCK_EX | LOCK_NB) != 0) {
    std::fprintf(stderr, "subrelay: another `subrelay serve` is using data_dir %s (%s); stop it first\n",
                 cfg.dataDir.c_str(), lockFd < 0 ? std::strerror(errno) : "serve.lock is held");
    return 1;
  }
  auto delivery = DeliveryService::create(cfg, dbPath);
  if (!delivery.ok()) {
    std::fprintf(stderr, "subrelay: delivery: %s\n", delivery.error().message.c_str());
    return 1;
  }
  DeliveryService* deliveryPtr = delivery.value().get();
  rt->onQueued = [deliveryPtr]() { deliveryPtr->notify(); };
  rt->dataDir = cfg.dataDir;

  queue::GroupCommitter committer(*store.value());
  rt->committer = &committer;

  // Day/month rate windows and meters survive restarts: restored now, written every
  // few seconds by this thread (one small transaction, not one write per message) and
  // once more at shutdown.
  PolicyPersister persister(*rt, dbPath);
  if (auto r = persister.restore(); !r.ok()) {
    std::fprintf(stderr, "subrelay: queue %s: %s\n", dbPath.c_str(), r.error().message.c_str());
    return 1;
  }

  // Suppression lists (issue 13): loaded before the first RCPT, then kept in step every
  // 2 s with the main loop's flush and at SIGHUP.
  SuppressionSync suppressionSync(*rt, dbPath);
  if (auto r = suppressionSync.start(); !r.ok()) {
    std::fprintf(stderr, "subrelay: queue %s: %s\n", dbPath.c_str(), r.error().message.c_str());
    return 1;
  }
  unsigned nworkers = cfg.workers ? cfg.workers : std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::unique_ptr<Worker>> workers;
  for (unsigned i = 0; i < nworkers; ++i) workers.push_back(std::make_unique<Worker>(*rt, static_cast<int>(i)));
  for (const auto& l : cfg.listeners) {
    if (auto free = net::Listener::checkAddressFree(l.host, l.port); !free.ok()) {
      std::fprintf(stderr, "subrelay: %s\n", free.error().message.c_str());
      return 1;
    }
  }
  Operations ops(*rt, dbPath, cfg.dataDir);
  if (auto r = ops.start(cfg); !r.ok()) {
    std::fprintf(stderr, "subrelay: %s\n", r.error().message.c_str());
    return 1;
  }
  std::vector<std::pair<std::string, std::string>> bound;
  for (const auto& l : cfg.listeners) {
    uint16_t port = l.port;
    for (auto& w : workers) {
      auto r = w->addListener(l, port);
      if (!r.ok()) {
        std::fprintf(stderr, "subrelay: %s\n", r.error().message.c_str());
        return 1;
      }
      port = r.value();  // port 0: every loop joins the port the first one got
    }
    util::logInfo("serve", "listening on " + joinHostPort(l.host, port) + " (" + std::string(config::jsonName(l.tls)) + ")");
    bound.emplace_back(joinHostPort(l.host, port), std::string(config::jsonName(l.tls)));
  }
  ops.setListeners(std::move(bound));
  if (dev) {
    // The dev password is random per start and printed by design (README.md: --dev).
    std::fprintf(stderr,
                 "dev credentials: username=dev password=%s\n"
                 "dev certificate: ./%s/tls/cert.pem (self-signed; every message is captured, none delivered)\n",
                 devPassword.c_str(), kDevDataDir);
  }
  // systemd's watchdog (WatchdogSec=): WATCHDOG=1 every half timeout, but only while every
  // event loop keeps stamping its heartbeat; a loop that has not run for half the timeout
  // stops the pings, and systemd restarts the service.
  const auto watchdog = util::watchdogTimeout(std::getenv("WATCHDOG_USEC"), std::getenv("WATCHDOG_PID"),
                                              static_cast<long>(::getpid()));
  const auto maxBeatAge = watchdog ? std::chrono::duration_cast<std::chrono::milliseconds>(*watchdog / 2)
                                   : std::chrono::milliseconds(60'000);
  const auto beatEvery = util::heartbeatPeriod(maxBeatAge);
  for (auto& w : workers) w->start(beatEvery);
  delivery.value()->start(beatEvery);
  util::logInfo("serve", "subrelay started: " + std::to_string(nworkers) + " workers, queue " + dbPath +
                             ", config " + cfg.sourcePath);
  sdNotify("READY=1");
  ops.setReady(true);
  if (watchdog)
    util::logInfo("serve", "systemd watchdog: " + std::to_string(watchdog->count() / 1000) + " ms; pinging every " +
                               std::to_string(maxBeatAge.count()) + " ms while every loop runs");

  util::LoopWatch loopWatch(maxBeatAge);
  auto checkLoops = [&] {
    std::vector<util::LoopBeat> beats;
    for (auto& w : workers) beats.push_back({"worker " + std::to_string(w->index()), w->heartbeat().lastMs()});
    beats.push_back({"delivery", delivery.value()->heartbeat().lastMs()});
    auto step = loopWatch.check(beats, util::steadyMs());
    if (step.logError) util::logError("serve", *step.logError);
    if (step.logInfo) util::logInfo("serve", *step.logInfo);
    if (step.ping) sdNotify("WATCHDOG=1");
  };
  // The rate windows and meters are written every 2 s; the watchdog is checked every half
  // timeout (first right away). One sigtimedwait waits for whichever comes first.
  using Steady = std::chrono::steady_clock;
  constexpr auto kFlushEvery = std::chrono::seconds(2);
  auto nextFlush = Steady::now() + kFlushEvery;
  auto nextPing = Steady::now();
  for (;;) {
    auto now = Steady::now();
    if (watchdog && now >= nextPing) {
      checkLoops();
      nextPing = now + maxBeatAge;
    }
    if (now >= nextFlush) {
      persister.flush();
      ops.tick();
      suppressionSync.poll();
      nextFlush = Steady::now() + kFlushEvery;
    }
    auto until = watchdog ? std::min(nextFlush, nextPing) : nextFlush;
    auto wait = std::chrono::duration_cast<std::chrono::nanoseconds>(until - Steady::now());
    if (wait < std::chrono::milliseconds(1)) wait = std::chrono::milliseconds(1);
    timespec tick{static_cast<time_t>(wait.count() / 1'000'000'000), static_cast<long>(wait.count() % 1'000'000'000)};
    int sig = sigtimedwait(&sigs, nullptr, &tick);
    if (sig < 0) continue;
    if (sig == SIGHUP) {
      if (dev) {
        util::logWarn("serve", "SIGHUP: --dev runs on its embedded config; nothing to reload");
      } else {
        auto fresh = reloadConfig(*rt, opts.configPath);
        ops.reloaded(fresh != nullptr);
        if (fresh) {
          delivery.value()->reconfigure(*fresh);
          store.value()->setWebhookEvents(webhookEventSets(*fresh));
        }
        suppressionSync.reload();
      }
      continue;
    }
    util::logInfo("serve", std::string("received ") + (sig == SIGTERM ? "SIGTERM" : "SIGINT") +
                               ": shutting down (no new connections; transactions in flight finish)");
    break;
  }
  sdNotify("STOPPING=1");
  ops.setReady(false);
  for (auto& w : workers) w->requestShutdown();
  for (auto& w : workers) w->join();
  committer.stop();
  workers.clear();
  // Transactions in flight to MX hosts get the same grace as inbound ones.
  delivery.value()->stop(rt->settings()->config->limits.shutdownGrace);
  persister.flush();
  ops.stop();
  util::logInfo("serve", "stopped; queued messages are safe in " + dbPath);
  return 0;
}

}  // namespace subrelay::app
