// Webhook events: what happened to one recipient of one message, as the JSON body POSTed
// to the account's webhook URL (docs/operations.md, "Webhooks"). Built when the state
// change is committed (queue/webhook_outbox.cpp, same transaction) and stored as it will
// be sent, so a retry sends the very same bytes and the receiver can de-duplicate by id.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace subrelay::webhook {

enum class EventType { Accepted, Delivered, Deferred, Bounced, Suppressed, Expired };

// "accepted" "delivered" "deferred" "bounced" "suppressed" "expired" (config accounts[].webhook.events)
std::string_view eventName(EventType t);
std::optional<EventType> parseEventName(std::string_view name);

struct Event {
  std::string id;  // unique per event (newEventId())
  EventType type = EventType::Accepted;
  std::string account;
  std::string messageId;  // the queue id
  std::string sender;     // envelope sender ("" for <>)
  std::string recipient;
  int64_t at = 0;         // unix seconds: when it happened
  int attempt = 0;        // delivery attempt number (delivered/deferred/bounced/expired), 0 = none
  // The remote's reply where there was one (delivered/deferred/bounced).
  int smtpCode = 0;
  std::string enhancedCode;  // "5.1.1"
  std::string reply;         // the reply text as received, bounded by the caller
  std::string remoteHost;    // the MX (or relay) that answered
  std::string reason;        // free text: why (deferred/bounced/expired/suppressed)
};

// "evt_" + 32 lower-case hex digits from the CSPRNG.
std::string newEventId();

// {"id":..,"type":..,"account":..,"message_id":..,"sender":..,"recipient":..,"at":"<RFC 3339>",
//  "attempt":N, "smtp":{"code":..,"enhanced_code":..,"reply":..,"remote_host":..}, "reason":..}
// Keys without a value (attempt 0, no reply, no reason) are left out. Always valid JSON
// (bytes that are not UTF-8 become U+FFFD).
std::string eventJson(const Event& e);

// Replies and reasons are cut to this many bytes in events.
inline constexpr size_t kMaxReplyBytes = 1000;

}  // namespace subrelay::webhook
