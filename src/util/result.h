// Result<T>: the return type of fallible calls between modules (docs/architecture.md, Errors).
// A value or an Error {message}. No exceptions cross module boundaries after start-up.
#pragma once

#include <cstdlib>
#include <string>
#include <utility>
#include <variant>

namespace subrelay::util {

struct Error {
  std::string message;
  // The storage ran out of room (SQLITE_FULL, ENOSPC, EDQUOT): answered 452 4.3.1
  // ("insufficient system storage", RFC 3463) rather than a generic temporary error.
  bool storageFull = false;
};

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}          // NOLINT(google-explicit-constructor)
  Result(Error err) : v_(std::move(err)) {}          // NOLINT(google-explicit-constructor)

  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }

  T& value() & { check(); return std::get<0>(v_); }
  const T& value() const& { check(); return std::get<0>(v_); }
  T&& value() && { check(); return std::get<0>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

  const Error& error() const {
    if (ok()) std::abort();
    return std::get<1>(v_);
  }

 private:
  void check() const {
    if (!ok()) std::abort();  // invariant: callers test ok() first
  }
  std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error err) : err_(std::move(err)), ok_(false) {}  // NOLINT(google-explicit-constructor)
  bool ok() const { return ok_; }
  explicit operator bool() const { return ok_; }
  const Error& error() const {
    if (ok_) std::abort();
    return err_;
  }

 private:
  Error err_;
  bool ok_ = true;
};

inline Error makeError(std::string msg) { return Error{std::move(msg)}; }

}  // namespace subrelay::util
