// UvResolver: the real dns::Resolver. Packets from codec.h, I/O on the caller's libuv loop.
//
// Per lookup (RFC 1035 4.2, RFC 5452 defences, RFC 7766):
//  - one fresh UDP socket per try, connected to the server (so the kernel picks a random
//    source port and drops datagrams from anyone else), a 16-bit ID from getrandom(2), an
//    EDNS0 OPT record (RFC 6891) advertising 1232 bytes;
//  - a datagram whose ID, QR bit or question does not match is ignored and we keep waiting;
//  - TC=1: the same question to the same server over TCP with the 2-byte length prefix
//    (RFC 1035 4.2.2, RFC 7766 5);
//  - timeout, REFUSED, SERVFAIL, another RCODE or garbage: the next server; `attempts`
//    rounds over the server list;
//  - an answer that ends in a CNAME without the target's records: the target is asked for
//    (RFC 1034 3.6.2), at most kMaxCnameHops times, loops are an error;
//  - identical lookups in flight share one query; answers go to a Cache (cache.h);
//  - DNSSEC: every query has AD=1 (codec.h QueryOptions), DO=1 after setDnssecOk(true); an
//    answer is `authenticated` only when every response it was built from had AD=1 (a
//    CNAME followed over two queries needs AD on both).
// Callbacks run on the loop, never inside query() (cache hits are queued to a 0 ms timer).
// Destroying the resolver closes everything at once: no callback runs afterwards. The loop
// must be run once more to free the closed handles, as with every libuv handle (net/uv_handle.h).
//
// Not here: packet encoding (codec.h), routing decisions (delivery/routing.h).
#pragma once

#include <sys/socket.h>
#include <uv.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "dns/cache.h"
#include "dns/codec.h"
#include "dns/resolv_conf.h"
#include "dns/resolver.h"
#include "net/uv_timer.h"
#include "util/clock.h"

namespace subrelay::dns {

class UvResolver final : public Resolver {
 public:
  struct Stats {
    uint64_t udpQueries = 0;
    uint64_t tcpQueries = 0;
    uint64_t ignoredPackets = 0;  // wrong ID / question / not a response
    uint64_t cacheHits = 0;
    uint64_t coalesced = 0;
  };

  // timeout: per try (UDP, or the TCP retry); attempts: rounds over `servers`.
  UvResolver(uv_loop_t* loop, std::vector<ServerAddress> servers, const util::Clock& clock,
             std::chrono::milliseconds timeout = std::chrono::seconds(2), int attempts = 2,
             CacheLimits cacheLimits = {});
  ~UvResolver() override;
  UvResolver(const UvResolver&) = delete;
  UvResolver& operator=(const UvResolver&) = delete;

  void query(const std::string& name, QType type, Callback cb) override;

  // Also set DO (RFC 3225) in queries from now on, for resolvers that report AD only then.
  void setDnssecOk(bool on) { queryOptions_.dnssecOk = on; }

  size_t inFlight() const { return lookups_.size(); }
  const Stats& stats() const { return stats_; }
  Cache& cache() { return cache_; }
  const std::vector<ServerAddress>& servers() const { return servers_; }

 private:
  struct Lookup;
  struct Target {
    sockaddr_storage addr{};
    std::string label;  // "127.0.0.1:5353"
  };
  using Key = std::pair<std::string, uint16_t>;

  void startAttempt(Lookup& l);
  void startTcp(Lookup& l);
  void closeTransport(Lookup& l);
  // Returns false when the lookup moved on (finished, or next try): stop using the transport.
  bool handlePacket(Lookup& l, std::string_view packet, bool overTcp);
  void attemptFailed(Lookup& l, Status status, std::string detail, int rank);
  void finish(Lookup& l, Answer answer);
  void deliverLater(Callback cb, Answer answer);
  void deliverPending();

  void onUdpRead(Lookup& l, int status, std::string_view data, bool truncated);
  void onTcpConnect(Lookup& l, int status);
  void onTcpRead(Lookup& l, int status, std::string_view data);
  void onTimeout(Lookup& l);

  uv_loop_t* loop_;
  std::vector<ServerAddress> servers_;
  std::vector<Target> targets_;
  std::chrono::milliseconds timeout_;
  int attempts_;
  QueryOptions queryOptions_;
  Cache cache_;
  Stats stats_;
  uint64_t nextSerial_ = 1;
  std::map<uint64_t, std::unique_ptr<Lookup>> lookups_;
  std::map<Key, uint64_t> byKey_;
  std::vector<std::pair<Callback, Answer>> pending_;
  net::Timer deliverTimer_;
  std::shared_ptr<bool> alive_;
};

}  // namespace subrelay::dns
