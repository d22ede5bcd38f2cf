// delivery::Scheduler against an in-memory queue, a scripted transport and a fake clock.
#include <doctest/doctest.h>

#include <algorithm>
#include <map>
#include <set>

#include "delivery/scheduler.h"
#include "queue/write_behind.h"
#include "util/strings.h"

using namespace subrelay;
using namespace subrelay::delivery;
using queue::RecipientState;

namespace {

// --- an in-memory queue::DeliveryQueue with the SQLite store's semantics -----------------
struct FakeRcpt {
  int64_t index = 0;
  std::string address;
  RecipientState state = RecipientState::Queued;
  int64_t attempts = 0;
  int64_t next = 0;
  bool leased = false;
  bool dsnPending = false;
  bool delayNotified = false;
  std::string lastError;
  queue::EnhancedStatus lastStatus;
  queue::RecipientDsn dsn;
};
struct FakeMsg {
  std::string id;
  std::string mailFrom = "app@shop.example";
  std::string account = "acct";
  queue::TlsRequirement tlsRequirement = queue::TlsRequirement::Default;
  int64_t receivedAt = 0;
  bool isDsn = false;
  std::string content = "Subject: hi\r\n\r\nbody\r\n";
  queue::DsnRet dsnRet = queue::DsnRet::Unspecified;
  std::string dsnEnvid;
  std::vector<FakeRcpt> rcpts;
};

class FakeQueue final : public queue::DeliveryQueue {
 public:
  std::vector<FakeMsg> msgs;
  std::vector<queue::AttemptRecord> recorded;
  std::vector<queue::NewMessage> dsns;
  int doubleLeases = 0;     // a record for a recipient not leased: a second attempt
  bool failRecord = false;  // the next recordAttempts fails (disk trouble)

  void add(const std::string& id, std::vector<std::string> rcpts, int64_t at) {
    FakeMsg m;
    m.id = id;
    m.receivedAt = at;
    for (size_t i = 0; i < rcpts.size(); ++i) m.rcpts.push_back(FakeRcpt{int64_t(i), rcpts[i]});
    for (auto& r : m.rcpts) r.next = at;
    msgs.push_back(std::move(m));
  }
  FakeRcpt& rcpt(const std::string& id, int64_t idx) {
    for (auto& m : msgs)
      if (m.id == id) return m.rcpts.at(size_t(idx));
    throw std::runtime_error("no such message " + id);
  }
  size_t leasedCount() const {
    size_t n = 0;
    for (const auto& m : msgs)
      for (const auto& r : m.rcpts) n += r.leased;
    return n;
  }
  size_t inState(RecipientState s) const {
    size_t n = 0;
    for (const auto& m : msgs)
      for (const auto& r : m.rcpts) n += r.state == s;
    return n;
  }

  util::Result<std::vector<queue::DueMessage>> leaseDue(int64_t now, size_t maxMessages) override {
    std::vector<queue::DueMessage> out;
    for (auto& m : msgs) {
      if (out.size() >= maxMessages) break;
      queue::DueMessage d;
      for (auto& r : m.rcpts) {
        if (!queue::deliverable(r.state) || r.leased || r.next > now) continue;
        r.leased = true;
        d.recipients.push_back(queue::DueRecipient{r.index, r.address, r.attempts, r.dsn});
      }
      if (d.recipients.empty()) continue;
      d.id = m.id;
      d.account = m.account;
      d.tlsRequirement = m.tlsRequirement;
      d.mailFrom = m.mailFrom;
      d.size = int64_t(m.content.size());
      d.receivedAt = m.receivedAt;
      d.isDsn = m.isDsn;
      d.dsnRet = m.dsnRet;
      d.dsnEnvid = m.dsnEnvid;
      out.push_back(std::move(d));
    }
    return out;
  }
  util::Result<void> recordAttempts(const std::vector<queue::AttemptRecord>& records) override {
    if (failRecord) {
      failRecord = false;
      return util::makeError("disk I/O error");
    }
    for (const auto& rec : records) {
      FakeRcpt& r = rcpt(rec.messageId, rec.index);
      if (!r.leased) ++doubleLeases;
      r.leased = false;
      r.state = rec.newState;
      r.attempts++;
      r.next = rec.nextAttempt;
      r.lastError = rec.lastError;
      r.lastStatus = rec.lastStatus;
      const FakeMsg* m = nullptr;
      for (const auto& x : msgs)
        if (x.id == rec.messageId) m = &x;
      r.dsnPending = rec.newState == RecipientState::Failed && !m->mailFrom.empty() && !m->isDsn;
      recorded.push_back(rec);
    }
    return {};
  }
  util::Result<void> releaseLeases(const std::string& id, const std::vector<int64_t>& idx) override {
    for (int64_t i : idx) rcpt(id, i).leased = false;
    return {};
  }
  util::Result<std::string> content(const std::string& id) override {
    for (const auto& m : msgs)
      if (m.id == id) return m.content;
    return util::makeError("no such message: " + id);
  }
  util::Result<queue::MessageInfo> show(const std::string& id) override {
    for (const auto& m : msgs)
      if (m.id == id) {
        queue::MessageInfo info = infoOf(m, [](const FakeRcpt&) { return true; });
        for (const auto& rec : recorded)
          if (rec.messageId == id) {
            queue::AttemptInfo a = rec.attempt;
            a.index = rec.index;
            info.attempts.push_back(a);
          }
        return info;
      }
    return util::makeError("no such message: " + id);
  }
  util::Result<std::vector<queue::DsnWork>> pendingDsns(size_t max) override {
    return work(max, [](const FakeMsg&, const FakeRcpt& r) { return r.dsnPending; });
  }
  util::Result<void> completeDsn(const std::string& id, const std::vector<int64_t>& idx,
                                 const std::optional<queue::NewMessage>& dsn) override {
    for (int64_t i : idx) rcpt(id, i).dsnPending = false;
    if (dsn) dsns.push_back(*dsn);
    return {};
  }
  util::Result<std::vector<queue::DsnWork>> pendingDelayNotices(int64_t before, size_t max) override {
    return work(max, [before](const FakeMsg& m, const FakeRcpt& r) {
      return r.state == RecipientState::Deferred && !r.delayNotified && !m.isDsn && !m.mailFrom.empty() &&
             m.receivedAt < before;
    });
  }
  util::Result<void> completeDelayNotice(const std::string& id, const std::vector<int64_t>& idx,
                                         const std::optional<queue::NewMessage>& dsn) override {
    for (int64_t i : idx) rcpt(id, i).delayNotified = true;
    if (dsn) dsns.push_back(*dsn);
    return {};
  }

 private:
  template <typename Pred>
  static queue::MessageInfo infoOf(const FakeMsg& m, Pred keep) {
    queue::MessageInfo info;
    info.id = m.id;
    info.account = m.account;
    info.tlsRequirement = m.tlsRequirement;
    info.mailFrom = m.mailFrom;
    info.receivedAt = m.receivedAt;
    info.isDsn = m.isDsn;
    for (const auto& r : m.rcpts) {
      if (!keep(r)) continue;
      queue::RecipientInfo ri;
      ri.index = r.index;
      ri.address = r.address;
      ri.state = r.state;
      ri.attempts = r.attempts;
      ri.lastError = r.lastError;
      ri.lastStatus = r.lastStatus;
      ri.dsnPending = r.dsnPending;
      info.recipients.push_back(ri);
    }
    return info;
  }
  template <typename Pred>
  std::vector<queue::DsnWork> work(size_t max, Pred want) {
    std::vector<queue::DsnWork> out;
    for (const auto& m : msgs) {
      if (out.size() >= max) break;
      auto info = infoOf(m, [&](const FakeRcpt& r) { return want(m, r); });
      if (!info.recipients.empty()) out.push_back(queue::DsnWork{info});
    }
    return out;
  }
};

// --- a transport that records requests; the test answers them -----------------------------
class FakeTransport final : public Transport {
 public:
  std::vector<std::string> resolves;
  std::vector<std::pair<std::string, std::vector<std::string>>> relayResolves;  // key, hosts
  std::vector<ConnectRequest> connects;
  std::map<SessionId, smtp::OutboundMessage> sending;  // sent, no result yet
  std::vector<SessionId> quits;
  std::vector<SessionId> aborts;
  std::set<SessionId> open;  // connect()ed and not ended
  size_t maxOpen = 0;
  int flushes = 0;

  std::vector<std::pair<std::string, Route>> tlsLookups;  // lookupTlsPolicy(domain, route)
  void resolve(const std::string& domain) override { resolves.push_back(domain); }
  std::vector<std::string> stsRechecks;
  void recheckStsPolicy(const std::string& domain) override { stsRechecks.push_back(domain); }
  void lookupTlsPolicy(const std::string& domain, const Route& route) override {
    tlsLookups.emplace_back(domain, route);
  }
  void resolveRelay(const std::string& key, const std::vector<std::string>& hosts) override {
    relayResolves.emplace_back(key, hosts);
  }
  void connect(const ConnectRequest& r) override {
    connects.push_back(r);
    open.insert(r.id);
    maxOpen = std::max(maxOpen, open.size());
  }
  std::map<SessionId, std::set<std::string>> domainsBy;  // recipient domains per connection
  void send(SessionId id, smtp::OutboundMessage m) override {
    CHECK(sending.count(id) == 0);  // one transaction at a time per connection
    for (const auto& r : m.recipients) domainsBy[id].insert(std::string(util::domainPart(r)));
    sending[id] = std::move(m);
  }
  void quit(SessionId id) override { quits.push_back(id); }
  void abort(SessionId id, const std::string&) override { aborts.push_back(id); }
  void flushSoon() override { ++flushes; }
};

Route routeTo(std::vector<std::pair<std::string, std::vector<std::string>>> hosts) {
  Route r;
  r.status = RouteStatus::Ok;
  for (auto& [name, addrs] : hosts) {
    MxHost h;
    h.name = name;
    h.addresses = addrs;
    r.hosts.push_back(h);
  }
  return r;
}

// The one MX most cases deliver example.org to.
Route exampleMx() { return routeTo({{"mx.example.org", {"192.0.2.10"}}}); }

smtp::RecipientResult result(const std::string& rcpt, smtp::Outcome o, int code, std::string enhanced,
                             std::string text) {
  smtp::RecipientResult rr;
  rr.recipient = rcpt;
  rr.outcome = o;
  rr.reply.code = code;
  rr.reply.enhanced = std::move(enhanced);
  rr.reply.text = std::move(text);
  return rr;
}

struct Bed {
  FakeQueue q;
  FakeTransport t;
  util::FakeClock clock;
  SchedulerSettings settings;
  std::unique_ptr<Scheduler> s;

