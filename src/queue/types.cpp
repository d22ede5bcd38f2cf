// queue/store.h value types: recipient states and RFC 3463 status codes.
#include <charconv>

#include "queue/store.h"

namespace subrelay::queue {

std::string_view stateName(RecipientState s) {
  switch (s) {
    case RecipientState::Queued: return "queued";
    case RecipientState::Deferred: return "deferred";
    case RecipientState::Delivered: return "delivered";
    case RecipientState::Failed: return "failed";
    case RecipientState::Captured: return "captured";
  }
  return "queued";
}

std::optional<RecipientState> parseRecipientState(std::string_view s) {
  for (auto st : {RecipientState::Queued, RecipientState::Deferred, RecipientState::Delivered, RecipientState::Failed,
                  RecipientState::Captured})
    if (stateName(st) == s) return st;
  return std::nullopt;
}

std::string EnhancedStatus::str() const {
  if (!valid()) return {};
  return std::to_string(klass) + "." + std::to_string(subject) + "." + std::to_string(detail);
}

namespace {
// 1-3 digits, no sign, no leading junk; advances `s` past them.
bool number(std::string_view& s, int& out) {
  size_t n = 0;
  while (n < s.size() && n < 4 && s[n] >= '0' && s[n] <= '9') ++n;
  if (n == 0 || n > 3) return false;
  std::from_chars(s.data(), s.data() + n, out);
  s.remove_prefix(n);
  return true;
}
}  // namespace

std::optional<EnhancedStatus> EnhancedStatus::parse(std::string_view s) {
  // RFC 3463 section 2: class "." subject "." detail; class is 2, 4 or 5, subject and
  // detail 1-3 digits.
  EnhancedStatus e;
  if (s.size() < 5 || (s[0] != '2' && s[0] != '4' && s[0] != '5') || s[1] != '.') return std::nullopt;
  e.klass = s[0] - '0';
  s.remove_prefix(2);
  if (!number(s, e.subject) || s.empty() || s[0] != '.') return std::nullopt;
  s.remove_prefix(1);
  if (!number(s, e.detail) || !s.empty()) return std::nullopt;
  return e;
}

EnhancedStatus EnhancedStatus::fromReply(int code, std::string_view enhanced) {
  if (auto e = parse(enhanced)) {
    // A code whose class contradicts the reply's (a "250 5.1.1") is not trusted.
    if (code == 0 || code / 100 == e->klass) return *e;
  }
  if (code >= 200 && code < 600 && code / 100 != 3) return EnhancedStatus{code / 100, 0, 0};
  return {};
}

AttemptRecord applyOperatorRequest(AttemptRecord record, OperatorRequest request) {
  if (record.newState != RecipientState::Deferred) return record;
  if (request == OperatorRequest::Retry) {
    record.nextAttempt = record.attempt.at;
  } else if (request == OperatorRequest::Bounce) {
    record.newState = RecipientState::Failed;
    record.nextAttempt = 0;
    record.lastError = "bounced by operator";
    record.lastStatus = EnhancedStatus{5, 0, 0};
  }
  return record;
}

}  // namespace subrelay::queue
