// GroupCommitter: the queue's throughput path. Every fsync costs milliseconds; with one
// writer thread taking whatever piled up during the previous commit, N sessions that
// finish DATA together share one transaction and one fsync (the group commit of
// database logs; Postfix gets the same effect differently, with one file per message).
#include "queue/group_commit.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "metrics/server_metrics.h"

namespace subrelay::queue {

GroupCommitter::GroupCommitter(Store& store, size_t maxBatch)
    : store_(store), maxBatch_(maxBatch == 0 ? 1 : maxBatch), thread_([this] { run(); }) {}

GroupCommitter::~GroupCommitter() { stop(); }

void GroupCommitter::submit(NewMessage msg, Callback done) {
  {
    std::lock_guard lock(mu_);
    if (!stopping_) {
      pending_.push_back(Item{std::move(msg), std::move(done), std::chrono::steady_clock::now()});
      cv_.notify_one();
      return;
    }
  }
  // Outside the lock: the callback may well submit again or read the statistics.
  done(util::makeError("queue writer is stopped"));
}

void GroupCommitter::stop() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_one();
  // Only one caller joins; a second stop() (e.g. the destructor after an explicit stop)
  // finds the thread already joined.
  // From a callback (the writer thread itself) we cannot join: the thread drains and
  // exits on its own, and the destructor's stop() joins it later.
  if (std::this_thread::get_id() == thread_.get_id()) return;
  std::lock_guard joinLock(joinMu_);
  if (thread_.joinable()) thread_.join();
}

uint64_t GroupCommitter::commits() const {
  std::lock_guard lock(mu_);
  return commits_;
}

uint64_t GroupCommitter::messages() const {
  std::lock_guard lock(mu_);
  return messages_;
}

void GroupCommitter::run() {
  std::vector<NewMessage> batch;
  std::vector<Callback> callbacks;
  std::vector<std::chrono::steady_clock::time_point> queuedAt;
  auto& commitLatency = metrics::server().commitLatency.get();
  for (;;) {
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !pending_.empty(); });
      // stop() drains: leave only once nothing is queued.
      if (pending_.empty()) return;
      const size_t n = std::min(pending_.size(), maxBatch_);
      batch.reserve(n);
      callbacks.reserve(n);
      for (size_t i = 0; i < n; ++i) {
        batch.push_back(std::move(pending_.front().msg));
        callbacks.push_back(std::move(pending_.front().done));
        queuedAt.push_back(pending_.front().queuedAt);
        pending_.pop_front();
      }
    }
    // The lock is free while SQLite fsyncs: sessions keep queueing the next batch.
    auto results = store_.insertBatch(batch);
    const auto committed = std::chrono::steady_clock::now();
    for (const auto& t : queuedAt) commitLatency.observe(std::chrono::duration<double>(committed - t).count());
    queuedAt.clear();
    {
      std::lock_guard lock(mu_);
      ++commits_;
      messages_ += batch.size();
    }
    for (size_t i = 0; i < callbacks.size(); ++i) {
      if (i < results.size()) {
        callbacks[i](std::move(results[i]));
      } else {
        // A Store that breaks its one-result-per-input contract must not leave a session
        // waiting for ever.
        callbacks[i](util::makeError("queue store returned no result"));
      }
    }
    batch.clear();
    callbacks.clear();
  }
}

}  // namespace subrelay::queue
