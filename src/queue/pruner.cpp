#include "queue/pruner.h"

#include <algorithm>
#include <cstdio>
#include <string>

#include "util/log.h"

namespace subrelay::queue {

Pruner::Pruner(SqliteStore& store, const util::Clock& clock, PrunePacer pacer)
    : store_(store), clock_(clock), pacer_(pacer) {
  stats_.since = clock_.now();
}

std::chrono::milliseconds Pruner::run(const RetentionPolicy& policy) {
  auto& st = stats_;
  const auto t0 = clock_.now();
  auto counts = store_.prune(util::unixSeconds(clock_.wallNow()), policy, pacer_.maxRows);
  if (counts.ok()) {
    // Suppression lists: expired rows, and the oldest beyond the bound (a separate short
    // transaction; a failure is logged and retried with the next batch).
    auto sup = store_.pruneSuppressions(util::unixSeconds(clock_.wallNow()), policy.maxSuppressions, pacer_.maxRows);
    if (sup.ok())
      counts->suppressionsDeleted = sup.value();
    else
      util::logWarn("retention", "cannot prune suppressions: " + sup.error().message);
  }
  const auto t1 = clock_.now();
  int64_t pages = 0;
  const bool failed = !counts.ok();
  if (failed) {
    util::logError("retention", "cannot prune the queue: " + counts.error().message);
  } else {
    auto v = store_.incrementalVacuum(pacer_.maxVacuumPages, kKeepFreePages);
    if (v.ok())
      pages = v.value();
    else
      util::logWarn("retention", "incremental vacuum: " + v.error().message);
  }
  const auto t2 = clock_.now();
  if (!failed && (counts->rows() > 0 || pages > 0)) {
    ++st.batches;
    st.counts.bodiesRemoved += counts->bodiesRemoved;
    st.counts.finishedDeleted += counts->finishedDeleted;
    st.counts.capturedDeleted += counts->capturedDeleted;
    st.counts.keysDeleted += counts->keysDeleted;
    st.counts.suppressionsDeleted += counts->suppressionsDeleted;
    st.pages += pages;
    st.sumPrune += t1 - t0;
    st.maxPrune = std::max(st.maxPrune, t1 - t0);
    st.maxVacuum = std::max(st.maxVacuum, t2 - t1);
  }
  if (t2 - st.since >= std::chrono::seconds(60)) {
    if (st.batches > 0) {
      using Ms = std::chrono::duration<double, std::milli>;
      char times[160];
      std::snprintf(times, sizeof times, "prune %.1f ms average, %.1f ms longest; vacuum %.1f ms longest",
                    Ms(st.sumPrune).count() / static_cast<double>(st.batches), Ms(st.maxPrune).count(),
                    Ms(st.maxVacuum).count());
      util::logInfo("retention",
                    "last " + std::to_string(std::chrono::duration_cast<std::chrono::seconds>(t2 - st.since).count()) +
                        " s: " + std::to_string(st.batches) + " batches, " + std::to_string(st.counts.bodiesRemoved) +
                        " bodies removed, " + std::to_string(st.counts.finishedDeleted) + " finished and " +
                        std::to_string(st.counts.capturedDeleted) + " captured messages deleted, " +
                        std::to_string(st.counts.keysDeleted) + " idempotency keys forgotten, " +
                        std::to_string(st.counts.suppressionsDeleted) + " suppressions expired, " +
                        std::to_string(st.pages) + " pages released; " + times);
    }
    st = Stats{};
    st.since = t2;
  }
  return pacer_.next(failed ? PruneCounts{} : counts.value(), pages, failed);
}

}  // namespace subrelay::queue
