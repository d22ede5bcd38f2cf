// queue::WriteBehindQueue: a DeliveryQueue whose recordAttempts() hands the records to a
// writer thread with its own connection and returns at once, so the delivery loop never
// waits for an fsync while every connection it drives stands still. Everything else goes
// to the loop's own connection.
//
// Nothing is lost or doubled by writing behind: the recipients stay leased in SQLite until
// their record commits, so no lease can hand them out again meanwhile, and a crash before
// the commit is the crash case the lease was always there for (attempted again at the next
// start). The writer keeps records that fail to commit and tries again (a full disk), in
// order; drain() waits until everything handed over is committed (shutdown).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "queue/delivery_queue.h"

namespace subrelay::queue {

class WriteBehindQueue final : public DeliveryQueue {
 public:
  // `reads` serves every call but recordAttempts; `writes` is used by the writer thread only.
  WriteBehindQueue(DeliveryQueue& reads, DeliveryQueue& writes,
                   std::chrono::milliseconds retryAfter = std::chrono::seconds(1));
  // drain(kStopWait), then stops the thread. Records still failing then are given up: the
  // crash case (their leases are cleared at the next start, and they are attempted again).
  ~WriteBehindQueue() override;
  static constexpr std::chrono::seconds kStopWait{30};
  WriteBehindQueue(const WriteBehindQueue&) = delete;
  WriteBehindQueue& operator=(const WriteBehindQueue&) = delete;

  util::Result<void> recordAttempts(const std::vector<AttemptRecord>& records) override;
  // Waits until everything handed over is committed, at most `max`; false on timeout.
  bool drain(std::chrono::milliseconds max);
  uint64_t commits() const;
  size_t backlog() const;  // records handed over, not yet committed

  util::Result<std::vector<DueMessage>> leaseDue(int64_t now, size_t maxMessages) override {
    return reads_.leaseDue(now, maxMessages);
  }
  util::Result<void> releaseLeases(const std::string& id, const std::vector<int64_t>& idx) override {
    return reads_.releaseLeases(id, idx);
  }
  util::Result<std::string> content(const std::string& id) override { return reads_.content(id); }
  util::Result<MessageInfo> show(const std::string& id) override { return reads_.show(id); }
  util::Result<std::vector<DsnWork>> pendingDsns(size_t max) override { return reads_.pendingDsns(max); }
  util::Result<void> completeDsn(const std::string& id, const std::vector<int64_t>& idx,
                                 const std::optional<NewMessage>& dsn) override {
    return reads_.completeDsn(id, idx, dsn);
  }
  util::Result<std::vector<DsnWork>> pendingDelayNotices(int64_t before, size_t max) override {
    return reads_.pendingDelayNotices(before, max);
  }
  util::Result<void> completeDelayNotice(const std::string& id, const std::vector<int64_t>& idx,
                                         const std::optional<NewMessage>& dsn) override {
    return reads_.completeDelayNotice(id, idx, dsn);
  }

 private:
  void run();
  DeliveryQueue& reads_;
  DeliveryQueue& writes_;
  std::chrono::milliseconds retryAfter_;
  mutable std::mutex mu_;
  std::condition_variable cv_;      // work for the writer, or stop
  std::condition_variable idleCv_;  // the writer caught up
  std::vector<AttemptRecord> pending_;
  size_t inFlight_ = 0;  // records the writer is committing now
  bool stopping_ = false;
  uint64_t commits_ = 0;
  std::thread thread_;
};

}  // namespace subrelay::queue
