// Destination policy (destination.h).
#include "delivery/destination.h"

#include <arpa/inet.h>

#include <algorithm>
#include <array>
#include <cstring>

namespace subrelay::delivery {

namespace {

bool inV4(uint32_t a, uint32_t net, int bits) {
  const uint32_t mask = bits == 0 ? 0 : ~uint32_t{0} << (32 - bits);
  return (a & mask) == (net & mask);
}

constexpr uint32_t v4(unsigned a, unsigned b, unsigned c, unsigned d) { return (a << 24) | (b << 16) | (c << 8) | d; }

AddressKind classifyV4(uint32_t a) {
  if (inV4(a, v4(0, 0, 0, 0), 8)) return AddressKind::Unspecified;
  if (inV4(a, v4(127, 0, 0, 0), 8)) return AddressKind::Loopback;
  if (inV4(a, v4(10, 0, 0, 0), 8) || inV4(a, v4(172, 16, 0, 0), 12) || inV4(a, v4(192, 168, 0, 0), 16))
    return AddressKind::Private;
  if (inV4(a, v4(100, 64, 0, 0), 10)) return AddressKind::SharedCgnat;
  if (inV4(a, v4(169, 254, 0, 0), 16)) return AddressKind::LinkLocal;
  if (inV4(a, v4(224, 0, 0, 0), 4)) return AddressKind::Multicast;
  if (inV4(a, v4(240, 0, 0, 0), 4)) return AddressKind::Reserved;  // includes 255.255.255.255
  return AddressKind::Public;
}

std::string strip(std::string_view ip) {
  std::string s(ip);
  if (s.size() >= 2 && s.front() == '[' && s.back() == ']') s = s.substr(1, s.size() - 2);
  if (s.size() > 5 && (s.compare(0, 5, "IPv6:") == 0 || s.compare(0, 5, "ipv6:") == 0)) s = s.substr(5);
  if (auto pct = s.find('%'); pct != std::string::npos) s.resize(pct);
  return s;
}

// Canonical text of an address, so "::ffff:127.0.0.1", "0:0::1" etc. compare.
std::string canonical(const std::string& s) {
  std::array<unsigned char, 16> b{};
  char buf[INET6_ADDRSTRLEN];
  if (inet_pton(AF_INET, s.c_str(), b.data()) == 1) return inet_ntop(AF_INET, b.data(), buf, sizeof buf) ? buf : s;
  if (inet_pton(AF_INET6, s.c_str(), b.data()) == 1) return inet_ntop(AF_INET6, b.data(), buf, sizeof buf) ? buf : s;
  return s;
}

}  // namespace

std::string_view describe(AddressKind k) {
  switch (k) {
    case AddressKind::Public: return "public";
    case AddressKind::Unspecified: return "unspecified";
    case AddressKind::Loopback: return "loopback";
    case AddressKind::Private: return "private";
    case AddressKind::SharedCgnat: return "shared (CGNAT)";
    case AddressKind::LinkLocal: return "link-local";
    case AddressKind::Multicast: return "multicast";
    case AddressKind::Reserved: return "reserved";
    case AddressKind::Own: return "this host's own";
    case AddressKind::Invalid: return "invalid";
  }
  return "?";
}

AddressKind classifyAddress(std::string_view ipText, const std::vector<std::string>& own) {
  const std::string ip = strip(ipText);
  std::array<unsigned char, 16> b{};
  AddressKind kind;
  if (inet_pton(AF_INET, ip.c_str(), b.data()) == 1) {
    kind = classifyV4((uint32_t{b[0]} << 24) | (uint32_t{b[1]} << 16) | (uint32_t{b[2]} << 8) | b[3]);
  } else if (inet_pton(AF_INET6, ip.c_str(), b.data()) == 1) {
    static constexpr std::array<unsigned char, 12> kMapped{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    static constexpr std::array<unsigned char, 16> kZero{};
    if (std::memcmp(b.data(), kMapped.data(), 12) == 0) {
      kind = classifyV4((uint32_t{b[12]} << 24) | (uint32_t{b[13]} << 16) | (uint32_t{b[14]} << 8) | b[15]);
    } else if (b == kZero) {
      kind = AddressKind::Unspecified;
    } else if (std::all_of(b.begin(), b.begin() + 15, [](unsigned char x) { return x == 0; }) && b[15] == 1) {
      kind = AddressKind::Loopback;
    } else if ((b[0] & 0xfe) == 0xfc) {
      kind = AddressKind::Private;  // fc00::/7 unique local (RFC 4193)
    } else if (b[0] == 0xfe && (b[1] & 0xc0) == 0x80) {
      kind = AddressKind::LinkLocal;  // fe80::/10
    } else if (b[0] == 0xff) {
      kind = AddressKind::Multicast;
    } else {
      kind = AddressKind::Public;
    }
  } else {
    return AddressKind::Invalid;
  }
  if (kind == AddressKind::Public) {
    const std::string c = canonical(ip);
    for (const auto& o : own)
      if (canonical(strip(o)) == c) return AddressKind::Own;
  }
  return kind;
}

Route applyDestinationPolicy(Route route, const DestinationPolicy& policy) {
  if (policy.allowPrivate || route.status != RouteStatus::Ok) return route;
  std::string refused;  // "mx.example [10.0.0.5] private", for the DSN
  size_t left = 0;
  for (auto& host : route.hosts) {
    std::vector<std::string> keep;
    for (auto& a : host.addresses) {
      AddressKind k = classifyAddress(a, policy.ownAddresses);
      if (k == AddressKind::Public) {
        keep.push_back(std::move(a));
        continue;
      }
      if (refused.empty()) refused = host.name + " [" + a + "] is a " + std::string(describe(k)) + " address";
    }
    if (keep.empty() && !host.addresses.empty()) host.lookupError = "only non-public addresses";
    host.addresses = std::move(keep);
    left += host.addresses.size();
  }
  if (left == 0) {
    route.status = RouteStatus::PermFail;
    route.enhanced = "5.4.4";
    route.detail = "No allowed destination: " + (refused.empty() ? std::string("no address") : refused) +
                   " (delivery.allow_private_destinations is off)";
  }
  return route;
}

bool isAddressLiteralDomain(std::string_view domain) {
  return domain.size() >= 2 && domain.front() == '[' && domain.back() == ']';
}

}  // namespace subrelay::delivery
