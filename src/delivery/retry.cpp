// Retry maths (RFC 5321 4.5.4.1: retry after a delay, give up after a queue lifetime of
// "at least 4-5 days"). Pure functions over unix seconds; the clock is the caller's.
//
// Not here: where the attempt count and next-attempt time are stored (queue/), and when
// a DSN is sent (the scheduler, with dsn.h).
#include "delivery/retry.h"

#include <algorithm>

namespace subrelay::delivery {

using std::chrono::hours;
using std::chrono::minutes;
using std::chrono::seconds;

std::vector<seconds> defaultRetrySchedule() {
  return {minutes(5), minutes(10), minutes(20), minutes(40), hours(1), hours(2), hours(4), hours(8)};
}

std::optional<int64_t> nextAttemptAt(int64_t attempts, int64_t now, int64_t receivedAt, const RetryPolicy& p) {
  const std::vector<seconds> fallback = p.schedule.empty() ? defaultRetrySchedule() : std::vector<seconds>{};
  const std::vector<seconds>& schedule = p.schedule.empty() ? fallback : p.schedule;
  const int64_t step = std::clamp<int64_t>(attempts, 1, static_cast<int64_t>(schedule.size())) - 1;
  const int64_t delay = std::max<int64_t>(schedule[static_cast<size_t>(step)].count(), 1);
  const int64_t deadline = receivedAt + p.maxQueueTime.count();
  const int64_t next = now + delay;
  if (next <= deadline) return next;
  // The step overshoots the expiry: one last try at the expiry instant itself, unless
  // that instant has come already (this failure was the last try).
  if (now < deadline) return deadline;
  return std::nullopt;
}

bool expired(int64_t now, int64_t receivedAt, const RetryPolicy& p) {
  return now - receivedAt > p.maxQueueTime.count();
}

bool delayNoticeDue(int64_t now, int64_t receivedAt, const RetryPolicy& p) {
  if (p.delayNotice.count() <= 0) return false;
  return now - receivedAt >= p.delayNotice.count() && !expired(now, receivedAt, p);
}

}  // namespace subrelay::delivery
