// TLS reports out of the stored counts; see tls_rpt_reporter.h.
#include "delivery/tls_rpt_reporter.h"

#include <utility>

#include "metrics/server_metrics.h"
#include "queue/sqlite_store.h"
#include "util/log.h"
#include "util/strings.h"
#include "util/time_fmt.h"

namespace subrelay::delivery::tlsrpt {

struct Reporter::Run {
  std::vector<std::pair<int64_t, std::string>> work;
  size_t next = 0;
  int64_t now = 0;
  RunSummary summary;
  std::function<void(RunSummary)> done;
  bool cancelled = false;
};

Reporter::Reporter(queue::SqliteStore& store, dns::Resolver& resolver, ReporterSettings settings)
    : store_(store), resolver_(resolver), settings_(std::move(settings)) {}

Reporter::~Reporter() {
  if (current_) current_->cancelled = true;
}

bool Reporter::running() const { return current_ != nullptr; }

void Reporter::setSettings(ReporterSettings settings) { settings_ = std::move(settings); }

namespace {

std::string domainOf(const std::string& address) {
  const auto at = address.rfind('@');
  return at == std::string::npos ? std::string() : util::toLower(address.substr(at + 1));
}

}  // namespace

void Reporter::run(int64_t beforeDay, int64_t now, std::function<void(RunSummary)> done) {
  if (current_) {
    done(RunSummary{});
    return;
  }
  auto pending = store_.tlsRptPending(beforeDay, settings_.maxReportsPerRun);
  auto r = std::make_shared<Run>();
  r->now = now;
  r->done = std::move(done);
  if (!pending.ok()) {
    r->summary.failed = 1;
    r->summary.lines.push_back("cannot read the TLS-RPT counts: " + pending.error().message);
    r->done(std::move(r->summary));
    return;
  }
  r->work = std::move(pending.value());
  current_ = r;
  // One domain at a time: reports are few and off the delivery path; a run of hundreds of
  // domains takes a few seconds of DNS.
  auto stepPtr = std::make_shared<std::function<void()>>();
  *stepPtr = [this, r, stepPtr] {
    if (r->cancelled) return;
    if (r->next >= r->work.size()) {
      auto& m = metrics::server().tlsRptReports;
      if (r->summary.queued) m.with("queued").inc(r->summary.queued);
      if (r->summary.noRua) m.with("no-rua").inc(r->summary.noRua);
      if (r->summary.failed) m.with("retry").inc(r->summary.failed);
      // Locals only from here: clearing *stepPtr destroys this closure and its captures.
      current_.reset();
      auto cb = std::move(r->done);
      RunSummary summary = std::move(r->summary);
      auto self = stepPtr;
      *self = nullptr;  // breaks the self-reference
      cb(std::move(summary));
      return;
    }
    const auto [day, domain] = r->work[r->next++];
    resolver_.query("_smtp._tls." + domain, dns::QType::TXT, [this, r, stepPtr, day, domain](const dns::Answer& a) {
      if (r->cancelled) return;
      const std::string label = util::isoUtc(day).substr(0, 10) + " " + domain + ": ";
      const bool lookupFailed = a.status != dns::Status::Ok && a.status != dns::Status::NxDomain &&
                                a.status != dns::Status::NoData;
      if (lookupFailed && r->now < day + 86400 + settings_.giveUpAfter) {
        ++r->summary.failed;
        r->summary.lines.push_back(label + "TLSRPT lookup failed (" + a.detail + "), retried later");
        (*stepPtr)();
        return;
      }
      std::optional<Record> rec;
      if (a.status == dns::Status::Ok) rec = parseRecord(a.texts);
      std::string outcome;
      std::optional<queue::NewMessage> msg;
      if (!rec || rec->mailto.empty()) {
        outcome = lookupFailed ? "lookup-failed" : !rec ? "no-record" : "https-only";
        ++r->summary.noRua;
        r->summary.lines.push_back(label + (lookupFailed ? "TLSRPT lookup kept failing, given up"
                                            : !rec  ? "no TLSRPT record, nothing sent"
                                                    : "only https rua (not supported), nothing sent"));
      } else {
        auto rows = store_.tlsRptRows(day, domain);
        const std::vector<dkim::SignerKey>* keys =
            settings_.keys ? settings_.keys->forDomain(domainOf(settings_.meta.from)) : nullptr;
        if (!rows.ok() || keys == nullptr || !settings_.signer) {
          ++r->summary.failed;
          r->summary.lines.push_back(label + (!rows.ok() ? "cannot read counts: " + rows.error().message
                                                         : "no DKIM key for " + domainOf(settings_.meta.from)));
          (*stepPtr)();
          return;
        }
        std::vector<std::string> to(rec->mailto.begin(),
                                    rec->mailto.begin() + static_cast<long>(std::min(rec->mailto.size(),
                                                                                     settings_.maxRecipients)));
        const std::string json = reportJson(settings_.meta, domain, day, rows.value());
        std::string content = reportMessage(settings_.meta, domain, day, json, to, r->now);
        dkim::SignOptions opts;
        opts.timestamp = r->now;
        auto sig = settings_.signer->sign(content, *keys, opts);
        if (!sig.ok()) {
          ++r->summary.failed;
          r->summary.lines.push_back(label + "DKIM signing failed: " + sig.error().message);
          (*stepPtr)();
          return;
        }
        queue::NewMessage m;
        m.id = queue::newQueueId();
        m.mailFrom = settings_.meta.from;
        m.recipients = to;
        m.content = sig.value() + content;
        // RFC 8460 3 / 5.3: deliver "despite any TLS-related failures": the recipient
        // domain's policies are not applied, as with "TLS-Required: No" (RFC 8689 4.2.2).
        m.tlsRequirement = queue::TlsRequirement::Optional;
        m.receivedAt = r->now;
        m.clientAddress = "127.0.0.1";
        m.heloName = "tls-rpt";
        outcome = "queued";
        msg = std::move(m);
      }
      auto recorded = store_.completeTlsRpt(day, domain, outcome, r->now, msg);
      if (!recorded.ok()) {
        ++r->summary.failed;
        r->summary.lines.push_back(label + "cannot queue the report: " + recorded.error().message);
      } else if (msg && recorded.value()) {
        ++r->summary.queued;
        std::string list;
        for (const auto& t : msg->recipients) list += (list.empty() ? "" : ",") + t;
        r->summary.lines.push_back(label + "report queued id=" + msg->id + " to=" + list);
      } else if (msg) {
        r->summary.lines.push_back(label + "already reported");
      }
      (*stepPtr)();
    });
  };
  (*stepPtr)();
}

DailyReports::DailyReports(queue::SqliteStore& store, dns::Resolver& resolver, ReporterSettings settings,
                           int64_t maxDelay, uint64_t seed, int64_t now)
    : store_(store), reporter_(store, resolver, std::move(settings)), maxDelay_(maxDelay), seed_(seed) {
  // Today's slot: when it has passed already (a restart in the afternoon), the days before
  // today that were not reported go out at the first tick.
  nextRun_ = reportTime(dayStart(now), maxDelay_, seed_);
  lastStore_ = now;
}

void DailyReports::reconfigure(ReporterSettings settings, int64_t maxDelay) {
  reporter_.setSettings(std::move(settings));
  if (maxDelay != maxDelay_) {
    maxDelay_ = maxDelay;
    nextRun_ = std::min(nextRun_, reportTime(dayStart(nextRun_), maxDelay_, seed_));
  }
}

void DailyReports::store(int64_t now) {
  lastStore_ = now;
  if (held_.empty()) return;
  auto r = store_.addTlsRpt(held_);
  if (!r.ok()) {
    util::logError("tls-rpt", "cannot store TLS-RPT counts: " + r.error().message);
    if (held_.size() > 100000) held_.clear();  // never grows without bound
    return;
  }
  held_.clear();
}

void DailyReports::flush(std::vector<queue::TlsRptRow> rows) {
  for (auto& r : rows) held_.push_back(std::move(r));
  store(lastStore_);
}

void DailyReports::tick(int64_t now, std::vector<queue::TlsRptRow> rows) {
  for (auto& r : rows) held_.push_back(std::move(r));
  if (now - lastStore_ >= 60 || now < lastStore_) store(now);
  if (now < nextRun_ || reporter_.running()) return;
  store(now);  // the day's last counts first
  const int64_t today = dayStart(now);
  nextRun_ = reportTime(today + 86400, maxDelay_, seed_ + static_cast<uint64_t>(today));
  reporter_.run(today, now, [this, now, today](RunSummary s) {
    for (const auto& line : s.lines) util::logInfo("tls-rpt", line);
    if (s.failed > 0) nextRun_ = std::min(nextRun_, now + 3600);
    auto pruned = store_.pruneTlsRpt(today - 8 * 86400);
    if (!pruned.ok()) util::logError("tls-rpt", "cannot prune TLS-RPT counts: " + pruned.error().message);
  });
}

}  // namespace subrelay::delivery::tlsrpt
