// Unit tests for config/: the README configuration example, every error kind with its JSON path, several
// errors at once, unknown keys at every level, durations and host:port forms.
#include <doctest/doctest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include "config/config.h"
#include "config/duration.h"

using namespace subrelay::config;
using namespace std::chrono_literals;

namespace {

constexpr const char* kHash = "$scrypt$ln=15,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA$a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2U";

LoadResult parse(const std::string& text) { return parseConfig(text, "test.json"); }

// A valid document with `extra` (", \"key\": value ...") appended at the top level.
std::string withTop(const std::string& extra) {
  return R"({"hostname": "relay.example.net", "data_dir": "/var/lib/subrelay",
             "tls": {"certificate": "/etc/c.pem", "private_key": "/etc/k.pem"},
             "listeners": [{"address": "[::]:587", "tls": "starttls"}])" +
         extra + "}";
}

// Same, with one account whose body (after username and password_hash) is `account`.
std::string withAccount(const std::string& account) {
  return withTop(R"(, "accounts": [{"username": "app", "password_hash": ")" + std::string(kHash) + "\", " + account +
                 "}]");
}

std::string listeners(const std::string& items) {
  return R"({"hostname": "relay.example.net", "data_dir": "/d",
             "tls": {"certificate": "/c", "private_key": "/k"}, "listeners": [)" +
         items + "]}";
}

const ConfigError* findError(const LoadResult& r, const std::string& path) {
  for (const auto& e : r.errors)
    if (e.path == path) return &e;
  return nullptr;
}

std::string allErrors(const LoadResult& r) {
  std::string out;
  for (const auto& line : r.formatErrors()) out += line + "\n";
  return out;
}

// The error at `path` exists and its message contains `text`.
void expectError(const LoadResult& r, const std::string& path, const std::string& text) {
  INFO("errors:\n" << allErrors(r));
  INFO("wanted path: " << path << " with: " << text);
  CHECK_FALSE(r.config.has_value());
  const ConfigError* e = findError(r, path);
  REQUIRE(e != nullptr);
  CHECK(e->message.find(text) != std::string::npos);
}

void expectOk(const LoadResult& r) {
  INFO("errors:\n" << allErrors(r));
  REQUIRE(r.errors.empty());
  REQUIRE(r.config.has_value());
}

}  // namespace

TEST_CASE("the README configuration example parses") {
  // Verbatim from README.md, except that "<output of subrelay hash-password>" is replaced by a
  // string of that form: the placeholder itself is (rightly) refused.
  std::string spec = R"({
  "hostname": "relay.example.net",
  "data_dir": "/var/lib/subrelay",
  "tls": { "certificate": "/etc/subrelay/tls/fullchain.pem", "private_key": "/etc/subrelay/tls/privkey.pem" },
  "listeners": [
    { "address": "[::]:587", "tls": "starttls" },
    { "address": "[::]:465", "tls": "implicit" }
  ],
  "limits": { "max_message_bytes": 26214400, "max_recipients": 100, "max_connections": 2000, "max_connections_per_ip": 50 },
  "accounts": [
    {
      "username": "webshop",
      "password_hash": "<output of subrelay hash-password>",
      "senders": ["@shop.example.com", "alerts@example.org"],
      "rate_limits": { "messages_per_minute": 120, "messages_per_day": 20000, "recipients_per_hour": 5000 },
      "mode": "deliver"
    }
  ],
  "dkim": [
    { "domain": "shop.example.com", "selector": "s2026", "algorithm": "rsa-sha256", "private_key": "/etc/subrelay/dkim/shop.rsa.pem" },
    { "domain": "shop.example.com", "selector": "e2026", "algorithm": "ed25519-sha256", "private_key": "/etc/subrelay/dkim/shop.ed.pem" }
  ],
  "delivery": {
    "resolvers": ["127.0.0.1:53"],
    "port": 25,
    "tls": "opportunistic",
    "retry_schedule": ["5m", "10m", "20m", "40m", "1h", "2h", "4h", "8h"],
    "max_queue_time": "5d",
    "max_connections": 200,
    "max_connections_per_domain": 10
  }
})";
  SUBCASE("the placeholder hash is refused") {
    expectError(parse(spec), "accounts[0].password_hash", "subrelay hash-password");
  }
  spec.replace(spec.find("<output of subrelay hash-password>"), 34, kHash);
  LoadResult r = parseConfig(spec, "/etc/subrelay/config.json");
  expectOk(r);
  const Config& c = *r.config;
  CHECK(c.sourcePath == "/etc/subrelay/config.json");
  CHECK(c.hostname == "relay.example.net");
  CHECK(c.dataDir == "/var/lib/subrelay");
  CHECK(c.tls.certificate == "/etc/subrelay/tls/fullchain.pem");
  CHECK(c.tls.privateKey == "/etc/subrelay/tls/privkey.pem");
  REQUIRE(c.listeners.size() == 2);
  CHECK(c.listeners[0].address == "[::]:587");
  CHECK(c.listeners[0].host == "::");
  CHECK(c.listeners[0].port == 587);
  CHECK(c.listeners[0].tls == ListenerTls::StartTls);
  CHECK(c.listeners[1].port == 465);
  CHECK(c.listeners[1].tls == ListenerTls::Implicit);
  CHECK(c.limits.maxMessageBytes == 26214400);
  CHECK(c.limits.maxRecipients == 100);
  CHECK(c.limits.maxConnections == 2000);
  CHECK(c.limits.maxConnectionsPerIp == 50);
  REQUIRE(c.accounts.size() == 1);
  const Account& a = c.accounts[0];
  CHECK(a.username == "webshop");
  CHECK(a.passwordHash == kHash);
  CHECK(a.senders == std::vector<std::string>{"@shop.example.com", "alerts@example.org"});
  CHECK(a.mode == AccountMode::Deliver);
  REQUIRE(a.rateLimits.size() == 3);
  auto limit = [&a](const std::string& key) -> const RateLimit* {
    for (const auto& rl : a.rateLimits)
      if (rl.key == key) return &rl;
    return nullptr;
  };
  REQUIRE(limit("messages_per_minute"));
  CHECK(limit("messages_per_minute")->what == "messages");
  CHECK(limit("messages_per_minute")->period == "minute");
  CHECK(limit("messages_per_minute")->amount == 120);
  CHECK(limit("messages_per_day")->amount == 20000);
  CHECK(limit("recipients_per_hour")->what == "recipients");
  CHECK(limit("recipients_per_hour")->amount == 5000);
  REQUIRE(c.dkim.size() == 2);
  CHECK(c.dkim[0].domain == "shop.example.com");
  CHECK(c.dkim[0].selector == "s2026");
  CHECK(c.dkim[0].algorithm == "rsa-sha256");
  CHECK(c.dkim[1].algorithm == "ed25519-sha256");
  CHECK(c.dkim[1].privateKey == "/etc/subrelay/dkim/shop.ed.pem");
  CHECK(c.delivery.resolvers == std::vector<std::string>{"127.0.0.1:53"});
  CHECK(c.delivery.port == 25);
  CHECK(c.delivery.tls == DeliveryTls::Opportunistic);
  CHECK(c.delivery.retrySchedule == defaultRetrySchedule());
  CHECK(c.delivery.maxQueueTime == std::chrono::hours(5 * 24));
  CHECK(c.delivery.maxConnections == 200);
  CHECK(c.delivery.maxConnectionsPerDomain == 10);
  CHECK(c.log.level == "info");
  CHECK(c.workers == 0);
}

TEST_CASE("config.example.json is valid") {
  std::ifstream f(std::string(SUBRELAY_TEST_DIR) + "/../config.example.json");
  REQUIRE(f.good());
  std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  LoadResult r = parseConfig(text, "config.example.json");
  expectOk(r);
  // It is meant to use every key.
  CHECK_FALSE(r.config->delivery.tlsOverrides.empty());
  CHECK_FALSE(r.config->accounts.empty());
  CHECK(r.config->limits.authFailureDelay != 1000ms);
  CHECK(r.config->retention.finishedBodies == 24h);
}

TEST_CASE("defaults") {
  LoadResult r = parse(withTop(""));
  expectOk(r);
  const Config& c = *r.config;
  CHECK(c.limits.maxMessageBytes == 26214400);
  CHECK(c.limits.maxBadCommands == 20);
  CHECK(c.limits.maxAuthFailures == 3);
  CHECK(c.limits.commandTimeout == 300s);
  CHECK(c.limits.authFailureDelay == 1000ms);
  CHECK(c.accounts.empty());
  CHECK(c.dkim.empty());
  CHECK(c.delivery.resolvers.empty());
  CHECK(c.delivery.port == 25);
  CHECK(c.delivery.tlsOverrides.empty());
  REQUIRE(c.delivery.retrySchedule.size() == 8);
  CHECK(c.delivery.retrySchedule.front() == 5min);
  CHECK(c.delivery.retrySchedule.back() == 8h);
  CHECK(c.log.level == "info");
  CHECK(c.listeners[0].tls == ListenerTls::StartTls);
  CHECK(c.retention.finishedBodies == 0s);
  CHECK(c.retention.history == 30 * 24h);
  CHECK(c.retention.captured == 7 * 24h);
  CHECK(c.idempotency.header == "Idempotency-Key");
  CHECK(c.idempotency.window == 24h);
}

TEST_CASE("JSON syntax errors: one error with line, column and byte") {
  LoadResult r = parse("{\n  \"hostname\": \"a\",\n  \"data_dir\" \"x\"\n}");
  REQUIRE(r.errors.size() == 1);
  CHECK_FALSE(r.config);
  const ConfigError& e = r.errors[0];
  CHECK(e.path.empty());
  CHECK(e.line == 3);
  CHECK(e.column > 0);
  CHECK(e.byte > 0);
  CHECK(e.message.find("invalid JSON at line 3, column") != std::string::npos);
  CHECK(e.message.find("json.exception") == std::string::npos);
  REQUIRE(r.formatErrors().size() == 1);
  CHECK(r.formatErrors()[0].rfind("test.json: invalid JSON at line 3", 0) == 0);

  for (const char* bad :
       {"", "{", "{\"a\":}", "[1,]", "nul", "{\"a\":1}}", "{\"a\":\"\xff\"}", "{\"a\":1e400}", "\"unterminated"}) {
    CAPTURE(bad);
    LoadResult b = parse(bad);
    CHECK(b.errors.size() == 1);
    CHECK_FALSE(b.config);
    CHECK(b.errors[0].message.rfind("invalid JSON", 0) == 0);
  }
}

