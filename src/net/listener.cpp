#include "net/listener.h"

#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "net/uv_handle.h"

namespace subrelay::net {

Listener::Listener(uv_loop_t* loop, AcceptFn onAccept) : loop_(loop), onAccept_(std::move(onAccept)) {}

Listener::~Listener() { close(); }

util::Result<void> Listener::checkAddressFree(const std::string& host, uint16_t port) {
  if (port == 0) return {};
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string portStr = std::to_string(port);
  int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), portStr.c_str(), &hints, &res);
  if (rc != 0) return util::makeError("cannot resolve listen address " + host + ": " + gai_strerror(rc));
  int fd = ::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    freeaddrinfo(res);
    return util::makeError(std::string("socket: ") + std::strerror(errno));
  }
  int one = 1;
  // SO_REUSEADDR only: a port in TIME_WAIT after our own restart is free; one that a
  // socket listens on is not.
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (res->ai_family == AF_INET6) {
    int zero = 0;
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
  }
  const int b = ::bind(fd, res->ai_addr, res->ai_addrlen);
  const int err = errno;
  freeaddrinfo(res);
  ::close(fd);
  if (b == 0) return {};
  const std::string where = (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" + portStr;
  if (err == EADDRINUSE)
    return util::makeError("cannot listen on " + where +
                           ": another process is listening there (Address already in use); stop it or choose "
                           "another listeners[].address");
  return util::makeError("cannot listen on " + where + ": " + std::strerror(err) +
                         (err == EACCES ? " (ports below 1024 need root or CAP_NET_BIND_SERVICE)" : ""));
}

util::Result<void> Listener::listen(const std::string& host, uint16_t port, int backlog) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  std::string portStr = std::to_string(port);
  int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), portStr.c_str(), &hints, &res);
  if (rc != 0) return util::makeError("cannot resolve listen address " + host + ": " + gai_strerror(rc));
  int fd = ::socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    freeaddrinfo(res);
    return util::makeError(std::string("socket: ") + std::strerror(errno));
  }
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
  if (res->ai_family == AF_INET6) {
    // "[::]:587" serves IPv4 too, as administrators expect from a wildcard address.
    int zero = 0;
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
  }
  if (::bind(fd, res->ai_addr, res->ai_addrlen) != 0) {
    int err = errno;
    freeaddrinfo(res);
    ::close(fd);
    return util::makeError("cannot listen on " + host + ":" + portStr + ": " + std::strerror(err) +
                           (err == EADDRINUSE ? " (another process holds the port)" : "") +
                           (err == EACCES ? " (ports below 1024 need root or CAP_NET_BIND_SERVICE)" : ""));
  }
  freeaddrinfo(res);
  sockaddr_storage ss{};
  socklen_t sl = sizeof ss;
  getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &sl);
  addressToString(reinterpret_cast<sockaddr*>(&ss), &port_);

  tcp_ = newHandle<uv_tcp_t>();
  uv_tcp_init(loop_, tcp_);
  tcp_->data = this;
  if (int e = uv_tcp_open(tcp_, fd); e != 0) {
    ::close(fd);
    closeHandle(tcp_);
    tcp_ = nullptr;
    return util::makeError(std::string("uv_tcp_open: ") + uv_strerror(e));
  }
  int e = uv_listen(asStream(tcp_), backlog, [](uv_stream_t* server, int status) {
    auto* self = static_cast<Listener*>(server->data);
    if (self == nullptr || status < 0) return;
    self->onAccept_(server);
  });
  if (e != 0) {
    closeHandle(tcp_);
    tcp_ = nullptr;
    return util::makeError("cannot listen on " + host + ":" + portStr + ": " + uv_strerror(e));
  }
  return {};
}

void Listener::close() {
  if (tcp_) {
    tcp_->data = nullptr;
    closeHandle(tcp_);
    tcp_ = nullptr;
  }
}

std::vector<std::string> hostAddresses() {
  std::vector<std::string> out;
  uv_interface_address_t* ifs = nullptr;
  int n = 0;
  if (uv_interface_addresses(&ifs, &n) != 0) return out;
  for (int i = 0; i < n; ++i) {
    char buf[64] = {0};
    if (ifs[i].address.address4.sin_family == AF_INET)
      uv_ip4_name(&ifs[i].address.address4, buf, sizeof buf);
    else
      uv_ip6_name(&ifs[i].address.address6, buf, sizeof buf);
    if (buf[0] != '\0') out.emplace_back(buf);
  }
  uv_free_interface_addresses(ifs, n);
  return out;
}

}  // namespace subrelay::net
