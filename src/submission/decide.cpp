#include "submission/decide.h"

#include <utility>

namespace subrelay::submission {

std::optional<Refusal> admit(const policy::Decision& rate) {
  if (rate.allowed) return std::nullopt;
  policy::PolicyReply r = policy::rateLimitReply(rate);
  return Refusal{r.code, std::move(r.enhanced), std::move(r.text)};
}

Verdict decide(std::string_view content, const StoreRequest& request) {
  Verdict v;
  CleanupResult r = cleanup(content, request.cleanup);
  if (!r.ok) {
    v.refusal = Refusal{r.code, std::move(r.enhanced), std::move(r.text)};
    return v;
  }
  v.content = std::move(r.content);
  v.smtputf8 = r.smtputf8;
  v.tlsRequired = r.tlsRequired;
  v.tlsOptional = r.tlsOptional;
  v.idempotencyKey = std::move(r.idempotencyKey);
  // RFC 6376 3.5: the signing domain is the header From domain (cleanup gives it as a
  // lower-case A-label, the form the key ring is keyed by); subdomains only with their
  // own key. No keys for it: the message goes unsigned.
  if (request.keys == nullptr || r.signingDomain.empty()) return v;
  const std::vector<dkim::SignerKey>* k = request.keys->forDomain(r.signingDomain);
  if (k == nullptr || k->empty()) return v;
  v.keys = k;
  v.signingDomain = std::move(r.signingDomain);
  return v;
}

}  // namespace subrelay::submission
