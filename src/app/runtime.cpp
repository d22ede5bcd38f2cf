// Runtime and Settings (runtime.h): building one generation of the reloadable
// configuration, and the shared counters.
#include "app/runtime.h"

#include <sys/statvfs.h>

#include "policy/password.h"
#include "policy/senders.h"
#include "util/log.h"

namespace subrelay::app {

bool Settings::senderAllowed(std::string_view accountName, std::string_view address) const {
  const AccountRuntime* a = account(accountName);
  if (a == nullptr) return false;
  // MAIL FROM:<> only where accounts[].allow_null_sender says so (the header From of
  // such a message is still checked, against the senders below).
  if (address.empty()) return a->allowNullSender;
  if (a->anySender) return true;
  return policy::senderAllowed(a->senders, address);
}

std::shared_ptr<const Settings> buildSettings(const config::Config& cfg, bool dev, std::vector<std::string>& errors) {
  auto s = std::make_shared<Settings>();
  // Passwords are checked now so a bad hash fails the start (or the reload), not the
  // first login.
  std::vector<policy::Credential> creds;
  for (const auto& a : cfg.accounts) {
    std::string why = policy::checkHashFormat(a.passwordHash);
    if (!why.empty()) {
      errors.push_back(cfg.sourcePath + ": accounts: " + a.username + ": " + why);
      continue;
    }
    creds.push_back({a.username, a.passwordHash});
    AccountRuntime ar;
    ar.username = a.username;
    ar.senders = a.senders;
    ar.mode = dev ? config::AccountMode::Capture : a.mode;
    ar.anySender = dev;  // --dev: any sender, so apps can be tried as they are
    ar.allowNullSender = a.allowNullSender;
    ar.suppression = a.suppression;
    s->accounts.emplace(a.username, std::move(ar));
  }
  s->auth = std::make_shared<policy::Authenticator>(std::move(creds));

  // DKIM keys are loaded now so a bad key stops the start, not the first message.
  size_t before = errors.size();
  DkimSetup ds = loadDkimKeys(cfg, errors);
  if (errors.size() != before)
    errors.push_back("subrelay: cannot load the DKIM keys above; fix them (check-config shows every problem)");
  s->dkimKeys = std::move(ds.ring);
  s->dkimDomains = std::move(ds.domains);
  s->signer = std::make_shared<dkim::LocalSigner>();

  bool needTls = false;
  for (const auto& l : cfg.listeners) needTls = needTls || l.tls != config::ListenerTls::None;
  if (needTls) {
    auto ctx = tls::TlsContext::serverFromFiles(cfg.tls.certificate, cfg.tls.privateKey);
    if (!ctx.ok()) {
      errors.push_back("subrelay: TLS: " + ctx.error().message);
    } else {
      s->tlsServer = ctx.value();
    }
  }
  s->config = std::make_shared<const config::Config>(cfg);
  if (!errors.empty()) return nullptr;
  return s;
}

std::vector<policy::AccountRules> accountRules(const config::Config& cfg) {
  std::vector<policy::AccountRules> out;
  for (const auto& a : cfg.accounts) {
    policy::AccountRules ar;
    ar.username = a.username;
    for (const auto& r : a.rateLimits) {
      // The config loader accepted only valid what/period names.
      if (auto rule = policy::makeRateRule(r.key, r.what, r.period, r.amount)) ar.rules.push_back(*rule);
    }
    out.push_back(std::move(ar));
  }
  return out;
}

policy::AuthGuardConfig authGuardConfig(const config::Limits& l) {
  policy::AuthGuardConfig g;
  g.delayAfter = l.authDelayAfter;
  g.baseDelay = l.authDelayBase;
  g.maxDelay = l.authDelayMax;
  // A username under attack from many addresses only earns delays, capped lower than an
  // address's so its owner still gets in from a clean address.
  g.maxUsernameDelay = std::min(l.authDelayMax, std::chrono::milliseconds(8000));
  g.lockoutThreshold = l.authLockoutAfter;
  g.window = l.authLockoutWindow;
  g.lockoutDuration = l.authLockoutDuration;
  return g;
}

void Runtime::install(std::shared_ptr<const Settings> s) {
  {
    std::lock_guard lk(settingsMu_);
    settings_ = s;
  }
  limits.configure(accountRules(*s->config), policy::Instant::from(clock));
  guard.reconfigure(authGuardConfig(s->config->limits));
}

bool Runtime::admitConnection(const std::string& ip) {
  auto s = settings();
  const auto& lim = s->config->limits;
  // One host usually owns a whole IPv6 /64 (RFC 4291 2.5.4 interface identifiers):
  // counted per address it could rotate through 2^64 of them. The same key as the
  // brute-force guard's.
  const std::string key = policy::addressKey(ip);
  std::lock_guard lk(ipMu_);
  if (connections_.load() >= lim.maxConnections) return false;
  uint32_t& n = perIp_[key];
  if (n >= lim.maxConnectionsPerIp) {
    if (n == 0) perIp_.erase(key);
    return false;
  }
  ++n;
  connections_.fetch_add(1);
  return true;
}

void Runtime::releaseConnection(const std::string& ip) {
  const std::string key = policy::addressKey(ip);
  std::lock_guard lk(ipMu_);
  auto it = perIp_.find(key);
  if (it != perIp_.end() && --it->second == 0) perIp_.erase(it);
  connections_.fetch_sub(1);
}

namespace {
// Room kept free beyond a message's declared size: SQLite's WAL, the index pages and
// the next commits of sessions already past MAIL.
constexpr uint64_t kStorageMargin = 4 * 1024 * 1024;
}  // namespace

bool Runtime::storageAvailable(uint64_t declaredSize) {
  const int64_t nowMs = std::chrono::duration_cast<std::chrono::milliseconds>(
                            std::chrono::steady_clock::now().time_since_epoch())
                            .count();
  int64_t last = storageCheckedMs_.load();
  // Once a second while there is room; at every MAIL while there is not, so the first
  // client after the operator freed space is accepted (statvfs costs a microsecond).
  const bool lacking = storeFull_.load() || freeBytes_.load() < declaredSize + kStorageMargin;
  if ((lacking || nowMs - last >= 1000) && storageCheckedMs_.compare_exchange_strong(last, nowMs)) {
    struct statvfs sv {};
    if (!dataDir.empty() && ::statvfs(dataDir.c_str(), &sv) == 0) {
      freeBytes_.store(static_cast<uint64_t>(sv.f_bavail) * sv.f_frsize);
      // A failed commit is forgotten once the file system has room again.
      if (freeBytes_.load() >= kStorageMargin) storeFull_.store(false);
    }
  }
  if (storeFull_.load()) return false;
  return freeBytes_.load() >= declaredSize + kStorageMargin;
}

bool Runtime::admitAccountSession(const std::string& username, uint32_t max) {
  std::lock_guard lk(acctMu_);
  uint32_t& n = perAccount_[username];
  if (max != 0 && n >= max) {
    if (n == 0) perAccount_.erase(username);
    return false;
  }
  ++n;
  return true;
}

void Runtime::releaseAccountSession(const std::string& username) {
  std::lock_guard lk(acctMu_);
  auto it = perAccount_.find(username);
  if (it != perAccount_.end() && --it->second == 0) perAccount_.erase(it);
}

}  // namespace subrelay::app
