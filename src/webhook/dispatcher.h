// Dispatcher: POSTs the webhook outbox's events (queue/webhook_outbox.cpp) on the caller's
// libuv loop (the delivery loop): at most OutboxPolicy::maxInFlight requests at once, each
// signed (signature.h) with its account's secret. 2xx: the row is deleted. Anything else
// (no connection, TLS failure, timeout, non-2xx): attempts + 1 and next_at from the retry
// schedule (outbox_policy.h), or the event is dropped once it would pass max_age. Rows are
// claimed in SQLite before the POST, so a second dispatcher never sends the same event at
// the same time; claims of a process that died are cleared at start().
//
// At-least-once: a receiver may see an event twice when its 2xx was lost (crash, timeout
// after it answered); it recognises the repeat by X-Subrelay-Event-Id.
#pragma once

#include <uv.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "dns/resolver.h"
#include "net/http_client.h"
#include "net/uv_timer.h"
#include "queue/sqlite_store.h"
#include "util/clock.h"
#include "webhook/outbox_policy.h"

namespace subrelay::webhook {

struct Target {
  std::string url;     // https://host[:port]/path
  std::string secret;  // HMAC key; never logged
};

struct DispatcherSettings {
  std::map<std::string, Target> accounts;  // by account name
  std::string caFile;                      // "" = system trust store
  std::chrono::milliseconds timeout{std::chrono::seconds(10)};
  OutboxPolicy policy;
  // How often the outbox is looked at when nothing finished meanwhile.
  std::chrono::milliseconds pollEvery{std::chrono::milliseconds(500)};
};

// Host of an https URL ("hooks.example.com", "127.0.0.1", "::1"); "" when not https.
std::string urlHost(const std::string& url);

class Dispatcher {
 public:
  Dispatcher(uv_loop_t* loop, queue::SqliteStore& store, dns::Resolver& resolver, const util::Clock& clock,
             DispatcherSettings settings);
  ~Dispatcher();
  Dispatcher(const Dispatcher&) = delete;
  Dispatcher& operator=(const Dispatcher&) = delete;

  void start();
  // SIGHUP: new targets and policy; requests in flight finish with what they started with.
  void reconfigure(DispatcherSettings settings);
  // No new requests; those in flight may finish (drained() tells).
  void stop();
  bool drained() const { return inFlight_ == 0; }
  // Cancels what is in flight (its claims stay until the next start) and closes handles.
  void abort();
  size_t inFlight() const { return inFlight_; }
  // Runs (on the loop) when the last request in flight after stop() has finished. It may
  // not destroy the dispatcher itself: post that.
  void onDrained(std::function<void()> cb) { onDrained_ = std::move(cb); }

 private:
  void tick();
  void send(queue::WebhookEventRow row);
  void post(queue::WebhookEventRow row, std::vector<std::string> addresses);
  void finished(const queue::WebhookEventRow& row, const std::string& error);
  void drop(const queue::WebhookEventRow& row, const std::string& why);
  void housekeeping(int64_t now);
  void soon();
  void flushSettled();
  void logFailure(const queue::WebhookEventRow& row, int attempts, const std::string& error, const std::string& next);
  int64_t now() const;

  uv_loop_t* loop_;
  queue::SqliteStore& store_;
  dns::Resolver& resolver_;
  const util::Clock& clock_;
  DispatcherSettings settings_;
  std::unique_ptr<net::HttpClient> http_;
  net::Timer timer_;
  size_t inFlight_ = 0;
  bool running_ = false;
  // Ends of POSTs (and drops) not yet written: the next tick writes them with its claim in
  // one transaction. soonPending_: a short coalescing timer is armed (finished POSTs).
  std::vector<queue::WebhookSettle> settle_;
  bool soonPending_ = false;
  // Failure log lines per account: the first, then at most one per kFailureLogEvery with the
  // count of those not logged (a dead receiver would otherwise log every event).
  struct FailureLog {
    int64_t last = 0;
    uint64_t quiet = 0;
  };
  std::map<std::string, FailureLog> failureLog_;
  int64_t lastHousekeeping_ = 0;
  struct CachedAddresses {
    std::vector<std::string> addresses;
    int64_t until = 0;
  };
  std::map<std::string, CachedAddresses> addressCache_;
  std::shared_ptr<bool> alive_;
  std::function<void()> onDrained_;
};

}  // namespace subrelay::webhook
