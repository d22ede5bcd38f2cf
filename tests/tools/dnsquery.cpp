// subrelay-dnsquery: one lookup through dns::UvResolver, printed as one JSON line, so the
// integration tests (tests/integration/test_dns.py) drive the real resolver against unbound.
//
//   subrelay-dnsquery [--server host:port]... [--timeout-ms N] [--attempts N] [--dnssec-ok] NAME TYPE
//
// TLSA records print as "usage selector matching-type hex" (RFC 6698 2.2), and
// "authenticated" is the resolver's AD bit over the whole answer (test_dnssec.py).
// Without --server the servers come from /etc/resolv.conf (resolv_conf.h). Exit 0 when a
// lookup was made (whatever its status), 2 on bad usage.
#include <uv.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "dns/codec.h"
#include "dns/resolv_conf.h"
#include "dns/uv_resolver.h"
#include "util/clock.h"
#include "util/json_writer.h"

using namespace subrelay;

namespace {

int usage(const char* msg) {
  std::fprintf(stderr,
               "subrelay-dnsquery: %s\n"
               "usage: subrelay-dnsquery [--server host:port]... [--timeout-ms N] [--attempts N] [--dnssec-ok] NAME "
               "TYPE\n",
               msg);
  return 2;
}

std::string jsonString(std::string_view s) {
  std::string out;
  util::jsonEscapeTo(out, s);
  return out;
}

std::string answerJson(const dns::Answer& a, const dns::UvResolver::Stats& st) {
  std::string mx = "[";
  for (size_t i = 0; i < a.mx.size(); ++i) {
    util::JsonObject o;
    o.num("preference", a.mx[i].preference).str("exchange", a.mx[i].exchange);
    mx += (i ? "," : "") + o.finish();
  }
  mx += "]";
  auto list = [](const std::vector<std::string>& v) {
    std::string out = "[";
    for (size_t i = 0; i < v.size(); ++i) out += (i ? "," : "") + jsonString(v[i]);
    return out + "]";
  };
  std::string tlsa = "[";
  for (size_t i = 0; i < a.tlsa.size(); ++i) {
    const auto& t = a.tlsa[i];
    std::string text = std::to_string(t.usage) + " " + std::to_string(t.selector) + " " + std::to_string(t.matchingType) + " ";
    static const char kHex[] = "0123456789abcdef";
    for (uint8_t b : t.data) {
      text += kHex[b >> 4];
      text += kHex[b & 15];
    }
    tlsa += (i ? "," : "") + jsonString(text);
  }
  tlsa += "]";
  util::JsonObject o;
  o.str("status", dns::statusName(a.status))
      .str("name", a.name)
      .str("canonical_name", a.canonicalName)
      .str("type", dns::typeName(a.type))
      .num("ttl", a.ttl)
      .raw("mx", mx)
      .raw("addresses", list(a.addresses))
      .raw("texts", list(a.texts))
      .raw("tlsa", tlsa)
      .raw("authenticated", a.authenticated ? "true" : "false")
      .str("detail", a.detail);
  util::JsonObject stats;  // how the answer was obtained (the TC -> TCP test reads it)
  stats.num("udp_queries", static_cast<int64_t>(st.udpQueries))
      .num("tcp_queries", static_cast<int64_t>(st.tcpQueries))
      .num("ignored_packets", static_cast<int64_t>(st.ignoredPackets));
  o.raw("stats", stats.finish());
  return o.finish();
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> servers;
  long timeoutMs = 2000;
  long attempts = 2;
  std::vector<std::string> positional;
  bool dnssecOk = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--dnssec-ok") {
      dnssecOk = true;
    } else if ((arg == "--server" || arg == "--timeout-ms" || arg == "--attempts") && i + 1 < argc) {
      const std::string v = argv[++i];
      if (arg == "--server") {
        servers.push_back(v);
      } else {
        char* end = nullptr;
        const long n = std::strtol(v.c_str(), &end, 10);
        if (end == v.c_str() || *end != 0 || n <= 0 || n > 600000) return usage(("bad " + arg).c_str());
        (arg == "--timeout-ms" ? timeoutMs : attempts) = n;
      }
    } else if (arg == "-h" || arg == "--help") {
      return usage("help");
    } else if (!arg.empty() && arg[0] == '-') {
      return usage(("unknown option " + arg).c_str());
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() != 2) return usage("expected NAME TYPE");
  auto type = dns::parseTypeName(positional[1]);
  if (!type) return usage("TYPE must be A, AAAA, MX, CNAME, TXT or TLSA");
  auto chosen = dns::chooseServers(servers);
  if (!chosen) return usage(chosen.error().message.c_str());

  uv_loop_t loop;
  uv_loop_init(&loop);
  util::SystemClock clock;
  std::string line;
  {
    dns::UvResolver resolver(&loop, std::move(*chosen), clock, std::chrono::milliseconds(timeoutMs),
                             static_cast<int>(attempts));
    resolver.setDnssecOk(dnssecOk);
    resolver.query(positional[0], *type, [&](const dns::Answer& a) { line = answerJson(a, resolver.stats()); });
    uv_run(&loop, UV_RUN_DEFAULT);
  }
  uv_run(&loop, UV_RUN_DEFAULT);  // close callbacks of the resolver's handles
  uv_loop_close(&loop);
  std::printf("%s\n", line.c_str());
  return line.empty() ? 1 : 0;
}