  Bed() {
    settings.hostname = "relay.test";
    settings.destinations.allowPrivate = false;
    settings.retry.schedule = {std::chrono::minutes(5), std::chrono::minutes(10)};
    settings.retry.maxQueueTime = std::chrono::hours(1);
    settings.retry.delayNotice = std::chrono::seconds(0);
    settings.idleLinger = std::chrono::seconds(0);  // quit at once unless a test says otherwise
  }
  int64_t now() const { return util::unixSeconds(clock.wallNow()); }
  Scheduler& start() {
    s = std::make_unique<Scheduler>(q, t, clock, settings);
    return *s;
  }
  // Answers every transaction in progress with `outcome` for each recipient.
  void answerAll(smtp::Outcome o, int code = 250, std::string enhanced = "2.0.0", std::string text = "ok") {
    while (!t.sending.empty()) {
      auto [id, m] = *t.sending.begin();
      t.sending.erase(t.sending.begin());
      std::vector<smtp::RecipientResult> rs;
      for (const auto& r : m.recipients) rs.push_back(result(r, o, code, enhanced, text));
      s->onTransactionDone(id, rs);
    }
  }
  // Every quit() is answered by the end of its connection.
  void endQuits() {
    while (!t.quits.empty()) {
      SessionId id = t.quits.back();
      t.quits.pop_back();
      t.open.erase(id);
      s->onSessionEnded(id, std::nullopt);
    }
  }
  void readyAll() {
    std::vector<SessionId> ids(t.open.begin(), t.open.end());
    for (SessionId id : ids)
      if (!t.sending.count(id)) s->onReady(id, "TLSv1.3", "TLS_AES_128_GCM_SHA256");
  }
  // A tick; every lookup it asks for is answered with exampleMx(); every connection is
  // ready, so the transactions are in t.sending.
  void tickRoutedReady() {
    const size_t asked = t.resolves.size();
    s->tick();
    for (size_t i = asked; i < t.resolves.size(); ++i) s->onRoute(t.resolves[i], exampleMx());
    readyAll();
  }
  // start() and the first tick with example.org routed to exampleMx(): the connections
  // are asked for.
  Scheduler& startRouted() {
    start();
    s->tick();
    s->onRoute("example.org", exampleMx());
    return *s;
  }
  // ... and every connection is ready: the transactions are in t.sending.
  Scheduler& startReady() {
    startRouted();
    readyAll();
    return *s;
  }
  // Time passes, then a tick.
  void tickAfter(std::chrono::seconds d) {
    clock.advance(d);
    s->tick();
  }
  // Up to `rounds` rounds of: every connection ready, every transaction delivered, every
  // quit answered; until no connection is left.
  void deliverAll(int rounds) {
    for (int round = 0; round < rounds && (!t.open.empty() || !t.sending.empty()); ++round) {
      readyAll();
      answerAll(smtp::Outcome::Delivered);
      endQuits();
    }
  }
};

}  // namespace

TEST_CASE("scheduler: lease, route, deliver, record each recipient once, quit") {
  Bed b;
  for (int i = 0; i < 3; ++i) b.q.add("m" + std::to_string(i), {"a@example.org", "b@example.org"}, b.now());
  Scheduler& s = b.start();
  s.tick();
  REQUIRE(b.t.resolves == std::vector<std::string>{"example.org"});
  CHECK(b.t.connects.empty());  // nothing before the route
  s.onRoute("example.org", exampleMx());
  REQUIRE(b.t.connects.size() == 3);  // one per job, below the per-destination limit
  CHECK(b.t.connects[0].ip == "192.0.2.10");
  CHECK(b.t.connects[0].host == "mx.example.org");
  CHECK(b.t.connects[0].tls == TlsPolicy::Opportunistic);
  b.readyAll();
  CHECK(b.t.sending.size() == 3);
  CHECK(b.t.sending.begin()->second.recipients.size() == 2);  // one transaction per message and domain
  b.answerAll(smtp::Outcome::Delivered);
  s.flush();
  b.endQuits();
  CHECK(b.q.inState(RecipientState::Delivered) == 6);
  CHECK(b.q.recorded.size() == 6);
  CHECK(b.q.doubleLeases == 0);
  CHECK(b.q.leasedCount() == 0);
  CHECK(b.q.recorded[0].attempt.mx == "mx.example.org [192.0.2.10]:25");
  CHECK(b.q.recorded[0].attempt.tlsVersion == "TLSv1.3");
  CHECK(b.q.recorded[0].attempt.status.str() == "2.0.0");
  CHECK(s.stats().sessions == 0);
  CHECK(s.stats().leasedRecipients == 0);
}

TEST_CASE("scheduler: a route is reused for its TTL, then looked up again") {
  Bed b;
  b.q.add("m1", {"a@example.org"}, b.now());
  Scheduler& s = b.startReady();
  b.q.add("m2", {"b@example.org"}, b.now());
  b.tickAfter(std::chrono::seconds(1));
  CHECK(b.t.resolves.size() == 1);  // fresh route: m2 joins the destination at once
  REQUIRE(b.t.connects.size() == 2);
  CHECK(b.t.connects[1].ip == "192.0.2.10");
  b.answerAll(smtp::Outcome::Delivered);
  b.readyAll();
  b.answerAll(smtp::Outcome::Delivered);
  b.endQuits();
  s.flush();
  CHECK(b.q.inState(RecipientState::Delivered) == 2);
  b.q.add("m3", {"c@example.org"}, b.now());
  b.tickAfter(std::chrono::seconds(61));
  CHECK(b.t.resolves.size() == 2);
}

TEST_CASE("scheduler: temporary failures follow the retry schedule, then expire with 4.4.7 and one DSN") {
  Bed b;
  const int64_t t0 = b.now();
  b.q.add("m1", {"u@example.org"}, t0);
  Scheduler& s = b.start();
  auto attempt = [&](smtp::Outcome o, int code, const std::string& enh) {
    b.tickRoutedReady();
    b.answerAll(o, code, enh, "try later");
    s.flush();
    b.endQuits();
  };
  attempt(smtp::Outcome::TempFail, 451, "4.7.1");
  FakeRcpt& r = b.q.rcpt("m1", 0);
  CHECK(r.state == RecipientState::Deferred);
  CHECK(r.next == t0 + 300);  // first step: 5 min
  CHECK(r.lastStatus.str() == "4.7.1");

  b.tickAfter(std::chrono::seconds(299));
  CHECK(b.t.connects.size() == 1);  // not due yet
  b.clock.advance(std::chrono::seconds(61));  // beyond the route TTL too
  attempt(smtp::Outcome::TempFail, 421, "");
  CHECK(r.attempts == 2);
  CHECK(r.next == b.now() + 600);  // second step: 10 min
  CHECK(r.lastStatus.str() == "4.0.0");  // no enhanced code: the class default

  // Near the end of max_queue_time the last try is at the expiry instant, then it expires.
  b.clock.advance(std::chrono::minutes(10));
  attempt(smtp::Outcome::TempFail, 421, "4.4.2");
  b.clock.advance(std::chrono::minutes(60));
  attempt(smtp::Outcome::TempFail, 421, "4.4.2");
  CHECK(r.state == RecipientState::Failed);
  CHECK(r.lastStatus.str() == "4.4.7");
  CHECK(r.lastError.find("expired after 1 hours") == 0);
  CHECK(r.dsnPending);
  s.tick();  // queues the DSN
  REQUIRE(b.q.dsns.size() == 1);
  CHECK(b.q.dsns[0].recipients == std::vector<std::string>{"app@shop.example"});
  CHECK(b.q.dsns[0].mailFrom.empty());
  CHECK(b.q.dsns[0].isDsn);
  CHECK(b.q.dsns[0].content.find("Status: 4.4.7") != std::string::npos);
  s.tick();
  CHECK(b.q.dsns.size() == 1);  // once per event
  CHECK(b.q.doubleLeases == 0);
}

TEST_CASE("scheduler: a permanent failure is typed and bounced once; a delay notice once") {
  Bed b;
  b.settings.retry.delayNotice = std::chrono::minutes(30);
  b.q.add("m1", {"gone@example.org", "slow@example.org"}, b.now());
  Scheduler& s = b.startReady();
  auto [id, m] = *b.t.sending.begin();
  b.t.sending.clear();
  s.onTransactionDone(id, {result("gone@example.org", smtp::Outcome::PermFail, 550, "5.1.1", "no such user"),
                           result("slow@example.org", smtp::Outcome::TempFail, 452, "4.2.2", "mailbox full")});
  s.flush();
  CHECK(b.q.rcpt("m1", 0).lastStatus.str() == "5.1.1");
  CHECK(b.q.recorded[0].attempt.code == 550);
  s.tick();
  REQUIRE(b.q.dsns.size() == 1);
  CHECK(b.q.dsns[0].content.find("Status: 5.1.1") != std::string::npos);
  CHECK(b.q.dsns[0].content.find("Diagnostic-Code: smtp; 550 5.1.1 no such user") != std::string::npos);
  b.tickAfter(std::chrono::minutes(31));
  REQUIRE(b.q.dsns.size() == 2);  // the delay notice for the deferred one
  CHECK(b.q.dsns[1].content.find("Action: delayed") != std::string::npos);
  s.tick();
  CHECK(b.q.dsns.size() == 2);
}

