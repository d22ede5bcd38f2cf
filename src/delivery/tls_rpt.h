// SMTP TLS Reporting (RFC 8460): what the delivery engine counts and what it reports.
// I/O-free: the scheduler feeds a Collector with the outcome of each session that ran under
// a recipient domain's policy; the wiring stores the counts (queue::TlsRptRow) and, once a
// UTC day is over, turns each Policy Domain's rows into a report (reportJson) mailed
// (reportMessage) to the rua of its "_smtp._tls" TXT record (parseRecord).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "queue/store.h"

namespace subrelay::delivery::tlsrpt {

// The policy a session ran under, as the report names it (RFC 8460 4.4 "policy").
struct Policy {
  std::string type;                  // "sts", "tlsa", "no-policy-found"
  std::vector<std::string> strings;  // policy-string (4.5)
  std::vector<std::string> mxHost;   // mx-host: the policy's patterns (sts), the MX host (tlsa)
  bool operator==(const Policy&) const = default;
};

// RFC 8460 4.3: the result type of a session that failed before TLS was established, from
// how the client session failed (smtp stage, enhanced code, text). nullopt for failures
// that are not about TLS (a refused connection, a timeout: 4.3.4 "not required to be
// reported"). reason: the failure-reason-code (the TLS library's words).
struct Failure {
  std::string result;
  std::string reason;
};
std::optional<Failure> classify(std::string_view stage, std::string_view enhanced, std::string_view text);

// Unix seconds of 00:00 UTC of the day holding t.
int64_t dayStart(int64_t t);

// A day as the CLI takes it: "today", "yesterday" or "YYYY-MM-DD" (UTC) -> 00:00 UTC of it
// in unix seconds; nullopt when it is none of these.
std::optional<int64_t> parseDay(std::string_view text, int64_t now);

// RFC 8460 4.1: when the reports of the days before `day` go out: `day` (00:00 UTC) plus a
// delay in [0, maxDelay) picked by `rnd` ("a random delay of up to four hours", so that
// reporters do not all send at midnight).
int64_t reportTime(int64_t day, int64_t maxDelay, uint64_t rnd);

// Counts in memory until take(). Bounded: at most maxKeys distinct rows (a flood of
// distinct domains or failure texts cannot grow it further; the excess is counted in
// dropped()). Reasons are cut to 200 bytes.
class Collector {
 public:
  explicit Collector(size_t maxKeys = 20000) : maxKeys_(maxKeys) {}
  void success(int64_t now, const std::string& domain, const Policy& policy);
  void failure(int64_t now, const std::string& domain, const Policy& policy, const Failure& f, const std::string& mx,
               const std::string& ip);
  std::vector<queue::TlsRptRow> take();
  bool empty() const { return rows_.empty(); }
  size_t size() const { return rows_.size(); }
  uint64_t dropped() const { return dropped_; }

 private:
  void add(queue::TlsRptRow row);
  size_t maxKeys_;
  std::map<std::string, queue::TlsRptRow> rows_;
  uint64_t dropped_ = 0;
};

// RFC 8460 3: the "_smtp._tls" TXT answer (each record's strings concatenated). Records
// not starting "v=TLSRPTv1" are discarded; unless exactly one is left, nullopt (no
// reporting). Else its rua URIs, in order: mailto addresses (percent-decoded, without
// "?hfields") and https URLs. A record without rua is nullopt too.
struct Record {
  std::vector<std::string> mailto;
  std::vector<std::string> https;
};
std::optional<Record> parseRecord(const std::vector<std::string>& txts);

struct ReportMeta {
  std::string organization;  // organization-name
  std::string contact;       // contact-info (an address; its domain is the submitter)
  std::string from;          // From: of the mail
  std::string hostname;      // our host name (Message-ID, Report-ID right side)
};

// The submitter: the contact address's domain (5.3: TLS-Report-Submitter "MUST match the
// value found in the domain of the contact-info").
std::string submitter(const ReportMeta& meta);

// The report id for a Policy Domain and day: stable, so a report re-sent after a crash
// keeps its id and the receiver can drop the duplicate (5.3).
std::string reportId(const ReportMeta& meta, const std::string& domain, int64_t day);

// RFC 8460 4.4: the JSON report of one Policy Domain for one day from its rows (the day's
// rows of other domains are ignored). Policies in a stable order; failure-details per
// (result, MX, address, reason).
std::string reportJson(const ReportMeta& meta, const std::string& domain, int64_t day,
                       const std::vector<queue::TlsRptRow>& rows);

// 5.1: "sender!policy-domain!begin!end!unique-id.json.gz".
std::string reportFilename(const ReportMeta& meta, const std::string& domain, int64_t day);

// gzip (RFC 1952) of data.
std::string gzip(std::string_view data);

// 5.3: the report mail, headers and body with CRLF lines, not yet DKIM-signed: From meta.from,
// To the rua addresses, Subject "Report Domain: D Submitter: S Report-ID: <id>",
// TLS-Report-Domain, TLS-Report-Submitter, multipart/report; report-type="tlsrpt" with a
// text part and the gzipped JSON (application/tlsrpt+gzip, base64).
std::string reportMessage(const ReportMeta& meta, const std::string& domain, int64_t day, const std::string& json,
                          const std::vector<std::string>& to, int64_t now);

}  // namespace subrelay::delivery::tlsrpt
