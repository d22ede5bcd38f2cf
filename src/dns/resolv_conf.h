// Which DNS servers to ask: delivery.resolvers from the configuration ("host:port",
// "[v6]:port", a bare address means port 53), else the "nameserver" lines of
// /etc/resolv.conf (resolv.conf(5): an address per line, IPv4 or IPv6; no entries means
// the server on the local machine).
//
// Only literal addresses: a resolver found by name would need a resolver. Scoped IPv6
// addresses (fe80::1%eth0) are skipped. The parsers are I/O-free; loadResolvConf reads a file.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "util/result.h"

namespace subrelay::dns {

struct ServerAddress {
  std::string address;  // literal, "127.0.0.1" / "::1"
  uint16_t port = 53;
  bool ipv6 = false;
  // "127.0.0.1:5353" / "[::1]:53"
  std::string toString() const;
  bool operator==(const ServerAddress&) const = default;
};

// "1.2.3.4", "1.2.3.4:5353", "::1", "[::1]", "[::1]:5353". Port 1..65535.
util::Result<ServerAddress> parseServerAddress(std::string_view text);

// Every entry of delivery.resolvers; the error names the entry that is wrong.
util::Result<std::vector<ServerAddress>> parseServerList(const std::vector<std::string>& entries);

// The nameserver lines of resolv.conf text, in order; comments ('#' or ';'), other
// options and unparsable addresses are ignored. At most 3 are used by glibc (MAXNS); we
// keep them all.
std::vector<ServerAddress> parseResolvConf(std::string_view text);

// Reads and parses path; an unreadable file or one without nameservers gives
// 127.0.0.1:53, as resolv.conf(5) specifies.
std::vector<ServerAddress> loadResolvConf(const std::string& path = "/etc/resolv.conf");

// delivery.resolvers when not empty (errors reported), else loadResolvConf(path).
util::Result<std::vector<ServerAddress>> chooseServers(const std::vector<std::string>& configured,
                                                       const std::string& resolvConfPath = "/etc/resolv.conf");

}  // namespace subrelay::dns
