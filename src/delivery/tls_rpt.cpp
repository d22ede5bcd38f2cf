// SMTP TLS Reporting (RFC 8460); see tls_rpt.h.
#include "delivery/tls_rpt.h"

#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <set>

#include "metrics/server_metrics.h"
#include "util/base64.h"
#include "util/json_writer.h"
#include "util/strings.h"
#include "util/time_fmt.h"

namespace subrelay::delivery::tlsrpt {

namespace {

bool contains(std::string_view hay, std::string_view needle) {
  auto it = std::search(hay.begin(), hay.end(), needle.begin(), needle.end(),
                        [](char a, char b) { return std::tolower(static_cast<unsigned char>(a)) ==
                                                    std::tolower(static_cast<unsigned char>(b)); });
  return it != hay.end();
}

std::string joinLines(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) {
    if (!out.empty()) out += '\n';
    out += s;
  }
  return out;
}

std::string rowKey(const queue::TlsRptRow& r) {
  std::string k = std::to_string(r.day);
  for (const std::string* f : {&r.domain, &r.policyType, &r.result, &r.receivingMx, &r.receivingIp, &r.reason}) {
    k += '\x1f';
    k += *f;
  }
  k += '\x1f' + joinLines(r.policy) + '\x1f' + joinLines(r.mxHost);
  return k;
}

std::string dayIso(int64_t t) { return util::isoUtc(t); }

void jsonStringArray(std::string& out, const std::vector<std::string>& v) {
  out += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) out += ',';
    util::jsonEscapeTo(out, v[i]);
  }
  out += ']';
}

// RFC 3986 2.1 percent-decoding (mailto addresses in rua: ',' '!' ';' must be encoded).
std::string percentDecode(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size() && std::isxdigit(static_cast<unsigned char>(s[i + 1])) &&
        std::isxdigit(static_cast<unsigned char>(s[i + 2]))) {
      out += static_cast<char>(std::stoi(std::string(s.substr(i + 1, 2)), nullptr, 16));
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

std::string trim(std::string_view s) {
  size_t b = 0, e = s.size();
  while (b < e && (s[b] == ' ' || s[b] == '\t')) ++b;
  while (e > b && (s[e - 1] == ' ' || s[e - 1] == '\t')) --e;
  return std::string(s.substr(b, e - b));
}

}  // namespace

std::optional<Failure> classify(std::string_view stage, std::string_view enhanced, std::string_view text) {
  if (stage != "starttls") return std::nullopt;
  (void)enhanced;
  Failure f;
  constexpr std::string_view kHandshake = "TLS handshake failed: ";
  std::string_view detail = text;
  if (auto p = text.find(kHandshake); p != std::string_view::npos) detail = text.substr(p + kHandshake.size());
  f.reason = std::string(detail.substr(0, 200));
  if (contains(text, "does not offer STARTTLS")) {
    f.result = "starttls-not-supported";
  } else if (text.find(kHandshake) == std::string_view::npos) {
    // The server offered STARTTLS and then refused it (454), or broke the exchange.
    f.result = "starttls-not-supported";
  } else if (contains(detail, "DANE")) {
    // 4.3.2.1: "None of the records in the RRset were found to be valid" for this server.
    f.result = "tlsa-invalid";
  } else if (contains(detail, "expired")) {
    f.result = "certificate-expired";
  } else if (contains(detail, "hostname mismatch") || contains(detail, "IP address mismatch")) {
    f.result = "certificate-host-mismatch";
  } else if (contains(detail, "certificate verification failed")) {
    f.result = "certificate-not-trusted";
  } else {
    f.result = "validation-failure";
  }
  return f;
}

int64_t dayStart(int64_t t) {
  constexpr int64_t kDay = 86400;
  return t >= 0 ? t - t % kDay : t - ((t % kDay) + kDay) % kDay;
}

