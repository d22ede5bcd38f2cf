// A RAII owner of a uv_poll_t watching a socket someone else owns (libcurl's sockets in
// net/http_client.cpp). Like the other owners (uv_timer.h), it closes its handle when
// destroyed (uv_handle.h: the memory outlives the close callback) and no callback runs
// after its owner is gone. Loop thread only. It never closes the socket itself.
#pragma once

#include <uv.h>

#include <functional>

namespace subrelay::net {

class SocketPoll {
 public:
  // status < 0: a libuv error on the socket (net::errorText()); else `events` is a mask of
  // UV_READABLE / UV_WRITABLE.
  using EventFn = std::function<void(int status, int events)>;

  // `fd` must stay open while polled; the caller stops (destroys this) before closing it.
  SocketPoll(uv_loop_t* loop, uv_os_sock_t fd);
  ~SocketPoll();
  SocketPoll(const SocketPoll&) = delete;
  SocketPoll& operator=(const SocketPoll&) = delete;

  // 0 on success; `events` as for uv_poll_start. Replaces the previous mask and callback.
  int start(int events, EventFn fn);
  void stop();
  // The uv_poll_init_socket result (0 when usable).
  int initStatus() const { return init_; }

 private:
  uv_poll_t* h_;
  int init_ = 0;
  EventFn fn_;
};

}  // namespace subrelay::net
