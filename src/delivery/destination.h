// Destination policy: where delivery may connect. A tenant controls its recipients'
// domains (and so their MX and A records) and may write address literals: without this
// check it could make the relay connect to loopback, the provider's internal network, a
// link-local metadata service or the relay host itself. Addresses of those kinds are
// refused unless delivery.allow_private_destinations is set (test beds, internal relays).
//
// Refused kinds (IANA special-purpose registries, RFC 6890): unspecified (0.0.0.0/8, ::),
// loopback (127/8, ::1), private (RFC 1918 10/8, 172.16/12, 192.168/16; RFC 4193 fc00::/7),
// shared/CGNAT (RFC 6598 100.64/10), link-local (169.254/16, fe80::/10), multicast
// (224/4, ff00::/8), reserved (240/4, 255.255.255.255), and this host's own addresses.
// IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.
//
// Pure: the host's own addresses are given by the caller.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "delivery/routing.h"

namespace subrelay::delivery {

enum class AddressKind { Public, Unspecified, Loopback, Private, SharedCgnat, LinkLocal, Multicast, Reserved, Own, Invalid };

// "loopback", "private (RFC 1918)", ... for logs and DSN texts.
std::string_view describe(AddressKind k);

// ip: a numeric IPv4 or IPv6 address (brackets and an "IPv6:" tag are tolerated).
AddressKind classifyAddress(std::string_view ip, const std::vector<std::string>& ownAddresses = {});

struct DestinationPolicy {
  bool allowPrivate = false;
  std::vector<std::string> ownAddresses;  // this host's interface addresses (canonical text)
};

// Removes the addresses the policy refuses from every host of an Ok route. When none is
// left, the route becomes a permanent failure "5.4.4" naming what was refused (a DSN tells
// the sender; retrying cannot help, the DNS says so). Failed routes pass unchanged.
Route applyDestinationPolicy(Route route, const DestinationPolicy& policy);

// True when the domain part of a recipient is an address literal ("[192.0.2.1]",
// "[IPv6:...]"): refused at RCPT unless private destinations are allowed.
bool isAddressLiteralDomain(std::string_view domain);

}  // namespace subrelay::delivery
