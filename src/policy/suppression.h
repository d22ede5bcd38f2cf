// Per-account suppression list (issue 13): recipients that hard-bounced (or that an
// operator added) and that the account may not send to again. I/O-free: the queue stores
// the rows (table suppressions), serve keeps a SuppressionTable of them in memory and asks
// it at RCPT, before rate limits and before anything is queued.
//
// Not here: storage (queue/sqlite_store), reloading (app/suppression_sync), the CLI.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace subrelay::policy {

// The form an address is stored and looked up in: the domain as a lower-case A-label
// (idna::toAscii), the local part kept as written (RFC 5321 2.4: local parts may be case
// sensitive; a receiving MTA decides). Angle brackets and surrounding blanks are removed.
// nullopt for an address without "@", with an empty part, or with a domain IDNA refuses.
std::optional<std::string> normalizeSuppressedAddress(std::string_view address);

// A reason as stored and shown: one line (CR, LF, TAB and other control characters become
// spaces, runs of blanks one space), trimmed, at most kMaxReasonBytes bytes (cut on a
// UTF-8 character boundary). Empty input gives "".
constexpr size_t kMaxReasonBytes = 300;
std::string cleanSuppressionReason(std::string_view reason);

// "2026-12-03 05:10:00 UTC"
std::string suppressionDate(int64_t unixSeconds);

// The RCPT refusal (RFC 5321 4.2.2 / RFC 3463 3.2 X.1.1, "bad destination mailbox"):
// text without the code, e.g. "<bob@example.com>: recipient suppressed since
// 2026-12-03 05:10:00 UTC: 550 5.1.1 user unknown". Code 550, enhanced "5.1.1".
constexpr int kRefusalCode = 550;
constexpr const char* kRefusalEnhanced = "5.1.1";
std::string suppressionRefusalText(std::string_view address, int64_t since, std::string_view reason);

// Whether a permanent delivery failure is a hard bounce: the recipient's mailbox does not
// exist or cannot take mail for good, so later mail to it would bounce too.
//  code: the remote server's reply code (0 = no reply: DNS, connection, TLS, a local
//        decision, an expiry: never a hard bounce, those say nothing about the mailbox).
//  enhanced: the reply's own RFC 3463 code as the server sent it ("" when none).
//  stage: smtp::RecipientResult::stage; only "rcpt" and "data-end" speak of recipients
//        (a refused MAIL FROM is about the sender; "data" is the DATA command).
// RFC 3463 3.2 (X.1.x addressing): 5.1.0 other address status, 5.1.1 bad destination
// mailbox, 5.1.2 bad destination system, 5.1.3 bad destination mailbox syntax, 5.1.4
// ambiguous, 5.1.6 mailbox moved, 5.1.10 null MX (RFC 7505) are hard; 5.1.5 (destination
// valid), 5.1.7 and 5.1.8 (the sender's address) are not. RFC 3463 3.3 (X.2.x mailbox):
// only 5.2.1 "mailbox disabled, not accepting messages"; 5.2.0 says the mailbox exists,
// and 5.2.2 "mailbox full" is a persistent transient failure that may clear. X.7.x
// (policy: spam, DMARC, TLS) and everything else are not. Without an enhanced code: 550
// (mailbox unavailable), 551 (user not local) and 553 (mailbox name not allowed), RFC 5321
// 4.2.3, at RCPT only: a bare 550 after the data is as often about the content.
bool isHardBounce(int code, std::string_view enhanced, std::string_view stage);

// Capture-mode accounts: a recipient with the reserved local part "subrelay-bounce" (or
// "subrelay-bounce+TAG", any domain, any case) is recorded as a simulated hard bounce
// (kSimulatedBounceReply) instead of captured: the sender gets a failure DSN and the
// recipient is suppressed, so CI can test its bounce handling end to end.
constexpr const char* kReservedBounceLocalPart = "subrelay-bounce";
constexpr const char* kSimulatedBounceReply =
    "550 5.1.1 simulated hard bounce (capture mode, reserved address subrelay-bounce)";
bool isSimulatedBounceAddress(std::string_view address);

// One row of an account's list.
struct Suppression {
  std::string account;
  std::string address;   // normalizeSuppressedAddress form
  std::string reason;
  int64_t createdAt = 0;  // unix seconds
  int64_t expiresAt = 0;  // unix seconds, 0 = never
  std::string source;     // "bounce" or "manual"
  bool expired(int64_t now) const { return expiresAt != 0 && expiresAt <= now; }
};

// expires_at for an entry made at `now` under suppression.ttl (seconds, 0 = forever).
inline int64_t suppressionExpiry(int64_t now, int64_t ttlSeconds) { return ttlSeconds > 0 ? now + ttlSeconds : 0; }

// The entry a hard bounce (real, or the capture-mode simulation) of `address` makes for
// `account` at `now`: source "bounce", the reason cleaned, the expiry from ttlSeconds.
// nullopt for an address that has no normal form.
std::optional<Suppression> bounceEntry(std::string_view account, std::string_view address, std::string_view reason,
                                       int64_t now, int64_t ttlSeconds);

// The in-memory table serve asks at RCPT. Thread-safe (every worker loop asks it; the
// sync timer replaces its contents). Bounded: at most `maxEntries` rows in all; a load of
// more keeps the newest (the store's pruner keeps the table within the same bound).
class SuppressionTable {
 public:
  static constexpr size_t kDefaultMaxEntries = 1'000'000;
  explicit SuppressionTable(size_t maxEntries = kDefaultMaxEntries) : max_(maxEntries) {}

  // Replaces everything with `rows` (expired ones are dropped). Returns the rows kept.
  size_t replace(std::vector<Suppression> rows, int64_t now);
  // The live entry for (account, address), if any; `address` in any case/IDNA form.
  std::optional<Suppression> find(std::string_view account, std::string_view address, int64_t now) const;
  // Adds or replaces one entry (serve's own bounces before the next reload); false when
  // the table is full and the key is new.
  bool put(Suppression row);
  size_t size() const;
  // Live entries per account (expired ones not counted).
  std::map<std::string, uint64_t> countsByAccount(int64_t now) const;

 private:
  static std::string key(std::string_view account, std::string_view normalized);
  size_t max_;
  mutable std::mutex mu_;
  std::unordered_map<std::string, Suppression> rows_;
};

}  // namespace subrelay::policy
