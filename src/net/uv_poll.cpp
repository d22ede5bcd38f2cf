#include "net/uv_poll.h"

#include "net/uv_handle.h"

namespace subrelay::net {

SocketPoll::SocketPoll(uv_loop_t* loop, uv_os_sock_t fd) : h_(newHandle<uv_poll_t>()) {
  init_ = uv_poll_init_socket(loop, h_, fd);
  h_->data = this;
}

SocketPoll::~SocketPoll() {
  if (init_ == 0) {
    uv_poll_stop(h_);
    closeHandle(h_);  // clears data: an event already queued sees no owner
  } else {
    delete h_;  // never initialised: not known to the loop
  }
}

int SocketPoll::start(int events, EventFn fn) {
  if (init_ != 0) return init_;
  fn_ = std::move(fn);
  return uv_poll_start(h_, events, [](uv_poll_t* p, int status, int ev) {
    auto* self = static_cast<SocketPoll*>(p->data);
    if (self == nullptr || !self->fn_) return;
    // The callback may destroy this owner: run a copy.
    auto run = self->fn_;
    run(status, ev);
  });
}

void SocketPoll::stop() {
  if (init_ == 0) uv_poll_stop(h_);
}

}  // namespace subrelay::net
