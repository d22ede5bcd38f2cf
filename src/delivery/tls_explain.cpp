// `subrelay tls-policy`: the scheduler's TLS decisions for one domain, explained; see
// tls_explain.h.
#include "delivery/tls_explain.h"

#include <algorithm>
#include <set>

#include "delivery/destination.h"
#include "tls/dane.h"
#include "util/json_writer.h"

namespace subrelay::delivery {

namespace {

const char* routeStatusName(RouteStatus s) {
  switch (s) {
    case RouteStatus::Ok: return "ok";
    case RouteStatus::TempFail: return "tempfail";
    case RouteStatus::PermFail: return "permfail";
  }
  return "tempfail";
}

tls::TlsaRecord toTls(const dns::TlsaRecord& r) { return {r.usage, r.selector, r.matchingType, r.data}; }

std::string joined(const std::vector<std::string>& v, const char* sep = ", ") {
  std::string out;
  for (const auto& s : v) out += (out.empty() ? "" : sep) + s;
  return out;
}

std::string jsonStrings(const std::vector<std::string>& v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) out += ",";
    util::jsonEscapeTo(out, v[i]);
  }
  return out + "]";
}

std::string jsonArray(const std::vector<std::string>& objects) { return "[" + joined(objects, ",") + "]"; }

// Why the domain's own policy (DANE, MTA-STS) is not consulted; "" when it is.
std::string notConsultedWhy(const TlsExplanation& e) {
  if (e.relay) return "the mail goes to a relay";
  if (e.tlsOverride) return "delivery.tls_policy_overrides has an entry for " + e.domain;
  if (e.addressLiteral) return "an address literal has no DNS";
  if (!e.lookups) return "delivery.dnssec and delivery.mta_sts are both false";
  return "";
}

// Addresses the destination policy removed from host i (in dnsRoute, not in route).
std::vector<std::string> refusedAddresses(const TlsExplanation& e, size_t i) {
  std::vector<std::string> out;
  if (!e.dnsRoute || !e.route || i >= e.dnsRoute->hosts.size()) return out;
  const MxHost& raw = e.dnsRoute->hosts[i];
  const MxHost* used = nullptr;
  for (const auto& h : e.route->hosts)
    if (h.name == raw.name) used = &h;
  for (const auto& a : raw.addresses)
    if (!used || std::find(used->addresses.begin(), used->addresses.end(), a) == used->addresses.end())
      out.push_back(a);
  return out;
}

const TlsaLookup* tlsaFor(const TlsExplanation& e, const std::string& host) {
  for (const auto& t : e.inputs.tlsa)
    if (t.host == host) return &t;
  return nullptr;
}

std::string hostWhy(const TlsExplanation& e, const HostTlsDecision& h) {
  switch (h.tls) {
    case HostTls::Dane: {
      const bool usable = h.dane && std::any_of(h.dane->tlsa.begin(), h.dane->tlsa.end(), tls::isUsable);
      return usable ? "TLS required, the certificate must match a TLSA record (RFC 7672)"
                    : "TLS required, without authentication: no TLSA record is usable (RFC 7672 2.2)";
    }
    case HostTls::StsVerify:
      return h.label + ": STARTTLS required, certificate verified for the MX host name (RFC 8461 4.2)";
    case HostTls::Unusable: return "not used: " + h.why;
    case HostTls::Default: break;
  }
  if (h.label.empty()) return "delivery.tls: no DANE or MTA-STS policy applies to this host";
  return std::string(policyName(e.tls)) + " (delivery.tls); " + h.label + ": failures are only reported (RFC 8461 5)";
}

}  // namespace

