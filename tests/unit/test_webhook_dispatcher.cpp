// webhook::Dispatcher on a real libuv loop against an HTTPS server in this process
// (libmicrohttpd with TLS, a test CA made by the openssl command), a fake resolver and a
// fake clock: 2xx deletes the event, a 503 reschedules it by the retry schedule with the
// error kept, an event of an account without a webhook or older than max_age is dropped
// without a request, every request carries a valid signature over the fake clock's time,
// the host is looked up once, and at most maxInFlight requests run at once.
#include <doctest/doctest.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "net/uv_loop.h"
#include "test_pki.h"
#include "net/uv_timer.h"
#include "queue/sqlite_store.h"
#include "util/clock.h"
#include "webhook/dispatcher.h"
#include "webhook/signature.h"

using namespace subrelay;
using std::chrono::milliseconds;

namespace {

using subrelay::testing::TestPki;

TestPki& pki() {
  static TestPki p("hooks.example.test", "hook");
  return p;
}

// /ok -> 204, /fail -> 503, /slow -> 204 after 200 ms. Verifies every signature against
// `secret` at time `now`.
class Receiver {
 public:
  explicit Receiver(std::string secret, int64_t now) : secret_(std::move(secret)), now_(now) {
    static sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    daemon_ = MHD_start_daemon(MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_TLS, 0,
                               nullptr, nullptr, &Receiver::handle, this, MHD_OPTION_HTTPS_MEM_KEY, pki().key.c_str(),
                               MHD_OPTION_HTTPS_MEM_CERT, pki().cert.c_str(), MHD_OPTION_SOCK_ADDR,
                               reinterpret_cast<sockaddr*>(&sa), MHD_OPTION_END);
    REQUIRE(daemon_ != nullptr);
    port_ = MHD_get_daemon_info(daemon_, MHD_DAEMON_INFO_BIND_PORT)->port;
  }
  ~Receiver() { MHD_stop_daemon(daemon_); }
  uint16_t port() const { return port_; }

  std::mutex mu;
  std::vector<std::string> goodIds;  // verified requests, by event id
  int bad = 0;
  int running = 0, maxRunning = 0;

 private:
  static MHD_Result handle(void* cls, MHD_Connection* c, const char* url, const char*, const char*, const char* up,
                           size_t* upSize, void** state) {
    auto* self = static_cast<Receiver*>(cls);
    if (*state == nullptr) {
      *state = new std::string;
      std::lock_guard l(self->mu);
      self->maxRunning = std::max(self->maxRunning, ++self->running);
      return MHD_YES;
    }
    auto* body = static_cast<std::string*>(*state);
    if (*upSize != 0) {
      body->append(up, *upSize);
      *upSize = 0;
      return MHD_YES;
    }
    const std::string path = url;
    if (path == "/slow") std::this_thread::sleep_for(milliseconds(200));
    auto header = [&](const char* n) {
      const char* v = MHD_lookup_connection_value(c, MHD_HEADER_KIND, n);
      return std::string(v ? v : "");
    };
    const bool ok = webhook::verify(self->secret_, header(webhook::kTimestampHeader), *body,
                                    header(webhook::kSignatureHeader), self->now_, 300);
    {
      std::lock_guard l(self->mu);
      if (ok)
        self->goodIds.push_back(header(webhook::kEventIdHeader));
      else
        ++self->bad;
      --self->running;
    }
    delete body;
    *state = nullptr;
    const unsigned status = path == "/fail" ? 503 : 204;
    MHD_Response* r = MHD_create_response_from_buffer(0, nullptr, MHD_RESPMEM_PERSISTENT);
    MHD_Result ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
  }

  std::string secret_;
  int64_t now_;
  MHD_Daemon* daemon_ = nullptr;
  uint16_t port_ = 0;
};

class FakeResolver final : public dns::Resolver {
 public:
  void query(const std::string& name, dns::QType type, dns::Callback cb) override {
    ++queries;
    dns::Answer a;
    a.name = name;
    a.type = type;
    a.status = type == dns::QType::A ? dns::Status::Ok : dns::Status::NoData;
    if (type == dns::QType::A) a.addresses = {"127.0.0.1"};
    cb(a);
  }
  int queries = 0;
};

template <typename Pred>
void runUntil(net::Loop& loop, Pred done, int seconds = 20) {
  net::Timer tick(loop.get());
  tick.start(milliseconds(10), [] {}, milliseconds(10));
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
  while (!done() && std::chrono::steady_clock::now() < deadline) uv_run(loop.get(), UV_RUN_ONCE);
}

// Every row, after the dispatcher is gone (this claims them, ending any claim at once).
std::vector<queue::WebhookEventRow> rows(queue::SqliteStore& s) {
  auto r = s.claimWebhookEvents(int64_t{1} << 40, 1000, 0);
  REQUIRE(r.ok());
  return r.value();
}

// While the dispatcher runs: (events waiting, events that failed at least once).
std::pair<int64_t, int64_t> backlog(queue::SqliteStore& s) {
  auto b = s.webhookBacklog();
  REQUIRE(b.ok());
  int64_t n = 0, failing = 0;
  for (const auto& x : b.value()) {
    n += x.events;
    failing += x.failing;
  }
  return {n, failing};
}

}  // namespace

