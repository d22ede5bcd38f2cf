// The webhook outbox (schema 12): events are rows written in the transaction of the state
// change they report, so an event exists exactly when its change was committed: a crash
// loses neither, and the SMTP path only pays for an INSERT (no HTTP). webhook::Dispatcher
// claims, POSTs and deletes them.
#include <sqlite3.h>

#include <ctime>

#include "queue/sqlite_detail.h"
#include "queue/sqlite_store.h"
#include "util/cptr.h"
#include "webhook/event.h"

namespace subrelay::queue {

namespace {

using detail::bindText;
using detail::columnText;
using detail::run;
using detail::Stmt;
using detail::Use;

enum Which {
  kInsert,
  kRecipientInfo,
  kBounceCandidates,
  kPendingBounces,
  kClaimRows,
  kClaimOne,
  kDelete,
  kReschedule,
  kClearClaims,
  kTrim,
  kBacklog,
  kNextDue,
  kBegin,
  kCommit,
  kRollback,
  kCount
};

constexpr const char* kSql[kCount] = {
    "INSERT INTO webhook_events (account, event_id, type, body, next_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
    "SELECT m.account, m.mail_from, m.is_dsn, r.address, r.attempts FROM recipients r "
    "JOIN messages m ON m.id = r.message_id WHERE r.message_id = ?1 AND r.idx = ?2",
    // The recipients an operator's bounce changes now (kBounceOne's WHERE).
    "SELECT idx FROM recipients WHERE message_id = ?1 AND state IN ('queued', 'deferred') AND lease_until = 0",
    // The recipients kClearBounces fails at start-up.
    "SELECT message_id, idx FROM recipients WHERE lease_until != 0 AND pending_request = 2 "
    "AND state IN ('queued', 'deferred')",
    "SELECT seq, account, event_id, type, body, attempts, next_at, created_at, last_error FROM webhook_events "
    "WHERE next_at <= ?1 AND claimed_until <= ?1 ORDER BY next_at, seq LIMIT ?2",
    "UPDATE webhook_events SET claimed_until = ?2 WHERE seq = ?1",
    "DELETE FROM webhook_events WHERE seq = ?1",
    "UPDATE webhook_events SET attempts = ?2, next_at = ?3, last_error = ?4, claimed_until = 0 WHERE seq = ?1",
    "UPDATE webhook_events SET claimed_until = 0 WHERE claimed_until != 0",
    "DELETE FROM webhook_events WHERE seq IN (SELECT seq FROM webhook_events WHERE account = ?1 ORDER BY seq "
    "LIMIT max(0, (SELECT count(*) FROM webhook_events WHERE account = ?1) - ?2))",
    "SELECT account, count(*), min(created_at), sum(attempts > 0), "
    "(SELECT w2.last_error FROM webhook_events w2 WHERE w2.account = w.account AND w2.attempts > 0 "
    "ORDER BY w2.seq DESC LIMIT 1) FROM webhook_events w GROUP BY account ORDER BY account",
    "SELECT min(max(next_at, claimed_until)) FROM webhook_events",
    "BEGIN IMMEDIATE",
    "COMMIT",
    "ROLLBACK",
};

}  // namespace

// Statements prepared on first use: a connection that never touches the outbox (a
// read-only `queue list`) prepares nothing.
struct SqliteStore::WebhookOutbox {
  Stmt stmts[kCount];
};

namespace {
void destroyOutbox(SqliteStore::WebhookOutbox* o) { delete o; }

// The outbox's own write transactions (public calls) use detail::Txn on its cached statements.
using HookTxn = detail::Txn;
}  // namespace

sqlite3_stmt* SqliteStore::webhookStmt(int which) {
  if (!hook_) hook_ = std::unique_ptr<WebhookOutbox, void (*)(WebhookOutbox*)>(new WebhookOutbox, &destroyOutbox);
  Stmt& s = hook_->stmts[which];
  if (!s) {
    sqlite3_stmt* st = nullptr;
    if (sqlite3_prepare_v3(db_, kSql[which], -1, SQLITE_PREPARE_PERSISTENT, &st, nullptr) != SQLITE_OK) return nullptr;
    s.reset(st);
  }
  return s.get();
}

void SqliteStore::setWebhookEvents(std::map<std::string, std::set<std::string>> events) {
  std::lock_guard lock(mu_);
  webhookEvents_ = std::move(events);
}

bool SqliteStore::webhookWants(const std::string& account, const char* type) const {
  if (webhookEvents_.empty()) return false;
  auto it = webhookEvents_.find(account);
  return it != webhookEvents_.end() && it->second.count(type) != 0;
}

std::string SqliteStore::insertWebhookRowLocked(const std::string& account, const std::string& eventId,
                                                const std::string& type, const std::string& body, int64_t at) {
  sqlite3_stmt* st = webhookStmt(kInsert);
  if (!st) return std::string("cannot prepare the webhook outbox: ") + sqlite3_errmsg(db_);
  Use u(st);
  bindText(st, 1, account);
  bindText(st, 2, eventId);
  bindText(st, 3, type);
  bindText(st, 4, body);
  sqlite3_bind_int64(st, 5, at);
  if (sqlite3_step(st) != SQLITE_DONE) return std::string("cannot queue a webhook event: ") + sqlite3_errmsg(db_);
  return {};
}

std::string SqliteStore::enqueueAcceptedLocked(const NewMessage& m) {
  // Our own DSNs are not the account's mail: no events (nor for their delivery).
  if (m.isDsn || !webhookWants(m.account, "accepted")) return {};
  for (const auto& rcpt : m.recipients) {
    webhook::Event e;
    e.id = webhook::newEventId();
    e.type = webhook::EventType::Accepted;
    e.account = m.account;
    e.messageId = m.id;
    e.sender = m.mailFrom;
    e.recipient = rcpt;
    e.at = m.receivedAt;
    if (auto why = insertWebhookRowLocked(m.account, e.id, "accepted", webhook::eventJson(e), m.receivedAt); !why.empty())
      return why;
  }
  return {};
}

std::string SqliteStore::enqueueAttemptLocked(const AttemptRecord& rec) {
  if (webhookEvents_.empty()) return {};
  webhook::EventType type;
  switch (rec.newState) {
    case RecipientState::Delivered: type = webhook::EventType::Delivered; break;
    case RecipientState::Deferred: type = webhook::EventType::Deferred; break;
    case RecipientState::Failed:
      // The scheduler records expiry as a failure with status 4.4.7 (RFC 3463: delivery
      // time expired); a permanent failure carries a 5.x.x status.
      type = rec.attempt.result == "expired" || rec.lastStatus.klass == 4 ? webhook::EventType::Expired
                                                                          : webhook::EventType::Bounced;
      break;
    default: return {};
  }
  const std::string typeName(webhook::eventName(type));
  sqlite3_stmt* st = webhookStmt(kRecipientInfo);
  if (!st) return std::string("cannot prepare the webhook outbox: ") + sqlite3_errmsg(db_);
  webhook::Event e;
  {
    Use u(st);
    bindText(st, 1, rec.messageId);
    sqlite3_bind_int64(st, 2, rec.index);
    const int rc = sqlite3_step(st);
    if (rc == SQLITE_DONE) return {};  // dropped meanwhile
    if (rc != SQLITE_ROW) return std::string("cannot read recipient for a webhook event: ") + sqlite3_errmsg(db_);
    e.account = columnText(st, 0);
    if (sqlite3_column_int(st, 2) != 0 || !webhookWants(e.account, typeName.c_str())) return {};
    e.sender = columnText(st, 1);
    e.recipient = columnText(st, 3);
    e.attempt = sqlite3_column_int(st, 4);
  }
  e.id = webhook::newEventId();
  e.type = type;
  e.messageId = rec.messageId;
  e.at = rec.attempt.at;
  e.smtpCode = rec.attempt.code;
  if (rec.lastStatus.klass != 0)
    e.enhancedCode = rec.lastStatus.str();
  else if (rec.attempt.status.klass != 0)
    e.enhancedCode = rec.attempt.status.str();
  e.reply = rec.attempt.reply;
  e.remoteHost = rec.attempt.mx;
  e.reason = rec.lastError;
  return insertWebhookRowLocked(e.account, e.id, typeName, webhook::eventJson(e), e.at);
}

std::string SqliteStore::enqueueOperatorBounceLocked(const std::string& messageId, int64_t index, int64_t at) {
  if (webhookEvents_.empty()) return {};
  sqlite3_stmt* st = webhookStmt(kRecipientInfo);
  if (!st) return std::string("cannot prepare the webhook outbox: ") + sqlite3_errmsg(db_);
  webhook::Event e;
  {
    Use u(st);
    bindText(st, 1, messageId);
    sqlite3_bind_int64(st, 2, index);
    const int rc = sqlite3_step(st);
    if (rc == SQLITE_DONE) return {};
    if (rc != SQLITE_ROW) return std::string("cannot read recipient for a webhook event: ") + sqlite3_errmsg(db_);
    e.account = columnText(st, 0);
    if (sqlite3_column_int(st, 2) != 0 || !webhookWants(e.account, "bounced")) return {};
    e.sender = columnText(st, 1);
    e.recipient = columnText(st, 3);
  }
  e.id = webhook::newEventId();
  e.type = webhook::EventType::Bounced;
  e.messageId = messageId;
  e.at = at;
  e.enhancedCode = "5.0.0";
  e.reason = "bounced by operator";
  return insertWebhookRowLocked(e.account, e.id, "bounced", webhook::eventJson(e), at);
}

util::Result<std::vector<int64_t>> SqliteStore::operatorBounceCandidatesLocked(const std::string& messageId) {
  std::vector<int64_t> out;
  if (webhookEvents_.empty()) return out;
  sqlite3_stmt* st = webhookStmt(kBounceCandidates);
  if (!st) return dbError("cannot prepare bounce of " + messageId);
  Use u(st);
  bindText(st, 1, messageId);
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) out.push_back(sqlite3_column_int64(st, 0));
  if (rc != SQLITE_DONE) return dbError("cannot bounce " + messageId);
  return out;
}

