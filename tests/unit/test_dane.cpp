// tls/dane.h and the DANE hook of TlsEngine (RFC 7672). Certificates are made at test time:
// a root CA, an intermediate CA and leaves with chosen names and validity, all P-256. The
// core is checked for every usage / selector / matching type combination, mismatches,
// dates (ignored by DANE-EE, enforced by DANE-TA), names (DANE-TA only), unusable records
// and digest agility; the engine with two TlsEngines back to back in memory.
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <optional>
#include <string>
#include <vector>

// BoringSSL's headers arrive through -I and are not pedantic-clean.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpedantic"
#pragma GCC diagnostic ignored "-Wignored-qualifiers"
#include <openssl/bn.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/obj_mac.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#pragma GCC diagnostic pop

#include "tls/dane.h"
#include "tls/tls_context.h"
#include "tls/tls_engine.h"
#include "util/cptr.h"

using namespace subrelay;
using tls::DaneParams;
using tls::DaneStatus;
using tls::TlsaRecord;

namespace {

using PkeyPtr = util::CPtr<EVP_PKEY, EVP_PKEY_free>;
using PkeyCtxPtr = util::CPtr<EVP_PKEY_CTX, EVP_PKEY_CTX_free>;
using X509Ptr = util::CPtr<X509, X509_free>;
using BioPtr = util::CPtr<BIO, BIO_free>;

PkeyPtr newKey() {
  PkeyCtxPtr pctx(EVP_PKEY_CTX_new_id(EVP_PKEY_EC, nullptr));
  REQUIRE(pctx);
  REQUIRE(EVP_PKEY_keygen_init(pctx.get()) > 0);
  REQUIRE(EVP_PKEY_CTX_set_ec_paramgen_curve_nid(pctx.get(), NID_X9_62_prime256v1) > 0);
  EVP_PKEY* key = nullptr;
  REQUIRE(EVP_PKEY_keygen(pctx.get(), &key) > 0);
  return PkeyPtr(key);
}

struct CertSpec {
  std::string cn;
  std::vector<std::string> dnsNames;  // subjectAltName DNS-IDs
  bool ca = false;
  long notBefore = -3600;  // seconds from now
  long notAfter = 86400;
};

struct Issued {
  X509Ptr cert;
  PkeyPtr key;
};

// A certificate for spec, signed by issuer (self-signed when issuer is null).
Issued issue(const CertSpec& spec, const Issued* issuer) {
  static long serial = 1;
  Issued out{X509Ptr(X509_new()), newKey()};
  X509* x = out.cert.get();
  REQUIRE(X509_set_version(x, 2));
  REQUIRE(ASN1_INTEGER_set(X509_get_serialNumber(x), serial++));
  REQUIRE(X509_gmtime_adj(X509_getm_notBefore(x), spec.notBefore));
  REQUIRE(X509_gmtime_adj(X509_getm_notAfter(x), spec.notAfter));
  REQUIRE(X509_set_pubkey(x, out.key.get()));
  X509_NAME* name = X509_get_subject_name(x);
  REQUIRE(X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>(spec.cn.c_str()),
                                     -1, -1, 0));
  REQUIRE(X509_set_issuer_name(x, issuer ? X509_get_subject_name(issuer->cert.get()) : name));

