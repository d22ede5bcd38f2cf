// delivery::Scheduler: the queue manager, free of I/O (as smtp::ServerSession is for
// submission). It decides what to lease, which destination each recipient goes to, how
// many connections each destination and the whole relay get, which address to connect
// to next, which TLS policy applies, what a result means (delivered, retry when, expired,
// failed), which DSNs to queue, and when a transaction has run too long. The wiring
// (app/delivery_service.cpp) gives it the clock, DNS answers and session events, and
// carries out its requests through a Transport: resolve, connect, send, quit, abort.
//
//   leaseDue -> Job per (message, recipient domain) -> route (MX lookup, cached routeTtl)
//   -> destination policy -> Destination (keyed by its MX host set + TLS policy, so every
//   domain on the same MX shares connections and limits) -> sessions, one job at a time
//   -> per-recipient results -> AttemptRecords (typed states and RFC 3463 codes), flushed
//   in batches -> DSNs for failures and delays.
//
// Exactly one attempt in flight per recipient: leases are owned (queue/delivery_queue.h),
// every leased recipient ends in exactly one AttemptRecord or release, and nothing is
// leased twice while this scheduler lives. Only a crash (lease cleared at the next start)
// can repeat an attempt.
//
// Re-entrancy: Transport calls never call back into the Scheduler from inside themselves;
// every answer arrives later, from the wiring's event loop.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "delivery/destination.h"
#include "delivery/retry.h"
#include "delivery/routing.h"
#include "delivery/tls_policy.h"
#include "queue/delivery_queue.h"
#include "smtp/client_session.h"
#include "util/clock.h"

