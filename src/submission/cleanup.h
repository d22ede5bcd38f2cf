// The submission "cleanup" stage (Postfix's name for it): from a message as the client
// sent it to what is stored, as one pure step. RFC 6409 section 8:
//  - 8.1: every header From mailbox, and the Sender mailbox when there is one, must be
//    an address the account owns (Reply-To stays free: contact forms set it to the
//    visitor); exactly one From (RFC 5322 3.6), at most one Sender;
//  - 8.2/8.3 and RFC 5321 4.4: Date and Message-ID when missing, our Received on top
//    (message/fixups.h);
//  - which domain signs (RFC 6376 3.5: the From domain, in its A-label form);
//  - the idempotency key (config idempotency.header, "Idempotency-Key"): taken out of
//    the message, checked, and handed to the queue, which stores a repeat only once;
//  - whether the message needs SMTPUTF8 downstream (RFC 6531 3.4): only when the
//    envelope or the header section has non-ASCII octets, whatever the client said at
//    MAIL (Go's net/smtp, for one, flags every message).
//
// No I/O, no clock (the time comes in the trace info), no logging: it runs on the
// thread pool, off the event loop, and its unit tests feed it strings.
// Not here: the rate re-check (policy/, before this), signing (dkim/, after this),
// header limits (message/header_scanner.h, while the data streams in).
#pragma once

#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "message/fixups.h"

namespace subrelay::submission {

struct CleanupRequest {
  std::string mailFrom;                       // "" for the null sender
  std::vector<std::string> recipients;
  // May the account use this header address? (policy: senders, IDNA-aware)
  std::function<bool(std::string_view address)> owns;
  message::TraceInfo trace;                   // for the Received field and Message-ID
  bool requireTls = false;                    // MAIL FROM ... REQUIRETLS (RFC 8689)
  // idempotency.header: the field that carries the client's idempotency key (compared
  // case-insensitively); "" = none is looked for.
  std::string idempotencyHeader = "Idempotency-Key";
};

// An idempotency key is 1..kMaxIdempotencyKey printable ASCII characters (SP allowed
// inside), after unfolding and trimming the white space around it.
inline constexpr size_t kMaxIdempotencyKey = 200;

struct CleanupResult {
  bool ok = false;
  // Refused: the SMTP reply (5xx: the client must change the message).
  int code = 0;
  std::string enhanced;
  std::string text;
  // Accepted:
  std::string content;        // the message to store (and sign)
  std::string signingDomain;  // lower-case A-label of the first From mailbox's domain
  bool smtputf8 = false;      // needs SMTPUTF8 at the next hop
  // RFC 8689 4.1: REQUIRETLS on MAIL FROM tags the message; without it, the header
  // "TLS-Required: No" tags it as TLS-optional (the header stays in the message).
  bool tlsRequired = false;
  bool tlsOptional = false;
  // The field idempotencyHeader's value, unfolded and trimmed; "" when there is none. The
  // field itself is not in `content`.
  std::string idempotencyKey;
};

CleanupResult cleanup(std::string_view content, const CleanupRequest& request);

}  // namespace subrelay::submission
