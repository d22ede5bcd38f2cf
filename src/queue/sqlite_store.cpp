// SqliteStore: the queue on SQLite. Durability comes from WAL + synchronous=FULL: COMMIT
// returns after the WAL is fsynced, which is what SPEC.md's "250 only after commit" needs.
// Schema and migrations live in schema.cpp; the writer thread in group_commit.cpp.
#include "queue/sqlite_store.h"

#include <sqlite3.h>

#include <chrono>
#include <random>

#include "queue/schema.h"
#include "util/cptr.h"

namespace subrelay::queue {

namespace {

using Stmt = util::CPtr<sqlite3_stmt, sqlite3_finalize>;
using Db = util::CPtr<sqlite3, sqlite3_close_v2>;

// How long a writer waits for another connection's lock (a second `serve`, a migration,
// a checkpoint) before the call fails. Long enough to ride out a checkpoint; short enough
// that the SMTP client gets a 451 rather than a timeout.
constexpr int kBusyTimeoutMs = 5000;

// Resets and unbinds a cached statement when the scope ends, whatever path it takes, so
// no statement holds a read lock or a pointer to a caller's (SQLITE_STATIC) buffer.
class Use {
 public:
  explicit Use(const Stmt& s) : s_(s.get()) {}
  ~Use() {
    sqlite3_reset(s_);
    sqlite3_clear_bindings(s_);
  }
  Use(const Use&) = delete;
  Use& operator=(const Use&) = delete;
  sqlite3_stmt* get() const { return s_; }

