// AttemptClock and the failure texts of one outbound connection (attempt.h).
#include "delivery/attempt.h"

#include <utility>

namespace subrelay::delivery {

void AttemptClock::connecting(Time now, std::chrono::milliseconds limit) {
  deadline_ = Deadline{Kind::Connect, now + limit};
  armedAt_.reset();
}

bool AttemptClock::update(Time now, std::optional<std::chrono::milliseconds> stageTimeout, uint64_t progress) {
  const std::optional<Deadline> before = deadline_;
  if (!stageTimeout) {
    deadline_.reset();
    armedAt_.reset();
  } else if (!(armedAt_ == progress && deadline_ && deadline_->kind == Kind::Stage)) {
    armedAt_ = progress;
    deadline_ = Deadline{Kind::Stage, now + *stageTimeout};
  }
  return deadline_ != before;
}

std::chrono::milliseconds AttemptClock::remaining(Time now) const {
  if (!deadline_ || now >= deadline_->at) return std::chrono::milliseconds(0);
  // Rounded up: a timer set for this long never fires before the deadline.
  return std::chrono::ceil<std::chrono::milliseconds>(deadline_->at - now);
}

std::string connectionEndText(ConnectionEnd why, const std::string& peer, std::string_view detail) {
  switch (why) {
    case ConnectionEnd::ConnectTimeout: return "timeout connecting to " + peer;
    case ConnectionEnd::ConnectError: return "connect to " + peer + ": " + std::string(detail);
    case ConnectionEnd::PeerClosed: return "connection closed by " + peer;
    case ConnectionEnd::Closed: break;
  }
  return "connection to " + peer + " closed";
}

SessionFailure localFailure(std::string text, std::string enhanced) {
  return SessionFailure{0, std::move(enhanced), std::move(text), {}};
}

SessionFailure sessionFailure(const smtp::SessionFailed& failed, const std::string& peer) {
  SessionFailure f;
  f.code = failed.reply.code;
  f.enhanced = failed.reply.enhanced;
  f.stage = failed.stage;
  f.text = failed.reply.code ? peer + " said: " + failed.reply.summary()
                             : (failed.reply.text.empty() ? failed.stage : failed.reply.text) + " (" + peer + ")";
  return f;
}

}  // namespace subrelay::delivery