  BASIC_CONSTRAINTS* bc = BASIC_CONSTRAINTS_new();
  REQUIRE(bc != nullptr);
  bc->ca = spec.ca ? 1 : 0;
  REQUIRE(X509_add1_ext_i2d(x, NID_basic_constraints, bc, 1, X509V3_ADD_DEFAULT));
  BASIC_CONSTRAINTS_free(bc);
  if (spec.ca) {
    ASN1_BIT_STRING* usage = ASN1_BIT_STRING_new();
    REQUIRE(usage != nullptr);
    REQUIRE(ASN1_BIT_STRING_set_bit(usage, 5, 1));  // keyCertSign
    REQUIRE(ASN1_BIT_STRING_set_bit(usage, 6, 1));  // cRLSign
    REQUIRE(X509_add1_ext_i2d(x, NID_key_usage, usage, 1, X509V3_ADD_DEFAULT));
    ASN1_BIT_STRING_free(usage);
  }
  if (!spec.dnsNames.empty()) {
    GENERAL_NAMES* names = sk_GENERAL_NAME_new_null();
    REQUIRE(names != nullptr);
    for (const auto& n : spec.dnsNames) {
      GENERAL_NAME* gn = GENERAL_NAME_new();
      ASN1_IA5STRING* ia5 = ASN1_IA5STRING_new();
      REQUIRE((gn != nullptr && ia5 != nullptr));
      REQUIRE(ASN1_STRING_set(ia5, n.data(), static_cast<int>(n.size())));
      GENERAL_NAME_set0_value(gn, GEN_DNS, ia5);
      REQUIRE(sk_GENERAL_NAME_push(names, gn));
    }
    REQUIRE(X509_add1_ext_i2d(x, NID_subject_alt_name, names, 0, X509V3_ADD_DEFAULT));
    GENERAL_NAMES_free(names);
  }
  REQUIRE(X509_sign(x, issuer ? issuer->key.get() : out.key.get(), EVP_sha256()));
  return out;
}

std::string der(X509* x) {
  unsigned char* buf = nullptr;
  const int n = i2d_X509(x, &buf);
  REQUIRE(n > 0);
  std::string out(reinterpret_cast<const char*>(buf), static_cast<size_t>(n));
  OPENSSL_free(buf);
  return out;
}

std::string spkiDer(X509* x) {
  unsigned char* buf = nullptr;
  const int n = i2d_X509_PUBKEY(X509_get_X509_PUBKEY(x), &buf);
  REQUIRE(n > 0);
  std::string out(reinterpret_cast<const char*>(buf), static_cast<size_t>(n));
  OPENSSL_free(buf);
  return out;
}

std::string pem(X509* x) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  REQUIRE(PEM_write_bio_X509(bio.get(), x));
  char* p = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &p);
  return std::string(p, static_cast<size_t>(n));
}

std::string keyPem(EVP_PKEY* k) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  REQUIRE(PEM_write_bio_PrivateKey(bio.get(), k, nullptr, nullptr, 0, nullptr, nullptr));
  char* p = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &p);
  return std::string(p, static_cast<size_t>(n));
}

// The association data for (selector, matching type) of a certificate, as a publisher
// would compute it (RFC 6698 2.1.2, 2.1.3).
std::vector<uint8_t> association(X509* x, uint8_t selector, uint8_t matchingType) {
  const std::string sel = selector == 0 ? der(x) : spkiDer(x);
  if (matchingType == 0) return {sel.begin(), sel.end()};
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  REQUIRE(EVP_Digest(sel.data(), sel.size(), md, &len, matchingType == 1 ? EVP_sha256() : EVP_sha512(), nullptr));
  return {md, md + len};
}

TlsaRecord record(uint8_t usage, uint8_t selector, uint8_t matchingType, X509* x) {
  return TlsaRecord{usage, selector, matchingType, association(x, selector, matchingType)};
}

// The test PKI: root CA -> intermediate CA -> leaves.
struct Pki {
  Issued root = issue({"Test Root CA", {}, true, -86400, 10 * 86400}, nullptr);
  Issued inter = issue({"Test Intermediate CA", {}, true, -86400, 10 * 86400}, &root);
  Issued leaf = issue({"mx.example.test", {"mx.example.test"}, false}, &inter);
  Issued expired = issue({"mx.example.test", {"mx.example.test"}, false, -7200, -3600}, &inter);
  Issued notYet = issue({"mx.example.test", {"mx.example.test"}, false, 3600, 7200}, &inter);
  Issued otherName = issue({"mail.elsewhere.test", {"mail.elsewhere.test"}, false}, &inter);
  Issued wildcard = issue({"wild", {"*.example.test"}, false}, &inter);
  Issued cnOnly = issue({"mx.example.test", {}, false}, &inter);
  // Another CA with the same name as the intermediate, and a leaf from it.
  Issued impostorCa = issue({"Test Intermediate CA", {}, true, -86400, 10 * 86400}, nullptr);
  Issued impostorLeaf = issue({"mx.example.test", {"mx.example.test"}, false}, &impostorCa);
  // A leaf signed directly by the root (for a bare-key trust anchor not in the chain).
  Issued rootLeaf = issue({"mx.example.test", {"mx.example.test"}, false}, &root);
  // A self-signed leaf, as with DANE-EE deployments.
  Issued selfSigned = issue({"mx.example.test", {"mx.example.test"}, false}, nullptr);

