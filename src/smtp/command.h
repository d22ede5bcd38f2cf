// SMTP command line parsing (RFC 5321 sections 4.1.1, 4.1.2, 4.1.3), with the RFC 6531
// (SMTPUTF8) extensions of the address grammar and the ESMTP parameter syntax.
//
// Everything works on one command line without its CRLF; no state, no allocation
// beyond the results. Deciding what a command means in the current state lives in
// server_session.cpp; SASL decoding lives there too.
#pragma once

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
  BadParams,   // malformed or repeated ESMTP parameters
};

struct PathArgument {
  PathStatus status = PathStatus::BadPath;
  // Mailbox without <> and without a source route; "" for the null path <>. A quoted
  // local part whose content is a valid dot-string is unquoted ("a"@b -> a@b).
  std::string address;
  bool nullPath = false;
  bool nonAscii = false;  // UTF-8 in the address: needs SMTPUTF8 (RFC 6531 3.3)
  std::vector<EsmtpParam> params;
};

// Parses the argument of MAIL ("FROM:<path> [params]", keyword "FROM") or RCPT
// ("TO:<path> [params]", keyword "TO"). The address grammar always admits UTF-8
// (RFC 6531 3.3); callers refuse nonAscii when SMTPUTF8 is not in effect. Like most
// servers we allow spaces after the colon, which RFC 5321 does not.
PathArgument parsePathArgument(std::string_view args, std::string_view keyword);

// Splits and checks "KEY[=VALUE] ..." (RFC 5321 4.1.2, RFC 6531 3.3 esmtp-value).
bool parseEsmtpParams(std::string_view text, std::vector<EsmtpParam>& out);

// Well-formed UTF-8 (RFC 3629): no overlongs, no surrogates, nothing above U+10FFFF.
bool isValidUtf8(std::string_view s);
// RFC 5321 4.1.2 Domain (with RFC 6531 U-labels when utf8), at most 255 octets.
bool isValidDomain(std::string_view domain, bool utf8);
// RFC 5321 4.1.3 address-literal: [IPv4], [IPv6:...], [tag:content].
bool isValidAddressLiteral(std::string_view literal);
// RFC 5321 4.1.2 Mailbox = Local-part "@" ( Domain / address-literal ).
bool isValidMailbox(std::string_view mailbox, bool utf8);

}  // namespace subrelay::smtp
