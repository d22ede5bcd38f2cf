// What happens to a message at the end of DATA, as data: refuse it with a reply, or store
// it with this content, these DKIM keys (or none) and this SMTPUTF8 need. The connection
// (app/worker.cpp) only runs the steps where they belong (the loop, the thread pool for a
// large header section and for signing) and commits the outcome.
//
//  1. admit(): accounts[].rate_limits, checked again with the real size (MAIL only knew
//     SIZE=, if that), before the content is looked at;
//  2. decide(): the cleanup stage (cleanup.h), then the keys of the signing domain (RFC
//     6376 3.5: the header From domain as an A-label; a subdomain only with its own keys).
//
// Pure, like cleanup(): no I/O, no clock, no logging. Not here: the rate check itself and
// its accounting (policy/ on the loop), signing (dkim/, after this).
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "dkim/dkim.h"
#include "policy/rate_limiter.h"
#include "submission/cleanup.h"

namespace subrelay::submission {

// An SMTP reply to the end of data.
struct Refusal {
  int code = 0;
  std::string enhanced;
  std::string text;
};

// The rate verdict for the message with its real size: the reply when it refuses
// (451 4.7.1 with the wait, 552 5.3.4 when it can never fit), nothing when it may go on.
std::optional<Refusal> admit(const policy::Decision& rate);

struct StoreRequest {
  CleanupRequest cleanup;
  // The configured keys; null when nothing may be signed (no signer). Must outlive the
  // verdict: the verdict points into it.
  const dkim::KeyRing* keys = nullptr;
};

struct Verdict {
  std::optional<Refusal> refusal;  // set: reply with it, nothing is stored
  // To store (refusal unset):
  std::string content;        // the cleaned-up message (what is signed and stored)
  bool smtputf8 = false;      // needs SMTPUTF8 at the next hop
  bool tlsRequired = false;   // RFC 8689 (CleanupResult)
  bool tlsOptional = false;
  std::string idempotencyKey;  // "" = none (CleanupResult)
  std::string signingDomain;  // set with `keys`
  const std::vector<dkim::SignerKey>* keys = nullptr;  // sign with these; null: unsigned

  bool refused() const { return refusal.has_value(); }
};

// The message as received (header section and body) to its verdict. `content` is read,
// never copied beyond what cleanup() builds.
Verdict decide(std::string_view content, const StoreRequest& request);

}  // namespace subrelay::submission
