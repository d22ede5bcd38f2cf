// SqliteStore: the queue on SQLite. Durability comes from WAL + synchronous=FULL: COMMIT
// returns after the WAL is fsynced, which is what README.md's "250 only after commit" needs.
// Schema and migrations live in schema.cpp; the writer thread in group_commit.cpp.
#include "queue/sqlite_store.h"
#include "queue/sqlite_detail.h"
#include "util/clock.h"

#include <cerrno>

#include <sqlite3.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <random>

#include "queue/schema.h"
#include "util/cptr.h"
#include "util/log.h"
#include "util/time_fmt.h"

namespace subrelay::queue {

namespace {

using detail::bindText;
using detail::columnText;
using detail::run;
using detail::Stmt;
using detail::Txn;
using detail::Use;
using Db = util::CPtr<sqlite3, sqlite3_close_v2>;

// How long a writer waits for another connection's lock (a second `serve`, a migration,
// a checkpoint) before the call fails. Long enough to ride out a checkpoint; short enough
// that the SMTP client gets a 451 rather than a timeout.
constexpr int kBusyTimeoutMs = 5000;

}  // namespace

struct SqliteStore::Statements {
  Stmt begin, beginRead, commit, rollback;
  Stmt savepoint, release, rollbackTo;
  Stmt insertMessage, insertRecipient;
  Stmt findIdempotencyKey, saveIdempotencyKey, pruneIdempotencyKeys;
  Stmt listAll, showOne, showAttempts, content, count, exists;
  // delivery
  Stmt dueRows, lease, recordRecipient, insertAttempt, recipientRequest, releaseBounce, releaseLease, nextDue;
  Stmt dsnRows, clearDsn, delayRows, setDelayNotified, messageSender;
  // operators
  Stmt retryOne, retryAll, retryOneLeased, retryAllLeased, dropOne, bounceOne, bounceOneLeased;
  // account policy
  Stmt upsertWindow, loadWindows, addMeter, loadMeters;
  // operations
  Stmt queueStats, acceptedSince, noteDrop, operatorEvents, deleteOperatorEvents;
  // MTA-STS policy cache
  Stmt saveSts, touchSts, loadSts, loadAllSts, pruneSts;
  // TLS reporting
  Stmt addTlsRpt, tlsRptPending, tlsRptRows, tlsRptDone, pruneTlsRptCounts, pruneTlsRptReports;
  // suppression lists
  Stmt upsertSuppression, removeSuppression, listSuppressions, liveSuppressions, suppressionCounts,
      suppressionChanges, simulateBounce;
  // retention
  Stmt markFinished, markCaptured, pruneCaptured, pruneHistory, unprunedRows, emptyContent, setPruned;
};

namespace {

// One SELECT for messages joined with their recipients: a single statement reads one
// snapshot, so a list never shows a message with half of an update applied.
#define SUBRELAY_MESSAGE_COLUMNS                                                         \
  "SELECT m.id, m.account, m.mail_from, m.size, m.received_at, m.captured, m.smtputf8, " \
  "m.client_address, m.helo, m.tls_version, m.tls_cipher, "                              \
  "r.idx, r.address, r.state, r.attempts, r.next_attempt, r.last_error, r.updated_at, "  \
  "m.is_dsn, m.eight_bit, r.lease_until, r.dsn_pending, r.last_code, r.last_status, r.pending_request, f.finished_at, f.content_pruned, " \
  "m.tls_required, m.dsn_ret, m.dsn_envid, r.dsn_notify, r.dsn_orcpt "
#define SUBRELAY_FROM_ALL \
  "FROM messages m LEFT JOIN finished f ON f.message_id = m.id LEFT JOIN recipients r ON r.message_id = m.id "
#define SUBRELAY_FROM_RCPT \
  "FROM messages m LEFT JOIN finished f ON f.message_id = m.id JOIN recipients r ON r.message_id = m.id "

constexpr const char* kListAll = SUBRELAY_MESSAGE_COLUMNS SUBRELAY_FROM_ALL "ORDER BY m.received_at, m.id, r.idx";
constexpr const char* kShowOne = SUBRELAY_MESSAGE_COLUMNS SUBRELAY_FROM_ALL "WHERE m.id = ?1 ORDER BY r.idx";
constexpr const char* kShowAttempts =
    "SELECT idx, at, mx, tls_version, tls_cipher, code, reply, result, status, tls_policy FROM attempts "
    "WHERE message_id = ?1 ORDER BY at, rowid";

// The states a scheduler may still act on. Captured recipients never get one of them, so
// the captured check on messages is belt and braces.
#define SUBRELAY_DELIVERABLE "r.state IN ('queued', 'deferred') AND m.captured = 0 "

// Rows come oldest message first; leaseDue() stops reading after maxMessages messages,
// so the statement never materialises the whole queue.
constexpr const char* kDueRows = SUBRELAY_MESSAGE_COLUMNS SUBRELAY_FROM_RCPT
    "WHERE " SUBRELAY_DELIVERABLE "AND r.next_attempt <= ?1 AND r.lease_until <= ?1 "
    "ORDER BY m.received_at, m.id, r.idx";
constexpr const char* kLease = "UPDATE recipients SET lease_until = ?3 WHERE message_id = ?1 AND idx = ?2";

// The outcome of an attempt is applied only to a recipient that is still deliverable: an
// operator's bounce while the attempt ran wins over a deferral or a failure. A delivery
// wins over everything (the mail did arrive), and cancels a DSN not yet queued.
// A failure asks for a DSN unless the message is itself a DSN or has the null sender
// (RFC 3464 section 2, RFC 5321 section 6.1: never bounce a bounce); so does a delivery
// that owes a success DSN (?9, RFC 3461 NOTIFY=SUCCESS). Whether the sender wants the
// notice (NOTIFY) is decided when the DSN is built (delivery/dsn.h).
constexpr const char* kRecordRecipient =
    "UPDATE recipients SET state = ?3, attempts = attempts + 1, next_attempt = ?4, last_error = ?5, "
    "updated_at = ?6, lease_until = 0, pending_request = 0, last_code = ?7, last_status = ?8, dsn_pending = CASE "
    "WHEN ?3 = 'failed' THEN (SELECT is_dsn = 0 AND mail_from NOT IN ('', '<>') FROM messages WHERE id = ?1) "
    "WHEN ?3 = 'delivered' THEN ?9 AND (SELECT is_dsn = 0 AND mail_from NOT IN ('', '<>') FROM messages WHERE id = ?1) "
    "ELSE dsn_pending END "
    "WHERE message_id = ?1 AND idx = ?2 AND (state IN ('queued', 'deferred') OR ?3 = 'delivered')";
constexpr const char* kInsertAttempt =
    "INSERT INTO attempts (message_id, idx, at, mx, tls_version, tls_cipher, code, reply, result, status, tls_policy) "
    "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";
// What an operator asked for while the recipient was in flight (OperatorRequest).
constexpr const char* kRecipientRequest =
    "SELECT pending_request FROM recipients WHERE message_id = ?1 AND idx = ?2";
// Releasing a lease applies a waiting operator request: a bounce now, a retry as "due now".
#define SUBRELAY_OPERATOR_BOUNCE                                                                   \
  "state = 'failed', last_error = 'bounced by operator', last_code = 0, last_status = '5.0.0', " \
  "next_attempt = 0, lease_until = 0, pending_request = 0, updated_at = ?3, dsn_pending = "       \
  "(SELECT is_dsn = 0 AND mail_from NOT IN ('', '<>') FROM messages WHERE id = message_id) "
constexpr const char* kReleaseBounce = "UPDATE recipients SET " SUBRELAY_OPERATOR_BOUNCE
    "WHERE message_id = ?1 AND idx = ?2 AND pending_request = 2 AND state IN ('queued', 'deferred')";
constexpr const char* kReleaseLease =
    "UPDATE recipients SET lease_until = 0, pending_request = 0, "
    "next_attempt = CASE WHEN pending_request = 1 THEN 0 ELSE next_attempt END "
    "WHERE message_id = ?1 AND idx = ?2";
constexpr const char* kClearBounces = "UPDATE recipients SET " SUBRELAY_OPERATOR_BOUNCE
    "WHERE lease_until != 0 AND pending_request = 2 AND state IN ('queued', 'deferred')";
constexpr const char* kClearLeases =
    "UPDATE recipients SET lease_until = 0, pending_request = 0, "
    "next_attempt = CASE WHEN pending_request = 1 THEN 0 ELSE next_attempt END WHERE lease_until != 0";
constexpr const char* kNextDue =
    "SELECT min(max(r.next_attempt, r.lease_until)) " SUBRELAY_FROM_RCPT "WHERE " SUBRELAY_DELIVERABLE;

constexpr const char* kDsnRows = SUBRELAY_MESSAGE_COLUMNS SUBRELAY_FROM_RCPT
    "WHERE r.dsn_pending = 1 ORDER BY m.received_at, m.id, r.idx";
constexpr const char* kClearDsn =
    "UPDATE recipients SET dsn_pending = 0 WHERE message_id = ?1 AND idx = ?2";
constexpr const char* kDelayRows = SUBRELAY_MESSAGE_COLUMNS SUBRELAY_FROM_RCPT
    "WHERE r.state = 'deferred' AND r.delay_notified = 0 AND m.is_dsn = 0 AND m.mail_from NOT IN ('', '<>') "
    "AND m.received_at < ?1 ORDER BY m.received_at, m.id, r.idx";
constexpr const char* kSetDelayNotified =
    "UPDATE recipients SET delay_notified = 1 WHERE message_id = ?1 AND idx = ?2";
constexpr const char* kMessageSender = "SELECT mail_from, is_dsn FROM messages WHERE id = ?1";

// A recipient in flight (leased) is not made due again, which would start a second
// attempt beside the running one: it gets a request applied when its attempt ends.
constexpr const char* kRetryOne =
    "UPDATE recipients SET next_attempt = 0 "
    "WHERE message_id = ?1 AND state IN ('queued', 'deferred') AND lease_until = 0";
constexpr const char* kRetryAll =
    "UPDATE recipients SET next_attempt = 0 WHERE state IN ('queued', 'deferred') AND lease_until = 0";
constexpr const char* kRetryOneLeased =
    "UPDATE recipients SET pending_request = 1 "
    "WHERE message_id = ?1 AND state IN ('queued', 'deferred') AND lease_until != 0 AND pending_request = 0";
constexpr const char* kRetryAllLeased =
    "UPDATE recipients SET pending_request = 1 "
    "WHERE state IN ('queued', 'deferred') AND lease_until != 0 AND pending_request = 0";
// Recipients and attempts go with it: ON DELETE CASCADE (foreign_keys is on).
constexpr const char* kDropOne = "DELETE FROM messages WHERE id = ?1";
constexpr const char* kNoteDrop =
    "INSERT INTO operator_events (at, message_id, account, event, recipients) "
    "SELECT ?2, id, account, 'dropped', (SELECT count(*) FROM recipients WHERE message_id = ?1) "
    "FROM messages WHERE id = ?1";
constexpr const char* kOperatorEvents =
    "SELECT seq, at, message_id, account, event, recipients FROM operator_events ORDER BY seq LIMIT ?1";
constexpr const char* kDeleteOperatorEvents = "DELETE FROM operator_events WHERE seq <= ?1";

#define SUBRELAY_STS_COLUMNS \
  "domain, policy_id, mode, max_age, mx, policy, fetched_at, expires_at, checked_at"
constexpr const char* kSaveSts = "INSERT OR REPLACE INTO sts_policies (" SUBRELAY_STS_COLUMNS
    ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";
constexpr const char* kTouchSts = "UPDATE sts_policies SET checked_at = ?2 WHERE domain = ?1";
constexpr const char* kLoadSts = "SELECT " SUBRELAY_STS_COLUMNS " FROM sts_policies WHERE domain = ?1";
constexpr const char* kLoadAllSts = "SELECT " SUBRELAY_STS_COLUMNS " FROM sts_policies ORDER BY domain";
constexpr const char* kPruneSts = "DELETE FROM sts_policies WHERE expires_at <= ?1";

#define SUBRELAY_TLSRPT_COLUMNS \
  "day, domain, policy_type, policy, mx_host, result, receiving_mx, receiving_ip, reason, sessions"
constexpr const char* kAddTlsRpt = "INSERT INTO tlsrpt_counts (" SUBRELAY_TLSRPT_COLUMNS
                                   ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
                                   " ON CONFLICT DO UPDATE SET sessions = sessions + excluded.sessions";
constexpr const char* kTlsRptPending =
    "SELECT DISTINCT c.day, c.domain FROM tlsrpt_counts c WHERE c.day < ?1 AND NOT EXISTS"
    " (SELECT 1 FROM tlsrpt_reports r WHERE r.day = c.day AND r.domain = c.domain)"
    " ORDER BY c.day, c.domain LIMIT ?2";
constexpr const char* kTlsRptRows = "SELECT " SUBRELAY_TLSRPT_COLUMNS
                                    " FROM tlsrpt_counts WHERE day = ?1 AND (?2 = '' OR domain = ?2)"
                                    " ORDER BY domain, policy_type, policy, mx_host, result, receiving_mx";
constexpr const char* kTlsRptDone =
    "INSERT INTO tlsrpt_reports (day, domain, at, outcome, message_id) VALUES (?1, ?2, ?3, ?4, ?5)"
    " ON CONFLICT DO NOTHING";
constexpr const char* kPruneTlsRptCounts = "DELETE FROM tlsrpt_counts WHERE day < ?1";
constexpr const char* kPruneTlsRptReports = "DELETE FROM tlsrpt_reports WHERE day < ?1";
constexpr const char* kBounceOne =
    "UPDATE recipients SET state = 'failed', last_error = 'bounced by operator', last_code = 0, "
    "last_status = '5.0.0', next_attempt = 0, lease_until = 0, updated_at = ?2, dsn_pending = "
    "(SELECT is_dsn = 0 AND mail_from NOT IN ('', '<>') FROM messages WHERE id = ?1) "
    "WHERE message_id = ?1 AND state IN ('queued', 'deferred') AND lease_until = 0";
constexpr const char* kBounceOneLeased =
    "UPDATE recipients SET pending_request = 2 "
    "WHERE message_id = ?1 AND state IN ('queued', 'deferred') AND lease_until != 0 AND pending_request != 2";

constexpr const char* kUpsertWindow =
    "INSERT INTO rate_windows (username, rule, window_start, count) VALUES (?1, ?2, ?3, ?4) "
    "ON CONFLICT (username, rule) DO UPDATE SET window_start = excluded.window_start, count = excluded.count";
constexpr const char* kLoadWindows =
    "SELECT username, rule, window_start, count FROM rate_windows ORDER BY username, rule";
constexpr const char* kAddMeter =
    "INSERT INTO meters (username, accepted, refused_by_limit, recipients, bytes, auth_failures, updated_at) "
    "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (username) DO UPDATE SET "
    "accepted = accepted + excluded.accepted, refused_by_limit = refused_by_limit + excluded.refused_by_limit, "
    "recipients = recipients + excluded.recipients, bytes = bytes + excluded.bytes, "
    "auth_failures = auth_failures + excluded.auth_failures, updated_at = excluded.updated_at";
// Operations (metrics and `subrelay status`): recipients still to deliver, by state and
// whether an attempt is in flight, with the oldest message among them. Reads the
// recipients_due index range for the two waiting states only, never the history.
constexpr const char* kQueueStats =
    "SELECT r.state, r.lease_until != 0, count(*), min(m.received_at) "
    "FROM recipients r JOIN messages m ON m.id = r.message_id "
    "WHERE r.state IN ('queued', 'deferred') AND m.captured = 0 GROUP BY 1, 2";
// Messages received since a time, by account (the messages_received index range).
constexpr const char* kAcceptedSince =
    "SELECT account, count(*), sum(captured) FROM messages WHERE received_at >= ?1 GROUP BY account";
constexpr const char* kLoadMeters =
    "SELECT username, accepted, refused_by_limit, recipients, bytes, auth_failures, updated_at "
    "FROM meters ORDER BY username";
#undef SUBRELAY_OPERATOR_BOUNCE
// Retention. A message is finished once no recipient waits (queued, deferred) or has a
// DSN pending; it is then final: no operator action or attempt result makes it wait again.
// finished_at is the latest recipient update, which is when the last one became final
// (completeDsn changes no updated_at: the failure is when it finished). A message dropped
// meanwhile gets no row. Captured messages get theirs when they are stored.
constexpr const char* kMarkFinished =
    "INSERT OR IGNORE INTO finished (message_id, finished_at) "
    "SELECT ?1, max(1, coalesce((SELECT max(updated_at) FROM recipients WHERE message_id = ?1), 1)) "
    "WHERE EXISTS (SELECT 1 FROM messages WHERE id = ?1 AND captured = 0) "
    "AND NOT EXISTS (SELECT 1 FROM recipients WHERE message_id = ?1 "
    "AND (state IN ('queued', 'deferred') OR dsn_pending = 1))";
constexpr const char* kMarkCaptured =
    "INSERT INTO finished (message_id, finished_at, captured) VALUES (?1, max(?2, 1), 1)";
// Oldest first, at most ?2, through the finished table's indexes (no messages row is read
// to choose); the cascade takes recipients, attempts and the finished row. Without
// statistics the planner would take finished_due for the bodies too (an equality and a
// range beat a range) and walk every pruned row: INDEXED BY says which.
constexpr const char* kPruneCaptured =
    "DELETE FROM messages WHERE id IN (SELECT message_id FROM finished "
    "WHERE captured = 1 AND finished_at <= ?1 ORDER BY finished_at LIMIT ?2)";
constexpr const char* kPruneHistory =
    "DELETE FROM messages WHERE id IN (SELECT message_id FROM finished "
    "WHERE captured = 0 AND finished_at <= ?1 ORDER BY finished_at LIMIT ?2)";
constexpr const char* kUnprunedRows =
    "SELECT message_id FROM finished INDEXED BY finished_unpruned "
    "WHERE captured = 0 AND content_pruned = 0 AND finished_at <= ?1 ORDER BY finished_at LIMIT ?2";
// Idempotent submission: the primary key (account, key) answers the lookup; the upsert
// replaces a row whose window has passed. Pruned oldest first through created_at.
constexpr const char* kFindIdempotencyKey =
    "SELECT message_id FROM idempotency_keys WHERE account = ?1 AND key = ?2 AND created_at >= ?3";
constexpr const char* kSaveIdempotencyKey =
    "INSERT INTO idempotency_keys (account, key, message_id, created_at) VALUES (?1, ?2, ?3, ?4) "
    "ON CONFLICT (account, key) DO UPDATE SET message_id = excluded.message_id, created_at = excluded.created_at";
constexpr const char* kPruneIdempotencyKeys =
    "DELETE FROM idempotency_keys WHERE (account, key) IN (SELECT account, key FROM idempotency_keys "
    "WHERE created_at < ?1 ORDER BY created_at LIMIT ?2)";
constexpr const char* kEmptyContent = "UPDATE messages SET content = x'' WHERE id = ?1";
// Suppression lists (issue 13). A later bounce or add refreshes the row's reason and dates.
constexpr const char* kUpsertSuppression =
    "INSERT INTO suppressions (account, address, reason, created_at, expires_at, source) "
    "VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (account, address) DO UPDATE SET "
    "reason = excluded.reason, created_at = excluded.created_at, expires_at = excluded.expires_at, "
    "source = excluded.source";
constexpr const char* kRemoveSuppression = "DELETE FROM suppressions WHERE account = ?1 AND address = ?2";
constexpr const char* kListSuppressions =
    "SELECT account, address, reason, created_at, coalesce(expires_at, 0), source FROM suppressions "
    "WHERE ?1 = '' OR account = ?1 ORDER BY created_at, account, address";
constexpr const char* kLiveSuppressions =
    "SELECT account, address, reason, created_at, coalesce(expires_at, 0), source FROM suppressions "
    "WHERE expires_at IS NULL OR expires_at > ?1 ORDER BY created_at DESC LIMIT ?2";
constexpr const char* kSuppressionCounts =
    "SELECT account, count(*) FROM suppressions WHERE expires_at IS NULL OR expires_at > ?1 "
    "GROUP BY account ORDER BY account";
constexpr const char* kSuppressionChanges = "SELECT counter FROM suppression_changes WHERE id = 1";
constexpr const char* kSimulateBounce =
    "UPDATE recipients SET state = 'failed', attempts = 1, last_error = ?3, last_code = ?4, last_status = ?5, "
    "dsn_pending = (SELECT is_dsn = 0 AND mail_from NOT IN ('', '<>') FROM messages WHERE id = ?1) "
    "WHERE message_id = ?1 AND idx = ?2";

constexpr const char* kSetPruned = "UPDATE finished SET content_pruned = 1 WHERE message_id = ?1";
#undef SUBRELAY_DELIVERABLE
#undef SUBRELAY_FROM_RCPT
#undef SUBRELAY_FROM_ALL
#undef SUBRELAY_MESSAGE_COLUMNS

constexpr const char* kInsertMessage =
    "INSERT INTO messages (id, account, mail_from, size, received_at, captured, smtputf8, "
    "eight_bit, client_address, helo, tls_version, tls_cipher, content, is_dsn, tls_required, dsn_ret, dsn_envid) "
    "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)";
constexpr const char* kInsertRecipient =
    "INSERT INTO recipients (message_id, idx, address, state, attempts, next_attempt, last_error, updated_at, "
    "dsn_notify, dsn_orcpt) VALUES (?1, ?2, ?3, ?4, 0, ?5, '', ?6, ?7, ?8)";

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
    info.isDsn = sqlite3_column_int(s, 18) != 0;
    info.eightBit = sqlite3_column_int(s, 19) != 0;
    info.finishedAt = sqlite3_column_int64(s, 25);  // NULL (no finished row) reads as 0
    info.contentPruned = sqlite3_column_int(s, 26) != 0;
    const int tr = sqlite3_column_int(s, 27);
    info.tlsRequirement = tr == 1 ? TlsRequirement::Required : tr == 2 ? TlsRequirement::Optional : TlsRequirement::Default;
    const int ret = sqlite3_column_int(s, 28);
    info.dsnRet = ret == 1 ? DsnRet::Full : ret == 2 ? DsnRet::Hdrs : DsnRet::Unspecified;
    info.dsnEnvid = columnText(s, 29);
  }
  if (sqlite3_column_type(s, 11) == SQLITE_NULL) return;  // LEFT JOIN: no recipients
  RecipientInfo r;
  r.index = sqlite3_column_int64(s, 11);
  r.address = columnText(s, 12);
  r.state = parseRecipientState(columnText(s, 13)).value_or(RecipientState::Queued);
  r.attempts = sqlite3_column_int64(s, 14);
  r.nextAttempt = sqlite3_column_int64(s, 15);
  r.lastError = columnText(s, 16);
  r.updatedAt = sqlite3_column_int64(s, 17);
  r.leaseUntil = sqlite3_column_int64(s, 20);
  r.dsnPending = sqlite3_column_int(s, 21) != 0;
  r.lastCode = sqlite3_column_int(s, 22);
  r.lastStatus = EnhancedStatus::parse(columnText(s, 23)).value_or(EnhancedStatus{});
  const int req = sqlite3_column_int(s, 24);
  r.request = req == 1 ? OperatorRequest::Retry : req == 2 ? OperatorRequest::Bounce : OperatorRequest::None;
  r.dsn.notify = sqlite3_column_int(s, 30);
  r.dsn.orcpt = columnText(s, 31);
  info.recipients.push_back(std::move(r));
}

