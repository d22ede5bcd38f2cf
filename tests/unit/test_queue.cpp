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
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "queue/group_commit.h"
#include "queue/schema.h"
#include "queue/pruner.h"
#include "queue/sqlite_store.h"
#include "util/clock.h"

using namespace subrelay;
using namespace subrelay::queue;

namespace doctest {
template <>
struct StringMaker<subrelay::queue::RecipientState> {
  static String convert(subrelay::queue::RecipientState s) { return String(std::string(subrelay::queue::stateName(s)).c_str()); }
};
template <>
struct StringMaker<subrelay::queue::OperatorRequest> {
  static String convert(subrelay::queue::OperatorRequest r) { return String(std::to_string(static_cast<int>(r)).c_str()); }
};
}  // namespace doctest

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
      CHECK(r.state == RecipientState::Queued);
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
      CHECK(r.state == RecipientState::Captured);
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
// The delivery, operator and account-policy side of the contract (schema version 2).

namespace {

constexpr int64_t kT0 = 1'800'000'000;

AttemptRecord outcome(const std::string& id, int64_t index, RecipientState state, int64_t at,
                      int64_t next = 0, std::string error = {}, int code = 0) {
  AttemptRecord rec;
  rec.messageId = id;
  rec.index = index;
  rec.attempt.at = at;
  rec.attempt.mx = "mx1.example.org [192.0.2.25]:25";
  rec.attempt.tlsVersion = "TLSv1.3";
  rec.attempt.tlsCipher = "TLS_AES_128_GCM_SHA256";
  rec.attempt.code = code;
  rec.attempt.reply = error.empty() ? "2.0.0 Ok" : error;
  rec.attempt.result = std::string(stateName(state));
  rec.newState = state;
  rec.nextAttempt = next;
  rec.lastError = std::move(error);
  return rec;
}

std::set<std::string> dueIds(const std::vector<DueMessage>& due) {
  std::set<std::string> out;
  for (const auto& d : due) out.insert(d.id);
  return out;
}

const RecipientInfo& rcpt(const MessageInfo& m, size_t i) {
  REQUIRE(i < m.recipients.size());
  return m.recipients[i];
}

NewMessage makeDsn(const std::string& id, const std::string& to, int64_t at) {
  NewMessage d = makeMessage(id, at, 0);
  d.account = "";
  d.mailFrom = "";
  d.recipients = {to};
  d.content = "Subject: Undelivered Mail\r\n\r\nsorry\r\n";
  d.isDsn = true;
  return d;
}

}  // namespace

