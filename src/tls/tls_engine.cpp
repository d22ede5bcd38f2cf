// TlsEngine: an SSL object between two memory BIOs (h2o lib/common/socket.c style). The
// read BIO holds ciphertext fed from the socket, the write BIO collects ciphertext for
// it; the engine itself does no I/O and never blocks, so WANT_READ only means "feed me
// more" and WANT_WRITE cannot happen (a memory BIO accepts every write).
//
// RFC 8446 6.1 / RFC 5246 7.2.1: a received close_notify ends the stream (Closed); any
// other alert or a decoding error is fatal (Failed). RFC 6125 host names are checked by
// the library (X509_VERIFY_PARAM) when the context verifies. Sockets, timeouts and
// STARTTLS sequencing live in net/ and smtp/.
#include "tls/tls_engine.h"

#include <cctype>

#include <arpa/inet.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <vector>

namespace subrelay::tls {
namespace {

// One TLS record carries at most 2^14 bytes of plaintext (RFC 8446 5.1), so reading in
// such chunks drains a record per SSL_read call.
constexpr size_t kReadChunk = size_t(16) * 1024;
// See feedCiphertext(). 64 KiB is what libuv reads at once. Measured here with 1 MiB
// feeds: 64 KiB slices ~1 GB/s, 16 KiB slices under half that (cause not pinned down).
constexpr size_t kFeedSlice = size_t(64) * 1024;
// SSL_write takes an int; larger buffers go in slices.
constexpr size_t kMaxWrite = 1 << 30;

bool isIpLiteral(const std::string& s) {
  unsigned char buf[16];
  return inet_pton(AF_INET, s.c_str(), buf) == 1 || inet_pton(AF_INET6, s.c_str(), buf) == 1;
}

// The SSL ex_data slot holding the TlsEngine of a DANE connection (for verifyCallback).
int engineIndex() {
  static const int index = SSL_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
  return index;
}

std::string derOf(X509* x) {
  unsigned char* buf = nullptr;
  const int n = i2d_X509(x, &buf);
  std::string out;
  if (n > 0 && buf != nullptr) out.assign(reinterpret_cast<const char*>(buf), static_cast<size_t>(n));
  OPENSSL_free(buf);
  return out;
}

}  // namespace

TlsEngine::TlsEngine(std::shared_ptr<TlsContext> ctx, std::string serverName) : ctx_(std::move(ctx)) {
  ssl_ = SSL_new(ctx_->native());
  BIO* rbio = BIO_new(BIO_s_mem());
  BIO* wbio = BIO_new(BIO_s_mem());
  if (!ssl_ || !rbio || !wbio) {
    BIO_free(rbio);
    BIO_free(wbio);
    fail("cannot create a TLS connection: " + lastTlsError());
    return;
  }
  // An empty read BIO means "no data yet", not end of file.
  BIO_set_mem_eof_return(rbio, -1);
  BIO_set_mem_eof_return(wbio, -1);
  SSL_set_bio(ssl_, rbio, wbio);  // the SSL owns both BIOs now
  rbio_ = rbio;
  wbio_ = wbio;

  if (ctx_->isServer()) {
    SSL_set_accept_state(ssl_);
    return;
  }
  SSL_set_connect_state(ssl_);
  verifying_ = (SSL_CTX_get_verify_mode(ctx_->native()) & SSL_VERIFY_PEER) != 0;
  if (serverName.empty()) return;
  const bool ip = isIpLiteral(serverName);
  // RFC 6066 3: SNI carries host names only, never address literals.
  if (!ip && !SSL_set_tlsext_host_name(ssl_, serverName.c_str())) {
    fail("cannot set SNI " + serverName + ": " + lastTlsError());
    return;
  }
  if (verifying_) {
    X509_VERIFY_PARAM* param = SSL_get0_param(ssl_);
    // RFC 6125 6.4.3: a wildcard stands for one whole left-most label only.
    X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    // Pass the length: BoringSSL mishandles 0 ("use strlen") here.
    int ok = ip ? X509_VERIFY_PARAM_set1_ip_asc(param, serverName.c_str())
                : X509_VERIFY_PARAM_set1_host(param, serverName.data(), serverName.size());
    if (!ok) fail("cannot set the host name to verify " + serverName + ": " + lastTlsError());
  }
}

TlsEngine::~TlsEngine() { SSL_free(ssl_); }

void TlsEngine::useDane(DaneParams params) {
  if (state_ != EngineState::Handshaking || started_ || ctx_->isServer()) return;
  if (engineIndex() < 0 || !SSL_set_ex_data(ssl_, engineIndex(), this)) {
    fail("cannot enable DANE: " + lastTlsError());
    return;
  }
  // RFC 7672 8.1: "the SMTP client MUST send the TLS SNI extension containing the TLSA base
  // domain".
  if (!params.referenceNames.empty() && !params.referenceNames[0].empty() &&
      !SSL_set_tlsext_host_name(ssl_, params.referenceNames[0].c_str())) {
    fail("cannot set SNI " + params.referenceNames[0] + ": " + lastTlsError());
    return;
  }
  // The check runs in verifyCallback; SSL_VERIFY_PEER makes its "no" end the handshake.
  SSL_set_verify(ssl_, SSL_VERIFY_PEER, nullptr);
  dane_ = std::move(params);
}

int TlsEngine::verifyCallback(X509_STORE_CTX* store, void* /*arg*/) {
  SSL* ssl = static_cast<SSL*>(X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx()));
  auto* self = ssl != nullptr && engineIndex() >= 0 ? static_cast<TlsEngine*>(SSL_get_ex_data(ssl, engineIndex()))
                                                    : nullptr;
  if (self == nullptr || !self->dane_) return X509_verify_cert(store);  // what the library does without us
  return self->checkDane(store);
}

