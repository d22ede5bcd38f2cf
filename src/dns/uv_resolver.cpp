// UvResolver (see uv_resolver.h). The sockets and timers are net/'s RAII owners
// (uv_udp.h, uv_timer.h): destroying one closes it, and none calls back afterwards, so a
// lookup's transport is simply replaced or dropped.
#include "dns/uv_resolver.h"

#include <sys/random.h>

#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <set>

#include "dns/codec.h"
#include "metrics/server_metrics.h"
#include "net/uv_handle.h"
#include "net/uv_udp.h"

namespace subrelay::dns {

namespace {

// RFC 5452 9.2: the ID must be unpredictable, so it comes from the kernel's CSPRNG.
uint16_t randomId() {
  uint16_t id = 0;
  if (getrandom(&id, sizeof id, 0) == static_cast<ssize_t>(sizeof id)) return id;
  static thread_local std::random_device rd;
  return static_cast<uint16_t>(rd());
}

// How much a failure says about the lookup, for the final status when every try failed:
// an answer from a server (SERVFAIL, REFUSED, FORMERR, garbage) beats a timeout, which
// beats a local network error.
constexpr int kRankNetwork = 1;
constexpr int kRankTimeout = 2;
constexpr int kRankAnswer = 3;

}  // namespace

struct UvResolver::Lookup {
  UvResolver* owner = nullptr;
  uint64_t serial = 0;
  Key key;
  std::string name;  // normalized, as asked
  QType type = QType::A;
  std::string qname;  // the name being asked now (differs after following a CNAME)
  int hops = 0;
  uint32_t chainTtl = std::numeric_limits<uint32_t>::max();
  bool chainAuthenticated = true;  // every response so far had AD (RFC 4035 3.2.3)
  std::set<std::string> seen;
  std::vector<Callback> callbacks;

  size_t tries = 0;   // tries started, over targets_ x attempts_
  size_t target = 0;  // index into targets_ of the current try
  uint16_t id = 0;
  std::string wire;
  std::unique_ptr<net::UdpSocket> udp;
  std::unique_ptr<net::TcpStream> tcp;
  std::optional<net::Timer> timer;
  std::string tcpIn;

