// SuppressionSync: keeps Runtime::suppressions (the table asked at RCPT) in step with the
// queue's suppressions table, which the delivery thread (hard bounces), captured messages
// and `subrelay suppression add/remove` (another process) write. Wiring only: the store
// keeps a change counter (schema version 11), the table does the lookups and bounds.
//
// poll() (serve's main loop, every 2 s) reads the counter on its own read-only connection
// and reloads when it moved; reload() (SIGHUP, start) reloads at once.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "app/runtime.h"
#include "queue/sqlite_store.h"
#include "util/result.h"

namespace subrelay::app {

class SuppressionSync {
 public:
  SuppressionSync(Runtime& rt, std::string dbPath) : rt_(rt), dbPath_(std::move(dbPath)) {}
  // Opens the read-only connection and loads the table.
  util::Result<void> start();
  void poll();
  void reload();

 private:
  Runtime& rt_;
  std::string dbPath_;
  std::unique_ptr<queue::SqliteStore> store_;
  int64_t seen_ = -1;
};

}  // namespace subrelay::app
