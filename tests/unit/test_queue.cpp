// queue/: the Store contract (run against a file database and ":memory:"), schema
// migrations, read-only access during writes, group commit, and durability across a
// process that dies without closing the database.
#include <doctest/doctest.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "queue/group_commit.h"
#include "queue/schema.h"
#include "queue/sqlite_store.h"

using namespace subrelay;
using namespace subrelay::queue;

namespace {

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "subrelay-queue-XXXXXX").string();
    if (!mkdtemp(tmpl.data())) std::abort();
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

NewMessage makeMessage(std::string id, int64_t receivedAt = 1'800'000'000, size_t rcpts = 2) {
  NewMessage m;
  m.id = std::move(id);
  m.account = "webshop";
  m.mailFrom = "orders@shop.example.com";
  for (size_t i = 0; i < rcpts; ++i) m.recipients.push_back("user" + std::to_string(i) + "@example.org");
  m.content = "From: orders@shop.example.com\r\nSubject: " + m.id + "\r\n\r\nBody\r\n";
  m.clientAddress = "192.0.2.10";
  m.heloName = "app.example.com";
  m.tlsVersion = "TLSv1.3";
  m.tlsCipher = "TLS_AES_256_GCM_SHA384";
  m.receivedAt = receivedAt;
  return m;
}

std::unique_ptr<SqliteStore> mustOpen(const std::string& path, OpenOptions opts = {}) {
  auto r = SqliteStore::open(path, opts);
  REQUIRE_MESSAGE(r.ok(), "open " << path << ": " << (r.ok() ? "" : r.error().message));
  return std::move(r).value();
}

// Raw SQL on a separate connection, for setting up and inspecting files by hand.
class RawDb {
 public:
  explicit RawDb(const std::string& path) {
    if (sqlite3_open(path.c_str(), &db_) != SQLITE_OK) std::abort();
    sqlite3_busy_timeout(db_, 5000);
  }
  ~RawDb() { sqlite3_close(db_); }
  RawDb(const RawDb&) = delete;
  RawDb& operator=(const RawDb&) = delete;
  bool exec(const std::string& sql) { return sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, nullptr) == SQLITE_OK; }
  std::string text(const std::string& sql) {
    sqlite3_stmt* st = nullptr;
    std::string out;
    if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &st, nullptr) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW) {
      const unsigned char* t = sqlite3_column_text(st, 0);
      out = t ? reinterpret_cast<const char*>(t) : "";
    }
    sqlite3_finalize(st);
    return out;
  }
  sqlite3* get() { return db_; }

 private:
  sqlite3* db_ = nullptr;
};

struct FileBackend {
  static constexpr const char* kName = "file";
  TempDir dir;
  std::string path = dir.file("queue.db");
  std::unique_ptr<SqliteStore> open() { return mustOpen(path); }
};

struct MemoryBackend {
  static constexpr const char* kName = ":memory:";
  std::unique_ptr<SqliteStore> open() { return mustOpen(":memory:"); }
};

}  // namespace

// ---------------------------------------------------------------------------------------
// The Store contract: anything that implements queue::Store must pass these.

