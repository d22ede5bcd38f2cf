// Small RAII owners of the libuv sockets code outside net/ needs for a query/answer
// exchange (dns/): a UDP socket and a plain TCP client stream. Each owns its handle and
// closes it (uv_handle.h) when destroyed; no callback runs after its owner is gone, and a
// callback may destroy its owner. Loop thread only. Errors are libuv's negative codes
// (net::errorText() for the text); 0 is success.
#pragma once

#include <sys/socket.h>
#include <uv.h>

#include <functional>
#include <string>
#include <string_view>

namespace subrelay::net {

class UdpSocket {
 public:
  // One datagram (status 0; `truncated` when it did not fit 64 KiB) or a receive error
  // (status < 0, e.g. ECONNREFUSED from an ICMP port-unreachable on a connected socket).
  // `data` and `from` are valid during the call only.
  using RecvFn =
      std::function<void(int status, std::string_view data, const sockaddr_storage& from, bool truncated)>;

  explicit UdpSocket(uv_loop_t* loop);
  ~UdpSocket();
  UdpSocket(const UdpSocket&) = delete;
  UdpSocket& operator=(const UdpSocket&) = delete;

  int bind(const sockaddr_storage& addr);
  // Fixes the peer: send() goes there, datagrams from anyone else are dropped by the kernel.
  int connect(const sockaddr_storage& addr);
  int startReceiving(RecvFn fn);
  // Sends at once (no queueing) to the connected peer, or to `to`.
  int send(std::string_view data, const sockaddr_storage* to = nullptr);
  // The bound local address (after bind()).
  int localAddress(sockaddr_storage* out) const;

 private:
  uv_udp_t* h_;
  RecvFn recv_;
};

class TcpStream {
 public:
  using ConnectFn = std::function<void(int status)>;
  // Bytes received (status 0), or the end of the stream or an error (status < 0: UV_EOF, ...).
  using ReadFn = std::function<void(int status, std::string_view data)>;

  explicit TcpStream(uv_loop_t* loop);
  ~TcpStream();
  TcpStream(const TcpStream&) = delete;
  TcpStream& operator=(const TcpStream&) = delete;

  // `cb` runs on the loop, never inside connect(); not at all when this is destroyed first.
  int connect(const sockaddr_storage& addr, ConnectFn cb);
  // Queued; a failure shows up on the read side.
  int write(std::string data);
  int startReading(ReadFn fn);

 private:
  struct ConnectReq;
  uv_tcp_t* h_;
  ConnectReq* connecting_ = nullptr;
  ReadFn read_;
};

}  // namespace subrelay::net
