// config: JSON text -> validated Config, with every error named by its JSON path.
//
// parseConfig() never touches the filesystem and never throws: a syntax error is one error
// with its line/column/byte; otherwise the whole document is checked and every problem is
// reported, so one run of `subrelay check-config` shows them all. Filesystem checks (key and
// certificate files readable) live in checkFiles(), which loadConfigFile() runs.
//
// Extensions beyond the core keys (documented in docs/configuration.md):
//   - limits.max_bad_commands, max_auth_failures, command_timeout, data_timeout,
//     shutdown_grace, auth_failure_delay ("ms" unit allowed, "0s" disables the delay);
//   - limits.max_sessions_per_account, auth_delay_after, auth_delay_base, auth_delay_max,
//     auth_lockout_after, auth_lockout_window, auth_lockout_duration (brute-force defence);
//   - limits.max_header_fields, max_junk_commands (README.md names max_header_bytes and
//     accounts[].allow_null_sender);
//   - delivery.tls_policy_overrides: { "domain": "opportunistic|required|verify" };
//   - delivery.delay_notice (duration: "delayed" DSN after it), delivery.tls_ca_file (trust
//     store for tls "verify" instead of the system's);
//   - log_level, workers;
// retention.finished_bodies ("0s" allowed), retention.history and retention.captured are
// core keys.
//   - rate_limits.bytes_per_<period>;
//   - duplicate keys in one JSON object are an error (a later value would silently win).
#include "config/config.h"

#include "idna/idna.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <limits>
#include <map>
#include <set>
#include <utility>

#include <nlohmann/json.hpp>

#include "config/duration.h"
#include "util/strings.h"

