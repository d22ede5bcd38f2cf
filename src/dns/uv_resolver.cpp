// UvResolver (see uv_resolver.h). Handle lifetimes go through net/uv_handle.h: a closed
// handle is freed in its close callback, after every libuv callback for it has run.
// Request callbacks (TCP connect, write) can still fire after their handle was closed, with
// UV_ECANCELED or, for a finished write, 0: they free the request and touch nothing else.
#include "dns/uv_resolver.h"

#include <sys/random.h>

#include <cstring>
#include <limits>
#include <random>
#include <set>

#include "dns/codec.h"
#include "net/uv_handle.h"

namespace subrelay::dns {

using net::asHandle;
using net::asStream;
using net::closeHandle;
using net::newHandle;

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

struct WriteReq {
  uv_write_t req{};
  std::string data;
};

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
  std::set<std::string> seen;
  std::vector<Callback> callbacks;

  size_t tries = 0;   // tries started, over targets_ x attempts_
  size_t target = 0;  // index into targets_ of the current try
  uint16_t id = 0;
  std::string wire;
  uv_udp_t* udp = nullptr;
  uv_tcp_t* tcp = nullptr;
  uv_timer_t* timer = nullptr;
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
      alive_(std::make_shared<bool>(true)) {
  for (const auto& s : servers_) {
    Target t;
    int rc = s.ipv6 ? uv_ip6_addr(s.address.c_str(), s.port, reinterpret_cast<sockaddr_in6*>(&t.addr))
                    : uv_ip4_addr(s.address.c_str(), s.port, reinterpret_cast<sockaddr_in*>(&t.addr));
    if (rc != 0) continue;  // parseServerAddress already refused these
    t.label = s.toString();
    targets_.push_back(std::move(t));
  }
  deliverTimer_ = newHandle<uv_timer_t>();
  uv_timer_init(loop_, deliverTimer_);
  deliverTimer_->data = this;
}

UvResolver::~UvResolver() {
  *alive_ = false;
  for (auto& [serial, l] : lookups_) {
    closeTransport(*l);
    closeHandle(l->timer);
    l->timer = nullptr;
  }
  lookups_.clear();
  byKey_.clear();
  pending_.clear();
  closeHandle(deliverTimer_);
  deliverTimer_ = nullptr;
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
  l->timer = newHandle<uv_timer_t>();
  uv_timer_init(loop_, l->timer);
  l->timer->data = l.get();
  Lookup& ref = *l;
  byKey_.emplace(std::move(key), l->serial);
  lookups_.emplace(l->serial, std::move(l));
  // Sockets are opened now, but every outcome (even an immediate send error) is reported
  // from a loop callback: failures inside startAttempt go through the timer or pending_.
  startAttempt(ref);
}

void UvResolver::closeTransport(Lookup& l) {
  closeHandle(l.udp);
  l.udp = nullptr;
  closeHandle(l.tcp);
  l.tcp = nullptr;
  l.tcpIn.clear();
}

void UvResolver::startAttempt(Lookup& l) {
  closeTransport(l);
  uv_timer_stop(l.timer);
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
  auto wire = buildQuery(l.qname, l.type, l.id);
  if (!wire) {  // cannot happen for a normalized name; fail the lookup from the loop
    l.tries = total;
    l.failStatus = Status::Error;
    l.failDetail = wire.error().message;
    l.failRank = kRankAnswer;
    uv_timer_start(l.timer, onTimeout, 0, 0);
    return;
  }
  l.wire = std::move(*wire);

  uv_timer_start(l.timer, onTimeout, static_cast<uint64_t>(timeout_.count()), 0);

  l.udp = newHandle<uv_udp_t>();
  uv_udp_init(loop_, l.udp);
  l.udp->data = &l;
  // Port 0: the kernel chooses a random ephemeral source port (RFC 5452 9.2). Connecting
  // the socket makes the kernel drop datagrams from any other address and report ICMP
  // port-unreachable as ECONNREFUSED, so a dead server fails fast.
  sockaddr_storage any{};
  if (t.addr.ss_family == AF_INET6) {
    uv_ip6_addr("::", 0, reinterpret_cast<sockaddr_in6*>(&any));
  } else {
    uv_ip4_addr("0.0.0.0", 0, reinterpret_cast<sockaddr_in*>(&any));
  }
  int rc = uv_udp_bind(l.udp, reinterpret_cast<const sockaddr*>(&any), 0);
  if (rc == 0) rc = uv_udp_connect(l.udp, reinterpret_cast<const sockaddr*>(&t.addr));
  if (rc == 0) rc = uv_udp_recv_start(l.udp, onAlloc, onUdpRead);
  if (rc == 0) {
    uv_buf_t b = uv_buf_init(l.wire.data(), static_cast<unsigned>(l.wire.size()));
    rc = uv_udp_try_send(l.udp, &b, 1, nullptr);
    if (rc >= 0) rc = 0;
  }
  ++stats_.udpQueries;
  if (rc != 0) {
    // Report from the loop: a zero timer with this try already marked as failed.
    if (l.failRank <= kRankNetwork) {
      l.failStatus = Status::Error;
      l.failDetail = std::string("cannot send to ") + t.label + ": " + uv_strerror(rc);
      l.failRank = kRankNetwork;
    }
    closeTransport(l);
    uv_timer_start(
        l.timer,
        [](uv_timer_t* h) {
          auto* lk = static_cast<Lookup*>(h->data);
          lk->owner->startAttempt(*lk);
        },
        0, 0);
  }
}

void UvResolver::startTcp(Lookup& l) {
  closeTransport(l);
  uv_timer_stop(l.timer);
  uv_timer_start(l.timer, onTimeout, static_cast<uint64_t>(timeout_.count()), 0);
  const Target& t = targets_[l.target];
  // The same question with a new ID (RFC 7766 5: retry the truncated query over TCP).
  l.id = randomId();
  auto wire = buildQuery(l.qname, l.type, l.id);
  if (!wire) {
    attemptFailed(l, Status::Error, wire.error().message, kRankAnswer);
    return;
  }
  l.wire = std::move(*wire);
  l.tcp = newHandle<uv_tcp_t>();
  uv_tcp_init(loop_, l.tcp);
  l.tcp->data = &l;
  auto* req = new uv_connect_t{};
  req->data = &l;
  ++stats_.tcpQueries;
  int rc = uv_tcp_connect(req, l.tcp, reinterpret_cast<const sockaddr*>(&t.addr), onTcpConnect);
  if (rc != 0) {
    delete req;
    // Do not fail synchronously (we may be inside query()): let the timer report it.
    closeTransport(l);
    uv_timer_stop(l.timer);
    if (l.failRank <= kRankNetwork) {
      l.failStatus = Status::Error;
      l.failDetail = std::string("cannot connect to ") + t.label + ": " + uv_strerror(rc);
      l.failRank = kRankNetwork;
    }
    uv_timer_start(
        l.timer,
        [](uv_timer_t* h) {
          auto* lk = static_cast<Lookup*>(h->data);
          lk->owner->startAttempt(*lk);
        },
        0, 0);
  }
}

void UvResolver::onAlloc(uv_handle_t* h, size_t /*suggested*/, uv_buf_t* buf) {
  auto* l = static_cast<Lookup*>(h->data);
  auto& b = l->owner->recvBuf_;
  *buf = uv_buf_init(b.data(), static_cast<unsigned>(b.size()));
}

void UvResolver::onUdpRead(uv_udp_t* h, ssize_t nread, const uv_buf_t* buf, const sockaddr* addr, unsigned flags) {
  auto* l = static_cast<Lookup*>(h->data);
  if (l == nullptr || l->udp != h) return;
  if (nread == 0 && addr == nullptr) return;  // nothing more to read
  UvResolver* self = l->owner;
  const std::string& label = self->targets_[l->target].label;
  if (nread < 0) {
    self->attemptFailed(*l, Status::Error,
                        std::string("no answer from ") + label + ": " + uv_strerror(static_cast<int>(nread)),
                        kRankNetwork);
    return;
  }
  if ((flags & UV_UDP_PARTIAL) != 0) {
    self->attemptFailed(*l, Status::Error, "oversized datagram from " + label, kRankAnswer);
    return;
  }
  self->handlePacket(*l, std::string_view(buf->base, static_cast<size_t>(nread)), false);
}

void UvResolver::onTcpConnect(uv_connect_t* req, int status) {
  if (status == UV_ECANCELED) {  // the handle was closed: the lookup may be gone
    delete req;
    return;
  }
  auto* l = static_cast<Lookup*>(req->data);
  uv_stream_t* stream = req->handle;
  delete req;
  UvResolver* self = l->owner;
  const std::string label = self->targets_[l->target].label;
  if (status < 0) {
    self->attemptFailed(*l, Status::Error, "TCP connect to " + label + ": " + uv_strerror(status), kRankNetwork);
    return;
  }
  // RFC 1035 4.2.2: the message is prefixed with its length as two octets.
  auto* w = new WriteReq;
  w->data.push_back(static_cast<char>(l->wire.size() >> 8));
  w->data.push_back(static_cast<char>(l->wire.size() & 0xff));
  w->data += l->wire;
  uv_buf_t b = uv_buf_init(w->data.data(), static_cast<unsigned>(w->data.size()));
  int rc = uv_write(&w->req, stream, &b, 1, [](uv_write_t* r, int) {
    // Errors show up on the read side (or as a timeout); the lookup is not touched here.
    delete reinterpret_cast<WriteReq*>(r);
  });
  if (rc != 0) {
    delete w;
    self->attemptFailed(*l, Status::Error, "TCP write to " + label + ": " + uv_strerror(rc), kRankNetwork);
    return;
  }
  rc = uv_read_start(stream, onAlloc, onTcpRead);
  if (rc != 0) self->attemptFailed(*l, Status::Error, "TCP read from " + label + ": " + uv_strerror(rc), kRankNetwork);
}

void UvResolver::onTcpRead(uv_stream_t* s, ssize_t nread, const uv_buf_t* buf) {
  auto* l = static_cast<Lookup*>(s->data);
  if (l == nullptr || asStream(l->tcp) != s) return;
  UvResolver* self = l->owner;
  if (nread < 0) {
    const std::string& label = self->targets_[l->target].label;
    self->attemptFailed(*l, Status::Error,
                        "TCP connection to " + label + " closed: " + uv_strerror(static_cast<int>(nread)), kRankAnswer);
    return;
  }
  l->tcpIn.append(buf->base, static_cast<size_t>(nread));
  while (l->tcpIn.size() >= 2) {
    const size_t len = (static_cast<uint8_t>(l->tcpIn[0]) << 8) | static_cast<uint8_t>(l->tcpIn[1]);
    if (l->tcpIn.size() < 2 + len) break;
    const std::string msg = l->tcpIn.substr(2, len);
    l->tcpIn.erase(0, 2 + len);
    if (!self->handlePacket(*l, msg, true)) return;
  }
}

void UvResolver::onTimeout(uv_timer_t* t) {
  auto* l = static_cast<Lookup*>(t->data);
  if (l == nullptr) return;
  UvResolver* self = l->owner;
  if (l->tries > 0 && l->udp == nullptr && l->tcp == nullptr) {  // a deferred failure report
    self->startAttempt(*l);
    return;
  }
  const std::string& label = self->targets_[l->target].label;
  self->attemptFailed(*l, Status::Timeout, "timeout waiting for " + label, kRankTimeout);
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
  closeHandle(l.timer);
  l.timer = nullptr;
  byKey_.erase(l.key);
  auto node = lookups_.extract(l.serial);
  std::vector<Callback> cbs = std::move(l.callbacks);
  node = {};  // l is gone from here on
  cache_.insert(answer);
  std::shared_ptr<bool> alive = alive_;
  for (auto& cb : cbs) {
    if (!*alive) return;  // a callback destroyed the resolver
    cb(answer);
  }
}

void UvResolver::deliverLater(Callback cb, Answer answer) {
  pending_.emplace_back(std::move(cb), std::move(answer));
  if (!uv_is_active(asHandle(deliverTimer_)))
    uv_timer_start(
        deliverTimer_, [](uv_timer_t* t) { static_cast<UvResolver*>(t->data)->deliverPending(); }, 0, 0);
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
