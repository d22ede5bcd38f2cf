// Worker: one libuv loop on its own thread, with its own SO_REUSEPORT listening sockets
// for every configured listener, so both cores accept, handshake and parse. Each accepted
// connection becomes an SmtpConnection that drives an smtp::ServerSession: it executes
// the session's actions (send, STARTTLS, authenticate on the thread pool, store through
// the group committer) and reports the outcomes back by session id.
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "app/runtime.h"
#include "net/listener.h"
#include "net/uv_loop.h"
#include "net/uv_timer.h"
#include "util/result.h"
#include "util/watchdog.h"

namespace subrelay::app {

class SmtpConnection;

class Worker {
 public:
  Worker(Runtime& rt, int index);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Before start(): open this worker's socket for a listener. Returns the bound port.
  util::Result<uint16_t> addListener(const config::Listener& l, uint16_t port);

  // Runs the loop on its thread; it stamps heartbeat() every `heartbeatEvery` while it runs.
  void start(std::chrono::milliseconds heartbeatEvery = std::chrono::milliseconds(1000));
  // Any thread: when this worker's loop last ran its heartbeat timer (the watchdog's input).
  const util::Heartbeat& heartbeat() const { return heartbeat_; }
  // Thread-safe: stop accepting, ask sessions to finish, force-close after the grace time.
  void requestShutdown();
  void join();

  // Thread-safe: run fn on this worker's loop (dropped if the loop has ended).
  void post(std::function<void()> fn);

  // Loop-thread only.
  uv_loop_t* loop() { return loop_.loop(); }
  Runtime& runtime() { return rt_; }
  int index() const { return index_; }
  void forget(uint64_t sessionId);
  SmtpConnection* find(uint64_t sessionId);
  uint64_t nextSessionId() { return (static_cast<uint64_t>(index_) << 48) | ++sessionCounter_; }

 private:
  void onAccept(uv_stream_t* server, const config::Listener& l);
  void beginShutdown();
  void maybeFinish();

  Runtime& rt_;
  int index_;
  // Declared before everything that holds handles on it: destroyed after them.
  net::LoopThread loop_;
  std::unique_ptr<net::Timer> graceTimer_;
  std::unique_ptr<net::Timer> heartbeatTimer_;
  util::Heartbeat heartbeat_;
  bool shuttingDown_ = false;
  struct ListenerEntry {
    config::Listener cfg;
    std::unique_ptr<net::Listener> listener;
  };
  std::vector<std::unique_ptr<ListenerEntry>> listeners_;
  std::unordered_map<uint64_t, SmtpConnection*> sessions_;
  uint64_t sessionCounter_ = 0;
};

}  // namespace subrelay::app