TEST_CASE("the top level must be an object") {
  expectError(parse("[]"), "", "expected a JSON object at the top level, got an empty array");
  expectError(parse("42"), "", "got 42");
}

TEST_CASE("missing required keys are all reported at once") {
  LoadResult r = parse("{}");
  expectError(r, "hostname", "required key is missing");
  expectError(r, "data_dir", "required key is missing");
  expectError(r, "listeners", "required key is missing");
  CHECK(r.errors.size() == 3);
}

TEST_CASE("several errors in different sections are all reported") {
  LoadResult r = parse(withTop(R"(, "limits": {"max_recipients": -5, "max_connections": "many"},
      "accounts": [{"username": "a", "password_hash": "x", "senders": ["*"], "mode": "drop"}],
      "workers": 65, "log_level": "verbose")"));
  CHECK(r.errors.size() == 7);
  expectError(r, "limits.max_recipients", "expected a positive integer, got -5");
  expectError(r, "limits.max_connections", "expected a positive integer, got \"many\"");
  expectError(r, "accounts[0].password_hash", "hash-password");
  expectError(r, "accounts[0].senders[0]", "wildcards are not supported");
  expectError(r, "accounts[0].mode", R"(expected one of "deliver", "capture", got "drop")");
  expectError(r, "workers", "expected an integer from 0 to 64, got 65");
  expectError(r, "log_level", R"(expected one of "debug", "info", "warn", "warning", "error", got "verbose")");
}

TEST_CASE("unknown keys are errors at every level") {
  std::string doc = R"({"hostname": "relay.example.net", "data_dir": "/d", "hostnme": 1,
    "tls": {"certificate": "/c", "private_key": "/k", "chain": "/x"},
    "listeners": [{"address": "[::]:587", "tls": "starttls", "proxy_protocol": true}],
    "limits": {"max_recipents": 5},
    "accounts": [{"username": "u", "password_hash": ")" +
                    std::string(kHash) + R"(", "senders": ["@example.com"], "rate_limit": {},
                  "rate_limits": {"messages_per_minut": 1, "messages_per_week": 2, "per_day": 3}}],
    "dkim": [{"domain": "example.com", "selector": "s1", "private_key": "/k", "canon": "relaxed"}],
    "delivery": {"tls_overrides": {}, "port": 25}})";
  LoadResult r = parse(doc);
  expectError(r, "hostnme", R"(unknown key "hostnme" (did you mean "hostname"?))");
  expectError(r, "tls.chain", R"(unknown key "chain")");
  expectError(r, "listeners[0].proxy_protocol", R"(unknown key "proxy_protocol")");
  expectError(r, "limits.max_recipents", R"(unknown key "max_recipents" (did you mean "max_recipients"?))");
  expectError(r, "accounts[0].rate_limit", R"(did you mean "rate_limits"?)");
  expectError(r, "accounts[0].rate_limits.messages_per_minut", R"(did you mean "messages_per_minute"?)");
  expectError(r, "accounts[0].rate_limits.messages_per_week", "expected <what>_per_<period>");
  expectError(r, "accounts[0].rate_limits.per_day", R"(unknown key "per_day")");
  expectError(r, "dkim[0].canon", R"(unknown key "canon")");
  expectError(r, "delivery.tls_overrides", R"(unknown key "tls_overrides")");
  CHECK(r.errors.size() == 10);
  // A wild key gets no far-fetched suggestion.
  LoadResult w = parse(withTop(R"(, "zzzzzzzzzzzz": 1)"));
  expectError(w, "zzzzzzzzzzzz", R"(unknown key "zzzzzzzzzzzz")");
  CHECK(w.errors[0].message.find("did you mean") == std::string::npos);
  // Keys that are not identifiers are shown in bracket form.
  expectError(parse(withTop(R"(, "a.b": 1)")), R"(["a.b"])", "unknown key");
}

TEST_CASE("duplicate keys in one object are errors with their path") {
  LoadResult r = parse(withTop(R"(, "limits": {"max_recipients": 10, "max_recipients": 1000},
      "accounts": [{"username": "a", "password_hash": ")" +
                               std::string(kHash) + R"(", "senders": ["@x.org"]},
                   {"username": "b", "username": "c", "password_hash": ")" +
                               std::string(kHash) + R"(", "senders": ["@x.org"]}])"));
  expectError(r, "limits.max_recipients", "duplicate key \"max_recipients\"");
  expectError(r, "accounts[1].username", "duplicate key \"username\"");
  CHECK(r.errors.size() == 2);
}

TEST_CASE("hostname") {
  auto withHost = [](const std::string& h) {
    return R"({"hostname": )" + h + R"(, "data_dir": "/d", "listeners": [{"address": "127.0.0.1:25", "tls": "none"}]})";
  };
  CHECK(parse(withHost("\"localhost\"")).errors.empty());
  CHECK(parse(withHost("\"MX-1.Example.NET\"")).errors.empty());
  expectError(parse(withHost("\"relay_1.example.net\"")), "hostname", "expected a domain name");
  expectError(parse(withHost("\"192.0.2.1\"")), "hostname", "IP address");
  expectError(parse(withHost("\"relay.example.net.\"")), "hostname", "trailing dot");
  expectError(parse(withHost("\"-a.example\"")), "hostname", "starts or ends with '-'");
  expectError(parse(withHost("\"a..b\"")), "hostname", "empty label");
  expectError(parse(withHost("\"" + std::string(64, 'a') + ".com\"")), "hostname", "63");
  expectError(parse(withHost("\"bücher.example\"")), "hostname", "xn--");
  expectError(parse(withHost("\"\"")), "hostname", "non-empty string");
  expectError(parse(withHost("5")), "hostname", "expected a string, got 5");
}

TEST_CASE("data_dir and tls paths must be strings") {
  expectError(
      parse(
          R"({"hostname": "h.example", "data_dir": ["/d"], "listeners": [{"address": "127.0.0.1:1", "tls": "none"}]})"),
      "data_dir", "expected a string, got an array");
  LoadResult r = parse(R"({"hostname": "h.example", "data_dir": "/d", "tls": {"certificate": 1, "private_key": null},
                           "listeners": [{"address": "[::]:465", "tls": "implicit"}]})");
  expectError(r, "tls.certificate", "expected a string, got 1");
  expectError(r, "tls.private_key", "expected a string, got null");
  expectError(
      parse(
          R"({"hostname": "h.example", "data_dir": "/d\u0000x", "listeners": [{"address": "127.0.0.1:1", "tls": "none"}]})"),
      "data_dir", "NUL");
  expectError(parse(R"({"hostname": "h.example", "data_dir": "/d", "tls": {"certificate": "/c"},
                        "listeners": [{"address": "[::]:465", "tls": "implicit"}]})"),
              "tls.private_key", "required key is missing");
  expectError(parse(R"({"hostname": "h.example", "data_dir": "/d", "tls": "/c",
                        "listeners": [{"address": "[::]:465", "tls": "implicit"}]})"),
              "tls", "expected an object, got \"/c\"");
}

TEST_CASE("tls is required unless every listener is none") {
  LoadResult r = parse(R"({"hostname": "h.example", "data_dir": "/d",
      "listeners": [{"address": "127.0.0.1:2525", "tls": "none"}, {"address": "[::]:465", "tls": "implicit"}]})");
  expectError(r, "tls", "listeners[1] uses \"implicit\"");
  CHECK(r.errors.size() == 1);
  LoadResult ok = parse(R"({"hostname": "h.example", "data_dir": "/d",
      "listeners": [{"address": "127.0.0.1:2525", "tls": "none"}, {"address": "[::1]:2526", "tls": "none"}]})");
  expectOk(ok);
  CHECK(ok.config->tls.certificate.empty());
  // A listener whose tls is itself wrong does not make the loader guess that tls is needed.
  LoadResult wrong = parse(R"({"hostname": "h.example", "data_dir": "/d",
      "listeners": [{"address": "127.0.0.1:2525", "tls": "nope"}]})");
  expectError(wrong, "listeners[0].tls", "got \"nope\"");
  CHECK(wrong.errors.size() == 1);
}