TEST_CASE("scheduler: a DSN quotes the original header section as HeaderScanner bounds it") {
  struct Case {
    const char* name;
    std::string content;
    std::string headers;  // what the DSN quotes
    std::string body;     // what it must not quote
  };
  const Case cases[] = {
      {"CRLF with the empty line", "Subject: hi\r\nX-Tag: a\r\n\r\nsecret body\r\n", "X-Tag: a", "secret body"},
      {"no empty line: the body starts at the first non-field line",
       "Subject: hi\r\nX-Tag: a\r\nsecret body\r\n\r\nX-Late: not a header\r\n", "X-Tag: a", "secret body"},
      {"LF-only lines", "Subject: hi\nX-Tag: a\n\nsecret body\n", "X-Tag: a", "secret body"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.name);
    Bed b;
    b.q.add("m1", {"gone@example.org"}, b.now());
    b.q.msgs.back().content = c.content;
    Scheduler& s = b.startReady();
    b.answerAll(smtp::Outcome::PermFail, 550, "5.1.1", "no such user");
    s.flush();
    s.tick();
    REQUIRE(b.q.dsns.size() == 1);
    const std::string& dsn = b.q.dsns[0].content;
    const size_t part = dsn.find("text/rfc822-headers");
    REQUIRE(part != std::string::npos);
    CHECK(dsn.find("Subject: hi", part) != std::string::npos);
    CHECK(dsn.find(c.headers, part) != std::string::npos);
    CHECK(dsn.find(c.body) == std::string::npos);
    CHECK(dsn.find("X-Late") == std::string::npos);
  }
}

TEST_CASE("scheduler: per-destination and total connection limits, fair between destinations") {
  Bed b;
  b.settings.maxPerDestination = 3;
  b.settings.maxConnections = 4;
  for (int i = 0; i < 20; ++i) b.q.add("a" + std::to_string(i), {"x@big.example"}, b.now());
  for (int i = 0; i < 2; ++i) b.q.add("b" + std::to_string(i), {"y@small.example"}, b.now());
  Scheduler& s = b.start();
  s.tick();
  s.onRoute("big.example", routeTo({{"mx.big.example", {"192.0.2.1"}}}));
  CHECK(b.t.connects.size() == 3);  // the per-destination limit
  s.onRoute("small.example", routeTo({{"mx.small.example", {"192.0.2.2"}}}));
  CHECK(b.t.connects.size() == 4);  // the total limit: small still gets one
  CHECK(std::count_if(b.t.connects.begin(), b.t.connects.end(),
                      [](const ConnectRequest& r) { return r.ip == "192.0.2.2"; }) == 1);
  b.deliverAll(30);
  s.flush();
  CHECK(b.t.maxOpen <= 4);
  CHECK(b.q.inState(RecipientState::Delivered) == 22);
  CHECK(b.q.doubleLeases == 0);
}

TEST_CASE("scheduler: domains with the same MX hosts share one destination and its limit") {
  Bed b;
  b.settings.maxPerDestination = 2;
  for (int i = 0; i < 3; ++i) b.q.add("a" + std::to_string(i), {"x@one.example"}, b.now());
  for (int i = 0; i < 3; ++i) b.q.add("b" + std::to_string(i), {"y@two.example"}, b.now());
  Scheduler& s = b.start();
  s.tick();
  // Workspace-style: both domains point at the same two MX hosts (in any order).
  s.onRoute("one.example", routeTo({{"aspmx.mail.test", {"192.0.2.5"}}, {"alt1.mail.test", {"192.0.2.6"}}}));
  s.onRoute("two.example", routeTo({{"ALT1.mail.test", {"192.0.2.6"}}, {"aspmx.mail.test", {"192.0.2.5"}}}));
  CHECK(s.stats().destinations == 1);
  CHECK(b.t.connects.size() == 2);
  b.deliverAll(10);
  CHECK(b.t.maxOpen == 2);
  bool shared = false;  // some connection carried mail for both domains
  for (const auto& [id, domains] : b.t.domainsBy) shared = shared || domains.size() == 2;
  CHECK(shared);
  s.flush();
  CHECK(b.q.inState(RecipientState::Delivered) == 6);
}

TEST_CASE("scheduler: private destinations are refused with 5.4.4 unless allowed; literals need no DNS") {
  SUBCASE("refused") {
    Bed b;
    b.q.add("m1", {"x@internal.example", "y@[127.0.0.1]"}, b.now());
    Scheduler& s = b.start();
    s.tick();
    s.onRoute("internal.example", routeTo({{"mx.internal.example", {"10.1.2.3", "127.0.0.1"}}}));
    s.flush();
    CHECK(b.t.connects.empty());
    CHECK(b.q.rcpt("m1", 0).state == RecipientState::Failed);
    CHECK(b.q.rcpt("m1", 0).lastStatus.str() == "5.4.4");
    CHECK(b.q.rcpt("m1", 1).state == RecipientState::Failed);
    CHECK(b.t.resolves == std::vector<std::string>{"internal.example"});  // never for the literal
  }
  SUBCASE("allowed") {
    Bed b;
    b.settings.destinations.allowPrivate = true;
    b.q.add("m1", {"y@[127.0.0.1]"}, b.now());
    Scheduler& s = b.start();
    s.tick();
    REQUIRE(b.t.connects.size() == 1);
    CHECK(b.t.connects[0].ip == "127.0.0.1");
    CHECK(b.t.resolves.empty());
  }
}

TEST_CASE("scheduler: every address of every MX is tried, then the destination's jobs are deferred") {
  Bed b;
  b.q.add("m1", {"a@example.org"}, b.now());
  b.q.add("m2", {"b@example.org"}, b.now());
  b.settings.maxPerDestination = 1;
  Scheduler& s = b.start();
  s.tick();
  s.onRoute("example.org", routeTo({{"mx1.example.org", {"192.0.2.1", "192.0.2.2"}}, {"mx2.example.org", {"192.0.2.3"}}}));
  for (const char* ip : {"192.0.2.1", "192.0.2.2", "192.0.2.3"}) {
    REQUIRE_FALSE(b.t.connects.empty());
    CHECK(b.t.connects.back().ip == ip);
    s.onSessionEnded(b.t.connects.back().id, SessionFailure{0, "", std::string("connect to ") + ip + ": refused"});
  }
  s.flush();
  CHECK(b.t.connects.size() == 3);  // not once per job
  CHECK(b.q.inState(RecipientState::Deferred) == 2);
  CHECK(b.q.rcpt("m2", 0).lastError.find("192.0.2.3: refused") != std::string::npos);
  CHECK(b.q.rcpt("m2", 0).lastStatus.str() == "4.4.1");
  CHECK(b.q.leasedCount() == 0);
}

TEST_CASE("scheduler: a transaction over its overall deadline is aborted and deferred once") {
  Bed b;
  b.settings.transactionDeadline = std::chrono::seconds(900);
  b.q.add("m1", {"a@example.org"}, b.now());
  Scheduler& s = b.startReady();
  REQUIRE(b.t.sending.size() == 1);
  // A server answering just in time for each stage: the overall bound still holds, and
  // however long the attempt runs, nothing is leased a second time.
  for (int i = 0; i < 14; ++i) {
    b.tickAfter(std::chrono::seconds(60));
  }
  CHECK(b.t.aborts.empty());
  b.tickAfter(std::chrono::seconds(60));
  REQUIRE(b.t.aborts.size() == 1);
  // The transport closes: TempFail results (canContinue false), then the end.
  auto [id, m] = *b.t.sending.begin();
  b.t.sending.clear();
  s.onTransactionDone(id, {result("a@example.org", smtp::Outcome::TempFail, 0, "4.4.2", "connection lost")}, false);
  s.onSessionEnded(id, SessionFailure{0, "", "aborted"});
  s.flush();
  CHECK(b.t.sending.empty());
  CHECK(b.q.rcpt("m1", 0).state == RecipientState::Deferred);
  CHECK(b.q.recorded.size() == 1);
  CHECK(b.q.doubleLeases == 0);
  CHECK(b.t.connects.size() == 1);
}

TEST_CASE("scheduler: a connection takes no new transaction after connectionReuse") {
  Bed b;
  b.settings.connectionReuse = std::chrono::seconds(300);
  b.settings.maxPerDestination = 1;
  b.q.add("m1", {"a@example.org"}, b.now());
  b.q.add("m2", {"b@example.org"}, b.now());
  b.startReady();
  b.clock.advance(std::chrono::seconds(301));
  b.answerAll(smtp::Outcome::Delivered);
  CHECK(b.t.quits.size() == 1);  // m2 waits for a fresh connection
  b.endQuits();
  CHECK(b.t.connects.size() == 2);
}

TEST_CASE("scheduler: an idle connection lingers for the next job, then quits") {
  Bed b;
  b.settings.idleLinger = std::chrono::seconds(2);
  b.q.add("m1", {"a@example.org"}, b.now());
  Scheduler& s = b.startReady();
  b.answerAll(smtp::Outcome::Delivered);
  CHECK(b.t.quits.empty());  // idle, waiting
  b.q.add("m2", {"b@example.org"}, b.now());
  b.tickAfter(std::chrono::seconds(1));  // m2 leased: the idle connection takes it, no new connection
  CHECK(b.t.connects.size() == 1);
  REQUIRE(b.t.sending.size() == 1);
  b.answerAll(smtp::Outcome::Delivered);
  b.tickAfter(std::chrono::seconds(1));
  CHECK(b.t.quits.empty());
  b.tickAfter(std::chrono::seconds(2));  // idle for 2 s: it quits
  CHECK(b.t.quits.size() == 1);
  b.endQuits();
  s.flush();
  CHECK(b.q.inState(RecipientState::Delivered) == 2);
  // stop() ends lingering connections at once.
  b.q.add("m3", {"c@example.org"}, b.now());
  b.clock.advance(std::chrono::seconds(61));
  b.tickRoutedReady();
  b.answerAll(smtp::Outcome::Delivered);
  CHECK(b.t.quits.empty());
  s.stop();
  CHECK(b.t.quits.size() == 1);
  b.endQuits();
  CHECK(s.drained());
}