util::Result<std::vector<std::pair<std::string, int64_t>>> SqliteStore::pendingBouncesLocked() {
  std::vector<std::pair<std::string, int64_t>> out;
  if (webhookEvents_.empty()) return out;
  sqlite3_stmt* st = webhookStmt(kPendingBounces);
  if (!st) return dbError("cannot prepare clearing delivery leases");
  Use u(st);
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) out.emplace_back(columnText(st, 0), sqlite3_column_int64(st, 1));
  if (rc != SQLITE_DONE) return dbError("cannot clear delivery leases");
  return out;
}

std::string SqliteStore::enqueueSuppressedLocked(const std::string& account, const std::string& messageId,
                                                 const std::string& sender, const std::string& recipient,
                                                 const std::string& reason, int64_t at) {
  if (!webhookWants(account, "suppressed")) return {};
  webhook::Event e;
  e.id = webhook::newEventId();
  e.type = webhook::EventType::Suppressed;
  e.account = account;
  e.messageId = messageId;
  e.sender = sender;
  e.recipient = recipient;
  e.at = at;
  e.reason = reason;
  return insertWebhookRowLocked(account, e.id, "suppressed", webhook::eventJson(e), at);
}

std::string SqliteStore::enqueueSimulatedBouncesLocked(const NewMessage& m) {
  if (webhookEvents_.empty()) return {};
  for (const SimulatedBounce& b : m.simulatedBounces) {
    // The capture-mode bounce reads like one from a receiving server: "bounced" with its
    // reply, then "suppressed" when the address joined the account's list.
    AttemptRecord rec;
    rec.messageId = m.id;
    rec.index = b.index;
    rec.newState = RecipientState::Failed;
    rec.lastStatus = b.status;
    rec.lastError = b.reply;
    rec.attempt.index = b.index;
    rec.attempt.at = m.receivedAt;
    rec.attempt.code = b.code;
    rec.attempt.reply = b.reply;
    rec.attempt.status = b.status;
    rec.attempt.result = "failed";
    if (std::string why = enqueueAttemptLocked(rec); !why.empty()) return why;
    if (b.suppress) {
      if (std::string why = enqueueBounceSuppressedLocked(*b.suppress, m.id, b.index); !why.empty()) return why;
    }
  }
  return {};
}