TEST_CASE_TEMPLATE("store contract", B, FileBackend, MemoryBackend) {
  B backend;
  auto store = backend.open();
  CAPTURE(B::kName);
  REQUIRE(store->schemaVersion() == SqliteStore::kSchemaVersion);
  REQUIRE(store->count().value() == 0);
  REQUIRE(store->list().value().empty());

  SUBCASE("a stored message reads back field for field") {
    NewMessage m = makeMessage("0000000000000001");
    // Binary-safe: NUL, 8-bit and bare bytes survive (the blob is bound, not a C string).
    m.content += std::string("\0\xff\x80 tail", 8);
    m.smtputf8 = true;
    m.eightBit = true;
    auto res = store->insertBatch({m});
    REQUIRE(res.size() == 1);
    REQUIRE(res[0].ok());
    CHECK(res[0].value() == m.id);
    CHECK(store->count().value() == 1);

    auto info = store->show(m.id);
    REQUIRE(info.ok());
    CHECK(info->id == m.id);
    CHECK(info->account == "webshop");
    CHECK(info->mailFrom == m.mailFrom);
    CHECK(info->size == static_cast<int64_t>(m.content.size()));
    CHECK(info->receivedAt == m.receivedAt);
    CHECK_FALSE(info->captured);
    CHECK(info->smtputf8);
    CHECK(info->clientAddress == "192.0.2.10");
    CHECK(info->heloName == "app.example.com");
    CHECK(info->tlsVersion == "TLSv1.3");
    CHECK(info->tlsCipher == "TLS_AES_256_GCM_SHA384");
    REQUIRE(info->recipients.size() == 2);
    for (size_t i = 0; i < 2; ++i) {
      const auto& r = info->recipients[i];
      CHECK(r.index == static_cast<int64_t>(i));
      CHECK(r.address == m.recipients[i]);
      CHECK(r.state == kStateQueued);
      CHECK(r.attempts == 0);
      CHECK(r.nextAttempt == m.receivedAt);  // due at once
      CHECK(r.lastError.empty());
      CHECK(r.updatedAt == m.receivedAt);
    }
    auto body = store->content(m.id);
    REQUIRE(body.ok());
    CHECK(body.value() == m.content);
  }

  SUBCASE("captured messages are stored but never due") {
    NewMessage m = makeMessage("0000000000000002", 1'800'000'000, 3);
    m.captured = true;
    REQUIRE(store->insertBatch({m})[0].ok());
    auto info = store->show(m.id);
    REQUIRE(info.ok());
    CHECK(info->captured);
    REQUIRE(info->recipients.size() == 3);
    for (const auto& r : info->recipients) {
      CHECK(r.state == kStateCaptured);
      CHECK(r.nextAttempt == 0);
    }
  }

  SUBCASE("the null sender and empty TLS fields are stored as empty strings") {
    NewMessage m = makeMessage("0000000000000003");
    m.mailFrom.clear();
    m.tlsVersion.clear();
    m.tlsCipher.clear();
    REQUIRE(store->insertBatch({m})[0].ok());
    auto info = store->show(m.id);
    REQUIRE(info.ok());
    CHECK(info->mailFrom.empty());
    CHECK(info->tlsVersion.empty());
  }

  SUBCASE("one failing message fails only itself") {
    REQUIRE(store->insertBatch({makeMessage("00000000000000aa")})[0].ok());
    NewMessage noRcpt = makeMessage("00000000000000cc", 1'800'000'000, 0);
    NewMessage noId = makeMessage("");
    auto res = store->insertBatch({makeMessage("00000000000000b1"), makeMessage("00000000000000aa"),
                                   makeMessage("00000000000000b2"), makeMessage("00000000000000b2"), noRcpt, noId,
                                   makeMessage("00000000000000b3")});
    REQUIRE(res.size() == 7);
    CHECK(res[0].ok());
    REQUIRE_FALSE(res[1].ok());  // duplicate of an earlier batch
    CHECK(res[1].error().message.find("duplicate") != std::string::npos);
    CHECK(res[2].ok());
    CHECK_FALSE(res[3].ok());  // duplicate within the batch
    CHECK_FALSE(res[4].ok());  // no recipients
    CHECK_FALSE(res[5].ok());  // no id
    CHECK(res[6].ok());
    CHECK(store->count().value() == 4);
    // The rolled-back duplicate left no stray recipients behind on the original.
    auto aa = store->show("00000000000000aa");
    REQUIRE(aa.ok());
    CHECK(aa->recipients.size() == 2);
    CHECK(aa->mailFrom == "orders@shop.example.com");
    CHECK_FALSE(store->show("00000000000000cc").ok());
  }

  SUBCASE("a batch where every message fails changes nothing") {
    REQUIRE(store->insertBatch({makeMessage("00000000000000dd")})[0].ok());
    auto res = store->insertBatch({makeMessage("00000000000000dd"), makeMessage("", 1, 1)});
    CHECK_FALSE(res[0].ok());
    CHECK_FALSE(res[1].ok());
    CHECK(store->count().value() == 1);
    // And the store is still usable afterwards.
    CHECK(store->insertBatch({makeMessage("00000000000000de")})[0].ok());
  }

  SUBCASE("an empty batch returns no results") { CHECK(store->insertBatch({}).empty()); }

  SUBCASE("list is ordered by received_at, then id, and carries recipients") {
    std::vector<NewMessage> batch = {makeMessage("000000000000000c", 300, 1), makeMessage("000000000000000a", 100, 2),
                                     makeMessage("000000000000000d", 200, 3), makeMessage("000000000000000b", 100, 1)};
    for (const auto& r : store->insertBatch(batch)) REQUIRE(r.ok());
    auto all = store->list();
    REQUIRE(all.ok());
    REQUIRE(all->size() == 4);
    CHECK((*all)[0].id == "000000000000000a");
    CHECK((*all)[1].id == "000000000000000b");
    CHECK((*all)[2].id == "000000000000000d");
    CHECK((*all)[3].id == "000000000000000c");
    CHECK((*all)[0].recipients.size() == 2);
    CHECK((*all)[1].recipients.size() == 1);
    CHECK((*all)[2].recipients.size() == 3);
    CHECK((*all)[2].recipients[2].index == 2);
    CHECK((*all)[3].recipients.size() == 1);
  }

  SUBCASE("unknown ids are errors, not empty results") {
    CHECK_FALSE(store->show("ffffffffffffffff").ok());
    auto c = store->content("ffffffffffffffff");
    REQUIRE_FALSE(c.ok());
    CHECK(c.error().message.find("no such message") != std::string::npos);
  }

  SUBCASE("large content round-trips") {
    NewMessage m = makeMessage("00000000000000ee");
    m.content.assign(8 * 1024 * 1024, 'x');
    for (size_t i = 0; i < m.content.size(); i += 4099) m.content[i] = static_cast<char>(i & 0xff);
    REQUIRE(store->insertBatch({m})[0].ok());
    CHECK(store->content(m.id).value() == m.content);
    CHECK(store->show(m.id)->size == static_cast<int64_t>(m.content.size()));
  }

  SUBCASE("many messages in one batch") {
    std::vector<NewMessage> batch;
    for (int i = 0; i < 500; ++i) batch.push_back(makeMessage(newQueueId(), 1000 + i, 1 + static_cast<size_t>(i % 4)));
    auto res = store->insertBatch(batch);
    REQUIRE(res.size() == 500);
    CHECK(std::all_of(res.begin(), res.end(), [](const auto& r) { return r.ok(); }));
    CHECK(store->count().value() == 500);
    auto all = store->list();
    REQUIRE(all.ok());
    REQUIRE(all->size() == 500);
    for (size_t i = 0; i < 500; ++i) {
      CHECK((*all)[i].id == batch[i].id);
      CHECK((*all)[i].recipients.size() == batch[i].recipients.size());
    }
  }
}

// ---------------------------------------------------------------------------------------

TEST_CASE("queue ids are 16 hex characters, unique and increasing") {
  std::vector<std::string> ids;
  for (int i = 0; i < 100000; ++i) ids.push_back(newQueueId());
  for (const auto& id : ids) {
    REQUIRE(id.size() == 16);
    REQUIRE(id.find_first_not_of("0123456789abcdef") == std::string::npos);
  }
  for (size_t i = 1; i < ids.size(); ++i) REQUIRE(ids[i - 1] < ids[i]);
  // The top 48 bits are milliseconds since the epoch: close to now.
  const auto ms = std::stoull(ids.back().substr(0, 12), nullptr, 16);
  const auto now = static_cast<unsigned long long>(
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count());
  CHECK(ms <= now + 5000);
  CHECK(ms + 60000 >= now);
}

TEST_CASE("a file database is WAL, versioned, and has the scheduler index") {
  TempDir dir;
  const std::string path = dir.file("q.db");
  { auto store = mustOpen(path); }
  RawDb raw(path);
  CHECK(raw.text("PRAGMA journal_mode") == "wal");
  CHECK(raw.text("PRAGMA user_version") == std::to_string(SqliteStore::kSchemaVersion));
  CHECK(raw.text("PRAGMA application_id") == std::to_string(schema::kApplicationId));
  CHECK(raw.text("SELECT name FROM sqlite_master WHERE type='index' AND name='recipients_due'") == "recipients_due");
  CHECK(raw.text("SELECT sql FROM sqlite_master WHERE name='recipients'").find("ON DELETE CASCADE") !=
        std::string::npos);
}

TEST_CASE("foreign keys are on: deleting a message removes its recipients") {
  TempDir dir;
  const std::string path = dir.file("q.db");
  auto store = mustOpen(path);
  REQUIRE(store->insertBatch({makeMessage("0000000000000fff")})[0].ok());
  RawDb raw(path);
  REQUIRE(raw.exec("PRAGMA foreign_keys=ON"));
  REQUIRE(raw.exec("DELETE FROM messages WHERE id='0000000000000fff'"));
  CHECK(raw.text("SELECT count(*) FROM recipients") == "0");
  // The schema's REFERENCES clause is real: an orphan recipient is refused.
  CHECK_FALSE(raw.exec("INSERT INTO recipients VALUES ('nope', 0, 'a@b', 'queued', 0, 0, '', 0)"));
}

TEST_CASE("open options") {
  TempDir dir;
  SUBCASE("create=false refuses a missing file") {
    OpenOptions o;
    o.create = false;
    auto r = SqliteStore::open(dir.file("missing.db"), o);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().message.find("missing.db") != std::string::npos);
    CHECK_FALSE(std::filesystem::exists(dir.file("missing.db")));
  }
  SUBCASE("read-only refuses a missing file and an uninitialised one") {
    OpenOptions o;
    o.readOnly = true;
    CHECK_FALSE(SqliteStore::open(dir.file("missing.db"), o).ok());
    {
      RawDb raw(dir.file("empty.db"));
      REQUIRE(raw.exec("CREATE TABLE t(x)"));
    }
    auto r = SqliteStore::open(dir.file("empty.db"), o);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().message.find("not an initialised") != std::string::npos);
  }
  SUBCASE("a directory that does not exist is a clear error") {
    auto r = SqliteStore::open(dir.file("no/such/dir/q.db"));
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().message.find("cannot open") != std::string::npos);
  }
}