TEST_CASE("scheduler: stop finishes the transaction in hand; finish releases what was never tried") {
  Bed b;
  b.settings.maxPerDestination = 1;
  for (int i = 0; i < 5; ++i) b.q.add("m" + std::to_string(i), {"a@example.org"}, b.now());
  b.q.add("w", {"z@waiting.example"}, b.now());
  Scheduler& s = b.startReady();
  REQUIRE(b.t.sending.size() == 1);
  s.stop();
  CHECK_FALSE(s.drained());
  b.answerAll(smtp::Outcome::Delivered);
  CHECK(b.t.sending.empty());  // no new transaction after stop
  b.endQuits();
  CHECK(s.drained());
  s.finish();
  CHECK(b.q.inState(RecipientState::Delivered) == 1);
  CHECK(b.q.leasedCount() == 0);  // 4 jobs and the one waiting for DNS went back
  for (const auto& m : b.q.msgs)
    for (const auto& r : m.rcpts)
      if (r.state != RecipientState::Delivered) CHECK(r.attempts == 0);
}

TEST_CASE("scheduler: results that cannot be written are kept for the next flush") {
  Bed b;
  b.settings.flushBatch = 1000;
  b.q.add("m1", {"a@example.org"}, b.now());
  Scheduler& s = b.startReady();
  b.answerAll(smtp::Outcome::Delivered);
  CHECK(b.t.flushes >= 1);
  b.q.failRecord = true;
  s.flush();
  CHECK(s.stats().pendingResults == 1);
  CHECK(b.q.rcpt("m1", 0).leased);  // still ours: nobody attempts it again meanwhile
  s.tick();
  CHECK(b.t.connects.size() == 1);
  s.flush();
  CHECK(s.stats().pendingResults == 0);
  CHECK(b.q.rcpt("m1", 0).state == RecipientState::Delivered);
}

TEST_CASE("scheduler: TLS policy per recipient domain; different policies never share a connection") {
  Bed b;
  b.settings.tlsOverrides["strict.example"] = TlsPolicy::Verify;
  b.q.add("m1", {"a@strict.example"}, b.now());
  b.q.add("m2", {"b@loose.example"}, b.now());
  Scheduler& s = b.start();
  s.tick();
  s.onRoute("strict.example", routeTo({{"mx.shared.test", {"192.0.2.10"}}}));
  s.onRoute("loose.example", routeTo({{"mx.shared.test", {"192.0.2.10"}}}));
  CHECK(s.stats().destinations == 2);
  REQUIRE(b.t.connects.size() == 2);
  std::set<TlsPolicy> policies{b.t.connects[0].tls, b.t.connects[1].tls};
  CHECK(policies == std::set<TlsPolicy>{TlsPolicy::Verify, TlsPolicy::Opportunistic});
}

TEST_CASE("destinationKey: MX host set and TLS policy, order and case free") {
  Route a = routeTo({{"B.example", {"192.0.2.1"}}, {"a.example", {"192.0.2.2"}}, {"c.example", {}}});
  Route b = routeTo({{"a.example", {"192.0.2.2"}}, {"b.example", {"192.0.2.1"}}});
  CHECK(destinationKey(a, TlsPolicy::Opportunistic) == destinationKey(b, TlsPolicy::Opportunistic));
  CHECK(destinationKey(a, TlsPolicy::Opportunistic) == "may|a.example|b.example");
  CHECK(destinationKey(a, TlsPolicy::Verify) != destinationKey(b, TlsPolicy::Opportunistic));
}

TEST_CASE("EnhancedStatus and operator requests") {
  using queue::EnhancedStatus;
  CHECK(EnhancedStatus::parse("5.1.1")->str() == "5.1.1");
  CHECK(EnhancedStatus::parse("4.4.7")->klass == 4);
  CHECK(EnhancedStatus::parse("2.0.0")->permanent() == false);
  CHECK_FALSE(EnhancedStatus::parse("3.1.1"));
  CHECK_FALSE(EnhancedStatus::parse("5.1"));
  CHECK_FALSE(EnhancedStatus::parse("5.1.1 "));
  CHECK_FALSE(EnhancedStatus::parse("5.1000.1"));
  CHECK(EnhancedStatus::parse("5.123.999")->detail == 999);
  CHECK(EnhancedStatus::fromReply(550, "").str() == "5.0.0");
  CHECK(EnhancedStatus::fromReply(550, "4.1.1").str() == "5.0.0");  // contradicts the code
  CHECK(EnhancedStatus::fromReply(0, "").str().empty());

  queue::AttemptRecord rec;
  rec.newState = RecipientState::Deferred;
  rec.attempt.at = 1000;
  rec.nextAttempt = 1300;
  CHECK(queue::applyOperatorRequest(rec, queue::OperatorRequest::Retry).nextAttempt == 1000);
  auto bounced = queue::applyOperatorRequest(rec, queue::OperatorRequest::Bounce);
  CHECK(bounced.newState == RecipientState::Failed);
  CHECK(bounced.lastStatus.str() == "5.0.0");
  CHECK(bounced.lastError == "bounced by operator");
  rec.newState = RecipientState::Delivered;
  CHECK(queue::applyOperatorRequest(rec, queue::OperatorRequest::Bounce).newState == RecipientState::Delivered);
}

TEST_CASE("WriteBehindQueue: results are committed by the writer thread, failures retried in order") {
  FakeQueue reads, writes;
  writes.add("m1", {"a@example.org", "b@example.org"}, 0);
  auto leased = writes.leaseDue(0, 10);
  REQUIRE(leased.ok());
  writes.failRecord = true;  // the first commit fails (a full disk), the retry succeeds
  {
    queue::WriteBehindQueue q(reads, writes, std::chrono::milliseconds(10));
    queue::AttemptRecord a;
    a.messageId = "m1";
    a.index = 0;
    a.newState = RecipientState::Delivered;
    queue::AttemptRecord b = a;
    b.index = 1;
    REQUIRE(q.recordAttempts({a}).ok());  // returns at once
    REQUIRE(q.recordAttempts({b}).ok());
    CHECK(q.drain(std::chrono::seconds(10)));
    CHECK(q.backlog() == 0);
    CHECK(q.commits() >= 1);
    // Everything else goes to the loop's own connection.
    CHECK(q.leaseDue(0, 10)->empty());
  }
  CHECK(writes.rcpt("m1", 0).state == RecipientState::Delivered);
  CHECK(writes.rcpt("m1", 1).state == RecipientState::Delivered);
  CHECK(writes.recorded.size() == 2);
  CHECK(writes.recorded[0].index == 0);  // order kept across the retry
  CHECK(writes.doubleLeases == 0);
}

// ---- smarthosts (issue 12) ---------------------------------------------------------------

namespace {

std::shared_ptr<const RelaySet> relays(std::string id, std::vector<RelayHost> hosts) {
  auto r = std::make_shared<RelaySet>();
  r->id = std::move(id);
  r->hosts = std::move(hosts);
  return r;
}

RelayHost relayHost(std::string host, uint16_t port, std::string origin, bool implicit = false,
                    std::string user = "relayuser", bool verify = true) {
  RelayHost h;
  h.host = std::move(host);
  h.port = port;
  h.implicitTls = implicit;
  h.verify = verify;
  if (!user.empty()) h.auth = std::make_shared<smtp::ClientAuth>(smtp::ClientAuth{user, "pw-" + user});
  h.origin = std::move(origin);
  return h;
}

}  // namespace

TEST_CASE("scheduler: a relay on loopback takes every domain in one transaction, no MX lookup, no policy") {
  Bed b;
  b.settings.relay = relays("delivery.relay", {relayHost("127.0.0.1", 2525, "delivery.relay[0]")});
  b.q.add("m1", {"a@example.org", "b@gmail.example", "c@[192.0.2.9]"}, b.now());
  Scheduler& s = b.start();
  s.tick();
  CHECK(b.t.resolves.empty());
  CHECK(b.t.relayResolves.empty());  // an IP needs no DNS
  REQUIRE(b.t.connects.size() == 1);
  const ConnectRequest& c = b.t.connects[0];
  CHECK(c.ip == "127.0.0.1");
  CHECK(c.port == 2525);
  CHECK(c.tls == TlsPolicy::Verify);
  CHECK(c.relay == "delivery.relay[0]");
  REQUIRE(c.auth);
  CHECK(c.auth->username == "relayuser");
  CHECK(c.label() == "127.0.0.1 [127.0.0.1]:2525");
  b.readyAll();
  REQUIRE(b.t.sending.size() == 1);
  CHECK(b.t.sending.begin()->second.recipients.size() == 3);
  b.answerAll(smtp::Outcome::Delivered);
  s.flush();
  CHECK(b.q.inState(RecipientState::Delivered) == 3);
}

TEST_CASE("scheduler: relay failover walks the list in order with each host's port, TLS and credentials") {
  Bed b;
  b.settings.relay = relays("delivery.relay", {relayHost("smtp1.provider.example", 587, "delivery.relay[0]"),
                                               relayHost("smtp2.provider.example", 465, "delivery.relay[1]", true, "other")});
  b.q.add("m1", {"a@example.org"}, b.now());
  Scheduler& s = b.start();
  s.tick();
  REQUIRE(b.t.relayResolves.size() == 1);
  const std::string key = b.t.relayResolves[0].first;
  CHECK(b.t.relayResolves[0].second == std::vector<std::string>{"smtp1.provider.example", "smtp2.provider.example"});
  s.onRoute(key, routeTo({{"smtp1.provider.example", {"10.0.0.1"}}, {"smtp2.provider.example", {"10.0.0.1"}}}));
  REQUIRE(b.t.connects.size() == 1);
  CHECK(b.t.connects[0].port == 587);
  CHECK_FALSE(b.t.connects[0].implicitTls);
  s.onSessionEnded(b.t.connects[0].id, SessionFailure{0, "", "connect to 10.0.0.1:587: refused", ""});
  REQUIRE(b.t.connects.size() == 2);  // the same IP on another port is another upstream
  CHECK(b.t.connects[1].ip == "10.0.0.1");
  CHECK(b.t.connects[1].port == 465);
  CHECK(b.t.connects[1].implicitTls);
  CHECK(b.t.connects[1].auth->username == "other");
  CHECK(b.t.connects[1].relay == "delivery.relay[1]");
  b.readyAll();
  b.answerAll(smtp::Outcome::Delivered);
  s.flush();
  CHECK(b.q.inState(RecipientState::Delivered) == 1);
}

