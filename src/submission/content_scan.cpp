// ContentScan (content_scan.h): header limits and the streaming DKIM body hash.
#include "submission/content_scan.h"

#include <string>

namespace subrelay::submission {

ContentScan::ContentScan(Limits limits, bool hashBody)
    : limits_(limits), hashing_(hashBody), scanner_(message::HeaderScanner::Limits{limits.maxHeaderBytes, limits.maxHeaderFields}) {
  scanner_.keepUndecided(hashBody);
}

std::optional<Refusal> ContentScan::feed(std::string_view chunk) {
  const size_t at = scanner_.feed(chunk);
  switch (scanner_.violation()) {
    case message::HeaderScanner::Violation::None: break;
    case message::HeaderScanner::Violation::TooManyFields:
      return Refusal{552, "5.3.4", "Too many header fields (limit " + std::to_string(limits_.maxHeaderFields) + ")"};
    case message::HeaderScanner::Violation::TooManyBytes:
      return Refusal{552, "5.3.4",
                     "Message header section too large (limit " + std::to_string(limits_.maxHeaderBytes) + " bytes)"};
  }
  if (!hashing_ || at == std::string_view::npos) return std::nullopt;
  if (!bodyHash_) bodyHash_.emplace();
  if (!bodyStarted_) {
    bodyStarted_ = true;
    bodyHash_->updateBody(scanner_.bodyPrefix());  // a body line begun in an earlier piece
  }
  bodyHash_->updateBody(chunk.substr(at));
  return std::nullopt;
}

std::optional<dkim::StreamingBodyHash::Digests> ContentScan::finish() {
  if (!hashing_) return std::nullopt;
  if (!bodyHash_) bodyHash_.emplace();
  if (!bodyStarted_) {
    scanner_.finish();
    bodyHash_->updateBody(scanner_.bodyPrefix());
  }
  return bodyHash_->finish();
}

}  // namespace subrelay::submission
