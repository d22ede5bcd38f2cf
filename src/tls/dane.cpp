// DANE verification for SMTP (see dane.h). The chain arrives as DER; every certificate is
// parsed once, each usable record is tried in turn and the first that authenticates wins.
// Chain validation for DANE-TA(2) is the library's X509_verify_cert with the matched
// certificate as the only trust anchor (X509_V_FLAG_PARTIAL_CHAIN: an intermediate may be
// the anchor), never the system trust store (RFC 7672 3.1.2: "Some MTAs will ignore all
// locally trusted certificates"; we always do). Only calls present in both BoringSSL and
// OpenSSL 3: no SSL_dane_* (OpenSSL only), no X509_STORE_CTX_set0_dane.
#include "tls/dane.h"

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/crypto.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <ctime>
#include <map>
#include <optional>
#include <utility>

#include "util/cptr.h"

namespace subrelay::tls {
namespace {

using X509Ptr = util::CPtr<X509, X509_free>;
using PkeyPtr = util::CPtr<EVP_PKEY, EVP_PKEY_free>;
using StorePtr = util::CPtr<X509_STORE, X509_STORE_free>;
using StoreCtxPtr = util::CPtr<X509_STORE_CTX, X509_STORE_CTX_free>;

constexpr uint8_t kSelectorCert = 0;
constexpr uint8_t kSelectorSpki = 1;
constexpr uint8_t kMatchFull = 0;
constexpr uint8_t kMatchSha256 = 1;
constexpr uint8_t kMatchSha512 = 2;

// Reasons list at most this many records, so a large RRset cannot make a huge log line.
constexpr size_t kMaxListed = 4;

std::string hex(const uint8_t* p, size_t n, size_t maxHex) {
  static const char kDigits[] = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < n; ++i) {
    if (out.size() + 2 > maxHex) {
      out += "...";
      break;
    }
    out += kDigits[p[i] >> 4];
    out += kDigits[p[i] & 15];
  }
  return out;
}

std::string hex(const std::string& s, size_t maxHex = 16) {
  return hex(reinterpret_cast<const uint8_t*>(s.data()), s.size(), maxHex);
}

const char* usageName(uint8_t u) {
  switch (u) {
    case 0: return "PKIX-TA";
    case 1: return "PKIX-EE";
    case kUsageDaneTa: return "DANE-TA";
    case kUsageDaneEe: return "DANE-EE";
  }
  return "usage?";
}

const char* selectorName(uint8_t s) { return s == kSelectorCert ? "certificate" : "SPKI"; }

const char* matchName(uint8_t m) {
  switch (m) {
    case kMatchFull: return "full";
    case kMatchSha256: return "sha256";
    case kMatchSha512: return "sha512";
  }
  return "?";
}

// RFC 7671 9: the client's preference among digests, stronger last. Full(0) is not a
// digest and takes no part in the comparison.
int digestRank(uint8_t m) { return m == kMatchSha512 ? 2 : m == kMatchSha256 ? 1 : 0; }

// RFC 6698 2.1.2: the DER of the whole certificate, or of its SubjectPublicKeyInfo.
std::optional<std::string> selectedBytes(X509* x, uint8_t selector) {
  unsigned char* buf = nullptr;
  const int n = selector == kSelectorCert ? i2d_X509(x, &buf) : i2d_X509_PUBKEY(X509_get_X509_PUBKEY(x), &buf);
  if (n <= 0 || buf == nullptr) {
    OPENSSL_free(buf);
    return std::nullopt;
  }
  std::string out(reinterpret_cast<const char*>(buf), static_cast<size_t>(n));
  OPENSSL_free(buf);
  return out;
}

// RFC 6698 2.1.3: what the association data is compared with.
std::optional<std::string> matchValue(const std::string& selected, uint8_t matchingType) {
  if (matchingType == kMatchFull) return selected;
  const EVP_MD* md = matchingType == kMatchSha256 ? EVP_sha256() : EVP_sha512();
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (!EVP_Digest(selected.data(), selected.size(), out, &len, md, nullptr)) return std::nullopt;
  return std::string(reinterpret_cast<const char*>(out), len);
}

bool dataEquals(const TlsaRecord& r, const std::string& value) {
  return r.data.size() == value.size() && std::equal(r.data.begin(), r.data.end(), value.begin(),
                                                     [](uint8_t a, char b) { return a == static_cast<uint8_t>(b); });
}

struct Cert {
  X509Ptr x;
  std::map<std::pair<uint8_t, uint8_t>, std::string> values;  // (selector, matching type) -> value, cached
  const std::string* value(uint8_t selector, uint8_t matchingType) {
    auto key = std::make_pair(selector, matchingType);
    if (auto it = values.find(key); it != values.end()) return &it->second;
    auto sel = selectedBytes(x.get(), selector);
    auto v = sel ? matchValue(*sel, matchingType) : std::nullopt;
    if (!v) return nullptr;
    return &values.emplace(key, std::move(*v)).first->second;
  }
};

std::string subjectOf(X509* x) {
  char buf[256];
  if (X509_NAME_oneline(X509_get_subject_name(x), buf, sizeof buf) == nullptr) return "?";
  return buf;
}

// The chain from chain[0] to chain[anchor] validates with chain[anchor] as the one trust
// anchor: signatures, validity dates, CA flags and path lengths (RFC 5280 6.1), for a TLS
// server. "" when it does, else why not.
std::string validateTo(std::vector<Cert>& chain, size_t anchor, time_t now) {
  StorePtr store(X509_STORE_new());
  StoreCtxPtr ctx(X509_STORE_CTX_new());
  if (!store || !ctx || !X509_STORE_add_cert(store.get(), chain[anchor].x.get())) return "out of memory";
  STACK_OF(X509)* untrusted = sk_X509_new_null();
  if (untrusted == nullptr) return "out of memory";
  // Everything else the server sent may serve as an intermediate, in any order.
  for (size_t i = 1; i < chain.size(); ++i)
    if (i != anchor) sk_X509_push(untrusted, chain[i].x.get());  // not owned
  std::string why;
  if (!X509_STORE_CTX_init(ctx.get(), store.get(), chain[0].x.get(), untrusted)) {
    why = "out of memory";
  } else {
    X509_VERIFY_PARAM* param = X509_STORE_CTX_get0_param(ctx.get());
    X509_VERIFY_PARAM_set_flags(param, X509_V_FLAG_PARTIAL_CHAIN);
    X509_VERIFY_PARAM_set_time(param, now);
    X509_STORE_CTX_set_purpose(ctx.get(), X509_PURPOSE_SSL_SERVER);
    if (X509_verify_cert(ctx.get()) != 1) {
      const int err = X509_STORE_CTX_get_error(ctx.get());
      why = std::string(X509_verify_cert_error_string(err)) + " at depth " +
            std::to_string(X509_STORE_CTX_get_error_depth(ctx.get()));
    }
  }
  sk_X509_free(untrusted);
  ERR_clear_error();
  return why;
}

// RFC 7672 3.2.3: DNS-IDs when the certificate has any, else the CN-ID (the library's rule
// when X509_CHECK_FLAG_ALWAYS_CHECK_SUBJECT is not set); a wildcard is a whole left-most
// label standing for exactly one label. Returns the reference identifier that matched.
std::optional<std::string> nameMatch(X509* leaf, const std::vector<std::string>& names) {
  for (const auto& n : names) {
    if (n.empty()) continue;
    if (X509_check_host(leaf, n.data(), n.size(), X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS, nullptr) == 1) return n;
  }
  return std::nullopt;
}

std::string joinNames(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out.empty() ? "none given" : out;
}

}  // namespace