namespace subrelay::delivery {

enum class TlsPolicy { Opportunistic, Required, Verify };

// A configured smarthost (delivery.relay[i], accounts[].relay[i]): always TLS, verified
// unless the operator said otherwise, with AUTH when credentials are set.
struct RelayHost {
  std::string host;  // name or IP literal; the certificate name for verify
  uint16_t port = 587;
  bool implicitTls = false;  // TLS from the first byte (465) instead of STARTTLS
  bool verify = true;
  std::shared_ptr<const smtp::ClientAuth> auth;
  std::string origin;  // "delivery.relay[0]": names the entry in logs and hints
};

// One relay list, tried in order (failover). id: "delivery.relay", "account:NAME" or
// "domain:NAME"; it keeps tenants with identical lists on separate connections (each
// authenticates as itself).
struct RelaySet {
  std::string id;
  std::vector<RelayHost> hosts;
};

struct SchedulerSettings {
  std::string hostname;            // EHLO name, Reporting-MTA of DSNs
  uint16_t port = 25;
  TlsPolicy tls = TlsPolicy::Opportunistic;
  std::map<std::string, TlsPolicy> tlsOverrides;  // by lower-case recipient domain
  // delivery.dnssec || delivery.mta_sts: after an MX route resolves, ask the Transport for
  // the domain's own TLS policy (DANE, MTA-STS: tls_policy.h) and apply it per MX host.
  // Not for domains in tlsOverrides (the operator's word wins), relays, address literals,
  // nor jobs of messages with "TLS-Required: No" (RFC 8689 4.2.2).
  bool recipientTlsPolicy = false;
  // delivery.dnssec: the AD bit means something only from a validating resolver on a
  // trusted path (RFC 7672 2.1.1). Off, no route counts as secure (onRoute clears
  // Route::mxSecure and MxHost::addressesSecure), for DANE and REQUIRETLS alike.
  bool trustDnssec = false;
  // TLS reporting (RFC 8460, delivery.tls_rpt): count the sessions that ran under a looked-up
  // domain policy (recipientTlsPolicy), per Policy Domain: successes, TLS failures, and
  // hosts the policy ruled out. The wiring takes the counts (takeTlsRpt) and stores them.
  bool tlsRpt = false;
  RetryPolicy retry;
  uint32_t maxConnections = 200;      // delivery.max_connections
  uint32_t maxPerDestination = 10;    // delivery.max_connections_per_domain, per MX host set
  DestinationPolicy destinations;
  std::chrono::seconds routeTtl{60};  // a resolved route serves new jobs this long
  // An overall bound per transaction (MAIL to the final reply), on top of the RFC 5321
  // 4.5.3.2 stage timeouts the transport enforces: a server that answers each stage just
  // in time cannot hold a connection for longer.
  std::chrono::seconds transactionDeadline{15 * 60};
  // A connection takes no new transaction after this long (Postfix's
  // smtp_connection_reuse_time_limit): its slot goes back to the round-robin.
  std::chrono::seconds connectionReuse{300};
  // A connection with nothing to send waits this long for the next job of its destination
  // before it quits (like Postfix's smtp_connection_cache_time_limit). 0 (the default):
  // reuse on demand only, while jobs for the destination are waiting, as Postfix's
  // smtp_connection_cache_on_demand does. Measured on loopback against Postfix, connections
  // kept for thousands of messages ran at a quarter of the rate of ones renewed after a
  // batch (bench/delivery_vs_postfix.py), so lingering is not the default.
  std::chrono::seconds idleLinger{0};
  size_t leaseBatch = 200;     // messages per lease transaction
  size_t maxQueuedJobs = 2000; // jobs held in memory before leasing more
  size_t flushBatch = 256;     // results that force a flush at once
  size_t dsnBatch = 50;        // messages per DSN pass
  // Smarthosts. Precedence for a recipient: domainRelays[domain] (nullptr there means
  // direct MX delivery), then accountRelays[account], then relay, then direct. A relay is
  // configured by the operator and trusted: the destination policy does not apply to it,
  // and delivery.tls / tls_policy_overrides do not either (the relay's tls and verify do).
  std::shared_ptr<const RelaySet> relay;
  std::map<std::string, std::shared_ptr<const RelaySet>> accountRelays;
  std::map<std::string, std::shared_ptr<const RelaySet>> domainRelays;
  // Suppression lists (issue 13): accounts whose accounts[].suppression is false (their
  // hard bounces are not recorded), and suppression.ttl (0 = forever).
  std::set<std::string, std::less<>> suppressionOff;
  std::chrono::seconds suppressionTtl{0};
};

// The scheduler's rules for one recipient domain, as free functions so that
// `subrelay tls-policy` (tls_explain.h) applies exactly the same ones.
const char* policyName(TlsPolicy p);  // "opportunistic", "required", "verify"
// The smarthost list for a recipient, nullptr for direct MX delivery. Postfix's order:
// domainRelays (transport_maps) before accountRelays (sender_dependent_relayhost_maps)
// before relay (relayhost).
std::shared_ptr<const RelaySet> relayFor(const SchedulerSettings& s, const std::string& account,
                                         const std::string& domain);
// delivery.tls, or the domain's tls_policy_overrides entry.
TlsPolicy tlsFor(const SchedulerSettings& s, const std::string& domain);
// Whether the domain's own TLS policy (DANE, MTA-STS) is looked up for an MX route:
// recipientTlsPolicy, no relay, no operator override, not an address literal.
bool domainPolicyApplies(const SchedulerSettings& s, const std::string& domain, bool relay);
// A resolved route as the scheduler uses it: without trustDnssec no AD bit counts; a
// relay's route is never a permanent failure; an MX route passes the destination policy.
Route routeAsUsed(const SchedulerSettings& s, Route resolved, bool relay);

using SessionId = uint64_t;

struct ConnectRequest {
  SessionId id = 0;
  std::string host;  // MX name (certificate name for TlsPolicy::Verify)
  std::string ip;
  uint16_t port = 25;
  TlsPolicy tls = TlsPolicy::Opportunistic;
  bool implicitTls = false;                      // relays on 465
  std::shared_ptr<const smtp::ClientAuth> auth;  // relays with credentials (only with Verify)
  std::string relay;                             // the relay's origin; "" for MX delivery
  // DANE (RFC 7672): the handshake authenticates the server with these records (tls is
  // then Required: TLS is mandatory, a mismatch fails the connection).
  std::optional<tls::DaneParams> dane;
  // The recipient domain's TLS policy for this host ("dane", "mta-sts enforce id=X", ...),
  // recorded as the attempt's tls_policy; "" when none applies.
  std::string policy;
  std::string label() const;  // "mx.example.com [192.0.2.1]:25"
  // For relays, the TLS policy this connection runs under and why: "relay verify
  // (delivery.relay[0])"; "" for MX delivery (the job says why, see Scheduler).
  std::string relayPolicy() const;
};

// Why a session ended without (or after) being usable: the last server reply, or a local
// reason with code 0 ("connect to ...: connection refused").
struct SessionFailure {
  int code = 0;
  std::string enhanced;
  std::string text;
  std::string stage;  // smtp::SessionFailed::stage when the session gave up ("auth", ...)
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual void resolve(const std::string& domain) = 0;                 // -> onRoute
  // A relay list's host names (RouteResolver::resolveHosts) -> onRoute(key, route).
  virtual void resolveRelay(const std::string& key, const std::vector<std::string>& hosts) = 0;
  // The domain's TLSA records and MTA-STS policy for an Ok MX route (SchedulerSettings::
  // recipientTlsPolicy) -> onTlsPolicy(domain, inputs), always, even when nothing is found.
  virtual void lookupTlsPolicy(const std::string& domain, const Route& route) = 0;
  // RFC 8461 5.1 step 3: an MTA-STS enforce policy left no MX host of `domain` usable and its
  // mail was deferred: look for an updated policy now (answer not needed: the next attempt
  // uses whatever the policy cache then holds), so a changed policy is found before the
  // message expires and bounces.
  virtual void recheckStsPolicy(const std::string& domain) = 0;
  virtual void connect(const ConnectRequest& request) = 0;             // -> onReady | onSessionEnded
  virtual void send(SessionId id, smtp::OutboundMessage message) = 0;  // -> onTransactionDone
  virtual void quit(SessionId id) = 0;                                 // -> onSessionEnded
  // Close now: a transaction in progress still reports (TempFail) results, then the end.
  virtual void abort(SessionId id, const std::string& why) = 0;
  // Call Scheduler::flush() soon (a few ms: results are committed in batches).
  virtual void flushSoon() = 0;
};

struct SchedulerStats {
  size_t queuedJobs = 0;       // leased, waiting for a route or a connection
  size_t sessions = 0;
  size_t destinations = 0;
  size_t pendingResults = 0;   // recorded, not yet flushed
  size_t leasedRecipients = 0; // in this scheduler's hands
};

class Scheduler {
 public:
  Scheduler(queue::DeliveryQueue& queue, Transport& transport, const util::Clock& clock, SchedulerSettings settings,
            uint64_t seed = 1);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // SIGHUP: new connections and new jobs use these; sessions keep what they started with.
  void reconfigure(SchedulerSettings settings);