 private:
  sqlite3_stmt* s_;
};

// Binds without copying: the caller guarantees the bytes outlive the statement's use,
// and Use clears the binding before that stops being true.
int bindText(sqlite3_stmt* s, int i, const std::string& v) {
  return sqlite3_bind_text64(s, i, v.data(), v.size(), SQLITE_STATIC, SQLITE_UTF8);
}

std::string columnText(sqlite3_stmt* s, int i) {
  const auto* p = static_cast<const char*>(sqlite3_column_blob(s, i));
  int n = sqlite3_column_bytes(s, i);
  return p ? std::string(p, static_cast<size_t>(n)) : std::string();
}

// Runs a statement that returns no rows (BEGIN, SAVEPOINT, ...).
int run(const Stmt& s) {
  Use u(s);
  int rc = sqlite3_step(u.get());
  return rc == SQLITE_ROW ? SQLITE_DONE : rc;
}

}  // namespace

struct SqliteStore::Statements {
  Stmt begin, commit, rollback;
  Stmt savepoint, release, rollbackTo;
  Stmt insertMessage, insertRecipient;
  Stmt listAll, showOne, content, count;
};

namespace {

// One SELECT for messages joined with their recipients: a single statement reads one
// snapshot, so a list never shows a message with half of an update applied.
#define SUBRELAY_MESSAGE_COLUMNS                                                         \
  "SELECT m.id, m.account, m.mail_from, m.size, m.received_at, m.captured, m.smtputf8, " \
  "m.client_address, m.helo, m.tls_version, m.tls_cipher, "                              \
  "r.idx, r.address, r.state, r.attempts, r.next_attempt, r.last_error, r.updated_at "   \
  "FROM messages m LEFT JOIN recipients r ON r.message_id = m.id "

constexpr const char* kListAll = SUBRELAY_MESSAGE_COLUMNS "ORDER BY m.received_at, m.id, r.idx";
constexpr const char* kShowOne = SUBRELAY_MESSAGE_COLUMNS "WHERE m.id = ?1 ORDER BY r.idx";
#undef SUBRELAY_MESSAGE_COLUMNS

constexpr const char* kInsertMessage =
    "INSERT INTO messages (id, account, mail_from, size, received_at, captured, smtputf8, "
    "eight_bit, client_address, helo, tls_version, tls_cipher, content) "
    "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)";
constexpr const char* kInsertRecipient =
    "INSERT INTO recipients (message_id, idx, address, state, attempts, next_attempt, last_error, updated_at) "
    "VALUES (?1, ?2, ?3, ?4, 0, ?5, '', ?6)";

// Appends the row's recipient columns (and, when `info` is new, its message columns).
void readRow(sqlite3_stmt* s, MessageInfo& info, bool fresh) {
  if (fresh) {
    info.id = columnText(s, 0);
    info.account = columnText(s, 1);
    info.mailFrom = columnText(s, 2);
    info.size = sqlite3_column_int64(s, 3);
    info.receivedAt = sqlite3_column_int64(s, 4);
    info.captured = sqlite3_column_int(s, 5) != 0;
    info.smtputf8 = sqlite3_column_int(s, 6) != 0;
    info.clientAddress = columnText(s, 7);
    info.heloName = columnText(s, 8);
    info.tlsVersion = columnText(s, 9);
    info.tlsCipher = columnText(s, 10);
  }
  if (sqlite3_column_type(s, 11) == SQLITE_NULL) return;  // LEFT JOIN: no recipients
  RecipientInfo r;
  r.index = sqlite3_column_int64(s, 11);
  r.address = columnText(s, 12);
  r.state = columnText(s, 13);
  r.attempts = sqlite3_column_int64(s, 14);
  r.nextAttempt = sqlite3_column_int64(s, 15);
  r.lastError = columnText(s, 16);
  r.updatedAt = sqlite3_column_int64(s, 17);
  info.recipients.push_back(std::move(r));
}

}  // namespace

SqliteStore::SqliteStore(sqlite3* db, int version, bool readOnly)
    : db_(db), version_(version), readOnly_(readOnly), stmts_(std::make_unique<Statements>()) {}

SqliteStore::~SqliteStore() {
  stmts_.reset();  // statements first: close_v2 would otherwise keep the connection alive
  sqlite3_close_v2(db_);
}

int SqliteStore::schemaVersion() const { return version_; }

util::Error SqliteStore::dbError(const std::string& what) const {
  return util::makeError(what + ": " + sqlite3_errmsg(db_));
}

util::Result<std::unique_ptr<SqliteStore>> SqliteStore::open(const std::string& path, OpenOptions opts) {
  // NOMUTEX: the store serialises calls with its own mutex (see the header).
  int flags = SQLITE_OPEN_NOMUTEX;
  if (opts.readOnly) {
    flags |= SQLITE_OPEN_READONLY;
  } else {
    flags |= SQLITE_OPEN_READWRITE;
    if (opts.create) flags |= SQLITE_OPEN_CREATE;
  }
  sqlite3* raw = nullptr;
  int rc = sqlite3_open_v2(path.c_str(), &raw, flags, nullptr);
  Db db(raw);
  const std::string where = "queue database " + path;
  if (rc != SQLITE_OK)
    return util::makeError("cannot open " + where + ": " + (raw ? sqlite3_errmsg(raw) : sqlite3_errstr(rc)));
  sqlite3_extended_result_codes(raw, 1);
  sqlite3_busy_timeout(raw, kBusyTimeoutMs);

  auto exec = [&](const char* sql) -> util::Result<void> {
    char* msg = nullptr;
    if (sqlite3_exec(raw, sql, nullptr, nullptr, &msg) == SQLITE_OK) return {};
    std::string m = msg ? msg : sqlite3_errmsg(raw);
    sqlite3_free(msg);
    return util::makeError(where + ": " + sql + ": " + m);
  };

  if (!opts.readOnly) {
    // WAL: readers (queue list, the scheduler) never block the writer and vice versa.
    // The mode is stored in the file, so read-only connections inherit it.
    sqlite3_stmt* st = nullptr;
    std::string mode;
    if (sqlite3_prepare_v2(raw, "PRAGMA journal_mode=WAL", -1, &st, nullptr) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW)
      mode = columnText(st, 0);
    sqlite3_finalize(st);
    // An in-memory database reports "memory": there is nothing to make durable.
    if (mode != "wal" && !(path == ":memory:" && mode == "memory"))
      return util::makeError("cannot switch " + where + " to WAL (journal_mode is '" + mode +
                             "'): " + sqlite3_errmsg(raw));
    // FULL: a commit in WAL mode fsyncs the WAL before returning (NORMAL would not,
    // and a power cut could then lose messages we already acknowledged with 250).
    if (auto r = exec("PRAGMA synchronous=FULL"); !r) return r.error();
  }
  if (auto r = exec("PRAGMA foreign_keys=ON"); !r) return r.error();

  std::string err;
  int version = schema::readVersion(raw, &err);
  int appId = 0;
  if (version < 0 || !schema::readPragmaInt(raw, "PRAGMA application_id", &appId, &err))
    return util::makeError("cannot read " + where + ": " + err);

  if (opts.readOnly) {
    // A reader must not change the file, so it cannot migrate; it only accepts the exact
    // schema it was built for.
    if (version == 0 || appId != schema::kApplicationId)
      return util::makeError(where + " is not an initialised subrelay queue (run `subrelay serve` once)");
    if (version > kSchemaVersion)
      return util::makeError(where + " has schema version " + std::to_string(version) +
                             ", newer than this subrelay supports (" + std::to_string(kSchemaVersion) + ")");
    if (version < kSchemaVersion)
      return util::makeError(where + " has schema version " + std::to_string(version) + ", older than " +
                             std::to_string(kSchemaVersion) + "; start `subrelay serve` once to migrate it");
  } else if (version != kSchemaVersion || appId != schema::kApplicationId) {
    if (version == 0 && !opts.create) return util::makeError(where + " is not initialised and create=false");
    auto migrated = schema::migrate(raw, schema::migrations(), kSchemaVersion);
    if (!migrated) return util::makeError(where + ": " + migrated.error().message);
    version = *migrated;
  }

  std::unique_ptr<SqliteStore> store(new SqliteStore(db.release(), version, opts.readOnly));
  struct Prep {
    Stmt* target;
    const char* sql;
  };
  Statements& s = *store->stmts_;
  const Prep preps[] = {
      {&s.begin, "BEGIN IMMEDIATE"},
      {&s.commit, "COMMIT"},
      {&s.rollback, "ROLLBACK"},
      {&s.savepoint, "SAVEPOINT msg"},
      {&s.release, "RELEASE msg"},
      {&s.rollbackTo, "ROLLBACK TO msg"},
      {&s.insertMessage, kInsertMessage},
      {&s.insertRecipient, kInsertRecipient},
      {&s.listAll, kListAll},
      {&s.showOne, kShowOne},
      {&s.content, "SELECT content FROM messages WHERE id = ?1"},
      {&s.count, "SELECT count(*) FROM messages"},
  };
  for (const auto& p : preps) {
    sqlite3_stmt* st = nullptr;
    if (sqlite3_prepare_v3(store->db_, p.sql, -1, SQLITE_PREPARE_PERSISTENT, &st, nullptr) != SQLITE_OK)
      return store->dbError("cannot prepare queue statement on " + path);
    p.target->reset(st);
  }
  return store;
}

std::vector<util::Result<std::string>> SqliteStore::insertBatch(const std::vector<NewMessage>& batch) {
  std::lock_guard lock(mu_);
  std::vector<util::Result<std::string>> out;
  out.reserve(batch.size());
  auto failAll = [&](const util::Error& e) {
    out.clear();
    for (size_t i = 0; i < batch.size(); ++i) out.emplace_back(e);
    return out;
  };
  if (batch.empty()) return out;
  if (readOnly_) return failAll(util::makeError("queue database is open read-only"));

  const Statements& s = *stmts_;
  // IMMEDIATE: take the write lock now, so the batch cannot fail half-way with BUSY on
  // lock upgrade (a deferred transaction could, after inserting some rows).
  if (run(s.begin) != SQLITE_DONE) return failAll(dbError("cannot begin queue transaction"));

  // Each message inside its own savepoint: a failing insert (duplicate id, constraint)
  // rolls back only that message's rows; the others still commit.
  auto insertOne = [&](const NewMessage& m) -> util::Result<std::string> {
    if (m.id.empty()) return util::makeError("message has no queue id");
    if (m.recipients.empty()) return util::makeError("message " + m.id + " has no recipients");
    if (run(s.savepoint) != SQLITE_DONE) return dbError("cannot create savepoint");

    std::string failure;
    {
      Use u(s.insertMessage);
      sqlite3_stmt* st = u.get();
      bindText(st, 1, m.id);
      bindText(st, 2, m.account);
      bindText(st, 3, m.mailFrom);
      sqlite3_bind_int64(st, 4, static_cast<sqlite3_int64>(m.content.size()));
      sqlite3_bind_int64(st, 5, m.receivedAt);
      sqlite3_bind_int(st, 6, m.captured ? 1 : 0);
      sqlite3_bind_int(st, 7, m.smtputf8 ? 1 : 0);
      sqlite3_bind_int(st, 8, m.eightBit ? 1 : 0);
      bindText(st, 9, m.clientAddress);
      bindText(st, 10, m.heloName);
      bindText(st, 11, m.tlsVersion);
      bindText(st, 12, m.tlsCipher);
      // The message body can be tens of MB: bound in place, not copied (SQLITE_STATIC).
      int rc = sqlite3_bind_blob64(st, 13, m.content.data(), m.content.size(), SQLITE_STATIC);
      if (rc == SQLITE_OK) rc = sqlite3_step(st);
      if (rc != SQLITE_DONE) {
        failure = sqlite3_extended_errcode(db_) == SQLITE_CONSTRAINT_PRIMARYKEY
                      ? "duplicate queue id " + m.id
                      : "cannot store message " + m.id + ": " + sqlite3_errmsg(db_);
      }
    }
    const char* state = m.captured ? kStateCaptured : kStateQueued;
    // Captured recipients are never due; queued ones are due at once.
    const int64_t next = m.captured ? 0 : m.receivedAt;
    for (size_t i = 0; failure.empty() && i < m.recipients.size(); ++i) {
      Use u(s.insertRecipient);
      sqlite3_stmt* st = u.get();
      bindText(st, 1, m.id);
      sqlite3_bind_int64(st, 2, static_cast<sqlite3_int64>(i));
      bindText(st, 3, m.recipients[i]);
      sqlite3_bind_text(st, 4, state, -1, SQLITE_STATIC);
      sqlite3_bind_int64(st, 5, next);
      sqlite3_bind_int64(st, 6, m.receivedAt);
      if (sqlite3_step(st) != SQLITE_DONE) failure = "cannot store recipient of " + m.id + ": " + sqlite3_errmsg(db_);
    }
    if (!failure.empty()) {
      // ROLLBACK TO undoes the rows but keeps the savepoint open; RELEASE closes it.
      run(s.rollbackTo);
      run(s.release);
      return util::makeError(std::move(failure));
    }
    if (run(s.release) != SQLITE_DONE) return dbError("cannot release savepoint");
    return m.id;
  };

  bool any = false;
  for (const auto& m : batch) {
    out.push_back(insertOne(m));
    any = any || out.back().ok();
    // Some errors (SQLITE_FULL, IOERR, NOMEM) roll back the whole transaction, not just
    // the statement. Then earlier messages are gone too, and the next SAVEPOINT would
    // silently open a fresh transaction: stop and fail the batch.
    if (sqlite3_get_autocommit(db_)) {
      std::string why = out.back().ok() ? sqlite3_errmsg(db_) : out.back().error().message;
      return failAll(util::makeError("queue transaction aborted: " + why));
    }
  }
  if (!any) {
    run(s.rollback);
    return out;
  }
  if (run(s.commit) != SQLITE_DONE) {
    util::Error e = dbError("cannot commit queue transaction");
    // A failed COMMIT may leave the transaction open (e.g. SQLITE_BUSY); nothing of it
    // may survive, since every caller is about to be told "not stored".
    if (!sqlite3_get_autocommit(db_)) run(s.rollback);
    return failAll(e);
  }
  return out;
}

util::Result<std::vector<MessageInfo>> SqliteStore::list() {
  std::lock_guard lock(mu_);
  Use u(stmts_->listAll);
  sqlite3_stmt* st = u.get();
  std::vector<MessageInfo> out;
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    std::string id = columnText(st, 0);
    bool fresh = out.empty() || out.back().id != id;
    if (fresh) out.emplace_back();
    readRow(st, out.back(), fresh);
  }
  if (rc != SQLITE_DONE) return dbError("cannot list queue");
  return out;
}