  std::vector<std::string> chain(const Issued& l, bool withRoot = true) const {
    std::vector<std::string> c{der(l.cert.get()), der(inter.cert.get())};
    if (withRoot) c.push_back(der(root.cert.get()));
    return c;
  }
};

const Pki& pki() {
  static const Pki p;
  return p;
}

const std::vector<std::string> kNames{"mx.example.test", "example.test"};

tls::DaneResult verify(std::vector<TlsaRecord> rrs, const std::vector<std::string>& chain,
                       std::vector<std::string> names = kNames) {
  DaneParams p;
  p.tlsa = std::move(rrs);
  p.referenceNames = std::move(names);
  auto r = tls::verifyDane(p, chain, std::chrono::system_clock::now());
  MESSAGE(std::string(tls::daneStatusName(r.status)) << ": " << r.reason);
  return r;
}

bool contains(const std::string& s, const std::string& what) { return s.find(what) != std::string::npos; }

}  // namespace

TEST_CASE("usable records: DANE-TA and DANE-EE only, known selectors and digests of the right length") {
  const std::vector<uint8_t> d32(32, 1), d64(64, 2);
  CHECK(tls::isUsable({3, 1, 1, d32}));
  CHECK(tls::isUsable({3, 0, 2, d64}));
  CHECK(tls::isUsable({2, 0, 1, d32}));
  CHECK(tls::isUsable({2, 1, 0, {1, 2, 3}}));
  CHECK(tls::isUsable({3, 0, 0, {1}}));
  CHECK(contains(tls::unusableReason({0, 0, 1, d32}), "RFC 7672 3.1.3"));
  CHECK(contains(tls::unusableReason({1, 1, 1, d32}), "PKIX-EE"));
  CHECK(contains(tls::unusableReason({4, 1, 1, d32}), "usage"));
  CHECK(contains(tls::unusableReason({3, 2, 1, d32}), "selector"));
  CHECK(contains(tls::unusableReason({3, 1, 3, d32}), "matching type"));
  CHECK(contains(tls::unusableReason({3, 1, 1, std::vector<uint8_t>(31, 1)}), "32"));
  CHECK(contains(tls::unusableReason({3, 1, 2, d32}), "64"));
  CHECK_FALSE(tls::isUsable({3, 1, 0, {}}));
  CHECK(tls::tlsaText({3, 1, 1, {0xab, 0x12, 0xcd}}) == "3 1 1 ab12cd");
  CHECK(tls::tlsaText({3, 1, 1, d32}, 8) == "3 1 1 01010101...");
  CHECK(std::string(tls::daneStatusName(DaneStatus::NoUsableRecords)) == "no usable records");
}

TEST_CASE("DANE-EE: every selector and matching type matches the leaf, at depth 0") {
  const auto& k = pki();
  for (uint8_t selector : {0, 1}) {
    for (uint8_t mtype : {0, 1, 2}) {
      CAPTURE(int(selector));
      CAPTURE(int(mtype));
      auto r = verify({record(3, selector, mtype, k.leaf.cert.get())}, k.chain(k.leaf));
      CHECK(r.status == DaneStatus::Verified);
      CHECK(r.matchedRecord == 0);
      CHECK(r.matchedDepth == 0);
      CHECK(contains(r.reason, "DANE-EE 3 " + std::to_string(selector) + " " + std::to_string(mtype)));
      // The same record data for the intermediate does not match the leaf.
      auto wrong = verify({record(3, selector, mtype, k.inter.cert.get())}, k.chain(k.leaf));
      CHECK(wrong.status == DaneStatus::Mismatch);
      CHECK(contains(wrong.reason, "no TLSA record matched"));
    }
  }
}

