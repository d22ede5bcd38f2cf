#include "net/uv_handle.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <cstring>

namespace subrelay::net {

namespace {
struct CloseData {
  void (*deleter)(uv_handle_t*);
};
}  // namespace

void closeHandleRaw(uv_handle_t* h, void (*deleter)(uv_handle_t*)) {
  if (uv_is_closing(h)) return;
  // The deleter travels in data; callbacks that still fire check for our marker type
  // through their own data pointers, which owners clear before calling this.
  h->data = new CloseData{deleter};
  uv_close(h, [](uv_handle_t* p) {
    auto* cd = static_cast<CloseData*>(p->data);
    auto del = cd->deleter;
    delete cd;
    p->data = nullptr;
    del(p);
  });
}

bool parseAddress(const std::string& ip, uint16_t port, bool ipv6, sockaddr_storage* out) {
  *out = sockaddr_storage{};
  int rc = ipv6 ? uv_ip6_addr(ip.c_str(), port, reinterpret_cast<sockaddr_in6*>(out))
                : uv_ip4_addr(ip.c_str(), port, reinterpret_cast<sockaddr_in*>(out));
  return rc == 0;
}

sockaddr_storage anyAddress(int family) {
  sockaddr_storage any{};
  if (family == AF_INET6) {
    uv_ip6_addr("::", 0, reinterpret_cast<sockaddr_in6*>(&any));
  } else {
    uv_ip4_addr("0.0.0.0", 0, reinterpret_cast<sockaddr_in*>(&any));
  }
  return any;
}

std::string errorText(int status) { return uv_strerror(status); }

std::string addressToString(const sockaddr* sa, uint16_t* port) {
  char buf[INET6_ADDRSTRLEN] = {0};
  if (sa->sa_family == AF_INET) {
    auto* in = reinterpret_cast<const sockaddr_in*>(sa);
    inet_ntop(AF_INET, &in->sin_addr, buf, sizeof buf);
    if (port) *port = ntohs(in->sin_port);
  } else if (sa->sa_family == AF_INET6) {
    auto* in6 = reinterpret_cast<const sockaddr_in6*>(sa);
    if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) {
      // Dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d; show them as IPv4.
      inet_ntop(AF_INET, &in6->sin6_addr.s6_addr[12], buf, sizeof buf);
    } else {
      inet_ntop(AF_INET6, &in6->sin6_addr, buf, sizeof buf);
    }
    if (port) *port = ntohs(in6->sin6_port);
  }
  return buf;
}

bool isLoopbackAddress(const sockaddr* sa) {
  if (sa->sa_family == AF_INET) {
    auto* in = reinterpret_cast<const sockaddr_in*>(sa);
    return (ntohl(in->sin_addr.s_addr) >> 24) == 127;
  }
  if (sa->sa_family == AF_INET6) {
    auto* in6 = reinterpret_cast<const sockaddr_in6*>(sa);
    if (IN6_IS_ADDR_LOOPBACK(&in6->sin6_addr)) return true;
    if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) return in6->sin6_addr.s6_addr[12] == 127;
  }
  return false;
}

}  // namespace subrelay::net
