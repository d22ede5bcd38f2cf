// DKIM-Signature generation (RFC 6376 3.5 tags, 3.7 hash computation, 5.4 header
// selection) for rsa-sha256 (RFC 6376 3.3.1) and ed25519-sha256 (RFC 8463 3), and the
// KeyRing that picks keys by signing domain.
//
// h= choice (RFC 6376 5.4.2 oversigning): every listed field present in the message is
// signed once per instance; From, To, Cc, Subject, Date and Reply-To are listed once
// more than they occur, including once when absent (as Stalwart and rspamd do), so a
// later added instance of any of them breaks the signature. The other fields in the
// list are signed only when present. Foreign DKIM-Signature fields already in the
// message are left alone and not signed.
#include <algorithm>
#include <array>

#include "dkim/dkim.h"
#include "util/base64.h"
#include "util/strings.h"

namespace subrelay::dkim {
namespace {

bool isWsp(char c) { return c == ' ' || c == '\t'; }

struct SignedName {
  std::string_view name;
  bool oversign;
};

// The header comment of dkim.h (issue 4), in this order in h=.
constexpr std::array<SignedName, 14> kSignedNames{{
    {"From", true},
    {"To", true},
    {"Cc", true},
    {"Subject", true},
    {"Date", true},
    {"Message-ID", false},
    {"Reply-To", true},
    {"In-Reply-To", false},
    {"References", false},
    {"MIME-Version", false},
    {"Content-Type", false},
    {"Content-Transfer-Encoding", false},
    {"List-Unsubscribe", false},
    {"List-Unsubscribe-Post", false},
}};

struct Field {
  std::string_view name;  // before the colon, trailing WSP trimmed
  std::string_view raw;   // the whole field with its folding and final CRLF
};

// Header fields of the message up to the empty line (RFC 5322 2.2: a line starting
// with WSP continues the previous field, 2.2.3 folding).
std::vector<Field> parseHeaderFields(std::string_view msg) {
  std::vector<Field> out;
  size_t pos = 0;
  size_t start = 0;
  while (pos < msg.size()) {
    size_t e = msg.find("\r\n", pos);
    size_t lineEnd = e == std::string_view::npos ? msg.size() : e + 2;
    if (e == pos) break;  // the empty line ending the header block
    if (isWsp(msg[pos]) && !out.empty()) {
      out.back().raw = msg.substr(start, lineEnd - start);
    } else {
      std::string_view line = msg.substr(pos, lineEnd - pos);
      std::string_view name = line.substr(0, line.find(':'));
      while (!name.empty() && isWsp(name.back())) name.remove_suffix(1);
      start = pos;
      out.push_back({name, line});
    }
    pos = lineEnd;
  }
  return out;
}

// d= and s= end up inside a tag list: refuse anything that would break it.
bool validDnsLabelChars(std::string_view s) {
  if (s.empty()) return false;
  return std::all_of(s.begin(), s.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
           c == '-' || c == '_';
  });
}

// Folds the field into lines of at most kWidth characters (RFC 5322 2.1.1 "SHOULD be
// no more than 78"), breaking only where RFC 6376 3.2/3.5 allow FWS: between tags,
// after a colon in h=, and anywhere inside the base64 of bh= and b=.
class Folder {
 public:
  static constexpr size_t kWidth = 78;
  explicit Folder(std::string_view start) : out_(start), col_(start.size()) {}

  void piece(std::string_view s, bool spaceBefore) {
    size_t need = s.size() + (spaceBefore ? 1 : 0);
    if (col_ + need > kWidth && col_ > 1) {
      out_ += "\r\n ";
      col_ = 1;
    } else if (spaceBefore) {
      out_ += ' ';
      ++col_;
    }
    out_ += s;
    col_ += s.size();
  }

  void base64(std::string_view s) {
    while (!s.empty()) {
      if (col_ >= kWidth) {
        out_ += "\r\n ";
        col_ = 1;
      }
      std::string_view part = s.substr(0, kWidth - col_);
      out_ += part;
      col_ += part.size();
      s.remove_prefix(part.size());
    }
  }

  const std::string& str() const { return out_; }

 private:
  std::string out_;
  size_t col_;
};

std::string_view canonName(Canon c) { return c == Canon::Simple ? "simple" : "relaxed"; }

}  // namespace