TEST_CASE("DANE-EE: names and dates are not checked (RFC 7672 3.1.1, 3.2.1)") {
  const auto& k = pki();
  for (const Issued* l : {&k.expired, &k.notYet, &k.otherName, &k.selfSigned}) {
    auto r = verify({record(3, 1, 1, l->cert.get())}, {der(l->cert.get())});
    CHECK(r.status == DaneStatus::Verified);
  }
  // No reference identifiers at all: still fine for DANE-EE.
  CHECK(verify({record(3, 1, 1, k.leaf.cert.get())}, k.chain(k.leaf), {}).status == DaneStatus::Verified);
}

TEST_CASE("DANE-EE mismatch: the reason names the record and what the leaf has") {
  const auto& k = pki();
  TlsaRecord wrong{3, 1, 1, std::vector<uint8_t>(32, 0xab)};
  auto r = verify({wrong}, k.chain(k.leaf));
  REQUIRE(r.status == DaneStatus::Mismatch);
  CHECK(r.matchedRecord == -1);
  const auto leafSpki = association(k.leaf.cert.get(), 1, 1);
  std::string leafHex;
  for (size_t i = 0; i < 7; ++i) {
    static const char d[] = "0123456789abcdef";
    leafHex += d[leafSpki[i] >> 4];
    leafHex += d[leafSpki[i] & 15];
  }
  CHECK(contains(r.reason, "no TLSA record matched: 3 1 1 abababab"));
  CHECK(contains(r.reason, "vs leaf SPKI sha256 " + leafHex));
}

TEST_CASE("DANE-TA: root or intermediate, every selector and matching type, with name checks") {
  const auto& k = pki();
  for (const Issued* ta : {&k.inter, &k.root}) {
    const int depth = ta == &k.inter ? 1 : 2;
    for (uint8_t selector : {0, 1}) {
      for (uint8_t mtype : {0, 1, 2}) {
        CAPTURE(depth);
        CAPTURE(int(selector));
        CAPTURE(int(mtype));
        auto r = verify({record(2, selector, mtype, ta->cert.get())}, k.chain(k.leaf));
        CHECK(r.status == DaneStatus::Verified);
        CHECK(r.matchedDepth == depth);
        CHECK(contains(r.reason, "name mx.example.test"));
        CHECK(contains(r.reason, "chain valid"));
      }
    }
  }
}

TEST_CASE("DANE-TA: dates are enforced") {
  const auto& k = pki();
  auto ta = record(2, 0, 1, k.inter.cert.get());
  auto r = verify({ta}, k.chain(k.expired));
  CHECK(r.status == DaneStatus::Mismatch);
  CHECK(contains(r.reason, "expired"));
  r = verify({ta}, k.chain(k.notYet));
  CHECK(r.status == DaneStatus::Mismatch);
  CHECK(contains(r.reason, "not yet valid"));
  // The same chains pass at a time when they are valid.
  DaneParams p{{ta}, kNames};
  auto later = tls::verifyDane(p, k.chain(k.notYet), std::chrono::system_clock::now() + std::chrono::hours(1) +
                                                         std::chrono::minutes(30));
  CHECK(later.status == DaneStatus::Verified);
  // A CA expired by then fails too (root valid 10 days).
  auto muchLater = tls::verifyDane(p, k.chain(k.leaf), std::chrono::system_clock::now() + std::chrono::hours(24 * 20));
  CHECK(muchLater.status == DaneStatus::Mismatch);
}

