#include "app/dev_config.h"

#include "util/file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <filesystem>
#include <fstream>
#include <random>

#include "policy/password.h"
#include "tls/self_signed.h"

namespace subrelay::app {

namespace {

// The embedded config, validated by the same loader as any file. The password hash is
// filled in at start.
constexpr const char* kDevConfigJson = R"JSON({
  "hostname": "localhost",
  "data_dir": "subrelay-dev",
  "tls": { "certificate": "subrelay-dev/tls/cert.pem", "private_key": "subrelay-dev/tls/key.pem" },
  "listeners": [
    { "address": "127.0.0.1:2587", "tls": "starttls" },
    { "address": "127.0.0.1:2465", "tls": "implicit" }
  ],
  "limits": { "auth_failure_delay": "1s" },
  "accounts": [
    { "username": "dev", "password_hash": "@HASH@", "senders": ["@localhost"], "mode": "capture" }
  ]
})JSON";

std::string randomPassword() {
  static constexpr char kChars[] = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
  std::random_device rd;  // getrandom(2) on Linux
  std::uniform_int_distribution<size_t> pick(0, sizeof(kChars) - 2);
  std::string pw;
  for (int i = 0; i < 20; ++i) pw += kChars[pick(rd)];
  return pw;
}

}  // namespace

util::Result<DevSetup> makeDevSetup() {
  namespace fs = std::filesystem;
  std::error_code ec;
  // 0700 from the start (mkdir's mode, not a chmod afterwards): the queue and the key
  // live here.
  for (const std::string& dir : {std::string(kDevDataDir), std::string(kDevDataDir) + "/tls"}) {
    if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST)
      return util::makeError("cannot create ./" + dir + ": " + std::strerror(errno));
  }
  if (ec) return util::makeError(std::string("cannot create ./") + kDevDataDir + ": " + ec.message());

  DevSetup out;
  out.certificatePath = std::string(kDevDataDir) + "/tls/cert.pem";
  std::string keyPath = std::string(kDevDataDir) + "/tls/key.pem";
  // Keep the certificate across restarts so clients that trust it keep working.
  if (!fs::exists(out.certificatePath) || !fs::exists(keyPath)) {
    auto pem = tls::makeSelfSigned("localhost", 825);
    if (!pem.ok()) return util::makeError("cannot make the dev certificate: " + pem.error().message);
    if (!util::replaceFile(keyPath, pem->privateKeyPem, 0600, true) || !util::replaceFile(out.certificatePath, pem->certificatePem, 0644, true))
      return util::makeError("cannot write the dev certificate under ./" + std::string(kDevDataDir) + "/tls");
  }

  out.password = randomPassword();
  auto hash = policy::hashPassword(out.password);
  if (!hash.ok()) return util::makeError("cannot hash the dev password: " + hash.error().message);
  std::string json = kDevConfigJson;
  json.replace(json.find("@HASH@"), 6, hash.value());
  auto lr = config::parseConfig(json, "<embedded dev config>");
  if (!lr.config) {
    std::string all;
    for (const auto& l : lr.formatErrors()) all += l + "; ";
    return util::makeError("embedded dev config is invalid (a bug): " + all);
  }
  out.config = std::move(*lr.config);
  out.config.sourcePath = "<embedded dev config>";
  return out;
}

}  // namespace subrelay::app
