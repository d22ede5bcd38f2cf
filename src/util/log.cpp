#include "util/log.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <string>

#include "util/json_writer.h"
#include "util/strings.h"

namespace subrelay::util {
namespace {
std::atomic<int> gLevel{static_cast<int>(LogLevel::Info)};
std::atomic<int> gFormat{static_cast<int>(LogFormat::Text)};

const char* textLevelName(LogLevel l) {
  switch (l) {
    case LogLevel::Debug: return "debug";
    case LogLevel::Info: return "info";
    case LogLevel::Warn: return "warning";
    case LogLevel::Error: return "error";
  }
  return "info";
}

const char* jsonLevelName(LogLevel l) { return l == LogLevel::Warn ? "warn" : textLevelName(l); }

std::string timestamp() {
  auto now = std::chrono::system_clock::now();
  std::time_t t = std::chrono::system_clock::to_time_t(now);
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm tm{};
  gmtime_r(&t, &tm);
  char stamp[64];
  std::snprintf(stamp, sizeof stamp, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
                tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<int>(ms));
  return stamp;
}

// One write(2) per line keeps lines from different threads whole.
void writeLine(std::string& line) {
  line += '\n';
  const char* p = line.data();
  size_t left = line.size();
  while (left > 0) {
    ssize_t n = ::write(2, p, left);
    if (n <= 0) break;
    p += n;
    left -= static_cast<size_t>(n);
  }
}

}  // namespace

void setLogLevel(LogLevel level) { gLevel.store(static_cast<int>(level)); }
LogLevel logLevel() { return static_cast<LogLevel>(gLevel.load(std::memory_order_relaxed)); }
void setLogFormat(LogFormat format) { gFormat.store(static_cast<int>(format)); }
LogFormat logFormat() { return static_cast<LogFormat>(gFormat.load(std::memory_order_relaxed)); }

LogLevel parseLogLevel(std::string_view s) {
  if (s == "debug") return LogLevel::Debug;
  if (s == "warn" || s == "warning") return LogLevel::Warn;
  if (s == "error") return LogLevel::Error;
  return LogLevel::Info;
}

void logLine(LogLevel level, std::string_view component, std::string_view message) {
  if (static_cast<int>(level) < gLevel.load(std::memory_order_relaxed)) return;
  std::string line;
  line.reserve(96 + message.size());
  if (logFormat() == LogFormat::Json) {
    line = JsonObject()
               .str("time", timestamp())
               .str("level", jsonLevelName(level))
               .str("component", component)
               .str("event", "log")
               .str("message", message)
               .finish();
  } else {
    line += timestamp();
    line += ' ';
    line += textLevelName(level);
    line += ' ';
    line += component;
    line += ": ";
    line += message;
  }
  writeLine(line);
}

LogEvent::LogEvent(LogLevel level, std::string_view component, std::string_view event)
    : level_(level), component_(component), event_(event) {}

LogEvent& LogEvent::field(std::string_view textKey, std::string_view jsonKey, std::string_view value, Style style,
                          size_t max) {
  fields_.push_back(Field{std::string(textKey), std::string(jsonKey), sanitizeForLog(value, max), style, false});
  return *this;
}

LogEvent& LogEvent::number(std::string_view key, long long value) {
  fields_.push_back(Field{std::string(key), std::string(key), std::to_string(value), Style::Plain, true});
  return *this;
}

std::string LogEvent::render(LogFormat format, std::string_view time) const {
  std::string line;
  line.reserve(160);
  if (format == LogFormat::Json) {
    JsonObject o;
    o.str("time", time).str("level", jsonLevelName(level_)).str("component", component_).str("event", event_);
    for (const auto& f : fields_) {
      if (f.numeric)
        o.raw(f.jsonKey, f.value);
      else
        o.str(f.jsonKey, f.value);
    }
    return o.finish();
  }
  line += time;
  line += ' ';
  line += textLevelName(level_);
  line += ' ';
  line += component_;
  line += ": ";
  line += event_;
  for (const auto& f : fields_) {
    line += ' ';
    line += f.textKey;
    line += '=';
    switch (f.style) {
      case Style::Plain: line += f.value; break;
      case Style::Angle: line += '<' + f.value + '>'; break;
      case Style::Quoted: line += '"' + f.value + '"'; break;
    }
  }
  return line;
}

void LogEvent::emit() {
  if (static_cast<int>(level_) < gLevel.load(std::memory_order_relaxed)) return;
  std::string line = render(logFormat(), timestamp());
  writeLine(line);
}

}  // namespace subrelay::util
