// Retry maths (delivery.retry_schedule, delivery.max_queue_time): pure functions.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <vector>

namespace subrelay::delivery {

// The default schedule of delivery.retry_schedule (README.md): 5m, 10m, 20m, 40m, 1h, 2h, 4h, 8h.
std::vector<std::chrono::seconds> defaultRetrySchedule();

struct RetryPolicy {
  // Delay after the 1st, 2nd, ... failure; the last repeats. Empty = defaultRetrySchedule().
  // Delays below one second count as one second, so a message is never retried in a loop.
  std::vector<std::chrono::seconds> schedule = defaultRetrySchedule();
  std::chrono::seconds maxQueueTime{5 * 24 * 3600};
  std::chrono::seconds delayNotice{4 * 3600};  // 0 = no delay DSN
};

// After `attempts` failed attempts (>= 1), when to try again (unix seconds), or nullopt
// when the message is expired: the next try would be after receivedAt + maxQueueTime.
// A final attempt is still scheduled at the expiry instant when the last step overshoots
// it, so a message is tried once more just before it gives up.
std::optional<int64_t> nextAttemptAt(int64_t attempts, int64_t now, int64_t receivedAt, const RetryPolicy& p);

// True when a message received at receivedAt has been queued longer than maxQueueTime
// (strictly: at the expiry instant itself the final attempt is still due, not a bounce).
bool expired(int64_t now, int64_t receivedAt, const RetryPolicy& p);

// True when a "delayed" DSN is due for a message still queued: delayNotice is set, the
// message has waited at least that long, and it has not expired. The caller remembers
// that it sent one (one delay notice per message).
bool delayNoticeDue(int64_t now, int64_t receivedAt, const RetryPolicy& p);

}  // namespace subrelay::delivery
