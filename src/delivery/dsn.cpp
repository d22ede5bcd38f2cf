// Delivery Status Notifications: RFC 3464 (message/delivery-status fields), RFC 6522
// (multipart/report), RFC 3463 (status codes), RFC 6533 (utf-8 address type,
// message/global-delivery-status, message/global-headers), RFC 3834 (Auto-Submitted).
//
// Everything that goes into the DSN comes from somewhere we do not control (remote reply
// texts, the original headers, addresses), so every piece is cleaned on the way in: no
// bare CR or LF, no control characters in fields, every line at most 998 octets
// (RFC 5322 2.1.1), long fields folded at white space.
//
// Also the RFC 3461 decisions (which NOTIFY wants which DSN, what RET returns) and the
// DSN fields that carry ENVID and ORCPT back (Original-Envelope-Id, Original-Recipient).
// Not here: deciding when a DSN is due (retry.h, the scheduler), sending it with the
// null sender (the scheduler).
#include "delivery/dsn.h"

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <random>
#include <string_view>

#include "smtp/command.h"
#include "util/strings.h"
#include "util/time_fmt.h"

namespace subrelay::delivery {

namespace {

using util::hasNonAscii;

constexpr size_t kFoldAt = 78;     // RFC 5322 2.1.1 SHOULD
constexpr size_t kMaxLine = 998;   // RFC 5322 2.1.1 MUST (without the CRLF)
constexpr size_t kTextWidth = 76;  // the human-readable part

// Length of the well-formed UTF-8 sequence (RFC 3629 section 4) starting at s[i], or 0.
size_t utf8Length(std::string_view s, size_t i) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  size_t n = 0;
  unsigned char lo = 0x80, hi = 0xbf;  // bounds of the second byte
  if (c >= 0xc2 && c <= 0xdf) {
    n = 2;
  } else if (c >= 0xe0 && c <= 0xef) {
    n = 3;
    if (c == 0xe0) lo = 0xa0;  // overlong
    if (c == 0xed) hi = 0x9f;  // surrogates
  } else if (c >= 0xf0 && c <= 0xf4) {
    n = 4;
    if (c == 0xf0) lo = 0x90;  // overlong
    if (c == 0xf4) hi = 0x8f;  // above U+10FFFF
  } else {
    return 0;
  }
  if (i + n > s.size()) return 0;
  if (b(i + 1) < lo || b(i + 1) > hi) return 0;
  for (size_t k = 2; k < n; ++k)
    if (b(i + k) < 0x80 || b(i + k) > 0xbf) return 0;
  return n;
}

// The character starting at s[i] (not ASCII): kept when allowed and well-formed UTF-8,
// else one '?'. Advances i past it.
void appendNonAscii(std::string& out, std::string_view s, size_t& i, bool allowUtf8) {
  const size_t n = allowUtf8 ? utf8Length(s, i) : 0;
  if (n > 0) {
    out.append(s.substr(i, n));
    i += n;
  } else {
    out += '?';
    ++i;
  }
}

// Untrusted text for one line: controls (CR and LF included) and runs of white space
// become one space, ends trimmed; non-ASCII kept only when allowed and well-formed UTF-8.
std::string cleanText(std::string_view s, bool allowUtf8) {
  std::string out;
  bool space = false;
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c <= 0x20 || c == 0x7f) {
      space = true;
      ++i;
      continue;
    }
    if (space && !out.empty()) out += ' ';
    space = false;
    if (c < 0x80) {
      out += static_cast<char>(c);
      ++i;
    } else {
      appendNonAscii(out, s, i, allowUtf8);
    }
  }
  return out;
}

// An address for a field or a sentence: kept as it is (quoted local parts may hold
// spaces), except that controls cannot break the line and bad bytes become '?'.
std::string cleanAddress(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      out += (c < 0x20 || c == 0x7f) ? '?' : static_cast<char>(c);
      ++i;
    } else {
      appendNonAscii(out, s, i, true);
    }
  }
  return out;
}

