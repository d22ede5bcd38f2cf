// Fuzz target for the DKIM canonicaliser (RFC 6376 3.4.1-3.4.4) and the streaming body
// hash (3.7). The first input byte seeds the chunk sizes; the rest is a message. The
// streaming hasher, fed in those chunks, must agree with canonicalizeBody() plus a
// one-shot SHA-256 for both canonicalisations; body canonicalisation must be
// idempotent; header canonicalisation must not crash and must end in CRLF.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "dkim/dkim.h"

using subrelay::dkim::Canon;

namespace {

std::string_view bodyOf(std::string_view msg) {
  if (msg.substr(0, 2) == "\r\n") return msg.substr(2);
  size_t p = msg.find("\r\n\r\n");
  return p == std::string_view::npos ? std::string_view() : msg.substr(p + 4);
}

void require(bool ok) {
  if (!ok) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  uint32_t seed = data[0];
  std::string_view msg(reinterpret_cast<const char*>(data + 1), size - 1);

  // Header canonicalisation of the first field-like line group.
  std::string_view firstField = msg.substr(0, msg.find("\r\n\r\n"));
  for (Canon c : {Canon::Simple, Canon::Relaxed}) {
    std::string h = subrelay::dkim::canonicalizeHeader(firstField, c);
    if (c == Canon::Relaxed) require(h.size() >= 2 && h.substr(h.size() - 2) == "\r\n");
    if (c == Canon::Simple) require(h == firstField);
  }

  const std::string_view body = bodyOf(msg);
  const std::string simple = subrelay::dkim::canonicalizeBody(body, Canon::Simple);
  const std::string relaxed = subrelay::dkim::canonicalizeBody(body, Canon::Relaxed);
  require(subrelay::dkim::canonicalizeBody(simple, Canon::Simple) == simple);
  require(subrelay::dkim::canonicalizeBody(relaxed, Canon::Relaxed) == relaxed);
  require(simple.size() >= 2 && simple.substr(simple.size() - 2) == "\r\n");

  subrelay::dkim::StreamingBodyHash h;
  size_t pos = 0;
  while (pos < msg.size()) {
    seed = seed * 1103515245u + 12345u;
    size_t n = (seed >> 16) % 19;  // 0..18: empty chunks too
    n = std::min(n, msg.size() - pos);
    h.update(msg.substr(pos, n));
    pos += n;
  }
  auto d = h.finish();
  require(d.simple == subrelay::dkim::sha256(simple));
  require(d.relaxed == subrelay::dkim::sha256(relaxed));
  return 0;
}
