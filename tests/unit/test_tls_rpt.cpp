// delivery/tls_rpt.h and tls_rpt_reporter.h: SMTP TLS Reporting (RFC 8460): result types,
// the bounded collector, the "_smtp._tls" record, the JSON report and its mail, and the
// reporter against an in-memory queue and a scripted resolver.
#include <doctest/doctest.h>
#include <zlib.h>

#include <deque>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "delivery/tls_policy.h"
#include "delivery/tls_rpt.h"
#include "delivery/tls_rpt_reporter.h"
#include "queue/sqlite_store.h"
#include "util/base64.h"

using namespace subrelay;
using namespace subrelay::delivery;
using namespace subrelay::delivery::tlsrpt;

namespace {

constexpr int64_t kDay = 1764633600;  // 2025-12-02T00:00:00Z

std::string gunzip(const std::string& in) {
  z_stream zs{};
  REQUIRE(inflateInit2(&zs, 15 + 16) == Z_OK);
  std::string out(1 << 20, '\0');
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(in.data()));
  zs.avail_in = static_cast<uInt>(in.size());
  zs.next_out = reinterpret_cast<Bytef*>(out.data());
  zs.avail_out = static_cast<uInt>(out.size());
  const int rc = inflate(&zs, Z_FINISH);
  out.resize(zs.total_out);
  inflateEnd(&zs);
  REQUIRE(rc == Z_STREAM_END);
  return out;
}

ReportMeta meta() {
  ReportMeta m;
  m.organization = "Example Relay";
  m.contact = "tlsrpt@relay.example.net";
  m.from = "tlsrpt@relay.example.net";
  m.hostname = "relay.example.net";
  return m;
}

// Report settings with an Ed25519 key for the From domain (relay.example.net).
ReporterSettings signingSettings() {
  auto key = dkim::generateKey(dkim::Algorithm::Ed25519Sha256);
  REQUIRE(key.ok());
  auto ring = std::make_shared<dkim::KeyRing>();
  ring->add(dkim::SignerKey{"relay.example.net", "s1", key.value()});
  ReporterSettings rs;
  rs.meta = meta();
  rs.keys = ring;
  rs.signer = std::make_shared<dkim::LocalSigner>();
  return rs;
}

Policy stsPolicy() {
  return Policy{"sts", {"version: STSv1", "mode: enforce", "mx: mx.example.com", "max_age: 86400"}, {"mx.example.com"}};
}

// Answers TXT queries from a table; synchronously (the Reporter does not rely on the
// answer coming later).
class ScriptedResolver final : public dns::Resolver {
 public:
  std::map<std::string, dns::Answer> answers;
  std::vector<std::string> asked;
  void query(const std::string& name, dns::QType, dns::Callback cb) override {
    asked.push_back(name);
    auto it = answers.find(name);
    if (it != answers.end()) {
      cb(it->second);
    } else {
      dns::Answer a;
      a.status = dns::Status::NxDomain;
      cb(a);
    }
  }
};

dns::Answer txt(std::vector<std::string> texts) {
  dns::Answer a;
  a.status = dns::Status::Ok;
  a.texts = std::move(texts);
  return a;
}

}  // namespace

TEST_CASE("tls-rpt: result types from how the session failed (RFC 8460 4.3)") {
  CHECK_FALSE(classify("connect", "", "connect to mx: connection refused"));
  CHECK_FALSE(classify("mail", "5.7.1", "550 no"));
  auto f = classify("starttls", "4.7.10", "TLS required but the server does not offer STARTTLS");
  REQUIRE(f);
  CHECK(f->result == "starttls-not-supported");
  f = classify("starttls", "4.7.5", "TLS handshake failed: handshake: certificate verification failed: certificate has expired");
  REQUIRE(f);
  CHECK(f->result == "certificate-expired");
  CHECK(f->reason == "handshake: certificate verification failed: certificate has expired");
  f = classify("starttls", "4.7.5", "TLS handshake failed: handshake: certificate verification failed: Hostname mismatch");
  CHECK(f->result == "certificate-host-mismatch");
  f = classify("starttls", "4.7.5",
               "TLS handshake failed: handshake: certificate verification failed: unable to get local issuer certificate");
  CHECK(f->result == "certificate-not-trusted");
  f = classify("starttls", "4.7.5", "TLS handshake failed: handshake: DANE verification failed: no TLSA record matched");
  CHECK(f->result == "tlsa-invalid");
  f = classify("starttls", "4.7.5", "TLS handshake failed: handshake: peer sent alert handshake_failure");
  CHECK(f->result == "validation-failure");
  f = classify("starttls", "4.7.0", "454 4.7.0 TLS not available due to temporary reason");
  CHECK(f->result == "starttls-not-supported");
}

