// Queue schema and forward migrations (see schema.h for the versioning rules).
#include "queue/schema.h"

#include <sqlite3.h>

#include <string>

namespace subrelay::queue::schema {
namespace {

// Version 1: the initial queue.
//  - content is the last column of messages: SQLite stores a row's columns in order and
//    only follows the overflow pages of a large blob when a query asks for it, so list()
//    and the scheduler never read message bodies.
//  - recipients are their own rows because delivery state is per recipient (RFC 5321
//    section 3.3: each RCPT can succeed, defer or fail on its own).
//  - recipients_due serves the scheduler's "WHERE state IN (...) AND next_attempt <= now".
//  - No CHECK on state: adding a state later must not need a table rebuild.
constexpr const char* kV1 = R"sql(
CREATE TABLE messages (
  id             TEXT    NOT NULL PRIMARY KEY,
  account        TEXT    NOT NULL,
  mail_from      TEXT    NOT NULL,
  size           INTEGER NOT NULL,
  received_at    INTEGER NOT NULL,
  captured       INTEGER NOT NULL DEFAULT 0,
  smtputf8       INTEGER NOT NULL DEFAULT 0,
  eight_bit      INTEGER NOT NULL DEFAULT 0,
  client_address TEXT    NOT NULL DEFAULT '',
  helo           TEXT    NOT NULL DEFAULT '',
  tls_version    TEXT    NOT NULL DEFAULT '',
  tls_cipher     TEXT    NOT NULL DEFAULT '',
  content        BLOB    NOT NULL
);
CREATE INDEX messages_received ON messages(received_at, id);
CREATE TABLE recipients (
  message_id   TEXT    NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
  idx          INTEGER NOT NULL,
  address      TEXT    NOT NULL,
  state        TEXT    NOT NULL,
  attempts     INTEGER NOT NULL DEFAULT 0,
  next_attempt INTEGER NOT NULL DEFAULT 0,
  last_error   TEXT    NOT NULL DEFAULT '',
  updated_at   INTEGER NOT NULL,
  PRIMARY KEY (message_id, idx)
) WITHOUT ROWID;
CREATE INDEX recipients_due ON recipients(state, next_attempt);
)sql";

// Version 2: delivery (issue 3) and account policy (issue 5).
//  - recipients.lease_until: a scheduler that takes a recipient sets it to now + lease; a
//    crash leaves it set, and once it passes the recipient is due again (at-least-once).
//  - recipients.dsn_pending: a failed recipient whose DSN is not yet queued; the DSN and
//    the flag's reset are one transaction, so a crash neither loses nor doubles it.
//  - recipients.delay_notified: a "delayed" DSN was queued for it (only one per recipient).
//  - messages.is_dsn: a bounce we generated (never bounced itself, RFC 3464 / 5321 6.1).
//  - attempts: one row per delivery attempt per recipient (queue show history).
//  - rate_windows: day/month windows of accounts[].rate_limits, written every few seconds.
//  - meters: per-account counters since the database was created (`subrelay accounts`).
constexpr const char* kV2 = R"sql(
ALTER TABLE recipients ADD COLUMN lease_until INTEGER NOT NULL DEFAULT 0;
ALTER TABLE recipients ADD COLUMN dsn_pending INTEGER NOT NULL DEFAULT 0;
ALTER TABLE recipients ADD COLUMN delay_notified INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN is_dsn INTEGER NOT NULL DEFAULT 0;
CREATE INDEX recipients_dsn ON recipients(dsn_pending) WHERE dsn_pending = 1;
CREATE TABLE attempts (
  message_id  TEXT    NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
  idx         INTEGER NOT NULL,
  at          INTEGER NOT NULL,
  mx          TEXT    NOT NULL DEFAULT '',
  tls_version TEXT    NOT NULL DEFAULT '',
  tls_cipher  TEXT    NOT NULL DEFAULT '',
  code        INTEGER NOT NULL DEFAULT 0,
  reply       TEXT    NOT NULL DEFAULT '',
  result      TEXT    NOT NULL
);
CREATE INDEX attempts_message ON attempts(message_id, idx, at);
CREATE TABLE rate_windows (
  username     TEXT    NOT NULL,
  rule         TEXT    NOT NULL,
  window_start INTEGER NOT NULL,
  count        INTEGER NOT NULL,
  PRIMARY KEY (username, rule)
) WITHOUT ROWID;
CREATE TABLE meters (
  username          TEXT    NOT NULL PRIMARY KEY,
  accepted          INTEGER NOT NULL DEFAULT 0,
  refused_by_limit  INTEGER NOT NULL DEFAULT 0,
  recipients        INTEGER NOT NULL DEFAULT 0,
  bytes             INTEGER NOT NULL DEFAULT 0,
  auth_failures     INTEGER NOT NULL DEFAULT 0,
  updated_at        INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
)sql";

// Version 3: the delivery engine (issue 10).
//  - recipients.last_code / last_status and attempts.status: the reply code and the RFC
//    3463 status of the last attempt as columns, so DSNs and `queue show` never parse
//    them back out of a reply line. Older rows keep '' (the DSN then uses the default of
//    the reply's class).
//  - recipients.pending_request: 1 retry, 2 bounce, asked by an operator while the
//    recipient was in flight; applied when its attempt is recorded or its lease released,
//    never by starting a second attempt.
constexpr const char* kV3 = R"sql(
ALTER TABLE recipients ADD COLUMN last_code INTEGER NOT NULL DEFAULT 0;
ALTER TABLE recipients ADD COLUMN last_status TEXT NOT NULL DEFAULT '';
ALTER TABLE recipients ADD COLUMN pending_request INTEGER NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN status TEXT NOT NULL DEFAULT '';
UPDATE recipients SET last_status = '5.0.0' WHERE last_error = 'bounced by operator';
)sql";

