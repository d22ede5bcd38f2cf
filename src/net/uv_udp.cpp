#include "net/uv_udp.h"

#include <netinet/in.h>

#include <array>
#include <cstring>
#include <memory>

#include "net/uv_handle.h"

namespace subrelay::net {

namespace {

// One receive buffer per thread: libuv calls alloc, reads and calls back without
// returning to the loop in between, and the data is only valid during the callback.
char* recvBuffer(size_t* size) {
  static thread_local std::array<char, 65536> buf;
  *size = buf.size();
  return buf.data();
}

void onAlloc(uv_handle_t* /*h*/, size_t /*suggested*/, uv_buf_t* buf) {
  size_t n = 0;
  char* p = recvBuffer(&n);
  *buf = uv_buf_init(p, static_cast<unsigned>(n));
}

}  // namespace

// ---- UdpSocket ----

UdpSocket::UdpSocket(uv_loop_t* loop) : h_(newHandle<uv_udp_t>()) {
  uv_udp_init(loop, h_);
  h_->data = this;
}

UdpSocket::~UdpSocket() { closeHandle(h_); }

int UdpSocket::bind(const sockaddr_storage& addr) { return uv_udp_bind(h_, reinterpret_cast<const sockaddr*>(&addr), 0); }

int UdpSocket::connect(const sockaddr_storage& addr) {
  return uv_udp_connect(h_, reinterpret_cast<const sockaddr*>(&addr));
}

int UdpSocket::startReceiving(RecvFn fn) {
  recv_ = std::move(fn);
  return uv_udp_recv_start(
      h_, onAlloc, [](uv_udp_t* h, ssize_t nread, const uv_buf_t* buf, const sockaddr* addr, unsigned flags) {
        auto* self = static_cast<UdpSocket*>(h->data);
        if (self == nullptr || !self->recv_) return;
        if (nread == 0 && addr == nullptr) return;  // nothing more to read this round
        // The callback may destroy this socket: run a copy, touch nothing afterwards.
        auto run = self->recv_;
        sockaddr_storage from{};
        if (addr != nullptr)
          std::memcpy(&from, addr, addr->sa_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in));
        if (nread < 0) {
          run(static_cast<int>(nread), {}, from, false);
          return;
        }
        run(0, std::string_view(buf->base, static_cast<size_t>(nread)), from, (flags & UV_UDP_PARTIAL) != 0);
      });
}

int UdpSocket::send(std::string_view data, const sockaddr_storage* to) {
  uv_buf_t b = uv_buf_init(const_cast<char*>(data.data()), static_cast<unsigned>(data.size()));
  int rc = uv_udp_try_send(h_, &b, 1, reinterpret_cast<const sockaddr*>(to));
  return rc >= 0 ? 0 : rc;
}

int UdpSocket::localAddress(sockaddr_storage* out) const {
  int len = sizeof *out;
  return uv_udp_getsockname(h_, reinterpret_cast<sockaddr*>(out), &len);
}

// ---- TcpStream ----

struct TcpStream::ConnectReq {
  uv_connect_t req{};
  TcpStream* owner;  // null once the stream is gone
  ConnectFn cb;
};

namespace {
struct WriteReq {
  uv_write_t req{};
  std::string data;
};
}  // namespace

TcpStream::TcpStream(uv_loop_t* loop) : h_(newHandle<uv_tcp_t>()) {
  uv_tcp_init(loop, h_);
  h_->data = this;
}

TcpStream::~TcpStream() {
  // A pending connect request is answered with UV_ECANCELED after the close; it must
  // not find us.
  if (connecting_ != nullptr) connecting_->owner = nullptr;
  closeHandle(h_);
}

int TcpStream::connect(const sockaddr_storage& addr, ConnectFn cb) {
  auto* r = new ConnectReq{{}, this, std::move(cb)};
  int rc = uv_tcp_connect(&r->req, h_, reinterpret_cast<const sockaddr*>(&addr), [](uv_connect_t* req, int status) {
    std::unique_ptr<ConnectReq> own(reinterpret_cast<ConnectReq*>(req));
    if (own->owner == nullptr) return;
    own->owner->connecting_ = nullptr;
    own->cb(status);  // ours: the stream may be destroyed inside
  });
  if (rc != 0) {
    delete r;
    return rc;
  }
  connecting_ = r;
  return 0;
}

int TcpStream::write(std::string data) {
  auto* w = new WriteReq{{}, std::move(data)};
  uv_buf_t b = uv_buf_init(w->data.data(), static_cast<unsigned>(w->data.size()));
  int rc = uv_write(&w->req, asStream(h_), &b, 1,
                    [](uv_write_t* r, int) { delete reinterpret_cast<WriteReq*>(r); });
  if (rc != 0) delete w;
  return rc;
}

int TcpStream::startReading(ReadFn fn) {
  read_ = std::move(fn);
  return uv_read_start(asStream(h_), onAlloc, [](uv_stream_t* s, ssize_t nread, const uv_buf_t* buf) {
    auto* self = static_cast<TcpStream*>(s->data);
    if (self == nullptr || !self->read_ || nread == 0) return;
    auto run = self->read_;  // the callback may destroy this stream
    if (nread < 0) {
      run(static_cast<int>(nread), {});
      return;
    }
    run(0, std::string_view(buf->base, static_cast<size_t>(nread)));
  });
}

}  // namespace subrelay::net
