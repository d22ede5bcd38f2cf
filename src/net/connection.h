// Connection: one accepted TCP connection on a libuv loop, plain or TLS. TLS runs in a
// tls::TlsEngine over memory buffers: the socket reads ciphertext, the engine turns it
// into plaintext for the handler, so STARTTLS is "from now on, pass bytes through the
// engine" (h2o lib/common/socket.c).
//
// Lifetime: the owner (the handler) keeps the Connection. Whatever ends it (peer close,
// error, close(), closeAfterWrite()), handler->onClosed() is called exactly once, from
// the libuv close callback, i.e. never nested inside another handler call, so the
// handler may delete itself and the Connection there.
#pragma once

#include <uv.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "tls/tls_engine.h"

namespace subrelay::net {

class ConnectionHandler {
 public:
  virtual ~ConnectionHandler() = default;
  virtual void onPlaintext(std::string_view data) = 0;
  virtual void onTlsEstablished() = 0;
  virtual void onTlsFailed(std::string_view why) = 0;
  virtual void onIdleTimeout() = 0;
  // Output stayed above the high-water mark for the whole stall timeout (a peer that does
  // not read). The default closes the connection; handlers may log first.
  virtual void onOutputStalled() {}
  virtual void onPeerClosed() {}
  virtual void onClosed() = 0;
  // Outbound connections only: the result of connect() (0 or a libuv error code). On
  // failure the owner usually calls close().
  virtual void onConnected(int /*status*/) {}
};

class Connection {
 public:
  Connection(uv_loop_t* loop, ConnectionHandler* handler);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // Accepts a pending connection from a listening stream and starts reading.
  bool accept(uv_stream_t* server);

  const std::string& peerAddress() const { return peerAddress_; }
  uint16_t peerPort() const { return peerPort_; }
  bool peerLoopback() const { return peerLoopback_; }

  // Outbound: connects to ip:port (a numeric IPv4 or IPv6 address) and, on success,
  // starts reading; handler->onConnected(status) reports the result. The caller bounds the
  // time with its own timer (RFC 5321 4.5.3.2 has no connect timeout; we use one).
  void connect(const std::string& ip, uint16_t port);

  // Server-side TLS from now on (STARTTLS, or at once for implicit TLS).
  void startTls(std::shared_ptr<tls::TlsContext> ctx);
  // Client-side TLS (outbound STARTTLS); serverName is sent as SNI and, when the
  // context verifies, checked against the certificate. With `dane`, the server is
  // authenticated by its TLSA records instead (TlsEngine::useDane, RFC 7672); a mismatch
  // fails the handshake and tls()->peerVerifyError() says why.
  void startTlsClient(std::shared_ptr<tls::TlsContext> ctx, const std::string& serverName,
                      std::optional<tls::DaneParams> dane = std::nullopt);
  const tls::TlsEngine* tls() const { return tls_.get(); }

  void write(std::string_view plaintext);
  // Flushes pending output (and a TLS close_notify), then closes.
  void closeAfterWrite();
  // Closes now; pending output may be lost.
  void close();
  bool closing() const { return closing_; }

  void pauseReading();
  void resumeReading();
  // A deadline, not an inactivity timer: fires handler->onIdleTimeout() this long after
  // the call (or after reading resumes), however many bytes arrive meanwhile, so a peer
  // that trickles a byte at a time cannot hold the connection. The owner sets it again
  // when the peer has made real progress (a whole command, a block of data).
  void setIdleTimeout(std::chrono::milliseconds timeout);

  // Output backpressure: once more than `high` bytes wait to be written, reading stops
  // (whatever the owner asked) until they drain to `low`; if they have not drained after
  // `stall` (a total, not re-armed by partial progress), handler->onOutputStalled() is
  // called and the connection closed. high 0 = off (the default).
  void setOutputLimits(size_t high, size_t low, std::chrono::milliseconds stall);
  bool outputBlocked() const { return outputBlocked_; }

  size_t pendingWriteBytes() const { return pendingWrite_; }

 private:
  void onRead(ssize_t nread, const uv_buf_t* buf);
  void writeRaw(std::string_view bytes);
  void flushTls();
  void armTimer();
  void updateReading();
  void checkOutputPressure();
  void maybeFinishClose();
  static void readCb(uv_stream_t* s, ssize_t nread, const uv_buf_t* buf);

  uv_loop_t* loop_;
  ConnectionHandler* handler_;
  uv_tcp_t* tcp_ = nullptr;
  uv_timer_t* timer_ = nullptr;
  std::unique_ptr<tls::TlsEngine> tls_;
  bool tlsEstablished_ = false;
  std::string peerAddress_;
  uint16_t peerPort_ = 0;
  bool peerLoopback_ = false;
  bool reading_ = false;
  bool paused_ = false;
  bool closing_ = false;
  bool closeAfterWrite_ = false;
  bool outputBlocked_ = false;
  size_t pendingWrite_ = 0;
  size_t outputHigh_ = 0;
  size_t outputLow_ = 0;
  std::chrono::milliseconds outputStall_{0};
  std::chrono::milliseconds idleTimeout_{0};
};

}  // namespace subrelay::net