// ---------------------------------------------------------------------------------------
// Migrations

TEST_CASE("an old database is migrated forward at open") {
  TempDir dir;
  const std::string path = dir.file("old.db");
  {
    // Version 0: a file created by hand (as a pre-release build would have left it), with
    // a table of its own that the migration must leave alone.
    RawDb raw(path);
    REQUIRE(raw.exec("PRAGMA user_version=0"));
    REQUIRE(raw.exec("CREATE TABLE operator_notes(note TEXT); INSERT INTO operator_notes VALUES ('keep me')"));
  }
  auto store = mustOpen(path);
  CHECK(store->schemaVersion() == SqliteStore::kSchemaVersion);
  REQUIRE(store->insertBatch({makeMessage("0000000000000abc")})[0].ok());
  store.reset();
  RawDb raw(path);
  CHECK(raw.text("PRAGMA user_version") == std::to_string(SqliteStore::kSchemaVersion));
  CHECK(raw.text("SELECT note FROM operator_notes") == "keep me");
  CHECK(raw.text("SELECT id FROM messages") == "0000000000000abc");
}

TEST_CASE("a database from a newer subrelay is refused with a clear error") {
  TempDir dir;
  const std::string path = dir.file("new.db");
  {
    auto store = mustOpen(path);
    REQUIRE(store->insertBatch({makeMessage("0000000000000001")})[0].ok());
  }
  {
    RawDb raw(path);
    REQUIRE(raw.exec("PRAGMA user_version=" + std::to_string(SqliteStore::kSchemaVersion + 1)));
  }
  for (bool readOnly : {false, true}) {
    CAPTURE(readOnly);
    OpenOptions o;
    o.readOnly = readOnly;
    auto r = SqliteStore::open(path, o);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().message.find("newer") != std::string::npos);
  }
  // Refusing must not have touched the file.
  RawDb raw(path);
  CHECK(raw.text("PRAGMA user_version") == std::to_string(SqliteStore::kSchemaVersion + 1));
  CHECK(raw.text("SELECT count(*) FROM messages") == "1");
}

