#include "net/uv_timer.h"

#include "net/uv_handle.h"

namespace subrelay::net {

Timer::Timer(uv_loop_t* loop) : h_(newHandle<uv_timer_t>()) {
  uv_timer_init(loop, h_);
  h_->data = this;
}

Timer::~Timer() {
  uv_timer_stop(h_);
  closeHandle(h_);  // clears data: a callback already queued sees no owner
}

void Timer::start(std::chrono::milliseconds after, std::function<void()> cb, std::chrono::milliseconds repeat) {
  cb_ = std::move(cb);
  uv_timer_start(
      h_,
      [](uv_timer_t* t) {
        auto* self = static_cast<Timer*>(t->data);
        if (self == nullptr || !self->cb_) return;
        // The callback may restart or destroy this timer: run a copy.
        auto run = self->cb_;
        run();
      },
      static_cast<uint64_t>(after.count() < 0 ? 0 : after.count()), static_cast<uint64_t>(repeat.count()));
}

void Timer::stop() { uv_timer_stop(h_); }

bool Timer::active() const { return uv_is_active(asHandle(h_)) != 0; }

Async::Async(uv_loop_t* loop, std::function<void()> cb) : h_(newHandle<uv_async_t>()), cb_(std::move(cb)) {
  uv_async_init(loop, h_, [](uv_async_t* a) {
    auto* self = static_cast<Async*>(a->data);
    if (self != nullptr && self->cb_) self->cb_();
  });
  h_->data = this;
}

Async::~Async() { closeHandle(h_); }

void Async::send() { uv_async_send(h_); }

}  // namespace subrelay::net