const char* daneStatusName(DaneStatus s) {
  switch (s) {
    case DaneStatus::Verified: return "verified";
    case DaneStatus::Mismatch: return "mismatch";
    case DaneStatus::NoUsableRecords: return "no usable records";
  }
  return "?";
}

std::string tlsaText(const TlsaRecord& r, size_t maxHex) {
  return std::to_string(r.usage) + " " + std::to_string(r.selector) + " " + std::to_string(r.matchingType) + " " +
         hex(r.data.data(), r.data.size(), maxHex);
}

std::string unusableReason(const TlsaRecord& r) {
  // RFC 7672 3.1.3: "SMTP clients MAY treat such records as 'unusable'"; we do, as Postfix
  // does: they cannot add security to opportunistic SMTP, only break it.
  if (r.usage == 0 || r.usage == 1)
    return std::string(usageName(r.usage)) + "(" + std::to_string(r.usage) + ") is not used for SMTP (RFC 7672 3.1.3)";
  if (r.usage != kUsageDaneTa && r.usage != kUsageDaneEe) return "unknown usage " + std::to_string(r.usage);
  if (r.selector != kSelectorCert && r.selector != kSelectorSpki) return "unknown selector " + std::to_string(r.selector);
  if (r.matchingType == kMatchSha256 && r.data.size() != 32) return "SHA2-256 data is not 32 bytes";
  if (r.matchingType == kMatchSha512 && r.data.size() != 64) return "SHA2-512 data is not 64 bytes";
  if (r.matchingType != kMatchFull && r.matchingType != kMatchSha256 && r.matchingType != kMatchSha512)
    return "unknown matching type " + std::to_string(r.matchingType);
  if (r.data.empty()) return "no association data";
  return {};
}

