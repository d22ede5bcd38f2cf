// metrics/: the registry and its two text formats, the HTTP routes, the exporter on a
// real socket; util/log: structured events in both formats.
#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>
#include <thread>
#include <vector>

#include "metrics/http_exporter.h"
#include "metrics/registry.h"
#include "metrics/server_metrics.h"
#include "util/log.h"

using namespace subrelay;
using namespace subrelay::metrics;

namespace {
bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }
}  // namespace

TEST_CASE("Registry: counters, gauges and label escaping in the Prometheus text format") {
  Registry r;
  auto& c = r.counter("demo_requests_total", "Requests\nby code", {"code"});
  c.with("200").inc();
  c.with("200").inc(2);
  c.with("a\"b\\c\nd").inc();
  auto& g = r.gauge("demo_open", "Open things");
  g.get().set(3);
  g.get().add(-1.5);
  const std::string out = r.render(Format::Prometheus);
  CHECK(contains(out, "# HELP demo_requests_total Requests\\nby code\n"));
  CHECK(contains(out, "# TYPE demo_requests_total counter\n"));
  CHECK(contains(out, "demo_requests_total{code=\"200\"} 3\n"));
  CHECK(contains(out, "demo_requests_total{code=\"a\\\"b\\\\c\\nd\"} 1\n"));
  CHECK(contains(out, "# TYPE demo_open gauge\ndemo_open 1.5\n"));
  CHECK_FALSE(contains(out, "# EOF"));
}

TEST_CASE("Registry: OpenMetrics drops _total from the family name and ends with # EOF") {
  Registry r;
  r.counter("demo_sent_total", "Sent").get().inc(7);
  const std::string out = r.render(Format::OpenMetrics);
  CHECK(contains(out, "# TYPE demo_sent counter\n"));
  CHECK(contains(out, "demo_sent_total 7\n"));
  CHECK(out.size() >= 6);
  CHECK(out.substr(out.size() - 6) == "# EOF\n");
}

TEST_CASE("Histogram: cumulative buckets, +Inf, sum and count") {
  Registry r;
  auto& h = r.histogram("demo_seconds", "Latency", {0.1, 1}, {"op"});
  h.with("x").observe(0.05);
  h.with("x").observe(0.1);  // le is inclusive
  h.with("x").observe(0.5);
  h.with("x").observe(5);
  const std::string out = r.render(Format::Prometheus);
  CHECK(contains(out, "demo_seconds_bucket{op=\"x\",le=\"0.10000000000000001\"} 2\n"));
  CHECK(contains(out, "demo_seconds_bucket{op=\"x\",le=\"1\"} 3\n"));
  CHECK(contains(out, "demo_seconds_bucket{op=\"x\",le=\"+Inf\"} 4\n"));
  CHECK(contains(out, "demo_seconds_count{op=\"x\"} 4\n"));
  CHECK(contains(out, "demo_seconds_sum{op=\"x\"} 5.6500000000000004\n"));
}

TEST_CASE("Family: label sets beyond the bound share one _other child") {
  Registry r;
  auto& c = r.counter("demo_total", "Bounded", {"account"}, 3);
  for (int i = 0; i < 10; ++i) c.with("acct" + std::to_string(i)).inc();
  CHECK(c.size() == 4);  // three own children + _other
  const std::string out = r.render(Format::Prometheus);
  CHECK(contains(out, "demo_total{account=\"_other\"} 7\n"));
  CHECK(contains(out, "demo_total{account=\"acct0\"} 1\n"));
}

TEST_CASE("Registry: collectors run before every render") {
  Registry r;
  auto& g = r.gauge("demo_now", "Set at scrape");
  int calls = 0;
  r.onCollect([&] { g.get().set(++calls); });
  CHECK(contains(r.render(Format::Prometheus), "demo_now 1\n"));
  CHECK(contains(r.render(Format::Prometheus), "demo_now 2\n"));
}

TEST_CASE("statusLabel keeps RFC 3463 codes and folds the rest into other") {
  CHECK(statusLabel("5.7.1") == "5.7.1");
  CHECK(statusLabel("4.3.1") == "4.3.1");
  CHECK(statusLabel("5.1.10") == "5.1.10");
  CHECK(statusLabel("") == "other");
  CHECK(statusLabel("5.7") == "other");
  CHECK(statusLabel("5.7.1.2") == "other");
  CHECK(statusLabel("x.y.z") == "other");
  CHECK(statusLabel("5.1234.1") == "other");
}

