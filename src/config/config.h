// config: JSON file -> validated plain structs (README.md, "Configuration").
//
// Every error names the file, the JSON path (e.g. accounts[0].rate_limits.messages_per_day)
// and what was expected; unknown keys are errors (a typo in a limit must not disable it).
// This is the only module that includes nlohmann/json.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace subrelay::config {

enum class ListenerTls { StartTls, Implicit, None };
enum class AccountMode { Deliver, Capture };
enum class DeliveryTls { Opportunistic, Required, Verify };

struct Listener {
  std::string address;  // as written: "[::]:587", "127.0.0.1:2587", "0.0.0.0:465"
  std::string host;     // "::", "127.0.0.1"
  uint16_t port = 0;
  ListenerTls tls = ListenerTls::StartTls;
};

struct TlsFiles {
  std::string certificate;  // PEM chain
  std::string privateKey;   // PEM key
};

struct Limits {
  uint64_t maxMessageBytes = 26214400;
  uint32_t maxRecipients = 100;
  uint32_t maxConnections = 2000;
  uint32_t maxConnectionsPerIp = 50;
  uint32_t maxBadCommands = 20;
  uint32_t maxAuthFailures = 3;
  std::chrono::seconds commandTimeout{300};          // RFC 5321 4.5.3.2.7: 5 minutes
  std::chrono::seconds dataTimeout{180};             // 4.5.3.2.5 data block: 3 minutes
  std::chrono::seconds shutdownGrace{30};            // SIGTERM: time for transactions in flight
  std::chrono::milliseconds authFailureDelay{1000};  // "0s" disables; "ms" unit allowed
  // Concurrent authenticated sessions of one account; 0 = no limit.
  uint32_t maxSessionsPerAccount = 100;
  // Brute-force defence (policy::AuthGuard): after authDelayAfter failures from an
  // address (or for a username) within authLockoutWindow, AUTH replies are delayed,
  // doubling from authDelayBase up to authDelayMax; after authLockoutAfter failures the
  // address is refused for authLockoutDuration (0 = never lock).
  uint32_t authDelayAfter = 3;
  std::chrono::milliseconds authDelayBase{1000};
  std::chrono::milliseconds authDelayMax{30000};
  uint32_t authLockoutAfter = 10;
  std::chrono::seconds authLockoutWindow{900};
  std::chrono::seconds authLockoutDuration{900};
  // The header section of a message (RFC 5322 2.1): octets, the empty line included,
  // and fields; beyond either, 552 5.3.4 at the end of data.
  uint64_t maxHeaderBytes = 1048576;
  uint32_t maxHeaderFields = 10000;
  // NOOP/RSET/HELP/VRFY/EHLO/HELO per session between accepted messages; 0 = no limit.
  uint32_t maxJunkCommands = 100;
};

// One rate limit: <what>_per_<period> = amount (issue 5 enforces them).
struct RateLimit {
  std::string key;     // as written, e.g. "messages_per_minute"
  std::string what;    // messages | recipients | bytes
  std::string period;  // second | minute | hour | day | month
  uint64_t amount = 0;
};

// One smarthost (delivery.relay[], accounts[].relay[]): an upstream SMTP server that takes
// our outbound mail, reached over TLS always, with AUTH when a username is given.
enum class RelayTls { StartTls, Implicit };

struct RelayUpstream {
  std::string host;  // IP literal (no brackets), "localhost" or a lower-case A-label name
  uint16_t port = 0; // default 587 for starttls, 465 for implicit (RFC 8314 3.3, 7.3)
  RelayTls tls = RelayTls::StartTls;
  bool verify = true;  // the certificate must be valid for host (delivery.tls_ca_file or the system store)
  std::string username;
  std::string passwordFile;
  // Read from passwordFile by loadConfigFile() (loadSecrets()); never printed or logged.
  std::string password;
  std::string jsonPath;  // "delivery.relay[0]", for log lines and hints
};

// delivery.relay_overrides: a recipient domain routed through its own upstreams, or
// "direct" (MX delivery even when a relay is configured).
struct RelayOverride {
  std::string domain;
  bool direct = false;
  std::vector<RelayUpstream> relay;
};

// accounts[].webhook: signed event POSTs (webhook/). `secret` is read from secretFile by
// loadSecrets() and never logged.
struct Webhook {
  std::string url;         // https://host[:port]/path
  std::string secretFile;
  std::string secret;
  std::vector<std::string> events;  // subset of kWebhookEventNames; default all
  std::string jsonPath;    // "accounts[0].webhook"
};
// The event types, in the order they happen.
inline constexpr const char* kWebhookEventNames[] = {"accepted", "delivered", "deferred", "bounced", "suppressed",
                                                      "expired"};

// webhooks: settings shared by every account's webhook.
struct Webhooks {
  std::string caFile;                              // "" = system trust store
  std::chrono::seconds timeout{10};                // per request
  std::vector<std::chrono::seconds> retrySchedule;  // default 30s 1m 5m 15m 1h (then 1h)
  std::chrono::seconds maxAge{3 * 24 * 3600};      // older undelivered events are dropped
  uint64_t maxBacklog = 100000;                    // per account; beyond it the oldest are dropped
};
std::vector<std::chrono::seconds> defaultWebhookRetrySchedule();