util::Result<MessageInfo> SqliteStore::showLocked(const std::string& id) {
  Use u(stmts_->showOne);
  sqlite3_stmt* st = u.get();
  bindText(st, 1, id);
  MessageInfo info;
  bool found = false;
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    readRow(st, info, !found);
    found = true;
  }
  if (rc != SQLITE_DONE) return dbError("cannot read message " + id);
  if (!found) return util::makeError("no such message: " + id);
  return info;
}

util::Result<MessageInfo> SqliteStore::show(const std::string& id) {
  std::lock_guard lock(mu_);
  return showLocked(id);
}

util::Result<std::string> SqliteStore::content(const std::string& id) {
  std::lock_guard lock(mu_);
  Use u(stmts_->content);
  sqlite3_stmt* st = u.get();
  bindText(st, 1, id);
  int rc = sqlite3_step(st);
  if (rc == SQLITE_DONE) return util::makeError("no such message: " + id);
  if (rc != SQLITE_ROW) return dbError("cannot read message " + id);
  return columnText(st, 0);
}

util::Result<int64_t> SqliteStore::count() {
  std::lock_guard lock(mu_);
  Use u(stmts_->count);
  if (sqlite3_step(u.get()) != SQLITE_ROW) return dbError("cannot count queue");
  return static_cast<int64_t>(sqlite3_column_int64(u.get(), 0));
}

std::string newQueueId() {
  // 48 bits of milliseconds, then 16 bits that start at a random value each millisecond
  // and count up within it, so ids from one process never collide and sort in creation
  // order. When a millisecond's counter runs out we borrow the next millisecond; the clock
  // catches up. Across processes, the random start keeps a collision unlikely, and the
  // insert's PRIMARY KEY catches the rest.
  static std::mutex mu;
  static uint64_t lastMs = 0;
  static uint32_t seq = 0;
  static std::mt19937 rng{std::random_device{}()};

  const auto nowMs = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count());
  uint64_t id;
  {
    std::lock_guard lock(mu);
    if (nowMs > lastMs) {
      lastMs = nowMs;
      seq = rng() & 0x7fffu;  // the lower half leaves 32768 ids of headroom in this ms
    } else if (++seq > 0xffffu) {
      ++lastMs;
      seq = rng() & 0x7fffu;
    }
    id = ((lastMs & 0xffffffffffffULL) << 16) | seq;
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out(16, '0');
  for (int i = 15; i >= 0; --i, id >>= 4) out[static_cast<size_t>(i)] = kHex[id & 0xf];
  return out;
}

}  // namespace subrelay::queue
