#include "app/queue_cmd.h"

#include <algorithm>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <string>

#include "queue/sqlite_store.h"
#include "smtp/command.h"
#include "util/json_writer.h"
#include "util/time_fmt.h"

namespace subrelay::app {

// list/show (and accounts, status) open read-only: they must never change or migrate the
// file; the operator actions open read-write without creating anything. Either way the
// file must exist.
util::Result<std::unique_ptr<queue::SqliteStore>> openQueue(const std::string& dataDir, bool writable) {
  std::string path = (std::filesystem::path(dataDir) / "queue.db").string();
  if (!std::filesystem::exists(path))
    return util::makeError("no queue at " + path + " (has `subrelay serve` run with this data_dir?)");
  queue::OpenOptions oo;
  oo.readOnly = !writable;
  oo.create = false;
  return queue::SqliteStore::open(path, oo);
}

namespace {

bool waiting(const queue::RecipientInfo& r) { return queue::deliverable(r.state); }

std::string requestName(queue::OperatorRequest r) {
  return r == queue::OperatorRequest::Retry ? "retry" : r == queue::OperatorRequest::Bounce ? "bounce" : "";
}

std::string humanAge(int64_t s) {
  if (s < 120) return std::to_string(s) + "s";
  if (s < 7200) return std::to_string(s / 60) + "m";
  if (s < 172800) return std::to_string(s / 3600) + "h";
  return std::to_string(s / 86400) + "d";
}

// "2026-11-28T14:00:00Z (in 5m)" or "... (due now)".
std::string nextTry(int64_t at, int64_t now) {
  return util::isoUtc(at) + (at <= now ? " (due now)" : " (in " + humanAge(at - now) + ")");
}

std::string plural(int64_t n, const char* word) {
  return std::to_string(n) + " " + word + (n == 1 ? "" : "s");
}

std::string isoOrNull(int64_t t) {
  std::string out;
  if (t == 0) return "null";
  util::jsonEscapeTo(out, util::isoUtc(t));
  return out;
}

std::string recipientsJson(const queue::MessageInfo& m, int64_t now) {
  std::string out = "[";
  for (size_t i = 0; i < m.recipients.size(); ++i) {
    const auto& r = m.recipients[i];
    util::JsonObject o;
    o.str("address", r.address).str("state", std::string(queue::stateName(r.state))).num("attempts", r.attempts);
    // Only a waiting recipient has a next try; a delivered or failed one keeps none.
    const int64_t next = waiting(r) ? r.nextAttempt : 0;
    o.raw("next_attempt", isoOrNull(next));
    o.str("last_error", r.lastError);
    o.num("index", r.index);
    if (waiting(r)) o.num("next_attempt_in", std::max<int64_t>(0, next - now));
    else o.raw("next_attempt_in", "null");
    // A lease is owned by the running serve (queue/delivery_queue.h): "in flight".
    o.boolean("in_flight", r.leaseUntil != 0);
    o.str("last_status", r.lastStatus.str()).num("last_code", r.lastCode);
    if (r.request != queue::OperatorRequest::None) o.str("pending_request", requestName(r.request));
    else o.raw("pending_request", "null");
    o.boolean("dsn_pending", r.dsnPending);
    // RFC 3461 as given at submission: "SUCCESS,FAILURE" / "NEVER" / "" (none), ORCPT as sent.
    o.str("dsn_notify", smtp::notifyValue(static_cast<uint8_t>(r.dsn.notify))).str("dsn_orcpt", r.dsn.orcpt);
    o.str("updated_at", util::isoUtc(r.updatedAt));
    if (i) out += ",";
    out += o.finish();
  }
  return out + "]";
}

std::string historyJson(const queue::MessageInfo& m) {
  std::string out = "[";
  for (size_t i = 0; i < m.attempts.size(); ++i) {
    const auto& a = m.attempts[i];
    std::string address;
    for (const auto& r : m.recipients)
      if (r.index == a.index) address = r.address;
    util::JsonObject o;
    o.str("recipient", address)
        .num("index", a.index)
        .str("at", util::isoUtc(a.at))
        .str("mx", a.mx)
        .str("tls_version", a.tlsVersion)
        .str("tls_cipher", a.tlsCipher)
        .str("tls_policy", a.tlsPolicy)
        .num("code", a.code)
        .str("reply", a.reply)
        .str("result", a.result)
        .str("status", a.status.str());
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
    if (r.nextAttempt && waiting(r) && (next == 0 || r.nextAttempt < next)) next = r.nextAttempt;
    if (!r.lastError.empty()) lastError = r.lastError;
  }
  util::JsonObject o;
  o.str("id", m.id)
      .str("account", m.account)
      .str("sender", m.mailFrom)
      .raw("recipients", recipientsJson(m, now))
      .num("size", m.size)
      .str("received_at", util::isoUtc(m.receivedAt))
      .num("age", now - m.receivedAt)
      .boolean("captured", m.captured)
      .num("attempts", attempts);
  o.raw("next_attempt", isoOrNull(next));
  o.str("last_error", lastError);
  o.boolean("is_dsn", m.isDsn).boolean("smtputf8", m.smtputf8).boolean("eight_bit", m.eightBit);
  // RFC 8689: "requiretls" (MAIL FROM ... REQUIRETLS), "optional" (TLS-Required: No), or "".
  o.str("tls_required", m.tlsRequirement == queue::TlsRequirement::Required   ? "requiretls"
                        : m.tlsRequirement == queue::TlsRequirement::Optional ? "optional"
                                                                              : "");
  o.raw("finished_at", isoOrNull(m.finishedAt)).boolean("content_removed", m.contentPruned);
  // RFC 3461 RET ("FULL", "HDRS", "" = none) and ENVID (xtext as sent, "" = none).
  o.str("dsn_ret", smtp::retValue(static_cast<smtp::DsnRet>(static_cast<int>(m.dsnRet)))).str("dsn_envid", m.dsnEnvid);
  return o;
}

// The one-line reason for a failed open or read; "no such message" gets the hint the
// operator needs.
int fail(const std::string& what) {
  std::fprintf(stderr, "subrelay: %s\n", what.c_str());
  return 1;
}

int noSuchMessage(const std::string& id) {
  return fail("no message " + id + " in the queue (see `subrelay queue list`)");
}

bool isNotFound(const util::Error& e) { return e.message.rfind("no such message", 0) == 0; }

}  // namespace

int queueList(const QueueCmdOptions& o) {
  auto store = openQueue(o.dataDir);
  if (!store.ok()) return fail(store.error().message);
  auto msgs = store.value()->list();
  if (!msgs.ok()) return fail("reading the queue: " + msgs.error().message);
  int64_t now = static_cast<int64_t>(std::time(nullptr));
  for (const auto& m : msgs.value()) {
    if (o.json) {
      std::printf("%s\n", messageJson(m, now).finish().c_str());
      continue;
    }
    std::string line = m.id + "  " + humanAge(now - m.receivedAt) + "  " + std::to_string(m.size) + "B  " +
                       m.account + "  <" + m.mailFrom + ">" + (m.isDsn ? "  (DSN)" : "");
    for (const auto& r : m.recipients) {
      line += "  " + r.address + " (" + std::string(queue::stateName(r.state));
      if (r.leaseUntil != 0) line += ", in flight";
      line += ", " + plural(r.attempts, "attempt");
      if (waiting(r)) line += ", next " + nextTry(r.nextAttempt, now);
      if (r.dsnPending) line += ", DSN pending";
      if (!r.lastError.empty()) line += ", last error: " + r.lastError;
      line += ")";
    }
    std::printf("%s\n", line.c_str());
  }
  return 0;
}

int queueShow(const QueueCmdOptions& o, const std::string& id) {
  auto store = openQueue(o.dataDir);
  if (!store.ok()) return fail(store.error().message);
  auto m = store.value()->show(id);
  if (!m.ok()) return isNotFound(m.error()) ? noSuchMessage(id) : fail(m.error().message);
  if (o.raw && !o.json) {
    // A message whose content retention removed is an error here, never empty output.
    auto c = store.value()->content(id);
    if (!c.ok()) return fail(c.error().message);
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
        .raw("history", historyJson(m.value()));
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
  std::printf("tls:       %s\nsize:      %lld bytes%s%s\ncaptured:  %s\n",
              mi.tlsVersion.empty() ? "none" : (mi.tlsVersion + " " + mi.tlsCipher).c_str(),
              static_cast<long long>(mi.size), mi.eightBit ? ", 8bit" : "", mi.smtputf8 ? ", SMTPUTF8" : "",
              mi.captured ? "yes (never delivered)" : "no");
  if (mi.isDsn) std::printf("dsn:       yes (a delivery status notification we generated)\n");
  if (mi.tlsRequirement == queue::TlsRequirement::Required)
    std::printf("requiretls: yes (MAIL FROM ... REQUIRETLS: verified TLS on every hop, RFC 8689)\n");
  if (mi.tlsRequirement == queue::TlsRequirement::Optional)
    std::printf("tls-required: no (the TLS-Required: No header, RFC 8689 3)\n");
  if (mi.dsnRet != queue::DsnRet::Unspecified || !mi.dsnEnvid.empty()) {
    std::string params;
    if (mi.dsnRet != queue::DsnRet::Unspecified)
      params += std::string(" RET=") + smtp::retValue(static_cast<smtp::DsnRet>(static_cast<int>(mi.dsnRet)));
    if (!mi.dsnEnvid.empty()) params += " ENVID=" + mi.dsnEnvid;
    std::printf("dsn-params:%s (RFC 3461, as given at submission)\n", params.c_str());
  }
  if (mi.finishedAt > 0 && !mi.captured)
    std::printf("finished:  %s (%s ago)\n", util::isoUtc(mi.finishedAt).c_str(), humanAge(now - mi.finishedAt).c_str());
  if (mi.contentPruned)
    std::printf("content:   removed after delivery (retention.finished_bodies); envelope and history kept\n");
  std::printf("recipients:\n");
  for (const auto& r : mi.recipients) {
    std::printf("  <%s>  %s  attempts=%lld", r.address.c_str(), std::string(queue::stateName(r.state)).c_str(),
                static_cast<long long>(r.attempts));
    if (waiting(r)) std::printf("  next=%s", nextTry(r.nextAttempt, now).c_str());
    if (r.leaseUntil != 0) std::printf("  in-flight");
    if (r.request != queue::OperatorRequest::None)
      std::printf("  pending=%s (when the attempt in flight ends)", requestName(r.request).c_str());
    if (r.lastStatus.valid()) std::printf("  status=%s", r.lastStatus.str().c_str());
    if (r.dsnPending) std::printf("  dsn=pending");
    if (r.dsn.notify != 0)
      std::printf("  notify=%s", smtp::notifyValue(static_cast<uint8_t>(r.dsn.notify)).c_str());
    if (!r.dsn.orcpt.empty()) std::printf("  orcpt=%s", r.dsn.orcpt.c_str());
    if (!r.lastError.empty()) std::printf("  last_error=%s", r.lastError.c_str());
    std::printf("\n");
  }
  std::printf("history:%s\n", mi.attempts.empty() ? " (no delivery attempts yet)" : "");
  for (const auto& a : mi.attempts) {
    std::string address;
    for (const auto& r : mi.recipients)
      if (r.index == a.index) address = r.address;
    std::printf("  %s  <%s>  %s  mx=%s  tls=%s  policy=\"%s\"  code=%d  status=%s  %s\n", util::isoUtc(a.at).c_str(),
                address.c_str(), a.result.c_str(), a.mx.empty() ? "-" : a.mx.c_str(),
                a.tlsVersion.empty() ? "none" : (a.tlsVersion + "/" + a.tlsCipher).c_str(),
                a.tlsPolicy.empty() ? "-" : a.tlsPolicy.c_str(), a.code, a.status.valid() ? a.status.str().c_str() : "-",
                a.reply.c_str());
  }
  return 0;
}

// --- operator actions -----------------------------------------------------------------
// Each opens the queue read-write next to a running serve: the write waits for serve's
// commit in progress (busy timeout), and a scheduler sees the change at its next lease.

int queueRetry(const QueueCmdOptions& o, const std::optional<std::string>& id) {
  auto store = openQueue(o.dataDir, true);
  if (!store.ok()) return fail(store.error().message);
  auto n = store.value()->retryNow(id);
  if (!n.ok()) return id && isNotFound(n.error()) ? noSuchMessage(*id) : fail("retry: " + n.error().message);
  if (!id) {
    std::printf("retry: %s due now\n", plural(n.value(), "recipient").c_str());
  } else if (n.value() == 0) {
    std::printf("retry: no recipient of %s is waiting for delivery (delivered, failed or captured)\n", id->c_str());
  } else {
    std::printf("retry: %s of %s due now\n", plural(n.value(), "recipient").c_str(), id->c_str());
  }
  return 0;
}

int queueDrop(const QueueCmdOptions& o, const std::string& id) {
  auto store = openQueue(o.dataDir, true);
  if (!store.ok()) return fail(store.error().message);
  auto before = store.value()->show(id);
  if (!before.ok()) return isNotFound(before.error()) ? noSuchMessage(id) : fail(before.error().message);
  auto n = store.value()->drop(id);
  if (!n.ok()) return isNotFound(n.error()) ? noSuchMessage(id) : fail("drop: " + n.error().message);
  std::printf("drop: %s removed from the queue (account %s, sender <%s>, %s; no DSN sent)\n", id.c_str(),
              before->account.c_str(), before->mailFrom.c_str(),
              plural(static_cast<int64_t>(before->recipients.size()), "recipient").c_str());
  return 0;
}

int queueBounce(const QueueCmdOptions& o, const std::string& id) {
  auto store = openQueue(o.dataDir, true);
  if (!store.ok()) return fail(store.error().message);
  store.value()->setWebhookEvents(o.webhookEvents);
  auto n = store.value()->bounce(id);
  if (!n.ok()) return isNotFound(n.error()) ? noSuchMessage(id) : fail("bounce: " + n.error().message);
  if (n.value() == 0) {
    std::printf("bounce: no recipient of %s is waiting for delivery; nothing bounced\n", id.c_str());
    return 0;
  }
  auto after = store.value()->show(id);
  std::string dsn = "a DSN to the sender is pending";
  int64_t inFlight = 0;
  if (after.ok()) {
    if (after->isDsn) dsn = "no DSN (the message is itself a DSN)";
    else if (after->mailFrom.empty()) dsn = "no DSN (null sender)";
    else dsn = "a DSN to <" + after->mailFrom + "> is pending";
    for (const auto& r : after->recipients) inFlight += r.request == queue::OperatorRequest::Bounce;
  }
  const int64_t now = n.value() - inFlight;
  if (inFlight == 0) {
    std::printf("bounce: %s of %s failed (bounced by operator); %s\n", plural(n.value(), "recipient").c_str(),
                id.c_str(), dsn.c_str());
  } else {
    // An attempt is running for these: they are bounced when it ends (a delivery stands),
    // never attempted a second time.
    std::printf("bounce: %s of %s failed (bounced by operator), %s in flight bounced when the attempt ends "
                "unless it delivers; %s\n",
                plural(now, "recipient").c_str(), id.c_str(), std::to_string(inFlight).c_str(), dsn.c_str());
  }
  return 0;
}

}  // namespace subrelay::app
