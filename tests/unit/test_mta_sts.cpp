// delivery/mta_sts.h: the MTA-STS TXT record and policy grammar (RFC 8461 3.1, 3.2), MX
// matching (4.1), the cache and refresh decisions on a fake clock (3.3, 5.1, 10.2) and the
// verdict for a delivery (4, 5).
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "delivery/mta_sts.h"
#include "util/clock.h"

using namespace subrelay;
using namespace subrelay::delivery::mtasts;

namespace {

constexpr int64_t kDay = 24 * 3600;

std::string idOf(std::string_view rec) {
  auto r = parseTxtRecord(rec);
  return r ? r.value() : "<invalid: " + r.error().message + ">";
}

const char* kEnforce =
    "version: STSv1\r\n"
    "mode: enforce\r\n"
    "mx: mail.example.com\r\n"
    "mx: *.example.net\r\n"
    "mx: backupmx.example.com\r\n"
    "max_age: 604800\r\n";

FetchOutcome served(std::string body, std::string type = "text/plain", long status = 200) {
  FetchOutcome f;
  f.transportOk = true;
  f.status = status;
  f.contentType = std::move(type);
  f.body = std::move(body);
  return f;
}

std::string policyText(const char* mode, int64_t maxAge, const char* mx = "mx: mail.example.com\n") {
  return std::string("version: STSv1\nmode: ") + mode + "\n" + mx + "max_age: " + std::to_string(maxAge) + "\n";
}

TxtOutcome found(std::string id) {
  TxtOutcome t;
  t.kind = TxtOutcome::Kind::Found;
  t.id = std::move(id);
  return t;
}

}  // namespace

TEST_CASE("3.1: the TXT record") {
  CHECK(idOf("v=STSv1; id=20160831085700Z;") == "20160831085700Z");
  CHECK(idOf("v=STSv1;id=abc") == "abc");
  CHECK(idOf("v=STSv1 ;\tid=abc ; ") == "abc");
  CHECK(idOf("v=STSv1; foo=bar; id=X1") == "X1");                 // order not significant
  CHECK(idOf("v=STSv1; id=first; id=second") == "first");         // duplicates: the first
  CHECK(idOf("v=STSv1; ext_1.a-b=x!y; id=1") == "1");             // extensions ignored
  CHECK(idOf(std::string("v=STSv1; id=") + std::string(32, 'a')) == std::string(32, 'a'));

  for (const char* bad : {
           "v=STSv1",                           // no id
           "v=STSv1;",                          // no fields
           "v=STSv1; id=",                      // empty id
           "v=STSv1; id=abc-def",               // id: ALPHA / DIGIT only
           "v=STSv1; id=abc def",               // a space inside
           "v=STSv1; foo=bar",                  // no id
           "v=STSv1; id=abc;; ",                // two delimiters
           "v=STSv1; id=abc; foo",              // a field without '='
           "v=STSv1; id=abc; _x=1",             // ext name starts with '_'
           "v=STSv1; id=abc; x=a=b",            // '=' in an ext value
           "v=STSv1 id=abc",                    // no delimiter
           "v=stsv1; id=abc",                   // %s: case-sensitive
           " v=STSv1; id=abc",                  // must begin with the version
       }) {
    CAPTURE(bad);
    CHECK_FALSE(parseTxtRecord(bad).ok());
  }
  CHECK_FALSE(parseTxtRecord(std::string("v=STSv1; id=") + std::string(33, 'a')).ok());
}

