// Small RAII owners for the libuv handles code outside net/ needs: a timer and an async
// wake-up. Each owns its handle and closes it (uv_handle.h: the memory outlives the close
// callback) when destroyed; a callback never runs after its owner is gone. Loop thread
// only, except Async::send().
#pragma once

#include <uv.h>

#include <chrono>
#include <functional>

namespace subrelay::net {

class Timer {
 public:
  explicit Timer(uv_loop_t* loop);
  ~Timer();
  Timer(const Timer&) = delete;
  Timer& operator=(const Timer&) = delete;

  // (Re)starts: `cb` runs once after `after`, then every `repeat` when that is non-zero.
  // Restarting replaces the previous deadline and callback.
  void start(std::chrono::milliseconds after, std::function<void()> cb,
             std::chrono::milliseconds repeat = std::chrono::milliseconds(0));
  void stop();
  bool active() const;

 private:
  uv_timer_t* h_;
  std::function<void()> cb_;
};

class Async {
 public:
  // `cb` runs on the loop thread after one or more send() calls (libuv coalesces them).
  Async(uv_loop_t* loop, std::function<void()> cb);
  ~Async();
  Async(const Async&) = delete;
  Async& operator=(const Async&) = delete;
  // Any thread, as long as this object is alive (callers guard with their own lock).
  void send();

 private:
  uv_async_t* h_;
  std::function<void()> cb_;
};

}  // namespace subrelay::net