TEST_CASE("listeners") {
  SUBCASE("accepted forms") {
    LoadResult r = parse(listeners(R"({"address": "[::]:587", "tls": "starttls"},
        {"address": "0.0.0.0:465", "tls": "implicit"}, {"address": "127.0.0.1:2587", "tls": "none"},
        {"address": "localhost:2588", "tls": "none"}, {"address": "[::1]:0", "tls": "none"},
        {"address": "127.0.0.1:0", "tls": "none"}, {"address": "127.0.0.1:0"})"));
    expectOk(r);
    const auto& l = r.config->listeners;
    REQUIRE(l.size() == 7);
    CHECK(l[1].host == "0.0.0.0");
    CHECK(l[1].port == 465);
    CHECK(l[3].host == "localhost");
    CHECK(l[4].host == "::1");
    CHECK(l[4].port == 0);
    CHECK(l[6].tls == ListenerTls::StartTls);
  }
  SUBCASE("must be a non-empty array") {
    expectError(parse(listeners("")), "listeners", "at least one listener");
    expectError(parse(R"({"hostname": "h.example", "data_dir": "/d", "listeners": {"address": "[::]:587"}})"),
                "listeners", "expected an array, got an object");
    expectError(parse(listeners("\"[::]:587\"")), "listeners[0]", "expected an object, got \"[::]:587\"");
  }
  SUBCASE("tls must be one of the three") {
    expectError(parse(listeners(R"({"address": "[::]:587", "tls": "tls"})")), "listeners[0].tls",
                R"(expected one of "starttls", "implicit", "none", got "tls")");
    expectError(parse(listeners(R"({"address": "[::]:587", "tls": true})")), "listeners[0].tls", "got true");
  }
  SUBCASE("none on a public address is refused, saying why") {
    for (const char* addr : {"0.0.0.0:25", "[::]:25", "192.0.2.1:25", "[2001:db8::1]:25", "128.0.0.1:25"}) {
      CAPTURE(addr);
      LoadResult r = parse(listeners(R"({"address": "[::]:587", "tls": "starttls"}, {"address": ")" +
                                     std::string(addr) + R"(", "tls": "none"})"));
      expectError(r, "listeners[1].tls", "only allowed on a loopback address");
      expectError(r, "listeners[1].tls", "AUTH would travel in clear");
      CHECK(r.errors.size() == 1);
    }
  }
  SUBCASE("bad addresses") {
    struct Case {
      const char* address;
      const char* why;
    };
    for (const Case& c :
         {Case{"587", "not an IP address or a host name"}, Case{"[::]", "port is missing"},
          Case{"0.0.0.0", "port is missing"}, Case{":587", "host is missing"}, Case{"::1:587", "brackets"},
          Case{"[::1]587", "after ']'"}, Case{"[::1:587", "missing ']'"}, Case{"[1.2.3.4]:587", "not an IPv6 address"},
          Case{"0.0.0.0:65536", "0 to 65535"}, Case{"0.0.0.0:-1", "0 to 65535"}, Case{"0.0.0.0:", "0 to 65535"},
          Case{"mail.example.net:587", "not a host name"}, Case{"", "non-empty"}}) {
      CAPTURE(c.address);
      LoadResult r = parse(listeners(R"({"address": ")" + std::string(c.address) + R"(", "tls": "starttls"})"));
      expectError(r, "listeners[0].address", c.why);
    }
    expectError(parse(listeners(R"({"tls": "starttls"})")), "listeners[0].address", "required key is missing");
  }
  SUBCASE("duplicate addresses") {
    LoadResult r = parse(listeners(R"({"address": "[::]:587", "tls": "starttls"},
        {"address": "[::0]:587", "tls": "implicit"}, {"address": "127.0.0.1:0", "tls": "none"},
        {"address": "127.0.0.1:0", "tls": "none"}, {"address": "LOCALHOST:25", "tls": "none"},
        {"address": "localhost:25", "tls": "none"})"));
    expectError(r, "listeners[1].address", "duplicate address \"[::0]:587\" (also listeners[0])");
    expectError(r, "listeners[5].address", "(also listeners[4])");
    CHECK(r.errors.size() == 2);
  }
}

TEST_CASE("limits") {
  SUBCASE("all keys") {
    LoadResult r = parse(withTop(R"(, "limits": {"max_message_bytes": 10485760, "max_recipients": 50,
        "max_connections": 100, "max_connections_per_ip": 5, "max_bad_commands": 7, "max_auth_failures": 2,
        "command_timeout": "2m", "data_timeout": "10m", "shutdown_grace": "1m", "auth_failure_delay": "250ms"})"));
    expectOk(r);
    const Limits& l = r.config->limits;
    CHECK(l.maxMessageBytes == 10485760);
    CHECK(l.maxRecipients == 50);
    CHECK(l.maxConnections == 100);
    CHECK(l.maxConnectionsPerIp == 5);
    CHECK(l.maxBadCommands == 7);
    CHECK(l.maxAuthFailures == 2);
    CHECK(l.commandTimeout == 120s);
    CHECK(l.dataTimeout == 600s);
    CHECK(l.shutdownGrace == 60s);
    CHECK(l.authFailureDelay == 250ms);
  }
  SUBCASE("integers") {
    expectError(parse(withTop(R"(, "limits": {"max_recipients": 0})")), "limits.max_recipients",
                "expected a positive integer, got 0");
    expectError(parse(withTop(R"(, "limits": {"max_recipients": 2.5})")), "limits.max_recipients",
                "expected a positive integer, got 2.5");
    expectError(parse(withTop(R"(, "limits": {"max_recipients": "100"})")), "limits.max_recipients",
                "expected a positive integer, got \"100\"");
    expectError(parse(withTop(R"(, "limits": {"max_connections": 4294967296})")), "limits.max_connections",
                "expected a positive integer no larger than 4294967295, got 4294967296");
    expectError(parse(withTop(R"(, "limits": {"max_message_bytes": -1})")), "limits.max_message_bytes", "got -1");
    CHECK(parse(withTop(R"(, "limits": {"max_message_bytes": 18446744073709551615})")).errors.empty());
    expectError(parse(withTop(R"(, "limits": {"max_message_bytes": 18446744073709551616})")),
                "limits.max_message_bytes", "expected a positive integer");
  }
  SUBCASE("durations") {
    expectError(parse(withTop(R"(, "limits": {"command_timeout": "250ms"})")), "limits.command_timeout",
                "counts whole seconds");
    expectError(parse(withTop(R"(, "limits": {"data_timeout": 180})")), "limits.data_timeout",
                R"(expected a duration such as "30s", "5m", "1h" or "5d", got 180)");
    expectError(parse(withTop(R"(, "limits": {"shutdown_grace": "0s"})")), "limits.shutdown_grace",
                "greater than zero");
    expectError(parse(withTop(R"(, "limits": {"auth_failure_delay": "1 s"})")), "limits.auth_failure_delay",
                "\"250ms\"");
    LoadResult zero = parse(withTop(R"(, "limits": {"auth_failure_delay": "0s"})"));
    expectOk(zero);
    CHECK(zero.config->limits.authFailureDelay == 0ms);
  }
  expectError(parse(withTop(R"(, "limits": [])")), "limits", "expected an object, got an empty array");
}

TEST_CASE("limits: brute-force thresholds and sessions per account") {
  LoadResult d = parse(withTop(""));
  REQUIRE(d.config);
  CHECK(d.config->limits.maxSessionsPerAccount == 100);
  CHECK(d.config->limits.authDelayAfter == 3);
  CHECK(d.config->limits.authDelayBase == 1000ms);
  CHECK(d.config->limits.authDelayMax == 30000ms);
  CHECK(d.config->limits.authLockoutAfter == 10);
  CHECK(d.config->limits.authLockoutWindow == 900s);
  CHECK(d.config->limits.authLockoutDuration == 900s);
  LoadResult r = parse(withTop(R"(, "limits": {"max_sessions_per_account": 0, "auth_delay_after": 5,
      "auth_delay_base": "250ms", "auth_delay_max": "10s", "auth_lockout_after": 0,
      "auth_lockout_window": "1h", "auth_lockout_duration": "2m"})"));
  INFO(allErrors(r));
  REQUIRE(r.config);
  const Limits& l = r.config->limits;
  CHECK(l.maxSessionsPerAccount == 0);
  CHECK(l.authDelayAfter == 5);
  CHECK(l.authDelayBase == 250ms);
  CHECK(l.authDelayMax == 10000ms);
  CHECK(l.authLockoutAfter == 0);
  CHECK(l.authLockoutWindow == 3600s);
  CHECK(l.authLockoutDuration == 120s);
  expectError(parse(withTop(R"(, "limits": {"auth_lockout_window": "250ms"})")), "limits.auth_lockout_window",
              "expected a duration");
  expectError(parse(withTop(R"(, "limits": {"auth_delay_after": -1})")), "limits.auth_delay_after", "");
  expectError(parse(withTop(R"(, "limits": {"auth_lockout_afer": 3})")), "limits.auth_lockout_afer", "");
}

TEST_CASE("accounts") {
  SUBCASE("valid, with normalisation") {
    LoadResult r = parse(withAccount(R"("senders": ["@Shop.Example.COM", "Alerts@Example.ORG", "x.y+z@b.example"],
        "rate_limits": {"bytes_per_day": 1000000000, "recipients_per_second": 3, "messages_per_month": 9},
        "mode": "capture")"));
    expectOk(r);
    const Account& a = r.config->accounts[0];
    CHECK(a.senders == std::vector<std::string>{"@shop.example.com", "Alerts@example.org", "x.y+z@b.example"});
    CHECK(a.mode == AccountMode::Capture);
    REQUIRE(a.rateLimits.size() == 3);
    bool sawBytes = false;
    for (const auto& rl : a.rateLimits) {
      if (rl.key == "bytes_per_day") {
        sawBytes = true;
        CHECK(rl.what == "bytes");
        CHECK(rl.period == "day");
        CHECK(rl.amount == 1000000000);
      }
    }
    CHECK(sawBytes);
  }
  SUBCASE("accounts must be an array of objects") {
    expectError(parse(withTop(R"(, "accounts": {})")), "accounts", "expected an array, got an empty object");
    expectError(parse(withTop(R"(, "accounts": [null])")), "accounts[0]", "expected an object, got null");
  }
  SUBCASE("username") {
    expectError(parse(withTop(R"(, "accounts": [{"username": "", "password_hash": ")" + std::string(kHash) +
                              R"(", "senders": ["@x.org"]}])")),
                "accounts[0].username", "non-empty string");
    expectError(parse(withTop(R"(, "accounts": [{"username": "a:b", "password_hash": ")" + std::string(kHash) +
                              R"(", "senders": ["@x.org"]}])")),
                "accounts[0].username", "contains ':'");
    expectError(parse(withTop(R"(, "accounts": [{"username": "a\tb", "password_hash": ")" + std::string(kHash) +
                              R"(", "senders": ["@x.org"]}])")),
                "accounts[0].username", "control character");
    expectError(
        parse(withTop(R"(, "accounts": [{"password_hash": ")" + std::string(kHash) + R"(", "senders": ["@x.org"]}])")),
        "accounts[0].username", "required key is missing");
    std::string acct = R"({"username": "ci", "password_hash": ")" + std::string(kHash) + R"(", "senders": ["@x.org"]})";
    LoadResult dup = parse(withTop(", \"accounts\": [" + acct + "," + acct + "," + acct + "]"));
    expectError(dup, "accounts[1].username", "duplicate username \"ci\" (also accounts[0])");
    expectError(dup, "accounts[2].username", "(also accounts[0])");
  }
  SUBCASE("password_hash") {
    for (const char* bad : {"hunter2-secret", "$scrypt$", "$scrypt$ln=15,r=8,p=1$salt", "$scrypt$a$b$c$d",
                            "$scrypt$$b$c", "$argon2id$v=19$m=65536$salt$hash", "$scrypt$a$b$"}) {
      CAPTURE(bad);
      std::string doc = withTop(R"(, "accounts": [{"username": "u", "senders": ["@x.org"], "password_hash": ")" +
                                std::string(bad) + "\"}]");
      LoadResult r = parse(doc);
      expectError(r, "accounts[0].password_hash", "($scrypt$PARAMS$SALT$KEY)");
      // The hash (or the cleartext password pasted by mistake) is not echoed.
      CHECK(findError(r, "accounts[0].password_hash")->message.find("hunter2") == std::string::npos);
    }
    expectError(parse(withTop(R"(, "accounts": [{"username": "u", "senders": ["@x.org"]}])")),
                "accounts[0].password_hash", "required key is missing");
  }
  SUBCASE("senders") {
    struct Case {
      const char* sender;
      const char* why;
    };
    for (const Case& c :
         {Case{"*", "wildcards"}, Case{"*@example.com", "wildcards"}, Case{"@", "domain after '@' is missing"},
          Case{"a b@example.com", "spaces"}, Case{"@example.com ", "spaces"},
          Case{"example.com", R"(did you mean "@example.com"?)"}, Case{"nothing", "did you mean"},
          Case{"user@", "domain after '@' is missing"}, Case{"a@b@example.com", "local part"},
          Case{".a@example.com", "misplaced '.'"}, Case{"a@exa_mple.com", "domain is not valid"},
          Case{"a@192.0.2.1", "IP address"}, Case{"", "no '@'"}}) {
      CAPTURE(c.sender);
      LoadResult r = parse(withAccount(R"("senders": [")" + std::string(c.sender) + "\"]"));
      expectError(r, "accounts[0].senders[0]", R"(expected "@domain" or "local@domain")");
      expectError(r, "accounts[0].senders[0]", c.why);
    }
    expectError(parse(withAccount(R"("senders": [])")), "accounts[0].senders", "at least one sender");
    expectError(parse(withAccount(R"("senders": "@x.org")")), "accounts[0].senders", "expected an array");
    expectError(parse(withAccount(R"("senders": ["@x.org", 7])")), "accounts[0].senders[1]", "got 7");
    expectError(parse(withTop(R"(, "accounts": [{"username": "u", "password_hash": ")" + std::string(kHash) + "\"}]")),
                "accounts[0].senders", "required key is missing");
  }
  SUBCASE("rate_limits") {
    expectError(parse(withAccount(R"("senders": ["@x.org"], "rate_limits": {"messages_per_day": -5})")),
                "accounts[0].rate_limits.messages_per_day", "expected a positive integer, got -5");
    expectError(parse(withAccount(R"("senders": ["@x.org"], "rate_limits": {"messages_per_day": 0})")),
                "accounts[0].rate_limits.messages_per_day", "got 0");
    expectError(parse(withAccount(R"("senders": ["@x.org"], "rate_limits": {"mails_per_day": 5})")),
                "accounts[0].rate_limits.mails_per_day", "unknown key");
    expectError(parse(withAccount(R"("senders": ["@x.org"], "rate_limits": [])")), "accounts[0].rate_limits",
                "expected an object");
    LoadResult all = parse(withAccount(R"("senders": ["@x.org"], "rate_limits": {
        "messages_per_second": 1, "messages_per_minute": 1, "messages_per_hour": 1, "messages_per_day": 1,
        "messages_per_month": 1, "recipients_per_second": 1, "recipients_per_minute": 1, "recipients_per_hour": 1,
        "recipients_per_day": 1, "recipients_per_month": 1, "bytes_per_second": 1, "bytes_per_minute": 1,
        "bytes_per_hour": 1, "bytes_per_day": 1, "bytes_per_month": 1})"));
    expectOk(all);
    CHECK(all.config->accounts[0].rateLimits.size() == 15);
  }
}

