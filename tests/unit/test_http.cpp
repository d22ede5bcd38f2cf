// net/http_client.h against a real HTTPS server in this process: libmicrohttpd with TLS
// (GnuTLS) on 127.0.0.1 and a free port, with a test CA and certificates made by the openssl
// command. Covers: a GET with status, body and content type; no callback inside get(); the
// name in the URL is never looked up (only the addresses given are used) and the port
// override; certificate and host name verification; redirects returned, not followed; the
// body cap (announced and chunked); the total deadline; refused connections; bad URLs;
// cancel on destruction.
#include <doctest/doctest.h>
#include <microhttpd.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>

#include "net/http_client.h"
#include "net/uv_loop.h"
#include "test_pki.h"
#include "net/uv_timer.h"

using namespace subrelay::net;
using std::chrono::milliseconds;

namespace {

using subrelay::testing::TestPki;

// A CA, a certificate for mta-sts.example.test signed by it, and an unrelated second CA.
TestPki& pki() {
  static TestPki p("mta-sts.example.test", "http");
  return p;
}

// The HTTPS server: one thread per connection, so /slow can sleep.
class Server {
 public:
  Server() {
    const auto& p = pki();
    daemon_ = MHD_start_daemon(MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_TLS,
                               0, nullptr, nullptr, &Server::handle, this, MHD_OPTION_HTTPS_MEM_KEY, p.key.c_str(),
                               MHD_OPTION_HTTPS_MEM_CERT, p.cert.c_str(), MHD_OPTION_SOCK_ADDR, loopback(),
                               MHD_OPTION_END);
    REQUIRE(daemon_ != nullptr);
    port_ = MHD_get_daemon_info(daemon_, MHD_DAEMON_INFO_BIND_PORT)->port;
  }
  ~Server() { MHD_stop_daemon(daemon_); }
  uint16_t port() const { return port_; }
  int hits(const std::string& path) {
    std::lock_guard l(mu_);
    return hits_[path];
  }

 private:
  static sockaddr* loopback() {
    static sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    sa.sin_port = 0;
    return reinterpret_cast<sockaddr*>(&sa);
  }

  static MHD_Result reply(MHD_Connection* c, unsigned status, const std::string& body, const char* type,
                          const char* location = nullptr) {
    MHD_Response* r = MHD_create_response_from_buffer(body.size(), const_cast<char*>(body.data()), MHD_RESPMEM_MUST_COPY);
    if (type) MHD_add_response_header(r, "Content-Type", type);
    if (location) MHD_add_response_header(r, "Location", location);
    MHD_Result ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
  }

  static MHD_Result handle(void* cls, MHD_Connection* c, const char* url, const char* method, const char*,
                           const char* upload, size_t* uploadSize, void** state) {
    auto* self = static_cast<Server*>(cls);
    if (*state == nullptr) {  // first call: headers only
      *state = cls;
      return MHD_YES;
    }
    if (*uploadSize != 0) {  // POST data, in pieces
      std::lock_guard l(self->mu_);
      self->bodies_[c].append(upload, *uploadSize);
      *uploadSize = 0;
      return MHD_YES;
    }
    const std::string path = url;
    if (path == "/echo") {
      std::string got;
      {
        std::lock_guard l(self->mu_);
        got = std::string(method) + " " + self->bodies_[c];
        self->bodies_.erase(c);
        const char* h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "X-Test");
        const char* ct = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Type");
        got += std::string(" x-test=") + (h ? h : "") + " type=" + (ct ? ct : "");
        const auto* info = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
        const auto* sin = reinterpret_cast<const sockaddr_in*>(info->client_addr);
        self->clientPorts.push_back(ntohs(sin->sin_port));
      }
      return reply(c, 201, got, "text/plain");
    }
    {
      std::lock_guard l(self->mu_);
      ++self->hits_[path];
      const char* host = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Host");
      self->lastHost = host ? host : "";
    }
    if (path == "/policy") return reply(c, 200, "version: STSv1\r\n", "text/plain; charset=utf-8");
    if (path == "/redirect") return reply(c, 301, "moved", "text/plain", "https://mta-sts.example.test/policy");
    if (path == "/big") return reply(c, 200, std::string(100 * 1024, 'x'), "text/plain");
    if (path == "/exact") return reply(c, 200, std::string(1000, 'x'), "text/plain");
    if (path == "/chunked") {
      // Unknown size: chunked, so only the running count can stop it.
      MHD_Response* r = MHD_create_response_from_callback(
          MHD_SIZE_UNKNOWN, 4096,
          [](void*, uint64_t pos, char* buf, size_t max) -> ssize_t {
            if (pos >= 200 * 1024) return MHD_CONTENT_READER_END_OF_STREAM;
            std::memset(buf, 'y', max);
            return static_cast<ssize_t>(max);
          },
          nullptr, nullptr);
      MHD_Result ret = MHD_queue_response(c, 200, r);
      MHD_destroy_response(r);
      return ret;
    }
    if (path == "/slow") {
      std::this_thread::sleep_for(milliseconds(1500));
      return reply(c, 200, "late", "text/plain");
    }
    return reply(c, 404, "not found", "text/plain");
  }

