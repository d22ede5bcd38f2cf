#include "net/uv_loop.h"

#include "net/uv_handle.h"

namespace subrelay::net {

// ---- Loop ----

Loop::Loop() { uv_loop_init(&loop_); }

Loop::~Loop() {
  // Handles left open (never started, or owners destroyed while the loop was not running)
  // are closed here; their memory is the owners' business, so no deleter, only uv_close.
  uv_walk(
      &loop_,
      [](uv_handle_t* h, void*) {
        if (!uv_is_closing(h)) {
          h->data = nullptr;
          uv_close(h, nullptr);
        }
      },
      nullptr);
  uv_run(&loop_, UV_RUN_DEFAULT);
  uv_loop_close(&loop_);
}

void Loop::run() { uv_run(&loop_, UV_RUN_DEFAULT); }

bool Loop::runNoWait() { return uv_run(&loop_, UV_RUN_NOWAIT) != 0; }

bool Loop::runOnce() { return uv_run(&loop_, UV_RUN_ONCE) != 0; }

// ---- LoopThread ----

LoopThread::LoopThread() : async_(newHandle<uv_async_t>()) {
  uv_async_init(loop_.get(), async_, [](uv_async_t* a) {
    auto* self = static_cast<LoopThread*>(a->data);
    if (self != nullptr) self->runPosted();
  });
  async_->data = this;
}

LoopThread::~LoopThread() {
  stop();
  join();
  if (async_ != nullptr) closeHandle(async_);  // never started: Loop's destructor runs the close
}

void LoopThread::start() {
  thread_ = std::thread([this] { loop_.run(); });
}

bool LoopThread::post(std::function<void()> fn) {
  // uv_async_send under the lock: runPosted() closes the handle only after it saw
  // stopped_ under the same lock, so a send never reaches a closed handle.
  std::lock_guard lk(mu_);
  if (stopped_) return false;
  posted_.push_back(std::move(fn));
  uv_async_send(async_);
  return true;
}

void LoopThread::stop() {
  std::lock_guard lk(mu_);
  if (stopped_) return;
  stopped_ = true;
  posted_.clear();
  if (async_ != nullptr) uv_async_send(async_);
}

void LoopThread::runPosted() {
  std::vector<std::function<void()>> batch;
  {
    std::lock_guard lk(mu_);
    batch.swap(posted_);
  }
  for (auto& fn : batch) fn();
  {
    std::lock_guard lk(mu_);
    if (!stopped_) return;
    posted_.clear();
  }
  // No more sends can come (stopped_ is set under mu_): close the wake-up handle so the
  // loop can end.
  if (async_ != nullptr) {
    closeHandle(async_);
    async_ = nullptr;
  }
}

void LoopThread::join() {
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

// ---- queueWork ----

namespace {
struct WorkReq {
  uv_work_t req{};
  std::function<void()> work;
  std::function<void(bool)> done;
};
}  // namespace

void queueWork(uv_loop_t* loop, std::function<void()> work, std::function<void(bool cancelled)> done) {
  auto* w = new WorkReq{{}, std::move(work), std::move(done)};
  w->req.data = w;
  int rc = uv_queue_work(
      loop, &w->req, [](uv_work_t* r) { static_cast<WorkReq*>(r->data)->work(); },
      [](uv_work_t* r, int status) {
        std::unique_ptr<WorkReq> own(static_cast<WorkReq*>(r->data));
        if (own->done) own->done(status != 0);
      });
  if (rc != 0) {
    std::unique_ptr<WorkReq> own(w);
    if (own->done) own->done(true);
  }
}

}  // namespace subrelay::net