TEST_CASE("dkim") {
  SUBCASE("valid, with defaults and normalisation") {
    LoadResult r =
        parse(withTop(R"(, "dkim": [{"domain": "Shop.Example.com", "selector": "S2026", "private_key": "/k1"},
        {"domain": "shop.example.com", "selector": "2026.eu", "algorithm": "ed25519-sha256", "private_key": "/k2"}])"));
    expectOk(r);
    CHECK(r.config->dkim[0].domain == "shop.example.com");
    CHECK(r.config->dkim[0].selector == "s2026");
    CHECK(r.config->dkim[0].algorithm == "rsa-sha256");
    CHECK(r.config->dkim[1].selector == "2026.eu");
  }
  SUBCASE("errors") {
    LoadResult r = parse(withTop(R"(, "dkim": [
        {"domain": "example.com", "selector": "s_1", "algorithm": "rsa-sha1", "private_key": "/k"},
        {"domain": "example..com", "selector": "s1", "private_key": 3},
        {"domain": "example.com", "selector": "-x"},
        {"domain": "EXAMPLE.com", "selector": "a", "private_key": "/k"},
        {"domain": "example.com", "selector": "A", "private_key": "/k"}])"));
    expectError(r, "dkim[0].selector", "expected a DNS label such as \"s2026\", got \"s_1\"");
    expectError(r, "dkim[0].algorithm", R"(expected one of "rsa-sha256", "ed25519-sha256", got "rsa-sha1")");
    expectError(r, "dkim[1].domain", "empty label");
    expectError(r, "dkim[1].private_key", "expected a string, got 3");
    expectError(r, "dkim[2].selector", "'-'");
    expectError(r, "dkim[2].private_key", "required key is missing");
    expectError(r, "dkim[4]", "duplicate key for selector \"a\" of domain \"example.com\" (also dkim[3])");
    CHECK(r.errors.size() == 7);
  }
  expectError(parse(withTop(R"(, "dkim": {})")), "dkim", "expected an array");
  SUBCASE("canonicalization and expiry") {
    LoadResult r = parse(withTop(R"(, "dkim": [
        {"domain": "a.example", "selector": "r", "private_key": "/k1", "canonicalization": "simple/simple", "expiry": "7d"},
        {"domain": "a.example", "selector": "e", "algorithm": "ed25519-sha256", "private_key": "/k2", "canonicalization": "simple/simple"},
        {"domain": "b.example", "selector": "r", "private_key": "/k3"}])"));
    expectOk(r);
    CHECK(r.config->dkim[0].canonicalization == "simple/simple");
    CHECK(r.config->dkim[0].expiry == std::chrono::seconds(7 * 86400));
    CHECK(!r.config->dkim[1].expiry);
    CHECK(r.config->dkim[2].canonicalization == "relaxed/relaxed");
    LoadResult bad = parse(withTop(R"(, "dkim": [
        {"domain": "a.example", "selector": "r", "private_key": "/k1", "canonicalization": "relaxed"},
        {"domain": "b.example", "selector": "r", "private_key": "/k1", "canonicalization": "simple/simple"},
        {"domain": "b.example", "selector": "e", "private_key": "/k2"}])"));
    expectError(bad, "dkim[0].canonicalization", R"(expected one of "relaxed/relaxed")");
    expectError(bad, "dkim[2].canonicalization",
                "every key of domain \"b.example\" must use the same canonicalization (dkim[1] uses \"simple/simple\")");
    CHECK(bad.errors.size() == 2);
  }
}

TEST_CASE("delivery") {
  SUBCASE("valid") {
    LoadResult r = parse(withTop(R"(, "delivery": {"resolvers": ["127.0.0.1", "[::1]:5353", "::1", "192.0.2.53:53"],
        "port": 2525, "tls": "verify", "tls_policy_overrides": {"Example.COM": "required", "legacy.example": "opportunistic"},
        "retry_schedule": ["30s", "1m"], "max_queue_time": "2d", "max_connections": 5, "max_connections_per_domain": 2})"));
    expectOk(r);
    const Delivery& d = r.config->delivery;
    CHECK(d.resolvers == std::vector<std::string>{"127.0.0.1:53", "[::1]:5353", "[::1]:53", "192.0.2.53:53"});
    CHECK(d.port == 2525);
    CHECK(d.tls == DeliveryTls::Verify);
    REQUIRE(d.tlsOverrides.size() == 2);
    bool sawExample = false;
    for (const auto& o : d.tlsOverrides) {
      if (o.domain == "example.com") {
        sawExample = true;
        CHECK(o.tls == DeliveryTls::Required);
      }
    }
    CHECK(sawExample);
    CHECK(d.retrySchedule == std::vector<std::chrono::seconds>{30s, 60s});
    CHECK(d.maxQueueTime == 48h);
    CHECK(d.maxConnections == 5);
    CHECK(d.maxConnectionsPerDomain == 2);
    // What the loader stores, parseHostPort reads back.
    std::string host;
    uint16_t port = 0;
    CHECK(parseHostPort(d.resolvers[2], host, port));
    CHECK(host == "::1");
    CHECK(port == 53);
  }
  SUBCASE("errors") {
    LoadResult r = parse(withTop(R"(, "delivery": {"resolvers": ["dns.example", "1.1.1.1:0", 53, "1.1.1.1:99999"],
        "port": 0, "tls": "always",
        "tls_policy_overrides": {"example.com": "verify", "EXAMPLE.com": "required", "bad_domain": "required", "ok.example": "sometimes"},
        "retry_schedule": ["5m", "0s", "x", "5ms", 300], "max_queue_time": "forever", "max_connections": 0,
        "max_connections_per_domain": -1})"));
    expectError(r, "delivery.resolvers[0]", "a resolver must be an IP address");
    expectError(r, "delivery.resolvers[1]", "port 0");
    expectError(r, "delivery.resolvers[2]", "expected a string, got 53");
    expectError(r, "delivery.resolvers[3]", "0 to 65535");
    expectError(r, "delivery.port", "expected an integer from 1 to 65535, got 0");
    expectError(r, "delivery.tls", R"(expected one of "opportunistic", "required", "verify", got "always")");
    // Keys are visited in sorted order: "EXAMPLE.com" sorts before "example.com".
    expectError(r, R"(delivery.tls_policy_overrides["example.com"])", "case-insensitive");
    expectError(r, "delivery.tls_policy_overrides.bad_domain", "expected a domain name as the key");
    expectError(r, R"(delivery.tls_policy_overrides["ok.example"])", "got \"sometimes\"");
    expectError(r, "delivery.retry_schedule[1]", "greater than zero");
    expectError(r, "delivery.retry_schedule[2]", "got \"x\"");
    expectError(r, "delivery.retry_schedule[3]", "whole seconds");
    expectError(r, "delivery.retry_schedule[4]", "got 300");
    expectError(r, "delivery.max_queue_time", "got \"forever\"");
    expectError(r, "delivery.max_connections", "got 0");
    expectError(r, "delivery.max_connections_per_domain", "got -1");
    CHECK(r.errors.size() == 16);
  }
  expectError(parse(withTop(R"(, "delivery": {"retry_schedule": []})")), "delivery.retry_schedule",
              "at least one duration");
  expectError(parse(withTop(R"(, "delivery": {"resolvers": []})")), "delivery.resolvers", "/etc/resolv.conf");
  expectError(parse(withTop(R"(, "delivery": {"tls_policy_overrides": ["example.com"]})")),
              "delivery.tls_policy_overrides", "expected an object");
}