// Reads rows of the message+recipient columns into one MessageInfo per message, stopping
// before the (maxMessages + 1)-th message. False on a step error.
bool readGrouped(sqlite3_stmt* st, size_t maxMessages, std::vector<MessageInfo>& out) {
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    std::string id = columnText(st, 0);
    bool fresh = out.empty() || out.back().id != id;
    if (fresh) {
      if (out.size() >= maxMessages) return true;
      out.emplace_back();
    }
    readRow(st, out.back(), fresh);
  }
  return rc == SQLITE_DONE;
}

// uint64 counters are stored in SQLite's signed 64-bit integers; counts never get near 2^63.
sqlite3_int64 toDb(uint64_t v) { return static_cast<sqlite3_int64>(v); }
uint64_t fromDb(sqlite3_int64 v) { return v < 0 ? 0 : static_cast<uint64_t>(v); }

}  // namespace

SqliteStore::SqliteStore(sqlite3* db, int version, bool readOnly)
    : db_(db), version_(version), readOnly_(readOnly), stmts_(std::make_unique<Statements>()) {}

SqliteStore::~SqliteStore() {
  stmts_.reset();  // statements first: close_v2 would otherwise keep the connection alive
  hook_.reset();
  sqlite3_close_v2(db_);
}

int SqliteStore::schemaVersion() const { return version_; }

