// TLS reports (RFC 8460) out of the stored counts: for each (UTC day, Policy Domain) with
// counts and no report yet, look up "_smtp._tls.<domain>" TXT (through the configured
// dns::Resolver), build the JSON report, gzip it into the report mail, DKIM-sign it with the
// reporting domain's key, and queue it for the rua addresses in the same SQLite transaction
// that records the report as made (queue::SqliteStore::completeTlsRpt), so a crash or a
// second run never mails a day twice. Delivery then takes it like any queued message,
// with "TLS-Required: No" semantics (RFC 8460 3: reports "MUST" be delivered despite
// TLS-related failures, so the recipient domain's MTA-STS/DANE are not applied to them).
//
// Used by serve (once a day, after 00:00 UTC plus a random delay: RFC 8460 4.1) and by
// `subrelay tls-rpt send`. Loop thread only; callbacks on the loop.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "delivery/tls_rpt.h"
#include "dkim/dkim.h"
#include "dns/resolver.h"

namespace subrelay::queue {
class SqliteStore;
}

namespace subrelay::delivery::tlsrpt {

struct ReporterSettings {
  ReportMeta meta;
  // Signs the report mail (RFC 8460 3: reports "MUST contain a valid DKIM signature by the
  // reporting domain"); keys for meta.from's domain. A report without keys is not sent.
  std::shared_ptr<const dkim::KeyRing> keys;
  std::shared_ptr<const dkim::Signer> signer;
  size_t maxRecipients = 5;      // rua mailto addresses per report
  size_t maxReportsPerRun = 500; // (day, domain) pairs per run; the rest wait for the next
  // A day whose TXT lookup keeps failing is given up after this long past its end.
  int64_t giveUpAfter = 3 * 86400;
};

struct RunSummary {
  size_t queued = 0;     // report mails queued
  size_t noRua = 0;      // domains without a usable TLSRPT record (nothing to send)
  size_t failed = 0;     // lookups or signing failed: retried by the next run
  std::vector<std::string> lines;  // one per (day, domain): what happened, for logs and the CLI
};

class Reporter {
 public:
  Reporter(queue::SqliteStore& store, dns::Resolver& resolver, ReporterSettings settings);
  ~Reporter();
  // Reports every (day, domain) with counts for days before `beforeDay` (unix seconds of
  // 00:00 UTC) and none made yet. now: unix seconds (Date:, the record). One run at a
  // time: a second call while one runs answers at once with an empty summary.
  void run(int64_t beforeDay, int64_t now, std::function<void(RunSummary)> done);
  bool running() const;
  // SIGHUP: the next domain handled uses these.
  void setSettings(ReporterSettings settings);

 private:
  struct Run;
  queue::SqliteStore& store_;
  dns::Resolver& resolver_;
  ReporterSettings settings_;
  std::shared_ptr<Run> current_;
};

// serve's side of TLS reporting: stores the scheduler's counts (at most once a minute, and
// at flush()), runs the Reporter once a day at reportTime() for the days before today, an
// hour later again when a run left work undone, and prunes counts older than a week.
class DailyReports {
 public:
  DailyReports(queue::SqliteStore& store, dns::Resolver& resolver, ReporterSettings settings, int64_t maxDelay,
               uint64_t seed, int64_t now);
  void reconfigure(ReporterSettings settings, int64_t maxDelay);
  // Every second or so, with the counts taken from the scheduler since the last call.
  void tick(int64_t now, std::vector<queue::TlsRptRow> rows);
  // Stores the counts held and `rows` (shutdown).
  void flush(std::vector<queue::TlsRptRow> rows);
  int64_t nextRunAt() const { return nextRun_; }

 private:
  void store(int64_t now);
  queue::SqliteStore& store_;
  Reporter reporter_;
  int64_t maxDelay_;
  uint64_t seed_;
  int64_t nextRun_ = 0;
  int64_t lastStore_ = 0;
  std::vector<queue::TlsRptRow> held_;
};

}  // namespace subrelay::delivery::tlsrpt
