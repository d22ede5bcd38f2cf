// The configuration turned into the delivery engine's settings, shared by serve's
// DeliveryService and `subrelay tls-policy` (tls_policy_cmd.cpp), so the command explains
// exactly what delivery decides. Wiring only: config/ knows nothing of delivery/, and
// delivery/ nothing of config/.
#pragma once

#include <chrono>
#include <optional>

#include "config/config.h"
#include "delivery/mta_sts_fetcher.h"
#include "delivery/scheduler.h"
#include "delivery/tls_rpt_reporter.h"
#include "queue/store.h"
#include "smtp/client_session.h"

namespace subrelay::app {

struct DeliverySettings {
  delivery::SchedulerSettings scheduler;
  smtp::ClientTimeouts timeouts;
  std::chrono::seconds connectTimeout{30};
  queue::RetentionPolicy retention;  // retention.*
  bool dnssec = false;  // delivery.dnssec: TLSA lookups for DANE
  bool mtaSts = true;   // delivery.mta_sts
  delivery::mtasts::HttpsGetterSettings stsGetter;  // delivery.tls_ca_file, mta_sts_https_port
  // delivery.tls_rpt: counts (scheduler.tlsRpt) and daily reports; the reporter is set by
  // addTlsRptReporter() only.
  std::optional<delivery::tlsrpt::ReporterSettings> tlsRpt;
  int64_t tlsRptMaxDelay = 0;
};

// The TLS policy lookups of one domain (TLSA records, the MTA-STS policy) get this long in
// all; an MTA-STS answer still missing then counts as "no policy" (RFC 8461 3.3: "senders
// ... SHOULD proceed with delivery as though the Policy Domain had not implemented
// MTA-STS"), so a dead policy host delays delivery by this much at most.
constexpr auto kTlsPolicyBudget = std::chrono::seconds(10);

// Everything but the TLS-RPT reporter, which needs the DKIM keys (serve only).
DeliverySettings deliverySettingsFrom(const config::Config& cfg);
// serve: with delivery.tls_rpt on (and a recipient TLS policy to report on), the daily
// reporter's settings, DKIM keys loaded.
void addTlsRptReporter(const config::Config& cfg, DeliverySettings& s);
// delivery.tls_rpt as the reporter takes it (DKIM keys loaded; their errors appended).
delivery::tlsrpt::ReporterSettings tlsRptReporterSettings(const config::Config& cfg, std::vector<std::string>& errors);

// The MTA-STS policy GET (delivery.tls_ca_file, delivery.mta_sts_https_port).
delivery::mtasts::HttpsGetterSettings stsGetterSettingsFrom(const config::Config& cfg);

}  // namespace subrelay::app