TEST_CASE("scheduler: a refused relay login defers everything for that relay once, with 4.7.8 and no DSN") {
  Bed b;
  b.settings.relay = relays("delivery.relay", {relayHost("127.0.0.1", 2525, "delivery.relay[0]")});
  b.settings.maxPerDestination = 1;
  for (int i = 0; i < 5; ++i) b.q.add("m" + std::to_string(i), {"a@example.org"}, b.now());
  Scheduler& s = b.start();
  s.tick();
  REQUIRE(b.t.connects.size() == 1);
  s.onSessionEnded(b.t.connects[0].id,
                   SessionFailure{0, "4.7.8", "the relay refused authentication as user relayuser: 535 5.7.8 no", "auth"});
  s.flush();
  s.tick();
  CHECK(b.t.connects.size() == 1);  // not one connection per message
  CHECK(b.q.inState(RecipientState::Deferred) == 5);
  CHECK(b.q.rcpt("m3", 0).lastStatus.str() == "4.7.8");
  CHECK(b.q.rcpt("m3", 0).lastError.find("535 5.7.8") != std::string::npos);
  CHECK(b.q.rcpt("m3", 0).lastError.find("pw-") == std::string::npos);
  CHECK(b.q.dsns.empty());
}

TEST_CASE("scheduler: relay precedence: domain override, then account, then delivery.relay; direct goes to the MX") {
  Bed b;
  b.settings.relay = relays("delivery.relay", {relayHost("10.0.0.1", 587, "delivery.relay[0]")});
  b.settings.accountRelays["tenant"] = relays("account:tenant", {relayHost("10.0.0.2", 587, "accounts[1].relay[0]")});
  b.settings.domainRelays["internal.example"] = relays("domain:internal.example", {relayHost("10.0.0.3", 25, "o")});
  b.settings.domainRelays["example.org"] = nullptr;  // "direct"
  b.q.add("m1", {"a@other.example", "b@internal.example", "c@example.org"}, b.now());
  b.q.add("m2", {"d@other.example"}, b.now());
  b.q.msgs[1].account = "tenant";
  Scheduler& s = b.start();
  s.tick();
  CHECK(b.t.resolves == std::vector<std::string>{"example.org"});
  std::set<std::string> ips;
  for (const auto& c : b.t.connects) ips.insert(c.ip + ":" + std::to_string(c.port));
  CHECK(ips == std::set<std::string>{"10.0.0.1:587", "10.0.0.2:587", "10.0.0.3:25"});
}

TEST_CASE("scheduler: two tenants with identical relay lists never share a connection") {
  Bed b;
  auto host = relayHost("10.0.0.1", 587, "x");
  b.settings.accountRelays["t1"] = relays("account:t1", {host});
  b.settings.accountRelays["t2"] = relays("account:t2", {host});
  b.q.add("m1", {"a@example.org"}, b.now());
  b.q.add("m2", {"b@example.org"}, b.now());
  b.q.msgs[0].account = "t1";
  b.q.msgs[1].account = "t2";
  Scheduler& s = b.start();
  s.tick();
  CHECK(b.t.connects.size() == 2);
  CHECK(s.stats().destinations == 2);
}

TEST_CASE("scheduler: a relay name that does not resolve defers (4.4.3), never bounces") {
  Bed b;
  b.settings.relay = relays("delivery.relay", {relayHost("smtp.nowhere.example", 587, "delivery.relay[0]")});
  b.q.add("m1", {"a@example.org"}, b.now());
  Scheduler& s = b.start();
  s.tick();
  REQUIRE(b.t.relayResolves.size() == 1);
  Route r;
  r.status = RouteStatus::PermFail;
  r.enhanced = "5.4.4";
  r.detail = "no address for any configured relay host: smtp.nowhere.example: AAAA nxdomain, A nxdomain";
  s.onRoute(b.t.relayResolves[0].first, r);
  s.flush();
  CHECK(b.q.rcpt("m1", 0).state == RecipientState::Deferred);
  CHECK(b.q.rcpt("m1", 0).lastStatus.str() == "4.4.3");
}

TEST_CASE("scheduler: after reconfigure, new relay jobs use a new destination") {
  Bed b;
  b.settings.relay = relays("delivery.relay", {relayHost("10.0.0.1", 587, "delivery.relay[0]")});
  b.q.add("m1", {"a@example.org"}, b.now());
  Scheduler& s = b.start();
  s.tick();
  REQUIRE(b.t.connects.size() == 1);
  CHECK(b.t.connects[0].auth->password == "pw-relayuser");
  SchedulerSettings next = b.settings;
  next.relay = relays("delivery.relay", {relayHost("10.0.0.1", 587, "delivery.relay[0]", false, "newuser")});
  s.reconfigure(next);
  b.q.add("m2", {"b@example.org"}, b.now());
  b.clock.advance(std::chrono::seconds(1));
  s.tick();
  REQUIRE(b.t.connects.size() == 2);
  CHECK(b.t.connects[1].auth->username == "newuser");
  CHECK(s.stats().destinations == 2);
}

TEST_CASE("relayDestinationKey: id, generation, hosts; never the password") {
  auto r = relays("account:t1", {relayHost("smtp.example", 465, "x", true, "u")});
  const std::string k = relayDestinationKey(*r, 3);
  CHECK(k == "relay|account:t1#3|smtp.example:465/implicit");
  CHECK(k.find("pw-u") == std::string::npos);
  CHECK(relayDestinationKey(*r, 4) != k);
}

TEST_CASE("scheduler: parallel sessions failing before ready start no replacements; the jobs are deferred once") {
  Bed b;
  b.settings.relay = relays("delivery.relay", {relayHost("127.0.0.1", 2525, "delivery.relay[0]")});
  b.settings.maxPerDestination = 3;
  for (int i = 0; i < 6; ++i) b.q.add("m" + std::to_string(i), {"a@example.org"}, b.now());
  Scheduler& s = b.start();
  s.tick();
  REQUIRE(b.t.connects.size() == 3);
  const SessionFailure authFail{0, "4.7.8", "the relay refused authentication as user relayuser: 535 5.7.8 no", "auth"};
  for (size_t i = 0; i < 3; ++i) {
    s.onSessionEnded(b.t.connects[i].id, authFail);
    CHECK(b.t.connects.size() == 3);  // no replacement connection
  }
  s.flush();
  CHECK(b.q.inState(RecipientState::Deferred) == 6);
  CHECK(s.stats().destinations == 0);
  // When they are due again, connections open again (up to the limit).
  b.clock.advance(std::chrono::minutes(6));
  s.tick();
  CHECK(b.t.connects.size() == 6);
}

// ---- REQUIRETLS (RFC 8689) -----------------------------------------------------------------

TEST_CASE("scheduler: a REQUIRETLS message never goes to MX hosts nobody validated; it bounces with 5.7.10") {
  Bed b;
  b.q.add("m1", {"a@example.org"}, b.now());
  b.q.msgs[0].tlsRequirement = queue::TlsRequirement::Required;
  Scheduler& s = b.start();
  s.tick();
  s.onRoute("example.org", exampleMx());  // validated stays false: no DNSSEC, no MTA-STS
  s.flush();
  CHECK(b.t.connects.empty());
  CHECK(b.q.rcpt("m1", 0).state == RecipientState::Failed);
  CHECK(b.q.rcpt("m1", 0).lastStatus.str() == "5.7.10");
  CHECK(b.q.rcpt("m1", 0).dsnPending);
  SUBCASE("its bounce asks for REQUIRETLS too") {
    s.tick();
    REQUIRE(b.q.dsns.size() == 1);
    CHECK(b.q.dsns[0].tlsRequirement == queue::TlsRequirement::Required);
  }
}

TEST_CASE("scheduler: a validated route takes REQUIRETLS mail over verified TLS only") {
  Bed b;
  b.q.add("m1", {"a@example.org"}, b.now());
  b.q.msgs[0].tlsRequirement = queue::TlsRequirement::Required;
  Scheduler& s = b.start();
  s.tick();
  Route r = exampleMx();
  r.validated = true;
  s.onRoute("example.org", r);
  REQUIRE(b.t.connects.size() == 1);
  CHECK(b.t.connects[0].tls == TlsPolicy::Verify);
  b.readyAll();
  REQUIRE(b.t.sending.size() == 1);
  CHECK(b.t.sending.begin()->second.requireTls);
}

TEST_CASE("scheduler: REQUIRETLS through a relay; refused when the relay is not verified") {
  SUBCASE("verified relay") {
    Bed b;
    b.settings.relay = relays("delivery.relay", {relayHost("127.0.0.1", 2525, "delivery.relay[0]")});
    b.q.add("m1", {"a@example.org"}, b.now());
    b.q.msgs[0].tlsRequirement = queue::TlsRequirement::Required;
    Scheduler& s = b.start();
    s.tick();
    REQUIRE(b.t.connects.size() == 1);
    b.readyAll();
    REQUIRE(b.t.sending.size() == 1);
    CHECK(b.t.sending.begin()->second.requireTls);
  }
  SUBCASE("verify false") {
    Bed b;
    b.settings.relay = relays("delivery.relay", {relayHost("127.0.0.1", 2525, "delivery.relay[0]", false, "", false)});
    b.q.add("m1", {"a@example.org"}, b.now());
    b.q.msgs[0].tlsRequirement = queue::TlsRequirement::Required;
    Scheduler& s = b.start();
    s.tick();
    s.flush();
    CHECK(b.t.connects.empty());
    CHECK(b.q.rcpt("m1", 0).lastStatus.str() == "5.7.10");
    CHECK(b.q.rcpt("m1", 0).lastError.find("delivery.relay[0] has verify false") != std::string::npos);
  }
}

TEST_CASE("scheduler: TLS-Required: No is opportunistic whatever the domain's policy") {
  Bed b;
  b.settings.tlsOverrides["example.org"] = TlsPolicy::Verify;
  b.q.add("m1", {"a@example.org"}, b.now());
  b.q.msgs[0].tlsRequirement = queue::TlsRequirement::Optional;
  b.q.add("m2", {"b@example.org"}, b.now());
  Scheduler& s = b.start();
  s.tick();
  s.onRoute("example.org", exampleMx());
  std::set<TlsPolicy> policies;
  for (const auto& c : b.t.connects) policies.insert(c.tls);
  CHECK(policies == std::set<TlsPolicy>{TlsPolicy::Opportunistic, TlsPolicy::Verify});
}

