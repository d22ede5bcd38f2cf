// HeaderScanner: the one definition of where an RFC 5322 header section ends, as a
// streaming state machine that takes a message in pieces of any size.
//
// RFC 5322 2.1: header fields, then optionally an empty line and the body. What real
// clients send is not always that: the empty line may be missing, so "the body starts
// at the first line that is not a header field" (2.2: field-name ":" ..., 2.2.3:
// continuation lines start with WSP, 4.5: obsolete WSP before the colon). scanHeaders()
// (headers.h), the submission fix-ups (which insert the missing empty line there) and
// the streaming DKIM body hash (RFC 6376 3.7 hashes from the body's first octet) all
// take the boundary from this class, so they cannot disagree about it.
//
// A line that reaches 998 octets (RFC 5322 2.1.1) without the colon of a field name is
// not a field either, so what is held while a line's kind is open stays small.
//
// It also enforces the header limits while the message streams in (limits.max_header_bytes,
// limits.max_header_fields), so a flood of tiny fields is refused without ever being
// held as a record per field.
//
// Not here: parsing field values (headers.h), modifying the message (fixups.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

namespace subrelay::message {

// One complete header field as offsets into the message fed so far.
struct FieldSpan {
  size_t offset = 0;    // first octet of the field name
  size_t nameEnd = 0;   // one past the name (before any obsolete WSP)
  size_t colon = 0;     // the ":"
  size_t end = 0;       // one past the field's final line break (or the message end)
};

class HeaderScanner {
 public:
  struct Limits {
    uint64_t maxBytes = 0;   // header section octets, the empty line included; 0 = none
    uint64_t maxFields = 0;  // 0 = none
  };
  enum class Violation { None, TooManyBytes, TooManyFields };

  HeaderScanner() = default;
  explicit HeaderScanner(Limits limits) : limits_(limits) {}

  // Called for every complete field, in order (optional; scanHeaders builds its list
  // from it, the streaming path needs none).
  void onField(std::function<void(const FieldSpan&)> fn) { onField_ = std::move(fn); }
  // Keep the octets of a line whose kind is still open, so that a body starting with it
  // can be handed over whole (bodyPrefix()). Needed only when the caller does not hold
  // the whole message itself.
  void keepUndecided(bool keep) { keep_ = keep; }

  // Feeds the next piece. Returns npos while the piece is all header; else the offset
  // in `chunk` where the body's octets begin (chunk.size() when the body starts right
  // after it). When the body starts at a line that began in an earlier piece, that
  // line's earlier octets are in bodyPrefix() (with keepUndecided) and the returned
  // offset is 0. After a violation nothing more is scanned and npos comes back.
  size_t feed(std::string_view chunk);
  // The end of the message: an open field is complete, an undecided line is body.
  void finish();

  bool inBody() const { return state_ == State::Body; }
  bool hasSeparator() const { return separator_; }
  // Absolute offset of the body's first octet (valid once inBody()).
  uint64_t bodyOffset() const { return bodyOffset_; }
  uint64_t headerBytes() const { return inBody() ? bodyOffset_ : fed_; }
  uint64_t fields() const { return fields_; }
  Violation violation() const { return violation_; }
  const std::string& bodyPrefix() const { return undecided_; }

 private:
  enum class State { LineStart, LineStartCr, Name, NameWsp, Field, Body, Stopped };
  void startBody(uint64_t at);
  void endField(uint64_t at);
  bool overLimits();
  uint64_t decidedHeaderBytes() const;

  Limits limits_;
  std::function<void(const FieldSpan&)> onField_;
  State state_ = State::LineStart;
  bool keep_ = false;
  bool haveField_ = false;  // a field is open (a WSP line continues it)
  bool separator_ = false;
  Violation violation_ = Violation::None;
  uint64_t fed_ = 0;        // octets fed so far
  uint64_t lineStart_ = 0;  // absolute offset of the current line
  uint64_t bodyOffset_ = 0;
  uint64_t fields_ = 0;
  FieldSpan open_;          // the open field (haveField_)
  FieldSpan next_;          // a field name being read on the current line
  std::string undecided_;   // octets of the current line while its kind is open (keep_)
};

}  // namespace subrelay::message
