#include "metrics/http_exporter.h"

#include <arpa/inet.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace subrelay::metrics {

HttpReply route(const HttpRequest& req, const Endpoints& ep) {
  HttpReply r;
  if (req.method != "GET" && req.method != "HEAD") {
    r.status = 405;
    r.body = "only GET and HEAD\n";
    r.headers.emplace_back("Allow", "GET, HEAD");
    return r;
  }
  if (req.path == "/metrics") {
    // Prometheus asks for OpenMetrics first in its Accept header when it can read it.
    const Format f = req.accept.find("application/openmetrics-text") != std::string_view::npos ? Format::OpenMetrics
                                                                                             : Format::Prometheus;
    r.contentType = std::string(contentType(f));
    r.body = ep.metrics ? ep.metrics(f) : std::string();
    return r;
  }
  if (req.path == "/healthz") {
    r.body = "ok\n";
    return r;
  }
  if (req.path == "/readyz") {
    const std::string why = ep.notReady ? ep.notReady() : std::string();
    if (why.empty()) {
      r.body = "ready\n";
    } else {
      r.status = 503;
      r.body = "not ready: " + why + "\n";
    }
    return r;
  }
  r.status = 404;
  r.body = "not found; try /metrics, /healthz or /readyz\n";
  return r;
}

struct ExporterAccess {
  static MHD_Result handle(void* cls, MHD_Connection* conn, const char* url, const char* method, const char*,
                           const char*, size_t* uploadSize, void** state) {
    auto* self = static_cast<HttpExporter*>(cls);
    // The first call only announces the request; answer on the second, after any body
    // has been offered (and dropped: nothing here reads one).
    if (*state == nullptr) {
      *state = self;
      return MHD_YES;
    }
    *uploadSize = 0;
    const char* accept = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Accept");
    HttpRequest req{method ? method : "", url ? url : "", accept ? accept : ""};
    HttpReply r = route(req, self->ep_);
    MHD_Response* resp =
        MHD_create_response_from_buffer(r.body.size(), r.body.data(), MHD_RESPMEM_MUST_COPY);
    if (resp == nullptr) return MHD_NO;
    MHD_add_response_header(resp, "Content-Type", r.contentType.c_str());
    MHD_add_response_header(resp, "Cache-Control", "no-store");
    for (const auto& [k, v] : r.headers) MHD_add_response_header(resp, k.c_str(), v.c_str());
    MHD_Result ret = MHD_queue_response(conn, r.status, resp);
    MHD_destroy_response(resp);
    return ret;
  }
};

util::Result<std::unique_ptr<HttpExporter>> HttpExporter::start(const std::string& host, uint16_t port,
                                                                Endpoints ep) {
  const std::string where = (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" + std::to_string(port);
  sockaddr_storage ss{};
  socklen_t len = 0;
  const bool v6 = host.find(':') != std::string::npos;
  if (v6) {
    auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
    a->sin6_family = AF_INET6;
    a->sin6_port = htons(port);
    if (::inet_pton(AF_INET6, host.c_str(), &a->sin6_addr) != 1)
      return util::makeError("metrics.address " + where + " is not an IP address");
    len = sizeof *a;
  } else {
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    a->sin_family = AF_INET;
    a->sin_port = htons(port);
    const std::string h = host == "localhost" ? "127.0.0.1" : host;
    if (::inet_pton(AF_INET, h.c_str(), &a->sin_addr) != 1)
      return util::makeError("metrics.address " + where + " is not an IP address");
    len = sizeof *a;
  }
  // Our own socket: a bind error then has its errno, which libmicrohttpd would not say.
  int fd = ::socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return util::makeError("cannot create the metrics socket: " + std::string(std::strerror(errno)));
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (v6) ::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&ss), len) != 0 || ::listen(fd, 32) != 0) {
    const int e = errno;
    ::close(fd);
    std::string hint = e == EADDRINUSE ? " (another process listens there; change metrics.address)"
                       : e == EACCES   ? " (a port below 1024 needs privileges; pick a higher one)"
                                       : "";
    return util::makeError("cannot listen on " + where + " for metrics: " + std::strerror(e) + hint);
  }
  sockaddr_storage bound{};
  socklen_t blen = sizeof bound;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &blen);
  std::unique_ptr<HttpExporter> ex(new HttpExporter());
  ex->port_ = ntohs(v6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                       : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  ex->ep_ = std::move(ep);
  unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO;
  if (v6) flags |= MHD_USE_IPv6;
  ex->daemon_ = MHD_start_daemon(flags, ex->port_, nullptr, nullptr, &ExporterAccess::handle, ex.get(),
                                 MHD_OPTION_LISTEN_SOCKET, fd, MHD_OPTION_CONNECTION_LIMIT, 32u,
                                 MHD_OPTION_PER_IP_CONNECTION_LIMIT, 8u, MHD_OPTION_CONNECTION_TIMEOUT, 10u,
                                 MHD_OPTION_CONNECTION_MEMORY_LIMIT, static_cast<size_t>(16 * 1024), MHD_OPTION_END);
  if (ex->daemon_ == nullptr) {
    ::close(fd);
    return util::makeError("cannot start the metrics listener on " + where);
  }
  return ex;
}

HttpExporter::~HttpExporter() {
  if (daemon_) MHD_stop_daemon(daemon_);  // also closes the listening socket
}

}  // namespace subrelay::metrics
