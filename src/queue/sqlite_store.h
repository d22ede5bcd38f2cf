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

#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "queue/delivery_queue.h"
#include "queue/store.h"

struct sqlite3;
struct sqlite3_stmt;

namespace subrelay::queue {

// The end of one claimed event, as the dispatcher reports it back: remove (POSTed, or
// dropped) or reschedule with the attempt count, when next and why.
struct WebhookSettle {
  int64_t seq = 0;
  bool remove = false;
  int attempts = 0;
  int64_t nextAt = 0;
  std::string error;
};

// One row of the webhook outbox (schema 12, webhook_outbox.cpp).
struct WebhookEventRow {
  int64_t seq = 0;
  std::string account;
  std::string eventId;
  std::string type;
  std::string body;  // the JSON as it is POSTed
  int attempts = 0;
  int64_t nextAt = 0;
  int64_t createdAt = 0;
  std::string lastError;
};

// Per account: events still to POST (`subrelay accounts --json`, metrics).
struct WebhookBacklog {
  std::string account;
  int64_t events = 0;
  int64_t oldestCreatedAt = 0;  // 0 when none
  int64_t failing = 0;          // events tried at least once without a 2xx
  std::string lastError;        // of the most recent failing event
};

struct OpenOptions {
  bool readOnly = false;  // `queue list/show` while serve runs
  bool create = true;     // create the file and schema if missing
};

class SqliteStore final : public Store, public DeliveryQueue {
 public:
  // path: a file path, or ":memory:" for tests. data_dir is created by the caller.
  static util::Result<std::unique_ptr<SqliteStore>> open(const std::string& path, OpenOptions opts = {});
  ~SqliteStore() override;
  SqliteStore(const SqliteStore&) = delete;
  SqliteStore& operator=(const SqliteStore&) = delete;

  std::vector<util::Result<std::string>> insertBatch(const std::vector<NewMessage>& batch) override;
  util::Result<std::vector<MessageInfo>> list() override;
  util::Result<MessageInfo> show(const std::string& id) override;  // Store and DeliveryQueue
  util::Result<std::string> content(const std::string& id) override;
  util::Result<int64_t> count() override;

  // --- delivery (issue 3) ---
  // Recipients in state queued/deferred with next_attempt <= now and no lease, of messages
  // that are not captured, oldest message first, at most maxMessages messages: each gets
  // lease_until = now + kOwnedLease in the same transaction. The lease is owned (see
  // delivery_queue.h): it ends with recordAttempts/releaseLeases, or clearLeases at the
  // next start after a crash, never by the passing of time.
  util::Result<std::vector<DueMessage>> leaseDue(int64_t now, size_t maxMessages) override;
  static constexpr int64_t kOwnedLease = int64_t{100} * 365 * 24 * 3600;
  // One transaction: an attempts row each; recipients get state, attempts + 1,
  // next_attempt, last_error, updated_at = attempt.at, lease_until = 0, and
  // dsn_pending = 1 when the new state is failed, the message is not a DSN and its
  // sender is not "<>" (stored as ""). A record whose message was dropped meanwhile is
  // skipped; one whose recipient an operator bounced meanwhile only adds its attempts row,
  // unless it was delivered (a delivery always wins, and sets dsn_pending to the record's
  // successDsn: a success DSN owed, RFC 3461 NOTIFY=SUCCESS). An operator
  // request made while the attempt ran (pending_request) is applied through
  // applyOperatorRequest() and cleared. Also stores last_code / last_status.
  util::Result<void> recordAttempts(const std::vector<AttemptRecord>& records) override;
  // Clears every lease: at start-up of the one serve process of this data_dir, leases
  // left by a previous process are void (its attempts never finished). Operator requests
  // that waited for those attempts are applied (bounce) or turned into "due now" (retry).
  util::Result<void> clearLeases();
  // Releases leases without counting an attempt (shutdown with work in hand), applying a
  // waiting operator request the same way.
  util::Result<void> releaseLeases(const std::string& messageId, const std::vector<int64_t>& indexes) override;
  // Earliest next_attempt (or lease_until, if later) among deliverable recipients;
  // nullopt when none: the scheduler's timer.
  util::Result<std::optional<int64_t>> nextDue();
  // Recipients with dsn_pending = 1, grouped per message, at most maxMessages.
  util::Result<std::vector<DsnWork>> pendingDsns(size_t maxMessages) override;
  // One transaction: inserts the DSN (when given; its isDsn should be true) and clears
  // dsn_pending of those recipients. With a null sender (or a DSN as the original, or an
  // original dropped meanwhile) nothing is inserted. The inserted message gets isDsn = true.
  util::Result<void> completeDsn(const std::string& messageId, const std::vector<int64_t>& indexes,
                                 const std::optional<NewMessage>& dsn) override;
  // Deferred recipients of non-DSN messages with a real sender, received before
  // `receivedBefore` and not yet notified: for the "delayed" DSN.
  util::Result<std::vector<DsnWork>> pendingDelayNotices(int64_t receivedBefore, size_t maxMessages) override;
  // Like completeDsn, but sets delay_notified = 1.
  util::Result<void> completeDelayNotice(const std::string& messageId, const std::vector<int64_t>& indexes,
                                         const std::optional<NewMessage>& dsn) override;
  // Operators. Each returns the number of recipients (or messages for drop) changed; an id
  // that is not in the queue is an error "no such message: ID" (not 0), so the CLI can
  // tell "nothing to do" from "wrong id".
  // retry: next_attempt = 0 for queued/deferred recipients of id (or all) that are not in
  // flight; those in flight get a retry request, applied when the attempt ends (a
  // deferral is then due at once). Never a second attempt beside a running one.
  util::Result<int64_t> retryNow(const std::optional<std::string>& id);
  // drop: deletes the message, its recipients and attempts.
  util::Result<int64_t> drop(const std::string& id);
  // bounce: queued/deferred recipients -> failed, last_error "bounced by operator",
  // dsn_pending = 1 (unless DSN/null sender); the running scheduler then sends the DSN.
  // Recipients in flight get a bounce request instead: if the attempt delivers, the
  // delivery stands; otherwise they are bounced when it ends.
  util::Result<int64_t> bounce(const std::string& id);

