// Authenticator: AUTH PLAIN/LOGIN credentials (RFC 4954, RFC 4616) against the account
// list. scrypt (RFC 7914) makes each check deliberately slow, so:
// - unknown users and accounts with an unusable hash are checked against a dummy hash
//   with the first account's parameters: the same cost as a wrong password, so timing
//   does not reveal which usernames exist;
// - a success is cached as HMAC-SHA256(random per-process key, user || 0 || password):
//   the cache never holds the password or a fast unsalted hash of it, and a process
//   restart or reload (a new Authenticator) invalidates it.
// The mutex guards the cache map only; scrypt runs unlocked so worker threads verify
// in parallel. hashes_, dummyHash_ and macKey_ are immutable after construction.
// libcrypto (HMAC, RAND_bytes) is linked on purpose: see src/policy/meson.build.
#include "policy/authenticator.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <cstdlib>

#include "policy/password.h"

namespace subrelay::policy {
namespace {
constexpr size_t kMacKeyLen = 32;
constexpr size_t kMacLen = 32;  // SHA-256
}  // namespace

Authenticator::Authenticator(std::vector<Credential> accounts) {
  ScryptParams dummyParams;
  bool haveParams = false;
  for (Credential& c : accounts) {
    auto params = hashParams(c.passwordHash);
    // check-config refuses malformed hashes; if one slips through, the account simply
    // never authenticates (and costs what an unknown user costs).
    if (!params) continue;
    if (!haveParams) {
      dummyParams = *params;
      haveParams = true;
    }
    hashes_.insert_or_assign(std::move(c.username), std::move(c.passwordHash));
  }
  dummyHash_ = unmatchableHash(dummyParams);
  macKey_.resize(kMacKeyLen);
  if (RAND_bytes(reinterpret_cast<unsigned char*>(macKey_.data()), kMacKeyLen) != 1) {
    // Out of entropy at start-up: nothing safe to do but stop (ARCHITECTURE: invariants).
    std::abort();
  }
}

std::string Authenticator::mac(std::string_view username, std::string_view password) const {
  // The 0 separator keeps ("ab","c") and ("a","bc") apart; SASL PLAIN forbids NUL in
  // both fields (RFC 4616 2), and this Authenticator only ever stores known usernames.
  std::string msg;
  msg.reserve(username.size() + 1 + password.size());
  msg.append(username);
  msg.push_back('\0');
  msg.append(password);
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int outLen = 0;
  const unsigned char* ok = HMAC(EVP_sha256(), macKey_.data(), macKey_.size(),
                                 reinterpret_cast<const unsigned char*>(msg.data()), msg.size(), out, &outLen);
  OPENSSL_cleanse(msg.data(), msg.size());
  if (!ok || outLen != kMacLen) std::abort();  // HMAC-SHA256 cannot fail but on OOM
  return std::string(reinterpret_cast<const char*>(out), outLen);
}

bool Authenticator::cachedOk(std::string_view username, std::string_view password) {
  std::string want;
  {
    std::lock_guard lock(mu_);
    auto it = cache_.find(username);
    if (it == cache_.end()) return false;
    want = it->second;
  }
  return constantTimeEquals(mac(username, password), want);
}

AuthCheck Authenticator::verify(std::string_view username, std::string_view password) {
  if (cachedOk(username, password)) return AuthCheck::Ok;
  auto it = hashes_.find(username);
  const std::string& hash = it == hashes_.end() ? dummyHash_ : it->second;
  // Evaluated for unknown users too, so both paths run exactly one scrypt.
  bool ok = verifyPassword(password, hash) && it != hashes_.end();
  if (!ok) return AuthCheck::BadCredentials;
  std::string m = mac(username, password);
  std::lock_guard lock(mu_);
  cache_.insert_or_assign(std::string(username), std::move(m));
  return AuthCheck::Ok;
}

}  // namespace subrelay::policy