// Version 4: retention (retention.* in the config; version 3 is another change's).
//  - finished: one row per message whose every recipient is final (delivered, or failed
//    with no DSN pending), with when that happened; a captured message has one from the
//    moment it is received (captured = 1, finished_at = received_at). content_pruned: the
//    message's content was replaced by an empty blob (retention.finished_bodies); its size
//    column keeps the original size.
//    A table of its own, not columns of messages: SQLite rewrites a whole row on UPDATE,
//    and a messages row holds the content, so marking a 25 MB message finished would read
//    and write 25 MB where this writes a few bytes. Cascades with its message.
//  - finished_due (captured, finished_at) lists what history and captured retention
//    delete, oldest first; finished_unpruned holds only the delivered messages that still
//    have their content, so pruning bodies does not walk the long list of those done.
//  - Existing rows are filled in from what the recipients say (the latest update of a
//    finished message's recipients is when it finished).
constexpr const char* kV4 = R"sql(
CREATE TABLE finished (
  message_id     TEXT    NOT NULL PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
  finished_at    INTEGER NOT NULL,
  captured       INTEGER NOT NULL DEFAULT 0,
  content_pruned INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX finished_due ON finished(captured, finished_at);
-- captured and content_pruned as columns too: with them the index covers the query.
CREATE INDEX finished_unpruned ON finished(finished_at, captured, content_pruned)
  WHERE captured = 0 AND content_pruned = 0;
INSERT INTO finished (message_id, finished_at, captured)
  SELECT id, max(received_at, 1), 1 FROM messages WHERE captured = 1;
INSERT INTO finished (message_id, finished_at)
  SELECT m.id, max(1, coalesce((SELECT max(r.updated_at) FROM recipients r WHERE r.message_id = m.id), m.received_at))
  FROM messages m WHERE m.captured = 0 AND NOT EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id
    AND (r.state IN ('queued', 'deferred') OR r.dsn_pending = 1));
)sql";

