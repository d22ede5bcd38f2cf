// `subrelay tls-policy` (tls_policy_cmd.h): the lookups of delivery, once, on a loop of our
// own, with total deadlines; every decision and all formatting is delivery/tls_explain.h.
#include "app/tls_policy_cmd.h"

#include <chrono>
#include <cstdio>
#include <memory>
#include <random>

#include "app/delivery_settings.h"
#include "config/config.h"
#include "delivery/mta_sts_fetcher.h"
#include "delivery/routing.h"
#include "delivery/tls_explain.h"
#include "dns/resolv_conf.h"
#include "dns/uv_resolver.h"
#include "net/uv_loop.h"
#include "net/uv_timer.h"
#include "util/clock.h"
#include "util/log.h"

namespace subrelay::app {

namespace {

// The MX route (MX, then the hosts' AAAA and A) gets this long in all; the TLSA lookups
// and the MTA-STS discovery (TXT, the policy host's addresses, the HTTPS GET: RFC 8461
// 3.3 "one minute") together get the second.
constexpr auto kRouteDeadline = std::chrono::seconds(30);
constexpr auto kPolicyDeadline = std::chrono::seconds(60);

class Lookups {
 public:
  Lookups(uv_loop_t* loop, std::vector<dns::ServerAddress> servers, const config::Config& cfg,
          const delivery::SchedulerSettings& settings, delivery::TlsExplanation& e)
      : settings_(settings), e_(e), deadline_(loop), end_(loop) {
    resolver_ = std::make_unique<dns::UvResolver>(loop, std::move(servers), clock_);
    std::random_device rd;
    routes_ = std::make_unique<delivery::RouteResolver>(*resolver_, (static_cast<uint64_t>(rd()) << 32) | rd());
    if (e.mtaSts) {
      // Memory only: no PolicyStore, the gateway's database is never written.
      getter_ = std::make_unique<delivery::mtasts::HttpsPolicyGetter>(loop, stsGetterSettingsFrom(cfg));
      sts_ = std::make_unique<delivery::mtasts::StsFetcher>(loop, *resolver_, *getter_, clock_,
                                                             delivery::mtasts::Settings{}, nullptr);
      // The policy host's addresses follow the destination policy, as in delivery.
      sts_->setDestinationPolicy(settings.destinations);
    }
  }

  void start() {
    deadline_.start(std::chrono::duration_cast<std::chrono::milliseconds>(kRouteDeadline), [this] {
      e_.error = "MX lookup for " + e_.domain + ": no answer within " + std::to_string(kRouteDeadline.count()) + " s";
      finish();
    });
    routes_->resolve(e_.domain, [this](delivery::Route route) {
      if (done_) return;
      delivery::applyRoute(e_, settings_, std::move(route));
      if (delivery::wantsPolicyLookups(e_))
        lookUpPolicy();
      else
        finish();
    });
  }

 private:
  // RFC 7672 2.2 and RFC 8461 5.1, as DeliveryService::lookupTlsPolicy runs them.
  void lookUpPolicy() {
    started_ = std::chrono::steady_clock::now();
    deadline_.start(std::chrono::duration_cast<std::chrono::milliseconds>(kPolicyDeadline), [this] { finish(); });
    outstanding_ = e_.tlsaHosts.size() + (sts_ ? 2 : 0);
    if (outstanding_ == 0) {
      finish();
      return;
    }
    for (size_t i = 0; i < e_.tlsaHosts.size(); ++i) {
      resolver_->query("_25._tcp." + e_.tlsaHosts[i], dns::QType::TLSA, [this, i](const dns::Answer& a) {
        if (done_) return;
        delivery::TlsaLookup& t = e_.inputs.tlsa[i];
        t.status = a.status;
        t.authenticated = a.authenticated;
        t.records = a.tlsa;
        answered();
      });
    }
    if (!sts_) return;
    // The TXT record for the display; the fetcher asks for it too (the resolver coalesces).
    resolver_->query(delivery::mtasts::txtName(e_.domain), dns::QType::TXT, [this](const dns::Answer& a) {
      if (done_) return;
      e_.sts.txtAnswered = true;
      e_.sts.txtStatus = a.status;
      e_.sts.txt = a.texts;
      answered();
    });
    sts_->policyFor(e_.domain, [this](const delivery::mtasts::PolicyAnswer& a) {
      if (done_) return;
      e_.sts.answered = true;
      e_.sts.source = a.source;
      e_.sts.detail = a.detail;
      e_.sts.overBudget = std::chrono::steady_clock::now() - started_ > kTlsPolicyBudget;
      e_.inputs.sts = a.policy;
      answered();
    });
  }

