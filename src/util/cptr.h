// CPtr<T, fn>: unique ownership of a C handle freed by a plain function
// (Envoy's CSmartPtr). Used for SQLite statements, SSL objects, ldns packets.
#pragma once

#include <memory>

namespace subrelay::util {

template <typename T, auto FreeFn>
struct CDeleter {
  void operator()(T* p) const noexcept {
    if (p) FreeFn(p);
  }
};

template <typename T, auto FreeFn>
using CPtr = std::unique_ptr<T, CDeleter<T, FreeFn>>;

}  // namespace subrelay::util