  MHD_Daemon* daemon_ = nullptr;
  uint16_t port_ = 0;
  std::mutex mu_;
  std::map<std::string, int> hits_;
  std::map<MHD_Connection*, std::string> bodies_;

 public:
  std::vector<uint16_t> clientPorts;  // of each /echo request
  std::string lastHost;
};

// Runs the loop until `done` or 20 s.
template <typename Pred>
void runUntil(Loop& loop, Pred done) {
  Timer tick(loop.get());
  tick.start(milliseconds(10), [] {}, milliseconds(10));
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (!done() && std::chrono::steady_clock::now() < deadline) uv_run(loop.get(), UV_RUN_ONCE);
}

HttpGetOptions opts(uint16_t port) {
  HttpGetOptions o;
  o.addresses = {"127.0.0.1"};
  o.connectPort = port;
  o.caFile = pki().ca;
  o.timeout = std::chrono::seconds(10);
  o.maxBodyBytes = 64 * 1024;
  return o;
}

std::optional<HttpResult> fetch(Loop& loop, HttpClient& c, const std::string& url, const HttpGetOptions& o) {
  std::optional<HttpResult> out;
  c.get(url, o, [&](HttpResult r) { out = std::move(r); });
  CHECK_FALSE(out.has_value());  // never inside get()
  runUntil(loop, [&] { return out.has_value(); });
  return out;
}

const std::string kBase = "https://mta-sts.example.test";

}  // namespace

TEST_CASE("HttpClient: GET over TLS, verified, to the given address and port") {
  Server server;
  Loop loop;
  {
    HttpClient client(loop.get());
    auto r = fetch(loop, client, kBase + "/policy", opts(server.port()));
    REQUIRE(r.has_value());
    CHECK(r->ok());
    CHECK(r->error == "");
    CHECK(r->status == 200);
    CHECK(r->body == "version: STSv1\r\n");
    CHECK(r->contentType == "text/plain; charset=utf-8");
    CHECK(r->remoteAddress == "127.0.0.1");
    // The Host header keeps the URL's name and port: only the connection went elsewhere.
    CHECK(server.lastHost == "mta-sts.example.test");
    CHECK(client.inFlight() == 0);

    // 404 is a response, not a failure.
    auto nf = fetch(loop, client, kBase + "/missing", opts(server.port()));
    REQUIRE(nf.has_value());
    CHECK(nf->ok());
    CHECK(nf->status == 404);

    // Two at once.
    int n = 0;
    client.get(kBase + "/policy", opts(server.port()), [&](HttpResult x) { n += x.status == 200; });
    client.get(kBase + "/exact", opts(server.port()), [&](HttpResult x) { n += x.body.size() == 1000; });
    runUntil(loop, [&] { return n == 2; });
    CHECK(n == 2);
  }
  loop.run();  // the client's handles are closed: nothing keeps the loop
}

