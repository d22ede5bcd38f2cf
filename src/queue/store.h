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
#include <string_view>
#include <vector>

#include "util/result.h"

namespace subrelay::queue {

// Recipient states, typed in code and stored as their names (`queue list` shows them):
//   Queued    : waiting for its first or next delivery attempt
//   Deferred  : a temporary failure happened; next_attempt says when
//   Delivered : a 2xx from the recipient's MX
//   Failed    : permanent failure or expired; a DSN was generated
//   Captured  : account in capture mode: stored, never delivered
enum class RecipientState { Queued, Deferred, Delivered, Failed, Captured };
std::string_view stateName(RecipientState s);
std::optional<RecipientState> parseRecipientState(std::string_view s);
// Still waiting for delivery (the scheduler may act on it).
inline bool deliverable(RecipientState s) { return s == RecipientState::Queued || s == RecipientState::Deferred; }

// An RFC 3463 enhanced status code "class.subject.detail" (class 2, 4 or 5; subject and
// detail 0..999). Stored as its text in recipients.last_status and attempts.status, so
// DSNs and `queue show` never re-parse it out of a reply line.
struct EnhancedStatus {
  int klass = 0;  // 0 = none
  int subject = 0;
  int detail = 0;
  bool valid() const { return klass != 0; }
  bool permanent() const { return klass == 5; }
  std::string str() const;  // "5.1.1", "" when invalid
  static std::optional<EnhancedStatus> parse(std::string_view s);  // strict "d.ddd.ddd"
  // The code a reply carries, else the default of its class ("5.0.0", "4.0.0", "2.0.0"),
  // else none (code 0 and no enhanced code).
  static EnhancedStatus fromReply(int code, std::string_view enhanced);
  friend bool operator==(const EnhancedStatus&, const EnhancedStatus&) = default;
};

// What an operator asked for while a recipient's attempt was in flight (`queue retry`,
// `queue bounce`): applied when the attempt's result is recorded or its lease released,
// so an in-flight recipient is never attempted twice.
enum class OperatorRequest { None = 0, Retry = 1, Bounce = 2 };

// RFC 8689: what the sender asked of the TLS on every onward hop. Required: MAIL FROM
// REQUIRETLS (verified TLS to a server that offers REQUIRETLS, else a bounce). Optional:
// the header "TLS-Required: No" (deliver even where TLS or a domain's TLS policy fails).
enum class TlsRequirement { Default = 0, Required = 1, Optional = 2 };

// RFC 3461 DSN parameters. NOTIFY bits (the values of smtp::kNotify*): 0 = NOTIFY not
// given (the default behaviour: failure and delay notices).
inline constexpr int kDsnNotifySuccess = 1;
inline constexpr int kDsnNotifyFailure = 2;
inline constexpr int kDsnNotifyDelay = 4;
inline constexpr int kDsnNotifyNever = 8;
// RET= of MAIL (RFC 3461 4.3).
enum class DsnRet { Unspecified = 0, Full = 1, Hdrs = 2 };
struct RecipientDsn {
  int notify = 0;       // kDsnNotify* bits
  std::string orcpt;    // ORCPT= as received ("rfc822;bob+2B1@example.net"), "" = none
};

// --- suppression lists (issue 13) ----------------------------------------------------

// One row of the suppressions table (policy::Suppression in the queue's terms). address
// is already in its normal form (policy::normalizeSuppressedAddress).
struct SuppressionRow {
  std::string account;
  std::string address;
  std::string reason;     // one line, bounded (policy::cleanSuppressionReason)
  int64_t createdAt = 0;  // unix seconds
  int64_t expiresAt = 0;  // unix seconds, 0 = never (stored as NULL)
  std::string source = "bounce";  // "bounce" or "manual"
  bool expired(int64_t now) const { return expiresAt != 0 && expiresAt <= now; }
};

// A recipient of a captured message recorded as failed at once instead of captured (the
// reserved capture-mode address, policy::isSimulatedBounceAddress): state failed with this
// reply, one attempts row, a DSN pending like any failure, and `suppress` (when set) added
// to the suppressions table in the same transaction.
struct SimulatedBounce {
  int64_t index = 0;  // recipient index
  int code = 550;
  EnhancedStatus status{5, 1, 1};
  std::string reply;
  std::optional<SuppressionRow> suppress;
};

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
  TlsRequirement tlsRequirement = TlsRequirement::Default;
  std::string clientAddress;
  std::string heloName;
  std::string tlsVersion;               // "" when no TLS
  std::string tlsCipher;
  int64_t receivedAt = 0;               // unix seconds
  // Idempotent submission (idempotency.*): the client's key ("" = none). When the account
  // stored a message with the same key at or after receivedAt - idempotencyWindow, this
  // one is not stored and insertBatch() returns that message's id instead of `id`.
  std::string idempotencyKey;
  int64_t idempotencyWindow = 0;        // seconds
  // DSN extension (RFC 3461): RET, ENVID (xtext as received, "" = none) and per recipient
  // NOTIFY/ORCPT; recipientDsn is empty (none given) or parallel to recipients.
  DsnRet dsnRet = DsnRet::Unspecified;
  std::string dsnEnvid;
  std::vector<RecipientDsn> recipientDsn;
  // Captured messages only: recipients that "bounce" at once (see SimulatedBounce).
  std::vector<SimulatedBounce> simulatedBounces;
};