TEST_CASE("ServerMetrics: every family is exported with the subrelay_ prefix") {
  Registry r;
  ServerMetrics m(r);
  m.messagesAccepted.with("shop").inc();
  const std::string out = r.render(Format::Prometheus);
  CHECK(contains(out, "subrelay_messages_accepted_total{account=\"shop\"} 1\n"));
  CHECK(contains(out, "# TYPE subrelay_delivery_latency_seconds histogram\n"));
  CHECK(contains(out, "subrelay_smtp_connections_open 0\n"));
}

TEST_CASE("route(): paths, methods and content negotiation") {
  Endpoints ep;
  ep.metrics = [](Format f) { return f == Format::OpenMetrics ? std::string("om\n") : std::string("prom\n"); };
  std::string why;
  ep.notReady = [&] { return why; };
  auto r = route({"GET", "/metrics", ""}, ep);
  CHECK(r.status == 200);
  CHECK(r.body == "prom\n");
  CHECK(r.contentType == "text/plain; version=0.0.4; charset=utf-8");
  r = route({"GET", "/metrics", "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"}, ep);
  CHECK(r.body == "om\n");
  CHECK(r.contentType == "application/openmetrics-text; version=1.0.0; charset=utf-8");
  CHECK(route({"HEAD", "/healthz", ""}, ep).status == 200);
  CHECK(route({"GET", "/readyz", ""}, ep).status == 200);
  why = "queue not writable";
  r = route({"GET", "/readyz", ""}, ep);
  CHECK(r.status == 503);
  CHECK(r.body == "not ready: queue not writable\n");
  CHECK(route({"POST", "/metrics", ""}, ep).status == 405);
  CHECK(route({"GET", "/", ""}, ep).status == 404);
  CHECK(route({"GET", "/metrics/../etc", ""}, ep).status == 404);
}

namespace {
std::string httpGet(uint16_t port, const std::string& request) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  REQUIRE(::write(fd, request.data(), request.size()) == static_cast<ssize_t>(request.size()));
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(fd, buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(n));
  ::close(fd);
  return out;
}
}  // namespace

TEST_CASE("HttpExporter: serves the routes on a real socket and refuses a busy address") {
  Registry r;
  r.counter("demo_hits_total", "Hits").get().inc(4);
  Endpoints ep;
  ep.metrics = [&](Format f) { return r.render(f); };
  ep.notReady = [] { return std::string(); };
  auto ex = HttpExporter::start("127.0.0.1", 0, ep);
  REQUIRE(ex.ok());
  const uint16_t port = ex.value()->port();
  CHECK(port != 0);
  std::string resp = httpGet(port, "GET /metrics HTTP/1.0\r\n\r\n");
  CHECK(contains(resp, " 200 OK\r\n"));
  CHECK(contains(resp, "demo_hits_total 4\n"));
  resp = httpGet(port, "GET /metrics HTTP/1.0\r\nAccept: application/openmetrics-text\r\n\r\n");
  CHECK(contains(resp, "# EOF\n"));
  resp = httpGet(port, "GET /nope HTTP/1.0\r\n\r\n");
  CHECK(contains(resp, " 404 "));
  // Request headers beyond the memory limit are refused, not buffered.
  resp = httpGet(port, "GET /healthz HTTP/1.0\r\nX-Long: " + std::string(64 * 1024, 'a') + "\r\n\r\n");
  CHECK_FALSE(contains(resp, " 200 "));
  // The exporter still answers after that.
  CHECK(contains(httpGet(port, "GET /healthz HTTP/1.0\r\n\r\n"), "ok\n"));
  auto second = HttpExporter::start("127.0.0.1", port, ep);
  REQUIRE_FALSE(second.ok());
  CHECK(contains(second.error().message, "cannot listen on 127.0.0.1:" + std::to_string(port) + " for metrics"));
  CHECK(contains(second.error().message, "change metrics.address"));
}