TEST_CASE_TEMPLATE("store contract: delivery", B, FileBackend, MemoryBackend) {
  B backend;
  auto store = backend.open();
  CAPTURE(B::kName);

  SUBCASE("new messages: isDsn and eightBit are stored, list and show carry them") {
    NewMessage a = makeMessage("0000000000000a01", kT0, 1);
    a.eightBit = true;
    NewMessage d = makeDsn("0000000000000a02", "orders@shop.example.com", kT0 + 1);
    for (const auto& r : store->insertBatch({a, d})) REQUIRE(r.ok());
    auto all = store->list();
    REQUIRE(all.ok());
    REQUIRE(all->size() == 2);
    CHECK((*all)[0].eightBit);
    CHECK_FALSE((*all)[0].isDsn);
    CHECK_FALSE((*all)[1].eightBit);
    CHECK((*all)[1].isDsn);
    CHECK((*all)[0].attempts.empty());
    auto shown = store->show(d.id);
    REQUIRE(shown.ok());
    CHECK(shown->isDsn);
    CHECK(shown->attempts.empty());
    CHECK(rcpt(*shown, 0).leaseUntil == 0);
    CHECK_FALSE(rcpt(*shown, 0).dsnPending);
  }

  SUBCASE("leaseDue: only due recipients, never captured ones, oldest message first") {
    NewMessage early = makeMessage("0000000000000b01", kT0 - 100, 2);
    NewMessage late = makeMessage("0000000000000b02", kT0 + 100, 1);  // not due yet
    NewMessage cap = makeMessage("0000000000000b03", kT0 - 200, 2);
    cap.captured = true;
    NewMessage mid = makeMessage("0000000000000b04", kT0 - 50, 3);
    mid.smtputf8 = true;
    mid.eightBit = true;
    for (const auto& r : store->insertBatch({early, late, cap, mid})) REQUIRE(r.ok());

    auto due = store->leaseDue(kT0, 10);
    REQUIRE(due.ok());
    REQUIRE(due->size() == 2);
    CHECK((*due)[0].id == early.id);
    CHECK((*due)[1].id == mid.id);
    CHECK((*due)[0].recipients.size() == 2);
    REQUIRE((*due)[1].recipients.size() == 3);
    CHECK((*due)[1].recipients[2].index == 2);
    CHECK((*due)[1].recipients[2].address == mid.recipients[2]);
    CHECK((*due)[1].recipients[2].attempts == 0);
    CHECK((*due)[1].smtputf8);
    CHECK((*due)[1].eightBit);
    CHECK((*due)[1].account == "webshop");
    CHECK((*due)[1].mailFrom == mid.mailFrom);
    CHECK((*due)[1].size == static_cast<int64_t>(mid.content.size()));
    CHECK((*due)[1].receivedAt == mid.receivedAt);
    CHECK(store->show(mid.id)->recipients[1].leaseUntil == kT0 + SqliteStore::kOwnedLease);

    // The lease excludes them; the late message becomes due on its own.
    CHECK(store->leaseDue(kT0 + 10, 10)->empty());
    auto later = store->leaseDue(kT0 + 150, 10);
    REQUIRE(later.ok());
    CHECK(dueIds(*later) == std::set<std::string>{late.id});
    // Leases are owned, not timed: however long an attempt runs, nothing is leased twice.
    CHECK(store->leaseDue(kT0 + 30 * 24 * 3600, 10)->empty());
    // Only the start-up after a crash (clearLeases) makes them due again.
    REQUIRE(store->clearLeases().ok());
    auto again = store->leaseDue(kT0 + 300, 10);
    REQUIRE(again.ok());
    CHECK(dueIds(*again) == std::set<std::string>{early.id, mid.id, late.id});
    // Captured recipients were never leased.
    {
      auto shown = store->show(cap.id);  // named: a temporary would die before the loop
      REQUIRE(shown.ok());
      for (const auto& r : shown->recipients) CHECK(r.leaseUntil == 0);
    }
  }

  SUBCASE("leaseDue: at most maxMessages messages, the rest stays due") {
    std::vector<NewMessage> batch;
    for (int i = 0; i < 5; ++i) batch.push_back(makeMessage("0000000000000c0" + std::to_string(i), kT0 + i, 2));
    for (const auto& r : store->insertBatch(batch)) REQUIRE(r.ok());
    auto first = store->leaseDue(kT0 + 10, 2);
    REQUIRE(first.ok());
    REQUIRE(first->size() == 2);
    CHECK((*first)[0].id == batch[0].id);
    CHECK((*first)[1].id == batch[1].id);
    CHECK((*first)[1].recipients.size() == 2);  // whole messages, not split by the limit
    auto second = store->leaseDue(kT0 + 10, 10);
    REQUIRE(second.ok());
    CHECK(dueIds(*second) == std::set<std::string>{batch[2].id, batch[3].id, batch[4].id});
    CHECK(store->leaseDue(kT0 + 10, 0)->empty());
  }

  SUBCASE("recordAttempts: states, counters, history, and when a DSN is owed") {
    NewMessage m = makeMessage("0000000000000d01", kT0, 3);
    NewMessage nullSender = makeMessage("0000000000000d02", kT0, 1);
    nullSender.mailFrom.clear();
    NewMessage dsn = makeDsn("0000000000000d03", "someone@example.org", kT0);
    for (const auto& r : store->insertBatch({m, nullSender, dsn})) REQUIRE(r.ok());
    REQUIRE(store->leaseDue(kT0, 10)->size() == 3);

    REQUIRE(store
                ->recordAttempts({outcome(m.id, 0, RecipientState::Delivered, kT0 + 5, 0, "", 250),
                                  outcome(m.id, 1, RecipientState::Deferred, kT0 + 6, kT0 + 600, "451 4.7.1 greylisted", 451),
                                  outcome(m.id, 2, RecipientState::Failed, kT0 + 7, 0, "550 5.1.1 no such user", 550),
                                  outcome(nullSender.id, 0, RecipientState::Failed, kT0 + 8, 0, "550 5.1.1 no", 550),
                                  outcome(dsn.id, 0, RecipientState::Failed, kT0 + 9, 0, "550 5.1.1 no", 550)})
                .ok());
    auto info = store->show(m.id);
    REQUIRE(info.ok());
    CHECK(rcpt(*info, 0).state == RecipientState::Delivered);
    CHECK(rcpt(*info, 0).attempts == 1);
    CHECK(rcpt(*info, 0).lastError.empty());
    CHECK(rcpt(*info, 0).updatedAt == kT0 + 5);
    CHECK(rcpt(*info, 0).leaseUntil == 0);
    CHECK_FALSE(rcpt(*info, 0).dsnPending);
    CHECK(rcpt(*info, 1).state == RecipientState::Deferred);
    CHECK(rcpt(*info, 1).nextAttempt == kT0 + 600);
    CHECK(rcpt(*info, 1).lastError == "451 4.7.1 greylisted");
    CHECK(rcpt(*info, 1).leaseUntil == 0);
    CHECK_FALSE(rcpt(*info, 1).dsnPending);
    CHECK(rcpt(*info, 2).state == RecipientState::Failed);
    CHECK(rcpt(*info, 2).dsnPending);
    REQUIRE(info->attempts.size() == 3);
    CHECK(info->attempts[0].index == 0);
    CHECK(info->attempts[0].at == kT0 + 5);
    CHECK(info->attempts[0].mx == "mx1.example.org [192.0.2.25]:25");
    CHECK(info->attempts[0].tlsVersion == "TLSv1.3");
    CHECK(info->attempts[0].tlsCipher == "TLS_AES_128_GCM_SHA256");
    CHECK(info->attempts[0].code == 250);
    CHECK(info->attempts[0].result == "delivered");
    CHECK(info->attempts[1].index == 1);
    CHECK(info->attempts[1].reply == "451 4.7.1 greylisted");
    CHECK(info->attempts[2].result == "failed");
    CHECK(info->attempts[2].code == 550);

    // Never a DSN to the null sender, never a DSN about a DSN.
    CHECK(rcpt(*store->show(nullSender.id), 0).state == RecipientState::Failed);
    CHECK_FALSE(rcpt(*store->show(nullSender.id), 0).dsnPending);
    CHECK_FALSE(rcpt(*store->show(dsn.id), 0).dsnPending);

    // The deferred one is due again at its next attempt, not before; counters accumulate.
    CHECK(store->leaseDue(kT0 + 599, 10)->empty());
    auto due = store->leaseDue(kT0 + 600, 10);
    REQUIRE(due.ok());
    REQUIRE(due->size() == 1);
    REQUIRE(due->at(0).recipients.size() == 1);
    CHECK(due->at(0).recipients[0].index == 1);
    CHECK(due->at(0).recipients[0].attempts == 1);
    REQUIRE(store->recordAttempts({outcome(m.id, 1, RecipientState::Delivered, kT0 + 601)}).ok());
    info = store->show(m.id);
    CHECK(rcpt(*info, 1).attempts == 2);
    CHECK(rcpt(*info, 1).state == RecipientState::Delivered);
    CHECK(info->attempts.size() == 4);
    CHECK(store->nextDue()->has_value() == false);
  }

  SUBCASE("recordAttempts is one transaction; an unknown or dropped message is skipped") {
    REQUIRE(store->insertBatch({makeMessage("0000000000000e01", kT0, 1)})[0].ok());
    CHECK(store->recordAttempts({}).ok());
    CHECK(store
              ->recordAttempts({outcome("ffffffffffffffff", 0, RecipientState::Delivered, kT0),
                                outcome("0000000000000e01", 0, RecipientState::Deferred, kT0 + 1, kT0 + 60, "421 busy")})
              .ok());
    auto info = store->show("0000000000000e01");
    CHECK(rcpt(*info, 0).state == RecipientState::Deferred);
    CHECK(info->attempts.size() == 1);
  }

  SUBCASE("an operator's bounce during an attempt wins over a deferral, not over a delivery") {
    REQUIRE(store->insertBatch({makeMessage("0000000000000e11", kT0, 2)})[0].ok());
    REQUIRE(store->leaseDue(kT0, 10)->size() == 1);
    REQUIRE(store->bounce("0000000000000e11").value() == 2);
    // In flight: nothing changes until the attempt ends (no DSN beside a delivery).
    CHECK(rcpt(*store->show("0000000000000e11"), 0).state == RecipientState::Queued);
    CHECK(rcpt(*store->show("0000000000000e11"), 0).request == OperatorRequest::Bounce);
    CHECK(store->pendingDsns(10)->empty());
    REQUIRE(store
                ->recordAttempts({outcome("0000000000000e11", 0, RecipientState::Deferred, kT0 + 1, kT0 + 60, "421 busy"),
                                  outcome("0000000000000e11", 1, RecipientState::Delivered, kT0 + 1)})
                .ok());
    auto info = store->show("0000000000000e11");
    CHECK(rcpt(*info, 0).state == RecipientState::Failed);
    CHECK(rcpt(*info, 0).lastError == "bounced by operator");
    CHECK(rcpt(*info, 0).dsnPending);
    CHECK(rcpt(*info, 1).state == RecipientState::Delivered);
    CHECK_FALSE(rcpt(*info, 1).dsnPending);
    CHECK(info->attempts.size() == 2);  // both attempts are history either way
  }

  SUBCASE("releaseLeases makes recipients due again without counting an attempt") {
    REQUIRE(store->insertBatch({makeMessage("0000000000000f01", kT0, 3)})[0].ok());
    REQUIRE(store->leaseDue(kT0, 10)->size() == 1);
    REQUIRE(store->releaseLeases("0000000000000f01", {0, 2}).ok());
    CHECK(store->releaseLeases("0000000000000f01", {}).ok());
    auto due = store->leaseDue(kT0 + 1, 10);
    REQUIRE(due.ok());
    REQUIRE(due->size() == 1);
    REQUIRE(due->at(0).recipients.size() == 2);
    CHECK(due->at(0).recipients[0].index == 0);
    CHECK(due->at(0).recipients[1].index == 2);
    {
      auto shown = store->show("0000000000000f01");  // named: a temporary would die before the loop
      REQUIRE(shown.ok());
      for (const auto& r : shown->recipients) CHECK(r.attempts == 0);
    }
  }

  SUBCASE("clearLeases voids every lease (start-up after a crash)") {
    REQUIRE(store->insertBatch({makeMessage("0000000000000f11", kT0, 2), makeMessage("0000000000000f12", kT0, 1)})[0].ok());
    REQUIRE(store->leaseDue(kT0, 10)->size() == 2);
    CHECK(store->leaseDue(kT0 + 1, 10)->empty());
    REQUIRE(store->clearLeases().ok());
    auto due = store->leaseDue(kT0 + 1, 10);
    REQUIRE(due.ok());
    CHECK(dueIds(*due) == std::set<std::string>{"0000000000000f11", "0000000000000f12"});
  }

  SUBCASE("nextDue: earliest next attempt or lease end; nothing when nothing is deliverable") {
    CHECK_FALSE(store->nextDue().value().has_value());
    NewMessage cap = makeMessage("0000000000001001", kT0 - 1000, 1);
    cap.captured = true;
    REQUIRE(store->insertBatch({cap})[0].ok());
    CHECK_FALSE(store->nextDue().value().has_value());  // captured: never due

    REQUIRE(store->insertBatch({makeMessage("0000000000001002", kT0 + 50, 1)})[0].ok());
    CHECK(store->nextDue().value() == std::optional<int64_t>(kT0 + 50));
    REQUIRE(store->insertBatch({makeMessage("0000000000001003", kT0, 1)})[0].ok());
    CHECK(store->nextDue().value() == std::optional<int64_t>(kT0));
    REQUIRE(store->leaseDue(kT0, 1)->size() == 1);  // 1003 leased until kT0 + 300
    CHECK(store->nextDue().value() == std::optional<int64_t>(kT0 + 50));
    REQUIRE(store->recordAttempts({outcome("0000000000001003", 0, RecipientState::Deferred, kT0, kT0 + 10, "421")}).ok());
    CHECK(store->nextDue().value() == std::optional<int64_t>(kT0 + 10));
  }

  SUBCASE("pendingDsns / completeDsn: the DSN and the flag reset are one transaction") {
    NewMessage m = makeMessage("0000000000001101", kT0, 3);
    NewMessage n = makeMessage("0000000000001102", kT0 + 1, 1);
    for (const auto& r : store->insertBatch({m, n})) REQUIRE(r.ok());
    REQUIRE(store->leaseDue(kT0 + 1, 10)->size() == 2);
    REQUIRE(store
                ->recordAttempts({outcome(m.id, 0, RecipientState::Failed, kT0 + 2, 0, "550 a", 550),
                                  outcome(m.id, 1, RecipientState::Delivered, kT0 + 2),
                                  outcome(m.id, 2, RecipientState::Failed, kT0 + 2, 0, "550 c", 550),
                                  outcome(n.id, 0, RecipientState::Failed, kT0 + 3, 0, "554 n", 554)})
                .ok());
    auto work = store->pendingDsns(10);
    REQUIRE(work.ok());
    REQUIRE(work->size() == 2);
    const MessageInfo& w = work->at(0).message;
    CHECK(w.id == m.id);
    CHECK(w.mailFrom == m.mailFrom);
    REQUIRE(w.recipients.size() == 2);  // only the pending ones
    CHECK(w.recipients[0].index == 0);
    CHECK(w.recipients[0].lastError == "550 a");
    CHECK(w.recipients[1].index == 2);
    CHECK(store->pendingDsns(1)->size() == 1);

    // A DSN whose id collides fails as a whole: the flags stay set.
    auto clash = store->completeDsn(m.id, {0, 2}, makeDsn(n.id, m.mailFrom, kT0 + 4));
    CHECK_FALSE(clash.ok());
    CHECK(store->pendingDsns(10)->size() == 2);
    CHECK(store->count().value() == 2);

    REQUIRE(store->completeDsn(m.id, {0, 2}, makeDsn("0000000000001103", m.mailFrom, kT0 + 4)).ok());
    CHECK(store->count().value() == 3);
    auto dsn = store->show("0000000000001103");
    REQUIRE(dsn.ok());
    CHECK(dsn->isDsn);
    CHECK(dsn->mailFrom.empty());
    CHECK(rcpt(*dsn, 0).address == m.mailFrom);
    CHECK(rcpt(*dsn, 0).state == RecipientState::Queued);  // deliverable like any message
    {
      auto shown = store->show(m.id);  // named: a temporary would die before the loop
      REQUIRE(shown.ok());
      for (const auto& r : shown->recipients) CHECK_FALSE(r.dsnPending);
    }
    work = store->pendingDsns(10);
    REQUIRE(work->size() == 1);
    CHECK(work->at(0).message.id == n.id);

    // The DSN itself failing owes nothing.
    REQUIRE(store->leaseDue(kT0 + 5, 10).ok());
    REQUIRE(store->recordAttempts({outcome("0000000000001103", 0, RecipientState::Failed, kT0 + 6, 0, "550")}).ok());
    CHECK(store->pendingDsns(10)->size() == 1);

    // Without a DSN message (the caller decided none is needed) only the flag is cleared.
    REQUIRE(store->completeDsn(n.id, {0}, std::nullopt).ok());
    CHECK(store->pendingDsns(10)->empty());
    CHECK(store->count().value() == 3);
  }

  SUBCASE("completeDsn: nothing is inserted for a null sender") {
    NewMessage m = makeMessage("0000000000001201", kT0, 1);
    m.mailFrom.clear();
    REQUIRE(store->insertBatch({m})[0].ok());
    // Force the flag, as a database written by an older rule might have it.
    REQUIRE(store->leaseDue(kT0, 10)->size() == 1);
    REQUIRE(store->recordAttempts({outcome(m.id, 0, RecipientState::Failed, kT0 + 1, 0, "550")}).ok());
    CHECK(store->pendingDsns(10)->empty());
    REQUIRE(store->completeDsn(m.id, {0}, makeDsn("0000000000001202", "nobody@example.org", kT0 + 2)).ok());
    CHECK(store->count().value() == 1);
    CHECK_FALSE(store->show("0000000000001202").ok());
    // And for a message that no longer exists: nothing inserted, no error.
    REQUIRE(store->completeDsn("ffffffffffffffff", {0}, makeDsn("0000000000001203", "x@example.org", kT0)).ok());
    CHECK(store->count().value() == 1);
  }

  SUBCASE("delay notices: deferred, old enough, real sender, not a DSN, only once") {
    NewMessage old1 = makeMessage("0000000000001301", kT0, 2);
    NewMessage young = makeMessage("0000000000001302", kT0 + 5000, 1);
    NewMessage nul = makeMessage("0000000000001303", kT0, 1);
    nul.mailFrom.clear();
    NewMessage dsn = makeDsn("0000000000001304", "a@example.org", kT0);
    for (const auto& r : store->insertBatch({old1, young, nul, dsn})) REQUIRE(r.ok());
    REQUIRE(store->leaseDue(kT0 + 5000, 10)->size() == 4);
    std::vector<AttemptRecord> recs;
    for (const auto* m : {&old1, &young, &nul, &dsn})
      recs.push_back(outcome(m->id, 0, RecipientState::Deferred, kT0 + 5001, kT0 + 6000, "421 later"));
    recs.push_back(outcome(old1.id, 1, RecipientState::Delivered, kT0 + 5001));
    REQUIRE(store->recordAttempts(recs).ok());

    auto work = store->pendingDelayNotices(kT0 + 1000, 10);
    REQUIRE(work.ok());
    REQUIRE(work->size() == 1);
    CHECK(work->at(0).message.id == old1.id);
    REQUIRE(work->at(0).message.recipients.size() == 1);
    CHECK(work->at(0).message.recipients[0].index == 0);
    CHECK(store->pendingDelayNotices(kT0 + 6000, 10)->size() == 2);
    CHECK(store->pendingDelayNotices(kT0 + 6000, 1)->size() == 1);

    REQUIRE(store->completeDelayNotice(old1.id, {0}, makeDsn("0000000000001305", old1.mailFrom, kT0 + 5002)).ok());
    CHECK(store->show("0000000000001305")->isDsn);
    CHECK(store->pendingDelayNotices(kT0 + 1000, 10)->empty());
    // The recipient itself is untouched: still deferred, still due later.
    CHECK(rcpt(*store->show(old1.id), 0).state == RecipientState::Deferred);
    CHECK_FALSE(rcpt(*store->show(old1.id), 0).dsnPending);
  }

  SUBCASE("retryNow: one message or all, only waiting recipients, unknown id is an error") {
    NewMessage a = makeMessage("0000000000001401", kT0, 2);
    NewMessage b = makeMessage("0000000000001402", kT0, 1);
    NewMessage cap = makeMessage("0000000000001403", kT0, 1);
    cap.captured = true;
    for (const auto& r : store->insertBatch({a, b, cap})) REQUIRE(r.ok());
    REQUIRE(store->leaseDue(kT0, 10)->size() == 2);
    REQUIRE(store
                ->recordAttempts({outcome(a.id, 0, RecipientState::Deferred, kT0 + 1, kT0 + 3600, "421"),
                                  outcome(a.id, 1, RecipientState::Delivered, kT0 + 1),
                                  outcome(b.id, 0, RecipientState::Deferred, kT0 + 1, kT0 + 7200, "421")})
                .ok());
    CHECK(store->leaseDue(kT0 + 2, 10)->empty());

    auto one = store->retryNow(a.id);
    REQUIRE(one.ok());
    CHECK(one.value() == 1);
    CHECK(rcpt(*store->show(a.id), 0).nextAttempt == 0);
    CHECK(rcpt(*store->show(a.id), 1).state == RecipientState::Delivered);
    CHECK(dueIds(store->leaseDue(kT0 + 2, 10).value()) == std::set<std::string>{a.id});

    auto all = store->retryNow(std::nullopt);
    REQUIRE(all.ok());
    CHECK(all.value() == 2);  // b now; a's recipient is in flight: a request, not a second lease
    CHECK(rcpt(*store->show(a.id), 0).request == OperatorRequest::Retry);
    CHECK(dueIds(store->leaseDue(kT0 + 3, 10).value()) == std::set<std::string>{b.id});
    // The attempt in flight defers: the retry request makes it due at once.
    REQUIRE(store->recordAttempts({outcome(a.id, 0, RecipientState::Deferred, kT0 + 4, kT0 + 3600, "421")}).ok());
    CHECK(rcpt(*store->show(a.id), 0).nextAttempt == kT0 + 4);
    CHECK(rcpt(*store->show(a.id), 0).request == OperatorRequest::None);
    CHECK(dueIds(store->leaseDue(kT0 + 4, 10).value()) == std::set<std::string>{a.id});

    auto missing = store->retryNow(std::string("ffffffffffffffff"));
    REQUIRE_FALSE(missing.ok());
    CHECK(missing.error().message.find("no such message") != std::string::npos);
    CHECK(store->retryNow(cap.id).value() == 0);
  }

  SUBCASE("drop removes the message, its recipients and attempts") {
    NewMessage a = makeMessage("0000000000001501", kT0, 2);
    for (const auto& r : store->insertBatch({a, makeMessage("0000000000001502", kT0, 1)})) REQUIRE(r.ok());
    REQUIRE(store->leaseDue(kT0, 10)->size() == 2);
    REQUIRE(store->recordAttempts({outcome(a.id, 0, RecipientState::Deferred, kT0 + 1, kT0 + 60, "421")}).ok());
    auto d = store->drop(a.id);
    REQUIRE(d.ok());
    CHECK(d.value() == 1);
    CHECK_FALSE(store->show(a.id).ok());
    CHECK(store->count().value() == 1);
    auto again = store->drop(a.id);
    REQUIRE_FALSE(again.ok());
    CHECK(again.error().message.find("no such message") != std::string::npos);
    // Its leased recipients are gone too: the result of the attempt in flight is ignored.
    CHECK(store->recordAttempts({outcome(a.id, 1, RecipientState::Delivered, kT0 + 2)}).ok());
    CHECK(store->count().value() == 1);
  }

  SUBCASE("bounce: waiting recipients fail with a DSN owed, others are untouched") {
    NewMessage a = makeMessage("0000000000001601", kT0, 3);
    NewMessage nul = makeMessage("0000000000001602", kT0, 1);
    nul.mailFrom.clear();
    NewMessage dsn = makeDsn("0000000000001603", "x@example.org", kT0);
    for (const auto& r : store->insertBatch({a, nul, dsn})) REQUIRE(r.ok());
    REQUIRE(store->leaseDue(kT0, 10)->size() == 3);
    REQUIRE(store
                ->recordAttempts({outcome(a.id, 0, RecipientState::Delivered, kT0 + 1),
                                  outcome(a.id, 1, RecipientState::Deferred, kT0 + 1, kT0 + 60, "421 later")})
                .ok());
    auto b = store->bounce(a.id);
    REQUIRE(b.ok());
    CHECK(b.value() == 2);
    auto info = store->show(a.id);
    CHECK(rcpt(*info, 0).state == RecipientState::Delivered);
    CHECK_FALSE(rcpt(*info, 0).dsnPending);
    CHECK(rcpt(*info, 1).state == RecipientState::Failed);
    CHECK(rcpt(*info, 1).lastStatus.str() == "5.0.0");
    // Recipient 2 is still in flight (leased, no result yet): a request, applied when its
    // lease ends.
    CHECK(rcpt(*info, 2).state == RecipientState::Queued);
    CHECK(rcpt(*info, 2).request == OperatorRequest::Bounce);
    CHECK(store->bounce(a.id).value() == 0);  // nothing left waiting, the request is there
    REQUIRE(store->releaseLeases(a.id, {2}).ok());
    info = store->show(a.id);
    for (size_t i : {1u, 2u}) {
      CHECK(rcpt(*info, i).state == RecipientState::Failed);
      CHECK(rcpt(*info, i).lastError == "bounced by operator");
      CHECK(rcpt(*info, i).dsnPending);
      CHECK(rcpt(*info, i).leaseUntil == 0);
      CHECK(rcpt(*info, i).request == OperatorRequest::None);
    }
    CHECK(store->bounce(nul.id).value() == 1);
    CHECK_FALSE(rcpt(*store->show(nul.id), 0).dsnPending);
    CHECK(store->bounce(dsn.id).value() == 1);
    CHECK_FALSE(rcpt(*store->show(dsn.id), 0).dsnPending);
    auto work = store->pendingDsns(10);
    REQUIRE(work->size() == 1);
    CHECK(work->at(0).message.id == a.id);
    CHECK_FALSE(store->bounce("ffffffffffffffff").ok());
    CHECK(store->leaseDue(kT0 + 1000, 10)->empty());
  }

  SUBCASE("rate windows: upsert per (username, rule), load all") {
    CHECK(store->loadRateWindows().value().empty());
    CHECK(store->saveRateWindows({}).ok());
    REQUIRE(store
                ->saveRateWindows({{"webshop", "messages_per_day", kT0, 10},
                                   {"webshop", "recipients_per_month", kT0 - 86400, 400},
                                   {"ci", "messages_per_day", kT0, 1}})
                .ok());
    REQUIRE(store->saveRateWindows({{"webshop", "messages_per_day", kT0 + 86400, 3}}).ok());
    auto rows = store->loadRateWindows();
    REQUIRE(rows.ok());
    REQUIRE(rows->size() == 3);
    CHECK(rows->at(0).username == "ci");
    CHECK(rows->at(1).username == "webshop");
    CHECK(rows->at(1).rule == "messages_per_day");
    CHECK(rows->at(1).windowStart == kT0 + 86400);
    CHECK(rows->at(1).count == 3);
    CHECK(rows->at(2).rule == "recipients_per_month");
    CHECK(rows->at(2).count == 400);
  }

  SUBCASE("meters: deltas add up per account") {
    CHECK(store->loadMeters().value().empty());
    MeterRow d;
    d.username = "webshop";
    d.accepted = 2;
    d.recipients = 5;
    d.bytes = 1000;
    MeterRow c;
    c.username = "ci";
    c.authFailures = 3;
    REQUIRE(store->addMeters({d, c}, kT0).ok());
    d.refusedByLimit = 1;
    d.bytes = 24;
    REQUIRE(store->addMeters({d}, kT0 + 10).ok());
    CHECK(store->addMeters({}, kT0 + 20).ok());
    auto rows = store->loadMeters();
    REQUIRE(rows.ok());
    REQUIRE(rows->size() == 2);
    CHECK(rows->at(0).username == "ci");
    CHECK(rows->at(0).authFailures == 3);
    CHECK(rows->at(0).updatedAt == kT0);
    const MeterRow& w = rows->at(1);
    CHECK(w.accepted == 4);
    CHECK(w.recipients == 10);
    CHECK(w.bytes == 1024);
    CHECK(w.refusedByLimit == 1);
    CHECK(w.authFailures == 0);
    CHECK(w.updatedAt == kT0 + 10);
  }
}

