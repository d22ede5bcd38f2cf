// makeSelfSigned: an EC P-256 key and an X.509 v3 certificate (RFC 5280) for
// `serve --dev` and tests. Extensions are built as structures, not from an OpenSSL
// config string, so a host name cannot smuggle extra entries in (a ',' in "DNS:...").
// Only calls present in both BoringSSL and OpenSSL 3 (no EC_KEY_*, deprecated in 3.0).
#include "tls/self_signed.h"

#include <arpa/inet.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/obj_mac.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "tls/tls_context.h"
#include "util/cptr.h"

namespace subrelay::tls {
namespace {

using PkeyPtr = util::CPtr<EVP_PKEY, EVP_PKEY_free>;
using PkeyCtxPtr = util::CPtr<EVP_PKEY_CTX, EVP_PKEY_CTX_free>;
using X509Ptr = util::CPtr<X509, X509_free>;
using BioPtr = util::CPtr<BIO, BIO_free>;
using BnPtr = util::CPtr<BIGNUM, BN_free>;
using GeneralNamesPtr = util::CPtr<GENERAL_NAMES, GENERAL_NAMES_free>;
using BasicConstraintsPtr = util::CPtr<BASIC_CONSTRAINTS, BASIC_CONSTRAINTS_free>;

util::Error failure(const char* step) {
  return util::makeError(std::string("self-signed certificate: ") + step + ": " + lastTlsError());
}

PkeyPtr makeP256Key() {
  PkeyCtxPtr pctx(EVP_PKEY_CTX_new_id(EVP_PKEY_EC, nullptr));
  if (!pctx || EVP_PKEY_keygen_init(pctx.get()) <= 0 ||
      EVP_PKEY_CTX_set_ec_paramgen_curve_nid(pctx.get(), NID_X9_62_prime256v1) <= 0) {
    return nullptr;
  }
  EVP_PKEY* key = nullptr;
  if (EVP_PKEY_keygen(pctx.get(), &key) <= 0) return nullptr;
  return PkeyPtr(key);
}

bool addDns(GENERAL_NAMES* names, const std::string& host) {
  GENERAL_NAME* gn = GENERAL_NAME_new();
  ASN1_IA5STRING* ia5 = ASN1_IA5STRING_new();
  if (!gn || !ia5 || !ASN1_STRING_set(ia5, host.data(), static_cast<int>(host.size()))) {
    GENERAL_NAME_free(gn);
    ASN1_IA5STRING_free(ia5);
    return false;
  }
  GENERAL_NAME_set0_value(gn, GEN_DNS, ia5);
  if (!sk_GENERAL_NAME_push(names, gn)) {
    GENERAL_NAME_free(gn);
    return false;
  }
  return true;
}

// RFC 5280 4.2.1.6: iPAddress is the address in network byte order, 4 or 16 octets.
bool addIp(GENERAL_NAMES* names, const char* text) {
  unsigned char buf[16];
  int len = 0;
  if (inet_pton(AF_INET, text, buf) == 1) {
    len = 4;
  } else if (inet_pton(AF_INET6, text, buf) == 1) {
    len = 16;
  } else {
    return false;
  }
  GENERAL_NAME* gn = GENERAL_NAME_new();
  ASN1_OCTET_STRING* os = ASN1_OCTET_STRING_new();
  if (!gn || !os || !ASN1_OCTET_STRING_set(os, buf, len)) {
    GENERAL_NAME_free(gn);
    ASN1_OCTET_STRING_free(os);
    return false;
  }
  GENERAL_NAME_set0_value(gn, GEN_IPADD, os);
  if (!sk_GENERAL_NAME_push(names, gn)) {
    GENERAL_NAME_free(gn);
    return false;
  }
  return true;
}

bool isIpLiteral(const std::string& s) {
  unsigned char buf[16];
  return inet_pton(AF_INET, s.c_str(), buf) == 1 || inet_pton(AF_INET6, s.c_str(), buf) == 1;
}

util::Result<std::string> bioToString(BIO* bio) {
  char* p = nullptr;
  long n = BIO_get_mem_data(bio, &p);
  if (n <= 0 || !p) return util::makeError("self-signed certificate: empty PEM output");
  return std::string(p, static_cast<size_t>(n));
}

}  // namespace

util::Result<PemPair> makeSelfSigned(const std::string& hostname, int days) {
  if (hostname.empty() || hostname.size() > 253 || hostname.find('\0') != std::string::npos) {
    return util::makeError("self-signed certificate: invalid host name");
  }
  if (days < 1 || days > 3650) {
    return util::makeError("self-signed certificate: validity must be 1..3650 days");
  }
  ERR_clear_error();
  PkeyPtr key = makeP256Key();
  if (!key) return failure("EC P-256 key generation");

  X509Ptr cert(X509_new());
  if (!cert) return failure("X509_new");
  // Version field value 2 means v3 (RFC 5280 4.1.2.1): needed for extensions.
  if (!X509_set_version(cert.get(), 2)) return failure("version");

  // RFC 5280 4.1.2.2: positive, at most 20 octets; 127 random bits (top bit clear so the
  // DER encoding never needs a 17th octet and is never negative).
  unsigned char serialBytes[16];
  if (!RAND_bytes(serialBytes, sizeof serialBytes)) return failure("random serial");
  serialBytes[0] &= 0x7f;
  serialBytes[0] |= 0x01;  // never zero
  BnPtr serial(BN_bin2bn(serialBytes, sizeof serialBytes, nullptr));
  if (!serial || !BN_to_ASN1_INTEGER(serial.get(), X509_get_serialNumber(cert.get()))) {
    return failure("serial number");
  }

  // Valid from an hour ago: tolerates a peer whose clock is a little behind.
  if (!X509_gmtime_adj(X509_getm_notBefore(cert.get()), -3600) ||
      !X509_time_adj_ex(X509_getm_notAfter(cert.get()), days, 0, nullptr)) {
    return failure("validity");
  }
  if (!X509_set_pubkey(cert.get(), key.get())) return failure("public key");

  X509_NAME* name = X509_get_subject_name(cert.get());
  if (!X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>(hostname.c_str()),
                                  static_cast<int>(hostname.size()), -1, 0) ||
      !X509_set_issuer_name(cert.get(), name)) {
    return failure("subject name");
  }

