// TlsContext: SSL_CTX set-up shared by the submission listeners (server) and delivery
// (client). RFC 8996: TLS 1.0 and 1.1 are refused. RFC 9325 section 4: TLS 1.2 only
// with ECDHE key exchange and AEAD ciphers (AES-GCM, ChaCha20-Poly1305); TLS 1.3 suites
// are all AEAD. Compression (CRIME, RFC 9325 3.3) and renegotiation are off.
//
// One source for BoringSSL and OpenSSL 3 (SUBRELAY_TLS_BORINGSSL / SUBRELAY_TLS_OPENSSL);
// docs/tls-backends.md lists the API differences. The per-connection state
// lives in TlsEngine, not here.
#include "tls/tls_context.h"

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include "tls/tls_engine.h"
#include "util/cptr.h"

namespace subrelay::tls {
namespace {

using SslCtxPtr = util::CPtr<SSL_CTX, SSL_CTX_free>;
using BioPtr = util::CPtr<BIO, BIO_free>;
using X509Ptr = util::CPtr<X509, X509_free>;
using PkeyPtr = util::CPtr<EVP_PKEY, EVP_PKEY_free>;

// TLS 1.2 suites (RFC 9325 4.2): forward secrecy and AEAD only, AES-128-GCM first (fast
// with AES-NI), ChaCha20 for hosts without it, AES-256-GCM last. ECDSA and RSA both,
// so an operator's RSA certificate works.
constexpr const char* kCiphers12 =
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384";

// A certificate chain or key file larger than this is not a PEM file we want.
constexpr std::streamoff kMaxPemFile = 1 << 20;

// Never prompt on the terminal for an encrypted key (OpenSSL's default callback
// reads /dev/tty): an encrypted key is an error at start-up.
int noPassword(char* /*buf*/, int /*size*/, int /*rwflag*/, void* /*userdata*/) { return 0; }

util::Result<void> configureCommon(SSL_CTX* ctx, bool server) {
  if (!SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION)) {
    return util::makeError("cannot set the minimum TLS version: " + lastTlsError());
  }
#if defined(SUBRELAY_TLS_BORINGSSL)
  // Strict: fails on a name this build does not know instead of silently dropping it.
  // BoringSSL's TLS 1.3 suites are fixed (all AEAD) and not configurable.
  if (!SSL_CTX_set_strict_cipher_list(ctx, kCiphers12)) {
    return util::makeError("cannot set the TLS 1.2 cipher list: " + lastTlsError());
  }
#else
  if (!SSL_CTX_set_cipher_list(ctx, kCiphers12)) {
    return util::makeError("cannot set the TLS 1.2 cipher list: " + lastTlsError());
  }
  // OpenSSL's default already; spelled out so that no CCM suite can appear.
  if (!SSL_CTX_set_ciphersuites(ctx,
                                "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:"
                                "TLS_AES_256_GCM_SHA384")) {
    return util::makeError("cannot set the TLS 1.3 cipher suites: " + lastTlsError());
  }
#endif
  // SSL_OP_NO_COMPRESSION and SSL_OP_NO_RENEGOTIATION are 0 in BoringSSL, which never
  // compresses and never renegotiates unless asked to; they matter for OpenSSL.
  // Session tickets stay on (no SSL_OP_NO_TICKET): chasquid #64 found Outlook failing
  // STARTTLS against a server that disabled them.
  uint64_t opts = SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION;
  if (server) opts |= SSL_OP_CIPHER_SERVER_PREFERENCE;
  SSL_CTX_set_options(ctx, opts);
  if (server) {
    static const unsigned char kSidCtx[] = "subrelay";
    SSL_CTX_set_session_id_context(ctx, kSidCtx, sizeof kSidCtx - 1);
  }
  return {};
}

util::Result<std::string> readSmallFile(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return util::makeError("cannot open " + std::string(what) + " " + path + ": " + std::strerror(errno));
  }
  in.seekg(0, std::ios::end);
  std::streamoff size = in.tellg();
  if (size < 0 || size > kMaxPemFile) {
    return util::makeError(std::string(what) + " " + path + ": not a PEM file (size)");
  }
  in.seekg(0, std::ios::beg);
  std::string data(static_cast<size_t>(size), '\0');
  if (!in.read(data.data(), size)) {
    return util::makeError("cannot read " + std::string(what) + " " + path);
  }
  return data;
}

// True when the last PEM error only says "no more PEM blocks": the normal end of a chain.
bool onlyNoStartLine() {
  unsigned long e = ERR_peek_last_error();
  if (e == 0) return true;
  if (ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE) {
    ERR_clear_error();
    return true;
  }
  return false;
}