std::optional<int64_t> parseDay(std::string_view text, int64_t now) {
  if (text == "today") return dayStart(now);
  if (text == "yesterday") return dayStart(now) - 86400;
  if (text.size() != 10 || text[4] != '-' || text[7] != '-') return std::nullopt;
  for (size_t i : {0, 1, 2, 3, 5, 6, 8, 9})
    if (!std::isdigit(static_cast<unsigned char>(text[i]))) return std::nullopt;
  const int y = std::stoi(std::string(text.substr(0, 4)));
  const int m = std::stoi(std::string(text.substr(5, 2)));
  const int d = std::stoi(std::string(text.substr(8, 2)));
  static constexpr int kDays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  const bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
  if (y < 1970 || m < 1 || m > 12 || d < 1 || d > kDays[m - 1] + (m == 2 && leap ? 1 : 0)) return std::nullopt;
  // Days from the civil date (proleptic Gregorian), H. Hinnant's algorithm.
  const int yy = y - (m <= 2 ? 1 : 0);
  const int era = yy / 400;
  const int yoe = yy - era * 400;
  const int doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
  const int doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  const int64_t days = static_cast<int64_t>(era) * 146097 + doe - 719468;
  return days * 86400;
}

int64_t reportTime(int64_t day, int64_t maxDelay, uint64_t rnd) {
  if (maxDelay <= 0) return day;
  // splitmix64: the seed's low bits alone would repeat the same offset every day.
  uint64_t z = rnd + 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return day + static_cast<int64_t>(z % static_cast<uint64_t>(maxDelay));
}

void Collector::add(queue::TlsRptRow row) {
  const std::string key = rowKey(row);
  auto it = rows_.find(key);
  if (it != rows_.end()) {
    it->second.sessions += row.sessions;
    return;
  }
  if (rows_.size() >= maxKeys_) {
    dropped_ += static_cast<uint64_t>(row.sessions);
    return;
  }
  rows_.emplace(key, std::move(row));
}

namespace {

// One session of `domain` under `policy`, on the day holding `now`.
queue::TlsRptRow sessionRow(int64_t now, const std::string& domain, const Policy& policy) {
  queue::TlsRptRow r;
  r.day = dayStart(now);
  r.domain = domain;
  r.policyType = policy.type;
  r.policy = policy.strings;
  r.mxHost = policy.mxHost;
  r.sessions = 1;
  return r;
}

}  // namespace

void Collector::success(int64_t now, const std::string& domain, const Policy& policy) {
  add(sessionRow(now, domain, policy));
  metrics::server().tlsRptSessions.with("success").inc();
}

void Collector::failure(int64_t now, const std::string& domain, const Policy& policy, const Failure& f,
                        const std::string& mx, const std::string& ip) {
  queue::TlsRptRow r = sessionRow(now, domain, policy);
  r.result = f.result.empty() ? "validation-failure" : f.result;
  r.receivingMx = mx;
  r.receivingIp = ip;
  r.reason = f.reason.substr(0, 200);
  add(std::move(r));
  metrics::server().tlsRptSessions.with("failure").inc();
}

std::vector<queue::TlsRptRow> Collector::take() {
  std::vector<queue::TlsRptRow> out;
  out.reserve(rows_.size());
  for (auto& [k, r] : rows_) out.push_back(std::move(r));
  rows_.clear();
  return out;
}

std::optional<Record> parseRecord(const std::vector<std::string>& txts) {
  std::vector<const std::string*> ours;
  for (const auto& t : txts) {
    // "records that do not begin with "v=TLSRPTv1;" are discarded" (also "v=TLSRPTv1" alone
    // followed by whitespace before the ';').
    std::string_view v(t);
    if (v.rfind("v=TLSRPTv1", 0) != 0) continue;
    std::string_view rest = v.substr(10);
    while (!rest.empty() && (rest.front() == ' ' || rest.front() == '\t')) rest.remove_prefix(1);
    if (!rest.empty() && rest.front() != ';') continue;
    ours.push_back(&t);
  }
  if (ours.size() != 1) return std::nullopt;
  Record rec;
  bool haveRua = false;
  for (std::string_view field : util::split(*ours.front(), ';')) {
    const std::string f = trim(field);
    if (f.empty()) continue;
    auto eq = f.find('=');
    if (eq == std::string::npos) return std::nullopt;  // not key=value: not a valid record
    const std::string name = f.substr(0, eq);
    if (name != "rua") continue;  // v= and extensions (unknown fields SHALL be ignored)
    haveRua = true;
    const std::string uris = f.substr(eq + 1);
    for (std::string_view u : util::split(uris, ',')) {
      const std::string uri = trim(u);
      if (uri.size() > 7 && util::iequals(std::string_view(uri).substr(0, 7), "mailto:")) {
        std::string addr = uri.substr(7);
        if (auto q = addr.find('?'); q != std::string::npos) addr.resize(q);
        addr = percentDecode(addr);
        const auto at = addr.rfind('@');
        const bool sane = at != std::string::npos && at > 0 && at + 1 < addr.size() &&
                          std::none_of(addr.begin(), addr.end(), [](unsigned char c) {
                            return c <= ' ' || c == '<' || c == '>' || c == ',' || c == ';' || c == 0x7f;
                          });
        if (sane) rec.mailto.push_back(addr);
      } else if (uri.size() > 8 && util::iequals(std::string_view(uri).substr(0, 8), "https://")) {
        rec.https.push_back(uri);
      }
    }
  }
  if (!haveRua) return std::nullopt;
  return rec;
}

