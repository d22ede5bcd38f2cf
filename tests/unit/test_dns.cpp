// dns/: the packet codec on hand-built and ldns-built packets (RFC 1035 4.1, RFC 2308
// NXDOMAIN/NODATA, RFC 5452 answer matching, RFC 6891 OPT), the TTL cache on a FakeClock,
// resolv.conf / delivery.resolvers parsing, and UvResolver against a fake DNS server on
// 127.0.0.1 (UDP and TCP on one port) run on the same libuv loop.
#include <doctest/doctest.h>
#include <uv.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "dns/cache.h"
#include "dns/codec.h"
#include "dns/resolv_conf.h"
#include "dns/uv_resolver.h"
#include "net/uv_handle.h"
#include "util/clock.h"

// Last: ldns/common.h may define bool-related macros that upset <optional>.
#include <ldns/ldns.h>

using namespace subrelay;
using namespace subrelay::dns;
using namespace std::chrono_literals;

namespace {

// ---------------------------------------------------------------------------------------
// Packets built with ldns (the test may use any ldns function; the allow-list is for
// the shipped binaries).
// ---------------------------------------------------------------------------------------
struct Pkt {
  uint16_t id = 0x1234;
  std::string qname = "example.test.";
  uint16_t qtype = 1;
  uint8_t rcode = 0;
  bool qr = true;
  bool tc = false;
  bool ad = false;  // RFC 4035 3.2.3: the resolver validated the answer
  std::vector<std::string> answers;  // zone-file lines
  std::vector<std::string> authority;
  bool question = true;
};

ldns_rr* rrFromStr(const std::string& s) {
  ldns_rr* rr = nullptr;
  REQUIRE(ldns_rr_new_frm_str(&rr, s.c_str(), 0, nullptr, nullptr) == LDNS_STATUS_OK);
  return rr;
}

std::string wireOf(ldns_pkt* p) {
  uint8_t* buf = nullptr;
  size_t size = 0;
  REQUIRE(ldns_pkt2wire(&buf, p, &size) == LDNS_STATUS_OK);
  std::string out(reinterpret_cast<char*>(buf), size);
  free(buf);
  return out;
}

std::string build(const Pkt& d) {
  ldns_pkt* p = ldns_pkt_new();
  ldns_pkt_set_id(p, d.id);
  ldns_pkt_set_qr(p, d.qr);
  ldns_pkt_set_rd(p, true);
  ldns_pkt_set_ra(p, true);
  ldns_pkt_set_tc(p, d.tc);
  ldns_pkt_set_ad(p, d.ad);
  ldns_pkt_set_rcode(p, d.rcode);
  if (d.question) {
    ldns_rr* q = ldns_rr_new();
    ldns_rr_set_owner(q, ldns_dname_new_frm_str(d.qname.c_str()));
    ldns_rr_set_type(q, static_cast<ldns_rr_type>(d.qtype));
    ldns_rr_set_class(q, LDNS_RR_CLASS_IN);
    ldns_rr_set_question(q, true);
    ldns_pkt_push_rr(p, LDNS_SECTION_QUESTION, q);
  }
  for (const auto& a : d.answers) ldns_pkt_push_rr(p, LDNS_SECTION_ANSWER, rrFromStr(a));
  for (const auto& a : d.authority) ldns_pkt_push_rr(p, LDNS_SECTION_AUTHORITY, rrFromStr(a));
  std::string w = wireOf(p);
  ldns_pkt_free(p);
  return w;
}

const char* kSoa = "example.test. 600 IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 45";

// ---------------------------------------------------------------------------------------
// Packets written byte by byte (RFC 1035 4.1), independent of ldns.
// ---------------------------------------------------------------------------------------
struct Bytes {
  std::string b;
  Bytes& u8(unsigned v) {
    b.push_back(static_cast<char>(v));
    return *this;
  }
  Bytes& u16(unsigned v) { return u8(v >> 8).u8(v & 0xff); }
  Bytes& u32(uint32_t v) { return u16(v >> 16).u16(v & 0xffff); }
  Bytes& name(const std::string& n) {
    size_t start = 0;
    while (start < n.size()) {
      size_t dot = n.find('.', start);
      if (dot == std::string::npos) dot = n.size();
      u8(static_cast<unsigned>(dot - start));
      b += n.substr(start, dot - start);
      start = dot + 1;
    }
    return u8(0);
  }
  Bytes& raw(const std::string& s) {
    b += s;
    return *this;
  }
};

// id, flags, one question (name, type, IN), `an` answers follow from the caller.
Bytes header(uint16_t id, uint16_t flags, unsigned qd, unsigned an, unsigned ns = 0, unsigned ar = 0) {
  Bytes x;
  x.u16(id).u16(flags).u16(qd).u16(an).u16(ns).u16(ar);
  return x;
}

ParseResult parse(const std::string& wire, uint16_t id = 0x1234, const char* qname = "example.test",
                  QType t = QType::A) {
  return parseResponse(wire, id, qname, t);
}

}  // namespace

// =========================================================================================
// Codec
// =========================================================================================

TEST_CASE("normalizeName") {
  CHECK(normalizeName("Example.TEST.") == std::optional<std::string>("example.test"));
  CHECK(normalizeName("a") == std::optional<std::string>("a"));
  CHECK(normalizeName("sel._domainkey.x.test") == std::optional<std::string>("sel._domainkey.x.test"));
  CHECK_FALSE(normalizeName(""));
  CHECK_FALSE(normalizeName("."));
  CHECK_FALSE(normalizeName("a..b"));
  CHECK_FALSE(normalizeName(".a"));
  CHECK_FALSE(normalizeName("a b.test"));
  CHECK_FALSE(normalizeName("a\\.b"));
  CHECK_FALSE(normalizeName(std::string(64, 'a') + ".test"));
  CHECK(normalizeName(std::string(63, 'a') + ".test"));
  std::string long254;
  while (long254.size() < 254) long254 += "abcdefgh.";
  CHECK_FALSE(normalizeName(long254.substr(0, 254)));
}

TEST_CASE("buildQuery: one question, RD, our ID, EDNS0 with 1232 bytes") {
  auto w = buildQuery("Mx.Example.TEST.", QType::MX, 0xbeef);
  REQUIRE(w.ok());
  const std::string& s = *w;
  REQUIRE(s.size() >= 12);
  CHECK(static_cast<uint8_t>(s[0]) == 0xbe);
  CHECK(static_cast<uint8_t>(s[1]) == 0xef);
  CHECK((static_cast<uint8_t>(s[2]) & 0x80) == 0);  // QR=0
  CHECK((static_cast<uint8_t>(s[2]) & 0x01) == 1);  // RD=1
  CHECK((static_cast<uint8_t>(s[2]) & 0x78) == 0);  // OPCODE QUERY
  ldns_pkt* p = nullptr;
  REQUIRE(ldns_wire2pkt(&p, reinterpret_cast<const uint8_t*>(s.data()), s.size()) == LDNS_STATUS_OK);
  CHECK(ldns_pkt_id(p) == 0xbeef);
  CHECK(ldns_pkt_qdcount(p) == 1);
  CHECK(ldns_pkt_ancount(p) == 0);
  CHECK(ldns_pkt_edns(p));
  CHECK(ldns_pkt_edns_udp_size(p) == 1232);
  ldns_rr* q = ldns_rr_list_rr(ldns_pkt_question(p), 0);
  CHECK(ldns_rr_get_type(q) == LDNS_RR_TYPE_MX);
  CHECK(ldns_rr_get_class(q) == LDNS_RR_CLASS_IN);
  char* owner = ldns_rdf2str(ldns_rr_owner(q));
  CHECK(std::string(owner) == "mx.example.test.");
  free(owner);
  ldns_pkt_free(p);

  CHECK_FALSE(buildQuery("bad name", QType::A, 1).ok());
  CHECK_FALSE(buildQuery("", QType::A, 1).ok());
  CHECK_FALSE(buildQuery("a..b", QType::A, 1).ok());
}

