#include "app/dkim_cmd.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <string_view>

#include "util/strings.h"

namespace subrelay::app {

namespace {

// A host name as DNS wants it (RFC 1035 2.3.1, letters/digits/hyphen labels; "_" too,
// since selectors such as "s_2026" occur); enough to keep a typo out of a zone file.
bool plausibleDnsName(std::string_view s) {
  if (s.empty() || s.size() > 253 || s.front() == '.' || s.back() == '.') return false;
  size_t label = 0;
  for (char c : s) {
    if (c == '.') {
      if (label == 0) return false;
      label = 0;
      continue;
    }
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
    if (!ok || ++label > 63) return false;
  }
  return true;
}

// Writes data to path with mode 0600, atomically: a temporary file in the same
// directory, fsync, then rename (or link, which refuses to replace an existing file, so
// a concurrent keygen cannot be overwritten either).
std::string writeSecretFile(const std::string& path, const std::string& data, bool force) {
  std::filesystem::path p(path);
  std::string dir = p.parent_path().empty() ? "." : p.parent_path().string();
  std::string tmpl = (std::filesystem::path(dir) / ("." + p.filename().string() + ".tmpXXXXXX")).string();
  // mkstemp creates the file with mode 0600 (POSIX.1-2008): the key is never readable
  // by others, not even for a moment.
  int fd = ::mkstemp(tmpl.data());
  if (fd < 0) return "cannot create a file in " + dir + ": " + std::strerror(errno);
  std::string err;
  size_t off = 0;
  while (off < data.size() && err.empty()) {
    ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      err = std::string("write: ") + std::strerror(errno);
    } else {
      off += static_cast<size_t>(n);
    }
  }
  if (err.empty() && ::fchmod(fd, 0600) != 0) err = std::string("chmod: ") + std::strerror(errno);
  if (err.empty() && ::fsync(fd) != 0) err = std::string("fsync: ") + std::strerror(errno);
  ::close(fd);
  if (err.empty()) {
    if (force) {
      if (::rename(tmpl.c_str(), path.c_str()) != 0) err = std::string("rename: ") + std::strerror(errno);
    } else if (::link(tmpl.c_str(), path.c_str()) != 0) {
      err = errno == EEXIST ? std::string("file exists (use --force to replace it)")
                            : std::string("link: ") + std::strerror(errno);
    }
  }
  if (!force || !err.empty()) ::unlink(tmpl.c_str());
  if (err.empty()) {
    // Make the new directory entry durable too.
    int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      ::fsync(dfd);
      ::close(dfd);
    }
  }
  return err;
}

std::string jsonQuote(std::string_view s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

}  // namespace

DkimSetup loadDkimKeys(const config::Config& cfg, std::vector<std::string>& errors, const std::set<size_t>& skip) {
  DkimSetup setup;
  for (size_t i = 0; i < cfg.dkim.size(); ++i) {
    if (skip.count(i) != 0) continue;
    const auto& k = cfg.dkim[i];
    std::string where = cfg.sourcePath + ": dkim[" + std::to_string(i) + "].private_key: ";
    auto alg = dkim::parseAlgorithm(k.algorithm);
    if (!alg) {
      errors.push_back(cfg.sourcePath + ": dkim[" + std::to_string(i) + "].algorithm: unknown algorithm " +
                       k.algorithm);
      continue;
    }
    auto key = dkim::loadPrivateKeyFile(k.privateKey, *alg);
    if (!key.ok()) {
      errors.push_back(where + key.error().message);
      continue;
    }
    std::string domain = util::toLower(k.domain);
    setup.ring.add(dkim::SignerKey{domain, k.selector, key.value()});
    DkimDomainPolicy& pol = setup.domains[domain];
    if (k.expiry && (!pol.expiry || *k.expiry < *pol.expiry)) pol.expiry = *k.expiry;
    // The config loader guarantees one canonicalization per domain.
    pol.headerCanon = k.canonicalization.rfind("simple/", 0) == 0 ? dkim::Canon::Simple : dkim::Canon::Relaxed;
    pol.bodyCanon = k.canonicalization.size() >= 6 && k.canonicalization.substr(k.canonicalization.size() - 6) == "simple"
                        ? dkim::Canon::Simple
                        : dkim::Canon::Relaxed;
  }
  return setup;
}