TEST_CASE("HttpClient: POST with a body and header fields; connections reused on request") {
  Server server;
  Loop loop;
  {
    HttpClient client(loop.get());
    auto o = opts(server.port());
    o.reuseConnection = true;
    for (int i = 0; i < 3; ++i) {
      std::optional<HttpResult> out;
      HttpPostBody b;
      b.body = "{\"n\":" + std::to_string(i) + "}";
      b.headers = {{"X-Test", "v" + std::to_string(i)}};
      client.post(kBase + "/echo", o, b, [&](HttpResult r) { out = std::move(r); });
      CHECK_FALSE(out.has_value());
      runUntil(loop, [&] { return out.has_value(); });
      REQUIRE(out.has_value());
      CHECK(out->ok());
      CHECK(out->status == 201);
      CHECK(out->body == "POST {\"n\":" + std::to_string(i) + "} x-test=v" + std::to_string(i) + " type=application/json");
    }
    REQUIRE(server.clientPorts.size() == 3);
    // One TCP connection (the same client port) for the three requests.
    CHECK(server.clientPorts[0] == server.clientPorts[1]);
    CHECK(server.clientPorts[1] == server.clientPorts[2]);

    // A header that would smuggle another field is refused before anything is sent.
    std::optional<HttpResult> bad;
    HttpPostBody b;
    b.headers = {{"X-Test", "a\r\nX-Other: b"}};
    client.post(kBase + "/echo", o, b, [&](HttpResult r) { bad = std::move(r); });
    runUntil(loop, [&] { return bad.has_value(); });
    REQUIRE(bad.has_value());
    CHECK(bad->failure == HttpFailure::BadRequest);
    CHECK(server.clientPorts.size() == 3);
  }
  loop.run();
}

TEST_CASE("HttpClient: without reuse every request has its own connection") {
  Server server;
  Loop loop;
  {
    HttpClient client(loop.get());
    for (int i = 0; i < 2; ++i) {
      std::optional<HttpResult> out;
      client.post(kBase + "/echo", opts(server.port()), HttpPostBody{}, [&](HttpResult r) { out = std::move(r); });
      runUntil(loop, [&] { return out.has_value(); });
      REQUIRE(out.has_value());
      CHECK(out->status == 201);
    }
    REQUIRE(server.clientPorts.size() == 2);
    CHECK(server.clientPorts[0] != server.clientPorts[1]);
  }
  loop.run();
}

TEST_CASE("HttpClient: certificates and host names are verified") {
  Server server;
  Loop loop;
  HttpClient client(loop.get());
  // A CA that did not issue the server's certificate.
  auto o = opts(server.port());
  o.caFile = pki().otherCa;
  auto r = fetch(loop, client, kBase + "/policy", o);
  REQUIRE(r.has_value());
  CHECK(r->failure == HttpFailure::Tls);
  CHECK(r->error != "");
  // The right CA, but a name the certificate does not cover.
  auto wrong = fetch(loop, client, "https://mta-sts.other.test/policy", opts(server.port()));
  REQUIRE(wrong.has_value());
  CHECK(wrong->failure == HttpFailure::Tls);
  CHECK(server.hits("/policy") == 0);
}

TEST_CASE("HttpClient: a redirect is returned, never followed (RFC 8461 3.3)") {
  Server server;
  Loop loop;
  HttpClient client(loop.get());
  auto r = fetch(loop, client, kBase + "/redirect", opts(server.port()));
  REQUIRE(r.has_value());
  CHECK(r->ok());
  CHECK(r->status == 301);
  CHECK(server.hits("/redirect") == 1);
  CHECK(server.hits("/policy") == 0);
}

