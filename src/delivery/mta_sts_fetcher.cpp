// StsFetcher: the lookups and the HTTPS GET around mta_sts.h's decisions.
#include "delivery/mta_sts_fetcher.h"

#include <utility>

#include "queue/sqlite_store.h"
#include "util/log.h"
#include "util/strings.h"

namespace subrelay::delivery::mtasts {

namespace {
constexpr std::string_view kComponent = "mta-sts";

std::string normalise(std::string_view domain) {
  if (!domain.empty() && domain.back() == '.') domain.remove_suffix(1);
  return util::toLower(domain);
}
}  // namespace

// --- HttpsPolicyGetter -------------------------------------------------------------------

HttpsPolicyGetter::HttpsPolicyGetter(uv_loop_t* loop, HttpsGetterSettings settings)
    : client_(loop), settings_(std::move(settings)) {}

void HttpsPolicyGetter::get(const std::string& url, const std::vector<std::string>& addresses,
                            std::function<void(FetchOutcome)> cb) {
  ++requests_;
  net::HttpGetOptions o;
  o.addresses = addresses;
  o.connectPort = settings_.port == 443 ? 0 : settings_.port;
  o.caFile = settings_.caFile;
  o.timeout = settings_.timeout;
  o.maxBodyBytes = settings_.maxBodyBytes;
  client_.get(url, o, [cb = std::move(cb)](net::HttpResult r) {
    FetchOutcome f;
    f.transportOk = r.ok();
    if (!r.ok()) f.error = std::string(net::httpFailureName(r.failure)) + ": " + r.error;
    f.status = r.status;
    f.contentType = std::move(r.contentType);
    f.body = std::move(r.body);
    cb(std::move(f));
  });
}

// --- the SQLite store --------------------------------------------------------------------

queue::StsPolicyRow toRow(const CachedPolicy& p) {
  queue::StsPolicyRow r;
  r.domain = p.domain;
  r.policyId = p.id;
  r.mode = modeName(p.policy.mode);
  r.maxAge = p.policy.maxAge;
  r.mx = p.policy.mx;
  r.text = p.text;
  r.fetchedAt = p.fetchedAt;
  r.expiresAt = p.expiresAt;
  r.checkedAt = p.checkedAt;
  return r;
}

std::optional<CachedPolicy> fromRow(const queue::StsPolicyRow& r) {
  auto mode = parseMode(r.mode);
  if (!mode) return std::nullopt;
  CachedPolicy p;
  p.domain = r.domain;
  p.id = r.policyId;
  p.policy.mode = *mode;
  p.policy.maxAge = r.maxAge;
  p.policy.mx = r.mx;
  p.text = r.text;
  p.fetchedAt = r.fetchedAt;
  p.expiresAt = r.expiresAt;
  p.checkedAt = r.checkedAt;
  return p;
}

std::optional<CachedPolicy> SqlitePolicyStore::load(const std::string& domain) {
  auto r = store_.loadStsPolicy(domain);
  if (!r) {
    util::logWarn(kComponent, "cannot load the cached policy of " + domain + ": " + r.error().message);
    return std::nullopt;
  }
  if (!r->has_value()) return std::nullopt;
  return fromRow(**r);
}

void SqlitePolicyStore::save(const CachedPolicy& policy) {
  if (auto r = store_.saveStsPolicy(toRow(policy)); !r)
    util::logWarn(kComponent, "cannot save the policy of " + policy.domain + ": " + r.error().message);
}

void SqlitePolicyStore::touch(const std::string& domain, int64_t checkedAt) {
  if (auto r = store_.touchStsPolicy(domain, checkedAt); !r)
    util::logWarn(kComponent, "cannot update the policy of " + domain + ": " + r.error().message);
}

// --- StsFetcher --------------------------------------------------------------------------

struct StsFetcher::Discovery {
  std::vector<Callback> waiters;
  std::string id;                      // the TXT id being fetched
  std::vector<std::string> addresses;  // of mta-sts.<domain>, AAAA then A
  int hostLookups = 0;                 // still running
  std::string lookupErrors;
};

StsFetcher::StsFetcher(uv_loop_t* loop, dns::Resolver& resolver, PolicyGetter& getter, const util::Clock& clock,
                       Settings settings, PolicyStore* store)
    : resolver_(resolver),
      getter_(getter),
      clock_(clock),
      settings_(settings),
      store_(store),
      later_(loop),
      alive_(std::make_shared<bool>(true)) {}

StsFetcher::~StsFetcher() { *alive_ = false; }

const DomainState* StsFetcher::state(const std::string& domain) const {
  auto it = states_.find(normalise(domain));
  return it == states_.end() ? nullptr : &it->second;
}

DomainState& StsFetcher::stateFor(const std::string& domain) {
  auto it = states_.find(domain);
  if (it != states_.end()) return it->second;
  DomainState s;
  if (store_) s.policy = store_->load(domain);  // first use since start: what SQLite kept
  return states_.emplace(domain, std::move(s)).first->second;
}

void StsFetcher::answerLater(Callback cb, PolicyAnswer a) {
  pending_.emplace_back(std::move(cb), std::move(a));
  later_.start(std::chrono::milliseconds(0), [this] {
    auto run = std::move(pending_);
    pending_.clear();
    std::weak_ptr<bool> alive = alive_;
    for (auto& [fn, answer] : run) {
      auto guard = alive.lock();
      if (!guard || !*guard) return;
      fn(answer);
    }
  });
}

void StsFetcher::policyFor(const std::string& rawDomain, Callback cb) {
  const std::string domain = normalise(rawDomain);
  DomainState& s = stateFor(domain);
  const Step step = plan(s, now(), settings_);
  if (step == Step::Discover) {
    auto& d = running_[domain];
    const bool start = !d;
    if (start) d = std::make_unique<Discovery>();
    d->waiters.push_back(std::move(cb));
    if (start) discover(domain);
    return;
  }
  ++stats_.answers;
  ++stats_.fromMemory;
  PolicyAnswer a;
  a.domain = domain;
  a.policy = current(s, now());
  a.source = a.policy ? "cache" : "none";
  answerLater(std::move(cb), std::move(a));
  if (step == Step::AnswerAndRefresh && !running_.count(domain)) {
    running_[domain] = std::make_unique<Discovery>();
    discover(domain);
  }
}

void StsFetcher::recheck(const std::string& rawDomain, Callback cb) {
  const std::string domain = normalise(rawDomain);
  stateFor(domain);
  auto& d = running_[domain];
  const bool start = !d;
  if (start) d = std::make_unique<Discovery>();
  d->waiters.push_back(std::move(cb));
  if (start) discover(domain);
}

void StsFetcher::discover(const std::string& domain) {
  ++stats_.txtLookups;
  std::weak_ptr<bool> alive = alive_;
  // The resolver follows a CNAME at "_mta-sts" (3.1: "senders MUST follow the CNAME
  // pointers"). Its callback never runs inside query().
  resolver_.query(txtName(domain), dns::QType::TXT, [this, alive, domain](const dns::Answer& a) {
    if (auto g = alive.lock(); !g || !*g) return;
    onTxtAnswer(domain, a);
  });
}

void StsFetcher::onTxtAnswer(const std::string& domain, const dns::Answer& a) {
  DomainState& s = stateFor(domain);
  const TxtOutcome txt = classifyTxt(a);
  const int64_t checkedBefore = s.policy ? s.policy->checkedAt : 0;
  const TxtDecision d = onTxt(s, domain, txt, now(), settings_);
  if (store_ && s.policy && s.policy->checkedAt != checkedBefore) store_->touch(domain, s.policy->checkedAt);
  if (d.fetch) return resolveHost(domain, d.id);
  std::string detail = txt.kind == TxtOutcome::Kind::Found ? "" : txt.detail;
  if (txt.kind == TxtOutcome::Kind::Failed && current(s, now()))
    util::logWarn(kComponent, "refresh of the policy of " + domain + " failed: " + txt.detail);
  std::string source = current(s, now()) ? (txt.kind == TxtOutcome::Kind::Found ? "unchanged" : "cache") : "none";
  finish(domain, std::move(source), std::move(detail));
}

void StsFetcher::resolveHost(const std::string& domain, const std::string& id) {
  auto it = running_.find(domain);
  if (it == running_.end()) return;
  Discovery& d = *it->second;
  d.id = id;
  d.hostLookups = 2;
  const std::string host = policyHost(domain);
  std::weak_ptr<bool> alive = alive_;
  auto done = [this, alive, domain](bool v6, const dns::Answer& a) {
    if (auto g = alive.lock(); !g || !*g) return;
    auto it2 = running_.find(domain);
    if (it2 == running_.end()) return;
    Discovery& dd = *it2->second;
    if (a.status == dns::Status::Ok) {
      // IPv6 first, as delivery orders MX addresses (routing.h).
      dd.addresses.insert(v6 ? dd.addresses.begin() : dd.addresses.end(), a.addresses.begin(), a.addresses.end());
    } else if (a.status != dns::Status::NoData) {
      dd.lookupErrors += std::string(dd.lookupErrors.empty() ? "" : ", ") + (v6 ? "AAAA " : "A ") +
                         dns::statusName(a.status);
    }
    if (--dd.hostLookups > 0) return;
    fetch(domain, dd.id, std::move(dd.addresses));
  };
  resolver_.query(host, dns::QType::AAAA, [done](const dns::Answer& a) { done(true, a); });
  resolver_.query(host, dns::QType::A, [done](const dns::Answer& a) { done(false, a); });
}

void StsFetcher::fetch(const std::string& domain, const std::string& id, std::vector<std::string> addresses) {
  std::weak_ptr<bool> alive = alive_;
  auto handle = [this, alive, domain, id](FetchOutcome f) {
    if (auto g = alive.lock(); !g || !*g) return;
    DomainState& s = stateFor(domain);
    const FetchDecision d = onFetch(s, domain, id, f, now());
    if (d.stored) {
      ++stats_.stored;
      if (store_) store_->save(*d.policy);
      util::logInfo(kComponent, "policy of " + domain + " id " + id + ": mode " + modeName(d.policy->policy.mode) +
                                    ", max_age " + std::to_string(d.policy->policy.maxAge));
      return finish(domain, "fetched", "");
    }
    ++stats_.fetchFailures;
    // 3.3 / 10.2: alert on a failed refresh of a policy in force, unless its mode is none.
    if (d.warn) {
      util::logWarn(kComponent, "refresh of the policy of " + domain + " failed (the cached policy id " +
                                    current(s, now())->id + " stays in force): " + d.error);
    } else {
      util::logInfo(kComponent, "no policy fetched for " + domain + ": " + d.error);
    }
    finish(domain, current(s, now()) ? "cache" : "none", d.error);
  };
  std::string refused;
  if (!destinations_.allowPrivate) {
    std::vector<std::string> allowed;
    for (auto& a : addresses) {
      const AddressKind k = classifyAddress(a, destinations_.ownAddresses);
      if (k == AddressKind::Public) {
        allowed.push_back(std::move(a));
      } else if (refused.empty()) {
        refused = a + " is " + std::string(describe(k));
      }
    }
    addresses = std::move(allowed);
  }
  if (addresses.empty() && !refused.empty()) {
    FetchOutcome f;
    f.error = "no usable address for " + policyHost(domain) + ": " + refused +
              " (delivery.allow_private_destinations is false)";
    return handle(std::move(f));
  }
  if (addresses.empty()) {
    auto it = running_.find(domain);
    FetchOutcome f;
    f.error = "no address for " + policyHost(domain) +
              (it != running_.end() && !it->second->lookupErrors.empty() ? " (" + it->second->lookupErrors + ")" : "");
    return handle(std::move(f));
  }
  ++stats_.fetches;
  getter_.get(policyUrl(domain), addresses, std::move(handle));
}

void StsFetcher::finish(const std::string& domain, std::string source, std::string detail) {
  auto it = running_.find(domain);
  if (it == running_.end()) return;
  auto waiters = std::move(it->second->waiters);
  running_.erase(it);
  const DomainState& s = stateFor(domain);
  for (auto& cb : waiters) {
    ++stats_.answers;
    PolicyAnswer a;
    a.domain = domain;
    a.policy = current(s, now());
    a.source = source;
    a.detail = detail;
    // finish() runs in a resolver or HTTP callback, never inside policyFor(); still, the
    // answers go through the loop so that a callback that destroys us is handled in one place.
    answerLater(std::move(cb), std::move(a));
  }
}

}  // namespace subrelay::delivery::mtasts
