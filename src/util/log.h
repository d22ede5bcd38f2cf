// Logging: one line per event to stderr, "LEVEL component: message key=value ...".
// Thread-safe (one write(2) per line). No secret ever goes into a log line.
#pragma once

#include <string_view>

namespace subrelay::util {

enum class LogLevel { Debug = 0, Info = 1, Warn = 2, Error = 3 };

void setLogLevel(LogLevel level);
LogLevel logLevel();
void logLine(LogLevel level, std::string_view component, std::string_view message);

inline void logDebug(std::string_view c, std::string_view m) { if (logLevel() <= LogLevel::Debug) logLine(LogLevel::Debug, c, m); }
inline void logInfo(std::string_view c, std::string_view m) { logLine(LogLevel::Info, c, m); }
inline void logWarn(std::string_view c, std::string_view m) { logLine(LogLevel::Warn, c, m); }
inline void logError(std::string_view c, std::string_view m) { logLine(LogLevel::Error, c, m); }

}  // namespace subrelay::util
