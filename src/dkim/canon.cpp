// DKIM canonicalisation (RFC 6376 3.4.1-3.4.4) and the streaming body hash (RFC 6376
// 3.7, SHA-256 per 3.3). canonicalizeBody() works line by line on a whole body; the
// StreamingBodyHash is a byte-at-a-time state machine written independently of it, so
// the tests (and fuzz_dkim_canon) can compare the two.
#include <openssl/evp.h>

#include <cstring>

#include "dkim/dkim.h"
#include "util/cptr.h"

namespace subrelay::dkim {
namespace {

bool isWsp(char c) { return c == ' ' || c == '\t'; }  // RFC 5234 WSP = SP / HTAB

char lowerAscii(char c) { return (c >= 'A' && c <= 'Z') ? char(c - 'A' + 'a') : c; }

using MdCtxPtr = util::CPtr<EVP_MD_CTX, EVP_MD_CTX_free>;

}  // namespace

std::string sha256(std::string_view data) {
  unsigned char d[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  if (EVP_Digest(data.data(), data.size(), d, &n, EVP_sha256(), nullptr) != 1) std::abort();
  return std::string(reinterpret_cast<const char*>(d), n);
}

std::string_view algorithmName(Algorithm a) {
  return a == Algorithm::RsaSha256 ? "rsa-sha256" : "ed25519-sha256";
}

std::optional<Algorithm> parseAlgorithm(std::string_view s) {
  if (s == "rsa-sha256") return Algorithm::RsaSha256;
  if (s == "ed25519-sha256") return Algorithm::Ed25519Sha256;
  return std::nullopt;
}

// RFC 6376 3.4.1 simple: "does not change header fields in any way".
// RFC 6376 3.4.2 relaxed:
//   - "Convert all header field names (not the header field values) to lowercase."
//   - "Unfold all header field continuation lines as described in [RFC5322]"
//   - "Convert all sequences of one or more WSP characters to a single SP character."
//   - "Delete all WSP characters at the end of each unfolded header field value."
//   - "Delete any WSP characters remaining before and after the colon separating the
//      header field name from the header field value. The colon separator MUST be
//      retained."
std::string canonicalizeHeader(std::string_view field, Canon c) {
  if (c == Canon::Simple) return std::string(field);
  if (field.size() >= 2 && field.substr(field.size() - 2) == "\r\n") field.remove_suffix(2);
  std::string out;
  out.reserve(field.size() + 2);
  size_t colon = field.find(':');
  std::string_view name = field.substr(0, colon);
  while (!name.empty() && isWsp(name.back())) name.remove_suffix(1);
  for (char ch : name) out += lowerAscii(ch);
  if (colon == std::string_view::npos) {  // not a header field; keep the name part only
    out += "\r\n";
    return out;
  }
  out += ':';
  bool pendingSp = false;
  bool any = false;  // leading WSP after the colon is deleted
  for (size_t i = colon + 1; i < field.size(); ++i) {
    char ch = field[i];
    // Unfolding removes the CRLF of each continuation; the WSP after it stays WSP.
    if (ch == '\r' && i + 1 < field.size() && field[i + 1] == '\n') {
      ++i;
      continue;
    }
    if (isWsp(ch)) {
      pendingSp = any;
      continue;
    }
    if (pendingSp) out += ' ';
    pendingSp = false;
    out += ch;
    any = true;
  }
  out += "\r\n";
  return out;
}

// RFC 6376 3.4.3 simple: "ignores all empty lines at the end of the message body ...
// If there is no body or no trailing CRLF on the message body, a CRLF is added."
// RFC 6376 3.4.4 relaxed: "Ignore all whitespace at the end of lines ... Reduce all
// sequences of WSP within a line to a single SP character ... Ignore all empty lines at
// the end of the message body ... If the body is non-empty but does not end with a
// CRLF, a CRLF is added." A line of WSP only is empty once its trailing WSP is gone.
std::string canonicalizeBody(std::string_view body, Canon c) {
  std::vector<std::string> lines;
  size_t pos = 0;
  while (pos < body.size()) {
    size_t e = body.find("\r\n", pos);
    if (e == std::string_view::npos) {
      lines.emplace_back(body.substr(pos));  // last line without CRLF: one is added
      break;
    }
    lines.emplace_back(body.substr(pos, e - pos));
    pos = e + 2;
  }
  if (c == Canon::Relaxed) {
    for (auto& l : lines) {
      std::string r;
      bool ws = false;
      for (char ch : l) {
        if (isWsp(ch)) {
          ws = true;
          continue;
        }
        if (ws) r += ' ';
        ws = false;
        r += ch;
      }
      l = std::move(r);  // trailing WSP dropped with `ws`
    }
  }
  while (!lines.empty() && lines.back().empty()) lines.pop_back();
  std::string out;
  for (const auto& l : lines) {
    out += l;
    out += "\r\n";
  }
  if (out.empty() && c == Canon::Simple) out = "\r\n";
  return out;
}

// ---- StreamingBodyHash -----------------------------------------------------------------
//
// One state machine per canonicalisation. A CR is held back until the next byte shows
// whether it ends a line; empty lines are held back as a count (RFC 6376 3.4.3/3.4.4
// drop them at the end of the body, so they are only emitted once content follows):
// memory stays bounded however many there are. Output goes through a small buffer into
// an incremental SHA-256.

namespace {

class CanonHasher {
 public:
  explicit CanonHasher(bool relaxed) : relaxed_(relaxed), md_(EVP_MD_CTX_new()) {
    if (!md_ || EVP_DigestInit_ex(md_.get(), EVP_sha256(), nullptr) != 1) std::abort();
    buf_.reserve(kFlushAt + 64);
  }

  // Feeds a chunk. Runs of ordinary bytes inside a line that already has content are
  // copied as they are (neither canonicalisation changes them); everything else goes
  // through byte().
  void feed(std::string_view in) {
    const char* p = in.data();
    const char* end = p + in.size();
    while (p < end) {
      if (lineHasContent_ && !pendingCr_ && !pendingWsp_) {
        const char* q = p;
        while (q < end && *q != '\r' && !(relaxed_ && isWsp(*q))) ++q;
        if (q > p) {
          buf_.append(p, size_t(q - p));
          p = q;
          flushIfBig();
          continue;
        }
      }
      byte(*p++);
    }
  }

  void byte(char c) {
    if (pendingCr_) {
      pendingCr_ = false;
      if (c == '\n') {
        endLine();
        return;
      }
      content('\r');  // a bare CR is line content
    }
    if (c == '\r') {
      pendingCr_ = true;
    } else if (relaxed_ && isWsp(c)) {
      pendingWsp_ = true;
    } else {
      content(c);
    }
  }

  std::string finish() {
    if (pendingCr_) content('\r');
    pendingCr_ = false;
    // "If the body is non-empty but does not end with a CRLF, a CRLF is added."
    if (lineHasContent_) emit("\r\n", 2);
    // Simple: "If there is no body ... a CRLF is added" (an empty body hashes as CRLF).
    if (!relaxed_ && !emittedAny_) emit("\r\n", 2);
    flush();
    unsigned char d[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (EVP_DigestFinal_ex(md_.get(), d, &n) != 1) std::abort();
    return std::string(reinterpret_cast<const char*>(d), n);
  }

  void flushIfBig() {
    if (buf_.size() >= kFlushAt) flush();
  }
  void flush() {
    if (!buf_.empty()) EVP_DigestUpdate(md_.get(), buf_.data(), buf_.size());
    buf_.clear();
  }

 private:
  static constexpr size_t kFlushAt = 8192;

  void endLine() {
    pendingWsp_ = false;  // relaxed: trailing WSP is ignored
    if (lineHasContent_) {
      emit("\r\n", 2);
      lineHasContent_ = false;
    } else {
      ++emptyLines_;
    }
  }

  void content(char c) {
    if (!lineHasContent_) {
      // Empty lines before content are not at the end of the body after all.
      for (; emptyLines_ > 0; --emptyLines_) emit("\r\n", 2);
      lineHasContent_ = true;
    }
    if (pendingWsp_) {
      buf_ += ' ';  // relaxed: a WSP run becomes one SP
      pendingWsp_ = false;
    }
    buf_ += c;
    emittedAny_ = true;
  }

  void emit(const char* p, size_t n) {
    buf_.append(p, n);
    emittedAny_ = true;
    flushIfBig();
  }

  bool relaxed_;
  MdCtxPtr md_;
  std::string buf_;
  uint64_t emptyLines_ = 0;
  bool pendingCr_ = false;
  bool pendingWsp_ = false;
  bool lineHasContent_ = false;
  bool emittedAny_ = false;
};

}  // namespace

struct StreamingBodyHash::State {
  CanonHasher simple{false};
  CanonHasher relaxed{true};
  // Progress through "\r\n\r\n", the end of the header block. Starts at 2 so that a
  // message beginning with CRLF has an empty header block and the body follows.
  int headerMatch = 2;
  bool inBody = false;
};

StreamingBodyHash::StreamingBodyHash() : s_(std::make_unique<State>()) {}
StreamingBodyHash::~StreamingBodyHash() = default;
StreamingBodyHash::StreamingBodyHash(StreamingBodyHash&&) noexcept = default;
StreamingBodyHash& StreamingBodyHash::operator=(StreamingBodyHash&&) noexcept = default;

void StreamingBodyHash::update(std::string_view bytes) {
  size_t i = 0;
  State& s = *s_;
  while (!s.inBody && i < bytes.size()) {
    char c = bytes[i++];
    char want = (s.headerMatch % 2 == 0) ? '\r' : '\n';
    if (c == want) {
      if (++s.headerMatch == 4) s.inBody = true;
    } else {
      s.headerMatch = (c == '\r') ? 1 : 0;
    }
  }
  if (i < bytes.size()) {
    s.simple.feed(bytes.substr(i));
    s.relaxed.feed(bytes.substr(i));
  }
}

void StreamingBodyHash::updateBody(std::string_view bytes) {
  State& s = *s_;
  s.inBody = true;
  if (bytes.empty()) return;
  s.simple.feed(bytes);
  s.relaxed.feed(bytes);
}

StreamingBodyHash::Digests StreamingBodyHash::finish() {
  Digests d;
  d.simple = s_->simple.finish();
  d.relaxed = s_->relaxed.finish();
  return d;
}

}  // namespace subrelay::dkim
