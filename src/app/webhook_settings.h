// config::Config -> the webhook pieces: which events each account's webhook wants (for
// every queue connection that writes state changes) and the dispatcher's settings.
#pragma once

#include <map>
#include <set>
#include <string>

#include "config/config.h"
#include "webhook/dispatcher.h"

namespace subrelay::app {

std::map<std::string, std::set<std::string>> webhookEventSets(const config::Config& cfg);
webhook::DispatcherSettings webhookDispatcherSettings(const config::Config& cfg);

}  // namespace subrelay::app