namespace subrelay::config {
namespace {

using Json = nlohmann::json;

constexpr uint64_t kU32Max = std::numeric_limits<uint32_t>::max();
constexpr uint64_t kU64Max = std::numeric_limits<uint64_t>::max();
// A config file is a few kilobytes; anything this big is a mistake (wrong file).
constexpr off_t kMaxConfigFileBytes = off_t{16} * 1024 * 1024;
constexpr size_t kMaxSecretBytes = 1024;  // a relay password file

// ---- rendering input in messages -------------------------------------------------------

// A quoted, escaped, length-capped rendering of untrusted text for an error message.
std::string quote(std::string_view s, size_t max = 80) {
  size_t n = std::min(s.size(), max);
  // Do not cut a UTF-8 sequence in half (the parser has already checked it is UTF-8).
  if (n < s.size())
    while (n > 0 && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;
  std::string out = "\"";
  for (size_t i = 0; i < n; ++i) {
    auto c = static_cast<unsigned char>(s[i]);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20 || c == 0x7f) {
      static constexpr char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 0xF];
    } else {
      out += static_cast<char>(c);
    }
  }
  out += '"';
  if (n < s.size()) out += "...";
  return out;
}

// What a JSON value is, for "got ..." in messages. Containers are named, never dumped:
// dumping recurses, and a hostile document can nest deeply.
std::string describe(const Json& v) {
  switch (v.type()) {
    case Json::value_t::null:
      return "null";
    case Json::value_t::boolean:
      return v.get<bool>() ? "true" : "false";
    case Json::value_t::string:
      return quote(v.get_ref<const std::string&>());
    case Json::value_t::number_integer:
      return std::to_string(v.get<int64_t>());
    case Json::value_t::number_unsigned:
      return std::to_string(v.get<uint64_t>());
    case Json::value_t::number_float:
      return v.dump();
    case Json::value_t::array:
      return v.empty() ? "an empty array" : "an array";
    case Json::value_t::object:
      return v.empty() ? "an empty object" : "an object";
    default:
      return "an unsupported value";
  }
}

// ---- JSON paths ------------------------------------------------------------------------

bool isIdentifier(std::string_view k) {
  if (k.empty()) return false;
  for (char c : k)
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_')) return false;
  return !(k[0] >= '0' && k[0] <= '9');
}

// accounts[0] + "rate_limits" -> accounts[0].rate_limits; keys that are not identifiers
// (domain names in tls_policy_overrides) use the bracket form: x["example.com"].
std::string child(const std::string& base, std::string_view key) {
  if (isIdentifier(key) && key.size() <= 200) return base.empty() ? std::string(key) : base + "." + std::string(key);
  return base + "[" + quote(key, 200) + "]";
}

std::string item(const std::string& base, size_t i) { return base + "[" + std::to_string(i) + "]"; }

// ---- "did you mean" --------------------------------------------------------------------

// Optimal string alignment distance (Levenshtein plus adjacent transposition), ASCII
// case-insensitive: "max_recipents" -> "max_recipients" is 1, "Hostname" -> "hostname" 1.
size_t editDistance(std::string_view a, std::string_view b) {
  auto lower = [](char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c + 32) : c; };
  std::vector<std::vector<size_t>> d(a.size() + 1, std::vector<size_t>(b.size() + 1));
  for (size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
  for (size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t cost = lower(a[i - 1]) == lower(b[j - 1]) ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && lower(a[i - 1]) == lower(b[j - 2]) && lower(a[i - 2]) == lower(b[j - 1]))
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[a.size()][b.size()];
}

// The closest known key within a small distance, or "".
std::string suggest(std::string_view key, const std::vector<std::string_view>& known) {
  if (key.size() > 64) return {};  // not a typo of any key we have; spare the quadratic work
  size_t limit = std::clamp<size_t>(key.size() / 3, 1, 3);
  size_t best = limit + 1;
  std::string_view bestKey;
  for (auto k : known) {
    size_t dist = editDistance(key, k);
    if (dist < best) {
      best = dist;
      bestKey = k;
    }
  }
  return std::string(bestKey);
}

// ---- names, addresses ------------------------------------------------------------------

// "" when name is a valid host name, else why not (for the message).
std::string domainProblem(std::string_view name) {
  if (name.empty()) return "it is empty";
  if (name.back() == '.') return "remove the trailing dot";
  if (name.size() > 253) return "longer than 253 characters";
  size_t start = 0;
  std::string_view last;
  while (true) {
    size_t dot = name.find('.', start);
    std::string_view label = name.substr(start, dot == std::string_view::npos ? dot : dot - start);
    if (label.empty()) return "it has an empty label";
    if (label.size() > 63) return "a label is longer than 63 characters";
    for (char c : label) {
      auto u = static_cast<unsigned char>(c);
      if (u >= 0x80) return "non-ASCII: use the xn-- (A-label) form";
      if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-'))
        return "only letters, digits, '-' and '.' are allowed";
    }
    if (label.front() == '-' || label.back() == '-') return "a label starts or ends with '-'";
    last = label;
    if (dot == std::string_view::npos) break;
    start = dot + 1;
  }
  if (std::all_of(last.begin(), last.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return "that is an IP address, not a name";
  return {};
}

// inet_pton reads a C string: a NUL inside s would end it early ("127.0.0.1\0junk").
bool isIpv4(std::string_view s) {
  if (s.size() > 15 || s.find('\0') != std::string_view::npos) return false;
  std::string z(s);
  in_addr a{};
  return ::inet_pton(AF_INET, z.c_str(), &a) == 1;
}

bool isIpv6(std::string_view s) {
  if (s.size() > 45 || s.find('\0') != std::string_view::npos) return false;
  std::string z(s);
  in6_addr a{};
  return ::inet_pton(AF_INET6, z.c_str(), &a) == 1;
}

bool isLocalhostName(std::string_view host) { return util::iequals(host, "localhost"); }

bool parsePort(std::string_view s, uint16_t& port) {
  if (s.empty() || s.size() > 5) return false;
  uint32_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<uint32_t>(c - '0');
  }
  if (v > 65535) return false;
  port = static_cast<uint16_t>(v);
  return true;
}

struct HostPort {
  std::string host;  // without brackets
  uint16_t port = 0;
  bool hasPort = false;
  bool ipv6 = false;
};

// Splits "[v6]:port", "v4:port", "name:port" and, with portOptional, the same without
// ":port" (a bare IPv6 address is then allowed too). "" on success, else what is wrong.
std::string splitHostPort(std::string_view s, bool portOptional, HostPort& out) {
  out = HostPort{};
  if (s.empty()) return "it is empty";
  std::string_view host;
  std::string_view rest;
  if (s.front() == '[') {
    size_t close = s.find(']');
    if (close == std::string_view::npos) return "missing ']'";
    host = s.substr(1, close - 1);
    rest = s.substr(close + 1);
    if (!isIpv6(host)) return "the part in brackets is not an IPv6 address";
    out.ipv6 = true;
    if (!rest.empty() && rest.front() != ':') return "unexpected text after ']'";
  } else {
    size_t colons = static_cast<size_t>(std::count(s.begin(), s.end(), ':'));
    if (colons > 1) {
      if (isIpv6(s)) {
        if (!portOptional) return "an IPv6 address needs brackets and a port, e.g. \"[::1]:587\"";
        out.host = std::string(s);
        out.ipv6 = true;
        return {};
      }
      return "too many ':' (write IPv6 addresses in brackets)";
    }
    size_t colon = s.find(':');
    host = s.substr(0, colon);
    if (colon != std::string_view::npos) rest = s.substr(colon);
    if (host.empty()) return "the host is missing";
    if (!isIpv4(host) && !isLocalhostName(host)) {
      std::string why = domainProblem(host);
      if (!why.empty()) return "the host is not an IP address or a host name (" + why + ")";
    }
  }
  if (rest.empty()) {
    if (!portOptional) return "the port is missing";
  } else {
    if (!parsePort(rest.substr(1), out.port)) return "the port must be a number from 0 to 65535";
    out.hasPort = true;
  }
  out.host = std::string(host);
  return {};
}

// A canonical form of a listener address, so "[::0]:587" and "[::]:587" compare equal.
std::string canonicalAddress(const std::string& host, uint16_t port) {
  std::string key;
  in_addr a4{};
  in6_addr a6{};
  if (::inet_pton(AF_INET, host.c_str(), &a4) == 1) {
    char buf[INET_ADDRSTRLEN];
    key = ::inet_ntop(AF_INET, &a4, buf, sizeof buf) ? buf : host;
  } else if (::inet_pton(AF_INET6, host.c_str(), &a6) == 1) {
    char buf[INET6_ADDRSTRLEN];
    key = std::string("[") + (::inet_ntop(AF_INET6, &a6, buf, sizeof buf) ? buf : host) + "]";
  } else {
    key = util::toLower(host);
  }
  return key + ":" + std::to_string(port);
}

// "" when s is an acceptable accounts[].senders entry; out is its normal form.
std::string senderProblem(std::string_view s, std::string& out) {
  if (s.find('*') != std::string_view::npos) return "wildcards are not supported: list each domain as \"@domain\"";
  for (char c : s) {
    auto u = static_cast<unsigned char>(c);
    if (u <= 0x20 || u == 0x7f) return "spaces and control characters are not allowed";
  }
  size_t at = s.rfind('@');
  if (at == std::string_view::npos) {
    if (domainProblem(s).empty()) return "did you mean " + quote("@" + std::string(s)) + "?";
    return "there is no '@'";
  }
  std::string_view local = s.substr(0, at);
  std::string_view written = s.substr(at + 1);
  if (written.empty()) return "the domain after '@' is missing";
  // Internationalised domains are kept as A-labels (RFC 5891), the form every client
  // address is compared in, whichever form the administrator wrote.
  std::string idnaWhy;
  std::optional<std::string> ascii = idna::toAscii(written, &idnaWhy);
  if (!ascii) return "the domain is not a valid internationalized domain name (IDNA2008): " + idnaWhy;
  const std::string& domain = *ascii;
  std::string why = domainProblem(domain);
  if (!why.empty()) return "the domain is not valid: " + why;
  if (!local.empty()) {
    if (local.size() > 64) return "the local part is longer than 64 octets (RFC 5321 4.5.3.1.1)";
    if (local.front() == '.' || local.back() == '.' || local.find("..") != std::string_view::npos)
      return "the local part has a misplaced '.'";
    // RFC 5322 3.2.3 dot-atom (atext and '.'), plus UTF-8 for SMTPUTF8 (RFC 6531).
    // Quoted local parts are not supported: nobody uses them for application senders.
    static constexpr std::string_view kAtextSpecials = "!#$%&'*+-/=?^_`{|}~.";
    for (char c : local) {
      auto u = static_cast<unsigned char>(c);
      bool ok = u >= 0x80 || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                kAtextSpecials.find(c) != std::string_view::npos;
      if (!ok) return "the local part may only hold letters, digits and !#$%&'*+-/=?^_`{|}~.";
    }
  }
  // The local part stays as written (RFC 5321 2.4: it may be case-sensitive); the domain
  // is case-insensitive, so it is compared in lower case.
  out = std::string(local) + "@" + domain;
  return {};
}

// ---- the validator ---------------------------------------------------------------------

template <typename E>
using Choices = std::initializer_list<std::pair<std::string_view, E>>;

class Validator {
 public:
  explicit Validator(std::vector<ConfigError>& errors) : errors_(errors) {}

  void fail(const std::string& path, std::string message) { errors_.push_back(ConfigError{path, std::move(message)}); }

  // Reports and returns false when v is not an object.
  bool object(const Json& v, const std::string& path) {
    if (v.is_object()) return true;
    fail(path, "expected an object, got " + describe(v));
    return false;
  }

  bool array(const Json& v, const std::string& path) {
    if (v.is_array()) return true;
    fail(path, "expected an array, got " + describe(v));
    return false;
  }

  // Every key of obj must be in known: a misspelt limit must not silently fall back to the
  // default (README.md).
  void rejectUnknown(const Json& obj, const std::string& path, const std::vector<std::string_view>& known) {
    for (auto it = obj.begin(); it != obj.end(); ++it) {
      const std::string& k = it.key();
      if (std::find(known.begin(), known.end(), k) != known.end()) continue;
      std::string msg = "unknown key " + quote(k);
      std::string s = suggest(k, known);
      if (!s.empty()) msg += " (did you mean " + quote(s) + "?)";
      fail(child(path, k), std::move(msg));
    }
  }

  static const Json* find(const Json& obj, std::string_view key) {
    auto it = obj.find(std::string(key));
    return it == obj.end() ? nullptr : &*it;
  }

  const Json* require(const Json& obj, const std::string& path, std::string_view key) {
    const Json* v = find(obj, key);
    if (!v) fail(child(path, key), "required key is missing");
    return v;
  }

  // A non-empty string.
  bool string(const Json& v, const std::string& path, std::string& out) {
    if (!v.is_string()) {
      fail(path, "expected a string, got " + describe(v));
      return false;
    }
    const auto& s = v.get_ref<const std::string&>();
    if (s.empty()) {
      fail(path, "expected a non-empty string");
      return false;
    }
    out = s;
    return true;
  }

  // A file or directory name: a non-empty string without NUL (which no path can hold).
  bool pathString(const Json& v, const std::string& path, std::string& out) {
    if (!string(v, path, out)) return false;
    if (out.find('\0') != std::string::npos) {
      fail(path, "expected a file path, got a string containing a NUL character");
      return false;
    }
    return true;
  }

  bool integer(const Json& v, const std::string& path, uint64_t min, uint64_t max, uint64_t& out) {
    bool big = max >= kU32Max;
    auto expectation = [&](bool tooLarge) {
      if (min == 1 && big)
        return tooLarge ? "expected a positive integer no larger than " + std::to_string(max)
                        : std::string("expected a positive integer");
      return "expected an integer from " + std::to_string(min) + " to " + std::to_string(max);
    };
    if (v.is_number_unsigned()) {
      uint64_t n = v.get<uint64_t>();
      if (n >= min && n <= max) {
        out = n;
        return true;
      }
      fail(path, expectation(n > max) + ", got " + describe(v));
      return false;
    }
    fail(path, expectation(false) + ", got " + describe(v));
    return false;
  }

  bool boolean(const Json& v, const std::string& path, bool& out) {
    if (v.is_boolean()) {
      out = v.get<bool>();
      return true;
    }
    fail(path, "expected true or false, got " + describe(v));
    return false;
  }

  bool u32(const Json& v, const std::string& path, uint32_t& out, uint64_t min = 1) {
    uint64_t n = 0;
    if (!integer(v, path, min, kU32Max, n)) return false;
    out = static_cast<uint32_t>(n);
    return true;
  }

  template <typename E>
  bool oneOf(const Json& v, const std::string& path, Choices<E> choices, E& out) {
    if (v.is_string()) {
      const auto& s = v.get_ref<const std::string&>();
      for (const auto& [name, value] : choices) {
        if (s == name) {
          out = value;
          return true;
        }
      }
    }
    std::string names;
    for (const auto& c : choices) names += (names.empty() ? "\"" : ", \"") + std::string(c.first) + "\"";
    fail(path, "expected one of " + names + ", got " + describe(v));
    return false;
  }

  // A duration with one-second granularity (s, m, h, d), > 0.
  bool duration(const Json& v, const std::string& path, std::chrono::seconds& out) {
    std::chrono::milliseconds ms{0};
    if (!durationCommon(v, path, false, false, ms)) return false;
    out = std::chrono::duration_cast<std::chrono::seconds>(ms);
    return true;
  }

  // A duration with one-second granularity that may be zero ("0s").
  bool durationOrZero(const Json& v, const std::string& path, std::chrono::seconds& out) {
    std::chrono::milliseconds ms{0};
    if (!durationCommon(v, path, false, true, ms)) return false;
    out = std::chrono::duration_cast<std::chrono::seconds>(ms);
    return true;
  }

  // A duration with millisecond granularity; zeroAllowed for delays that may be disabled.
  bool durationMs(const Json& v, const std::string& path, bool zeroAllowed, std::chrono::milliseconds& out) {
    return durationCommon(v, path, true, zeroAllowed, out);
  }

 private:
  bool durationCommon(const Json& v, const std::string& path, bool allowMs, bool zeroAllowed,
                      std::chrono::milliseconds& out) {
    const std::string expected = allowMs ? "expected a duration such as \"250ms\", \"30s\", \"5m\", \"1h\" or \"5d\""
                                         : "expected a duration such as \"30s\", \"5m\", \"1h\" or \"5d\"";
    if (!v.is_string()) {
      fail(path, expected + ", got " + describe(v));
      return false;
    }
    const auto& s = v.get_ref<const std::string&>();
    switch (checkDuration(s, allowMs, out)) {
      case DurationProblem::None:
        return true;
      case DurationProblem::Zero:
        if (zeroAllowed) return true;
        fail(path, "expected a duration greater than zero, got " + describe(v));
        return false;
      case DurationProblem::TooLong:
        fail(path, "duration " + describe(v) + " is too long (at most 100 years)");
        return false;
      case DurationProblem::Milliseconds:
        fail(path, expected + ", got " + describe(v) + " (this setting counts whole seconds)");
        return false;
      case DurationProblem::Syntax:
        break;
    }
    fail(path, expected + ", got " + describe(v));
    return false;
  }

  std::vector<ConfigError>& errors_;
};

// ---- sections --------------------------------------------------------------------------

class ConfigReader {
 public:
  ConfigReader(std::vector<ConfigError>& errors, Config& cfg) : v_(errors), cfg_(cfg), errors_(errors) {}

  void read(const Json& root) {
    if (!root.is_object()) {
      v_.fail("", "expected a JSON object at the top level, got " + describe(root));
      return;
    }
    v_.rejectUnknown(
        root, "",
        {"hostname", "data_dir", "tls", "listeners", "limits", "accounts", "dkim", "delivery", "retention", "log_level",
         "log", "metrics", "workers", "idempotency", "suppression",
         "webhooks"});

    if (const Json* h = v_.require(root, "", "hostname")) {
      std::string name;
      if (v_.string(*h, "hostname", name)) {
        std::string why = domainProblem(name);
        if (why.empty())
          cfg_.hostname = name;
        else
          v_.fail("hostname",
                  "expected a domain name such as \"relay.example.net\", got " + describe(*h) + " (" + why + ")");
      }
    }
    if (const Json* d = v_.require(root, "", "data_dir")) v_.pathString(*d, "data_dir", cfg_.dataDir);

    const Json* tls = Validator::find(root, "tls");
    if (tls) readTls(*tls);
    bool listenersRead = false;
    if (const Json* l = v_.require(root, "", "listeners")) listenersRead = readListeners(*l);
    if (!tls && listenersRead) {
      for (size_t i = 0; i < cfg_.listeners.size(); ++i) {
        // A listener whose tls was refused is already reported; do not guess what it meant.
        if (tlsKnown_[i] && cfg_.listeners[i].tls != ListenerTls::None) {
          v_.fail("tls", "required key is missing: listeners[" + std::to_string(i) + "] uses \"" +
                             std::string(jsonName(cfg_.listeners[i].tls)) +
                             "\", which needs a certificate and private_key");
          break;
        }
      }
    }
    if (const Json* l = Validator::find(root, "limits")) readLimits(*l);
    if (const Json* a = Validator::find(root, "accounts")) readAccounts(*a);
    if (const Json* d = Validator::find(root, "dkim")) readDkim(*d);
    cfg_.delivery.retrySchedule = defaultRetrySchedule();
    if (const Json* d = Validator::find(root, "delivery")) readDelivery(*d);
    if (const Json* r = Validator::find(root, "retention")) readRetention(*r);
    if (const Json* i = Validator::find(root, "idempotency")) readIdempotency(*i);
    if (const Json* s = Validator::find(root, "suppression")) readSuppression(*s);
    cfg_.webhooks.retrySchedule = defaultWebhookRetrySchedule();
    if (const Json* w = Validator::find(root, "webhooks")) readWebhooks(*w);
    // log_level is the older spelling of log.level; both may not be given.
    if (const Json* l = Validator::find(root, "log_level")) {
      v_.oneOf<std::string>(*l, "log_level",
                            {{"debug", "debug"}, {"info", "info"}, {"warn", "warn"}, {"warning", "warn"},
                             {"error", "error"}},
                            cfg_.log.level);
    }
    if (const Json* l = Validator::find(root, "log")) readLog(*l, Validator::find(root, "log_level") != nullptr);
    if (const Json* m = Validator::find(root, "metrics")) readMetrics(*m);
    if (const Json* w = Validator::find(root, "workers")) {
      uint64_t n = 0;
      if (v_.integer(*w, "workers", 0, 64, n)) cfg_.workers = static_cast<uint32_t>(n);
    }
    checkRelayLoops();
  }

 private:
  void readTls(const Json& t) {
    const std::string p = "tls";
    if (!v_.object(t, p)) return;
    v_.rejectUnknown(t, p, {"certificate", "private_key"});
    if (const Json* c = v_.require(t, p, "certificate")) v_.pathString(*c, p + ".certificate", cfg_.tls.certificate);
    if (const Json* k = v_.require(t, p, "private_key")) v_.pathString(*k, p + ".private_key", cfg_.tls.privateKey);
  }

  // True when the array was read (each listener's tls known), so the tls section's
  // requirement can be judged.
  bool readListeners(const Json& arr) {
    const std::string p = "listeners";
    if (!v_.array(arr, p)) return false;
    if (arr.empty()) {
      v_.fail(p, "expected at least one listener, e.g. {\"address\": \"[::]:587\", \"tls\": \"starttls\"}");
      return false;
    }
    std::map<std::string, size_t> seen;  // canonical address -> index
    for (size_t i = 0; i < arr.size(); ++i) {
      const std::string ip = item(p, i);
      Listener l;
      bool tlsKnown = false;
      bool addressOk = readListener(arr[i], ip, l, tlsKnown);
      tlsKnown_.push_back(tlsKnown);
      if (addressOk && l.port != 0) {
        // Port 0 asks the kernel for a fresh port each time, so two such listeners differ.
        auto [it, inserted] = seen.emplace(canonicalAddress(l.host, l.port), i);
        if (!inserted)
          v_.fail(ip + ".address",
                  "duplicate address " + quote(l.address) + " (also listeners[" + std::to_string(it->second) + "])");
      }
      cfg_.listeners.push_back(std::move(l));
    }
    return true;
  }

  // True when the address is valid; tlsKnown tells whether l.tls is what the user meant
  // (given and valid, or absent and so the default).
  bool readListener(const Json& o, const std::string& p, Listener& l, bool& tlsKnown) {
    if (!v_.object(o, p)) return false;
    v_.rejectUnknown(o, p, {"address", "tls"});
    bool addressOk = false;
    if (const Json* a = v_.require(o, p, "address")) {
      if (v_.string(*a, p + ".address", l.address)) {
        HostPort hp;
        std::string why = splitHostPort(l.address, false, hp);
        if (why.empty() && !hp.ipv6 && !isIpv4(hp.host) && !isLocalhostName(hp.host))
          why = "a listener binds to an IP address (or localhost), not a host name";
        if (why.empty()) {
          l.host = hp.host;
          l.port = hp.port;
          addressOk = true;
        } else {
          v_.fail(p + ".address",
                  "expected an address such as \"[::]:587\", \"0.0.0.0:465\" or "
                  "\"127.0.0.1:2587\", got " +
                      describe(*a) + " (" + why + ")");
        }
      }
    }
    tlsKnown = true;
    if (const Json* t = Validator::find(o, "tls")) {
      tlsKnown = v_.oneOf<ListenerTls>(
          *t, p + ".tls",
          {{"starttls", ListenerTls::StartTls}, {"implicit", ListenerTls::Implicit}, {"none", ListenerTls::None}},
          l.tls);
      if (tlsKnown && l.tls == ListenerTls::None && addressOk && !isLoopbackHost(l.host)) {
        v_.fail(p + ".tls",
                "\"none\" is only allowed on a loopback address (127.0.0.0/8, [::1], "
                "localhost), because AUTH would travel in clear over the network; "
                "use \"starttls\" or \"implicit\" on " +
                    quote(l.address));
      }
    }
    return addressOk;
  }

  void readLimits(const Json& o) {
    const std::string p = "limits";
    if (!v_.object(o, p)) return;
    v_.rejectUnknown(
        o, p,
        {"max_message_bytes", "max_recipients", "max_connections", "max_connections_per_ip", "max_bad_commands",
         "max_auth_failures", "command_timeout", "data_timeout", "shutdown_grace", "auth_failure_delay",
         "max_sessions_per_account", "auth_delay_after", "auth_delay_base", "auth_delay_max", "auth_lockout_after",
         "auth_lockout_window", "auth_lockout_duration", "max_header_bytes", "max_header_fields",
         "max_junk_commands"});
    Limits& l = cfg_.limits;
    if (const Json* x = Validator::find(o, "max_message_bytes"))
      v_.integer(*x, p + ".max_message_bytes", 1, kU64Max, l.maxMessageBytes);
    if (const Json* x = Validator::find(o, "max_recipients")) v_.u32(*x, p + ".max_recipients", l.maxRecipients);
    if (const Json* x = Validator::find(o, "max_connections")) v_.u32(*x, p + ".max_connections", l.maxConnections);
    if (const Json* x = Validator::find(o, "max_connections_per_ip"))
      v_.u32(*x, p + ".max_connections_per_ip", l.maxConnectionsPerIp);
    if (const Json* x = Validator::find(o, "max_bad_commands")) v_.u32(*x, p + ".max_bad_commands", l.maxBadCommands);
    if (const Json* x = Validator::find(o, "max_auth_failures"))
      v_.u32(*x, p + ".max_auth_failures", l.maxAuthFailures);
    if (const Json* x = Validator::find(o, "command_timeout"))
      v_.duration(*x, p + ".command_timeout", l.commandTimeout);
    if (const Json* x = Validator::find(o, "data_timeout")) v_.duration(*x, p + ".data_timeout", l.dataTimeout);
    if (const Json* x = Validator::find(o, "shutdown_grace")) v_.duration(*x, p + ".shutdown_grace", l.shutdownGrace);
    if (const Json* x = Validator::find(o, "auth_failure_delay"))
      v_.durationMs(*x, p + ".auth_failure_delay", true, l.authFailureDelay);
    if (const Json* x = Validator::find(o, "max_sessions_per_account"))
      v_.u32(*x, p + ".max_sessions_per_account", l.maxSessionsPerAccount, 0);
    if (const Json* x = Validator::find(o, "auth_delay_after"))
      v_.u32(*x, p + ".auth_delay_after", l.authDelayAfter, 0);
    if (const Json* x = Validator::find(o, "auth_delay_base"))
      v_.durationMs(*x, p + ".auth_delay_base", true, l.authDelayBase);
    if (const Json* x = Validator::find(o, "auth_delay_max"))
      v_.durationMs(*x, p + ".auth_delay_max", true, l.authDelayMax);
    if (const Json* x = Validator::find(o, "auth_lockout_after"))
      v_.u32(*x, p + ".auth_lockout_after", l.authLockoutAfter, 0);
    if (const Json* x = Validator::find(o, "auth_lockout_window"))
      v_.duration(*x, p + ".auth_lockout_window", l.authLockoutWindow);
    if (const Json* x = Validator::find(o, "auth_lockout_duration"))
      v_.duration(*x, p + ".auth_lockout_duration", l.authLockoutDuration);
    if (const Json* x = Validator::find(o, "max_header_bytes"))
      v_.integer(*x, p + ".max_header_bytes", 1024, kU32Max, l.maxHeaderBytes);
    if (const Json* x = Validator::find(o, "max_header_fields"))
      v_.u32(*x, p + ".max_header_fields", l.maxHeaderFields, 10);
    if (const Json* x = Validator::find(o, "max_junk_commands"))
      v_.u32(*x, p + ".max_junk_commands", l.maxJunkCommands, 0);
  }

  void readAccounts(const Json& arr) {
    const std::string p = "accounts";
    if (!v_.array(arr, p)) return;
    std::map<std::string, size_t> names;
    for (size_t i = 0; i < arr.size(); ++i) {
      const std::string ap = item(p, i);
      Account a;
      if (readAccount(arr[i], ap, a)) {
        auto [it, inserted] = names.emplace(a.username, i);
        if (!inserted)
          v_.fail(ap + ".username",
                  "duplicate username " + quote(a.username) + " (also accounts[" + std::to_string(it->second) + "])");
      }
      cfg_.accounts.push_back(std::move(a));
    }
  }

  // True when the username is valid (so it can be checked for duplicates).
  bool readAccount(const Json& o, const std::string& p, Account& a) {
    if (!v_.object(o, p)) return false;
    v_.rejectUnknown(o, p,
                     {"username", "password_hash", "senders", "rate_limits", "mode", "allow_null_sender", "relay",
                      "suppression", "webhook"});
    bool nameOk = false;
    if (const Json* u = v_.require(o, p, "username")) {
      if (v_.string(*u, p + ".username", a.username)) {
        std::string why;
        // ':' separates the user from the password in some SASL encodings and tools;
        // control characters cannot be typed in a client's settings and break log lines.
        if (a.username.size() > 255)
          why = "longer than 255 octets";
        else if (a.username.find(':') != std::string::npos)
          why = "contains ':'";
        else if (std::any_of(a.username.begin(), a.username.end(),
                             [](char c) { return static_cast<unsigned char>(c) < 0x20 || c == 0x7f; }))
          why = "contains a control character";
        if (why.empty())
          nameOk = true;
        else
          v_.fail(p + ".username",
                  "expected a user name without ':' or control characters, got " + describe(*u) + " (" + why + ")");
      }
    }
    if (const Json* h = v_.require(o, p, "password_hash")) readPasswordHash(*h, p + ".password_hash", a.passwordHash);
    if (const Json* s = v_.require(o, p, "senders")) readSenders(*s, p + ".senders", a.senders);
    if (const Json* r = Validator::find(o, "rate_limits")) readRateLimits(*r, p + ".rate_limits", a.rateLimits);
    if (const Json* m = Validator::find(o, "mode"))
      v_.oneOf<AccountMode>(*m, p + ".mode", {{"deliver", AccountMode::Deliver}, {"capture", AccountMode::Capture}},
                            a.mode);
    if (const Json* n = Validator::find(o, "allow_null_sender")) v_.boolean(*n, p + ".allow_null_sender", a.allowNullSender);
    if (const Json* r = Validator::find(o, "relay")) readRelayList(*r, p + ".relay", a.relay);
    if (const Json* s = Validator::find(o, "suppression")) v_.boolean(*s, p + ".suppression", a.suppression);
    if (const Json* w = Validator::find(o, "webhook")) readWebhook(*w, p + ".webhook", a.webhook);
    return nameOk;
  }

  void readWebhook(const Json& o, const std::string& p, std::optional<Webhook>& out) {
    if (!v_.object(o, p)) return;
    v_.rejectUnknown(o, p, {"url", "secret_file", "events"});
    Webhook w;
    w.jsonPath = p;
    bool ok = true;
    if (const Json* u = v_.require(o, p, "url")) {
      std::string url;
      if (v_.string(*u, p + ".url", url)) {
        // Events carry addresses and are signed with a shared secret: never in clear text.
        const bool https = url.size() > 8 && url.compare(0, 8, "https://") == 0 && url[8] != '/' &&
                           url.size() <= 2000 &&
                           std::none_of(url.begin(), url.end(), [](char c) {
                             return static_cast<unsigned char>(c) <= 0x20 || c == 0x7f;
                           });
        if (https)
          w.url = url;
        else
          ok = false, v_.fail(p + ".url", "expected an https:// URL such as \"https://hooks.example.com/subrelay\", got " +
                                             describe(*u));
      } else {
        ok = false;
      }
    } else {
      ok = false;
    }
    if (const Json* f = v_.require(o, p, "secret_file")) {
      if (!v_.pathString(*f, p + ".secret_file", w.secretFile)) ok = false;
    } else {
      ok = false;
    }
    if (const Json* e = Validator::find(o, "events")) {
      if (!v_.array(*e, p + ".events")) {
        ok = false;
      } else if (e->empty()) {
        ok = false;
        v_.fail(p + ".events", "expected at least one event name (leave the key out for all of them)");
      } else {
        for (size_t i = 0; i < e->size(); ++i) {
          std::string name;
          if (!v_.string((*e)[i], item(p + ".events", i), name)) {
            ok = false;
            continue;
          }
          bool known = false;
          for (const char* n : kWebhookEventNames) known = known || name == n;
          if (!known) {
            ok = false;
            v_.fail(item(p + ".events", i), "expected one of accepted, delivered, deferred, bounced, suppressed, "
                                            "expired, got " + describe((*e)[i]));
          } else if (std::find(w.events.begin(), w.events.end(), name) == w.events.end()) {
            w.events.push_back(name);
          }
        }
      }
    } else {
      for (const char* n : kWebhookEventNames) w.events.emplace_back(n);
    }
    if (ok) out = std::move(w);
  }

  void readWebhooks(const Json& o) {
    const std::string p = "webhooks";
    if (!v_.object(o, p)) return;
    v_.rejectUnknown(o, p, {"ca_file", "timeout", "retry_schedule", "max_age", "max_backlog"});
    Webhooks& w = cfg_.webhooks;
    if (const Json* x = Validator::find(o, "ca_file")) v_.pathString(*x, p + ".ca_file", w.caFile);
    if (const Json* x = Validator::find(o, "timeout")) {
      std::chrono::seconds t{0};
      if (v_.duration(*x, p + ".timeout", t)) {
        if (t > std::chrono::seconds(300))
          v_.fail(p + ".timeout", "expected a duration of at most \"5m\", got " + describe(*x));
        else
          w.timeout = t;
      }
    }
    if (const Json* x = Validator::find(o, "retry_schedule")) {
      if (v_.array(*x, p + ".retry_schedule")) {
        if (x->empty()) {
          v_.fail(p + ".retry_schedule", "expected at least one duration, e.g. [\"30s\", \"5m\"] (leave the key out for the default)");
        } else {
          std::vector<std::chrono::seconds> schedule;
          for (size_t i = 0; i < x->size(); ++i) {
            std::chrono::seconds s{0};
            if (v_.duration((*x)[i], item(p + ".retry_schedule", i), s)) schedule.push_back(s);
          }
          w.retrySchedule = std::move(schedule);
        }
      }
    }
    if (const Json* x = Validator::find(o, "max_age")) v_.duration(*x, p + ".max_age", w.maxAge);
    if (const Json* x = Validator::find(o, "max_backlog")) v_.integer(*x, p + ".max_backlog", 1, 100000000, w.maxBacklog);
  }

  // Only the shape is checked here ($scrypt$PARAMS$SALT$KEY); policy/ parses the parameters.
  // The value is a secret-ish string, so it is never echoed in the message.
  void readPasswordHash(const Json& v, const std::string& p, std::string& out) {
    static const std::string kExpected = "expected the output of \"subrelay hash-password\" ($scrypt$PARAMS$SALT$KEY)";
    if (!v.is_string()) {
      v_.fail(p, kExpected + ", got " + describe(v));
      return;
    }
    const auto& s = v.get_ref<const std::string&>();
    auto parts = util::split(s, '$');
    bool ok = s.rfind("$scrypt$", 0) == 0 && parts.size() == 5 &&
              std::none_of(parts.begin() + 1, parts.end(), [](std::string_view x) { return x.empty(); });
    if (!ok) {
      v_.fail(p, kExpected + ", got a string of " + std::to_string(s.size()) + " characters that is not");
      return;
    }
    out = s;
  }

  void readSenders(const Json& arr, const std::string& p, std::vector<std::string>& out) {
    if (!v_.array(arr, p)) return;
    if (arr.empty()) {
      v_.fail(p, "expected at least one sender, \"@domain\" or \"local@domain\"");
      return;
    }
    for (size_t i = 0; i < arr.size(); ++i) {
      const std::string sp = item(p, i);
      const Json& s = arr[i];
      static const std::string kExpected = "expected \"@domain\" or \"local@domain\"";
      if (!s.is_string()) {
        v_.fail(sp, kExpected + ", got " + describe(s));
        continue;
      }
      std::string normal;
      std::string why = senderProblem(s.get_ref<const std::string&>(), normal);
      if (!why.empty()) {
        std::string msg = kExpected;
        msg += ", got " + describe(s) + " (" + why + ")";
        v_.fail(sp, std::move(msg));
        continue;
      }
      out.push_back(std::move(normal));
    }
  }

  void readRateLimits(const Json& o, const std::string& p, std::vector<RateLimit>& out) {
    if (!v_.object(o, p)) return;
    static constexpr std::string_view kWhat[] = {"messages", "recipients", "bytes"};
    static constexpr std::string_view kPeriod[] = {"second", "minute", "hour", "day", "month"};
    static const std::vector<std::string> kKeys = [] {
      std::vector<std::string> keys;
      for (auto w : kWhat)
        for (auto per : kPeriod) keys.push_back(std::string(w) + "_per_" + std::string(per));
      return keys;
    }();
    for (auto it = o.begin(); it != o.end(); ++it) {
      const std::string& key = it.key();
      const std::string kp = child(p, key);
      size_t sep = key.find("_per_");
      RateLimit r;
      if (sep != std::string::npos) {
        r.what = key.substr(0, sep);
        r.period = key.substr(sep + 5);
      }
      bool known = std::find(std::begin(kWhat), std::end(kWhat), r.what) != std::end(kWhat) &&
                   std::find(std::begin(kPeriod), std::end(kPeriod), r.period) != std::end(kPeriod);
      if (!known) {
        std::vector<std::string_view> views(kKeys.begin(), kKeys.end());
        std::string s = suggest(key, views);
        std::string msg = "unknown key " + quote(key);
        if (!s.empty())
          msg += " (did you mean " + quote(s) + "?)";
        else
          msg +=
              " (expected <what>_per_<period>: what is messages, recipients or bytes; period is "
              "second, minute, hour, day or month)";
        v_.fail(kp, std::move(msg));
        continue;
      }
      r.key = key;
      if (v_.integer(it.value(), kp, 1, kU64Max, r.amount)) out.push_back(std::move(r));
    }
  }

  void readDkim(const Json& arr) {
    const std::string p = "dkim";
    if (!v_.array(arr, p)) return;
    std::map<std::pair<std::string, std::string>, size_t> seen;
    std::map<std::string, std::pair<std::string, size_t>> canonByDomain;
    for (size_t i = 0; i < arr.size(); ++i) {
      const std::string kp = item(p, i);
      const Json& o = arr[i];
      if (!v_.object(o, kp)) continue;
      v_.rejectUnknown(o, kp, {"domain", "selector", "algorithm", "private_key", "expiry", "canonicalization"});
      DkimKey k;
      bool domainOk = false;
      bool selectorOk = false;
      if (const Json* d = v_.require(o, kp, "domain")) {
        if (v_.string(*d, kp + ".domain", k.domain)) {
          std::string why = domainProblem(k.domain);
          if (why.empty()) {
            k.domain = util::toLower(k.domain);
            domainOk = true;
          } else {
            v_.fail(kp + ".domain", "expected a domain name, got " + describe(*d) + " (" + why + ")");
          }
        }
      }
      if (const Json* s = v_.require(o, kp, "selector")) {
        if (v_.string(*s, kp + ".selector", k.selector)) {
          // RFC 6376 3.1: a selector is a sub-domain, so "2026.eu" is as legal as "s2026".
          // The last-label-not-numeric rule of host names does not apply ("2026" is fine).
          std::string why = domainProblem(k.selector + ".x");
          if (why.empty()) {
            k.selector = util::toLower(k.selector);
            selectorOk = true;
          } else {
            v_.fail(kp + ".selector", "expected a DNS label such as \"s2026\", got " + describe(*s) + " (" + why + ")");
          }
        }
      }
      if (const Json* a = Validator::find(o, "algorithm"))
        v_.oneOf<std::string>(*a, kp + ".algorithm",
                              {{"rsa-sha256", "rsa-sha256"}, {"ed25519-sha256", "ed25519-sha256"}}, k.algorithm);
      if (const Json* f = v_.require(o, kp, "private_key")) v_.pathString(*f, kp + ".private_key", k.privateKey);
      if (const Json* x = Validator::find(o, "expiry")) {
        std::chrono::seconds e{0};
        if (v_.duration(*x, kp + ".expiry", e)) k.expiry = e;
      }
      if (const Json* c = Validator::find(o, "canonicalization")) {
        v_.oneOf<std::string>(*c, kp + ".canonicalization",
                              {{"relaxed/relaxed", "relaxed/relaxed"},
                               {"relaxed/simple", "relaxed/simple"},
                               {"simple/simple", "simple/simple"},
                               {"simple/relaxed", "simple/relaxed"}},
                              k.canonicalization);
      }
      if (domainOk && selectorOk) {
        auto [it, inserted] = seen.emplace(std::make_pair(k.domain, k.selector), i);
        if (!inserted)
          v_.fail(kp, "duplicate key for selector " + quote(k.selector) + " of domain " + quote(k.domain) +
                          " (also dkim[" + std::to_string(it->second) + "])");
      }
      if (domainOk) {
        // One signing call covers all keys of a domain (dual signing), so they share c=.
        auto [it, inserted] = canonByDomain.emplace(k.domain, std::make_pair(k.canonicalization, i));
        if (!inserted && it->second.first != k.canonicalization)
          v_.fail(kp + ".canonicalization", "every key of domain " + quote(k.domain) + " must use the same " +
                                                "canonicalization (dkim[" + std::to_string(it->second.second) +
                                                "] uses " + quote(it->second.first) + ")");
      }
      cfg_.dkim.push_back(std::move(k));
    }
  }

  void readDelivery(const Json& o) {
    const std::string p = "delivery";
    if (!v_.object(o, p)) return;
    v_.rejectUnknown(o, p,
                     {"resolvers", "port", "tls", "tls_policy_overrides", "retry_schedule", "max_queue_time",
                      "max_connections", "max_connections_per_domain", "delay_notice", "tls_ca_file",
                      "allow_private_destinations", "timeouts", "relay", "relay_overrides", "dnssec", "mta_sts",
                      "mta_sts_https_port", "tls_rpt"});
    Delivery& d = cfg_.delivery;
    if (const Json* x = Validator::find(o, "tls_rpt")) readTlsRpt(*x, p + ".tls_rpt", d.tlsRpt);
    if (const Json* x = Validator::find(o, "dnssec")) v_.boolean(*x, p + ".dnssec", d.dnssec);
    if (const Json* x = Validator::find(o, "mta_sts")) v_.boolean(*x, p + ".mta_sts", d.mtaSts);
    if (const Json* x = Validator::find(o, "mta_sts_https_port")) {
      uint64_t n = 0;
      if (v_.integer(*x, p + ".mta_sts_https_port", 1, 65535, n)) d.mtaStsHttpsPort = static_cast<uint16_t>(n);
    }
    if (const Json* x = Validator::find(o, "relay")) readRelayList(*x, p + ".relay", d.relay);
    if (const Json* x = Validator::find(o, "relay_overrides"))
      readRelayOverrides(*x, p + ".relay_overrides", d.relayOverrides);
    if (const Json* x = Validator::find(o, "timeouts")) readDeliveryTimeouts(*x, p + ".timeouts", d.timeouts);
    if (const Json* x = Validator::find(o, "allow_private_destinations"))
      v_.boolean(*x, p + ".allow_private_destinations", d.allowPrivateDestinations);
    if (const Json* r = Validator::find(o, "resolvers")) readResolvers(*r, p + ".resolvers", d.resolvers);
    if (const Json* x = Validator::find(o, "port")) {
      uint64_t n = 0;
      if (v_.integer(*x, p + ".port", 1, 65535, n)) d.port = static_cast<uint16_t>(n);
    }
    if (const Json* x = Validator::find(o, "tls")) readDeliveryTls(*x, p + ".tls", d.tls);
    if (const Json* x = Validator::find(o, "tls_policy_overrides"))
      readTlsOverrides(*x, p + ".tls_policy_overrides", d.tlsOverrides);
    if (const Json* x = Validator::find(o, "retry_schedule")) readRetrySchedule(*x, p + ".retry_schedule");
    if (const Json* x = Validator::find(o, "max_queue_time")) v_.duration(*x, p + ".max_queue_time", d.maxQueueTime);
    if (const Json* x = Validator::find(o, "max_connections")) v_.u32(*x, p + ".max_connections", d.maxConnections);
    if (const Json* x = Validator::find(o, "max_connections_per_domain"))
      v_.u32(*x, p + ".max_connections_per_domain", d.maxConnectionsPerDomain);
    if (const Json* x = Validator::find(o, "delay_notice")) v_.duration(*x, p + ".delay_notice", d.delayNotice);
    if (const Json* x = Validator::find(o, "tls_ca_file")) {
      if (!x->is_string() || x->get<std::string>().empty())
        v_.fail(p + ".tls_ca_file", "expected the path of a PEM file of trusted CA certificates");
      else
        d.tlsCaFile = x->get<std::string>();
    }
  }

  // RFC 8460 3: reports "MUST contain a valid DKIM signature by the reporting domain", so
  // the From domain needs a key here.
  void readTlsRpt(const Json& o, const std::string& p, TlsRpt& t) {
    if (!v_.object(o, p)) return;
    v_.rejectUnknown(o, p, {"enabled", "from", "organization", "contact", "max_delay"});
    t.enabled = true;
    if (const Json* x = Validator::find(o, "enabled")) v_.boolean(*x, p + ".enabled", t.enabled);
    auto address = [&](const Json& v, const std::string& path, std::string& out) {
      std::string a;
      if (!v_.string(v, path, a)) return false;
      const auto at = a.rfind('@');
      const bool ok = at != std::string::npos && at > 0 && at + 1 < a.size() &&
                      std::none_of(a.begin(), a.end(), [](unsigned char c) { return c <= ' ' || c == '<' || c == '>'; });
      if (!ok) {
        v_.fail(path, "expected an email address such as \"tlsrpt@relay.example.net\", got " + describe(v));
        return false;
      }
      out = a;
      return true;
    };
    if (const Json* x = v_.require(o, p, "from")) {
      if (address(*x, p + ".from", t.from) && t.enabled) {
        const std::string domain = util::toLower(t.from.substr(t.from.rfind('@') + 1));
        const bool keyed = std::any_of(cfg_.dkim.begin(), cfg_.dkim.end(),
                                       [&](const DkimKey& k) { return util::toLower(k.domain) == domain; });
        if (!keyed)
          v_.fail(p + ".from", "no dkim key for " + quote(domain) +
                                   ": TLS reports must be DKIM-signed by the reporting domain (RFC 8460 3); add a "
                                   "dkim entry for it or use an address of a signed domain");
      }
    }
    if (const Json* x = Validator::find(o, "contact")) address(*x, p + ".contact", t.contact);
    if (const Json* x = Validator::find(o, "organization")) v_.string(*x, p + ".organization", t.organization);
    if (const Json* x = Validator::find(o, "max_delay")) v_.duration(*x, p + ".max_delay", t.maxDelay);
  }

  void readDeliveryTimeouts(const Json& o, const std::string& p, Delivery::Timeouts& t) {
    if (!v_.object(o, p)) return;
    v_.rejectUnknown(o, p, {"connect", "greeting", "command", "data_init", "data_end", "transaction"});
    const std::pair<const char*, std::chrono::seconds*> keys[] = {
        {"connect", &t.connect},     {"greeting", &t.greeting}, {"command", &t.command},
        {"data_init", &t.dataInit},  {"data_end", &t.dataEnd},  {"transaction", &t.transaction}};
    for (const auto& [name, field] : keys) {
      const Json* x = Validator::find(o, name);
      if (x == nullptr) continue;
      std::chrono::seconds v{};
      if (!v_.duration(*x, p + "." + name, v)) continue;
      if (v.count() < 1) {
        v_.fail(p + "." + name, "expected a duration of at least 1s, got " + describe(*x));
        continue;
      }
      *field = v;
    }
  }

  void readLog(const Json& o, bool oldKey) {
    const std::string p = "log";
    if (!v_.object(o, p)) return;
    v_.rejectUnknown(o, p, {"format", "level"});
    if (const Json* f = Validator::find(o, "format"))
      v_.oneOf<std::string>(*f, p + ".format", {{"text", "text"}, {"json", "json"}}, cfg_.log.format);
    if (const Json* l = Validator::find(o, "level")) {
      if (oldKey) {
        v_.fail(p + ".level", "expected only one of log.level and log_level (the older name); remove log_level");
        return;
      }
      v_.oneOf<std::string>(*l, p + ".level",
                            {{"debug", "debug"}, {"info", "info"}, {"warn", "warn"}, {"error", "error"}},
                            cfg_.log.level);
    }
  }

  void readMetrics(const Json& o) {
    const std::string p = "metrics";
    if (!v_.object(o, p)) return;
    v_.rejectUnknown(o, p, {"address"});
    const Json* a = v_.require(o, p, "address");
    if (!a || !v_.string(*a, p + ".address", cfg_.metrics.address)) return;
    HostPort hp;
    std::string why = splitHostPort(cfg_.metrics.address, false, hp);
    if (why.empty() && !hp.ipv6 && !isIpv4(hp.host) && !isLocalhostName(hp.host))
      why = "the metrics listener binds to an IP address (or localhost), not a host name";
    if (why.empty() && hp.port == 0) why = "port 0 would pick a random port nobody can scrape";
    if (!why.empty()) {
      v_.fail(p + ".address", "expected an address such as \"127.0.0.1:9587\" or \"[::1]:9587\", got " +
                                  describe(*a) + " (" + why + ")");
      cfg_.metrics.address.clear();
      return;
    }
    cfg_.metrics.host = hp.host;
    cfg_.metrics.port = hp.port;
  }

  void readRetention(const Json& o) {
    const std::string p = "retention";
    if (!v_.object(o, p)) return;
    v_.rejectUnknown(o, p, {"finished_bodies", "history", "captured"});
    Retention& r = cfg_.retention;
    const Json* bodies = Validator::find(o, "finished_bodies");
    const Json* history = Validator::find(o, "history");
    const bool bodiesOk = bodies && v_.durationOrZero(*bodies, p + ".finished_bodies", r.finishedBodies);
    const bool historyOk = !history || v_.duration(*history, p + ".history", r.history);
    if (const Json* x = Validator::find(o, "captured")) v_.duration(*x, p + ".captured", r.captured);
    // A body goes with its message's history: keeping it longer cannot happen.
    if (bodiesOk && historyOk && r.finishedBodies > r.history)
      v_.fail(p + ".finished_bodies", "expected a duration not longer than retention.history (" +
                                          (history ? describe(*history) : std::string("\"30d\"")) + "), got " +
                                          describe(*bodies) + " (a message's body is deleted with its history)");
  }

  void readSuppression(const Json& o) {
    const std::string p = "suppression";
    if (!v_.object(o, p)) return;
    v_.rejectUnknown(o, p, {"ttl"});
    if (const Json* t = Validator::find(o, "ttl")) {
      std::chrono::seconds ttl{0};
      if (v_.duration(*t, p + ".ttl", ttl)) {
        if (ttl.count() <= 0)
          v_.fail(p + ".ttl", "expected a duration above zero such as \"90d\" (leave the key out to keep "
                              "entries forever), got " + describe(*t));
        else
          cfg_.suppression.ttl = ttl;
      }
    }
  }

  void readIdempotency(const Json& o) {
    const std::string p = "idempotency";
    if (!v_.object(o, p)) return;
    v_.rejectUnknown(o, p, {"header", "window"});
    Idempotency& i = cfg_.idempotency;
    if (const Json* h = Validator::find(o, "header")) {
      std::string name;
      if (v_.string(*h, p + ".header", name)) {
        // RFC 5322 3.6.8: field-name = 1*ftext, ftext = %d33-57 / %d59-126 (no ':').
        bool ok = name.size() <= 76;  // and short enough for one line with a value
        for (char c : name) ok = ok && c >= 33 && c <= 126 && c != ':';
        if (ok)
          i.header = name;
        else
          v_.fail(p + ".header", "expected a header field name such as \"Idempotency-Key\" (printable ASCII "
                                 "without spaces or ':', RFC 5322 3.6.8, at most 76 characters), got " +
                                     describe(*h));
      }
    }
    if (const Json* w = Validator::find(o, "window")) {
      std::chrono::seconds window{0};
      if (v_.duration(*w, p + ".window", window)) {
        if (window > kMaxIdempotencyWindow)
          v_.fail(p + ".window", "expected a duration of at most \"30d\", got " + describe(*w));
        else
          i.window = window;
      }
    }
  }

  bool readDeliveryTls(const Json& v, const std::string& p, DeliveryTls& out) {
    return v_.oneOf<DeliveryTls>(v, p,
                                 {{"opportunistic", DeliveryTls::Opportunistic},
                                  {"required", DeliveryTls::Required},
                                  {"verify", DeliveryTls::Verify}},
                                 out);
  }

  // Resolvers are reached before any name can be resolved, so they must be IP addresses.
  // Stored normalised as "host:port" ("[v6]:port"), the form parseHostPort() reads back.
  void readResolvers(const Json& arr, const std::string& p, std::vector<std::string>& out) {
    if (!v_.array(arr, p)) return;
    if (arr.empty()) {
      v_.fail(p, "expected at least one resolver (leave the key out to use /etc/resolv.conf)");
      return;
    }
    for (size_t i = 0; i < arr.size(); ++i) {
      const std::string rp = item(p, i);
      std::string s;
      if (!v_.string(arr[i], rp, s)) continue;
      HostPort hp;
      std::string why = splitHostPort(s, true, hp);
      if (why.empty() && !hp.ipv6 && !isIpv4(hp.host)) why = "a resolver must be an IP address";
      if (why.empty() && hp.hasPort && hp.port == 0) why = "port 0 is not a port a resolver listens on";
      if (!why.empty()) {
        v_.fail(rp, "expected \"IP\" or \"IP:PORT\" such as \"127.0.0.1:53\" or \"[::1]:53\", got " + describe(arr[i]) +
                        " (" + why + ")");
        continue;
      }
      uint16_t port = hp.hasPort ? hp.port : 53;
      out.push_back((hp.ipv6 ? "[" + hp.host + "]" : hp.host) + ":" + std::to_string(port));
    }
  }

  // An object keyed by recipient domain (tls_policy_overrides, relay_overrides): each key
  // must be a host name, listed once whatever its case. fn(domain lower-cased, its path,
  // its value) for each good key.
  template <typename Fn>
  void forEachDomainKey(const Json& o, const std::string& p, Fn fn) {
    if (!v_.object(o, p)) return;
    std::map<std::string, std::string> seen;  // lower-cased domain -> key as written
    for (auto it = o.begin(); it != o.end(); ++it) {
      const std::string& key = it.key();
      const std::string kp = child(p, key);
      std::string why = domainProblem(key);
      if (!why.empty()) {
        v_.fail(kp, "expected a domain name as the key, got " + quote(key) + " (" + why + ")");
        continue;
      }
      std::string domain = util::toLower(key);
      auto [prev, inserted] = seen.emplace(domain, key);
      if (!inserted) {
        v_.fail(kp, "domain " + quote(key) + " is also listed as " + quote(prev->second) +
                        " (domain names are case-insensitive)");
        continue;
      }
      fn(std::move(domain), kp, it.value());
    }
  }

  void readTlsOverrides(const Json& o, const std::string& p, std::vector<DomainTlsOverride>& out) {
    forEachDomainKey(o, p, [&](std::string domain, const std::string& kp, const Json& v) {
      DomainTlsOverride ov;
      ov.domain = std::move(domain);
      if (readDeliveryTls(v, kp, ov.tls)) out.push_back(std::move(ov));
    });
  }

  // ---- smarthosts ----------------------------------------------------------------------

  // delivery.relay, accounts[].relay, delivery.relay_overrides["d"]: a non-empty list of
  // upstreams. Each entry's jsonPath is kept for log lines.
  void readRelayList(const Json& arr, const std::string& p, std::vector<RelayUpstream>& out) {
    if (!arr.is_array()) {
      v_.fail(p, "expected a list of upstreams {host, port, tls, verify, username, password_file}, got " +
                     describe(arr));
      return;
    }
    if (arr.empty()) {
      v_.fail(p, "expected at least one upstream (remove the key for direct MX delivery)");
      return;
    }
    std::map<std::string, size_t> seen;  // canonical host:port -> index
    for (size_t i = 0; i < arr.size(); ++i) {
      const std::string ip = item(p, i);
      RelayUpstream r;
      if (!readRelay(arr[i], ip, r)) continue;
      auto [it, inserted] = seen.emplace(canonicalAddress(r.host, r.port), i);
      if (!inserted) {
        v_.fail(ip, "duplicate upstream " + quote(r.host + ":" + std::to_string(r.port)) + " (also " +
                        item(p, it->second) + ")");
        continue;
      }
      out.push_back(std::move(r));
    }
  }

  // True when the entry is complete and valid.
  bool readRelay(const Json& o, const std::string& p, RelayUpstream& r) {
    if (!v_.object(o, p)) return false;
    const size_t before = errorCount();
    v_.rejectUnknown(o, p, {"host", "port", "tls", "verify", "username", "password_file"});
    r.jsonPath = p;
    if (const Json* h = v_.require(o, p, "host")) {
      std::string host;
      if (v_.string(*h, p + ".host", host)) {
        if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
        std::string why;
        if (isIpv4(host) || isIpv6(host)) {
          r.host = host;
        } else if (isLocalhostName(host)) {
          r.host = "localhost";
        } else {
          std::string idnaWhy;
          std::optional<std::string> ascii = idna::toAscii(host, &idnaWhy);
          if (!ascii)
            why = "not a valid internationalized domain name (IDNA2008): " + idnaWhy;
          else if (why = domainProblem(*ascii); why.empty())
            r.host = util::toLower(*ascii);
        }
        if (!why.empty())
          v_.fail(p + ".host", "expected a host name or IP address such as \"smtp.provider.example\" or "
                               "\"10.0.0.5\", got " + describe(*h) + " (" + why + ")");
      }
    }
    if (const Json* t = Validator::find(o, "tls")) {
      if (t->is_string() && t->get_ref<const std::string&>() == "none")
        v_.fail(p + ".tls", "a relay is always reached over TLS: expected \"starttls\" or \"implicit\"");
      else
        v_.oneOf<RelayTls>(*t, p + ".tls", {{"starttls", RelayTls::StartTls}, {"implicit", RelayTls::Implicit}},
                           r.tls);
    }
    // RFC 8314 3.3 / 7.3: 465 is submission over implicit TLS, 587 submission with STARTTLS.
    r.port = r.tls == RelayTls::Implicit ? 465 : 587;
    if (const Json* x = Validator::find(o, "port")) {
      uint64_t n = 0;
      if (v_.integer(*x, p + ".port", 1, 65535, n)) r.port = static_cast<uint16_t>(n);
    }
    if (const Json* v = Validator::find(o, "verify")) v_.boolean(*v, p + ".verify", r.verify);
    const Json* user = Validator::find(o, "username");
    const Json* pwFile = Validator::find(o, "password_file");
    if (user && v_.string(*user, p + ".username", r.username)) {
      // RFC 4616 2: the PLAIN message separates its parts with NUL; controls cannot be typed
      // into an upstream's account settings anyway and would break log lines.
      if (r.username.size() > 255 ||
          std::any_of(r.username.begin(), r.username.end(),
                      [](char c) { return static_cast<unsigned char>(c) < 0x20 || c == 0x7f; }))
        v_.fail(p + ".username", "expected a user name of at most 255 octets without control characters");
    }
    if (pwFile) v_.pathString(*pwFile, p + ".password_file", r.passwordFile);
    if (user && !pwFile) v_.fail(p + ".password_file", "required with username (a file holding the password)");
    if (pwFile && !user) v_.fail(p + ".username", "required with password_file");
    if (user && !r.verify)
      v_.fail(p + ".verify", "AUTH is sent only over verified TLS: set verify to true (delivery.tls_ca_file for a "
                             "private CA) or remove username and password_file");
    return errorCount() == before && !r.host.empty();
  }

  void readRelayOverrides(const Json& o, const std::string& p, std::vector<RelayOverride>& out) {
    forEachDomainKey(o, p, [&](std::string domain, const std::string& kp, const Json& v) {
      RelayOverride ov;
      ov.domain = std::move(domain);
      if (v.is_string()) {
        if (v.get_ref<const std::string&>() != "direct") {
          v_.fail(kp, "expected \"direct\" or a list of upstreams, got " + describe(v));
          return;
        }
        ov.direct = true;
      } else {
        readRelayList(v, kp, ov.relay);
        if (ov.relay.empty()) return;
      }
      out.push_back(std::move(ov));
    });
  }

  // A relay on a loopback or wildcard address at one of our own listener ports would hand
  // every message back to this server, which would queue it again.
  void checkRelayLoops() {
    auto check = [&](const std::vector<RelayUpstream>& list) {
      for (const RelayUpstream& r : list) {
        bool local = isLoopbackHost(r.host) || r.host == "0.0.0.0" || r.host == "::";
        if (!local) continue;
        for (size_t k = 0; k < cfg_.listeners.size(); ++k) {
          if (cfg_.listeners[k].port == r.port)
            v_.fail(r.jsonPath, "would deliver to this server itself (listeners[" + std::to_string(k) +
                                    "] listens on port " + std::to_string(r.port) + ")");
        }
      }
    };
    check(cfg_.delivery.relay);
    for (const Account& a : cfg_.accounts) check(a.relay);
    for (const RelayOverride& o : cfg_.delivery.relayOverrides) check(o.relay);
  }

  size_t errorCount() const { return errors_.size(); }

  void readRetrySchedule(const Json& arr, const std::string& p) {
    if (!v_.array(arr, p)) return;
    if (arr.empty()) {
      v_.fail(p, "expected at least one duration, e.g. [\"5m\", \"1h\"] (leave the key out for the default)");
      return;
    }
    std::vector<std::chrono::seconds> schedule;
    for (size_t i = 0; i < arr.size(); ++i) {
      std::chrono::seconds s{0};
      if (v_.duration(arr[i], item(p, i), s)) schedule.push_back(s);
    }
    cfg_.delivery.retrySchedule = std::move(schedule);
  }

  Validator v_;
  Config& cfg_;
  std::vector<ConfigError>& errors_;
  std::vector<bool> tlsKnown_;  // per listener, see readListener()
};

// ---- JSON syntax -----------------------------------------------------------------------

// Tracks where the parser is, so a key given twice in one object can be reported with its
// path: nlohmann keeps the last value silently, which is the "typo disables a limit" trap
// README.md forbids in another form.
//
// Frames hold no paths (a path per level would cost O(depth^2) on a hostile, deeply nested
// document); the path of the innermost frame is rebuilt from the parents' current slots
// when a duplicate is found. Nothing in a valid config is nested deeper than 4 levels, so
// levels past kMaxDepth are only counted: whatever sits there is refused by validation anyway.
class DuplicateKeyFinder {
 public:
  explicit DuplicateKeyFinder(std::vector<ConfigError>& errors) : errors_(errors) {}

  bool onEvent(Json::parse_event_t event, const Json& parsed) {
    switch (event) {
      case Json::parse_event_t::object_start:
      case Json::parse_event_t::array_start:
        if (frames_.size() < kMaxDepth && beyond_ == 0)
          frames_.push_back(Frame{event == Json::parse_event_t::array_start, 0, {}, {}});
        else
          ++beyond_;
        break;
      case Json::parse_event_t::key:
        if (beyond_ == 0 && !frames_.empty() && parsed.is_string()) {
          Frame& f = frames_.back();
          f.key = parsed.get_ref<const std::string&>();
          if (!f.seen.insert(f.key).second && reported_ < kMaxReported) {
            ++reported_;
            errors_.push_back(ConfigError{
                path(), "duplicate key " + quote(f.key) + " (only one value would be used; remove the other)"});
          }
        }
        break;
      case Json::parse_event_t::object_end:
      case Json::parse_event_t::array_end:
        if (beyond_ > 0) {
          --beyond_;
          break;
        }
        if (!frames_.empty()) frames_.pop_back();
        advance();
        break;
      case Json::parse_event_t::value:
        if (beyond_ == 0) advance();
        break;
    }
    return true;  // keep everything
  }

 private:
  static constexpr size_t kMaxDepth = 64;
  static constexpr size_t kMaxReported = 100;

  struct Frame {
    bool isArray = false;
    size_t next = 0;  // index of the next array element
    std::string key;  // current key of an object
    std::set<std::string> seen;
  };

  // The path of the current slot of the innermost frame.
  std::string path() const {
    std::string p;
    for (const Frame& f : frames_) p = f.isArray ? item(p, f.next) : child(p, f.key);
    return p;
  }

  void advance() {
    if (!frames_.empty() && frames_.back().isArray) ++frames_.back().next;
  }

  std::vector<ConfigError>& errors_;
  std::vector<Frame> frames_;
  size_t beyond_ = 0;    // open containers deeper than kMaxDepth
  size_t reported_ = 0;  // enough to fix a file; a hostile one gets no more
};

uint64_t numberAfter(const std::string& s, std::string_view marker) {
  size_t at = s.find(marker);
  if (at == std::string::npos) return 0;
  uint64_t n = 0;
  for (size_t i = at + marker.size(); i < s.size() && s[i] >= '0' && s[i] <= '9' && n < kU32Max; ++i)
    n = n * 10 + static_cast<uint64_t>(s[i] - '0');
  return n;
}

// nlohmann's what() is "[json.exception.parse_error.101] parse error at line 3, column 5:
// syntax error ...": keep the part after the position, which says what was expected.
std::string reasonOf(const std::string& what) {
  size_t start = 0;
  size_t pe = what.find("parse error");
  if (pe != std::string::npos) {
    size_t colon = what.find(": ", pe);
    start = colon == std::string::npos ? pe : colon + 2;
  } else if (what.rfind("[json.exception.", 0) == 0) {
    size_t close = what.find("] ");
    start = close == std::string::npos ? 0 : close + 2;
  }
  // "last read: '...'" quotes input bytes; they may be anything.
  return util::sanitizeForLog(std::string_view(what).substr(start), 300);
}

void parseInto(std::string_view text, LoadResult& result) {
  std::vector<ConfigError> duplicates;
  DuplicateKeyFinder finder(duplicates);
  Json root;
  try {
    root = Json::parse(
        text.begin(), text.end(),
        [&finder](int /*depth*/, Json::parse_event_t event, Json& parsed) { return finder.onEvent(event, parsed); },
        /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const Json::parse_error& e) {
    ConfigError err;
    err.line = numberAfter(e.what(), "at line ");
    err.column = numberAfter(e.what(), ", column ");
    err.byte = e.byte;
    err.message = "invalid JSON";
    if (err.line != 0) err.message += " at line " + std::to_string(err.line) + ", column " + std::to_string(err.column);
    err.message += " (byte " + std::to_string(err.byte) + "): " + reasonOf(e.what());
    result.errors.push_back(std::move(err));
    return;
  } catch (const Json::exception& e) {
    // E.g. out_of_range.406, a number too large for a double ("1e400").
    result.errors.push_back(ConfigError{"", "invalid JSON: " + reasonOf(e.what())});
    return;
  }
  Config cfg;
  result.errors = std::move(duplicates);
  ConfigReader(result.errors, cfg).read(root);
  if (result.errors.empty()) result.config = std::move(cfg);
}

// Reads a whole (small) file. "" on success, else the reason.
std::string readFile(const std::string& path, std::string& out) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) return std::strerror(errno);
  std::string why;
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    why = std::strerror(errno);
  } else if (S_ISDIR(st.st_mode)) {
    why = "it is a directory";
  } else if (S_ISREG(st.st_mode) && st.st_size > kMaxConfigFileBytes) {
    why = "larger than 16 MiB: is this the right file?";
  } else {
    char buf[65536];
    while (true) {
      ssize_t n = ::read(fd, buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        why = std::strerror(errno);
        break;
      }
      if (n == 0) break;
      out.append(buf, static_cast<size_t>(n));
      if (out.size() > static_cast<size_t>(kMaxConfigFileBytes)) {
        why = "larger than 16 MiB: is this the right file?";
        break;
      }
    }
  }
  ::close(fd);
  return why;
}