TEST_CASE("idempotency") {
  SUBCASE("valid") {
    LoadResult r = parse(withTop(R"(, "idempotency": {"header": "X-Submission-Key", "window": "2h"})"));
    expectOk(r);
    CHECK(r.config->idempotency.header == "X-Submission-Key");
    CHECK(r.config->idempotency.window == 2h);
    LoadResult w = parse(withTop(R"(, "idempotency": {"window": "30d"})"));
    expectOk(w);
    CHECK(w.config->idempotency.header == "Idempotency-Key");
    CHECK(w.config->idempotency.window == 30 * 24h);
  }
  SUBCASE("the header is a field name") {
    expectError(parse(withTop(R"(, "idempotency": {"header": "Idempotency Key"})")), "idempotency.header",
                R"(expected a header field name such as "Idempotency-Key")");
    expectError(parse(withTop(R"(, "idempotency": {"header": "Key:"})")), "idempotency.header", "got \"Key:\"");
    expectError(parse(withTop(R"(, "idempotency": {"header": "Schl\u00fcssel"})")), "idempotency.header",
                "RFC 5322 3.6.8");
    expectError(parse(withTop(R"(, "idempotency": {"header": ""})")), "idempotency.header", "non-empty");
    expectError(parse(withTop(R"(, "idempotency": {"header": 1})")), "idempotency.header", "expected a string");
  }
  SUBCASE("the window is a duration over zero, at most 30 days") {
    expectError(parse(withTop(R"(, "idempotency": {"window": "0s"})")), "idempotency.window",
                "expected a duration greater than zero");
    expectError(parse(withTop(R"(, "idempotency": {"window": "31d"})")), "idempotency.window",
                R"(at most "30d", got "31d")");
    expectError(parse(withTop(R"(, "idempotency": {"window": "1h30m"})")), "idempotency.window",
                "expected a duration such as");
  }
  SUBCASE("unknown keys and wrong types are refused") {
    expectError(parse(withTop(R"(, "idempotency": {"enabled": true})")), "idempotency.enabled", "unknown key");
    expectError(parse(withTop(R"(, "idempotency": "24h")")), "idempotency", "expected an object");
  }
}

TEST_CASE("retention") {
  SUBCASE("valid") {
    LoadResult r = parse(withTop(R"(, "retention": {"finished_bodies": "2h", "history": "3d", "captured": "90m"})"));
    expectOk(r);
    const Retention& t = r.config->retention;
    CHECK(t.finishedBodies == 2h);
    CHECK(t.history == 72h);
    CHECK(t.captured == 90min);
  }
  SUBCASE("finished_bodies may be zero, the others may not") {
    LoadResult r = parse(withTop(R"(, "retention": {"finished_bodies": "0s", "history": "1s", "captured": "1s"})"));
    expectOk(r);
    CHECK(r.config->retention.finishedBodies == 0s);
    CHECK(r.config->retention.history == 1s);
    LoadResult bad = parse(withTop(R"(, "retention": {"history": "0s", "captured": "0d"})"));
    expectError(bad, "retention.history", "expected a duration greater than zero, got \"0s\"");
    expectError(bad, "retention.captured", "expected a duration greater than zero, got \"0d\"");
    CHECK(bad.errors.size() == 2);
  }
  SUBCASE("errors name the file, the path and what was expected") {
    LoadResult r = parse(withTop(R"(, "retention": {"finished_bodies": "1h30m", "history": 30, "captured": "500ms",
        "captured_bodies": "1d"})"));
    expectError(r, "retention.finished_bodies", R"(expected a duration such as "30s", "5m", "1h" or "5d", got "1h30m")");
    expectError(r, "retention.history", "got 30");
    expectError(r, "retention.captured", "whole seconds");
    expectError(r, "retention.captured_bodies", "unknown key");
    CHECK(r.errors.size() == 4);
    bool named = false;
    for (const auto& line : r.formatErrors())
      named = named || line.rfind("test.json: retention.history: expected a duration", 0) == 0;
    CHECK(named);
    expectError(parse(withTop(R"(, "retention": ["1d"])")), "retention", "expected an object");
  }
  SUBCASE("bodies are not kept longer than the history") {
    expectError(parse(withTop(R"(, "retention": {"finished_bodies": "31d"})")), "retention.finished_bodies",
                R"(not longer than retention.history ("30d"), got "31d")");
    expectError(parse(withTop(R"(, "retention": {"finished_bodies": "2h", "history": "1h"})")),
                "retention.finished_bodies", R"(retention.history ("1h"))");
    expectOk(parse(withTop(R"(, "retention": {"finished_bodies": "1h", "history": "1h"})")));
    // A history that is itself wrong is reported alone.
    LoadResult r = parse(withTop(R"(, "retention": {"finished_bodies": "2h", "history": "x"})"));
    expectError(r, "retention.history", "got \"x\"");
    CHECK(r.errors.size() == 1);
  }
}

TEST_CASE("log_level and workers") {
  LoadResult r = parse(withTop(R"(, "log_level": "debug", "workers": 64)"));
  expectOk(r);
  CHECK(r.config->log.level == "debug");
  CHECK(r.config->workers == 64);
  expectOk(parse(withTop(R"(, "workers": 0)")));
  expectError(parse(withTop(R"(, "workers": "4")")), "workers", "expected an integer from 0 to 64, got \"4\"");
  expectError(parse(withTop(R"(, "workers": -1)")), "workers", "got -1");
  // "warning" is the older spelling of "warn".
  LoadResult w = parse(withTop(R"(, "log_level": "warning")"));
  expectOk(w);
  CHECK(w.config->log.level == "warn");
  CHECK(w.config->log.level == "warn");
}

TEST_CASE("issue 11: log.format, log.level and metrics.address") {
  LoadResult d = parse(withTop(""));
  expectOk(d);
  CHECK(d.config->log.format == "text");
  CHECK(d.config->log.level == "info");
  CHECK(d.config->metrics.address.empty());
  LoadResult r = parse(withTop(R"(, "log": {"format": "json", "level": "warn"}, "metrics": {"address": "127.0.0.1:9587"})"));
  expectOk(r);
  CHECK(r.config->log.format == "json");
  CHECK(r.config->log.level == "warn");
  CHECK(r.config->log.level == "warn");
  CHECK(r.config->metrics.host == "127.0.0.1");
  CHECK(r.config->metrics.port == 9587);
  LoadResult v6 = parse(withTop(R"(, "metrics": {"address": "[::1]:9100"})"));
  expectOk(v6);
  CHECK(v6.config->metrics.host == "::1");
  expectError(parse(withTop(R"(, "log": {"format": "xml"})")), "log.format",
              R"(expected one of "text", "json", got "xml")");
  expectError(parse(withTop(R"(, "log": {"level": "warning"})")), "log.level", "got \"warning\"");
  expectError(parse(withTop(R"(, "log": {"level": "info"}, "log_level": "info")")), "log.level",
              "expected only one of log.level and log_level");
  expectError(parse(withTop(R"(, "log": {"colour": true})")), "log.colour", "unknown key");
  expectError(parse(withTop(R"(, "metrics": {"address": "metrics.example:9587"})")), "metrics.address",
              "not a host name");
  expectError(parse(withTop(R"(, "metrics": {"address": "127.0.0.1:0"})")), "metrics.address", "port 0");
  expectError(parse(withTop(R"(, "metrics": {"address": "127.0.0.1"})")), "metrics.address",
              R"(expected an address such as "127.0.0.1:9587")");
  expectError(parse(withTop(R"(, "metrics": {})")), "metrics.address", "");
}

TEST_CASE("formatErrors gives FILE: PATH: MESSAGE") {
  LoadResult r = parseConfig(withTop(R"(, "limits": {"max_recipients": -5})"), "/etc/subrelay/config.json");
  REQUIRE(r.formatErrors().size() == 1);
  CHECK(r.formatErrors()[0] == "/etc/subrelay/config.json: limits.max_recipients: expected a positive integer, got -5");
  LoadResult top = parseConfig("[]", "c.json");
  CHECK(top.formatErrors()[0] == "c.json: expected a JSON object at the top level, got an empty array");
}

TEST_CASE("messages quote hostile input safely") {
  std::string longName(500, 'x');
  LoadResult r = parse(withTop(R"(, "log_level": ")" + longName + R"(\u0001\n")"));
  const ConfigError* e = findError(r, "log_level");
  REQUIRE(e);
  CHECK(e->message.size() < 300);
  CHECK(e->message.find('\n') == std::string::npos);
  LoadResult c = parse(withTop(R"(, "log_level": "a\u0001\n")"));
  expectError(c, "log_level", R"(got "a\x01\x0a")");
}

TEST_CASE("parseConfig never throws") {
  std::string deep(100000, '[');
  deep += std::string(100000, ']');
  std::string deepObj;
  for (int i = 0; i < 20000; ++i) deepObj += "{\"limits\":";
  deepObj += "1";
  for (int i = 0; i < 20000; ++i) deepObj += "}";
  std::string deepValue = withTop(R"(, "limits": {"max_recipients": )" + deep + "}");
  for (const std::string& s :
       {deep, deepObj, deepValue, std::string("\0\0\0", 3), std::string("{\"hostname\":\"\0\"}", 16),
        std::string("{\"a\":\"\\ud800\"}"), std::string("\xef\xbb\xbf{}"), std::string("{\"workers\":1e999999}"),
        withTop(R"(, "accounts": [{"username": "u", "password_hash": "$scrypt$$$$$$$$$", "senders": [[[]]]}])")}) {
    LoadResult r;
    CHECK_NOTHROW(r = parse(s));
    CHECK_FALSE(r.errors.empty());
  }
  CHECK(findError(parse(deepValue), "limits.max_recipients") != nullptr);
}

