// Password hashes: scrypt (RFC 7914) in a PHC-style string,
//   $scrypt$ln=<log2 N>,r=<r>,p=<p>$<salt>$<key>
// with salt (16 bytes) and key (32 bytes) in standard base64 *with* padding (RFC 4648
// section 4, util::base64Decode is strict), so there is exactly one valid spelling of a
// hash and anything else is refused rather than guessed at.
//
// policy/ links libcrypto although docs/architecture.md says "util only": scrypt, a CSPRNG
// and a constant-time compare must come from a reviewed implementation, and libcrypto
// (BoringSSL or OpenSSL 3, both have EVP_PBE_scrypt) is already in the binary. See
// src/policy/meson.build.
#include "policy/password.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <charconv>
#include <cstdint>
#include <optional>

#include "util/base64.h"

namespace subrelay::policy {
namespace {

constexpr std::string_view kPrefix = "$scrypt$";
constexpr size_t kSaltLen = 16;
constexpr size_t kKeyLen = 32;
// Bounds on what a hash string may ask for. A hash comes from the config file, but a
// typo must not make every AUTH allocate gigabytes or spin for minutes.
constexpr int kMinLogN = 10, kMaxLogN = 20;
constexpr int kMinR = 1, kMaxR = 32;
constexpr int kMinP = 1, kMaxP = 16;
// scrypt needs 128 * r * N bytes (RFC 7914 section 5 ROMix V); ln=20, r=8 is 1 GiB.
constexpr uint64_t kMaxMemory = uint64_t(1) << 30;

const char kFormatHint[] =
    "password_hash: expected the output of `subrelay hash-password` "
    "($scrypt$ln=..,r=..,p=..$salt$key)";

struct Parsed {
  ScryptParams params;
  std::string salt;
  std::string key;
};

uint64_t memoryFor(const ScryptParams& p) { return 128 * uint64_t(p.r) * (uint64_t(1) << p.logN); }

std::string checkParams(const ScryptParams& p) {
  if (p.logN < kMinLogN || p.logN > kMaxLogN) return "ln must be 10..20";
  if (p.r < kMinR || p.r > kMaxR) return "r must be 1..32";
  if (p.p < kMinP || p.p > kMaxP) return "p must be 1..16";
  if (memoryFor(p) > kMaxMemory) return "128*r*2^ln exceeds 1 GiB";
  return {};
}

// "name=<decimal>" with no sign, no leading zero, at most two digits (all bounds fit).
bool parseField(std::string_view s, std::string_view name, int& out) {
  if (s.size() <= name.size() + 1 || s.substr(0, name.size()) != name || s[name.size()] != '=') {
    return false;
  }
  std::string_view digits = s.substr(name.size() + 1);
  if (digits.size() > 2 || (digits.size() > 1 && digits[0] == '0')) return false;
  for (char c : digits) {
    if (c < '0' || c > '9') return false;
  }
  auto [ptr, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), out);
  return ec == std::errc() && ptr == digits.data() + digits.size();
}

// Parses and validates; on failure `why` says what is wrong (for check-config).
std::optional<Parsed> parse(std::string_view s, std::string& why) {
  if (s.substr(0, kPrefix.size()) != kPrefix) {
    why = "does not start with $scrypt$";
    return std::nullopt;
  }
  s.remove_prefix(kPrefix.size());
  // params $ salt $ key: exactly two more '$'.
  size_t d1 = s.find('$');
  size_t d2 = d1 == std::string_view::npos ? d1 : s.find('$', d1 + 1);
  if (d2 == std::string_view::npos || s.find('$', d2 + 1) != std::string_view::npos) {
    why = "wrong number of '$'-separated fields";
    return std::nullopt;
  }
  std::string_view params = s.substr(0, d1);
  std::string_view salt64 = s.substr(d1 + 1, d2 - d1 - 1);
  std::string_view key64 = s.substr(d2 + 1);

  Parsed out;
  size_t c1 = params.find(',');
  size_t c2 = c1 == std::string_view::npos ? c1 : params.find(',', c1 + 1);
  if (c2 == std::string_view::npos || params.find(',', c2 + 1) != std::string_view::npos ||
      !parseField(params.substr(0, c1), "ln", out.params.logN) ||
      !parseField(params.substr(c1 + 1, c2 - c1 - 1), "r", out.params.r) ||
      !parseField(params.substr(c2 + 1), "p", out.params.p)) {
    why = "parameters must read ln=N,r=N,p=N";
    return std::nullopt;
  }
  if (why = checkParams(out.params); !why.empty()) return std::nullopt;

  auto salt = util::base64Decode(salt64);
  if (!salt || salt->size() != kSaltLen) {
    why = "salt must be 16 bytes in padded base64";
    return std::nullopt;
  }
  auto key = util::base64Decode(key64);
  if (!key || key->size() != kKeyLen) {
    why = "key must be 32 bytes in padded base64";
    return std::nullopt;
  }
  out.salt = std::move(*salt);
  out.key = std::move(*key);
  return out;
}

bool derive(std::string_view password, std::string_view salt, const ScryptParams& p, unsigned char* out) {
  // Room for V (128*r*N), B (128*r*p) and the library's own bookkeeping; both libraries
  // refuse to run above max_mem (BoringSSL's default of 32 MiB is just below ln=15, r=8).
  uint64_t maxMem = memoryFor(p) + 128 * uint64_t(p.r) * uint64_t(p.p) + (1 << 20);
  return EVP_PBE_scrypt(password.data(), password.size(), reinterpret_cast<const unsigned char*>(salt.data()),
                        salt.size(), uint64_t(1) << p.logN, uint64_t(p.r), uint64_t(p.p), static_cast<size_t>(maxMem),
                        out, kKeyLen) == 1;
}

std::string encode(const ScryptParams& p, std::string_view salt, std::string_view key) {
  std::string out(kPrefix);
  out += "ln=" + std::to_string(p.logN) + ",r=" + std::to_string(p.r) + ",p=" + std::to_string(p.p) + "$";
  out += util::base64Encode(salt);
  out += '$';
  out += util::base64Encode(key);
  return out;
}

}  // namespace

