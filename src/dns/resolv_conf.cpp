// Server lists from configuration and resolv.conf (see resolv_conf.h).
#include "dns/resolv_conf.h"

#include <arpa/inet.h>

#include <charconv>
#include <fstream>
#include <sstream>

namespace subrelay::dns {

namespace {

bool isV4(const std::string& s) {
  in_addr a{};
  return inet_pton(AF_INET, s.c_str(), &a) == 1;
}

bool isV6(const std::string& s) {
  in6_addr a{};
  return inet_pton(AF_INET6, s.c_str(), &a) == 1;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

bool parsePort(std::string_view s, uint16_t& port) {
  unsigned v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || p != s.data() + s.size() || v == 0 || v > 65535) return false;
  port = static_cast<uint16_t>(v);
  return true;
}

}  // namespace

std::string ServerAddress::toString() const {
  return (ipv6 ? "[" + address + "]" : address) + ":" + std::to_string(port);
}

util::Result<ServerAddress> parseServerAddress(std::string_view text) {
  const std::string_view t = trim(text);
  ServerAddress s;
  auto bad = [&](const char* why) { return util::makeError("bad DNS server \"" + std::string(text) + "\": " + why); };
  if (t.empty()) return bad("empty");
  std::string host;
  if (t.front() == '[') {
    const size_t close = t.find(']');
    if (close == std::string_view::npos) return bad("missing ']'");
    host = std::string(t.substr(1, close - 1));
    const std::string_view rest = t.substr(close + 1);
    if (!rest.empty()) {
      if (rest.front() != ':' || !parsePort(rest.substr(1), s.port)) return bad("expected ]:port");
    }
    if (!isV6(host)) return bad("not an IPv6 address");
    s.ipv6 = true;
  } else if (t.find(':') != t.rfind(':')) {  // two or more colons: a bare IPv6 address
    host = std::string(t);
    if (!isV6(host)) return bad("not an IPv6 address (use [addr]:port with a port)");
    s.ipv6 = true;
  } else {
    const size_t colon = t.find(':');
    host = std::string(t.substr(0, colon));
    if (colon != std::string_view::npos && !parsePort(t.substr(colon + 1), s.port)) return bad("bad port");
    if (!isV4(host)) return bad("not an IP address (host names are not accepted)");
  }
  s.address = std::move(host);
  return s;
}

util::Result<std::vector<ServerAddress>> parseServerList(const std::vector<std::string>& entries) {
  std::vector<ServerAddress> out;
  for (const auto& e : entries) {
    auto s = parseServerAddress(e);
    if (!s) return s.error();
    out.push_back(std::move(*s));
  }
  return out;
}

std::vector<ServerAddress> parseResolvConf(std::string_view text) {
  std::vector<ServerAddress> out;
  while (!text.empty()) {
    const size_t nl = text.find('\n');
    std::string_view line = text.substr(0, nl);
    text = nl == std::string_view::npos ? std::string_view{} : text.substr(nl + 1);
    if (const size_t c = line.find_first_of("#;"); c != std::string_view::npos) line = line.substr(0, c);
    line = trim(line);
    constexpr std::string_view kKey = "nameserver";
    if (line.substr(0, kKey.size()) != kKey || line.size() == kKey.size()) continue;
    if (line[kKey.size()] != ' ' && line[kKey.size()] != '\t') continue;
    std::string_view addr = trim(line.substr(kKey.size()));
    if (const size_t sp = addr.find_first_of(" \t"); sp != std::string_view::npos) addr = addr.substr(0, sp);
    const std::string a(addr);
    if (isV4(a)) {
      out.push_back(ServerAddress{a, 53, false});
    } else if (isV6(a)) {
      out.push_back(ServerAddress{a, 53, true});
    }
    // Anything else (a scoped fe80::1%eth0, a typo) is skipped, as glibc does.
  }
  return out;
}

std::vector<ServerAddress> loadResolvConf(const std::string& path) {
  std::ifstream f(path);
  std::vector<ServerAddress> out;
  if (f) {
    std::stringstream ss;
    ss << f.rdbuf();
    out = parseResolvConf(ss.str());
  }
  if (out.empty()) out.push_back(ServerAddress{"127.0.0.1", 53, false});
  return out;
}

util::Result<std::vector<ServerAddress>> chooseServers(const std::vector<std::string>& configured,
                                                       const std::string& resolvConfPath) {
  if (!configured.empty()) return parseServerList(configured);
  return loadResolvConf(resolvConfPath);
}

}  // namespace subrelay::dns
