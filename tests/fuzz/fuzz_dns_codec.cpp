// Fuzz target for dns/codec.h: parseResponse (RFC 1035 4.1 wire format, RFC 5452 9.1 matching)
// and interpretResponse (RFC 2181 10.1 CNAME chains, RFC 2308 negative answers) on arbitrary
// bytes. The first two input bytes are used as the expected ID (so the fuzzer reaches past
// the header); every question of a small fixed set is tried. Besides memory safety it
// checks what UvResolver relies on, and aborts when one breaks:
//  - a packet whose ID differs from the expected one, or is shorter than a header, is a
//    Mismatch; Ok means ID, QR and (for records) the question matched;
//  - every decoded name is lower-case printable ASCII without empty labels;
//  - the answer's name is the question, Ok answers carry records of the asked type only,
//    and a CNAME to follow comes with status NoData and no records;
//  - TLSA records (RFC 6698) always have association data, and only an Ok / NoData /
//    NxDomain answer can be authenticated (the AD bit, RFC 4035 3.2.3).
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "dns/codec.h"

using namespace subrelay::dns;

namespace {

void check(bool ok) {
  if (!ok) std::abort();
}

void checkName(const std::string& n) {
  check(n.size() < 2048);
  for (char c : n) {
    check(c > 0x20 && c < 0x7f);
    check(!(c >= 'A' && c <= 'Z'));
  }
  check(n.find("..") == std::string::npos);
}

struct Question {
  const char* name;
  QType type;
};
constexpr Question kQuestions[] = {
    {"example.test", QType::MX},  {"example.test", QType::A},     {"a.example.test", QType::AAAA},
    {"example.test", QType::TXT}, {"example.test", QType::CNAME}, {"x", QType::A},
    {"mx.test", QType::MX},       {"www.cname.test", QType::A},
    {"_25._tcp.mx.test", QType::TLSA},
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view wire(reinterpret_cast<const char*>(data), size);
  const uint16_t id = size >= 2 ? static_cast<uint16_t>((data[0] << 8) | data[1]) : 0;

  check(parseResponse(wire, static_cast<uint16_t>(id + 1), "example.test", QType::MX).status == ParseStatus::Mismatch);
  // Every question against the same bytes: matching must never depend on luck.
  for (const auto& q : kQuestions) {
    ParseResult r = parseResponse(wire, id, q.name, q.type);
    if (size < 12) check(r.status == ParseStatus::Mismatch);
    if (r.status != ParseStatus::Ok) continue;
    check(size >= 12 && (data[2] & 0x80) != 0);
    for (const auto& rec : r.response.answers) {
      checkName(rec.owner);
      checkName(rec.target);
      if (rec.type == static_cast<uint16_t>(QType::TLSA)) check(!rec.tlsa.data.empty());
    }
    for (const char* server : {"", "127.0.0.1:53"}) {
      Interpretation in = interpretResponse(r.response, q.name, q.type, server);
      const Answer& a = in.answer;
      check(a.name == q.name);
      check(a.type == q.type);
      checkName(a.canonicalName);
      if (a.authenticated) check(a.status == Status::Ok || a.status == Status::NoData || a.status == Status::NxDomain);
      if (!in.followCname.empty()) {
        check(a.status == Status::NoData);
        check(a.mx.empty() && a.addresses.empty() && a.texts.empty() && a.tlsa.empty());
        check(in.followCname == a.canonicalName);
      }
      if (a.status == Status::Ok) {
        check(!r.response.truncated);
        if (q.type == QType::MX) check(!a.mx.empty() && a.addresses.empty() && a.texts.empty() && a.tlsa.empty());
        if (q.type == QType::A || q.type == QType::AAAA) check(!a.addresses.empty() && a.mx.empty() && a.tlsa.empty());
        if (q.type == QType::TXT) check(!a.texts.empty() && a.mx.empty() && a.tlsa.empty());
        if (q.type == QType::TLSA) check(!a.tlsa.empty() && a.mx.empty() && a.addresses.empty());
        for (const auto& t : a.tlsa) check(!t.data.empty());
        for (const auto& addr : a.addresses) check(!addr.empty());
        for (const auto& m : a.mx) checkName(m.exchange);
      } else {
        check(a.mx.empty() && a.addresses.empty() && a.texts.empty() && a.tlsa.empty());
      }
    }
  }
  return 0;
}
