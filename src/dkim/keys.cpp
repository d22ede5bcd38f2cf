// DKIM private keys: loading (PEM PKCS#8 or traditional RSA), generation, raw signing
// and the DNS TXT record. Key sizes per RFC 8301 3.2 ("Signers MUST use RSA keys of at
// least 1024 bits ... SHOULD use RSA keys of at least 2048 bits"): we refuse to sign
// with less than 2048 bits and cap at 4096 (RFC 8301 3.2 verifiers need only go to 4096).
// Ed25519 per RFC 8463 3 (signing) and 4.2 (p= is the raw 32-byte public key).
// Only EVP_* calls that BoringSSL and OpenSSL 3 share (docs/tls-backends.md).
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>
#include <optional>

#include "dkim/dkim.h"
#include "util/base64.h"
#include "util/cptr.h"
#include "util/strings.h"

namespace subrelay::dkim {
namespace {

using PkeyPtr = util::CPtr<EVP_PKEY, EVP_PKEY_free>;
using PkeyCtxPtr = util::CPtr<EVP_PKEY_CTX, EVP_PKEY_CTX_free>;
using MdCtxPtr = util::CPtr<EVP_MD_CTX, EVP_MD_CTX_free>;
using BioPtr = util::CPtr<BIO, BIO_free>;

constexpr int kMinRsaBits = 2048;
constexpr int kMaxRsaBits = 4096;

// Never prompt on the terminal for a passphrase: encrypted keys are refused.
int noPassword(char*, int, int, void*) { return 0; }

std::string cryptoError() {
  unsigned long e = ERR_get_error();
  ERR_clear_error();
  if (e == 0) return "unknown error";
  char buf[256];
  ERR_error_string_n(e, buf, sizeof buf);
  return buf;
}

std::string describeKeyType(int id, int bits) {
  if (id == EVP_PKEY_RSA) return "an RSA key (" + std::to_string(bits) + " bits)";
  if (id == EVP_PKEY_ED25519) return "an Ed25519 key";
  if (id == EVP_PKEY_EC) return "an EC key (ECDSA is not a DKIM algorithm)";
  return "a key of unsupported type " + std::to_string(id);
}

class EvpKey final : public PrivateKey {
 public:
  EvpKey(PkeyPtr k, Algorithm alg, int bits, std::string txt)
      : key_(std::move(k)), alg_(alg), bits_(bits), txt_(std::move(txt)) {}

  Algorithm algorithm() const override { return alg_; }
  int bits() const override { return bits_; }
  std::string txtRecord() const override { return txt_; }

  util::Result<std::string> signRaw(std::string_view data) const override {
    MdCtxPtr ctx(EVP_MD_CTX_new());
    if (!ctx) return util::makeError("DKIM sign: out of memory");
    // RSA: RSASSA-PKCS1-v1_5 with SHA-256 (the default padding). Ed25519: PureEdDSA, no
    // digest (RFC 8032 5.1; RFC 8463 3 has the caller pass the SHA-256 hash as data).
    const EVP_MD* md = alg_ == Algorithm::RsaSha256 ? EVP_sha256() : nullptr;
    if (EVP_DigestSignInit(ctx.get(), nullptr, md, nullptr, key_.get()) != 1) {
      return util::makeError("DKIM sign: " + cryptoError());
    }
    const auto* in = reinterpret_cast<const unsigned char*>(data.data());
    size_t len = 0;
    if (EVP_DigestSign(ctx.get(), nullptr, &len, in, data.size()) != 1) {
      return util::makeError("DKIM sign: " + cryptoError());
    }
    std::string sig(len, '\0');
    if (EVP_DigestSign(ctx.get(), reinterpret_cast<unsigned char*>(sig.data()), &len, in, data.size()) != 1) {
      return util::makeError("DKIM sign: " + cryptoError());
    }
    sig.resize(len);
    return sig;
  }

  std::string pemPrivate() const override {
    BioPtr bio(BIO_new(BIO_s_mem()));
    if (!bio || PEM_write_bio_PKCS8PrivateKey(bio.get(), key_.get(), nullptr, nullptr, 0, nullptr, nullptr) != 1) {
      ERR_clear_error();
      return {};
    }
    char* p = nullptr;
    long n = BIO_get_mem_data(bio.get(), &p);
    return n > 0 ? std::string(p, size_t(n)) : std::string();
  }

