// tls/: two TlsEngines back to back in memory (no sockets), server certificate from
// makeSelfSigned. Covers handshake, data in any split, close_notify, RFC 8996 (no TLS
// 1.1), verification (chain and RFC 6125 host name), garbage input, key mismatch.
#include <doctest/doctest.h>

#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <string>

// BoringSSL's headers arrive through -I and are not pedantic-clean.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpedantic"
#pragma GCC diagnostic ignored "-Wignored-qualifiers"
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#pragma GCC diagnostic pop

#include "tls/self_signed.h"
#include "tls/tls_context.h"
#include "tls/tls_engine.h"

using namespace subrelay;
using tls::EngineState;
using tls::TlsContext;
using tls::TlsEngine;

namespace {

const tls::PemPair& serverPem() {
  static const tls::PemPair pem = [] {
    auto r = tls::makeSelfSigned("mail.test", 30);
    REQUIRE(r.ok());
    return *r;
  }();
  return pem;
}

std::shared_ptr<TlsContext> serverCtx() {
  static const std::shared_ptr<TlsContext> ctx = [] {
    auto r = TlsContext::serverFromPem(serverPem().certificatePem, serverPem().privateKeyPem);
    REQUIRE_MESSAGE(r.ok(), (r.ok() ? "" : r.error().message));
    return *r;
  }();
  return ctx;
}

std::shared_ptr<TlsContext> clientCtx(tls::ClientOptions opts = {}) {
  auto r = TlsContext::client(opts);
  REQUIRE_MESSAGE(r.ok(), (r.ok() ? "" : r.error().message));
  return *r;
}

struct TempDir {
  std::filesystem::path path;
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "subrelay-tls-XXXXXX").string();
    REQUIRE(mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string write(const std::string& name, const std::string& data) const {
    auto p = path / name;
    std::ofstream(p, std::ios::binary) << data;
    return p.string();
  }
};

// Moves ciphertext both ways, `chunk` bytes per feed, until neither side has any.
void shuttle(TlsEngine& a, TlsEngine& b, size_t chunk = SIZE_MAX) {
  for (int rounds = 0; rounds < 1000; ++rounds) {
    bool moved = false;
    for (auto [from, to] : {std::pair{&a, &b}, std::pair{&b, &a}}) {
      if (!from->hasCiphertext()) continue;
      std::string bytes = from->takeCiphertext();
      moved = true;
      for (size_t i = 0; i < bytes.size(); i += chunk) {
        to->feedCiphertext(std::string_view(bytes).substr(i, std::min(chunk, bytes.size() - i)));
      }
    }
    if (!moved) return;
  }
  FAIL("shuttle did not settle");
}

struct Pair {
  TlsEngine client;
  TlsEngine server;
  Pair(std::shared_ptr<TlsContext> c, std::string name = "mail.test")
      : client(std::move(c), std::move(name)), server(serverCtx()) {}
  void handshake(size_t chunk = SIZE_MAX) {
    server.start();
    client.start();
    shuttle(client, server, chunk);
  }
};

std::string pattern(size_t n) {
  std::string s(n, '\0');
  uint32_t x = 12345;
  for (auto& c : s) {
    x = x * 1103515245 + 12345;
    c = static_cast<char>(x >> 24);
  }
  return s;
}

}  // namespace

TEST_CASE("makeSelfSigned gives a P-256 certificate with the names asked for") {
  const auto& pem = serverPem();
  CHECK(pem.certificatePem.find("-----BEGIN CERTIFICATE-----") == 0);
  CHECK(pem.privateKeyPem.find("-----BEGIN PRIVATE KEY-----") == 0);

  BIO* bio = BIO_new_mem_buf(pem.certificatePem.data(), static_cast<int>(pem.certificatePem.size()));
  X509* x = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
  BIO_free(bio);
  REQUIRE(x != nullptr);
  CHECK(X509_get_version(x) == 2);
  CHECK(X509_check_host(x, "mail.test", 9, 0, nullptr) == 1);
  CHECK(X509_check_host(x, "other.test", 10, 0, nullptr) != 1);
  CHECK(X509_check_ip_asc(x, "127.0.0.1", 0) == 1);
  CHECK(X509_check_ip_asc(x, "::1", 0) == 1);
  CHECK(X509_check_ca(x) == 0);
  EVP_PKEY* key = X509_get_pubkey(x);
  REQUIRE(key != nullptr);
  CHECK(EVP_PKEY_id(key) == EVP_PKEY_EC);
  EVP_PKEY_free(key);
  X509_free(x);

  // Serials are random: two certificates differ.
  auto other = tls::makeSelfSigned("mail.test", 1);
  REQUIRE(other.ok());
  CHECK(other->certificatePem != pem.certificatePem);
  CHECK_FALSE(tls::makeSelfSigned("", 1).ok());
}

