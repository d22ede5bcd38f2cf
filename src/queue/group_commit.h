// GroupCommitter: one writer thread in front of a Store. submit() queues a message;
// the thread takes everything queued while the previous commit ran and inserts it with
// one insertBatch() (one fsync). The callback runs on the writer thread: the caller
// marshals it back to its event loop (app/ uses uv_async_send).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

#include "queue/store.h"

namespace subrelay::queue {

class GroupCommitter {
 public:
  using Callback = std::function<void(util::Result<std::string>)>;

  explicit GroupCommitter(Store& store, size_t maxBatch = 512);
  ~GroupCommitter();  // stop()
  GroupCommitter(const GroupCommitter&) = delete;
  GroupCommitter& operator=(const GroupCommitter&) = delete;

  void submit(NewMessage msg, Callback done);
  // Commits what is queued, then joins the thread. Later submits fail at once.
  void stop();

  // Statistics for the benchmark and logs.
  uint64_t commits() const;
  uint64_t messages() const;

 private:
  void run();
  struct Item {
    NewMessage msg;
    Callback done;
    std::chrono::steady_clock::time_point queuedAt;
  };
  Store& store_;
  size_t maxBatch_;
  mutable std::mutex mu_;
  std::mutex joinMu_;  // serialises join() between stop() callers
  std::condition_variable cv_;
  std::deque<Item> pending_;
  bool stopping_ = false;
  uint64_t commits_ = 0;
  uint64_t messages_ = 0;
  std::thread thread_;  // last: started in the constructor once the rest exists
};

}  // namespace subrelay::queue
