// RFC 7672 2.2 and RFC 8461 4-5 combined per MX host; see tls_policy.h.
#include "delivery/tls_policy.h"

#include <algorithm>

namespace subrelay::delivery {

const char* hostTlsName(HostTls t) {
  switch (t) {
    case HostTls::Default: return "default";
    case HostTls::Dane: return "dane";
    case HostTls::StsVerify: return "mta-sts";
    case HostTls::Unusable: return "unusable";
  }
  return "default";
}

bool TlsDecision::anyUsable() const {
  for (const auto& h : hosts)
    if (h.tls != HostTls::Unusable) return true;
  return false;
}

std::string TlsDecision::unusableWhy() const {
  std::string out;
  for (const auto& h : hosts) {
    if (h.tls != HostTls::Unusable) continue;
    if (!out.empty()) out += "; ";
    out += h.host + ": " + h.why;
  }
  return out;
}

namespace {

const TlsaLookup* findTlsa(const TlsPolicyInputs& in, const std::string& host) {
  for (const auto& t : in.tlsa)
    if (t.host == host) return &t;
  return nullptr;
}

bool isLookupError(dns::Status s) {
  return s == dns::Status::ServFail || s == dns::Status::Refused || s == dns::Status::Timeout ||
         s == dns::Status::Error;
}

// RFC 8460 4.5: a TLSA record as "usage selector matching HEX".
std::string tlsaString(const tls::TlsaRecord& r) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out = std::to_string(r.usage) + " " + std::to_string(r.selector) + " " + std::to_string(r.matchingType) + " ";
  for (uint8_t b : r.data) {
    out += kHex[b >> 4];
    out += kHex[b & 15];
  }
  return out;
}

// RFC 8460 4.5: the MTA-STS policy as its lines ("version: STSv1", "mode: enforce", ...).
std::vector<std::string> policyLines(const std::string& text) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    std::string line = text.substr(start, end - start);
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t')) line.pop_back();
    if (!line.empty() && out.size() < 100) out.push_back(line.substr(0, 300));
    start = end + 1;
  }
  return out;
}

}  // namespace

std::vector<std::string> tlsaHosts(const Route& route) {
  // RFC 7672 2.2.1: "the SMTP client MAY elect to use DANE TLS ... even with MX hosts obtained
  // via an "insecure" MX RRset" (a hosted domain in an unsigned zone whose provider signs its
  // MX hosts' zone), as Postfix does: what counts is the host's own address records.
  std::vector<std::string> out;
  for (const auto& h : route.hosts)
    if (h.addressesSecure && !h.addresses.empty()) out.push_back(h.name);
  return out;
}

TlsDecision decideTls(const std::string& domain, const Route& route, const TlsPolicyInputs& in) {
  std::vector<std::string> names;
  for (const auto& h : route.hosts) names.push_back(h.name);
  const mtasts::Verdict sts = mtasts::verdict(in.sts, names);
  const bool stsActive = sts.mode && *sts.mode != mtasts::Mode::None;
  const std::string stsLabel =
      stsActive ? std::string("mta-sts ") + mtasts::modeName(*sts.mode) + " id=" + sts.policyId : std::string();

  tlsrpt::Policy stsReport;
  if (stsActive && in.sts) {
    stsReport.type = "sts";
    stsReport.strings = policyLines(in.sts->text);
    stsReport.mxHost = in.sts->policy.mx;
  }

  TlsDecision d;
  for (size_t i = 0; i < route.hosts.size(); ++i) {
    const MxHost& mx = route.hosts[i];
    const mtasts::MxVerdict& v = sts.hosts[i];
    HostTlsDecision h;
    h.host = mx.name;
    h.report.type = "no-policy-found";
    // RFC 8689 4.2.1 step 2: "MX records ... MUST be validated either via a DNSSEC
    // signature ... or the MX hostname MUST be validated by an MTA-STS policy as described
    // in Section 4.1 of [RFC8461]."
    h.validated = route.mxSecure || (stsActive && v.matches);

    // RFC 7672 2.2, for each TLSA answer: "secure" with a usable record: DANE; "secure"
    // with only unusable records: TLS without authentication; "insecure" or an
    // authenticated denial: pre-DANE opportunistic TLS; "Any lookup error: ... MUST
    // result in falling back to the next SMTP server or delayed delivery."
    bool daneUsable = false;
    bool daneUnusableOnly = false;
    if (const TlsaLookup* t = findTlsa(in, mx.name)) {
      if (isLookupError(t->status)) {
        h.tls = HostTls::Unusable;
        h.why = "TLSA lookup for _25._tcp." + mx.name + " failed (RFC 7672 2.2.1: the host is unreachable)";
        h.report = tlsrpt::Policy{"tlsa", {}, {mx.name}};
        h.reportFailure = tlsrpt::Failure{"dnssec-invalid", "TLSA lookup failed: " + std::string(dns::statusName(t->status))};
        d.hosts.push_back(std::move(h));
        continue;
      }
      tls::DaneParams p;
      if (t->status == dns::Status::Ok && t->authenticated && !t->records.empty()) {
        for (const auto& r : t->records) p.tlsa.push_back({r.usage, r.selector, r.matchingType, r.data});
        // The handshake's own judgement (RFC 7672 3.1.3, digest lengths), so the label
        // and the verification agree on what is usable.
        daneUsable = std::any_of(p.tlsa.begin(), p.tlsa.end(), tls::isUsable);
        daneUnusableOnly = !daneUsable;
      }
      if (daneUsable || daneUnusableOnly) {
        // RFC 7672 3.2.2: the reference identifiers are the TLSA base domain (the MX host)
        // and, the MX RRset being secure, the next-hop domain.
        p.referenceNames.push_back(mx.name);
        if (route.mxSecure && domain != mx.name) p.referenceNames.push_back(domain);
        h.dane = std::move(p);
      }
    }

    if (daneUsable) {
      // RFC 8461 section 2: MTA-STS never overrides DANE, and an enforce policy that does
      // not list this host does not make a DANE-authenticated host unusable either.
      h.tls = HostTls::Dane;
      h.label = "dane";
    } else if (stsActive && *sts.mode == mtasts::Mode::Enforce) {
      h.report = stsReport;
      if (!v.usable) {
        // RFC 8461 5: "Sending MTAs MUST NOT deliver the message to hosts that fail MX
        // matching".
        h.tls = HostTls::Unusable;
        h.dane.reset();
        h.why = "not listed in the MTA-STS policy of " + domain + " (mode enforce, id " + sts.policyId + ")";
        h.reportFailure = tlsrpt::Failure{"validation-failure", "MX host not listed in the MTA-STS policy"};
      } else {
        h.tls = HostTls::StsVerify;
        h.dane.reset();
        h.label = stsLabel;
      }
    } else if (daneUnusableOnly) {
      h.tls = HostTls::Dane;  // the handshake finds no usable record: TLS, unauthenticated
      h.label = "dane";
    } else if (stsActive) {
      h.report = stsReport;
      // 5: testing: "messages may be delivered as though there were no MTA-STS validation
      // failure"; the attempt is labelled so reports can tell.
      h.tls = HostTls::Default;
      h.label = stsLabel;
    }
    if (h.tls == HostTls::Dane && h.dane) {
      h.report = tlsrpt::Policy{"tlsa", {}, {mx.name}};
      for (const auto& r : h.dane->tlsa) h.report.strings.push_back(tlsaString(r));
    }
    d.hosts.push_back(std::move(h));
  }
  return d;
}

}  // namespace subrelay::delivery