  // RFC 6125 6.4.4: clients match the subjectAltName, not the CN.
  GeneralNamesPtr names(sk_GENERAL_NAME_new_null());
  if (!names) return failure("subjectAltName");
  bool ok = isIpLiteral(hostname) ? addIp(names.get(), hostname.c_str()) : addDns(names.get(), hostname);
  if (hostname != "127.0.0.1") ok = ok && addIp(names.get(), "127.0.0.1");
  if (hostname != "::1") ok = ok && addIp(names.get(), "::1");
  if (!ok || !X509_add1_ext_i2d(cert.get(), NID_subject_alt_name, names.get(), 0, X509V3_ADD_DEFAULT)) {
    return failure("subjectAltName");
  }

  // RFC 5280 4.2.1.9: an end-entity certificate; critical so nobody chains from it.
  BasicConstraintsPtr bc(BASIC_CONSTRAINTS_new());
  if (!bc) return failure("basicConstraints");
  bc->ca = 0;
  if (!X509_add1_ext_i2d(cert.get(), NID_basic_constraints, bc.get(), 1, X509V3_ADD_DEFAULT)) {
    return failure("basicConstraints");
  }

  if (!X509_sign(cert.get(), key.get(), EVP_sha256())) return failure("signature");

  BioPtr certBio(BIO_new(BIO_s_mem()));
  BioPtr keyBio(BIO_new(BIO_s_mem()));
  if (!certBio || !keyBio || !PEM_write_bio_X509(certBio.get(), cert.get()) ||
      !PEM_write_bio_PrivateKey(keyBio.get(), key.get(), nullptr, nullptr, 0, nullptr, nullptr)) {
    return failure("PEM encoding");
  }
  auto certPem = bioToString(certBio.get());
  if (!certPem) return certPem.error();
  auto keyPem = bioToString(keyBio.get());
  if (!keyPem) return keyPem.error();
  return PemPair{std::move(*certPem), std::move(*keyPem)};
}

}  // namespace subrelay::tls