int cmdDkimKeygen(const KeygenOptions& o) {
  auto usage = [](const std::string& m) {
    std::fprintf(stderr, "subrelay: %s\nRun `subrelay dkim-keygen --help` for usage.\n", m.c_str());
    return 2;
  };
  if (o.domain.empty()) return usage("dkim-keygen needs --domain");
  if (o.selector.empty()) return usage("dkim-keygen needs --selector");
  if (o.out.empty()) return usage("dkim-keygen needs --out FILE");
  if (!plausibleDnsName(o.domain)) return usage("--domain: not a domain name: " + o.domain);
  if (!plausibleDnsName(o.selector)) return usage("--selector: not a DNS label: " + o.selector);
  auto alg = dkim::parseAlgorithm(o.algorithm);
  if (!alg) return usage("--algorithm: expected rsa-sha256 or ed25519-sha256, got " + o.algorithm);
  int bits = o.bits;
  if (*alg == dkim::Algorithm::Ed25519Sha256) {
    if (bits != 0 && bits != 256) return usage("--bits applies to rsa-sha256 only (Ed25519 keys are 256 bits)");
  } else {
    if (bits == 0) bits = 2048;
    // RFC 8301 3.2: signers MUST use at least 1024 bits and SHOULD use 2048; we refuse
    // below 2048, and above 4096 many verifiers (and 512-byte UDP answers) give up.
    if (bits < 2048 || bits > 4096)
      return usage("--bits: RSA keys must have 2048 to 4096 bits (RFC 8301 3.2), got " + std::to_string(bits));
  }
  std::string domain = util::toLower(o.domain);
  std::string selector = util::toLower(o.selector);
  struct stat st {};
  if (!o.force && ::stat(o.out.c_str(), &st) == 0) {
    std::fprintf(stderr, "subrelay: %s: file exists (use --force to replace it)\n", o.out.c_str());
    return 1;
  }
  auto key = dkim::generateKey(*alg, bits);
  if (!key.ok()) {
    std::fprintf(stderr, "subrelay: key generation failed: %s\n", key.error().message.c_str());
    return 1;
  }
  std::string pem = key.value()->pemPrivate();
  std::string err = writeSecretFile(o.out, pem, o.force);
  if (!pem.empty()) explicit_bzero(pem.data(), pem.size());
  if (!err.empty()) {
    std::fprintf(stderr, "subrelay: %s: %s\n", o.out.c_str(), err.c_str());
    return 1;
  }
  std::error_code ec;
  std::string abs = std::filesystem::absolute(o.out, ec).string();
  if (ec) abs = o.out;
  std::string txt = key.value()->txtRecord();
  std::printf("; DKIM %s key (%d bits) for %s, selector %s; private key in %s (mode 0600).\n",
              std::string(dkim::algorithmName(*alg)).c_str(), key.value()->bits(), domain.c_str(), selector.c_str(),
              abs.c_str());
  std::printf("; Publish this TXT record in the zone of %s:\n", domain.c_str());
  std::printf("%s._domainkey.%s. IN TXT ( %s )\n", selector.c_str(), domain.c_str(), dkim::txtZoneStrings(txt).c_str());
  std::printf(";\n; Then add this entry to the \"dkim\" array of the subrelay configuration:\n");
  std::printf("; { \"domain\": %s, \"selector\": %s, \"algorithm\": %s, \"private_key\": %s }\n",
              jsonQuote(domain).c_str(), jsonQuote(selector).c_str(), jsonQuote(dkim::algorithmName(*alg)).c_str(),
              jsonQuote(abs).c_str());
  return 0;
}