struct Account {
  std::string username;
  std::string passwordHash;
  std::vector<std::string> senders;  // "@domain" or "local@domain", lower-cased domain
  std::vector<RateLimit> rateLimits;
  AccountMode mode = AccountMode::Deliver;
  // MAIL FROM:<> (an MTA relaying its bounces through us); the header From is still
  // checked against senders.
  bool allowNullSender = false;
  // accounts[].relay: this tenant's upstreams; empty = delivery.relay (or direct MX).
  std::vector<RelayUpstream> relay;
  // accounts[].suppression: keep the account's suppression list (hard bounces are added)
  // and refuse RCPT to a listed address. false: nothing recorded, nothing refused.
  bool suppression = true;
  std::optional<Webhook> webhook;
};

struct DkimKey {
  std::string domain;
  std::string selector;
  std::string algorithm = "rsa-sha256";  // or ed25519-sha256
  std::string privateKey;                // path
  // dkim[].expiry: when set, signatures carry x= = t= + expiry (RFC 6376 3.5).
  std::optional<std::chrono::seconds> expiry;
  // dkim[].canonicalization: "header/body" c= value (RFC 6376 3.4, 3.5); every key of
  // one domain must use the same one.
  std::string canonicalization = "relaxed/relaxed";
};

struct DomainTlsOverride {
  std::string domain;
  DeliveryTls tls = DeliveryTls::Opportunistic;
};

// delivery.tls_rpt (extension): SMTP TLS Reporting (RFC 8460). Absent = no counting and no
// reports.
struct TlsRpt {
  bool enabled = false;
  std::string from;          // From: and envelope sender of the reports; its domain needs a dkim key
  std::string organization;  // organization-name; "" = hostname
  std::string contact;       // contact-info; "" = from
  // Reports of a day go out after 00:00 UTC plus a random delay of up to this (RFC 8460 4.1).
  std::chrono::seconds maxDelay{4 * 3600};
};

struct Delivery {
  std::vector<std::string> resolvers;  // "host:port"; empty = /etc/resolv.conf
  uint16_t port = 25;
  DeliveryTls tls = DeliveryTls::Opportunistic;
  std::vector<DomainTlsOverride> tlsOverrides;      // JSON: delivery.tls_policy_overrides
  std::vector<std::chrono::seconds> retrySchedule;  // default 5m..8h, see config.cpp
  std::chrono::seconds maxQueueTime{5 * 24 * 3600};
  uint32_t maxConnections = 200;
  uint32_t maxConnectionsPerDomain = 10;
  // delivery.delay_notice: a "delayed" DSN (RFC 3464 action=delayed) once a recipient has
  // waited this long; at or beyond max_queue_time there is none.
  std::chrono::seconds delayNotice{4 * 3600};
  // delivery.tls_ca_file: CA certificates for tls "verify"; "" = the system trust store.
  std::string tlsCaFile;
  // Delivery to loopback, private, link-local, CGNAT, multicast and this host's own
  // addresses, and address-literal recipients; off by default (delivery/destination.h).
  bool allowPrivateDestinations = false;
  // delivery.dnssec: trust the resolver's AD bit (RFC 4035 3.2.3: only a validating
  // resolver on a trusted path sets it); enables DANE for MX hosts (RFC 7672).
  bool dnssec = false;
  // delivery.mta_sts: fetch and enforce the recipient domains' MTA-STS policies (RFC 8461).
  bool mtaSts = true;
  // delivery.mta_sts_https_port (extension, for test beds): the port of the policy host
  // ("mta-sts.<domain>"); RFC 8461 3.3 fixes it to 443, the default.
  uint16_t mtaStsHttpsPort = 443;
  TlsRpt tlsRpt;
  // delivery.relay: smarthosts tried in order; empty = direct MX delivery.
  std::vector<RelayUpstream> relay;
  // delivery.relay_overrides (extension): per recipient domain, before accounts[].relay.
  std::vector<RelayOverride> relayOverrides;
  // delivery.timeouts: each a total for its stage (RFC 5321 4.5.3.2 defaults), not
  // re-armed by bytes that do not complete a reply; `transaction` bounds MAIL to the final
  // reply as a whole, `connect` the TCP connect.
  struct Timeouts {
    std::chrono::seconds connect{30};
    std::chrono::seconds greeting{300};
    std::chrono::seconds command{300};   // EHLO, STARTTLS, MAIL, RCPT, RSET, QUIT
    std::chrono::seconds dataInit{120};
    std::chrono::seconds dataEnd{600};
    std::chrono::seconds transaction{900};
  } timeouts;
};