TEST_CASE("DANE-TA: the leaf must carry a reference identifier (RFC 7672 3.2.2, 3.2.3)") {
  const auto& k = pki();
  auto ta = record(2, 1, 1, k.root.cert.get());
  auto r = verify({ta}, k.chain(k.otherName));
  CHECK(r.status == DaneStatus::Mismatch);
  CHECK(contains(r.reason, "matches none of the names mx.example.test, example.test"));
  // The next-hop domain as second identifier is enough.
  CHECK(verify({ta}, k.chain(k.otherName), {"mx.example.test", "mail.elsewhere.test"}).status ==
        DaneStatus::Verified);
  // Case does not matter.
  CHECK(verify({ta}, k.chain(k.leaf), {"MX.Example.TEST"}).status == DaneStatus::Verified);
  // No names given: nothing can match.
  CHECK(verify({ta}, k.chain(k.leaf), {}).status == DaneStatus::Mismatch);
  // A wildcard stands for exactly one left-most label.
  CHECK(verify({ta}, k.chain(k.wildcard), {"mx1.example.test"}).status == DaneStatus::Verified);
  CHECK(verify({ta}, k.chain(k.wildcard), {"a.mx1.example.test"}).status == DaneStatus::Mismatch);
  CHECK(verify({ta}, k.chain(k.wildcard), {"example.test"}).status == DaneStatus::Mismatch);
  // Without DNS-IDs the CN-ID counts.
  CHECK(verify({ta}, k.chain(k.cnOnly)).status == DaneStatus::Verified);
}

TEST_CASE("DANE-TA: a matching CA that did not issue the chain is no trust anchor") {
  const auto& k = pki();
  // The server sends its leaf (from the impostor CA) with the real intermediate behind it.
  std::vector<std::string> chain{der(k.impostorLeaf.cert.get()), der(k.inter.cert.get())};
  auto r = verify({record(2, 0, 1, k.inter.cert.get())}, chain);
  CHECK(r.status == DaneStatus::Mismatch);
  CHECK(contains(r.reason, "does not validate"));
  // A TA record matching only the leaf is not a trust anchor: that is DANE-EE's job.
  r = verify({record(2, 0, 1, k.selfSigned.cert.get())}, {der(k.selfSigned.cert.get())});
  CHECK(r.status == DaneStatus::Mismatch);
  CHECK(contains(r.reason, "matches no issuer certificate"));
  // The TA must be presented (RFC 7672 3.1.2): a digest of a CA the server did not send fails.
  r = verify({record(2, 0, 1, k.root.cert.get())}, k.chain(k.leaf, false));
  CHECK(r.status == DaneStatus::Mismatch);
}

TEST_CASE("DANE-TA SPKI(1) Full(0): a bare trust-anchor key the server need not send") {
  const auto& k = pki();
  auto bare = record(2, 1, 0, k.root.cert.get());
  // Leaf from the root directly, only the leaf presented.
  auto r = verify({bare}, {der(k.rootLeaf.cert.get())});
  CHECK(r.status == DaneStatus::Verified);
  CHECK(r.matchedDepth == 0);
  CHECK(contains(r.reason, "key signed"));
  // Leaf and intermediate presented, the root not.
  r = verify({bare}, k.chain(k.leaf, false));
  CHECK(r.status == DaneStatus::Verified);
  CHECK(r.matchedDepth == 1);
  // Still name-checked and dated.
  CHECK(verify({bare}, k.chain(k.otherName, false)).status == DaneStatus::Mismatch);
  CHECK(verify({bare}, k.chain(k.expired, false)).status == DaneStatus::Mismatch);
  // Another key signed nothing here.
  CHECK(verify({record(2, 1, 0, k.impostorCa.cert.get())}, k.chain(k.leaf, false)).status == DaneStatus::Mismatch);
  // Garbage instead of a key: no match, no crash.
  CHECK(verify({TlsaRecord{2, 1, 0, {0x30, 0x03, 0x01, 0x02}}}, k.chain(k.leaf, false)).status ==
        DaneStatus::Mismatch);
}

