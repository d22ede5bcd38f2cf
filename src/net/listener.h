// Listener: a TCP listening socket on a libuv loop. Each worker loop opens its own
// socket on the same address with SO_REUSEPORT, so the kernel spreads connections over
// the loops (one loop per core; libuv 1.44 has no UV_TCP_REUSEPORT, so the socket is
// made here and handed to uv_tcp_open).
#pragma once

#include <uv.h>

#include <functional>
#include <string>
#include <vector>

#include "util/result.h"

namespace subrelay::net {

class Listener {
 public:
  // Called for each pending connection; the callee accepts it with
  // Connection::accept(server()) or rejects it.
  using AcceptFn = std::function<void(uv_stream_t* server)>;

  Listener(uv_loop_t* loop, AcceptFn onAccept);
  ~Listener();
  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;

  // host: "127.0.0.1", "::", "0.0.0.0", "localhost"; port 0 = ephemeral.
  util::Result<void> listen(const std::string& host, uint16_t port, int backlog = 1024);
  uint16_t boundPort() const { return port_; }
  // SO_REUSEPORT lets any process of the same user join a port, and the kernel would
  // then split our clients with it (two `serve` with different data_dirs answering at
  // random). Before the workers bind, this binds the address once WITHOUT SO_REUSEPORT
  // and lets go: that fails while any other socket listens there. Port 0 is not checked.
  static util::Result<void> checkAddressFree(const std::string& host, uint16_t port);
  void close();

 private:
  uv_loop_t* loop_;
  AcceptFn onAccept_;
  uv_tcp_t* tcp_ = nullptr;
  uint16_t port_ = 0;
};

// This host's interface addresses as text ("192.0.2.7", "2001:db8::7"): delivery's
// destination policy refuses them (a tenant's MX pointing back at us).
std::vector<std::string> hostAddresses();

}  // namespace subrelay::net
