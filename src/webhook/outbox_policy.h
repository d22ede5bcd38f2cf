// The webhook outbox's decisions, free of I/O and of the clock (times are passed in, unix
// seconds), so the tests run them on a fake clock. The dispatcher (dispatcher.h) asks:
//  - how many events to claim now (inFlight against maxInFlight, a batch at most);
//  - what a response means (2xx: done; anything else, or no response: retry);
//  - when to retry after the n-th failure (retrySchedule[n-1], its last entry repeating),
//    or whether to give up because the event would be older than maxAge by then;
//  - how many of an account's oldest events to drop when its backlog passes maxBacklog.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace subrelay::webhook {

struct OutboxPolicy {
  std::vector<std::chrono::seconds> retrySchedule{std::chrono::seconds(30), std::chrono::seconds(60),
                                                  std::chrono::seconds(300), std::chrono::seconds(900),
                                                  std::chrono::seconds(3600)};
  std::chrono::seconds maxAge{3 * 24 * 3600};
  uint64_t maxBacklog = 100000;
  size_t maxInFlight = 8;
  // A claimed event is not claimed again for this long (a lost dispatcher's claim ends).
  std::chrono::seconds claimFor{60};
};

// Events to claim now: free slots, never negative.
size_t claimCount(size_t inFlight, const OutboxPolicy& p);

// Only 2xx is a delivery (a 3xx is not followed: the URL is configured, not discovered).
bool delivered(long httpStatus);

struct RetryDecision {
  bool drop = false;   // too old: give up (logged and counted as dropped)
  int64_t nextAt = 0;  // when to try again (drop == false)
};

// After the attempts-th failed attempt (1 = the first) at `now` of an event created at
// createdAt.
RetryDecision afterFailure(int64_t createdAt, int attempts, int64_t now, const OutboxPolicy& p);

// Events already older than maxAge at `now` are dropped without a try.
bool expired(int64_t createdAt, int64_t now, const OutboxPolicy& p);

// How many of the oldest events to drop from an account's backlog of `backlog` events.
uint64_t overBacklog(uint64_t backlog, const OutboxPolicy& p);

}  // namespace subrelay::webhook
