// `subrelay queue list|show|retry|drop|bounce`: the SQLite queue, directly. list and show
// open it read-only; retry, drop and bounce open it read-write. WAL lets both run while
// `serve` runs: readers never wait, and a writer waits (busy timeout) for serve's commit
// in progress instead of failing.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>

#include "queue/sqlite_store.h"
#include "util/result.h"

namespace subrelay::app {

struct QueueCmdOptions {
  std::string dataDir;
  bool json = false;
  bool raw = false;
  // From the config (webhookEventSets): `queue bounce` writes the accounts' "bounced"
  // events like serve does. Empty with --data-dir or --dev: no events.
  std::map<std::string, std::set<std::string>> webhookEvents;
};

// <dataDir>/queue.db for a command: read-only unless writable; never created.
util::Result<std::unique_ptr<queue::SqliteStore>> openQueue(const std::string& dataDir, bool writable = false);

int queueList(const QueueCmdOptions& o);
int queueShow(const QueueCmdOptions& o, const std::string& id);
// Operator actions. retry: id, or every waiting recipient when id is nullopt (--all).
int queueRetry(const QueueCmdOptions& o, const std::optional<std::string>& id);
int queueDrop(const QueueCmdOptions& o, const std::string& id);
int queueBounce(const QueueCmdOptions& o, const std::string& id);

}  // namespace subrelay::app
