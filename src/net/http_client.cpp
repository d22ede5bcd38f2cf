// HttpClient on libcurl's multi-socket API (curl_multi_socket_action): curl tells us which
// sockets to watch (CURLMOPT_SOCKETFUNCTION) and when to call it back (TIMERFUNCTION); the
// loop tells curl what happened. See http_client.h for the fixed rules of every request.
#include "net/http_client.h"

#include <curl/curl.h>

#include <mutex>
#include <utility>

#include "net/uv_poll.h"

namespace subrelay::net {

namespace {

void globalInit() {
  // curl_global_init is not thread-safe with itself; once per process.
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

using Url = std::unique_ptr<CURLU, decltype(&curl_url_cleanup)>;

// "https://host[:port]/path" -> host and port; false for anything else.
bool splitUrl(const std::string& url, std::string* host, uint16_t* port) {
  Url u(curl_url(), curl_url_cleanup);
  if (!u || curl_url_set(u.get(), CURLUPART_URL, url.c_str(), 0) != CURLUE_OK) return false;
  auto part = [&](CURLUPart p, unsigned flags, std::string* out) {
    char* v = nullptr;
    if (curl_url_get(u.get(), p, &v, flags) != CURLUE_OK || v == nullptr) return false;
    *out = v;
    curl_free(v);
    return true;
  };
  std::string scheme, portText;
  if (!part(CURLUPART_SCHEME, 0, &scheme) || scheme != "https") return false;
  if (!part(CURLUPART_HOST, 0, host) || host->empty()) return false;
  if (!part(CURLUPART_PORT, CURLU_DEFAULT_PORT, &portText)) return false;
  long p = std::strtol(portText.c_str(), nullptr, 10);
  if (p <= 0 || p > 65535) return false;
  *port = static_cast<uint16_t>(p);
  return true;
}

HttpFailure classify(CURLcode rc) {
  switch (rc) {
    case CURLE_OK:
      return HttpFailure::None;
    case CURLE_OPERATION_TIMEDOUT:
      return HttpFailure::Timeout;
    case CURLE_FILESIZE_EXCEEDED:
      return HttpFailure::TooLarge;
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
      return HttpFailure::Connect;
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS:
    case CURLE_SSL_ENGINE_INITFAILED:
      return HttpFailure::Tls;
    case CURLE_UNSUPPORTED_PROTOCOL:
    case CURLE_URL_MALFORMAT:
      return HttpFailure::BadRequest;
    default:
      return HttpFailure::Protocol;
  }
}

}  // namespace

const char* httpFailureName(HttpFailure f) {
  switch (f) {
    case HttpFailure::None: return "none";
    case HttpFailure::BadRequest: return "bad-request";
    case HttpFailure::Connect: return "connect";
    case HttpFailure::Tls: return "tls";
    case HttpFailure::Timeout: return "timeout";
    case HttpFailure::TooLarge: return "too-large";
    case HttpFailure::Protocol: return "protocol";
  }
  return "protocol";
}

struct HttpClient::Transfer {
  CURL* easy = nullptr;
  curl_slist* resolve = nullptr;
  curl_slist* connectTo = nullptr;
  curl_slist* headers = nullptr;
  std::string requestBody;  // POST: curl reads it in place (CURLOPT_POSTFIELDS)
  Callback cb;
  size_t maxBody = 0;
  bool tooLarge = false;
  std::string body;
  char errbuf[CURL_ERROR_SIZE] = {0};

  ~Transfer() {
    if (easy) curl_easy_cleanup(easy);
    curl_slist_free_all(resolve);
    curl_slist_free_all(connectTo);
    curl_slist_free_all(headers);
  }