// RFC 6533 section 3, utf-8-addr-unitext: UTF-8 kept, and the ASCII characters that
// QUCHAR excludes ('+', '=', '\\', controls, space) written as EmbeddedUnicodeChar.
std::string unitext(std::string_view addr) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (size_t i = 0; i < addr.size();) {
    const auto c = static_cast<unsigned char>(addr[i]);
    if (c >= 0x80) {
      if (const size_t n = utf8Length(addr, i); n > 0) {
        out.append(addr.substr(i, n));
        i += n;
      } else {
        out += "\\x{FFFD}";  // not UTF-8 at all: U+FFFD REPLACEMENT CHARACTER
        ++i;
      }
      continue;
    }
    if (c <= 0x20 || c == 0x7f || c == '+' || c == '=' || c == '\\') {
      out += "\\x{";
      out += kHex[c >> 4];
      out += kHex[c & 0xf];
      out += '}';
    } else {
      out += static_cast<char>(c);
    }
    ++i;
  }
  return out;
}

// "rfc822; addr" (RFC 3464 2.3.2) or, for a non-ASCII address, "utf-8; addr" (RFC 6533 3).
std::string typedAddress(std::string_view addr) {
  if (hasNonAscii(addr)) return "utf-8; " + unitext(addr);
  return "rfc822; " + cleanAddress(addr);
}

// Cuts a line longer than kMaxLine into continuation lines (a leading space, as in
// folding), so the result always parses; only pathological input reaches this.
void appendHardWrapped(std::string& out, std::string_view line) {
  bool first = true;
  while (true) {
    const size_t room = first ? kMaxLine : kMaxLine - 1;
    if (!first) out += ' ';
    if (line.size() <= room) {
      out.append(line);
      out += "\r\n";
      return;
    }
    out.append(line.substr(0, room));
    out += "\r\n";
    line.remove_prefix(room);
    first = false;
  }
}

// "Name: value" folded at spaces before kFoldAt where possible (RFC 5322 2.2.3: the
// unfolded value is unchanged). value must already be clean (cleanText / typedAddress).
void addField(std::string& out, std::string_view name, std::string_view value) {
  std::string line = std::string(name) + ":";
  bool wordOnLine = false;
  size_t pos = 0;
  while (pos < value.size()) {
    size_t end = value.find(' ', pos);
    if (end == std::string_view::npos) end = value.size();
    const std::string_view word = value.substr(pos, end - pos);
    pos = end + 1;
    if (word.empty()) continue;
    if (wordOnLine && line.size() + 1 + word.size() > kFoldAt) {
      appendHardWrapped(out, line);
      line.clear();
    }
    line += ' ';
    line.append(word);
    wordOnLine = true;
  }
  appendHardWrapped(out, line);
}

// A paragraph of the human-readable part, word-wrapped at kTextWidth with an indent.
void addParagraph(std::string& out, std::string_view text, std::string_view indent = "") {
  const std::string clean = cleanText(text, true);
  std::string line(indent);
  bool wordOnLine = false;
  size_t pos = 0;
  while (pos < clean.size()) {
    size_t end = clean.find(' ', pos);
    if (end == std::string::npos) end = clean.size();
    const std::string_view word = std::string_view(clean).substr(pos, end - pos);
    pos = end + 1;
    if (wordOnLine && line.size() + 1 + word.size() > kTextWidth) {
      appendHardWrapped(out, line);
      line = std::string(indent);
      wordOnLine = false;
    }
    if (wordOnLine) line += ' ';
    line.append(word);
    wordOnLine = true;
  }
  appendHardWrapped(out, line);
}

// The original header section with every line break made CRLF (a bare CR or LF counts
// as a line break), cut at the first empty line, overlong lines wrapped, and controls
// other than HTAB replaced: part 3 must parse as a header block (RFC 6522 section 4).
std::string cleanHeaderBlock(std::string_view in) {
  std::string out;
  size_t i = 0;
  while (i < in.size()) {
    size_t end = i;
    while (end < in.size() && in[end] != '\r' && in[end] != '\n') ++end;
    std::string line;
    for (size_t k = i; k < end; ++k) {
      const auto c = static_cast<unsigned char>(in[k]);
      line += ((c < 0x20 && c != '\t') || c == 0x7f) ? '?' : static_cast<char>(c);
    }
    if (line.empty()) break;  // the end of the header section
    appendHardWrapped(out, line);
    if (end < in.size() && in[end] == '\r' && end + 1 < in.size() && in[end + 1] == '\n') ++end;
    i = end + 1;
  }
  return out;
}