int cmdDnsRecords(const std::string& configPath, const std::string& domainArg) {
  if (domainArg.empty()) {
    std::fprintf(stderr, "subrelay: dns-records needs --domain\nRun `subrelay dns-records --help` for usage.\n");
    return 2;
  }
  if (!plausibleDnsName(domainArg)) {
    std::fprintf(stderr, "subrelay: --domain: not a domain name: %s\n", domainArg.c_str());
    return 2;
  }
  auto lr = config::loadConfigFile(configPath);
  if (!lr.config) {
    for (const auto& l : lr.formatErrors()) std::fprintf(stderr, "%s\n", l.c_str());
    std::fprintf(stderr, "subrelay: invalid configuration %s (run `subrelay check-config`)\n", configPath.c_str());
    return 1;
  }
  const config::Config& cfg = *lr.config;
  std::string d = util::toLower(domainArg);
  const std::string& host = cfg.hostname;

  std::printf("; DNS records for %s, sending through %s. Paste into the zone of %s.\n;\n", d.c_str(), host.c_str(),
              d.c_str());
  // SPF, RFC 7208: receivers check the connecting address against the envelope
  // sender's domain; "a:" names our host, "~all" soft-fails the rest while rolling out.
  std::printf(
      "; SPF (RFC 7208): authorises this gateway's address (the A/AAAA of %s) to send mail for %s;\n"
      ";   if %s also sends from elsewhere (a mailbox provider, a newsletter service), add their\n"
      ";   include:... terms before ~all. Only one SPF record per name is allowed.\n",
      host.c_str(), d.c_str(), d.c_str());
  std::printf("%s. IN TXT \"v=spf1 a:%s ~all\"\n;\n", d.c_str(), host.c_str());

  // DKIM, RFC 6376 3.6.2.1: one TXT record per selector at <s>._domainkey.<d>.
  int found = 0;
  for (size_t i = 0; i < cfg.dkim.size(); ++i) {
    const auto& k = cfg.dkim[i];
    if (util::toLower(k.domain) != d) continue;
    ++found;
    auto alg = dkim::parseAlgorithm(k.algorithm);
    if (!alg) continue;  // the loader accepts only known names
    auto key = dkim::loadPrivateKeyFile(k.privateKey, *alg);
    if (!key.ok()) {
      std::fprintf(stderr, "%s: dkim[%zu].private_key: %s\n", cfg.sourcePath.c_str(), i, key.error().message.c_str());
      return 1;
    }
    std::printf(
        "; DKIM (RFC 6376): public key of selector %s (%s, %d bits), from %s;\n"
        ";   receivers fetch it to verify the signatures subrelay adds.\n",
        k.selector.c_str(), k.algorithm.c_str(), key.value()->bits(), k.privateKey.c_str());
    std::printf("%s._domainkey.%s. IN TXT ( %s )\n;\n", k.selector.c_str(), d.c_str(),
                dkim::txtZoneStrings(key.value()->txtRecord()).c_str());
  }
  if (found == 0) {
    std::printf(
        "; DKIM: no key is configured for %s, so its mail leaves unsigned; create one with\n"
        ";   subrelay dkim-keygen --domain %s --selector s%s --out /etc/subrelay/dkim/%s.pem\n;\n",
        d.c_str(), d.c_str(), "YYYYMM", d.c_str());
  }

  // DMARC, RFC 7489 6.3: start with p=none and aggregate reports, tighten to
  // quarantine/reject once the reports show every legitimate source aligned.
  std::printf(
      "; DMARC (RFC 7489): starter policy: p=none only collects aggregate reports at rua=; move to\n"
      ";   p=quarantine, then p=reject, once the reports show all your mail passing SPF or DKIM.\n");
  std::printf("_dmarc.%s. IN TXT \"v=DMARC1; p=none; rua=mailto:dmarc-reports@%s; adkim=r; aspf=r\"\n;\n", d.c_str(),
              d.c_str());

  // MTA-STS, RFC 8461 3.1: the id changes whenever the policy changes; a UTC timestamp
  // is a conventional choice.
  char id[32];
  std::time_t now = std::time(nullptr);
  std::tm tmv{};
  gmtime_r(&now, &tmv);
  std::strftime(id, sizeof id, "%Y%m%d%H%M%S", &tmv);
  std::printf(
      "; MTA-STS (RFC 8461), suggested: tells senders to require TLS to %s's MX hosts; publish the\n"
      ";   policy file below at https://mta-sts.%s/.well-known/mta-sts.txt (HTTPS, valid certificate),\n"
      ";   listing your inbound MX hosts (not this gateway), and change id= whenever it changes:\n",
      d.c_str(), d.c_str());
  std::printf("_mta-sts.%s. IN TXT \"v=STSv1; id=%s\"\n", d.c_str(), id);
  std::printf(
      ";   version: STSv1\n"
      ";   mode: testing\n"
      ";   mx: <each inbound MX host of %s, e.g. mx1.%s>\n"
      ";   max_age: 604800\n;\n",
      d.c_str(), d.c_str());
  // TLS-RPT, RFC 8460 3: where senders report TLS failures towards our domain.
  std::printf("; TLS-RPT (RFC 8460), suggested: daily reports of TLS problems senders had reaching %s.\n", d.c_str());
  std::printf("_smtp._tls.%s. IN TXT \"v=TLSRPTv1; rua=mailto:tls-reports@%s\"\n", d.c_str(), d.c_str());
  return 0;
}

}  // namespace subrelay::app