  static size_t onData(char* data, size_t size, size_t n, void* self) {
    auto* t = static_cast<Transfer*>(self);
    const size_t len = size * n;
    if (t->body.size() + len > t->maxBody) {
      t->tooLarge = true;
      return 0;  // CURLE_WRITE_ERROR: the transfer ends here
    }
    t->body.append(data, len);
    return len;
  }
};

HttpClient::HttpClient(uv_loop_t* loop)
    : loop_(loop), multi_(nullptr), timer_(loop), later_(loop), alive_(std::make_shared<bool>(true)) {
  globalInit();
  CURLM* m = curl_multi_init();
  multi_ = m;
  curl_multi_setopt(m, CURLMOPT_SOCKETFUNCTION, &HttpClient::onSocket);
  curl_multi_setopt(m, CURLMOPT_SOCKETDATA, this);
  curl_multi_setopt(m, CURLMOPT_TIMERFUNCTION, &HttpClient::onTimer);
  curl_multi_setopt(m, CURLMOPT_TIMERDATA, this);
}

HttpClient::~HttpClient() {
  *alive_ = false;
  auto* m = static_cast<CURLM*>(multi_);
  // Cancel: no callback runs. Removing a handle may call onSocket (REMOVE), which only
  // erases polls; the polls left are closed with the map.
  for (auto& [easy, t] : transfers_) curl_multi_remove_handle(m, t->easy);
  transfers_.clear();
  curl_multi_cleanup(m);
  polls_.clear();
}

void HttpClient::failLater(Callback cb, HttpFailure f, std::string error) {
  HttpResult r;
  r.failure = f;
  r.error = std::move(error);
  early_.emplace_back(std::move(cb), std::move(r));
  later_.start(std::chrono::milliseconds(0), [this] {
    auto done = std::move(early_);
    early_.clear();
    deliver(std::move(done));
  });
}

void HttpClient::get(const std::string& url, const HttpGetOptions& o, Callback cb) {
  start(url, o, nullptr, std::move(cb));
}

void HttpClient::post(const std::string& url, const HttpGetOptions& o, HttpPostBody post, Callback cb) {
  auto clean = [](const std::string& v) { return v.find_first_of("\r\n") == std::string::npos; };
  bool ok = clean(post.contentType);
  for (const auto& [name, value] : post.headers)
    ok = ok && clean(name) && clean(value) && !name.empty() && name.find(':') == std::string::npos;
  if (!ok) return failLater(std::move(cb), HttpFailure::BadRequest, "header with CR, LF or a bad name");
  start(url, o, &post, std::move(cb));
}

void HttpClient::start(const std::string& url, const HttpGetOptions& o, HttpPostBody* post, Callback cb) {
  std::string host;
  uint16_t port = 0;
  if (!splitUrl(url, &host, &port)) return failLater(std::move(cb), HttpFailure::BadRequest, "not an https URL: " + url);
  if (o.addresses.empty()) return failLater(std::move(cb), HttpFailure::BadRequest, "no addresses for " + host);

  auto t = std::make_unique<Transfer>();
  t->easy = curl_easy_init();
  if (t->easy == nullptr) return failLater(std::move(cb), HttpFailure::Protocol, "curl_easy_init failed");
  t->cb = std::move(cb);
  t->maxBody = o.maxBodyBytes;

  // The addresses the caller resolved, as "host:port:addr,addr" (IPv6 in brackets). With
  // connectPort, CONNECT_TO sends host:port's connection to host:connectPort, which is
  // then found in the same RESOLVE list: curl never asks DNS.
  const uint16_t target = o.connectPort != 0 ? o.connectPort : port;
  std::string entry = host + ":" + std::to_string(target) + ":";
  for (size_t i = 0; i < o.addresses.size(); ++i) {
    const auto& a = o.addresses[i];
    entry += (i ? "," : "") + (a.find(':') != std::string::npos ? "[" + a + "]" : a);
  }
  t->resolve = curl_slist_append(nullptr, entry.c_str());
  if (o.connectPort != 0 && o.connectPort != port) {
    const std::string ct = host + ":" + std::to_string(port) + ":" + host + ":" + std::to_string(o.connectPort);
    t->connectTo = curl_slist_append(nullptr, ct.c_str());
  }

  CURL* e = t->easy;
  curl_easy_setopt(e, CURLOPT_URL, url.c_str());
  curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "https");
  curl_easy_setopt(e, CURLOPT_REDIR_PROTOCOLS_STR, "https");
  curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);  // RFC 8461 3.3: MUST NOT follow
  curl_easy_setopt(e, CURLOPT_RESOLVE, t->resolve);
  if (t->connectTo) curl_easy_setopt(e, CURLOPT_CONNECT_TO, t->connectTo);
  curl_easy_setopt(e, CURLOPT_PROXY, "");  // no proxy from the environment
  curl_easy_setopt(e, CURLOPT_NOPROXY, "*");
  curl_easy_setopt(e, CURLOPT_SSLVERSION, static_cast<long>(CURL_SSLVERSION_TLSv1_2));
  curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L);
  curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L);
  if (!o.caFile.empty()) {
    curl_easy_setopt(e, CURLOPT_CAINFO, o.caFile.c_str());
    curl_easy_setopt(e, CURLOPT_CAPATH, nullptr);
  }
  curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, static_cast<long>(o.timeout.count()));
  curl_easy_setopt(e, CURLOPT_MAXFILESIZE_LARGE, static_cast<curl_off_t>(o.maxBodyBytes));
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  // By default one request per connection: a kept-alive connection would stay polled (and
  // keep the loop alive) after its transfer, and a policy is fetched once a day at most.
  curl_easy_setopt(e, CURLOPT_FORBID_REUSE, o.reuseConnection ? 0L : 1L);
  if (post) {
    t->requestBody = std::move(post->body);
    curl_easy_setopt(e, CURLOPT_POST, 1L);
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(t->requestBody.size()));
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, t->requestBody.data());
    t->headers = curl_slist_append(t->headers, ("Content-Type: " + post->contentType).c_str());
    t->headers = curl_slist_append(t->headers, "Expect:");  // no 100-continue round trip
    for (const auto& [name, value] : post->headers)
      t->headers = curl_slist_append(t->headers, (name + ": " + value).c_str());
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, t->headers);
  }
  curl_easy_setopt(e, CURLOPT_USERAGENT, "subrelay");
  curl_easy_setopt(e, CURLOPT_ACCEPT_ENCODING, nullptr);  // bodies as sent: the cap is on real bytes
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, &Transfer::onData);
  curl_easy_setopt(e, CURLOPT_WRITEDATA, t.get());
  curl_easy_setopt(e, CURLOPT_ERRORBUFFER, t->errbuf);
  curl_easy_setopt(e, CURLOPT_PRIVATE, t.get());

  // curl_multi_add_handle only arms the timer (onTimer); nothing completes in here.
  if (CURLMcode mc = curl_multi_add_handle(static_cast<CURLM*>(multi_), e); mc != CURLM_OK) {
    Callback back = std::move(t->cb);
    return failLater(std::move(back), HttpFailure::Protocol, curl_multi_strerror(mc));
  }
  transfers_.emplace(e, std::move(t));
}

