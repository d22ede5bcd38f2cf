#include "webhook/outbox_policy.h"

#include <algorithm>

namespace subrelay::webhook {

size_t claimCount(size_t inFlight, const OutboxPolicy& p) { return inFlight >= p.maxInFlight ? 0 : p.maxInFlight - inFlight; }

bool delivered(long httpStatus) { return httpStatus >= 200 && httpStatus <= 299; }

RetryDecision afterFailure(int64_t createdAt, int attempts, int64_t now, const OutboxPolicy& p) {
  RetryDecision d;
  int64_t delay = 60;
  if (!p.retrySchedule.empty()) {
    const size_t i = std::min<size_t>(attempts > 0 ? static_cast<size_t>(attempts - 1) : 0, p.retrySchedule.size() - 1);
    delay = std::max<int64_t>(1, p.retrySchedule[i].count());
  }
  d.nextAt = now + delay;
  d.drop = d.nextAt > createdAt + p.maxAge.count();
  return d;
}

bool expired(int64_t createdAt, int64_t now, const OutboxPolicy& p) { return now > createdAt + p.maxAge.count(); }

uint64_t overBacklog(uint64_t backlog, const OutboxPolicy& p) { return backlog > p.maxBacklog ? backlog - p.maxBacklog : 0; }

}  // namespace subrelay::webhook