TEST_CASE("handshake and data both ways, no verification") {
  Pair p(clientCtx());
  p.handshake();
  REQUIRE(p.client.state() == EngineState::Open);
  REQUIRE(p.server.state() == EngineState::Open);
  CHECK(p.client.version() == "TLSv1.3");
  CHECK(p.server.version() == "TLSv1.3");
  CHECK(p.client.cipher().rfind("TLS_", 0) == 0);
  CHECK(p.client.cipher() == p.server.cipher());
  CHECK(p.client.peerVerifyError().empty());

  p.client.writePlaintext("EHLO client.test\r\n");
  shuttle(p.client, p.server);
  CHECK(p.server.takePlaintext() == "EHLO client.test\r\n");
  p.server.writePlaintext("250 mail.test\r\n");
  shuttle(p.client, p.server);
  CHECK(p.client.takePlaintext() == "250 mail.test\r\n");
  CHECK(p.client.takePlaintext().empty());
}

TEST_CASE("handshake one byte at a time, data in odd splits") {
  for (size_t chunk : {size_t(1), size_t(2), size_t(7), size_t(100), size_t(1500)}) {
    CAPTURE(chunk);
    Pair p(clientCtx());
    p.handshake(chunk);
    REQUIRE(p.client.state() == EngineState::Open);
    REQUIRE(p.server.state() == EngineState::Open);

    std::string sent = pattern(5000);
    size_t off = 0;
    for (size_t len = 1; off < sent.size(); len = len * 3 % 257 + 1) {
      size_t n = std::min(len, sent.size() - off);
      p.client.writePlaintext(std::string_view(sent).substr(off, n));
      off += n;
      if (len % 2) shuttle(p.client, p.server, chunk);
    }
    shuttle(p.client, p.server, chunk);
    CHECK(p.server.takePlaintext() == sent);

    p.server.writePlaintext(sent);
    shuttle(p.client, p.server, chunk);
    std::string got;
    while (true) {
      std::string part = p.client.takePlaintext();
      if (part.empty()) break;
      got += part;
    }
    CHECK(got == sent);
  }
}

TEST_CASE("plaintext written during the handshake goes out after it") {
  Pair p(clientCtx());
  p.server.start();
  p.client.start();
  p.client.writePlaintext("early ");
  p.server.writePlaintext("banner ");
  CHECK(p.client.state() == EngineState::Handshaking);
  p.client.writePlaintext("data");
  shuttle(p.client, p.server);
  CHECK(p.server.takePlaintext() == "early data");
  CHECK(p.client.takePlaintext() == "banner ");
}

TEST_CASE("1 MiB payload both ways") {
  Pair p(clientCtx());
  p.handshake();
  std::string big = pattern(1 << 20);
  p.client.writePlaintext(big);
  p.server.writePlaintext(big);
  shuttle(p.client, p.server, 16384 + 37);
  CHECK(p.server.takePlaintext() == big);
  CHECK(p.client.takePlaintext() == big);
}