  void answered() {
    if (--outstanding_ == 0) finish();
  }

  // Stops every lookup (their callbacks are dropped) on the next loop turn, never inside
  // the callback of the object being destroyed; the loop then has nothing left to run.
  void finish() {
    if (done_) return;
    done_ = true;
    deadline_.stop();
    end_.start(std::chrono::milliseconds(0), [this] {
      sts_.reset();
      getter_.reset();
      routes_.reset();
      resolver_.reset();
    });
  }

  const delivery::SchedulerSettings& settings_;
  delivery::TlsExplanation& e_;
  util::SystemClock clock_;
  std::unique_ptr<dns::UvResolver> resolver_;
  std::unique_ptr<delivery::RouteResolver> routes_;
  std::unique_ptr<delivery::mtasts::HttpsPolicyGetter> getter_;
  std::unique_ptr<delivery::mtasts::StsFetcher> sts_;
  net::Timer deadline_;
  net::Timer end_;
  size_t outstanding_ = 0;
  bool done_ = false;
  std::chrono::steady_clock::time_point started_;
};

}  // namespace

int tlsPolicyCommand(const TlsPolicyCmdOptions& o) {
  auto lr = config::loadConfigFile(o.config);
  if (!lr.config) {
    for (const auto& l : lr.formatErrors()) std::fprintf(stderr, "%s\n", l.c_str());
    std::fprintf(stderr, "subrelay: cannot read the configuration %s\n", o.config.c_str());
    return 1;
  }
  const config::Config& cfg = *lr.config;
  if (!o.account.empty()) {
    bool known = false;
    for (const auto& a : cfg.accounts) known = known || a.username == o.account;
    if (!known) {
      std::fprintf(stderr, "subrelay: no account %s in %s\n", o.account.c_str(), o.config.c_str());
      return 1;
    }
  }
  const DeliverySettings ds = deliverySettingsFrom(cfg);
  delivery::TlsExplanation e = delivery::startExplanation(ds.scheduler, ds.mtaSts, o.domain, o.account);
  if (delivery::needsRoute(e)) {
    auto servers = dns::chooseServers(cfg.delivery.resolvers);
    if (!servers.ok()) {
      std::fprintf(stderr, "subrelay: delivery.resolvers: %s\n", servers.error().message.c_str());
      return 1;
    }
    // What the lookups find is printed on stdout (the fetcher's problems are in its
    // answer's detail); stderr keeps only the one-line reason of a failure.
    util::setLogLevel(util::LogLevel::Error);
    net::Loop loop;
    {
      Lookups lookups(loop.get(), servers.value(), cfg, ds.scheduler, e);
      lookups.start();
      loop.run();
    }
    loop.run();  // the close callbacks of the handles above
  }
  delivery::finishExplanation(e);
  const std::string out = o.json ? delivery::renderJson(e) + "\n" : delivery::renderText(e);
  std::fputs(out.c_str(), stdout);
  if (!e.error.empty()) {
    std::fprintf(stderr, "subrelay: %s\n", e.error.c_str());
    return 1;
  }
  return 0;
}

}  // namespace subrelay::app
