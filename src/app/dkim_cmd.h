// DKIM wiring for the app: loading the configured keys (serve, check-config,
// dns-records) and the two commands that help publish them, `dkim-keygen` and
// `dns-records` (README.md, "Command line").
#pragma once

#include <chrono>
#include <map>
#include <optional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "config/config.h"
#include "dkim/dkim.h"

namespace subrelay::app {

// The keys of dkim[] loaded into a ring, plus the per-domain x= distance. The smallest
// dkim[].expiry among a domain's keys applies to all its signatures, since one
// SignOptions covers every signature of a message.
// Per signing domain: what goes into SignOptions besides t=.
struct DkimDomainPolicy {
  std::optional<std::chrono::seconds> expiry;  // x= distance (smallest of the domain's keys)
  dkim::Canon headerCanon = dkim::Canon::Relaxed;
  dkim::Canon bodyCanon = dkim::Canon::Relaxed;
};

struct DkimSetup {
  dkim::KeyRing ring;
  std::map<std::string, DkimDomainPolicy, std::less<>> domains;
};

// Loads every dkim[i].private_key. Errors are lines "FILE: dkim[i].private_key: why"
// (FILE: the config's path), one per key that fails; the ring holds the rest. Indices in
// skip are left out (check-config: their file was already reported unreadable).
DkimSetup loadDkimKeys(const config::Config& cfg, std::vector<std::string>& errors, const std::set<size_t>& skip = {});

struct KeygenOptions {
  std::string domain;
  std::string selector;
  std::string algorithm = "rsa-sha256";
  int bits = 0;  // 0 = 2048 for RSA
  std::string out;
  bool force = false;
};
// `subrelay dkim-keygen`: exit 0, 1 (failure) or 2 (usage).
int cmdDkimKeygen(const KeygenOptions& o);

// `subrelay dns-records --domain D [-c PATH]`.
int cmdDnsRecords(const std::string& configPath, const std::string& domain);

}  // namespace subrelay::app
