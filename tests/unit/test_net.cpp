// net/: the RAII owners of libuv handles (uv_timer.h, uv_udp.h, uv_loop.h) on a real loop.
#include <doctest/doctest.h>

#include <netinet/in.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "net/uv_handle.h"
#include "net/uv_loop.h"
#include "net/uv_timer.h"
#include "net/uv_udp.h"

using namespace subrelay::net;
using std::chrono::milliseconds;

TEST_CASE("Timer: fires once, then is inactive") {
  Loop loop;
  int fired = 0;
  {
    Timer t(loop.get());
    t.start(milliseconds(1), [&] { ++fired; });
    CHECK(t.active());
    loop.run();
    CHECK(fired == 1);
    CHECK_FALSE(t.active());
  }
  loop.run();
  CHECK(fired == 1);
}

TEST_CASE("Timer: repeats until stopped from its own callback") {
  Loop loop;
  Timer t(loop.get());
  int fired = 0;
  t.start(
      milliseconds(1),
      [&] {
        if (++fired == 3) t.stop();
      },
      milliseconds(1));
  loop.run();
  CHECK(fired == 3);
  CHECK_FALSE(t.active());
}

TEST_CASE("Timer: a restart replaces the deadline and the callback") {
  Loop loop;
  Timer t(loop.get());
  std::vector<std::string> seen;
  t.start(milliseconds(10000), [&] { seen.push_back("old"); });
  t.start(milliseconds(1), [&] { seen.push_back("new"); });
  const auto t0 = std::chrono::steady_clock::now();
  loop.run();
  CHECK(seen == std::vector<std::string>{"new"});
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5));
  // Restarted from its own callback: runs again.
  int n = 0;
  t.start(milliseconds(0), [&] {
    if (++n < 2) t.start(milliseconds(0), [&] { ++n; });
  });
  loop.run();
  CHECK(n == 2);
}

TEST_CASE("Timer: destroyed before it fires never calls back") {
  Loop loop;
  bool fired = false;
  auto t = std::make_unique<Timer>(loop.get());
  t->start(milliseconds(0), [&] { fired = true; });
  t.reset();
  loop.run();
  CHECK_FALSE(fired);
  // Destroyed from its own callback, with a second timer still due in the same pass.
  auto a = std::make_unique<Timer>(loop.get());
  auto b = std::make_unique<Timer>(loop.get());
  int aRuns = 0;
  bool bFired = false;
  a->start(
      milliseconds(0),
      [&] {
        ++aRuns;
        a.reset();
        b.reset();
      },
      milliseconds(1));
  b->start(milliseconds(0), [&] { bFired = true; });
  loop.run();
  CHECK(aRuns == 1);
  CHECK_FALSE(bFired);
}

TEST_CASE("Async: send() from another thread wakes the loop") {
  Loop loop;
  std::atomic<int> calls{0};
  std::thread::id cbThread;
  std::unique_ptr<Async> async;
  async = std::make_unique<Async>(loop.get(), [&] {
    cbThread = std::this_thread::get_id();
    ++calls;
    async.reset();  // the only handle: the loop ends
  });
  std::thread sender([&] { async->send(); });
  loop.run();
  sender.join();
  CHECK(calls == 1);
  CHECK(cbThread == std::this_thread::get_id());
}

TEST_CASE("UdpSocket: echo on 127.0.0.1") {
  Loop loop;
  sockaddr_storage lo{};
  REQUIRE(parseAddress("127.0.0.1", 0, false, &lo));
  UdpSocket server(loop.get());
  REQUIRE(server.bind(lo) == 0);
  sockaddr_storage serverAddr{};
  REQUIRE(server.localAddress(&serverAddr) == 0);
  uint16_t port = 0;
  CHECK(addressToString(reinterpret_cast<const sockaddr*>(&serverAddr), &port) == "127.0.0.1");
  CHECK(port != 0);
  std::string serverGot;
  REQUIRE(server.startReceiving([&](int status, std::string_view data, const sockaddr_storage& from, bool truncated) {
            REQUIRE(status == 0);
            CHECK_FALSE(truncated);
            serverGot = data;
            CHECK(server.send("echo:" + std::string(data), &from) == 0);
          }) == 0);

  auto client = std::make_unique<UdpSocket>(loop.get());
  REQUIRE(client->bind(anyAddress(AF_INET)) == 0);
  REQUIRE(client->connect(serverAddr) == 0);
  std::string clientGot;
  std::string fromText;
  REQUIRE(client->startReceiving([&](int status, std::string_view data, const sockaddr_storage& from, bool) {
            REQUIRE(status == 0);
            clientGot = data;
            uint16_t p = 0;
            fromText = addressToString(reinterpret_cast<const sockaddr*>(&from), &p);
            fromText += ":" + std::to_string(p);
            client.reset();  // a callback may destroy its socket
          }) == 0);
  REQUIRE(client->send("ping") == 0);
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (clientGot.empty() && std::chrono::steady_clock::now() < until) {
    loop.runNoWait();
    std::this_thread::sleep_for(milliseconds(1));
  }
  CHECK(serverGot == "ping");
  CHECK(clientGot == "echo:ping");
  CHECK(fromText == "127.0.0.1:" + std::to_string(port));
  CHECK(client == nullptr);
}