TEST_CASE("3.1: classifying the TXT answer") {
  auto t = classifyTxt(dns::Status::Ok, {"some other record", "v=STSv1; id=42;"});
  CHECK(t.kind == TxtOutcome::Kind::Found);
  CHECK(t.id == "42");
  // Records not beginning with v=STSv1 are discarded; "v=STSv10" is another version.
  CHECK(classifyTxt(dns::Status::Ok, {"v=spf1 -all", "v=STSv10; id=1"}).kind == TxtOutcome::Kind::Absent);
  // More than one: invalid, even when both are valid and equal.
  CHECK(classifyTxt(dns::Status::Ok, {"v=STSv1; id=1", "v=STSv1; id=1"}).kind == TxtOutcome::Kind::Invalid);
  CHECK(classifyTxt(dns::Status::Ok, {"v=STSv1; id=1;", "v=STSv1 ; id=2"}).kind == TxtOutcome::Kind::Invalid);
  CHECK(classifyTxt(dns::Status::Ok, {"v=STSv1; id=no-dashes"}).kind == TxtOutcome::Kind::Invalid);
  CHECK(classifyTxt(dns::Status::NxDomain, {}).kind == TxtOutcome::Kind::Absent);
  CHECK(classifyTxt(dns::Status::NoData, {}).kind == TxtOutcome::Kind::Absent);
  CHECK(classifyTxt(dns::Status::ServFail, {}).kind == TxtOutcome::Kind::Failed);
  CHECK(classifyTxt(dns::Status::Timeout, {}).kind == TxtOutcome::Kind::Failed);
  dns::Answer a;
  a.status = dns::Status::Ok;
  a.texts = {"v=STSv1; id=20190429T010101;"};
  CHECK(classifyTxt(a).id == "20190429T010101");
}

TEST_CASE("3.2: the policy file") {
  auto p = parsePolicy(kEnforce);
  REQUIRE(p.ok());
  CHECK(p->mode == Mode::Enforce);
  CHECK(p->maxAge == 604800);
  CHECK(p->mx == std::vector<std::string>{"mail.example.com", "*.example.net", "backupmx.example.com"});

  // LF line ends, no final terminator, blanks after ':' and at the end of a line, unknown
  // fields, duplicated single fields (the first counts), upper-case MX names folded.
  auto q = parsePolicy(
      "version: STSv1\nmode:testing  \nfoo_bar: anything at all\nmode: enforce\n"
      "mx:\tMX.Example.ORG\nmax_age: 86400\nmax_age: 1");
  REQUIRE(q.ok());
  CHECK(q->mode == Mode::Testing);
  CHECK(q->maxAge == 86400);
  CHECK(q->mx == std::vector<std::string>{"mx.example.org"});

  // mode none needs no mx.
  auto n = parsePolicy("version: STSv1\nmode: none\nmax_age: 0\n");
  REQUIRE(n.ok());
  CHECK(n->mode == Mode::None);
  CHECK(n->mx.empty());

  // max_age above the maximum is taken as the maximum.
  CHECK(parsePolicy(policyText("enforce", 99999999)).value().maxAge == kMaxMaxAge);
  CHECK(parsePolicy(policyText("enforce", kMaxMaxAge)).value().maxAge == kMaxMaxAge);

  for (const std::string& bad : {
           std::string("mode: enforce\nmx: a.example\nmax_age: 1\n"),                     // no version
           std::string("version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n"),      // version
           std::string("version: STSv1\nmx: a.example\nmax_age: 1\n"),                     // no mode
           std::string("version: STSv1\nmode: Enforce\nmx: a.example\nmax_age: 1\n"),     // %s
           std::string("version: STSv1\nmode: enforce\nmx: a.example\n"),                  // no max_age
           std::string("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n"),    // not digits
           std::string("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 12345678901\n"),  // 11 digits
           std::string("version: STSv1\nmode: enforce\nmax_age: 100\n"),                   // no mx
           std::string("version: STSv1\nmode: enforce\nmx: *.*.example\nmax_age: 1\n"),   // bad pattern
           std::string("version: STSv1\nmode: enforce\nmx: a_b.example\nmax_age: 1\n"),   // bad pattern
           std::string("version: STSv1\nmode: enforce\nmx: -a.example\nmax_age: 1\n"),   // bad pattern
           std::string("version: STSv1\nmode: enforce\nmx: a.example\nmax_age 1\n"),      // no ':'
           std::string("<html><body>hello</body></html>\n"),
       }) {
    CAPTURE(bad);
    CHECK_FALSE(parsePolicy(bad).ok());
  }
  // The 64 KiB bound.
  std::string big = kEnforce;
  big += "x: " + std::string(kMaxPolicyBytes, 'a') + "\n";
  CHECK_FALSE(parsePolicy(big).ok());
  std::string fits = kEnforce;
  fits += "x: " + std::string(kMaxPolicyBytes - fits.size() - 4, 'a') + "\n";
  CHECK(fits.size() == kMaxPolicyBytes);
  CHECK(parsePolicy(fits).ok());

  CHECK(isTextPlain("text/plain"));
  CHECK(isTextPlain("TEXT/Plain; charset=utf-8"));
  CHECK(isTextPlain(" text/plain ;charset=us-ascii"));
  CHECK_FALSE(isTextPlain("text/html"));
  CHECK_FALSE(isTextPlain(""));
  CHECK_FALSE(isTextPlain("text/plainish"));

  CHECK(policyUrl("example.com") == "https://mta-sts.example.com/.well-known/mta-sts.txt");
  CHECK(policyHost("example.com.") == "mta-sts.example.com");
  CHECK(txtName("example.com") == "_mta-sts.example.com");
}

