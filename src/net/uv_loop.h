// A libuv loop as an owned object (Loop), the same on its own thread with a thread-safe
// way in (LoopThread), and a job for libuv's thread pool (queueWork). Code outside net/
// passes loop() to the other owners (Timer, UdpSocket, Listener, Connection, ...) and
// never calls libuv itself.
#pragma once

#include <uv.h>

#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace subrelay::net {

class Loop {
 public:
  Loop();
  // Closes every handle still open (their owners must be gone or never use them again),
  // lets the close callbacks and outstanding thread-pool jobs finish, then closes the loop.
  ~Loop();
  Loop(const Loop&) = delete;
  Loop& operator=(const Loop&) = delete;

  uv_loop_t* get() { return &loop_; }
  // Until no active handle or request is left.
  void run();
  // One pass without waiting; true when there is more to do.
  bool runNoWait();
  // One pass, waiting for at least one event (a timer bounds the wait); true when there is
  // more to do.
  bool runOnce();

 private:
  uv_loop_t loop_{};
};

// A Loop run by its own std::thread. post() is the one way in from other threads.
class LoopThread {
 public:
  LoopThread();
  ~LoopThread();  // joins; the thread must have been asked to end (stop())
  LoopThread(const LoopThread&) = delete;
  LoopThread& operator=(const LoopThread&) = delete;

  // Loop thread (or before start()): for the handle owners.
  uv_loop_t* loop() { return loop_.get(); }
  // Runs the loop on a new thread until stop() and until every other handle is closed.
  void start();
  // Any thread: run fn on the loop thread, in order. False (fn dropped) after stop().
  bool post(std::function<void()> fn);
  // Any thread: take no more posts and drop those not yet run; the loop then ends as soon
  // as its other handles are closed.
  void stop();
  void join();

 private:
  void runPosted();

  Loop loop_;
  uv_async_t* async_;
  std::mutex mu_;
  std::vector<std::function<void()>> posted_;
  bool stopped_ = false;  // no more posts (under mu_)
  std::thread thread_;
};

// Runs `work` on libuv's thread pool, then `done` on the loop thread (cancelled: the job
// never ran, e.g. the loop is ending). Whatever the two share, `done` owns and frees.
void queueWork(uv_loop_t* loop, std::function<void()> work, std::function<void(bool cancelled)> done);

}  // namespace subrelay::net
