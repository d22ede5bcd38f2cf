// config: JSON file -> validated plain structs (SPEC.md, "Configuration").
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
  std::chrono::seconds commandTimeout{300};      // RFC 5321 4.5.3.2.7: 5 minutes
  std::chrono::seconds dataTimeout{180};         // 4.5.3.2.5 data block: 3 minutes
  std::chrono::seconds shutdownGrace{30};        // SIGTERM: time for transactions in flight
  std::chrono::milliseconds authFailureDelay{1000};
};

// One rate limit: <what>_per_<period> = amount (issue 5 enforces them).
struct RateLimit {
  std::string key;     // as written, e.g. "messages_per_minute"
  std::string what;    // messages | recipients | bytes
  std::string period;  // second | minute | hour | day | month
  uint64_t amount = 0;
};

struct Account {
  std::string username;
  std::string passwordHash;
  std::vector<std::string> senders;  // "@domain" or "local@domain", lower-cased domain
  std::vector<RateLimit> rateLimits;
  AccountMode mode = AccountMode::Deliver;
};

struct DkimKey {
  std::string domain;
  std::string selector;
  std::string algorithm = "rsa-sha256";  // or ed25519-sha256
  std::string privateKey;                // path
};

struct DomainTlsOverride {
  std::string domain;
  DeliveryTls tls = DeliveryTls::Opportunistic;
};

struct Delivery {
  std::vector<std::string> resolvers;  // "host:port"; empty = /etc/resolv.conf
  uint16_t port = 25;
  DeliveryTls tls = DeliveryTls::Opportunistic;
  std::vector<DomainTlsOverride> tlsOverrides;
  std::vector<std::chrono::seconds> retrySchedule;  // default 5m..8h, see config.cpp
  std::chrono::seconds maxQueueTime{5 * 24 * 3600};
  uint32_t maxConnections = 200;
  uint32_t maxConnectionsPerDomain = 10;
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
  std::string logLevel = "info";
  uint32_t workers = 0;  // event-loop threads; 0 = one per core
};

struct ConfigError {
  std::string path;     // JSON path, "" for the document itself
  std::string message;  // what was expected / what is wrong
};

struct LoadResult {
  std::optional<Config> config;       // set when errors is empty
  std::vector<ConfigError> errors;
  // "FILE: PATH: MESSAGE" lines, one per error.
  std::vector<std::string> formatErrors() const;
};

// Parse and validate JSON text. fileName is used in messages only.
LoadResult parseConfig(std::string_view jsonText, std::string_view fileName);
// Read the file and parse it (a read error is one ConfigError with an empty path).
LoadResult loadConfigFile(const std::string& path);

// Parses an address like "[::]:587", "127.0.0.1:2587", "localhost:25".
bool parseHostPort(std::string_view s, std::string& host, uint16_t& port);
// True when host is a loopback address (127.0.0.0/8, ::1, "localhost").
bool isLoopbackHost(std::string_view host);

}  // namespace subrelay::config