  // --- retention ---
  // One small batch in one short write transaction, at most maxRows messages in all, in
  // this order: captured messages received at or before now - policy.captured are deleted;
  // finished messages (finished_at > 0) finished at or before now - policy.history are
  // deleted; finished messages finished at or before now - policy.finishedBodies get an
  // empty content and content_pruned = 1. Recipients and attempts go with a deleted
  // message (ON DELETE CASCADE). A message with a recipient queued, deferred or with a
  // DSN pending is never touched. Call again while the counts add up to maxRows.
  util::Result<PruneCounts> prune(int64_t now, const RetentionPolicy& policy, size_t maxRows);
  // PRAGMA incremental_vacuum: gives back to the file system up to maxPages of the free
  // pages beyond the first keepFreePages (those stay for new messages to reuse, so a steady
  // queue does not shrink and regrow its file). Returns the pages released. The file
  // shrinks at the next WAL checkpoint.
  util::Result<int64_t> incrementalVacuum(int64_t maxPages, int64_t keepFreePages = 0);
  // Free pages in the file (PRAGMA freelist_count) and the page count, for logs and tests.
  util::Result<std::pair<int64_t, int64_t>> freeAndTotalPages();

  // --- account policy (issue 5) ---
  // Upserts rows (username, rule) -> (window_start, count); one transaction.
  util::Result<void> saveRateWindows(const std::vector<RateWindowRow>& rows);
  util::Result<std::vector<RateWindowRow>> loadRateWindows();
  // Adds the deltas to each account's counters (upsert); one transaction.
  util::Result<void> addMeters(const std::vector<MeterRow>& deltas, int64_t now);
  util::Result<std::vector<MeterRow>> loadMeters();

  // Operations: recipients waiting by state, and messages received since a time by
  // account (still in the queue: retention may have removed older ones).
  util::Result<QueueStats> queueStats();
  util::Result<std::vector<AccountActivity>> acceptedSince(int64_t since);
  // Operator actions recorded for serve to log (drop), oldest first, deleted as taken.
  util::Result<std::vector<OperatorEvent>> takeOperatorEvents(size_t max);