TEST_CASE("unusable-only RRsets: TLS without authentication; unusable records never match") {
  const auto& k = pki();
  // PKIX-TA / PKIX-EE records that would match, and an unknown matching type.
  auto r = verify({record(0, 0, 1, k.root.cert.get()), record(1, 1, 1, k.leaf.cert.get()),
                   TlsaRecord{3, 1, 9, {1, 2, 3}}},
                  k.chain(k.leaf));
  CHECK(r.status == DaneStatus::NoUsableRecords);
  CHECK(contains(r.reason, "RFC 7672 3.1.3"));
  CHECK(contains(r.reason, "unknown matching type 9"));
  CHECK(contains(r.reason, "TLS without authentication"));
  CHECK(verify({}, k.chain(k.leaf)).status == DaneStatus::NoUsableRecords);
  // Mixed: the usable record decides.
  r = verify({record(1, 1, 1, k.leaf.cert.get()), record(3, 1, 1, k.leaf.cert.get())}, k.chain(k.leaf));
  CHECK(r.status == DaneStatus::Verified);
  CHECK(r.matchedRecord == 1);
  r = verify({record(1, 1, 1, k.leaf.cert.get()), TlsaRecord{3, 1, 1, std::vector<uint8_t>(32, 0)}}, k.chain(k.leaf));
  CHECK(r.status == DaneStatus::Mismatch);
}

TEST_CASE("several records: any usable one may match; digest agility (RFC 7671 9)") {
  const auto& k = pki();
  TlsaRecord junk256{3, 1, 1, std::vector<uint8_t>(32, 7)};
  auto r = verify({junk256, record(2, 0, 1, k.inter.cert.get())}, k.chain(k.leaf));
  CHECK(r.status == DaneStatus::Verified);
  CHECK(r.matchedRecord == 1);
  // Key rollover (RFC 7672 4): the old and the new key both published, the new one in use.
  r = verify({record(3, 1, 1, k.otherName.cert.get()), record(3, 1, 1, k.leaf.cert.get())}, k.chain(k.leaf));
  CHECK(r.status == DaneStatus::Verified);
  CHECK(r.matchedRecord == 1);
  // A matching SHA2-256 record is not used when a SHA2-512 one is published for the same
  // usage and selector.
  TlsaRecord junk512{3, 1, 2, std::vector<uint8_t>(64, 7)};
  r = verify({record(3, 1, 1, k.leaf.cert.get()), junk512}, k.chain(k.leaf));
  CHECK(r.status == DaneStatus::Mismatch);
  CHECK(contains(r.reason, "stronger digest"));
  // ... but another selector is another family.
  r = verify({record(3, 0, 1, k.leaf.cert.get()), junk512}, k.chain(k.leaf));
  CHECK(r.status == DaneStatus::Verified);
}

TEST_CASE("bad input: no chain, undecodable certificates") {
  const auto& k = pki();
  auto rr = record(3, 1, 1, k.leaf.cert.get());
  auto r = verify({rr}, {});
  CHECK(r.status == DaneStatus::Mismatch);
  CHECK(contains(r.reason, "no certificate"));
  r = verify({rr}, {"not DER"});
  CHECK(r.status == DaneStatus::Mismatch);
  CHECK(contains(r.reason, "does not parse"));
  std::string cut = der(k.leaf.cert.get());
  cut.resize(cut.size() - 5);
  CHECK(verify({rr}, {cut}).status == DaneStatus::Mismatch);
  std::string trailing = der(k.leaf.cert.get()) + "x";
  CHECK(verify({rr}, {trailing}).status == DaneStatus::Mismatch);
}

// =========================================================================================
// TlsEngine::useDane: a real handshake in memory
// =========================================================================================