TEST_CASE("a database that belongs to another application is refused") {
  TempDir dir;
  const std::string path = dir.file("other.db");
  {
    RawDb raw(path);
    REQUIRE(raw.exec("PRAGMA application_id=42; CREATE TABLE x(y)"));
  }
  auto r = SqliteStore::open(path);
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().message.find("not a subrelay queue") != std::string::npos);
}

TEST_CASE("read-only open of an older schema asks for a migration instead of doing it") {
  TempDir dir;
  const std::string path = dir.file("q.db");
  { auto store = mustOpen(path); }
  {
    RawDb raw(path);
    REQUIRE(raw.exec("PRAGMA user_version=0"));
  }
  OpenOptions o;
  o.readOnly = true;
  CHECK_FALSE(SqliteStore::open(path, o).ok());
}

TEST_CASE("the migration runner applies later steps in order and rolls back a failing one") {
  TempDir dir;
  const std::string path = dir.file("m.db");
  {
    auto store = mustOpen(path);
    REQUIRE(store->insertBatch({makeMessage("0000000000000001")})[0].ok());
  }
  RawDb raw(path);
  std::vector<schema::Migration> steps(schema::migrations().begin(), schema::migrations().end());
  steps.push_back({2, "ALTER TABLE messages ADD COLUMN priority INTEGER NOT NULL DEFAULT 0"});
  steps.push_back({3, "CREATE TABLE suppressions(address TEXT PRIMARY KEY)"});

  auto to3 = schema::migrate(raw.get(), steps, 3);
  REQUIRE(to3.ok());
  CHECK(to3.value() == 3);
  CHECK(raw.text("PRAGMA user_version") == "3");
  CHECK(raw.text("SELECT priority FROM messages") == "0");  // old rows kept, column added
  CHECK(raw.text("SELECT count(*) FROM sqlite_master WHERE name='suppressions'") == "1");

  // Migrating again is a no-op.
  CHECK(schema::migrate(raw.get(), steps, 3).value() == 3);

  // Step 4 half-succeeds: its first statement must not survive the failure.
  steps.push_back({4, "CREATE TABLE half(x); THIS IS NOT SQL"});
  auto to4 = schema::migrate(raw.get(), steps, 4);
  REQUIRE_FALSE(to4.ok());
  CHECK(to4.error().message.find("version 4") != std::string::npos);
  CHECK(raw.text("PRAGMA user_version") == "3");
  CHECK(raw.text("SELECT count(*) FROM sqlite_master WHERE name='half'") == "0");
  CHECK(sqlite3_get_autocommit(raw.get()) != 0);  // no transaction left open

  // A target with no path to it is an error, not a silent partial upgrade.
  CHECK_FALSE(schema::migrate(raw.get(), steps, 7).ok());
  CHECK(raw.text("PRAGMA user_version") == "3");

  // The store of this build refuses the now-newer file.
  CHECK_FALSE(SqliteStore::open(path).ok());
}

