// queue::DeliveryQueue: what the delivery scheduler (delivery/scheduler.h) needs from the
// durable queue, as an interface, so the scheduler's unit tests run it against an
// in-memory fake with a fake clock. SqliteStore is the real one.
//
// Leases are owned, not timed: a recipient handed out by leaseDue() stays with this
// process until recordAttempts() or releaseLeases() says what happened. The one serve
// per data_dir (lock file) clears leftovers at start-up (clearLeases), so only a crash
// can lead to a second attempt of a recipient (at-least-once, README.md).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "queue/store.h"

namespace subrelay::queue {

class DeliveryQueue {
 public:
  virtual ~DeliveryQueue() = default;

  // Deliverable recipients (queued/deferred, not captured) with next_attempt <= now and no
  // lease, oldest message first, at most maxMessages messages; each is leased in the same
  // transaction.
  virtual util::Result<std::vector<DueMessage>> leaseDue(int64_t now, size_t maxMessages) = 0;
  // One transaction for the batch (see SqliteStore::recordAttempts). Clears the leases.
  virtual util::Result<void> recordAttempts(const std::vector<AttemptRecord>& records) = 0;
  // Gives leased recipients back without an attempt (shutdown with work in hand); an
  // operator's bounce that waited for the attempt is applied now.
  virtual util::Result<void> releaseLeases(const std::string& messageId, const std::vector<int64_t>& indexes) = 0;

  virtual util::Result<std::string> content(const std::string& id) = 0;
  virtual util::Result<MessageInfo> show(const std::string& id) = 0;

  // DSN bookkeeping: each failure (dsn_pending) and each delay notice is turned into at
  // most one DSN, in the same transaction that clears its flag.
  virtual util::Result<std::vector<DsnWork>> pendingDsns(size_t maxMessages) = 0;
  virtual util::Result<void> completeDsn(const std::string& messageId, const std::vector<int64_t>& indexes,
                                         const std::optional<NewMessage>& dsn) = 0;
  virtual util::Result<std::vector<DsnWork>> pendingDelayNotices(int64_t receivedBefore, size_t maxMessages) = 0;
  virtual util::Result<void> completeDelayNotice(const std::string& messageId, const std::vector<int64_t>& indexes,
                                                 const std::optional<NewMessage>& dsn) = 0;
};

}  // namespace subrelay::queue
