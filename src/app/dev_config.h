// The embedded default of `serve --dev`: no config file, data in ./subrelay-dev/, a
// self-signed certificate, listeners on 127.0.0.1:2587 (STARTTLS) and 127.0.0.1:2465
// (implicit TLS), one account "dev" with a random password printed at start-up, every
// message captured.
#pragma once

#include <string>

#include "config/config.h"
#include "util/result.h"

namespace subrelay::app {

inline constexpr const char* kDevDataDir = "subrelay-dev";

struct DevSetup {
  config::Config config;
  std::string password;
  std::string certificatePath;
};

util::Result<DevSetup> makeDevSetup();

}  // namespace subrelay::app
