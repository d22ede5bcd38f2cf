// DKIM signing (RFC 6376, RFC 8463 Ed25519, RFC 8301 key sizes).
//
// Canonicalisation (RFC 6376 3.4), the body hash fed incrementally while the message
// streams in (3.7: no second pass over a copy), key loading, and the Signer seam that
// docs/architecture.md asks for (so signing can move to a separate process later, as
// OpenSMTPD's `ca` does). Nothing here touches a socket, a clock or a file except
// loadPrivateKeyFile().
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "util/result.h"

namespace subrelay::dkim {

enum class Algorithm { RsaSha256, Ed25519Sha256 };
enum class Canon { Simple, Relaxed };

std::string_view algorithmName(Algorithm a);  // "rsa-sha256", "ed25519-sha256"
std::optional<Algorithm> parseAlgorithm(std::string_view s);

// ---- canonicalisation (RFC 6376 3.4) -------------------------------------------------
// One header field "Name: value\r\n" (folding kept) -> canonical form used in the hash.
std::string canonicalizeHeader(std::string_view field, Canon c);
// A whole body -> canonical body (for tests and small inputs; the hasher streams).
std::string canonicalizeBody(std::string_view body, Canon c);

// Feeds the raw message (headers and body, CRLF) in any split; finds the end of the
// header block itself and hashes the canonical body with SHA-256 for both
// canonicalisations at once (RFC 6376 3.7). finish() returns the raw 32-byte digests.
class StreamingBodyHash {
 public:
  StreamingBodyHash();
  ~StreamingBodyHash();
  StreamingBodyHash(StreamingBodyHash&&) noexcept;
  StreamingBodyHash& operator=(StreamingBodyHash&&) noexcept;
  void update(std::string_view messageBytes);
  // Body octets only, for a caller that finds the header/body boundary itself (the
  // server takes it from message::HeaderScanner, the one rule the fix-ups also follow).
  // Not to be mixed with update() on one object.
  void updateBody(std::string_view bodyBytes);
  struct Digests {
    std::string simple;   // 32 raw bytes
    std::string relaxed;  // 32 raw bytes
  };
  Digests finish();

 private:
  struct State;
  std::unique_ptr<State> s_;
};

// ---- keys ----------------------------------------------------------------------------
// Opaque private key (EVP_PKEY inside). RSA keys under 2048 bits are refused (RFC 8301
// 3.2 allows 1024 to verify, we never sign with it); above 4096 bits too.
class PrivateKey {
 public:
  virtual ~PrivateKey() = default;
  virtual Algorithm algorithm() const = 0;
  virtual int bits() const = 0;  // 2048..4096 for RSA, 256 for Ed25519
  // The DNS TXT value: "v=DKIM1; k=rsa; p=<base64 SubjectPublicKeyInfo>" or
  // "v=DKIM1; k=ed25519; p=<base64 of the raw 32-byte key>" (RFC 8463 4.2).
  virtual std::string txtRecord() const = 0;
  // Raw signature over data (RSA: PKCS#1 v1.5 SHA-256 of data; Ed25519: PureEdDSA over
  // the SHA-256 hash bytes as RFC 8463 3 says: the caller passes that hash as data).
  virtual util::Result<std::string> signRaw(std::string_view data) const = 0;
  virtual std::string pemPrivate() const = 0;  // PKCS#8 PEM, for dkim-keygen
};

// PEM: PKCS#8 ("BEGIN PRIVATE KEY") or traditional RSA ("BEGIN RSA PRIVATE KEY").
// `expected` must match the key's type; error messages say what was found instead.
util::Result<std::shared_ptr<const PrivateKey>> loadPrivateKeyPem(std::string_view pem, Algorithm expected);
util::Result<std::shared_ptr<const PrivateKey>> loadPrivateKeyFile(const std::string& path, Algorithm expected);
util::Result<std::shared_ptr<const PrivateKey>> generateKey(Algorithm alg, int rsaBits = 2048);

// Checks a raw signature (same data convention as PrivateKey::signRaw) against the
// public key of a TXT record value ("v=DKIM1; k=...; p=..."): for tests and for a
// `dkim-keygen` self-check. RSA keys of 1024 bits and more verify (RFC 8301 3.2).
util::Result<void> verifyRaw(std::string_view txtRecord, std::string_view data, std::string_view signature);

// SHA-256 of data, 32 raw bytes (RFC 6376 3.3: the hash of both algorithms).
std::string sha256(std::string_view data);

// Splits a TXT value into quoted <=255-byte strings for a zone file (RFC 1035 3.3.14).
std::string txtZoneStrings(std::string_view value);

// ---- signing -------------------------------------------------------------------------
struct SignerKey {
  std::string domain;    // d=, lower case
  std::string selector;  // s=
  std::shared_ptr<const PrivateKey> key;
};

struct SignOptions {
  Canon headerCanon = Canon::Relaxed;
  Canon bodyCanon = Canon::Relaxed;
  int64_t timestamp = 0;                     // t= (unix seconds)
  std::optional<int64_t> expiresAfter;       // x= t + this many seconds
};

// The header fields signed when present (issue 4): From, To, Cc, Subject, Date,
// Message-ID, Reply-To, In-Reply-To, References, MIME-Version, Content-Type,
// Content-Transfer-Encoding, List-Unsubscribe, List-Unsubscribe-Post. From, Subject,
// Date, To, Cc and Reply-To are oversigned (h= lists them once more than present) so
// they cannot be added later; when absent they are still listed once (RFC 6376 5.4.2:
// a name with no instance stands for the null string), as Stalwart and rspamd do.
// Multiple instances are hashed bottom-up (5.4.2). DKIM-Signature fields already in
// the message are neither signed nor touched. No l= tag.
class Signer {
 public:
  virtual ~Signer() = default;
  // Returns the DKIM-Signature field(s), folded, each ending in CRLF, to prepend to the
  // message: one per key in order (callers put RSA first for dual signing).
  // bodyHashes: from StreamingBodyHash over this message's body; when absent the body is
  // hashed here.
  virtual util::Result<std::string> sign(std::string_view message, const std::vector<SignerKey>& keys,
                                         const SignOptions& opts,
                                         const StreamingBodyHash::Digests* bodyHashes = nullptr) const = 0;
};

// Signs in this process with the keys it is given.
class LocalSigner final : public Signer {
 public:
  util::Result<std::string> sign(std::string_view message, const std::vector<SignerKey>& keys,
                                 const SignOptions& opts,
                                 const StreamingBodyHash::Digests* bodyHashes = nullptr) const override;
};

// Keys by signing domain (the header From domain picks them; subdomains only when
// configured explicitly). RSA keys sort before Ed25519 for dual signing.
class KeyRing {
 public:
  void add(SignerKey k);
  const std::vector<SignerKey>* forDomain(std::string_view domain) const;  // nullptr = none
  bool empty() const { return byDomain_.empty(); }

 private:
  std::map<std::string, std::vector<SignerKey>, std::less<>> byDomain_;
};

}  // namespace subrelay::dkim
