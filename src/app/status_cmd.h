// `subrelay status [--json]`: whether serve runs (data_dir/status, refreshed by serve
// every 2 s, and its pid alive), uptime, listeners, sessions, last minute's accepted and
// delivered counts, top senders; and the queue by state from queue.db. Works with serve
// stopped too (queue part only).
#pragma once

#include <string>

namespace subrelay::app {

struct StatusCmdOptions {
  std::string dataDir;
  bool json = false;
};

int statusCommand(const StatusCmdOptions& o);

}  // namespace subrelay::app
