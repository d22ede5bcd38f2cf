// TlsEngine: one TLS connection over memory buffers; it never sees a socket
// (h2o lib/common/socket.c style). The transport feeds it ciphertext read from the
// socket and writes out whatever takeCiphertext() returns.
//
//   feedCiphertext(bytes from socket) -> takePlaintext() gives application data
//   writePlaintext(app data)          -> takeCiphertext() gives bytes for the socket
//
// STARTTLS is then just "from now on, pass bytes through the engine".
//
// DANE (RFC 7672): a client engine given useDane() authenticates the server by its TLSA
// records (tls/dane.h) instead of the context's PKIX check, inside the handshake: a chain
// that matches no usable record aborts it with a bad_certificate alert before our Finished,
// so no application data is ever sent to an unauthenticated server.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "tls/dane.h"
#include "tls/tls_context.h"

typedef struct ssl_st SSL;
typedef struct bio_st BIO;
typedef struct x509_store_ctx_st X509_STORE_CTX;

namespace subrelay::tls {

enum class EngineState { Handshaking, Open, Closed, Failed };

class TlsEngine {
 public:
  // serverName: SNI and (when the context verifies) the host name to check, client only.
  explicit TlsEngine(std::shared_ptr<TlsContext> ctx, std::string serverName = {});
  ~TlsEngine();
  TlsEngine(const TlsEngine&) = delete;
  TlsEngine& operator=(const TlsEngine&) = delete;

  // Client only, before start(): verify the server by DANE with these "secure" TLSA records
  // and reference identifiers, whatever the context's ClientOptions say. SNI becomes
  // params.referenceNames[0], the TLSA base domain (RFC 7672 8.1), when given. Then:
  //  - Verified: the handshake completes, daneResult() says which record matched;
  //  - Mismatch: the handshake fails (state Failed), error() and peerVerifyError() give
  //    the reason ("DANE: no TLSA record matched: 3 1 1 ... vs leaf SPKI sha256 ...");
  //  - NoUsableRecords: the handshake completes unauthenticated (RFC 7672 2.2: TLS is
  //    still mandatory, which is the caller's business: it must not fall back to plain).
  // Never resumes: start() drops a session offered with SSL_set_session (the certificate
  // check would not run), and a handshake that resumed anyway fails.
  void useDane(DaneParams params);
  bool usingDane() const { return dane_.has_value(); }
  // The verdict, once the server's certificate has been checked; nullopt before that or
  // without useDane().
  const std::optional<DaneResult>& daneResult() const { return daneResult_; }

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
  // "" when verified or not verifying; with DANE, the reason of a Mismatch.
  std::string peerVerifyError() const;

  // Installed on every client context (TlsContext::client): runs DANE for engines that use
  // it and the library's own X509_verify_cert for all others.
  static int verifyCallback(X509_STORE_CTX* store, void* arg);

  // The underlying SSL, for diagnostics and tests (session resumption, peer
  // certificate); callers must not do I/O on it.
  SSL* native() const { return ssl_; }

 private:
  void pump();  // advance handshake / read as far as possible
  void encrypt(std::string_view bytes);
  void fail(std::string why);
  void failFrom(int ret, const char* during);  // reads SSL_get_error and the error queue
  void notePlaintextAlert(std::string_view bytes);
  int checkDane(X509_STORE_CTX* store);

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
  std::optional<DaneParams> dane_;
  std::optional<DaneResult> daneResult_;
};

}  // namespace subrelay::tls