TEST_CASE("LogEvent: the text form keeps the old keys, the json form has stable names") {
  util::LogEvent e(util::LogLevel::Info, "delivery", "delivered");
  e.queueId("Q1").recipient("a@b.example").mx("mx.b.example").tls("TLSv1.3").number("attempt", 2);
  e.status("2.0.0").reply("250 ok \"queued\"\r\nx");
  CHECK(e.render(util::LogFormat::Text, "T") ==
        "T info delivery: delivered id=Q1 rcpt=<a@b.example> mx=mx.b.example tls=TLSv1.3 attempt=2 status=2.0.0 "
        "reply=\"250 ok \"queued\"\\x0d\\x0ax\"");
  CHECK(e.render(util::LogFormat::Json, "T") ==
        "{\"time\":\"T\",\"level\":\"info\",\"component\":\"delivery\",\"event\":\"delivered\",\"queue_id\":\"Q1\","
        "\"recipient\":\"a@b.example\",\"mx\":\"mx.b.example\",\"tls\":\"TLSv1.3\",\"attempt\":2,"
        "\"status\":\"2.0.0\",\"reply\":\"250 ok \\\"queued\\\"\\\\x0d\\\\x0ax\"}");
  util::LogEvent w(util::LogLevel::Warn, "smtpd", "refused");
  w.client("::1").mx("").tls("");
  CHECK(w.render(util::LogFormat::Json, "T") ==
        "{\"time\":\"T\",\"level\":\"warn\",\"component\":\"smtpd\",\"event\":\"refused\",\"client\":\"::1\","
        "\"mx\":\"-\",\"tls\":\"none\"}");
  CHECK(util::parseLogLevel("warn") == util::LogLevel::Warn);
  CHECK(util::parseLogLevel("warning") == util::LogLevel::Warn);
  CHECK(util::parseLogLevel("error") == util::LogLevel::Error);
}

// ---- metrics/status.h: what serve publishes for `subrelay status`, and how it is shown.

#include "metrics/status.h"

TEST_CASE("status snapshot: serialize and parse round trip; damaged files are refused") {
  ServerSnapshot s;
  s.pid = 4242;
  s.version = "0.1.0";
  s.startedAt = 1'800'000'000;
  s.updatedAt = 1'800'000'100;
  s.listeners = {{"[::]:587", "starttls"}, {"127.0.0.1:465", "implicit"}};
  s.metricsAddress = "127.0.0.1:9587";
  s.sessions = 3;
  s.deliveryConnections = 2;
  s.acceptedTotal = 100;
  s.deliveredTotal = 90;
  s.acceptedLastMinute = 10;
  s.deliveredLastMinute = 9;
  s.accounts = {{"shop", 80, 8}, {"ci\tx", 20, 2}};  // a tab cannot break the format
  const std::string text = serialize(s);
  auto p = parseSnapshot(text);
  REQUIRE(p);
  CHECK(p->pid == 4242);
  CHECK(p->listeners == s.listeners);
  CHECK(p->metricsAddress == "127.0.0.1:9587");
  CHECK(p->sessions == 3);
  CHECK(p->deliveredLastMinute == 9);
  REQUIRE(p->accounts.size() == 2);
  CHECK(p->accounts[1].account == "ci x");
  CHECK(p->accounts[1].total == 20);
  CHECK_FALSE(parseSnapshot(""));
  CHECK_FALSE(parseSnapshot(text.substr(0, text.size() / 2)));  // cut short: no "end"
  CHECK_FALSE(parseSnapshot("something else\nend\n"));
  std::string bad = text;
  bad.replace(bad.find("sessions\t3"), 10, "sessions\tx");
  CHECK_FALSE(parseSnapshot(bad));
  // A newer writer's extra keys are skipped.
  std::string newer = text;
  newer.insert(newer.find("end\n"), "future_key\t1\n");
  CHECK(parseSnapshot(newer));
}

TEST_CASE("RecentCounts: the last minute from cumulative samples") {
  RecentCounts rc;
  RecentCounts::Totals t;
  t.accepted = 100;
  t.delivered = 50;
  t.perAccount = {{"shop", 100}};
  rc.sample(0, t);
  // One sample: the totals (the process is younger than a minute).
  CHECK(rc.lastMinute().accepted == 100);
  for (int s = 1; s <= 90; ++s) {
    t.accepted += 2;
    t.delivered += 1;
    t.perAccount["shop"] += 1;
    t.perAccount["ci"] += 1;
    rc.sample(s * 1000, t);
  }
  auto m = rc.lastMinute();
  // The base is the newest sample at least 60 s old: 60 s of traffic.
  CHECK(m.accepted == 120);
  CHECK(m.delivered == 60);
  CHECK(m.perAccount["shop"] == 60);
  CHECK(m.perAccount["ci"] == 60);
  ServerSnapshot s;
  fillCounts(s, rc);
  CHECK(s.acceptedTotal == 280);
  CHECK(s.acceptedLastMinute == 120);
  REQUIRE(s.accounts.size() == 2);
  CHECK(s.accounts[0].account == "shop");  // same last minute: the larger total first
  CHECK(s.accounts[0].total == 190);
}

