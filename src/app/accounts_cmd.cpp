#include "app/accounts_cmd.h"

#include "app/queue_cmd.h"

#include <cstdio>
#include <ctime>
#include <filesystem>
#include <algorithm>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "policy/rate_limiter.h"
#include "queue/sqlite_store.h"
#include "util/json_writer.h"
#include "util/time_fmt.h"

namespace subrelay::app {

namespace {

struct Row {
  queue::MeterRow meter;
  std::string mode;  // "" when the account is not in the config (e.g. removed)
  std::vector<config::RateLimit> limits;
  std::map<std::string, queue::RateWindowRow> windows;  // by rule
  uint64_t suppressed = 0;  // live entries of the account's suppression list
  const config::Webhook* webhook = nullptr;
  std::optional<queue::WebhookBacklog> backlog;
};

// "webhook": {url, events, backlog, failing, oldest, oldest_age_seconds, last_error}, or
// null for an account without a webhook and nothing waiting.
std::string webhookJson(const Row& r, int64_t now) {
  if (!r.webhook && !r.backlog) return "null";
  util::JsonObject w;
  if (r.webhook) {
    w.str("url", r.webhook->url);
    std::string events = "[";
    for (size_t i = 0; i < r.webhook->events.size(); ++i) {
      if (i) events += ",";
      util::jsonEscapeTo(events, r.webhook->events[i]);
    }
    w.raw("events", events + "]");
  } else {
    w.raw("url", "null").raw("events", "[]");
  }
  const queue::WebhookBacklog b = r.backlog.value_or(queue::WebhookBacklog{});
  w.num("backlog", b.events).boolean("failing", b.failing > 0);
  if (b.oldestCreatedAt) {
    w.str("oldest", util::isoUtc(b.oldestCreatedAt)).num("oldest_age_seconds", std::max<int64_t>(0, now - b.oldestCreatedAt));
  } else {
    w.raw("oldest", "null").raw("oldest_age_seconds", "null");
  }
  if (b.lastError.empty()) w.raw("last_error", "null");
  else w.str("last_error", b.lastError);
  return w.finish();
}

// The count of a day/month window that is still current; 0 once it has ended.
uint64_t currentCount(const queue::RateWindowRow& w, policy::Period period) {
  return w.windowStart == policy::windowStart(period, std::chrono::system_clock::now()) ? w.count : 0;
}

}  // namespace

int accountsList(const AccountsCmdOptions& o) {
  auto store = openQueue(o.dataDir);
  if (!store.ok()) {
    std::fprintf(stderr, "subrelay: %s\n", store.error().message.c_str());
    return 1;
  }
  auto meters = store.value()->loadMeters();
  auto windows = store.value()->loadRateWindows();
  auto suppressed = store.value()->suppressionCounts(static_cast<int64_t>(std::time(nullptr)));
  if (!meters.ok() || !windows.ok() || !suppressed.ok()) {
    std::fprintf(stderr, "subrelay: %s\n",
                 (!meters.ok() ? meters.error() : !windows.ok() ? windows.error() : suppressed.error()).message.c_str());
    return 1;
  }
  std::map<std::string, Row> rows;
  if (o.config) {
    for (const auto& a : o.config->accounts) {
      Row& r = rows[a.username];
      r.meter.username = a.username;
      r.mode = std::string(config::jsonName(a.mode));
      r.limits = a.rateLimits;
      if (a.webhook) r.webhook = &*a.webhook;
    }
  }
  // The webhook outbox per account (schema 12; empty on an older database).
  auto backlog = store.value()->webhookBacklog();
  if (!backlog.ok()) {
    std::fprintf(stderr, "subrelay: %s\n", backlog.error().message.c_str());
    return 1;
  }
  for (const auto& b : backlog.value()) {
    Row& r = rows[b.account];
    r.meter.username = b.account;
    r.backlog = b;
  }
  for (const auto& m : meters.value()) {
    Row& r = rows[m.username];
    r.meter = m;
  }
  for (const auto& [account, n] : suppressed.value()) {
    Row& r = rows[account];
    r.meter.username = account;
    r.suppressed = n;
  }
  for (const auto& w : windows.value()) {
    auto it = rows.find(w.username);
    if (it != rows.end()) it->second.windows[w.rule] = w;
  }
  if (!o.json)
    std::printf("%-20s %-8s %10s %10s %10s %12s %10s %10s  %s\n", "ACCOUNT", "MODE", "ACCEPTED", "REFUSED", "RCPTS",
                "BYTES", "AUTHFAIL", "SUPPRESSED", "LIMITS (used/limit)");
  for (const auto& [name, r] : rows) {
    // Current use of each configured limit that is persisted (day/month windows).
    std::string limitsText;
    std::string limitsJson = "[";
    for (size_t i = 0; i < r.limits.size(); ++i) {
      const auto& l = r.limits[i];
      util::JsonObject lj;
      lj.str("rule", l.key).num("limit", static_cast<int64_t>(l.amount));
      std::string used;
      auto rule = policy::makeRateRule(l.key, l.what, l.period, l.amount);
      if (rule && (rule->period == policy::Period::Day || rule->period == policy::Period::Month)) {
        uint64_t c = 0;
        if (auto w = r.windows.find(l.key); w != r.windows.end()) c = currentCount(w->second, rule->period);
        lj.num("used", static_cast<int64_t>(c));
        used = std::to_string(c) + "/";
      } else {
        lj.raw("used", "null");
      }
      if (!limitsText.empty()) limitsText += " ";
      limitsText += l.key + "=" + used + std::to_string(l.amount);
      if (i) limitsJson += ",";
      limitsJson += lj.finish();
    }
    limitsJson += "]";
    const auto& m = r.meter;
    if (o.json) {
      util::JsonObject j;
      j.str("account", name);
      if (r.mode.empty()) j.raw("mode", "null");
      else j.str("mode", r.mode);
      j.num("accepted", static_cast<int64_t>(m.accepted))
          .num("refused_by_limit", static_cast<int64_t>(m.refusedByLimit))
          .num("recipients", static_cast<int64_t>(m.recipients))
          .num("bytes", static_cast<int64_t>(m.bytes))
          .num("auth_failures", static_cast<int64_t>(m.authFailures))
          .num("suppressed", static_cast<int64_t>(r.suppressed));
      if (m.updatedAt) j.str("updated_at", util::isoUtc(m.updatedAt));
      else j.raw("updated_at", "null");
      j.raw("limits", limitsJson);
      j.raw("webhook", webhookJson(r, static_cast<int64_t>(std::time(nullptr))));
      std::printf("%s\n", j.finish().c_str());
    } else {
      std::printf("%-20s %-8s %10llu %10llu %10llu %12llu %10llu %10llu  %s\n", name.c_str(),
                  r.mode.empty() ? "-" : r.mode.c_str(), static_cast<unsigned long long>(m.accepted),
                  static_cast<unsigned long long>(m.refusedByLimit), static_cast<unsigned long long>(m.recipients),
                  static_cast<unsigned long long>(m.bytes), static_cast<unsigned long long>(m.authFailures),
                  static_cast<unsigned long long>(r.suppressed), limitsText.empty() ? "-" : limitsText.c_str());
    }
  }
  return 0;
}

}  // namespace subrelay::app