// "" when path names a readable regular file.
std::string fileProblem(const std::string& path) {
  // O_NONBLOCK: a FIFO put where a key should be must not hang check-config.
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  if (fd < 0) return std::strerror(errno);
  struct stat st {};
  std::string why;
  if (::fstat(fd, &st) != 0)
    why = std::strerror(errno);
  else if (!S_ISREG(st.st_mode))
    why = "not a regular file";
  ::close(fd);
  return why;
}

// Reads a relay password file. "" on success, else why not. The rules keep a password out
// of places an operator would not expect: not world-readable, no trailing garbage.
std::string readSecretFile(const std::string& path, std::string& out) {
  out.clear();
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  if (fd < 0) return std::strerror(errno);
  struct stat st {};
  std::string why;
  char buf[kMaxSecretBytes + 2];
  size_t len = 0;
  if (::fstat(fd, &st) != 0) {
    why = std::strerror(errno);
  } else if (!S_ISREG(st.st_mode)) {
    why = "not a regular file";
  } else if ((st.st_mode & (S_IRWXO | S_IWGRP)) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    why = std::string("readable or writable by other users (mode ") + mode +
          "): chmod 600, or 640 with the group subrelay runs as";
  } else if (st.st_size > static_cast<off_t>(kMaxSecretBytes)) {
    why = "larger than 1 KiB: is this the right file?";
  } else {
    while (len < sizeof buf) {
      ssize_t n = ::read(fd, buf + len, sizeof buf - len);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        why = std::strerror(errno);
        break;
      }
      if (n == 0) break;
      len += static_cast<size_t>(n);
    }
    if (why.empty() && len > kMaxSecretBytes) why = "larger than 1 KiB: is this the right file?";
  }
  ::close(fd);
  if (why.empty()) {
    std::string_view v(buf, len);
    if (v.size() >= 2 && v.substr(v.size() - 2) == "\r\n")
      v.remove_suffix(2);
    else if (!v.empty() && v.back() == '\n')
      v.remove_suffix(1);
    if (v.empty())
      why = "is empty";
    else if (v.find_first_of(std::string_view("\r\n\0", 3)) != std::string_view::npos)
      why = "has more than one line (the whole first line is the password; remove the rest)";
    else
      out.assign(v);
  }
  ::explicit_bzero(buf, sizeof buf);
  return why;
}

}  // namespace

