// SqliteStore: queue::Store on SQLite (WAL, synchronous=FULL), schema with a version
// number and forward migrations run at open.
#pragma once

#include <memory>
#include <string>

#include "queue/store.h"

struct sqlite3;

namespace subrelay::queue {

struct OpenOptions {
  bool readOnly = false;     // `queue list/show` while serve runs
  bool create = true;        // create the file and schema if missing
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
  explicit SqliteStore(sqlite3* db);
  struct Statements;
  sqlite3* db_;
  std::unique_ptr<Statements> stmts_;
};

}  // namespace subrelay::queue
