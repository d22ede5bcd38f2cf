// HeaderScanner (header_scanner.h): RFC 5322 2.2 / 2.2.3 / 4.5 header section
// boundary, streaming, with the header limits.
#include "message/header_scanner.h"

#include <cstring>

namespace subrelay::message {

namespace {

bool isWsp(char c) { return c == ' ' || c == '\t'; }

// RFC 5322 2.1.1: a line is at most 998 characters. A line that has gone this far without
// its colon is no header field: the body starts there. (A content rule, so the verdict is
// the same however the message is split, and it bounds what keepUndecided holds.)
constexpr uint64_t kMaxFieldNameLine = 998;

// ftext (RFC 5322 3.6.8): printable US-ASCII except ":".
bool isFtext(char c) { return c >= 33 && c <= 126 && c != ':'; }

}  // namespace

void HeaderScanner::endField(uint64_t at) {
  if (!haveField_) return;
  haveField_ = false;
  open_.end = at;
  if (onField_) onField_(open_);
}

void HeaderScanner::startBody(uint64_t at) {
  bodyOffset_ = at;
  state_ = State::Body;
}

uint64_t HeaderScanner::decidedHeaderBytes() const {
  switch (state_) {
    case State::LineStartCr:
    case State::Name:
    case State::NameWsp:
      return lineStart_;  // the current line may still turn out to be body
    default:
      return headerBytes();
  }
}

bool HeaderScanner::overLimits() {
  // Only octets known to be header count: the count then grows monotonically to the same
  // final value whatever the split, so the verdict does not depend on how data arrived.
  if (limits_.maxBytes != 0 && decidedHeaderBytes() > limits_.maxBytes) {
    violation_ = Violation::TooManyBytes;
  } else if (limits_.maxFields != 0 && fields_ > limits_.maxFields) {
    violation_ = Violation::TooManyFields;
  } else {
    return false;
  }
  state_ = State::Stopped;
  undecided_.clear();
  undecided_.shrink_to_fit();
  return true;
}

size_t HeaderScanner::feed(std::string_view chunk) {
  if (state_ == State::Body) {
    fed_ += chunk.size();
    return 0;
  }
  if (state_ == State::Stopped) {
    fed_ += chunk.size();
    return std::string_view::npos;
  }
  const uint64_t base = fed_;
  const size_t n = chunk.size();
  size_t i = 0;
  // Where the body begins: `at` is absolute; the octets of its line before this chunk
  // are in undecided_.
  auto bodyFrom = [&](uint64_t at) -> size_t {
    startBody(at);
    fed_ = base + n;
    if (overLimits()) return std::string_view::npos;
    if (at >= base) {
      undecided_.clear();
      return static_cast<size_t>(at - base);
    }
    return 0;
  };
  while (i < n) {
    const uint64_t abs = base + i;
    const char c = chunk[i];
    switch (state_) {
      case State::LineStart:
        lineStart_ = abs;
        if (c == '\n') {  // the empty line (a bare LF tolerated, as the SMTP layer refuses those)
          endField(abs);
          separator_ = true;
          return bodyFrom(abs + 1);
        }
        if (c == '\r') {
          state_ = State::LineStartCr;
          ++i;
          break;
        }
        if (isWsp(c) && haveField_) {  // continuation line (2.2.3)
          state_ = State::Field;
          ++i;
          break;
        }
        endField(abs);
        if (!isFtext(c)) return bodyFrom(abs);  // not a field: the body starts here
        next_ = FieldSpan{};
        next_.offset = abs;
        state_ = State::Name;
        ++i;
        break;
      case State::LineStartCr:
        if (c == '\n') {
          endField(lineStart_);
          separator_ = true;
          return bodyFrom(abs + 1);
        }
        endField(lineStart_);
        return bodyFrom(lineStart_);
      case State::Name:
        if (isFtext(c) && abs - lineStart_ < kMaxFieldNameLine) {
          ++i;
          break;
        }
        if (isFtext(c)) return bodyFrom(lineStart_);  // 998 octets and no colon
        next_.nameEnd = abs;
        if (isWsp(c)) {  // obsolete WSP before the colon (4.5)
          state_ = State::NameWsp;
          ++i;
          break;
        }
        [[fallthrough]];
      case State::NameWsp:
        if (isWsp(c) && abs - lineStart_ < kMaxFieldNameLine) {
          ++i;
          break;
        }
        if (isWsp(c)) return bodyFrom(lineStart_);
        if (c != ':') return bodyFrom(lineStart_);
        next_.colon = abs;
        open_ = next_;
        haveField_ = true;
        ++fields_;
        undecided_.clear();
        state_ = State::Field;
        ++i;
        break;
      case State::Field: {
        const void* lf = std::memchr(chunk.data() + i, '\n', n - i);
        const size_t stop = lf ? static_cast<size_t>(static_cast<const char*>(lf) - chunk.data()) : n;
        if (lf == nullptr) {
          i = n;
        } else {
          i = stop + 1;
          state_ = State::LineStart;
        }
        break;
      }
      case State::Body:
      case State::Stopped:
        i = n;
        break;
    }
  }
  fed_ = base + n;
  if (overLimits()) return std::string_view::npos;
  if (keep_ && (state_ == State::LineStartCr || state_ == State::Name || state_ == State::NameWsp)) {
    const uint64_t from = lineStart_ > base ? lineStart_ : base;
    undecided_.append(chunk.substr(static_cast<size_t>(from - base)));
  }
  return std::string_view::npos;
}

void HeaderScanner::finish() {
  switch (state_) {
    case State::LineStart:
    case State::Field:
      endField(fed_);
      startBody(fed_);
      break;
    case State::LineStartCr:
    case State::Name:
    case State::NameWsp:
      // An unfinished line that never became a field is the start of the body.
      endField(lineStart_);
      startBody(lineStart_);
      break;
    case State::Body:
    case State::Stopped:
      return;
  }
  overLimits();
}

}  // namespace subrelay::message
