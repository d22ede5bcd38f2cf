// config::Config -> the delivery engine's settings; see delivery_settings.h.
#include "app/delivery_settings.h"

#include <memory>
#include <string>
#include <vector>

#include "app/dkim_cmd.h"
#include "net/listener.h"
#include "util/strings.h"

namespace subrelay::app {

namespace {

delivery::TlsPolicy tlsPolicy(config::DeliveryTls t) {
  switch (t) {
    case config::DeliveryTls::Required: return delivery::TlsPolicy::Required;
    case config::DeliveryTls::Verify: return delivery::TlsPolicy::Verify;
    case config::DeliveryTls::Opportunistic: break;
  }
  return delivery::TlsPolicy::Opportunistic;
}

std::shared_ptr<const delivery::RelaySet> relaySet(const std::vector<config::RelayUpstream>& list, std::string id) {
  if (list.empty()) return nullptr;
  auto set = std::make_shared<delivery::RelaySet>();
  set->id = std::move(id);
  for (const auto& r : list) {
    delivery::RelayHost h;
    h.host = r.host;
    h.port = r.port;
    h.implicitTls = r.tls == config::RelayTls::Implicit;
    h.verify = r.verify;
    if (!r.username.empty()) h.auth = std::make_shared<smtp::ClientAuth>(smtp::ClientAuth{r.username, r.password});
    h.origin = r.jsonPath;
    set->hosts.push_back(std::move(h));
  }
  return set;
}

}  // namespace

DeliverySettings deliverySettingsFrom(const config::Config& cfg) {
  DeliverySettings s;
  delivery::SchedulerSettings& d = s.scheduler;
  d.destinations.allowPrivate = cfg.delivery.allowPrivateDestinations;
  if (!d.destinations.allowPrivate) d.destinations.ownAddresses = net::hostAddresses();
  d.hostname = cfg.hostname;
  d.port = cfg.delivery.port;
  d.tls = tlsPolicy(cfg.delivery.tls);
  for (const auto& o : cfg.delivery.tlsOverrides) d.tlsOverrides[util::toLower(o.domain)] = tlsPolicy(o.tls);
  d.retry.schedule = cfg.delivery.retrySchedule.empty() ? config::defaultRetrySchedule() : cfg.delivery.retrySchedule;
  d.retry.maxQueueTime = cfg.delivery.maxQueueTime;
  d.retry.delayNotice = cfg.delivery.delayNotice;
  d.maxConnections = cfg.delivery.maxConnections;
  d.maxPerDestination = cfg.delivery.maxConnectionsPerDomain;
  d.relay = relaySet(cfg.delivery.relay, "delivery.relay");
  for (const auto& a : cfg.accounts)
    if (!a.relay.empty()) d.accountRelays[a.username] = relaySet(a.relay, "account:" + a.username);
  for (const auto& a : cfg.accounts)
    if (!a.suppression) d.suppressionOff.insert(a.username);
  d.suppressionTtl = cfg.suppression.ttl;
  for (const auto& o : cfg.delivery.relayOverrides)
    d.domainRelays[o.domain] = o.direct ? nullptr : relaySet(o.relay, "domain:" + o.domain);
  const auto& t = cfg.delivery.timeouts;
  d.transactionDeadline = t.transaction;
  s.connectTimeout = t.connect;
  s.timeouts.greeting = t.greeting;
  s.timeouts.mail = t.command;
  s.timeouts.rcpt = t.command;
  s.timeouts.dataInit = t.dataInit;
  s.timeouts.dataTerm = t.dataEnd;
  s.retention.finishedBodies = cfg.retention.finishedBodies.count();
  s.retention.history = cfg.retention.history.count();
  s.retention.captured = cfg.retention.captured.count();
  s.retention.idempotencyKeys = cfg.idempotency.window.count();
  s.dnssec = cfg.delivery.dnssec;
  s.mtaSts = cfg.delivery.mtaSts;
  s.stsGetter = stsGetterSettingsFrom(cfg);
  d.recipientTlsPolicy = s.dnssec || s.mtaSts;
  d.trustDnssec = s.dnssec;
  if (const auto& rpt = cfg.delivery.tlsRpt; rpt.enabled && d.recipientTlsPolicy) {
    s.tlsRptMaxDelay = rpt.maxDelay.count();
    d.tlsRpt = true;
  }
  return s;
}

delivery::tlsrpt::ReporterSettings tlsRptReporterSettings(const config::Config& cfg, std::vector<std::string>& errors) {
  const auto& t = cfg.delivery.tlsRpt;
  delivery::tlsrpt::ReporterSettings r;
  r.meta.from = t.from;
  r.meta.contact = t.contact.empty() ? t.from : t.contact;
  r.meta.organization = t.organization.empty() ? cfg.hostname : t.organization;
  r.meta.hostname = cfg.hostname;
  r.keys = std::make_shared<const dkim::KeyRing>(loadDkimKeys(cfg, errors).ring);
  r.signer = std::make_shared<dkim::LocalSigner>();
  return r;
}

void addTlsRptReporter(const config::Config& cfg, DeliverySettings& s) {
  if (!s.scheduler.tlsRpt) return;
  std::vector<std::string> errors;  // check-config and start-up have reported them
  s.tlsRpt = tlsRptReporterSettings(cfg, errors);
}

delivery::mtasts::HttpsGetterSettings stsGetterSettingsFrom(const config::Config& cfg) {
  delivery::mtasts::HttpsGetterSettings g;
  g.caFile = cfg.delivery.tlsCaFile;
  g.port = cfg.delivery.mtaStsHttpsPort;
  return g;
}

}  // namespace subrelay::app
