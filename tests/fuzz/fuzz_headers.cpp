// Fuzz target for message/: scanHeaders (RFC 5322 2.2), parseAddressList (3.4) on every
// field, and applySubmissionFixups (RFC 6409 section 8). Besides memory safety it checks
// the properties the rest of subrelay relies on, and aborts when one breaks:
//  - every field lies inside the input, in order, and the body offset is within it;
//  - the streaming HeaderScanner, fed in pieces, finds the same boundary and body;
//  - the fix-ups only insert: the input is a subsequence of the output;
//  - the output rescans with Received first and exactly one Date and Message-ID when the
//    input had none, and an address list never yields more addresses than "@" signs.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "message/fixups.h"
#include "message/header_scanner.h"
#include "message/headers.h"

using namespace subrelay::message;

namespace {

void check(bool ok) {
  if (!ok) std::abort();
}

bool isSubsequence(std::string_view needle, std::string_view hay) {
  size_t j = 0;
  for (size_t i = 0; i < hay.size() && j < needle.size(); ++i)
    if (hay[i] == needle[j]) ++j;
  return j == needle.size();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);

  const HeaderBlock block = scanHeaders(in);
  size_t expect = 0;
  for (const auto& f : block.fields) {
    check(f.offset == expect);
    check(f.length > 0 && f.offset + f.length <= in.size());
    check(f.name.data() == in.data() + f.offset);
    check(f.value.data() >= in.data() && f.value.data() + f.value.size() <= in.data() + f.offset + f.length);
    expect = f.offset + f.length;

    size_t ats = 0;
    for (char c : f.value) ats += c == '@' ? 1 : 0;
    const auto addrs = parseAddressList(f.value);
    check(addrs.size() <= ats);
    for (const auto& a : addrs) check(a.find('@') != std::string::npos);
  }
  check(block.bodyOffset <= in.size());
  check(block.bodyOffset >= expect);

  // The streaming scanner (what the server feeds while DATA arrives) finds the same
  // boundary and the same body octets in any split: the DKIM body hash and the fix-ups
  // must agree on where the body starts.
  for (size_t piece : {size_t{64}, size_t{5}, size_t{1}}) {
    HeaderScanner sc;
    sc.keepUndecided(true);
    std::string body;
    bool started = false;
    for (size_t pos = 0; pos < in.size(); pos += piece) {
      const std::string_view chunk = in.substr(pos, piece);
      const size_t at = sc.feed(chunk);
      if (at == std::string_view::npos) continue;
      if (!started) body += sc.bodyPrefix();
      started = true;
      body += chunk.substr(at);
    }
    if (!started) {
      sc.finish();
      body += sc.bodyPrefix();
    }
    check(sc.bodyOffset() == block.bodyOffset);
    check(sc.fields() == block.fields.size());
    check(body == in.substr(block.bodyOffset));
    if (size > 4096) break;  // bytewise feeding of big inputs is slow and adds nothing
  }

  TraceInfo info;
  info.hostname = "relay.example.net";
  info.heloName = size > 0 && data[0] & 1 ? std::string(in.substr(0, 40)) : "client.example";
  info.clientAddress = "[192.0.2.1]";
  info.account = "fuzz";
  info.tlsVersion = size > 0 && data[0] & 2 ? "TLSv1.3" : "";
  info.tlsCipher = "TLS_AES_128_GCM_SHA256";
  info.queueId = "0123456789abcdef";
  info.recipient = size > 0 && data[0] & 4 ? std::string(in.substr(0, 60)) : "";
  info.smtputf8 = size > 0 && (data[0] & 8);

  const std::string out = applySubmissionFixups(in, info);
  check(out.size() > in.size());
  check(isSubsequence(in, out));
  const HeaderBlock after = scanHeaders(out);
  check(!after.fields.empty());
  check(after.fields.front().name == "Received");
  const size_t dates = countFields(block, "Date");
  const size_t ids = countFields(block, "Message-ID");
  check(countFields(after, "Date") == (dates == 0 ? 1 : dates));
  check(countFields(after, "Message-ID") == (ids == 0 ? 1 : ids));
  return 0;
}