std::string submitter(const ReportMeta& meta) {
  const auto at = meta.contact.rfind('@');
  return util::toLower(at == std::string::npos ? meta.hostname : meta.contact.substr(at + 1));
}

std::string reportId(const ReportMeta& meta, const std::string& domain, int64_t day) {
  // Day and domain make it unique per submitter; a hash of the domain keeps it a dot-atom.
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (unsigned char c : domain) h = (h ^ c) * 1099511628211ull;
  char buf[17];
  snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return util::isoUtc(day).substr(0, 10) + "." + buf + "@" + meta.hostname;
}

std::string reportJson(const ReportMeta& meta, const std::string& domain, int64_t day,
                       const std::vector<queue::TlsRptRow>& rows) {
  // Group by applied policy (type, strings, mx-host), in a stable order.
  using PolicyKey = std::tuple<std::string, std::string, std::string>;
  struct Group {
    const queue::TlsRptRow* first = nullptr;
    int64_t ok = 0, failed = 0;
    std::map<std::tuple<std::string, std::string, std::string, std::string>, int64_t> details;
  };
  std::map<PolicyKey, Group> groups;
  for (const auto& r : rows) {
    if (r.domain != domain || r.day != day) continue;
    Group& g = groups[{r.policyType, joinLines(r.policy), joinLines(r.mxHost)}];
    if (!g.first) g.first = &r;
    if (r.result.empty()) {
      g.ok += r.sessions;
    } else {
      g.failed += r.sessions;
      g.details[{r.result, r.receivingMx, r.receivingIp, r.reason}] += r.sessions;
    }
  }
  std::string out = "{\"organization-name\":";
  util::jsonEscapeTo(out, meta.organization);
  out += ",\"date-range\":{\"start-datetime\":";
  util::jsonEscapeTo(out, dayIso(day));
  out += ",\"end-datetime\":";
  util::jsonEscapeTo(out, dayIso(day + 86400 - 1));
  out += "},\"contact-info\":";
  util::jsonEscapeTo(out, meta.contact);
  out += ",\"report-id\":";
  util::jsonEscapeTo(out, reportId(meta, domain, day));
  out += ",\"policies\":[";
  bool firstGroup = true;
  for (const auto& [key, g] : groups) {
    if (!firstGroup) out += ',';
    firstGroup = false;
    out += "{\"policy\":{\"policy-type\":";
    util::jsonEscapeTo(out, g.first->policyType);
    if (!g.first->policy.empty()) {
      out += ",\"policy-string\":";
      jsonStringArray(out, g.first->policy);
    }
    out += ",\"policy-domain\":";
    util::jsonEscapeTo(out, domain);
    if (!g.first->mxHost.empty()) {
      out += ",\"mx-host\":";
      jsonStringArray(out, g.first->mxHost);
    }
    out += "},\"summary\":{\"total-successful-session-count\":" + std::to_string(g.ok) +
           ",\"total-failure-session-count\":" + std::to_string(g.failed) + "}";
    if (!g.details.empty()) {
      out += ",\"failure-details\":[";
      bool firstDetail = true;
      for (const auto& [d, n] : g.details) {
        if (!firstDetail) out += ',';
        firstDetail = false;
        const auto& [result, mx, ip, reason] = d;
        out += "{\"result-type\":";
        util::jsonEscapeTo(out, result);
        if (!mx.empty()) {
          out += ",\"receiving-mx-hostname\":";
          util::jsonEscapeTo(out, mx);
        }
        if (!ip.empty()) {
          out += ",\"receiving-ip\":";
          util::jsonEscapeTo(out, ip);
        }
        out += ",\"failed-session-count\":" + std::to_string(n);
        if (!reason.empty()) {
          out += ",\"failure-reason-code\":";
          util::jsonEscapeTo(out, reason);
        }
        out += '}';
      }
      out += ']';
    }
    out += '}';
  }
  out += "]}";
  return out;
}