TEST_CASE("close_notify closes the stream, data before it is kept") {
  Pair p(clientCtx());
  p.handshake();
  p.client.writePlaintext("QUIT\r\n");
  p.client.shutdown();
  CHECK(p.client.state() == EngineState::Closed);
  p.client.writePlaintext("ignored after close");
  shuttle(p.client, p.server);
  CHECK(p.server.state() == EngineState::Closed);
  CHECK(p.server.takePlaintext() == "QUIT\r\n");
  CHECK(p.server.handshakeDone());

  // The server answers and closes; the client still reads what arrives before it.
  p.server.shutdown();
  shuttle(p.client, p.server);
  CHECK(p.client.state() == EngineState::Closed);
  CHECK(p.server.error().empty());
  CHECK(p.client.error().empty());
}

TEST_CASE("shutdown during the handshake fails the engine, not 'closed'") {
  Pair p(clientCtx());
  p.client.start();
  p.client.shutdown();
  CHECK(p.client.state() == EngineState::Failed);
  CHECK_FALSE(p.client.handshakeDone());
  CHECK(p.client.version().empty());
}

TEST_CASE("TLS 1.2 client negotiates an ECDHE AEAD suite") {
  auto ctx = clientCtx();
  REQUIRE(SSL_CTX_set_max_proto_version(ctx->native(), TLS1_2_VERSION));
  Pair p(ctx);
  p.handshake();
  REQUIRE(p.server.state() == EngineState::Open);
  CHECK(p.server.version() == "TLSv1.2");
  CHECK(p.server.cipher() == "ECDHE-ECDSA-AES128-GCM-SHA256");
  p.client.writePlaintext("x");
  shuttle(p.client, p.server);
  CHECK(p.server.takePlaintext() == "x");
}

TEST_CASE("a TLS 1.2 client offering only CBC suites is refused") {
  auto ctx = clientCtx();
  REQUIRE(SSL_CTX_set_max_proto_version(ctx->native(), TLS1_2_VERSION));
  REQUIRE(SSL_CTX_set_cipher_list(ctx->native(), "ECDHE-ECDSA-AES128-SHA"));
  Pair p(ctx);
  p.handshake();
  CHECK(p.server.state() == EngineState::Failed);
  CHECK(p.client.state() == EngineState::Failed);
  MESSAGE("server: " << p.server.error());
}

TEST_CASE("a TLS 1.1 client is refused (RFC 8996)") {
  auto ctx = clientCtx();
  SSL_CTX* c = ctx->native();
  REQUIRE(SSL_CTX_set_min_proto_version(c, TLS1_1_VERSION));
  REQUIRE(SSL_CTX_set_max_proto_version(c, TLS1_1_VERSION));
  REQUIRE(SSL_CTX_set_cipher_list(c, "ALL"));
#if defined(SUBRELAY_TLS_OPENSSL)
  // OpenSSL 3 will not even send a TLS 1.1 ClientHello at security level 1.
  SSL_CTX_set_security_level(c, 0);
  REQUIRE(SSL_CTX_set_cipher_list(c, "ALL:@SECLEVEL=0"));
#endif
  Pair p(ctx);
  p.server.start();
  p.client.start();
  REQUIRE(p.client.hasCiphertext());  // a real ClientHello went out: the server refuses it
  shuttle(p.client, p.server);
  CHECK(p.server.state() == EngineState::Failed);
  CHECK(p.client.state() == EngineState::Failed);
  CHECK_FALSE(p.server.error().empty());
  MESSAGE("server: " << p.server.error());
  MESSAGE("client: " << p.client.error());
}