// ---------------------------------------------------------------------------------------
// Concurrency between processes/connections

TEST_CASE("a read-only store sees committed data while a writer holds the database") {
  TempDir dir;
  const std::string path = dir.file("q.db");
  auto writer = mustOpen(path);
  REQUIRE(writer->insertBatch({makeMessage("0000000000000001", 100), makeMessage("0000000000000002", 200)})[0].ok());

  OpenOptions ro;
  ro.readOnly = true;
  auto reader = mustOpen(path, ro);
  CHECK(reader->count().value() == 2);

  // Another connection holds the write lock with an uncommitted message.
  RawDb other(path);
  REQUIRE(other.exec("BEGIN IMMEDIATE"));
  REQUIRE(
      other.exec("INSERT INTO messages (id, account, mail_from, size, received_at, content) "
                 "VALUES ('00000000000000ff', 'x', '', 0, 300, x'')"));
  auto during = reader->list();
  REQUIRE(during.ok());  // not SQLITE_BUSY: WAL readers never wait for the writer
  CHECK(during->size() == 2);
  CHECK(reader->show("0000000000000002").ok());
  CHECK(reader->content("0000000000000001").ok());
  CHECK_FALSE(reader->show("00000000000000ff").ok());  // uncommitted: invisible
  REQUIRE(other.exec("COMMIT"));

  CHECK(reader->count().value() == 3);
  // Writes through the read-only store fail cleanly.
  auto res = reader->insertBatch({makeMessage("0000000000000003")});
  REQUIRE(res.size() == 1);
  CHECK_FALSE(res[0].ok());
  // And the writer is not disturbed by the reader.
  CHECK(writer->insertBatch({makeMessage("0000000000000004")})[0].ok());
  CHECK(reader->count().value() == 4);
}