TEST_CASE("status rendering: text and JSON, running and not") {
  StatusReport r;
  r.now = 1'800'003'700;
  r.queued = 2;
  r.deferred = 5;
  r.inFlight = 1;
  r.oldestReceivedAt = 1'800'000'000;
  r.receivedLastHour = 40;
  r.capturedLastHour = 4;
  r.queueAccounts = {{"shop", 36, 0}, {"ci", 4, 0}};
  r.notRunningWhy = "no /var/lib/subrelay/status; serve writes it while it runs";
  std::string text = renderText(r);
  CHECK(text.find("subrelay: not running (no /var/lib/subrelay/status") == 0);
  CHECK(text.find("queue: 2 queued, 5 deferred, 1 in flight; oldest 1h 1m (received 2027-01-15T08:00:00Z)") !=
        std::string::npos);
  CHECK(text.find("top senders (messages in the last hour): shop 36 ci 4") != std::string::npos);
  std::string json = renderJson(r);
  CHECK(json.find("\"running\":false") != std::string::npos);
  CHECK(json.find("\"queue\":{\"queued\":2,\"deferred\":5,\"in_flight\":1,\"oldest_age_seconds\":3700}") !=
        std::string::npos);

  ServerSnapshot s;
  s.pid = 7;
  s.version = "0.1.0";
  s.startedAt = r.now - 90061;
  s.updatedAt = r.now;
  s.listeners = {{"[::]:587", "starttls"}};
  s.accounts = {{"shop", 500, 12}};
  s.acceptedLastMinute = 12;
  r.server = s;
  r.running = true;
  text = renderText(r);
  CHECK(text.find("subrelay 0.1.0: running, pid 7, up 1d 1h") == 0);
  CHECK(text.find("listeners: [::]:587 (starttls)\n") != std::string::npos);
  CHECK(text.find("top senders (last minute / since start): shop 12/500") != std::string::npos);
  json = renderJson(r);
  CHECK(json.find("\"running\":true,\"pid\":7") != std::string::npos);
  CHECK(json.find("\"uptime_seconds\":90061") != std::string::npos);
  CHECK(json.find("\"top_senders\":[{\"account\":\"shop\",\"accepted_last_minute\":12,\"accepted_total\":500}]") !=
        std::string::npos);
  CHECK(formatAge(5) == "5s");
  CHECK(formatAge(65) == "1m 5s");
  CHECK(formatAge(7260) == "2h 1m");
  CHECK(formatAge(-3) == "0s");
}

TEST_CASE("judgeServer: running only with a status file, a live pid and a fresh report") {
  ServerSnapshot s;
  s.pid = 99;
  s.updatedAt = 1000;
  StatusReport r;
  r.now = 1010;
  judgeServer(r, std::nullopt, false, false, "/d/status");
  CHECK_FALSE(r.running);
  CHECK(r.notRunningWhy == "no /d/status; serve writes it while it runs");
  judgeServer(r, std::nullopt, true, false, "/d/status");
  CHECK(r.notRunningWhy == "/d/status is not a status file");
  judgeServer(r, s, true, false, "/d/status");
  CHECK(r.notRunningWhy == "pid 99 is gone; it last reported 10s ago");
  CHECK(r.server);  // the last snapshot is kept for the JSON
  r.now = 1000 + kStaleAfterSeconds + 1;
  judgeServer(r, s, true, true, "/d/status");
  CHECK(r.notRunningWhy == "pid 99 has not reported for 31s (hung or stopped?)");
  r.now = 1000 + kStaleAfterSeconds;
  judgeServer(r, s, true, true, "/d/status");
  CHECK(r.running);
  CHECK(r.notRunningWhy.empty());
}

TEST_CASE("fillRecent: totals and the busiest accounts first, at most kTopAccounts") {
  std::vector<AccountCount> per;
  for (int i = 0; i < 12; ++i) per.push_back({"a" + std::to_string(i), static_cast<uint64_t>(i), 0});
  StatusReport r;
  fillRecent(r, per, 3);
  CHECK(r.receivedLastHour == 66);
  CHECK(r.capturedLastHour == 3);
  REQUIRE(r.queueAccounts.size() == kTopAccounts);
  CHECK(r.queueAccounts.front().account == "a11");
  CHECK(r.queueAccounts.back().account == "a2");
}
