// RFC 5322 header scanning (section 2.2: fields, 2.2.3: folding; 3.6.8 / 4.5: obsolete
// WSP before the colon) and address-list parsing (section 3.4, with the obsolete forms of
// section 4.4: routes, empty list elements, CFWS around dots).
//
// Both are linear in the input and never index past it. scanHeaders keeps going on what
// real clients send; parseAddressList is strict on purpose: it feeds the check that the
// header From belongs to the account (RFC 6409 section 8 and README.md), so anything it
// cannot parse yields no address at all rather than a guess.
#include "message/headers.h"

#include "message/header_scanner.h"

#include "util/strings.h"

namespace subrelay::message {

namespace {

bool isWsp(char c) { return c == ' ' || c == '\t'; }

}  // namespace

HeaderBlock scanHeaders(std::string_view m) {
  // The boundary and the fields come from HeaderScanner, the one definition the fix-ups
  // and the streaming DKIM body hash share.
  HeaderBlock block;
  HeaderScanner sc;
  sc.onField([&](const FieldSpan& f) {
    const auto off = static_cast<size_t>(f.offset);
    const auto colon = static_cast<size_t>(f.colon);
    const auto next = static_cast<size_t>(f.end);
    size_t valueEnd = next;
    if (valueEnd > colon + 1 && m[valueEnd - 1] == '\n') {
      --valueEnd;
      if (valueEnd > colon + 1 && m[valueEnd - 1] == '\r') --valueEnd;
    }
    HeaderField hf;
    hf.name = m.substr(off, static_cast<size_t>(f.nameEnd) - off);
    hf.value = m.substr(colon + 1, valueEnd - colon - 1);
    hf.offset = off;
    hf.length = next - off;
    block.fields.push_back(hf);
  });
  sc.feed(m);
  sc.finish();
  block.bodyOffset = static_cast<size_t>(sc.bodyOffset());
  block.hasBodySeparator = sc.hasSeparator();
  return block;
}

std::string_view headerSection(std::string_view m) {
  HeaderScanner sc;
  sc.feed(m);  // stops at the body
  sc.finish();
  auto end = static_cast<size_t>(sc.bodyOffset());
  if (sc.hasSeparator()) {
    --end;  // the empty line's LF
    if (end > 0 && m[end - 1] == '\r') --end;
  }
  return m.substr(0, end);
}

const HeaderField* findField(const HeaderBlock& block, std::string_view name) {
  for (const auto& f : block.fields)
    if (util::iequals(f.name, name)) return &f;
  return nullptr;
}

size_t countFields(const HeaderBlock& block, std::string_view name) {
  size_t count = 0;
  for (const auto& f : block.fields)
    if (util::iequals(f.name, name)) ++count;
  return count;
}

namespace {
using util::isAtext;

// Lexical tokens of RFC 5322 3.2 after comments and whitespace are dropped.
enum class Tok { Atom, Quoted, Literal, Special, End, Error };

struct Token {
  Tok kind = Tok::End;
  std::string_view text;  // Atom: the atom; Quoted: with its quotes; Literal: with [ ]
  char special = 0;
};


bool isSpecial(char c) {
  switch (c) {
    case '<':
    case '>':
    case '@':
    case ',':
    case ':':
    case ';':
    case '.':
      return true;
    default:
      return false;
  }
}

// Works on an unfolded value (no CR or LF left).
class Lexer {
 public:
  explicit Lexer(std::string_view s) : s_(s) {}

  Token next() {
    if (!skipCfws()) return {Tok::Error, {}, 0};
    if (p_ >= s_.size()) return {Tok::End, {}, 0};
    const size_t start = p_;
    const char c = s_[p_];
    if (isSpecial(c)) {
      ++p_;
      return {Tok::Special, s_.substr(start, 1), c};
    }
    if (c == '"') return delimited(start, '"', Tok::Quoted);
    if (c == '[') return delimited(start, ']', Tok::Literal);
    if (isAtext(static_cast<unsigned char>(c))) {
      while (p_ < s_.size() && isAtext(static_cast<unsigned char>(s_[p_]))) ++p_;
      return {Tok::Atom, s_.substr(start, p_ - start), 0};
    }
    return {Tok::Error, {}, 0};  // ")", "]", "\", controls: not valid here
  }

 private:
  // Skips whitespace and comments (3.2.2), which nest and may hold quoted-pairs.
  bool skipCfws() {
    while (p_ < s_.size()) {
      if (isWsp(s_[p_])) {
        ++p_;
      } else if (s_[p_] == '(') {
        size_t depth = 0;
        do {
          const char c = s_[p_++];
          if (c == '\\') {
            if (p_ >= s_.size()) return false;
            ++p_;
          } else if (c == '(') {
            ++depth;
          } else if (c == ')') {
            --depth;
          }
        } while (depth > 0 && p_ < s_.size());
        if (depth > 0) return false;  // unterminated comment
      } else {
        break;
      }
    }
    return true;
  }

  // quoted-string (3.2.4) or domain-literal (3.4.1); quoted-pairs allowed in both
  // (the latter by obs-dtext).
  Token delimited(size_t start, char close, Tok kind) {
    ++p_;
    while (p_ < s_.size()) {
      const char c = s_[p_++];
      if (c == '\\') {
        if (p_ >= s_.size()) break;
        ++p_;
      } else if (c == close) {
        return {kind, s_.substr(start, p_ - start), 0};
      } else if (kind == Tok::Literal && c == '[') {
        break;
      }
    }
    return {Tok::Error, {}, 0};
  }