TlsExplanation startExplanation(const SchedulerSettings& s, bool mtaSts, const std::string& domain,
                                const std::string& account) {
  TlsExplanation e;
  e.domain = domain;
  e.account = account;
  e.relay = relayFor(s, account, domain);
  const auto dr = s.domainRelays.find(domain);
  if (dr != s.domainRelays.end()) {
    e.directOverride = dr->second == nullptr;
    if (e.relay) e.relayWhy = "delivery.relay_overrides";
  } else if (s.accountRelays.count(account)) {
    e.relayWhy = "accounts[].relay of " + account;
  } else if (e.relay) {
    e.relayWhy = "delivery.relay";
  }
  if (account.empty() && dr == s.domainRelays.end())
    for (const auto& [name, set] : s.accountRelays) e.accountRelays.push_back(name);
  e.tls = tlsFor(s, domain);
  e.tlsOverride = s.tlsOverrides.count(domain) > 0;
  e.addressLiteral = isAddressLiteralDomain(domain);
  e.trustDnssec = s.trustDnssec;
  e.mtaSts = mtaSts;
  e.lookups = domainPolicyApplies(s, domain, e.relay != nullptr);
  if (!e.relay && e.addressLiteral) {
    if (auto literal = routeForAddressLiteral(domain)) applyRoute(e, s, std::move(*literal));
    // Submission refuses such recipients at RCPT (delivery/destination.h).
    if (e.error.empty() && !s.destinations.allowPrivate)
      e.error = "address literals are refused at RCPT (delivery.allow_private_destinations is false)";
  }
  return e;
}

bool needsRoute(const TlsExplanation& e) { return !e.relay && !e.route; }

void applyRoute(TlsExplanation& e, const SchedulerSettings& s, Route resolved) {
  e.dnsRoute = resolved;
  e.route = routeAsUsed(s, std::move(resolved), false);
  if (e.route->status != RouteStatus::Ok) {
    const bool perm = e.route->status == RouteStatus::PermFail;
    const std::string enhanced = e.route->enhanced.empty() ? (perm ? "5.1.2" : "4.4.3") : e.route->enhanced;
    e.error = "no route to " + e.domain + ": " + e.route->detail + " (" + enhanced + ", delivery would " +
              (perm ? "fail" : "be deferred") + ")";
    return;
  }
  if (!e.lookups) return;
  e.tlsaHosts = tlsaHosts(*e.route);
  // Placeholders as the delivery service uses: a lookup that never answers is a lookup
  // error (the host is not used, RFC 7672 2.2.1).
  e.inputs.tlsa.clear();
  for (const auto& h : e.tlsaHosts) {
    TlsaLookup t;
    t.host = h;
    t.status = dns::Status::Timeout;
    e.inputs.tlsa.push_back(std::move(t));
  }
}

bool wantsPolicyLookups(const TlsExplanation& e) {
  return e.lookups && e.route && e.route->status == RouteStatus::Ok && e.error.empty();
}

std::string hostPolicyName(const TlsExplanation& e, const HostTlsDecision& h) {
  switch (h.tls) {
    case HostTls::Dane: return "dane";
    case HostTls::StsVerify: return "mta-sts enforce";
    case HostTls::Unusable: return "unusable";
    case HostTls::Default: break;
  }
  if (h.label.rfind("mta-sts testing", 0) == 0) return "mta-sts testing";
  return policyName(e.tls);
}

void finishExplanation(TlsExplanation& e) {
  e.decision.reset();
  e.policy.clear();
  if (e.relay) {
    e.policy = "relay " + e.relay->id;
    return;
  }
  if (!e.error.empty() || !e.route) return;
  if (e.tlsOverride) {
    e.policy = std::string("override ") + policyName(e.tls);
    return;
  }
  if (!wantsPolicyLookups(e)) {
    e.policy = policyName(e.tls);
    return;
  }
  e.decision = decideTls(e.domain, *e.route, e.inputs);
  if (!e.decision->anyUsable()) {
    e.policy = "none usable (delivery deferred, 4.7.5)";
    return;
  }
  std::vector<std::string> names;
  for (const auto& h : e.decision->hosts) {
    if (h.tls == HostTls::Unusable) continue;
    std::string n = hostPolicyName(e, h);
    if (std::find(names.begin(), names.end(), n) == names.end()) names.push_back(n);
  }
  e.policy = joined(names);
}

