// `subrelay tls-rpt list|send`: the TLS-RPT counts (RFC 8460) serve has stored, and making
// the reports now instead of at the daily time (delivery/tls_rpt_reporter.h does the work).
#pragma once

#include <string>

namespace subrelay::app {

struct TlsRptCmdOptions {
  std::string configPath;
  std::string sub;   // "list" or "send"
  std::string day;   // "" = the subcommand's default (list: today, send: yesterday)
  bool json = false;
};

int cmdTlsRpt(const TlsRptCmdOptions& o);

}  // namespace subrelay::app
