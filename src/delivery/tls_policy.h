// The recipient domain's own TLS policy for one route (RFC 7672 DANE, RFC 8461 MTA-STS):
// per MX host, how to connect and whether to connect at all. I/O-free: the route, the
// TLSA answers and the MTA-STS policy in, decisions out. The Transport finds the inputs
// (Transport::lookupTlsPolicy), the scheduler applies the decisions.
//
// Precedence (RFC 8461 section 2): "senders who implement MTA-STS validation MUST NOT
// allow MTA-STS Policy validation to override a failing DANE validation": a host with a
// usable "secure" TLSA RRset is DANE whatever the MTA-STS policy says about it.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "delivery/mta_sts.h"
#include "delivery/routing.h"
#include "delivery/tls_rpt.h"
#include "dns/resolver.h"
#include "tls/dane.h"

namespace subrelay::delivery {

// The answer to "_25._tcp.<host> TLSA" for one MX host (RFC 7672 2.2.2, 3). Hosts not in
// the list were not looked up (insecure MX or address records): no DANE for them.
struct TlsaLookup {
  std::string host;  // MX host name as in Route::hosts
  dns::Status status = dns::Status::Error;
  bool authenticated = false;
  std::vector<dns::TlsaRecord> records;
};

struct TlsPolicyInputs {
  std::vector<TlsaLookup> tlsa;
  // The domain's MTA-STS policy (RFC 8461 3), nullopt when it has none, when the lookup
  // failed without a cached policy, or when MTA-STS is off.
  std::optional<mtasts::CachedPolicy> sts;
};

enum class HostTls {
  Default,    // no policy for this host: the job's usual TLS (delivery.tls)
  Dane,       // TLS authenticated by `dane` (or, all records unusable, TLS without authentication)
  StsVerify,  // RFC 8461 4.2: STARTTLS with a certificate valid for the MX host name
  Unusable,   // do not connect: MTA-STS enforce and the host does not match (RFC 8461 5),
              // or its TLSA lookup failed (RFC 7672 2.2.1)
};
const char* hostTlsName(HostTls t);  // "default", "dane", "mta-sts", "unusable"

struct HostTlsDecision {
  std::string host;
  HostTls tls = HostTls::Default;
  std::optional<tls::DaneParams> dane;  // with Dane
  // For attempt records (AttemptRecord::tlsPolicy): "dane", "mta-sts enforce id=X",
  // "mta-sts testing id=X"; empty for Default (the caller's own label applies).
  std::string label;
  std::string why;  // for Unusable: the reason, for logs and the deferral text
  // RFC 8689 4.2.1 step 2: the host name is authenticated, by a secure MX RRset or by
  // matching an MTA-STS policy (RFC 8461 4.1).
  bool validated = false;
  // RFC 8460: the policy a session to this host runs under, as TLS reports name it ("tlsa"
  // with the host's records, "sts" with the policy's lines and patterns, "no-policy-found"),
  // and for Unusable hosts the failure to report ("dnssec-invalid" for a failed TLSA
  // lookup, "validation-failure" for an MX host the MTA-STS policy does not list).
  tlsrpt::Policy report;
  std::optional<tlsrpt::Failure> reportFailure;
};

struct TlsDecision {
  std::vector<HostTlsDecision> hosts;  // in Route::hosts order
  bool anyUsable() const;
  // The Unusable hosts' reasons, "; "-joined (for the deferral when none is usable).
  std::string unusableWhy() const;
};

// RFC 7672 2.2.1-2.2.2: the MX hosts whose TLSA records to look up ("_25._tcp.<host>"):
// those with addresses whose address records are secure, whether or not the MX RRset is
// (2.2.1 allows DANE for MX hosts found through an insecure MX RRset; the domain is then not
// a reference name, and REQUIRETLS still needs a secure MX RRset).
std::vector<std::string> tlsaHosts(const Route& route);

TlsDecision decideTls(const std::string& domain, const Route& route, const TlsPolicyInputs& in);

}  // namespace subrelay::delivery