std::string reportFilename(const ReportMeta& meta, const std::string& domain, int64_t day) {
  return submitter(meta) + "!" + domain + "!" + std::to_string(day) + "!" + std::to_string(day + 86400 - 1) +
         ".json.gz";
}

std::string gzip(std::string_view data) {
  z_stream zs{};
  // windowBits 15 + 16: a gzip wrapper (RFC 1952) instead of zlib's.
  if (deflateInit2(&zs, Z_BEST_COMPRESSION, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK) return {};
  std::string out;
  out.resize(deflateBound(&zs, static_cast<uLong>(data.size())) + 32);
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(data.data()));
  zs.avail_in = static_cast<uInt>(data.size());
  zs.next_out = reinterpret_cast<Bytef*>(out.data());
  zs.avail_out = static_cast<uInt>(out.size());
  const int rc = deflate(&zs, Z_FINISH);
  out.resize(zs.total_out);
  deflateEnd(&zs);
  return rc == Z_STREAM_END ? out : std::string();
}

std::string reportMessage(const ReportMeta& meta, const std::string& domain, int64_t day, const std::string& json,
                          const std::vector<std::string>& to, int64_t now) {
  const std::string sub = submitter(meta);
  const std::string id = reportId(meta, domain, day);
  const std::string boundary = "=_tlsrpt_" + std::to_string(day) + "_" + std::to_string(now);
  std::string toLine;
  for (const auto& a : to) toLine += (toLine.empty() ? "" : ",\r\n ") + ("<" + a + ">");
  std::string m;
  m += "From: <" + meta.from + ">\r\n";
  m += "To: " + toLine + "\r\n";
  m += "Date: " + util::rfc5322Date(std::chrono::system_clock::time_point(std::chrono::seconds(now))) + "\r\n";
  m += "Subject: Report Domain: " + domain + "\r\n Submitter: " + sub + "\r\n Report-ID: <" + id + ">\r\n";
  m += "Message-ID: <tlsrpt." + id + ">\r\n";
  m += "TLS-Report-Domain: " + domain + "\r\n";
  m += "TLS-Report-Submitter: " + sub + "\r\n";
  m += "Auto-Submitted: auto-generated\r\n";
  m += "MIME-Version: 1.0\r\n";
  m += "Content-Type: multipart/report; report-type=\"tlsrpt\";\r\n boundary=\"" + boundary + "\"\r\n";
  m += "\r\n";
  m += "This is a multipart message in MIME format.\r\n";
  m += "--" + boundary + "\r\n";
  m += "Content-Type: text/plain; charset=\"us-ascii\"\r\n";
  m += "Content-Transfer-Encoding: 7bit\r\n\r\n";
  m += "This is an aggregate TLS report (RFC 8460) from " + sub + " for " + domain + ",\r\n";
  m += "covering " + util::isoUtc(day).substr(0, 10) + " 00:00-24:00 UTC.\r\n";
  m += "--" + boundary + "\r\n";
  m += "Content-Type: application/tlsrpt+gzip\r\n";
  m += "Content-Transfer-Encoding: base64\r\n";
  m += "Content-Disposition: attachment;\r\n filename=\"" + reportFilename(meta, domain, day) + "\"\r\n\r\n";
  const std::string b64 = util::base64Encode(gzip(json));
  for (size_t i = 0; i < b64.size(); i += 76) m += b64.substr(i, 76) + "\r\n";
  m += "--" + boundary + "--\r\n";
  return m;
}

}  // namespace subrelay::delivery::tlsrpt