// Version 5: operations (issue 11). operator_events: what `queue drop` did while serve
// may be running, so that serve logs the "dropped" message event (one line per message
// event, joined on the queue id, in serve's log) and then deletes the row. A CLI
// command's own stderr is not where an operator's log collector looks.
constexpr const char* kV5 = R"sql(
CREATE TABLE operator_events (
  seq        INTEGER PRIMARY KEY AUTOINCREMENT,
  at         INTEGER NOT NULL,
  message_id TEXT    NOT NULL,
  account    TEXT    NOT NULL,
  event      TEXT    NOT NULL,
  recipients INTEGER NOT NULL DEFAULT 0
);
)sql";

// Version 6: MTA-STS (issue 12, RFC 8461). sts_policies: the last good policy fetched for
// each Policy Domain, so that a restart keeps applying it until it expires (3.3: a valid
// cached policy "MUST" be applied when no live one can be had, and 10.2: a cache that
// forgets makes downgrades easier). One row per domain; the parsed fields beside the text
// as served, so a load needs no parsing. checked_at: the last time discovery confirmed
// the policy (TXT id unchanged), which paces the daily refresh across restarts.
constexpr const char* kV6 = R"sql(
CREATE TABLE sts_policies (
  domain     TEXT    NOT NULL PRIMARY KEY,
  policy_id  TEXT    NOT NULL,
  mode       TEXT    NOT NULL,
  max_age    INTEGER NOT NULL,
  mx         TEXT    NOT NULL DEFAULT '',
  policy     TEXT    NOT NULL DEFAULT '',
  fetched_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL,
  checked_at INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX sts_policies_expiry ON sts_policies(expires_at);
)sql";

// Version 7: outbound TLS (issue 12). messages.tls_required (RFC 8689): 0 nothing asked,
// 1 MAIL FROM ... REQUIRETLS (every hop verified TLS with REQUIRETLS, else a bounce),
// 2 the header "TLS-Required: No" (deliver even when TLS or the domain's policy fails).
// attempts.tls_policy: which TLS policy an attempt ran under and why ("verify
// (tls_policy_overrides)", "relay verify (delivery.relay[0])"), for `queue show`.
constexpr const char* kV7 = R"sql(
ALTER TABLE messages ADD COLUMN tls_required INTEGER NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN tls_policy TEXT NOT NULL DEFAULT '';
)sql";

// Version 8: TLS reporting (issue 12, RFC 8460). tlsrpt_counts: sessions per UTC day,
// Policy Domain, applied policy and outcome (result '' = success), added to by serve once a
// minute. tlsrpt_reports: one row per (day, domain) whose report was made (or found no
// rua), written in the transaction that queues the report, so a restart never sends a
// day's report twice.
constexpr const char* kV8 = R"sql(
CREATE TABLE tlsrpt_counts (
  day          INTEGER NOT NULL,
  domain       TEXT    NOT NULL,
  policy_type  TEXT    NOT NULL,
  policy       TEXT    NOT NULL DEFAULT '',
  mx_host      TEXT    NOT NULL DEFAULT '',
  result       TEXT    NOT NULL DEFAULT '',
  receiving_mx TEXT    NOT NULL DEFAULT '',
  receiving_ip TEXT    NOT NULL DEFAULT '',
  reason       TEXT    NOT NULL DEFAULT '',
  sessions     INTEGER NOT NULL,
  PRIMARY KEY (day, domain, policy_type, policy, mx_host, result, receiving_mx, receiving_ip, reason)
) WITHOUT ROWID;
CREATE TABLE tlsrpt_reports (
  day        INTEGER NOT NULL,
  domain     TEXT    NOT NULL,
  at         INTEGER NOT NULL,
  outcome    TEXT    NOT NULL,
  message_id TEXT    NOT NULL DEFAULT '',
  PRIMARY KEY (day, domain)
) WITHOUT ROWID;
)sql";

// Version 9: idempotent submission (issue 13). idempotency_keys: the first message
// stored for an account's Idempotency-Key (idempotency.header), written in the
// transaction that inserts it; a later submission with the same key within
// idempotency.window stores nothing and gets this message_id. created_at (the first
// message's received_at) serves the window and retention's pruning of older rows.
constexpr const char* kV9 = R"sql(
CREATE TABLE idempotency_keys (
  account    TEXT    NOT NULL,
  key        TEXT    NOT NULL,
  message_id TEXT    NOT NULL,
  created_at INTEGER NOT NULL,
  PRIMARY KEY (account, key)
) WITHOUT ROWID;
CREATE INDEX idempotency_keys_created ON idempotency_keys(created_at);
)sql";

