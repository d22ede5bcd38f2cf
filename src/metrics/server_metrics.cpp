#include "metrics/server_metrics.h"

#include <cctype>

namespace subrelay::metrics {
namespace {
// Latencies of a local step: 100 us .. 10 s.
const std::vector<double> kFast = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                   0.05,   0.1,     0.25,   0.5,   1,      2.5,   5,    10};
// Time from acceptance to delivery: 100 ms .. 5 days.
const std::vector<double> kDelivery = {0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400, 432000};
}  // namespace

ServerMetrics::ServerMetrics(Registry& r)
    : registry(r),
      buildInfo(r.gauge("subrelay_build_info", "Version and TLS backend of this binary (always 1)",
                        {"version", "tls_backend"})),
      startTime(r.gauge("subrelay_start_time_seconds", "Unix time the process started")),
      configReloads(r.counter("subrelay_config_reloads_total", "SIGHUP reloads by result", {"result"})),
      connectionsOpen(r.gauge("subrelay_smtp_connections_open", "SMTP sessions open now")),
      connectionsAccepted(r.counter("subrelay_smtp_connections_accepted_total",
                                    "SMTP connections accepted, by listener TLS mode", {"listener"})),
      connectionsRefused(r.counter("subrelay_smtp_connections_refused_total",
                                   "SMTP connections refused at connect, by reason", {"reason"})),
      connectionsClosed(r.counter("subrelay_smtp_connections_closed_total",
                                  "SMTP sessions closed by the server, by reason", {"reason"})),
      tlsHandshakes(r.counter("subrelay_tls_handshakes_total", "Completed inbound TLS handshakes, by version",
                              {"version"})),
      tlsHandshakeFailures(r.counter("subrelay_tls_handshake_failures_total", "Failed inbound TLS handshakes, by reason",
                                     {"reason"})),
      auth(r.counter("subrelay_auth_total", "AUTH attempts by result", {"result"})),
      messagesAccepted(r.counter("subrelay_messages_accepted_total",
                                 "Messages committed to the queue (250 after DATA), by account", {"account"})),
      messagesRefused(r.counter("subrelay_messages_refused_total",
                                "MAIL, RCPT and end-of-data refusals, by stage (mail, rcpt, data) and enhanced status code",
                                {"stage", "reason"})),
      messageBytes(r.counter("subrelay_message_bytes_total", "Bytes of accepted messages, by account", {"account"})),
      messageRecipients(r.counter("subrelay_message_recipients_total", "Recipients of accepted messages, by account",
                                  {"account"})),
      rateLimited(r.counter("subrelay_rate_limit_refusals_total", "Refusals by an account's rate limits, by account",
                            {"account"})),
      suppressedRcpts(r.counter("subrelay_suppressed_rcpts_total",
                                "Recipients refused at RCPT because they are on the account's suppression list, by account",
                                {"account"})),
      acceptLatency(r.histogram("subrelay_accept_latency_seconds",
                                "End of DATA to the final reply: cleanup, DKIM signing and the durable commit", kFast)),
      commitLatency(r.histogram("subrelay_commit_latency_seconds",
                                "A message handed to the committer to its fsync-ed commit (group commit)", kFast)),
      dkimSignatures(r.counter("subrelay_dkim_signatures_total", "DKIM signatures made, by algorithm", {"algorithm"})),
      dkimSignLatency(r.histogram("subrelay_dkim_sign_seconds", "Time to sign one message (all its signatures)", kFast)),
      queueRecipients(r.gauge("subrelay_queue_recipients",
                              "Recipients in the queue by state (queued, deferred, in_flight)", {"state"})),
      queueOldestAge(r.gauge("subrelay_queue_oldest_message_age_seconds",
                             "Age of the oldest message with a recipient still to deliver (0 when none)")),
      deliveryAttempts(r.counter("subrelay_delivery_attempts_total",
                                 "Outbound recipient attempts, by result and the TLS version used", {"result", "tls"})),
      deliveryLatency(r.histogram("subrelay_delivery_latency_seconds",
                                  "Time from acceptance to delivery, per delivered recipient", kDelivery)),
      deliveryConnections(r.gauge("subrelay_delivery_connections_open", "Outbound SMTP connections open now")),
      dsns(r.counter("subrelay_dsns_total", "DSNs queued to senders, by type", {"type"})),
      dnsQueries(r.counter("subrelay_dns_queries_total", "DNS queries sent, by type", {"type"})),
      dnsFailures(r.counter("subrelay_dns_failures_total", "DNS queries that failed, by reason", {"reason"})),
      tlsPolicyDecisions(r.counter("subrelay_tls_policy_decisions_total",
                                   "Recipient domains' TLS policies looked up after routing, by what applied",
                                   {"policy", "usable"})),
      mtaStsAnswers(r.counter("subrelay_mta_sts_answers_total",
                              "MTA-STS policy answers to delivery, by where they came from", {"source"})),
      tlsRptSessions(r.counter("subrelay_tls_rpt_sessions_total", "Sessions counted for TLS reports, by result",
                               {"result"})),
      tlsRptReports(r.counter("subrelay_tls_rpt_reports_total", "TLS report runs per domain and day, by outcome",
                              {"outcome"})),
      webhookEvents(r.counter("subrelay_webhook_events_total",
                              "Webhook POSTs: delivered (2xx), failed (retried later) and events dropped (too old, "
                              "backlog full, webhook removed)",
                              {"outcome"})),
      webhookBacklog(r.gauge("subrelay_webhook_backlog_events", "Webhook events waiting in the outbox")) {
  startTime.get();
  connectionsOpen.get();
  queueOldestAge.get();
  deliveryConnections.get();
  dkimSignLatency.get();
  acceptLatency.get();
  commitLatency.get();
}

ServerMetrics& server() {
  static Registry registry;
  static ServerMetrics m(registry);
  return m;
}

std::string statusLabel(std::string_view e) {
  // d.ddd.ddd at most (RFC 3463 2: class "." subject "." detail, 1-3 digits each).
  int dots = 0;
  size_t run = 0;
  for (char c : e) {
    if (c == '.') {
      if (run == 0 || ++dots > 2) return "other";
      run = 0;
    } else if (std::isdigit(static_cast<unsigned char>(c)) && ++run <= 3) {
    } else {
      return "other";
    }
  }
  if (dots != 2 || run == 0 || e.size() > 11) return "other";
  return std::string(e);
}

}  // namespace subrelay::metrics