std::string renderText(const TlsExplanation& e) {
  std::string o;
  auto line = [&o](const std::string& s) { o += s + "\n"; };
  line("tls-policy for " + e.domain + (e.account.empty() ? "" : " (account " + e.account + ")"));

  // 1. Smarthost.
  if (e.relay) {
    line("1. smarthost: relay " + e.relay->id + " (" + e.relayWhy + "): MX, DANE and MTA-STS are not consulted");
    for (const auto& h : e.relay->hosts)
      line("   " + h.host + ":" + std::to_string(h.port) + " " + (h.implicitTls ? "implicit TLS" : "STARTTLS") +
           (h.verify ? ", certificate verified" : ", certificate not verified (verify false)") +
           (h.auth ? ", AUTH" : "") + (h.origin.empty() ? "" : " (" + h.origin + ")"));
  } else if (e.directOverride) {
    line("1. smarthost: none: delivery.relay_overrides sends " + e.domain + " direct to its MX hosts");
  } else {
    line("1. smarthost: none: direct MX delivery" +
         std::string(e.account.empty() ? "" : " (account " + e.account + " has no relay of its own)"));
  }
  if (!e.accountRelays.empty())
    line("   note: mail from these accounts goes to their own relay (accounts[].relay) instead: " +
         joined(e.accountRelays) + " (use --account NAME to see one)");
  if (e.relay) {
    line("policy: " + e.policy);
    return o;
  }

  // 2. Operator override.
  if (e.tlsOverride)
    line(std::string("2. override: delivery.tls_policy_overrides: ") + policyName(e.tls) +
         ": it wins over DANE and MTA-STS, which are not consulted");
  else
    line(std::string("2. override: none (delivery.tls is ") + policyName(e.tls) + ")");

  // 3. Route.
  if (!e.route) {
    line("3. MX route: no answer");
  } else {
    const Route& raw = e.dnsRoute ? *e.dnsRoute : *e.route;
    std::string head = "3. MX route: " + std::string(routeStatusName(raw.status));
    if (e.addressLiteral) head += " (address literal, no DNS)";
    else if (raw.status == RouteStatus::Ok || !raw.hosts.empty())
      head += raw.mxSecure ? (e.trustDnssec ? ", MX RRset DNSSEC-secure (AD)" : ", MX RRset with AD (not trusted)")
                           : ", MX RRset not DNSSEC-secure";
    if (raw.status != RouteStatus::Ok && !raw.detail.empty()) head += ": " + raw.detail;
    line(head);
    if (!e.addressLiteral) {
      if (!e.trustDnssec)
        line("   delivery.dnssec is false: AD bit not trusted, no DANE");
      else
        line("   delivery.dnssec is true: the resolver's AD bit is trusted");
    }
    for (size_t i = 0; i < raw.hosts.size(); ++i) {
      const MxHost& h = raw.hosts[i];
      std::string l = "   " + (h.implicit ? std::string("implicit MX (no MX records): ")
                                            : "MX " + std::to_string(h.preference) + " ") + h.name + ": ";
      if (h.addresses.empty()) l += "no address" + (h.lookupError.empty() ? "" : " (" + h.lookupError + ")");
      else l += joined(h.addresses) + (!h.addressesSecure ? " (not secure)" : e.trustDnssec ? " (secure)" : " (AD, not trusted)");
      line(l);
      const auto refused = refusedAddresses(e, i);
      if (!refused.empty())
        line("     refused by the destination policy (delivery.allow_private_destinations): " + joined(refused));
    }
    if (e.dnsRoute && e.dnsRoute->status == RouteStatus::Ok && e.route->status != RouteStatus::Ok)
      line("   " + e.route->detail);
  }
  if (!e.error.empty()) {
    line("policy: none: " + e.error);
    return o;
  }
  if (!e.route) {
    line("policy: unknown (the route was not looked up)");
    return o;
  }

  // 4. DANE.
  const std::string notWhy = notConsultedWhy(e);
  if (!notWhy.empty()) {
    line("4. DANE: not consulted: " + notWhy);
  } else if (!e.trustDnssec) {
    line("4. DANE: no: delivery.dnssec is false: AD bit not trusted, no DANE");
  } else if (e.tlsaHosts.empty()) {
    line("4. DANE: no: no MX host has DNSSEC-secure address records (RFC 7672 2.2.2)");
  } else {
    line("4. DANE: TLSA records of the MX hosts with secure addresses (RFC 7672 2.2)");
    if (!e.route->mxSecure)
      line("   the MX RRset is not secure: only the MX host name is a reference identifier (RFC 7672 2.2.1)");
    for (const auto& h : e.route->hosts) {
      const TlsaLookup* t = tlsaFor(e, h.name);
      if (!t) {
        line("   " + h.name + ": not looked up (" + (h.addresses.empty() ? "no address" : "address records not secure") +
             ")");
        continue;
      }
      line("   _25._tcp." + h.name + " TLSA: " + dns::statusName(t->status) +
           (t->status == dns::Status::Ok || t->status == dns::Status::NoData || t->status == dns::Status::NxDomain
                ? (t->authenticated ? ", secure" : ", insecure (no DANE)")
                : ""));
      for (const auto& r : t->records) {
        const tls::TlsaRecord tr = toTls(r);
        const std::string why = tls::unusableReason(tr);
        line("     " + tls::tlsaText(tr, 64) + (why.empty() ? ": usable" : ": unusable: " + why));
      }
    }
  }

  // 5. MTA-STS.
  if (!notWhy.empty()) {
    line("5. MTA-STS: not consulted: " + notWhy);
  } else if (!e.mtaSts) {
    line("5. MTA-STS: off (delivery.mta_sts is false)");
  } else {
    std::string l = "5. MTA-STS: " + mtasts::txtName(e.domain) + " TXT: ";
    if (!e.sts.txtAnswered) l += "no answer";
    else l += dns::statusName(e.sts.txtStatus);
    for (const auto& t : e.sts.txt) l += " \"" + t + "\"";
    line(l);
    if (!e.sts.answered) {
      line("   no policy answer within the deadline: as no policy (RFC 8461 3.3)");
    } else if (const auto& p = e.inputs.sts) {
      line("   policy (" + e.sts.source + "): mode " + mtasts::modeName(p->policy.mode) + ", id " + p->id + ", max_age " +
           std::to_string(p->policy.maxAge) + ", mx " + joined(p->policy.mx));
      for (const auto& h : e.route->hosts)
        line("   " + h.name + (mtasts::policyAllowsMx(p->policy, h.name) ? ": matches" : ": does not match"));
    } else {
      line("   no policy (" + e.sts.source + ")");
    }
    if (e.sts.answered && !e.sts.detail.empty()) line("   detail: " + e.sts.detail);
    if (e.sts.overBudget)
      line("   note: the answer took longer than delivery waits for it; delivery would go on as without MTA-STS");
  }

  // 6. Decision.
  line("6. decision:");
  if (e.decision) {
    for (const auto& h : e.decision->hosts) line("   " + h.host + ": " + hostPolicyName(e, h) + ": " + hostWhy(e, h));
  } else {
    for (const auto& h : e.route->hosts)
      line("   " + h.name + ": " + policyName(e.tls) + (e.tlsOverride ? " (tls_policy_overrides)" : " (delivery.tls)"));
  }
  line("policy: " + e.policy);
  return o;
}

