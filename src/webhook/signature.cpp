// HMAC through the TLS backend's libcrypto (BoringSSL and OpenSSL 3 both keep HMAC() and
// CRYPTO_memcmp(), as policy/authenticator.cpp and policy/password.cpp use them).
#include "webhook/signature.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <charconv>
#include <cstdlib>

namespace subrelay::webhook {

std::string hmacSha256Hex(std::string_view key, std::string_view data) {
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  static const unsigned char kEmpty = 0;
  const unsigned char* ok =
      HMAC(EVP_sha256(), key.empty() ? static_cast<const void*>(&kEmpty) : static_cast<const void*>(key.data()), key.size(),
           data.empty() ? &kEmpty : reinterpret_cast<const unsigned char*>(data.data()), data.size(), out, &len);
  if (!ok || len != 32) std::abort();  // cannot fail but on OOM
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex;
  hex.reserve(64);
  for (unsigned i = 0; i < len; ++i) {
    hex += kHex[out[i] >> 4];
    hex += kHex[out[i] & 15];
  }
  return hex;
}

std::string sign(std::string_view secret, int64_t timestamp, std::string_view body) {
  std::string signed_ = std::to_string(timestamp);
  signed_ += '.';
  signed_.append(body);
  return "v1=" + hmacSha256Hex(secret, signed_);
}

bool constantTimeEqual(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  if (a.empty()) return true;
  return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

bool verify(std::string_view secret, std::string_view timestampHeader, std::string_view body,
            std::string_view signatureHeader, int64_t now, int64_t toleranceSeconds) {
  int64_t ts = 0;
  const char* end = timestampHeader.data() + timestampHeader.size();
  auto [p, ec] = std::from_chars(timestampHeader.data(), end, ts);
  if (ec != std::errc() || p != end || timestampHeader.empty()) return false;
  if (ts > now + toleranceSeconds || ts < now - toleranceSeconds) return false;
  return constantTimeEqual(sign(secret, ts, body), signatureHeader);
}

}  // namespace subrelay::webhook