struct RecipientInfo {
  int64_t index = 0;
  std::string address;
  RecipientState state = RecipientState::Queued;
  int64_t attempts = 0;
  int64_t nextAttempt = 0;              // unix seconds, 0 = none
  std::string lastError;
  int lastCode = 0;               // the last attempt's reply code, 0 = none
  EnhancedStatus lastStatus;      // the last attempt's (or the operator's) status
  int64_t updatedAt = 0;
  int64_t leaseUntil = 0;
  bool dsnPending = false;
  OperatorRequest request = OperatorRequest::None;
  RecipientDsn dsn;               // NOTIFY / ORCPT given at submission
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
  EnhancedStatus status;    // RFC 3463 code of the reply or of the local reason
  std::string result;       // "delivered" "deferred" "failed" "expired"
  // The TLS policy the attempt ran under and where it came from: "opportunistic",
  // "verify (tls_policy_overrides)", "relay verify (delivery.relay[0])", ...; "" when no
  // connection was tried.
  std::string tlsPolicy;
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
  TlsRequirement tlsRequirement = TlsRequirement::Default;
  // Retention: when the last recipient became final (delivered, or failed with its DSN
  // queued; received_at for a captured message), 0 while any is waiting. contentPruned:
  // the message bytes were removed (retention.finished_bodies); content() says so.
  int64_t finishedAt = 0;
  bool contentPruned = false;
  DsnRet dsnRet = DsnRet::Unspecified;  // RET= given at submission
  std::string dsnEnvid;                 // ENVID= (xtext) given at submission, "" = none
  std::vector<RecipientInfo> recipients;
  std::vector<AttemptInfo> attempts;  // filled by show(), oldest first; empty in list()
};

// --- delivery (issue 3) -------------------------------------------------------------

// A message with the recipients a scheduler just leased.
struct DueRecipient {
  int64_t index = 0;
  std::string address;
  int64_t attempts = 0;  // attempts so far
  RecipientDsn dsn;      // NOTIFY / ORCPT, passed on to a server that offers DSN
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
  TlsRequirement tlsRequirement = TlsRequirement::Default;
  DsnRet dsnRet = DsnRet::Unspecified;
  std::string dsnEnvid;
  std::vector<DueRecipient> recipients;  // only the leased ones
};

// The outcome of one attempt for one recipient, written by recordAttempts().
struct AttemptRecord {
  std::string messageId;
  int64_t index = 0;
  AttemptInfo attempt;          // row for the attempts table (attempt.index ignored)
  RecipientState newState = RecipientState::Deferred;  // Delivered / Deferred / Failed
  int64_t nextAttempt = 0;      // for deferred
  std::string lastError;        // "" for delivered
  EnhancedStatus lastStatus;    // usually attempt.status; "4.4.7" when expired
  // Delivered only: a success DSN is owed by us (NOTIFY=SUCCESS and the next hop did not
  // take the request on, RFC 3461 5.2.2 (b)); stored as dsn_pending = 1.
  bool successDsn = false;
  // A hard bounce of an account that keeps a suppression list: stored in the same
  // transaction when the record's final state is failed (policy::isHardBounce decides).
  std::optional<SuppressionRow> suppress;
};

// The record as it is stored when an operator asked for `request` while the attempt ran:
// Retry turns a deferral into "due now"; Bounce turns a deferral into a failure "bounced
// by operator" (5.0.0); a delivery or a permanent failure of the attempt itself stands.
AttemptRecord applyOperatorRequest(AttemptRecord record, OperatorRequest request);

// Recipients whose DSN is not queued yet (dsn_pending = 1), per message: failed ones,
// and delivered ones owed a success DSN.
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

