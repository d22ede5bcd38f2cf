#include "app/server.h"

#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <thread>

#include "app/dev_config.h"
#include "app/dkim_cmd.h"
#include "app/runtime.h"
#include "app/worker.h"
#include "policy/password.h"
#include "policy/senders.h"
#include "queue/sqlite_store.h"
#include "util/log.h"

namespace subrelay::app {

bool Runtime::senderAllowed(std::string_view accountName, std::string_view address) const {
  const AccountRuntime* a = account(accountName);
  if (a == nullptr) return false;
  if (a->anySender) return !address.empty();
  return policy::senderAllowed(a->senders, address);
}

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

const char* tlsModeName(config::ListenerTls t) {
  switch (t) {
    case config::ListenerTls::StartTls: return "starttls";
    case config::ListenerTls::Implicit: return "implicit";
    case config::ListenerTls::None: return "none";
  }
  return "?";
}

util::LogLevel parseLevel(const std::string& s) {
  if (s == "debug") return util::LogLevel::Debug;
  if (s == "warning") return util::LogLevel::Warn;
  if (s == "error") return util::LogLevel::Error;
  return util::LogLevel::Info;
}

std::string joinHostPort(const std::string& host, uint16_t port) {
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
  return host + ":" + std::to_string(port);
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
  util::setLogLevel(parseLevel(cfg.logLevel));

  // Passwords are checked at start so a bad hash fails now, not at the first login.
  for (const auto& a : cfg.accounts) {
    std::string why = policy::checkHashFormat(a.passwordHash);
    if (!why.empty()) {
      std::fprintf(stderr, "%s: accounts: %s: %s\n", cfg.sourcePath.c_str(), a.username.c_str(), why.c_str());
      return 1;
    }
  }

  auto rt = std::make_unique<Runtime>();
  std::vector<policy::Credential> creds;
  for (const auto& a : cfg.accounts) {
    creds.push_back({a.username, a.passwordHash});
    AccountRuntime ar;
    ar.username = a.username;
    ar.senders = a.senders;
    ar.mode = dev ? config::AccountMode::Capture : a.mode;
    ar.anySender = dev;  // --dev: any sender, so apps can be tried as they are
    rt->accounts.emplace(a.username, std::move(ar));
  }
  rt->auth = std::make_unique<policy::Authenticator>(std::move(creds));

  // DKIM keys are loaded now so a bad key stops the start, not the first message.
  {
    std::vector<std::string> errors;
    DkimSetup ds = loadDkimKeys(cfg, errors);
    if (!errors.empty()) {
      for (const auto& e : errors) std::fprintf(stderr, "%s\n", e.c_str());
      std::fprintf(stderr, "subrelay: cannot load the DKIM keys above; fix them (check-config shows every problem)\n");
      return 1;
    }
    rt->dkimKeys = std::move(ds.ring);
    rt->dkimDomains = std::move(ds.domains);
    rt->signer = std::make_shared<dkim::LocalSigner>();
    for (size_t i = 0; i < cfg.dkim.size(); ++i)
      util::logInfo("serve", "dkim key loaded domain=" + cfg.dkim[i].domain + " selector=" + cfg.dkim[i].selector +
                                 " algorithm=" + cfg.dkim[i].algorithm);
  }

  bool needTls = false;
  for (const auto& l : cfg.listeners) needTls = needTls || l.tls != config::ListenerTls::None;
  if (needTls) {
    auto ctx = tls::TlsContext::serverFromFiles(cfg.tls.certificate, cfg.tls.privateKey);
    if (!ctx.ok()) {
      std::fprintf(stderr, "subrelay: TLS: %s\n", ctx.error().message.c_str());
      return 1;
    }
    rt->tlsServer = ctx.value();
  }

  std::error_code ec;
  std::filesystem::create_directories(cfg.dataDir, ec);
  if (ec) {
    std::fprintf(stderr, "subrelay: cannot create data_dir %s: %s\n", cfg.dataDir.c_str(), ec.message().c_str());
    return 1;
  }
  std::string dbPath = (std::filesystem::path(cfg.dataDir) / "queue.db").string();
  auto store = queue::SqliteStore::open(dbPath);
  if (!store.ok()) {
    std::fprintf(stderr, "subrelay: queue %s: %s\n", dbPath.c_str(), store.error().message.c_str());
    return 1;
  }
  queue::GroupCommitter committer(*store.value());
  rt->committer = &committer;
  rt->config = std::make_shared<const config::Config>(cfg);

  unsigned nworkers = cfg.workers ? cfg.workers : std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::unique_ptr<Worker>> workers;
  for (unsigned i = 0; i < nworkers; ++i) workers.push_back(std::make_unique<Worker>(*rt, static_cast<int>(i)));
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
    util::logInfo("serve", "listening on " + joinHostPort(l.host, port) + " (" + tlsModeName(l.tls) + ")");
  }
  if (dev) {
    // The dev password is random per start and printed by design (SPEC.md: --dev).
    std::fprintf(stderr,
                 "dev credentials: username=dev password=%s\n"
                 "dev certificate: ./%s/tls/cert.pem (self-signed; every message is captured, none delivered)\n",
                 devPassword.c_str(), kDevDataDir);
  }
  for (auto& w : workers) w->start();
  util::logInfo("serve", "subrelay started: " + std::to_string(nworkers) + " workers, queue " + dbPath +
                             ", config " + cfg.sourcePath);
  sdNotify("READY=1");

  for (;;) {
    int sig = 0;
    if (sigwait(&sigs, &sig) != 0) continue;
    if (sig == SIGHUP) {
      util::logWarn("serve", "SIGHUP: configuration reload is not supported yet; restart to apply changes");
      continue;
    }
    util::logInfo("serve", std::string("received ") + (sig == SIGTERM ? "SIGTERM" : "SIGINT") +
                               ": shutting down (no new connections; transactions in flight finish)");
    break;
  }
  sdNotify("STOPPING=1");
  for (auto& w : workers) w->requestShutdown();
  for (auto& w : workers) w->join();
  committer.stop();
  workers.clear();
  util::logInfo("serve", "stopped; queued messages are safe in " + dbPath);
  return 0;
}

}  // namespace subrelay::app
