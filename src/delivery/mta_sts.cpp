// MTA-STS (RFC 8461): record and policy grammar, MX matching, cache decisions, verdicts.
#include "delivery/mta_sts.h"

#include <algorithm>

#include "util/strings.h"

namespace subrelay::delivery::mtasts {

namespace {

bool isWsp(char c) { return c == ' ' || c == '\t'; }
bool isAlpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
bool isDigit(char c) { return c >= '0' && c <= '9'; }
bool isAlnum(char c) { return isAlpha(c) || isDigit(c); }

// 3.1 sts-ext-name / 3.2 sts-policy-ext-name: (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")
bool isExtName(std::string_view n) {
  if (n.empty() || n.size() > 32 || !isAlnum(n[0])) return false;
  return std::all_of(n.begin() + 1, n.end(), [](char c) { return isAlnum(c) || c == '_' || c == '-' || c == '.'; });
}

// 3.1 sts-ext-value: 1*(%x21-3A / %x3C / %x3E-7E): no "=", ";", SP or CTLs.
bool isTxtExtValue(std::string_view v) {
  if (v.empty()) return false;
  return std::all_of(v.begin(), v.end(), [](char ch) {
    auto c = static_cast<unsigned char>(ch);
    return c >= 0x21 && c <= 0x7E && c != '=' && c != ';';
  });
}

// RFC 5321 4.1.2 Domain: sub-domain *("." sub-domain), sub-domain = Let-dig [Ldh-str].
bool isDomain(std::string_view d) {
  if (d.empty() || d.size() > 253) return false;
  for (auto label : util::split(d, '.')) {
    if (label.empty() || label.size() > 63) return false;
    if (!isAlnum(label.front()) || !isAlnum(label.back())) return false;
    if (!std::all_of(label.begin(), label.end(), [](char c) { return isAlnum(c) || c == '-'; })) return false;
  }
  return true;
}

std::string_view stripDot(std::string_view s) {
  if (!s.empty() && s.back() == '.') s.remove_suffix(1);
  return s;
}

}  // namespace

const char* modeName(Mode m) {
  switch (m) {
    case Mode::Enforce: return "enforce";
    case Mode::Testing: return "testing";
    case Mode::None: return "none";
  }
  return "none";
}

std::optional<Mode> parseMode(std::string_view s) {
  // 3.2: %s"testing" / %s"enforce" / %s"none": case-sensitive.
  if (s == "enforce") return Mode::Enforce;
  if (s == "testing") return Mode::Testing;
  if (s == "none") return Mode::None;
  return std::nullopt;
}

// --- 3.1 ---------------------------------------------------------------------------------

util::Result<std::string> parseTxtRecord(std::string_view text) {
  // sts-text-record = sts-version 1*(sts-field-delim sts-field) [sts-field-delim]
  // sts-field-delim = *WSP ";" *WSP;  sts-version = %s"v=STSv1"
  constexpr std::string_view kVersion = "v=STSv1";
  if (text.substr(0, kVersion.size()) != kVersion) return util::makeError("does not begin with v=STSv1");
  std::string_view rest = text.substr(kVersion.size());
  std::optional<std::string> id;
  bool anyField = false;
  while (!rest.empty()) {
    // A delimiter: *WSP ";" *WSP.
    size_t i = 0;
    while (i < rest.size() && isWsp(rest[i])) ++i;
    if (i == rest.size() || rest[i] != ';') return util::makeError("expected ';' after a field");
    ++i;
    while (i < rest.size() && isWsp(rest[i])) ++i;
    rest.remove_prefix(i);
    if (rest.empty()) break;  // [sts-field-delim] at the end
    size_t end = 0;
    while (end < rest.size() && rest[end] != ';' && !isWsp(rest[end])) ++end;
    std::string_view field = rest.substr(0, end);
    rest.remove_prefix(end);
    const size_t eq = field.find('=');
    if (eq == std::string_view::npos) return util::makeError("field without '=': " + util::sanitizeForLog(field, 64));
    std::string_view name = field.substr(0, eq), value = field.substr(eq + 1);
    if (name == "id") {
      // sts-id = %s"id=" 1*32(ALPHA / DIGIT)
      if (value.empty() || value.size() > 32 || !std::all_of(value.begin(), value.end(), isAlnum))
        return util::makeError("invalid id: " + util::sanitizeForLog(value, 64));
      if (!id) id = std::string(value);  // 3.2: a duplicated field: the first counts
    } else if (!isExtName(name) || !isTxtExtValue(value)) {
      return util::makeError("invalid field: " + util::sanitizeForLog(field, 64));
    }
    anyField = true;
  }
  if (!anyField || !id) return util::makeError("no id field");
  return *id;
}

const char* txtKindName(TxtOutcome::Kind k) {
  switch (k) {
    case TxtOutcome::Kind::Found: return "found";
    case TxtOutcome::Kind::Absent: return "absent";
    case TxtOutcome::Kind::Invalid: return "invalid";
    case TxtOutcome::Kind::Failed: return "failed";
  }
  return "failed";
}

TxtOutcome classifyTxt(dns::Status status, const std::vector<std::string>& texts) {
  TxtOutcome out;
  switch (status) {
    case dns::Status::Ok:
      break;
    case dns::Status::NoData:
    case dns::Status::NxDomain:
      out.kind = TxtOutcome::Kind::Absent;
      out.detail = std::string("no TXT record (") + dns::statusName(status) + ")";
      return out;
    default:
      out.kind = TxtOutcome::Kind::Failed;
      out.detail = std::string("TXT lookup failed (") + dns::statusName(status) + ")";
      return out;
  }
  // 3.1: "records that do not begin with "v=STSv1;" are discarded. If the number of
  // resulting records is not one, or if the resulting record is syntactically invalid,
  // senders MUST assume the recipient domain does not have an available MTA-STS Policy".
  // A record counts as beginning with the version when "v=STSv1" is followed by the end,
  // a blank or ';' (the ABNF allows blanks before the ';'); "v=STSv10" is another record.
  std::vector<const std::string*> ours;
  for (const auto& t : texts) {
    if (t.rfind("v=STSv1", 0) != 0) continue;
    if (t.size() > 7 && t[7] != ';' && !isWsp(t[7])) continue;
    ours.push_back(&t);
  }
  if (ours.empty()) {
    out.kind = TxtOutcome::Kind::Absent;
    out.detail = "no v=STSv1 TXT record";
    return out;
  }
  if (ours.size() > 1) {
    out.kind = TxtOutcome::Kind::Invalid;
    out.detail = std::to_string(ours.size()) + " v=STSv1 TXT records";
    return out;
  }
  auto id = parseTxtRecord(*ours[0]);
  if (!id) {
    out.kind = TxtOutcome::Kind::Invalid;
    out.detail = "invalid TXT record: " + id.error().message;
    return out;
  }
  out.kind = TxtOutcome::Kind::Found;
  out.id = std::move(id.value());
  return out;
}

TxtOutcome classifyTxt(const dns::Answer& answer) { return classifyTxt(answer.status, answer.texts); }

// --- 3.2 ---------------------------------------------------------------------------------

util::Result<Policy> parsePolicy(std::string_view body) {
  if (body.size() > kMaxPolicyBytes)
    return util::makeError("policy larger than " + std::to_string(kMaxPolicyBytes) + " bytes");
  Policy p;
  std::optional<std::string_view> version, mode, maxAge;
  // sts-policy-term = LF / CRLF. Blank lines (a trailing one in particular) are skipped.
  size_t pos = 0;
  int lineNo = 0;
  while (pos < body.size()) {
    size_t nl = body.find('\n', pos);
    std::string_view line = body.substr(pos, nl == std::string_view::npos ? std::string_view::npos : nl - pos);
    pos = nl == std::string_view::npos ? body.size() : nl + 1;
    ++lineNo;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    // sts-policy-field *WSP: blanks after the value are allowed.
    while (!line.empty() && isWsp(line.back())) line.remove_suffix(1);
    if (line.empty()) continue;
    const auto where = [&] { return "line " + std::to_string(lineNo) + ": "; };
    // sts-policy-field-delim = ":" *WSP
    const size_t colon = line.find(':');
    if (colon == std::string_view::npos) return util::makeError(where() + "no ':'");
    std::string_view name = line.substr(0, colon);
    std::string_view value = line.substr(colon + 1);
    while (!value.empty() && isWsp(value.front())) value.remove_prefix(1);
    if (!isExtName(name)) return util::makeError(where() + "invalid field name");
    for (char ch : value) {
      auto c = static_cast<unsigned char>(ch);
      if (c < 0x20 || c == 0x7F) return util::makeError(where() + "control character in the value");
    }
    // 3.2: "If any non-repeated field -- i.e., all fields excepting "mx" -- is
    // duplicated, all entries except for the first SHALL be ignored."
    if (name == "version") {
      if (!version) version = value;
    } else if (name == "mode") {
      if (!mode) mode = value;
    } else if (name == "max_age") {
      if (!maxAge) maxAge = value;
    } else if (name == "mx") {
      // sts-policy-mx-value = ["*."] Domain; A-labels only (3.2), compared lower-case.
      std::string_view d = stripDot(value);
      std::string_view host = d.substr(0, 2) == "*." ? d.substr(2) : d;
      if (!isDomain(host)) return util::makeError(where() + "invalid mx pattern: " + util::sanitizeForLog(value, 64));
      p.mx.push_back(util::toLower(d));
    }
    // Other fields: "unknown fields SHALL be ignored".
    if (value.empty() && name != "mx") return util::makeError(where() + "empty value");
  }
  if (!version) return util::makeError("no version field");
  if (*version != "STSv1") return util::makeError("unsupported version " + util::sanitizeForLog(*version, 32));
  if (!mode) return util::makeError("no mode field");
  auto m = parseMode(*mode);
  if (!m) return util::makeError("invalid mode " + util::sanitizeForLog(*mode, 32));
  p.mode = *m;
  // sts-policy-max-age-value = 1*10(DIGIT). A value above the maximum of 31557600 is
  // taken as the maximum: the policy is otherwise valid, and dropping it would only
  // weaken delivery security.
  if (!maxAge) return util::makeError("no max_age field");
  if (maxAge->empty() || maxAge->size() > 10 || !std::all_of(maxAge->begin(), maxAge->end(), isDigit))
    return util::makeError("invalid max_age " + util::sanitizeForLog(*maxAge, 32));
  p.maxAge = std::min<int64_t>(std::stoll(std::string(*maxAge)), kMaxMaxAge);
  // "mx ... required at least once, except when mode is "none"".
  if (p.mx.empty() && p.mode != Mode::None) return util::makeError("no mx field");
  return p;
}

bool isTextPlain(std::string_view contentType) {
  std::string_view type = contentType.substr(0, contentType.find(';'));
  return util::iequals(util::trim(type), "text/plain");
}

std::string policyHost(std::string_view domain) { return "mta-sts." + std::string(stripDot(domain)); }
std::string policyUrl(std::string_view domain) { return "https://" + policyHost(domain) + std::string(kWellKnownPath); }
std::string txtName(std::string_view domain) { return "_mta-sts." + std::string(stripDot(domain)); }

// --- 4.1 ---------------------------------------------------------------------------------

bool mxMatches(std::string_view pattern, std::string_view host) {
  pattern = stripDot(pattern);
  host = stripDot(host);
  if (pattern.empty() || host.empty()) return false;
  if (pattern.substr(0, 2) == "*.") {
    // "the wildcard character '*' may only be used to match the entire left-most label":
    // host = one non-empty label + "." + the rest of the pattern.
    std::string_view suffix = pattern.substr(1);  // ".example.com"
    if (host.size() <= suffix.size()) return false;
    std::string_view label = host.substr(0, host.size() - suffix.size());
    if (label.find('.') != std::string_view::npos) return false;
    return util::iequals(host.substr(label.size()), suffix);
  }
  return util::iequals(pattern, host);
}

bool policyAllowsMx(const Policy& p, std::string_view host) {
  return std::any_of(p.mx.begin(), p.mx.end(), [&](const std::string& pat) { return mxMatches(pat, host); });
}

// --- the cache ---------------------------------------------------------------------------

std::optional<CachedPolicy> current(const DomainState& s, int64_t now) {
  if (!s.policy || now >= s.policy->expiresAt) return std::nullopt;
  return s.policy;
}

const char* stepName(Step s) {
  switch (s) {
    case Step::Answer: return "answer";
    case Step::AnswerAndRefresh: return "answer-and-refresh";
    case Step::Discover: return "discover";
  }
  return "discover";
}

namespace {
bool within(int64_t since, int64_t now, int64_t span) { return since != 0 && now - since < span; }
}  // namespace

Step plan(const DomainState& s, int64_t now, const Settings& cfg) {
  const bool lookupHeld = within(s.lookupFailedAt, now, cfg.lookupHoldoff);
  const bool fetchHeld = within(s.fetchFailedAt, now, cfg.fetchHoldoff);
  if (auto cur = current(s, now)) {
    // Refresh once a day (3.3), or sooner for a short max_age: by half of it, so that a
    // refetch renews the policy before it expires (10.2).
    const int64_t every = std::min(cfg.refreshInterval, cur->policy.maxAge / 2);
    if (now - cur->checkedAt < every || lookupHeld || fetchHeld) return Step::Answer;
    return Step::AnswerAndRefresh;
  }
  if (s.absent && within(s.checkedAt, now, cfg.absentRecheck)) return Step::Answer;
  if (lookupHeld || fetchHeld) return Step::Answer;
  return Step::Discover;
}

TxtDecision onTxt(DomainState& s, const std::string& /*domain*/, const TxtOutcome& txt, int64_t now,
                  const Settings& cfg) {
  TxtDecision d;
  if (txt.kind == TxtOutcome::Kind::Failed) {
    s.lookupFailedAt = now;
    return d;
  }
  s.lookupFailedAt = 0;
  s.checkedAt = now;
  if (txt.kind != TxtOutcome::Kind::Found) {
    // A cached policy survives (3.1); the lookup counts as this round's check.
    s.absent = true;
    if (s.policy) s.policy->checkedAt = now;
    return d;
  }
  s.absent = false;
  if (auto cur = current(s, now); cur && cur->id == txt.id) {
    // 3.1: the id "MUST uniquely identify a given instance of a policy": unchanged, no
    // fetch; only a policy past half of its max_age is fetched again to renew it.
    if (now - cur->fetchedAt < cur->policy.maxAge / 2) {
      s.policy->checkedAt = now;
      return d;
    }
  }
  if (s.failedId == txt.id && within(s.fetchFailedAt, now, cfg.fetchHoldoff)) return d;
  d.fetch = true;
  d.id = txt.id;
  return d;
}

FetchDecision onFetch(DomainState& s, const std::string& domain, const std::string& id, const FetchOutcome& f,
                      int64_t now) {
  FetchDecision d;
  std::optional<Policy> parsed;
  if (!f.transportOk) {
    d.error = f.error.empty() ? "HTTPS fetch failed" : f.error;
  } else if (f.status != 200) {
    // 3.3: "only valid if the HTTP response code is 200 (OK). HTTP 3xx redirects MUST NOT
    // be followed".
    d.error = "HTTP status " + std::to_string(f.status);
  } else if (!isTextPlain(f.contentType)) {
    d.error = "content type is not text/plain: " + util::sanitizeForLog(f.contentType, 64);
  } else if (auto p = parsePolicy(f.body); !p) {
    d.error = "invalid policy: " + p.error().message;
  } else {
    parsed = std::move(p.value());
  }
  if (!parsed) {
    s.failedId = id;
    s.fetchFailedAt = now;
    // 3.3: a cached non-expired policy stays in force; its failed refresh is worth a
    // warning unless its mode is none.
    auto cur = current(s, now);
    d.warn = cur && cur->policy.mode != Mode::None;
    return d;
  }
  CachedPolicy c;
  c.domain = domain;
  c.id = id;
  c.policy = std::move(*parsed);
  c.text = f.body;
  c.fetchedAt = now;
  c.expiresAt = now + c.policy.maxAge;
  c.checkedAt = now;
  s.policy = c;
  s.absent = false;
  s.failedId.clear();
  s.fetchFailedAt = 0;
  d.stored = true;
  d.policy = std::move(c);
  return d;
}

// --- 4, 5 --------------------------------------------------------------------------------

const char* tlsName(Tls t) {
  switch (t) {
    case Tls::Opportunistic: return "opportunistic";
    case Tls::ReportOnly: return "report-only";
    case Tls::Required: return "required";
  }
  return "opportunistic";
}

bool Verdict::noUsableHost() const {
  return std::none_of(hosts.begin(), hosts.end(), [](const MxVerdict& h) { return h.usable; });
}

Verdict verdict(const std::optional<CachedPolicy>& policy, const std::vector<std::string>& hosts) {
  Verdict v;
  if (policy) {
    v.mode = policy->policy.mode;
    v.policyId = policy->id;
  }
  for (const auto& h : hosts) {
    MxVerdict m;
    m.host = h;
    if (policy && policy->policy.mode != Mode::None) {
      m.matches = policyAllowsMx(policy->policy, h);
      if (policy->policy.mode == Mode::Enforce) {
        // 5: "Sending MTAs MUST NOT deliver the message to hosts that fail MX matching
        // or certificate validation or that do not support STARTTLS."
        m.usable = m.matches;
        m.tls = Tls::Required;
      } else {
        // 5: testing: "messages may be delivered as though there were no MTA-STS
        // validation failure".
        m.tls = Tls::ReportOnly;
      }
    }
    v.hosts.push_back(std::move(m));
  }
  return v;
}

}  // namespace subrelay::delivery::mtasts
