#include "metrics/registry.h"

#include <cmath>
#include <cstdio>

namespace subrelay::metrics {

Histogram::Histogram(const std::vector<double>& bounds)
    : bounds_(bounds), buckets_(new std::atomic<uint64_t>[bounds.size() + 1]) {
  for (size_t i = 0; i <= bounds_.size(); ++i) buckets_[i].store(0, std::memory_order_relaxed);
}

void Histogram::observe(double v) {
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) ++i;  // le: v <= bound
  buckets_[i].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(v, std::memory_order_relaxed);
  count_.fetch_add(1, std::memory_order_relaxed);
}

std::vector<uint64_t> Histogram::cumulative() const {
  std::vector<uint64_t> out(bounds_.size() + 1);
  uint64_t run = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    run += buckets_[i].load(std::memory_order_relaxed);
    out[i] = run;
  }
  return out;
}

std::string_view contentType(Format f) {
  return f == Format::OpenMetrics ? "application/openmetrics-text; version=1.0.0; charset=utf-8"
                                  : "text/plain; version=0.0.4; charset=utf-8";
}

std::string formatValue(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (v == std::floor(v) && std::fabs(v) < 1e15) {
    char b[32];
    std::snprintf(b, sizeof b, "%.0f", v);
    return b;
  }
  char b[40];
  std::snprintf(b, sizeof b, "%.17g", v);
  return b;
}

std::string escapeLabelValue(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

namespace {
std::string escapeHelp(std::string_view v) {
  std::string out;
  for (char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

std::string_view baseName(const std::string& name, Kind kind, Format f) {
  std::string_view n = name;
  if (kind == Kind::Counter && f == Format::OpenMetrics && n.size() > 6 && n.substr(n.size() - 6) == "_total")
    n.remove_suffix(6);
  return n;
}

const char* kindName(Kind k) {
  switch (k) {
    case Kind::Counter: return "counter";
    case Kind::Gauge: return "gauge";
    case Kind::Histogram: return "histogram";
  }
  return "untyped";
}
}  // namespace

FamilyBase::FamilyBase(Kind kind, std::string name, std::string help, std::vector<std::string> labels,
                       size_t maxChildren)
    : kind_(kind), name_(std::move(name)), help_(std::move(help)), labels_(std::move(labels)),
      maxChildren_(maxChildren) {}

std::string FamilyBase::labelText(const std::vector<std::string>& values, std::string_view extraName,
                                  std::string_view extraValue) const {
  if (labels_.empty() && extraName.empty()) return "";
  std::string out = "{";
  for (size_t i = 0; i < labels_.size() && i < values.size(); ++i) {
    if (i) out += ',';
    out += labels_[i];
    out += "=\"";
    out += escapeLabelValue(values[i]);
    out += '"';
  }
  if (!extraName.empty()) {
    if (out.size() > 1) out += ',';
    out += extraName;
    out += "=\"";
    out += extraValue;
    out += '"';
  }
  out += '}';
  return out;
}

void FamilyBase::render(std::string& out, Format f) const {
  const std::string_view base = baseName(name_, kind_, f);
  out += "# HELP ";
  out += base;
  out += ' ';
  out += escapeHelp(help_);
  out += "\n# TYPE ";
  out += base;
  out += ' ';
  out += kindName(kind_);
  out += '\n';
  renderChildren(out, f);
}

template <>
void Family<Counter>::renderChildren(std::string& out, Format) const {
  std::lock_guard lk(mu_);
  for (const auto& [values, c] : children_) {
    out += name_;
    out += labelText(values);
    out += ' ';
    out += std::to_string(c->value());
    out += '\n';
  }
}

template <>
void Family<Gauge>::renderChildren(std::string& out, Format) const {
  std::lock_guard lk(mu_);
  for (const auto& [values, g] : children_) {
    out += name_;
    out += labelText(values);
    out += ' ';
    out += formatValue(g->value());
    out += '\n';
  }
}

template <>
void Family<Histogram>::renderChildren(std::string& out, Format) const {
  std::lock_guard lk(mu_);
  for (const auto& [values, h] : children_) {
    // Read the buckets first: count and sum are then at least as new, never behind.
    const auto cum = h->cumulative();
    const auto& bounds = h->bounds();
    for (size_t i = 0; i <= bounds.size(); ++i) {
      out += name_;
      out += "_bucket";
      out += labelText(values, "le", i < bounds.size() ? formatValue(bounds[i]) : "+Inf");
      out += ' ';
      out += std::to_string(cum[i]);
      out += '\n';
    }
    const std::string labels = labelText(values);
    out += name_ + "_sum" + labels + ' ' + formatValue(h->sum()) + '\n';
    out += name_ + "_count" + labels + ' ' + std::to_string(cum.back()) + '\n';
  }
}

template <class T>
Family<T>& Registry::add(std::unique_ptr<Family<T>> f) {
  auto& ref = *f;
  std::lock_guard lk(mu_);
  families_.push_back(std::move(f));
  return ref;
}

Family<Counter>& Registry::counter(std::string name, std::string help, std::vector<std::string> labels,
                                   size_t maxChildren) {
  return add(std::make_unique<Family<Counter>>(Kind::Counter, std::move(name), std::move(help), std::move(labels),
                                               maxChildren, [] { return std::make_unique<Counter>(); }));
}

Family<Gauge>& Registry::gauge(std::string name, std::string help, std::vector<std::string> labels,
                               size_t maxChildren) {
  return add(std::make_unique<Family<Gauge>>(Kind::Gauge, std::move(name), std::move(help), std::move(labels),
                                             maxChildren, [] { return std::make_unique<Gauge>(); }));
}

Family<Histogram>& Registry::histogram(std::string name, std::string help, std::vector<double> bounds,
                                       std::vector<std::string> labels, size_t maxChildren) {
  return add(std::make_unique<Family<Histogram>>(Kind::Histogram, std::move(name), std::move(help), std::move(labels),
                                                 maxChildren, [bounds] { return std::make_unique<Histogram>(bounds); }));
}

void Registry::onCollect(std::function<void()> fn) {
  std::lock_guard lk(mu_);
  collectors_.push_back(std::move(fn));
}

std::string Registry::render(Format f) const {
  std::lock_guard lk(mu_);
  for (const auto& c : collectors_) c();
  std::string out;
  out.reserve(16384);
  for (const auto& fam : families_) fam->render(out, f);
  if (f == Format::OpenMetrics) out += "# EOF\n";
  return out;
}

}  // namespace subrelay::metrics