// Version 10: the DSN extension (RFC 3461, issue 13). messages.dsn_ret: RET= of MAIL
// (0 none, 1 FULL, 2 HDRS); messages.dsn_envid: ENVID= as sent (xtext, "" = none);
// recipients.dsn_notify: NOTIFY= bits (1 SUCCESS, 2 FAILURE, 4 DELAY, 8 NEVER; 0 = not
// given, the default behaviour); recipients.dsn_orcpt: ORCPT= as sent ("" = none). A
// success DSN owed after a delivery uses the dsn_pending flag of version 3.
constexpr const char* kV10 = R"sql(
ALTER TABLE messages ADD COLUMN dsn_ret INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN dsn_envid TEXT NOT NULL DEFAULT '';
ALTER TABLE recipients ADD COLUMN dsn_notify INTEGER NOT NULL DEFAULT 0;
ALTER TABLE recipients ADD COLUMN dsn_orcpt TEXT NOT NULL DEFAULT '';
)sql";

// Version 11: per-account suppression lists (issue 13). suppressions: one row per
// (account, address) that hard-bounced (source 'bounce', written in the transaction that
// records the failed attempt) or that an operator added ('manual'); address in
// policy::normalizeSuppressedAddress form; expires_at NULL = forever (suppression.ttl).
// suppression_changes: one row whose counter every change to suppressions bumps
// (triggers, so `subrelay suppression add/remove` from another process counts too);
// serve polls it every ~2 s and reloads its in-memory table when it moved.
constexpr const char* kV11 = R"sql(
CREATE TABLE suppressions (
  account    TEXT    NOT NULL,
  address    TEXT    NOT NULL,
  reason     TEXT    NOT NULL DEFAULT '',
  created_at INTEGER NOT NULL,
  expires_at INTEGER,
  source     TEXT    NOT NULL DEFAULT 'bounce',
  PRIMARY KEY (account, address)
) WITHOUT ROWID;
CREATE INDEX suppressions_expires ON suppressions(expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX suppressions_created ON suppressions(created_at);
CREATE TABLE suppression_changes (
  id      INTEGER PRIMARY KEY CHECK (id = 1),
  counter INTEGER NOT NULL
);
INSERT INTO suppression_changes (id, counter) VALUES (1, 0);
CREATE TRIGGER suppressions_ins AFTER INSERT ON suppressions
  BEGIN UPDATE suppression_changes SET counter = counter + 1 WHERE id = 1; END;
CREATE TRIGGER suppressions_upd AFTER UPDATE ON suppressions
  BEGIN UPDATE suppression_changes SET counter = counter + 1 WHERE id = 1; END;
CREATE TRIGGER suppressions_del AFTER DELETE ON suppressions
  BEGIN UPDATE suppression_changes SET counter = counter + 1 WHERE id = 1; END;
)sql";

// Version 12: the webhook outbox (webhook/). One row per event still to POST, written in
// the transaction of the state change it reports, deleted when the receiver answers 2xx.
//  - body: the JSON as it will be sent (every retry sends the same bytes and event id).
//  - next_at: when it is due; claimed_until: a dispatcher is POSTing it until then
//    (cleared at start-up: a claim of a process that died is void).
//  - webhook_events_due serves the dispatcher's "WHERE next_at <= now AND claimed_until <= now";
//    webhook_events_account serves the per-account backlog and its bound.
constexpr const char* kV12 = R"sql(
CREATE TABLE webhook_events (
  seq           INTEGER PRIMARY KEY,
  account       TEXT    NOT NULL,
  event_id      TEXT    NOT NULL,
  type          TEXT    NOT NULL,
  body          TEXT    NOT NULL,
  attempts      INTEGER NOT NULL DEFAULT 0,
  next_at       INTEGER NOT NULL,
  created_at    INTEGER NOT NULL,
  last_error    TEXT    NOT NULL DEFAULT '',
  claimed_until INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX webhook_events_due ON webhook_events(next_at);
CREATE INDEX webhook_events_account ON webhook_events(account, seq);
)sql";