TEST_CASE("4.1: MX host matching") {
  CHECK(mxMatches("mail.example.com", "mail.example.com"));
  CHECK(mxMatches("mail.example.com", "MAIL.Example.COM."));
  CHECK_FALSE(mxMatches("mail.example.com", "mail2.example.com"));
  CHECK_FALSE(mxMatches("mail.example.com", "x.mail.example.com"));
  CHECK(mxMatches("*.example.com", "mail.example.com"));
  CHECK_FALSE(mxMatches("*.example.com", "example.com"));
  CHECK_FALSE(mxMatches("*.example.com", "foo.bar.example.com"));
  CHECK_FALSE(mxMatches("*.example.com", ".example.com"));
  CHECK_FALSE(mxMatches("*.example.com", "mailexample.com"));
  CHECK_FALSE(mxMatches("", "example.com"));
  auto p = parsePolicy(kEnforce).value();
  CHECK(policyAllowsMx(p, "mx1.example.net"));
  CHECK(policyAllowsMx(p, "backupmx.example.com"));
  CHECK_FALSE(policyAllowsMx(p, "evil.example.org"));
}

TEST_CASE("cache: discovery, id unchanged, refresh, expiry (3.3, 5.1, 10.2)") {
  util::FakeClock clock;
  auto now = [&] { return util::unixSeconds(clock.wallNow()); };
  Settings cfg;
  DomainState s;
  const std::string domain = "example.com";

  // Nothing known: discover before answering.
  CHECK(plan(s, now(), cfg) == Step::Discover);
  auto d = onTxt(s, domain, found("a1"), now(), cfg);
  REQUIRE(d.fetch);
  CHECK(d.id == "a1");
  auto f = onFetch(s, domain, "a1", served(policyText("enforce", 7 * kDay)), now());
  REQUIRE(f.stored);
  CHECK(f.error == "");
  REQUIRE(f.policy.has_value());
  CHECK(f.policy->id == "a1");
  CHECK(f.policy->fetchedAt == now());
  CHECK(f.policy->expiresAt == now() + 7 * kDay);
  CHECK(current(s, now()).has_value());

  // Within the day: answers alone.
  clock.advance(std::chrono::hours(23));
  CHECK(plan(s, now(), cfg) == Step::Answer);
  // After a day: answers, and refreshes in the background.
  clock.advance(std::chrono::hours(2));
  CHECK(plan(s, now(), cfg) == Step::AnswerAndRefresh);
  // Same id: no fetch; checked now, so the next day starts.
  d = onTxt(s, domain, found("a1"), now(), cfg);
  CHECK_FALSE(d.fetch);
  CHECK(plan(s, now(), cfg) == Step::Answer);
  CHECK(s.policy->checkedAt == now());

  // Past half of max_age (3.5 days): the same id is fetched again, renewing the expiry.
  clock.advance(std::chrono::hours(24 * 3));
  CHECK(plan(s, now(), cfg) == Step::AnswerAndRefresh);
  d = onTxt(s, domain, found("a1"), now(), cfg);
  CHECK(d.fetch);
  f = onFetch(s, domain, "a1", served(policyText("enforce", 7 * kDay)), now());
  CHECK(f.stored);
  CHECK(s.policy->expiresAt == now() + 7 * kDay);

  // A new id: fetched, the new policy replaces the old one.
  clock.advance(std::chrono::hours(25));
  CHECK(plan(s, now(), cfg) == Step::AnswerAndRefresh);
  d = onTxt(s, domain, found("b2"), now(), cfg);
  REQUIRE(d.fetch);
  f = onFetch(s, domain, "b2", served(policyText("testing", 7 * kDay)), now());
  CHECK(f.stored);
  CHECK(current(s, now())->id == "b2");
  CHECK(current(s, now())->policy.mode == Mode::Testing);

  // Expired (no refresh got through meanwhile): nothing to apply, discover first.
  clock.advance(std::chrono::hours(24 * 7));
  CHECK_FALSE(current(s, now()).has_value());
  CHECK(plan(s, now(), cfg) == Step::Discover);
}

