#include "policy/suppression.h"

#include <algorithm>
#include <ctime>

#include "idna/idna.h"

namespace subrelay::policy {

namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

bool ieq(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    char x = a[i], y = b[i];
    if (x >= 'A' && x <= 'Z') x = static_cast<char>(x - 'A' + 'a');
    if (y >= 'A' && y <= 'Z') y = static_cast<char>(y - 'A' + 'a');
    if (x != y) return false;
  }
  return true;
}

}  // namespace

std::optional<std::string> normalizeSuppressedAddress(std::string_view address) {
  std::string_view a = trim(address);
  if (a.size() >= 2 && a.front() == '<' && a.back() == '>') a = trim(a.substr(1, a.size() - 2));
  // The domain follows the last "@": a quoted local part may contain one (RFC 5321 4.1.2).
  const size_t at = a.rfind('@');
  if (at == std::string_view::npos || at == 0 || at + 1 == a.size()) return std::nullopt;
  for (char c : a)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f || c == ' ') return std::nullopt;
  std::string_view domain = a.substr(at + 1);
  // An address literal ([192.0.2.1]) has no IDNA form: lower-cased as it is ("[IPv6:...").
  std::string d;
  if (domain.front() == '[') {
    d.reserve(domain.size());
    for (char c : domain) d.push_back(c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c);
  } else {
    auto ascii = idna::toAscii(domain);
    if (!ascii) return std::nullopt;
    d = std::move(*ascii);
  }
  std::string out(a.substr(0, at));
  out.push_back('@');
  out += d;
  return out;
}

std::string cleanSuppressionReason(std::string_view reason) {
  std::string out;
  out.reserve(std::min(reason.size(), kMaxReasonBytes));
  bool blank = false;
  for (char c : reason) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f || c == ' ') {
      blank = true;
      continue;
    }
    if (blank && !out.empty()) out.push_back(' ');
    blank = false;
    out.push_back(c);
    if (out.size() >= kMaxReasonBytes + 4) break;  // enough to cut from
  }
  if (out.size() > kMaxReasonBytes) {
    size_t n = kMaxReasonBytes;
    // Never half a UTF-8 character: back off continuation bytes (10xxxxxx).
    while (n > 0 && (static_cast<unsigned char>(out[n]) & 0xC0) == 0x80) --n;
    out.resize(n);
    while (!out.empty() && out.back() == ' ') out.pop_back();
  }
  return out;
}

std::string suppressionDate(int64_t unixSeconds) {
  const std::time_t t = static_cast<std::time_t>(unixSeconds);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[40];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S UTC", &tm);
  return buf;
}

std::string suppressionRefusalText(std::string_view address, int64_t since, std::string_view reason) {
  std::string out = "<";
  out += address;
  out += ">: recipient suppressed since ";
  out += suppressionDate(since);
  out += ": ";
  out += reason.empty() ? std::string_view("added by an operator") : reason;
  return out;
}

bool isHardBounce(int code, std::string_view enhanced, std::string_view stage) {
  if (code < 500 || code > 599) return false;  // no reply, or not permanent
  const bool rcpt = stage == "rcpt";
  if (!rcpt && stage != "data-end") return false;
  if (enhanced.empty()) return rcpt && (code == 550 || code == 551 || code == 553);
  // "5.S.D", strictly.
  if (enhanced.size() < 5 || enhanced[0] != '5' || enhanced[1] != '.') return false;
  const size_t dot = enhanced.find('.', 2);
  if (dot == std::string_view::npos) return false;
  const std::string_view subject = enhanced.substr(2, dot - 2), detail = enhanced.substr(dot + 1);
  if (detail.empty() || detail.size() > 3 || detail.find_first_not_of("0123456789") != std::string_view::npos)
    return false;
  if (subject == "1")
    return detail == "0" || detail == "1" || detail == "2" || detail == "3" || detail == "4" || detail == "6" ||
           detail == "10";
  if (subject == "2") return detail == "1";
  return false;
}

std::optional<Suppression> bounceEntry(std::string_view account, std::string_view address, std::string_view reason,
                                       int64_t now, int64_t ttlSeconds) {
  auto normal = normalizeSuppressedAddress(address);
  if (!normal) return std::nullopt;
  Suppression s;
  s.account = std::string(account);
  s.address = std::move(*normal);
  s.reason = cleanSuppressionReason(reason);
  s.createdAt = now;
  s.expiresAt = suppressionExpiry(now, ttlSeconds);
  s.source = "bounce";
  return s;
}

bool isSimulatedBounceAddress(std::string_view address) {
  std::string_view a = trim(address);
  if (a.size() >= 2 && a.front() == '<' && a.back() == '>') a = a.substr(1, a.size() - 2);
  const size_t at = a.rfind('@');
  if (at == std::string_view::npos || at + 1 == a.size()) return false;
  std::string_view local = a.substr(0, at);
  const size_t plus = local.find('+');
  if (plus != std::string_view::npos) local = local.substr(0, plus);
  return ieq(local, kReservedBounceLocalPart);
}

std::string SuppressionTable::key(std::string_view account, std::string_view normalized) {
  std::string k(account);
  k.push_back('\0');
  k += normalized;
  return k;
}

size_t SuppressionTable::replace(std::vector<Suppression> rows, int64_t now) {
  std::erase_if(rows, [now](const Suppression& r) { return r.expired(now); });
  if (rows.size() > max_) {
    // Over the bound: the newest win (the oldest are the likeliest to be stale).
    std::nth_element(rows.begin(), rows.begin() + static_cast<std::ptrdiff_t>(max_), rows.end(),
                     [](const Suppression& a, const Suppression& b) { return a.createdAt > b.createdAt; });
    rows.resize(max_);
  }
  std::unordered_map<std::string, Suppression> fresh;
  fresh.reserve(rows.size());
  for (auto& r : rows) {
    std::string k = key(r.account, r.address);
    fresh.insert_or_assign(std::move(k), std::move(r));
  }
  std::lock_guard lk(mu_);
  rows_.swap(fresh);
  return rows_.size();
}

std::optional<Suppression> SuppressionTable::find(std::string_view account, std::string_view address,
                                                  int64_t now) const {
  auto norm = normalizeSuppressedAddress(address);
  if (!norm) return std::nullopt;
  const std::string k = key(account, *norm);
  std::lock_guard lk(mu_);
  auto it = rows_.find(k);
  if (it == rows_.end() || it->second.expired(now)) return std::nullopt;
  return it->second;
}

bool SuppressionTable::put(Suppression row) {
  std::string k = key(row.account, row.address);
  std::lock_guard lk(mu_);
  auto it = rows_.find(k);
  if (it == rows_.end() && rows_.size() >= max_) return false;
  rows_.insert_or_assign(std::move(k), std::move(row));
  return true;
}

size_t SuppressionTable::size() const {
  std::lock_guard lk(mu_);
  return rows_.size();
}

std::map<std::string, uint64_t> SuppressionTable::countsByAccount(int64_t now) const {
  std::map<std::string, uint64_t> out;
  std::lock_guard lk(mu_);
  for (const auto& [k, r] : rows_)
    if (!r.expired(now)) ++out[r.account];
  return out;
}

}  // namespace subrelay::policy