DaneResult verifyDane(const DaneParams& params, const std::vector<std::string>& chainDer,
                      std::chrono::system_clock::time_point now) {
  DaneResult res;
  const time_t nowT = std::chrono::system_clock::to_time_t(now);

  // RFC 7672 2.2 / RFC 6698 4.1: which records take part.
  std::vector<size_t> usable;
  std::string unusable;
  size_t unusableListed = 0;
  for (size_t i = 0; i < params.tlsa.size(); ++i) {
    std::string why = unusableReason(params.tlsa[i]);
    if (why.empty()) {
      usable.push_back(i);
    } else if (unusableListed++ < kMaxListed) {
      unusable += (unusable.empty() ? "" : "; ") + tlsaText(params.tlsa[i]) + ": " + why;
    }
  }
  if (usable.empty()) {
    res.status = DaneStatus::NoUsableRecords;
    res.reason = params.tlsa.empty() ? "no TLSA records" : "no usable TLSA records (" + unusable + ")";
    res.reason += ": TLS without authentication (RFC 7672 2.2)";
    return res;
  }
  // RFC 7671 9 (required by RFC 7672 5): per usage and selector, only the strongest digest.
  std::map<std::pair<uint8_t, uint8_t>, int> strongest;
  for (size_t i : usable) {
    const auto& r = params.tlsa[i];
    int& best = strongest[{r.usage, r.selector}];
    best = std::max(best, digestRank(r.matchingType));
  }
  std::vector<size_t> used;
  std::string skipped;
  for (size_t i : usable) {
    const auto& r = params.tlsa[i];
    if (r.matchingType != kMatchFull && digestRank(r.matchingType) < strongest[{r.usage, r.selector}]) {
      if (skipped.empty()) skipped = "; " + tlsaText(r) + " not used: a stronger digest is published (RFC 7671 9)";
      continue;
    }
    used.push_back(i);
  }

  res.status = DaneStatus::Mismatch;
  if (chainDer.empty()) {
    res.reason = "the server presented no certificate";
    return res;
  }
  std::vector<Cert> chain;
  for (size_t d = 0; d < chainDer.size(); ++d) {
    const auto* p = reinterpret_cast<const unsigned char*>(chainDer[d].data());
    X509Ptr x(d2i_X509(nullptr, &p, static_cast<long>(chainDer[d].size())));
    if (!x || p != reinterpret_cast<const unsigned char*>(chainDer[d].data()) + chainDer[d].size()) {
      ERR_clear_error();
      res.reason = "certificate at depth " + std::to_string(d) + " does not parse";
      return res;
    }
    chain.push_back(Cert{std::move(x), {}});
  }

  std::vector<std::string> failures;
  for (size_t idx : used) {
    const TlsaRecord& r = params.tlsa[idx];
    const std::string label = std::string(usageName(r.usage)) + " " + tlsaText(r);

    if (r.usage == kUsageDaneEe) {
      // RFC 7672 3.1.1 / 3.2.1: the leaf alone; names and dates do not matter.
      const std::string* v = chain[0].value(r.selector, r.matchingType);
      if (v && dataEquals(r, *v)) {
        res.status = DaneStatus::Verified;
        res.matchedRecord = static_cast<int>(idx);
        res.matchedDepth = 0;
        res.reason = label + ": leaf " + selectorName(r.selector) + " matches";
        return res;
      }
      failures.push_back(tlsaText(r) + " vs leaf " + selectorName(r.selector) + " " + matchName(r.matchingType) + " " +
                         (v ? hex(*v) : std::string("(unreadable)")));
      continue;
    }

    // DANE-TA(2), RFC 7672 3.1.2: the trust anchor is an issuer the server sends in its
    // chain. A match at the leaf is not a trust anchor (publish DANE-EE for that).
    std::optional<size_t> anchor;
    for (size_t d = 1; d < chain.size() && !anchor; ++d) {
      const std::string* v = chain[d].value(r.selector, r.matchingType);
      if (v && dataEquals(r, *v)) anchor = d;
    }
    bool bareKey = false;
    if (!anchor && r.selector == kSelectorSpki && r.matchingType == kMatchFull) {
      // RFC 6698 2.1.2 / RFC 7672 3.1.2: a bare public key as trust anchor. It must have
      // signed a certificate of the chain; that certificate (the highest such) then anchors
      // the path below it, and its own dates are checked here.
      const unsigned char* p = r.data.data();
      PkeyPtr key(d2i_PUBKEY(nullptr, &p, static_cast<long>(r.data.size())));
      ERR_clear_error();
      if (key) {
        for (size_t d = chain.size(); d-- > 0 && !anchor;) {
          if (X509_verify(chain[d].x.get(), key.get()) == 1) anchor = d;
        }
        ERR_clear_error();
        bareKey = anchor.has_value();
      }
    }
    if (!anchor) {
      failures.push_back(tlsaText(r) + " matches no issuer certificate in the chain (" +
                         std::to_string(chain.size()) + " presented)");
      continue;
    }
    const std::string where = bareKey ? "key signed " + subjectOf(chain[*anchor].x.get()) + " at depth " +
                                            std::to_string(*anchor)
                                      : "CA " + subjectOf(chain[*anchor].x.get()) + " at depth " +
                                            std::to_string(*anchor);
    // A leaf signed by the bare key directly has no path to check, only its own dates.
    std::string invalid = bareKey && *anchor == 0 ? std::string() : validateTo(chain, *anchor, nowT);
    if (invalid.empty() && bareKey) {
      time_t t = nowT;
      X509* a = chain[*anchor].x.get();
      if (X509_cmp_time(X509_get0_notBefore(a), &t) > 0) invalid = "certificate is not yet valid at depth " + std::to_string(*anchor);
      else if (X509_cmp_time(X509_get0_notAfter(a), &t) < 0) invalid = "certificate has expired at depth " + std::to_string(*anchor);
    }
    if (!invalid.empty()) {
      failures.push_back(tlsaText(r) + " matches " + where + ", but the chain does not validate: " + invalid);
      continue;
    }
    // RFC 7672 3.2.2: name checks are mandatory with DANE-TA(2).
    auto name = nameMatch(chain[0].x.get(), params.referenceNames);
    if (!name) {
      failures.push_back(tlsaText(r) + " matches " + where + ", but the leaf " + subjectOf(chain[0].x.get()) +
                         " matches none of the names " + joinNames(params.referenceNames));
      continue;
    }
    res.status = DaneStatus::Verified;
    res.matchedRecord = static_cast<int>(idx);
    res.matchedDepth = static_cast<int>(*anchor);
    res.reason = label + ": " + where + ", chain valid, name " + *name;
    return res;
  }

  res.reason = "no TLSA record matched: ";
  for (size_t i = 0; i < failures.size() && i < kMaxListed; ++i) res.reason += (i ? "; " : "") + failures[i];
  if (failures.size() > kMaxListed) res.reason += "; and " + std::to_string(failures.size() - kMaxListed) + " more";
  res.reason += skipped;
  return res;
}

}  // namespace subrelay::tls