  Status failStatus = Status::Timeout;
  std::string failDetail;
  int failRank = 0;
};

UvResolver::UvResolver(uv_loop_t* loop, std::vector<ServerAddress> servers, const util::Clock& clock,
                       std::chrono::milliseconds timeout, int attempts, CacheLimits cacheLimits)
    : loop_(loop),
      servers_(std::move(servers)),
      timeout_(timeout.count() > 0 ? timeout : std::chrono::milliseconds(1)),
      attempts_(attempts > 0 ? attempts : 1),
      cache_(clock, cacheLimits),
      deliverTimer_(loop),
      alive_(std::make_shared<bool>(true)) {
  for (const auto& s : servers_) {
    Target t;
    if (!net::parseAddress(s.address, s.port, s.ipv6, &t.addr)) continue;  // parseServerAddress refused these
    t.label = s.toString();
    targets_.push_back(std::move(t));
  }
}

UvResolver::~UvResolver() {
  *alive_ = false;
  lookups_.clear();  // closes their sockets and timers
  byKey_.clear();
  pending_.clear();
}

void UvResolver::query(const std::string& name, QType type, Callback cb) {
  auto norm = normalizeName(name);
  if (!norm) {
    Answer a;
    a.status = Status::Error;
    a.name = name;
    a.canonicalName = name;
    a.type = type;
    a.detail = "invalid domain name \"" + name + "\"";
    deliverLater(std::move(cb), std::move(a));
    return;
  }
  if (auto hit = cache_.lookup(*norm, type)) {
    ++stats_.cacheHits;
    deliverLater(std::move(cb), std::move(*hit));
    return;
  }
  Key key{*norm, static_cast<uint16_t>(type)};
  if (auto it = byKey_.find(key); it != byKey_.end()) {
    ++stats_.coalesced;
    lookups_.at(it->second)->callbacks.push_back(std::move(cb));
    return;
  }
  if (targets_.empty()) {
    Answer a;
    a.status = Status::Error;
    a.name = *norm;
    a.canonicalName = *norm;
    a.type = type;
    a.detail = "no DNS servers configured";
    deliverLater(std::move(cb), std::move(a));
    return;
  }
  auto l = std::make_unique<Lookup>();
  l->owner = this;
  l->serial = nextSerial_++;
  l->key = key;
  l->name = *norm;
  l->type = type;
  l->qname = *norm;
  l->seen.insert(*norm);
  l->callbacks.push_back(std::move(cb));
  l->timer.emplace(loop_);
  Lookup& ref = *l;
  metrics::server().dnsQueries.with(typeName(type)).inc();
  byKey_.emplace(std::move(key), l->serial);
  lookups_.emplace(l->serial, std::move(l));
  // Sockets are opened now, but every outcome (even an immediate send error) is reported
  // from a loop callback: failures inside startAttempt go through the timer or pending_.
  startAttempt(ref);
}

void UvResolver::closeTransport(Lookup& l) {
  l.udp.reset();
  l.tcp.reset();
  l.tcpIn.clear();
}

void UvResolver::startAttempt(Lookup& l) {
  closeTransport(l);
  l.timer->stop();
  const size_t total = targets_.size() * static_cast<size_t>(attempts_);
  if (l.tries >= total) {
    Answer a;
    a.status = l.failRank > 0 ? l.failStatus : Status::Timeout;
    a.name = l.name;
    a.canonicalName = l.qname;
    a.type = l.type;
    a.detail = l.failDetail.empty() ? "no answer" : l.failDetail;
    finish(l, std::move(a));
    return;
  }
  l.target = l.tries % targets_.size();
  ++l.tries;
  const Target& t = targets_[l.target];

  l.id = randomId();
  auto wire = buildQuery(l.qname, l.type, l.id, queryOptions_);
  if (!wire) {  // cannot happen for a normalized name; fail the lookup from the loop
    l.tries = total;
    l.failStatus = Status::Error;
    l.failDetail = wire.error().message;
    l.failRank = kRankAnswer;
    l.timer->start(std::chrono::milliseconds(0), [this, lp = &l] { onTimeout(*lp); });
    return;
  }
  l.wire = std::move(*wire);

  l.timer->start(timeout_, [this, lp = &l] { onTimeout(*lp); });

  l.udp = std::make_unique<net::UdpSocket>(loop_);
  // Port 0: the kernel chooses a random ephemeral source port (RFC 5452 9.2). Connecting
  // the socket makes the kernel drop datagrams from any other address and report ICMP
  // port-unreachable as ECONNREFUSED, so a dead server fails fast.
  const sockaddr_storage any = net::anyAddress(t.addr.ss_family);
  int rc = l.udp->bind(any);
  if (rc == 0) rc = l.udp->connect(t.addr);
  if (rc == 0)
    rc = l.udp->startReceiving([this, lp = &l](int status, std::string_view data, const sockaddr_storage&, bool truncated) {
      onUdpRead(*lp, status, data, truncated);
    });
  if (rc == 0) rc = l.udp->send(l.wire);
  ++stats_.udpQueries;
  if (rc != 0) {
    // Report from the loop: a zero timer with this try already marked as failed.
    if (l.failRank <= kRankNetwork) {
      l.failStatus = Status::Error;
      l.failDetail = std::string("cannot send to ") + t.label + ": " + net::errorText(rc);
      l.failRank = kRankNetwork;
    }
    closeTransport(l);
    l.timer->start(std::chrono::milliseconds(0), [this, lp = &l] { startAttempt(*lp); });
  }
}

void UvResolver::startTcp(Lookup& l) {
  closeTransport(l);
  l.timer->start(timeout_, [this, lp = &l] { onTimeout(*lp); });
  const Target& t = targets_[l.target];
  // The same question with a new ID (RFC 7766 5: retry the truncated query over TCP).
  l.id = randomId();
  auto wire = buildQuery(l.qname, l.type, l.id, queryOptions_);
  if (!wire) {
    attemptFailed(l, Status::Error, wire.error().message, kRankAnswer);
    return;
  }
  l.wire = std::move(*wire);
  l.tcp = std::make_unique<net::TcpStream>(loop_);
  ++stats_.tcpQueries;
  int rc = l.tcp->connect(t.addr, [this, lp = &l](int status) { onTcpConnect(*lp, status); });
  if (rc != 0) {
    // Do not fail synchronously (we may be inside query()): let the timer report it.
    closeTransport(l);
    if (l.failRank <= kRankNetwork) {
      l.failStatus = Status::Error;
      l.failDetail = std::string("cannot connect to ") + t.label + ": " + net::errorText(rc);
      l.failRank = kRankNetwork;
    }
    l.timer->start(std::chrono::milliseconds(0), [this, lp = &l] { startAttempt(*lp); });
  }
}

void UvResolver::onUdpRead(Lookup& l, int status, std::string_view data, bool truncated) {
  const std::string& label = targets_[l.target].label;
  if (status < 0) {
    attemptFailed(l, Status::Error, std::string("no answer from ") + label + ": " + net::errorText(status),
                  kRankNetwork);
    return;
  }
  if (truncated) {
    attemptFailed(l, Status::Error, "oversized datagram from " + label, kRankAnswer);
    return;
  }
  handlePacket(l, data, false);
}

void UvResolver::onTcpConnect(Lookup& l, int status) {
  const std::string label = targets_[l.target].label;
  if (status < 0) {
    attemptFailed(l, Status::Error, "TCP connect to " + label + ": " + net::errorText(status), kRankNetwork);
    return;
  }
  // RFC 1035 4.2.2: the message is prefixed with its length as two octets.
  std::string framed;
  framed.push_back(static_cast<char>(l.wire.size() >> 8));
  framed.push_back(static_cast<char>(l.wire.size() & 0xff));
  framed += l.wire;
  // Write errors show up on the read side (or as a timeout).
  int rc = l.tcp->write(std::move(framed));
  if (rc != 0) {
    attemptFailed(l, Status::Error, "TCP write to " + label + ": " + net::errorText(rc), kRankNetwork);
    return;
  }
  rc = l.tcp->startReading([this, lp = &l](int st, std::string_view data) { onTcpRead(*lp, st, data); });
  if (rc != 0) attemptFailed(l, Status::Error, "TCP read from " + label + ": " + net::errorText(rc), kRankNetwork);
}

void UvResolver::onTcpRead(Lookup& l, int status, std::string_view data) {
  if (status < 0) {
    const std::string& label = targets_[l.target].label;
    attemptFailed(l, Status::Error, "TCP connection to " + label + " closed: " + net::errorText(status), kRankAnswer);
    return;
  }
  l.tcpIn.append(data);
  while (l.tcpIn.size() >= 2) {
    const size_t len = (static_cast<uint8_t>(l.tcpIn[0]) << 8) | static_cast<uint8_t>(l.tcpIn[1]);
    if (l.tcpIn.size() < 2 + len) break;
    const std::string msg = l.tcpIn.substr(2, len);
    l.tcpIn.erase(0, 2 + len);
    if (!handlePacket(l, msg, true)) return;
  }
}

void UvResolver::onTimeout(Lookup& l) {
  if (l.tries > 0 && l.udp == nullptr && l.tcp == nullptr) {  // a deferred failure report
    startAttempt(l);
    return;
  }
  const std::string& label = targets_[l.target].label;
  attemptFailed(l, Status::Timeout, "timeout waiting for " + label, kRankTimeout);
}

bool UvResolver::handlePacket(Lookup& l, std::string_view packet, bool overTcp) {
  const std::string& label = targets_[l.target].label;
  ParseResult pr = parseResponse(packet, l.id, l.qname, l.type);
  if (pr.status == ParseStatus::Mismatch) {
    ++stats_.ignoredPackets;  // RFC 5452 9.1: not ours, keep waiting
    return true;
  }
  if (pr.status == ParseStatus::Malformed) {
    attemptFailed(l, Status::Error, "malformed answer from " + label + ": " + pr.error, kRankAnswer);
    return false;
  }
  if (pr.response.truncated) {
    if (!overTcp) {
      startTcp(l);
    } else {
      attemptFailed(l, Status::Error, "truncated answer over TCP from " + label, kRankAnswer);
    }
    return false;
  }
  Interpretation in = interpretResponse(pr.response, l.qname, l.type, label);
  Answer& a = in.answer;
  switch (a.status) {
    case Status::ServFail:
    case Status::Refused:
    case Status::Error:
      if (pr.response.rcode != 0 && pr.response.rcode != 3) {
        attemptFailed(l, a.status, a.detail, kRankAnswer);
        return false;
      }
      break;  // a CNAME loop or an over-long chain: the data is bad, not the server
    default:
      break;
  }
  l.chainTtl = std::min(l.chainTtl, a.ttl);
  // A chain followed over several queries is authenticated only if every response was.
  l.chainAuthenticated = l.chainAuthenticated && a.authenticated;
  if (!in.followCname.empty()) {
    if (++l.hops > kMaxCnameHops || !l.seen.insert(in.followCname).second) {
      Answer err;
      err.status = Status::Error;
      err.name = l.name;
      err.canonicalName = in.followCname;
      err.type = l.type;
      err.detail = l.hops > kMaxCnameHops ? "CNAME chain longer than 8 for " + l.name : "CNAME loop for " + l.name;
      finish(l, std::move(err));
      return false;
    }
    l.qname = in.followCname;
    l.tries = 0;
    l.failRank = 0;
    l.failDetail.clear();
    startAttempt(l);
    return false;
  }
  a.name = l.name;
  a.ttl = std::min(l.chainTtl, a.ttl);
  a.authenticated = l.chainAuthenticated;
  finish(l, std::move(a));
  return false;
}

void UvResolver::attemptFailed(Lookup& l, Status status, std::string detail, int rank) {
  if (rank >= l.failRank) {
    l.failStatus = status;
    l.failDetail = std::move(detail);
    l.failRank = rank;
  }
  startAttempt(l);
}

void UvResolver::finish(Lookup& l, Answer answer) {
  closeTransport(l);
  l.timer.reset();
  byKey_.erase(l.key);
  auto node = lookups_.extract(l.serial);
  std::vector<Callback> cbs = std::move(l.callbacks);
  node = {};  // l is gone from here on
  if (answer.status == Status::ServFail || answer.status == Status::Refused || answer.status == Status::Timeout ||
      answer.status == Status::Error)
    metrics::server().dnsFailures.with(statusName(answer.status)).inc();
  cache_.insert(answer);
  std::shared_ptr<bool> alive = alive_;
  for (auto& cb : cbs) {
    if (!*alive) return;  // a callback destroyed the resolver
    cb(answer);
  }
}

void UvResolver::deliverLater(Callback cb, Answer answer) {
  pending_.emplace_back(std::move(cb), std::move(answer));
  if (!deliverTimer_.active()) deliverTimer_.start(std::chrono::milliseconds(0), [this] { deliverPending(); });
}

void UvResolver::deliverPending() {
  std::vector<std::pair<Callback, Answer>> batch;
  batch.swap(pending_);
  std::shared_ptr<bool> alive = alive_;
  for (auto& [cb, answer] : batch) {
    if (!*alive) return;
    cb(answer);
  }
}

}  // namespace subrelay::dns