TEST_CASE("tls-rpt: days, and the report time after midnight (RFC 8460 4.1)") {
  CHECK(dayStart(kDay) == kDay);
  CHECK(dayStart(kDay + 86399) == kDay);
  CHECK(dayStart(kDay + 86400) == kDay + 86400);
  CHECK(reportTime(kDay, 0, 42) == kDay);
  bool differs = false;
  for (uint64_t r = 0; r < 50; ++r) {
    const int64_t t = reportTime(kDay, 4 * 3600, r);
    CHECK(t >= kDay);
    CHECK(t < kDay + 4 * 3600);
    if (t != reportTime(kDay, 4 * 3600, 0)) differs = true;
  }
  CHECK(differs);
}

TEST_CASE("tls-rpt: days on the command line") {
  CHECK(parseDay("2025-12-02", 0) == kDay);
  CHECK(parseDay("1970-01-01", 0) == 0);
  CHECK(parseDay("2024-02-29", 0) == 1709164800);
  CHECK(parseDay("today", kDay + 5000) == kDay);
  CHECK(parseDay("yesterday", kDay + 5000) == kDay - 86400);
  CHECK_FALSE(parseDay("2023-02-29", 0));
  CHECK_FALSE(parseDay("2025-13-01", 0));
  CHECK_FALSE(parseDay("2025-1-01", 0));
  CHECK_FALSE(parseDay("", 0));
  CHECK_FALSE(parseDay("tomorrow", 0));
}

TEST_CASE("tls-rpt: the collector adds up per day, domain, policy and failure; bounded") {
  Collector c(4);
  c.success(kDay + 10, "example.com", stsPolicy());
  c.success(kDay + 20, "example.com", stsPolicy());
  c.success(kDay + 86400 + 5, "example.com", stsPolicy());  // the next day: its own row
  c.failure(kDay + 30, "example.com", stsPolicy(), Failure{"certificate-expired", "expired"}, "mx.example.com", "192.0.2.1");
  c.failure(kDay + 40, "example.com", stsPolicy(), Failure{"certificate-expired", "expired"}, "mx.example.com", "192.0.2.1");
  CHECK(c.size() == 3);
  c.success(kDay, "other.example", Policy{"no-policy-found", {}, {}});
  CHECK(c.size() == 4);
  c.success(kDay, "flood.example", Policy{"no-policy-found", {}, {}});  // beyond the bound
  CHECK(c.size() == 4);
  CHECK(c.dropped() == 1);
  auto rows = c.take();
  CHECK(c.empty());
  REQUIRE(rows.size() == 4);
  int64_t ok = 0, failed = 0;
  for (const auto& r : rows) {
    if (r.domain != "example.com" || r.day != kDay) continue;
    (r.result.empty() ? ok : failed) += r.sessions;
  }
  CHECK(ok == 2);
  CHECK(failed == 2);
}