constexpr Migration kMigrations[] = {
    {1, kV1},
    {2, kV2},
    {3, kV3},
    {4, kV4},
    {5, kV5},
    {6, kV6},
    {7, kV7},
    {8, kV8},
    {9, kV9},
    {10, kV10},
    {11, kV11},
    {12, kV12},
};

}  // namespace

bool readPragmaInt(sqlite3* db, const char* sql, int* out, std::string* error) {
  sqlite3_stmt* st = nullptr;
  if (sqlite3_prepare_v2(db, sql, -1, &st, nullptr) != SQLITE_OK) {
    if (error) *error = sqlite3_errmsg(db);
    return false;
  }
  bool ok = sqlite3_step(st) == SQLITE_ROW;
  if (ok) {
    *out = sqlite3_column_int(st, 0);
  } else if (error) {
    *error = sqlite3_errmsg(db);
  }
  sqlite3_finalize(st);
  return ok;
}

namespace {

bool exec(sqlite3* db, const std::string& sql, std::string* error) {
  char* msg = nullptr;
  if (sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &msg) == SQLITE_OK) return true;
  *error = msg ? msg : sqlite3_errmsg(db);
  sqlite3_free(msg);
  return false;
}

util::Error fail(sqlite3* db, std::string what) {
  // Leaves no transaction open behind a failed migration; a no-op when none is active.
  if (!sqlite3_get_autocommit(db)) sqlite3_exec(db, "ROLLBACK", nullptr, nullptr, nullptr);
  return util::makeError(std::move(what));
}

}  // namespace

std::span<const Migration> migrations() { return kMigrations; }

int readVersion(sqlite3* db, std::string* error) {
  int v = 0;
  return readPragmaInt(db, "PRAGMA user_version", &v, error) ? v : -1;
}

util::Result<int> migrate(sqlite3* db, std::span<const Migration> steps, int target) {
  std::string err;
  // IMMEDIATE takes the write lock before reading the version, so a second process that
  // opens the same file concurrently waits (busy_timeout) and then sees the new version.
  if (!exec(db, "BEGIN IMMEDIATE", &err)) return fail(db, "cannot start schema transaction: " + err);

  int appId = 0;
  if (!readPragmaInt(db, "PRAGMA application_id", &appId, &err)) return fail(db, "cannot read application_id: " + err);
  if (appId != 0 && appId != kApplicationId)
    return fail(db, "not a subrelay queue database (application_id " + std::to_string(appId) + ")");

  int version = readVersion(db, &err);
  if (version < 0) return fail(db, "cannot read schema version: " + err);
  if (version > target)
    return fail(db, "queue database schema version " + std::to_string(version) +
                        " is newer than this subrelay supports (" + std::to_string(target) +
                        "); refusing to open it (upgrade subrelay, or restore a backup)");

  const int before = version;
  for (const auto& step : steps) {
    if (step.version <= version || step.version > target) continue;
    if (!exec(db, step.sql, &err))
      return fail(db, "schema migration to version " + std::to_string(step.version) + " failed: " + err);
    version = step.version;
  }
  if (version != target) return fail(db, "no migration path to schema version " + std::to_string(target));

  // Pragmas take no bound parameters; both values are integers we produced.
  if (version != before && !exec(db, "PRAGMA user_version = " + std::to_string(version), &err))
    return fail(db, "cannot record schema version: " + err);
  if (appId != kApplicationId && !exec(db, "PRAGMA application_id = " + std::to_string(kApplicationId), &err))
    return fail(db, "cannot record application_id: " + err);
  if (!exec(db, "COMMIT", &err)) return fail(db, "cannot commit schema migration: " + err);
  return version;
}

}  // namespace subrelay::queue::schema