TEST_CASE("durations") {
  CHECK(parseDuration("30s") == 30s);
  CHECK(parseDuration("5m") == 300s);
  CHECK(parseDuration("1h") == 3600s);
  CHECK(parseDuration("5d") == std::chrono::seconds(5 * 86400));
  CHECK(parseDuration("007s") == 7s);
  CHECK(parseDuration("36500d") == kMaxDuration);
  CHECK_FALSE(parseDuration("36501d"));
  CHECK(parseDurationMs("250ms") == 250ms);
  CHECK(parseDurationMs("2s") == 2000ms);
  CHECK(parseDurationMs("1d") == std::chrono::milliseconds(86400000));
  for (const char* bad : {"",
                          "5",
                          "s",
                          "m5",
                          "-5m",
                          "+5m",
                          "5 m",
                          " 5m",
                          "5m ",
                          "1.5h",
                          "5M",
                          "5S",
                          "1h30m",
                          "0s",
                          "0ms",
                          "5w",
                          "5y",
                          "5sec",
                          "5mm",
                          "5ms",
                          "99999999999999999999999999d",
                          "18446744073709551616s",
                          "3153600001s",
                          "\x35\x00s"}) {
    CAPTURE(bad);
    CHECK_FALSE(parseDuration(bad));
  }
  for (const char* bad : {"0ms", "ms", "5 ms", "1.5ms", "3153600000001ms", "5Ms"}) {
    CAPTURE(bad);
    CHECK_FALSE(parseDurationMs(bad));
  }
  std::chrono::milliseconds out{1};
  CHECK(checkDuration("0s", false, out) == DurationProblem::Zero);
  CHECK(out == 0ms);
  CHECK(checkDuration("5ms", false, out) == DurationProblem::Milliseconds);
  CHECK(checkDuration("999999999999999999999999h", true, out) == DurationProblem::TooLong);
  CHECK(checkDuration("5x", true, out) == DurationProblem::Syntax);
  // A value at the cap converts to nanoseconds without overflow.
  CHECK(std::chrono::duration_cast<std::chrono::nanoseconds>(kMaxDuration).count() > 0);
}

TEST_CASE("parseHostPort") {
  std::string host;
  uint16_t port = 1;
  CHECK(parseHostPort("[::]:587", host, port));
  CHECK(host == "::");
  CHECK(port == 587);
  CHECK(parseHostPort("0.0.0.0:465", host, port));
  CHECK(host == "0.0.0.0");
  CHECK(port == 465);
  CHECK(parseHostPort("127.0.0.1:2587", host, port));
  CHECK(host == "127.0.0.1");
  CHECK(port == 2587);
  CHECK(parseHostPort("localhost:2587", host, port));
  CHECK(host == "localhost");
  CHECK(parseHostPort("[2001:db8::25]:25", host, port));
  CHECK(host == "2001:db8::25");
  CHECK(parseHostPort("mx.example.net:25", host, port));
  CHECK(host == "mx.example.net");
  CHECK(parseHostPort("127.0.0.1:0", host, port));
  CHECK(port == 0);
  CHECK(parseHostPort("127.0.0.1:65535", host, port));
  CHECK(port == 65535);
  for (const char* bad : {"",
                          ":",
                          ":587",
                          "127.0.0.1",
                          "127.0.0.1:",
                          "[::1]",
                          "[::1]:",
                          "[::1]587",
                          "::1:587",
                          "::1",
                          "[::1",
                          "[]:25",
                          "[1.2.3.4]:25",
                          "[fe80::1%eth0]:25",
                          "host:65536",
                          "host:-1",
                          "host:+1",
                          "host:1x",
                          "a b:1",
                          "ex_ample.com:25",
                          "256.1.1.1:25",
                          "127.0.0.1:000025",
                          "example.com.:25"}) {
    CAPTURE(bad);
    CHECK_FALSE(parseHostPort(bad, host, port));
  }
}

TEST_CASE("isLoopbackHost") {
  for (const char* yes : {"127.0.0.1", "127.0.0.2", "127.255.255.254", "::1", "[::1]", "0:0:0:0:0:0:0:1", "localhost",
                          "LocalHost", "::ffff:127.0.0.1"}) {
    CAPTURE(yes);
    CHECK(isLoopbackHost(yes));
  }
  for (const char* no :
       {"0.0.0.0", "::", "[::]", "128.0.0.1", "126.255.255.255", "192.0.2.1", "::2", "::ffff:192.0.2.1", "example.com",
        "localhost.example.com", "", "[::1", "127.0.0.1:25", "127.1"}) {
    CAPTURE(no);
    CHECK_FALSE(isLoopbackHost(no));
  }
  // An embedded NUL must not cut the string short for inet_pton.
  CHECK_FALSE(isLoopbackHost(std::string("127.0.0.1\0.evil", 15)));
  std::string host;
  uint16_t port = 0;
  CHECK_FALSE(parseHostPort(std::string("127.0.0.1\0x:25", 14), host, port));
}

TEST_CASE("isValidDomainName and jsonName") {
  CHECK(isValidDomainName("example.com"));
  CHECK(isValidDomainName("xn--bcher-kva.example"));
  CHECK(isValidDomainName("a"));
  CHECK_FALSE(isValidDomainName("example.com."));
  CHECK_FALSE(isValidDomainName("1.2.3.4"));
  CHECK_FALSE(isValidDomainName(std::string(254, 'a')));
  CHECK(std::string(jsonName(ListenerTls::Implicit)) == "implicit");
  CHECK(std::string(jsonName(AccountMode::Capture)) == "capture");
  CHECK(std::string(jsonName(DeliveryTls::Verify)) == "verify");
}

namespace {

// A scratch directory removed at the end of the test.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    path = std::filesystem::temp_directory_path() / ("subrelay-config-test-" + std::to_string(::getpid()));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string write(const std::string& name, const std::string& text) const {
    std::ofstream(path / name) << text;
    return (path / name).string();
  }
};

}  // namespace

TEST_CASE("loadConfigFile and checkFiles") {
  TempDir dir;
  std::string cert = dir.write("cert.pem", "x");
  std::string key = dir.write("key.pem", "x");
  std::string dkimKey = dir.write("dkim.pem", "x");
  auto doc = [&](const std::string& certPath, const std::string& dataDir) {
    return R"({"hostname": "relay.example.net", "data_dir": ")" + dataDir + R"(",
      "tls": {"certificate": ")" +
           certPath + R"(", "private_key": ")" + key + R"("},
      "listeners": [{"address": "[::]:587", "tls": "starttls"}],
      "dkim": [{"domain": "example.com", "selector": "s1", "private_key": ")" +
           dkimKey + R"("},
               {"domain": "example.com", "selector": "s2", "private_key": ")" +
           (dir.path / "nope.pem").string() + R"("}]})";
  };
  SUBCASE("missing and unreadable files are reported with their paths") {
    std::string path = dir.write("config.json", doc((dir.path / "missing.pem").string(), (dir.path / "data").string()));
    LoadResult r = loadConfigFile(path);
    CHECK_FALSE(r.config);
    CHECK(r.fileName == path);
    expectError(r, "tls.certificate", "No such file or directory");
    expectError(r, "dkim[1].private_key", "cannot read");
    CHECK(findError(r, "tls.private_key") == nullptr);
    CHECK(findError(r, "dkim[0].private_key") == nullptr);
    CHECK(r.errors.size() == 2);
  }
  SUBCASE("a directory is not a key file; data_dir must not be a file") {
    std::string path = dir.write("config.json", doc(dir.path.string(), cert));
    LoadResult r = loadConfigFile(path);
    expectError(r, "tls.certificate", "not a regular file");
    expectError(r, "data_dir", "is not a directory");
  }
  SUBCASE("all present") {
    std::string text = doc(cert, dir.path.string());
    text.replace(text.find((dir.path / "nope.pem").string()), (dir.path / "nope.pem").string().size(), key);
    std::string path = dir.write("config.json", text);
    LoadResult r = loadConfigFile(path);
    expectOk(r);
    CHECK(r.config->sourcePath == path);
    CHECK(checkFiles(*r.config).empty());
  }
  SUBCASE("the config file itself") {
    LoadResult r = loadConfigFile((dir.path / "absent.json").string());
    REQUIRE(r.errors.size() == 1);
    CHECK(r.errors[0].path.empty());
    CHECK(r.formatErrors()[0] ==
          (dir.path / "absent.json").string() + ": cannot read the configuration file: No such file or directory");
    LoadResult d = loadConfigFile(dir.path.string());
    REQUIRE(d.errors.size() == 1);
    CHECK(d.errors[0].message.find("directory") != std::string::npos);
    std::string bad = dir.write("bad.json", "{\n\"hostname\": }");
    LoadResult s = loadConfigFile(bad);
    REQUIRE(s.errors.size() == 1);
    CHECK(s.errors[0].line == 2);
  }
}