std::string dateOf(int64_t unixSeconds) {
  return util::rfc5322Date(std::chrono::system_clock::time_point(std::chrono::seconds(unixSeconds)));
}

bool isCodeNumber(std::string_view s) {
  // 1*3digit without leading zeros (RFC 3463 section 2).
  if (s.empty() || s.size() > 3) return false;
  if (!std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; })) return false;
  return s.size() == 1 || s[0] != '0';
}

// RFC 3463 section 2: class "." subject "." detail, class 2, 4 or 5.
bool isValidStatus(std::string_view s) {
  if (s.size() < 5 || (s[0] != '2' && s[0] != '4' && s[0] != '5') || s[1] != '.') return false;
  const std::string_view rest = s.substr(2);
  const size_t dot = rest.find('.');
  if (dot == std::string_view::npos) return false;
  return isCodeNumber(rest.substr(0, dot)) && isCodeNumber(rest.substr(dot + 1));
}

std::string statusOf(const DsnRecipient& r) {
  if (isValidStatus(r.status)) return r.status;
  if (r.action == DsnAction::Relayed) return "2.0.0";
  return r.action == DsnAction::Delayed ? "4.0.0" : "5.0.0";
}

// "dns; mx.example.com" from "mx.example.com" or from the already typed form.
std::string typedValue(std::string_view value, std::string_view defaultType) {
  const std::string clean = cleanText(value, false);
  // RFC 3464 2.3.5 / 2.3.6: a type is an atom followed by ";". Replies start with a
  // digit ("550 5.1.1 ..."), so they never look like one.
  const size_t semi = clean.find(';');
  if (semi != std::string::npos && semi > 0 && !(clean[0] >= '0' && clean[0] <= '9') &&
      std::all_of(clean.begin(), clean.begin() + static_cast<std::ptrdiff_t>(semi), [](char c) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-';
      })) {
    std::string out = clean.substr(0, semi + 1);
    out += ' ';
    out += util::trim(std::string_view(clean).substr(semi + 1));
    return out;
  }
  return std::string(defaultType) + "; " + clean;
}

// The value without its "type;" prefix, for the human-readable part.
std::string untyped(const std::string& typed) {
  const size_t semi = typed.find(';');
  if (semi == std::string::npos) return typed;
  return std::string(util::trim(std::string_view(typed).substr(semi + 1)));
}

// A sentence for the codes senders meet most (RFC 3463 section 3, RFC 7505).
const char* explain(const std::string& status) {
  const std::string_view s = std::string_view(status).substr(1);
  if (s == ".1.1") return "The recipient's mailbox does not exist at the receiving system.";
  if (s == ".1.2" || s == ".4.4") return "The recipient's domain does not exist or has no mail server.";
  if (s == ".1.10") return "The recipient's domain does not accept mail (null MX).";
  if (s == ".2.2") return "The recipient's mailbox is full.";
  if (s == ".3.4") return "The message is larger than the receiving system accepts.";
  if (s == ".4.1" || s == ".4.2") return "The recipient's mail server could not be reached.";
  if (s == ".4.3") return "The recipient's domain could not be looked up in the DNS.";
  if (s == ".4.7") return "The message stayed in the queue too long without being delivered.";
  if (s.substr(0, 3) == ".7.") return "The receiving system refused the message by its policy.";
  return nullptr;
}

void addRecipientText(std::string& out, const DsnRecipient& r, const std::string& status) {
  addParagraph(out, "<" + cleanAddress(r.address) + ">", "  ");
  std::string said;
  if (!r.diagnostic.empty()) {
    const std::string reply = untyped(typedValue(r.diagnostic, "smtp"));
    said = r.remoteMta.empty() ? reply : "host " + untyped(typedValue(r.remoteMta, "dns")) + " said: " + reply;
  } else if (!r.remoteMta.empty()) {
    said = "while talking to host " + untyped(typedValue(r.remoteMta, "dns"));
  }
  if (!said.empty()) addParagraph(out, said, "      ");
  const char* why = explain(status);
  addParagraph(out, "Status " + status + (why ? std::string(": ") + why : std::string()), "      ");
  if (r.lastAttempt != 0) addParagraph(out, "Last attempt: " + dateOf(r.lastAttempt), "      ");
  out += "\r\n";
}

