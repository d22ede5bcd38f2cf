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
  // Sends close_notify.
  void shutdown();

  std::string takeCiphertext();
  std::string takePlaintext();
  bool hasCiphertext() const;

  EngineState state() const { return state_; }
  bool handshakeDone() const { return state_ == EngineState::Open || state_ == EngineState::Closed; }
  const std::string& error() const { return error_; }

  std::string version() const;  // "TLSv1.3"
  std::string cipher() const;   // "TLS_AES_128_GCM_SHA256"
  std::string peerVerifyError() const;  // "" when verified or not verifying

 private:
  void pump();  // advance handshake / read as far as possible
  std::shared_ptr<TlsContext> ctx_;
  SSL* ssl_ = nullptr;
  EngineState state_ = EngineState::Handshaking;
  std::string error_;
  std::string plainIn_;   // decrypted, not yet taken
  std::string plainOut_;  // app data waiting for the handshake to finish
};

}  // namespace subrelay::tls
