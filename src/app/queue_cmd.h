// `subrelay queue list|show`: read the SQLite queue directly (read-only, WAL), so they
// work while `serve` runs.
#pragma once

#include <string>

namespace subrelay::app {

struct QueueCmdOptions {
  std::string dataDir;
  bool json = false;
  bool raw = false;
};

int queueList(const QueueCmdOptions& o);
int queueShow(const QueueCmdOptions& o, const std::string& id);

}  // namespace subrelay::app
