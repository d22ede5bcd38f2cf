#include "net/connection.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "net/uv_handle.h"

namespace subrelay::net {

namespace {
// One read buffer per loop thread: libuv calls alloc and read back to back on the
// loop's thread, and we consume the bytes before returning, so connections share it.
constexpr size_t kReadBufferSize = 64 * 1024;
thread_local char tReadBuffer[kReadBufferSize];

struct WriteReq {
  uv_write_t req;
  std::string data;
  Connection* conn;
};
}  // namespace

Connection::Connection(uv_loop_t* loop, ConnectionHandler* handler) : loop_(loop), handler_(handler) {
  tcp_ = newHandle<uv_tcp_t>();
  uv_tcp_init(loop_, tcp_);
  tcp_->data = this;
  timer_ = newHandle<uv_timer_t>();
  uv_timer_init(loop_, timer_);
  timer_->data = this;
}

Connection::~Connection() {
  // Normally the close callback has run already (tcp_ == nullptr). If the owner
  // deletes us early, detach from every callback so none reaches freed memory.
  if (timer_) {
    timer_->data = nullptr;
    closeHandle(timer_);
    timer_ = nullptr;
  }
  if (tcp_) {
    tcp_->data = nullptr;
    closeHandle(tcp_);
    tcp_ = nullptr;
  }
}

bool Connection::accept(uv_stream_t* server) {
  if (uv_accept(server, asStream(tcp_)) != 0) return false;
  uv_tcp_nodelay(tcp_, 1);
  sockaddr_storage ss{};
  int len = sizeof ss;
  if (uv_tcp_getpeername(tcp_, reinterpret_cast<sockaddr*>(&ss), &len) == 0) {
    peerAddress_ = addressToString(reinterpret_cast<sockaddr*>(&ss), &peerPort_);
    peerLoopback_ = isLoopbackAddress(reinterpret_cast<sockaddr*>(&ss));
  }
  resumeReading();
  return true;
}

void Connection::readCb(uv_stream_t* s, ssize_t nread, const uv_buf_t* buf) {
  auto* self = static_cast<Connection*>(s->data);
  if (self == nullptr) return;
  self->onRead(nread, buf);
}

void Connection::resumeReading() {
  paused_ = false;
  updateReading();
}

void Connection::pauseReading() {
  paused_ = true;
  updateReading();
}

// Reads while the owner wants input and the peer is reading our output.
void Connection::updateReading() {
  if (closing_ || closeAfterWrite_ || tcp_ == nullptr) return;
  const bool want = !paused_ && !outputBlocked_;
  if (want && !reading_) {
    reading_ = true;
    uv_read_start(
        asStream(tcp_),
        [](uv_handle_t*, size_t, uv_buf_t* b) {
          b->base = tReadBuffer;
          b->len = kReadBufferSize;
        },
        &Connection::readCb);
    armTimer();
  } else if (!want && reading_) {
    reading_ = false;
    uv_read_stop(asStream(tcp_));
    // While we are not reading the client is waiting for us, not idle. (A blocked
    // output has its own deadline on the timer: leave it.)
    if (timer_ && !outputBlocked_) uv_timer_stop(timer_);
  }
}

void Connection::setOutputLimits(size_t high, size_t low, std::chrono::milliseconds stall) {
  outputHigh_ = high;
  outputLow_ = std::min(low, high);
  outputStall_ = stall;
}

// Called whenever pendingWrite_ changes.
void Connection::checkOutputPressure() {
  if (outputHigh_ == 0 || closing_ || closeAfterWrite_) return;
  if (!outputBlocked_ && pendingWrite_ > outputHigh_) {
    outputBlocked_ = true;
    updateReading();
    if (timer_ && outputStall_.count() > 0) {
      uv_timer_start(
          timer_,
          [](uv_timer_t* t) {
            auto* self = static_cast<Connection*>(t->data);
            if (self == nullptr || self->closing_) return;
            self->handler_->onOutputStalled();
            self->close();
          },
          static_cast<uint64_t>(outputStall_.count()), 0);
    }
  } else if (outputBlocked_ && pendingWrite_ <= outputLow_) {
    outputBlocked_ = false;
    if (timer_) uv_timer_stop(timer_);
    updateReading();
  }
}

void Connection::setIdleTimeout(std::chrono::milliseconds timeout) {
  idleTimeout_ = timeout;
  armTimer();
}

void Connection::armTimer() {
  // The timer belongs to the output deadline or the close-after-write bound then.
  if (timer_ == nullptr || closing_ || outputBlocked_ || closeAfterWrite_) return;
  if (idleTimeout_.count() <= 0 || !reading_) {
    uv_timer_stop(timer_);
    return;
  }
  uv_timer_start(
      timer_,
      [](uv_timer_t* t) {
        auto* self = static_cast<Connection*>(t->data);
        if (self == nullptr || self->closing_) return;
        self->handler_->onIdleTimeout();
      },
      static_cast<uint64_t>(idleTimeout_.count()), 0);
}

void Connection::onRead(ssize_t nread, const uv_buf_t* buf) {
  if (closing_) return;
  if (nread < 0) {
    // EOF or error: nothing more will come.
    handler_->onPeerClosed();
    close();
    return;
  }
  if (nread == 0) return;
  std::string_view bytes(buf->base, static_cast<size_t>(nread));
  if (!tls_) {
    handler_->onPlaintext(bytes);
    return;
  }
  tls_->feedCiphertext(bytes);
  flushTls();
  if (closing_) return;
  if (tls_->state() == tls::EngineState::Failed) {
    handler_->onTlsFailed(tls_->error());
    close();
    return;
  }
  if (!tlsEstablished_ && tls_->handshakeDone()) {
    tlsEstablished_ = true;
    handler_->onTlsEstablished();
    if (closing_) return;
  }
  std::string plain = tls_->takePlaintext();
  if (!plain.empty()) handler_->onPlaintext(plain);
  if (closing_) return;
  if (tls_->state() == tls::EngineState::Closed) {
    handler_->onPeerClosed();
    closeAfterWrite();
  }
}

void Connection::connect(const std::string& ip, uint16_t port) {
  sockaddr_storage ss{};
  if (uv_ip4_addr(ip.c_str(), port, reinterpret_cast<sockaddr_in*>(&ss)) != 0 &&
      uv_ip6_addr(ip.c_str(), port, reinterpret_cast<sockaddr_in6*>(&ss)) != 0) {
    handler_->onConnected(UV_EINVAL);
    return;
  }
  peerAddress_ = ip;
  peerPort_ = port;
  peerLoopback_ = isLoopbackAddress(reinterpret_cast<sockaddr*>(&ss));
  auto* req = new uv_connect_t{};
  req->data = this;
  int rc = uv_tcp_connect(req, tcp_, reinterpret_cast<sockaddr*>(&ss), [](uv_connect_t* r, int status) {
    auto* self = static_cast<Connection*>(r->data);
    delete r;
    // Cancelled: the handle is closing and the Connection may be on its way out.
    if (status == UV_ECANCELED || self == nullptr || self->closing_) return;
    if (status == 0) {
      uv_tcp_nodelay(self->tcp_, 1);
      self->resumeReading();
    }
    self->handler_->onConnected(status);
  });
  if (rc != 0) {
    delete req;
    handler_->onConnected(rc);
  }
}

void Connection::startTlsClient(std::shared_ptr<tls::TlsContext> ctx, const std::string& serverName,
                                std::optional<tls::DaneParams> dane) {
  tls_ = std::make_unique<tls::TlsEngine>(std::move(ctx), serverName);
  if (dane) tls_->useDane(std::move(*dane));
  tlsEstablished_ = false;
  tls_->start();
  flushTls();
}

void Connection::startTls(std::shared_ptr<tls::TlsContext> ctx) {
  tls_ = std::make_unique<tls::TlsEngine>(std::move(ctx));
  tls_->start();
  flushTls();
}

void Connection::write(std::string_view plaintext) {
  if (closing_ || plaintext.empty()) return;
  if (tls_) {
    tls_->writePlaintext(plaintext);
    flushTls();
  } else {
    writeRaw(plaintext);
  }
}

void Connection::flushTls() {
  if (tls_ && tls_->hasCiphertext()) writeRaw(tls_->takeCiphertext());
}

void Connection::writeRaw(std::string_view bytes) {
  if (tcp_ == nullptr || closing_) return;
  // Fast path: most replies fit the socket buffer and need no request object.
  if (pendingWrite_ == 0) {
    uv_buf_t b = uv_buf_init(const_cast<char*>(bytes.data()), static_cast<unsigned>(bytes.size()));
    int n = uv_try_write(asStream(tcp_), &b, 1);
    if (n == static_cast<int>(bytes.size())) return;
    if (n > 0) bytes.remove_prefix(static_cast<size_t>(n));
    else if (n != UV_EAGAIN && n != UV_ENOSYS) {
      close();
      return;
    }
  }
  auto* wr = new WriteReq{};
  wr->data.assign(bytes);
  wr->conn = this;
  wr->req.data = wr;
  pendingWrite_ += wr->data.size();
  checkOutputPressure();
  uv_buf_t b = uv_buf_init(wr->data.data(), static_cast<unsigned>(wr->data.size()));
  int rc = uv_write(&wr->req, asStream(tcp_), &b, 1, [](uv_write_t* req, int status) {
    auto* w = static_cast<WriteReq*>(req->data);
    Connection* c = w->conn;
    size_t len = w->data.size();
    delete w;
    // A cancelled write (the handle is closing) may belong to a Connection already gone.
    if (status == UV_ECANCELED || c == nullptr) return;
    c->pendingWrite_ -= len;
    if (status < 0) {
      c->close();
      return;
    }
    c->checkOutputPressure();
    c->maybeFinishClose();
  });
  if (rc != 0) {
    pendingWrite_ -= wr->data.size();
    delete wr;
    close();
  }
}

void Connection::maybeFinishClose() {
  if (closeAfterWrite_ && pendingWrite_ == 0) close();
}

void Connection::closeAfterWrite() {
  if (closing_) return;
  if (tls_ && tls_->state() == tls::EngineState::Open) {
    tls_->shutdown();
    flushTls();
  }
  closeAfterWrite_ = true;
  if (reading_) {
    uv_read_stop(asStream(tcp_));
    reading_ = false;
  }
  if (timer_) {
    // Bound the time a client that does not read may hold the connection open.
    uv_timer_stop(timer_);
    uv_timer_start(
        timer_,
        [](uv_timer_t* t) {
          auto* self = static_cast<Connection*>(t->data);
          if (self) self->close();
        },
        10000, 0);
  }
  maybeFinishClose();
}

void Connection::close() {
  if (closing_) return;
  closing_ = true;
  reading_ = false;
  if (timer_) {
    timer_->data = nullptr;
    closeHandle(timer_);
    timer_ = nullptr;
  }
  uv_tcp_t* tcp = tcp_;
  tcp_ = nullptr;
  // Pending write requests will be cancelled; make sure their callbacks do not touch us.
  // (They hold `conn`; we cannot reach them, so the callback ignores UV_ECANCELED.)
  tcp->data = this;
  uv_close(asHandle(tcp), [](uv_handle_t* h) {
    auto* self = static_cast<Connection*>(h->data);
    delete reinterpret_cast<uv_tcp_t*>(h);
    if (self) self->handler_->onClosed();
  });
}

}  // namespace subrelay::net