TEST_CASE("tls-rpt: the _smtp._tls record (RFC 8460 3)") {
  auto r = parseRecord({"v=TLSRPTv1; rua=mailto:reports@example.com"});
  REQUIRE(r);
  CHECK(r->mailto == std::vector<std::string>{"reports@example.com"});
  r = parseRecord({"v=TLSRPTv1;rua=mailto:a@example.com,mailto:b%2Bx@example.org?subject=x, https://r.example/v1"});
  REQUIRE(r);
  CHECK(r->mailto == std::vector<std::string>{"a@example.com", "b+x@example.org"});
  CHECK(r->https == std::vector<std::string>{"https://r.example/v1"});
  // Other TXT records at the name are discarded; two TLSRPT records mean none.
  CHECK(parseRecord({"v=spf1 -all", "v=TLSRPTv1; rua=mailto:x@example.com"}));
  CHECK_FALSE(parseRecord({"v=TLSRPTv1; rua=mailto:x@example.com", "v=TLSRPTv1; rua=mailto:y@example.com"}));
  CHECK_FALSE(parseRecord({"v=TLSRPTv2; rua=mailto:x@example.com"}));
  CHECK_FALSE(parseRecord({"v=TLSRPTv1"}));                     // rua is required
  CHECK_FALSE(parseRecord({"v=TLSRPTv1x; rua=mailto:x@e.com"}));  // not the version
  CHECK_FALSE(parseRecord({}));
  // Unknown fields are ignored; a mailto that is not an address is dropped.
  r = parseRecord({"v=TLSRPTv1; ext-1=foo; rua=mailto:nobody,mailto:ok@example.com;"});
  REQUIRE(r);
  CHECK(r->mailto == std::vector<std::string>{"ok@example.com"});
}

TEST_CASE("tls-rpt: the JSON report (RFC 8460 4.4) groups by policy with failure details") {
  Collector c;
  c.success(kDay + 1, "example.com", stsPolicy());
  c.success(kDay + 2, "example.com", stsPolicy());
  c.failure(kDay + 3, "example.com", stsPolicy(), Failure{"certificate-expired", "certificate has expired"},
            "mx.example.com", "192.0.2.1");
  c.success(kDay + 4, "example.com", Policy{"tlsa", {"3 1 1 ABCD"}, {"mx2.example.com"}});
  c.success(kDay + 5, "unrelated.example", stsPolicy());
  const auto rows = c.take();
  const std::string text = reportJson(meta(), "example.com", kDay, rows);
  const auto j = nlohmann::json::parse(text);
  CHECK(j["organization-name"] == "Example Relay");
  CHECK(j["contact-info"] == "tlsrpt@relay.example.net");
  CHECK(j["date-range"]["start-datetime"] == "2025-12-02T00:00:00Z");
  CHECK(j["date-range"]["end-datetime"] == "2025-12-02T23:59:59Z");
  CHECK(j["report-id"].get<std::string>().find("@relay.example.net") != std::string::npos);
  REQUIRE(j["policies"].size() == 2);
  const nlohmann::json* sts = nullptr;
  const nlohmann::json* tlsa = nullptr;
  for (const auto& p : j["policies"]) (p["policy"]["policy-type"] == "sts" ? sts : tlsa) = &p;
  REQUIRE(sts);
  REQUIRE(tlsa);
  CHECK((*sts)["policy"]["policy-domain"] == "example.com");
  CHECK((*sts)["policy"]["policy-string"][1] == "mode: enforce");
  CHECK((*sts)["policy"]["mx-host"][0] == "mx.example.com");
  CHECK((*sts)["summary"]["total-successful-session-count"] == 2);
  CHECK((*sts)["summary"]["total-failure-session-count"] == 1);
  REQUIRE((*sts)["failure-details"].size() == 1);
  const auto& d = (*sts)["failure-details"][0];
  CHECK(d["result-type"] == "certificate-expired");
  CHECK(d["receiving-mx-hostname"] == "mx.example.com");
  CHECK(d["receiving-ip"] == "192.0.2.1");
  CHECK(d["failed-session-count"] == 1);
  CHECK((*tlsa)["policy"]["policy-string"][0] == "3 1 1 ABCD");
  CHECK((*tlsa)["summary"]["total-successful-session-count"] == 1);
  CHECK_FALSE(tlsa->contains("failure-details"));
}