// certWhat / keyWhat name the source in errors ("certificate file /etc/...").
util::Result<SslCtxPtr> buildServerCtx(std::string_view certPem, std::string_view keyPem, const std::string& certWhat,
                                       const std::string& keyWhat) {
  ERR_clear_error();
  SslCtxPtr ctx(SSL_CTX_new(TLS_method()));
  if (!ctx) return util::makeError("cannot create a TLS context: " + lastTlsError());
  if (auto r = configureCommon(ctx.get(), true); !r) return r.error();

  BioPtr certBio(BIO_new_mem_buf(certPem.data(), static_cast<int>(certPem.size())));
  if (!certBio) return util::makeError("out of memory");
  X509Ptr leaf(PEM_read_bio_X509_AUX(certBio.get(), nullptr, noPassword, nullptr));
  if (!leaf) {
    return util::makeError(certWhat + ": no PEM certificate found (" + lastTlsError() + ")");
  }
  if (!SSL_CTX_use_certificate(ctx.get(), leaf.get())) {
    return util::makeError(certWhat + ": certificate not usable: " + lastTlsError());
  }
  // The rest of the file is the chain, sent after the leaf (fullchain.pem order).
  for (;;) {
    X509Ptr extra(PEM_read_bio_X509(certBio.get(), nullptr, noPassword, nullptr));
    if (!extra) break;
    if (!SSL_CTX_add0_chain_cert(ctx.get(), extra.get())) {
      return util::makeError(certWhat + ": chain certificate not usable: " + lastTlsError());
    }
    (void)extra.release();  // add0: the context owns it now
  }
  if (!onlyNoStartLine()) {
    return util::makeError(certWhat + ": malformed certificate in the chain: " + lastTlsError());
  }

  BioPtr keyBio(BIO_new_mem_buf(keyPem.data(), static_cast<int>(keyPem.size())));
  if (!keyBio) return util::makeError("out of memory");
  PkeyPtr key(PEM_read_bio_PrivateKey(keyBio.get(), nullptr, noPassword, nullptr));
  if (!key) {
    return util::makeError(keyWhat + ": no unencrypted PEM private key found (" + lastTlsError() + ")");
  }
  if (!SSL_CTX_use_PrivateKey(ctx.get(), key.get()) || !SSL_CTX_check_private_key(ctx.get())) {
    ERR_clear_error();
    return util::makeError(keyWhat + " does not match the certificate in " + certWhat);
  }
  return ctx;
}

}  // namespace

std::string lastTlsError() {
  std::string out;
  while (unsigned long e = ERR_get_error()) {
    if (!out.empty()) out += "; ";
    const char* lib = ERR_lib_error_string(e);
    const char* reason = ERR_reason_error_string(e);
    if (reason) {
      if (lib) {
        out += lib;
        out += ": ";
      }
      out += reason;
    } else {
      char buf[256];
      ERR_error_string_n(e, buf, sizeof buf);
      out += buf;
    }
  }
  if (out.empty()) out = "unknown TLS library error";
  return out;
}

util::Result<std::shared_ptr<TlsContext>> TlsContext::serverFromFiles(const std::string& certFile,
                                                                      const std::string& keyFile) {
  auto cert = readSmallFile(certFile, "certificate file");
  if (!cert) return cert.error();
  auto key = readSmallFile(keyFile, "private key file");
  if (!key) return key.error();
  auto ctx = buildServerCtx(*cert, *key, "certificate file " + certFile, "private key file " + keyFile);
  // The key's bytes are secret: do not leave them in freed heap memory.
  OPENSSL_cleanse(key->data(), key->size());
  if (!ctx) return ctx.error();
  return std::shared_ptr<TlsContext>(new TlsContext(ctx->release(), true));
}

util::Result<std::shared_ptr<TlsContext>> TlsContext::serverFromPem(const std::string& certPem,
                                                                    const std::string& keyPem) {
  auto ctx = buildServerCtx(certPem, keyPem, "certificate PEM", "private key PEM");
  if (!ctx) return ctx.error();
  return std::shared_ptr<TlsContext>(new TlsContext(ctx->release(), true));
}

util::Result<std::shared_ptr<TlsContext>> TlsContext::client(const ClientOptions& opts) {
  ERR_clear_error();
  SslCtxPtr ctx(SSL_CTX_new(TLS_method()));
  if (!ctx) return util::makeError("cannot create a TLS context: " + lastTlsError());
  if (auto r = configureCommon(ctx.get(), false); !r) return r.error();
  if (opts.verifyPeer) {
    if (!opts.caFile.empty()) {
      if (!SSL_CTX_load_verify_locations(ctx.get(), opts.caFile.c_str(), nullptr)) {
        return util::makeError("CA file " + opts.caFile + ": " + lastTlsError());
      }
    } else if (!SSL_CTX_set_default_verify_paths(ctx.get())) {
      return util::makeError("cannot load the system trust store: " + lastTlsError());
    }
    // A failed chain or name check aborts the handshake; TlsEngine reports why.
    SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
  } else {
    // Opportunistic TLS (RFC 7435): encrypt without authenticating.
    SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_NONE, nullptr);
  }
  // DANE (RFC 7672) for the engines that ask for it (TlsEngine::useDane), the library's
  // own chain check for all others.
  SSL_CTX_set_cert_verify_callback(ctx.get(), TlsEngine::verifyCallback, nullptr);
  return std::shared_ptr<TlsContext>(new TlsContext(ctx.release(), false));
}

TlsContext::~TlsContext() { SSL_CTX_free(ctx_); }

}  // namespace subrelay::tls