std::string renderJson(const TlsExplanation& e) {
  util::JsonObject o;
  o.str("domain", e.domain).str("account", e.account).str("policy", e.policy).str("error", e.error);
  if (e.relay) {
    std::vector<std::string> hosts;
    for (const auto& h : e.relay->hosts) {
      util::JsonObject j;
      j.str("host", h.host)
          .num("port", h.port)
          .str("tls", h.implicitTls ? "implicit" : "starttls")
          .boolean("verify", h.verify)
          .boolean("auth", h.auth != nullptr)
          .str("origin", h.origin);
      hosts.push_back(j.finish());
    }
    util::JsonObject r;
    r.str("id", e.relay->id).str("source", e.relayWhy).raw("hosts", jsonArray(hosts));
    o.raw("relay", r.finish());
  } else {
    o.raw("relay", "null");
  }
  o.boolean("direct_override", e.directOverride)
      .raw("accounts_with_relay", jsonStrings(e.accountRelays))
      .str("tls", policyName(e.tls))
      .boolean("tls_override", e.tlsOverride)
      .boolean("dnssec", e.trustDnssec)
      .boolean("mta_sts_enabled", e.mtaSts)
      .boolean("domain_policy_consulted", e.lookups);
  if (e.route) {
    const Route& raw = e.dnsRoute ? *e.dnsRoute : *e.route;
    std::vector<std::string> hosts;
    for (size_t i = 0; i < raw.hosts.size(); ++i) {
      const MxHost& h = raw.hosts[i];
      util::JsonObject j;
      j.str("name", h.name)
          .num("preference", h.preference)
          .boolean("implicit", h.implicit)
          .raw("addresses", jsonStrings(h.addresses))
          .boolean("addresses_secure", h.addressesSecure)
          .raw("refused", jsonStrings(refusedAddresses(e, i)))
          .str("error", h.lookupError);
      hosts.push_back(j.finish());
    }
    util::JsonObject r;
    r.str("status", routeStatusName(e.route->status))
        .str("enhanced", e.route->enhanced)
        .str("detail", e.route->detail)
        .boolean("mx_secure", raw.mxSecure)
        .boolean("ad_trusted", e.trustDnssec)
        .raw("hosts", jsonArray(hosts));
    o.raw("route", r.finish());
  } else {
    o.raw("route", "null");
  }
  std::vector<std::string> tlsa;
  for (const auto& t : e.inputs.tlsa) {
    std::vector<std::string> recs;
    for (const auto& r : t.records) {
      const tls::TlsaRecord tr = toTls(r);
      const std::string why = tls::unusableReason(tr);
      util::JsonObject j;
      j.str("record", tls::tlsaText(tr, 128)).boolean("usable", why.empty()).str("why", why);
      recs.push_back(j.finish());
    }
    util::JsonObject j;
    j.str("host", t.host)
        .str("name", "_25._tcp." + t.host)
        .str("status", dns::statusName(t.status))
        .boolean("secure", t.authenticated)
        .raw("records", jsonArray(recs));
    tlsa.push_back(j.finish());
  }
  o.raw("tlsa", jsonArray(tlsa));
  if (wantsPolicyLookups(e) && e.mtaSts) {
    util::JsonObject s;
    s.str("txt_status", e.sts.txtAnswered ? dns::statusName(e.sts.txtStatus) : "no answer")
        .raw("txt", jsonStrings(e.sts.txt))
        .boolean("answered", e.sts.answered)
        .str("source", e.sts.source)
        .str("detail", e.sts.detail)
        .boolean("over_budget", e.sts.overBudget);
    if (const auto& p = e.inputs.sts) {
      std::vector<std::string> matching;
      for (const auto& h : e.route->hosts)
        if (mtasts::policyAllowsMx(p->policy, h.name)) matching.push_back(h.name);
      util::JsonObject j;
      j.str("id", p->id)
          .str("mode", mtasts::modeName(p->policy.mode))
          .num("max_age", p->policy.maxAge)
          .raw("mx", jsonStrings(p->policy.mx))
          .raw("matching_hosts", jsonStrings(matching));
      s.raw("policy", j.finish());
    } else {
      s.raw("policy", "null");
    }
    o.raw("mta_sts", s.finish());
  } else {
    o.raw("mta_sts", "null");
  }
  std::vector<std::string> hosts;
  if (e.decision) {
    for (const auto& h : e.decision->hosts) {
      util::JsonObject j;
      j.str("host", h.host)
          .str("tls", hostTlsName(h.tls))
          .str("policy", hostPolicyName(e, h))
          .str("label", h.label)
          .str("why", hostWhy(e, h))
          .boolean("validated", h.validated);
      hosts.push_back(j.finish());
    }
  } else if (e.route && e.error.empty()) {
    for (const auto& h : e.route->hosts) {
      util::JsonObject j;
      j.str("host", h.name)
          .str("tls", "default")
          .str("policy", policyName(e.tls))
          .str("label", "")
          .str("why", e.tlsOverride ? "tls_policy_overrides" : "delivery.tls")
          .boolean("validated", e.route->mxSecure);
      hosts.push_back(j.finish());
    }
  }
  o.raw("hosts", jsonArray(hosts));
  return o.finish();
}

}  // namespace subrelay::delivery
