// queue::Store: the durable message queue (SQLite in data_dir).
//
// Durability contract (README.md): insertBatch() returns only after the transaction that
// holds every message of the batch is committed with synchronous=FULL in WAL mode, i.e.
// fsynced. The SMTP "250" after DATA is sent only after that.
//
// Group commit: GroupCommitter (group_commit.h) feeds one writer thread that takes every
// request queued while the previous commit was running and commits them in one
// transaction, so N concurrent sessions share one fsync instead of paying N.
//
// Not here: delivery scheduling (delivery/, issue 3), retry maths beyond storing the
// schedule's result.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "util/result.h"

namespace subrelay::queue {

// Recipient states as stored and shown by `queue list`.
//   queued    : waiting for its first or next delivery attempt
//   deferred  : a temporary failure happened; next_attempt says when
//   delivered : a 2xx from the recipient's MX
//   failed    : permanent failure or expired; a DSN was generated
//   captured  : account in capture mode: stored, never delivered
inline constexpr const char* kStateQueued = "queued";
inline constexpr const char* kStateDeferred = "deferred";
inline constexpr const char* kStateDelivered = "delivered";
inline constexpr const char* kStateFailed = "failed";
inline constexpr const char* kStateCaptured = "captured";

struct NewMessage {
  std::string id;                       // from newQueueId()
  std::string account;
  std::string mailFrom;                 // "" = null sender
  std::vector<std::string> recipients;
  std::string content;                  // full message bytes after fix-ups, CRLF
  bool captured = false;
  bool smtputf8 = false;
  bool eightBit = false;
  bool isDsn = false;                   // a bounce we generated: never bounced itself
  std::string clientAddress;
  std::string heloName;
  std::string tlsVersion;               // "" when no TLS
  std::string tlsCipher;
  int64_t receivedAt = 0;               // unix seconds
};

struct RecipientInfo {
  int64_t index = 0;
  std::string address;
  std::string state;
  int64_t attempts = 0;
  int64_t nextAttempt = 0;              // unix seconds, 0 = none
  std::string lastError;
  int64_t updatedAt = 0;
  int64_t leaseUntil = 0;
  bool dsnPending = false;
};

// One delivery attempt of one recipient (the attempts table; `queue show` history).
struct AttemptInfo {
  int64_t index = 0;        // recipient index
  int64_t at = 0;           // unix seconds
  std::string mx;           // "mx1.example.com [127.0.0.11]:25", "" when no connection
  std::string tlsVersion;   // "" = plaintext / none
  std::string tlsCipher;
  int code = 0;             // SMTP reply code, 0 when none (DNS, network)
  std::string reply;        // reply text or local reason
  std::string result;       // "delivered" "deferred" "failed"
};

struct MessageInfo {
  std::string id;
  std::string account;
  std::string mailFrom;
  int64_t size = 0;
  int64_t receivedAt = 0;
  bool captured = false;
  bool smtputf8 = false;
  std::string clientAddress;
  std::string heloName;
  std::string tlsVersion;
  std::string tlsCipher;
  bool isDsn = false;
  bool eightBit = false;
  // Retention: when the last recipient became final (delivered, or failed with its DSN
  // queued; received_at for a captured message), 0 while any is waiting. contentPruned:
  // the message bytes were removed (retention.finished_bodies); content() says so.
  int64_t finishedAt = 0;
  bool contentPruned = false;
  std::vector<RecipientInfo> recipients;
  std::vector<AttemptInfo> attempts;  // filled by show(), oldest first; empty in list()
};

// --- delivery (issue 3) -------------------------------------------------------------

// A message with the recipients a scheduler just leased.
struct DueRecipient {
  int64_t index = 0;
  std::string address;
  int64_t attempts = 0;  // attempts so far
};
struct DueMessage {
  std::string id;
  std::string account;
  std::string mailFrom;
  int64_t size = 0;
  int64_t receivedAt = 0;
  bool smtputf8 = false;
  bool eightBit = false;
  bool isDsn = false;
  std::vector<DueRecipient> recipients;  // only the leased ones
};

// The outcome of one attempt for one recipient, written by recordAttempts().
struct AttemptRecord {
  std::string messageId;
  int64_t index = 0;
  AttemptInfo attempt;          // row for the attempts table (attempt.index ignored)
  std::string newState;         // kStateDelivered / kStateDeferred / kStateFailed
  int64_t nextAttempt = 0;      // for deferred
  std::string lastError;        // "" for delivered
};

// Failed recipients whose DSN is not queued yet (dsn_pending = 1), per message.
struct DsnWork {
  MessageInfo message;                 // recipients: only the pending ones
};

// --- account policy (issue 5) -------------------------------------------------------

struct RateWindowRow {
  std::string username;
  std::string rule;          // "messages_per_day"
  int64_t windowStart = 0;   // unix seconds
  uint64_t count = 0;
};

struct MeterRow {
  std::string username;
  uint64_t accepted = 0;
  uint64_t refusedByLimit = 0;
  uint64_t recipients = 0;
  uint64_t bytes = 0;
  uint64_t authFailures = 0;
  int64_t updatedAt = 0;
};

// --- retention ----------------------------------------------------------------------

// config retention.* in seconds (SqliteStore::prune()).
struct RetentionPolicy {
  int64_t finishedBodies = 0;          // after finished_at: content removed
  int64_t history = 30 * 24 * 3600;    // after finished_at: the message deleted
  int64_t captured = 7 * 24 * 3600;    // after received_at: a captured message deleted
};

// What one prune() batch did, in messages.
struct PruneCounts {
  int64_t bodiesRemoved = 0;     // finished messages whose content was emptied
  int64_t finishedDeleted = 0;   // finished messages deleted with their history
  int64_t capturedDeleted = 0;   // captured messages deleted
  int64_t rows() const { return bodiesRemoved + finishedDeleted + capturedDeleted; }
};

// When to run the next prune batch, from what the last one did: at once (after `busy`,
// which lets the writers in between) while a batch came back full, since more is waiting;
// after `trickle` when it did some work; after `idle` when there was nothing to do; after
// `error` when it failed. Pure: the delivery service runs it on a timer.
struct PrunePacer {
  size_t maxRows = 256;           // messages per prune() batch
  int64_t maxVacuumPages = 1024;  // pages per incrementalVacuum() call
  std::chrono::milliseconds busy{50};
  std::chrono::milliseconds trickle{2000};
  std::chrono::milliseconds idle{5000};
  std::chrono::milliseconds error{30000};

  std::chrono::milliseconds next(const PruneCounts& last, int64_t pagesVacuumed, bool failed) const {
    if (failed) return error;
    if (last.rows() >= static_cast<int64_t>(maxRows) || pagesVacuumed >= maxVacuumPages) return busy;
    if (last.rows() > 0 || pagesVacuumed > 0) return trickle;
    return idle;
  }
};

// A queue id: 16 lower-case hex characters, time-ordered (48-bit milliseconds since the
// epoch, then 16 random bits), unique across restarts in practice; insert fails on a
// collision and the caller retries with a new one.
std::string newQueueId();

class Store {
 public:
  virtual ~Store() = default;

  // One transaction, one fsync, for the whole batch. Each message succeeds or fails on
  // its own (a failing insert is rolled back to a savepoint); an error on COMMIT fails
  // them all. Returns one result per input, in order.
  virtual std::vector<util::Result<std::string>> insertBatch(const std::vector<NewMessage>& batch) = 0;

  virtual util::Result<std::vector<MessageInfo>> list() = 0;
  virtual util::Result<MessageInfo> show(const std::string& id) = 0;
  virtual util::Result<std::string> content(const std::string& id) = 0;
  virtual util::Result<int64_t> count() = 0;
};

}  // namespace subrelay::queue
