// `subrelay tls-rpt list|send`; see tls_rpt_cmd.h. Wiring only: the counts come from the
// queue, the reports from delivery::tlsrpt::Reporter on a short-lived loop.
#include "app/tls_rpt_cmd.h"

#include <chrono>
#include <cstdio>
#include <map>
#include <optional>

#include "app/delivery_settings.h"
#include "app/queue_cmd.h"
#include "config/config.h"
#include "delivery/tls_rpt.h"
#include "delivery/tls_rpt_reporter.h"
#include "dns/uv_resolver.h"
#include "net/uv_loop.h"
#include "net/uv_timer.h"
#include "queue/sqlite_store.h"
#include "util/clock.h"
#include "util/json_writer.h"
#include "util/time_fmt.h"

namespace subrelay::app {

namespace {

namespace tlsrpt = delivery::tlsrpt;

int fail(const std::string& why) {
  std::fprintf(stderr, "subrelay: %s\n", why.c_str());
  return 1;
}

// One line (or JSON object) per domain and applied policy of the day.
int list(queue::SqliteStore& store, int64_t day, bool json) {
  auto rows = store.tlsRptRows(day, "");
  if (!rows.ok()) return fail(rows.error().message);
  struct Group {
    int64_t ok = 0, failed = 0;
    std::vector<const queue::TlsRptRow*> failures;
  };
  std::map<std::pair<std::string, std::string>, Group> groups;  // (domain, policy type)
  for (const auto& r : rows.value()) {
    Group& g = groups[{r.domain, r.policyType}];
    if (r.result.empty()) {
      g.ok += r.sessions;
    } else {
      g.failed += r.sessions;
      g.failures.push_back(&r);
    }
  }
  const std::string date = util::isoUtc(day).substr(0, 10);
  if (groups.empty() && !json) std::printf("no TLS sessions counted on %s\n", date.c_str());
  for (const auto& [key, g] : groups) {
    if (json) {
      std::string o = "{\"day\":";
      util::jsonEscapeTo(o, date);
      o += ",\"domain\":";
      util::jsonEscapeTo(o, key.first);
      o += ",\"policy_type\":";
      util::jsonEscapeTo(o, key.second);
      o += ",\"successful\":" + std::to_string(g.ok) + ",\"failed\":" + std::to_string(g.failed) + ",\"failures\":[";
      for (size_t i = 0; i < g.failures.size(); ++i) {
        const auto& f = *g.failures[i];
        o += i ? ",{\"result\":" : "{\"result\":";
        util::jsonEscapeTo(o, f.result);
        o += ",\"mx\":";
        util::jsonEscapeTo(o, f.receivingMx);
        o += ",\"ip\":";
        util::jsonEscapeTo(o, f.receivingIp);
        o += ",\"reason\":";
        util::jsonEscapeTo(o, f.reason);
        o += ",\"sessions\":" + std::to_string(f.sessions) + "}";
      }
      o += "]}\n";
      std::fputs(o.c_str(), stdout);
      continue;
    }
    std::printf("%s %s %s successful=%lld failed=%lld\n", date.c_str(), key.first.c_str(), key.second.c_str(),
                static_cast<long long>(g.ok), static_cast<long long>(g.failed));
    for (const auto* f : g.failures)
      std::printf("  %s mx=%s ip=%s sessions=%lld reason=\"%s\"\n", f->result.c_str(),
                  f->receivingMx.empty() ? "-" : f->receivingMx.c_str(), f->receivingIp.empty() ? "-" : f->receivingIp.c_str(),
                  static_cast<long long>(f->sessions), f->reason.c_str());
  }
  return 0;
}

int send(const config::Config& cfg, queue::SqliteStore& store, int64_t day, int64_t now) {
  const auto& t = cfg.delivery.tlsRpt;
  if (!t.enabled) return fail("delivery.tls_rpt is not configured in " + cfg.sourcePath + ": no reports to make");
  auto servers = dns::chooseServers(cfg.delivery.resolvers);
  if (!servers.ok()) return fail("delivery.resolvers: " + servers.error().message);
  std::vector<std::string> errors;
  const tlsrpt::ReporterSettings rs = tlsRptReporterSettings(cfg, errors);
  for (const auto& e : errors) std::fprintf(stderr, "subrelay: %s\n", e.c_str());

  util::SystemClock clock;
  std::optional<tlsrpt::RunSummary> summary;
  {
    net::Loop loop;
    dns::UvResolver resolver(loop.get(), servers.value(), clock);
    tlsrpt::Reporter reporter(store, resolver, rs);
    net::Timer deadline(loop.get());
    bool timedOut = false;
    deadline.start(std::chrono::minutes(5), [&] { timedOut = true; });
    reporter.run(day + 86400, now, [&](tlsrpt::RunSummary s) { summary = std::move(s); });
    while (!summary && !timedOut) loop.runOnce();
    deadline.stop();
    if (!summary) return fail("the DNS lookups did not finish within 5 minutes; reports made so far stay queued");
  }
  for (const auto& line : summary->lines) std::printf("%s\n", line.c_str());
  std::printf("%zu report(s) queued, %zu domain(s) without a TLSRPT record, %zu to retry\n", summary->queued,
              summary->noRua, summary->failed);
  return summary->failed == 0 ? 0 : 1;
}

}  // namespace

int cmdTlsRpt(const TlsRptCmdOptions& o) {
  config::LoadResult loaded = config::loadConfigFile(o.configPath);
  if (!loaded.config) {
    for (const auto& e : loaded.formatErrors()) std::fprintf(stderr, "subrelay: %s\n", e.c_str());
    return 1;
  }
  const config::Config& cfg = *loaded.config;
  const int64_t now = util::unixSeconds(std::chrono::system_clock::now());
  const std::string dayText = o.day.empty() ? (o.sub == "send" ? "yesterday" : "today") : o.day;
  const auto day = tlsrpt::parseDay(dayText, now);
  if (!day) {
    std::fprintf(stderr, "subrelay tls-rpt: --day: expected today, yesterday or YYYY-MM-DD, got %s\n", dayText.c_str());
    return 2;
  }
  auto store = openQueue(cfg.dataDir, o.sub == "send");
  if (!store.ok()) return fail(store.error().message);
  if (o.sub == "list") return list(*store.value(), *day, o.json);
  return send(cfg, *store.value(), *day, now);
}

}  // namespace subrelay::app