int TlsEngine::checkDane(X509_STORE_CTX* store) {
  // The chain as the server sent it, leaf first (the library hands the leaf separately and
  // also, in both libraries, as the first of the untrusted certificates).
  std::vector<std::string> chain;
  X509* leaf = X509_STORE_CTX_get0_cert(store);
  if (leaf != nullptr) chain.push_back(derOf(leaf));
  if (STACK_OF(X509)* rest = X509_STORE_CTX_get0_untrusted(store)) {
    const int n = static_cast<int>(sk_X509_num(rest));  // size_t in BoringSSL, int in OpenSSL
    for (int i = 0; i < n; ++i) {
      X509* c = sk_X509_value(rest, i);
      if (c != nullptr && (leaf == nullptr || X509_cmp(c, leaf) != 0)) chain.push_back(derOf(c));
    }
  }
  daneResult_ = verifyDane(*dane_, chain, std::chrono::system_clock::now());
  if (daneResult_->status == DaneStatus::Mismatch) {
    X509_STORE_CTX_set_error(store, X509_V_ERR_CERT_UNTRUSTED);  // alert bad_certificate
    return 0;
  }
  X509_STORE_CTX_set_error(store, X509_V_OK);
  return 1;
}

namespace {
// RFC 8446 6 / RFC 5246 7.2 alert descriptions, named as OpenSSL prints them.
std::string alertName(int desc) {
  switch (desc) {
    case 40: return "tlsv1 alert handshake failure";
    case 42: return "sslv3 alert bad certificate";
    case 43: return "sslv3 alert unsupported certificate";
    case 44: return "sslv3 alert certificate revoked";
    case 45: return "sslv3 alert certificate expired";
    case 46: return "sslv3 alert certificate unknown";
    case 48: return "tlsv1 alert unknown ca";
    case 70: return "tlsv1 alert protocol version";
    case 112: return "tlsv1 alert unrecognized name";
    default: return "alert " + std::to_string(desc);
  }
}
}  // namespace

void TlsEngine::fail(std::string why) {
  state_ = EngineState::Failed;
  error_ = std::move(why);
  plainOut_.clear();
  plainOut_.shrink_to_fit();
}