  // --- MTA-STS policy cache (issue 12) ---
  // Inserts or replaces the domain's row (one policy per domain).
  util::Result<void> saveStsPolicy(const StsPolicyRow& row);
  // Sets checked_at of the domain's row; 0 rows changed is not an error.
  util::Result<void> touchStsPolicy(const std::string& domain, int64_t checkedAt);
  util::Result<std::optional<StsPolicyRow>> loadStsPolicy(const std::string& domain);
  // Every row, by domain (start-up preload, operators).
  util::Result<std::vector<StsPolicyRow>> loadStsPolicies();
  // Deletes rows that expired at or before `expiredBefore`; returns how many.
  util::Result<int64_t> pruneStsPolicies(int64_t expiredBefore);

  // --- TLS reporting (RFC 8460, issue 12) ---
  // Adds the rows' sessions to the stored counts (upsert); one transaction.
  util::Result<void> addTlsRpt(const std::vector<TlsRptRow>& rows);
  // (day, domain) pairs with counts for a day before `beforeDay` and no report made yet,
  // oldest first, at most max.
  util::Result<std::vector<std::pair<int64_t, std::string>>> tlsRptPending(int64_t beforeDay, size_t max);
  // The counts of one day; domain "" = every domain.
  util::Result<std::vector<TlsRptRow>> tlsRptRows(int64_t day, const std::string& domain);
  // Records that the (day, domain) report was made ("sent", "no-rua", ...) and queues
  // `report` (when given) in the same transaction. False (nothing queued) when the pair
  // was already recorded.
  util::Result<bool> completeTlsRpt(int64_t day, const std::string& domain, const std::string& outcome, int64_t now,
                                    const std::optional<NewMessage>& report);
  // Deletes counts and report records of days before `beforeDay`; returns the rows deleted.
  util::Result<int64_t> pruneTlsRpt(int64_t beforeDay);

  // --- suppression lists (issue 13) ---
  // Inserts or replaces the (account, address) row; one transaction.
  util::Result<void> upsertSuppression(const SuppressionRow& row);
  // Deletes the row; returns 1, or 0 when there was none.
  util::Result<int64_t> removeSuppression(const std::string& account, const std::string& address);
  // An account's rows ("" = every account), expired ones included (the caller shows or
  // filters them), oldest first.
  util::Result<std::vector<SuppressionRow>> listSuppressions(const std::string& account);
  // Rows not expired at `now`, newest first, at most maxRows (serve's in-memory table).
  util::Result<std::vector<SuppressionRow>> loadLiveSuppressions(int64_t now, size_t maxRows);
  // Live rows per account.
  util::Result<std::vector<std::pair<std::string, uint64_t>>> suppressionCounts(int64_t now);
  // Moves on every change to the table, from any process (triggers): serve's reload cue.
  util::Result<int64_t> suppressionChanges();
  // One short batch: deletes rows expired at or before `now`, then, beyond `maxEntries`
  // rows in all, the oldest; at most maxRows deletions. Returns the rows deleted.
  util::Result<int64_t> pruneSuppressions(int64_t now, size_t maxEntries, size_t maxRows);