TEST_CASE("one store called from several threads serialises instead of racing") {
  auto store = mustOpen(":memory:");
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i) {
        if (t % 2 == 0) {
          if (!store->insertBatch({makeMessage(newQueueId())})[0].ok()) ++failures;
        } else if (!store->list().ok() || !store->count().ok()) {
          ++failures;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(failures.load() == 0);
  CHECK(store->count().value() == 100);
}

// ---------------------------------------------------------------------------------------
// Group commit

namespace {

// A Store that records batch sizes and can hold the first insert until released, so the
// tests decide what piles up behind it.
class GateStore final : public Store {
 public:
  std::vector<util::Result<std::string>> insertBatch(const std::vector<NewMessage>& batch) override {
    std::unique_lock lock(mu_);
    sizes_.push_back(batch.size());
    entered_ = true;
    cv_.notify_all();
    cv_.wait(lock, [this] { return open_; });
    std::vector<util::Result<std::string>> out;
    for (const auto& m : batch) out.emplace_back(m.id);
    return out;
  }
  util::Result<std::vector<MessageInfo>> list() override { return std::vector<MessageInfo>{}; }
  util::Result<MessageInfo> show(const std::string&) override { return util::makeError("no"); }
  util::Result<std::string> content(const std::string&) override { return util::makeError("no"); }
  util::Result<int64_t> count() override { return int64_t{0}; }

  void waitEntered() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [this] { return entered_; });
  }
  void open() {
    std::lock_guard lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  std::vector<size_t> sizes() {
    std::lock_guard lock(mu_);
    return sizes_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool entered_ = false;
  bool open_ = false;
  std::vector<size_t> sizes_;
};

// Counts callbacks and lets the test wait for N of them.
class Waiter {
 public:
  GroupCommitter::Callback callback() {
    return [this](util::Result<std::string> r) {
      std::lock_guard lock(mu_);
      if (r.ok()) {
        ok_.push_back(r.value());
      } else {
        errors_.push_back(r.error().message);
      }
      cv_.notify_all();
    };
  }
  bool waitFor(size_t n) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, std::chrono::seconds(60), [&] { return ok_.size() + errors_.size() >= n; });
  }
  std::vector<std::string> ok() {
    std::lock_guard lock(mu_);
    return ok_;
  }
  std::vector<std::string> errors() {
    std::lock_guard lock(mu_);
    return errors_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::string> ok_;
  std::vector<std::string> errors_;
};

}  // namespace

TEST_CASE("group commit takes what piled up during the previous commit, up to maxBatch") {
  GateStore store;
  Waiter w;
  {
    GroupCommitter gc(store, 4);
    gc.submit(makeMessage("first"), w.callback());
    store.waitEntered();  // the writer is now inside insertBatch with one message
    for (int i = 0; i < 10; ++i) gc.submit(makeMessage("m" + std::to_string(i)), w.callback());
    store.open();
    REQUIRE(w.waitFor(11));
    CHECK(gc.commits() == 4);
    CHECK(gc.messages() == 11);
  }
  CHECK(store.sizes() == std::vector<size_t>{1, 4, 4, 2});
  auto ok = w.ok();
  REQUIRE(ok.size() == 11);
  CHECK(ok[0] == "first");
  CHECK(ok[10] == "m9");  // callbacks in submission order
}

TEST_CASE("group commit: stop drains the queue, later submits fail at once") {
  GateStore store;
  Waiter w;
  GroupCommitter gc(store, 512);
  gc.submit(makeMessage("a"), w.callback());
  store.waitEntered();
  gc.submit(makeMessage("b"), w.callback());
  gc.submit(makeMessage("c"), w.callback());
  std::thread stopper([&] { gc.stop(); });
  // stop() is waiting for the writer, which is still inside the first commit.
  store.open();
  stopper.join();
  CHECK(w.ok().size() == 3);  // everything queued before stop() was committed
  gc.submit(makeMessage("late"), w.callback());
  REQUIRE(w.errors().size() == 1);  // called synchronously, on this thread
  CHECK(w.errors()[0].find("stopped") != std::string::npos);
  gc.stop();  // idempotent
}

