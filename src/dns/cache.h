// A small answer cache keyed by (name, type), on an injected util::Clock.
//
// RFC 1035 3.2.1 / RFC 2181 8: a record may be reused for its TTL, no longer; TTLs are capped
// (kMaxTtl) so a bad zone cannot pin an answer for days. RFC 2308 5: NXDOMAIN and NODATA are
// cached for the SOA-derived negative TTL, capped short (kMaxNegativeTtl). SERVFAIL, REFUSED,
// timeouts and errors are not cached by default (RFC 2308 7 allows at most 5 minutes; the
// resolver's own retries are cheap compared with a wrong "temporary" result held too long).
// Bounded: when full, expired entries go first, then the one closest to expiry. An entry is
// the whole Answer, so a hit is exactly as `authenticated` (DNSSEC AD) as the lookup that
// stored it: validation is never upgraded or lost by the cache.
//
// Not here: the I/O and which answers to insert (uv_resolver.h).
#pragma once

#include <chrono>
#include <cstddef>
#include <map>
#include <optional>
#include <string>
#include <utility>

#include "dns/resolver.h"
#include "util/clock.h"

namespace subrelay::dns {

struct CacheLimits {
  size_t maxEntries = 10000;
  std::chrono::seconds maxTtl{3600};
  std::chrono::seconds maxNegativeTtl{60};
  std::chrono::seconds failureTtl{0};  // ServFail / Refused / Timeout / Error; 0 = never cached
};

class Cache {
 public:
  explicit Cache(const util::Clock& clock, CacheLimits limits = {});

  // Stores a (copy of the) answer under (its name, its type). Answers with TTL 0 are not stored.
  void insert(const Answer& answer);
  // The answer, with ttl lowered by the time spent in the cache; nullopt if absent/expired.
  std::optional<Answer> lookup(const std::string& name, QType type);

  size_t size() const { return entries_.size(); }
  void clear();

 private:
  using Key = std::pair<std::string, uint16_t>;
  using TimePoint = std::chrono::steady_clock::time_point;
  struct Entry {
    Answer answer;
    TimePoint stored;
    TimePoint expires;
    std::multimap<TimePoint, Key>::iterator byExpiry;
  };
  void erase(std::map<Key, Entry>::iterator it);
  void makeRoom(TimePoint now);

  const util::Clock& clock_;
  CacheLimits limits_;
  std::map<Key, Entry> entries_;
  std::multimap<TimePoint, Key> byExpiry_;
};

}  // namespace subrelay::dns
