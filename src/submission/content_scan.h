// What the server learns from a message while it streams in, before the end of data:
// the header limits (limits.max_header_bytes, limits.max_header_fields), enforced as the
// pieces arrive so a flood of tiny fields is refused without being kept, and, with DKIM
// keys configured, the body hash from the body's first octet (RFC 6376 3.7), so signing
// needs no second pass over the body. Where the body starts is message::HeaderScanner's
// call, the same rule the fix-ups follow.
//
// Pure: fed the dot-unstuffed pieces by the connection (app/worker.cpp), in order; one
// object per message (a new DATA/BDAT or RSET starts a new one).
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

#include "dkim/dkim.h"
#include "message/header_scanner.h"
#include "submission/decide.h"

namespace subrelay::submission {

class ContentScan {
 public:
  struct Limits {
    uint64_t maxHeaderBytes = 0;   // 0: none
    uint64_t maxHeaderFields = 0;  // 0: none
  };
  ContentScan(Limits limits, bool hashBody);

  // The next piece. Once a header limit is passed: 552 5.3.4 saying which (and nothing
  // more is scanned).
  std::optional<Refusal> feed(std::string_view chunk);
  // Header octets seen so far (all of them while the header section is still open).
  uint64_t headerBytes() const { return scanner_.headerBytes(); }
  // The end of the message (an unfinished line that never became a field is body): the
  // body digests when hashing, else nothing. Once per message.
  std::optional<dkim::StreamingBodyHash::Digests> finish();

 private:
  Limits limits_;
  bool hashing_;
  message::HeaderScanner scanner_;
  std::optional<dkim::StreamingBodyHash> bodyHash_;
  bool bodyStarted_ = false;
};

}  // namespace subrelay::submission
