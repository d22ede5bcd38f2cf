// `subrelay tls-policy DOMAIN`: what the delivery engine decides about TLS for a recipient
// in DOMAIN and why (relay, override, DANE, MTA-STS, opportunistic), from the live DNS and
// the live MTA-STS policy. The explanation is delivery/tls_explain.h; this file runs the
// lookups (the configured resolvers, the HTTPS policy GET) on a loop of its own and prints.
#pragma once

#include <string>

namespace subrelay::app {

struct TlsPolicyCmdOptions {
  std::string config;
  std::string domain;   // A-labels, lower case (cli.cpp normalises it)
  std::string account;  // --account: evaluate this account's relay; "" = none
  bool json = false;
};

// 0: explained; 1: the configuration could not be read, or no route (the reason on stderr,
// the partial explanation on stdout).
int tlsPolicyCommand(const TlsPolicyCmdOptions& o);

}  // namespace subrelay::app