TEST_CASE("hand-built A answer with a compression pointer") {
  // RFC 1035 4.1.4: the answer's owner is a pointer to offset 12, the question name.
  Bytes b = header(0x1234, 0x8180, 1, 2);
  b.name("example.test").u16(1).u16(1);
  b.u16(0xc00c).u16(1).u16(1).u32(300).u16(4).u8(192).u8(0).u8(2).u8(1);
  b.u16(0xc00c).u16(1).u16(1).u32(200).u16(4).u8(192).u8(0).u8(2).u8(2);
  auto r = parse(b.b);
  REQUIRE(r.status == ParseStatus::Ok);
  CHECK(r.response.rcode == 0);
  CHECK_FALSE(r.response.truncated);
  REQUIRE(r.response.answers.size() == 2);
  CHECK(r.response.answers[0].owner == "example.test");
  CHECK(r.response.answers[0].address == "192.0.2.1");
  auto in = interpretResponse(r.response, "example.test", QType::A);
  CHECK(in.answer.status == Status::Ok);
  CHECK(in.answer.addresses == std::vector<std::string>{"192.0.2.1", "192.0.2.2"});
  CHECK(in.answer.ttl == 200);
  CHECK(in.followCname.empty());

  // A bad A rdata length is malformed (ours, but unusable), not a crash.
  Bytes bad = header(0x1234, 0x8180, 1, 1);
  bad.name("example.test").u16(1).u16(1);
  bad.u16(0xc00c).u16(1).u16(1).u32(300).u16(3).u8(1).u8(2).u8(3);
  CHECK(parse(bad.b).status != ParseStatus::Ok);
}

TEST_CASE("MX answer, preference order kept as received, null MX") {
  Pkt d;
  d.qtype = 15;
  d.answers = {"example.test. 300 IN MX 20 mx2.Example.test.", "example.test. 100 IN MX 10 mx1.example.test."};
  auto r = parse(build(d), 0x1234, "EXAMPLE.test.", QType::MX);
  REQUIRE(r.status == ParseStatus::Ok);
  auto in = interpretResponse(r.response, "example.test", QType::MX);
  REQUIRE(in.answer.status == Status::Ok);
  REQUIRE(in.answer.mx.size() == 2);
  CHECK(in.answer.mx[0].preference == 20);
  CHECK(in.answer.mx[0].exchange == "mx2.example.test");
  CHECK(in.answer.mx[1].preference == 10);
  CHECK(in.answer.ttl == 100);

  d.answers = {"example.test. 300 IN MX 0 ."};
  r = parse(build(d), 0x1234, "example.test", QType::MX);
  REQUIRE(r.status == ParseStatus::Ok);
  in = interpretResponse(r.response, "example.test", QType::MX);
  REQUIRE(in.answer.mx.size() == 1);
  CHECK(in.answer.mx[0].preference == 0);
  CHECK(in.answer.mx[0].exchange == "");
}

TEST_CASE("AAAA and TXT") {
  Pkt d;
  d.qtype = 28;
  d.answers = {"example.test. 300 IN AAAA 2001:db8::1", "example.test. 300 IN AAAA ::1"};
  auto r = parse(build(d), 0x1234, "example.test", QType::AAAA);
  REQUIRE(r.status == ParseStatus::Ok);
  auto in = interpretResponse(r.response, "example.test", QType::AAAA);
  CHECK(in.answer.addresses == std::vector<std::string>{"2001:db8::1", "::1"});

  d.qtype = 16;
  d.answers = {"example.test. 300 IN TXT \"v=DKIM1; k=rsa; \" \"p=ABC\"", "example.test. 300 IN TXT \"other\""};
  r = parse(build(d), 0x1234, "example.test", QType::TXT);
  REQUIRE(r.status == ParseStatus::Ok);
  in = interpretResponse(r.response, "example.test", QType::TXT);
  CHECK(in.answer.texts == std::vector<std::string>{"v=DKIM1; k=rsa; p=ABC", "other"});
}

TEST_CASE("CNAME chain inside one answer; records of other owners ignored") {
  Pkt d;
  d.answers = {"example.test. 300 IN CNAME a.example.test.", "a.example.test. 60 IN CNAME b.example.test.",
               "b.example.test. 300 IN A 192.0.2.7", "unrelated.test. 300 IN A 192.0.2.99"};
  auto r = parse(build(d));
  REQUIRE(r.status == ParseStatus::Ok);
  auto in = interpretResponse(r.response, "example.test", QType::A);
  CHECK(in.answer.status == Status::Ok);
  CHECK(in.answer.name == "example.test");
  CHECK(in.answer.canonicalName == "b.example.test");
  CHECK(in.answer.addresses == std::vector<std::string>{"192.0.2.7"});
  CHECK(in.answer.ttl == 60);

  // QType::CNAME: the record itself, not followed.
  d.qtype = 5;
  d.answers = {"example.test. 300 IN CNAME a.example.test."};
  r = parse(build(d), 0x1234, "example.test", QType::CNAME);
  REQUIRE(r.status == ParseStatus::Ok);
  in = interpretResponse(r.response, "example.test", QType::CNAME);
  CHECK(in.answer.status == Status::Ok);
  CHECK(in.answer.canonicalName == "a.example.test");
}

TEST_CASE("CNAME only: the caller must follow; with an SOA it is NODATA") {
  Pkt d;
  d.answers = {"example.test. 300 IN CNAME elsewhere.test."};
  auto r = parse(build(d));
  REQUIRE(r.status == ParseStatus::Ok);
  auto in = interpretResponse(r.response, "example.test", QType::A);
  CHECK(in.followCname == "elsewhere.test");
  CHECK(in.answer.ttl == 300);

  d.authority = {"elsewhere.test. 600 IN SOA ns.test. admin.test. 1 3600 600 86400 30"};
  r = parse(build(d));
  in = interpretResponse(r.response, "example.test", QType::A);
  CHECK(in.followCname.empty());
  CHECK(in.answer.status == Status::NoData);
  CHECK(in.answer.canonicalName == "elsewhere.test");
  CHECK(in.answer.ttl == 30);
}

TEST_CASE("CNAME loop and over-long chains are errors") {
  Pkt d;
  d.answers = {"example.test. 300 IN CNAME a.example.test.", "a.example.test. 300 IN CNAME example.test."};
  auto r = parse(build(d));
  REQUIRE(r.status == ParseStatus::Ok);
  auto in = interpretResponse(r.response, "example.test", QType::A);
  CHECK(in.answer.status == Status::Error);
  CHECK(in.answer.detail.find("loop") != std::string::npos);

  d.answers.clear();
  std::string prev = "example.test.";
  for (int i = 0; i < 10; ++i) {
    std::string next = "c" + std::to_string(i) + ".example.test.";
    d.answers.push_back(prev + " 300 IN CNAME " + next);
    prev = next;
  }
  d.answers.push_back(prev + " 300 IN A 192.0.2.1");
  r = parse(build(d));
  in = interpretResponse(r.response, "example.test", QType::A);
  CHECK(in.answer.status == Status::Error);

  // Exactly 8 hops is fine.
  d.answers.clear();
  prev = "example.test.";
  for (int i = 0; i < 8; ++i) {
    std::string next = "c" + std::to_string(i) + ".example.test.";
    d.answers.push_back(prev + " 300 IN CNAME " + next);
    prev = next;
  }
  d.answers.push_back(prev + " 300 IN A 192.0.2.1");
  in = interpretResponse(parse(build(d)).response, "example.test", QType::A);
  CHECK(in.answer.status == Status::Ok);
}