std::string SqliteStore::enqueueBounceSuppressedLocked(const SuppressionRow& row, const std::string& messageId,
                                                       int64_t index) {
  if (!webhookWants(row.account, "suppressed")) return {};
  sqlite3_stmt* st = webhookStmt(kRecipientInfo);
  if (!st) return std::string("cannot prepare the webhook outbox: ") + sqlite3_errmsg(db_);
  std::string sender;
  {
    Use u(st);
    bindText(st, 1, messageId);
    sqlite3_bind_int64(st, 2, index);
    const int rc = sqlite3_step(st);
    if (rc == SQLITE_DONE) return {};  // dropped meanwhile
    if (rc != SQLITE_ROW) return std::string("cannot read recipient for a webhook event: ") + sqlite3_errmsg(db_);
    if (sqlite3_column_int(st, 2) != 0) return {};  // our own DSN: no events
    sender = columnText(st, 1);
  }
  return enqueueSuppressedLocked(row.account, messageId, sender, row.address, row.reason, row.createdAt);
}

util::Result<void> SqliteStore::enqueueWebhookEvent(const std::string& account, const std::string& eventId,
                                                    const std::string& type, const std::string& body, int64_t at) {
  std::lock_guard lock(mu_);
  if (readOnly_) return util::makeError("queue database is open read-only");
  HookTxn txn(db_, webhookStmt(kBegin), webhookStmt(kCommit), webhookStmt(kRollback));
  if (!txn.open()) return dbError("cannot begin webhook transaction");
  if (auto why = insertWebhookRowLocked(account, eventId, type, body, at); !why.empty()) return util::makeError(why);
  if (!txn.commit()) return dbError("cannot commit webhook event");
  return {};
}