// --- operations (metrics, `subrelay status`) ---------------------------------------

struct QueueStats {
  uint64_t queued = 0;     // never attempted, not in flight
  uint64_t deferred = 0;   // waiting for a retry, not in flight
  uint64_t inFlight = 0;   // leased by an attempt
  int64_t oldestReceivedAt = 0;  // unix seconds; 0 when nothing waits
};

struct OperatorEvent {
  int64_t at = 0;
  std::string messageId;
  std::string account;
  std::string event;  // "dropped"
  uint64_t recipients = 0;
};

// --- MTA-STS (RFC 8461) policy cache -------------------------------------------------

// One cached policy (delivery/mta_sts.h CachedPolicy, in the queue's terms).
struct StsPolicyRow {
  std::string domain;  // the Policy Domain, lower-case A-labels
  std::string policyId;
  std::string mode;    // "enforce", "testing", "none"
  int64_t maxAge = 0;
  std::vector<std::string> mx;  // patterns, in the policy's order
  std::string text;    // the policy as served
  int64_t fetchedAt = 0;  // unix seconds
  int64_t expiresAt = 0;
  int64_t checkedAt = 0;
};

// --- TLS-RPT (RFC 8460) session counts ---------------------------------------------

// Sessions counted for one UTC day, Policy Domain, applied policy and outcome. Successes
// have an empty result; a failure's result is an RFC 8460 4.3 result type, with the MX
// host, its address and a reason code. Counts for the same key add up.
struct TlsRptRow {
  int64_t day = 0;             // unix seconds of 00:00 UTC
  std::string domain;          // the Policy Domain, lower-case A-labels
  std::string policyType;      // "sts", "tlsa", "no-policy-found"
  std::vector<std::string> policy;  // policy-string lines (RFC 8460 4.5)
  std::vector<std::string> mxHost;  // mx-host patterns (sts), or the MX host (tlsa)
  std::string result;          // "" = successful sessions, else the result-type
  std::string receivingMx;
  std::string receivingIp;
  std::string reason;          // failure-reason-code
  int64_t sessions = 0;
};

struct AccountActivity {
  std::string account;
  uint64_t messages = 0;
  uint64_t captured = 0;
};

// --- retention ----------------------------------------------------------------------

// config retention.* in seconds (SqliteStore::prune()).
struct RetentionPolicy {
  int64_t finishedBodies = 0;          // after finished_at: content removed
  int64_t history = 30 * 24 * 3600;    // after finished_at: the message deleted
  int64_t captured = 7 * 24 * 3600;    // after received_at: a captured message deleted
  int64_t idempotencyKeys = 24 * 3600; // idempotency.window: after created_at, a key forgotten
  // Suppression lists: rows past expires_at go; beyond this many rows in all, the oldest
  // (policy::SuppressionTable::kDefaultMaxEntries, the in-memory table's bound).
  size_t maxSuppressions = 1'000'000;
};

// What one prune() batch did, in messages.
struct PruneCounts {
  int64_t bodiesRemoved = 0;     // finished messages whose content was emptied
  int64_t finishedDeleted = 0;   // finished messages deleted with their history
  int64_t capturedDeleted = 0;   // captured messages deleted
  int64_t keysDeleted = 0;       // idempotency keys older than the window (rows, not messages)
  int64_t suppressionsDeleted = 0;  // expired (or beyond the bound) suppression rows
  int64_t rows() const { return bodiesRemoved + finishedDeleted + capturedDeleted + keysDeleted + suppressionsDeleted; }
};

// When to run the next prune batch, from what the last one did: at once (after `busy`,
// which lets the writers in between) while a batch came back full, since more is waiting;
// after `trickle` when it did some work; after `idle` when there was nothing to do; after
// `error` when it failed. Pure: the delivery service runs it on a timer.
struct PrunePacer {
  size_t maxRows = 64;            // messages per prune() batch (keeps the write lock short)
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
  // them all. Returns one result per input, in order: the id the message is stored
  // under, which is the id of an earlier message (stored before, or earlier in the same
  // batch) when the message repeats its idempotency key within the window; then nothing
  // is stored for it.
  virtual std::vector<util::Result<std::string>> insertBatch(const std::vector<NewMessage>& batch) = 0;

  virtual util::Result<std::vector<MessageInfo>> list() = 0;
  virtual util::Result<MessageInfo> show(const std::string& id) = 0;
  virtual util::Result<std::string> content(const std::string& id) = 0;
  virtual util::Result<int64_t> count() = 0;
};

}  // namespace subrelay::queue