TEST_CASE("NXDOMAIN vs NODATA, negative TTL = min(SOA TTL, MINIMUM)") {
  Pkt d;
  d.rcode = 3;
  d.authority = {kSoa};
  auto r = parse(build(d));
  REQUIRE(r.status == ParseStatus::Ok);
  REQUIRE(r.response.negativeTtl);
  CHECK(*r.response.negativeTtl == 45);
  auto in = interpretResponse(r.response, "example.test", QType::A, "127.0.0.1:53");
  CHECK(in.answer.status == Status::NxDomain);
  CHECK(in.answer.ttl == 45);
  CHECK(in.answer.detail.find("127.0.0.1:53") != std::string::npos);

  d.rcode = 0;
  in = interpretResponse(parse(build(d)).response, "example.test", QType::A);
  CHECK(in.answer.status == Status::NoData);
  CHECK(in.answer.ttl == 45);

  d.authority = {"example.test. 20 IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 45"};
  in = interpretResponse(parse(build(d)).response, "example.test", QType::A);
  CHECK(in.answer.ttl == 20);

  // No SOA: nothing to base a negative TTL on (RFC 2308 5), so 0.
  d.authority.clear();
  d.rcode = 3;
  in = interpretResponse(parse(build(d)).response, "example.test", QType::A);
  CHECK(in.answer.status == Status::NxDomain);
  CHECK(in.answer.ttl == 0);

  // RFC 6604: NXDOMAIN after a CNAME refers to the target.
  d.answers = {"example.test. 300 IN CNAME gone.test."};
  in = interpretResponse(parse(build(d)).response, "example.test", QType::A);
  CHECK(in.answer.status == Status::NxDomain);
  CHECK(in.answer.canonicalName == "gone.test");
}

TEST_CASE("RCODEs: SERVFAIL, REFUSED, FORMERR without a question") {
  Pkt d;
  d.rcode = 2;
  auto in = interpretResponse(parse(build(d)).response, "example.test", QType::A);
  CHECK(in.answer.status == Status::ServFail);
  d.rcode = 5;
  in = interpretResponse(parse(build(d)).response, "example.test", QType::A);
  CHECK(in.answer.status == Status::Refused);
  d.rcode = 1;
  d.question = false;
  auto r = parse(build(d));
  REQUIRE(r.status == ParseStatus::Ok);
  in = interpretResponse(r.response, "example.test", QType::A);
  CHECK(in.answer.status == Status::Error);
  CHECK(in.answer.detail.find("FORMERR") != std::string::npos);
  // NOERROR without a question cannot be matched: ignored.
  d.rcode = 0;
  d.answers = {"example.test. 300 IN A 192.0.2.1"};
  CHECK(parse(build(d)).status == ParseStatus::Mismatch);
}

TEST_CASE("answers not matching the question are ignored (RFC 5452 9.1)") {
  Pkt d;
  d.answers = {"example.test. 300 IN A 192.0.2.1"};
  CHECK(parse(build(d)).status == ParseStatus::Ok);
  CHECK(parse(build(d), 0x1235).status == ParseStatus::Mismatch);                // ID
  CHECK(parse(build(d), 0x1234, "other.test").status == ParseStatus::Mismatch);  // name
  CHECK(parse(build(d), 0x1234, "example.test", QType::AAAA).status == ParseStatus::Mismatch);
  Pkt q = d;
  q.qr = false;
  CHECK(parse(build(q)).status == ParseStatus::Mismatch);  // a query
  Pkt upper = d;
  upper.qname = "EXAMPLE.Test.";
  CHECK(parse(build(upper)).status == ParseStatus::Ok);  // 0x20 case
  // Two questions.
  Bytes b = header(0x1234, 0x8180, 2, 0);
  b.name("example.test").u16(1).u16(1).name("example.test").u16(1).u16(1);
  CHECK(parse(b.b).status == ParseStatus::Mismatch);
  // Class CHAOS.
  Bytes c = header(0x1234, 0x8180, 1, 0);
  c.name("example.test").u16(1).u16(3);
  CHECK(parse(c.b).status == ParseStatus::Mismatch);
}

TEST_CASE("TC flag: reported, also when the packet is cut mid-record") {
  Pkt d;
  d.tc = true;
  d.answers = {"example.test. 300 IN A 192.0.2.1"};
  std::string w = build(d);
  auto r = parse(w);
  REQUIRE(r.status == ParseStatus::Ok);
  CHECK(r.response.truncated);
  auto in = interpretResponse(r.response, "example.test", QType::A);
  CHECK(in.answer.status == Status::Error);  // the caller retries over TCP first
  auto cut = parse(w.substr(0, w.size() - 3));
  CHECK(cut.status == ParseStatus::Ok);
  CHECK(cut.response.truncated);
  CHECK(cut.response.answers.empty());
  // Without TC a cut packet is malformed.
  d.tc = false;
  w = build(d);
  CHECK(parse(w.substr(0, w.size() - 3)).status == ParseStatus::Malformed);
}

TEST_CASE("garbage never crashes and is never a usable answer") {
  Pkt d;
  d.qtype = 15;
  d.answers = {"example.test. 300 IN MX 10 mx.example.test.", "example.test. 300 IN MX 20 mx2.example.test."};
  d.authority = {kSoa};
  const std::string good = build(d);
  // Every prefix.
  for (size_t n = 0; n < good.size(); ++n) {
    auto r = parseResponse(good.substr(0, n), 0x1234, "example.test", QType::MX);
    if (r.status == ParseStatus::Ok) CHECK(r.response.answers.size() < 2);
  }
  // Short, empty.
  CHECK(parse("").status == ParseStatus::Mismatch);
  CHECK(parse(std::string("\x12\x34\x81", 3)).status == ParseStatus::Mismatch);
  // A compression pointer to itself (RFC 1035 4.1.4 loop).
  Bytes loop = header(0x1234, 0x8180, 1, 1);
  loop.name("example.test").u16(1).u16(1);
  loop.u16(0xc000 | static_cast<unsigned>(loop.b.size())).u16(1).u16(1).u32(1).u16(4).u32(0);
  CHECK(parse(loop.b).status == ParseStatus::Malformed);
  // Counts larger than the packet.
  Bytes counts = header(0x1234, 0x8180, 1, 0xffff, 0xffff, 0xffff);
  counts.name("example.test").u16(1).u16(1);
  CHECK(parse(counts.b).status == ParseStatus::Malformed);
  // Random bytes behind a matching header, and random flips of a good packet.
  std::mt19937 rng(42);
  for (int i = 0; i < 3000; ++i) {
    std::string w = good;
    if (i % 2 == 0) {
      w.resize(12 + rng() % 200);
      for (size_t k = 12; k < w.size(); ++k) w[k] = static_cast<char>(rng());
    } else {
      for (int k = 0; k < 1 + i % 5; ++k) w[rng() % w.size()] = static_cast<char>(rng());
    }
    w[0] = 0x12;
    w[1] = 0x34;
    auto r = parseResponse(w, 0x1234, "example.test", QType::MX);
    if (r.status == ParseStatus::Ok) {
      auto in = interpretResponse(r.response, "example.test", QType::MX);
      (void)in;
    }
  }
}

TEST_CASE("names with odd bytes are escaped, never matched to an LDH question") {
  Bytes b = header(0x1234, 0x8180, 1, 1);
  b.raw(std::string("\x07"
                    "ex.mple"
                    "\x04"
                    "test"
                    "\x00",
                    14))
      .u16(15)
      .u16(1);
  b.u16(0xc00c).u16(15).u16(1).u32(300).u16(6).u16(10).raw(
      std::string("\x02"
                  "a\x01"
                  "\x00",
                  4));
  auto r = parseResponse(b.b, 0x1234, "ex.mple.test", QType::MX);
  CHECK(r.status == ParseStatus::Mismatch);  // the question was "ex\046mple.test"
}

// =========================================================================================
// TLSA (RFC 6698) and the DNSSEC header bits (RFC 4035 3.2.3, RFC 6840 5.7, RFC 3225)
// =========================================================================================

namespace {
const char* kTlsaOwner = "_25._tcp.mx.example.test";
const std::string kSha256Hex = "8cb0fc6c527506a053f4f14c8464bebbd6dede2738d11468dd953d7d6a3021f1";

std::vector<uint8_t> unhex(const std::string& h) {
  std::vector<uint8_t> out;
  for (size_t i = 0; i + 1 < h.size(); i += 2) out.push_back(static_cast<uint8_t>(std::stoi(h.substr(i, 2), nullptr, 16)));
  return out;
}
}  // namespace

