// The metrics subrelay exports (docs/operations.md lists them with their meaning; the
// Grafana dashboard in contrib/ is checked against this list by test_metrics). One
// process-wide instance: counters live as long as the process, SIGHUP included.
#pragma once

#include <string_view>

#include "metrics/registry.h"

namespace subrelay::metrics {

struct ServerMetrics {
  explicit ServerMetrics(Registry& r);

  Registry& registry;
  // --- process
  Family<Gauge>& buildInfo;           // {version, tls_backend} 1
  Family<Gauge>& startTime;           // unix seconds
  Family<Counter>& configReloads;     // {result=ok|refused}
  // --- SMTP sessions
  Family<Gauge>& connectionsOpen;
  Family<Counter>& connectionsAccepted;   // {listener=starttls|implicit|none}
  Family<Counter>& connectionsRefused;    // {reason}
  Family<Counter>& connectionsClosed;     // {reason}
  Family<Counter>& tlsHandshakes;         // {version}
  Family<Counter>& tlsHandshakeFailures;  // {reason}
  Family<Counter>& auth;                  // {result=success|failure|lockout|refused}
  // --- messages
  Family<Counter>& messagesAccepted;      // {account}
  Family<Counter>& messagesRefused;       // {stage=mail|rcpt|data, reason=enhanced status}
  Family<Counter>& messageBytes;          // {account}
  Family<Counter>& messageRecipients;     // {account}
  Family<Counter>& rateLimited;           // {account}
  Family<Counter>& suppressedRcpts;       // {account}: RCPT refused by the suppression list
  Family<Histogram>& acceptLatency;       // end of data -> reply
  Family<Histogram>& commitLatency;       // committer: enqueue -> fsync done
  Family<Counter>& dkimSignatures;        // {algorithm}
  Family<Histogram>& dkimSignLatency;     // {algorithm}
  // --- queue (refreshed every few seconds from SQLite)
  Family<Gauge>& queueRecipients;         // {state}
  Family<Gauge>& queueOldestAge;
  // --- delivery
  Family<Counter>& deliveryAttempts;      // {result=delivered|deferred|failed|expired, tls}
  Family<Histogram>& deliveryLatency;     // accepted -> delivered
  Family<Gauge>& deliveryConnections;     // open outbound connections
  Family<Counter>& dsns;                  // {type=failure|delay|success}
  Family<Counter>& dnsQueries;            // {type}
  Family<Counter>& dnsFailures;           // {reason}
  // Recipient domains' TLS policies (issue 12)
  Family<Counter>& tlsPolicyDecisions;    // {policy=dane|mta-sts-enforce|mta-sts-testing|none, usable=yes|no}
  Family<Counter>& mtaStsAnswers;         // {source=cache|fetched|none|...}
  Family<Counter>& tlsRptSessions;        // {result=success|failure}
  Family<Counter>& tlsRptReports;         // {outcome=queued|no-rua|retry}
  // Webhooks (issue 13)
  Family<Counter>& webhookEvents;         // {outcome=delivered|failed|dropped}
  Family<Gauge>& webhookBacklog;          // events in the outbox, every account
};

// The process's metrics (created on first use).
ServerMetrics& server();

// Bounded label values for refusal reasons: the enhanced status code's class and subject
// ("5.7.1"), or "other" for anything not shaped like one.
std::string statusLabel(std::string_view enhanced);

}  // namespace subrelay::metrics