  std::string_view s_;
  size_t p_ = 0;
};

class AddressParser {
 public:
  explicit AddressParser(std::string_view unfolded) : lex_(unfolded) { advance(); }

  // address-list, allowing the empty elements of obs-addr-list (4.4).
  bool parseList(std::vector<std::string>& out) {
    for (;;) {
      while (isSpecial(',')) advance();
      if (tok_.kind == Tok::End) return true;
      if (!parseAddress(out)) return false;
      if (tok_.kind == Tok::End) return true;
      if (!isSpecial(',')) return false;
    }
  }

 private:
  void advance() { tok_ = lex_.next(); }
  bool isSpecial(char c) const { return tok_.kind == Tok::Special && tok_.special == c; }
  bool isWord() const { return tok_.kind == Tok::Atom || tok_.kind == Tok::Quoted; }

  // address = mailbox / group; mailbox = name-addr / addr-spec. Which one it is shows only
  // after the leading words: "<" (name-addr), ":" (group) or "@" / "." (addr-spec).
  bool parseAddress(std::vector<std::string>& out, bool inGroup = false) {
    std::string local;
    size_t words = 0;
    bool dotted = true;  // the words so far form word *("." word): a local-part
    bool expectWord = true;
    while (isWord() || isSpecial('.')) {
      if (isSpecial('.')) {
        // obs-phrase allows "." in display names ("John Q. Public"); a local-part needs
        // a word on both sides of each dot.
        if (expectWord) dotted = false;
        local += '.';
        expectWord = true;
      } else {
        if (!expectWord) dotted = false;  // two words in a row: a phrase, not a local-part
        local += tok_.text;
        ++words;
        expectWord = false;
      }
      advance();
    }
    if (isSpecial('<')) {
      advance();
      return parseAngleAddr(out);
    }
    if (isSpecial(':')) {
      // group (3.4): display-name ":" [group-list] ";" — groups do not nest.
      if (inGroup || words == 0) return false;
      advance();
      for (;;) {
        while (isSpecial(',')) advance();
        if (isSpecial(';')) {
          advance();
          return true;
        }
        if (tok_.kind == Tok::End) return false;
        if (!parseAddress(out, true)) return false;
        if (isSpecial(';')) continue;
        if (!isSpecial(',')) return false;
      }
    }
    if (isSpecial('@')) {
      if (words == 0 || !dotted || expectWord) return false;
      advance();
      std::string domain;
      if (!parseDomain(domain)) return false;
      out.push_back(local + "@" + domain);
      return true;
    }
    return false;
  }

  // angle-addr = "<" [obs-route] addr-spec ">"; obs-route = obs-domain-list ":"
  // ("<@relay1,@relay2:user@example.com>"); the route is read and dropped.
  bool parseAngleAddr(std::vector<std::string>& out) {
    if (isSpecial('@') || isSpecial(',')) {
      for (;;) {
        while (isSpecial(',')) advance();
        if (isSpecial(':')) {
          advance();
          break;
        }
        if (!isSpecial('@')) return false;
        advance();
        std::string ignored;
        if (!parseDomain(ignored)) return false;
      }
    }
    std::string local;
    if (!parseLocalPart(local)) return false;
    if (!isSpecial('@')) return false;
    advance();
    std::string domain;
    if (!parseDomain(domain)) return false;
    if (!isSpecial('>')) return false;
    advance();
    out.push_back(local + "@" + domain);
    return true;
  }

  // local-part = dot-atom / quoted-string / obs-local-part (word *("." word)).
  bool parseLocalPart(std::string& local) {
    for (;;) {
      if (!isWord()) return false;
      local += tok_.text;
      advance();
      if (!isSpecial('.')) return true;
      local += '.';
      advance();
    }
  }

  // domain = dot-atom / domain-literal / obs-domain (atom *("." atom)).
  bool parseDomain(std::string& domain) {
    if (tok_.kind == Tok::Literal) {
      domain = tok_.text;
      advance();
      return true;
    }
    for (;;) {
      if (tok_.kind != Tok::Atom) return false;
      domain += tok_.text;
      advance();
      if (!isSpecial('.')) return true;
      domain += '.';
      advance();
    }
  }

  Lexer lex_;
  Token tok_;
};

}  // namespace

std::vector<std::string> parseAddressList(std::string_view value) {
  // Unfold (2.2.3): a line break followed by WSP is removed. Any other CR or LF cannot be
  // part of a field value, so the whole value is refused.
  std::string unfolded;
  unfolded.reserve(value.size());
  for (size_t i = 0; i < value.size(); ++i) {
    const char c = value[i];
    if (c == '\r' && i + 2 < value.size() && value[i + 1] == '\n' && isWsp(value[i + 2])) {
      ++i;
    } else if (c == '\n' && i + 1 < value.size() && isWsp(value[i + 1])) {
      // dropped
    } else if (c == '\r' || c == '\n' || c == '\0') {
      return {};
    } else {
      unfolded += c;
    }
  }
  std::vector<std::string> out;
  AddressParser parser(unfolded);
  if (!parser.parseList(out)) return {};
  return out;
}

}  // namespace subrelay::message