namespace {
// Out of room: SQLITE_FULL, or an I/O error whose cause is a full disk or quota.
bool outOfSpace(sqlite3* db) {
  if ((sqlite3_errcode(db) & 0xff) == SQLITE_FULL) return true;
  const int e = sqlite3_system_errno(db);
  return (sqlite3_errcode(db) & 0xff) == SQLITE_IOERR && (e == ENOSPC || e == EDQUOT);
}
}  // namespace

util::Error SqliteStore::dbError(const std::string& what) const {
  util::Error e = util::makeError(what + ": " + sqlite3_errmsg(db_));
  e.storageFull = outOfSpace(db_);
  return e;
}

namespace {

// A file made before version 4 has auto_vacuum NONE: deleted messages leave free pages the
// file keeps for ever. Switching needs a VACUUM (a full copy of the file, outside any
// transaction, with the file's size free on disk): done once, at the first read-write open,
// and logged, since on a large queue it takes a while. If it fails (disk full), retention
// still frees pages for new messages to reuse; the file just does not shrink.
util::Result<void> enableIncrementalVacuum(sqlite3* db, const std::string& path) {
  int mode = 0;
  std::string err;
  if (!schema::readPragmaInt(db, "PRAGMA auto_vacuum", &mode, &err))
    return util::makeError("queue database " + path + ": cannot read auto_vacuum: " + err);
  if (mode == 2 || path == ":memory:") return {};  // 2 = INCREMENTAL
  util::logInfo("queue", "converting " + path +
                             " to incremental auto-vacuum (PRAGMA auto_vacuum=INCREMENTAL; VACUUM), once; "
                             "this rewrites the whole file");
  const auto t0 = std::chrono::steady_clock::now();
  char* msg = nullptr;
  if (sqlite3_exec(db, "PRAGMA auto_vacuum=INCREMENTAL; VACUUM", nullptr, nullptr, &msg) != SQLITE_OK) {
    std::string why = msg ? msg : sqlite3_errmsg(db);
    sqlite3_free(msg);
    util::logWarn("queue", "cannot convert " + path + " to incremental auto-vacuum: " + why +
                               "; old messages are still removed, but the file will not shrink");
    return {};
  }
  const auto ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
  util::logInfo("queue", "converted " + path + " to incremental auto-vacuum in " + std::to_string(ms) + " ms");
  return {};
}

}  // namespace

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
    // Retention frees pages; incremental auto-vacuum lets them go back to the file system
    // a few at a time (incrementalVacuum()). A new file takes it only before its first page
    // is written, which switching to WAL already does; an older file ignores it here and
    // is converted after the migration (enableIncrementalVacuum).
    if (auto r = exec("PRAGMA auto_vacuum=INCREMENTAL"); !r) return r.error();
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
  } else {
    if (version != kSchemaVersion || appId != schema::kApplicationId) {
      if (version == 0 && !opts.create) return util::makeError(where + " is not initialised and create=false");
      auto migrated = schema::migrate(raw, schema::migrations(), kSchemaVersion);
      if (!migrated) return util::makeError(where + ": " + migrated.error().message);
      version = *migrated;
    }
    if (auto r = enableIncrementalVacuum(raw, path); !r) return r.error();
  }

  std::unique_ptr<SqliteStore> store(new SqliteStore(db.release(), version, opts.readOnly));
  struct Prep {
    Stmt* target;
    const char* sql;
  };
  Statements& s = *store->stmts_;
  const Prep preps[] = {
      {&s.begin, "BEGIN IMMEDIATE"},
      {&s.beginRead, "BEGIN"},
      {&s.commit, "COMMIT"},
      {&s.rollback, "ROLLBACK"},
      {&s.savepoint, "SAVEPOINT msg"},
      {&s.release, "RELEASE msg"},
      {&s.rollbackTo, "ROLLBACK TO msg"},
      {&s.insertMessage, kInsertMessage},
      {&s.insertRecipient, kInsertRecipient},
      {&s.listAll, kListAll},
      {&s.showOne, kShowOne},
      {&s.showAttempts, kShowAttempts},
      {&s.content,
       "SELECT m.content, coalesce(f.content_pruned, 0), coalesce(f.finished_at, 0) FROM messages m "
       "LEFT JOIN finished f ON f.message_id = m.id WHERE m.id = ?1"},
      {&s.count, "SELECT count(*) FROM messages"},
      {&s.exists, "SELECT 1 FROM messages WHERE id = ?1"},
      {&s.dueRows, kDueRows},
      {&s.lease, kLease},
      {&s.recordRecipient, kRecordRecipient},
      {&s.insertAttempt, kInsertAttempt},
      {&s.recipientRequest, kRecipientRequest},
      {&s.releaseBounce, kReleaseBounce},
      {&s.releaseLease, kReleaseLease},
      {&s.nextDue, kNextDue},
      {&s.dsnRows, kDsnRows},
      {&s.clearDsn, kClearDsn},
      {&s.delayRows, kDelayRows},
      {&s.setDelayNotified, kSetDelayNotified},
      {&s.messageSender, kMessageSender},
      {&s.retryOne, kRetryOne},
      {&s.retryAll, kRetryAll},
      {&s.retryOneLeased, kRetryOneLeased},
      {&s.retryAllLeased, kRetryAllLeased},
      {&s.dropOne, kDropOne},
      {&s.bounceOne, kBounceOne},
      {&s.bounceOneLeased, kBounceOneLeased},
      {&s.upsertWindow, kUpsertWindow},
      {&s.loadWindows, kLoadWindows},
      {&s.addMeter, kAddMeter},
      {&s.loadMeters, kLoadMeters},
      {&s.queueStats, kQueueStats},
      {&s.acceptedSince, kAcceptedSince},
      {&s.noteDrop, kNoteDrop},
      {&s.operatorEvents, kOperatorEvents},
      {&s.deleteOperatorEvents, kDeleteOperatorEvents},
      {&s.saveSts, kSaveSts},
      {&s.touchSts, kTouchSts},
      {&s.loadSts, kLoadSts},
      {&s.loadAllSts, kLoadAllSts},
      {&s.pruneSts, kPruneSts},
      {&s.addTlsRpt, kAddTlsRpt},
      {&s.tlsRptPending, kTlsRptPending},
      {&s.tlsRptRows, kTlsRptRows},
      {&s.tlsRptDone, kTlsRptDone},
      {&s.pruneTlsRptCounts, kPruneTlsRptCounts},
      {&s.pruneTlsRptReports, kPruneTlsRptReports},
      {&s.markFinished, kMarkFinished},
      {&s.markCaptured, kMarkCaptured},
      {&s.pruneCaptured, kPruneCaptured},
      {&s.pruneHistory, kPruneHistory},
      {&s.unprunedRows, kUnprunedRows},
      {&s.emptyContent, kEmptyContent},
      {&s.setPruned, kSetPruned},
      {&s.upsertSuppression, kUpsertSuppression},
      {&s.removeSuppression, kRemoveSuppression},
      {&s.listSuppressions, kListSuppressions},
      {&s.liveSuppressions, kLiveSuppressions},
      {&s.suppressionCounts, kSuppressionCounts},
      {&s.suppressionChanges, kSuppressionChanges},
      {&s.simulateBounce, kSimulateBounce},
      {&s.findIdempotencyKey, kFindIdempotencyKey},
      {&s.saveIdempotencyKey, kSaveIdempotencyKey},
      {&s.pruneIdempotencyKeys, kPruneIdempotencyKeys},
  };
  for (const auto& p : preps) {
    sqlite3_stmt* st = nullptr;
    if (sqlite3_prepare_v3(store->db_, p.sql, -1, SQLITE_PREPARE_PERSISTENT, &st, nullptr) != SQLITE_OK)
      return store->dbError("cannot prepare queue statement on " + path);
    p.target->reset(st);
  }
  return store;
}

