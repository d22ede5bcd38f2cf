// SMTP command line parsing (RFC 5321 sections 4.1.1, 4.1.2, 4.1.3), with the RFC 6531
// (SMTPUTF8) extensions of the address grammar and the ESMTP parameter syntax.
//
// Everything works on one command line without its CRLF; no state, no allocation
// beyond the results. Deciding what a command means in the current state lives in
// server_session.cpp; SASL decoding lives there too.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace subrelay::smtp {

enum class Verb {
  Helo,
  Ehlo,
  Mail,
  Rcpt,
  Data,
  Bdat,
  Rset,
  Noop,
  Quit,
  Help,
  Vrfy,
  Expn,
  StartTls,
  Auth,
  Http,  // an HTTP request or header line sent to the SMTP port (GET, POST, "Host: ...")
  Unknown,
};

struct Command {
  Verb verb = Verb::Unknown;
  std::string_view name;  // the verb as sent
  std::string_view args;  // after the separating space; trailing spaces/tabs removed
};

// Splits "VERB[ args]". Verbs are case-insensitive (RFC 5321 2.4).
Command parseCommand(std::string_view line);

// RFC 5321 4.1.2 esmtp-param: keyword ["=" value]. Keywords are returned upper-cased.
struct EsmtpParam {
  std::string keyword;
  std::string value;
  bool hasValue = false;
};

enum class PathStatus {
  Ok,
  BadKeyword,  // not "FROM:" / "TO:"
  BadPath,     // the <...> path is malformed
  NoDomain,    // "<user>" without "@domain"
  BadParams,   // malformed ESMTP parameters
  DuplicateParam,  // a keyword given twice (PathArgument::duplicate names it)
};

struct PathArgument {
  PathStatus status = PathStatus::BadPath;
  // Mailbox without <> and without a source route; "" for the null path <>. A quoted
  // local part whose content is a valid dot-string is unquoted ("a"@b -> a@b).
  std::string address;
  bool nullPath = false;
  bool nonAscii = false;  // UTF-8 in the address: needs SMTPUTF8 (RFC 6531 3.3)
  std::vector<EsmtpParam> params;
  std::string duplicate;  // DuplicateParam: the repeated keyword (upper-case)
};

// Parses the argument of MAIL ("FROM:<path> [params]", keyword "FROM") or RCPT
// ("TO:<path> [params]", keyword "TO"). The address grammar always admits UTF-8
// (RFC 6531 3.3); callers refuse nonAscii when SMTPUTF8 is not in effect. Like most
// servers we allow spaces after the colon, which RFC 5321 does not.
PathArgument parsePathArgument(std::string_view args, std::string_view keyword);

// Splits and checks "KEY[=VALUE] ..." (RFC 5321 4.1.2, RFC 6531 3.3 esmtp-value). A
// repeated keyword is refused unless allowRepeats (then the caller names it).
bool parseEsmtpParams(std::string_view text, std::vector<EsmtpParam>& out, bool allowRepeats = false);

// --- DSN extension (RFC 3461) ----------------------------------------------------------

// RFC 3461 section 4: xtext = *( xchar / hexchar ); xchar is "!".."~" except "+" and
// "="; hexchar is "+" and two upper-case hex digits. Decoded value, or nullopt when the
// text is not xtext.
std::optional<std::string> decodeXtext(std::string_view xtext);
// Octets as xtext: xchars as themselves, everything else as hexchar.
std::string encodeXtext(std::string_view value);

// NOTIFY bits (RFC 3461 4.1). 0 = no NOTIFY given (the default behaviour). The same
// values are stored in the queue (queue::kDsnNotify*).
inline constexpr uint8_t kNotifySuccess = 1;
inline constexpr uint8_t kNotifyFailure = 2;
inline constexpr uint8_t kNotifyDelay = 4;
inline constexpr uint8_t kNotifyNever = 8;
// "NEVER" or a comma list of SUCCESS, FAILURE, DELAY (case-insensitive, each at most
// once, NEVER only alone): the bits, or nullopt (RFC 3461 4.1).
std::optional<uint8_t> parseNotify(std::string_view value);
// The bits as the NOTIFY value ("SUCCESS,FAILURE"); "" for 0.
std::string notifyValue(uint8_t bits);

// RFC 3461 4.3 RET=FULL|HDRS. 0 = not given.
enum class DsnRet : uint8_t { Unspecified = 0, Full = 1, Hdrs = 2 };
std::optional<DsnRet> parseRet(std::string_view value);
const char* retValue(DsnRet ret);  // "FULL", "HDRS", "" for Unspecified

// Limits of RFC 3461 4.2 (the whole ORCPT value) and 4.4 (ENVID).
inline constexpr size_t kMaxOrcpt = 500;
inline constexpr size_t kMaxEnvid = 100;
// RFC 3461 4.4: ENVID=xtext, at most 100 characters, decoding to printable US-ASCII.
bool validEnvid(std::string_view value);
// RFC 3461 4.2: ORCPT=addr-type ";" xtext (addr-type an atom), at most 500 characters,
// the xtext decoding to printable US-ASCII (graphic and white space).
bool validOrcpt(std::string_view value);
// "rfc822; user@example.com" (RFC 3464 2.3.1 Original-Recipient) from a valid ORCPT
// value; "" when it is not valid.
std::string orcptField(std::string_view value);

// Well-formed UTF-8 (RFC 3629): no overlongs, no surrogates, nothing above U+10FFFF.
bool isValidUtf8(std::string_view s);
// RFC 5321 4.1.2 Domain (with RFC 6531 U-labels when utf8), at most 255 octets.
bool isValidDomain(std::string_view domain, bool utf8);
// RFC 5321 4.1.3 address-literal: [IPv4], [IPv6:...], [tag:content].
bool isValidAddressLiteral(std::string_view literal);
// RFC 5321 4.1.2 Mailbox = Local-part "@" ( Domain / address-literal ).
bool isValidMailbox(std::string_view mailbox, bool utf8);

}  // namespace subrelay::smtp
