#include "queue/write_behind.h"

#include <string>

#include "util/log.h"

namespace subrelay::queue {

WriteBehindQueue::WriteBehindQueue(DeliveryQueue& reads, DeliveryQueue& writes, std::chrono::milliseconds retryAfter)
    : reads_(reads), writes_(writes), retryAfter_(retryAfter), thread_([this] { run(); }) {}

WriteBehindQueue::~WriteBehindQueue() {
  if (!drain(kStopWait))
    util::logError("delivery", "giving up on " + std::to_string(backlog()) +
                                   " delivery results that cannot be written; those recipients are attempted again");
  {
    std::lock_guard lk(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

util::Result<void> WriteBehindQueue::recordAttempts(const std::vector<AttemptRecord>& records) {
  if (records.empty()) return {};
  {
    std::lock_guard lk(mu_);
    pending_.insert(pending_.end(), records.begin(), records.end());
  }
  cv_.notify_one();
  return {};
}

bool WriteBehindQueue::drain(std::chrono::milliseconds max) {
  std::unique_lock lk(mu_);
  return idleCv_.wait_for(lk, max, [this] { return pending_.empty() && inFlight_ == 0; });
}

uint64_t WriteBehindQueue::commits() const {
  std::lock_guard lk(mu_);
  return commits_;
}

size_t WriteBehindQueue::backlog() const {
  std::lock_guard lk(mu_);
  return pending_.size() + inFlight_;
}

void WriteBehindQueue::run() {
  std::unique_lock lk(mu_);
  for (;;) {
    cv_.wait(lk, [this] { return !pending_.empty() || stopping_; });
    if (pending_.empty() && stopping_) return;
    std::vector<AttemptRecord> batch;
    batch.swap(pending_);
    inFlight_ = batch.size();
    lk.unlock();
    auto r = writes_.recordAttempts(batch);
    lk.lock();
    if (!r.ok()) {
      // Kept, in front of what came meanwhile, and tried again: the leases keep these
      // recipients from being attempted again while they wait.
      util::logError("delivery", "cannot record delivery results (retrying): " + r.error().message);
      batch.insert(batch.end(), pending_.begin(), pending_.end());
      pending_.swap(batch);
      inFlight_ = 0;
      cv_.wait_for(lk, retryAfter_, [this] { return stopping_; });
      if (stopping_) return;  // only after drain() gave up waiting: nothing more can be done
      continue;
    }
    ++commits_;
    inFlight_ = 0;
    if (pending_.empty()) idleCv_.notify_all();
  }
}

}  // namespace subrelay::queue
