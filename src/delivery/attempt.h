// The decisions of one outbound connection, free of I/O: which deadline applies and when
// it expires (AttemptClock), and what a connection that ended early reports (the failure
// texts). app/delivery_service.cpp's OutboundConnection feeds them the time and the
// session's state, and carries out the answers with a libuv timer and net::Connection.
//
// Not here: the overall transaction deadline (Scheduler::tick, transactionDeadline) and
// what a failure means for the recipients (Scheduler::onSessionEnded).
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "delivery/scheduler.h"
#include "smtp/client_session.h"

namespace subrelay::delivery {

// One connection's deadline: first the TCP connect (delivery.timeouts.connect; RFC 5321
// 4.5.3.2 gives none), then the RFC 5321 4.5.3.2 stage timeout of whatever the session
// waits for. Each stage timeout is a total for its stage: the deadline is set when the
// session starts waiting for something new (ClientSession::progress() moved), never
// pushed out by events without progress (an MX trickling one byte a minute).
class AttemptClock {
 public:
  using Time = std::chrono::steady_clock::time_point;
  enum class Kind { Connect, Stage };
  struct Deadline {
    Kind kind = Kind::Connect;
    Time at{};
    bool operator==(const Deadline&) const = default;
  };

  // The TCP connect starts now.
  void connecting(Time now, std::chrono::milliseconds limit);
  // After every event the session handled: what it waits for (ClientSession::timeout(),
  // none when it waits for nothing) and its progress(). True when the deadline changed:
  // the timer is to be restarted for remaining(now), or stopped when there is none.
  bool update(Time now, std::optional<std::chrono::milliseconds> stageTimeout, uint64_t progress);

  const std::optional<Deadline>& deadline() const { return deadline_; }
  // Time left until the deadline, 0 once past (only with a deadline).
  std::chrono::milliseconds remaining(Time now) const;
  bool expired(Time now) const { return deadline_ && now >= deadline_->at; }

 private:
  std::optional<Deadline> deadline_;
  std::optional<uint64_t> armedAt_;  // progress() when the stage deadline was set
};

// Why a connection ended, as the queue, the logs and the DSNs show it. The peer is
// ConnectRequest::label() ("mx.example.com [192.0.2.1]:25").
enum class ConnectionEnd {
  ConnectTimeout,  // the connect deadline passed
  ConnectError,    // the TCP connect failed (detail: the error)
  PeerClosed,      // the server closed the connection
  Closed,          // closed on our side with no reason recorded
};
std::string connectionEndText(ConnectionEnd why, const std::string& peer, std::string_view detail = {});

// A local reason (connect trouble, a timeout, an abort): no reply code.
SessionFailure localFailure(std::string text, std::string enhanced = {});
// The session gave up on a server reply (its code and enhanced status kept, the text
// names the peer) or on a stage without one (the reply's text or the stage).
SessionFailure sessionFailure(const smtp::SessionFailed& failed, const std::string& peer);

}  // namespace subrelay::delivery