std::string randomHex(size_t bytes) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::random_device rd;
  std::mt19937_64 rng((static_cast<uint64_t>(rd()) << 32) ^ rd());
  std::string out;
  for (size_t i = 0; i < bytes; ++i) {
    const auto v = static_cast<unsigned>(rng() & 0xff);
    out += kHex[v >> 4];
    out += kHex[v & 0xf];
  }
  return out;
}

const char* actionName(DsnAction a) {
  switch (a) {
    case DsnAction::Failed:
      return "failed";
    case DsnAction::Delayed:
      return "delayed";
    case DsnAction::Relayed:
      return "relayed";
  }
  return "failed";
}

}  // namespace

bool wantsFailureDsn(int notify) {
  if (notify & queue::kDsnNotifyNever) return false;
  return notify == 0 || (notify & queue::kDsnNotifyFailure) != 0;
}

bool wantsDelayDsn(int notify) {
  if (notify & queue::kDsnNotifyNever) return false;
  return notify == 0 || (notify & queue::kDsnNotifyDelay) != 0;
}

bool wantsSuccessDsn(int notify, bool passedOn) {
  if (notify & queue::kDsnNotifyNever) return false;
  return (notify & queue::kDsnNotifySuccess) != 0 && !passedOn;
}

ReturnPart returnPart(queue::DsnRet ret, bool reportsFailure, size_t messageSize, size_t maxFull) {
  // RFC 3461 6.2: FULL "for any DSN which conveys notification of delivery failure"; a
  // DSN without a failure "SHOULD return only the headers"; an implementation-specified
  // length above which only the headers go back.
  if (ret != queue::DsnRet::Full || !reportsFailure) return ReturnPart::Headers;
  return messageSize <= maxFull ? ReturnPart::Full : ReturnPart::HeadersTooLarge;
}

std::string statusFromReply(int code, const std::string& enhanced) {
  const int cls = code / 100;
  const bool codeClassOk = code >= 200 && code < 600 && (cls == 2 || cls == 4 || cls == 5);
  if (isValidStatus(enhanced)) {
    // RFC 3463 section 2: the class must agree with the reply code; when a server sends
    // "550 4.1.1" the reply code decides (as Postfix does), the detail is still useful.
    if (!codeClassOk || enhanced[0] == static_cast<char>('0' + cls)) return enhanced;
    return std::string(1, static_cast<char>('0' + cls)) + enhanced.substr(1);
  }
  if (codeClassOk) return std::string(1, static_cast<char>('0' + cls)) + ".0.0";
  return "4.0.0";  // no (usable) reply: nothing says it is permanent
}