// retention: how long finished and captured messages stay in the queue (queue::prune).
// A message is finished when every recipient is delivered or failed with no DSN pending.
struct Retention {
  // retention.finished_bodies: the message bytes of a finished message are removed this
  // long after it finished; 0 = as soon as it finishes. Its envelope and history stay.
  std::chrono::seconds finishedBodies{0};
  // retention.history: a finished message (envelope, recipient states, attempts) is
  // deleted this long after it finished. Not shorter than finishedBodies.
  std::chrono::seconds history{30 * 24 * 3600};
  // retention.captured: a captured message (bytes included) is deleted this long after
  // it was received.
  std::chrono::seconds captured{7 * 24 * 3600};
};

// idempotency: idempotent submission (issue 13). A message whose header field `header`
// carries a key the same account used within `window` is answered 250 with the first
// message's queue id and not stored again; the field is removed before storing.
struct Idempotency {
  std::string header = "Idempotency-Key";  // idempotency.header: a field name (RFC 5322 ftext)
  std::chrono::seconds window{24 * 3600};  // idempotency.window: > 0, at most 30 days
};
inline constexpr std::chrono::seconds kMaxIdempotencyWindow{30 * 24 * 3600};

// log: how events reach stderr. format "text" (one "LEVEL component: event k=v" line) or
// "json" (one object per line with stable field names, docs/operations.md).
struct Log {
  std::string format = "text";
  std::string level = "info";  // debug | info | warn | error
};

// metrics: the optional HTTP listener for /metrics, /healthz and /readyz.
struct Metrics {
  std::string address;  // "127.0.0.1:9587"; empty = off
  std::string host;     // parsed from address
  uint16_t port = 0;
};

// suppression (issue 13): how long an entry of an account's suppression list lasts;
// ttl 0 (the key absent) = forever.
struct Suppression {
  std::chrono::seconds ttl{0};
};

struct Config {
  std::string sourcePath;  // file it came from ("<embedded dev config>" for --dev)
  std::string hostname;
  std::string dataDir;
  TlsFiles tls;
  std::vector<Listener> listeners;
  Limits limits;
  std::vector<Account> accounts;
  std::vector<DkimKey> dkim;
  Delivery delivery;
  Retention retention;
  Idempotency idempotency;
  Suppression suppression;
  Webhooks webhooks;
  Log log;
  Metrics metrics;
  uint32_t workers = 0;  // event-loop threads; 0 = one per core
};

struct ConfigError {
  std::string path;     // JSON path, "" for the document itself
  std::string message;  // what was expected / what is wrong
  // Position of a JSON syntax error (1-based; 0 = not a syntax error / unknown).
  uint64_t line = 0;
  uint64_t column = 0;
  uint64_t byte = 0;
};

struct LoadResult {
  std::optional<Config> config;  // set when errors is empty
  std::vector<ConfigError> errors;
  std::string fileName;  // as given to parseConfig / loadConfigFile
  // "FILE: PATH: MESSAGE" lines, one per error ("FILE: MESSAGE" when the path is empty).
  std::vector<std::string> formatErrors() const;
};

// Parse and validate JSON text. fileName is used in messages only.
LoadResult parseConfig(std::string_view jsonText, std::string_view fileName);
// Read the file and parse it (a read error is one ConfigError with an empty path), then
// run checkFiles() on the result. The only function here that touches the filesystem
// besides checkFiles() itself.
LoadResult loadConfigFile(const std::string& path);
// The checks that need the filesystem: tls.certificate, tls.private_key and every
// dkim[].private_key must be readable regular files; data_dir, when it exists, must be a
// directory. Relative paths are taken relative to the current directory.
std::vector<ConfigError> checkFiles(const Config& config);
// Reads every relay password_file into RelayUpstream::password (loadConfigFile() runs it
// after checkFiles()). A file must be a regular file of at most 1 KiB, not readable or
// writable by others, holding one line; one trailing newline is dropped.
std::vector<ConfigError> loadSecrets(Config& config);

// 5m, 10m, 20m, 40m, 1h, 2h, 4h, 8h: used when delivery.retry_schedule is absent.
std::vector<std::chrono::seconds> defaultRetrySchedule();

// Syntax of a DNS host name (RFC 1123 2.1): labels of letters, digits and '-', 1..63
// octets each, 253 in all, no trailing dot, and not all-numeric in the last label (so an
// IPv4 address is not taken for a name). Case-insensitive.
bool isValidDomainName(std::string_view name);

// The JSON spelling of each enum value ("starttls", "capture", "verify", ...).
std::string_view jsonName(ListenerTls tls);
std::string_view jsonName(AccountMode mode);
std::string_view jsonName(DeliveryTls tls);
std::string_view jsonName(RelayTls tls);

// Parses an address like "[::]:587", "127.0.0.1:2587", "localhost:25". The port is
// required and may be 0..65535; the host is an IPv4 address, a bracketed IPv6 address
// (returned without the brackets) or a host name. A bare IPv6 address is refused (":"
// would be ambiguous).
bool parseHostPort(std::string_view s, std::string& host, uint16_t& port);
// True when host is a loopback address (127.0.0.0/8, ::1, "[::1]", "localhost"); not for
// the wildcard addresses 0.0.0.0 and ::.
bool isLoopbackHost(std::string_view host);

}  // namespace subrelay::config
