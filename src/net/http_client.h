// HttpClient: asynchronous HTTPS GET on the caller's libuv loop, for fetching small
// documents such as MTA-STS policies (RFC 8461 section 3.3). libcurl (Debian's GnuTLS
// flavour) does HTTP and TLS; it is driven through its multi-socket API, with our own
// uv_poll (net/uv_poll.h) and uv_timer (net/uv_timer.h) owners, so nothing blocks the loop
// and no thread of curl's runs.
//
// Fixed for every request:
//  - https only, TLS 1.2 or later, the peer's certificate chain and host name verified
//    (against `caFile` when given, else the system's trust store);
//  - no redirects: a 3xx is returned as it is (RFC 8461 3.3: "HTTP 3xx redirects MUST
//    NOT be followed");
//  - no DNS inside curl: the caller resolves the host (dns::Resolver, so every lookup goes
//    through the configured resolvers) and passes the addresses, which reach curl as
//    CURLOPT_RESOLVE entries; a request without addresses fails. Proxies from the
//    environment are ignored (they would be resolved by curl);
//  - bounds: a total deadline (connect, TLS, request and body) and a body size cap (the
//    transfer is aborted as soon as the body, or its announced Content-Length, passes it).
//
// Callbacks run on the loop, never inside get(). Destroying the client cancels every
// transfer still running: no callback runs afterwards. A callback may destroy the client or
// start another get(). As with every libuv owner the loop must run once more afterwards to
// free the closed handles.
#pragma once

#include <uv.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "net/uv_timer.h"

namespace subrelay::net {

class SocketPoll;

struct HttpGetOptions {
  // Addresses of the URL's host ("192.0.2.1", "2001:db8::1"), tried in this order. Required.
  std::vector<std::string> addresses;
  // Connect to this port instead of the URL's (0: the URL's, 443 for https). The URL,
  // the Host header, SNI and the certificate check keep the URL's host; only the TCP
  // destination changes. For tests on loopback with an unprivileged port.
  uint16_t connectPort = 0;
  // PEM file of trusted CAs; empty: the system's store.
  std::string caFile;
  std::chrono::milliseconds timeout{std::chrono::seconds(60)};  // whole transfer
  size_t maxBodyBytes = 64 * 1024;
  // Keep the connection for the next request to the same host (webhooks: many small
  // POSTs). An idle kept connection stays polled until the client is destroyed, so only a
  // client that is destroyed before its loop ends may set it.
  bool reuseConnection = false;
};

// A request body and extra header fields ("Name", "value"; no CR or LF in either).
struct HttpPostBody {
  std::string contentType = "application/json";
  std::string body;
  std::vector<std::pair<std::string, std::string>> headers;
};

enum class HttpFailure {
  None,      // a response was received (any status)
  BadRequest,  // our side: a URL that is not https://host[:port]/path, no addresses
  Connect,   // TCP connect failed or the connection broke
  Tls,       // handshake or certificate verification failed
  Timeout,   // the total deadline passed
  TooLarge,  // the body passed maxBodyBytes
  Protocol,  // anything else (bad HTTP, ...)
};

// "none", "bad-request", "connect", "tls", "timeout", "too-large", "protocol"
const char* httpFailureName(HttpFailure f);

struct HttpResult {
  HttpFailure failure = HttpFailure::None;
  std::string error;  // why, when failure != None (curl's text)
  long status = 0;    // HTTP status when failure == None
  std::string contentType;  // the Content-Type header as sent ("" when absent)
  std::string body;   // at most maxBodyBytes
  std::string remoteAddress;  // the address connected to, for logs

  bool ok() const { return failure == HttpFailure::None; }
};

class HttpClient {
 public:
  using Callback = std::function<void(HttpResult)>;

  explicit HttpClient(uv_loop_t* loop);
  ~HttpClient();
  HttpClient(const HttpClient&) = delete;
  HttpClient& operator=(const HttpClient&) = delete;

  // Starts a GET of `url` (https://host[:port]/path). `cb` runs once, on the loop.
  void get(const std::string& url, const HttpGetOptions& options, Callback cb);
  // Starts a POST of `post` to `url`, with the same rules as get() (no redirects: a 3xx
  // is the result). A header with CR or LF fails the request (bad-request).
  void post(const std::string& url, const HttpGetOptions& options, HttpPostBody post, Callback cb);

  size_t inFlight() const { return transfers_.size(); }

 private:
  struct Transfer;
  static int onSocket(void* easy, int fd, int what, void* self, void* socketp);
  static int onTimer(void* multi, long timeoutMs, void* self);
  void socketAction(int fd, int flags);
  void collectDone();
  void deliver(std::vector<std::pair<Callback, HttpResult>> done);
  void failLater(Callback cb, HttpFailure f, std::string error);
  void start(const std::string& url, const HttpGetOptions& options, HttpPostBody* post, Callback cb);

  uv_loop_t* loop_;
  void* multi_;  // CURLM*
  Timer timer_;  // curl's timeout
  Timer later_;  // results decided before curl saw the request
  std::vector<std::pair<Callback, HttpResult>> early_;
  std::map<int, std::unique_ptr<SocketPoll>> polls_;
  std::map<void*, std::unique_ptr<Transfer>> transfers_;  // by CURL*
  std::shared_ptr<bool> alive_;
};

}  // namespace subrelay::net
