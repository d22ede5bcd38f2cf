// `subrelay suppression list|add|remove ACCOUNT [ADDR]`: an account's suppression list
// (issue 13) in <data_dir>/queue.db, read and changed directly while serve runs; serve
// sees a change within about 2 seconds (the table's change counter, app/suppression_sync).
#pragma once

#include <optional>
#include <string>

#include "config/config.h"

namespace subrelay::app {

struct SuppressionCmdOptions {
  std::string dataDir;
  std::string sub;      // "list", "add", "remove"
  std::string account;
  std::string address;  // add, remove
  std::string reason;   // add: --reason ("" = "added by an operator")
  bool json = false;
  // When known, the account must be configured (else a clear error), and add applies
  // suppression.ttl. --dev knows its one account, "dev".
  std::optional<config::Config> config;
  std::optional<std::string> onlyAccount;  // --dev
};

int suppressionCommand(const SuppressionCmdOptions& o);

}  // namespace subrelay::app