std::vector<std::chrono::seconds> defaultRetrySchedule() {
  using std::chrono::hours;
  using std::chrono::minutes;
  return {minutes(5), minutes(10), minutes(20), minutes(40), hours(1), hours(2), hours(4), hours(8)};
}

bool isValidDomainName(std::string_view name) { return domainProblem(name).empty(); }

std::string_view jsonName(ListenerTls tls) {
  switch (tls) {
    case ListenerTls::StartTls:
      return "starttls";
    case ListenerTls::Implicit:
      return "implicit";
    case ListenerTls::None:
      return "none";
  }
  return "?";
}

std::string_view jsonName(AccountMode mode) {
  switch (mode) {
    case AccountMode::Deliver:
      return "deliver";
    case AccountMode::Capture:
      return "capture";
  }
  return "?";
}

std::string_view jsonName(DeliveryTls tls) {
  switch (tls) {
    case DeliveryTls::Opportunistic:
      return "opportunistic";
    case DeliveryTls::Required:
      return "required";
    case DeliveryTls::Verify:
      return "verify";
  }
  return "?";
}

std::string_view jsonName(RelayTls tls) { return tls == RelayTls::Implicit ? "implicit" : "starttls"; }

bool parseHostPort(std::string_view s, std::string& host, uint16_t& port) {
  HostPort hp;
  if (!splitHostPort(s, false, hp).empty()) return false;
  host = hp.host;
  port = hp.port;
  return true;
}