TEST_CASE("scheduler: each attempt records the TLS policy it ran under and why") {
  Bed b;
  b.settings.tlsOverrides["example.org"] = TlsPolicy::Required;
  b.settings.accountRelays["tenant"] = relays("account:tenant", {relayHost("10.0.0.2", 465, "accounts[1].relay[0]", true)});
  b.q.add("m1", {"a@example.org"}, b.now());
  b.q.add("m2", {"b@example.org"}, b.now());
  b.q.msgs[1].tlsRequirement = queue::TlsRequirement::Optional;
  b.q.add("m3", {"c@other.example"}, b.now());
  b.q.msgs[2].account = "tenant";
  Scheduler& s = b.startRouted();
  b.deliverAll(5);
  s.flush();
  std::map<std::string, std::string> policy;
  for (const auto& r : b.q.recorded) policy[r.messageId] = r.attempt.tlsPolicy;
  CHECK(policy["m1"] == "required (tls_policy_overrides)");
  CHECK(policy["m2"] == "opportunistic (TLS-Required: No)");
  CHECK(policy["m3"] == "relay verify implicit (accounts[1].relay[0])");
}

namespace {

// Two MX hosts of example.org from a signed zone (mxSecure, addresses secure).
Route signedMx() {
  Route r = routeTo({{"mx1.example.org", {"192.0.2.11"}}, {"mx2.example.org", {"192.0.2.12"}}});
  r.mxSecure = true;
  for (auto& h : r.hosts) h.addressesSecure = true;
  return r;
}

mtasts::CachedPolicy stsPolicy(mtasts::Mode mode, std::vector<std::string> mx) {
  mtasts::CachedPolicy p;
  p.domain = "example.org";
  p.id = "abc";
  p.policy.mode = mode;
  p.policy.maxAge = 86400;
  p.policy.mx = std::move(mx);
  return p;
}

// One REQUIRETLS message to example.org with the domain's TLS policy on and delivery.dnssec
// trusted; leased, waiting for its route.
Scheduler& startRequireTls(Bed& b) {
  b.settings.recipientTlsPolicy = true;
  b.settings.trustDnssec = true;
  b.q.add("m1", {"a@example.org"}, b.now());
  b.q.msgs[0].tlsRequirement = queue::TlsRequirement::Required;
  Scheduler& s = b.start();
  s.tick();
  return s;
}

}  // namespace

TEST_CASE("scheduler: the domain's TLS policy is looked up after the route, only when it applies") {
  SUBCASE("off: no lookup") {
    Bed b;
    b.q.add("m1", {"a@example.org"}, b.now());
    b.startRouted();
    CHECK(b.t.tlsLookups.empty());
    CHECK(b.t.connects.size() == 1);
  }
  SUBCASE("on: the jobs wait for the answer") {
    Bed b;
    b.settings.recipientTlsPolicy = true;
    b.settings.trustDnssec = true;  // delivery.dnssec: the signed routes count
    b.q.add("m1", {"a@example.org"}, b.now());
    Scheduler& s = b.startRouted();
    REQUIRE(b.t.tlsLookups.size() == 1);
    CHECK(b.t.tlsLookups[0].first == "example.org");
    CHECK(b.t.connects.empty());
    s.onTlsPolicy("example.org", {});  // nothing found: as without the lookup
    REQUIRE(b.t.connects.size() == 1);
    CHECK(b.t.connects[0].tls == TlsPolicy::Opportunistic);
    CHECK_FALSE(b.t.connects[0].dane);
    CHECK(b.t.connects[0].policy.empty());
    s.onTlsPolicy("example.org", {});  // late or repeated answers are ignored
    CHECK(b.t.connects.size() == 1);
  }
  SUBCASE("tls_policy_overrides and TLS-Required: No: no lookup") {
    Bed b;
    b.settings.recipientTlsPolicy = true;
    b.settings.trustDnssec = true;  // delivery.dnssec: the signed routes count
    b.settings.tlsOverrides["example.org"] = TlsPolicy::Required;
    b.q.add("m1", {"a@example.org"}, b.now());
    b.q.add("m2", {"b@other.example"}, b.now());
    b.q.msgs[1].tlsRequirement = queue::TlsRequirement::Optional;
    Scheduler& s = b.start();
    s.tick();
    s.onRoute("example.org", exampleMx());
    s.onRoute("other.example", routeTo({{"mx.other.example", {"192.0.2.20"}}}));
    CHECK(b.t.tlsLookups.empty());
    CHECK(b.t.connects.size() == 2);
  }
}

TEST_CASE("scheduler: DANE hosts get the TLSA records and TLS required; a host without TLSA goes as usual") {
  Bed b;
  b.settings.recipientTlsPolicy = true;
  b.settings.trustDnssec = true;  // delivery.dnssec: the signed routes count
  b.q.add("m1", {"a@example.org"}, b.now());
  Scheduler& s = b.start();
  s.tick();
  s.onRoute("example.org", signedMx());
  REQUIRE(b.t.tlsLookups.size() == 1);
  TlsPolicyInputs in;
  in.tlsa.push_back({"mx1.example.org", dns::Status::Ok, true, {{3, 1, 1, std::vector<uint8_t>(32, 7)}}});
  in.tlsa.push_back({"mx2.example.org", dns::Status::NxDomain, true, {}});
  s.onTlsPolicy("example.org", in);
  REQUIRE(b.t.connects.size() == 1);
  const ConnectRequest& c = b.t.connects[0];
  CHECK(c.host == "mx1.example.org");
  CHECK(c.tls == TlsPolicy::Required);
  REQUIRE(c.dane);
  CHECK(c.dane->tlsa.size() == 1);
  CHECK(c.dane->referenceNames == std::vector<std::string>{"mx1.example.org", "example.org"});
  CHECK(c.policy == "dane");
  // mx1 fails before the greeting: mx2 (no TLSA) is tried with the usual policy.
  b.t.open.erase(c.id);
  s.onSessionEnded(c.id, SessionFailure{0, "", "connection refused"});
  REQUIRE(b.t.connects.size() == 2);
  CHECK(b.t.connects[1].host == "mx2.example.org");
  CHECK_FALSE(b.t.connects[1].dane);
  CHECK(b.t.connects[1].tls == TlsPolicy::Opportunistic);
  b.deliverAll(3);
  s.flush();
  REQUIRE(b.q.recorded.size() == 1);
  CHECK(b.q.recorded[0].attempt.tlsPolicy == "opportunistic (delivery.tls)");
  CHECK(b.q.rcpt("m1", 0).state == RecipientState::Delivered);
}

TEST_CASE("scheduler: MTA-STS enforce skips hosts the policy does not list and verifies the others") {
  Bed b;
  b.settings.recipientTlsPolicy = true;
  b.settings.trustDnssec = true;  // delivery.dnssec: the signed routes count
  b.q.add("m1", {"a@example.org"}, b.now());
  Scheduler& s = b.start();
  s.tick();
  s.onRoute("example.org", routeTo({{"mx.attacker.example", {"192.0.2.30"}}, {"mx1.example.org", {"192.0.2.11"}}}));
  TlsPolicyInputs in;
  in.sts = stsPolicy(mtasts::Mode::Enforce, {"*.example.org"});
  s.onTlsPolicy("example.org", in);
  REQUIRE(b.t.connects.size() == 1);
  CHECK(b.t.connects[0].host == "mx1.example.org");
  CHECK(b.t.connects[0].tls == TlsPolicy::Verify);
  CHECK(b.t.connects[0].policy == "mta-sts enforce id=abc");
  b.deliverAll(3);
  s.flush();
  REQUIRE(b.q.recorded.size() == 1);
  CHECK(b.q.recorded[0].attempt.tlsPolicy == "mta-sts enforce id=abc");
}

TEST_CASE("scheduler: no host usable under the domain's TLS policy defers (4.7.5), never bounces") {
  Bed b;
  b.settings.recipientTlsPolicy = true;
  b.settings.trustDnssec = true;  // delivery.dnssec: the signed routes count
  b.q.add("m1", {"a@example.org"}, b.now());
  Scheduler& s = b.start();
  s.tick();
  s.onRoute("example.org", exampleMx());
  TlsPolicyInputs in;
  in.sts = stsPolicy(mtasts::Mode::Enforce, {"mx.elsewhere.example"});
  s.onTlsPolicy("example.org", in);
  s.flush();
  CHECK(b.t.connects.empty());
  CHECK(b.q.rcpt("m1", 0).state == RecipientState::Deferred);
  CHECK(b.q.rcpt("m1", 0).lastStatus.str() == "4.7.5");
  CHECK(b.q.rcpt("m1", 0).lastError.find("MTA-STS") != std::string::npos);
  CHECK_FALSE(b.q.rcpt("m1", 0).dsnPending);
}

TEST_CASE("scheduler: TLS-Required: No ignores DANE and MTA-STS; both kinds never share a connection") {
  Bed b;
  b.settings.recipientTlsPolicy = true;
  b.settings.trustDnssec = true;  // delivery.dnssec: the signed routes count
  b.q.add("m1", {"a@example.org"}, b.now());
  b.q.add("m2", {"b@example.org"}, b.now());
  b.q.msgs[1].tlsRequirement = queue::TlsRequirement::Optional;
  Scheduler& s = b.start();
  s.tick();
  s.onRoute("example.org", exampleMx());
  TlsPolicyInputs in;
  in.sts = stsPolicy(mtasts::Mode::Enforce, {"mx.elsewhere.example"});  // m1 cannot go
  s.onTlsPolicy("example.org", in);
  REQUIRE(b.t.connects.size() == 1);
  CHECK(b.t.connects[0].tls == TlsPolicy::Opportunistic);
  CHECK(b.t.connects[0].policy.empty());
  b.deliverAll(3);
  s.flush();
  CHECK(b.q.rcpt("m1", 0).state == RecipientState::Deferred);
  CHECK(b.q.rcpt("m2", 0).state == RecipientState::Delivered);
}