std::string buildDsn(const DsnInput& in) {
  std::string host = cleanText(in.reportingMta, false);
  host.erase(std::remove(host.begin(), host.end(), ' '), host.end());
  if (host.empty()) host = "localhost";

  bool anyFailed = false, anyDelayed = false, anyRelayed = false, global = hasNonAscii(in.originalSender);
  int64_t retryUntil = 0;
  for (const auto& r : in.recipients) {
    if (r.action == DsnAction::Failed)
      anyFailed = true;
    else if (r.action == DsnAction::Delayed)
      anyDelayed = true;
    else
      anyRelayed = true;
    global = global || hasNonAscii(r.address);
    if (r.action == DsnAction::Delayed) retryUntil = std::max(retryUntil, r.willRetryUntil);
  }
  // No recipients: say "failed", never claim a retry.
  if (!anyFailed && !anyDelayed && !anyRelayed) anyFailed = true;

  // Part 1: for people (RFC 6522 section 3: "human-readable explanation").
  std::string text;
  addParagraph(text, "This is the mail system at host " + host + ".");
  text += "\r\n";
  if (anyFailed) {
    addParagraph(text,
                 "Your message could not be delivered to the following recipients. The mail system has given "
                 "up on them and will not try again:");
    text += "\r\n";
    for (const auto& r : in.recipients)
      if (r.action == DsnAction::Failed) addRecipientText(text, r, statusOf(r));
  }
  if (anyDelayed) {
    addParagraph(text,
                 "Delivery to the following recipients has been delayed. This is only a warning: you do "
                 "not need to send the message again." +
                     std::string(retryUntil != 0 ? " The mail system will keep trying until " + dateOf(retryUntil) + "."
                                                 : " The mail system will keep trying."));
    text += "\r\n";
    for (const auto& r : in.recipients)
      if (r.action == DsnAction::Delayed) addRecipientText(text, r, statusOf(r));
  }
  if (anyRelayed) {
    // RFC 3461 5.2.2 (b): the next hop does not offer DSN, so nothing more will come.
    addParagraph(text,
                 "Your message was passed on to the following recipients' mail servers. Those servers do not "
                 "offer delivery notifications, so this is the last notice you will get about them:");
    text += "\r\n";
    for (const auto& r : in.recipients)
      if (r.action == DsnAction::Relayed) addRecipientText(text, r, statusOf(r));
  }
  if (anyFailed) {
    addParagraph(text,
                 "What you can do: check the addresses above for typing mistakes and send the message again "
                 "to the corrected address. If an address is right, the explanation under it says why the "
                 "receiving system did not take the message; reach the recipient another way, or ask your "
                 "mail administrator for help.");
  } else if (anyDelayed) {
    addParagraph(text, "If delivery keeps failing you will receive another notice when the mail system gives up.");
  }
  text += "\r\n";
  if (in.fullTooLarge) {
    addParagraph(text, "You asked for your whole message back (RET=FULL), but it is larger than " +
                           std::to_string(kMaxReturnedMessage / 1024) + " KiB, so only its headers are attached.");
    text += "\r\n";
  }
  addParagraph(text, "When asking for help, quote the queue ID " + cleanText(in.queueId, false) +
                         (in.originalMessage.empty() ? ". The headers of your message are attached below."
                                                     : ". Your message is attached below."));

  // Part 2: RFC 3464 section 2.2 per-message fields, then 2.3 per-recipient groups.
  std::string status;
  // RFC 3464 2.2.1 / RFC 3461 6.3 (a): the ENVID, xtext-decoded, first.
  if (!in.envid.empty()) {
    if (auto envid = smtp::decodeXtext(in.envid)) addField(status, "Original-Envelope-Id", cleanText(*envid, false));
  }
  addField(status, "Reporting-MTA", "dns; " + host);
  if (!in.queueId.empty()) addField(status, "X-Subrelay-Queue-ID", cleanText(in.queueId, false));
  if (!in.originalSender.empty()) addField(status, "X-Subrelay-Sender", typedAddress(in.originalSender));
  if (in.arrivalDate != 0) addField(status, "Arrival-Date", dateOf(in.arrivalDate));
  for (const auto& r : in.recipients) {
    status += "\r\n";
    // RFC 3464 2.3.1 / RFC 3461 6.3 (d): the ORCPT, only when one was given.
    if (const std::string orcpt = smtp::orcptField(r.orcpt); !orcpt.empty())
      addField(status, "Original-Recipient", cleanText(orcpt, false));
    addField(status, "Final-Recipient", typedAddress(r.address));
    addField(status, "Action", actionName(r.action));
    addField(status, "Status", statusOf(r));
    if (!r.remoteMta.empty()) addField(status, "Remote-MTA", typedValue(r.remoteMta, "dns"));
    if (!r.diagnostic.empty()) addField(status, "Diagnostic-Code", typedValue(r.diagnostic, "smtp"));
    if (r.lastAttempt != 0) addField(status, "Last-Attempt-Date", dateOf(r.lastAttempt));
    if (r.action == DsnAction::Delayed && r.willRetryUntil != 0)
      addField(status, "Will-Retry-Until", dateOf(r.willRetryUntil));
  }

  // Part 3: the original header section (RFC 6522 section 4 text/rfc822-headers; RFC
  // 6533 section 6.3 message/global-headers when it holds UTF-8).
  // RET=FULL: the whole message as message/rfc822 (RFC 3461 6.2, RFC 6522 section 4), its
  // lines kept as they were sent (already CRLF, at most 998 octets: we accepted it).
  const bool full = !in.originalMessage.empty();
  const std::string headers = full ? in.originalMessage : cleanHeaderBlock(in.originalHeaders);
  const bool headers8bit = hasNonAscii(full ? std::string_view(in.originalHeaders) : std::string_view(headers));
  const bool part3Has8bit = hasNonAscii(headers);

  // A boundary that occurs in none of the parts (RFC 2046 5.1.1).
  std::string boundary;
  do {
    boundary = "=_subrelay_dsn_" + randomHex(12);
  } while (text.find(boundary) != std::string::npos || status.find(boundary) != std::string::npos ||
           headers.find(boundary) != std::string::npos);

  const bool text8bit = hasNonAscii(text);
  const bool status8bit = hasNonAscii(status);

  std::string out;
  addField(out, "From", "\"Mail Delivery System\" <MAILER-DAEMON@" + host + ">");
  if (in.originalSender.empty())
    addField(out, "To", "undisclosed-recipients:;");  // the caller sends no DSN to "<>"
  else
    addField(out, "To", "<" + cleanAddress(in.originalSender) + ">");
  addField(out, "Subject", anyFailed    ? "Undelivered Mail Returned to Sender"
                           : anyDelayed ? "Delayed Mail (still being retried)"
                                        : "Successful Mail Delivery Report");
  addField(out, "Date", dateOf(in.now));
  std::string messageId = cleanText(in.messageId, false);
  messageId.erase(std::remove(messageId.begin(), messageId.end(), ' '), messageId.end());
  if (messageId.empty()) messageId = randomHex(12) + ".dsn@" + host;
  if (messageId.front() != '<') messageId = "<" + messageId + ">";
  addField(out, "Message-ID", messageId);
  addField(out, "MIME-Version", "1.0");
  addField(out, "Auto-Submitted", "auto-replied");  // RFC 3834 section 5
  addField(out, "Content-Type", "multipart/report; report-type=delivery-status; boundary=\"" + boundary + "\"");
  // RFC 2045 6.4: a multipart's encoding is 7bit unless a part is 8bit.
  if (text8bit || status8bit || part3Has8bit) addField(out, "Content-Transfer-Encoding", "8bit");
  out += "\r\n";
  out += "This is a MIME-encapsulated message.\r\n";

  out += "\r\n--" + boundary + "\r\n";
  addField(out, "Content-Description", "Notification");
  addField(out, "Content-Type", text8bit ? "text/plain; charset=utf-8" : "text/plain; charset=us-ascii");
  if (text8bit) addField(out, "Content-Transfer-Encoding", "8bit");
  out += "\r\n";
  out += text;

  out += "\r\n--" + boundary + "\r\n";
  addField(out, "Content-Description", "Delivery report");
  addField(out, "Content-Type", global ? "message/global-delivery-status" : "message/delivery-status");
  if (status8bit) addField(out, "Content-Transfer-Encoding", "8bit");
  out += "\r\n";
  out += status;

  if (full) {
    out += "\r\n--" + boundary + "\r\n";
    addField(out, "Content-Description", anyFailed ? "Undelivered Message" : "Message");
    // RFC 6532 3.7 / RFC 6533 6.3: message/global for a message with UTF-8 headers.
    addField(out, "Content-Type", headers8bit ? "message/global" : "message/rfc822");
    if (part3Has8bit) addField(out, "Content-Transfer-Encoding", "8bit");
    out += "\r\n";
    out += headers;
    if (headers.size() < 2 || headers.compare(headers.size() - 2, 2, "\r\n") != 0) out += "\r\n";
  } else if (!headers.empty()) {
    out += "\r\n--" + boundary + "\r\n";
    addField(out, "Content-Description", anyFailed || anyDelayed ? "Undelivered Message Headers" : "Message Headers");
    addField(out, "Content-Type", headers8bit ? "message/global-headers" : "text/rfc822-headers");
    if (headers8bit) addField(out, "Content-Transfer-Encoding", "8bit");
    out += "\r\n";
    out += headers;
  }

  out += "\r\n--" + boundary + "--\r\n";
  return out;
}

}  // namespace subrelay::delivery
