#include "webhook/event.h"

#include <openssl/rand.h>

#include <cstdlib>

#include "util/json_writer.h"
#include "util/time_fmt.h"

namespace subrelay::webhook {

namespace {
constexpr std::string_view kNames[] = {"accepted", "delivered", "deferred", "bounced", "suppressed", "expired"};

std::string_view cut(std::string_view s) { return s.size() > kMaxReplyBytes ? s.substr(0, kMaxReplyBytes) : s; }
}  // namespace

std::string_view eventName(EventType t) { return kNames[static_cast<size_t>(t)]; }

std::optional<EventType> parseEventName(std::string_view name) {
  for (size_t i = 0; i < std::size(kNames); ++i)
    if (kNames[i] == name) return static_cast<EventType>(i);
  return std::nullopt;
}

std::string newEventId() {
  unsigned char b[16];
  // Out of entropy: nothing safe to do (ids must not collide).
  if (RAND_bytes(b, sizeof b) != 1) std::abort();
  static constexpr char kHex[] = "0123456789abcdef";
  std::string id = "evt_";
  for (unsigned char c : b) {
    id += kHex[c >> 4];
    id += kHex[c & 15];
  }
  return id;
}

std::string eventJson(const Event& e) {
  util::JsonObject o;
  o.str("id", e.id)
      .str("type", eventName(e.type))
      .str("account", e.account)
      .str("message_id", e.messageId)
      .str("sender", e.sender)
      .str("recipient", e.recipient)
      .str("at", util::isoUtc(static_cast<long long>(e.at)));
  if (e.attempt > 0) o.num("attempt", e.attempt);
  if (e.smtpCode != 0 || !e.enhancedCode.empty() || !e.reply.empty() || !e.remoteHost.empty()) {
    util::JsonObject smtp;
    if (e.smtpCode != 0) smtp.num("code", e.smtpCode);
    if (!e.enhancedCode.empty()) smtp.str("enhanced_code", e.enhancedCode);
    if (!e.reply.empty()) smtp.str("reply", cut(e.reply));
    if (!e.remoteHost.empty()) smtp.str("remote_host", e.remoteHost);
    o.raw("smtp", smtp.finish());
  }
  if (!e.reason.empty()) o.str("reason", cut(e.reason));
  return o.finish();
}

}  // namespace subrelay::webhook
