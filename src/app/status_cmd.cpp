#include "app/status_cmd.h"

#include <signal.h>
#include <sys/stat.h>

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
  // Reads only: what serve published, and whether its pid exists. metrics::judgeServer decides.
  const fs::path statusPath = fs::path(o.dataDir) / "status";
  std::ifstream f(statusPath, std::ios::binary);
  std::optional<metrics::ServerSnapshot> snap;
  if (f) snap = metrics::parseSnapshot(std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()));
  const bool alive = snap && !(::kill(static_cast<pid_t>(snap->pid), 0) != 0 && errno == ESRCH);
  metrics::judgeServer(r, std::move(snap), static_cast<bool>(f), alive, statusPath.string());
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
  std::vector<metrics::AccountCount> perAccount;
  uint64_t captured = 0;
  for (const auto& a : recent.value()) {
    perAccount.push_back({a.account, a.messages, 0});
    captured += a.captured;
  }
  metrics::fillRecent(r, perAccount, captured);
  const std::string out = o.json ? metrics::renderJson(r) + "\n" : metrics::renderText(r);
  std::fputs(out.c_str(), stdout);
  return 0;
}

}  // namespace subrelay::app