TEST_CASE("scheduler: REQUIRETLS goes to MX hosts from a signed zone, or listed by MTA-STS") {
  SUBCASE("DNSSEC") {
    Bed b;
    Scheduler& s = startRequireTls(b);
    s.onRoute("example.org", signedMx());
    s.onTlsPolicy("example.org", {});
    REQUIRE(b.t.connects.size() == 1);
    CHECK(b.t.connects[0].tls == TlsPolicy::Verify);
  }
  SUBCASE("MTA-STS testing lists only one of two hosts: not validated") {
    Bed b;
    Scheduler& s = startRequireTls(b);
    s.onRoute("example.org", routeTo({{"mx.other.example", {"192.0.2.30"}}, {"mx1.example.org", {"192.0.2.11"}}}));
    TlsPolicyInputs in;
    in.sts = stsPolicy(mtasts::Mode::Testing, {"*.example.org"});
    s.onTlsPolicy("example.org", in);
    s.flush();
    CHECK(b.t.connects.empty());
    CHECK(b.q.rcpt("m1", 0).lastStatus.str() == "5.7.10");
  }
  SUBCASE("MTA-STS enforce: the listed host") {
    Bed b;
    Scheduler& s = startRequireTls(b);
    s.onRoute("example.org", routeTo({{"mx.other.example", {"192.0.2.30"}}, {"mx1.example.org", {"192.0.2.11"}}}));
    TlsPolicyInputs in;
    in.sts = stsPolicy(mtasts::Mode::Enforce, {"*.example.org"});
    s.onTlsPolicy("example.org", in);
    REQUIRE(b.t.connects.size() == 1);
    CHECK(b.t.connects[0].host == "mx1.example.org");
    CHECK(b.t.connects[0].tls == TlsPolicy::Verify);
  }
}

TEST_CASE("destinationKey with a TLS policy: differs from the plain key and between policies") {
  Route r = exampleMx();
  TlsPolicyInputs none;
  TlsPolicyInputs sts;
  sts.sts = stsPolicy(mtasts::Mode::Enforce, {"mx.example.org"});
  const std::string plain = destinationKey(r, TlsPolicy::Opportunistic);
  const std::string withSts = destinationKey(r, TlsPolicy::Opportunistic, decideTls("example.org", r, sts));
  CHECK(withSts != plain);
  CHECK(withSts.find("mx.example.org=mta-sts/mta-sts enforce id=abc") != std::string::npos);
  sts.sts->id = "def";
  CHECK(destinationKey(r, TlsPolicy::Opportunistic, decideTls("example.org", r, sts)) != withSts);
}

TEST_CASE("scheduler: a route found for TLS-Required: No jobs alone never carries the domain's other jobs") {
  Bed b;
  b.settings.recipientTlsPolicy = true;
  b.settings.trustDnssec = true;  // delivery.dnssec: the signed routes count
  b.q.add("m1", {"a@example.org"}, b.now());
  b.q.msgs[0].tlsRequirement = queue::TlsRequirement::Optional;
  Scheduler& s = b.start();
  s.tick();
  s.onRoute("example.org", exampleMx());
  CHECK(b.t.tlsLookups.empty());  // nobody to apply it to
  REQUIRE(b.t.connects.size() == 1);  // still connecting: its destination lives on
  // A job that follows the policy arrives while that route is fresh: it is looked up.
  b.q.add("m2", {"b@example.org"}, b.now());
  b.clock.advance(std::chrono::seconds(1));
  s.tick();
  REQUIRE(b.t.resolves.size() == 2);
  s.onRoute("example.org", exampleMx());
  REQUIRE(b.t.tlsLookups.size() == 1);
  TlsPolicyInputs in;
  in.sts = stsPolicy(mtasts::Mode::Enforce, {"mx.example.org"});
  s.onTlsPolicy("example.org", in);
  REQUIRE(b.t.connects.size() == 2);
  CHECK(b.t.connects[1].tls == TlsPolicy::Verify);
  CHECK(b.t.connects[1].policy == "mta-sts enforce id=abc");
}

TEST_CASE("scheduler: without delivery.dnssec no route counts as signed (the AD bit is not trusted)") {
  Bed b;
  b.settings.recipientTlsPolicy = true;  // delivery.mta_sts on, delivery.dnssec off
  b.q.add("m1", {"a@example.org"}, b.now());
  Scheduler& s = b.start();
  s.tick();
  s.onRoute("example.org", signedMx());
  REQUIRE(b.t.tlsLookups.size() == 1);
  CHECK_FALSE(b.t.tlsLookups[0].second.mxSecure);
  for (const auto& h : b.t.tlsLookups[0].second.hosts) CHECK_FALSE(h.addressesSecure);
  CHECK(tlsaHosts(b.t.tlsLookups[0].second).empty());  // so no TLSA lookup either
  CHECK(tlsaHosts(signedMx()) == std::vector<std::string>{"mx1.example.org", "mx2.example.org"});
}

TEST_CASE("scheduler: TLS-RPT counts per Policy Domain: success once per session, TLS failures, ruled-out hosts") {
  SUBCASE("MTA-STS enforce: one success per session and domain, however many transactions") {
    Bed b;
    b.settings.recipientTlsPolicy = true;
    b.settings.tlsRpt = true;
    b.q.add("m1", {"a@example.org"}, b.now());
    b.q.add("m2", {"b@example.org"}, b.now());
    b.settings.maxPerDestination = 1;
    Scheduler& s = b.start();
    s.tick();
    s.onRoute("example.org", routeTo({{"mx.other.example", {"192.0.2.30"}}, {"mx1.example.org", {"192.0.2.11"}}}));
    TlsPolicyInputs in;
    in.sts = stsPolicy(mtasts::Mode::Enforce, {"*.example.org"});
    in.sts->text = "version: STSv1\nmode: enforce\nmx: *.example.org\nmax_age: 86400\n";
    s.onTlsPolicy("example.org", in);
    REQUIRE(b.t.connects.size() == 1);
    b.readyAll();
    b.answerAll(smtp::Outcome::Delivered);  // m1, then m2 on the same connection
    b.answerAll(smtp::Outcome::Delivered);
    auto rows = s.takeTlsRpt();
    // The host the policy does not list, once for the routing, and one successful session.
    int64_t ok = 0;
    const queue::TlsRptRow* ruledOut = nullptr;
    for (const auto& r : rows) {
      CHECK(r.domain == "example.org");
      CHECK(r.policyType == "sts");
      CHECK(r.mxHost == std::vector<std::string>{"*.example.org"});
      if (r.result.empty()) ok += r.sessions;
      else ruledOut = &r;
    }
    CHECK(ok == 1);
    REQUIRE(ruledOut);
    CHECK(ruledOut->result == "validation-failure");
    CHECK(ruledOut->receivingMx == "mx.other.example");
    CHECK(s.takeTlsRpt().empty());
  }
  SUBCASE("a TLS failure before the session was ready is reported; a refused connection is not") {
    Bed b;
    b.settings.recipientTlsPolicy = true;
    b.settings.tlsRpt = true;
    b.q.add("m1", {"a@example.org"}, b.now());
    Scheduler& s = b.start();
    s.tick();
    s.onRoute("example.org", routeTo({{"mx1.example.org", {"192.0.2.11", "192.0.2.12", "192.0.2.13"}}}));
    s.onTlsPolicy("example.org", {});  // nothing found: "no-policy-found"
    REQUIRE(b.t.connects.size() == 1);
    s.onSessionEnded(b.t.connects[0].id, SessionFailure{0, "4.4.1", "connect to 192.0.2.11:25: refused", "connect"});
    REQUIRE(b.t.connects.size() == 2);
    s.onSessionEnded(b.t.connects[1].id,
                     SessionFailure{0, "4.7.5",
                                    "TLS handshake failed: handshake: certificate verification failed: certificate has expired",
                                    "starttls"});
    REQUIRE(b.t.connects.size() == 3);
    s.onReady(b.t.connects[2].id, "TLSv1.3", "TLS_AES_128_GCM_SHA256");
    b.answerAll(smtp::Outcome::Delivered);
    auto rows = s.takeTlsRpt();
    REQUIRE(rows.size() == 2);
    for (const auto& r : rows) {
      CHECK(r.policyType == "no-policy-found");
      if (!r.result.empty()) {
        CHECK(r.result == "certificate-expired");
        CHECK(r.receivingIp == "192.0.2.12");
        CHECK(r.receivingMx == "mx1.example.org");
      }
    }
  }
  SUBCASE("off, or a plaintext session: nothing counted") {
    Bed b;
    b.settings.recipientTlsPolicy = true;
    b.q.add("m1", {"a@example.org"}, b.now());
    Scheduler& s = b.start();
    s.tick();
    s.onRoute("example.org", exampleMx());
    s.onTlsPolicy("example.org", {});
    b.readyAll();
    b.answerAll(smtp::Outcome::Delivered);
    CHECK(s.takeTlsRpt().empty());

    Bed c;
    c.settings.recipientTlsPolicy = true;
    c.settings.tlsRpt = true;
    c.q.add("m1", {"a@example.org"}, c.now());
    Scheduler& s2 = c.start();
    s2.tick();
    s2.onRoute("example.org", exampleMx());
    s2.onTlsPolicy("example.org", {});
    REQUIRE(c.t.connects.size() == 1);
    s2.onReady(c.t.connects[0].id, "", "");  // no TLS
    c.answerAll(smtp::Outcome::Delivered);
    CHECK(s2.takeTlsRpt().empty());
  }
}

TEST_CASE("scheduler: an MTA-STS enforce policy that rules out every MX host asks for a recheck (RFC 8461 5.1)") {
  Bed b;
  b.settings.recipientTlsPolicy = true;
  b.q.add("m1", {"a@example.org"}, b.now());
  b.q.add("m2", {"b@example.org"}, b.now());
  Scheduler& s = b.start();
  s.tick();
  s.onRoute("example.org", exampleMx());
  TlsPolicyInputs in;
  in.sts = stsPolicy(mtasts::Mode::Enforce, {"mx.elsewhere.example"});
  s.onTlsPolicy("example.org", in);
  s.flush();
  CHECK(b.t.connects.empty());
  CHECK(b.q.rcpt("m1", 0).lastStatus.str() == "4.7.5");
  CHECK(b.t.stsRechecks == std::vector<std::string>{"example.org"});  // once for both jobs

  // A TLSA lookup failure is not an MTA-STS matter: no recheck.
  Bed c;
  c.settings.recipientTlsPolicy = true;
  c.settings.trustDnssec = true;
  c.q.add("m1", {"a@example.org"}, c.now());
  Scheduler& s2 = c.start();
  s2.tick();
  Route r = exampleMx();
  r.mxSecure = true;
  r.hosts[0].addressesSecure = true;
  s2.onRoute("example.org", r);
  TlsPolicyInputs bad;
  bad.tlsa.push_back({"mx.example.org", dns::Status::ServFail, false, {}});
  s2.onTlsPolicy("example.org", bad);
  CHECK(c.t.connects.empty());
  CHECK(c.t.stsRechecks.empty());
}