std::string SqliteStore::insertMessageLocked(const NewMessage& m) {
  const Statements& s = *stmts_;
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
    sqlite3_bind_int(st, 14, m.isDsn ? 1 : 0);
    sqlite3_bind_int(st, 15, static_cast<int>(m.tlsRequirement));
    sqlite3_bind_int(st, 16, static_cast<int>(m.dsnRet));
    bindText(st, 17, m.dsnEnvid);
    // The message body can be tens of MB: bound in place, not copied (SQLITE_STATIC).
    int rc = sqlite3_bind_blob64(st, 13, m.content.data(), m.content.size(), SQLITE_STATIC);
    if (rc == SQLITE_OK) rc = sqlite3_step(st);
    if (rc != SQLITE_DONE) {
      lastOutOfSpace_ = outOfSpace(db_);
      return sqlite3_extended_errcode(db_) == SQLITE_CONSTRAINT_PRIMARYKEY
                 ? "duplicate queue id " + m.id
                 : "cannot store message " + m.id + ": " + sqlite3_errmsg(db_);
    }
  }
  const std::string_view state = stateName(m.captured ? RecipientState::Captured : RecipientState::Queued);
  // Captured recipients are never due; queued ones are due at once.
  const int64_t next = m.captured ? 0 : m.receivedAt;
  for (size_t i = 0; i < m.recipients.size(); ++i) {
    Use u(s.insertRecipient);
    sqlite3_stmt* st = u.get();
    bindText(st, 1, m.id);
    sqlite3_bind_int64(st, 2, static_cast<sqlite3_int64>(i));
    bindText(st, 3, m.recipients[i]);
    sqlite3_bind_text(st, 4, state.data(), static_cast<int>(state.size()), SQLITE_STATIC);
    sqlite3_bind_int64(st, 5, next);
    sqlite3_bind_int64(st, 6, m.receivedAt);
    // RFC 3461 NOTIFY / ORCPT: recipientDsn is empty or parallel to recipients.
    if (i < m.recipientDsn.size()) {
      sqlite3_bind_int(st, 7, m.recipientDsn[i].notify);
      bindText(st, 8, m.recipientDsn[i].orcpt);
    } else {
      sqlite3_bind_int(st, 7, 0);
      sqlite3_bind_text(st, 8, "", 0, SQLITE_STATIC);
    }
    if (sqlite3_step(st) != SQLITE_DONE) {
      lastOutOfSpace_ = outOfSpace(db_);
      return "cannot store recipient of " + m.id + ": " + sqlite3_errmsg(db_);
    }
  }
  if (!m.simulatedBounces.empty()) {
    if (std::string why = simulateBouncesLocked(m); !why.empty()) return why;
  }
  if (m.captured) {
    // Never delivered: finished (for retention.captured) as soon as it is stored.
    Use u(s.markCaptured);
    bindText(u.get(), 1, m.id);
    sqlite3_bind_int64(u.get(), 2, m.receivedAt);
    if (sqlite3_step(u.get()) != SQLITE_DONE) {
      lastOutOfSpace_ = outOfSpace(db_);
      return "cannot store message " + m.id + ": " + sqlite3_errmsg(db_);
    }
  }
  if (!m.idempotencyKey.empty()) {
    // In the message's savepoint: the key is recorded exactly when the message is.
    Use u(s.saveIdempotencyKey);
    sqlite3_stmt* st = u.get();
    bindText(st, 1, m.account);
    bindText(st, 2, m.idempotencyKey);
    bindText(st, 3, m.id);
    sqlite3_bind_int64(st, 4, m.receivedAt);
    if (sqlite3_step(st) != SQLITE_DONE) {
      lastOutOfSpace_ = outOfSpace(db_);
      return "cannot store the idempotency key of " + m.id + ": " + sqlite3_errmsg(db_);
    }
  }
  return {};
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
    if (!m.idempotencyKey.empty()) {
      // The same key from the same account within the window, committed before or earlier
      // in this transaction: that message's id, and nothing stored. Only messages with a
      // key pay for this lookup (one primary-key probe).
      Use u(s.findIdempotencyKey);
      sqlite3_stmt* st = u.get();
      bindText(st, 1, m.account);
      bindText(st, 2, m.idempotencyKey);
      sqlite3_bind_int64(st, 3, m.receivedAt - m.idempotencyWindow);
      const int rc = sqlite3_step(st);
      if (rc == SQLITE_ROW) return columnText(st, 0);
      if (rc != SQLITE_DONE) return dbError("cannot look up the idempotency key of " + m.id);
    }
    if (run(s.savepoint) != SQLITE_DONE) return dbError("cannot create savepoint");
    lastOutOfSpace_ = false;
    std::string failure = insertMessageLocked(m);
    // The "accepted" events commit (or roll back) with the message: never one without the other.
    if (failure.empty()) failure = enqueueAcceptedLocked(m);
    if (failure.empty() && !m.simulatedBounces.empty()) failure = enqueueSimulatedBouncesLocked(m);
    if (!failure.empty()) {
      // ROLLBACK TO undoes the rows but keeps the savepoint open; RELEASE closes it.
      run(s.rollbackTo);
      run(s.release);
      util::Error e = util::makeError(std::move(failure));
      e.storageFull = lastOutOfSpace_;
      return e;
    }
    if (run(s.release) != SQLITE_DONE) return dbError("cannot release savepoint");
    return m.id;
  };

  bool any = false;
  for (const auto& m : batch) {
    out.push_back(insertOne(m));
    // A repeated idempotency key stores nothing (its result is another message's id).
    any = any || (out.back().ok() && out.back().value() == m.id);
    // Some errors (SQLITE_FULL, IOERR, NOMEM) roll back the whole transaction, not just
    // the statement. Then earlier messages are gone too, and the next SAVEPOINT would
    // silently open a fresh transaction: stop and fail the batch.
    if (sqlite3_get_autocommit(db_)) {
      std::string why = out.back().ok() ? sqlite3_errmsg(db_) : out.back().error().message;
      util::Error e = util::makeError("queue transaction aborted: " + why);
      e.storageFull = out.back().ok() ? outOfSpace(db_) : out.back().error().storageFull;
      return failAll(e);
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
  MessageInfo info;
  {
    Use u(stmts_->showOne);
    sqlite3_stmt* st = u.get();
    bindText(st, 1, id);
    bool found = false;
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
      readRow(st, info, !found);
      found = true;
    }
    if (rc != SQLITE_DONE) return dbError("cannot read message " + id);
    if (!found) return util::makeError("no such message: " + id);
  }
  Use u(stmts_->showAttempts);
  sqlite3_stmt* st = u.get();
  bindText(st, 1, id);
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    AttemptInfo a;
    a.index = sqlite3_column_int64(st, 0);
    a.at = sqlite3_column_int64(st, 1);
    a.mx = columnText(st, 2);
    a.tlsVersion = columnText(st, 3);
    a.tlsCipher = columnText(st, 4);
    a.code = sqlite3_column_int(st, 5);
    a.reply = columnText(st, 6);
    a.result = columnText(st, 7);
    a.status = EnhancedStatus::parse(columnText(st, 8)).value_or(EnhancedStatus{});
    a.tlsPolicy = columnText(st, 9);
    info.attempts.push_back(std::move(a));
  }
  if (rc != SQLITE_DONE) return dbError("cannot read the attempts of " + id);
  return info;
}

util::Result<MessageInfo> SqliteStore::show(const std::string& id) {
  std::lock_guard lock(mu_);
  // Two statements (message + recipients, attempts) in one read transaction: one snapshot.
  // A deferred BEGIN takes no lock, so this works on a read-only connection too.
  if (run(stmts_->beginRead) != SQLITE_DONE) return dbError("cannot read message " + id);
  auto out = showLocked(id);
  run(stmts_->commit);
  return out;
}

util::Result<std::string> SqliteStore::content(const std::string& id) {
  std::lock_guard lock(mu_);
  Use u(stmts_->content);
  sqlite3_stmt* st = u.get();
  bindText(st, 1, id);
  int rc = sqlite3_step(st);
  if (rc == SQLITE_DONE) return util::makeError("no such message: " + id);
  if (rc != SQLITE_ROW) return dbError("cannot read message " + id);
  // Not an empty message: the bytes are gone, and a caller must not mistake that for one.
  if (sqlite3_column_int(st, 1) != 0)
    return util::makeError("the content of message " + id + " was removed (retention.finished_bodies) after it " +
                           "finished at " + util::isoUtc(sqlite3_column_int64(st, 2)) +
                           "; its envelope and delivery history remain");
  return columnText(st, 0);
}

util::Result<int64_t> SqliteStore::count() {
  std::lock_guard lock(mu_);
  Use u(stmts_->count);
  if (sqlite3_step(u.get()) != SQLITE_ROW) return dbError("cannot count queue");
  return static_cast<int64_t>(sqlite3_column_int64(u.get(), 0));
}

// --- delivery -------------------------------------------------------------------------

namespace {

util::Error readOnlyError() { return util::makeError("queue database is open read-only"); }

}  // namespace

util::Result<std::vector<DueMessage>> SqliteStore::leaseDue(int64_t now, size_t maxMessages) {
  std::lock_guard lock(mu_);
  if (readOnly_) return readOnlyError();
  std::vector<DueMessage> out;
  if (maxMessages == 0) return out;
  const Statements& s = *stmts_;
  // IMMEDIATE: the write lock is taken before the SELECT, so a second process that leases
  // at the same moment waits for our COMMIT and then no longer sees these rows as due.
  Txn txn(db_, s.begin, s.commit, s.rollback);
  if (!txn.open()) return dbError("cannot begin lease transaction");
  std::vector<MessageInfo> rows;
  {
    Use u(s.dueRows);
    sqlite3_bind_int64(u.get(), 1, now);
    if (!readGrouped(u.get(), maxMessages, rows)) return dbError("cannot read due recipients");
  }
  // Owned, not timed (delivery_queue.h): the lease holds until this process records the
  // attempt or releases it; kOwnedLease only keeps the column meaningful as a time.
  const int64_t until = now + kOwnedLease;
  for (auto& m : rows) {
    DueMessage d;
    d.id = std::move(m.id);
    d.account = std::move(m.account);
    d.mailFrom = std::move(m.mailFrom);
    d.size = m.size;
    d.receivedAt = m.receivedAt;
    d.smtputf8 = m.smtputf8;
    d.eightBit = m.eightBit;
    d.isDsn = m.isDsn;
    d.tlsRequirement = m.tlsRequirement;
    d.dsnRet = m.dsnRet;
    d.dsnEnvid = std::move(m.dsnEnvid);
    for (auto& r : m.recipients) {
      Use u(s.lease);
      bindText(u.get(), 1, d.id);
      sqlite3_bind_int64(u.get(), 2, r.index);
      sqlite3_bind_int64(u.get(), 3, until);
      if (sqlite3_step(u.get()) != SQLITE_DONE) return dbError("cannot lease recipients of " + d.id);
      d.recipients.push_back(DueRecipient{r.index, std::move(r.address), r.attempts, std::move(r.dsn)});
    }
    out.push_back(std::move(d));
  }
  if (!txn.commit()) return dbError("cannot commit lease");
  return out;
}