util::Result<std::vector<WebhookEventRow>> SqliteStore::claimWebhookEvents(int64_t now, size_t max, int64_t claimUntil,
                                                                        const std::vector<WebhookSettle>& settle) {
  std::lock_guard lock(mu_);
  if (readOnly_) return util::makeError("queue database is open read-only");
  std::vector<WebhookEventRow> out;
  if (max == 0 && settle.empty()) return out;
  if (settle.empty()) {
    // Nothing due (the usual case between bursts): no write lock taken.
    sqlite3_stmt* st = webhookStmt(kClaimRows);
    if (!st) return dbError("cannot prepare webhook claim");
    Use u(st);
    sqlite3_bind_int64(st, 1, now);
    sqlite3_bind_int64(st, 2, 1);
    const int rc = sqlite3_step(st);
    if (rc == SQLITE_DONE) return out;
    if (rc != SQLITE_ROW) return dbError("cannot read webhook events");
  }
  HookTxn txn(db_, webhookStmt(kBegin), webhookStmt(kCommit), webhookStmt(kRollback));
  if (!txn.open()) return dbError("cannot begin webhook claim");
  for (const WebhookSettle& d : settle) {
    sqlite3_stmt* st = webhookStmt(d.remove ? kDelete : kReschedule);
    if (!st) return dbError("cannot prepare webhook settle");
    Use u(st);
    sqlite3_bind_int64(st, 1, d.seq);
    if (!d.remove) {
      sqlite3_bind_int(st, 2, d.attempts);
      sqlite3_bind_int64(st, 3, d.nextAt);
      bindText(st, 4, d.error);
    }
    if (sqlite3_step(st) != SQLITE_DONE) return dbError("cannot settle webhook event");
  }
  if (max > 0) {
    sqlite3_stmt* st = webhookStmt(kClaimRows);
    if (!st) return dbError("cannot prepare webhook claim");
    Use u(st);
    sqlite3_bind_int64(st, 1, now);
    sqlite3_bind_int64(st, 2, static_cast<sqlite3_int64>(max));
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
      WebhookEventRow r;
      r.seq = sqlite3_column_int64(st, 0);
      r.account = columnText(st, 1);
      r.eventId = columnText(st, 2);
      r.type = columnText(st, 3);
      r.body = columnText(st, 4);
      r.attempts = sqlite3_column_int(st, 5);
      r.nextAt = sqlite3_column_int64(st, 6);
      r.createdAt = sqlite3_column_int64(st, 7);
      r.lastError = columnText(st, 8);
      out.push_back(std::move(r));
    }
    if (rc != SQLITE_DONE) return dbError("cannot read webhook events");
  }
  sqlite3_stmt* claim = webhookStmt(kClaimOne);
  if (!claim) return dbError("cannot prepare webhook claim");
  for (const auto& r : out) {
    Use u(claim);
    sqlite3_bind_int64(claim, 1, r.seq);
    sqlite3_bind_int64(claim, 2, claimUntil);
    if (sqlite3_step(claim) != SQLITE_DONE) return dbError("cannot claim webhook event");
  }
  if (!txn.commit()) return dbError("cannot commit webhook claim");
  return out;
}