util::Result<std::string> hashPassword(std::string_view password, ScryptParams params) {
  if (std::string why = checkParams(params); !why.empty()) {
    return util::makeError("scrypt parameters: " + why);
  }
  unsigned char salt[kSaltLen];
  if (RAND_bytes(salt, sizeof salt) != 1) return util::makeError("no randomness for the salt");
  unsigned char key[kKeyLen];
  std::string_view saltView(reinterpret_cast<const char*>(salt), sizeof salt);
  if (!derive(password, saltView, params, key)) return util::makeError("scrypt failed");
  std::string out = encode(params, saltView, {reinterpret_cast<const char*>(key), sizeof key});
  OPENSSL_cleanse(key, sizeof key);
  return out;
}

bool verifyPassword(std::string_view password, std::string_view encodedHash) {
  std::string why;
  auto parsed = parse(encodedHash, why);
  if (!parsed) return false;
  unsigned char key[kKeyLen];
  if (!derive(password, parsed->salt, parsed->params, key)) return false;
  bool ok = CRYPTO_memcmp(key, parsed->key.data(), kKeyLen) == 0;
  OPENSSL_cleanse(key, sizeof key);
  return ok;
}

std::string checkHashFormat(std::string_view encodedHash) {
  std::string why;
  if (parse(encodedHash, why)) return {};
  return std::string(kFormatHint) + ": " + why;
}

util::Result<ScryptParams> hashParams(std::string_view encodedHash) {
  std::string why;
  auto parsed = parse(encodedHash, why);
  if (!parsed) return util::makeError(why);
  return parsed->params;
}

std::string unmatchableHash(ScryptParams params) {
  if (!checkParams(params).empty()) params = ScryptParams{};
  unsigned char bytes[kSaltLen + kKeyLen];
  if (RAND_bytes(bytes, sizeof bytes) != 1) {
    // Without randomness the dummy still costs a full scrypt; a zero key is never the
    // output for a real password in practice.
    OPENSSL_cleanse(bytes, sizeof bytes);
  }
  const char* b = reinterpret_cast<const char*>(bytes);
  return encode(params, {b, kSaltLen}, {b + kSaltLen, kKeyLen});
}

bool constantTimeEquals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  if (a.empty()) return true;
  return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

}  // namespace subrelay::policy