TEST_CASE("verification against the certificate as CA file") {
  TempDir dir;
  std::string ca = dir.write("ca.pem", serverPem().certificatePem);

  SUBCASE("matching host name") {
    Pair p(clientCtx({true, ca}), "mail.test");
    p.handshake();
    CHECK(p.client.state() == EngineState::Open);
    CHECK(p.client.peerVerifyError().empty());
  }
  SUBCASE("host name compares case-insensitively") {
    Pair p(clientCtx({true, ca}), "MAIL.Test");
    p.handshake();
    CHECK(p.client.state() == EngineState::Open);
  }
  SUBCASE("IP address literal") {
    Pair p(clientCtx({true, ca}), "127.0.0.1");
    p.handshake();
    CHECK(p.client.state() == EngineState::Open);
  }
  SUBCASE("host name mismatch fails") {
    Pair p(clientCtx({true, ca}), "other.test");
    p.handshake();
    CHECK(p.client.state() == EngineState::Failed);
    CHECK(p.server.state() == EngineState::Failed);  // the client's alert reached it
    CHECK(p.client.error().find("verif") != std::string::npos);
    CHECK_FALSE(p.client.peerVerifyError().empty());
    MESSAGE("client: " << p.client.error());
  }
  SUBCASE("subdomain is not the name") {
    Pair p(clientCtx({true, ca}), "x.mail.test");
    p.handshake();
    CHECK(p.client.state() == EngineState::Failed);
  }
  SUBCASE("IP mismatch fails") {
    Pair p(clientCtx({true, ca}), "127.0.0.2");
    p.handshake();
    CHECK(p.client.state() == EngineState::Failed);
  }
  SUBCASE("wrong CA fails") {
    auto other = tls::makeSelfSigned("mail.test", 30);
    REQUIRE(other.ok());
    std::string wrong = dir.write("wrong.pem", other->certificatePem);
    Pair p(clientCtx({true, wrong}), "mail.test");
    p.handshake();
    CHECK(p.client.state() == EngineState::Failed);
    CHECK(p.client.error().find("certificate verification failed") != std::string::npos);
    MESSAGE("client: " << p.client.error());
  }
  SUBCASE("system trust store does not trust a self-signed certificate") {
    Pair p(clientCtx({true, ""}), "mail.test");
    p.handshake();
    CHECK(p.client.state() == EngineState::Failed);
  }
  SUBCASE("not verifying accepts anything and reports nothing") {
    Pair p(clientCtx({false, ""}), "other.test");
    p.handshake();
    CHECK(p.client.state() == EngineState::Open);
    CHECK(p.client.peerVerifyError().empty());
  }
  SUBCASE("missing CA file is a context error naming it") {
    auto r = TlsContext::client({true, (dir.path / "absent.pem").string()});
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().message.find("absent.pem") != std::string::npos);
  }
}

TEST_CASE("SNI reaches the server") {
  Pair p(clientCtx(), "mail.test");
  p.handshake();
  REQUIRE(p.server.state() == EngineState::Open);
  const char* sni = SSL_get_servername(p.server.native(), TLSEXT_NAMETYPE_host_name);
  REQUIRE(sni != nullptr);
  CHECK(std::string(sni) == "mail.test");

  Pair q(clientCtx(), "127.0.0.1");  // RFC 6066 3: no literal addresses in SNI
  q.handshake();
  REQUIRE(q.server.state() == EngineState::Open);
  CHECK(SSL_get_servername(q.server.native(), TLSEXT_NAMETYPE_host_name) == nullptr);
}

namespace {
// The client keeps the newest session it is given. In TLS 1.3 tickets arrive after the
// handshake, and BoringSSL's SSL_get1_session() then returns a non-resumable
// placeholder, so the new-session callback is the portable way to get them.
SSL_SESSION* g_lastSession = nullptr;
int keepSession(SSL* /*ssl*/, SSL_SESSION* sess) {
  SSL_SESSION_free(g_lastSession);
  g_lastSession = sess;
  return 1;  // we own it now
}
}  // namespace

TEST_CASE("session tickets: a second connection resumes") {
  for (int maxVersion : {TLS1_2_VERSION, TLS1_3_VERSION}) {
    CAPTURE(maxVersion);
    auto ctx = clientCtx();
    REQUIRE(SSL_CTX_set_max_proto_version(ctx->native(), static_cast<uint16_t>(maxVersion)));
    SSL_CTX_set_session_cache_mode(ctx->native(), SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx->native(), keepSession);
    Pair first(ctx);
    first.handshake();
    // TLS 1.3 tickets come after the handshake: exchange a little data to read them.
    first.server.writePlaintext("220\r\n");
    shuttle(first.client, first.server);
    REQUIRE(first.client.takePlaintext() == "220\r\n");
    REQUIRE(g_lastSession != nullptr);
    CHECK(SSL_SESSION_has_ticket(g_lastSession) == 1);

    Pair second(ctx);
    REQUIRE(SSL_set_session(second.client.native(), g_lastSession));
    second.handshake();
    REQUIRE(second.client.state() == EngineState::Open);
    CHECK(SSL_session_reused(second.client.native()) == 1);
    CHECK(SSL_session_reused(second.server.native()) == 1);
    SSL_SESSION_free(g_lastSession);
    g_lastSession = nullptr;
  }
}