util::Result<void> SqliteStore::deleteWebhookEvent(int64_t seq) {
  std::lock_guard lock(mu_);
  if (readOnly_) return util::makeError("queue database is open read-only");
  sqlite3_stmt* st = webhookStmt(kDelete);
  if (!st) return dbError("cannot prepare webhook delete");
  Use u(st);
  sqlite3_bind_int64(st, 1, seq);
  if (sqlite3_step(st) != SQLITE_DONE) return dbError("cannot delete webhook event");
  return {};
}

util::Result<void> SqliteStore::rescheduleWebhookEvent(int64_t seq, int attempts, int64_t nextAt,
                                                       const std::string& error) {
  std::lock_guard lock(mu_);
  if (readOnly_) return util::makeError("queue database is open read-only");
  sqlite3_stmt* st = webhookStmt(kReschedule);
  if (!st) return dbError("cannot prepare webhook reschedule");
  Use u(st);
  sqlite3_bind_int64(st, 1, seq);
  sqlite3_bind_int(st, 2, attempts);
  sqlite3_bind_int64(st, 3, nextAt);
  bindText(st, 4, error);
  if (sqlite3_step(st) != SQLITE_DONE) return dbError("cannot reschedule webhook event");
  return {};
}

util::Result<void> SqliteStore::clearWebhookClaims() {
  std::lock_guard lock(mu_);
  if (readOnly_) return util::makeError("queue database is open read-only");
  sqlite3_stmt* st = webhookStmt(kClearClaims);
  if (!st || run(st) != SQLITE_DONE) return dbError("cannot clear webhook claims");
  return {};
}

util::Result<int64_t> SqliteStore::trimWebhookBacklog(const std::string& account, uint64_t keep) {
  std::lock_guard lock(mu_);
  if (readOnly_) return util::makeError("queue database is open read-only");
  sqlite3_stmt* st = webhookStmt(kTrim);
  if (!st) return dbError("cannot prepare webhook trim");
  Use u(st);
  bindText(st, 1, account);
  sqlite3_bind_int64(st, 2, static_cast<sqlite3_int64>(keep));
  if (sqlite3_step(st) != SQLITE_DONE) return dbError("cannot trim webhook backlog");
  return static_cast<int64_t>(sqlite3_changes(db_));
}

util::Result<std::vector<WebhookBacklog>> SqliteStore::webhookBacklog() {
  std::lock_guard lock(mu_);
  std::vector<WebhookBacklog> out;
  if (version_ < 12) return out;
  sqlite3_stmt* st = webhookStmt(kBacklog);
  if (!st) return dbError("cannot prepare webhook backlog");
  Use u(st);
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    WebhookBacklog b;
    b.account = columnText(st, 0);
    b.events = sqlite3_column_int64(st, 1);
    b.oldestCreatedAt = sqlite3_column_int64(st, 2);
    b.failing = sqlite3_column_int64(st, 3);
    b.lastError = columnText(st, 4);
    out.push_back(std::move(b));
  }
  if (rc != SQLITE_DONE) return dbError("cannot read webhook backlog");
  return out;
}

util::Result<std::optional<int64_t>> SqliteStore::nextWebhookDue() {
  std::lock_guard lock(mu_);
  sqlite3_stmt* st = webhookStmt(kNextDue);
  if (!st) return dbError("cannot prepare webhook due");
  Use u(st);
  if (sqlite3_step(st) != SQLITE_ROW) return dbError("cannot read webhook due");
  if (sqlite3_column_type(st, 0) == SQLITE_NULL) return std::optional<int64_t>{};
  return std::optional<int64_t>{sqlite3_column_int64(st, 0)};
}

}  // namespace subrelay::queue