TEST_CASE("HttpClient: the body cap ends the transfer") {
  Server server;
  Loop loop;
  HttpClient client(loop.get());
  auto big = fetch(loop, client, kBase + "/big", opts(server.port()));
  REQUIRE(big.has_value());
  CHECK(big->failure == HttpFailure::TooLarge);
  CHECK(big->body.empty());
  auto chunked = fetch(loop, client, kBase + "/chunked", opts(server.port()));
  REQUIRE(chunked.has_value());
  CHECK(chunked->failure == HttpFailure::TooLarge);
  // Exactly at the cap is fine.
  auto o = opts(server.port());
  o.maxBodyBytes = 1000;
  auto exact = fetch(loop, client, kBase + "/exact", o);
  REQUIRE(exact.has_value());
  CHECK(exact->ok());
  CHECK(exact->body.size() == 1000);
  o.maxBodyBytes = 999;
  auto over = fetch(loop, client, kBase + "/exact", o);
  REQUIRE(over.has_value());
  CHECK(over->failure == HttpFailure::TooLarge);
}

TEST_CASE("HttpClient: the total deadline") {
  Server server;
  Loop loop;
  HttpClient client(loop.get());
  auto o = opts(server.port());
  o.timeout = milliseconds(300);
  const auto t0 = std::chrono::steady_clock::now();
  auto r = fetch(loop, client, kBase + "/slow", o);
  REQUIRE(r.has_value());
  CHECK(r->failure == HttpFailure::Timeout);
  CHECK(std::chrono::steady_clock::now() - t0 < milliseconds(1400));
}

TEST_CASE("HttpClient: refused connections, bad URLs, no addresses") {
  Loop loop;
  HttpClient client(loop.get());
  uint16_t closedPort;
  {
    Server s;  // a port that was just in use and is now closed
    closedPort = s.port();
  }
  auto refused = fetch(loop, client, kBase + "/policy", opts(closedPort));
  REQUIRE(refused.has_value());
  CHECK(refused->failure == HttpFailure::Connect);

  auto plain = fetch(loop, client, "http://mta-sts.example.test/policy", opts(closedPort));
  REQUIRE(plain.has_value());
  CHECK(plain->failure == HttpFailure::BadRequest);
  auto junk = fetch(loop, client, "not a url", opts(closedPort));
  REQUIRE(junk.has_value());
  CHECK(junk->failure == HttpFailure::BadRequest);
  auto o = opts(closedPort);
  o.addresses.clear();
  auto none = fetch(loop, client, kBase + "/policy", o);
  REQUIRE(none.has_value());
  CHECK(none->failure == HttpFailure::BadRequest);
}

TEST_CASE("HttpClient: destroyed with transfers running: no callback, and a callback may destroy it") {
  Server server;
  Loop loop;
  bool called = false;
  {
    // Before the loop ran at all (one of them already decided).
    auto client = std::make_unique<HttpClient>(loop.get());
    client->get(kBase + "/slow", opts(server.port()), [&](HttpResult) { called = true; });
    client->get("http://bad", opts(server.port()), [&](HttpResult) { called = true; });
    client.reset();
  }
  loop.run();
  CHECK_FALSE(called);
  {
    // In the middle of the transfer (connected, waiting for the slow reply).
    auto client = std::make_unique<HttpClient>(loop.get());
    client->get(kBase + "/slow", opts(server.port()), [&](HttpResult) { called = true; });
    runUntil(loop, [&] { return server.hits("/slow") == 1; });
    CHECK(client->inFlight() == 1);
    client.reset();
  }
  loop.run();
  CHECK_FALSE(called);

  auto client = std::make_unique<HttpClient>(loop.get());
  int calls = 0;
  client->get(kBase + "/policy", opts(server.port()), [&](HttpResult) {
    ++calls;
    client.reset();
  });
  runUntil(loop, [&] { return calls > 0; });
  CHECK(calls == 1);
  loop.run();
}
