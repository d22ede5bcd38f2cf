// Runtime: what every worker loop shares while `serve` runs: the validated config,
// accounts, the authenticator, the TLS context, the group committer and connection
// counters. Read-mostly; the mutable parts are atomics or behind their own mutex.
#pragma once

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "config/config.h"
#include "app/dkim_cmd.h"
#include "dkim/dkim.h"
#include "policy/authenticator.h"
#include "queue/group_commit.h"
#include "tls/tls_context.h"

namespace subrelay::app {

struct AccountRuntime {
  std::string username;
  std::vector<std::string> senders;
  bool anySender = false;  // only the embedded --dev account
  config::AccountMode mode = config::AccountMode::Deliver;
};

class Runtime {
 public:
  std::shared_ptr<const config::Config> config;
  std::map<std::string, AccountRuntime, std::less<>> accounts;
  std::unique_ptr<policy::Authenticator> auth;
  std::shared_ptr<tls::TlsContext> tlsServer;  // null when every listener is "none"
  queue::GroupCommitter* committer = nullptr;
  // DKIM: keys by header From domain, loaded at start (an unloadable key fails start-up),
  // and the per-domain x= distance (dkim[].expiry). The Signer is the seam that lets
  // signing move out of process later (ARCHITECTURE.md); it is stateless and shared by
  // the thread-pool jobs.
  dkim::KeyRing dkimKeys;
  std::map<std::string, DkimDomainPolicy, std::less<>> dkimDomains;
  std::shared_ptr<const dkim::Signer> signer;

  const AccountRuntime* account(std::string_view name) const {
    auto it = accounts.find(name);
    return it == accounts.end() ? nullptr : &it->second;
  }
  bool senderAllowed(std::string_view account, std::string_view address) const;

  // Connection accounting (limits.max_connections, limits.max_connections_per_ip).
  // Returns false (and counts nothing) when a limit would be exceeded.
  bool admitConnection(const std::string& ip);
  void releaseConnection(const std::string& ip);
  uint32_t connections() const { return connections_.load(); }

 private:
  std::atomic<uint32_t> connections_{0};
  std::mutex ipMu_;
  std::unordered_map<std::string, uint32_t> perIp_;
};

}  // namespace subrelay::app
