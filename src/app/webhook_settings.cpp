#include "app/webhook_settings.h"

namespace subrelay::app {

std::map<std::string, std::set<std::string>> webhookEventSets(const config::Config& cfg) {
  std::map<std::string, std::set<std::string>> out;
  for (const auto& a : cfg.accounts)
    if (a.webhook) out[a.username] = std::set<std::string>(a.webhook->events.begin(), a.webhook->events.end());
  return out;
}

webhook::DispatcherSettings webhookDispatcherSettings(const config::Config& cfg) {
  webhook::DispatcherSettings s;
  for (const auto& a : cfg.accounts)
    if (a.webhook) s.accounts[a.username] = webhook::Target{a.webhook->url, a.webhook->secret};
  s.caFile = cfg.webhooks.caFile;
  s.timeout = std::chrono::duration_cast<std::chrono::milliseconds>(cfg.webhooks.timeout);
  s.policy.retrySchedule = cfg.webhooks.retrySchedule;
  s.policy.maxAge = cfg.webhooks.maxAge;
  s.policy.maxBacklog = cfg.webhooks.maxBacklog;
  return s;
}

}  // namespace subrelay::app
