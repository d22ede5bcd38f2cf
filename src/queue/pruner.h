// queue::Pruner: retention (retention.* in the config) as small batches. One run() is one
// SqliteStore::prune() transaction of at most PrunePacer::maxRows messages plus an
// incremental vacuum that gives free pages back to the file system (keeping some for new
// messages to reuse); it returns when the next run is due (PrunePacer), and logs a summary
// line once a minute when it did something. The caller only arms a timer: it runs on the
// delivery thread's own connection, never on a submission loop, and the group-commit
// writer waits at most for one batch's write lock.
#pragma once

#include <chrono>
#include <cstdint>

#include "queue/sqlite_store.h"
#include "util/clock.h"

namespace subrelay::queue {

class Pruner {
 public:
  Pruner(SqliteStore& store, const util::Clock& clock, PrunePacer pacer = {});
  std::chrono::milliseconds run(const RetentionPolicy& policy);

  // Free pages kept for reuse rather than returned: 8 MiB of 4 KiB pages.
  static constexpr int64_t kKeepFreePages = 2048;

 private:
  SqliteStore& store_;
  const util::Clock& clock_;
  PrunePacer pacer_;
  using Duration = std::chrono::steady_clock::duration;
  struct Stats {
    PruneCounts counts;
    int64_t batches = 0, pages = 0;
    Duration maxPrune{}, maxVacuum{}, sumPrune{};
    std::chrono::steady_clock::time_point since{};
  } stats_;
};

}  // namespace subrelay::queue
