#include "app/suppression_cmd.h"

#include <cstdio>
#include <ctime>

#include "app/queue_cmd.h"
#include "policy/suppression.h"
#include "queue/sqlite_store.h"
#include "util/json_writer.h"
#include "util/time_fmt.h"

namespace subrelay::app {

namespace {

int fail(const std::string& why) {
  std::fprintf(stderr, "subrelay: %s\n", why.c_str());
  return 1;
}

// "" when the account may be named, else why not.
std::string accountProblem(const SuppressionCmdOptions& o) {
  if (o.onlyAccount) {
    if (o.account == *o.onlyAccount) return {};
    return "no such account: " + o.account + " (serve --dev has one account, " + *o.onlyAccount + ")";
  }
  if (!o.config) return {};  // --data-dir: the config is not read
  for (const auto& a : o.config->accounts)
    if (a.username == o.account) return {};
  std::string names;
  for (const auto& a : o.config->accounts) names += (names.empty() ? "" : ", ") + a.username;
  return "no such account: " + o.account + " (configured: " + (names.empty() ? "none" : names) + ")";
}

}  // namespace

int suppressionCommand(const SuppressionCmdOptions& o) {
  if (std::string why = accountProblem(o); !why.empty()) return fail(why);
  const int64_t now = static_cast<int64_t>(std::time(nullptr));
  std::string address;
  if (o.sub != "list") {
    auto a = policy::normalizeSuppressedAddress(o.address);
    if (!a) return fail("not an email address: " + o.address);
    address = std::move(*a);
  }
  auto store = openQueue(o.dataDir, o.sub != "list");
  if (!store.ok()) return fail(store.error().message);
  auto& q = *store.value();

  if (o.sub == "add") {
    queue::SuppressionRow row;
    row.account = o.account;
    row.address = address;
    row.reason = policy::cleanSuppressionReason(o.reason);
    if (row.reason.empty()) row.reason = "added by an operator";
    row.createdAt = now;
    row.expiresAt = policy::suppressionExpiry(now, o.config ? o.config->suppression.ttl.count() : 0);
    row.source = "manual";
    if (auto r = q.upsertSuppression(row); !r.ok()) return fail(r.error().message);
    std::printf("suppressed %s for %s%s\n", address.c_str(), o.account.c_str(),
                row.expiresAt ? (" until " + util::isoUtc(row.expiresAt)).c_str() : "");
    return 0;
  }
  if (o.sub == "remove") {
    auto r = q.removeSuppression(o.account, address);
    if (!r.ok()) return fail(r.error().message);
    if (r.value() == 0) return fail(address + " is not on the suppression list of " + o.account);
    std::printf("removed %s from the suppression list of %s\n", address.c_str(), o.account.c_str());
    return 0;
  }
  auto rows = q.listSuppressions(o.account);
  if (!rows.ok()) return fail(rows.error().message);
  if (!o.json) std::printf("%-40s %-20s %-20s %-7s %s\n", "ADDRESS", "SINCE", "EXPIRES", "SOURCE", "REASON");
  for (const auto& r : rows.value()) {
    if (r.expired(now)) continue;  // the pruner deletes it soon; serve no longer refuses it
    if (o.json) {
      util::JsonObject j;
      j.str("account", r.account).str("address", r.address).str("reason", r.reason).str("source", r.source);
      j.str("created_at", util::isoUtc(r.createdAt));
      if (r.expiresAt) j.str("expires_at", util::isoUtc(r.expiresAt));
      else j.raw("expires_at", "null");
      std::printf("%s\n", j.finish().c_str());
    } else {
      std::printf("%-40s %-20s %-20s %-7s %s\n", r.address.c_str(), util::isoUtc(r.createdAt).c_str(),
                  r.expiresAt ? util::isoUtc(r.expiresAt).c_str() : "never", r.source.c_str(), r.reason.c_str());
    }
  }
  return 0;
}

}  // namespace subrelay::app