util::Result<void> SqliteStore::recordAttempts(const std::vector<AttemptRecord>& records) {
  std::lock_guard lock(mu_);
  if (readOnly_) return readOnlyError();
  if (records.empty()) return {};
  const Statements& s = *stmts_;
  Txn txn(db_, s.begin, s.commit, s.rollback);
  if (!txn.open()) return dbError("cannot begin attempts transaction");
  for (const auto& given : records) {
    OperatorRequest request = OperatorRequest::None;
    {
      Use u(s.recipientRequest);
      bindText(u.get(), 1, given.messageId);
      sqlite3_bind_int64(u.get(), 2, given.index);
      int rc = sqlite3_step(u.get());
      if (rc == SQLITE_ROW) {
        const int v = sqlite3_column_int(u.get(), 0);
        request = v == 1 ? OperatorRequest::Retry : v == 2 ? OperatorRequest::Bounce : OperatorRequest::None;
      } else if (rc != SQLITE_DONE) {
        return dbError("cannot record attempt for " + given.messageId);
      }
    }
    const AttemptRecord rec = applyOperatorRequest(given, request);
    {
      Use u(s.recordRecipient);
      sqlite3_stmt* st = u.get();
      const std::string_view state = stateName(rec.newState);
      const std::string status = rec.lastStatus.str();
      bindText(st, 1, rec.messageId);
      sqlite3_bind_int64(st, 2, rec.index);
      sqlite3_bind_text(st, 3, state.data(), static_cast<int>(state.size()), SQLITE_STATIC);
      sqlite3_bind_int64(st, 4, rec.nextAttempt);
      bindText(st, 5, rec.lastError);
      sqlite3_bind_int64(st, 6, rec.attempt.at);
      sqlite3_bind_int(st, 7, rec.attempt.code);
      bindText(st, 8, status);
      sqlite3_bind_int(st, 9, rec.successDsn ? 1 : 0);  // RFC 3461 success DSN owed
      if (sqlite3_step(st) != SQLITE_DONE) return dbError("cannot record attempt for " + rec.messageId);
      // The state changed (not an operator's bounce that won): its webhook event, in this transaction.
      if (sqlite3_changes(db_) == 1) {
        if (auto why = enqueueAttemptLocked(rec); !why.empty()) return util::makeError(why);
      }
    }
    {
      Use u(s.exists);
      bindText(u.get(), 1, rec.messageId);
      int rc = sqlite3_step(u.get());
      if (rc == SQLITE_DONE) continue;  // dropped by an operator while the attempt ran
      if (rc != SQLITE_ROW) return dbError("cannot record attempt for " + rec.messageId);
    }
    // A hard bounce: the account's suppression list gets the recipient in this transaction.
    if (rec.suppress && rec.newState == RecipientState::Failed) {
      if (std::string why = addSuppressionLocked(*rec.suppress); !why.empty()) return util::makeError(why);
      if (std::string why = enqueueBounceSuppressedLocked(*rec.suppress, rec.messageId, rec.index); !why.empty())
        return util::makeError(why);
    }
    Use u(s.insertAttempt);
    sqlite3_stmt* st = u.get();
    const AttemptInfo& a = rec.attempt;
    bindText(st, 1, rec.messageId);
    sqlite3_bind_int64(st, 2, rec.index);
    sqlite3_bind_int64(st, 3, a.at);
    bindText(st, 4, a.mx);
    bindText(st, 5, a.tlsVersion);
    bindText(st, 6, a.tlsCipher);
    sqlite3_bind_int(st, 7, a.code);
    bindText(st, 8, a.reply);
    const std::string result = a.result.empty() ? std::string(stateName(rec.newState)) : a.result;
    const std::string status = a.status.str();
    bindText(st, 9, result);
    bindText(st, 10, status);
    bindText(st, 11, a.tlsPolicy);
    if (sqlite3_step(st) != SQLITE_DONE) return dbError("cannot record attempt for " + rec.messageId);
  }
  // Records come grouped by message in practice; a repeat only costs an index probe.
  const std::string* last = nullptr;
  for (const auto& rec : records) {
    if (last && *last == rec.messageId) continue;
    last = &rec.messageId;
    if (auto r = markFinishedLocked(rec.messageId); !r) return r.error();
  }
  if (!txn.commit()) return dbError("cannot commit attempts");
  return {};
}

util::Result<void> SqliteStore::releaseLeases(const std::string& messageId, const std::vector<int64_t>& indexes) {
  std::lock_guard lock(mu_);
  if (readOnly_) return readOnlyError();
  if (indexes.empty()) return {};
  const Statements& s = *stmts_;
  Txn txn(db_, s.begin, s.commit, s.rollback);
  if (!txn.open()) return dbError("cannot begin release transaction");
  const auto now = static_cast<sqlite3_int64>(std::time(nullptr));
  for (int64_t idx : indexes) {
    {
      Use u(s.releaseBounce);
      bindText(u.get(), 1, messageId);
      sqlite3_bind_int64(u.get(), 2, idx);
      sqlite3_bind_int64(u.get(), 3, now);
      if (sqlite3_step(u.get()) != SQLITE_DONE) return dbError("cannot release lease of " + messageId);
      if (sqlite3_changes(db_) == 1) {
        if (auto why = enqueueOperatorBounceLocked(messageId, idx, now); !why.empty()) return util::makeError(why);
      }
    }
    Use u(s.releaseLease);
    bindText(u.get(), 1, messageId);
    sqlite3_bind_int64(u.get(), 2, idx);
    if (sqlite3_step(u.get()) != SQLITE_DONE) return dbError("cannot release lease of " + messageId);
  }
  if (!txn.commit()) return dbError("cannot commit lease release");
  return {};
}

util::Result<void> SqliteStore::clearLeases() {
  std::lock_guard lock(mu_);
  if (readOnly_) return readOnlyError();
  const Statements& s = *stmts_;
  Txn txn(db_, s.begin, s.commit, s.rollback);
  if (!txn.open()) return dbError("cannot begin clearing delivery leases");
  // Bounces an operator asked for while the dead process held the lease: their webhook events.
  auto bounced = pendingBouncesLocked();
  if (!bounced.ok()) return bounced.error();
  const auto now = static_cast<int64_t>(std::time(nullptr));
  for (const auto& [id, idx] : bounced.value()) {
    if (auto why = enqueueOperatorBounceLocked(id, idx, now); !why.empty()) return util::makeError(why);
  }
  for (const char* sql : {kClearBounces, kClearLeases}) {
    sqlite3_stmt* st = nullptr;
    if (sqlite3_prepare_v2(db_, sql, -1, &st, nullptr) != SQLITE_OK) return dbError("cannot clear delivery leases");
    sqlite3_bind_int64(st, 3, static_cast<sqlite3_int64>(std::time(nullptr)));
    const int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) return dbError("cannot clear delivery leases");
  }
  if (!txn.commit()) return dbError("cannot commit clearing delivery leases");
  return {};
}

util::Result<std::optional<int64_t>> SqliteStore::nextDue() {
  std::lock_guard lock(mu_);
  Use u(stmts_->nextDue);
  if (sqlite3_step(u.get()) != SQLITE_ROW) return dbError("cannot read the next due time");
  // An aggregate always returns one row; NULL when nothing is deliverable.
  if (sqlite3_column_type(u.get(), 0) == SQLITE_NULL) return std::optional<int64_t>{};
  return std::optional<int64_t>{sqlite3_column_int64(u.get(), 0)};
}

util::Result<std::vector<DsnWork>> SqliteStore::pendingDsns(size_t maxMessages) {
  std::lock_guard lock(mu_);
  std::vector<MessageInfo> rows;
  {
    Use u(stmts_->dsnRows);
    if (!readGrouped(u.get(), maxMessages, rows)) return dbError("cannot read pending DSNs");
  }
  std::vector<DsnWork> out;
  out.reserve(rows.size());
  for (auto& m : rows) out.push_back(DsnWork{std::move(m)});
  return out;
}

util::Result<std::vector<DsnWork>> SqliteStore::pendingDelayNotices(int64_t receivedBefore, size_t maxMessages) {
  std::lock_guard lock(mu_);
  std::vector<MessageInfo> rows;
  {
    Use u(stmts_->delayRows);
    sqlite3_bind_int64(u.get(), 1, receivedBefore);
    if (!readGrouped(u.get(), maxMessages, rows)) return dbError("cannot read pending delay notices");
  }
  std::vector<DsnWork> out;
  out.reserve(rows.size());
  for (auto& m : rows) out.push_back(DsnWork{std::move(m)});
  return out;
}

util::Result<void> SqliteStore::completeDsn(const std::string& messageId, const std::vector<int64_t>& indexes,
                                            const std::optional<NewMessage>& dsn) {
  std::lock_guard lock(mu_);
  return completeNotice(messageId, indexes, dsn, false);
}

util::Result<void> SqliteStore::completeDelayNotice(const std::string& messageId, const std::vector<int64_t>& indexes,
                                                    const std::optional<NewMessage>& dsn) {
  std::lock_guard lock(mu_);
  return completeNotice(messageId, indexes, dsn, true);
}

util::Result<void> SqliteStore::completeNotice(const std::string& messageId, const std::vector<int64_t>& indexes,
                                               const std::optional<NewMessage>& dsn, bool delay) {
  if (readOnly_) return readOnlyError();
  const Statements& s = *stmts_;
  Txn txn(db_, s.begin, s.commit, s.rollback);
  if (!txn.open()) return dbError("cannot begin DSN transaction");
  // Whether the original may be answered at all is decided here, from the stored
  // envelope, not trusted to the caller: never to the null sender, never for a DSN.
  bool answerable = false;
  {
    Use u(s.messageSender);
    bindText(u.get(), 1, messageId);
    int rc = sqlite3_step(u.get());
    if (rc == SQLITE_ROW) {
      std::string from = columnText(u.get(), 0);
      answerable = !from.empty() && from != "<>" && sqlite3_column_int(u.get(), 1) == 0;
    } else if (rc != SQLITE_DONE) {
      return dbError("cannot read message " + messageId);
    }
    // SQLITE_DONE: the message was dropped meanwhile; nothing to answer, nothing to clear.
  }
  if (answerable && dsn) {
    if (dsn->id.empty() || dsn->recipients.empty()) return util::makeError("DSN for " + messageId + " has no id or recipient");
    NewMessage m = *dsn;
    m.isDsn = true;  // whatever the caller said: a DSN is never bounced itself
    std::string failure = insertMessageLocked(m);
    if (!failure.empty()) return util::makeError(std::move(failure));
  }
  for (int64_t idx : indexes) {
    Use u(delay ? s.setDelayNotified : s.clearDsn);
    bindText(u.get(), 1, messageId);
    sqlite3_bind_int64(u.get(), 2, idx);
    if (sqlite3_step(u.get()) != SQLITE_DONE) return dbError("cannot update recipients of " + messageId);
  }
  if (!delay) {
    if (auto r = markFinishedLocked(messageId); !r) return r.error();
  }
  if (!txn.commit()) return dbError("cannot commit DSN of " + messageId);
  return {};
}

// --- operators ------------------------------------------------------------------------

