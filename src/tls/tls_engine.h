// TlsEngine: one TLS connection over memory buffers; it never sees a socket
// (h2o lib/common/socket.c style). The transport feeds it ciphertext read from the
// socket and writes out whatever takeCiphertext() returns.
//
//   feedCiphertext(bytes from socket) -> takePlaintext() gives application data
//   writePlaintext(app data)          -> takeCiphertext() gives bytes for the socket
//
// STARTTLS is then just "from now on, pass bytes through the engine".
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "tls/tls_context.h"

typedef struct ssl_st SSL;
typedef struct bio_st BIO;

namespace subrelay::tls {

enum class EngineState { Handshaking, Open, Closed, Failed };

class TlsEngine {
 public:
  // serverName: SNI and (when the context verifies) the host name to check, client only.
  explicit TlsEngine(std::shared_ptr<TlsContext> ctx, std::string serverName = {});
  ~TlsEngine();
  TlsEngine(const TlsEngine&) = delete;
  TlsEngine& operator=(const TlsEngine&) = delete;

  // Starts the handshake (client: produces the ClientHello in takeCiphertext()).
  void start();
  void feedCiphertext(std::string_view bytes);
  void writePlaintext(std::string_view bytes);
  // Queues close_notify (Closed: nothing more is written). Input is still decrypted
  // until the peer's close_notify, so a reply to ours can be read.
  void shutdown();

  std::string takeCiphertext();
  std::string takePlaintext();
  bool hasCiphertext() const;

  EngineState state() const { return state_; }
  bool handshakeDone() const { return state_ == EngineState::Open || state_ == EngineState::Closed; }
  const std::string& error() const { return error_; }
  // True when error() says the peer ended the handshake with an alert about our
  // certificate (RFC 8446 6.2 / RFC 5246 7.2.2: bad_certificate, unsupported_certificate,
  // certificate_revoked, certificate_expired, certificate_unknown, unknown_ca): the
  // client does not trust what we present, which the operator must fix, not the client.
  static bool isCertificateRejection(std::string_view error);

  std::string version() const;          // "TLSv1.3"
  std::string cipher() const;           // "TLS_AES_128_GCM_SHA256"
  std::string peerVerifyError() const;  // "" when verified or not verifying

  // The underlying SSL, for diagnostics and tests (session resumption, peer
  // certificate); callers must not do I/O on it.
  SSL* native() const { return ssl_; }

 private:
  void pump();  // advance handshake / read as far as possible
  void encrypt(std::string_view bytes);
  void fail(std::string why);
  void failFrom(int ret, const char* during);  // reads SSL_get_error and the error queue
  void notePlaintextAlert(std::string_view bytes);

  std::shared_ptr<TlsContext> ctx_;
  SSL* ssl_ = nullptr;
  BIO* rbio_ = nullptr;  // ciphertext from the peer; owned by ssl_
  BIO* wbio_ = nullptr;  // ciphertext for the peer; owned by ssl_
  EngineState state_ = EngineState::Handshaking;
  bool verifying_ = false;  // client context with SSL_VERIFY_PEER
  int plainAlert_ = -1;     // description of a fatal plaintext alert seen in the handshake
  bool started_ = false;
  bool peerClosed_ = false;  // close_notify received
  bool sentClose_ = false;   // close_notify queued by shutdown()
  std::string error_;
  std::string plainIn_;   // decrypted, not yet taken
  std::string plainOut_;  // app data waiting for the handshake to finish
};

}  // namespace subrelay::tls
