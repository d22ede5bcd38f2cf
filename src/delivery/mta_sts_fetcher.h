// MTA-STS policy discovery and fetching (RFC 8461 3.3, 5.1): the I/O around the decisions
// of mta_sts.h. StsFetcher::policyFor(domain) answers from its memory (filled from the
// policy cache in SQLite on first use), and when the core says so looks up
// "_mta-sts.<domain>" TXT, the A/AAAA of "mta-sts.<domain>" (both through the configured
// dns::Resolver) and GETs "https://mta-sts.<domain>/.well-known/mta-sts.txt" (PolicyGetter,
// by default net::HttpClient: verified TLS, no redirects, bounded). Every decision (when to
// look up, whether to fetch, what a response means, what stays cached) is the core's.
//
// Concurrent policyFor() calls for one domain share one discovery. A background refresh
// (Step::AnswerAndRefresh) answers at once with the cached policy and refreshes after.
// Callbacks run on the loop, never inside policyFor(). Destroying the fetcher drops every
// answer not yet given. Loop thread only.
#pragma once

#include <uv.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "delivery/destination.h"
#include "delivery/mta_sts.h"
#include "dns/resolver.h"
#include "net/http_client.h"
#include "net/uv_timer.h"
#include "queue/store.h"
#include "util/clock.h"

namespace subrelay::queue {
class SqliteStore;
}

namespace subrelay::delivery::mtasts {

// The HTTPS GET of a policy, as the fetcher needs it (a seam for tests).
class PolicyGetter {
 public:
  virtual ~PolicyGetter() = default;
  // host: the URL's host; addresses: what the resolver found for it. `cb` on the loop,
  // never inside get().
  virtual void get(const std::string& url, const std::vector<std::string>& addresses,
                   std::function<void(FetchOutcome)> cb) = 0;
};

struct HttpsGetterSettings {
  std::string caFile;          // PEM file of trusted CAs; "" = the system's store (3.3)
  // The Policy Host's HTTPS port: 443 (3.3); tests serve policies on a free loopback port.
  uint16_t port = 443;
  std::chrono::milliseconds timeout{std::chrono::seconds(60)};  // 3.3: "one minute"
  size_t maxBodyBytes = kMaxPolicyBytes;                         // 3.3: "64 kilobytes"
};

// PolicyGetter on net::HttpClient.
class HttpsPolicyGetter final : public PolicyGetter {
 public:
  HttpsPolicyGetter(uv_loop_t* loop, HttpsGetterSettings settings);
  void get(const std::string& url, const std::vector<std::string>& addresses,
           std::function<void(FetchOutcome)> cb) override;
  size_t requests() const { return requests_; }

 private:
  net::HttpClient client_;
  HttpsGetterSettings settings_;
  size_t requests_ = 0;
};

// Where cached policies live between restarts (a seam for tests; SqlitePolicyStore below).
class PolicyStore {
 public:
  virtual ~PolicyStore() = default;
  virtual std::optional<CachedPolicy> load(const std::string& domain) = 0;
  virtual void save(const CachedPolicy& policy) = 0;
  virtual void touch(const std::string& domain, int64_t checkedAt) = 0;
};

// CachedPolicy <-> the queue's row. nullopt for a row whose mode is not one we know.
queue::StsPolicyRow toRow(const CachedPolicy& p);
std::optional<CachedPolicy> fromRow(const queue::StsPolicyRow& r);

// PolicyStore on the queue database. Each call is a small SQLite statement on the caller's
// thread; errors are logged (a policy that could not be saved is still used from memory).
class SqlitePolicyStore final : public PolicyStore {
 public:
  explicit SqlitePolicyStore(queue::SqliteStore& store) : store_(store) {}
  std::optional<CachedPolicy> load(const std::string& domain) override;
  void save(const CachedPolicy& policy) override;
  void touch(const std::string& domain, int64_t checkedAt) override;

 private:
  queue::SqliteStore& store_;
};

struct PolicyAnswer {
  std::string domain;
  // The policy to apply (non-expired; mode none included), or none: deliver as though the
  // domain had not implemented MTA-STS (3.3). Feed it to verdict().
  std::optional<CachedPolicy> policy;
  // How this answer came about: "cache" (no lookup), "fetched" (this discovery fetched
  // it), "unchanged" (TXT id unchanged), "none" (no policy), and for the record the last
  // problem ("" when none): a failed lookup or fetch, an invalid TXT record.
  std::string source;
  std::string detail;
};

struct FetcherStats {
  uint64_t answers = 0;
  uint64_t fromMemory = 0;   // answered without waiting for a lookup
  uint64_t txtLookups = 0;
  uint64_t fetches = 0;      // HTTPS GETs started
  uint64_t fetchFailures = 0;
  uint64_t stored = 0;       // new policies cached
};

class StsFetcher {
 public:
  using Callback = std::function<void(const PolicyAnswer&)>;

  // resolver, getter, clock and store (may be null: memory only) outlive the fetcher.
  StsFetcher(uv_loop_t* loop, dns::Resolver& resolver, PolicyGetter& getter, const util::Clock& clock,
             Settings settings = {}, PolicyStore* store = nullptr);
  ~StsFetcher();
  StsFetcher(const StsFetcher&) = delete;
  StsFetcher& operator=(const StsFetcher&) = delete;

  // Which addresses of "mta-sts.<domain>" may be fetched from: the policy host is named by
  // the recipient domain's DNS, so a tenant could point it at loopback or an internal
  // service (SSRF). The same rule as for MX hosts (delivery.allow_private_destinations);
  // by default only public addresses.
  void setDestinationPolicy(DestinationPolicy policy) { destinations_ = std::move(policy); }

  // domain: the Policy Domain (the recipient domain, or a smart host's: 3.4), A-labels;
  // any case, with or without a trailing dot.
  void policyFor(const std::string& domain, Callback cb);
  // 5: "a compliant MTA MUST NOT permanently fail to deliver messages before checking, via
  // DNS, for the presence of an updated policy" (5.1 step 3): always looks the TXT record
  // up (joining a discovery already running), fetches when its id is new (holdoffs still
  // apply), then answers. For the scheduler before it bounces because of an enforce policy.
  void recheck(const std::string& domain, Callback cb);

  // What is known about a domain now, without any lookup (for `queue show`, tests).
  const DomainState* state(const std::string& domain) const;
  const FetcherStats& stats() const { return stats_; }

 private:
  struct Discovery;
  DomainState& stateFor(const std::string& domain);
  void discover(const std::string& domain);
  void onTxtAnswer(const std::string& domain, const dns::Answer& a);
  void resolveHost(const std::string& domain, const std::string& id);
  void fetch(const std::string& domain, const std::string& id, std::vector<std::string> addresses);
  void finish(const std::string& domain, std::string source, std::string detail);
  void answerLater(Callback cb, PolicyAnswer a);
  int64_t now() const { return util::unixSeconds(clock_.wallNow()); }

  dns::Resolver& resolver_;
  PolicyGetter& getter_;
  const util::Clock& clock_;
  Settings settings_;
  DestinationPolicy destinations_;
  PolicyStore* store_;
  net::Timer later_;
  std::vector<std::pair<Callback, PolicyAnswer>> pending_;
  std::map<std::string, DomainState> states_;
  std::map<std::string, std::unique_ptr<Discovery>> running_;
  FetcherStats stats_;
  std::shared_ptr<bool> alive_;
};

}  // namespace subrelay::delivery::mtasts