TEST_CASE("buildQuery: AD=1 in every query, DO only when asked") {
  for (bool dnssecOk : {false, true}) {
    CAPTURE(dnssecOk);
    QueryOptions opts;
    opts.dnssecOk = dnssecOk;
    auto w = buildQuery(kTlsaOwner, QType::TLSA, 0x4242, opts);
    REQUIRE(w.ok());
    const std::string& s = *w;
    CHECK((static_cast<uint8_t>(s[3]) & 0x20) == 0x20);  // AD (RFC 6840 5.7)
    CHECK((static_cast<uint8_t>(s[3]) & 0x10) == 0);     // CD clear: the resolver validates
    ldns_pkt* p = nullptr;
    REQUIRE(ldns_wire2pkt(&p, reinterpret_cast<const uint8_t*>(s.data()), s.size()) == LDNS_STATUS_OK);
    CHECK(ldns_pkt_ad(p));
    CHECK(ldns_pkt_rd(p));
    CHECK(ldns_pkt_edns(p));
    CHECK(ldns_pkt_edns_do(p) == dnssecOk);
    ldns_rr* q = ldns_rr_list_rr(ldns_pkt_question(p), 0);
    CHECK(ldns_rr_get_type(q) == LDNS_RR_TYPE_TLSA);
    ldns_pkt_free(p);
  }
  // The default (no options) is the same as dnssecOk = false.
  auto plain = buildQuery("mx.example.test", QType::MX, 7);
  REQUIRE(plain.ok());
  CHECK((static_cast<uint8_t>((*plain)[3]) & 0x20) == 0x20);
}

TEST_CASE("TLSA records are decoded field by field, the AD bit is read") {
  Pkt d;
  d.qname = std::string(kTlsaOwner) + ".";
  d.qtype = 52;
  d.answers = {std::string(kTlsaOwner) + ". 300 IN TLSA 3 1 1 " + kSha256Hex,
               std::string(kTlsaOwner) + ". 200 IN TLSA 2 0 2 " + std::string(128, 'a'),
               // Unknown usage / selector / matching type are kept: usability is DANE's call.
               std::string(kTlsaOwner) + ". 300 IN TLSA 255 7 9 00"};
  for (bool ad : {false, true}) {
    CAPTURE(ad);
    d.ad = ad;
    auto r = parse(build(d), 0x1234, kTlsaOwner, QType::TLSA);
    REQUIRE(r.status == ParseStatus::Ok);
    CHECK(r.response.authenticated == ad);
    REQUIRE(r.response.answers.size() == 3);
    auto in = interpretResponse(r.response, kTlsaOwner, QType::TLSA);
    REQUIRE(in.answer.status == Status::Ok);
    CHECK(in.answer.authenticated == ad);
    CHECK(in.answer.ttl == 200);
    CHECK(in.answer.addresses.empty());
    REQUIRE(in.answer.tlsa.size() == 3);
    const TlsaRecord& ee = in.answer.tlsa[0];
    CHECK(ee.usage == 3);
    CHECK(ee.selector == 1);
    CHECK(ee.matchingType == 1);
    CHECK(ee.data == unhex(kSha256Hex));
    CHECK(in.answer.tlsa[1].usage == 2);
    CHECK(in.answer.tlsa[1].selector == 0);
    CHECK(in.answer.tlsa[1].matchingType == 2);
    CHECK(in.answer.tlsa[1].data == std::vector<uint8_t>(64, 0xaa));
    CHECK(in.answer.tlsa[2] == TlsaRecord{255, 7, 9, {0}});
  }
  CHECK(parseTypeName("tlsa") == QType::TLSA);
  CHECK(std::string(typeName(QType::TLSA)) == "TLSA");
}

TEST_CASE("hand-built TLSA: good rdata decodes, malformed rdata is rejected") {
  // The question, then one TLSA answer whose rdata is `rdata` (RDLENGTH = its size).
  auto packet = [](const std::string& rdata, unsigned flags = 0x81a0) {
    Bytes b = header(0x1234, static_cast<uint16_t>(flags), 1, 1);
    b.name(kTlsaOwner).u16(52).u16(1);
    b.u16(0xc00c).u16(52).u16(1).u32(300).u16(static_cast<unsigned>(rdata.size())).raw(rdata);
    return b.b;
  };
  const std::string good = std::string("\x03\x01\x01", 3) + std::string(32, '\x5a');
  auto r = parseResponse(packet(good), 0x1234, kTlsaOwner, QType::TLSA);
  REQUIRE(r.status == ParseStatus::Ok);
  CHECK(r.response.authenticated);  // 0x81a0: QR RD RA AD
  REQUIRE(r.response.answers.size() == 1);
  CHECK(r.response.answers[0].tlsa == TlsaRecord{3, 1, 1, std::vector<uint8_t>(32, 0x5a)});

  // No AD in the header: not authenticated.
  r = parseResponse(packet(good, 0x8180), 0x1234, kTlsaOwner, QType::TLSA);
  REQUIRE(r.status == ParseStatus::Ok);
  CHECK_FALSE(r.response.authenticated);

  // Too short to hold the three octets and some data: malformed, never a record.
  for (size_t n : {size_t(0), size_t(1), size_t(2), size_t(3)}) {
    CAPTURE(n);
    auto bad = parseResponse(packet(good.substr(0, n)), 0x1234, kTlsaOwner, QType::TLSA);
    CHECK(bad.status == ParseStatus::Malformed);
  }
  // RDLENGTH running past the end of the packet.
  std::string overrun = packet(good);
  overrun[overrun.size() - good.size() - 1] = static_cast<char>(200);
  CHECK(parseResponse(overrun, 0x1234, kTlsaOwner, QType::TLSA).status == ParseStatus::Malformed);
  // Every prefix and random flips: no crash, and an Ok parse has at most the one record.
  std::mt19937 rng(7);
  const std::string whole = packet(good);
  for (size_t n = 0; n < whole.size(); ++n) {
    auto p = parseResponse(whole.substr(0, n), 0x1234, kTlsaOwner, QType::TLSA);
    if (p.status == ParseStatus::Ok) CHECK(p.response.answers.empty());
  }
  for (int i = 0; i < 2000; ++i) {
    std::string w = whole;
    for (int k = 0; k < 1 + i % 4; ++k) w[12 + rng() % (w.size() - 12)] = static_cast<char>(rng());
    auto p = parseResponse(w, 0x1234, kTlsaOwner, QType::TLSA);
    if (p.status == ParseStatus::Ok) (void)interpretResponse(p.response, kTlsaOwner, QType::TLSA);
  }
}

TEST_CASE("AD: chains, negative answers and failures") {
  Pkt d;
  d.qname = std::string(kTlsaOwner) + ".";
  d.qtype = 52;
  d.ad = true;
  // RFC 7672 2.2.3: TLSA lookups follow CNAMEs; AD covers the whole answer section.
  d.answers = {std::string(kTlsaOwner) + ". 300 IN CNAME _25._tcp.mx.other.test.",
               "_25._tcp.mx.other.test. 300 IN TLSA 3 1 1 " + kSha256Hex};
  auto in = interpretResponse(parse(build(d), 0x1234, kTlsaOwner, QType::TLSA).response, kTlsaOwner, QType::TLSA);
  CHECK(in.answer.status == Status::Ok);
  CHECK(in.answer.canonicalName == "_25._tcp.mx.other.test");
  CHECK(in.answer.authenticated);
  REQUIRE(in.answer.tlsa.size() == 1);

  // The chain stops at a CNAME: the partial answer carries this response's AD.
  d.answers = {std::string(kTlsaOwner) + ". 300 IN CNAME _25._tcp.mx.other.test."};
  in = interpretResponse(parse(build(d), 0x1234, kTlsaOwner, QType::TLSA).response, kTlsaOwner, QType::TLSA);
  CHECK(in.followCname == "_25._tcp.mx.other.test");
  CHECK(in.answer.authenticated);

  // Authenticated denial: NODATA and NXDOMAIN with AD (RFC 7672 2.2: "no TLSA records").
  d.answers.clear();
  d.authority = {kSoa};
  in = interpretResponse(parse(build(d), 0x1234, kTlsaOwner, QType::TLSA).response, kTlsaOwner, QType::TLSA);
  CHECK(in.answer.status == Status::NoData);
  CHECK(in.answer.authenticated);
  d.rcode = 3;
  in = interpretResponse(parse(build(d), 0x1234, kTlsaOwner, QType::TLSA).response, kTlsaOwner, QType::TLSA);
  CHECK(in.answer.status == Status::NxDomain);
  CHECK(in.answer.authenticated);
  d.ad = false;
  in = interpretResponse(parse(build(d), 0x1234, kTlsaOwner, QType::TLSA).response, kTlsaOwner, QType::TLSA);
  CHECK_FALSE(in.answer.authenticated);

  // A failure is never authenticated, whatever the header says.
  d.ad = true;
  d.authority.clear();
  for (uint8_t rcode : {uint8_t(2), uint8_t(5), uint8_t(4)}) {
    CAPTURE(int(rcode));
    d.rcode = rcode;
    in = interpretResponse(parse(build(d), 0x1234, kTlsaOwner, QType::TLSA).response, kTlsaOwner, QType::TLSA);
    CHECK(in.answer.status != Status::Ok);
    CHECK_FALSE(in.answer.authenticated);
  }
}

