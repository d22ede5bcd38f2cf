// The cleanup stage (cleanup.h).
#include "submission/cleanup.h"

#include "idna/idna.h"
#include "message/headers.h"
#include "util/strings.h"

namespace subrelay::submission {

namespace {

CleanupResult refuse(int code, const char* enhanced, std::string text) {
  CleanupResult r;
  r.code = code;
  r.enhanced = enhanced;
  r.text = std::move(text);
  return r;
}

// The idempotency key: the value unfolded (CRLFs dropped, RFC 5322 2.2.3) and without the
// white space around it; "" when it is not 1..kMaxIdempotencyKey printable ASCII characters.
std::string idempotencyKey(std::string_view raw) {
  std::string v;
  v.reserve(raw.size());
  for (char c : raw)
    if (c != '\r' && c != '\n') v += c == '\t' ? ' ' : c;
  const size_t b = v.find_first_not_of(' ');
  if (b == std::string::npos) return {};
  v = v.substr(b, v.find_last_not_of(' ') - b + 1);
  if (v.size() > kMaxIdempotencyKey) return {};
  for (char c : v)
    if (c < 0x20 || c > 0x7e) return {};
  return v;
}

}  // namespace

CleanupResult cleanup(std::string_view content, const CleanupRequest& req) {
  // One scan of the header section; the fix-ups below reuse it.
  message::HeaderBlock headers = message::scanHeaders(content);

  // Idempotent submission: the key goes to the queue, the field does not (it is a word
  // between the client and us). One field at most: two could disagree. Only a message
  // that has the field pays for taking it out (a copy and a second scan).
  std::string key;
  std::string withoutKey;
  if (!req.idempotencyHeader.empty()) {
    const size_t n = message::countFields(headers, req.idempotencyHeader);
    if (n > 1)
      return refuse(550, "5.6.0", "Message has more than one " + req.idempotencyHeader + " header field");
    if (n == 1) {
      const message::HeaderField& f = *message::findField(headers, req.idempotencyHeader);
      key = idempotencyKey(f.value);
      if (key.empty())
        return refuse(550, "5.6.0", "The " + req.idempotencyHeader + " header field must hold 1 to " +
                                        std::to_string(kMaxIdempotencyKey) + " printable ASCII characters");
      withoutKey.reserve(content.size() - f.length);
      withoutKey.append(content.substr(0, f.offset)).append(content.substr(f.offset + f.length));
      content = withoutKey;
      headers = message::scanHeaders(content);
    }
  }

  // RFC 6409 8.1: the MSA may check that the submitter is allowed to use the addresses
  // it claims; we require it of every From mailbox and of Sender.
  const size_t fromCount = message::countFields(headers, "From");
  if (fromCount != 1)
    return refuse(550, "5.6.0",
                  fromCount == 0 ? "Message has no From header field (RFC 5322 3.6)"
                                 : "Message has more than one From header field (RFC 5322 3.6)");
  const auto addrs = message::parseAddressList(message::findField(headers, "From")->value);
  if (addrs.empty()) return refuse(550, "5.6.0", "Cannot parse the From header field (RFC 5322 3.6.2)");
  for (const auto& a : addrs) {
    if (!req.owns || !req.owns(a))
      return refuse(550, "5.7.1", "From header address <" + util::sanitizeForLog(a, 100) + "> not owned by this account");
  }
  // RFC 5322 3.6.2: Sender is one mailbox, "the agent responsible for the actual
  // transmission"; receivers show it ("on behalf of"), so it may not name someone else.
  const size_t senderCount = message::countFields(headers, "Sender");
  if (senderCount > 1) return refuse(550, "5.6.0", "Message has more than one Sender header field (RFC 5322 3.6)");
  if (senderCount == 1) {
    const auto sender = message::parseAddressList(message::findField(headers, "Sender")->value);
    if (sender.size() != 1) return refuse(550, "5.6.0", "Cannot parse the Sender header field (RFC 5322 3.6.2)");
    if (!req.owns || !req.owns(sender.front()))
      return refuse(550, "5.7.1", "Sender header address <" + util::sanitizeForLog(sender.front(), 100) + "> not owned by this account");
  }

  CleanupResult r;
  r.ok = true;
  // RFC 6531 3.4: SMTPUTF8 is needed for non-ASCII addresses or header fields; the body
  // is 8BITMIME's business. Decided on the client's header section, before ours is added.
  bool utf8 = util::hasNonAscii(req.mailFrom) || util::hasNonAscii(content.substr(0, headers.bodyOffset));
  for (const auto& rcpt : req.recipients) utf8 = utf8 || util::hasNonAscii(rcpt);
  r.smtputf8 = utf8;

  // RFC 8689 3: at most one TLS-Required field, whose value is "No". 4.1: REQUIRETLS on
  // MAIL FROM wins over the header, which then only travels on.
  const size_t tlsFields = message::countFields(headers, "TLS-Required");
  if (tlsFields > 1)
    return refuse(550, "5.6.0", "Message has more than one TLS-Required header field (RFC 8689 3)");
  if (req.requireTls) {
    r.tlsRequired = true;
  } else if (tlsFields == 1) {
    std::string value;  // unfolded, without the FWS around it (RFC 8689 3: [FWS] "No")
    for (char c : message::findField(headers, "TLS-Required")->value)
      if (c != ' ' && c != '\t' && c != '\r' && c != '\n') value += c;
    if (!util::iequals(value, "No"))
      return refuse(550, "5.6.0", "The TLS-Required header field takes only the value \"No\" (RFC 8689 3)");
    r.tlsOptional = true;
  }

  // RFC 6376 3.5: d= is the From domain (the first mailbox; all are the account's).
  const std::string& first = addrs.front();
  // (No '@': toAscii("") is "", the same as no signing domain.)
  if (auto d = idna::toAscii(util::domainPart(first))) r.signingDomain = std::move(*d);
  r.content = message::applySubmissionFixups(content, headers, req.trace);
  r.idempotencyKey = std::move(key);
  return r;
}

}  // namespace subrelay::submission