  // Every second: lease what is due, queue DSNs, enforce transaction deadlines, dispatch.
  void tick();
  // New mail was committed: lease soon (at most every 50 ms), dispatch.
  void wake();
  // Leases the next batch when jobs run low and more were due (the wiring calls it from
  // a short timer when refillWanted() says so).
  bool refillWanted() const;
  void refill();

  // domain: as passed to resolve(), or the key passed to resolveRelay().
  void onRoute(const std::string& domain, Route route);
  // The answer to Transport::lookupTlsPolicy; ignored when no lookup is pending for domain.
  void onTlsPolicy(const std::string& domain, const TlsPolicyInputs& inputs);
  void onReady(SessionId id, const std::string& tlsVersion, const std::string& tlsCipher);
  // canContinue: the connection is still usable for another transaction (false when the
  // session failed with it: lost connection, timeout, abort).
  void onTransactionDone(SessionId id, const std::vector<smtp::RecipientResult>& results, bool canContinue = true);
  // The connection is gone (exactly once per connect()); `failure` says why when it was
  // not a clean QUIT.
  void onSessionEnded(SessionId id, std::optional<SessionFailure> failure);

  // Commits the results recorded so far (one transaction). Kept for the next call on error.
  void flush();

  // Shutdown: no new jobs or connections; sessions finish the transaction in hand and quit.
  void stop();
  // After the grace period: abort every session.
  void abortAll(const std::string& why);
  bool drained() const;  // stop() was called and no session is left
  // Releases the leases of every job never attempted, flushes. After drained().
  void finish();

  SchedulerStats stats() const;

  // The TLS-RPT counts since the last call (SchedulerSettings::tlsRpt), and how many
  // sessions the collector's bound left uncounted so far.
  std::vector<queue::TlsRptRow> takeTlsRpt() { return tlsRpt_.take(); }
  uint64_t tlsRptDropped() const { return tlsRpt_.dropped(); }

  struct Job;
  struct Destination;
  struct Session;
  struct DomainState;