TEST_CASE("tls-rpt: the report mail (RFC 8460 5.3): headers, filename, gzipped JSON") {
  const std::string json = R"({"x":1})";
  const std::string m = reportMessage(meta(), "example.com", kDay, json, {"a@example.com", "b@example.com"}, kDay + 3600);
  CHECK(m.find("From: <tlsrpt@relay.example.net>\r\n") != std::string::npos);
  CHECK(m.find("To: <a@example.com>,\r\n <b@example.com>\r\n") != std::string::npos);
  CHECK(m.find("Subject: Report Domain: example.com\r\n Submitter: relay.example.net\r\n Report-ID: <") !=
        std::string::npos);
  CHECK(m.find("TLS-Report-Domain: example.com\r\n") != std::string::npos);
  CHECK(m.find("TLS-Report-Submitter: relay.example.net\r\n") != std::string::npos);
  CHECK(m.find("Content-Type: multipart/report; report-type=\"tlsrpt\";") != std::string::npos);
  CHECK(m.find("Content-Type: application/tlsrpt+gzip") != std::string::npos);
  const std::string fname = "relay.example.net!example.com!" + std::to_string(kDay) + "!" + std::to_string(kDay + 86399) + ".json.gz";
  CHECK(reportFilename(meta(), "example.com", kDay) == fname);
  CHECK(m.find("filename=\"" + fname + "\"") != std::string::npos);
  // Every line CRLF, none over 998 octets (RFC 5322 2.1.1).
  for (size_t i = 0, n; i < m.size(); i = n + 2) {
    n = m.find("\r\n", i);
    REQUIRE(n != std::string::npos);
    CHECK(n - i <= 998);
  }
  // The attachment decodes back to the JSON.
  const auto start = m.find("\r\n\r\n", m.find("application/tlsrpt+gzip")) + 4;
  const auto end = m.find("\r\n--", start);
  std::string b64;
  for (char ch : m.substr(start, end - start))
    if (ch != '\r' && ch != '\n') b64 += ch;
  auto raw = util::base64Decode(b64);
  REQUIRE(raw);
  CHECK(gunzip(*raw) == json);
}

TEST_CASE("tls-rpt: decideTls names the policy of each host as reports do") {
  Route route;
  route.status = RouteStatus::Ok;
  route.mxSecure = true;
  for (const char* n : {"mx1.example.com", "mx2.example.com", "mx3.example.com"}) {
    MxHost h;
    h.name = n;
    h.addresses = {"192.0.2.1"};
    h.addressesSecure = true;
    route.hosts.push_back(h);
  }
  TlsPolicyInputs in;
  in.tlsa.push_back({"mx1.example.com", dns::Status::Ok, true, {{3, 1, 1, std::vector<uint8_t>(32, 0xab)}}});
  in.tlsa.push_back({"mx2.example.com", dns::Status::ServFail, false, {}});
  mtasts::CachedPolicy p;
  p.domain = "example.com";
  p.id = "1";
  p.policy.mode = mtasts::Mode::Enforce;
  p.policy.maxAge = 86400;
  p.policy.mx = {"mx1.example.com", "mx2.example.com"};
  p.text = "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.com\r\nmx: mx2.example.com\r\nmax_age: 86400\r\n";
  in.sts = p;
  const TlsDecision d = decideTls("example.com", route, in);
  REQUIRE(d.hosts.size() == 3);
  CHECK(d.hosts[0].report.type == "tlsa");
  std::string hex;
  for (int i = 0; i < 32; ++i) hex += "AB";
  CHECK(d.hosts[0].report.strings == std::vector<std::string>{"3 1 1 " + hex});
  CHECK(d.hosts[0].report.mxHost == std::vector<std::string>{"mx1.example.com"});
  CHECK_FALSE(d.hosts[0].reportFailure);
  CHECK(d.hosts[1].tls == HostTls::Unusable);
  REQUIRE(d.hosts[1].reportFailure);
  CHECK(d.hosts[1].reportFailure->result == "dnssec-invalid");
  // mx3: no TLSA looked up, not in the enforce policy: ruled out by MTA-STS.
  CHECK(d.hosts[2].tls == HostTls::Unusable);
  CHECK(d.hosts[2].report.type == "sts");
  CHECK(d.hosts[2].report.strings ==
        std::vector<std::string>{"version: STSv1", "mode: enforce", "mx: mx1.example.com", "mx: mx2.example.com",
                                 "max_age: 86400"});
  CHECK(d.hosts[2].report.mxHost == std::vector<std::string>{"mx1.example.com", "mx2.example.com"});
  REQUIRE(d.hosts[2].reportFailure);
  CHECK(d.hosts[2].reportFailure->result == "validation-failure");
  // Nothing found: "no-policy-found".
  const TlsDecision none = decideTls("example.com", route, TlsPolicyInputs{});
  for (const auto& h : none.hosts) CHECK(h.report.type == "no-policy-found");
}