TEST_CASE("Dispatcher: 2xx deletes, 503 reschedules, unknown accounts and old events are dropped") {
  util::FakeClock clock;
  const int64_t now = util::unixSeconds(clock.wallNow());
  Receiver rx("s3cret", now);
  auto st = queue::SqliteStore::open(":memory:");
  REQUIRE(st.ok());
  auto& store = *st.value();
  const std::string base = "https://hooks.example.test:" + std::to_string(rx.port());
  REQUIRE(store.enqueueWebhookEvent("a", "evt_a1", "delivered", R"({"id":"evt_a1"})", now).ok());
  REQUIRE(store.enqueueWebhookEvent("a", "evt_a2", "bounced", R"({"id":"evt_a2"})", now).ok());
  REQUIRE(store.enqueueWebhookEvent("b", "evt_b1", "deferred", R"({"id":"evt_b1"})", now).ok());
  REQUIRE(store.enqueueWebhookEvent("gone", "evt_g1", "accepted", R"({"id":"evt_g1"})", now).ok());
  REQUIRE(store.enqueueWebhookEvent("a", "evt_old", "accepted", R"({"id":"evt_old"})", now - 4 * 86400).ok());

  webhook::DispatcherSettings s;
  s.accounts["a"] = webhook::Target{base + "/ok", "s3cret"};
  s.accounts["b"] = webhook::Target{base + "/fail", "s3cret"};
  s.caFile = pki().ca;
  s.timeout = std::chrono::seconds(5);
  s.policy.retrySchedule = {std::chrono::seconds(30), std::chrono::seconds(120)};
  s.policy.maxAge = std::chrono::seconds(3 * 86400);
  s.pollEvery = milliseconds(20);
  FakeResolver resolver;
  net::Loop loop;
  {
    webhook::Dispatcher d(loop.get(), store, resolver, clock, s);
    d.start();
    runUntil(loop, [&] {
      std::lock_guard l(rx.mu);
      return rx.goodIds.size() >= 3 && backlog(store) == std::pair<int64_t, int64_t>{1, 1};
    });
    d.abort();
  }
  loop.run();
  {
    std::lock_guard l(rx.mu);
    std::vector<std::string> ids = rx.goodIds;
    std::sort(ids.begin(), ids.end());
    // a's two events and b's one (answered 503) were POSTed and verified; nothing else.
    CHECK(ids == std::vector<std::string>{"evt_a1", "evt_a2", "evt_b1"});
    CHECK(rx.bad == 0);
  }
  auto left = rows(store);
  REQUIRE(left.size() == 1);
  CHECK(left[0].eventId == "evt_b1");
  CHECK(left[0].attempts == 1);
  CHECK(left[0].nextAt == now + 30);
  CHECK(left[0].lastError == "HTTP status 503");
  CHECK(resolver.queries == 1);  // one lookup for the host, then the cache
}

TEST_CASE("Dispatcher: at most maxInFlight requests at once") {
  util::FakeClock clock;
  const int64_t now = util::unixSeconds(clock.wallNow());
  Receiver rx("k", now);
  auto st = queue::SqliteStore::open(":memory:");
  REQUIRE(st.ok());
  auto& store = *st.value();
  for (int i = 0; i < 20; ++i)
    REQUIRE(store.enqueueWebhookEvent("a", "evt_" + std::to_string(i), "delivered", "{}", now).ok());
  webhook::DispatcherSettings s;
  s.accounts["a"] = webhook::Target{"https://hooks.example.test:" + std::to_string(rx.port()) + "/slow", "k"};
  s.caFile = pki().ca;
  s.policy.maxInFlight = 4;
  s.pollEvery = milliseconds(10);
  FakeResolver resolver;
  net::Loop loop;
  {
    webhook::Dispatcher d(loop.get(), store, resolver, clock, s);
    d.start();
    runUntil(loop, [&] { return backlog(store).first == 0; }, 30);
    d.stop();
    runUntil(loop, [&] { return d.drained(); });
    d.abort();
  }
  loop.run();
  CHECK(rows(store).empty());
  std::lock_guard l(rx.mu);
  CHECK(rx.goodIds.size() == 20);
  CHECK(rx.maxRunning <= 4);
  CHECK(rx.maxRunning >= 2);
}