TEST_CASE("type names and status names") {
  CHECK(parseTypeName("mx") == QType::MX);
  CHECK(parseTypeName("AAAA") == QType::AAAA);
  CHECK_FALSE(parseTypeName("SRV"));
  CHECK(std::string(statusName(Status::NxDomain)) == "nxdomain");
  CHECK(std::string(statusName(Status::Timeout)) == "timeout");
  CHECK(std::string(rcodeName(2)) == "SERVFAIL");
}

// =========================================================================================
// Cache
// =========================================================================================

namespace {
Answer answerOf(const std::string& name, QType t, Status s, uint32_t ttl) {
  Answer a;
  a.name = name;
  a.canonicalName = name;
  a.type = t;
  a.status = s;
  a.ttl = ttl;
  if (s == Status::Ok) a.addresses = {"192.0.2.1"};
  return a;
}
}  // namespace

TEST_CASE("cache honours TTLs on an injected clock") {
  util::FakeClock clock;
  Cache c(clock);
  c.insert(answerOf("a.test", QType::A, Status::Ok, 300));
  auto hit = c.lookup("a.test", QType::A);
  REQUIRE(hit);
  CHECK(hit->ttl == 300);
  CHECK(hit->addresses == std::vector<std::string>{"192.0.2.1"});
  CHECK_FALSE(c.lookup("a.test", QType::AAAA));
  clock.advance(100s);
  hit = c.lookup("a.test", QType::A);
  REQUIRE(hit);
  CHECK(hit->ttl == 200);
  clock.advance(199s);
  CHECK(c.lookup("a.test", QType::A));
  clock.advance(1s);
  CHECK_FALSE(c.lookup("a.test", QType::A));
  CHECK(c.size() == 0);
}

TEST_CASE("cache caps TTLs, caches negatives briefly, failures not at all") {
  util::FakeClock clock;
  Cache c(clock);
  c.insert(answerOf("long.test", QType::A, Status::Ok, 86400));
  CHECK(c.lookup("long.test", QType::A)->ttl == 3600);
  c.insert(answerOf("nx.test", QType::A, Status::NxDomain, 10800));
  CHECK(c.lookup("nx.test", QType::A)->ttl == 60);
  c.insert(answerOf("nodata.test", QType::MX, Status::NoData, 30));
  CHECK(c.lookup("nodata.test", QType::MX)->ttl == 30);
  c.insert(answerOf("zero.test", QType::A, Status::Ok, 0));
  CHECK_FALSE(c.lookup("zero.test", QType::A));
  for (Status s : {Status::ServFail, Status::Refused, Status::Timeout, Status::Error}) {
    c.insert(answerOf("fail.test", QType::A, s, 300));
    CHECK_FALSE(c.lookup("fail.test", QType::A));
  }
  clock.advance(61s);
  CHECK_FALSE(c.lookup("nx.test", QType::A));
  CHECK(c.lookup("long.test", QType::A));

  CacheLimits lim;
  lim.failureTtl = 5s;
  Cache f(clock, lim);
  f.insert(answerOf("fail.test", QType::A, Status::ServFail, 0));
  CHECK(f.lookup("fail.test", QType::A));
  clock.advance(5s);
  CHECK_FALSE(f.lookup("fail.test", QType::A));
}

TEST_CASE("cache keeps the authenticated flag and the TLSA records with the answer") {
  util::FakeClock clock;
  Cache c(clock);
  Answer signed_ = answerOf("_25._tcp.mx.signed.test", QType::TLSA, Status::Ok, 300);
  signed_.addresses.clear();
  signed_.tlsa = {TlsaRecord{3, 1, 1, std::vector<uint8_t>(32, 1)}};
  signed_.authenticated = true;
  c.insert(signed_);
  Answer plain = answerOf("_25._tcp.mx.plain.test", QType::TLSA, Status::Ok, 300);
  plain.tlsa = signed_.tlsa;
  c.insert(plain);
  Answer denial = answerOf("_25._tcp.mx.nodane.test", QType::TLSA, Status::NoData, 30);
  denial.authenticated = true;
  c.insert(denial);
  clock.advance(10s);
  auto hit = c.lookup("_25._tcp.mx.signed.test", QType::TLSA);
  REQUIRE(hit);
  CHECK(hit->authenticated);
  CHECK(hit->tlsa == signed_.tlsa);
  hit = c.lookup("_25._tcp.mx.plain.test", QType::TLSA);
  REQUIRE(hit);
  CHECK_FALSE(hit->authenticated);
  hit = c.lookup("_25._tcp.mx.nodane.test", QType::TLSA);
  REQUIRE(hit);
  CHECK(hit->status == Status::NoData);
  CHECK(hit->authenticated);
  CHECK_FALSE(c.lookup("_25._tcp.mx.signed.test", QType::A));
}

TEST_CASE("cache is bounded: the entry closest to expiry goes first") {
  util::FakeClock clock;
  CacheLimits lim;
  lim.maxEntries = 3;
  Cache c(clock, lim);
  c.insert(answerOf("a.test", QType::A, Status::Ok, 100));
  c.insert(answerOf("b.test", QType::A, Status::Ok, 50));
  c.insert(answerOf("c.test", QType::A, Status::Ok, 300));
  c.insert(answerOf("d.test", QType::A, Status::Ok, 200));
  CHECK(c.size() == 3);
  CHECK_FALSE(c.lookup("b.test", QType::A));
  CHECK(c.lookup("a.test", QType::A));
  CHECK(c.lookup("d.test", QType::A));
  // Replacing an entry does not grow the cache.
  c.insert(answerOf("a.test", QType::A, Status::Ok, 1000));
  CHECK(c.size() == 3);
  CHECK(c.lookup("a.test", QType::A)->ttl == 1000);
}

// =========================================================================================
// resolv.conf and delivery.resolvers
// =========================================================================================

TEST_CASE("parseResolvConf") {
  auto s = parseResolvConf(
      "# comment\n"
      "search example.test\n"
      "nameserver 192.0.2.53\n"
      "nameserver\t::1   # trailing comment\n"
      "  nameserver 127.0.0.1\r\n"
      "nameserver fe80::1%eth0\n"
      "nameserver not-an-address\n"
      "nameservers 192.0.2.9\n"
      "; nameserver 192.0.2.10\n"
      "options ndots:2\n"
      "nameserver 2001:db8::35");
  REQUIRE(s.size() == 4);
  CHECK(s[0] == ServerAddress{"192.0.2.53", 53, false});
  CHECK(s[1] == ServerAddress{"::1", 53, true});
  CHECK(s[2] == ServerAddress{"127.0.0.1", 53, false});
  CHECK(s[3] == ServerAddress{"2001:db8::35", 53, true});
  CHECK(s[1].toString() == "[::1]:53");
  CHECK(parseResolvConf("").empty());
  auto fallback = loadResolvConf("/nonexistent/resolv.conf");
  REQUIRE(fallback.size() == 1);
  CHECK(fallback[0].toString() == "127.0.0.1:53");
}

