// delivery::Scheduler (scheduler.h).
#include "delivery/scheduler.h"

#include <algorithm>

#include "delivery/dsn.h"
#include "smtp/command.h"
#include "message/headers.h"
#include "metrics/server_metrics.h"
#include "policy/suppression.h"
#include "util/log.h"
#include "util/strings.h"
#include "util/time_fmt.h"

namespace subrelay::delivery {

using SteadyTime = std::chrono::steady_clock::time_point;

struct Scheduler::Job {
  struct Message {
    queue::DueMessage due;
    std::shared_ptr<const std::string> content;  // read once, when the first job needs it
  };
  std::shared_ptr<Message> meta;
  // The route key: the recipient domain, or for relayed mail "relay:ID#GENERATION" (all
  // of a message's relayed recipients, whatever their domains, go in one transaction).
  std::string domain;
  TlsPolicy tls = TlsPolicy::Opportunistic;
  std::vector<queue::DueRecipient> rcpts;
  std::shared_ptr<const RelaySet> relay;  // set: through these upstreams, not the MX
  std::string tlsWhy;  // MX delivery: the TLS policy and where it came from, for the record
};

struct Scheduler::DomainState {
  std::deque<Job> waiting;  // for the route
  bool resolving = false;
  std::string destination;  // key, when the route is fresh
  // The key for jobs that ignore the domain's TLS policy ("TLS-Required: No"); the same as
  // destination when no policy was looked up.
  std::string plainDestination;
  SteadyTime resolvedAt{};
  // The route while Transport::lookupTlsPolicy runs (resolving stays true meanwhile).
  std::optional<Route> policyRoute;
};

struct Scheduler::Destination {
  std::string key;
  Route route;  // the latest route of any of its domains
  TlsPolicy tls = TlsPolicy::Opportunistic;
  std::shared_ptr<const RelaySet> relay;  // route.hosts[i] is relay->hosts[i]
  std::optional<TlsDecision> decision;    // the domain's TLS policy, hosts as in route
  std::deque<Job> jobs;
  uint32_t sessions = 0;
  uint32_t working = 0;  // sessions that reached Ready at least once and are still open
  // A session failed before it was ever ready and none works: open no more connections;
  // when the last one ends, the waiting jobs are deferred together. Cleared by a session
  // that becomes ready. Without it, parallel sessions failing one after another (a relay
  // refusing our login) would each start a replacement, for ever.
  bool unreachable = false;
  // TLS-RPT: the Policy Domains whose mail this destination carries (a TLS failure of one
  // of its sessions is reported to each). Bounded by kMaxRptDomains.
  std::set<std::string> rptDomains;
};

struct Scheduler::Session {
  enum class State { Connecting, Busy, Idle, Quitting };
  SessionId id = 0;
  std::string destination;
  Route route;  // as when the session started
  TlsPolicy tls = TlsPolicy::Opportunistic;
  std::optional<TlsDecision> decision;
  uint16_t port = 25;
  std::shared_ptr<const RelaySet> relay;
  size_t host = 0, addr = 0;  // the next address to try
  State state = State::Connecting;
  bool everReady = false;
  std::optional<Job> job;
  ConnectRequest current;
  std::string tlsVersion, tlsCipher;
  SteadyTime readyAt{};
  SteadyTime txnStarted{};
  SteadyTime idleSince{};
  bool aborted = false;
  SessionFailure lastFailure;
  std::set<std::string> rptCounted;  // TLS-RPT: domains whose success this session counted
};

namespace {

int64_t unixNow(const util::Clock& c) { return util::unixSeconds(c.wallNow()); }

constexpr size_t kMaxRptDomains = 64;

// RFC 8460 4.4: the policy a session to host `host` ran under (a domain whose policy was
// looked up and found nothing: "no-policy-found").
tlsrpt::Policy reportPolicy(const std::optional<TlsDecision>& decision, size_t host) {
  if (decision && host < decision->hosts.size()) return decision->hosts[host].report;
  return tlsrpt::Policy{"no-policy-found", {}, {}};
}

// RFC 8689 4.2.1 applies to messages with a return path; a bounce of a REQUIRETLS message
// carries the option where it can but is never held back by it (section 5).
bool requiresTls(const queue::DueMessage& m) {
  return m.tlsRequirement == queue::TlsRequirement::Required && !m.mailFrom.empty();
}

constexpr auto kWakeInterval = std::chrono::milliseconds(50);

}  // namespace

std::string ConnectRequest::label() const {
  if (ip.empty()) return "";
  std::string a = ip.find(':') != std::string::npos ? "[" + ip + "]" : ip;
  return host + " [" + a + "]:" + std::to_string(port);
}

std::string ConnectRequest::relayPolicy() const {
  if (relay.empty()) return "";
  return std::string("relay ") + (tls == TlsPolicy::Verify ? "verify" : "required") + (implicitTls ? " implicit" : "") +
         " (" + relay + ")";
}

namespace {

std::string attemptPolicy(const Scheduler::Job& job, const ConnectRequest* via);

}  // namespace

std::string relayDestinationKey(const RelaySet& relay, uint64_t generation) {
  std::string key = "relay|" + relay.id + "#" + std::to_string(generation);
  for (const auto& h : relay.hosts) {
    key += "|" + h.host + ":" + std::to_string(h.port) + (h.implicitTls ? "/implicit" : "/starttls");
    if (!h.verify) key += "/noverify";
  }
  return key;
}

std::string destinationKey(const Route& route, TlsPolicy tls) {
  std::vector<std::string> names;
  for (const auto& h : route.hosts)
    if (!h.addresses.empty()) names.push_back(util::toLower(h.name));
  std::sort(names.begin(), names.end());
  names.erase(std::unique(names.begin(), names.end()), names.end());
  std::string key = tls == TlsPolicy::Verify ? "verify" : tls == TlsPolicy::Required ? "required" : "may";
  for (const auto& n : names) key += "|" + n;
  return key;
}

std::string destinationKey(const Route& route, TlsPolicy tls, const TlsDecision& decision) {
  std::vector<std::string> parts;
  for (const auto& h : decision.hosts)
    parts.push_back(util::toLower(h.host) + "=" + hostTlsName(h.tls) + (h.label.empty() ? "" : "/" + h.label));
  std::sort(parts.begin(), parts.end());
  std::string key = destinationKey(route, tls) + "|policy";
  for (const auto& p : parts) key += "|" + p;
  return key;
}

Scheduler::Scheduler(queue::DeliveryQueue& queue, Transport& transport, const util::Clock& clock,
                     SchedulerSettings settings, uint64_t seed)
    : queue_(queue), transport_(transport), clock_(clock), settings_(std::move(settings)), rng_(seed) {}

Scheduler::~Scheduler() = default;

void Scheduler::reconfigure(SchedulerSettings settings) {
  settings_ = std::move(settings);
  ++generation_;
}

const char* policyName(TlsPolicy p) {
  return p == TlsPolicy::Verify ? "verify" : p == TlsPolicy::Required ? "required" : "opportunistic";
}

std::shared_ptr<const RelaySet> relayFor(const SchedulerSettings& s, const std::string& account,
                                         const std::string& domain) {
  // Postfix's order: transport_maps (a domain's route) before
  // sender_dependent_relayhost_maps (the tenant's) before relayhost.
  if (auto it = s.domainRelays.find(domain); it != s.domainRelays.end()) return it->second;
  if (auto it = s.accountRelays.find(account); it != s.accountRelays.end()) return it->second;
  return s.relay;
}

TlsPolicy tlsFor(const SchedulerSettings& s, const std::string& domain) {
  auto it = s.tlsOverrides.find(domain);
  return it == s.tlsOverrides.end() ? s.tls : it->second;
}

bool domainPolicyApplies(const SchedulerSettings& s, const std::string& domain, bool relay) {
  return !relay && s.recipientTlsPolicy && !s.tlsOverrides.count(domain) && !isAddressLiteralDomain(domain);
}

Route routeAsUsed(const SchedulerSettings& s, Route resolved, bool relay) {
  if (!s.trustDnssec) {
    resolved.mxSecure = false;
    for (auto& h : resolved.hosts) h.addressesSecure = false;
  }
  if (relay) {
    // A configured relay is trusted: company relays sit on 10.x or loopback, so the
    // destination policy is not applied. Its trouble is never the recipients' fault.
    if (resolved.status == RouteStatus::PermFail) {
      resolved.status = RouteStatus::TempFail;
      resolved.enhanced = "4.4.3";
    }
    return resolved;
  }
  // delivery.allow_private_destinations: internal, loopback and our own addresses are no
  // destination for a tenant's mail (address literals included).
  return applyDestinationPolicy(std::move(resolved), s.destinations);
}

// ---- leasing ------------------------------------------------------------------------

void Scheduler::tick() {
  if (stopping_) return;
  pull();
  processDsns();
  checkDeadlines();
  dispatch();
}

void Scheduler::wake() {
  if (stopping_) return;
  // Many commits in a burst: one lease transaction per 50 ms is plenty.
  if (clock_.now() - lastPull_ < kWakeInterval) return;
  pull();
  dispatch();
}

bool Scheduler::refillWanted() const {
  return moreDue_ && !stopping_ && queuedJobs_ < settings_.leaseBatch / 2;
}

void Scheduler::refill() {
  if (stopping_) return;
  pull();
  dispatch();
}

void Scheduler::pull() {
  lastPull_ = clock_.now();
  if (queuedJobs_ >= settings_.maxQueuedJobs) return;
  auto due = queue_.leaseDue(unixNow(clock_), settings_.leaseBatch);
  if (!due.ok()) {
    util::logError("delivery", "cannot read the queue: " + due.error().message);
    return;
  }
  moreDue_ = due.value().size() >= settings_.leaseBatch;
  for (auto& m : due.value()) {
    auto meta = std::make_shared<Job::Message>();
    meta->due = std::move(m);
    leased_ += meta->due.recipients.size();
    // One job per recipient domain: those recipients share the route and one transaction.
    // Relayed recipients share the relay instead, whatever their domains.
    std::map<std::string, Job> byRoute;
    for (const auto& r : meta->due.recipients) {
      const std::string domain = util::toLower(util::domainPart(r.address));
      auto relay = relayFor(meta->due.account, domain);
      const std::string key = relay ? "relay:" + relay->id + "#" + std::to_string(generation_) : domain;
      auto [it, inserted] = byRoute.try_emplace(key);
      Job& j = it->second;
      if (inserted) {
        j.meta = meta;
        j.domain = key;
        j.relay = relay;
        // A relay's own tls/verify decide per host (connectNext); the job's value only
        // has to match its destination's. RFC 8689: REQUIRETLS needs a verified
        // certificate (4.2.1 step 4); "TLS-Required: No" asks for TLS when offered and
        // nothing more, whatever the domain's policy (4.2.2).
        j.tls = relay ? TlsPolicy::Verify : tlsFor(domain);
        j.tlsWhy = std::string(policyName(j.tls)) +
                   (settings_.tlsOverrides.count(domain) ? " (tls_policy_overrides)" : " (delivery.tls)");
        if (!relay && requiresTls(meta->due)) {
          j.tls = TlsPolicy::Verify;
          j.tlsWhy = "verify (REQUIRETLS)";
        }
        if (!relay && meta->due.tlsRequirement == queue::TlsRequirement::Optional) {
          j.tls = TlsPolicy::Opportunistic;
          j.tlsWhy = "opportunistic (TLS-Required: No)";
        }
      }
      j.rcpts.push_back(r);
    }
    for (auto& [key, job] : byRoute) {
      ++queuedJobs_;
      routeJob(std::move(job));
    }
  }
}

void Scheduler::routeJob(Job job) {
  // user@[192.0.2.1]: the address literal is the route (RFC 5321 4.1.3), no DNS.
  if (auto literal = job.relay ? std::nullopt : routeForAddressLiteral(job.domain)) {
    auto& ds = domains_[job.domain];
    if (!ds) ds = std::make_unique<DomainState>();
    ds->waiting.push_back(std::move(job));
    std::string domain = ds->waiting.back().domain;
    onRoute(domain, std::move(*literal));
    return;
  }
  auto& ds = domains_[job.domain];
  if (!ds) ds = std::make_unique<DomainState>();
  const std::string& cached = followsDomainPolicy(job) ? ds->destination : ds->plainDestination;
  if (!cached.empty() && clock_.now() - ds->resolvedAt < settings_.routeTtl) {
    auto it = destinations_.find(cached);
    if (it != destinations_.end() && it->second->tls == job.tls) {
      it->second->jobs.push_back(std::move(job));
      feedIdle(*it->second);
      return;
    }
  }
  ds->waiting.push_back(std::move(job));
  if (ds->resolving) return;
  const Job& j = ds->waiting.back();
  if (!j.relay) {
    ds->resolving = true;
    transport_.resolve(j.domain);
    return;
  }
  std::vector<std::string> names;
  for (const auto& h : j.relay->hosts) names.push_back(h.host);
  if (auto direct = relayRouteWithoutDns(names)) {
    onRoute(j.domain, std::move(*direct));
    return;
  }
  ds->resolving = true;
  transport_.resolveRelay(j.domain, names);
}

void Scheduler::onRoute(const std::string& domain, Route resolved) {
  auto dit = domains_.find(domain);
  if (dit == domains_.end()) return;
  DomainState& ds = *dit->second;
  ds.resolving = false;
  std::deque<Job> jobs = std::move(ds.waiting);
  ds.waiting.clear();
  std::shared_ptr<const RelaySet> relay = jobs.empty() ? nullptr : jobs.front().relay;
  Route route = routeAsUsed(settings_, std::move(resolved), relay != nullptr);
  if (route.status != RouteStatus::Ok) {
    const bool perm = route.status == RouteStatus::PermFail;
    util::logInfo("delivery", "route domain=" + domain + " result=" + (perm ? "failed" : "deferred") + " detail=\"" +
                                  util::sanitizeForLog(route.detail) + "\"");
    const std::string enhanced = route.enhanced.empty() ? (perm ? "5.1.2" : "4.4.3") : route.enhanced;
    for (const auto& j : jobs) {
      failJob(j, perm ? smtp::Outcome::PermFail : smtp::Outcome::TempFail, 0, enhanced, route.detail, nullptr);
      --queuedJobs_;
    }
    ds.destination.clear();
    ds.plainDestination.clear();
    if (ds.waiting.empty()) domains_.erase(dit);
    dispatch();
    return;
  }
  // The domain's own TLS policy (DANE, MTA-STS), unless the operator set one for it or
  // every job ignores it. The jobs wait (resolving stays set) for onTlsPolicy.
  const bool anyFollows =
      std::any_of(jobs.begin(), jobs.end(), [&](const Job& j) { return followsDomainPolicy(j); });
  const bool policyApplies = domainPolicyApplies(settings_, domain, relay != nullptr);
  ds.waiting = std::move(jobs);
  if (policyApplies && anyFollows) {
    ds.resolving = true;
    ds.policyRoute = route;
    transport_.lookupTlsPolicy(domain, route);
    return;
  }
  // Only "TLS-Required: No" jobs: their destination must not serve the domain's other jobs.
  placeJobs(domain, route, std::nullopt, /*plainOnly=*/policyApplies);
}

bool Scheduler::followsDomainPolicy(const Job& job) const {
  // RFC 8689 4.2.2: with "TLS-Required: No" the sender asks that recipient-side policy
  // mechanisms such as MTA-STS and DANE be ignored.
  return !job.relay && job.meta->due.tlsRequirement != queue::TlsRequirement::Optional;
}

void Scheduler::onTlsPolicy(const std::string& domain, const TlsPolicyInputs& inputs) {
  auto dit = domains_.find(domain);
  if (dit == domains_.end() || !dit->second->policyRoute) return;
  DomainState& ds = *dit->second;
  Route route = std::move(*ds.policyRoute);
  ds.policyRoute.reset();
  ds.resolving = false;
  TlsDecision decision = decideTls(domain, route, inputs);
  {
    // One count per lookup: what applied to the domain (DANE wins over MTA-STS per host).
    const char* kind = "none";
    for (const auto& h : decision.hosts) {
      if (h.tls == HostTls::Dane) {
        kind = "dane";
        break;
      }
      if (h.report.type == "sts")
        kind = inputs.sts && inputs.sts->policy.mode == mtasts::Mode::Enforce ? "mta-sts-enforce" : "mta-sts-testing";
    }
    metrics::server().tlsPolicyDecisions.with(kind, decision.anyUsable() ? "yes" : "no").inc();
  }
  // RFC 8689 4.2.1 step 2, conservatively for the whole route: validated when every host
  // that may be used is (a secure MX RRset, or an MTA-STS policy listing it).
  bool validated = decision.anyUsable();
  for (const auto& h : decision.hosts)
    if (h.tls != HostTls::Unusable && !h.validated) validated = false;
  route.validated = validated;
  placeJobs(domain, route, decision);
}

void Scheduler::placeJobs(const std::string& domain, const Route& route, const std::optional<TlsDecision>& decision,
                          bool plainOnly) {
  auto dit = domains_.find(domain);
  if (dit == domains_.end()) return;
  DomainState& ds = *dit->second;
  std::deque<Job> jobs = std::move(ds.waiting);
  ds.waiting.clear();
  if (!plainOnly) ds.destination.clear();
  ds.plainDestination.clear();
  // A policy that changes nothing (no TLSA, no MTA-STS) keeps the usual destination, shared
  // with domains that have none.
  bool trivial = true;
  if (decision)
    for (const auto& h : decision->hosts)
      if (h.tls != HostTls::Default || !h.label.empty()) trivial = false;
  const bool anyFollows =
      decision && std::any_of(jobs.begin(), jobs.end(), [&](const Job& j) { return followsDomainPolicy(j); });
  if (settings_.tlsRpt && anyFollows) {
    // RFC 8460 4.3.2: hosts the policy rules out (a failed TLSA lookup, an MX host the
    // MTA-STS policy does not list), once per routing of the domain.
    for (const auto& h : decision->hosts)
      if (h.reportFailure) tlsRpt_.failure(unixNow(clock_), domain, h.report, *h.reportFailure, h.host, "");
  }
  bool rechecked = false;
  for (auto& j : jobs) {
    const bool follows = decision && followsDomainPolicy(j);
    if (follows && !decision->anyUsable()) {
      const bool stsRuledOut = std::any_of(decision->hosts.begin(), decision->hosts.end(), [](const HostTlsDecision& h) {
        return h.tls == HostTls::Unusable && h.report.type == "sts";
      });
      if (stsRuledOut && !rechecked) {
        rechecked = true;
        transport_.recheckStsPolicy(domain);
      }
      // RFC 8461 5: "SHOULD treat such failures as transient"; RFC 7672 2.2: "delayed
      // delivery". Never a bounce: the policy may change by the next attempt.
      util::logInfo("delivery", "tls-policy domain=" + domain + " result=deferred detail=\"" +
                                    util::sanitizeForLog(decision->unusableWhy()) + "\"");
      failJob(j, smtp::Outcome::TempFail, 0, "4.7.5",
              "no MX host of " + domain + " is usable under its TLS policy: " + decision->unusableWhy(), nullptr);
      --queuedJobs_;
      continue;
    }
    if (requiresTls(j.meta->due)) {
      std::string why;
      if (!j.relay && !route.validated)
        why = "REQUIRETLS: the MX hosts of " + j.domain +
              " are not validated by DNSSEC or MTA-STS, so the message may not go to them (RFC 8689 4.2.1)";
      if (j.relay)
        for (const auto& h : j.relay->hosts)
          if (!h.verify) why = "REQUIRETLS: " + h.origin + " has verify false; the message needs a verified certificate";
      if (!why.empty()) {
        failJob(j, smtp::Outcome::PermFail, 0, "5.7.10", why, nullptr);
        --queuedJobs_;
        continue;
      }
    }
    const bool withPolicy = follows && !trivial;
    const std::string key = j.relay      ? relayDestinationKey(*j.relay, generation_)
                            : withPolicy ? destinationKey(route, j.tls, *decision)
                                         : destinationKey(route, j.tls);
    auto& d = destinations_[key];
    if (!d) {
      d = std::make_unique<Destination>();
      d->key = key;
      d->tls = j.tls;
      d->relay = j.relay;
    }
    d->route = route;
    if (settings_.tlsRpt && follows && d->rptDomains.size() < kMaxRptDomains) d->rptDomains.insert(domain);
    if (withPolicy)
      d->decision = decision;
    else
      d->decision.reset();
    if (plainOnly) {
      ds.plainDestination = key;
    } else if (!decision || trivial) {
      ds.destination = key;
      ds.plainDestination = key;
    } else {
      (follows ? ds.destination : ds.plainDestination) = key;
    }
    d->jobs.push_back(std::move(j));
    feedIdle(*d);
  }
  ds.resolvedAt = clock_.now();
  dispatch();
}

// ---- connections ----------------------------------------------------------------------

// Round-robin over destinations with work: each round gives every destination that wants
// one more connection one, until the total limit. A destination with thousands of jobs
// cannot keep a small one from getting its first connection.
void Scheduler::dispatch() {
  if (stopping_) return;
  for (auto& [key, d] : destinations_) feedIdle(*d);
  for (;;) {
    if (sessions_.size() >= settings_.maxConnections) return;
    std::vector<Destination*> wanting;
    for (auto& [key, d] : destinations_) {
      const uint32_t busy = d->sessions;  // connecting or carrying a job
      // More connections only while jobs outnumber the connections that will take them.
      const size_t idleWanted = d->jobs.size();
      const uint32_t connecting = busy - std::min(busy, d->working);
      if (d->sessions < settings_.maxPerDestination && idleWanted > connecting && !d->unreachable)
        wanting.push_back(d.get());
    }
    if (wanting.empty()) return;
    // Start after the destination served last.
    auto start = std::find_if(wanting.begin(), wanting.end(), [&](Destination* d) { return d->key > lastServed_; });
    std::rotate(wanting.begin(), start, wanting.end());
    for (Destination* d : wanting) {
      if (sessions_.size() >= settings_.maxConnections) return;
      lastServed_ = d->key;
      openSession(*d);
    }
  }
}

void Scheduler::openSession(Destination& d) {
  auto s = std::make_unique<Session>();
  s->id = nextId_++;
  s->destination = d.key;
  s->route = d.route;
  s->tls = d.tls;
  s->decision = d.decision;
  s->port = settings_.port;
  s->relay = d.relay;
  ++d.sessions;
  Session& ref = *s;
  sessions_[s->id] = std::move(s);
  metrics::server().deliveryConnections.get().set(static_cast<double>(sessions_.size()));
  connectNext(ref);
}

// The next address of the current MX, else the first of the next MX (RFC 5321 5.1: every
// address of every MX, in order, until one accepts a connection). Returns with the
// session ended when none is left.
void Scheduler::connectNext(Session& s) {
  for (;;) {
    if (s.host >= s.route.hosts.size()) {
      endSession(s.id);
      return;
    }
    const auto& h = s.route.hosts[s.host];
    // A host the domain's TLS policy rules out (MTA-STS enforce, a failed TLSA lookup).
    const bool unusable = s.decision && s.host < s.decision->hosts.size() &&
                          s.decision->hosts[s.host].tls == HostTls::Unusable;
    if (!unusable && s.addr < h.addresses.size()) break;
    ++s.host;
    s.addr = 0;
  }
  const auto& h = s.route.hosts[s.host];
  s.current = ConnectRequest{s.id, h.name, h.addresses[s.addr++], s.port, s.tls};
  if (s.decision && s.host < s.decision->hosts.size()) {
    const HostTlsDecision& hd = s.decision->hosts[s.host];
    s.current.policy = hd.label;
    if (hd.tls == HostTls::StsVerify) {
      // RFC 8461 4.2: a certificate valid for the MX host name, from a trusted CA.
      s.current.tls = TlsPolicy::Verify;
    } else if (hd.tls == HostTls::Dane && hd.dane) {
      // RFC 7672 2.2: TLS is mandatory; the records authenticate the server. A job that
      // needs a verified certificate (tls verify, REQUIRETLS) keeps PKIX verification when
      // no record is usable, as DANE would then authenticate nothing.
      const bool usable = std::any_of(hd.dane->tlsa.begin(), hd.dane->tlsa.end(), tls::isUsable);
      if (usable || s.tls != TlsPolicy::Verify) {
        s.current.tls = TlsPolicy::Required;
        s.current.dane = hd.dane;
      }
    }
  }
  if (s.relay && s.host < s.relay->hosts.size()) {
    const RelayHost& r = s.relay->hosts[s.host];
    s.current.host = r.host;
    s.current.port = r.port;
    // Always TLS; verify:false still refuses clear text (and carries no credentials).
    s.current.tls = r.verify ? TlsPolicy::Verify : TlsPolicy::Required;
    s.current.implicitTls = r.implicitTls;
    s.current.auth = r.verify ? r.auth : nullptr;
    s.current.relay = r.origin;
  }
  s.state = Session::State::Connecting;
  s.tlsVersion.clear();
  s.tlsCipher.clear();
  transport_.connect(s.current);
}

void Scheduler::onReady(SessionId id, const std::string& tlsVersion, const std::string& tlsCipher) {
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return;
  Session& s = *it->second;
  s.tlsVersion = tlsVersion;
  s.tlsCipher = tlsCipher;
  if (!s.everReady) {
    s.everReady = true;
    s.readyAt = clock_.now();
    if (auto d = destinations_.find(s.destination); d != destinations_.end()) {
      ++d->second->working;
      d->second->unreachable = false;
    }
  }
  takeJob(s);
}

void Scheduler::feedIdle(Destination& d) {
  if (d.jobs.empty()) return;
  std::vector<Session*> idle;
  for (auto& [id, s] : sessions_)
    if (s->state == Session::State::Idle && s->destination == d.key) idle.push_back(s.get());
  for (Session* s : idle) {
    if (d.jobs.empty()) return;
    takeJob(*s);
  }
}

void Scheduler::takeJob(Session& s) {
  auto dit = destinations_.find(s.destination);
  const bool tooOld = clock_.now() - s.readyAt >= settings_.connectionReuse;
  if (!stopping_ && !tooOld && !s.aborted && dit != destinations_.end() && dit->second->jobs.empty() &&
      settings_.idleLinger.count() > 0) {
    // Nothing to send yet: linger for the next job (tick() ends the wait).
    if (s.state != Session::State::Idle) s.idleSince = clock_.now();
    s.state = Session::State::Idle;
    return;
  }
  if (stopping_ || tooOld || s.aborted || dit == destinations_.end() || dit->second->jobs.empty()) {
    s.state = Session::State::Quitting;
    transport_.quit(s.id);
    return;
  }
  Destination& d = *dit->second;
  s.job = std::move(d.jobs.front());
  d.jobs.pop_front();
  --queuedJobs_;
  Job::Message& m = *s.job->meta;
  if (!m.content) {
    auto c = queue_.content(m.due.id);
    if (!c.ok()) {
      util::logError("delivery", "cannot read message id=" + m.due.id + ": " + c.error().message);
      failJob(*s.job, smtp::Outcome::TempFail, 0, "4.3.0", "local error reading the queue: " + c.error().message,
              nullptr);
      s.job.reset();
      s.state = Session::State::Quitting;
      transport_.quit(s.id);
      return;
    }
    m.content = std::make_shared<const std::string>(std::move(c.value()));
  }
  smtp::OutboundMessage om;
  om.mailFrom = m.due.mailFrom;
  for (const auto& r : s.job->rcpts) om.recipients.push_back(r.address);
  om.content = m.content;
  om.eightBit = m.due.eightBit;
  om.smtputf8 = m.due.smtputf8;
  om.requireTls = m.due.tlsRequirement == queue::TlsRequirement::Required;
  // RFC 3461 5.2.1: the DSN parameters go on to a next hop that offers DSN.
  om.dsnRet = smtp::retValue(static_cast<smtp::DsnRet>(static_cast<int>(m.due.dsnRet)));
  om.envId = m.due.dsnEnvid;
  for (const auto& r : s.job->rcpts)
    om.rcptDsn.push_back(smtp::OutboundMessage::RcptDsn{static_cast<uint8_t>(r.dsn.notify), r.dsn.orcpt});
  s.state = Session::State::Busy;
  s.txnStarted = clock_.now();
  transport_.send(s.id, std::move(om));
}

void Scheduler::onTransactionDone(SessionId id, const std::vector<smtp::RecipientResult>& results, bool canContinue) {
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return;
  Session& s = *it->second;
  if (!s.job) return;
  Job job = std::move(*s.job);
  s.job.reset();
  if (settings_.tlsRpt && !s.tlsVersion.empty() && !job.relay && s.rptCounted.size() < kMaxRptDomains) {
    // RFC 8460 4.2.1: a session that negotiated TLS under the domain's policy, counted once
    // per session and Policy Domain (the destination knows which domains had a policy
    // looked up).
    auto d = destinations_.find(s.destination);
    if (d != destinations_.end() && d->second->rptDomains.count(job.domain) && followsDomainPolicy(job) &&
        s.rptCounted.insert(job.domain).second)
      tlsRpt_.success(unixNow(clock_), job.domain, reportPolicy(s.decision, s.host));
  }
  record(job, results, s.tlsVersion, s.tlsCipher, &s.current);
  if (job.meta.use_count() == 1) job.meta->content.reset();
  if (!canContinue) {
    s.state = Session::State::Quitting;  // onSessionEnded follows
    return;
  }
  takeJob(s);
}

void Scheduler::onSessionEnded(SessionId id, std::optional<SessionFailure> failure) {
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return;
  Session& s = *it->second;
  if (failure) s.lastFailure = *failure;
  if (settings_.tlsRpt && failure && !s.everReady && !s.relay) {
    // RFC 8460 4.3.1: TLS could not be negotiated with this host (no STARTTLS, a
    // certificate or TLSA mismatch); reported to every Policy Domain the destination serves.
    if (auto f = tlsrpt::classify(failure->stage, failure->enhanced, failure->text)) {
      auto d = destinations_.find(s.destination);
      if (d != destinations_.end())
        for (const auto& domain : d->second->rptDomains)
          tlsRpt_.failure(unixNow(clock_), domain, reportPolicy(s.decision, s.host), *f, s.current.host, s.current.ip);
    }
  }
  // A job without a result (the transport lost it): it must not vanish; defer it.
  if (s.job) {
    const SessionFailure& f = s.lastFailure;
    failJob(*s.job, smtp::Outcome::TempFail, f.code, f.enhanced.empty() ? "4.4.2" : f.enhanced,
            f.text.empty() ? "connection lost" : f.text, &s.current);
    s.job.reset();
  }
  if (s.relay && !s.everReady && failure && !s.current.relay.empty()) {
    // The operator must see a refused login at once: it will not fix itself, and the
    // mail waits (deferred) until the password is corrected.
    if (failure->stage == "auth") {
      util::LogEvent ev(util::LogLevel::Warn, "delivery", "relay-auth-failed");
      ev.field("relay", s.current.relay).mx(s.current.label());
      if (s.current.auth) ev.field("user", s.current.auth->username);
      ev.reply(failure->text)
          .field("hint", "hint", "check " + s.current.relay + ".username and .password_file",
                 util::LogEvent::Style::Quoted);
      ev.emit();
    } else {
      util::LogEvent(util::LogLevel::Info, "delivery", "relay-failover")
          .field("relay", s.current.relay)
          .mx(s.current.label())
          .field("error", "error", failure->text, util::LogEvent::Style::Quoted)
          .emit();
    }
  }
  if (!s.everReady && failure && !stopping_ && !s.aborted) {
    connectNext(s);  // may end the session
    return;
  }
  endSession(id);
}

void Scheduler::endSession(SessionId id) {
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return;
  std::unique_ptr<Session> s = std::move(it->second);
  sessions_.erase(it);
  metrics::server().deliveryConnections.get().set(static_cast<double>(sessions_.size()));
  auto dit = destinations_.find(s->destination);
  if (dit != destinations_.end()) {
    Destination& d = *dit->second;
    --d.sessions;
    if (s->everReady) --d.working;
    // Every address of the route failed before a greeting, and no other connection to the
    // destination works: the jobs waiting for it share this verdict (retried later)
    // instead of each trying the same dead hosts.
    if (!s->everReady && !s->aborted && d.working == 0 && !stopping_) d.unreachable = true;
    if (d.unreachable && d.working == 0 && d.sessions == 0 && !stopping_) {
      const SessionFailure& f = s->lastFailure;
      std::string why = f.text.empty() ? "no reachable mail exchanger" : f.text;
      util::logInfo("delivery", "unreachable destination=" + d.key + " error=\"" + util::sanitizeForLog(why) + "\"");
      while (!d.jobs.empty()) {
        failJob(d.jobs.front(), smtp::Outcome::TempFail, f.code, f.enhanced.empty() ? "4.4.1" : f.enhanced, why,
                &s->current);
        d.jobs.pop_front();
        --queuedJobs_;
      }
    }
    if (d.sessions == 0 && d.jobs.empty()) {
      // Domains pointing here re-resolve next time (their route may have changed).
      for (auto& [name, ds] : domains_)
        if (ds->destination == d.key || ds->plainDestination == d.key) {
          ds->destination.clear();
          ds->plainDestination.clear();
        }
      destinations_.erase(dit);
    }
  }
  for (auto di = domains_.begin(); di != domains_.end();)
    if (di->second->destination.empty() && di->second->waiting.empty() && !di->second->resolving)
      di = domains_.erase(di);
    else
      ++di;
  dispatch();
}

void Scheduler::checkDeadlines() {
  const auto now = clock_.now();
  std::vector<SessionId> late;
  for (auto& [id, s] : sessions_)
    if (s->state == Session::State::Busy && !s->aborted && now - s->txnStarted >= settings_.transactionDeadline)
      late.push_back(id);
  std::vector<SessionId> lingering;
  for (auto& [id, s] : sessions_)
    if (s->state == Session::State::Idle && now - s->idleSince >= settings_.idleLinger) lingering.push_back(id);
  for (SessionId id : lingering) {
    sessions_[id]->state = Session::State::Quitting;
    transport_.quit(id);
  }
  for (SessionId id : late) {
    Session& s = *sessions_[id];
    s.aborted = true;
    const std::string why = "transaction with " + s.current.label() + " exceeded " +
                            std::to_string(settings_.transactionDeadline.count()) + "s";
    util::logInfo("delivery", "abort " + why);
    s.lastFailure = SessionFailure{0, "4.4.2", why};
    transport_.abort(id, why);
  }
}

// ---- results --------------------------------------------------------------------------

void Scheduler::record(const Job& job, const std::vector<smtp::RecipientResult>& results,
                       const std::string& tlsVersion, const std::string& tlsCipher, const ConnectRequest* via) {
  const int64_t now = unixNow(clock_);
  const std::string mx = via ? via->label() : "";
  const std::string relay = via ? via->relay : "";
  const std::string policy = attemptPolicy(job, via);
  const auto& m = job.meta->due;
  for (const auto& rr : results) {
    const queue::DueRecipient* rcpt = nullptr;
    for (const auto& r : job.rcpts)
      if (r.address == rr.recipient) rcpt = &r;
    if (rcpt == nullptr) continue;
    queue::AttemptRecord rec;
    rec.messageId = m.id;
    rec.index = rcpt->index;
    rec.attempt.at = now;
    rec.attempt.mx = mx;
    rec.attempt.tlsVersion = tlsVersion;
    rec.attempt.tlsCipher = tlsCipher;
    rec.attempt.tlsPolicy = policy;
    rec.attempt.code = rr.reply.code;
    // A server's reply: its code, its class deciding (statusFromReply). No reply (DNS,
    // network, a local decision): the local reason's own code.
    if (rr.reply.code != 0)
      rec.attempt.status = queue::EnhancedStatus::parse(statusFromReply(rr.reply.code, rr.reply.enhanced))
                               .value_or(queue::EnhancedStatus{});
    else
      rec.attempt.status = queue::EnhancedStatus::parse(rr.reply.enhanced)
                               .value_or(queue::EnhancedStatus{rr.outcome == smtp::Outcome::PermFail ? 5 : 4, 0, 0});
    // Without a reply the enhanced code still leads, so logs and `queue show` carry it
    // ("5.1.10 domain ... null MX").
    const std::string summary =
        rr.reply.code ? rr.reply.summary()
                      : (rr.reply.enhanced.empty() ? rr.reply.text : rr.reply.enhanced + " " + rr.reply.text);
    rec.attempt.reply = summary;
    rec.lastStatus = rec.attempt.status;
    std::string result;
    switch (rr.outcome) {
      case smtp::Outcome::Delivered:
        rec.newState = queue::RecipientState::Delivered;
        // RFC 3461 5.2.2 (b): NOTIFY=SUCCESS to a next hop without DSN: we owe the
        // "relayed" DSN (queued durably through dsn_pending, processDsns sends it).
        rec.successDsn = wantsSuccessDsn(rcpt->dsn.notify, rr.dsnPassedOn);
        result = "delivered";
        break;
      case smtp::Outcome::PermFail:
        rec.newState = queue::RecipientState::Failed;
        rec.lastError = summary;
        result = "failed";
        break;
      case smtp::Outcome::TempFail: {
        auto next = nextAttemptAt(rcpt->attempts + 1, now, m.receivedAt, settings_.retry);
        if (next) {
          rec.newState = queue::RecipientState::Deferred;
          rec.nextAttempt = *next;
          rec.lastError = summary;
          result = "deferred";
        } else {
          // RFC 3463 4.4.7: delivery time expired.
          rec.newState = queue::RecipientState::Failed;
          rec.lastError = "expired after " + std::to_string(settings_.retry.maxQueueTime.count() / 3600) +
                          " hours in the queue; last error: " + summary;
          rec.lastStatus = queue::EnhancedStatus{4, 4, 7};
          result = "expired";
        }
        break;
      }
    }
    if (result == "failed") rec.suppress = suppressionFor(m.account, rr, summary, now);
    // History rows say failed for an expiry too; its status (4.4.7) tells them apart.
    rec.attempt.result = result == "expired" ? "failed" : result;
    auto& metrics = metrics::server();
    metrics.deliveryAttempts.with(result, tlsVersion.empty() ? "none" : tlsVersion).inc();
    if (rec.newState == queue::RecipientState::Delivered)
      metrics.deliveryLatency.get().observe(static_cast<double>(std::max<int64_t>(0, now - m.receivedAt)));
    // One line per recipient event, joined to "accepted" by the queue id.
    util::LogEvent ev(util::LogLevel::Info, "delivery", result);
    ev.queueId(m.id).recipient(rr.recipient).mx(mx).tls(tlsVersion);
    ev.number("attempt", rcpt->attempts + 1);
    if (rec.newState == queue::RecipientState::Deferred) ev.field("next", util::isoUtc(rec.nextAttempt));
    ev.status(rec.lastStatus.str()).reply(summary).account(m.account);
    if (!relay.empty()) ev.field("relay", relay);
    ev.emit();
    pending_.push_back(std::move(rec));
  }
  leased_ -= std::min(leased_, job.rcpts.size());
  if (pending_.size() >= settings_.flushBatch)
    flush();
  else
    transport_.flushSoon();
}

// A hard bounce (policy::isHardBounce) of an account that keeps a suppression list: the
// row recordAttempts() stores with the failure. Expiries never get here (result "expired").
std::optional<queue::SuppressionRow> Scheduler::suppressionFor(const std::string& account,
                                                               const smtp::RecipientResult& rr,
                                                               const std::string& summary, int64_t now) const {
  if (settings_.suppressionOff.contains(account)) return std::nullopt;
  if (!policy::isHardBounce(rr.reply.code, rr.reply.enhanced, rr.stage)) return std::nullopt;
  auto e = policy::bounceEntry(account, rr.recipient, summary, now, settings_.suppressionTtl.count());
  if (!e) return std::nullopt;
  return queue::SuppressionRow{std::move(e->account), std::move(e->address), std::move(e->reason), e->createdAt,
                               e->expiresAt, std::move(e->source)};
}

void Scheduler::failJob(const Job& job, smtp::Outcome outcome, int code, const std::string& enhanced,
                        const std::string& text, const ConnectRequest* via) {
  std::vector<smtp::RecipientResult> rs;
  for (const auto& r : job.rcpts) {
    smtp::RecipientResult rr;
    rr.recipient = r.address;
    rr.outcome = outcome;
    rr.reply.code = code;
    rr.reply.enhanced = enhanced;
    rr.reply.text = text;
    rr.stage = "connect";
    rs.push_back(std::move(rr));
  }
  record(job, rs, "", "", via);
}

void Scheduler::flush() {
  if (pending_.empty()) return;
  auto r = queue_.recordAttempts(pending_);
  if (!r.ok()) {
    // Kept for the next flush; the leases keep the recipients from being taken again.
    util::logError("delivery", "cannot record delivery results: " + r.error().message);
    return;
  }
  pending_.clear();
}

namespace {

std::string attemptPolicy(const Scheduler::Job& job, const ConnectRequest* via) {
  if (via == nullptr || via->label().empty()) return "";
  if (!via->relay.empty()) return via->relayPolicy();
  return via->policy.empty() ? job.tlsWhy : via->policy;
}

}  // namespace

// ---- DSNs -----------------------------------------------------------------------------

bool dsnWanted(const queue::RecipientInfo& r, bool delayed) {
  if (delayed) return wantsDelayDsn(r.dsn.notify);
  if (r.state == queue::RecipientState::Delivered) return wantsSuccessDsn(r.dsn.notify, false);
  return wantsFailureDsn(r.dsn.notify);
}

std::optional<queue::NewMessage> makeDsn(const queue::MessageInfo& m, const std::vector<queue::AttemptInfo>& history,
                                         const std::string& originalContent, bool delayed,
                                         const SchedulerSettings& settings, int64_t now, const std::string& dsnId) {
  if (m.mailFrom.empty() || m.isDsn) return std::nullopt;  // never to <>, never a bounce of a bounce
  bool anyWanted = false, anyFailure = false;
  for (const auto& r : m.recipients) {
    if (!dsnWanted(r, delayed)) continue;
    anyWanted = true;
    anyFailure = anyFailure || (!delayed && r.state != queue::RecipientState::Delivered);
  }
  if (!anyWanted) return std::nullopt;  // RFC 3461 4.1: NOTIFY=NEVER, or not this kind
  const std::string originalHeaders(message::headerSection(originalContent));
  DsnInput in;
  in.reportingMta = settings.hostname;
  in.queueId = m.id;
  in.originalSender = m.mailFrom;
  in.arrivalDate = m.receivedAt;
  in.now = now;
  in.messageId = "<" + dsnId + ".dsn@" + settings.hostname + ">";
  in.originalHeaders = originalHeaders;
  in.envid = m.dsnEnvid;
  // RFC 3461 6.2: RET=FULL returns the whole message with a failure, up to a size.
  switch (returnPart(m.dsnRet, anyFailure, originalContent.size())) {
    case ReturnPart::Full:
      in.originalMessage = originalContent;
      break;
    case ReturnPart::HeadersTooLarge:
      in.fullTooLarge = true;
      break;
    case ReturnPart::Headers:
      break;
  }
  for (const auto& r : m.recipients) {
    if (!dsnWanted(r, delayed)) continue;
    const bool relayed = !delayed && r.state == queue::RecipientState::Delivered;
    DsnRecipient dr;
    dr.address = r.address;
    dr.orcpt = r.dsn.orcpt;
    dr.action = delayed ? DsnAction::Delayed : relayed ? DsnAction::Relayed : DsnAction::Failed;
    const queue::AttemptInfo* last = nullptr;
    for (const auto& a : history)
      if (a.index == r.index) last = &a;
    if (last != nullptr) {
      dr.lastAttempt = last->at;
      if (!last->mx.empty()) dr.remoteMta = "dns; " + last->mx.substr(0, last->mx.find(' '));
      if (last->code) dr.diagnostic = "smtp; " + last->reply;
    }
    // The typed status: the recipient's own (an expiry's 4.4.7, an operator's 5.0.0), else
    // the last attempt's, else the action's default.
    queue::EnhancedStatus st = r.lastStatus;
    if (!st.valid() && last != nullptr) st = last->status;
    if (!st.valid() && last != nullptr && last->code) st = queue::EnhancedStatus::fromReply(last->code, "");
    dr.status = st.valid() ? st.str() : (delayed ? "4.0.0" : relayed ? "2.0.0" : "5.0.0");
    if (r.lastError == "bounced by operator") dr.diagnostic.clear();
    if (delayed) dr.willRetryUntil = m.receivedAt + settings.retry.maxQueueTime.count();
    if (dr.diagnostic.empty() && !r.lastError.empty()) dr.diagnostic = "x-subrelay; " + r.lastError;
    in.recipients.push_back(std::move(dr));
  }
  queue::NewMessage dsn;
  dsn.id = dsnId;
  dsn.account = m.account;
  dsn.mailFrom = "";
  dsn.recipients = {m.mailFrom};
  dsn.content = buildDsn(in);
  dsn.isDsn = true;
  // RFC 8689 5: the bounce of a REQUIRETLS message asks for REQUIRETLS too (it quotes the
  // original's header section, which is what RET=HDRS would return anyway).
  if (m.tlsRequirement == queue::TlsRequirement::Required) dsn.tlsRequirement = queue::TlsRequirement::Required;
  dsn.eightBit = util::hasNonAscii(dsn.content);
  dsn.smtputf8 = util::hasNonAscii(m.mailFrom);
  dsn.receivedAt = now;
  return dsn;
}

// RFC 3464 DSNs for recipients that failed (dsn_pending) and "delayed" notices. The queue
// clears each flag in the transaction that inserts the DSN: one DSN per event.
void Scheduler::processDsns() {
  const int64_t now = unixNow(clock_);
  auto build = [&](const queue::DsnWork& w, bool delayed) -> std::optional<queue::NewMessage> {
    const auto& m = w.message;
    if (m.mailFrom.empty() || m.isDsn) return std::nullopt;
    std::vector<queue::AttemptInfo> history;
    if (auto full = queue_.show(m.id); full.ok()) history = std::move(full.value().attempts);
    std::string content;
    if (auto c = queue_.content(m.id); c.ok()) content = std::move(c.value());
    return makeDsn(m, history, content, delayed, settings_, now, queue::newQueueId());
  };
  auto indexes = [](const queue::DsnWork& w) {
    std::vector<int64_t> out;
    for (const auto& r : w.message.recipients) out.push_back(r.index);
    return out;
  };
  if (auto work = queue_.pendingDsns(settings_.dsnBatch); work.ok()) {
    for (const auto& w : work.value()) {
      auto dsn = build(w, false);
      if (auto r = queue_.completeDsn(w.message.id, indexes(w), dsn); !r.ok()) {
        util::logError("delivery", "cannot queue the DSN for id=" + w.message.id + ": " + r.error().message);
        continue;
      }
      // One DSN may report failures and successes (RFC 3461 NOTIFY=SUCCESS) together;
      // it counts as a failure DSN when it reports any failure.
      size_t failed = 0, succeeded = 0;
      for (const auto& r : w.message.recipients) {
        if (!dsnWanted(r, false)) continue;
        if (r.state == queue::RecipientState::Delivered)
          ++succeeded;
        else
          ++failed;
      }
      if (dsn) {
        const bool success = failed == 0;
        metrics::server().dsns.with(success ? "success" : "failure").inc();
        util::LogEvent(util::LogLevel::Info, "delivery", success ? "success-notice" : "bounced")
            .queueId(w.message.id)
            .field("dsn", "dsn_id", dsn->id)
            .field("to", "sender", w.message.mailFrom, util::LogEvent::Style::Angle)
            .number("rcpts", static_cast<long long>(success ? succeeded : failed))
            .account(w.message.account)
            .emit();
      } else if (w.message.recipients.size() > succeeded) {
        const bool notify = !w.message.mailFrom.empty() && !w.message.isDsn;
        util::LogEvent(util::LogLevel::Info, "delivery", "failed")
            .queueId(w.message.id)
            .field("dsn", "dsn_id", "none")
            .field("why", notify ? "the sender asked for no failure DSN (NOTIFY)" : "null sender or a DSN itself")
            .account(w.message.account)
            .emit();
      }
    }
  }
  if (settings_.retry.delayNotice.count() > 0) {
    if (auto work = queue_.pendingDelayNotices(now - settings_.retry.delayNotice.count(), settings_.dsnBatch);
        work.ok()) {
      for (const auto& w : work.value()) {
        auto dsn = build(w, true);
        if (queue_.completeDelayNotice(w.message.id, indexes(w), dsn).ok() && dsn) {
          metrics::server().dsns.with("delay").inc();
          util::LogEvent(util::LogLevel::Info, "delivery", "delay-notice")
              .queueId(w.message.id)
              .field("dsn", "dsn_id", dsn->id)
              .field("to", "sender", w.message.mailFrom, util::LogEvent::Style::Angle)
              .account(w.message.account)
              .emit();
        }
      }
    }
  }
}

// ---- shutdown -------------------------------------------------------------------------

void Scheduler::stop() {
  stopping_ = true;
  for (auto& [id, s] : sessions_)
    if (s->state == Session::State::Idle) {
      s->state = Session::State::Quitting;
      transport_.quit(id);
    }
  // Sessions with a job finish it and then quit (takeJob sees stopping_); those still
  // connecting quit once ready.
}

void Scheduler::abortAll(const std::string& why) {
  std::vector<SessionId> ids;
  for (auto& [id, s] : sessions_) ids.push_back(id);
  for (SessionId id : ids) {
    auto it = sessions_.find(id);
    if (it == sessions_.end() || it->second->aborted) continue;
    it->second->aborted = true;
    transport_.abort(id, why);
  }
}

bool Scheduler::drained() const { return stopping_ && sessions_.empty(); }

void Scheduler::finish() {
  flush();
  // Jobs never attempted: their recipients go back at once (no attempt counted).
  auto release = [&](const Job& j) {
    std::vector<int64_t> idx;
    for (const auto& r : j.rcpts) idx.push_back(r.index);
    if (auto r = queue_.releaseLeases(j.meta->due.id, idx); !r.ok())
      util::logError("delivery", "cannot release id=" + j.meta->due.id + ": " + r.error().message);
    leased_ -= std::min(leased_, j.rcpts.size());
  };
  for (auto& [key, d] : destinations_)
    for (const auto& j : d->jobs) release(j);
  for (auto& [name, ds] : domains_)
    for (const auto& j : ds->waiting) release(j);
  destinations_.clear();
  domains_.clear();
  queuedJobs_ = 0;
}

SchedulerStats Scheduler::stats() const {
  SchedulerStats st;
  st.queuedJobs = queuedJobs_;
  st.sessions = sessions_.size();
  st.destinations = destinations_.size();
  st.pendingResults = pending_.size();
  st.leasedRecipients = leased_;
  return st;
}

}  // namespace subrelay::delivery