TEST_CASE("garbage ciphertext fails cleanly") {
  SUBCASE("instead of a ClientHello") {
    TlsEngine server(serverCtx());
    server.start();
    server.feedCiphertext("EHLO plaintext.example\r\n");
    CHECK(server.state() == EngineState::Failed);
    CHECK_FALSE(server.error().empty());
    server.feedCiphertext("more");  // ignored, no crash
    server.writePlaintext("ignored");
    CHECK(server.takePlaintext().empty());
    MESSAGE("server: " << server.error());
  }
  SUBCASE("inside an established session") {
    Pair p(clientCtx());
    p.handshake();
    REQUIRE(p.server.state() == EngineState::Open);
    std::string junk = pattern(300);
    junk[0] = 23;  // application_data record header, then nonsense
    junk[1] = 3;
    junk[2] = 3;
    junk[3] = 0;
    junk[4] = static_cast<char>(200);
    p.server.feedCiphertext(junk);
    CHECK(p.server.state() == EngineState::Failed);
    CHECK(p.server.hasCiphertext());  // the alert for the peer
    shuttle(p.client, p.server);
    CHECK(p.client.state() == EngineState::Failed);
  }
  SUBCASE("random bytes at every stage never crash") {
    for (size_t cut = 0; cut < 6; ++cut) {
      Pair p(clientCtx());
      p.server.start();
      p.client.start();
      std::string hello = p.client.takeCiphertext();
      hello[std::min(hello.size() - 1, cut * 37 + 5)] ^= 0x5a;
      p.server.feedCiphertext(hello);
      shuttle(p.client, p.server);
      CHECK(p.client.state() != EngineState::Closed);
    }
  }
}

TEST_CASE("serverFromPem refuses a key that does not match the certificate") {
  auto other = tls::makeSelfSigned("mail.test", 30);
  REQUIRE(other.ok());
  auto r = TlsContext::serverFromPem(serverPem().certificatePem, other->privateKeyPem);
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().message.find("does not match") != std::string::npos);
  MESSAGE(r.error().message);

  CHECK_FALSE(TlsContext::serverFromPem("not pem", serverPem().privateKeyPem).ok());
  CHECK_FALSE(TlsContext::serverFromPem(serverPem().certificatePem, "not pem").ok());
}

TEST_CASE("serverFromFiles names the file in errors") {
  TempDir dir;
  std::string cert = dir.write("fullchain.pem", serverPem().certificatePem);
  std::string key = dir.write("privkey.pem", serverPem().privateKeyPem);
  auto ok = TlsContext::serverFromFiles(cert, key);
  REQUIRE_MESSAGE(ok.ok(), (ok.ok() ? "" : ok.error().message));
  CHECK((*ok)->isServer());

  auto missing = TlsContext::serverFromFiles(cert, (dir.path / "nokey.pem").string());
  REQUIRE_FALSE(missing.ok());
  CHECK(missing.error().message.find("nokey.pem") != std::string::npos);

  auto other = tls::makeSelfSigned("x.test", 1);
  REQUIRE(other.ok());
  std::string wrongKey = dir.write("wrong.pem", other->privateKeyPem);
  auto mismatch = TlsContext::serverFromFiles(cert, wrongKey);
  REQUIRE_FALSE(mismatch.ok());
  CHECK(mismatch.error().message.find("wrong.pem") != std::string::npos);
  CHECK(mismatch.error().message.find("fullchain.pem") != std::string::npos);

  // A chain: leaf followed by another certificate is accepted.
  std::string chain = dir.write("chain.pem", serverPem().certificatePem + other->certificatePem);
  CHECK(TlsContext::serverFromFiles(chain, key).ok());
  std::string broken = dir.write("broken.pem", serverPem().certificatePem +
                                                   "-----BEGIN CERTIFICATE-----\nAAAA\n"
                                                   "-----END CERTIFICATE-----\n");
  CHECK_FALSE(TlsContext::serverFromFiles(broken, key).ok());
}

