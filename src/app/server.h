// `subrelay serve`: loads the config (or the embedded --dev one), opens the queue,
// starts one worker loop per core plus the group-commit writer, and runs until
// SIGTERM/SIGINT (graceful: stop accepting, finish transactions in flight within
// limits.shutdown_grace). Tells systemd READY=1 / STOPPING=1 when NOTIFY_SOCKET is set.
#pragma once

#include <string>

namespace subrelay::app {

struct ServeOptions {
  std::string configPath;
  bool dev = false;
};

int runServe(const ServeOptions& opts);

}  // namespace subrelay::app