void TlsEngine::failFrom(int ret, const char* during) {
  int err = SSL_get_error(ssl_, ret);
  std::string why = during;
  why += ": ";
  if (dane_ && daneResult_ && daneResult_->status == DaneStatus::Mismatch) {
    why += "DANE verification failed: " + daneResult_->reason;
    ERR_clear_error();
    fail(std::move(why));
    return;
  }
  if (verifying_ && !dane_) {
    long v = SSL_get_verify_result(ssl_);
    if (v != X509_V_OK) {
      why += "certificate verification failed: ";
      why += X509_verify_cert_error_string(v);
      ERR_clear_error();
      fail(std::move(why));
      return;
    }
  }
  if (plainAlert_ >= 0) {
    // The peer's alert came as a plaintext record (below): say what it was, not the
    // decryption error it causes.
    why += "peer sent alert " + alertName(plainAlert_);
    ERR_clear_error();
  } else if (err == SSL_ERROR_SSL) {
    why += lastTlsError();
  } else if (err == SSL_ERROR_ZERO_RETURN) {
    why += "peer sent close_notify before the handshake completed";
  } else if (err == SSL_ERROR_SYSCALL) {
    // Memory BIOs make no system calls; this is the library's "unexpected EOF" path.
    why += "unexpected end of stream";
    ERR_clear_error();
  } else {
    why += "TLS error " + std::to_string(err);
    ERR_clear_error();
  }
  fail(std::move(why));
}


// A TLS 1.3 client that rejects our certificate may send its alert as a plaintext record
// even though handshake keys are in use (OpenSSL 3 does: "15 03 03 00 02 02 30" for a
// fatal unknown_ca); BoringSSL then only reports a record it cannot decrypt. Look for such
// a record in what arrives during the handshake, so the failure names the alert.
void TlsEngine::notePlaintextAlert(std::string_view b) {
  for (size_t i = 0; i + 7 <= b.size(); ++i) {
    if (static_cast<unsigned char>(b[i]) == 0x15 && b[i + 1] == 0x03 &&
        static_cast<unsigned char>(b[i + 2]) <= 0x04 && b[i + 3] == 0x00 && b[i + 4] == 0x02 && b[i + 5] == 0x02) {
      plainAlert_ = static_cast<unsigned char>(b[i + 6]);
      return;
    }
  }
}

bool TlsEngine::isCertificateRejection(std::string_view error) {
  // BoringSSL says "SSLV3_ALERT_BAD_CERTIFICATE" / "TLSV1_ALERT_UNKNOWN_CA", OpenSSL
  // "sslv3 alert bad certificate" / "tlsv1 alert unknown ca": compare in one form.
  std::string e;
  e.reserve(error.size());
  for (char c : error) e += c == '_' ? ' ' : static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (e.find("alert") == std::string::npos) return false;
  for (const char* what : {"alert bad certificate", "alert unsupported certificate", "alert certificate revoked",
                           "alert certificate expired", "alert certificate unknown", "alert unknown ca"})
    if (e.find(what) != std::string::npos) return true;
  return false;
}

void TlsEngine::start() {
  if (state_ != EngineState::Handshaking || started_) return;
  started_ = true;
  // A resumed session skips the certificate check, so a DANE connection always makes a full
  // handshake, whatever session the caller offered.
  if (dane_) SSL_set_session(ssl_, nullptr);
  pump();
}

void TlsEngine::feedCiphertext(std::string_view bytes) {
  if (state_ == EngineState::Failed || peerClosed_) return;
  started_ = true;  // a server starts on the ClientHello
  if (state_ == EngineState::Handshaking) notePlaintextAlert(bytes);
  // In slices, pumping after each: BoringSSL's memory BIO moves the unread rest to the
  // front on every read (two reads per record), so one 1 MiB write costs quadratic
  // copying (measured: a quarter of the throughput); a bounded slice keeps it linear.
  while (!bytes.empty() && state_ != EngineState::Failed && !peerClosed_) {
    int n = static_cast<int>(std::min(bytes.size(), kFeedSlice));
    if (BIO_write(rbio_, bytes.data(), n) != n) {
      fail("out of memory buffering TLS input");
      return;
    }
    bytes.remove_prefix(static_cast<size_t>(n));
    pump();
  }
}

