// `subrelay status`: what the running server publishes every 2 s (data_dir/status, a
// small line format written by serve, read back by the status command), the rates over
// the last minute, and the one-screen summary in text or JSON. No I/O here.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace subrelay::metrics {

struct AccountCount {
  std::string account;
  uint64_t total = 0;       // since the server started
  uint64_t lastMinute = 0;
};

// What serve publishes.
struct ServerSnapshot {
  int64_t pid = 0;
  std::string version;
  int64_t startedAt = 0;  // unix seconds
  int64_t updatedAt = 0;
  std::vector<std::pair<std::string, std::string>> listeners;  // address, tls mode
  std::string metricsAddress;
  uint64_t sessions = 0;
  uint64_t deliveryConnections = 0;
  uint64_t acceptedTotal = 0, deliveredTotal = 0;
  uint64_t acceptedLastMinute = 0, deliveredLastMinute = 0;
  std::vector<AccountCount> accounts;  // busiest first, at most kTopAccounts
};
constexpr size_t kTopAccounts = 10;

std::string serialize(const ServerSnapshot& s);
// nullopt when the text is not a snapshot (empty, cut short, another format).
std::optional<ServerSnapshot> parseSnapshot(std::string_view text);

// Counter totals sampled over time; the difference across the last 60 s.
class RecentCounts {
 public:
  struct Totals {
    uint64_t accepted = 0, delivered = 0;
    std::map<std::string, uint64_t> perAccount;
  };
  void sample(int64_t nowMs, Totals t);
  // Over the last minute (or since the first sample when younger).
  Totals lastMinute() const;
  const Totals& latest() const { return samples_.back().second; }

 private:
  std::deque<std::pair<int64_t, Totals>> samples_;
};

// Fills the snapshot's counts and its top accounts from the counter totals.
void fillCounts(ServerSnapshot& s, const RecentCounts& rc);

// What the status command shows.
struct StatusReport {
  bool running = false;
  std::string notRunningWhy;         // when !running
  std::optional<ServerSnapshot> server;  // last snapshot (also when stale)
  uint64_t queued = 0, deferred = 0, inFlight = 0;
  int64_t oldestReceivedAt = 0;
  uint64_t receivedLastHour = 0, capturedLastHour = 0;
  std::vector<AccountCount> queueAccounts;  // messages in the queue from the last hour, busiest first
  int64_t now = 0;
};

// Whether serve runs, from what it published: the snapshot (nullopt: no file, or not a
// status file), whether its pid exists, and how old it is. Fills running, server and
// notRunningWhy; statusPath names the file in the reasons.
void judgeServer(StatusReport& r, std::optional<ServerSnapshot> snapshot, bool fileFound, bool pidAlive,
                 const std::string& statusPath);
constexpr int64_t kStaleAfterSeconds = 30;

// The busiest accounts of the last hour (at most kTopAccounts), totals into r.
void fillRecent(StatusReport& r, const std::vector<AccountCount>& perAccount, uint64_t captured);

std::string renderText(const StatusReport& r);
std::string renderJson(const StatusReport& r);
// "3d 4h", "2h 5m", "5m 3s", "12s".
std::string formatAge(int64_t seconds);

}  // namespace subrelay::metrics
