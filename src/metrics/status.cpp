#include "metrics/status.h"

#include <algorithm>
#include <charconv>

#include "util/json_writer.h"
#include "util/time_fmt.h"

namespace subrelay::metrics {

namespace {
constexpr std::string_view kMagic = "subrelay-status 1";

bool toU64(std::string_view s, uint64_t& out) {
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return ec == std::errc() && p == s.data() + s.size();
}
bool toI64(std::string_view s, int64_t& out) {
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return ec == std::errc() && p == s.data() + s.size();
}
std::vector<std::string_view> fields(std::string_view line) {
  std::vector<std::string_view> out;
  size_t start = 0;
  for (;;) {
    size_t tab = line.find('\t', start);
    out.push_back(line.substr(start, tab == std::string_view::npos ? std::string_view::npos : tab - start));
    if (tab == std::string_view::npos) break;
    start = tab + 1;
  }
  return out;
}
// Tabs and newlines cannot reach the file through a name (account names and addresses
// come from the validated config), but the format never trusts that.
std::string clean(std::string_view s) {
  std::string out(s);
  for (char& c : out)
    if (c == '\t' || c == '\n' || c == '\r') c = ' ';
  return out;
}
}  // namespace

std::string serialize(const ServerSnapshot& s) {
  std::string o(kMagic);
  o += '\n';
  auto kv = [&](std::string_view k, const std::string& v) {
    o += k;
    o += '\t';
    o += clean(v);
    o += '\n';
  };
  kv("pid", std::to_string(s.pid));
  kv("version", s.version);
  kv("started_at", std::to_string(s.startedAt));
  kv("updated_at", std::to_string(s.updatedAt));
  for (const auto& [addr, tls] : s.listeners) o += "listener\t" + clean(addr) + '\t' + clean(tls) + '\n';
  kv("metrics", s.metricsAddress);
  kv("sessions", std::to_string(s.sessions));
  kv("delivery_connections", std::to_string(s.deliveryConnections));
  kv("accepted_total", std::to_string(s.acceptedTotal));
  kv("delivered_total", std::to_string(s.deliveredTotal));
  kv("accepted_last_minute", std::to_string(s.acceptedLastMinute));
  kv("delivered_last_minute", std::to_string(s.deliveredLastMinute));
  for (const auto& a : s.accounts)
    o += "account\t" + clean(a.account) + '\t' + std::to_string(a.total) + '\t' + std::to_string(a.lastMinute) + '\n';
  o += "end\n";
  return o;
}

std::optional<ServerSnapshot> parseSnapshot(std::string_view text) {
  ServerSnapshot s;
  bool magic = false, end = false;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string_view::npos) return std::nullopt;  // cut short
    std::string_view line = text.substr(pos, nl - pos);
    pos = nl + 1;
    if (!magic) {
      if (line != kMagic) return std::nullopt;
      magic = true;
      continue;
    }
    if (line == "end") {
      end = true;
      break;
    }
    auto f = fields(line);
    const std::string_view k = f[0];
    bool ok = true;
    if (k == "listener" && f.size() == 3) {
      s.listeners.emplace_back(std::string(f[1]), std::string(f[2]));
    } else if (k == "account" && f.size() == 4) {
      AccountCount a;
      a.account = std::string(f[1]);
      ok = toU64(f[2], a.total) && toU64(f[3], a.lastMinute);
      s.accounts.push_back(std::move(a));
    } else if (f.size() == 2) {
      const std::string_view v = f[1];
      if (k == "pid") ok = toI64(v, s.pid);
      else if (k == "version") s.version = std::string(v);
      else if (k == "started_at") ok = toI64(v, s.startedAt);
      else if (k == "updated_at") ok = toI64(v, s.updatedAt);
      else if (k == "metrics") s.metricsAddress = std::string(v);
      else if (k == "sessions") ok = toU64(v, s.sessions);
      else if (k == "delivery_connections") ok = toU64(v, s.deliveryConnections);
      else if (k == "accepted_total") ok = toU64(v, s.acceptedTotal);
      else if (k == "delivered_total") ok = toU64(v, s.deliveredTotal);
      else if (k == "accepted_last_minute") ok = toU64(v, s.acceptedLastMinute);
      else if (k == "delivered_last_minute") ok = toU64(v, s.deliveredLastMinute);
      // unknown keys: written by a newer version; skipped
    }
    if (!ok) return std::nullopt;
  }
  if (!magic || !end || s.pid <= 0) return std::nullopt;
  return s;
}