util::Result<void> SqliteStore::requireMessageLocked(const std::string& id) {
  Use u(stmts_->exists);
  bindText(u.get(), 1, id);
  int rc = sqlite3_step(u.get());
  if (rc == SQLITE_ROW) return {};
  if (rc == SQLITE_DONE) return util::makeError("no such message: " + id);
  return dbError("cannot read message " + id);
}

util::Result<int64_t> SqliteStore::retryNow(const std::optional<std::string>& id) {
  std::lock_guard lock(mu_);
  if (readOnly_) return readOnlyError();
  const Statements& s = *stmts_;
  Txn txn(db_, s.begin, s.commit, s.rollback);
  if (!txn.open()) return dbError("cannot begin retry transaction");
  if (id) {
    if (auto r = requireMessageLocked(*id); !r) return r.error();
  }
  int64_t changed = 0;
  for (const Stmt* stmt : {id ? &s.retryOne : &s.retryAll, id ? &s.retryOneLeased : &s.retryAllLeased}) {
    Use u(*stmt);
    if (id) bindText(u.get(), 1, *id);
    if (sqlite3_step(u.get()) != SQLITE_DONE) return dbError("cannot schedule a retry");
    changed += static_cast<int64_t>(sqlite3_changes(db_));
  }
  if (!txn.commit()) return dbError("cannot commit retry");
  return changed;
}

util::Result<int64_t> SqliteStore::drop(const std::string& id) {
  std::lock_guard lock(mu_);
  if (readOnly_) return readOnlyError();
  const Statements& s = *stmts_;
  Txn txn(db_, s.begin, s.commit, s.rollback);
  if (!txn.open()) return dbError("cannot begin drop transaction");
  {
    Use n(s.noteDrop);
    bindText(n.get(), 1, id);
    sqlite3_bind_int64(n.get(), 2, util::unixSeconds(std::chrono::system_clock::now()));
    if (sqlite3_step(n.get()) != SQLITE_DONE) return dbError("cannot drop " + id);
  }
  Use u(s.dropOne);
  bindText(u.get(), 1, id);
  if (sqlite3_step(u.get()) != SQLITE_DONE) return dbError("cannot drop " + id);
  const int64_t changed = static_cast<int64_t>(sqlite3_changes(db_));  // messages only: cascades are not counted
  if (changed == 0) return util::makeError("no such message: " + id);
  if (!txn.commit()) return dbError("cannot commit drop of " + id);
  return changed;
}

util::Result<int64_t> SqliteStore::bounce(const std::string& id) {
  std::lock_guard lock(mu_);
  if (readOnly_) return readOnlyError();
  const Statements& s = *stmts_;
  Txn txn(db_, s.begin, s.commit, s.rollback);
  if (!txn.open()) return dbError("cannot begin bounce transaction");
  if (auto r = requireMessageLocked(id); !r) return r.error();
  int64_t changed = 0;
  const auto bouncedAt = static_cast<int64_t>(std::time(nullptr));
  // The recipients kBounceOne is about to fail, for their "bounced" webhook events.
  auto bouncedNow = operatorBounceCandidatesLocked(id);
  if (!bouncedNow.ok()) return bouncedNow.error();
  {
    Use u(s.bounceOne);
    bindText(u.get(), 1, id);
    sqlite3_bind_int64(u.get(), 2, bouncedAt);
    if (sqlite3_step(u.get()) != SQLITE_DONE) return dbError("cannot bounce " + id);
    changed += static_cast<int64_t>(sqlite3_changes(db_));
  }
  for (int64_t idx : bouncedNow.value()) {
    if (auto why = enqueueOperatorBounceLocked(id, idx, bouncedAt); !why.empty()) return util::makeError(why);
  }
  {
    // In flight: bounced when the attempt ends, unless it delivers (sqlite_store.h).
    Use u(s.bounceOneLeased);
    bindText(u.get(), 1, id);
    if (sqlite3_step(u.get()) != SQLITE_DONE) return dbError("cannot bounce " + id);
    changed += static_cast<int64_t>(sqlite3_changes(db_));
  }
  // A DSN to send keeps it unfinished; a bounce of a DSN or of a null sender finishes it.
  if (auto r = markFinishedLocked(id); !r) return r.error();
  if (!txn.commit()) return dbError("cannot commit bounce of " + id);
  return changed;
}

// --- retention ------------------------------------------------------------------------

util::Result<void> SqliteStore::markFinishedLocked(const std::string& id) {
  Use u(stmts_->markFinished);
  bindText(u.get(), 1, id);
  if (sqlite3_step(u.get()) != SQLITE_DONE) return dbError("cannot mark " + id + " finished");
  return {};
}

util::Result<PruneCounts> SqliteStore::prune(int64_t now, const RetentionPolicy& policy, size_t maxRows) {
  std::lock_guard lock(mu_);
  if (readOnly_) return readOnlyError();
  PruneCounts out;
  if (maxRows == 0) return out;
  const Statements& s = *stmts_;
  Txn txn(db_, s.begin, s.commit, s.rollback);
  if (!txn.open()) return dbError("cannot begin prune transaction");
  auto budget = [&] { return static_cast<int64_t>(maxRows) - out.rows(); };
  // Deletions first: a message about to go entirely needs no body pruned first.
  auto remove = [&](const Stmt& stmt, int64_t cutoff, int64_t& count, const char* what) -> util::Result<void> {
    if (budget() <= 0) return {};
    Use u(stmt);
    sqlite3_bind_int64(u.get(), 1, cutoff);
    sqlite3_bind_int64(u.get(), 2, budget());
    if (sqlite3_step(u.get()) != SQLITE_DONE) return dbError(std::string("cannot delete ") + what);
    count = static_cast<int64_t>(sqlite3_changes(db_));  // messages only: cascades are not counted
    return {};
  };
  if (auto r = remove(s.pruneCaptured, now - policy.captured, out.capturedDeleted, "captured messages"); !r)
    return r.error();
  if (auto r = remove(s.pruneHistory, now - policy.history, out.finishedDeleted, "finished messages"); !r)
    return r.error();
  // Keys whose window has passed answer no lookup any more (kFindIdempotencyKey).
  if (auto r = remove(s.pruneIdempotencyKeys, now - policy.idempotencyKeys, out.keysDeleted, "idempotency keys"); !r)
    return r.error();
  if (budget() > 0) {
    std::vector<std::string> ids;
    {
      Use u(s.unprunedRows);
      sqlite3_bind_int64(u.get(), 1, now - policy.finishedBodies);
      sqlite3_bind_int64(u.get(), 2, budget());
      int rc;
      while ((rc = sqlite3_step(u.get())) == SQLITE_ROW) ids.push_back(columnText(u.get(), 0));
      if (rc != SQLITE_DONE) return dbError("cannot read finished messages");
    }
    for (const auto& id : ids) {
      for (const Stmt* st : {&s.emptyContent, &s.setPruned}) {
        Use u(*st);
        bindText(u.get(), 1, id);
        if (sqlite3_step(u.get()) != SQLITE_DONE) return dbError("cannot remove the content of " + id);
      }
    }
    out.bodiesRemoved = static_cast<int64_t>(ids.size());
  }
  if (out.rows() == 0) return out;  // nothing written: the destructor rolls back
  if (!txn.commit()) return dbError("cannot commit prune");
  return out;
}

namespace {
bool pragmaInt64(sqlite3* db, const char* sql, int64_t& out) {
  sqlite3_stmt* st = nullptr;
  if (sqlite3_prepare_v2(db, sql, -1, &st, nullptr) != SQLITE_OK) return false;
  const bool ok = sqlite3_step(st) == SQLITE_ROW;
  if (ok) out = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  return ok;
}
}  // namespace

util::Result<std::pair<int64_t, int64_t>> SqliteStore::freeAndTotalPages() {
  std::lock_guard lock(mu_);
  int64_t freePages = 0, total = 0;
  if (!pragmaInt64(db_, "PRAGMA freelist_count", freePages) || !pragmaInt64(db_, "PRAGMA page_count", total))
    return dbError("cannot read the page counts");
  return std::pair<int64_t, int64_t>{freePages, total};
}

util::Result<int64_t> SqliteStore::incrementalVacuum(int64_t maxPages, int64_t keepFreePages) {
  std::lock_guard lock(mu_);
  if (readOnly_) return readOnlyError();
  int64_t before = 0;
  if (!pragmaInt64(db_, "PRAGMA freelist_count", before)) return dbError("cannot read the free page count");
  const int64_t n = std::min(maxPages, before - keepFreePages);
  if (n <= 0) return int64_t{0};
  // Its own (autocommit) write transaction; the pragma frees one page per step. Integers
  // only in the text: pragmas take no bound parameters.
  char* msg = nullptr;
  const std::string sql = "PRAGMA incremental_vacuum(" + std::to_string(n) + ")";
  if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &msg) != SQLITE_OK) {
    std::string why = msg ? msg : sqlite3_errmsg(db_);
    sqlite3_free(msg);
    return util::makeError("incremental vacuum: " + why);
  }
  int64_t after = 0;
  if (!pragmaInt64(db_, "PRAGMA freelist_count", after)) return dbError("cannot read the free page count");
  return before - after;
}

// --- account policy -------------------------------------------------------------------

util::Result<void> SqliteStore::saveRateWindows(const std::vector<RateWindowRow>& rows) {
  std::lock_guard lock(mu_);
  if (readOnly_) return readOnlyError();
  if (rows.empty()) return {};
  const Statements& s = *stmts_;
  Txn txn(db_, s.begin, s.commit, s.rollback);
  if (!txn.open()) return dbError("cannot begin rate window transaction");
  for (const auto& row : rows) {
    Use u(s.upsertWindow);
    bindText(u.get(), 1, row.username);
    bindText(u.get(), 2, row.rule);
    sqlite3_bind_int64(u.get(), 3, row.windowStart);
    sqlite3_bind_int64(u.get(), 4, toDb(row.count));
    if (sqlite3_step(u.get()) != SQLITE_DONE) return dbError("cannot save rate window of " + row.username);
  }
  if (!txn.commit()) return dbError("cannot commit rate windows");
  return {};
}

util::Result<std::vector<RateWindowRow>> SqliteStore::loadRateWindows() {
  std::lock_guard lock(mu_);
  Use u(stmts_->loadWindows);
  sqlite3_stmt* st = u.get();
  std::vector<RateWindowRow> out;
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW)
    out.push_back(RateWindowRow{columnText(st, 0), columnText(st, 1), sqlite3_column_int64(st, 2),
                                fromDb(sqlite3_column_int64(st, 3))});
  if (rc != SQLITE_DONE) return dbError("cannot load rate windows");
  return out;
}

