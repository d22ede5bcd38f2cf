// Small helpers shared by the SQLite store's translation units (sqlite_store.cpp and
// webhook_outbox.cpp): cached statements, their scoped use, binding and reading text, and
// a write transaction that rolls back unless committed. Internal to queue/.
#pragma once

#include <sqlite3.h>

#include <string>

#include "util/cptr.h"

namespace subrelay::queue::detail {

using Stmt = util::CPtr<sqlite3_stmt, sqlite3_finalize>;

// Resets and unbinds a cached statement when the scope ends, whatever path it takes, so
// no statement holds a read lock or a pointer to a caller's (SQLITE_STATIC) buffer.
class Use {
 public:
  explicit Use(sqlite3_stmt* s) : s_(s) {}
  explicit Use(const Stmt& s) : s_(s.get()) {}
  ~Use() {
    if (s_) {
      sqlite3_reset(s_);
      sqlite3_clear_bindings(s_);
    }
  }
  Use(const Use&) = delete;
  Use& operator=(const Use&) = delete;
  sqlite3_stmt* get() const { return s_; }

 private:
  sqlite3_stmt* s_;
};

// Binds without copying: the caller guarantees the bytes outlive the statement's use,
// and Use clears the binding before that stops being true.
inline int bindText(sqlite3_stmt* s, int i, const std::string& v) {
  return sqlite3_bind_text64(s, i, v.data(), v.size(), SQLITE_STATIC, SQLITE_UTF8);
}

inline std::string columnText(sqlite3_stmt* s, int i) {
  const auto* p = static_cast<const char*>(sqlite3_column_blob(s, i));
  int n = sqlite3_column_bytes(s, i);
  return p ? std::string(p, static_cast<size_t>(n)) : std::string();
}

// Runs a statement that returns no rows (BEGIN, SAVEPOINT, ...).
inline int run(sqlite3_stmt* s) {
  Use u(s);
  int rc = sqlite3_step(s);
  return rc == SQLITE_ROW ? SQLITE_DONE : rc;
}
inline int run(const Stmt& s) { return run(s.get()); }

// A write transaction on cached BEGIN IMMEDIATE / COMMIT / ROLLBACK statements that rolls
// back when it goes out of scope uncommitted, so no error path leaves it open. A missing
// statement (one that could not be prepared) means the transaction never opens.
class Txn {
 public:
  Txn(sqlite3* db, sqlite3_stmt* begin, sqlite3_stmt* commit, sqlite3_stmt* rollback)
      : db_(db), commit_(commit), rollback_(rollback), open_(begin && commit && rollback && run(begin) == SQLITE_DONE) {}
  Txn(sqlite3* db, const Stmt& begin, const Stmt& commit, const Stmt& rollback)
      : Txn(db, begin.get(), commit.get(), rollback.get()) {}
  ~Txn() {
    if (open_ && !sqlite3_get_autocommit(db_)) run(rollback_);
  }
  Txn(const Txn&) = delete;
  Txn& operator=(const Txn&) = delete;
  bool open() const { return open_; }
  bool commit() {
    if (!open_) return false;
    if (run(commit_) != SQLITE_DONE) return false;  // the destructor rolls back
    open_ = false;
    return true;
  }

 private:
  sqlite3* db_;
  sqlite3_stmt* commit_;
  sqlite3_stmt* rollback_;
  bool open_;
};

}  // namespace subrelay::queue::detail
