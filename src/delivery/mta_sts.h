// MTA-STS (RFC 8461), the I/O-free half: the "_mta-sts" TXT record (3.1), the policy file
// (3.2), MX host matching (4.1), the per-domain cache and refresh decisions (3.3, 5.1, 10.2)
// on times the caller passes in, and the verdict for one delivery (4, 5).
//
// Times are unix seconds (policies are kept across restarts: queue::SqliteStore's
// sts_policies table). The fetcher (mta_sts_fetcher.h) does the I/O and asks these
// functions what to do at each step:
//
//   plan(state, now)            -> answer from the cache, maybe refresh in the background,
//                                  or discover (TXT lookup) before answering
//   onTxt(state, txt, now)      -> fetch the policy, or keep what we have
//   onFetch(state, id, f, now)  -> the new policy to cache, or keep the old one (and warn)
//   current(state, now)         -> the policy to apply now (non-expired), if any
//   verdict(policy, mxHosts)    -> per MX: may it be used, and must TLS be verified
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "dns/resolver.h"
#include "util/result.h"

namespace subrelay::delivery::mtasts {

// 3.2: "max_age ... maximum value of 31557600".
inline constexpr int64_t kMaxMaxAge = 31557600;
// 3.3: "a suggested maximum policy size is 64 kilobytes".
inline constexpr size_t kMaxPolicyBytes = 64 * 1024;
// 3.2: the Policy Host is "mta-sts" + the Policy Domain, the path is fixed.
inline constexpr std::string_view kWellKnownPath = "/.well-known/mta-sts.txt";

enum class Mode { Enforce, Testing, None };
const char* modeName(Mode m);  // "enforce", "testing", "none"
std::optional<Mode> parseMode(std::string_view s);

// --- 3.1: the TXT record -------------------------------------------------------------

// One record's text (its strings already concatenated, as dns::Answer::texts has them):
// the id, or why the record is not valid.
util::Result<std::string> parseTxtRecord(std::string_view text);

struct TxtOutcome {
  enum class Kind {
    Found,   // exactly one valid v=STSv1 record: id
    Absent,  // no record starting with v=STSv1 (NXDOMAIN, NODATA or only other TXT records)
    Invalid, // more than one v=STSv1 record, or a syntax error (3.1: "assume the recipient
             // domain does not have an available MTA-STS Policy")
    Failed,  // the lookup itself failed (SERVFAIL, timeout, ...): we know nothing
  };
  Kind kind = Kind::Failed;
  std::string id;
  std::string detail;  // for logs
};
const char* txtKindName(TxtOutcome::Kind k);  // "found", "absent", "invalid", "failed"

// The answer to the "_mta-sts.<domain>" TXT query, classified (3.1).
TxtOutcome classifyTxt(const dns::Answer& answer);
TxtOutcome classifyTxt(dns::Status status, const std::vector<std::string>& texts);

// --- 3.2: the policy -----------------------------------------------------------------

struct Policy {
  Mode mode = Mode::None;
  int64_t maxAge = 0;            // seconds, at most kMaxMaxAge
  std::vector<std::string> mx;   // lower-case patterns, "*.example.net" or "mail.example.com"
};

util::Result<Policy> parsePolicy(std::string_view body);
// 3.2: the media type must be text/plain (parameters ignored).
bool isTextPlain(std::string_view contentType);
// "https://mta-sts.<domain>/.well-known/mta-sts.txt" and its host.
std::string policyHost(std::string_view domain);
std::string policyUrl(std::string_view domain);
std::string txtName(std::string_view domain);  // "_mta-sts.<domain>"

// --- 4.1: MX host matching -----------------------------------------------------------

// Case-insensitive, a trailing dot on the host ignored; "*.example.com" matches exactly
// one left-most label: "mail.example.com", not "example.com" nor "a.b.example.com".
bool mxMatches(std::string_view pattern, std::string_view host);
bool policyAllowsMx(const Policy& p, std::string_view host);

// --- the cache -----------------------------------------------------------------------

// A policy as fetched and cached (the SQLite row, queue::StsPolicyRow, carries the same).
struct CachedPolicy {
  std::string domain;
  std::string id;     // from the TXT record when it was fetched
  Policy policy;
  std::string text;   // the body as served
  int64_t fetchedAt = 0;
  int64_t expiresAt = 0;  // fetchedAt + max_age (3.2: "from the last policy fetch time")
  int64_t checkedAt = 0;  // the last time discovery confirmed it (TXT id unchanged, or a fetch)
};

struct Settings {
  // 3.3: "MTAs SHOULD proactively refresh cached policies before they expire; a suggested
  // refresh frequency is once per day."
  int64_t refreshInterval = 24 * 3600;
  // 3.3: "In the case where the HTTPS GET fails, implementers SHOULD limit further attempts
  // to a period of five minutes or longer per version ID".
  int64_t fetchHoldoff = 5 * 60;
  // After a failed TXT lookup (SERVFAIL, timeout), the next one waits this long when a
  // cached policy answers meanwhile (with none, every delivery asks again: the resolver's
  // own cache and timeouts bound that).
  int64_t lookupHoldoff = 5 * 60;
  // A domain without a policy (TXT absent or invalid) is asked again after this long;
  // until then the answer is "no policy" without a lookup.
  int64_t absentRecheck = 3600;
};

// What the process knows about one Policy Domain (memory; `policy` is also in SQLite).
struct DomainState {
  std::optional<CachedPolicy> policy;  // the last good policy, possibly expired
  int64_t checkedAt = 0;         // last discovery that ended (found or absent/invalid)
  bool absent = false;           // that discovery found no usable TXT record
  int64_t lookupFailedAt = 0;    // last TXT lookup failure (0: none since the last success)
  std::string failedId;          // 3.3 per version ID: the id whose fetch failed ...
  int64_t fetchFailedAt = 0;     // ... and when
};

// The non-expired policy, if any. Mode none is returned too (it is a policy: it replaces
// an older one), verdict() treats it as no policy (5: "as though it does not have any
// active policy").
std::optional<CachedPolicy> current(const DomainState& s, int64_t now);

enum class Step {
  Answer,            // answer with current() now, no lookup
  AnswerAndRefresh,  // answer with current() now, and discover in the background
  Discover,          // no usable policy known: discover first, then answer
};
const char* stepName(Step s);

// 5.1 step 1 and 3.3's proactive refresh: a non-expired policy confirmed less than
// refreshInterval ago answers alone; one confirmed longer ago (or whose expiry is closer
// than refreshInterval) still answers, and a refresh starts; without one, discover first.
// A domain known to publish nothing answers "none" until absentRecheck has passed.
// Within a holdoff after a failed lookup or fetch, nothing is looked up: the answer is
// what is known (the cached policy, or none).
Step plan(const DomainState& s, int64_t now, const Settings& cfg);

struct TxtDecision {
  bool fetch = false;  // fetch the policy for `id`
  std::string id;
};
// Updates `s` with the TXT outcome and says whether to fetch (3.1, 3.3, 10.2):
//  - found, same id as the cached non-expired policy: no fetch, unless half of its
//    max_age has passed since it was fetched (then it is fetched again so that its expiry
//    moves on before it runs out; 10.2);
//  - found, new id (or nothing cached, or expired): fetch, unless a fetch of this id failed
//    less than fetchHoldoff ago;
//  - absent or invalid: no fetch; a cached non-expired policy is kept (3.1: "the absence
//    of a usable TXT record is not by itself sufficient to remove a sender's previously
//    cached policy");
//  - failed: no fetch; a cached policy is kept; the next lookup waits lookupHoldoff.
TxtDecision onTxt(DomainState& s, const std::string& domain, const TxtOutcome& txt, int64_t now,
                  const Settings& cfg);

// The outcome of the HTTPS GET, independent of the HTTP client.
struct FetchOutcome {
  bool transportOk = false;  // a response arrived
  std::string error;         // why not (transport), for logs
  long status = 0;
  std::string contentType;
  std::string body;
};

struct FetchDecision {
  bool stored = false;                // s.policy was replaced: persist it (store())
  std::optional<CachedPolicy> policy; // the new policy when stored
  std::string error;                  // why the fetch gave no policy ("" when stored)
  // 3.3 / 10.2: "MTAs SHOULD alert administrators ... when such attempts fail, unless the
  // cached policy mode is "none"": true when error is set and a cached non-expired policy
  // of another mode exists (a refresh failed).
  bool warn = false;
};
// 3.3: only a 200 with a text/plain body that parses is a policy; 3xx is not followed
// (the client never follows) and counts as a failure like any other status. On failure
// a cached non-expired policy stays in force ("the sender MUST apply that cached policy").
FetchDecision onFetch(DomainState& s, const std::string& domain, const std::string& id, const FetchOutcome& f,
                      int64_t now);

// --- 4, 5: the verdict for one delivery -----------------------------------------------

enum class Tls {
  Opportunistic,  // no policy (or mode none): whatever delivery does without MTA-STS
  ReportOnly,     // testing: deliver as without MTA-STS; failures are only reported
  Required,       // enforce: STARTTLS with a certificate valid for the MX name (4.2)
};
const char* tlsName(Tls t);  // "opportunistic", "report-only", "required"

struct MxVerdict {
  std::string host;
  bool matches = true;  // 4.1 (true without a policy)
  bool usable = true;   // 5: enforce never delivers to a host that does not match
  Tls tls = Tls::Opportunistic;
};

struct Verdict {
  std::optional<Mode> mode;  // nullopt: no policy
  std::string policyId;
  std::vector<MxVerdict> hosts;  // in the order given
  // enforce and no host usable: the delivery must be deferred (5: "SHOULD treat such
  // failures as transient"), never bounced before a new policy was looked for (5.1 step 3)
  bool noUsableHost() const;
};

// hosts: the MX names in delivery order (an implicit MX is the domain itself).
Verdict verdict(const std::optional<CachedPolicy>& policy, const std::vector<std::string>& hosts);

}  // namespace subrelay::delivery::mtasts
