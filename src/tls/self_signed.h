// A self-signed certificate and key made in memory, for `serve --dev` and tests.
#pragma once

#include <string>

#include "util/result.h"

namespace subrelay::tls {

struct PemPair {
  std::string certificatePem;
  std::string privateKeyPem;
};

// EC P-256 key, SHA-256 signature, CN and subjectAltName DNS:hostname plus IP:127.0.0.1
// and IP:::1, valid from an hour ago for `days` days.
util::Result<PemPair> makeSelfSigned(const std::string& hostname, int days = 365);

}  // namespace subrelay::tls
