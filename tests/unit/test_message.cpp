// message/: header scanning (RFC 5322 2.2), address lists (3.4) and the submission
// fix-ups of RFC 6409 section 8 (Received per RFC 5321 4.4, Date, Message-ID).
#include <doctest/doctest.h>

#include <chrono>
#include <string>
#include <vector>

#include "message/fixups.h"
#include "message/header_scanner.h"
#include "message/headers.h"

using namespace subrelay::message;
using Addrs = std::vector<std::string>;

namespace {

TraceInfo trace() {
  TraceInfo t;
  t.hostname = "relay.example.net";
  t.heloName = "app.example.com";
  t.clientAddress = "[192.0.2.10]";
  t.account = "webshop";
  t.tlsVersion = "TLSv1.3";
  t.tlsCipher = "TLS_AES_256_GCM_SHA384";
  t.queueId = "0190a1b2c3d4e5f6";
  t.recipient = "alice@example.org";
  t.when = std::chrono::system_clock::time_point(std::chrono::seconds(1'795'863'890));  // Sat, 28 Nov 2026 11:04:50
  return t;
}

bool allLinesShort(const std::string& s, size_t max) {
  size_t start = 0;
  while (start < s.size()) {
    size_t end = s.find("\r\n", start);
    if (end == std::string::npos) end = s.size();
    if (end - start > max) return false;
    start = end + 2;
  }
  return true;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// scanHeaders

TEST_CASE("scanHeaders: fields, folding and the body") {
  const std::string m =
      "From: Alice <alice@example.com>\r\n"
      "Subject: a long\r\n"
      " folded\r\n"
      "\tsubject\r\n"
      "To:bob@example.org\r\n"
      "\r\n"
      "Body: not a header\r\n";
  auto b = scanHeaders(m);
  REQUIRE(b.fields.size() == 3);
  CHECK(b.hasBodySeparator);
  CHECK(m.substr(b.bodyOffset) == "Body: not a header\r\n");
  CHECK(b.fields[0].name == "From");
  CHECK(b.fields[0].value == " Alice <alice@example.com>");
  CHECK(b.fields[0].offset == 0);
  CHECK(b.fields[0].length == 33);
  CHECK(b.fields[1].name == "Subject");
  CHECK(b.fields[1].value == " a long\r\n folded\r\n\tsubject");
  CHECK(m.substr(b.fields[1].offset, b.fields[1].length) == "Subject: a long\r\n folded\r\n\tsubject\r\n");
  CHECK(b.fields[2].value == "bob@example.org");
  CHECK(findField(b, "subject") == &b.fields[1]);
  CHECK(findField(b, "SUBJECT") == &b.fields[1]);
  CHECK(findField(b, "Date") == nullptr);
  CHECK(countFields(b, "to") == 1);
}

TEST_CASE("scanHeaders: tolerated shapes") {
  SUBCASE("empty message") {
    auto b = scanHeaders("");
    CHECK(b.fields.empty());
    CHECK(b.bodyOffset == 0);
    CHECK_FALSE(b.hasBodySeparator);
  }
  SUBCASE("header block without separator or body") {
    std::string m = "Subject: x\r\nTo: y@z\r\n";
    auto b = scanHeaders(m);
    CHECK(b.fields.size() == 2);
    CHECK_FALSE(b.hasBodySeparator);
    CHECK(b.bodyOffset == m.size());
  }
  SUBCASE("last line without CRLF") {
    std::string m = "Subject: x\r\nTo: y@z";
    auto b = scanHeaders(m);
    REQUIRE(b.fields.size() == 2);
    CHECK(b.fields[1].value == " y@z");
    CHECK(b.fields[1].length == 7);
    CHECK(b.bodyOffset == m.size());
  }
  SUBCASE("last line is a continuation without CRLF") {
    std::string m = "Subject: x\r\n y";
    auto b = scanHeaders(m);
    REQUIRE(b.fields.size() == 1);
    CHECK(b.fields[0].value == " x\r\n y");
    CHECK(b.fields[0].length == m.size());
  }
  SUBCASE("bare LF line endings") {
    std::string m = "Subject: x\n y\nTo: z\n\nbody";
    auto b = scanHeaders(m);
    REQUIRE(b.fields.size() == 2);
    CHECK(b.fields[0].value == " x\n y");
    CHECK(b.fields[1].value == " z");
    CHECK(b.hasBodySeparator);
    CHECK(m.substr(b.bodyOffset) == "body");
  }
  SUBCASE("message that starts with the empty line (no header fields)") {
    auto b = scanHeaders("\r\nonly body\r\n");
    CHECK(b.fields.empty());
    CHECK(b.hasBodySeparator);
    CHECK(b.bodyOffset == 2);
  }
  SUBCASE("a line that is not a field ends the header section") {
    std::string m = "Subject: x\r\nthis is text\r\nFrom: a@b\r\n";
    auto b = scanHeaders(m);
    REQUIRE(b.fields.size() == 1);
    CHECK_FALSE(b.hasBodySeparator);
    CHECK(b.bodyOffset == 12);
  }
  SUBCASE("continuation before any field is not a field") {
    auto b = scanHeaders(" folded\r\nSubject: x\r\n");
    CHECK(b.fields.empty());
    CHECK(b.bodyOffset == 0);
  }
  SUBCASE("obsolete WSP before the colon; empty value") {
    std::string m = "Subject : x\r\nX-Empty:\r\n\r\n";
    auto b = scanHeaders(m);
    REQUIRE(b.fields.size() == 2);
    CHECK(b.fields[0].name == "Subject");
    CHECK(b.fields[0].value == " x");
    CHECK(b.fields[1].name == "X-Empty");
    CHECK(b.fields[1].value.empty());
  }
  SUBCASE("an mbox From_ line or 8-bit field name is not a field") {
    CHECK(scanHeaders("From alice@example.com Sat Nov 28\r\nSubject: x\r\n").fields.empty());
    CHECK(scanHeaders("Sub\xc3\xa9: x\r\n").fields.empty());
  }
  SUBCASE("a lone CR at the end") {
    auto b = scanHeaders("Subject: x\r");
    REQUIRE(b.fields.size() == 1);
    CHECK(b.fields[0].length == 11);
  }
}

TEST_CASE("headerSection: the fields, without the empty line, wherever the scanner ends them") {
  CHECK(headerSection("Subject: x\r\nTo: a@b\r\n\r\nbody\r\n") == "Subject: x\r\nTo: a@b\r\n");
  CHECK(headerSection("Subject: x\r\n folded\r\n\r\n\r\nbody") == "Subject: x\r\n folded\r\n");
  CHECK(headerSection("Subject: x\nTo: a@b\n\nbody\n") == "Subject: x\nTo: a@b\n");  // LF only
  CHECK(headerSection("Subject: x\r\n\nbody") == "Subject: x\r\n");  // a bare-LF empty line
  // No empty line: the body starts at the first line that is not a field.
  CHECK(headerSection("Subject: x\r\nthis is text\r\n\r\nFrom: a@b\r\n") == "Subject: x\r\n");
  CHECK(headerSection("Subject: x\r\nTo: a@b\r\n") == "Subject: x\r\nTo: a@b\r\n");  // all header
  CHECK(headerSection("Subject: x\r") == "Subject: x\r");
  CHECK(headerSection("\r\nonly body\r\n").empty());
  CHECK(headerSection("just text\r\n\r\n").empty());
  CHECK(headerSection("").empty());
}

TEST_CASE("scanHeaders is linear on hostile input") {
  // 200k tiny fields, and one field with 200k continuation lines: both must be quick.
  std::string many;
  for (int i = 0; i < 200000; ++i) many += "A:\r\n";
  CHECK(scanHeaders(many).fields.size() == 200000);
  std::string folded = "A:";
  for (int i = 0; i < 200000; ++i) folded += "\r\n x";
  CHECK(scanHeaders(folded).fields.size() == 1);
  std::string noColon(1 << 20, 'a');
  CHECK(scanHeaders(noColon).fields.empty());
}

// ---------------------------------------------------------------------------------------
// parseAddressList

TEST_CASE("parseAddressList: RFC 5322 3.4 forms") {
  CHECK(parseAddressList("alice@example.com") == Addrs{"alice@example.com"});
  CHECK(parseAddressList(" Alice <alice@example.com>") == Addrs{"alice@example.com"});
  CHECK(parseAddressList("<alice@example.com>") == Addrs{"alice@example.com"});
  CHECK(parseAddressList("\"Smith, Alice\" <alice@example.com>, bob@example.org") ==
        Addrs{"alice@example.com", "bob@example.org"});
  CHECK(parseAddressList("John Q. Public <jqp@example.com>") == Addrs{"jqp@example.com"});
  CHECK(parseAddressList("first.last@sub.example.com") == Addrs{"first.last@sub.example.com"});
  CHECK(parseAddressList("\"odd local\"@example.com") == Addrs{"\"odd local\"@example.com"});
  CHECK(parseAddressList("user@[192.0.2.1]") == Addrs{"user@[192.0.2.1]"});
  CHECK(parseAddressList("=?utf-8?q?J=C3=B6rg?= <joerg@example.de>") == Addrs{"joerg@example.de"});
  CHECK(parseAddressList("J\xc3\xb6rg <j\xc3\xb6rg@b\xc3\xbc\x63her.example>") ==
        Addrs{"j\xc3\xb6rg@b\xc3\xbc\x63her.example"});
}

TEST_CASE("parseAddressList: comments, groups, folding, obsolete syntax") {
  CHECK(parseAddressList("alice@example.com (Alice (the (nested) one))") == Addrs{"alice@example.com"});
  CHECK(parseAddressList("(comment) alice(x)@(y)example.com(z)") == Addrs{"alice@example.com"});
  CHECK(parseAddressList("Alice\r\n <alice@example.com>,\r\n\tbob@example.org") ==
        Addrs{"alice@example.com", "bob@example.org"});
  CHECK(parseAddressList("undisclosed-recipients:;").empty());
  CHECK(parseAddressList("Team: a@example.com, B <b@example.com>;, c@example.com") ==
        Addrs{"a@example.com", "b@example.com", "c@example.com"});
  CHECK(parseAddressList("<@relay1.example,@relay2.example:alice@example.com>") == Addrs{"alice@example.com"});
  CHECK(parseAddressList(", , alice@example.com,,bob@example.org,") == Addrs{"alice@example.com", "bob@example.org"});
  CHECK(parseAddressList("alice . smith @ example . com") == Addrs{"alice.smith@example.com"});
  CHECK(parseAddressList("\"a\\\"b\"@example.com") == Addrs{"\"a\\\"b\"@example.com"});
  CHECK(parseAddressList("").empty());
  CHECK(parseAddressList("   ").empty());
}

TEST_CASE("parseAddressList: only the real address counts (sender authorisation)") {
  // The display name is text, never an address.
  CHECK(parseAddressList("\"boss@bank.com\" <evil@x.example>") == Addrs{"evil@x.example"});
  CHECK(parseAddressList("evil@x.example (boss@bank.com)") == Addrs{"evil@x.example"});
  CHECK(parseAddressList("boss (at) bank.com <evil@x.example>") == Addrs{"evil@x.example"});
  // Ambiguous or malformed: nothing, so the caller refuses rather than guesses.
  CHECK(parseAddressList("boss@bank.com <evil@x.example>").empty());
  CHECK(parseAddressList("<evil@x.example> boss@bank.com").empty());
  CHECK(parseAddressList("Alice alice@example.com").empty());
  CHECK(parseAddressList("<evil@x.example").empty());
  CHECK(parseAddressList("alice@").empty());
  CHECK(parseAddressList("@example.com").empty());
  CHECK(parseAddressList("alice").empty());
  CHECK(parseAddressList(".alice@example.com").empty());
  CHECK(parseAddressList("alice.@example.com").empty());
  CHECK(parseAddressList("a..b@example.com").empty());
  CHECK(parseAddressList("alice@example.com.").empty());
  CHECK(parseAddressList("alice@exa mple.com").empty());
  CHECK(parseAddressList("alice@example.com (unterminated").empty());
  CHECK(parseAddressList("\"unterminated@example.com").empty());
  CHECK(parseAddressList("alice@[192.0.2.1").empty());
  CHECK(parseAddressList("<a@b.example>>").empty());
  CHECK(parseAddressList("a@b.example\r\nBcc: c@d.example").empty());  // not a fold
  CHECK(parseAddressList(std::string("a@b\0.example", 12)).empty());
  CHECK(parseAddressList("G: a@b.example, H: c@d.example;;").empty());  // nested group
  CHECK(parseAddressList(": a@b.example;").empty());                    // group without name
  CHECK(parseAddressList("G: a@b.example").empty());                    // group without ";"
  CHECK(parseAddressList("a@b.example\x01").empty());
}

TEST_CASE("parseAddressList is linear on hostile input") {
  std::string deep(100000, '(');
  CHECK(parseAddressList(deep + "a@b" + std::string(100000, ')')).empty());
  std::string many;
  for (int i = 0; i < 20000; ++i) many += "a@b.example,";
  CHECK(parseAddressList(many).size() == 20000);
}

// ---------------------------------------------------------------------------------------
// Fix-ups

TEST_CASE("withProtocol: RFC 3848 and RFC 6531 transmission types") {
  CHECK(withProtocol(true, false) == "ESMTPSA");
  CHECK(withProtocol(false, false) == "ESMTPA");
  CHECK(withProtocol(true, true) == "UTF8SMTPSA");
  CHECK(withProtocol(false, true) == "UTF8SMTPA");
}

TEST_CASE("fix-ups: Received is prepended in RFC 5321 4.4 form") {
  const std::string in =
      "From: a@shop.example\r\nDate: Fri, 27 Nov 2026 10:00:00 +0000\r\n"
      "Message-ID: <x@shop.example>\r\n\r\nHello\r\n";
  const std::string out = applySubmissionFixups(in, trace());
  const std::string expected =
      "Received: from app.example.com ([192.0.2.10])\r\n"
      "\tby relay.example.net (subrelay) with ESMTPSA id 0190a1b2c3d4e5f6\r\n"
      "\t(version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384)\r\n"
      "\t(authenticated account=webshop)\r\n"
      "\tfor <alice@example.org>; Sat, 28 Nov 2026 11:04:50 +0000\r\n";
  CHECK(out == expected + in);  // Date and Message-ID present: nothing else changes
  CHECK(allLinesShort(out, 78));
}

TEST_CASE("fix-ups: Received variants") {
  SUBCASE("no TLS, SMTPUTF8, several recipients") {
    TraceInfo t = trace();
    t.tlsVersion.clear();
    t.tlsCipher.clear();
    t.smtputf8 = true;
    t.recipient.clear();
    const std::string out = applySubmissionFixups("Date: x\r\nMessage-ID: <y@z>\r\n\r\n", t);
    CHECK(out.rfind("Received: from app.example.com ([192.0.2.10])\r\n"
                    "\tby relay.example.net (subrelay) with UTF8SMTPA id 0190a1b2c3d4e5f6\r\n"
                    "\t(authenticated account=webshop); Sat, 28 Nov 2026 11:04:50 +0000\r\n"
                    "Date: x\r\n",
                    0) == 0);
    CHECK(out.find("version=") == std::string::npos);
    CHECK(out.find(" for ") == std::string::npos);
  }
  SUBCASE("IPv6 client address without brackets") {
    TraceInfo t = trace();
    t.clientAddress = "2001:db8::25";
    CHECK(applySubmissionFixups("", t).find("([IPv6:2001:db8::25])") != std::string::npos);
    t.clientAddress = "192.0.2.7";
    CHECK(applySubmissionFixups("", t).find("([192.0.2.7])") != std::string::npos);
  }
  SUBCASE("a hostile EHLO name cannot break the field") {
    TraceInfo t = trace();
    for (const char* helo : {"evil\r\nBcc: x@y", "a (b) c", "", "-bad-.example", "x..y", "[1.2.3.4] junk"}) {
      CAPTURE(helo);
      t.heloName = helo;
      const std::string out = applySubmissionFixups("Date: x\r\nMessage-ID: <y@z>\r\n\r\n", t);
      CHECK(out.rfind("Received: from unknown ([192.0.2.10])\r\n", 0) == 0);
      auto b = scanHeaders(out);
      CHECK(b.fields.size() == 3);
    }
    t.heloName = "[192.0.2.10]";
    CHECK(applySubmissionFixups("", t).rfind("Received: from [192.0.2.10] ([192.0.2.10])", 0) == 0);
  }
  SUBCASE("comment text is escaped; odd recipients are left out") {
    TraceInfo t = trace();
    t.account = "we(b)\\shop\r\n";
    t.recipient = "\"a b\"@example.org";
    const std::string out = applySubmissionFixups("", t);
    CHECK(out.find("(authenticated account=we\\(b\\)\\\\shop?"
                   "?);") != std::string::npos);
    CHECK(out.find("for <") == std::string::npos);
  }
  SUBCASE("long names fold under 78 characters where they can") {
    TraceInfo t = trace();
    t.hostname = std::string(40, 'h') + ".example.net";
    t.heloName = std::string(60, 'c') + ".example.com";
    t.recipient = std::string(50, 'r') + "@example.org";
    const std::string out = applySubmissionFixups("", t);
    auto b = scanHeaders(out);
    REQUIRE(b.fields.size() == 3);
    CHECK(b.fields[0].name == "Received");
    // (A msg-id cannot be folded inside, so only the Received field is held to 78.)
    CHECK(allLinesShort(out.substr(0, b.fields[0].length), 78));
    // Folding moved the date to its own line but kept it in one piece.
    CHECK(out.find("\r\n\tSat, 28 Nov 2026 11:04:50 +0000\r\n") != std::string::npos);
  }
}

TEST_CASE("fix-ups: Date and Message-ID are added at the end of the header block when missing") {
  const TraceInfo t = trace();
  SUBCASE("both missing") {
    const std::string in = "From: a@shop.example\r\nSubject: hi\r\n\r\nBody\r\n";
    const std::string out = applySubmissionFixups(in, t);
    auto b = scanHeaders(out);
    REQUIRE(b.fields.size() == 5);
    CHECK(b.fields[0].name == "Received");
    CHECK(b.fields[1].name == "From");
    CHECK(b.fields[2].name == "Subject");
    CHECK(b.fields[3].name == "Date");
    CHECK(b.fields[3].value == " Sat, 28 Nov 2026 11:04:50 +0000");
    CHECK(b.fields[4].name == "Message-ID");
    const std::string id(b.fields[4].value);
    CHECK(id.rfind(" <0190a1b2c3d4e5f6.", 0) == 0);
    CHECK(id.size() > std::string(" <0190a1b2c3d4e5f6.@relay.example.net>").size());
    CHECK(id.substr(id.size() - 19) == "@relay.example.net>");
    CHECK(out.substr(b.bodyOffset) == "Body\r\n");
    // Two calls draw different Message-IDs.
    CHECK(applySubmissionFixups(in, t) != out);
  }
  SUBCASE("names match case-insensitively") {
    const std::string in = "date: Fri, 27 Nov 2026 10:00:00 +0000\r\nMESSAGE-id: <a@b>\r\n\r\nx";
    const std::string out = applySubmissionFixups(in, t);
    CHECK(out.substr(out.size() - in.size()) == in);
    CHECK(scanHeaders(out).fields.size() == 3);
  }
  SUBCASE("only Date missing") {
    const std::string in = "Message-ID: <a@b>\r\n\r\n";
    const std::string out = applySubmissionFixups(in, t);  // b's views point into it
    auto b = scanHeaders(out);
    REQUIRE(b.fields.size() == 3);
    CHECK(b.fields[2].name == "Date");
    CHECK(countFields(b, "message-id") == 1);
  }
  SUBCASE("everything else is byte for byte the same") {
    const std::string in = "Subject: x\r\n folded\r\nX-Odd :  spaced \r\n\r\nline\r\n\r\n.dots\r\n";
    const std::string out = applySubmissionFixups(in, t);
    const std::string hdr(headerSection(in));
    const size_t at = out.find(hdr);
    REQUIRE(at != std::string::npos);
    const size_t afterAdded = out.find("\r\n\r\nline", at);
    REQUIRE(afterAdded != std::string::npos);
    CHECK(out.substr(afterAdded + 2) == in.substr(hdr.size()));
  }
}

TEST_CASE("fix-ups: messages without a proper header/body separator stay valid") {
  const TraceInfo t = trace();
  auto check = [&](const std::string& in, const std::string& expectBody) {
    CAPTURE(in);
    const std::string out = applySubmissionFixups(in, t);
    auto b = scanHeaders(out);
    CHECK(b.fields.front().name == "Received");
    CHECK(findField(b, "Date") != nullptr);
    CHECK(findField(b, "Message-ID") != nullptr);
    CHECK(out.substr(b.bodyOffset) == expectBody);
    // Nothing but CRLF line ends were introduced.
    for (size_t i = 0; i < out.size(); ++i) {
      if (out[i] == '\r') CHECK((i + 1 < out.size() && out[i + 1] == '\n'));
      if (out[i] == '\n') CHECK((i > 0 && out[i - 1] == '\r'));
    }
  };
  check("", "");
  check("Subject: x\r\n", "");
  check("Subject: x", "");    // no final CRLF: one is added
  check("Subject: x\r", "");  // lone CR completed, not doubled
  check("Hello, no headers at all\r\n", "Hello, no headers at all\r\n");
  check("Subject: x\r\nforgot the empty line\r\n", "forgot the empty line\r\n");
  check("\r\nbody only\r\n", "body only\r\n");
  check(" starts folded\r\n", " starts folded\r\n");
}

// ---- HeaderScanner (issue 9: header limits, one header/body boundary) ------------------

namespace {

struct Streamed {
  bool inBody = false;
  uint64_t bodyOffset = 0;
  uint64_t fields = 0;
  std::string body;  // the body octets as a streaming caller sees them
  HeaderScanner::Violation violation = HeaderScanner::Violation::None;
};

Streamed stream(std::string_view msg, size_t piece, HeaderScanner::Limits lim = {}) {
  HeaderScanner sc(lim);
  sc.keepUndecided(true);
  Streamed out;
  bool started = false;
  for (size_t pos = 0; pos < msg.size(); pos += piece) {
    std::string_view chunk = msg.substr(pos, piece);
    size_t at = sc.feed(chunk);
    if (at == std::string_view::npos) continue;
    if (!started) {
      started = true;
      out.body += sc.bodyPrefix();
    }
    out.body += chunk.substr(at);
  }
  if (!started && sc.violation() == HeaderScanner::Violation::None) {
    sc.finish();
    out.body += sc.bodyPrefix();
  }
  out.inBody = sc.inBody();
  out.bodyOffset = sc.bodyOffset();
  out.fields = sc.fields();
  out.violation = sc.violation();
  return out;
}

}  // namespace

TEST_CASE("HeaderScanner: any split gives scanHeaders' boundary and the same body") {
  const char* messages[] = {
      "From: a@b.test\r\nSubject: x\r\n\r\nbody\r\n",
      "From: a@b.test\r\nSubject: x\r\nThis line is body text\r\n",  // no empty line (issue 9 #8)
      "From: a@b.test\r\nSubject: folded\r\n  more\r\n\tand more\r\nBody without separator: no\r\n",
      "From: a@b.test\r\nSubject : obsolete WSP\r\n\r\nb\r\n",
      "This line is body text\r\n",
      "\r\nbody only\r\n",
      "From: a@b.test\r\n",
      "From: a@b.test\r\nX-Long-Name-Without-Colon-That-Is-Body\r\nmore\r\n",
      " leading WSP is body\r\nFrom: x\r\n",
      "From: a@b.test\r\n\r\n",
      "From: a@b.test\r\nSubject: Gr\xc3\xbc\xc3\x9f""e\r\n\xc3\xa4 body starts here\r\n",
      "A:\r\nB:\r\n\r\n",
      "",
  };
  for (const char* m : messages) {
    CAPTURE(m);
    const std::string msg(m);
    const HeaderBlock block = scanHeaders(msg);
    for (size_t piece : {size_t{1}, size_t{2}, size_t{3}, size_t{7}, msg.size() + 1}) {
      CAPTURE(piece);
      Streamed s = stream(msg, piece == 0 ? 1 : piece);
      CHECK(s.bodyOffset == block.bodyOffset);
      CHECK(s.fields == block.fields.size());
      CHECK(s.body == msg.substr(block.bodyOffset));
    }
  }
}

TEST_CASE("HeaderScanner: header limits hold while the data streams") {
  SUBCASE("too many octets: refused before the header ends, nothing kept") {
    std::string msg;
    for (int i = 0; i < 3000; ++i) msg += "X-Field: " + std::string(90, 'v') + "\r\n";
    msg += "\r\nbody\r\n";
    Streamed s = stream(msg, 4096, {64 * 1024, 0});
    CHECK(s.violation == HeaderScanner::Violation::TooManyBytes);
    CHECK(s.body.empty());
  }
  SUBCASE("too many fields") {
    std::string msg;
    for (int i = 0; i < 20000; ++i) msg += "a:b\r\n";
    msg += "\r\n";
    Streamed s = stream(msg, 65536, {0, 10000});
    CHECK(s.violation == HeaderScanner::Violation::TooManyFields);
  }
  SUBCASE("a line of 998 octets without a colon is body: bounded, and no header limit") {
    std::string msg(3 * 1024 * 1024, 'x');
    msg += "\r\n";
    Streamed s = stream(msg, 65536, {1024 * 1024, 0});
    CHECK(s.violation == HeaderScanner::Violation::None);
    CHECK(s.bodyOffset == 0);
    CHECK(s.body == msg);
    CHECK(scanHeaders(msg).bodyOffset == 0);
  }
  SUBCASE("the verdict does not depend on the split (fuzz finding)") {
    // Header octets are counted once known to be header: an undecided line that turns out
    // to be body never counts, however it arrives.
    std::string msg = "a:b\r\n" + std::string(300, 'N') + "\x11\r\nbody\r\n";
    for (size_t piece : {size_t{1}, size_t{7}, msg.size()}) {
      CAPTURE(piece);
      Streamed s = stream(msg, piece, {200, 5});
      CHECK(s.violation == HeaderScanner::Violation::None);
      CHECK(s.bodyOffset == 5);
    }
    std::string big = std::string(250, 'a') + ":b\r\n\r\n";
    for (size_t piece : {size_t{1}, size_t{7}, big.size()}) {
      CAPTURE(piece);
      CHECK(stream(big, piece, {200, 5}).violation == HeaderScanner::Violation::TooManyBytes);
    }
  }
  SUBCASE("within the limits") {
    std::string msg;
    for (int i = 0; i < 900; ++i) msg += "X-Field: " + std::string(1000, 'v') + "\r\n";
    msg += "\r\nbody\r\n";
    Streamed s = stream(msg, 65536, {1048576, 10000});
    CHECK(s.violation == HeaderScanner::Violation::None);
    CHECK(s.body == "body\r\n");
  }
}