TEST_CASE("group commit: concurrent sessions share commits (file database)") {
  TempDir dir;
  auto store = mustOpen(dir.file("q.db"));
  constexpr int kThreads = 8;
  constexpr int kPerThread = 50;
  Waiter w;
  uint64_t commits = 0;
  const auto start = std::chrono::steady_clock::now();
  {
    GroupCommitter gc(*store);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&] {
        // Like a session: submit, wait for the answer, then send the next message.
        for (int i = 0; i < kPerThread; ++i) {
          std::mutex mu;
          std::condition_variable cv;
          bool done = false;
          gc.submit(makeMessage(newQueueId()), [&](util::Result<std::string> r) {
            w.callback()(std::move(r));
            std::lock_guard lock(mu);
            done = true;
            cv.notify_one();
          });
          std::unique_lock lock(mu);
          cv.wait(lock, [&] { return done; });
        }
      });
    }
    for (auto& th : threads) th.join();
    commits = gc.commits();
    CHECK(gc.messages() == kThreads * kPerThread);
  }
  const auto ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start).count();
  CHECK(w.errors().empty());
  CHECK(w.ok().size() == kThreads * kPerThread);
  CHECK(store->count().value() == kThreads * kPerThread);
  CHECK(commits < static_cast<uint64_t>(kThreads * kPerThread));
  MESSAGE("group commit: " << kThreads * kPerThread << " messages from " << kThreads << " threads in " << commits
                           << " commits (" << static_cast<double>(kThreads * kPerThread) / static_cast<double>(commits)
                           << " messages/commit), " << ms << " ms");
}

// ---------------------------------------------------------------------------------------
// Durability: what was acknowledged survives the process dying without closing.

namespace {

// Writes the whole buffer to fd; the child's only way to "acknowledge".
bool writeAll(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    ssize_t n = ::write(fd, s.data() + off, s.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    off += static_cast<size_t>(n);
  }
  return true;
}

std::set<std::string> readAcks(int fd, size_t want, pid_t child, bool killAfter) {
  std::set<std::string> acked;
  std::string buf;
  char tmp[4096];
  for (;;) {
    ssize_t n = ::read(fd, tmp, sizeof tmp);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    buf.append(tmp, static_cast<size_t>(n));
    size_t nl;
    while ((nl = buf.find('\n')) != std::string::npos) {
      acked.insert(buf.substr(0, nl));
      buf.erase(0, nl + 1);
    }
    if (killAfter && acked.size() >= want) {
      ::kill(child, SIGKILL);  // mid-stream: the child is likely inside a commit
      break;
    }
  }
  return acked;
}

}  // namespace

TEST_CASE("durability: acknowledged messages survive _exit and SIGKILL") {
  TempDir dir;
  const std::string path = dir.file("q.db");
  { auto store = mustOpen(path); }  // create the schema first

  for (bool killMidStream : {false, true}) {
    CAPTURE(killMidStream);
    int fds[2];
    REQUIRE(::pipe(fds) == 0);
    pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      ::close(fds[0]);
      auto opened = SqliteStore::open(path);
      if (!opened) ::_exit(3);
      auto store = std::move(opened).value();
      for (int round = 0; killMidStream || round < 20; ++round) {
        std::vector<NewMessage> batch;
        for (int i = 0; i < 5; ++i) batch.push_back(makeMessage(newQueueId(), 1000 + round));
        std::string acks;
        for (const auto& r : store->insertBatch(batch))
          if (r.ok()) acks += r.value() + "\n";
        // Acknowledge only after insertBatch returned, like the 250 after DATA.
        if (!writeAll(fds[1], acks)) ::_exit(4);
      }
      ::_exit(0);  // no destructor, no sqlite3_close, no checkpoint
    }
    ::close(fds[1]);
    std::set<std::string> acked = readAcks(fds[0], 200, pid, killMidStream);
    ::close(fds[0]);
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    if (!killMidStream) {
      REQUIRE(WIFEXITED(status));
      REQUIRE(WEXITSTATUS(status) == 0);
      CHECK(acked.size() == 100);
    } else {
      CHECK(acked.size() >= 200);
    }

    auto store = mustOpen(path);
    auto all = store->list();
    REQUIRE(all.ok());
    std::set<std::string> stored;
    for (const auto& m : *all) stored.insert(m.id);
    size_t missing = 0;
    for (const auto& id : acked)
      if (!stored.count(id)) ++missing;
    CHECK(missing == 0);
    for (const auto& m : *all) CHECK(m.recipients.size() == 2);  // never half a message
  }
}