namespace {

using tls::EngineState;
using tls::TlsContext;
using tls::TlsEngine;

void shuttle(TlsEngine& a, TlsEngine& b) {
  for (int rounds = 0; rounds < 100; ++rounds) {
    bool moved = false;
    for (auto [from, to] : {std::pair{&a, &b}, std::pair{&b, &a}}) {
      if (!from->hasCiphertext()) continue;
      moved = true;
      to->feedCiphertext(from->takeCiphertext());
    }
    if (!moved) return;
  }
  FAIL("shuttle did not settle");
}

// The server presents leaf + intermediate + root (RFC 7672 3.1.2: the TA in the chain).
std::shared_ptr<TlsContext> serverCtx(const Issued& leaf) {
  const auto& k = pki();
  auto r = TlsContext::serverFromPem(pem(leaf.cert.get()) + pem(k.inter.cert.get()) + pem(k.root.cert.get()),
                                     keyPem(leaf.key.get()));
  REQUIRE_MESSAGE(r.ok(), (r.ok() ? "" : r.error().message));
  return *r;
}

std::shared_ptr<TlsContext> clientCtx(bool verifyPeer = false) {
  tls::ClientOptions o;
  o.verifyPeer = verifyPeer;  // PKIX against the system store: would fail for our test CA
  auto r = TlsContext::client(o);
  REQUIRE(r.ok());
  return *r;
}

struct Handshake {
  TlsEngine client;
  TlsEngine server;
  Handshake(std::shared_ptr<TlsContext> c, const Issued& leaf, std::optional<DaneParams> dane,
            int maxVersion = 0)
      : client(std::move(c), "mx.example.test"), server(serverCtx(leaf)) {
    if (maxVersion) REQUIRE(SSL_set_max_proto_version(client.native(), static_cast<uint16_t>(maxVersion)));
    if (dane) client.useDane(std::move(*dane));
    server.start();
    client.start();
    client.writePlaintext("EHLO client.test\r\n");  // must not reach an unauthenticated server
    shuttle(client, server);
  }
};

}  // namespace

TEST_CASE("TlsEngine with DANE: a matching record opens the connection") {
  const auto& k = pki();
  for (int version : {TLS1_3_VERSION, TLS1_2_VERSION}) {
    for (bool pkix : {false, true}) {
      CAPTURE(version);
      CAPTURE(pkix);
      Handshake h(clientCtx(pkix), k.leaf, DaneParams{{record(3, 1, 1, k.leaf.cert.get())}, kNames}, version);
      REQUIRE(h.client.state() == EngineState::Open);
      CHECK(h.server.state() == EngineState::Open);
      CHECK(h.client.usingDane());
      REQUIRE(h.client.daneResult());
      CHECK(h.client.daneResult()->status == DaneStatus::Verified);
      CHECK(h.client.peerVerifyError().empty());
      CHECK(h.server.takePlaintext() == "EHLO client.test\r\n");
    }
  }
  // DANE-TA over the full chain the server sent; SNI is the TLSA base domain.
  Handshake ta(clientCtx(), k.leaf, DaneParams{{record(2, 0, 1, k.root.cert.get())}, {"mx.example.test", "example.test"}});
  REQUIRE(ta.client.state() == EngineState::Open);
  CHECK(ta.client.daneResult()->matchedDepth == 2);
  const char* sni = SSL_get_servername(ta.server.native(), TLSEXT_NAMETYPE_host_name);
  REQUIRE(sni != nullptr);
  CHECK(std::string(sni) == "mx.example.test");
}

TEST_CASE("TlsEngine with DANE: a wrong record fails the handshake with the reason") {
  const auto& k = pki();
  for (int version : {TLS1_3_VERSION, TLS1_2_VERSION}) {
    CAPTURE(version);
    Handshake h(clientCtx(), k.leaf, DaneParams{{TlsaRecord{3, 1, 1, std::vector<uint8_t>(32, 0xab)}}, kNames}, version);
    CHECK(h.client.state() == EngineState::Failed);
    CHECK(h.server.state() == EngineState::Failed);  // our alert reached it
    CHECK(h.server.takePlaintext().empty());         // and no application data did
    REQUIRE(h.client.daneResult());
    CHECK(h.client.daneResult()->status == DaneStatus::Mismatch);
    CHECK(contains(h.client.error(), "DANE verification failed: no TLSA record matched: 3 1 1 abababab"));
    CHECK(contains(h.client.peerVerifyError(), "vs leaf SPKI sha256"));
    CHECK(TlsEngine::isCertificateRejection(h.server.error()));
    MESSAGE("client: " << h.client.error());
    MESSAGE("server: " << h.server.error());
  }
  // DANE-TA with a certificate for another name.
  Handshake name(clientCtx(), k.otherName, DaneParams{{record(2, 0, 1, k.inter.cert.get())}, kNames});
  CHECK(name.client.state() == EngineState::Failed);
  CHECK(contains(name.client.peerVerifyError(), "matches none of the names"));
  // DANE-TA with an expired leaf; DANE-EE accepts the same server.
  Handshake expired(clientCtx(), k.expired, DaneParams{{record(2, 0, 1, k.inter.cert.get())}, kNames});
  CHECK(expired.client.state() == EngineState::Failed);
  CHECK(contains(expired.client.peerVerifyError(), "expired"));
  Handshake expiredEe(clientCtx(), k.expired, DaneParams{{record(3, 0, 1, k.expired.cert.get())}, kNames});
  CHECK(expiredEe.client.state() == EngineState::Open);
}