void TlsEngine::pump() {
  ERR_clear_error();  // SSL_get_error reads the thread's queue: leave nothing stale in it
  if (state_ == EngineState::Handshaking) {
    int r = SSL_do_handshake(ssl_);
    if (r != 1) {
      int err = SSL_get_error(ssl_, r);
      if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE) failFrom(r, "TLS handshake");
      return;
    }
    if (dane_ && !daneResult_) {
      // Resumed after all (start() drops any session offered): the library skipped the
      // certificate check, so DANE never ran (RFC 7672 3.2: no delivery without
      // authentication). Nothing was written yet.
      fail("TLS handshake: DANE: a resumed session is not accepted (the certificate was not checked)");
      return;
    }
    state_ = EngineState::Open;
    if (!plainOut_.empty()) {
      std::string pending;
      pending.swap(plainOut_);
      encrypt(pending);
      if (state_ == EngineState::Failed) return;
    }
    // Fall through: the peer's Finished may arrive with application data behind it.
  }
  if (state_ == EngineState::Failed || peerClosed_) return;
  // Decrypt into a per-thread scratch record and append: growing plainIn_ by a chunk
  // first would zero-fill 16 KiB per call, which costs more than decrypting the short
  // records SMTP commands arrive in.
  alignas(64) thread_local char scratch[kReadChunk];
  for (;;) {
    int n = SSL_read(ssl_, scratch, static_cast<int>(kReadChunk));
    if (n > 0) {
      plainIn_.append(scratch, static_cast<size_t>(n));
      continue;
    }
    int err = SSL_get_error(ssl_, n);
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) return;
    if (err == SSL_ERROR_ZERO_RETURN) {
      // close_notify: whatever was decrypted before it stays readable.
      peerClosed_ = true;
      state_ = EngineState::Closed;
      return;
    }
    failFrom(n, "TLS read");
    return;
  }
}

void TlsEngine::encrypt(std::string_view bytes) {
  ERR_clear_error();
  while (!bytes.empty()) {
    int n = static_cast<int>(std::min(bytes.size(), kMaxWrite));
    int r = SSL_write(ssl_, bytes.data(), n);
    if (r <= 0) {
      failFrom(r, "TLS write");
      return;
    }
    // Without SSL_MODE_ENABLE_PARTIAL_WRITE a successful SSL_write took everything.
    bytes.remove_prefix(static_cast<size_t>(r));
  }
}

void TlsEngine::writePlaintext(std::string_view bytes) {
  if (bytes.empty()) return;
  switch (state_) {
    case EngineState::Handshaking:
      // Held until the handshake is done (SMTP pipelining may queue a reply early).
      plainOut_.append(bytes);
      return;
    case EngineState::Open:
      encrypt(bytes);
      return;
    case EngineState::Closed:
    case EngineState::Failed:
      return;  // nothing more goes out after close_notify or a fatal error
  }
}

void TlsEngine::shutdown() {
  if (state_ == EngineState::Failed || sentClose_) return;
  sentClose_ = true;
  if (state_ == EngineState::Handshaking) {
    // No session to close (SSL_shutdown fails mid-handshake), and Closed means "was
    // open" (handshakeDone()): a handshake abandoned by us is a failure.
    fail("TLS shut down before the handshake completed");
    return;
  }
  ERR_clear_error();
  // Queues close_notify in the write BIO; 0 means "sent, peer's not seen yet", fine
  // for SMTP (RFC 8446 6.1 does not require waiting for the reply).
  if (SSL_shutdown(ssl_) < 0) {
    failFrom(-1, "TLS shutdown");
    return;
  }
  state_ = EngineState::Closed;
}

std::string TlsEngine::takeCiphertext() {
  std::string out;
  if (!wbio_) return out;
  size_t pending = BIO_ctrl_pending(wbio_);
  if (pending == 0) return out;
  out.resize(pending);
  int n = BIO_read(wbio_, out.data(), static_cast<int>(std::min(pending, size_t(INT_MAX))));
  out.resize(n > 0 ? static_cast<size_t>(n) : 0);
  return out;
}

std::string TlsEngine::takePlaintext() {
  std::string out;
  out.swap(plainIn_);
  return out;
}

bool TlsEngine::hasCiphertext() const { return wbio_ && BIO_ctrl_pending(wbio_) > 0; }

std::string TlsEngine::version() const {
  if (!ssl_ || !handshakeDone()) return {};
  return SSL_get_version(ssl_);
}

std::string TlsEngine::cipher() const {
  if (!ssl_ || !handshakeDone()) return {};
  const SSL_CIPHER* c = SSL_get_current_cipher(ssl_);
  return c ? SSL_CIPHER_get_name(c) : std::string();
}

std::string TlsEngine::peerVerifyError() const {
  if (dane_) {
    if (daneResult_ && daneResult_->status == DaneStatus::Mismatch) return "DANE: " + daneResult_->reason;
    return {};
  }
  if (!ssl_ || !verifying_) return {};
  long v = SSL_get_verify_result(ssl_);
  return v == X509_V_OK ? std::string() : X509_verify_cert_error_string(v);
}

}  // namespace subrelay::tls
