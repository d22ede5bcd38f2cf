// Delivery Status Notifications (RFC 3464, RFC 3461 section 6 for the report fields,
// RFC 3463 codes, RFC 6522 multipart/report): the bounce a sender receives.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "queue/store.h"

namespace subrelay::delivery {

// RFC 3464 2.3.3 "failed" / "delayed" / "relayed" (RFC 3461 5.2.2 (b): NOTIFY=SUCCESS
// and a next hop that does not offer DSN).
enum class DsnAction { Failed, Delayed, Relayed };

struct DsnRecipient {
  std::string address;        // Final-Recipient: rfc822;address (utf-8 when non-ASCII: RFC 6533)
  // Original-Recipient (RFC 3464 2.3.1, RFC 3461 6.3 (d)): the client's ORCPT= as sent
  // ("rfc822;bob+2B1@example.net"; xtext-decoded here), "" = none given: no field.
  std::string orcpt;
  DsnAction action = DsnAction::Failed;
  std::string status;         // "5.1.1" (RFC 3463; derived from the reply, or a default)
  // "dns; mx1.example.com" (or just the host name: "dns; " is added) when a server
  // replied, else "".
  std::string remoteMta;
  // "smtp; 550 5.1.1 no such user" (or just the reply: "smtp; " is added) when a server
  // replied; a local reason may use its own type ("x-subrelay; null MX ..."). "" = none.
  // Line breaks and controls are flattened; the field is folded.
  std::string diagnostic;
  int64_t lastAttempt = 0;    // unix seconds, 0 = none
  int64_t willRetryUntil = 0; // Delayed only
};

struct DsnInput {
  std::string reportingMta;   // our hostname (Reporting-MTA: dns; host)
  std::string queueId;        // X-Postfix-Queue-ID style: we use "X-Subrelay-Queue-ID"
  std::string originalSender; // envelope sender of the original (the DSN goes to it)
  int64_t arrivalDate = 0;    // unix seconds the original was received
  int64_t now = 0;            // Date: of the DSN
  std::string messageId;      // Message-ID for the DSN itself ("<...@host>")
  std::string originalHeaders;// the original header block (CRLF lines, without the blank line)
  // ENVID= of the original (xtext as received, decoded here): Original-Envelope-Id
  // (RFC 3464 2.2.1, RFC 3461 6.3 (a)); "" = none given: no field.
  std::string envid;
  // RET=FULL (returnContent()): the whole original message, returned as message/rfc822
  // instead of its headers; "" = headers only.
  std::string originalMessage;
  // RET=FULL asked for, but the message was too large: the text part says only the
  // headers are returned.
  bool fullTooLarge = false;
  std::vector<DsnRecipient> recipients;
};

// --- RFC 3461 decisions (notify: queue::kDsnNotify* bits, 0 = NOTIFY not given) -------

// A "failed" DSN: NOTIFY absent (the default) or containing FAILURE (RFC 3461 4.1).
// NOTIFY=NEVER: no DSN at all.
bool wantsFailureDsn(int notify);
// A "delayed" notice: NOTIFY absent (RFC 3461 4.1 allows FAILURE,DELAY as the default,
// which is what we did before DSN) or containing DELAY.
bool wantsDelayDsn(int notify);
// After a delivery: a "relayed" DSN from us when the sender asked for SUCCESS and the
// next hop did not take the request on (it does not offer DSN: RFC 3461 5.2.2 (b)). A
// next hop that offers DSN got NOTIFY passed on (5.2.1 (c)) and reports the success
// itself; we send nothing then.
bool wantsSuccessDsn(int notify, bool passedOn);

// What of the original goes into a DSN (RFC 3461 6.2): the whole message for RET=FULL
// when the DSN reports a failure and the message is at most maxFull bytes; else the
// header section (RET=HDRS, no RET, success and delay reports, larger messages).
enum class ReturnPart { Headers, Full, HeadersTooLarge };
inline constexpr size_t kMaxReturnedMessage = 1024 * 1024;  // 1 MiB
ReturnPart returnPart(queue::DsnRet ret, bool reportsFailure, size_t messageSize,
                      size_t maxFull = kMaxReturnedMessage);

// The whole DSN message (headers + body, CRLF lines): From: MAILER-DAEMON@reportingMta,
// To: originalSender, Subject "Undelivered Mail Returned to Sender" / "Delayed Mail (still
// being retried)", Auto-Submitted: auto-replied (RFC 3834), multipart/report;
// report-type=delivery-status with a human-readable part, message/delivery-status
// (message/global-delivery-status when an address is non-ASCII, RFC 6533), and
// text/rfc822-headers. Sent with the null sender "<>" (RFC 5321 4.5.5), so it never
// bounces itself.
std::string buildDsn(const DsnInput& in);

// The enhanced code for a recipient result: the reply's own when valid, else class from
// the reply code with a generic detail ("5.0.0", "4.0.0").
std::string statusFromReply(int code, const std::string& enhanced);

}  // namespace subrelay::delivery
