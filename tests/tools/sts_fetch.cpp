// subrelay-sts-fetch: MTA-STS policy discovery through delivery::mtasts::StsFetcher (the
// real resolver, the real HTTPS client, optionally the real SQLite policy cache), one JSON
// line per answer, so the integration tests (tests/integration/test_mta_sts.py) drive it
// against unbound and a local HTTPS policy server.
//
//   subrelay-sts-fetch --server host:port [--ca FILE] [--port N] [--timeout-ms N]
//                      [--db PATH] [--repeat N] [--allow-private] DOMAIN...
//
// --port: the policy hosts' HTTPS port (443 otherwise). --db: a queue database whose
// sts_policies table is the cache (created and migrated as serve would); without it the
// cache is this process's memory. Each DOMAIN is asked --repeat times (default 1), one
// question after the other's answer. Each line: domain, source, detail, the policy (null
// when none) and the counters so far (https_requests: GETs the client started).
// Exit 0 when every question was answered, 2 on bad usage.
#include <uv.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "delivery/mta_sts_fetcher.h"
#include "dns/resolv_conf.h"
#include "dns/uv_resolver.h"
#include "queue/sqlite_store.h"
#include "util/clock.h"
#include "util/json_writer.h"

using namespace subrelay;
using namespace subrelay::delivery::mtasts;

namespace {

int usage(const char* msg) {
  std::fprintf(stderr,
               "subrelay-sts-fetch: %s\n"
               "usage: subrelay-sts-fetch --server host:port [--ca FILE] [--port N] [--timeout-ms N] "
               "[--db PATH] [--repeat N] [--allow-private] DOMAIN...\n",
               msg);
  return 2;
}

std::string jsonString(std::string_view s) {
  std::string out;
  util::jsonEscapeTo(out, s);
  return out;
}

std::string answerJson(const PolicyAnswer& a, const FetcherStats& st, size_t httpsRequests) {
  util::JsonObject o;
  o.str("domain", a.domain).str("source", a.source).str("detail", a.detail);
  if (a.policy) {
    std::string mx = "[";
    for (size_t i = 0; i < a.policy->policy.mx.size(); ++i) mx += (i ? "," : "") + jsonString(a.policy->policy.mx[i]);
    mx += "]";
    util::JsonObject p;
    p.str("id", a.policy->id)
        .str("mode", modeName(a.policy->policy.mode))
        .num("max_age", a.policy->policy.maxAge)
        .raw("mx", mx)
        .num("fetched_at", a.policy->fetchedAt)
        .num("expires_at", a.policy->expiresAt);
    o.raw("policy", p.finish());
  } else {
    o.raw("policy", "null");
  }
  util::JsonObject s;
  s.num("txt_lookups", static_cast<int64_t>(st.txtLookups))
      .num("fetches", static_cast<int64_t>(st.fetches))
      .num("fetch_failures", static_cast<int64_t>(st.fetchFailures))
      .num("stored", static_cast<int64_t>(st.stored))
      .num("https_requests", static_cast<int64_t>(httpsRequests));
  o.raw("stats", s.finish());
  return o.finish();
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> servers;
  HttpsGetterSettings http;
  std::string db;
  long repeat = 1;
  bool allowPrivate = false;
  std::vector<std::string> domains;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if ((arg == "--server" || arg == "--ca" || arg == "--port" || arg == "--timeout-ms" || arg == "--db" ||
         arg == "--repeat") &&
        i + 1 < argc) {
      const std::string v = argv[++i];
      if (arg == "--server") {
        servers.push_back(v);
      } else if (arg == "--ca") {
        http.caFile = v;
      } else if (arg == "--db") {
        db = v;
      } else {
        char* end = nullptr;
        const long n = std::strtol(v.c_str(), &end, 10);
        if (end == v.c_str() || *end != 0 || n <= 0 || n > 600000) return usage(("bad " + arg).c_str());
        if (arg == "--port") {
          if (n > 65535) return usage("bad --port");
          http.port = static_cast<uint16_t>(n);
        } else if (arg == "--timeout-ms") {
          http.timeout = std::chrono::milliseconds(n);
        } else {
          repeat = n;
        }
      }
    } else if (arg == "--allow-private") {
      allowPrivate = true;  // the policy hosts of the test bed are on 127.0.0.0/8
    } else if (arg == "-h" || arg == "--help") {
      return usage("help");
    } else if (!arg.empty() && arg[0] == '-') {
      return usage(("unknown option " + arg).c_str());
    } else {
      domains.push_back(arg);
    }
  }
  if (domains.empty()) return usage("expected at least one DOMAIN");
  delivery::DestinationPolicy destinations;
  destinations.allowPrivate = allowPrivate;
  auto chosen = dns::chooseServers(servers);
  if (!chosen) return usage(chosen.error().message.c_str());

  std::unique_ptr<queue::SqliteStore> store;
  std::unique_ptr<SqlitePolicyStore> policyStore;
  if (!db.empty()) {
    auto opened = queue::SqliteStore::open(db);
    if (!opened) {
      std::fprintf(stderr, "subrelay-sts-fetch: %s\n", opened.error().message.c_str());
      return 1;
    }
    store = std::move(opened).value();
    policyStore = std::make_unique<SqlitePolicyStore>(*store);
  }

  uv_loop_t loop;
  uv_loop_init(&loop);
  util::SystemClock clock;
  size_t answered = 0;
  const size_t wanted = domains.size() * static_cast<size_t>(repeat);
  {
    dns::UvResolver resolver(&loop, std::move(*chosen), clock);
    HttpsPolicyGetter getter(&loop, http);
    StsFetcher fetcher(&loop, resolver, getter, clock, Settings{}, policyStore.get());
    fetcher.setDestinationPolicy(destinations);
    // One question after the other: domain 0 repeat times, then domain 1, ...
    std::function<void()> next = [&] {
      if (answered == wanted) return;
      const std::string& d = domains[answered / static_cast<size_t>(repeat)];
      fetcher.policyFor(d, [&](const PolicyAnswer& a) {
        std::printf("%s\n", answerJson(a, fetcher.stats(), getter.requests()).c_str());
        std::fflush(stdout);
        ++answered;
        next();
      });
    };
    next();
    uv_run(&loop, UV_RUN_DEFAULT);
  }
  uv_run(&loop, UV_RUN_DEFAULT);  // close callbacks of the handles
  uv_loop_close(&loop);
  return answered == wanted ? 0 : 1;
}
