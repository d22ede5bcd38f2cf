// SMTP reply formatting (RFC 5321 section 4.2) with enhanced status codes
// (RFC 2034, RFC 3463), plus a one-line reply parser for the client side.
//
// Replies are built here and nowhere else so that every line the server writes is
// CRLF-terminated, ASCII, and free of text that could smuggle a second reply line
// (reply texts from other modules, e.g. a store error, pass through sanitizeReplyText).
// Not here: deciding which reply to send (server_session.cpp).
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace subrelay::smtp {

// RFC 5321 4.5.3.1.5: a reply line is at most 512 octets including CRLF; texts are cut
// so that "ddd x.yyy.zzz " + text + CRLF stays within that.
inline constexpr size_t kMaxReplyText = 480;

// "code enhanced text\r\n"; enhanced may be empty (greeting, EHLO, 334, 354 carry none:
// RFC 2034 section 3 puts enhanced codes on 2xx/4xx/5xx replies other than those).
std::string formatReply(int code, std::string_view enhanced, std::string_view text);

// RFC 5321 4.2.1: every line but the last is "code-", the last "code ". With a
// non-empty enhanced code each line repeats it (RFC 2034 section 4). An empty list
// yields one line with an empty text.
std::string formatMultilineReply(int code, std::string_view enhanced, const std::vector<std::string>& lines);

// Printable ASCII only: CR, LF, other controls and non-ASCII bytes become '?', and the
// text is cut at kMaxReplyText.
std::string sanitizeReplyText(std::string_view text);

// RFC 3463 section 2: class "." subject "." detail, class 2/4/5, subject and detail
// 1-3 digits; when code is given (100..599), the class must equal its first digit.
bool isValidEnhancedCode(std::string_view enhanced, int code = 0);

// One reply line without its CRLF, as a client reads it (RFC 5321 4.2).
struct ReplyLine {
  int code = 0;
  bool last = true;       // "ddd " or "ddd" (no text) rather than "ddd-"
  std::string_view text;  // after the separator; may start with an enhanced code
};
std::optional<ReplyLine> parseReplyLine(std::string_view line);

}  // namespace subrelay::smtp