TEST_CASE("tls-rpt: the reporter queues one signed report per domain and day, once") {
  auto st = queue::SqliteStore::open(":memory:");
  REQUIRE(st.ok());
  queue::SqliteStore& store = *st.value();
  Collector c;
  c.success(kDay + 10, "example.com", stsPolicy());
  c.failure(kDay + 20, "example.com", stsPolicy(), Failure{"starttls-not-supported", "no STARTTLS"}, "mx.example.com",
            "192.0.2.1");
  c.success(kDay + 30, "norua.example", Policy{"no-policy-found", {}, {}});
  c.success(kDay + 86400 + 30, "example.com", stsPolicy());  // today: not yet
  REQUIRE(store.addTlsRpt(c.take()).ok());
  // Counts add up across calls (serve stores once a minute).
  c.success(kDay + 40, "example.com", stsPolicy());
  REQUIRE(store.addTlsRpt(c.take()).ok());

  ScriptedResolver dns;
  dns.answers["_smtp._tls.example.com"] = txt({"v=TLSRPTv1; rua=mailto:tlsrpt@example.com"});
  const ReporterSettings rs = signingSettings();
  Reporter reporter(store, dns, rs);
  std::optional<RunSummary> summary;
  reporter.run(kDay + 86400, kDay + 86400 + 600, [&](RunSummary s) { summary = std::move(s); });
  REQUIRE(summary);
  CHECK(summary->queued == 1);
  CHECK(summary->noRua == 1);
  CHECK(summary->failed == 0);
  auto listed = store.list();
  REQUIRE(listed.ok());
  REQUIRE(listed.value().size() == 1);
  const auto& info = listed.value()[0];
  CHECK(info.mailFrom == "tlsrpt@relay.example.net");
  REQUIRE(info.recipients.size() == 1);
  CHECK(info.recipients[0].address == "tlsrpt@example.com");
  CHECK(info.tlsRequirement == queue::TlsRequirement::Optional);
  auto content = store.content(info.id);
  REQUIRE(content.ok());
  CHECK(content.value().rfind("DKIM-Signature: v=1; a=ed25519-sha256;", 0) == 0);
  CHECK(content.value().find("TLS-Report-Domain: example.com") != std::string::npos);
  // The JSON inside counts the stored sessions of that day only.
  const std::string& m = content.value();
  const auto start = m.find("\r\n\r\n", m.find("application/tlsrpt+gzip")) + 4;
  std::string b64;
  for (char ch : m.substr(start, m.find("\r\n--", start) - start))
    if (ch != '\r' && ch != '\n') b64 += ch;
  const auto j = nlohmann::json::parse(gunzip(*util::base64Decode(b64)));
  CHECK(j["policies"][0]["summary"]["total-successful-session-count"] == 2);
  CHECK(j["policies"][0]["summary"]["total-failure-session-count"] == 1);

  // A second run finds nothing left for that day: no second report.
  summary.reset();
  reporter.run(kDay + 86400, kDay + 86400 + 700, [&](RunSummary s) { summary = std::move(s); });
  REQUIRE(summary);
  CHECK(summary->queued == 0);
  CHECK(store.list().value().size() == 1);
}

