// TlsContext: an SSL_CTX configured for subrelay. TLS 1.2 minimum, modern AEAD ciphers
// only (RFC 8996: no TLS 1.0/1.1; RFC 9325 recommendations), session tickets on.
#pragma once

#include <memory>
#include <string>

#include "util/result.h"

typedef struct ssl_ctx_st SSL_CTX;

namespace subrelay::tls {

struct ClientOptions {
  bool verifyPeer = false;  // chain against the trust store; host name checked per engine
  std::string caFile;       // "" = system default trust store
};

class TlsContext {
 public:
  // Server context from PEM files (certificate chain and private key, key must match).
  static util::Result<std::shared_ptr<TlsContext>> serverFromFiles(const std::string& certFile,
                                                                   const std::string& keyFile);
  static util::Result<std::shared_ptr<TlsContext>> serverFromPem(const std::string& certPem, const std::string& keyPem);
  static util::Result<std::shared_ptr<TlsContext>> client(const ClientOptions& opts);

  ~TlsContext();
  TlsContext(const TlsContext&) = delete;
  TlsContext& operator=(const TlsContext&) = delete;

  SSL_CTX* native() const { return ctx_; }
  bool isServer() const { return server_; }

 private:
  TlsContext(SSL_CTX* ctx, bool server) : ctx_(ctx), server_(server) {}
  SSL_CTX* ctx_;
  bool server_;
};

// The last error of the TLS library as text (and clears the error queue).
std::string lastTlsError();

}  // namespace subrelay::tls