TEST_CASE("handshake rate (informational)") {
  auto client = clientCtx();
  const int n = 200;
  std::clock_t c0 = std::clock();
  int ok = 0;
  for (int i = 0; i < n; ++i) {
    Pair p(client);
    p.handshake();
    bool both = p.client.state() == EngineState::Open && p.server.state() == EngineState::Open;
    ok += both ? 1 : 0;
  }
  double secs = double(std::clock() - c0) / CLOCKS_PER_SEC;  // CPU time: the host is shared
  CHECK(ok == n);
  MESSAGE("TLS 1.3 P-256 handshakes (client+server, one core): " << static_cast<int>(n / secs) << "/s");
}

TEST_CASE("bulk throughput (informational)") {
  Pair p(clientCtx());
  p.handshake();
  const std::string block = pattern(64 * 1024);
  const int blocks = 512;  // 32 MiB
  for (size_t feed : {size_t(64 * 1024), size_t(1 << 20)}) {
    CAPTURE(feed);
    size_t got = 0;
    std::string wire;
    std::clock_t c0 = std::clock();
    for (int i = 0; i < blocks; ++i) {
      p.client.writePlaintext(block);
      wire += p.client.takeCiphertext();
      if (wire.size() >= feed) {
        for (size_t off = 0; off < wire.size(); off += feed) {
          p.server.feedCiphertext(std::string_view(wire).substr(off, feed));
        }
        wire.clear();
        got += p.server.takePlaintext().size();
      }
    }
    p.server.feedCiphertext(wire);
    got += p.server.takePlaintext().size();
    double secs = double(std::clock() - c0) / CLOCKS_PER_SEC;
    CHECK(got == block.size() * blocks);
    MESSAGE("encrypt+decrypt, ciphertext fed in " << feed / 1024
                                                  << " KiB pieces: " << static_cast<int>(got / secs / 1e6) << " MB/s");
  }
}

TEST_CASE("small records: one SMTP command per record (informational)") {
  Pair p(clientCtx());
  p.handshake();
  const int n = 100000;
  std::clock_t c0 = std::clock();
  size_t got = 0;
  for (int i = 0; i < n; ++i) {
    p.client.writePlaintext("RCPT TO:<someone@example.org>\r\n");
    p.server.feedCiphertext(p.client.takeCiphertext());
    got += p.server.takePlaintext().size();
  }
  double secs = double(std::clock() - c0) / CLOCKS_PER_SEC;
  CHECK(got == size_t(n) * 31);
  MESSAGE("31-byte record encrypt+decrypt: " << secs / n * 1e6 << " us each");
}

TEST_CASE("isCertificateRejection: alerts about our certificate, in both libraries' words") {
  CHECK(TlsEngine::isCertificateRejection("TLS handshake: SSL routines: TLSV1_ALERT_UNKNOWN_CA"));
  CHECK(TlsEngine::isCertificateRejection("TLS handshake: error:0A000418:SSL routines::tlsv1 alert unknown ca"));
  CHECK(TlsEngine::isCertificateRejection("TLS handshake: SSLV3_ALERT_BAD_CERTIFICATE"));
  CHECK(TlsEngine::isCertificateRejection("TLS handshake: peer sent alert sslv3 alert certificate expired"));
  CHECK(TlsEngine::isCertificateRejection("TLS handshake: peer sent alert sslv3 alert certificate unknown"));
  CHECK_FALSE(TlsEngine::isCertificateRejection("TLS handshake: SSL routines: WRONG_VERSION_NUMBER"));
  CHECK_FALSE(TlsEngine::isCertificateRejection("TLS handshake: tlsv1 alert protocol version"));
  CHECK_FALSE(TlsEngine::isCertificateRejection("unexpected end of stream"));
}