TEST_CASE("writes through a read-only store fail cleanly; reads of the new tables work") {
  TempDir dir;
  const std::string path = dir.file("q.db");
  auto writer = mustOpen(path);
  REQUIRE(writer->insertBatch({makeMessage("0000000000001701", kT0, 1)})[0].ok());
  REQUIRE(writer->addMeters({MeterRow{"webshop", 1, 0, 1, 10, 0, 0}}, kT0).ok());
  OpenOptions ro;
  ro.readOnly = true;
  auto reader = mustOpen(path, ro);
  CHECK_FALSE(reader->leaseDue(kT0, 10).ok());
  CHECK_FALSE(reader->recordAttempts({outcome("0000000000001701", 0, RecipientState::Delivered, kT0)}).ok());
  CHECK_FALSE(reader->retryNow(std::nullopt).ok());
  CHECK_FALSE(reader->drop("0000000000001701").ok());
  CHECK_FALSE(reader->bounce("0000000000001701").ok());
  CHECK_FALSE(reader->saveRateWindows({{"a", "b", 1, 1}}).ok());
  CHECK_FALSE(reader->addMeters({MeterRow{"webshop", 1, 0, 0, 0, 0, 0}}, kT0).ok());
  CHECK(reader->nextDue().value() == std::optional<int64_t>(kT0));
  CHECK(reader->pendingDsns(10).value().empty());
  CHECK(reader->loadMeters().value().size() == 1);
  CHECK(reader->show("0000000000001701").ok());
  CHECK(reader->count().value() == 1);
}