util::Result<void> SqliteStore::addMeters(const std::vector<MeterRow>& deltas, int64_t now) {
  std::lock_guard lock(mu_);
  if (readOnly_) return readOnlyError();
  if (deltas.empty()) return {};
  const Statements& s = *stmts_;
  Txn txn(db_, s.begin, s.commit, s.rollback);
  if (!txn.open()) return dbError("cannot begin meters transaction");
  for (const auto& d : deltas) {
    Use u(s.addMeter);
    sqlite3_stmt* st = u.get();
    bindText(st, 1, d.username);
    sqlite3_bind_int64(st, 2, toDb(d.accepted));
    sqlite3_bind_int64(st, 3, toDb(d.refusedByLimit));
    sqlite3_bind_int64(st, 4, toDb(d.recipients));
    sqlite3_bind_int64(st, 5, toDb(d.bytes));
    sqlite3_bind_int64(st, 6, toDb(d.authFailures));
    sqlite3_bind_int64(st, 7, now);
    if (sqlite3_step(st) != SQLITE_DONE) return dbError("cannot add meters of " + d.username);
  }
  if (!txn.commit()) return dbError("cannot commit meters");
  return {};
}

util::Result<std::vector<MeterRow>> SqliteStore::loadMeters() {
  std::lock_guard lock(mu_);
  Use u(stmts_->loadMeters);
  sqlite3_stmt* st = u.get();
  std::vector<MeterRow> out;
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    MeterRow m;
    m.username = columnText(st, 0);
    m.accepted = fromDb(sqlite3_column_int64(st, 1));
    m.refusedByLimit = fromDb(sqlite3_column_int64(st, 2));
    m.recipients = fromDb(sqlite3_column_int64(st, 3));
    m.bytes = fromDb(sqlite3_column_int64(st, 4));
    m.authFailures = fromDb(sqlite3_column_int64(st, 5));
    m.updatedAt = sqlite3_column_int64(st, 6);
    out.push_back(std::move(m));
  }
  if (rc != SQLITE_DONE) return dbError("cannot load meters");
  return out;
}

util::Result<QueueStats> SqliteStore::queueStats() {
  std::lock_guard lock(mu_);
  Use u(stmts_->queueStats);
  sqlite3_stmt* st = u.get();
  QueueStats q;
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    const std::string state = columnText(st, 0);
    const bool leased = sqlite3_column_int(st, 1) != 0;
    const uint64_t n = fromDb(sqlite3_column_int64(st, 2));
    const int64_t oldest = sqlite3_column_int64(st, 3);
    if (leased)
      q.inFlight += n;
    else if (state == "queued")
      q.queued += n;
    else
      q.deferred += n;
    if (q.oldestReceivedAt == 0 || oldest < q.oldestReceivedAt) q.oldestReceivedAt = oldest;
  }
  if (rc != SQLITE_DONE) return dbError("cannot count the queue");
  return q;
}

util::Result<std::vector<AccountActivity>> SqliteStore::acceptedSince(int64_t since) {
  std::lock_guard lock(mu_);
  Use u(stmts_->acceptedSince);
  sqlite3_stmt* st = u.get();
  sqlite3_bind_int64(st, 1, since);
  std::vector<AccountActivity> out;
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW)
    out.push_back({columnText(st, 0), fromDb(sqlite3_column_int64(st, 1)), fromDb(sqlite3_column_int64(st, 2))});
  if (rc != SQLITE_DONE) return dbError("cannot count recent messages");
  return out;
}

util::Result<std::vector<OperatorEvent>> SqliteStore::takeOperatorEvents(size_t max) {
  std::lock_guard lock(mu_);
  if (readOnly_) return readOnlyError();
  const Statements& s = *stmts_;
  // Read first, outside a transaction: serve asks every 2 s and there is almost never an
  // event, so an idle server takes no write lock for it. Only serve deletes rows, so the
  // rows read are still there for the delete below.
  std::vector<OperatorEvent> out;
  int64_t last = 0;
  {
    Use u(s.operatorEvents);
    sqlite3_bind_int64(u.get(), 1, static_cast<int64_t>(max));
    int rc;
    while ((rc = sqlite3_step(u.get())) == SQLITE_ROW) {
      last = sqlite3_column_int64(u.get(), 0);
      out.push_back({sqlite3_column_int64(u.get(), 1), columnText(u.get(), 2), columnText(u.get(), 3),
                     columnText(u.get(), 4), fromDb(sqlite3_column_int64(u.get(), 5))});
    }
    if (rc != SQLITE_DONE) return dbError("cannot read operator events");
  }
  if (out.empty()) return out;
  Txn txn(db_, s.begin, s.commit, s.rollback);
  if (!txn.open()) return dbError("cannot begin deleting operator events");
  {
    Use d(s.deleteOperatorEvents);
    sqlite3_bind_int64(d.get(), 1, last);
    if (sqlite3_step(d.get()) != SQLITE_DONE) return dbError("cannot delete operator events");
  }
  if (!txn.commit()) return dbError("cannot commit operator events");
  return out;
}

// --- MTA-STS policy cache ------------------------------------------------------------

namespace {

// mx patterns are one per line in their column (a pattern never holds a line break).
std::string joinLines(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& x : v) out += (out.empty() ? "" : "\n") + x;
  return out;
}

std::vector<std::string> splitLines(const std::string& s) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < s.size()) {
    size_t nl = s.find('\n', pos);
    if (nl == std::string::npos) nl = s.size();
    if (nl > pos) out.push_back(s.substr(pos, nl - pos));
    pos = nl + 1;
  }
  return out;
}

StsPolicyRow stsRow(sqlite3_stmt* st) {
  StsPolicyRow r;
  r.domain = columnText(st, 0);
  r.policyId = columnText(st, 1);
  r.mode = columnText(st, 2);
  r.maxAge = sqlite3_column_int64(st, 3);
  r.mx = splitLines(columnText(st, 4));
  r.text = columnText(st, 5);
  r.fetchedAt = sqlite3_column_int64(st, 6);
  r.expiresAt = sqlite3_column_int64(st, 7);
  r.checkedAt = sqlite3_column_int64(st, 8);
  return r;
}

}  // namespace

util::Result<void> SqliteStore::saveStsPolicy(const StsPolicyRow& row) {
  std::lock_guard lock(mu_);
  if (readOnly_) return readOnlyError();
  const std::string mx = joinLines(row.mx);
  Use u(stmts_->saveSts);
  sqlite3_stmt* st = u.get();
  bindText(st, 1, row.domain);
  bindText(st, 2, row.policyId);
  bindText(st, 3, row.mode);
  sqlite3_bind_int64(st, 4, row.maxAge);
  bindText(st, 5, mx);
  bindText(st, 6, row.text);
  sqlite3_bind_int64(st, 7, row.fetchedAt);
  sqlite3_bind_int64(st, 8, row.expiresAt);
  sqlite3_bind_int64(st, 9, row.checkedAt);
  if (sqlite3_step(st) != SQLITE_DONE) return dbError("cannot save the MTA-STS policy of " + row.domain);
  return {};
}

util::Result<void> SqliteStore::touchStsPolicy(const std::string& domain, int64_t checkedAt) {
  std::lock_guard lock(mu_);
  if (readOnly_) return readOnlyError();
  Use u(stmts_->touchSts);
  bindText(u.get(), 1, domain);
  sqlite3_bind_int64(u.get(), 2, checkedAt);
  if (sqlite3_step(u.get()) != SQLITE_DONE) return dbError("cannot update the MTA-STS policy of " + domain);
  return {};
}

util::Result<std::optional<StsPolicyRow>> SqliteStore::loadStsPolicy(const std::string& domain) {
  std::lock_guard lock(mu_);
  Use u(stmts_->loadSts);
  bindText(u.get(), 1, domain);
  const int rc = sqlite3_step(u.get());
  if (rc == SQLITE_ROW) return std::optional<StsPolicyRow>(stsRow(u.get()));
  if (rc != SQLITE_DONE) return dbError("cannot load the MTA-STS policy of " + domain);
  return std::optional<StsPolicyRow>();
}

util::Result<std::vector<StsPolicyRow>> SqliteStore::loadStsPolicies() {
  std::lock_guard lock(mu_);
  Use u(stmts_->loadAllSts);
  std::vector<StsPolicyRow> out;
  int rc;
  while ((rc = sqlite3_step(u.get())) == SQLITE_ROW) out.push_back(stsRow(u.get()));
  if (rc != SQLITE_DONE) return dbError("cannot load MTA-STS policies");
  return out;
}

util::Result<int64_t> SqliteStore::pruneStsPolicies(int64_t expiredBefore) {
  std::lock_guard lock(mu_);
  if (readOnly_) return readOnlyError();
  Use u(stmts_->pruneSts);
  sqlite3_bind_int64(u.get(), 1, expiredBefore);
  if (sqlite3_step(u.get()) != SQLITE_DONE) return dbError("cannot prune MTA-STS policies");
  return static_cast<int64_t>(sqlite3_changes(db_));
}

// --- TLS reporting ------------------------------------------------------------------

util::Result<void> SqliteStore::addTlsRpt(const std::vector<TlsRptRow>& rows) {
  std::lock_guard lock(mu_);
  if (readOnly_) return readOnlyError();
  if (rows.empty()) return {};
  const Statements& s = *stmts_;
  Txn txn(db_, s.begin, s.commit, s.rollback);
  if (!txn.open()) return dbError("cannot begin TLS-RPT transaction");
  for (const auto& r : rows) {
    Use u(s.addTlsRpt);
    sqlite3_stmt* st = u.get();
    sqlite3_bind_int64(st, 1, r.day);
    bindText(st, 2, r.domain);
    bindText(st, 3, r.policyType);
    // Bound without copying (bindText): the joined texts must outlive the step.
    const std::string policy = joinLines(r.policy);
    const std::string mxHost = joinLines(r.mxHost);
    bindText(st, 4, policy);
    bindText(st, 5, mxHost);
    bindText(st, 6, r.result);
    bindText(st, 7, r.receivingMx);
    bindText(st, 8, r.receivingIp);
    bindText(st, 9, r.reason);
    sqlite3_bind_int64(st, 10, r.sessions);
    if (sqlite3_step(st) != SQLITE_DONE) return dbError("cannot add TLS-RPT counts");
  }
  if (!txn.commit()) return dbError("cannot commit TLS-RPT counts");
  return {};
}

util::Result<std::vector<std::pair<int64_t, std::string>>> SqliteStore::tlsRptPending(int64_t beforeDay, size_t max) {
  std::lock_guard lock(mu_);
  Use u(stmts_->tlsRptPending);
  sqlite3_bind_int64(u.get(), 1, beforeDay);
  sqlite3_bind_int64(u.get(), 2, static_cast<int64_t>(max));
  std::vector<std::pair<int64_t, std::string>> out;
  int rc;
  while ((rc = sqlite3_step(u.get())) == SQLITE_ROW)
    out.emplace_back(sqlite3_column_int64(u.get(), 0), columnText(u.get(), 1));
  if (rc != SQLITE_DONE) return dbError("cannot list pending TLS reports");
  return out;
}

