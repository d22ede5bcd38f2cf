// `subrelay accounts [--json]`: per-account meters (accepted, refused by limit,
// recipients, bytes, AUTH failures) and the day/month rate-limit windows, read from the
// queue database while serve runs (serve writes them every few seconds).
#pragma once

#include <optional>
#include <string>

#include "config/config.h"

namespace subrelay::app {

struct AccountsCmdOptions {
  std::string dataDir;
  bool json = false;
  // When the config is known, every configured account is listed (also those with no
  // traffic yet) with its mode and rate limits.
  std::optional<config::Config> config;
};

int accountsList(const AccountsCmdOptions& o);

}  // namespace subrelay::app