TEST_CASE("two connections cannot lease the same recipients") {
  TempDir dir;
  const std::string path = dir.file("q.db");
  {
    auto store = mustOpen(path);
    std::vector<NewMessage> batch;
    for (int i = 0; i < 200; ++i) batch.push_back(makeMessage(newQueueId(), kT0 + i, 2));
    for (const auto& r : store->insertBatch(batch)) REQUIRE(r.ok());
  }
  // Each thread has its own connection, as two processes would.
  std::mutex mu;
  std::vector<std::string> leased;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      auto opened = SqliteStore::open(path);
      if (!opened) {
        ++failures;
        return;
      }
      auto store = std::move(opened).value();
      for (;;) {
        auto due = store->leaseDue(kT0 + 1000, 7);
        if (!due) {
          ++failures;
          return;
        }
        if (due->empty()) return;
        std::lock_guard lock(mu);
        for (const auto& d : *due)
          for (const auto& r : d.recipients) leased.push_back(d.id + "/" + std::to_string(r.index));
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(failures.load() == 0);
  CHECK(leased.size() == 400);
  CHECK(std::set<std::string>(leased.begin(), leased.end()).size() == 400);  // no recipient twice
}

TEST_CASE("a version 1 database with messages migrates to the current version and keeps them") {
  TempDir dir;
  const std::string path = dir.file("v1.db");
  {
    // What a subrelay of schema version 1 left behind: only the first migration applied.
    RawDb raw(path);
    std::vector<schema::Migration> v1(schema::migrations().begin(), schema::migrations().begin() + 1);
    REQUIRE(v1.back().version == 1);
    REQUIRE(schema::migrate(raw.get(), v1, 1).ok());
    REQUIRE(raw.exec(
        "INSERT INTO messages (id, account, mail_from, size, received_at, captured, smtputf8, eight_bit, "
        "client_address, helo, tls_version, tls_cipher, content) VALUES "
        "('0000000000000111', 'webshop', 'orders@shop.example.com', 4, 1700000000, 0, 1, 1, '192.0.2.1', "
        "'h.example', 'TLSv1.3', 'X', x'41424344')"));
    REQUIRE(raw.exec("INSERT INTO recipients VALUES ('0000000000000111', 0, 'a@example.org', 'deferred', 2, "
                     "1700000600, '421 try later', 1700000300)"));
    REQUIRE(raw.exec("INSERT INTO recipients VALUES ('0000000000000111', 1, 'b@example.org', 'delivered', 1, "
                     "0, '', 1700000300)"));
    REQUIRE(raw.text("PRAGMA user_version") == "1");
  }
  {
    // A reader does not migrate: it asks for serve to run once.
    OpenOptions ro;
    ro.readOnly = true;
    auto r = SqliteStore::open(path, ro);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().message.find("older") != std::string::npos);
  }
  auto store = mustOpen(path);
  CHECK(store->schemaVersion() == SqliteStore::kSchemaVersion);
  auto info = store->show("0000000000000111");
  REQUIRE(info.ok());
  CHECK(info->account == "webshop");
  CHECK(info->smtputf8);
  CHECK(info->eightBit);
  CHECK_FALSE(info->isDsn);
  CHECK(info->attempts.empty());
  REQUIRE(info->recipients.size() == 2);
  CHECK(rcpt(*info, 0).state == RecipientState::Deferred);
  CHECK(rcpt(*info, 0).attempts == 2);
  CHECK(rcpt(*info, 0).lastError == "421 try later");
  CHECK(rcpt(*info, 0).leaseUntil == 0);
  CHECK_FALSE(rcpt(*info, 0).dsnPending);
  CHECK(rcpt(*info, 1).state == RecipientState::Delivered);
  CHECK(store->content("0000000000000111").value() == "ABCD");
  // And the migrated queue works as a version 2 one.
  CHECK(store->nextDue().value() == std::optional<int64_t>(1700000600));
  auto due = store->leaseDue(1700000600, 10);
  REQUIRE(due.ok());
  REQUIRE(due->size() == 1);
  CHECK(due->at(0).recipients.size() == 1);
  REQUIRE(store->recordAttempts({outcome("0000000000000111", 0, RecipientState::Failed, 1700000601, 0, "550 gone")}).ok());
  CHECK(store->pendingDsns(10)->size() == 1);
  REQUIRE(store->addMeters({MeterRow{"webshop", 1, 0, 1, 4, 0, 0}}, 1700000601).ok());
  store.reset();
  RawDb raw(path);
  CHECK(raw.text("PRAGMA user_version") == std::to_string(SqliteStore::kSchemaVersion));
  CHECK(raw.text("SELECT count(*) FROM attempts") == "1");
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
  // A new file is made with incremental auto-vacuum (retention gives pages back with it).
  CHECK(raw.text("PRAGMA auto_vacuum") == "2");
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
  CHECK_FALSE(raw.exec("INSERT INTO recipients (message_id, idx, address, state, updated_at) "
                       "VALUES ('nope', 0, 'a@b', 'queued', 0)"));
  // Attempts too (schema version 2), and they go with their message.
  CHECK_FALSE(raw.exec("INSERT INTO attempts (message_id, idx, at, result) VALUES ('nope', 0, 0, 'failed')"));
  REQUIRE(store->insertBatch({makeMessage("0000000000000ffe")})[0].ok());
  REQUIRE(raw.exec("INSERT INTO attempts (message_id, idx, at, result) VALUES ('0000000000000ffe', 0, 0, 'failed')"));
  REQUIRE(raw.exec("DELETE FROM messages WHERE id='0000000000000ffe'"));
  CHECK(raw.text("SELECT count(*) FROM attempts") == "0");
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
  // Hypothetical later steps, numbered after this build's last one.
  constexpr int kB = SqliteStore::kSchemaVersion;
  const auto v = [](int n) { return std::to_string(n); };
  steps.push_back({kB + 1, "ALTER TABLE messages ADD COLUMN priority INTEGER NOT NULL DEFAULT 0"});
  steps.push_back({kB + 2, "CREATE TABLE hypothetical_later(address TEXT PRIMARY KEY)"});

  auto to2 = schema::migrate(raw.get(), steps, kB + 2);
  REQUIRE(to2.ok());
  CHECK(to2.value() == kB + 2);
  CHECK(raw.text("PRAGMA user_version") == v(kB + 2));
  CHECK(raw.text("SELECT priority FROM messages") == "0");  // old rows kept, column added
  CHECK(raw.text("SELECT count(*) FROM sqlite_master WHERE name='hypothetical_later'") == "1");

  // Migrating again is a no-op.
  CHECK(schema::migrate(raw.get(), steps, kB + 2).value() == kB + 2);

  // The next step half-succeeds: its first statement must not survive the failure.
  steps.push_back({kB + 3, "CREATE TABLE half(x); THIS IS NOT SQL"});
  auto to3 = schema::migrate(raw.get(), steps, kB + 3);
  REQUIRE_FALSE(to3.ok());
  CHECK(to3.error().message.find("version " + v(kB + 3)) != std::string::npos);
  CHECK(raw.text("PRAGMA user_version") == v(kB + 2));
  CHECK(raw.text("SELECT count(*) FROM sqlite_master WHERE name='half'") == "0");
  CHECK(sqlite3_get_autocommit(raw.get()) != 0);  // no transaction left open

  // A target with no path to it is an error, not a silent partial upgrade.
  CHECK_FALSE(schema::migrate(raw.get(), steps, kB + 6).ok());
  CHECK(raw.text("PRAGMA user_version") == v(kB + 2));

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

// ---------------------------------------------------------------------------------------
// Retention (schema version 4): finished messages lose their content, then their history;
// captured messages go after retention.captured. Explicit `now` values throughout.

namespace {

constexpr int64_t kHour = 3600;
constexpr int64_t kDay = 24 * kHour;

NewMessage captured(const std::string& id, int64_t at) {
  NewMessage m = makeMessage(id, at, 1);
  m.captured = true;
  return m;
}

bool contentRemoved(SqliteStore& s, const std::string& id) {
  auto c = s.content(id);
  return !c.ok() && c.error().message.find("was removed") != std::string::npos;
}

bool exists(SqliteStore& s, const std::string& id) { return s.show(id).ok(); }

}  // namespace

TEST_CASE_TEMPLATE("retention: prune removes bodies, then history; captured after their own time", B, FileBackend,
                   MemoryBackend) {
  B backend;
  auto store = backend.open();
  CAPTURE(B::kName);
  RetentionPolicy policy;
  policy.finishedBodies = kHour;
  policy.history = kDay;
  policy.captured = 10 * 60;

  // A: both recipients delivered at kT0 + 10 (finished). B: one delivered, one deferred.
  // C: queued, never tried. D: failed with a DSN pending, then its DSN is queued.
  // E: captured at kT0. F: failed with the null sender: no DSN, finished at once.
  NewMessage f = makeMessage("000000000000000f", kT0, 1);
  f.mailFrom = "";
  for (auto r : store->insertBatch({makeMessage("000000000000000a", kT0), makeMessage("000000000000000b", kT0),
                                    makeMessage("000000000000000c", kT0), makeMessage("000000000000000d", kT0, 1),
                                    captured("000000000000000e", kT0), f}))
    REQUIRE(r.ok());
  REQUIRE(store
              ->recordAttempts({outcome("000000000000000a", 0, RecipientState::Delivered, kT0 + 5),
                                outcome("000000000000000a", 1, RecipientState::Delivered, kT0 + 10),
                                outcome("000000000000000b", 0, RecipientState::Delivered, kT0 + 10),
                                outcome("000000000000000b", 1, RecipientState::Deferred, kT0 + 10, kT0 + 600, "451 later"),
                                outcome("000000000000000d", 0, RecipientState::Failed, kT0 + 20, 0, "550 no such user"),
                                outcome("000000000000000f", 0, RecipientState::Failed, kT0 + 30, 0, "550 no such user")})
              .ok());

  CHECK(store->show("000000000000000a")->finishedAt == kT0 + 10);
  CHECK(store->show("000000000000000b")->finishedAt == 0);
  CHECK(store->show("000000000000000c")->finishedAt == 0);
  CHECK(store->show("000000000000000d")->finishedAt == 0);  // its DSN is still to be sent
  CHECK(store->show("000000000000000e")->finishedAt == kT0);
  CHECK(store->show("000000000000000f")->finishedAt == kT0 + 30);

  SUBCASE("bodies go at finished_bodies, not a second before; the envelope and history stay") {
    auto none = store->prune(kT0 + 10 + kHour - 1, policy, 100);
    REQUIRE(none.ok());
    CHECK(none->bodiesRemoved == 0);
    CHECK(none->capturedDeleted == 1);  // E, captured an hour ago
    CHECK(store->content("000000000000000a").ok());
    auto some = store->prune(kT0 + 10 + kHour, policy, 100);
    REQUIRE(some.ok());
    CHECK(some->bodiesRemoved == 1);  // A; F finished 20 s later
    CHECK(some->capturedDeleted == 0);
    CHECK(some->finishedDeleted == 0);
    CHECK(contentRemoved(*store, "000000000000000a"));
    auto a = store->show("000000000000000a");
    REQUIRE(a.ok());
    CHECK(a->contentPruned);
    CHECK(a->size > 0);  // the original size is kept
    CHECK(a->recipients.size() == 2);
    CHECK(a->attempts.size() == 2);
    CHECK(rcpt(*a, 1).state == RecipientState::Delivered);
    CHECK(store->content("000000000000000f").ok());
    CHECK(store->prune(kT0 + 30 + kHour, policy, 100)->bodiesRemoved == 1);
    CHECK(contentRemoved(*store, "000000000000000f"));
    // Pruned once only.
    CHECK(store->prune(kT0 + 30 + kHour, policy, 100)->rows() == 0);
  }
  SUBCASE("history goes at retention.history") {
    REQUIRE(store->prune(kT0 + kDay, policy, 100).ok());
    CHECK(exists(*store, "000000000000000a"));
    auto r = store->prune(kT0 + 10 + kDay, policy, 100);
    REQUIRE(r.ok());
    CHECK(r->finishedDeleted == 1);
    CHECK_FALSE(exists(*store, "000000000000000a"));
    CHECK(store->show("000000000000000a").error().message.find("no such message") == 0);
    CHECK(store->prune(kT0 + 30 + kDay, policy, 100)->finishedDeleted == 1);  // F
    CHECK_FALSE(exists(*store, "000000000000000f"));
  }
  SUBCASE("captured messages go at retention.captured, bytes and all") {
    CHECK(store->prune(kT0 + 599, policy, 100)->capturedDeleted == 0);
    CHECK(store->content("000000000000000e").ok());
    CHECK(store->prune(kT0 + 600, policy, 100)->capturedDeleted == 1);
    CHECK_FALSE(exists(*store, "000000000000000e"));
  }
  SUBCASE("unfinished, deferred, queued and DSN-pending messages are never touched") {
    const int64_t far = kT0 + 100 * 365 * kDay;
    while (store->prune(far, policy, 100)->rows() > 0) {
    }
    for (const char* id : {"000000000000000b", "000000000000000c", "000000000000000d"}) {
      CAPTURE(id);
      REQUIRE(exists(*store, id));
      CHECK(store->content(id).ok());
      CHECK_FALSE(store->show(id)->contentPruned);
    }
    CHECK(store->count().value() == 3);
    // D's DSN queued: D is finished (when it failed), and the DSN itself is a new message.
    REQUIRE(store->completeDsn("000000000000000d", {0}, makeDsn("00000000000000d5", "orders@shop.example.com", kT0 + 40))
                .ok());
    CHECK(store->show("000000000000000d")->finishedAt == kT0 + 20);
    CHECK(store->show("00000000000000d5")->finishedAt == 0);
    CHECK(store->prune(kT0 + 20 + kHour, policy, 100)->bodiesRemoved == 1);
    CHECK(contentRemoved(*store, "000000000000000d"));
    CHECK(store->content("00000000000000d5").ok());
    // B finishes when its deferred recipient is delivered.
    REQUIRE(store->recordAttempts({outcome("000000000000000b", 1, RecipientState::Delivered, kT0 + 700)}).ok());
    CHECK(store->show("000000000000000b")->finishedAt == kT0 + 700);
  }
  SUBCASE("finished_bodies 0s: the body goes as soon as the message finishes") {
    policy.finishedBodies = 0;
    auto r = store->prune(kT0 + 10, policy, 100);
    REQUIRE(r.ok());
    CHECK(r->bodiesRemoved == 1);
    CHECK(contentRemoved(*store, "000000000000000a"));
    CHECK(store->content("000000000000000f").ok());  // finishes at kT0 + 30
  }
  SUBCASE("a bounce finishes a message once no DSN is pending") {
    // C bounced by an operator: its DSN is pending, so it waits for that.
    REQUIRE(store->bounce("000000000000000c").value() == 2);
    CHECK(store->show("000000000000000c")->finishedAt == 0);
    REQUIRE(store->completeDsn("000000000000000c", {0, 1}, std::nullopt).ok());
    CHECK(store->show("000000000000000c")->finishedAt > 0);
  }
}

TEST_CASE_TEMPLATE("retention: each prune is one batch of at most maxRows messages", B, FileBackend, MemoryBackend) {
  B backend;
  auto store = backend.open();
  CAPTURE(B::kName);
  std::vector<NewMessage> batch;
  for (int i = 0; i < 10; ++i) batch.push_back(captured("00000000000001" + std::to_string(10 + i), kT0 + i));
  for (int i = 0; i < 4; ++i) batch.push_back(makeMessage("00000000000002" + std::to_string(10 + i), kT0, 1));
  for (auto r : store->insertBatch(batch)) REQUIRE(r.ok());
  std::vector<AttemptRecord> done;
  for (int i = 0; i < 4; ++i) done.push_back(outcome("00000000000002" + std::to_string(10 + i), 0, RecipientState::Delivered, kT0 + i));
  REQUIRE(store->recordAttempts(done).ok());

  RetentionPolicy policy;
  policy.captured = 60;
  const int64_t now = kT0 + 100;
  std::vector<int64_t> sizes;
  int64_t bodies = 0, deleted = 0;
  for (;;) {
    auto r = store->prune(now, policy, 3);
    REQUIRE(r.ok());
    CHECK(r->rows() <= 3);
    if (r->rows() == 0) break;
    sizes.push_back(r->rows());
    bodies += r->bodiesRemoved;
    deleted += r->capturedDeleted;
  }
  CHECK(sizes == std::vector<int64_t>{3, 3, 3, 3, 2});
  CHECK(deleted == 10);
  CHECK(bodies == 4);
  CHECK(store->count().value() == 4);
  // Oldest first: with one row allowed, the captured message received first goes first.
  REQUIRE(store->insertBatch({captured("0000000000000301", kT0 + 2), captured("0000000000000300", kT0 + 1)})[0].ok());
  CHECK(store->prune(now, policy, 1)->capturedDeleted == 1);
  CHECK(exists(*store, "0000000000000301"));
  CHECK_FALSE(exists(*store, "0000000000000300"));
  CHECK(store->prune(now, policy, 0)->rows() == 0);
}

TEST_CASE("retention: prune uses the finished table's indexes and vacuum gives pages back") {
  TempDir dir;
  const std::string path = dir.file("q.db");
  auto store = mustOpen(path);
  std::vector<NewMessage> batch;
  for (int i = 0; i < 100; ++i) {
    NewMessage m = captured("0000000000001" + std::to_string(100 + i), kT0);
    m.content.append(20000, 'x');  // overflow pages
    batch.push_back(std::move(m));
  }
  for (auto r : store->insertBatch(batch)) REQUIRE(r.ok());
  RawDb raw(path);
  auto plan = [&](const std::string& sql) {
    std::string out;
    sqlite3_stmt* st = nullptr;
    REQUIRE(sqlite3_prepare_v2(raw.get(), ("EXPLAIN QUERY PLAN " + sql).c_str(), -1, &st, nullptr) == SQLITE_OK);
    while (sqlite3_step(st) == SQLITE_ROW) out += reinterpret_cast<const char*>(sqlite3_column_text(st, 3)) + std::string("\n");
    sqlite3_finalize(st);
    return out;
  };
  CHECK(plan("SELECT message_id FROM finished INDEXED BY finished_unpruned WHERE captured = 0 AND content_pruned = 0 AND finished_at <= 5 "
             "ORDER BY finished_at LIMIT 3")
            .find("USING COVERING INDEX finished_unpruned") != std::string::npos);
  CHECK(plan("SELECT message_id FROM finished WHERE captured = 1 AND finished_at <= 5 ORDER BY finished_at LIMIT 3")
            .find("USING COVERING INDEX finished_due") != std::string::npos);

  const int64_t pagesBefore = store->freeAndTotalPages()->second;
  RetentionPolicy policy;
  policy.captured = 1;
  while (store->prune(kT0 + 1, policy, 30)->rows() > 0) {
  }
  CHECK(store->count().value() == 0);
  auto pages = store->freeAndTotalPages();
  REQUIRE(pages.ok());
  CHECK(pages->first > 400);  // 100 x 20 kB freed
  CHECK(store->incrementalVacuum(10).value() == 10);
  CHECK(store->freeAndTotalPages()->first == pages->first - 10);
  // The rest, except 5 pages kept for new messages.
  CHECK(store->incrementalVacuum(1'000'000, 5).value() == pages->first - 15);
  CHECK(store->freeAndTotalPages()->first == 5);
  CHECK(store->incrementalVacuum(1'000'000, 5).value() == 0);
  CHECK(store->freeAndTotalPages()->second < pagesBefore);
  // Read-only connections cannot prune.
  OpenOptions ro;
  ro.readOnly = true;
  auto reader = mustOpen(path, ro);
  CHECK_FALSE(reader->prune(kT0, policy, 10).ok());
  CHECK_FALSE(reader->incrementalVacuum(10).ok());
}

TEST_CASE("a version 2 database migrates to the current version (4 and later): data kept, finished messages found, vacuum switched on") {
  TempDir dir;
  const std::string path = dir.file("v2.db");
  {
    RawDb raw(path);  // auto_vacuum NONE, as every file before version 4
    std::vector<schema::Migration> v2;
    for (const auto& m : schema::migrations())
      if (m.version <= 2) v2.push_back(m);
    REQUIRE(schema::migrate(raw.get(), v2, 2).ok());
    REQUIRE(raw.text("PRAGMA auto_vacuum") == "0");
    auto msg = [&](const std::string& id, int captured) {
      REQUIRE(raw.exec("INSERT INTO messages (id, account, mail_from, size, received_at, captured, content) VALUES ('" +
                       id + "', 'webshop', 'orders@shop.example.com', 4, 1700000000, " + std::to_string(captured) +
                       ", x'41424344')"));
    };
    auto rc = [&](const std::string& id, int idx, const std::string& state, int64_t updated, int dsn = 0) {
      REQUIRE(raw.exec("INSERT INTO recipients (message_id, idx, address, state, updated_at, dsn_pending) VALUES ('" +
                       id + "', " + std::to_string(idx) + ", 'u" + std::to_string(idx) + "@example.org', '" + state +
                       "', " + std::to_string(updated) + ", " + std::to_string(dsn) + ")"));
    };
    msg("0000000000000201", 0);  // delivered + failed (DSN sent): finished at 1700000500
    rc("0000000000000201", 0, "delivered", 1700000100);
    rc("0000000000000201", 1, "failed", 1700000500);
    REQUIRE(raw.exec("INSERT INTO attempts (message_id, idx, at, result) VALUES ('0000000000000201', 0, 1700000100, "
                     "'delivered')"));
    msg("0000000000000202", 0);  // deferred
    rc("0000000000000202", 0, "deferred", 1700000100);
    msg("0000000000000203", 0);  // failed, DSN pending
    rc("0000000000000203", 0, "failed", 1700000100, 1);
    msg("0000000000000204", 1);  // captured
    rc("0000000000000204", 0, "captured", 1700000000);
  }
  auto store = mustOpen(path);
  CHECK(store->schemaVersion() == SqliteStore::kSchemaVersion);
  CHECK(store->count().value() == 4);
  CHECK(store->show("0000000000000201")->finishedAt == 1700000500);
  CHECK(store->show("0000000000000201")->attempts.size() == 1);
  CHECK(store->show("0000000000000202")->finishedAt == 0);
  CHECK(store->show("0000000000000203")->finishedAt == 0);
  CHECK(store->show("0000000000000204")->finishedAt == 1700000000);
  CHECK(store->show("0000000000000204")->captured);
  for (const char* id : {"0000000000000201", "0000000000000202", "0000000000000203", "0000000000000204"})
    CHECK(store->content(id).value() == "ABCD");
  // Converted once, at the first read-write open (a VACUUM).
  {
    RawDb raw(path);
    CHECK(raw.text("PRAGMA auto_vacuum") == "2");
    CHECK(raw.text("PRAGMA user_version") == std::to_string(SqliteStore::kSchemaVersion));
  }
  RetentionPolicy policy;  // bodies at once, history 30 days, captured 7 days
  auto r = store->prune(1700000500, policy, 10);
  REQUIRE(r.ok());
  CHECK(r->bodiesRemoved == 1);
  CHECK(contentRemoved(*store, "0000000000000201"));
  CHECK(store->prune(1700000000 + 7 * kDay, policy, 10)->capturedDeleted == 1);
  CHECK(store->prune(1700000500 + 30 * kDay, policy, 10)->finishedDeleted == 1);
  CHECK(store->count().value() == 2);
  // A second open does not convert again (nothing to do) and keeps everything.
  store.reset();
  auto again = mustOpen(path);
  CHECK(again->count().value() == 2);
}

TEST_CASE("prune pacing: at once while batches come back full, then every few seconds") {
  using namespace std::chrono_literals;
  PrunePacer p;
  p.maxRows = 100;
  p.maxVacuumPages = 1000;
  PruneCounts full;
  full.bodiesRemoved = 60;
  full.capturedDeleted = 40;
  CHECK(p.next(full, 0, false) == 50ms);
  PruneCounts some;
  some.finishedDeleted = 99;
  CHECK(p.next(some, 0, false) == 2s);
  CHECK(p.next(PruneCounts{}, 0, false) == 5s);
  // A full vacuum step means more free pages wait too.
  CHECK(p.next(PruneCounts{}, 1000, false) == 50ms);
  CHECK(p.next(PruneCounts{}, 10, false) == 2s);
  // A failure backs off, whatever the counts say.
  CHECK(p.next(full, 1000, true) == 30s);
}

// ---------------------------------------------------------------------------------------
// Operations (issue 11): the queue by state for metrics and `subrelay status`, recent
// messages by account, and `queue drop` recorded for serve to log.

TEST_CASE("queueStats, acceptedSince and operator events") {
  TempDir dir;
  auto store = mustOpen(dir.file("queue.db"));
  auto q0 = store->queueStats();
  REQUIRE(q0.ok());
  CHECK(q0->queued + q0->deferred + q0->inFlight == 0);
  CHECK(q0->oldestReceivedAt == 0);

  NewMessage a = makeMessage("0000000000000a01", 1'800'000'000, 2);
  NewMessage b = makeMessage("0000000000000b01", 1'800'000'100, 1);
  b.account = "ci";
  NewMessage c = makeMessage("0000000000000c01", 1'700'000'000, 3);
  c.captured = true;  // captured mail never waits for delivery
  for (auto& r : store->insertBatch({a, b, c})) REQUIRE(r.ok());

  auto q = store->queueStats();
  REQUIRE(q.ok());
  CHECK(q->queued == 3);
  CHECK(q->deferred == 0);
  CHECK(q->inFlight == 0);
  CHECK(q->oldestReceivedAt == 1'800'000'000);

  // Lease a's recipients: in flight, no longer queued.
  auto due = store->leaseDue(1'800'000'200, 1);
  REQUIRE(due.ok());
  REQUIRE(due->size() == 1);
  q = store->queueStats();
  CHECK(q->inFlight == 2);
  CHECK(q->queued == 1);

  auto recent = store->acceptedSince(1'800'000'050);
  REQUIRE(recent.ok());
  REQUIRE(recent->size() == 1);
  CHECK(recent->at(0).account == "ci");
  CHECK(recent->at(0).messages == 1);
  auto all = store->acceptedSince(0);
  REQUIRE(all.ok());
  uint64_t captured = 0, messages = 0;
  for (const auto& r : all.value()) {
    captured += r.captured;
    messages += r.messages;
  }
  CHECK(messages == 3);
  CHECK(captured == 1);

  // A drop leaves one event for serve; taking it removes it.
  auto none = store->takeOperatorEvents(10);
  REQUIRE(none.ok());
  CHECK(none->empty());
  REQUIRE(store->drop(b.id).ok());
  auto evs = store->takeOperatorEvents(10);
  REQUIRE(evs.ok());
  REQUIRE(evs->size() == 1);
  CHECK(evs->at(0).event == "dropped");
  CHECK(evs->at(0).messageId == b.id);
  CHECK(evs->at(0).account == "ci");
  CHECK(evs->at(0).recipients == 1);
  CHECK(evs->at(0).at > 0);
  CHECK(store->takeOperatorEvents(10)->empty());
  // A drop of an unknown id records nothing.
  CHECK_FALSE(store->drop("ffffffffffffffff").ok());
  CHECK(store->takeOperatorEvents(10)->empty());
}

// ---------------------------------------------------------------------------------------
// MTA-STS (issue 12): the policy cache, one row per Policy Domain (schema version 6).

namespace {
StsPolicyRow stsRow(const std::string& domain, const std::string& id, int64_t fetchedAt) {
  StsPolicyRow r;
  r.domain = domain;
  r.policyId = id;
  r.mode = "enforce";
  r.maxAge = 604800;
  r.mx = {"mail.example.com", "*.example.net"};
  r.text = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 604800\r\n";
  r.fetchedAt = fetchedAt;
  r.expiresAt = fetchedAt + r.maxAge;
  r.checkedAt = fetchedAt;
  return r;
}
}  // namespace

TEST_CASE("MTA-STS policy cache: save, replace, touch, load, prune; kept across reopen; read-only may only read") {
  TempDir dir;
  const std::string path = dir.file("queue.db");
  {
    auto store = mustOpen(path);
    auto none = store->loadStsPolicy("example.com");
    REQUIRE(none.ok());
    CHECK_FALSE(none->has_value());
    REQUIRE(store->saveStsPolicy(stsRow("example.com", "a1", 1'800'000'000)).ok());
    REQUIRE(store->saveStsPolicy(stsRow("other.example", "x", 1'700'000'000)).ok());
    auto got = store->loadStsPolicy("example.com");
    REQUIRE(got.ok());
    REQUIRE(got->has_value());
    const StsPolicyRow& r = **got;
    CHECK(r.policyId == "a1");
    CHECK(r.mode == "enforce");
    CHECK(r.maxAge == 604800);
    CHECK(r.mx == std::vector<std::string>{"mail.example.com", "*.example.net"});
    CHECK(r.text == stsRow("x", "y", 0).text);
    CHECK(r.fetchedAt == 1'800'000'000);
    CHECK(r.expiresAt == 1'800'604'800);
    CHECK(r.checkedAt == 1'800'000'000);

    // A new policy replaces the row; touch moves checked_at only.
    auto next = stsRow("example.com", "b2", 1'800'100'000);
    next.mode = "testing";
    next.mx = {"mx.example.com"};
    REQUIRE(store->saveStsPolicy(next).ok());
    REQUIRE(store->touchStsPolicy("example.com", 1'800'200'000).ok());
    REQUIRE(store->touchStsPolicy("unknown.example", 1).ok());
    got = store->loadStsPolicy("example.com");
    REQUIRE(got->has_value());
    CHECK((*got)->policyId == "b2");
    CHECK((*got)->mode == "testing");
    CHECK((*got)->mx == std::vector<std::string>{"mx.example.com"});
    CHECK((*got)->fetchedAt == 1'800'100'000);
    CHECK((*got)->checkedAt == 1'800'200'000);
    auto all = store->loadStsPolicies();
    REQUIRE(all.ok());
    REQUIRE(all->size() == 2);
    CHECK(all->at(0).domain == "example.com");
    CHECK(all->at(1).domain == "other.example");
  }
  {
    // Kept across a reopen; a read-only connection reads but does not write.
    OpenOptions ro;
    ro.readOnly = true;
    auto reader = mustOpen(path, ro);
    CHECK(reader->loadStsPolicies()->size() == 2);
    CHECK_FALSE(reader->saveStsPolicy(stsRow("z.example", "z", 1)).ok());
    CHECK_FALSE(reader->touchStsPolicy("example.com", 1).ok());
    CHECK_FALSE(reader->pruneStsPolicies(1).ok());
  }
  auto store = mustOpen(path);
  // other.example expired at 1'700'604'800.
  CHECK(store->pruneStsPolicies(1'700'604'799).value() == 0);
  CHECK(store->pruneStsPolicies(1'700'604'800).value() == 1);
  CHECK_FALSE(store->loadStsPolicy("other.example")->has_value());
  CHECK(store->loadStsPolicy("example.com")->has_value());
}

TEST_CASE("a version 5 database migrates to the current version: queue kept, empty policy cache, no TLS tags") {
  TempDir dir;
  const std::string path = dir.file("v5.db");
  {
    auto steps = schema::migrations();
    std::vector<schema::Migration> v5;
    for (const auto& m : steps)
      if (m.version <= 5) v5.push_back(m);
    REQUIRE(v5.size() == 5);
    RawDb raw(path);
    REQUIRE(raw.exec("PRAGMA auto_vacuum = INCREMENTAL"));
    REQUIRE(schema::migrate(raw.get(), v5, 5).ok());
    REQUIRE(raw.text("PRAGMA user_version") == "5");
    REQUIRE(raw.text("SELECT count(*) FROM sqlite_master WHERE name = 'sts_policies'") == "0");
    REQUIRE(raw.exec("INSERT INTO messages (id, account, mail_from, size, received_at, content) VALUES "
                     "('0000000000000501', 'webshop', 'orders@shop.example.com', 4, 1700000000, x'41424344')"));
    REQUIRE(raw.exec("INSERT INTO recipients (message_id, idx, address, state, updated_at) VALUES "
                     "('0000000000000501', 0, 'u@example.org', 'queued', 1700000000)"));
    REQUIRE(raw.exec("INSERT INTO operator_events (at, message_id, account, event) VALUES "
                     "(1700000001, '0000000000000400', 'ci', 'dropped')"));
  }
  {
    // A reader refuses the older file rather than migrating it.
    OpenOptions ro;
    ro.readOnly = true;
    CHECK_FALSE(SqliteStore::open(path, ro).ok());
  }
  auto store = mustOpen(path);
  CHECK(store->schemaVersion() == SqliteStore::kSchemaVersion);
  CHECK(store->count().value() == 1);
  CHECK(store->content("0000000000000501").value() == "ABCD");
  CHECK(store->show("0000000000000501")->tlsRequirement == TlsRequirement::Default);  // v7's column
  CHECK(store->takeOperatorEvents(10)->size() == 1);
  CHECK(store->loadStsPolicies()->empty());
  REQUIRE(store->saveStsPolicy(stsRow("example.com", "a1", 1'800'000'000)).ok());
  store.reset();
  RawDb raw(path);
  CHECK(raw.text("PRAGMA user_version") == std::to_string(SqliteStore::kSchemaVersion));
  CHECK(raw.text("SELECT policy_id FROM sts_policies WHERE domain = 'example.com'") == "a1");
}

TEST_CASE("REQUIRETLS and TLS-Required: No are stored with the message and leased with it (schema 7)") {
  TempDir dir;
  auto store = mustOpen(dir.file("q.db"));
  const TlsRequirement kinds[] = {TlsRequirement::Default, TlsRequirement::Required, TlsRequirement::Optional};
  for (int i = 0; i < 3; ++i) {
    NewMessage m;
    m.id = "000000000000070" + std::to_string(i);
    m.account = "a";
    m.mailFrom = "s@example.com";
    m.recipients = {"r@example.org"};
    m.content = "Subject: x\r\n\r\nx\r\n";
    m.receivedAt = 1'700'000'000;
    m.tlsRequirement = kinds[i];
    REQUIRE(store->insertBatch({m})[0].ok());
    CHECK(store->show(m.id)->tlsRequirement == kinds[i]);
  }
  auto due = store->leaseDue(1'700'000'100, 10);
  REQUIRE(due.ok());
  REQUIRE(due.value().size() == 3);
  for (const auto& d : due.value()) CHECK(d.tlsRequirement == kinds[d.id.back() - '0']);
}

// ---------------------------------------------------------------------------------------
// Idempotent submission (schema 9): a repeated key stores nothing and answers the first id.

namespace {
NewMessage keyed(std::string id, std::string key, int64_t at, std::string account = "webshop") {
  NewMessage m = makeMessage(std::move(id), at, 1);
  m.account = std::move(account);
  m.idempotencyKey = std::move(key);
  m.idempotencyWindow = 24 * 3600;
  return m;
}
}  // namespace

TEST_CASE_TEMPLATE("idempotency: the same key twice stores one message and answers its id", B, FileBackend,
                   MemoryBackend) {
  B backend;
  auto store = backend.open();
  CAPTURE(B::kName);
  constexpr int64_t t0 = 1'800'000'000;

  SUBCASE("in two batches; the duplicate adds no delivery work") {
    auto first = store->insertBatch({keyed("0000000000002001", "abc", t0)});
    REQUIRE(first[0].ok());
    CHECK(first[0].value() == "0000000000002001");
    auto again = store->insertBatch({keyed("0000000000002002", "abc", t0 + 3600)});
    REQUIRE(again[0].ok());
    CHECK(again[0].value() == "0000000000002001");
    CHECK(store->count().value() == 1);
    CHECK_FALSE(store->show("0000000000002002").ok());
    auto due = store->leaseDue(t0 + 3600, 10);
    REQUIRE(due.ok());
    REQUIRE(due->size() == 1);
    CHECK(due->front().id == "0000000000002001");
  }
  SUBCASE("in one batch (two sessions committed together)") {
    auto res = store->insertBatch({keyed("0000000000002011", "abc", t0), makeMessage("0000000000002012", t0, 1),
                                   keyed("0000000000002013", "abc", t0)});
    REQUIRE(res.size() == 3);
    for (const auto& r : res) REQUIRE(r.ok());
    CHECK(res[0].value() == "0000000000002011");
    CHECK(res[1].value() == "0000000000002012");
    CHECK(res[2].value() == "0000000000002011");
    CHECK(store->count().value() == 2);
  }
  SUBCASE("a batch of duplicates only answers them") {
    REQUIRE(store->insertBatch({keyed("0000000000002021", "abc", t0)})[0].ok());
    auto res = store->insertBatch({keyed("0000000000002022", "abc", t0 + 1), keyed("0000000000002023", "abc", t0 + 2)});
    CHECK(res[0].value() == "0000000000002021");
    CHECK(res[1].value() == "0000000000002021");
    CHECK(store->count().value() == 1);
  }
  SUBCASE("keys are per account, and different keys are different messages") {
    auto res = store->insertBatch({keyed("0000000000002031", "abc", t0), keyed("0000000000002032", "abc", t0, "billing"),
                                   keyed("0000000000002033", "abd", t0), keyed("0000000000002034", "ABC", t0)});
    for (size_t i = 0; i < res.size(); ++i) {
      REQUIRE(res[i].ok());
      CHECK(res[i].value() == "000000000000203" + std::to_string(i + 1));
    }
    CHECK(store->count().value() == 4);
  }
  SUBCASE("after the window the key is new again; the newer message is then the answer") {
    REQUIRE(store->insertBatch({keyed("0000000000002041", "abc", t0)})[0].ok());
    auto edge = store->insertBatch({keyed("0000000000002042", "abc", t0 + 24 * 3600)});
    CHECK(edge[0].value() == "0000000000002041");  // the window includes its end
    auto later = store->insertBatch({keyed("0000000000002043", "abc", t0 + 24 * 3600 + 1)});
    CHECK(later[0].value() == "0000000000002043");
    CHECK(store->count().value() == 2);
    auto after = store->insertBatch({keyed("0000000000002044", "abc", t0 + 24 * 3600 + 2)});
    CHECK(after[0].value() == "0000000000002043");
    CHECK(store->count().value() == 2);
  }
  SUBCASE("a message that fails to store records no key") {
    NewMessage bad = keyed("0000000000002051", "abc", t0);
    REQUIRE(store->insertBatch({makeMessage("0000000000002051", t0, 1)})[0].ok());  // the id is taken
    CHECK_FALSE(store->insertBatch({bad})[0].ok());
    auto retry = store->insertBatch({keyed("0000000000002052", "abc", t0)});
    CHECK(retry[0].value() == "0000000000002052");
  }
  SUBCASE("retention forgets keys older than the window, in bounded batches") {
    for (int i = 0; i < 5; ++i)
      REQUIRE(store->insertBatch({keyed("000000000000206" + std::to_string(i), "k" + std::to_string(i), t0 + i)})[0].ok());
    RetentionPolicy policy;
    policy.idempotencyKeys = 3600;
    auto none = store->prune(t0 + 3600, policy, 64);
    REQUIRE(none.ok());
    CHECK(none->keysDeleted == 0);
    auto some = store->prune(t0 + 3600 + 3, policy, 2);  // k0..k2 are out of the window; budget 2
    REQUIRE(some.ok());
    CHECK(some->keysDeleted == 2);
    auto rest = store->prune(t0 + 3600 + 3, policy, 64);
    CHECK(rest->keysDeleted == 1);
    // A forgotten key is new again; a kept one still answers.
    CHECK(store->insertBatch({keyed("0000000000002070", "k0", t0 + 3600 + 3)})[0].value() == "0000000000002070");
    CHECK(store->insertBatch({keyed("0000000000002071", "k4", t0 + 3600 + 3)})[0].value() == "0000000000002064");
  }
}

TEST_CASE("idempotency: a key is kept across a reopen (restart)") {
  TempDir dir;
  const std::string path = dir.file("queue.db");
  {
    auto store = mustOpen(path);
    REQUIRE(store->insertBatch({keyed("0000000000002101", "abc", 1'800'000'000)})[0].ok());
  }
  auto store = mustOpen(path);
  auto again = store->insertBatch({keyed("0000000000002102", "abc", 1'800'000'060)});
  REQUIRE(again[0].ok());
  CHECK(again[0].value() == "0000000000002101");
  CHECK(store->count().value() == 1);
  RawDb raw(path);
  CHECK(raw.text("SELECT message_id FROM idempotency_keys WHERE account = 'webshop' AND key = 'abc'") ==
        "0000000000002101");
}

TEST_CASE("idempotency: concurrent submissions through the group committer store one message") {
  TempDir dir;
  auto store = mustOpen(dir.file("queue.db"));
  GroupCommitter gc(*store, 8);
  constexpr int kN = 16;
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::string> ids;
  for (int i = 0; i < kN; ++i) {
    char id[17];
    std::snprintf(id, sizeof id, "00000000000022%02d", i);
    gc.submit(keyed(id, "same", 1'800'000'000 + i), [&](util::Result<std::string> r) {
      std::lock_guard lock(mu);
      ids.push_back(r.ok() ? r.value() : "error: " + r.error().message);
      cv.notify_one();
    });
  }
  {
    std::unique_lock lock(mu);
    REQUIRE(cv.wait_for(lock, std::chrono::seconds(30), [&] { return ids.size() == kN; }));
  }
  gc.stop();
  for (const auto& id : ids) CHECK(id == "0000000000002200");
  CHECK(store->count().value() == 1);
}

// ---------------------------------------------------------------------------------------
// DSN extension (schema 10): RET, ENVID, NOTIFY, ORCPT stored, shown and leased; a
// delivery that owes a success DSN leaves it pending like a failure.

TEST_CASE_TEMPLATE("DSN parameters are stored, shown and leased with the message (schema 10)", B, FileBackend,
                   MemoryBackend) {
  B backend;
  auto store = backend.open();
  NewMessage m = makeMessage("00000000000a0001", kT0, 3);
  m.dsnRet = DsnRet::Hdrs;
  m.dsnEnvid = "QQ+2B314";
  m.recipientDsn = {RecipientDsn{kDsnNotifySuccess | kDsnNotifyFailure, "rfc822;user0+2B@example.org"},
                    RecipientDsn{}, RecipientDsn{kDsnNotifyNever, ""}};
  NewMessage plain = makeMessage("00000000000a0002", kT0, 1);  // no DSN parameters at all
  REQUIRE(store->insertBatch({m, plain})[0].ok());
  auto shown = store->show(m.id);
  REQUIRE(shown.ok());
  CHECK(shown->dsnRet == DsnRet::Hdrs);
  CHECK(shown->dsnEnvid == "QQ+2B314");
  REQUIRE(shown->recipients.size() == 3);
  CHECK(shown->recipients[0].dsn.notify == (kDsnNotifySuccess | kDsnNotifyFailure));
  CHECK(shown->recipients[0].dsn.orcpt == "rfc822;user0+2B@example.org");
  CHECK(shown->recipients[1].dsn.notify == 0);
  CHECK(shown->recipients[2].dsn.notify == kDsnNotifyNever);
  auto other = store->show(plain.id);
  REQUIRE(other.ok());
  CHECK(other->dsnRet == DsnRet::Unspecified);
  CHECK(other->dsnEnvid.empty());
  CHECK(other->recipients[0].dsn.notify == 0);

  auto due = store->leaseDue(kT0 + 1, 10);
  REQUIRE(due.ok());
  REQUIRE(due->size() == 2);
  const DueMessage& d = due->at(0).id == m.id ? due->at(0) : due->at(1);
  CHECK(d.dsnRet == DsnRet::Hdrs);
  CHECK(d.dsnEnvid == "QQ+2B314");
  REQUIRE(d.recipients.size() == 3);
  CHECK(d.recipients[0].dsn.orcpt == "rfc822;user0+2B@example.org");
  CHECK(d.recipients[0].dsn.notify == (kDsnNotifySuccess | kDsnNotifyFailure));

  SUBCASE("a delivery owing a success DSN keeps it pending until the DSN is queued") {
    auto owed = outcome(m.id, 0, RecipientState::Delivered, kT0 + 5);
    owed.successDsn = true;
    auto failed = outcome(m.id, 2, RecipientState::Failed, kT0 + 5, 0, "550 5.1.1 no", 550);
    REQUIRE(store->recordAttempts({owed, outcome(m.id, 1, RecipientState::Delivered, kT0 + 5), failed}).ok());
    auto work = store->pendingDsns(10);
    REQUIRE(work.ok());
    REQUIRE(work->size() == 1);
    // Both the delivered (success owed) and the failed one are pending: NOTIFY=NEVER is
    // honoured when the DSN is built, not by the store.
    REQUIRE(work->at(0).message.recipients.size() == 2);
    CHECK(work->at(0).message.recipients[0].index == 0);
    CHECK(work->at(0).message.recipients[0].state == RecipientState::Delivered);
    CHECK(work->at(0).message.recipients[1].index == 2);
    CHECK(work->at(0).message.dsnEnvid == "QQ+2B314");
    // Not finished while the success DSN is owed (retention keeps it).
    CHECK(store->show(m.id)->finishedAt == 0);
    NewMessage dsn = makeMessage("00000000000a0003", kT0 + 6, 1);
    REQUIRE(store->completeDsn(m.id, {0, 2}, dsn).ok());
    CHECK(store->pendingDsns(10)->empty());
    CHECK(store->show(m.id)->finishedAt != 0);
  }
  SUBCASE("a delivery without successDsn owes nothing") {
    REQUIRE(store->recordAttempts({outcome(m.id, 0, RecipientState::Delivered, kT0 + 5)}).ok());
    CHECK(store->pendingDsns(10)->empty());
  }
}

TEST_CASE("a success DSN is never owed to the null sender") {
  TempDir dir;
  auto store = mustOpen(dir.file("q.db"));
  NewMessage m = makeMessage("00000000000a0011", kT0, 1);
  m.mailFrom = "";
  m.recipientDsn = {RecipientDsn{kDsnNotifySuccess, ""}};
  REQUIRE(store->insertBatch({m})[0].ok());
  REQUIRE(store->leaseDue(kT0 + 1, 10).ok());
  auto rec = outcome(m.id, 0, RecipientState::Delivered, kT0 + 5);
  rec.successDsn = true;
  REQUIRE(store->recordAttempts({rec}).ok());
  CHECK(store->pendingDsns(10)->empty());
}

// ---------------------------------------------------------------------------------
// Suppression lists (issue 13, schema version 11)
// ---------------------------------------------------------------------------------

namespace {

SuppressionRow suppression(std::string account, std::string address, int64_t at, int64_t expires = 0,
                           std::string source = "bounce") {
  SuppressionRow r;
  r.account = std::move(account);
  r.address = std::move(address);
  r.reason = "550 5.1.1 no such user";
  r.createdAt = at;
  r.expiresAt = expires;
  r.source = std::move(source);
  return r;
}

}  // namespace

TEST_CASE("suppressions: add, replace, list, remove, counts, and a change counter another connection sees") {
  TempDir dir;
  const std::string path = dir.file("s.db");
  auto store = mustOpen(path);
  auto reader = mustOpen(path, OpenOptions{.readOnly = true, .create = false});
  const int64_t c0 = reader->suppressionChanges().value();
  REQUIRE(store->upsertSuppression(suppression("shop", "bob@example.com", 1000)).ok());
  REQUIRE(store->upsertSuppression(suppression("shop", "ann@example.com", 1001, 2000, "manual")).ok());
  REQUIRE(store->upsertSuppression(suppression("blog", "bob@example.com", 1002)).ok());
  const int64_t c1 = reader->suppressionChanges().value();
  CHECK(c1 > c0);

  auto shop = store->listSuppressions("shop");
  REQUIRE(shop.ok());
  REQUIRE(shop->size() == 2);
  CHECK((*shop)[0].address == "bob@example.com");
  CHECK((*shop)[0].expiresAt == 0);  // NULL = forever
  CHECK((*shop)[1].address == "ann@example.com");
  CHECK((*shop)[1].expiresAt == 2000);
  CHECK((*shop)[1].source == "manual");
  CHECK(store->listSuppressions("")->size() == 3);

  // A second bounce refreshes the row, it does not add one.
  auto again = suppression("shop", "bob@example.com", 1500);
  again.reason = "550 5.1.1 still no such user";
  REQUIRE(store->upsertSuppression(again).ok());
  CHECK(store->listSuppressions("shop")->size() == 2);
  CHECK(store->listSuppressions("shop")->back().reason == "550 5.1.1 still no such user");

  // Live rows and counts leave the expired ones out.
  CHECK(store->loadLiveSuppressions(1999, 100)->size() == 3);
  CHECK(store->loadLiveSuppressions(2000, 100)->size() == 2);
  CHECK(store->loadLiveSuppressions(1999, 1)->front().address == "bob@example.com");  // newest first
  auto counts = store->suppressionCounts(2000).value();
  CHECK(counts == std::vector<std::pair<std::string, uint64_t>>{{"blog", 1}, {"shop", 1}});

  const int64_t c2 = reader->suppressionChanges().value();
  CHECK(store->removeSuppression("shop", "bob@example.com").value() == 1);
  CHECK(store->removeSuppression("shop", "bob@example.com").value() == 0);
  CHECK(reader->suppressionChanges().value() > c2);
  CHECK(store->listSuppressions("shop")->size() == 1);
  CHECK_FALSE(reader->upsertSuppression(suppression("x", "y@z", 1)).ok());  // read-only
}

TEST_CASE("suppressions: a hard bounce is stored with its failed attempt; other outcomes store none") {
  TempDir dir;
  auto store = mustOpen(dir.file("b.db"));
  const int64_t t0 = 1'800'000'000;
  NewMessage m = makeMessage("0000000000000e01", t0, 3);
  REQUIRE(store->insertBatch({m})[0].ok());
  REQUIRE(store->leaseDue(t0, 10)->size() == 1);
  AttemptRecord hard = outcome(m.id, 0, RecipientState::Failed, t0 + 5, 0, "550 5.1.1 no such user", 550);
  hard.suppress = suppression("webshop", "user0@example.org", t0 + 5);
  // Marked, but deferred: a record that does not end failed stores nothing.
  AttemptRecord soft = outcome(m.id, 1, RecipientState::Deferred, t0 + 5, t0 + 600, "452 4.2.2 full", 452);
  soft.suppress = suppression("webshop", "user1@example.org", t0 + 5);
  AttemptRecord other = outcome(m.id, 2, RecipientState::Failed, t0 + 5, 0, "550 5.7.1 spam", 550);
  REQUIRE(store->recordAttempts({hard, soft, other}).ok());
  auto rows = store->listSuppressions("webshop").value();
  REQUIRE(rows.size() == 1);
  CHECK(rows[0].address == "user0@example.org");
  CHECK(rows[0].source == "bounce");
  // The DSN is still owed for both failures.
  auto dsns = store->pendingDsns(10).value();
  REQUIRE(dsns.size() == 1);
  CHECK(dsns[0].message.recipients.size() == 2);
}

TEST_CASE("suppressions: a captured message's reserved recipient fails at once, owes a DSN and is suppressed") {
  TempDir dir;
  auto store = mustOpen(dir.file("c.db"));
  const int64_t t0 = 1'800'000'000;
  NewMessage m = makeMessage("0000000000000f01", t0, 2);
  m.captured = true;
  m.recipients[1] = "subrelay-bounce+ci@example.org";
  SimulatedBounce b;
  b.index = 1;
  b.reply = "550 5.1.1 simulated hard bounce";
  b.suppress = suppression("webshop", "subrelay-bounce+ci@example.org", t0);
  m.simulatedBounces.push_back(b);
  REQUIRE(store->insertBatch({m})[0].ok());
  auto info = store->show(m.id).value();
  REQUIRE(info.recipients.size() == 2);
  CHECK(info.recipients[0].state == RecipientState::Captured);
  CHECK(info.recipients[1].state == RecipientState::Failed);
  CHECK(info.recipients[1].lastError == "550 5.1.1 simulated hard bounce");
  CHECK(info.recipients[1].lastStatus.str() == "5.1.1");
  REQUIRE(info.attempts.size() == 1);
  CHECK(info.attempts[0].code == 550);
  CHECK(store->leaseDue(t0 + 10, 10)->empty());  // never delivered
  auto dsns = store->pendingDsns(10).value();
  REQUIRE(dsns.size() == 1);
  REQUIRE(dsns[0].message.recipients.size() == 1);
  CHECK(dsns[0].message.recipients[0].index == 1);
  CHECK(store->listSuppressions("webshop")->size() == 1);
}

TEST_CASE("suppressions: the pruner deletes expired rows, then the oldest beyond the bound, in small batches") {
  TempDir dir;
  auto store = mustOpen(dir.file("p.db"));
  for (int i = 0; i < 6; ++i)
    REQUIRE(store->upsertSuppression(suppression("a", "u" + std::to_string(i) + "@x.org", 1000 + i,
                                                 i < 2 ? 1500 : 0))
                .ok());
  CHECK(store->pruneSuppressions(1400, 100, 10).value() == 0);
  CHECK(store->pruneSuppressions(1500, 100, 1).value() == 1);   // one per batch
  CHECK(store->pruneSuppressions(1500, 100, 10).value() == 1);
  CHECK(store->listSuppressions("a")->size() == 4);
  // Bound of 3: the oldest (u2) goes.
  CHECK(store->pruneSuppressions(1500, 3, 10).value() == 1);
  auto rest = store->listSuppressions("a").value();
  REQUIRE(rest.size() == 3);
  CHECK(rest[0].address == "u3@x.org");
  CHECK(store->pruneSuppressions(1500, 3, 10).value() == 0);
}

TEST_CASE("suppressions: the retention pruner removes expired rows on its clock") {
  TempDir dir;
  auto store = mustOpen(dir.file("r.db"));
  subrelay::util::FakeClock clock;
  const int64_t now = subrelay::util::unixSeconds(clock.wallNow());
  REQUIRE(store->upsertSuppression(suppression("a", "soon@x.org", now, now + 30)).ok());
  REQUIRE(store->upsertSuppression(suppression("a", "never@x.org", now)).ok());
  Pruner pruner(*store, clock);
  pruner.run(RetentionPolicy{});
  CHECK(store->listSuppressions("a")->size() == 2);
  clock.advance(std::chrono::seconds(30));
  pruner.run(RetentionPolicy{});
  auto rest = store->listSuppressions("a").value();
  REQUIRE(rest.size() == 1);
  CHECK(rest[0].address == "never@x.org");
}
