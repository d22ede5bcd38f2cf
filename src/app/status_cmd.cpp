#include "app/status_cmd.h"

#include <signal.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "app/queue_cmd.h"
#include "metrics/status.h"
#include "queue/sqlite_store.h"
#include "util/clock.h"

namespace subrelay::app {

int statusCommand(const StatusCmdOptions& o) {
  namespace fs = std::filesystem;
  metrics::StatusReport r;
  r.now = util::unixSeconds(std::chrono::system_clock::now());
  const fs::path statusPath = fs::path(o.dataDir) / "status";
  std::ifstream f(statusPath, std::ios::binary);
  if (!f) {
    r.notRunningWhy = "no " + statusPath.string() + "; serve writes it while it runs";
  } else {
    std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    r.server = metrics::parseSnapshot(text);
    if (!r.server) {
      r.notRunningWhy = statusPath.string() + " is not a status file";
    } else if (::kill(static_cast<pid_t>(r.server->pid), 0) != 0 && errno == ESRCH) {
      r.notRunningWhy = "pid " + std::to_string(r.server->pid) + " is gone; it last reported at " +
                        std::to_string(r.now - r.server->updatedAt) + "s ago";
    } else if (r.now - r.server->updatedAt > 30) {
      r.notRunningWhy = "pid " + std::to_string(r.server->pid) + " has not reported for " +
                        std::to_string(r.now - r.server->updatedAt) + "s (hung or stopped?)";
    } else {
      r.running = true;
    }
  }
  auto store = openQueue(o.dataDir);
  if (!store.ok()) {
    std::fprintf(stderr, "subrelay: %s\n", store.error().message.c_str());
    return 1;
  }
  auto q = store.value()->queueStats();
  auto recent = store.value()->acceptedSince(r.now - 3600);
  if (!q.ok() || !recent.ok()) {
    std::fprintf(stderr, "subrelay: %s\n", (!q.ok() ? q.error() : recent.error()).message.c_str());
    return 1;
  }
  r.queued = q->queued;
  r.deferred = q->deferred;
  r.inFlight = q->inFlight;
  r.oldestReceivedAt = q->oldestReceivedAt;
  for (const auto& a : recent.value()) {
    r.receivedLastHour += a.messages;
    r.capturedLastHour += a.captured;
    r.queueAccounts.push_back({a.account, a.messages, 0});
  }
  std::sort(r.queueAccounts.begin(), r.queueAccounts.end(),
            [](const metrics::AccountCount& a, const metrics::AccountCount& b) {
              return a.total != b.total ? a.total > b.total : a.account < b.account;
            });
  if (r.queueAccounts.size() > metrics::kTopAccounts) r.queueAccounts.resize(metrics::kTopAccounts);
  const std::string out = o.json ? metrics::renderJson(r) + "\n" : metrics::renderText(r);
  std::fputs(out.c_str(), stdout);
  return 0;
}

}  // namespace subrelay::app
