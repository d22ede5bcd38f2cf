#include "app/suppression_sync.h"

#include <utility>
#include <vector>

#include "util/clock.h"
#include "util/log.h"

namespace subrelay::app {

util::Result<void> SuppressionSync::start() {
  auto s = queue::SqliteStore::open(dbPath_, queue::OpenOptions{.readOnly = true, .create = false});
  if (!s.ok()) return s.error();
  store_ = std::move(s).value();
  reload();
  return {};
}

void SuppressionSync::poll() {
  if (!store_) return;
  auto c = store_->suppressionChanges();
  if (!c.ok()) {
    util::logWarn("suppression", "cannot read the change counter: " + c.error().message);
    return;
  }
  if (c.value() != seen_) reload();
}

void SuppressionSync::reload() {
  if (!store_) return;
  // The counter first: a change made while the rows are read moves it again, and the
  // next poll reloads once more.
  auto c = store_->suppressionChanges();
  const int64_t now = util::unixSeconds(rt_.clock.wallNow());
  auto rows = store_->loadLiveSuppressions(now, policy::SuppressionTable::kDefaultMaxEntries);
  if (!c.ok() || !rows.ok()) {
    util::logWarn("suppression", "cannot load the suppression lists: " +
                                     (c.ok() ? rows.error().message : c.error().message));
    return;
  }
  std::vector<policy::Suppression> table;
  table.reserve(rows->size());
  for (auto& r : rows.value())
    table.push_back(policy::Suppression{std::move(r.account), std::move(r.address), std::move(r.reason), r.createdAt,
                                        r.expiresAt, std::move(r.source)});
  const size_t kept = rt_.suppressions.replace(std::move(table), now);
  if (seen_ < 0 || kept > 0 || c.value() != seen_)
    util::logDebug("suppression", "suppression lists loaded: " + std::to_string(kept) + " entries");
  seen_ = c.value();
}

}  // namespace subrelay::app