TEST_CASE("UdpSocket: a connected socket reports ICMP port-unreachable as an error") {
  Loop loop;
  sockaddr_storage lo{};
  REQUIRE(parseAddress("127.0.0.1", 0, false, &lo));
  sockaddr_storage closedAddr{};
  {
    UdpSocket probe(loop.get());  // a port that was free a moment ago
    REQUIRE(probe.bind(lo) == 0);
    REQUIRE(probe.localAddress(&closedAddr) == 0);
  }
  loop.run();
  UdpSocket s(loop.get());
  REQUIRE(s.bind(anyAddress(AF_INET)) == 0);
  REQUIRE(s.connect(closedAddr) == 0);
  int got = 1;
  REQUIRE(s.startReceiving([&](int status, std::string_view, const sockaddr_storage&, bool) { got = status; }) == 0);
  REQUIRE(s.send("x") == 0);
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (got == 1 && std::chrono::steady_clock::now() < until) {
    loop.runNoWait();
    std::this_thread::sleep_for(milliseconds(1));
  }
  CHECK(got == UV_ECONNREFUSED);
  CHECK(errorText(got).find("refused") != std::string::npos);
}

TEST_CASE("TcpStream: refused connect reports the error; destroyed while connecting never calls back") {
  Loop loop;
  sockaddr_storage lo{};
  REQUIRE(parseAddress("127.0.0.1", 1, false, &lo));  // port 1: nobody listens
  int status = 1;
  {
    TcpStream s(loop.get());
    REQUIRE(s.connect(lo, [&](int st) { status = st; }) == 0);
    CHECK(status == 1);  // never inside connect()
    loop.run();
  }
  CHECK(status == UV_ECONNREFUSED);
  bool called = false;
  {
    TcpStream s(loop.get());
    REQUIRE(s.connect(lo, [&](int) { called = true; }) == 0);
  }
  loop.run();
  CHECK_FALSE(called);
}

TEST_CASE("queueWork: the job runs on the pool, done on the loop thread") {
  Loop loop;
  std::thread::id workThread;
  std::thread::id doneThread;
  bool cancelledSeen = true;
  int order = 0;
  int workAt = 0;
  int doneAt = 0;
  queueWork(
      loop.get(),
      [&] {
        workThread = std::this_thread::get_id();
        workAt = ++order;
      },
      [&](bool cancelled) {
        doneThread = std::this_thread::get_id();
        cancelledSeen = cancelled;
        doneAt = ++order;
      });
  loop.run();
  CHECK(workAt == 1);
  CHECK(doneAt == 2);
  CHECK_FALSE(cancelledSeen);
  CHECK(workThread != std::this_thread::get_id());
  CHECK(doneThread == std::this_thread::get_id());
}

TEST_CASE("LoopThread: posts run in order on its thread; after stop() none are taken and the loop ends") {
  std::vector<int> ran;
  std::thread::id loopThread;
  std::atomic<bool> timerFired{false};
  {
    LoopThread lt;
    // A handle made before start(), on the loop it will run.
    auto t = std::make_unique<Timer>(lt.loop());
    lt.start();
    for (int i = 0; i < 100; ++i)
      CHECK(lt.post([&, i] {
        loopThread = std::this_thread::get_id();
        ran.push_back(i);
      }));
    CHECK(lt.post([&] {
      t->start(milliseconds(1), [&] {
        timerFired = true;
        t.reset();
        lt.stop();
      });
    }));
    lt.join();  // ends: the timer is gone and stop() closed the wake-up handle
    CHECK(timerFired);
    CHECK_FALSE(lt.post([&] { ran.push_back(-1); }));
  }
  REQUIRE(ran.size() == 100);
  for (int i = 0; i < 100; ++i) CHECK(ran[static_cast<size_t>(i)] == i);
  CHECK(loopThread != std::this_thread::get_id());
}

TEST_CASE("LoopThread: never started, destroyed with posts and handles pending") {
  bool ran = false;
  {
    LoopThread lt;
    Timer t(lt.loop());
    t.start(milliseconds(0), [&] { ran = true; });
    CHECK(lt.post([&] { ran = true; }));
  }
  CHECK_FALSE(ran);
}