util::Result<std::string> LocalSigner::sign(std::string_view message, const std::vector<SignerKey>& keys,
                                            const SignOptions& opts,
                                            const StreamingBodyHash::Digests* bodyHashes) const {
  if (keys.empty()) return util::makeError("DKIM: no signing keys");
  if (opts.expiresAfter && *opts.expiresAfter <= 0) {
    // RFC 6376 3.5 x=: "MUST be greater than the value of the t= tag".
    return util::makeError("DKIM: expiry must be after the signing time");
  }

  const std::vector<Field> fields = parseHeaderFields(message);

  // RFC 6376 5.4: "The From header field MUST be signed".
  if (std::none_of(fields.begin(), fields.end(), [](const Field& f) { return util::iequals(f.name, "From"); })) {
    return util::makeError("DKIM: the message has no From header field");
  }

  // Body hash, RFC 6376 3.7 step 1 (l= is never used: the whole body is covered).
  StreamingBodyHash::Digests own;
  if (!bodyHashes) {
    StreamingBodyHash h;
    h.update(message);
    own = h.finish();
    bodyHashes = &own;
  }
  const std::string bh = util::base64Encode(opts.bodyCanon == Canon::Simple ? bodyHashes->simple : bodyHashes->relaxed);

  // RFC 6376 5.4.2: with n instances of a field listed, the verifier takes the last
  // instance first, then the one above it, and so on; a name listed more often than
  // it occurs stands for the null string. We do the same when hashing.
  std::vector<std::string_view> hNames;
  std::string headerData;
  for (const auto& sn : kSignedNames) {
    std::vector<const Field*> found;
    for (const auto& f : fields) {
      if (util::iequals(f.name, sn.name)) found.push_back(&f);
    }
    size_t listed = found.size() + (sn.oversign ? 1 : 0);
    for (size_t i = 0; i < listed; ++i) hNames.push_back(sn.name);
    for (auto it = found.rbegin(); it != found.rend(); ++it) {
      headerData += canonicalizeHeader((*it)->raw, opts.headerCanon);
    }
  }

  std::string out;
  for (const auto& k : keys) {
    if (!k.key) return util::makeError("DKIM: key for " + k.domain + " is not loaded");
    if (!validDnsLabelChars(k.domain) || !validDnsLabelChars(k.selector)) {
      return util::makeError("DKIM: invalid domain or selector '" + k.domain + "'/'" + k.selector + "'");
    }
    const Algorithm alg = k.key->algorithm();

    // RFC 6376 3.5 tags, in the order v a c d s t x h bh b.
    Folder f("DKIM-Signature:");
    f.piece("v=1;", true);
    f.piece("a=" + std::string(algorithmName(alg)) + ";", true);
    f.piece("c=" + std::string(canonName(opts.headerCanon)) + "/" + std::string(canonName(opts.bodyCanon)) + ";",
            true);
    f.piece("d=" + util::toLower(k.domain) + ";", true);
    f.piece("s=" + k.selector + ";", true);
    f.piece("t=" + std::to_string(opts.timestamp) + ";", true);
    if (opts.expiresAfter) f.piece("x=" + std::to_string(opts.timestamp + *opts.expiresAfter) + ";", true);
    for (size_t i = 0; i < hNames.size(); ++i) {
      std::string p = (i == 0 ? "h=" : "") + std::string(hNames[i]) + (i + 1 < hNames.size() ? ":" : ";");
      f.piece(p, i == 0);
    }
    f.piece("bh=", true);
    f.base64(bh);
    f.piece(";", false);
    f.piece("b=", true);

    // RFC 6376 3.7 step 2: the selected fields, then "the DKIM-Signature header field
    // that exists (verifying) or will be inserted (signing) in the message, with the
    // value of the "b=" tag (including all surrounding whitespace) deleted (i.e.,
    // treated as the empty string), canonicalized using the header canonicalization
    // algorithm specified in the "c=" tag, and without a trailing CRLF."
    std::string sigCanon = canonicalizeHeader(f.str() + "\r\n", opts.headerCanon);
    sigCanon.resize(sigCanon.size() - 2);
    std::string data = headerData + sigCanon;

    // rsa-sha256: RSASSA-PKCS1-v1_5 over SHA-256 of the data (RFC 6376 3.3.1).
    // ed25519-sha256: RFC 8463 3 "The Ed25519-SHA256 signing algorithm computes a
    // message hash as defined in Section 3 of [RFC6376] using SHA-256 as the
    // hash-alg. It signs the hash with the PureEdDSA variant Ed25519".
    auto sig = alg == Algorithm::RsaSha256 ? k.key->signRaw(data) : k.key->signRaw(sha256(data));
    if (!sig) return util::makeError("DKIM (" + k.domain + "/" + k.selector + "): " + sig.error().message);
    f.base64(util::base64Encode(*sig));
    out += f.str();
    out += "\r\n";
  }
  return out;
}

void KeyRing::add(SignerKey k) {
  k.domain = util::toLower(k.domain);
  auto& v = byDomain_[k.domain];
  v.push_back(std::move(k));
  // RSA first for dual signing: verifiers that stop at the first signature they
  // understand (RFC 8463 is not universal yet) then see RSA.
  std::stable_sort(v.begin(), v.end(), [](const SignerKey& a, const SignerKey& b) {
    auto rank = [](const SignerKey& x) { return x.key && x.key->algorithm() == Algorithm::RsaSha256 ? 0 : 1; };
    return rank(a) < rank(b);
  });
}

const std::vector<SignerKey>* KeyRing::forDomain(std::string_view domain) const {
  auto it = byDomain_.find(util::toLower(domain));
  return it == byDomain_.end() ? nullptr : &it->second;
}

}  // namespace subrelay::dkim