TEST_CASE("cache: a short max_age is refreshed by half of it") {
  util::FakeClock clock;
  auto now = [&] { return util::unixSeconds(clock.wallNow()); };
  Settings cfg;
  DomainState s;
  REQUIRE(onTxt(s, "d.example", found("x"), now(), cfg).fetch);
  REQUIRE(onFetch(s, "d.example", "x", served(policyText("enforce", 3600)), now()).stored);
  clock.advance(std::chrono::minutes(29));
  CHECK(plan(s, now(), cfg) == Step::Answer);
  clock.advance(std::chrono::minutes(2));
  CHECK(plan(s, now(), cfg) == Step::AnswerAndRefresh);
  CHECK(onTxt(s, "d.example", found("x"), now(), cfg).fetch);  // half of max_age passed
}

TEST_CASE("cache: failures keep the cached policy (3.1, 3.3)") {
  util::FakeClock clock;
  auto now = [&] { return util::unixSeconds(clock.wallNow()); };
  Settings cfg;
  DomainState s;
  const std::string domain = "example.com";
  REQUIRE(onTxt(s, domain, found("a1"), now(), cfg).fetch);
  REQUIRE(onFetch(s, domain, "a1", served(policyText("enforce", 30 * kDay)), now()).stored);

  // The TXT lookup fails: the policy stays; no new lookup for lookupHoldoff.
  clock.advance(std::chrono::hours(25));
  REQUIRE(plan(s, now(), cfg) == Step::AnswerAndRefresh);
  TxtOutcome failed;
  failed.kind = TxtOutcome::Kind::Failed;
  CHECK_FALSE(onTxt(s, domain, failed, now(), cfg).fetch);
  CHECK(current(s, now())->id == "a1");
  CHECK(plan(s, now(), cfg) == Step::Answer);
  clock.advance(std::chrono::minutes(5));
  CHECK(plan(s, now(), cfg) == Step::AnswerAndRefresh);

  // The record disappears (or turns invalid): the cached policy still applies.
  TxtOutcome absent;
  absent.kind = TxtOutcome::Kind::Absent;
  CHECK_FALSE(onTxt(s, domain, absent, now(), cfg).fetch);
  CHECK(current(s, now())->id == "a1");
  CHECK(plan(s, now(), cfg) == Step::Answer);

  // A new id whose fetch fails: the old policy stays, a warning is due (mode enforce),
  // and that id is not fetched again for five minutes (3.3: per version ID).
  clock.advance(std::chrono::hours(25));
  REQUIRE(onTxt(s, domain, found("b2"), now(), cfg).fetch);
  FetchOutcome down;
  down.error = "Connection refused";
  auto f = onFetch(s, domain, "b2", down, now());
  CHECK_FALSE(f.stored);
  CHECK(f.warn);
  CHECK(f.error == "Connection refused");
  CHECK(current(s, now())->id == "a1");
  CHECK(plan(s, now(), cfg) == Step::Answer);  // within the holdoff: no lookup
  clock.advance(std::chrono::minutes(4));
  CHECK_FALSE(onTxt(s, domain, found("b2"), now(), cfg).fetch);
  CHECK(onTxt(s, domain, found("c3"), now(), cfg).fetch);  // another id is not held off
  clock.advance(std::chrono::minutes(2));
  CHECK(onTxt(s, domain, found("b2"), now(), cfg).fetch);

  // Bad responses are failures like a refused connection.
  for (const auto& bad : {served(policyText("enforce", 100), "text/html"), served("moved", "text/plain", 301),
                          served("not found", "text/plain", 404), served("version: STSv1\n"),
                          served(policyText("enforce", 100), "")}) {
    DomainState fresh;
    auto r = onFetch(fresh, domain, "z", bad, now());
    CAPTURE(r.error);
    CHECK_FALSE(r.stored);
    CHECK_FALSE(r.warn);  // nothing cached: nothing to warn about
    CHECK(r.error != "");
    CHECK_FALSE(current(fresh, now()).has_value());
  }

  // A cached mode none: no warning on a failed refresh (3.3, 10.2).
  DomainState none;
  REQUIRE(onFetch(none, domain, "n", served("version: STSv1\nmode: none\nmax_age: 86400\n"), now()).stored);
  CHECK_FALSE(onFetch(none, domain, "n2", down, now()).warn);
}

