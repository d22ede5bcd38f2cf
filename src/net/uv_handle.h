// The one place that knows how libuv handles die: uv_close() is asynchronous, so a
// handle's memory must outlive its close callback (h2o do_dispose_socket, uvw handle.hpp).
// closeHandle() clears `data` (callbacks ignore a handle whose data is null), calls
// uv_close, and frees the memory in the close callback. All libuv casts live here.
#pragma once

#include <uv.h>

#include <sys/socket.h>

#include <cstdint>
#include <string>

namespace subrelay::net {

// Handles are allocated with new T and released only through closeHandle().
template <typename T>
T* newHandle() {
  return new T{};
}

void closeHandleRaw(uv_handle_t* h, void (*deleter)(uv_handle_t*));

template <typename T>
void closeHandle(T* h) {
  if (h == nullptr) return;
  closeHandleRaw(reinterpret_cast<uv_handle_t*>(h), [](uv_handle_t* p) { delete reinterpret_cast<T*>(p); });
}

template <typename T>
uv_handle_t* asHandle(T* h) {
  return reinterpret_cast<uv_handle_t*>(h);
}
template <typename T>
uv_stream_t* asStream(T* h) {
  return reinterpret_cast<uv_stream_t*>(h);
}

// "1.2.3.4" / "::1" and a port as a sockaddr (AF_INET6 when `ipv6`); false when `ip` is
// not a literal of that family.
bool parseAddress(const std::string& ip, uint16_t port, bool ipv6, sockaddr_storage* out);
// The wildcard address ("0.0.0.0" / "::") of a family, port 0.
sockaddr_storage anyAddress(int family);
// libuv's text for one of its (negative) error codes.
std::string errorText(int status);

// "1.2.3.4" / "::1" and the port of a sockaddr.
std::string addressToString(const sockaddr* sa, uint16_t* port = nullptr);
bool isLoopbackAddress(const sockaddr* sa);

}  // namespace subrelay::net