 private:
  PkeyPtr key_;
  Algorithm alg_;
  int bits_;
  std::string txt_;
};

// Checks type and size against `expected` and wraps the key.
util::Result<std::shared_ptr<const PrivateKey>> wrap(PkeyPtr k, Algorithm expected) {
  int id = EVP_PKEY_id(k.get());
  int bits = EVP_PKEY_bits(k.get());
  Algorithm found = Algorithm::RsaSha256;
  bool known = true;
  if (id == EVP_PKEY_RSA) {
    found = Algorithm::RsaSha256;
  } else if (id == EVP_PKEY_ED25519) {
    found = Algorithm::Ed25519Sha256;
  } else {
    known = false;
  }
  if (!known || found != expected) {
    return util::makeError("expected " + std::string(expected == Algorithm::RsaSha256 ? "an RSA" : "an Ed25519") +
                           " key for " + std::string(algorithmName(expected)) + ", found " +
                           describeKeyType(id, bits));
  }
  std::string txt;
  if (found == Algorithm::RsaSha256) {
    if (bits < kMinRsaBits || bits > kMaxRsaBits) {
      return util::makeError("RSA key of " + std::to_string(bits) +
                             " bits: DKIM keys must be 2048 to 4096 bits (RFC 8301)");
    }
    // RFC 6376 3.6.1 p=: base64 of the DER SubjectPublicKeyInfo (what rsa-sha256
    // verifiers parse; RFC 6376 3.6.1 "k=rsa" notes).
    int n = i2d_PUBKEY(k.get(), nullptr);
    if (n <= 0) return util::makeError("cannot encode the RSA public key: " + cryptoError());
    std::string der(size_t(n), '\0');
    auto* p = reinterpret_cast<unsigned char*>(der.data());
    if (i2d_PUBKEY(k.get(), &p) != n) return util::makeError("cannot encode the RSA public key: " + cryptoError());
    txt = "v=DKIM1; k=rsa; p=" + util::base64Encode(der);
    return std::shared_ptr<const PrivateKey>(std::make_shared<EvpKey>(std::move(k), found, bits, std::move(txt)));
  }
  // RFC 8463 4.2: "The p= value in the key record is the Ed25519 public key encoded in
  // base64" (the raw 32 bytes, not a SubjectPublicKeyInfo).
  unsigned char raw[32];
  size_t rawLen = sizeof raw;
  if (EVP_PKEY_get_raw_public_key(k.get(), raw, &rawLen) != 1 || rawLen != sizeof raw) {
    return util::makeError("cannot extract the Ed25519 public key: " + cryptoError());
  }
  txt = "v=DKIM1; k=ed25519; p=" + util::base64Encode(std::string_view(reinterpret_cast<char*>(raw), rawLen));
  return std::shared_ptr<const PrivateKey>(std::make_shared<EvpKey>(std::move(k), found, 256, std::move(txt)));
}

}  // namespace

util::Result<std::shared_ptr<const PrivateKey>> loadPrivateKeyPem(std::string_view pem, Algorithm expected) {
  ERR_clear_error();
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (!bio) return util::makeError("out of memory");
  // Reads "BEGIN PRIVATE KEY" (PKCS#8) and "BEGIN RSA PRIVATE KEY" (PKCS#1) alike.
  PkeyPtr k(PEM_read_bio_PrivateKey(bio.get(), nullptr, noPassword, nullptr));
  if (!k) {
    return util::makeError(
        "no unencrypted PEM private key found (expected BEGIN PRIVATE KEY or BEGIN RSA PRIVATE KEY): " +
        cryptoError());
  }
  ERR_clear_error();
  return wrap(std::move(k), expected);
}

util::Result<std::shared_ptr<const PrivateKey>> loadPrivateKeyFile(const std::string& path, Algorithm expected) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return util::makeError(path + ": cannot open: " + std::strerror(errno));
  std::string pem((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (f.bad()) return util::makeError(path + ": read error");
  auto r = loadPrivateKeyPem(pem, expected);
  if (!r) return util::makeError(path + ": " + r.error().message);
  return r;
}

util::Result<std::shared_ptr<const PrivateKey>> generateKey(Algorithm alg, int rsaBits) {
  ERR_clear_error();
  if (alg == Algorithm::RsaSha256 && rsaBits != 2048 && rsaBits != 3072 && rsaBits != 4096) {
    return util::makeError("RSA key size must be 2048, 3072 or 4096 bits (RFC 8301), not " +
                           std::to_string(rsaBits));
  }
  PkeyCtxPtr ctx(EVP_PKEY_CTX_new_id(alg == Algorithm::RsaSha256 ? EVP_PKEY_RSA : EVP_PKEY_ED25519, nullptr));
  if (!ctx || EVP_PKEY_keygen_init(ctx.get()) != 1) return util::makeError("keygen: " + cryptoError());
  if (alg == Algorithm::RsaSha256 && EVP_PKEY_CTX_set_rsa_keygen_bits(ctx.get(), rsaBits) != 1) {
    return util::makeError("keygen: " + cryptoError());
  }
  EVP_PKEY* raw = nullptr;
  if (EVP_PKEY_keygen(ctx.get(), &raw) != 1) return util::makeError("keygen: " + cryptoError());
  return wrap(PkeyPtr(raw), alg);
}

// RFC 6376 3.6.1 tag list: k= (default rsa) and p=, FWS inside p= ignored.
util::Result<void> verifyRaw(std::string_view txtRecord, std::string_view data, std::string_view signature) {
  std::string k = "rsa";
  std::optional<std::string> p;
  for (std::string_view tag : util::split(txtRecord, ';')) {
    tag = util::trim(tag);
    size_t eq = tag.find('=');
    if (eq == std::string_view::npos) continue;
    std::string_view name = util::trim(tag.substr(0, eq));
    std::string value;
    for (char c : tag.substr(eq + 1)) {
      if (c != ' ' && c != '\t' && c != '\r' && c != '\n') value += c;
    }
    if (name == "k") k = value;
    if (name == "p") p = value;
  }
  if (!p) return util::makeError("key record has no p= tag");
  auto der = util::base64Decode(*p);
  if (!der || der->empty()) return util::makeError("key record p= is not base64 (or the key is revoked)");
  ERR_clear_error();
  PkeyPtr key;
  if (k == "rsa") {
    const auto* in = reinterpret_cast<const unsigned char*>(der->data());
    key.reset(d2i_PUBKEY(nullptr, &in, static_cast<long>(der->size())));
    if (key && EVP_PKEY_id(key.get()) != EVP_PKEY_RSA) key.reset();
  } else if (k == "ed25519") {
    key.reset(EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, nullptr,
                                          reinterpret_cast<const unsigned char*>(der->data()), der->size()));
  } else {
    return util::makeError("key record k=" + k + " is not supported");
  }
  if (!key) return util::makeError("key record p= is not a " + k + " public key: " + cryptoError());
  MdCtxPtr ctx(EVP_MD_CTX_new());
  if (!ctx || EVP_DigestVerifyInit(ctx.get(), nullptr, k == "rsa" ? EVP_sha256() : nullptr, nullptr, key.get()) != 1) {
    return util::makeError("verify: " + cryptoError());
  }
  if (EVP_DigestVerify(ctx.get(), reinterpret_cast<const unsigned char*>(signature.data()), signature.size(),
                       reinterpret_cast<const unsigned char*>(data.data()), data.size()) != 1) {
    ERR_clear_error();
    return util::makeError("signature does not verify");
  }
  return {};
}

// RFC 1035 3.3.14: TXT-DATA is one or more <character-string>s of at most 255 bytes;
// in a zone file each is quoted, with " and \ escaped (RFC 1035 5.1).
std::string txtZoneStrings(std::string_view value) {
  std::string out;
  do {
    std::string_view part = value.substr(0, 255);
    value.remove_prefix(part.size());
    if (!out.empty()) out += ' ';
    out += '"';
    for (char c : part) {
      if (c == '"' || c == '\\') out += '\\';
      out += c;
    }
    out += '"';
  } while (!value.empty());
  return out;
}

}  // namespace subrelay::dkim