TEST_CASE("issue 9: header and junk limits, allow_null_sender, IDN senders") {
  LoadResult d = parse(withTop(""));
  REQUIRE(d.config);
  CHECK(d.config->limits.maxHeaderBytes == 1048576);
  CHECK(d.config->limits.maxHeaderFields == 10000);
  CHECK(d.config->limits.maxJunkCommands == 100);
  LoadResult r = parse(withTop(R"(, "limits": {"max_header_bytes": 65536, "max_header_fields": 500, "max_junk_commands": 0})"));
  INFO(allErrors(r));
  REQUIRE(r.config);
  CHECK(r.config->limits.maxHeaderBytes == 65536);
  CHECK(r.config->limits.maxHeaderFields == 500);
  CHECK(r.config->limits.maxJunkCommands == 0);
  expectError(parse(withTop(R"(, "limits": {"max_header_bytes": 10})")), "limits.max_header_bytes", "from 1024");
  expectError(parse(withTop(R"(, "limits": {"max_header_fields": "many"})")), "limits.max_header_fields", "");

  LoadResult n = parse(withAccount(R"("senders": ["@shop.example.com"], "allow_null_sender": true)"));
  expectOk(n);
  CHECK(n.config->accounts[0].allowNullSender);
  CHECK_FALSE(parse(withAccount(R"("senders": ["@shop.example.com"])")).config->accounts[0].allowNullSender);
  expectError(parse(withAccount(R"("senders": ["@shop.example.com"], "allow_null_sender": "yes")")),
              "accounts[0].allow_null_sender", "expected true or false");

  // IDNA2008: written in UTF-8, upper case or as an A-label, kept as the A-label.
  LoadResult i = parse(withAccount(R"("senders": ["@ex)" "\xc3\xa4" R"(mple.com", "Info@EX)" "\xc3\x84" R"(MPLE.org", "@XN--EXMPLE-CUA.net"])"));
  expectOk(i);
  CHECK(i.config->accounts[0].senders ==
        std::vector<std::string>{"@xn--exmple-cua.com", "Info@xn--exmple-cua.org", "@xn--exmple-cua.net"});
  expectError(parse(withAccount(R"("senders": ["@xn--zz.com"])")), "accounts[0].senders[0]", "IDNA2008");
  expectError(parse(withAccount(R"("senders": ["@-bad.com"])")), "accounts[0].senders[0]", "");
}

TEST_CASE("issue 12: delivery.relay, accounts[].relay and relay_overrides") {
  SUBCASE("defaults: port from tls, verify on") {
    LoadResult r = parse(withTop(R"(, "delivery": {"relay": [
        {"host": "SMTP.Provider.Example", "username": "u", "password_file": "/etc/subrelay/pw"},
        {"host": "10.0.0.5", "tls": "implicit", "verify": false},
        {"host": "[::1]", "port": 2525}]})"));
    expectOk(r);
    const auto& rl = r.config->delivery.relay;
    REQUIRE(rl.size() == 3);
    CHECK(rl[0].host == "smtp.provider.example");
    CHECK(rl[0].port == 587);
    CHECK(rl[0].tls == RelayTls::StartTls);
    CHECK(rl[0].verify);
    CHECK(rl[0].username == "u");
    CHECK(rl[0].passwordFile == "/etc/subrelay/pw");
    CHECK(rl[0].password.empty());  // parseConfig never reads files
    CHECK(rl[0].jsonPath == "delivery.relay[0]");
    CHECK(rl[1].port == 465);
    CHECK(rl[1].tls == RelayTls::Implicit);
    CHECK_FALSE(rl[1].verify);
    CHECK(rl[2].host == "::1");
    CHECK(rl[2].port == 2525);
    CHECK(std::string(jsonName(RelayTls::Implicit)) == "implicit");
  }
  SUBCASE("per account and per domain") {
    LoadResult r = parse(withTop(R"(, "accounts": [{"username": "t1", "password_hash": ")" + std::string(kHash) +
                                 R"(", "senders": ["@a.example"], "relay": [{"host": "relay.t1.example"}]}],
        "delivery": {"relay_overrides": {"Internal.Example": [{"host": "10.1.1.1", "port": 25}], "gmail.com": "direct"}})"));
    expectOk(r);
    REQUIRE(r.config->accounts[0].relay.size() == 1);
    CHECK(r.config->accounts[0].relay[0].jsonPath == "accounts[0].relay[0]");
    const auto& ov = r.config->delivery.relayOverrides;
    REQUIRE(ov.size() == 2);
    // Object keys come in byte order: "Internal.Example" before "gmail.com".
    CHECK(ov[1].domain == "gmail.com");
    CHECK(ov[1].direct);
    CHECK(ov[0].domain == "internal.example");
    REQUIRE(ov[0].relay.size() == 1);
    CHECK(ov[0].relay[0].port == 25);
    CHECK(ov[0].relay[0].jsonPath == R"(delivery.relay_overrides["Internal.Example"][0])");
    CHECK(r.config->delivery.relay.empty());
  }
  SUBCASE("errors with their paths") {
    LoadResult r = parse(withTop(R"(, "delivery": {"relay": [
        {"host": "bad host"},
        {"host": "r.example", "tls": "none"},
        {"host": "r2.example", "username": "u"},
        {"host": "r3.example", "password_file": "/pw"},
        {"host": "r4.example", "username": "u", "password_file": "/pw", "verify": false},
        {"host": "r5.example", "prot": 25},
        {"host": "r6.example", "port": 0},
        {"host": "r6.example", "port": 587},
        {"host": "R6.example"},
        {"host": "r7.example", "username": "a\u0000b", "password_file": "/pw"}],
      "relay_overrides": {"x.example": "mx", "y.example": [], "bad_dom": "direct"}})"));
    expectError(r, "delivery.relay[0].host", "expected a host name or IP address");
    expectError(r, "delivery.relay[1].tls", "always reached over TLS");
    expectError(r, "delivery.relay[2].password_file", "required with username");
    expectError(r, "delivery.relay[3].username", "required with password_file");
    expectError(r, "delivery.relay[4].verify", "AUTH is sent only over verified TLS");
    expectError(r, "delivery.relay[5].prot", "did you mean \"port\"");
    expectError(r, "delivery.relay[6].port", "expected an integer from 1 to 65535");
    expectError(r, "delivery.relay[8]", "duplicate upstream \"r6.example:587\" (also delivery.relay[7])");
    expectError(r, "delivery.relay[9].username", "without control characters");
    expectError(r, R"(delivery.relay_overrides["x.example"])", "expected \"direct\" or a list");
    expectError(r, R"(delivery.relay_overrides["y.example"])", "at least one upstream");
    expectError(r, "delivery.relay_overrides.bad_dom", "expected a domain name as the key");
  }
  SUBCASE("not a list; empty list") {
    expectError(parse(withTop(R"(, "delivery": {"relay": {"host": "x.example"}})")), "delivery.relay",
                "expected a list of upstreams");
    expectError(parse(withTop(R"(, "delivery": {"relay": []})")), "delivery.relay", "remove the key for direct MX");
    expectError(parse(withAccount(R"("senders": ["@a.example"], "relay": "x")")), "accounts[0].relay",
                "expected a list of upstreams");
  }
  SUBCASE("a relay pointing at our own listener is a loop") {
    LoadResult r = parse(withTop(R"(, "delivery": {"relay": [{"host": "127.0.0.1", "port": 587}]})"));
    expectError(r, "delivery.relay[0]", "would deliver to this server itself (listeners[0]");
    expectOk(parse(withTop(R"(, "delivery": {"relay": [{"host": "127.0.0.1", "port": 2587}]})")));
    expectOk(parse(withTop(R"(, "delivery": {"relay": [{"host": "10.0.0.1", "port": 587}]})")));
  }
}

TEST_CASE("issue 12: relay password files") {
  TempDir dir;
  std::string cert = dir.write("cert.pem", "x");
  auto load = [&](const std::string& pwPath) {
    std::string text = R"({"hostname": "relay.example.net", "data_dir": ")" + dir.path.string() +
                       R"(", "tls": {"certificate": ")" + cert + R"(", "private_key": ")" + cert +
                       R"("}, "listeners": [{"address": "[::]:587"}],
        "delivery": {"relay": [{"host": "r.example", "username": "u", "password_file": ")" +
                       pwPath + R"("}]}})";
    return loadConfigFile(dir.write("config.json", text));
  };
  auto secret = [&](const std::string& name, const std::string& text, mode_t mode) {
    std::string p = dir.write(name, text);
    ::chmod(p.c_str(), mode);
    return p;
  };
  SUBCASE("one line, newline dropped") {
    LoadResult r = load(secret("pw1", "s3cret\n", 0600));
    expectOk(r);
    CHECK(r.config->delivery.relay[0].password == "s3cret");
    LoadResult crlf = load(secret("pw2", "s3 cret\r\n", 0640));
    expectOk(crlf);
    CHECK(crlf.config->delivery.relay[0].password == "s3 cret");
    CHECK(load(secret("pw3", "nonewline", 0400)).config->delivery.relay[0].password == "nonewline");
  }
  SUBCASE("refused files") {
    expectError(load(secret("pw4", "x\n", 0644)), "delivery.relay[0].password_file", "readable or writable by other users (mode 0644)");
    expectError(load(secret("pw5", "x\n", 0620)), "delivery.relay[0].password_file", "chmod 600");
    expectError(load(secret("pw6", "a\nb\n", 0600)), "delivery.relay[0].password_file", "more than one line");
    expectError(load(secret("pw7", "\n", 0600)), "delivery.relay[0].password_file", "is empty");
    expectError(load(secret("pw8", std::string(2000, 'x'), 0600)), "delivery.relay[0].password_file", "larger than 1 KiB");
    expectError(load((dir.path / "absent").string()), "delivery.relay[0].password_file", "No such file or directory");
    LoadResult r = load(secret("pw9", "x\n", 0644));
    // The message names the file and never its content.
    CHECK(allErrors(r).find((dir.path / "pw9").string()) != std::string::npos);
  }
}

TEST_CASE("delivery.dnssec, delivery.mta_sts and delivery.mta_sts_https_port") {
  LoadResult d = parse(withTop(""));
  expectOk(d);
  CHECK_FALSE(d.config->delivery.dnssec);
  CHECK(d.config->delivery.mtaSts);
  CHECK(d.config->delivery.mtaStsHttpsPort == 443);

  LoadResult r = parse(withTop(R"(, "delivery": {"dnssec": true, "mta_sts": false, "mta_sts_https_port": 8443})"));
  expectOk(r);
  CHECK(r.config->delivery.dnssec);
  CHECK_FALSE(r.config->delivery.mtaSts);
  CHECK(r.config->delivery.mtaStsHttpsPort == 8443);

  expectError(parse(withTop(R"(, "delivery": {"dnssec": "yes"})")), "delivery.dnssec", "expected true or false");
  expectError(parse(withTop(R"(, "delivery": {"mta_sts": 1})")), "delivery.mta_sts", "expected true or false");
  expectError(parse(withTop(R"(, "delivery": {"mta_sts_https_port": 0})")), "delivery.mta_sts_https_port", "");
  expectError(parse(withTop(R"(, "delivery": {"mta_sts_https_port": 65536})")), "delivery.mta_sts_https_port", "");
}

