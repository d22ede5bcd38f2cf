#include "webhook/dispatcher.h"

#include <arpa/inet.h>

#include <algorithm>

#include "metrics/server_metrics.h"
#include "util/log.h"
#include "webhook/signature.h"

namespace subrelay::webhook {

namespace {
constexpr std::string_view kLog = "webhook";
// A finished POST frees a slot; the tick that refills it (and writes the finished ones) waits
// this long so that several ends share one write transaction.
constexpr std::chrono::milliseconds kCoalesce{2};
constexpr int64_t kFailureLogEvery = 10;  // seconds
constexpr int64_t kHousekeepingEvery = 10;  // seconds: backlog bound and gauge
constexpr int64_t kAddressTtl = 60;         // seconds a looked-up address is reused

bool isIpLiteral(const std::string& h) {
  unsigned char buf[16];
  return inet_pton(AF_INET, h.c_str(), buf) == 1 || inet_pton(AF_INET6, h.c_str(), buf) == 1;
}
}  // namespace

std::string urlHost(const std::string& url) {
  if (url.compare(0, 8, "https://") != 0) return {};
  std::string rest = url.substr(8);
  rest = rest.substr(0, rest.find_first_of("/?#"));
  if (auto at = rest.rfind('@'); at != std::string::npos) rest = rest.substr(at + 1);
  if (!rest.empty() && rest[0] == '[') {
    auto close = rest.find(']');
    return close == std::string::npos ? std::string() : rest.substr(1, close - 1);
  }
  std::string host = rest.substr(0, rest.find(':'));
  std::transform(host.begin(), host.end(), host.begin(), [](unsigned char c) { return std::tolower(c); });
  return host;
}

Dispatcher::Dispatcher(uv_loop_t* loop, queue::SqliteStore& store, dns::Resolver& resolver, const util::Clock& clock,
                       DispatcherSettings settings)
    : loop_(loop),
      store_(store),
      resolver_(resolver),
      clock_(clock),
      settings_(std::move(settings)),
      http_(std::make_unique<net::HttpClient>(loop)),
      timer_(loop),
      alive_(std::make_shared<bool>(true)) {}

Dispatcher::~Dispatcher() { *alive_ = false; }

int64_t Dispatcher::now() const {
  return std::chrono::duration_cast<std::chrono::seconds>(clock_.wallNow().time_since_epoch()).count();
}

void Dispatcher::start() {
  // One serve per data_dir: claims left by a process that died are void.
  if (auto r = store_.clearWebhookClaims(); !r.ok()) util::logWarn(kLog, "cannot clear claims: " + r.error().message);
  running_ = true;
  timer_.start(std::chrono::milliseconds(0), [this] { tick(); });
}

void Dispatcher::reconfigure(DispatcherSettings settings) {
  settings_ = std::move(settings);
  addressCache_.clear();
  lastHousekeeping_ = 0;
}

void Dispatcher::stop() {
  running_ = false;
  timer_.stop();
}

void Dispatcher::abort() {
  stop();
  flushSettled();
  *alive_ = false;
  alive_ = std::make_shared<bool>(true);
  http_.reset();  // cancels transfers: no callback runs
  inFlight_ = 0;
}

void Dispatcher::soon() {
  if (!running_ || soonPending_) return;
  soonPending_ = true;
  timer_.start(kCoalesce, [this] { tick(); });
}

void Dispatcher::flushSettled() {
  if (settle_.empty()) return;
  auto r = store_.claimWebhookEvents(now(), 0, 0, settle_);
  if (!r.ok()) util::logWarn(kLog, "cannot record webhook results: " + r.error().message);
  settle_.clear();  // on failure the claims lapse and those events are sent again
}

void Dispatcher::tick() {
  soonPending_ = false;
  if (!running_) return;
  const int64_t t = now();
  if (t - lastHousekeeping_ >= kHousekeepingEvery || lastHousekeeping_ == 0) housekeeping(t);
  const size_t n = claimCount(inFlight_, settings_.policy);
  if (n > 0 || !settle_.empty()) {
    // One write transaction: the results since the last tick, then the next claims.
    auto rows = store_.claimWebhookEvents(t, n, t + settings_.policy.claimFor.count() + settings_.timeout.count() / 1000,
                                          settle_);
    if (!rows.ok()) {
      util::logWarn(kLog, "cannot read the outbox: " + rows.error().message);  // settle_ kept for the next tick
    } else {
      settle_.clear();
      for (auto& r : rows.value()) send(std::move(r));
    }
  }
  if (running_ && !soonPending_) timer_.start(settings_.pollEvery, [this] { tick(); });
}

void Dispatcher::housekeeping(int64_t t) {
  lastHousekeeping_ = t;
  auto backlog = store_.webhookBacklog();
  if (!backlog.ok()) return;
  int64_t total = 0;
  for (const auto& b : backlog.value()) {
    total += b.events;
    const uint64_t over = overBacklog(static_cast<uint64_t>(b.events), settings_.policy);
    if (over == 0) continue;
    auto trimmed = store_.trimWebhookBacklog(b.account, settings_.policy.maxBacklog);
    if (trimmed.ok() && trimmed.value() > 0) {
      total -= trimmed.value();
      metrics::server().webhookEvents.with("dropped").inc(static_cast<uint64_t>(trimmed.value()));
      util::logWarn(kLog, "account " + b.account + ": dropped the " + std::to_string(trimmed.value()) +
                              " oldest undelivered events (webhooks.max_backlog " +
                              std::to_string(settings_.policy.maxBacklog) + ")");
    }
  }
  metrics::server().webhookBacklog.get().set(static_cast<double>(total));
}

void Dispatcher::drop(const queue::WebhookEventRow& row, const std::string& why) {
  settle_.push_back(queue::WebhookSettle{row.seq, true, 0, 0, {}});
  metrics::server().webhookEvents.with("dropped").inc();
  util::logWarn(kLog, "account " + row.account + ": dropped " + row.type + " event " + row.eventId + " after " +
                          std::to_string(row.attempts) + " attempts: " + why);
}

void Dispatcher::send(queue::WebhookEventRow row) {
  auto target = settings_.accounts.find(row.account);
  if (target == settings_.accounts.end()) return drop(row, "the account has no webhook now");
  if (expired(row.createdAt, now(), settings_.policy)) return drop(row, "older than webhooks.max_age");
  const std::string host = urlHost(target->second.url);
  ++inFlight_;
  if (isIpLiteral(host)) return post(std::move(row), {host});
  if (host == "localhost") return post(std::move(row), {"127.0.0.1", "::1"});
  auto cached = addressCache_.find(host);
  if (cached != addressCache_.end() && cached->second.until > now())
    return post(std::move(row), cached->second.addresses);
  std::weak_ptr<bool> alive = alive_;
  resolver_.query(host, dns::QType::A, [this, alive, host, row = std::move(row)](const dns::Answer& a) mutable {
    auto guard = alive.lock();
    if (!guard || !*guard) return;
    if (a.status == dns::Status::Ok && !a.addresses.empty()) {
      addressCache_[host] = CachedAddresses{a.addresses, now() + kAddressTtl};
      return post(std::move(row), a.addresses);
    }
    // No IPv4 address: try IPv6.
    resolver_.query(host, dns::QType::AAAA, [this, alive, host, row = std::move(row), a4 = a.detail](const dns::Answer& b) mutable {
      auto guard2 = alive.lock();
      if (!guard2 || !*guard2) return;
      if (b.status == dns::Status::Ok && !b.addresses.empty()) {
        addressCache_[host] = CachedAddresses{b.addresses, now() + kAddressTtl};
        return post(std::move(row), b.addresses);
      }
      finished(row, "cannot resolve " + host + ": " + (b.detail.empty() ? std::string(dns::statusName(b.status)) : b.detail));
    });
  });
}

void Dispatcher::post(queue::WebhookEventRow row, std::vector<std::string> addresses) {
  auto target = settings_.accounts.find(row.account);
  if (target == settings_.accounts.end() || !http_) {
    --inFlight_;
    return;  // reconfigured meanwhile: the claim ends and the next tick decides
  }
  net::HttpGetOptions o;
  o.addresses = std::move(addresses);
  o.caFile = settings_.caFile;
  o.timeout = settings_.timeout;
  o.maxBodyBytes = 4096;  // the receiver's answer is not used
  o.reuseConnection = true;
  const int64_t ts = now();
  net::HttpPostBody b;
  b.headers = {{kEventIdHeader, row.eventId},
               {kTimestampHeader, std::to_string(ts)},
               {kSignatureHeader, sign(target->second.secret, ts, row.body)},
               {"User-Agent", "subrelay-webhook"}};
  b.body = row.body;
  std::weak_ptr<bool> alive = alive_;
  http_->post(target->second.url, o, std::move(b), [this, alive, row = std::move(row)](net::HttpResult r) {
    auto guard = alive.lock();
    if (!guard || !*guard) return;
    std::string error;
    if (!r.ok())
      error = std::string(net::httpFailureName(r.failure)) + ": " + r.error;
    else if (!delivered(r.status))
      error = "HTTP status " + std::to_string(r.status);
    finished(row, error);
  });
}

void Dispatcher::finished(const queue::WebhookEventRow& row, const std::string& error) {
  if (inFlight_ > 0) --inFlight_;
  if (error.empty()) {
    settle_.push_back(queue::WebhookSettle{row.seq, true, 0, 0, {}});
    metrics::server().webhookEvents.with("delivered").inc();
  } else {
    metrics::server().webhookEvents.with("failed").inc();
    const int attempts = row.attempts + 1;
    const RetryDecision d = afterFailure(row.createdAt, attempts, now(), settings_.policy);
    logFailure(row, attempts, error,
               d.drop ? "giving up (webhooks.max_age)" : "retry at " + std::to_string(d.nextAt));
    if (d.drop) {
      drop(row, error);
    } else {
      settle_.push_back(queue::WebhookSettle{row.seq, false, attempts, d.nextAt, error});
    }
  }
  if (!running_) flushSettled();  // stopping: no tick comes to write it
  soon();  // a slot is free
  if (!running_ && inFlight_ == 0 && onDrained_) onDrained_();
}

void Dispatcher::logFailure(const queue::WebhookEventRow& row, int attempts, const std::string& error,
                            const std::string& next) {
  // At most one line per account every kFailureLogEvery seconds: account, event, what went
  // wrong, how many failures went unlogged since; never the secret or the body.
  FailureLog& f = failureLog_[row.account];
  const int64_t t = now();
  if (f.last != 0 && t - f.last < kFailureLogEvery) {
    ++f.quiet;
    return;
  }
  std::string more = f.quiet ? " (" + std::to_string(f.quiet) + " more failures not logged since the last line)" : "";
  f.last = t;
  f.quiet = 0;
  util::logWarn(kLog, "account " + row.account + ": " + row.type + " event " + row.eventId + " attempt " +
                          std::to_string(attempts) + " failed: " + error + "; " + next + more);
}

}  // namespace subrelay::webhook