TEST_CASE("TlsEngine with DANE: unusable-only records give unauthenticated TLS; others are unaffected") {
  const auto& k = pki();
  Handshake h(clientCtx(), k.leaf, DaneParams{{record(1, 1, 1, k.leaf.cert.get())}, kNames});
  REQUIRE(h.client.state() == EngineState::Open);
  REQUIRE(h.client.daneResult());
  CHECK(h.client.daneResult()->status == DaneStatus::NoUsableRecords);
  CHECK(h.client.peerVerifyError().empty());

  // The shared context keeps its own behaviour for engines without DANE: PKIX fails
  // against the system store, opportunistic accepts anything.
  auto pkix = clientCtx(true);
  Handshake plain(pkix, k.leaf, std::nullopt);
  CHECK(plain.client.state() == EngineState::Failed);
  CHECK(contains(plain.client.error(), "certificate verification failed"));
  CHECK_FALSE(plain.client.usingDane());
  CHECK_FALSE(plain.client.daneResult());
  Handshake opportunistic(clientCtx(false), k.leaf, std::nullopt);
  CHECK(opportunistic.client.state() == EngineState::Open);
}

namespace {
SSL_SESSION* g_daneSession = nullptr;
int keepDaneSession(SSL* /*ssl*/, SSL_SESSION* sess) {
  SSL_SESSION_free(g_daneSession);
  g_daneSession = sess;
  return 1;
}
}  // namespace

TEST_CASE("TlsEngine with DANE: never resumes, the certificate is checked on every connection") {
  const auto& k = pki();
  auto ctx = clientCtx();
  SSL_CTX_set_session_cache_mode(ctx->native(), SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
  SSL_CTX_sess_set_new_cb(ctx->native(), keepDaneSession);
  auto server = serverCtx(k.leaf);
  DaneParams params{{record(3, 1, 1, k.leaf.cert.get())}, kNames};
  {
    TlsEngine client(ctx, "mx.example.test");
    TlsEngine srv(server);
    client.useDane(params);
    srv.start();
    client.start();
    shuttle(client, srv);
    srv.writePlaintext("220\r\n");
    shuttle(client, srv);
    REQUIRE(client.state() == EngineState::Open);
    client.shutdown();  // OpenSSL marks the session of a connection freed without one not resumable
  }
  REQUIRE(g_daneSession != nullptr);
  TlsEngine client(ctx, "mx.example.test");
  TlsEngine srv(server);
  REQUIRE(SSL_set_session(client.native(), g_daneSession));
  client.useDane(params);
  srv.start();
  client.start();
  shuttle(client, srv);
  CHECK(SSL_session_reused(client.native()) == 0);
  REQUIRE(client.state() == EngineState::Open);
  REQUIRE(client.daneResult());
  CHECK(client.daneResult()->status == DaneStatus::Verified);
  // Without DANE the same session resumes (the session was good).
  TlsEngine plainClient(ctx, "mx.example.test");
  TlsEngine plainSrv(server);
  REQUIRE(SSL_set_session(plainClient.native(), g_daneSession));
  plainSrv.start();
  plainClient.start();
  shuttle(plainClient, plainSrv);
  CHECK(plainClient.state() == EngineState::Open);
  CHECK(SSL_session_reused(plainClient.native()) == 1);
  SSL_SESSION_free(g_daneSession);
  g_daneSession = nullptr;
}
