// Answer cache (see cache.h).
#include "dns/cache.h"

#include <algorithm>

namespace subrelay::dns {

Cache::Cache(const util::Clock& clock, CacheLimits limits) : clock_(clock), limits_(limits) {}

void Cache::insert(const Answer& answer) {
  if (limits_.maxEntries == 0) return;
  std::chrono::seconds cap{0};
  switch (answer.status) {
    case Status::Ok:
      cap = limits_.maxTtl;
      break;
    case Status::NoData:
    case Status::NxDomain:
      cap = limits_.maxNegativeTtl;
      break;
    default:
      cap = limits_.failureTtl;
      break;
  }
  const bool failure =
      answer.status != Status::Ok && answer.status != Status::NoData && answer.status != Status::NxDomain;
  // Failures carry no TTL of their own: they live for failureTtl exactly.
  const std::chrono::seconds ttl = failure ? cap : std::min(cap, std::chrono::seconds(answer.ttl));
  if (ttl.count() <= 0) return;

  const TimePoint now = clock_.now();
  Key key{answer.name, static_cast<uint16_t>(answer.type)};
  if (auto it = entries_.find(key); it != entries_.end()) erase(it);
  makeRoom(now);
  Entry e{answer, now, now + ttl, {}};
  e.answer.ttl = static_cast<uint32_t>(ttl.count());
  e.byExpiry = byExpiry_.emplace(e.expires, key);
  entries_.emplace(std::move(key), std::move(e));
}

std::optional<Answer> Cache::lookup(const std::string& name, QType type) {
  auto it = entries_.find(Key{name, static_cast<uint16_t>(type)});
  if (it == entries_.end()) return std::nullopt;
  const TimePoint now = clock_.now();
  if (now >= it->second.expires) {
    erase(it);
    return std::nullopt;
  }
  Answer a = it->second.answer;
  const auto left = std::chrono::ceil<std::chrono::seconds>(it->second.expires - now);
  a.ttl = static_cast<uint32_t>(std::max<int64_t>(0, left.count()));
  return a;
}

void Cache::clear() {
  entries_.clear();
  byExpiry_.clear();
}

void Cache::erase(std::map<Key, Entry>::iterator it) {
  byExpiry_.erase(it->second.byExpiry);
  entries_.erase(it);
}

void Cache::makeRoom(TimePoint now) {
  // Expired entries first, then whatever expires soonest, until one slot is free.
  while (!byExpiry_.empty() && (byExpiry_.begin()->first <= now || entries_.size() >= limits_.maxEntries)) {
    auto it = entries_.find(byExpiry_.begin()->second);
    if (it == entries_.end()) {  // cannot happen; keep the index consistent regardless
      byExpiry_.erase(byExpiry_.begin());
      continue;
    }
    erase(it);
  }
}

}  // namespace subrelay::dns