int HttpClient::onSocket(void* /*easy*/, int fd, int what, void* selfp, void* /*socketp*/) {
  auto* self = static_cast<HttpClient*>(selfp);
  if (what == CURL_POLL_REMOVE) {
    self->polls_.erase(fd);  // before curl closes the socket
    return 0;
  }
  auto& p = self->polls_[fd];
  if (!p) p = std::make_unique<SocketPoll>(self->loop_, fd);
  int events = 0;
  if (what == CURL_POLL_IN || what == CURL_POLL_INOUT) events |= UV_READABLE;
  if (what == CURL_POLL_OUT || what == CURL_POLL_INOUT) events |= UV_WRITABLE;
  int rc = p->start(events, [self, fd](int status, int ev) {
    int flags = 0;
    if (status < 0) {
      flags = CURL_CSELECT_ERR;
    } else {
      if (ev & UV_READABLE) flags |= CURL_CSELECT_IN;
      if (ev & UV_WRITABLE) flags |= CURL_CSELECT_OUT;
    }
    self->socketAction(fd, flags);
  });
  return rc == 0 ? 0 : -1;  // -1 makes curl fail the transfer
}

int HttpClient::onTimer(void* /*multi*/, long timeoutMs, void* selfp) {
  auto* self = static_cast<HttpClient*>(selfp);
  if (timeoutMs < 0) {
    self->timer_.stop();
  } else {
    // Also for 0: curl must not be called back from inside its own callback.
    self->timer_.start(std::chrono::milliseconds(timeoutMs), [self] { self->socketAction(CURL_SOCKET_TIMEOUT, 0); });
  }
  return 0;
}

void HttpClient::socketAction(int fd, int flags) {
  int running = 0;
  curl_multi_socket_action(static_cast<CURLM*>(multi_), fd, flags, &running);
  collectDone();
}

void HttpClient::collectDone() {
  auto* m = static_cast<CURLM*>(multi_);
  std::vector<std::pair<Callback, HttpResult>> done;
  int left = 0;
  while (CURLMsg* msg = curl_multi_info_read(m, &left)) {
    if (msg->msg != CURLMSG_DONE) continue;
    CURL* e = msg->easy_handle;
    const CURLcode rc = msg->data.result;
    auto it = transfers_.find(e);
    if (it == transfers_.end()) continue;
    Transfer& t = *it->second;
    HttpResult r;
    r.failure = classify(rc);
    if (t.tooLarge || rc == CURLE_FILESIZE_EXCEEDED) {
      r.failure = HttpFailure::TooLarge;
      r.error = "body larger than " + std::to_string(t.maxBody) + " bytes";
    } else if (rc != CURLE_OK) {
      r.error = t.errbuf[0] ? t.errbuf : curl_easy_strerror(rc);
    }
    char* ip = nullptr;
    if (curl_easy_getinfo(e, CURLINFO_PRIMARY_IP, &ip) == CURLE_OK && ip) r.remoteAddress = ip;
    if (r.ok()) {
      curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &r.status);
      char* ct = nullptr;
      if (curl_easy_getinfo(e, CURLINFO_CONTENT_TYPE, &ct) == CURLE_OK && ct) r.contentType = ct;
      r.body = std::move(t.body);
    }
    curl_multi_remove_handle(m, e);
    done.emplace_back(std::move(t.cb), std::move(r));
    transfers_.erase(it);
  }
  if (!done.empty()) deliver(std::move(done));
}

void HttpClient::deliver(std::vector<std::pair<Callback, HttpResult>> done) {
  // A callback may destroy this client (then the rest are dropped, as for a cancel) or
  // start another get().
  std::weak_ptr<bool> alive = alive_;
  for (auto& [cb, r] : done) {
    auto guard = alive.lock();
    if (!guard || !*guard) return;
    if (cb) cb(std::move(r));
  }
}

}  // namespace subrelay::net
