// Process-lifetime metrics in the Prometheus data model: counters, gauges and histograms,
// grouped in labelled families, rendered in the Prometheus text format (0.0.4) or
// OpenMetrics 1.0. Updating a metric is one relaxed atomic operation on an object the
// caller keeps; looking up a labelled child takes the family's mutex, so hot paths look
// children up once (or per message, never per byte).
//
// Cardinality is bounded: a family holds at most maxChildren label sets; further ones
// share one child whose label values are all "_other". Callers only label with values
// from fixed sets or from the configuration (configured account names), never with what
// a client sends.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace subrelay::metrics {

class Counter {
 public:
  void inc(uint64_t n = 1) { v_.fetch_add(n, std::memory_order_relaxed); }
  uint64_t value() const { return v_.load(std::memory_order_relaxed); }

 private:
  std::atomic<uint64_t> v_{0};
};

class Gauge {
 public:
  void set(double v) { v_.store(v, std::memory_order_relaxed); }
  void add(double d) { v_.fetch_add(d, std::memory_order_relaxed); }
  double value() const { return v_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> v_{0};
};

class Histogram {
 public:
  explicit Histogram(const std::vector<double>& bounds);
  void observe(double v);
  // Cumulative counts per bound, then the +Inf count (= count()).
  std::vector<uint64_t> cumulative() const;
  uint64_t count() const { return count_.load(std::memory_order_relaxed); }
  double sum() const { return sum_.load(std::memory_order_relaxed); }
  const std::vector<double>& bounds() const { return bounds_; }

 private:
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> buckets_;  // per bound (not cumulative), then overflow
  std::atomic<uint64_t> count_{0};
  std::atomic<double> sum_{0};
};

enum class Kind { Counter, Gauge, Histogram };
enum class Format { Prometheus, OpenMetrics };

// Content-Type of each format.
std::string_view contentType(Format f);

class FamilyBase {
 public:
  FamilyBase(Kind kind, std::string name, std::string help, std::vector<std::string> labels, size_t maxChildren);
  virtual ~FamilyBase() = default;
  Kind kind() const { return kind_; }
  const std::string& name() const { return name_; }
  void render(std::string& out, Format f) const;

 protected:
  virtual void renderChildren(std::string& out, Format f) const = 0;
  std::string labelText(const std::vector<std::string>& values, std::string_view extraName = {},
                        std::string_view extraValue = {}) const;
  Kind kind_;
  std::string name_, help_;
  std::vector<std::string> labels_;
  size_t maxChildren_;
  mutable std::mutex mu_;
};

template <class T>
class Family final : public FamilyBase {
 public:
  Family(Kind kind, std::string name, std::string help, std::vector<std::string> labels, size_t maxChildren,
         std::function<std::unique_ptr<T>()> make)
      : FamilyBase(kind, std::move(name), std::move(help), std::move(labels), maxChildren), make_(std::move(make)) {}

  // The child for these label values (as many as the family has label names).
  T& with(const std::vector<std::string>& values);
  T& with(std::string_view v) { return with(std::vector<std::string>{std::string(v)}); }
  T& with(std::string_view a, std::string_view b) { return with(std::vector<std::string>{std::string(a), std::string(b)}); }
  // The child without labels (families declared with none).
  T& get() { return with(std::vector<std::string>{}); }
  size_t size() const {
    std::lock_guard lk(mu_);
    return children_.size();
  }
  // Calls fn(labelValues, child) for every child, under the family's lock.
  template <class Fn>
  void forEach(Fn fn) const {
    std::lock_guard lk(mu_);
    for (const auto& [values, child] : children_) fn(values, *child);
  }

 private:
  void renderChildren(std::string& out, Format f) const override;
  std::function<std::unique_ptr<T>()> make_;
  std::map<std::vector<std::string>, std::unique_ptr<T>> children_;
};

class Registry {
 public:
  static constexpr size_t kDefaultMaxChildren = 2000;
  // Counter names end in "_total" (the sample name); OpenMetrics' family name drops it.
  Family<Counter>& counter(std::string name, std::string help, std::vector<std::string> labels = {},
                           size_t maxChildren = kDefaultMaxChildren);
  Family<Gauge>& gauge(std::string name, std::string help, std::vector<std::string> labels = {},
                       size_t maxChildren = kDefaultMaxChildren);
  Family<Histogram>& histogram(std::string name, std::string help, std::vector<double> bounds,
                               std::vector<std::string> labels = {}, size_t maxChildren = kDefaultMaxChildren);
  // Runs before every render (gauges read from elsewhere: open connections, uptime).
  void onCollect(std::function<void()> fn);
  std::string render(Format f) const;

 private:
  template <class T>
  Family<T>& add(std::unique_ptr<Family<T>> f);
  mutable std::mutex mu_;
  std::deque<std::unique_ptr<FamilyBase>> families_;
  std::vector<std::function<void()>> collectors_;
};

// The value of a sample as text: integers without a fraction, +Inf/-Inf/NaN spelled
// the way both formats want.
std::string formatValue(double v);
std::string escapeLabelValue(std::string_view v);

template <class T>
T& Family<T>::with(const std::vector<std::string>& values) {
  std::lock_guard lk(mu_);
  auto it = children_.find(values);
  if (it != children_.end()) return *it->second;
  if (children_.size() >= maxChildren_ && !labels_.empty()) {
    std::vector<std::string> other(labels_.size(), "_other");
    auto& slot = children_[other];
    if (!slot) slot = make_();
    return *slot;
  }
  auto& slot = children_[values];
  slot = make_();
  return *slot;
}

}  // namespace subrelay::metrics