bool isLoopbackHost(std::string_view host) {
  if (isLocalhostName(host)) return true;
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  if (host.size() > 64 || host.find('\0') != std::string_view::npos) return false;
  std::string z(host);
  in_addr a4{};
  if (::inet_pton(AF_INET, z.c_str(), &a4) == 1)
    return (ntohl(a4.s_addr) >> 24) == 127;  // 127.0.0.0/8 (RFC 1122 3.2.1.3)
  in6_addr a6{};
  if (::inet_pton(AF_INET6, z.c_str(), &a6) == 1) {
    if (IN6_IS_ADDR_LOOPBACK(&a6)) return true;
    // ::ffff:127.x.y.z reaches the IPv4 loopback through a dual-stack socket.
    return IN6_IS_ADDR_V4MAPPED(&a6) && a6.s6_addr[12] == 127;
  }
  return false;
}

std::vector<std::string> LoadResult::formatErrors() const {
  std::vector<std::string> lines;
  lines.reserve(errors.size());
  for (const auto& e : errors) {
    std::string line = fileName + ": ";
    if (!e.path.empty()) line += e.path + ": ";
    line += e.message;
    lines.push_back(std::move(line));
  }
  return lines;
}

LoadResult parseConfig(std::string_view jsonText, std::string_view fileName) {
  LoadResult result;
  try {
    result.fileName = std::string(fileName);
    parseInto(jsonText, result);
    if (result.config) result.config->sourcePath = result.fileName;
  } catch (const std::exception& e) {
    // Only std::bad_alloc is expected here; whatever it is, it must not escape.
    result.config.reset();
    result.errors.push_back(ConfigError{"", std::string("could not read the configuration: ") + e.what()});
  }
  return result;
}

