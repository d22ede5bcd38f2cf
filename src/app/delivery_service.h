// DeliveryService: outbound delivery while `serve` runs (issue 3). One thread with its own
// libuv loop and its own SQLite connection:
//
//   queue (leaseDue) -> jobs per recipient domain -> OutboundSession per connection:
//   delivery::RouteResolver (dns::UvResolver) -> MX hosts in order -> net::Connection ->
//   smtp::ClientSession (STARTTLS per delivery.tls) -> per-recipient results ->
//   queue (recordAttempts, batched) -> DSNs for failures (delivery::buildDsn) -> queue.
//
// This is the glue (like worker.cpp for submission): the decisions live in the I/O-free
// cores (smtp::ClientSession, delivery::orderMx / nextAttemptAt / buildDsn).
//
// Crash safety: recipients are leased in SQLite before they are attempted, and the result
// is committed after the attempt; a crash in between leaves the lease, which this service
// clears when it starts (one serve per data_dir, enforced by a lock file), so the recipient
// is attempted again: at-least-once delivery (README.md). The window for a duplicate is from
// the receiving MTA's 250 to our commit of the result (results are committed in batches
// every 20 ms).
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "config/config.h"
#include "util/result.h"
#include "util/watchdog.h"

namespace subrelay::app {

class DeliveryService {
 public:
  // Opens its own queue connection and the TLS client contexts; nothing runs yet.
  static util::Result<std::unique_ptr<DeliveryService>> create(const config::Config& cfg, const std::string& dbPath);
  ~DeliveryService();
  DeliveryService(const DeliveryService&) = delete;
  DeliveryService& operator=(const DeliveryService&) = delete;

  // Runs the loop on its thread; it stamps heartbeat() every `heartbeatEvery` while it runs.
  void start(std::chrono::milliseconds heartbeatEvery = std::chrono::milliseconds(1000));
  // Any thread: when the delivery loop last ran its heartbeat timer (the watchdog's input).
  const util::Heartbeat& heartbeat() const;
  // Thread-safe: new mail was committed; look at the queue soon.
  void notify();
  // Thread-safe: SIGHUP with a valid config (delivery.* and hostname are taken over;
  // sessions in progress keep what they started with).
  void reconfigure(const config::Config& cfg);
  // Thread-safe: no new attempts; transactions in progress get `grace`, then everything is
  // closed, results are committed, unattempted leases released. Blocks until done.
  void stop(std::chrono::seconds grace);

  struct Impl;

 private:
  explicit DeliveryService(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace subrelay::app