TEST_CASE("tls-rpt: a failed lookup is retried by the next run; without a key nothing is sent") {
  auto st = queue::SqliteStore::open(":memory:");
  REQUIRE(st.ok());
  queue::SqliteStore& store = *st.value();
  Collector c;
  c.success(kDay + 10, "example.com", stsPolicy());
  REQUIRE(store.addTlsRpt(c.take()).ok());
  ScriptedResolver dns;
  dns::Answer servfail;
  servfail.status = dns::Status::ServFail;
  servfail.detail = "SERVFAIL";
  dns.answers["_smtp._tls.example.com"] = servfail;
  ReporterSettings rs;
  rs.meta = meta();
  rs.signer = std::make_shared<dkim::LocalSigner>();
  Reporter reporter(store, dns, rs);
  std::optional<RunSummary> summary;
  reporter.run(kDay + 86400, kDay + 86400 + 60, [&](RunSummary s) { summary = std::move(s); });
  REQUIRE(summary);
  CHECK(summary->failed == 1);
  CHECK(store.tlsRptPending(kDay + 86400, 10).value().size() == 1);  // still to do
  // The record appears, but there is no DKIM key for the From domain: still not sent.
  dns.answers["_smtp._tls.example.com"] = txt({"v=TLSRPTv1; rua=mailto:r@example.com"});
  summary.reset();
  reporter.run(kDay + 86400, kDay + 86400 + 120, [&](RunSummary s) { summary = std::move(s); });
  CHECK(summary->failed == 1);
  CHECK(store.list().value().empty());
  // Days later a lookup that still fails is given up.
  dns.answers["_smtp._tls.example.com"] = servfail;
  summary.reset();
  reporter.run(kDay + 86400, kDay + 5 * 86400, [&](RunSummary s) { summary = std::move(s); });
  CHECK(summary->noRua == 1);
  CHECK(store.tlsRptPending(kDay + 86400, 10).value().empty());
  CHECK(store.pruneTlsRpt(kDay + 86400).value() == 2);  // the count and the report record
}

TEST_CASE("tls-rpt: DailyReports stores counts once a minute and reports the days before today at the slot") {
  auto st = queue::SqliteStore::open(":memory:");
  REQUIRE(st.ok());
  queue::SqliteStore& store = *st.value();
  ScriptedResolver dns;
  dns.answers["_smtp._tls.example.com"] = txt({"v=TLSRPTv1; rua=mailto:r@example.com"});
  const ReporterSettings rs = signingSettings();
  const int64_t start = kDay + 3600;  // 01:00 on day 1
  DailyReports daily(store, dns, rs, 4 * 3600, 7, start);
  // Today's slot is within [00:00, 04:00).
  CHECK(daily.nextRunAt() >= kDay);
  CHECK(daily.nextRunAt() < kDay + 4 * 3600);

  Collector c;
  c.success(start, "example.com", stsPolicy());
  daily.tick(start + 1, c.take());
  CHECK(store.tlsRptRows(kDay, "").value().empty());  // held: not a minute yet
  daily.tick(start + 61, {});
  CHECK(store.tlsRptRows(kDay, "").value().size() == 1);
  c.success(start + 70, "example.com", stsPolicy());
  daily.flush(c.take());  // shutdown
  REQUIRE(store.tlsRptRows(kDay, "").value().size() == 1);
  CHECK(store.tlsRptRows(kDay, "").value()[0].sessions == 2);

  // Nothing is reported for the day still running, whatever the ticks.
  daily.tick(kDay + 86399, {});
  CHECK(store.list().value().empty());
  // The next day's slot: day 1's report goes out; the following slot is a day later.
  const int64_t slot = daily.nextRunAt();
  CHECK(slot >= kDay + 86400);
  CHECK(slot < kDay + 86400 + 4 * 3600);
  daily.tick(slot, {});
  REQUIRE(store.list().value().size() == 1);
  CHECK(store.list().value()[0].recipients[0].address == "r@example.com");
  CHECK(daily.nextRunAt() >= kDay + 2 * 86400);
  daily.tick(slot + 60, {});
  CHECK(store.list().value().size() == 1);
}
