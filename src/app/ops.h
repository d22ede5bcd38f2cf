// Operations wiring for serve: the metrics exporter (metrics.address), the queue gauges
// and data_dir/status (for `subrelay status`), refreshed from the main thread's tick.
// The decisions live in metrics/ (formats, routes, last-minute rates); this only feeds
// them and does the I/O.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "config/config.h"
#include "metrics/http_exporter.h"
#include "metrics/status.h"
#include "queue/sqlite_store.h"
#include "util/result.h"

namespace subrelay::app {

class Runtime;

class Operations {
 public:
  Operations(Runtime& rt, std::string dbPath, std::string dataDir);
  ~Operations();

  // Opens its own queue connection and, when configured, starts the exporter. The
  // error says what to change (address in use, ...).
  // Before the SMTP listeners are bound: a busy metrics address stops serve before it
  // says it listens anywhere.
  util::Result<void> start(const config::Config& cfg);
  // Once they are bound (address, TLS mode), for data_dir/status.
  void setListeners(std::vector<std::pair<std::string, std::string>> listeners);
  // From the main thread every tick: queue gauges, last-minute rates, status file.
  void tick();
  void setReady(bool ready) { ready_.store(ready); }
  void reloaded(bool ok);
  // Removes data_dir/status at a clean stop.
  void stop();

 private:
  std::string notReady() const;
  Runtime& rt_;
  std::string dbPath_, dataDir_;
  std::unique_ptr<queue::SqliteStore> store_;
  std::unique_ptr<metrics::HttpExporter> exporter_;
  metrics::RecentCounts recent_;
  metrics::ServerSnapshot snapshot_;
  std::atomic<bool> ready_{false};
  std::atomic<bool> queueOk_{true};
};

}  // namespace subrelay::app