TEST_CASE("delivery.tls_rpt: off when absent; from needs a dkim key of its domain") {
  LoadResult d = parse(withTop(""));
  expectOk(d);
  CHECK_FALSE(d.config->delivery.tlsRpt.enabled);

  const std::string dkim = R"(, "dkim": [{"domain": "Relay.Example.net", "selector": "s1", "private_key": "/k1"}])";
  LoadResult r = parse(withTop(dkim + R"(, "delivery": {"tls_rpt": {"from": "tlsrpt@relay.example.net"}})"));
  expectOk(r);
  const auto& t = r.config->delivery.tlsRpt;
  CHECK(t.enabled);
  CHECK(t.from == "tlsrpt@relay.example.net");
  CHECK(t.contact.empty());
  CHECK(t.organization.empty());
  CHECK(t.maxDelay == std::chrono::hours(4));

  r = parse(withTop(dkim + R"(, "delivery": {"tls_rpt": {"from": "tlsrpt@relay.example.net", "contact": "noc@example.net",
      "organization": "Example Net", "max_delay": "30m", "enabled": false}})"));
  expectOk(r);
  CHECK_FALSE(r.config->delivery.tlsRpt.enabled);
  CHECK(r.config->delivery.tlsRpt.contact == "noc@example.net");
  CHECK(r.config->delivery.tlsRpt.organization == "Example Net");
  CHECK(r.config->delivery.tlsRpt.maxDelay == std::chrono::minutes(30));

  expectError(parse(withTop(R"(, "delivery": {"tls_rpt": {"from": "tlsrpt@relay.example.net"}})")),
              "delivery.tls_rpt.from", "no dkim key for \"relay.example.net\"");
  expectError(parse(withTop(dkim + R"(, "delivery": {"tls_rpt": {}})")), "delivery.tls_rpt.from", "required key is missing");
  expectError(parse(withTop(dkim + R"(, "delivery": {"tls_rpt": {"from": "not-an-address"}})")), "delivery.tls_rpt.from",
              "expected an email address");
  expectError(parse(withTop(dkim + R"(, "delivery": {"tls_rpt": {"from": "a@relay.example.net", "contact": "x"}})")),
              "delivery.tls_rpt.contact", "expected an email address");
  expectError(parse(withTop(dkim + R"(, "delivery": {"tls_rpt": {"from": "a@relay.example.net", "rua": "x"}})")),
              "delivery.tls_rpt.rua", "unknown key");
  expectError(parse(withTop(dkim + R"(, "delivery": {"tls_rpt": true})")), "delivery.tls_rpt", "");
}

TEST_CASE("suppression: accounts[].suppression (default on) and suppression.ttl (default forever)") {
  LoadResult d = parse(withAccount(R"("senders": ["@example.com"])"));
  expectOk(d);
  CHECK(d.config->accounts[0].suppression);
  CHECK(d.config->suppression.ttl == 0s);
  LoadResult off = parse(withAccount(R"("senders": ["@example.com"], "suppression": false)"));
  expectOk(off);
  CHECK_FALSE(off.config->accounts[0].suppression);
  LoadResult ttl = parse(withTop(R"(, "suppression": {"ttl": "90d"})"));
  expectOk(ttl);
  CHECK(ttl.config->suppression.ttl == 90 * 24h);
  expectError(parse(withAccount(R"("senders": ["@example.com"], "suppression": "no")")), "accounts[0].suppression",
              "expected");
  expectError(parse(withTop(R"(, "suppression": {"ttl": "0s"})")), "suppression.ttl", "expected a duration");
  expectError(parse(withTop(R"(, "suppression": {"ttl": "2 days"})")), "suppression.ttl", "expected a duration");
  expectError(parse(withTop(R"(, "suppression": {"enabled": true})")), "suppression.enabled", "unknown key");
  expectError(parse(withTop(R"(, "suppression": true)")), "suppression", "expected an object");
}

TEST_CASE("issue 13: accounts[].webhook and webhooks") {
  SUBCASE("defaults and a full webhook") {
    LoadResult none = parse(withTop(""));
    expectOk(none);
    CHECK(none.config->webhooks.caFile.empty());
    CHECK(none.config->webhooks.timeout == 10s);
    CHECK(none.config->webhooks.retrySchedule == std::vector<std::chrono::seconds>{30s, 1min, 5min, 15min, 1h});
    CHECK(none.config->webhooks.maxAge == 72h);
    CHECK(none.config->webhooks.maxBacklog == 100000);

    LoadResult r = parse(withAccount(R"("senders": ["@a.example"],
        "webhook": {"url": "https://hooks.example.com/subrelay", "secret_file": "/etc/subrelay/hook.secret"})"));
    expectOk(r);
    REQUIRE(r.config->accounts[0].webhook.has_value());
    const auto& w = *r.config->accounts[0].webhook;
    CHECK(w.url == "https://hooks.example.com/subrelay");
    CHECK(w.secretFile == "/etc/subrelay/hook.secret");
    CHECK(w.events == std::vector<std::string>{"accepted", "delivered", "deferred", "bounced", "suppressed", "expired"});
    CHECK(w.jsonPath == "accounts[0].webhook");

  }
  SUBCASE("events subset") {
    LoadResult r = parse(withAccount(R"("senders": ["@a.example"],
        "webhook": {"url": "https://h.example/x", "secret_file": "/s", "events": ["bounced", "expired", "bounced"]})"));
    expectOk(r);
    CHECK(r.config->accounts[0].webhook->events == std::vector<std::string>{"bounced", "expired"});
  }
  SUBCASE("bad webhooks") {
    auto acct = [](const std::string& hook) {
      return parse(withAccount(R"("senders": ["@a.example"], "webhook": )" + hook));
    };
    expectError(acct(R"({"url": "http://h.example/x", "secret_file": "/s"})"), "accounts[0].webhook.url",
                "expected an https:// URL");
    expectError(acct(R"({"url": "https://h.example/a b", "secret_file": "/s"})"), "accounts[0].webhook.url",
                "expected an https:// URL");
    expectError(acct(R"({"url": "https://h.example/x"})"), "accounts[0].webhook.secret_file", "required");
    expectError(acct(R"({"secret_file": "/s"})"), "accounts[0].webhook.url", "required");
    expectError(acct(R"({"url": "https://h.example/x", "secret_file": "/s", "events": ["sent"]})"),
                "accounts[0].webhook.events[0]", "expected one of accepted, delivered");
    expectError(acct(R"({"url": "https://h.example/x", "secret_file": "/s", "events": []})"),
                "accounts[0].webhook.events", "at least one");
    expectError(acct(R"({"url": "https://h.example/x", "secret_file": "/s", "secret": "x"})"),
                "accounts[0].webhook.secret", "");
    expectError(acct(R"("https://h.example/x")"), "accounts[0].webhook", "");
  }
  SUBCASE("bad webhooks settings") {
    expectError(parse(withTop(R"(, "webhooks": {"timeout": "10m"})")), "webhooks.timeout", "at most");
    expectError(parse(withTop(R"(, "webhooks": {"retry_schedule": []})")), "webhooks.retry_schedule", "at least one");
    expectError(parse(withTop(R"(, "webhooks": {"retry_schedule": ["5x"]})")), "webhooks.retry_schedule[0]", "");
    expectError(parse(withTop(R"(, "webhooks": {"max_backlog": 0})")), "webhooks.max_backlog", "");
    expectError(parse(withTop(R"(, "webhooks": {"max_age": "soon"})")), "webhooks.max_age", "");
    expectError(parse(withTop(R"(, "webhooks": {"retries": 3})")), "webhooks.retries", "");
    LoadResult ok = parse(withTop(R"(, "webhooks": {"ca_file": "/etc/ca.pem", "timeout": "3s",
        "retry_schedule": ["1s", "2s"], "max_age": "1h", "max_backlog": 50})"));
    expectOk(ok);
    CHECK(ok.config->webhooks.caFile == "/etc/ca.pem");
    CHECK(ok.config->webhooks.timeout == 3s);
    CHECK(ok.config->webhooks.retrySchedule == std::vector<std::chrono::seconds>{1s, 2s});
    CHECK(ok.config->webhooks.maxAge == 1h);
    CHECK(ok.config->webhooks.maxBacklog == 50);
  }
}

TEST_CASE("issue 13: the webhook secret file is read at load, never shown") {
  TempDir dir;
  std::string cert = dir.write("cert.pem", "x");
  auto load = [&](const std::string& secretPath) {
    std::string text = R"({"hostname": "relay.example.net", "data_dir": ")" + dir.path.string() +
                       R"(", "tls": {"certificate": ")" + cert + R"(", "private_key": ")" + cert +
                       R"("}, "listeners": [{"address": "[::]:587"}],
        "accounts": [{"username": "app", "password_hash": ")" + std::string(kHash) + R"(", "senders": ["@a.example"],
          "webhook": {"url": "https://h.example/x", "secret_file": ")" + secretPath + R"("}}]})";
    return loadConfigFile(dir.write("config.json", text));
  };
  auto secret = [&](const std::string& name, const std::string& text, mode_t mode) {
    std::string p = dir.write(name, text);
    ::chmod(p.c_str(), mode);
    return p;
  };
  LoadResult r = load(secret("hook1", "whsec_abc\n", 0600));
  expectOk(r);
  CHECK(r.config->accounts[0].webhook->secret == "whsec_abc");
  expectError(load(secret("hook2", "\n", 0600)), "accounts[0].webhook.secret_file", "empty");
  expectError(load((dir.path / "absent").string()), "accounts[0].webhook.secret_file", "No such file");
  LoadResult open = load(secret("hook3", "whsec_visible\n", 0644));
  expectError(open, "accounts[0].webhook.secret_file", "chmod 600");
  CHECK(allErrors(open).find("whsec_visible") == std::string::npos);
  // webhooks.ca_file must exist.
  std::string text = R"({"hostname": "relay.example.net", "data_dir": ")" + dir.path.string() +
                     R"(", "tls": {"certificate": ")" + cert + R"(", "private_key": ")" + cert +
                     R"("}, "listeners": [{"address": "[::]:587"}], "webhooks": {"ca_file": "/nonexistent/ca.pem"}})";
  expectError(loadConfigFile(dir.write("config2.json", text)), "webhooks.ca_file", "cannot read");
}
