#include "app/queue_cmd.h"

#include <cstdio>
#include <ctime>
#include <filesystem>
#include <string>

#include "queue/sqlite_store.h"
#include "util/json_writer.h"
#include "util/time_fmt.h"

namespace subrelay::app {

namespace {

util::Result<std::unique_ptr<queue::SqliteStore>> openQueue(const std::string& dataDir) {
  std::string path = (std::filesystem::path(dataDir) / "queue.db").string();
  if (!std::filesystem::exists(path))
    return util::makeError("no queue at " + path + " (has `subrelay serve` run with this data_dir?)");
  queue::OpenOptions oo;
  oo.readOnly = true;
  oo.create = false;
  return queue::SqliteStore::open(path, oo);
}

std::string recipientsJson(const queue::MessageInfo& m) {
  std::string out = "[";
  for (size_t i = 0; i < m.recipients.size(); ++i) {
    const auto& r = m.recipients[i];
    util::JsonObject o;
    o.str("address", r.address).str("state", r.state).num("attempts", r.attempts);
    if (r.nextAttempt) o.str("next_attempt", util::isoUtc(r.nextAttempt));
    else o.raw("next_attempt", "null");
    o.str("last_error", r.lastError);
    if (i) out += ",";
    out += o.finish();
  }
  return out + "]";
}

util::JsonObject messageJson(const queue::MessageInfo& m, int64_t now) {
  int64_t attempts = 0, next = 0;
  std::string lastError;
  for (const auto& r : m.recipients) {
    attempts = std::max(attempts, r.attempts);
    if (r.nextAttempt && (r.state == "queued" || r.state == "deferred") && (next == 0 || r.nextAttempt < next))
      next = r.nextAttempt;
    if (!r.lastError.empty()) lastError = r.lastError;
  }
  util::JsonObject o;
  o.str("id", m.id)
      .str("account", m.account)
      .str("sender", m.mailFrom)
      .raw("recipients", recipientsJson(m))
      .num("size", m.size)
      .str("received_at", util::isoUtc(m.receivedAt))
      .num("age", now - m.receivedAt)
      .boolean("captured", m.captured)
      .num("attempts", attempts);
  if (next) o.str("next_attempt", util::isoUtc(next));
  else o.raw("next_attempt", "null");
  o.str("last_error", lastError);
  return o;
}

std::string humanAge(int64_t s) {
  if (s < 120) return std::to_string(s) + "s";
  if (s < 7200) return std::to_string(s / 60) + "m";
  if (s < 172800) return std::to_string(s / 3600) + "h";
  return std::to_string(s / 86400) + "d";
}

}  // namespace

int queueList(const QueueCmdOptions& o) {
  auto store = openQueue(o.dataDir);
  if (!store.ok()) {
    std::fprintf(stderr, "subrelay: %s\n", store.error().message.c_str());
    return 1;
  }
  auto msgs = store.value()->list();
  if (!msgs.ok()) {
    std::fprintf(stderr, "subrelay: reading the queue: %s\n", msgs.error().message.c_str());
    return 1;
  }
  int64_t now = static_cast<int64_t>(std::time(nullptr));
  for (const auto& m : msgs.value()) {
    if (o.json) {
      std::printf("%s\n", messageJson(m, now).finish().c_str());
      continue;
    }
    std::string line = m.id + "  " + humanAge(now - m.receivedAt) + "  " + std::to_string(m.size) + "B  " +
                       m.account + "  <" + m.mailFrom + ">";
    for (const auto& r : m.recipients) {
      line += "  " + r.address + " (" + r.state;
      if (r.attempts) line += ", " + std::to_string(r.attempts) + " attempts";
      if (r.nextAttempt && r.state == "deferred") line += ", next " + util::isoUtc(r.nextAttempt);
      if (!r.lastError.empty()) line += ", last error: " + r.lastError;
      line += ")";
    }
    std::printf("%s\n", line.c_str());
  }
  return 0;
}

int queueShow(const QueueCmdOptions& o, const std::string& id) {
  auto store = openQueue(o.dataDir);
  if (!store.ok()) {
    std::fprintf(stderr, "subrelay: %s\n", store.error().message.c_str());
    return 1;
  }
  auto m = store.value()->show(id);
  if (!m.ok()) {
    std::fprintf(stderr, "subrelay: no message %s in the queue (see `subrelay queue list`)\n", id.c_str());
    return 1;
  }
  if (o.raw && !o.json) {
    auto c = store.value()->content(id);
    if (!c.ok()) {
      std::fprintf(stderr, "subrelay: %s\n", c.error().message.c_str());
      return 1;
    }
    std::fwrite(c->data(), 1, c->size(), stdout);
    return 0;
  }
  int64_t now = static_cast<int64_t>(std::time(nullptr));
  if (o.json) {
    auto obj = messageJson(m.value(), now);
    obj.str("client_address", m->clientAddress)
        .str("helo", m->heloName)
        .str("tls_version", m->tlsVersion)
        .str("tls_cipher", m->tlsCipher)
        .boolean("smtputf8", m->smtputf8);
    if (o.raw) {
      auto c = store.value()->content(id);
      if (c.ok()) obj.str("raw", c.value());
    }
    std::printf("%s\n", obj.finish().c_str());
    return 0;
  }
  const auto& mi = m.value();
  std::printf("id:        %s\naccount:   %s\nsender:    <%s>\nreceived:  %s (%s ago) from [%s] helo=%s\n",
              mi.id.c_str(), mi.account.c_str(), mi.mailFrom.c_str(), util::isoUtc(mi.receivedAt).c_str(),
              humanAge(now - mi.receivedAt).c_str(), mi.clientAddress.c_str(), mi.heloName.c_str());
  std::printf("tls:       %s\nsize:      %lld bytes\ncaptured:  %s\nrecipients:\n",
              mi.tlsVersion.empty() ? "none" : (mi.tlsVersion + " " + mi.tlsCipher).c_str(),
              static_cast<long long>(mi.size), mi.captured ? "yes (never delivered)" : "no");
  for (const auto& r : mi.recipients) {
    std::printf("  <%s>  %s  attempts=%lld", r.address.c_str(), r.state.c_str(), static_cast<long long>(r.attempts));
    if (r.nextAttempt && (r.state == "queued" || r.state == "deferred"))
      std::printf("  next=%s", util::isoUtc(r.nextAttempt).c_str());
    if (!r.lastError.empty()) std::printf("  last_error=%s", r.lastError.c_str());
    std::printf("\n");
  }
  return 0;
}

}  // namespace subrelay::app
