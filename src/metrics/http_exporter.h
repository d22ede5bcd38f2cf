// The metrics HTTP listener (metrics.address): GET /metrics (Prometheus text, or
// OpenMetrics when the Accept header asks for it), /healthz (the process answers) and
// /readyz (listeners bound and the queue writable). libmicrohttpd serves it from its own
// thread, so a slow scraper never touches an SMTP event loop; the request decisions are
// route() below, free of I/O.
//
// Bounds: 32 connections in all, 8 per client address, 16 KiB of request memory per
// connection (longer request headers are refused by libmicrohttpd), 10 s without
// progress closes a connection. Only GET and HEAD; the body of a request is never read.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "metrics/registry.h"
#include "util/result.h"

struct MHD_Daemon;

namespace subrelay::metrics {

struct HttpRequest {
  std::string_view method;
  std::string_view path;
  std::string_view accept;  // the Accept header, "" when absent
};

struct HttpReply {
  unsigned status = 200;
  std::string contentType = "text/plain; charset=utf-8";
  std::string body;
  std::vector<std::pair<std::string, std::string>> headers;
};

struct Endpoints {
  std::function<std::string(Format)> metrics;
  // "" when ready, else why not (served with 503).
  std::function<std::string()> notReady;
};

// What to answer a request.
HttpReply route(const HttpRequest& req, const Endpoints& ep);

class HttpExporter {
 public:
  // Binds host:port (an IP literal) and starts serving. The error names the address and
  // the reason (in use, permission) so serve can say what to change.
  static util::Result<std::unique_ptr<HttpExporter>> start(const std::string& host, uint16_t port, Endpoints ep);
  ~HttpExporter();
  HttpExporter(const HttpExporter&) = delete;
  HttpExporter& operator=(const HttpExporter&) = delete;
  uint16_t port() const { return port_; }

 private:
  HttpExporter() = default;
  MHD_Daemon* daemon_ = nullptr;
  uint16_t port_ = 0;
  Endpoints ep_;
  friend struct ExporterAccess;
};

}  // namespace subrelay::metrics