void RecentCounts::sample(int64_t nowMs, Totals t) {
  samples_.emplace_back(nowMs, std::move(t));
  // Keep the newest sample at least 60 s old as the base, and nothing older.
  while (samples_.size() > 2 && samples_[1].first <= nowMs - 60000) samples_.pop_front();
}

RecentCounts::Totals RecentCounts::lastMinute() const {
  Totals d;
  if (samples_.empty()) return d;
  const Totals& last = samples_.back().second;
  const Totals& base = samples_.front().second;
  if (samples_.size() == 1) return last.accepted || last.delivered ? last : d;
  d.accepted = last.accepted - std::min(last.accepted, base.accepted);
  d.delivered = last.delivered - std::min(last.delivered, base.delivered);
  for (const auto& [acct, n] : last.perAccount) {
    auto it = base.perAccount.find(acct);
    const uint64_t before = it == base.perAccount.end() ? 0 : it->second;
    if (n > before) d.perAccount[acct] = n - before;
  }
  return d;
}

void fillCounts(ServerSnapshot& s, const RecentCounts& rc) {
  const RecentCounts::Totals recent = rc.lastMinute();
  const RecentCounts::Totals& now = rc.latest();
  s.acceptedTotal = now.accepted;
  s.deliveredTotal = now.delivered;
  s.acceptedLastMinute = recent.accepted;
  s.deliveredLastMinute = recent.delivered;
  s.accounts.clear();
  for (const auto& [acct, n] : now.perAccount) {
    auto it = recent.perAccount.find(acct);
    s.accounts.push_back({acct, n, it == recent.perAccount.end() ? 0 : it->second});
  }
  std::sort(s.accounts.begin(), s.accounts.end(), [](const AccountCount& a, const AccountCount& b) {
    if (a.lastMinute != b.lastMinute) return a.lastMinute > b.lastMinute;
    if (a.total != b.total) return a.total > b.total;
    return a.account < b.account;
  });
  if (s.accounts.size() > kTopAccounts) s.accounts.resize(kTopAccounts);
}

std::string formatAge(int64_t t) {
  if (t < 0) t = 0;
  const int64_t d = t / 86400, h = t / 3600 % 24, m = t / 60 % 60, sec = t % 60;
  if (d) return std::to_string(d) + "d " + std::to_string(h) + "h";
  if (h) return std::to_string(h) + "h " + std::to_string(m) + "m";
  if (m) return std::to_string(m) + "m " + std::to_string(sec) + "s";
  return std::to_string(sec) + "s";
}

void judgeServer(StatusReport& r, std::optional<ServerSnapshot> snapshot, bool fileFound, bool pidAlive,
                 const std::string& statusPath) {
  r.server = std::move(snapshot);
  r.running = false;
  if (!fileFound) {
    r.notRunningWhy = "no " + statusPath + "; serve writes it while it runs";
  } else if (!r.server) {
    r.notRunningWhy = statusPath + " is not a status file";
  } else if (!pidAlive) {
    r.notRunningWhy = "pid " + std::to_string(r.server->pid) + " is gone; it last reported " +
                      std::to_string(r.now - r.server->updatedAt) + "s ago";
  } else if (r.now - r.server->updatedAt > kStaleAfterSeconds) {
    r.notRunningWhy = "pid " + std::to_string(r.server->pid) + " has not reported for " +
                      std::to_string(r.now - r.server->updatedAt) + "s (hung or stopped?)";
  } else {
    r.running = true;
    r.notRunningWhy.clear();
  }
}

void fillRecent(StatusReport& r, const std::vector<AccountCount>& perAccount, uint64_t captured) {
  r.receivedLastHour = 0;
  for (const auto& a : perAccount) r.receivedLastHour += a.total;
  r.capturedLastHour = captured;
  r.queueAccounts = perAccount;
  std::sort(r.queueAccounts.begin(), r.queueAccounts.end(), [](const AccountCount& a, const AccountCount& b) {
    return a.total != b.total ? a.total > b.total : a.account < b.account;
  });
  if (r.queueAccounts.size() > kTopAccounts) r.queueAccounts.resize(kTopAccounts);
}