util::Result<std::vector<TlsRptRow>> SqliteStore::tlsRptRows(int64_t day, const std::string& domain) {
  std::lock_guard lock(mu_);
  Use u(stmts_->tlsRptRows);
  sqlite3_bind_int64(u.get(), 1, day);
  bindText(u.get(), 2, domain);
  std::vector<TlsRptRow> out;
  int rc;
  while ((rc = sqlite3_step(u.get())) == SQLITE_ROW) {
    sqlite3_stmt* st = u.get();
    TlsRptRow r;
    r.day = sqlite3_column_int64(st, 0);
    r.domain = columnText(st, 1);
    r.policyType = columnText(st, 2);
    r.policy = splitLines(columnText(st, 3));
    r.mxHost = splitLines(columnText(st, 4));
    r.result = columnText(st, 5);
    r.receivingMx = columnText(st, 6);
    r.receivingIp = columnText(st, 7);
    r.reason = columnText(st, 8);
    r.sessions = sqlite3_column_int64(st, 9);
    out.push_back(std::move(r));
  }
  if (rc != SQLITE_DONE) return dbError("cannot read TLS-RPT counts");
  return out;
}

util::Result<bool> SqliteStore::completeTlsRpt(int64_t day, const std::string& domain, const std::string& outcome,
                                               int64_t now, const std::optional<NewMessage>& report) {
  std::lock_guard lock(mu_);
  if (readOnly_) return readOnlyError();
  const Statements& s = *stmts_;
  Txn txn(db_, s.begin, s.commit, s.rollback);
  if (!txn.open()) return dbError("cannot begin TLS-RPT transaction");
  {
    Use u(s.tlsRptDone);
    sqlite3_stmt* st = u.get();
    sqlite3_bind_int64(st, 1, day);
    bindText(st, 2, domain);
    sqlite3_bind_int64(st, 3, now);
    bindText(st, 4, outcome);
    const std::string messageId = report ? report->id : std::string();
    bindText(st, 5, messageId);
    if (sqlite3_step(st) != SQLITE_DONE) return dbError("cannot record the TLS report of " + domain);
  }
  if (sqlite3_changes(db_) == 0) return false;  // made before (another process, a retry)
  if (report) {
    std::string failure = insertMessageLocked(*report);
    if (!failure.empty()) return util::makeError(std::move(failure));
  }
  if (!txn.commit()) return dbError("cannot commit the TLS report of " + domain);
  return true;
}

util::Result<int64_t> SqliteStore::pruneTlsRpt(int64_t beforeDay) {
  std::lock_guard lock(mu_);
  if (readOnly_) return readOnlyError();
  int64_t n = 0;
  for (const Stmt* st : {&stmts_->pruneTlsRptCounts, &stmts_->pruneTlsRptReports}) {
    Use u(*st);
    sqlite3_bind_int64(u.get(), 1, beforeDay);
    if (sqlite3_step(u.get()) != SQLITE_DONE) return dbError("cannot prune TLS-RPT counts");
    n += sqlite3_changes(db_);
  }
  return n;
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

// ---- suppression lists (issue 13) -----------------------------------------------------

namespace {

SuppressionRow readSuppression(sqlite3_stmt* st) {
  SuppressionRow r;
  r.account = columnText(st, 0);
  r.address = columnText(st, 1);
  r.reason = columnText(st, 2);
  r.createdAt = sqlite3_column_int64(st, 3);
  r.expiresAt = sqlite3_column_int64(st, 4);
  r.source = columnText(st, 5);
  return r;
}

}  // namespace

std::string SqliteStore::addSuppressionLocked(const SuppressionRow& row) {
  Use u(stmts_->upsertSuppression);
  sqlite3_stmt* st = u.get();
  bindText(st, 1, row.account);
  bindText(st, 2, row.address);
  bindText(st, 3, row.reason);
  sqlite3_bind_int64(st, 4, row.createdAt);
  if (row.expiresAt > 0)
    sqlite3_bind_int64(st, 5, row.expiresAt);
  else
    sqlite3_bind_null(st, 5);
  bindText(st, 6, row.source);
  if (sqlite3_step(st) != SQLITE_DONE) {
    lastOutOfSpace_ = outOfSpace(db_);
    return "cannot store the suppression of " + row.address + ": " + sqlite3_errmsg(db_);
  }
  return {};
}

std::string SqliteStore::simulateBouncesLocked(const NewMessage& m) {
  const Statements& s = *stmts_;
  for (const auto& b : m.simulatedBounces) {
    if (b.index < 0 || static_cast<size_t>(b.index) >= m.recipients.size()) continue;
    const std::string status = b.status.str();
    {
      Use u(s.simulateBounce);
      sqlite3_stmt* st = u.get();
      bindText(st, 1, m.id);
      sqlite3_bind_int64(st, 2, b.index);
      bindText(st, 3, b.reply);
      sqlite3_bind_int(st, 4, b.code);
      bindText(st, 5, status);
      if (sqlite3_step(st) != SQLITE_DONE) {
        lastOutOfSpace_ = outOfSpace(db_);
        return "cannot store recipient of " + m.id + ": " + sqlite3_errmsg(db_);
      }
    }
    {
      static const std::string kEmpty, kFailed = "failed", kLocal = "capture (simulated)";
      Use u(s.insertAttempt);
      sqlite3_stmt* st = u.get();
      bindText(st, 1, m.id);
      sqlite3_bind_int64(st, 2, b.index);
      sqlite3_bind_int64(st, 3, m.receivedAt);
      bindText(st, 4, kEmpty);
      bindText(st, 5, kEmpty);
      bindText(st, 6, kEmpty);
      sqlite3_bind_int(st, 7, b.code);
      bindText(st, 8, b.reply);
      bindText(st, 9, kFailed);
      bindText(st, 10, status);
      bindText(st, 11, kLocal);
      if (sqlite3_step(st) != SQLITE_DONE) {
        lastOutOfSpace_ = outOfSpace(db_);
        return "cannot store the attempt of " + m.id + ": " + sqlite3_errmsg(db_);
      }
    }
    if (b.suppress) {
      if (std::string why = addSuppressionLocked(*b.suppress); !why.empty()) return why;
      // Its webhook events ("bounced", "suppressed") follow "accepted": enqueueSimulatedBouncesLocked.
    }
  }
  return {};
}

util::Result<void> SqliteStore::upsertSuppression(const SuppressionRow& row) {
  std::lock_guard lock(mu_);
  if (readOnly_) return readOnlyError();
  const Statements& s = *stmts_;
  Txn txn(db_, s.begin, s.commit, s.rollback);
  if (!txn.open()) return dbError("cannot begin suppression transaction");
  if (std::string why = addSuppressionLocked(row); !why.empty()) return util::makeError(why);
  if (!txn.commit()) return dbError("cannot commit suppression");
  return {};
}

util::Result<int64_t> SqliteStore::removeSuppression(const std::string& account, const std::string& address) {
  std::lock_guard lock(mu_);
  if (readOnly_) return readOnlyError();
  Use u(stmts_->removeSuppression);
  bindText(u.get(), 1, account);
  bindText(u.get(), 2, address);
  if (sqlite3_step(u.get()) != SQLITE_DONE) return dbError("cannot remove the suppression of " + address);
  return static_cast<int64_t>(sqlite3_changes(db_));
}

util::Result<std::vector<SuppressionRow>> SqliteStore::listSuppressions(const std::string& account) {
  std::lock_guard lock(mu_);
  Use u(stmts_->listSuppressions);
  bindText(u.get(), 1, account);
  std::vector<SuppressionRow> out;
  int rc;
  while ((rc = sqlite3_step(u.get())) == SQLITE_ROW) out.push_back(readSuppression(u.get()));
  if (rc != SQLITE_DONE) return dbError("cannot list suppressions");
  return out;
}

util::Result<std::vector<SuppressionRow>> SqliteStore::loadLiveSuppressions(int64_t now, size_t maxRows) {
  std::lock_guard lock(mu_);
  Use u(stmts_->liveSuppressions);
  sqlite3_bind_int64(u.get(), 1, now);
  sqlite3_bind_int64(u.get(), 2, static_cast<sqlite3_int64>(maxRows));
  std::vector<SuppressionRow> out;
  int rc;
  while ((rc = sqlite3_step(u.get())) == SQLITE_ROW) out.push_back(readSuppression(u.get()));
  if (rc != SQLITE_DONE) return dbError("cannot load suppressions");
  return out;
}

util::Result<std::vector<std::pair<std::string, uint64_t>>> SqliteStore::suppressionCounts(int64_t now) {
  std::lock_guard lock(mu_);
  Use u(stmts_->suppressionCounts);
  sqlite3_bind_int64(u.get(), 1, now);
  std::vector<std::pair<std::string, uint64_t>> out;
  int rc;
  while ((rc = sqlite3_step(u.get())) == SQLITE_ROW)
    out.emplace_back(columnText(u.get(), 0), fromDb(sqlite3_column_int64(u.get(), 1)));
  if (rc != SQLITE_DONE) return dbError("cannot count suppressions");
  return out;
}

util::Result<int64_t> SqliteStore::suppressionChanges() {
  std::lock_guard lock(mu_);
  Use u(stmts_->suppressionChanges);
  const int rc = sqlite3_step(u.get());
  if (rc == SQLITE_ROW) return static_cast<int64_t>(sqlite3_column_int64(u.get(), 0));
  if (rc == SQLITE_DONE) return int64_t{0};
  return dbError("cannot read the suppression change counter");
}

util::Result<int64_t> SqliteStore::pruneSuppressions(int64_t now, size_t maxEntries, size_t maxRows) {
  std::lock_guard lock(mu_);
  if (readOnly_) return readOnlyError();
  const Statements& s = *stmts_;
  Txn txn(db_, s.begin, s.commit, s.rollback);
  if (!txn.open()) return dbError("cannot begin suppression prune");
  // Rare and small: prepared per call rather than kept.
  auto run1 = [&](const char* sql, int64_t a, int64_t b, int64_t& deleted) -> bool {
    sqlite3_stmt* st = nullptr;
    if (sqlite3_prepare_v2(db_, sql, -1, &st, nullptr) != SQLITE_OK) return false;
    sqlite3_bind_int64(st, 1, a);
    sqlite3_bind_int64(st, 2, b);
    const int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) return false;
    deleted += sqlite3_changes(db_);
    return true;
  };
  int64_t deleted = 0;
  const auto limit = static_cast<int64_t>(maxRows);
  if (!run1("DELETE FROM suppressions WHERE (account, address) IN (SELECT account, address FROM suppressions "
            "WHERE expires_at IS NOT NULL AND expires_at <= ?1 LIMIT ?2)",
            now, limit, deleted))
    return dbError("cannot prune expired suppressions");
  if (deleted < limit) {
    // Beyond the bound: the oldest go (OFFSET skips the newest maxEntries).
    if (!run1("DELETE FROM suppressions WHERE (account, address) IN (SELECT account, address FROM suppressions "
              "ORDER BY created_at DESC LIMIT ?2 OFFSET ?1)",
              static_cast<int64_t>(maxEntries), limit - deleted, deleted))
      return dbError("cannot prune suppressions beyond the bound");
  }
  if (!txn.commit()) return dbError("cannot commit suppression prune");
  return deleted;
}

}  // namespace subrelay::queue
