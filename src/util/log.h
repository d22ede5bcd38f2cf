// Logging: one line per event to stderr. Thread-safe (one write(2) per line). No secret
// ever goes into a log line.
//
// Two formats (log.format):
//   text  "TIME LEVEL component: event key=value ..."  (the default; what people grep)
//   json  one object per line: {"time","level","component","event", fields...}
// Message events (accepted, signed, deferred, delivered, bounced, expired, dropped, ...)
// are LogEvents with fixed field names, so they join on queue_id in either format; other
// lines are free text ("event":"log","message":...) in json.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace subrelay::util {

enum class LogLevel { Debug = 0, Info = 1, Warn = 2, Error = 3 };
enum class LogFormat { Text, Json };

void setLogLevel(LogLevel level);
LogLevel logLevel();
void setLogFormat(LogFormat format);
LogFormat logFormat();
// "debug" | "info" | "warn" | "warning" | "error"; anything else is Info.
LogLevel parseLogLevel(std::string_view s);

void logLine(LogLevel level, std::string_view component, std::string_view message);

inline void logDebug(std::string_view c, std::string_view m) { if (logLevel() <= LogLevel::Debug) logLine(LogLevel::Debug, c, m); }
inline void logInfo(std::string_view c, std::string_view m) { logLine(LogLevel::Info, c, m); }
inline void logWarn(std::string_view c, std::string_view m) { logLine(LogLevel::Warn, c, m); }
inline void logError(std::string_view c, std::string_view m) { logLine(LogLevel::Error, c, m); }

// A structured event. Each field has its text key (kept as the lines have always read)
// and its json key (stable names: queue_id, account, client, recipient, mx, tls, status,
// reply, ...). Values are sanitised here (control bytes, length), so callers pass raw
// strings. Emitted by emit(), once.
class LogEvent {
 public:
  enum class Style { Plain, Angle, Quoted };  // text form: v, <v>, "v"

  LogEvent(LogLevel level, std::string_view component, std::string_view event);

  LogEvent& field(std::string_view textKey, std::string_view jsonKey, std::string_view value,
                  Style style = Style::Plain, size_t max = 200);
  LogEvent& field(std::string_view key, std::string_view value) { return field(key, key, value); }
  LogEvent& number(std::string_view key, long long value);
  LogEvent& queueId(std::string_view id) { return field("id", "queue_id", id); }
  LogEvent& account(std::string_view a) { return field("account", "account", a, Style::Plain, 64); }
  LogEvent& client(std::string_view c) { return field("client", "client", c); }
  LogEvent& recipient(std::string_view r) { return field("rcpt", "recipient", r, Style::Angle); }
  LogEvent& mx(std::string_view m) { return field("mx", "mx", m.empty() ? "-" : m); }
  LogEvent& tls(std::string_view v) { return field("tls", "tls", v.empty() ? "none" : v); }
  LogEvent& status(std::string_view s) { return field("status", "status", s); }
  LogEvent& reply(std::string_view r) { return field("reply", "reply", r, Style::Quoted, 300); }

  void emit();

  // The rendered line without the trailing newline (for tests).
  std::string render(LogFormat format, std::string_view time) const;

 private:
  struct Field {
    std::string textKey, jsonKey, value;
    Style style;
    bool numeric;
  };
  LogLevel level_;
  std::string component_, event_;
  std::vector<Field> fields_;
};

}  // namespace subrelay::util