LoadResult loadConfigFile(const std::string& path) {
  std::string text;
  std::string why = readFile(path, text);
  if (!why.empty()) {
    LoadResult r;
    r.fileName = path;
    r.errors.push_back(ConfigError{"", "cannot read the configuration file: " + why});
    return r;
  }
  LoadResult r = parseConfig(text, path);
  if (r.config) {
    r.errors = checkFiles(*r.config);
    if (r.errors.empty()) r.errors = loadSecrets(*r.config);
    if (!r.errors.empty()) r.config.reset();
  }
  return r;
}

std::vector<std::chrono::seconds> defaultWebhookRetrySchedule() {
  using std::chrono::seconds;
  return {seconds(30), seconds(60), seconds(300), seconds(900), seconds(3600)};
}

std::vector<ConfigError> loadSecrets(Config& config) {
  std::vector<ConfigError> errors;
  auto load = [&errors](std::vector<RelayUpstream>& list) {
    for (RelayUpstream& r : list) {
      if (r.passwordFile.empty()) continue;
      std::string why = readSecretFile(r.passwordFile, r.password);
      if (!why.empty())
        errors.push_back(ConfigError{r.jsonPath + ".password_file", "cannot read " + quote(r.passwordFile, 200) + ": " + why});
    }
  };
  load(config.delivery.relay);
  for (Account& a : config.accounts) load(a.relay);
  for (RelayOverride& o : config.delivery.relayOverrides) load(o.relay);
  for (Account& a : config.accounts) {
    if (!a.webhook) continue;
    Webhook& w = *a.webhook;
    std::string why = readSecretFile(w.secretFile, w.secret);
    if (why.empty() && w.secret.empty()) why = "the file is empty";
    if (!why.empty())
      errors.push_back(ConfigError{w.jsonPath + ".secret_file", "cannot read " + quote(w.secretFile, 200) + ": " + why});
  }
  return errors;
}

std::vector<ConfigError> checkFiles(const Config& config) {
  std::vector<ConfigError> errors;
  auto check = [&errors](const std::string& jsonPath, const std::string& file) {
    if (file.empty()) return;
    std::string why = fileProblem(file);
    if (!why.empty()) errors.push_back(ConfigError{jsonPath, "cannot read " + quote(file, 200) + ": " + why});
  };
  check("tls.certificate", config.tls.certificate);
  check("tls.private_key", config.tls.privateKey);
  for (size_t i = 0; i < config.dkim.size(); ++i) check(item("dkim", i) + ".private_key", config.dkim[i].privateKey);
  check("delivery.tls_ca_file", config.delivery.tlsCaFile);
  check("webhooks.ca_file", config.webhooks.caFile);
  if (!config.dataDir.empty()) {
    struct stat st {};
    // A missing data_dir is created by serve; something else in its place is an error.
    if (::stat(config.dataDir.c_str(), &st) == 0 && !S_ISDIR(st.st_mode))
      errors.push_back(ConfigError{"data_dir", quote(config.dataDir, 200) + " exists and is not a directory"});
  }
  return errors;
}

}  // namespace subrelay::config