  // --- webhook outbox (webhook/, schema 12; webhook_outbox.cpp) ---
  // Which event types ("accepted", "delivered", ...) each account's webhook wants. Accounts
  // not in the map get no rows. With an empty map (the default) nothing is written and
  // insertBatch / recordAttempts pay nothing. Each connection that writes state changes
  // (submission, delivery results, operator commands) needs it.
  void setWebhookEvents(std::map<std::string, std::set<std::string>> events);
  // Inside the caller's transaction (the suppression check): queues a "suppressed" event
  // when the account wants it. "" on success (or nothing to do), else why not.
  std::string enqueueSuppressedLocked(const std::string& account, const std::string& messageId,
                                      const std::string& sender, const std::string& recipient,
                                      const std::string& reason, int64_t at);
  // The same for a hard bounce of recipient `index` of `messageId` that `row` adds to the
  // suppression list (sender read from the message; none for our own DSNs).
  std::string enqueueBounceSuppressedLocked(const SuppressionRow& row, const std::string& messageId, int64_t index);
  // A captured message's simulated bounces (NewMessage::simulatedBounces): "bounced" and
  // "suppressed" events, after the message's "accepted" ones, in the insert's transaction.
  std::string enqueueSimulatedBouncesLocked(const NewMessage& m);
  // Own transaction: queues `body` as event `eventId` of `type` (bench and tests).
  util::Result<void> enqueueWebhookEvent(const std::string& account, const std::string& eventId,
                                         const std::string& type, const std::string& body, int64_t at);
  // Due events (next_at <= now, not claimed), oldest first, at most max; each gets
  // claimed_until = claimUntil in the same transaction.
  // `settle` first applies what the dispatcher learnt since its last call (events POSTed:
  // deleted; failed: rescheduled; dropped: deleted), in the same transaction, so a busy
  // dispatcher pays one write transaction per tick, not one per event.
  util::Result<std::vector<WebhookEventRow>> claimWebhookEvents(int64_t now, size_t max, int64_t claimUntil,
                                                                const std::vector<WebhookSettle>& settle = {});
  util::Result<void> deleteWebhookEvent(int64_t seq);
  // A failed POST: attempts, next_at and last_error set, claim cleared.
  util::Result<void> rescheduleWebhookEvent(int64_t seq, int attempts, int64_t nextAt, const std::string& error);
  // Start-up: claims of a process that died are void.
  util::Result<void> clearWebhookClaims();
  // Deletes the account's oldest events beyond `keep`; returns how many.
  util::Result<int64_t> trimWebhookBacklog(const std::string& account, uint64_t keep);
  util::Result<std::vector<WebhookBacklog>> webhookBacklog();
  // Earliest next_at (or claimed_until if later) of any event; nullopt when none.
  util::Result<std::optional<int64_t>> nextWebhookDue();
  struct WebhookOutbox;

  int schemaVersion() const;
  static constexpr int kSchemaVersion = 12;

 private:
  SqliteStore(sqlite3* db, int version, bool readOnly);
  util::Result<MessageInfo> showLocked(const std::string& id);
  util::Error dbError(const std::string& what) const;
  // Inserts one message and its recipients inside the caller's transaction: "" on
  // success, else why not (the caller rolls back).
  std::string insertMessageLocked(const NewMessage& m);
  // completeDsn / completeDelayNotice: `delay` picks the flag.
  util::Result<void> completeNotice(const std::string& messageId, const std::vector<int64_t>& indexes,
                                    const std::optional<NewMessage>& dsn, bool delay);
  // Sets finished_at (the latest recipient update) on a message none of whose recipients
  // is still waiting or has a DSN pending; inside the caller's transaction.
  util::Result<void> markFinishedLocked(const std::string& id);
  // suppressions upsert inside the caller's transaction ("" or why not).
  std::string addSuppressionLocked(const SuppressionRow& row);
  // Captured recipients that bounce at once (NewMessage::simulatedBounces), inside the
  // caller's transaction ("" or why not).
  std::string simulateBouncesLocked(const NewMessage& m);
  // "no such message" unless id exists (inside the caller's transaction).
  util::Result<void> requireMessageLocked(const std::string& id);

  // Inside the caller's transaction: events for a newly stored message (accepted), a
  // recorded attempt, or an operator's bounce of recipient `index`. "" or why not.
  std::string enqueueAcceptedLocked(const NewMessage& m);
  std::string enqueueAttemptLocked(const AttemptRecord& rec);
  std::string enqueueOperatorBounceLocked(const std::string& messageId, int64_t index, int64_t at);
  // The recipients bounce() fails at once (not in flight); empty when no webhook wants events.
  util::Result<std::vector<int64_t>> operatorBounceCandidatesLocked(const std::string& messageId);
  // The recipients clearLeases() bounces (an operator's request waiting for a dead lease).
  util::Result<std::vector<std::pair<std::string, int64_t>>> pendingBouncesLocked();
  std::string insertWebhookRowLocked(const std::string& account, const std::string& eventId, const std::string& type,
                                     const std::string& body, int64_t at);
  bool webhookWants(const std::string& account, const char* type) const;
  sqlite3_stmt* webhookStmt(int which);

  struct Statements;
  std::mutex mu_;
  std::map<std::string, std::set<std::string>> webhookEvents_;
  std::unique_ptr<WebhookOutbox, void (*)(WebhookOutbox*)> hook_{nullptr, nullptr};
  sqlite3* db_;
  int version_;
  bool readOnly_;
  bool lastOutOfSpace_ = false;  // set by insertMessageLocked on a failed step
  std::unique_ptr<Statements> stmts_;
};

}  // namespace subrelay::queue