// ---- DSN extension (RFC 3461): makeDsn honours NOTIFY and RET ----------------------------

namespace {
queue::MessageInfo dsnWork() {
  queue::MessageInfo m;
  m.id = "00000000000d5a01";
  m.account = "shop";
  m.mailFrom = "app@shop.example";
  m.receivedAt = 1'800'000'000;
  m.dsnEnvid = "ORDER+2B7";
  auto rcpt = [&](int64_t idx, std::string addr, RecipientState st, int notify) {
    queue::RecipientInfo r;
    r.index = idx;
    r.address = std::move(addr);
    r.state = st;
    r.dsn.notify = notify;
    r.lastError = st == RecipientState::Failed ? "550 5.1.1 no such user" : "";
    m.recipients.push_back(std::move(r));
  };
  rcpt(0, "failed@example.org", RecipientState::Failed, 0);
  rcpt(1, "ok@example.org", RecipientState::Delivered, queue::kDsnNotifySuccess);
  rcpt(2, "quiet@example.org", RecipientState::Failed, queue::kDsnNotifyNever);
  m.recipients[1].dsn.orcpt = "rfc822;ok@example.org";
  return m;
}
const std::string kOriginal = "Subject: order\r\nFrom: app@shop.example\r\n\r\nsecret body\r\n";
}  // namespace

TEST_CASE("makeDsn: NOTIFY picks the recipients, a delivery is reported relayed") {
  SchedulerSettings settings;
  settings.hostname = "relay.example.net";
  auto dsn = makeDsn(dsnWork(), {}, kOriginal, false, settings, 1'800'000'100, "00000000000d5a02");
  REQUIRE(dsn.has_value());
  CHECK(dsn->recipients == std::vector<std::string>{"app@shop.example"});
  CHECK(dsn->isDsn);
  const std::string& c = dsn->content;
  CHECK(c.find("Final-Recipient: rfc822; failed@example.org") != std::string::npos);
  CHECK(c.find("Final-Recipient: rfc822; ok@example.org") != std::string::npos);
  CHECK(c.find("Original-Recipient: rfc822; ok@example.org") != std::string::npos);
  CHECK(c.find("Action: relayed") != std::string::npos);
  CHECK(c.find("Action: failed") != std::string::npos);
  CHECK(c.find("quiet@example.org") == std::string::npos);  // NOTIFY=NEVER
  CHECK(c.find("Original-Envelope-Id: ORDER+7") != std::string::npos);
  CHECK(c.find("secret body") == std::string::npos);  // no RET: headers only
  CHECK(c.find("Subject: Undelivered Mail Returned to Sender") != std::string::npos);
}

TEST_CASE("makeDsn: RET=FULL returns the body with a failure, never with a success only") {
  SchedulerSettings settings;
  settings.hostname = "relay.example.net";
  auto m = dsnWork();
  m.dsnRet = queue::DsnRet::Full;
  auto dsn = makeDsn(m, {}, kOriginal, false, settings, 1'800'000'100, "00000000000d5a03");
  REQUIRE(dsn.has_value());
  CHECK(dsn->content.find("secret body") != std::string::npos);
  CHECK(dsn->content.find("Content-Type: message/rfc822") != std::string::npos);
  m.recipients.erase(m.recipients.begin());  // only the delivered and the NEVER one
  auto ok = makeDsn(m, {}, kOriginal, false, settings, 1'800'000'100, "00000000000d5a04");
  REQUIRE(ok.has_value());
  CHECK(ok->content.find("secret body") == std::string::npos);
  CHECK(ok->content.find("Subject: Successful Mail Delivery Report") != std::string::npos);
}

TEST_CASE("makeDsn: nothing when no recipient wants this kind of notice") {
  SchedulerSettings settings;
  settings.hostname = "relay.example.net";
  auto m = dsnWork();
  m.recipients.erase(m.recipients.begin(), m.recipients.begin() + 2);  // only NOTIFY=NEVER
  CHECK_FALSE(makeDsn(m, {}, kOriginal, false, settings, 1'800'000'100, "00000000000d5a05").has_value());
  auto d = dsnWork();
  for (auto& r : d.recipients) {
    r.state = RecipientState::Deferred;
    r.dsn.notify = queue::kDsnNotifyFailure;  // no DELAY
  }
  CHECK_FALSE(makeDsn(d, {}, kOriginal, true, settings, 1'800'000'100, "00000000000d5a06").has_value());
  d.recipients[0].dsn.notify = 0;  // the default includes delay notices
  auto delay = makeDsn(d, {}, kOriginal, true, settings, 1'800'000'100, "00000000000d5a07");
  REQUIRE(delay.has_value());
  CHECK(delay->content.find("failed@example.org") != std::string::npos);
  CHECK(delay->content.find("ok@example.org") == std::string::npos);
}

TEST_CASE("scheduler: DSN parameters go to the transport; a success DSN is owed only when not passed on") {
  for (bool passedOn : {false, true}) {
    CAPTURE(passedOn);
    Bed b;
    b.q.add("m1", {"a@example.org", "b@example.org"}, b.now());
    b.q.msgs[0].dsnRet = queue::DsnRet::Full;
    b.q.msgs[0].dsnEnvid = "ENV+2B1";
    b.q.rcpt("m1", 0).dsn = queue::RecipientDsn{queue::kDsnNotifySuccess | queue::kDsnNotifyFailure, "rfc822;A@example.org"};
    b.startReady();
    REQUIRE(b.t.sending.size() == 1);
    auto [id, m] = *b.t.sending.begin();
    b.t.sending.clear();
    CHECK(m.dsnRet == "FULL");
    CHECK(m.envId == "ENV+2B1");
    REQUIRE(m.rcptDsn.size() == 2);
    CHECK(m.rcptDsn[0].notify == (queue::kDsnNotifySuccess | queue::kDsnNotifyFailure));
    CHECK(m.rcptDsn[0].orcpt == "rfc822;A@example.org");
    CHECK(m.rcptDsn[1].notify == 0);
    std::vector<smtp::RecipientResult> rs;
    for (const auto& r : m.recipients) {
      rs.push_back(result(r, smtp::Outcome::Delivered, 250, "2.0.0", "ok"));
      rs.back().dsnPassedOn = passedOn;
    }
    b.s->onTransactionDone(id, rs);
    b.s->flush();
    REQUIRE(b.q.recorded.size() == 2);
    CHECK(b.q.recorded[0].successDsn == !passedOn);  // NOTIFY=SUCCESS
    CHECK_FALSE(b.q.recorded[1].successDsn);         // no NOTIFY
  }
}

TEST_CASE("scheduler: a hard bounce marks its record for the account's suppression list; others do not") {
  auto staged = [](smtp::RecipientResult rr, const char* stage) {
    rr.stage = stage;
    return rr;
  };
  SUBCASE("on: 5.1.1 at RCPT and 5.2.1 after the data are suppressed, with the ttl") {
    Bed b;
    b.settings.suppressionTtl = std::chrono::hours(1);
    b.q.add("m1", {"Gone@Example.ORG", "full@example.org", "spam@example.org", "off@example.org", "later@example.org"},
            b.now());
    Scheduler& s = b.startReady();
    auto [id, m] = *b.t.sending.begin();
    b.t.sending.clear();
    s.onTransactionDone(
        id, {staged(result("Gone@Example.ORG", smtp::Outcome::PermFail, 550, "5.1.1", "no such  user"), "rcpt"),
             staged(result("full@example.org", smtp::Outcome::PermFail, 552, "5.2.2", "mailbox full"), "rcpt"),
             staged(result("spam@example.org", smtp::Outcome::PermFail, 550, "5.7.1", "spam"), "rcpt"),
             staged(result("off@example.org", smtp::Outcome::PermFail, 550, "5.2.1", "disabled"), "data-end"),
             staged(result("later@example.org", smtp::Outcome::TempFail, 450, "4.1.1", "try later"), "rcpt")});
    s.flush();
    REQUIRE(b.q.recorded.size() == 5);
    std::map<int64_t, const queue::AttemptRecord*> by;
    for (const auto& r : b.q.recorded) by[r.index] = &r;
    REQUIRE(by[0]->suppress.has_value());
    CHECK(by[0]->suppress->account == "acct");
    CHECK(by[0]->suppress->address == "Gone@example.org");
    CHECK(by[0]->suppress->reason == "550 5.1.1 no such user");
    CHECK(by[0]->suppress->source == "bounce");
    CHECK(by[0]->suppress->expiresAt == by[0]->suppress->createdAt + 3600);
    CHECK_FALSE(by[1]->suppress.has_value());
    CHECK_FALSE(by[2]->suppress.has_value());
    REQUIRE(by[3]->suppress.has_value());
    CHECK(by[3]->suppress->address == "off@example.org");
    CHECK_FALSE(by[4]->suppress.has_value());
  }
  SUBCASE("off for the account: nothing is marked") {
    Bed b;
    b.settings.suppressionOff.insert("acct");
    b.q.add("m1", {"gone@example.org"}, b.now());
    Scheduler& s = b.startReady();
    auto [id, m] = *b.t.sending.begin();
    b.t.sending.clear();
    s.onTransactionDone(id, {staged(result("gone@example.org", smtp::Outcome::PermFail, 550, "5.1.1", "no"), "rcpt")});
    s.flush();
    REQUIRE(b.q.recorded.size() == 1);
    CHECK(b.q.recorded[0].newState == RecipientState::Failed);
    CHECK_FALSE(b.q.recorded[0].suppress.has_value());
  }
}
