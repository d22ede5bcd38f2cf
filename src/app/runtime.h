// Runtime: what every worker loop shares while `serve` runs.
//
// Two parts:
//  - Settings: one immutable generation of everything SIGHUP reloads (config, accounts,
//    the authenticator, the TLS context, DKIM keys). A reload builds a complete new
//    Settings and installs it with one pointer swap; a session takes the current one when
//    it is accepted and keeps it to the end ("sessions in progress finish under the
//    config they started with"), so nothing a session reads changes under it.
//  - state that outlives reloads: the group committer, connection and session counters,
//    the rate limiters (AccountLimits keeps counts across a reload), the brute-force
//    guard and the meters. Each is thread-safe on its own.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "app/dkim_cmd.h"
#include "config/config.h"
#include "dkim/dkim.h"
#include "policy/authenticator.h"
#include "policy/brute_force.h"
#include "policy/rate_limiter.h"
#include "policy/suppression.h"
#include "queue/group_commit.h"
#include "tls/tls_context.h"
#include "util/clock.h"

namespace subrelay::app {

struct AccountRuntime {
  std::string username;
  std::vector<std::string> senders;
  bool anySender = false;  // only the embedded --dev account
  bool allowNullSender = false;
  config::AccountMode mode = config::AccountMode::Deliver;
  bool suppression = true;  // accounts[].suppression
};

struct Settings {
  std::shared_ptr<const config::Config> config;
  std::map<std::string, AccountRuntime, std::less<>> accounts;
  std::shared_ptr<policy::Authenticator> auth;
  std::shared_ptr<tls::TlsContext> tlsServer;  // null when every listener is "none"
  // DKIM: keys by header From domain and the per-domain x=/c= policy. The Signer is the
  // seam that lets signing move out of process later (docs/architecture.md); it is stateless
  // and shared by the thread-pool jobs.
  dkim::KeyRing dkimKeys;
  std::map<std::string, DkimDomainPolicy, std::less<>> dkimDomains;
  std::shared_ptr<const dkim::Signer> signer;
  uint64_t generation = 1;

  const AccountRuntime* account(std::string_view name) const {
    auto it = accounts.find(name);
    return it == accounts.end() ? nullptr : &it->second;
  }
  bool senderAllowed(std::string_view account, std::string_view address) const;
};

// Builds a complete Settings from a validated config: checks password hashes, loads
// DKIM keys and the TLS certificate. Any failure -> nullptr and errors filled (one line
// each, naming the file and what to do); nothing is half-built.
std::shared_ptr<const Settings> buildSettings(const config::Config& cfg, bool dev, std::vector<std::string>& errors);

// The policy parts of a config, in policy/'s types.
std::vector<policy::AccountRules> accountRules(const config::Config& cfg);
policy::AuthGuardConfig authGuardConfig(const config::Limits& limits);

class Runtime {
 public:
  std::shared_ptr<const Settings> settings() const {
    std::lock_guard lk(settingsMu_);
    return settings_;
  }
  // Installs a new generation (reload); sessions already running keep theirs.
  void install(std::shared_ptr<const Settings> s);

  queue::GroupCommitter* committer = nullptr;
  // Called (from the committer thread) after a message to deliver was committed.
  std::function<void()> onQueued;
  util::SystemClock clock;
  policy::AccountLimits limits;
  policy::AuthGuard guard;
  policy::Meter meter;
  // Suppression lists of every account, asked at RCPT; app/suppression_sync.h keeps it
  // in step with the queue's suppressions table.
  policy::SuppressionTable suppressions;

  // Connection accounting (limits.max_connections, limits.max_connections_per_ip, an
  // IPv6 client counted by its /64), against the limits of the current settings.
  // Returns false (and counts nothing) when a limit would be exceeded. Every true must be
  // paired with one releaseConnection() of the same address.
  bool admitConnection(const std::string& ip);
  void releaseConnection(const std::string& ip);
  uint32_t connections() const { return connections_.load(); }

  // Room for new mail, checked at MAIL (like Postfix's queue_minfree): false while the
  // file system of data_dir has less free space than the declared SIZE plus a margin of
  // kStorageMargin, or after a commit failed for lack of space until the next check
  // (at most once a second) finds room again.
  bool storageAvailable(uint64_t declaredSize = 0);
  void noteStoreFull(bool full) { storeFull_.store(full); }
  std::string dataDir;

  // Concurrent authenticated sessions per account (limits.max_sessions_per_account;
  // max 0 = no limit). False when the account already has max sessions.
  bool admitAccountSession(const std::string& username, uint32_t max);
  void releaseAccountSession(const std::string& username);

 private:
  mutable std::mutex settingsMu_;
  std::shared_ptr<const Settings> settings_;
  std::atomic<uint32_t> connections_{0};
  std::atomic<bool> storeFull_{false};
  std::atomic<int64_t> storageCheckedMs_{0};
  std::atomic<uint64_t> freeBytes_{~uint64_t{0}};
  std::mutex ipMu_;
  std::unordered_map<std::string, uint32_t> perIp_;
  std::mutex acctMu_;
  std::unordered_map<std::string, uint32_t> perAccount_;
};

}  // namespace subrelay::app