TEST_CASE("cache: domains without a policy") {
  util::FakeClock clock;
  auto now = [&] { return util::unixSeconds(clock.wallNow()); };
  Settings cfg;
  DomainState s;
  TxtOutcome absent;
  absent.kind = TxtOutcome::Kind::Absent;
  CHECK(plan(s, now(), cfg) == Step::Discover);
  CHECK_FALSE(onTxt(s, "plain.example", absent, now(), cfg).fetch);
  CHECK_FALSE(current(s, now()).has_value());
  CHECK(plan(s, now(), cfg) == Step::Answer);  // "no policy", for absentRecheck
  clock.advance(std::chrono::minutes(59));
  CHECK(plan(s, now(), cfg) == Step::Answer);
  clock.advance(std::chrono::minutes(2));
  CHECK(plan(s, now(), cfg) == Step::Discover);

  // A TXT record but the fetch fails, nothing cached: deliver as without MTA-STS (3.3),
  // and ask again only after the holdoff.
  REQUIRE(onTxt(s, "plain.example", found("v1"), now(), cfg).fetch);
  FetchOutcome down;
  down.error = "timeout";
  auto f = onFetch(s, "plain.example", "v1", down, now());
  CHECK_FALSE(f.stored);
  CHECK_FALSE(f.warn);
  CHECK(plan(s, now(), cfg) == Step::Answer);
  clock.advance(std::chrono::minutes(5));
  CHECK(plan(s, now(), cfg) == Step::Discover);

  // A failed lookup without a cached policy holds off the next one too.
  DomainState t;
  TxtOutcome failed;
  failed.kind = TxtOutcome::Kind::Failed;
  onTxt(t, "x.example", failed, now(), cfg);
  CHECK(plan(t, now(), cfg) == Step::Answer);
  clock.advance(std::chrono::minutes(5));
  CHECK(plan(t, now(), cfg) == Step::Discover);
}

TEST_CASE("verdict: enforce, testing, none, no policy (4, 5)") {
  CachedPolicy c;
  c.id = "a1";
  c.policy = parsePolicy(kEnforce).value();
  const std::vector<std::string> hosts = {"mail.example.com", "evil.example.org", "mx9.example.net"};

  auto v = verdict(c, hosts);
  REQUIRE(v.mode.has_value());
  CHECK(*v.mode == Mode::Enforce);
  CHECK(v.policyId == "a1");
  REQUIRE(v.hosts.size() == 3);
  CHECK(v.hosts[0].usable);
  CHECK(v.hosts[0].tls == Tls::Required);
  CHECK_FALSE(v.hosts[1].matches);
  CHECK_FALSE(v.hosts[1].usable);  // never used in enforce mode
  CHECK(v.hosts[2].usable);
  CHECK(v.hosts[2].tls == Tls::Required);
  CHECK_FALSE(v.noUsableHost());
  CHECK(verdict(c, {"evil.example.org"}).noUsableHost());

  c.policy.mode = Mode::Testing;
  v = verdict(c, hosts);
  CHECK(*v.mode == Mode::Testing);
  CHECK(v.hosts[1].usable);
  CHECK_FALSE(v.hosts[1].matches);  // reported, not enforced
  CHECK(v.hosts[1].tls == Tls::ReportOnly);
  CHECK(v.hosts[0].tls == Tls::ReportOnly);

  c.policy.mode = Mode::None;
  v = verdict(c, hosts);
  CHECK(*v.mode == Mode::None);
  for (const auto& h : v.hosts) {
    CHECK(h.usable);
    CHECK(h.matches);
    CHECK(h.tls == Tls::Opportunistic);
  }

  v = verdict(std::nullopt, hosts);
  CHECK_FALSE(v.mode.has_value());
  CHECK(v.hosts.size() == 3);
  CHECK(v.hosts[1].usable);
  CHECK(v.hosts[1].tls == Tls::Opportunistic);
  CHECK(std::string(tlsName(Tls::Required)) == "required");
  CHECK(std::string(modeName(Mode::Testing)) == "testing");
}