TEST_CASE("parseServerAddress and parseServerList") {
  CHECK(parseServerAddress("127.0.0.1:5353").value() == ServerAddress{"127.0.0.1", 5353, false});
  CHECK(parseServerAddress("127.0.0.1").value() == ServerAddress{"127.0.0.1", 53, false});
  CHECK(parseServerAddress("[::1]:5353").value() == ServerAddress{"::1", 5353, true});
  CHECK(parseServerAddress("[::1]").value() == ServerAddress{"::1", 53, true});
  CHECK(parseServerAddress("::1").value() == ServerAddress{"::1", 53, true});
  CHECK(parseServerAddress(" 10.0.0.1:53 ").ok());
  for (const char* bad : {"", "localhost:53", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:x", "[::1", "[::1]x",
                          "[127.0.0.1]:53", "1.2.3:53", "127.0.0.1:"}) {
    CAPTURE(bad);
    CHECK_FALSE(parseServerAddress(bad).ok());
  }
  auto list = parseServerList({"127.0.0.1:5353", "[::1]:53"});
  REQUIRE(list.ok());
  CHECK(list->size() == 2);
  auto err = parseServerList({"127.0.0.1:5353", "dns.example:53"});
  REQUIRE_FALSE(err.ok());
  CHECK(err.error().message.find("dns.example:53") != std::string::npos);
  auto chosen = chooseServers({"127.0.0.1:5353"});
  REQUIRE(chosen.ok());
  CHECK(chosen->at(0).port == 5353);
  auto fromFile = chooseServers({}, "/nonexistent");
  REQUIRE(fromFile.ok());
  CHECK(fromFile->at(0).toString() == "127.0.0.1:53");
}

// =========================================================================================
// UvResolver against a fake server on the same loop
// =========================================================================================

namespace {

struct Query {
  uint16_t id = 0;
  std::string qname;  // with the trailing dot, as ldns prints it
  uint16_t qtype = 0;
  uint16_t ednsSize = 0;
  uint16_t sourcePort = 0;
  bool tcp = false;
  bool ad = false;  // AD in the query (RFC 6840 5.7)
  bool dnssecOk = false;  // DO in the OPT record (RFC 3225)
};

// Responses to one query: each string is sent as one datagram (or TCP message).
using Handler = std::function<std::vector<std::string>(const Query&)>;

Query decodeQuery(const char* data, size_t n) {
  Query q;
  ldns_pkt* p = nullptr;
  if (ldns_wire2pkt(&p, reinterpret_cast<const uint8_t*>(data), n) != LDNS_STATUS_OK) return q;
  q.id = ldns_pkt_id(p);
  q.ednsSize = ldns_pkt_edns_udp_size(p);
  q.ad = ldns_pkt_ad(p);
  q.dnssecOk = ldns_pkt_edns_do(p);
  if (ldns_rr* rr = ldns_rr_list_rr(ldns_pkt_question(p), 0)) {
    char* s = ldns_rdf2str(ldns_rr_owner(rr));
    q.qname = s;
    free(s);
    q.qtype = static_cast<uint16_t>(ldns_rr_get_type(rr));
  }
  ldns_pkt_free(p);
  return q;
}

// An answer to q with the given records (zone-file lines).
std::string reply(const Query& q, std::vector<std::string> answers, uint8_t rcode = 0, bool tc = false,
                  bool ad = false) {
  Pkt d;
  d.id = q.id;
  d.ad = ad;
  d.qname = q.qname;
  d.qtype = q.qtype;
  d.rcode = rcode;
  d.tc = tc;
  d.answers = std::move(answers);
  return build(d);
}

class FakeServer {
 public:
  FakeServer(uv_loop_t* loop, Handler h) : handler_(std::move(h)) {
    for (int attempt = 0; attempt < 20; ++attempt) {
      udp_ = net::newHandle<uv_udp_t>();
      tcp_ = net::newHandle<uv_tcp_t>();
      uv_udp_init(loop, udp_);
      uv_tcp_init(loop, tcp_);
      udp_->data = this;
      tcp_->data = this;
      sockaddr_in addr{};
      uv_ip4_addr("127.0.0.1", 0, &addr);
      REQUIRE(uv_udp_bind(udp_, reinterpret_cast<sockaddr*>(&addr), 0) == 0);
      sockaddr_storage got{};
      int len = sizeof got;
      uv_udp_getsockname(udp_, reinterpret_cast<sockaddr*>(&got), &len);
      port_ = ntohs(reinterpret_cast<sockaddr_in*>(&got)->sin_port);
      uv_ip4_addr("127.0.0.1", port_, &addr);
      if (uv_tcp_bind(tcp_, reinterpret_cast<sockaddr*>(&addr), 0) == 0 &&
          uv_listen(reinterpret_cast<uv_stream_t*>(tcp_), 8, onConnection) == 0)
        break;
      net::closeHandle(udp_);
      net::closeHandle(tcp_);
      udp_ = nullptr;
      tcp_ = nullptr;
    }
    REQUIRE(udp_ != nullptr);
    uv_udp_recv_start(udp_, alloc, onUdp);
  }
  ~FakeServer() {
    net::closeHandle(udp_);
    net::closeHandle(tcp_);
    for (auto* c : conns_) net::closeHandle(c);
  }
  ServerAddress address() const { return ServerAddress{"127.0.0.1", port_, false}; }
  std::vector<Query> queries;

 private:
  static void alloc(uv_handle_t*, size_t, uv_buf_t* buf) {
    static char mem[65536];
    *buf = uv_buf_init(mem, sizeof mem);
  }
  static void onUdp(uv_udp_t* h, ssize_t n, const uv_buf_t* buf, const sockaddr* from, unsigned) {
    if (n <= 0 || from == nullptr) return;
    auto* self = static_cast<FakeServer*>(h->data);
    Query q = decodeQuery(buf->base, static_cast<size_t>(n));
    q.sourcePort = ntohs(reinterpret_cast<const sockaddr_in*>(from)->sin_port);
    self->queries.push_back(q);
    for (auto& r : self->handler_(q)) {
      uv_buf_t b = uv_buf_init(r.data(), static_cast<unsigned>(r.size()));
      uv_udp_try_send(h, &b, 1, from);
    }
  }
  static void onConnection(uv_stream_t* s, int status) {
    if (status < 0) return;
    auto* self = static_cast<FakeServer*>(s->data);
    auto* c = net::newHandle<uv_tcp_t>();
    uv_tcp_init(s->loop, c);
    c->data = self;
    if (uv_accept(s, reinterpret_cast<uv_stream_t*>(c)) != 0) {
      net::closeHandle(c);
      return;
    }
    self->conns_.push_back(c);
    uv_read_start(reinterpret_cast<uv_stream_t*>(c), alloc, onTcp);
  }
  static void onTcp(uv_stream_t* s, ssize_t n, const uv_buf_t* buf) {
    auto* self = static_cast<FakeServer*>(s->data);
    if (n < 0) return;
    self->tcpIn_.append(buf->base, static_cast<size_t>(n));
    while (self->tcpIn_.size() >= 2) {
      size_t len = (static_cast<uint8_t>(self->tcpIn_[0]) << 8) | static_cast<uint8_t>(self->tcpIn_[1]);
      if (self->tcpIn_.size() < len + 2) return;
      Query q = decodeQuery(self->tcpIn_.data() + 2, len);
      q.tcp = true;
      self->tcpIn_.erase(0, len + 2);
      self->queries.push_back(q);
      for (auto& r : self->handler_(q)) {
        std::string framed;
        framed.push_back(static_cast<char>(r.size() >> 8));
        framed.push_back(static_cast<char>(r.size() & 0xff));
        framed += r;
        uv_buf_t b = uv_buf_init(framed.data(), static_cast<unsigned>(framed.size()));
        uv_try_write(s, &b, 1);
      }
    }
  }
  Handler handler_;
  uv_udp_t* udp_ = nullptr;
  uv_tcp_t* tcp_ = nullptr;
  std::vector<uv_tcp_t*> conns_;
  std::string tcpIn_;
  uint16_t port_ = 0;
};

struct Loop {
  uv_loop_t loop{};
  Loop() { uv_loop_init(&loop); }
  ~Loop() {
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(uv_loop_close(&loop) == 0);
  }
  // Runs until done() or the deadline (a safety net: tests must not hang).
  void runUntil(const std::function<bool()>& done, int ms = 5000) {
    auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
    while (!done() && std::chrono::steady_clock::now() < end) uv_run(&loop, UV_RUN_NOWAIT), uv_sleep(1);
  }
};

Handler answerA(const std::string& addr) {
  return [addr](const Query& q) { return std::vector<std::string>{reply(q, {q.qname + " 300 IN A " + addr})}; };
}

Handler silent() {
  return [](const Query&) { return std::vector<std::string>{}; };
}

}  // namespace

TEST_CASE("UvResolver: answer over UDP, callback never synchronous, then from the cache") {
  Loop l;
  util::FakeClock clock;
  {
    FakeServer srv(&l.loop, answerA("192.0.2.1"));
    UvResolver r(&l.loop, {srv.address()}, clock, 1000ms);
    std::vector<Answer> got;
    r.query("Host.Example.TEST.", QType::A, [&](const Answer& a) { got.push_back(a); });
    CHECK(got.empty());
    l.runUntil([&] { return got.size() == 1; });
    REQUIRE(got.size() == 1);
    CHECK(got[0].status == Status::Ok);
    CHECK(got[0].name == "host.example.test");
    CHECK(got[0].addresses == std::vector<std::string>{"192.0.2.1"});
    REQUIRE(srv.queries.size() == 1);
    CHECK(srv.queries[0].qname == "host.example.test.");
    CHECK(srv.queries[0].ednsSize == 1232);
    CHECK(srv.queries[0].sourcePort != 0);

    r.query("host.example.test", QType::A, [&](const Answer& a) { got.push_back(a); });
    CHECK(got.size() == 1);  // cache hit, but still from the loop
    l.runUntil([&] { return got.size() == 2; });
    REQUIRE(got.size() == 2);
    CHECK(got[1].status == Status::Ok);
    CHECK(srv.queries.size() == 1);
    CHECK(r.stats().cacheHits == 1);

    // Invalid names fail from the loop too.
    r.query("bad name", QType::A, [&](const Answer& a) { got.push_back(a); });
    CHECK(got.size() == 2);
    l.runUntil([&] { return got.size() == 3; });
    CHECK(got[2].status == Status::Error);
  }
}

TEST_CASE("UvResolver: TC=1 over UDP -> the same server over TCP") {
  Loop l;
  util::FakeClock clock;
  FakeServer srv(&l.loop, [](const Query& q) {
    if (!q.tcp) return std::vector<std::string>{reply(q, {}, 0, true)};
    std::vector<std::string> rrs;
    for (int i = 1; i <= 100; ++i) rrs.push_back(q.qname + " 300 IN A 10.0.0." + std::to_string(i));
    return std::vector<std::string>{reply(q, rrs)};
  });
  UvResolver r(&l.loop, {srv.address()}, clock, 1000ms);
  std::optional<Answer> got;
  r.query("big.test", QType::A, [&](const Answer& a) { got = a; });
  l.runUntil([&] { return got.has_value(); });
  REQUIRE(got);
  CHECK(got->status == Status::Ok);
  CHECK(got->addresses.size() == 100);
  REQUIRE(srv.queries.size() == 2);
  CHECK_FALSE(srv.queries[0].tcp);
  CHECK(srv.queries[1].tcp);
  CHECK(r.stats().tcpQueries == 1);
}

TEST_CASE("UvResolver: first server silent -> the second answers; SERVFAIL -> next server") {
  Loop l;
  util::FakeClock clock;
  FakeServer dead(&l.loop, silent());
  FakeServer fail(&l.loop, [](const Query& q) { return std::vector<std::string>{reply(q, {}, 2)}; });
  FakeServer good(&l.loop, answerA("192.0.2.2"));
  UvResolver r(&l.loop, {dead.address(), fail.address(), good.address()}, clock, 150ms);
  std::optional<Answer> got;
  const auto t0 = std::chrono::steady_clock::now();
  r.query("x.test", QType::A, [&](const Answer& a) { got = a; });
  l.runUntil([&] { return got.has_value(); });
  REQUIRE(got);
  CHECK(got->status == Status::Ok);
  CHECK(got->addresses == std::vector<std::string>{"192.0.2.2"});
  CHECK(std::chrono::steady_clock::now() - t0 >= 140ms);
  CHECK(dead.queries.size() == 1);
  CHECK(fail.queries.size() == 1);
  CHECK(good.queries.size() == 1);
}

TEST_CASE("UvResolver: mismatched packets are ignored, the right one is taken") {
  Loop l;
  util::FakeClock clock;
  FakeServer srv(&l.loop, [](const Query& q) {
    Query wrongId = q;
    wrongId.id = static_cast<uint16_t>(q.id + 1);
    Query wrongName = q;
    wrongName.qname = "evil.test.";
    return std::vector<std::string>{reply(wrongId, {q.qname + " 300 IN A 6.6.6.6"}),
                                    reply(wrongName, {"evil.test. 300 IN A 6.6.6.7"}), std::string("garbage"),
                                    reply(q, {q.qname + " 300 IN A 192.0.2.3"})};
  });
  UvResolver r(&l.loop, {srv.address()}, clock, 1000ms);
  std::optional<Answer> got;
  r.query("x.test", QType::A, [&](const Answer& a) { got = a; });
  l.runUntil([&] { return got.has_value(); });
  REQUIRE(got);
  CHECK(got->status == Status::Ok);
  CHECK(got->addresses == std::vector<std::string>{"192.0.2.3"});
  CHECK(r.stats().ignoredPackets == 3);
  CHECK(srv.queries.size() == 1);
}

TEST_CASE("UvResolver: timeout after every round, with fresh IDs") {
  Loop l;
  util::FakeClock clock;
  FakeServer srv(&l.loop, silent());
  UvResolver r(&l.loop, {srv.address()}, clock, 80ms, 3);
  std::optional<Answer> got;
  r.query("x.test", QType::MX, [&](const Answer& a) { got = a; });
  l.runUntil([&] { return got.has_value(); });
  REQUIRE(got);
  CHECK(got->status == Status::Timeout);
  CHECK(got->detail.find(srv.address().toString()) != std::string::npos);
  REQUIRE(srv.queries.size() == 3);
  std::set<uint16_t> ids, ports;
  for (const auto& q : srv.queries) {
    ids.insert(q.id);
    ports.insert(q.sourcePort);
  }
  CHECK(ids.size() >= 2);    // 16 random bits: three equal IDs would be a broken RNG
  CHECK(ports.size() >= 2);  // a fresh socket per try
  CHECK(r.inFlight() == 0);
  CHECK(r.cache().size() == 0);  // failures are not cached
}

TEST_CASE("UvResolver: identical queries in flight share one packet") {
  Loop l;
  util::FakeClock clock;
  FakeServer srv(&l.loop, answerA("192.0.2.4"));
  UvResolver r(&l.loop, {srv.address()}, clock, 1000ms);
  int calls = 0;
  for (int i = 0; i < 3; ++i)
    r.query(i == 1 ? "X.TEST" : "x.test", QType::A, [&](const Answer& a) {
      CHECK(a.status == Status::Ok);
      ++calls;
    });
  r.query("x.test", QType::AAAA, [&](const Answer&) { ++calls; });
  l.runUntil([&] { return calls == 4; });
  CHECK(calls == 4);
  CHECK(srv.queries.size() == 2);
  CHECK(r.stats().coalesced == 2);
}

TEST_CASE("UvResolver: CNAME-only answers are followed across queries; loops stop") {
  Loop l;
  util::FakeClock clock;
  FakeServer srv(&l.loop, [](const Query& q) {
    if (q.qname == "www.test.") return std::vector<std::string>{reply(q, {"www.test. 300 IN CNAME mid.test."})};
    if (q.qname == "mid.test.") return std::vector<std::string>{reply(q, {"mid.test. 100 IN CNAME host.test."})};
    if (q.qname == "host.test.") return std::vector<std::string>{reply(q, {"host.test. 300 IN MX 5 mx.host.test."})};
    if (q.qname == "loop1.test.") return std::vector<std::string>{reply(q, {"loop1.test. 300 IN CNAME loop2.test."})};
    if (q.qname == "loop2.test.") return std::vector<std::string>{reply(q, {"loop2.test. 300 IN CNAME loop1.test."})};
    return std::vector<std::string>{reply(q, {}, 3)};
  });
  UvResolver r(&l.loop, {srv.address()}, clock, 1000ms);
  std::optional<Answer> got, loop;
  r.query("www.test", QType::MX, [&](const Answer& a) { got = a; });
  r.query("loop1.test", QType::MX, [&](const Answer& a) { loop = a; });
  l.runUntil([&] { return got && loop; });
  REQUIRE(got);
  CHECK(got->status == Status::Ok);
  CHECK(got->name == "www.test");
  CHECK(got->canonicalName == "host.test");
  CHECK(got->ttl == 100);
  REQUIRE(got->mx.size() == 1);
  CHECK(got->mx[0].exchange == "mx.host.test");
  REQUIRE(loop);
  CHECK(loop->status == Status::Error);
  CHECK(loop->detail.find("loop") != std::string::npos);
}

TEST_CASE("UvResolver: AD=1 in queries, DO on request; a chain is authenticated only if all of it is") {
  Loop l;
  util::FakeClock clock;
  std::vector<Query> seen;
  FakeServer srv(&l.loop, [&](const Query& q) {
    seen.push_back(q);
    const std::string tlsa = " 300 IN TLSA 3 1 1 " + std::string(64, 'b');
    // signed: one answer with AD. half: CNAME with AD, target without. whole: both with AD.
    if (q.qname == "_25._tcp.signed.test.") return std::vector<std::string>{reply(q, {q.qname + tlsa}, 0, false, true)};
    if (q.qname == "_25._tcp.half.test.")
      return std::vector<std::string>{reply(q, {q.qname + " 300 IN CNAME _25._tcp.plain.test."}, 0, false, true)};
    if (q.qname == "_25._tcp.whole.test.")
      return std::vector<std::string>{reply(q, {q.qname + " 300 IN CNAME _25._tcp.signed2.test."}, 0, false, true)};
    if (q.qname == "_25._tcp.signed2.test.") return std::vector<std::string>{reply(q, {q.qname + tlsa}, 0, false, true)};
    if (q.qname == "_25._tcp.plain.test.") return std::vector<std::string>{reply(q, {q.qname + tlsa})};
    return std::vector<std::string>{reply(q, {}, 3)};
  });
  UvResolver r(&l.loop, {srv.address()}, clock, 1000ms);
  std::optional<Answer> sig, half, whole, plain;
  r.query("_25._tcp.signed.test", QType::TLSA, [&](const Answer& a) { sig = a; });
  r.query("_25._tcp.half.test", QType::TLSA, [&](const Answer& a) { half = a; });
  r.query("_25._tcp.whole.test", QType::TLSA, [&](const Answer& a) { whole = a; });
  l.runUntil([&] { return sig && half && whole; });
  REQUIRE(sig);
  REQUIRE(half);
  REQUIRE(whole);
  CHECK(sig->status == Status::Ok);
  CHECK(sig->authenticated);
  REQUIRE(sig->tlsa.size() == 1);
  CHECK(sig->tlsa[0].data == std::vector<uint8_t>(32, 0xbb));
  CHECK(half->status == Status::Ok);
  CHECK(half->canonicalName == "_25._tcp.plain.test");
  CHECK_FALSE(half->authenticated);
  CHECK(whole->status == Status::Ok);
  CHECK(whole->authenticated);
  REQUIRE_FALSE(seen.empty());
  for (const auto& q : seen) {
    CHECK(q.ad);
    CHECK_FALSE(q.dnssecOk);
  }
  // From the cache: the same flag.
  std::optional<Answer> again;
  r.query("_25._tcp.signed.test", QType::TLSA, [&](const Answer& a) { again = a; });
  l.runUntil([&] { return again.has_value(); });
  REQUIRE(again);
  CHECK(again->authenticated);
  CHECK(r.stats().cacheHits == 1);

  seen.clear();
  r.setDnssecOk(true);
  r.query("_25._tcp.plain.test", QType::TLSA, [&](const Answer& a) { plain = a; });
  l.runUntil([&] { return plain.has_value(); });
  REQUIRE(plain);
  CHECK_FALSE(plain->authenticated);
  REQUIRE(seen.size() == 1);
  CHECK(seen[0].ad);
  CHECK(seen[0].dnssecOk);
}

TEST_CASE("UvResolver: destroying it cancels everything, no callback afterwards") {
  Loop l;
  util::FakeClock clock;
  FakeServer quiet(&l.loop, silent());
  FakeServer tcpOnly(&l.loop, [](const Query& q) {
    if (!q.tcp) return std::vector<std::string>{reply(q, {}, 0, true)};
    return std::vector<std::string>{};  // hang on TCP
  });
  int calls = 0;
  {
    UvResolver r(&l.loop, {quiet.address()}, clock, 5000ms);
    r.query("a.test", QType::A, [&](const Answer&) { ++calls; });
    r.query("a.test", QType::A, [&](const Answer&) { ++calls; });
    r.query("bad name", QType::A, [&](const Answer&) { ++calls; });  // queued for the loop
    uv_run(&l.loop, UV_RUN_NOWAIT);
  }
  {
    UvResolver r(&l.loop, {tcpOnly.address()}, clock, 5000ms);
    r.query("b.test", QType::A, [&](const Answer&) { ++calls; });
    l.runUntil([&] { return tcpOnly.queries.size() == 2; }, 2000);
    CHECK(tcpOnly.queries.size() == 2);  // the resolver is now waiting on TCP
  }
  for (int i = 0; i < 20; ++i) uv_run(&l.loop, UV_RUN_NOWAIT);
  CHECK(calls == 1);  // only the invalid name, delivered before the first destruction
}

TEST_CASE("UvResolver: a callback may destroy the resolver") {
  Loop l;
  util::FakeClock clock;
  FakeServer srv(&l.loop, answerA("192.0.2.5"));
  auto r = std::make_unique<UvResolver>(&l.loop, std::vector<ServerAddress>{srv.address()}, clock, 1000ms);
  int calls = 0;
  r->query("x.test", QType::A, [&](const Answer&) {
    ++calls;
    r.reset();
  });
  r->query("x.test", QType::A, [&](const Answer&) { ++calls; });  // coalesced: must not run
  l.runUntil([&] { return r == nullptr; });
  for (int i = 0; i < 5; ++i) uv_run(&l.loop, UV_RUN_NOWAIT);
  CHECK(calls == 1);
}

TEST_CASE("UvResolver: a dead UDP port fails fast and the next server answers") {
  Loop l;
  util::FakeClock clock;
  FakeServer good(&l.loop, answerA("192.0.2.6"));
  // A port nobody listens on: bind, read the number, close.
  uv_udp_t* probe = net::newHandle<uv_udp_t>();
  uv_udp_init(&l.loop, probe);
  sockaddr_in addr{};
  uv_ip4_addr("127.0.0.1", 0, &addr);
  uv_udp_bind(probe, reinterpret_cast<sockaddr*>(&addr), 0);
  sockaddr_storage got{};
  int len = sizeof got;
  uv_udp_getsockname(probe, reinterpret_cast<sockaddr*>(&got), &len);
  const uint16_t deadPort = ntohs(reinterpret_cast<sockaddr_in*>(&got)->sin_port);
  net::closeHandle(probe);
  uv_run(&l.loop, UV_RUN_NOWAIT);

  UvResolver r(&l.loop, {ServerAddress{"127.0.0.1", deadPort, false}, good.address()}, clock, 3000ms);
  std::optional<Answer> ans;
  const auto t0 = std::chrono::steady_clock::now();
  r.query("x.test", QType::A, [&](const Answer& a) { ans = a; });
  l.runUntil([&] { return ans.has_value(); });
  REQUIRE(ans);
  CHECK(ans->status == Status::Ok);
  CHECK(std::chrono::steady_clock::now() - t0 < 2000ms);  // ICMP refusal, not the 3 s timeout
}
