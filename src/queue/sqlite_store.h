// SqliteStore: queue::Store on SQLite (WAL, synchronous=FULL), schema with a version
// number and forward migrations run at open (schema.h).
//
// Threads: one SqliteStore is one SQLite connection, opened with SQLITE_OPEN_NOMUTEX
// because its cached statements cannot be shared between threads anyway; the store takes
// its own mutex around every call instead, so a stray call from a second thread is
// serialised, not a data race. Serialised means it waits behind an fsync: code that must
// not block (the event loop) opens its own connection, read-only if it only reads. WAL
// lets any number of readers run while the one writer commits (`queue list` during serve).
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "queue/store.h"

struct sqlite3;

namespace subrelay::queue {

struct OpenOptions {
  bool readOnly = false;  // `queue list/show` while serve runs
  bool create = true;     // create the file and schema if missing
};

class SqliteStore final : public Store {
 public:
  // path: a file path, or ":memory:" for tests. data_dir is created by the caller.
  static util::Result<std::unique_ptr<SqliteStore>> open(const std::string& path, OpenOptions opts = {});
  ~SqliteStore() override;
  SqliteStore(const SqliteStore&) = delete;
  SqliteStore& operator=(const SqliteStore&) = delete;

  std::vector<util::Result<std::string>> insertBatch(const std::vector<NewMessage>& batch) override;
  util::Result<std::vector<MessageInfo>> list() override;
  util::Result<MessageInfo> show(const std::string& id) override;
  util::Result<std::string> content(const std::string& id) override;
  util::Result<int64_t> count() override;

  int schemaVersion() const;
  static constexpr int kSchemaVersion = 1;

 private:
  SqliteStore(sqlite3* db, int version, bool readOnly);
  util::Result<MessageInfo> showLocked(const std::string& id);
  util::Error dbError(const std::string& what) const;

  struct Statements;
  std::mutex mu_;
  sqlite3* db_;
  int version_;
  bool readOnly_;
  std::unique_ptr<Statements> stmts_;
};

}  // namespace subrelay::queue
