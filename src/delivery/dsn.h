// Delivery Status Notifications (RFC 3464, RFC 3461 section 6 for the report fields,
// RFC 3463 codes, RFC 6522 multipart/report): the bounce a sender receives.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace subrelay::delivery {

enum class DsnAction { Failed, Delayed };  // RFC 3464 2.3.3 "failed" / "delayed"

struct DsnRecipient {
  std::string address;        // Final-Recipient: rfc822;address (utf-8 when non-ASCII: RFC 6533)
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
  std::vector<DsnRecipient> recipients;
};

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