 private:
  void pull();
  void routeJob(Job job);
  // onRoute's second half: the jobs to their destinations (decision: the domain's TLS
  // policy, when one was looked up). plainOnly: the domain has a policy to look up but
  // these jobs ignore it ("TLS-Required: No"): the route serves only such jobs later.
  void placeJobs(const std::string& domain, const Route& route, const std::optional<TlsDecision>& decision,
                 bool plainOnly = false);
  bool followsDomainPolicy(const Job& job) const;
  void dispatch();
  void openSession(Destination& d);
  void connectNext(Session& s);
  void takeJob(Session& s);
  void feedIdle(Destination& d);  // queued jobs to the destination's idle connections
  void endSession(SessionId id);
  // via: the connection the attempt used (its label is the mx; its relay and TLS policy
  // are recorded), null when none was made.
  void record(const Job& job, const std::vector<smtp::RecipientResult>& results, const std::string& tlsVersion,
              const std::string& tlsCipher, const ConnectRequest* via);
  std::optional<queue::SuppressionRow> suppressionFor(const std::string& account, const smtp::RecipientResult& rr,
                                                     const std::string& summary, int64_t now) const;
  void failJob(const Job& job, smtp::Outcome outcome, int code, const std::string& enhanced, const std::string& text,
               const ConnectRequest* via);
  void processDsns();
  void checkDeadlines();
  TlsPolicy tlsFor(const std::string& domain) const { return delivery::tlsFor(settings_, domain); }
  std::shared_ptr<const RelaySet> relayFor(const std::string& account, const std::string& domain) const {
    return delivery::relayFor(settings_, account, domain);
  }

  queue::DeliveryQueue& queue_;
  Transport& transport_;
  const util::Clock& clock_;
  SchedulerSettings settings_;
  std::mt19937_64 rng_;
  std::map<std::string, std::unique_ptr<DomainState>> domains_;
  std::map<std::string, std::unique_ptr<Destination>> destinations_;
  std::map<SessionId, std::unique_ptr<Session>> sessions_;
  std::string lastServed_;  // round-robin cursor over destinations
  SessionId nextId_ = 1;
  size_t queuedJobs_ = 0;
  size_t leased_ = 0;
  bool moreDue_ = false;
  bool stopping_ = false;
  // Bumped by reconfigure(): relay routes and destinations carry it, so new jobs use the
  // new relay settings (hosts, credentials) at once while old sessions finish.
  uint64_t generation_ = 0;
  std::chrono::steady_clock::time_point lastPull_{};
  std::vector<queue::AttemptRecord> pending_;
  tlsrpt::Collector tlsRpt_;
};

// The key of a relay destination: the set's id, the configuration generation and each
// host's name, port and TLS mode. Never the password (keys appear in log lines).
std::string relayDestinationKey(const RelaySet& relay, uint64_t generation);

// The key of a destination: the TLS policy and the sorted MX host names with usable
// addresses (an address literal: its address). Domains with the same key share
// connections and the per-destination limit.
std::string destinationKey(const Route& route, TlsPolicy tls);
// With the domain's TLS policy: each host's decision is part of the key, so domains
// sharing MX hosts share connections only when their policies agree.
std::string destinationKey(const Route& route, TlsPolicy tls, const TlsDecision& decision);

// RFC 3464 DSN for `message` (its recipients: the ones to report), or nullopt when none
// may be sent (null sender, or the message is itself a DSN) or none of the recipients
// asked for this kind (RFC 3461 NOTIFY: wantsFailureDsn / wantsDelayDsn). A delivered
// recipient (a success DSN owed) is reported "relayed"; a failed one "failed"; with
// `delayed` every one "delayed". The original (`originalContent`, the whole message or at
// least its header section) goes back as RET asks (returnPart). Pure: the caller supplies
// the original, the history and the time.
std::optional<queue::NewMessage> makeDsn(const queue::MessageInfo& message, const std::vector<queue::AttemptInfo>& history,
                                         const std::string& originalContent, bool delayed,
                                         const SchedulerSettings& settings, int64_t now, const std::string& dsnId);
// Which of a DSN work item's recipients the sender wants reported (RFC 3461 NOTIFY).
bool dsnWanted(const queue::RecipientInfo& r, bool delayed);

}  // namespace subrelay::delivery