std::string renderText(const StatusReport& r) {
  std::string o;
  if (r.running && r.server) {
    const ServerSnapshot& s = *r.server;
    o += "subrelay " + s.version + ": running, pid " + std::to_string(s.pid) + ", up " +
         formatAge(r.now - s.startedAt) + " (since " + util::isoUtc(s.startedAt) + ")\n";
    o += "listeners:";
    for (const auto& [addr, tls] : s.listeners) o += " " + addr + " (" + tls + ")";
    if (!s.metricsAddress.empty()) o += "; metrics http://" + s.metricsAddress + "/metrics";
    o += "\nsessions: " + std::to_string(s.sessions) + " SMTP open, " + std::to_string(s.deliveryConnections) +
         " outbound\n";
    o += "last minute: " + std::to_string(s.acceptedLastMinute) + " accepted, " +
         std::to_string(s.deliveredLastMinute) + " delivered (since start: " + std::to_string(s.acceptedTotal) +
         " accepted, " + std::to_string(s.deliveredTotal) + " delivered)\n";
  } else {
    o += "subrelay: not running (" + r.notRunningWhy + ")\n";
  }
  o += "queue: " + std::to_string(r.queued) + " queued, " + std::to_string(r.deferred) + " deferred, " +
       std::to_string(r.inFlight) + " in flight";
  if (r.oldestReceivedAt)
    o += "; oldest " + formatAge(r.now - r.oldestReceivedAt) + " (received " + util::isoUtc(r.oldestReceivedAt) + ")";
  o += "\n";
  o += "received in the last hour: " + std::to_string(r.receivedLastHour) +
       (r.capturedLastHour ? " (" + std::to_string(r.capturedLastHour) + " captured)" : std::string()) + "\n";
  if (r.running && r.server && !r.server->accounts.empty()) {
    o += "top senders (last minute / since start):";
    for (const auto& a : r.server->accounts)
      o += " " + a.account + " " + std::to_string(a.lastMinute) + "/" + std::to_string(a.total);
    o += "\n";
  } else if (!r.queueAccounts.empty()) {
    o += "top senders (messages in the last hour):";
    for (const auto& a : r.queueAccounts) o += " " + a.account + " " + std::to_string(a.total);
    o += "\n";
  }
  return o;
}

std::string renderJson(const StatusReport& r) {
  util::JsonObject o;
  o.boolean("running", r.running);
  if (!r.running) o.str("reason", r.notRunningWhy);
  if (r.server) {
    const ServerSnapshot& s = *r.server;
    o.num("pid", s.pid).str("version", s.version).str("started_at", util::isoUtc(s.startedAt));
    o.num("uptime_seconds", r.running ? r.now - s.startedAt : 0);
    o.str("updated_at", util::isoUtc(s.updatedAt));
    std::string ls = "[";
    for (size_t i = 0; i < s.listeners.size(); ++i)
      ls += (i ? "," : "") +
            util::JsonObject().str("address", s.listeners[i].first).str("tls", s.listeners[i].second).finish();
    o.raw("listeners", ls + "]");
    if (!s.metricsAddress.empty()) o.str("metrics_address", s.metricsAddress);
    o.num("sessions", static_cast<int64_t>(s.sessions));
    o.num("delivery_connections", static_cast<int64_t>(s.deliveryConnections));
    o.num("accepted_last_minute", static_cast<int64_t>(s.acceptedLastMinute));
    o.num("delivered_last_minute", static_cast<int64_t>(s.deliveredLastMinute));
    o.num("accepted_total", static_cast<int64_t>(s.acceptedTotal));
    o.num("delivered_total", static_cast<int64_t>(s.deliveredTotal));
    std::string as = "[";
    for (size_t i = 0; i < s.accounts.size(); ++i)
      as += (i ? "," : "") + util::JsonObject()
                                 .str("account", s.accounts[i].account)
                                 .num("accepted_last_minute", static_cast<int64_t>(s.accounts[i].lastMinute))
                                 .num("accepted_total", static_cast<int64_t>(s.accounts[i].total))
                                 .finish();
    o.raw("top_senders", as + "]");
  }
  o.raw("queue", util::JsonObject()
                     .num("queued", static_cast<int64_t>(r.queued))
                     .num("deferred", static_cast<int64_t>(r.deferred))
                     .num("in_flight", static_cast<int64_t>(r.inFlight))
                     .num("oldest_age_seconds", r.oldestReceivedAt ? r.now - r.oldestReceivedAt : 0)
                     .finish());
  o.num("received_last_hour", static_cast<int64_t>(r.receivedLastHour));
  o.num("captured_last_hour", static_cast<int64_t>(r.capturedLastHour));
  std::string qa = "[";
  for (size_t i = 0; i < r.queueAccounts.size(); ++i)
    qa += (i ? "," : "") + util::JsonObject()
                               .str("account", r.queueAccounts[i].account)
                               .num("messages_last_hour", static_cast<int64_t>(r.queueAccounts[i].total))
                               .finish();
  o.raw("senders_last_hour", qa + "]");
  return o.finish();
}

}  // namespace subrelay::metrics
