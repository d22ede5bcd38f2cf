#include "app/cli.h"

#include <termios.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <set>
#include <string>
#include <vector>

#include "app/dev_config.h"
#include "app/dkim_cmd.h"
#include "app/accounts_cmd.h"
#include "app/suppression_cmd.h"
#include "app/status_cmd.h"
#include "app/tls_rpt_cmd.h"
#include "app/tls_policy_cmd.h"
#include "app/queue_cmd.h"
#include "app/server.h"
#include "app/webhook_settings.h"
#include "config/config.h"
#include "idna/idna.h"
#include "policy/password.h"
#include "subrelay_build_config.h"
#include "tls/tls_context.h"
#include "util/strings.h"

namespace subrelay::app {

namespace {

constexpr const char* kDefaultConfig = "/etc/subrelay/config.json";

constexpr const char* kMainHelp =
    "usage: subrelay <command> [options]\n"
    "\n"
    "SMTP submission relay: authenticated SMTP on 587 (STARTTLS) and 465 (implicit TLS),\n"
    "durable SQLite queue, per-account policy.\n"
    "\n"
    "commands:\n"
    "  serve [--dev]            run the gateway in the foreground (logs to stderr)\n"
    "  check-config             validate the configuration, print ok or every error\n"
    "  hash-password            read a password on stdin, print its password_hash\n"
    "  dkim-keygen --domain D --selector S [--algorithm A] [--bits N] --out FILE\n"
    "                           write a DKIM private key, print the TXT record to publish\n"
    "  dns-records --domain D   print the DNS records D should publish: SPF, DKIM, DMARC,\n"
    "                           MTA-STS and TLS-RPT\n"
    "  queue list [--json]      one line per queued message\n"
    "  queue show ID [--json] [--raw]\n"
    "                           one message's envelope and recipients, or its bytes\n"
    "  queue retry ID|--all, queue drop ID, queue bounce ID\n"
    "                           operator actions on queued messages\n"
    "  accounts [--json]        per-account counters and rate-limit use\n"
    "  suppression list|add|remove ACCOUNT [ADDR] [--json]\n"
    "                           an account's suppression list (hard-bounced recipients)\n"
    "  status [--json]          whether serve runs, uptime, sessions, last minute's traffic,\n"
    "                           top senders and the queue by state\n"
    "  tls-rpt list|send [--day DAY] [--json]\n"
    "                           TLS-RPT session counts by domain; make the reports now\n"
    "  tls-policy DOMAIN [--account NAME] [--json]\n"
    "                           which TLS policy delivery applies to DOMAIN and why (relay,\n"
    "                           override, DANE, MTA-STS, opportunistic), from the live DNS\n"
    "\n"
    "options for every command:\n"
    "  -c, --config PATH        configuration file (default /etc/subrelay/config.json)\n"
    "  -h, --help               help for the command\n"
    "  --version                print the version\n"
    "\n"
    "Run `subrelay <command> --help` for details.\n";

constexpr const char* kServeHelp =
    "usage: subrelay serve [-c PATH] [--dev]\n"
    "\n"
    "Runs the gateway in the foreground until SIGTERM or SIGINT. Logs go to stderr; with\n"
    "systemd (Type=notify) readiness is reported through NOTIFY_SOCKET.\n"
    "On SIGTERM it stops accepting connections, lets transactions in flight finish\n"
    "(limits.shutdown_grace), and exits 0. Accepted messages are in the queue.\n"
    "\n"
    "  -c, --config PATH   configuration file (default /etc/subrelay/config.json)\n"
    "  --dev               no config file: data in ./subrelay-dev/, self-signed certificate,\n"
    "                      STARTTLS on 127.0.0.1:2587 and implicit TLS on 127.0.0.1:2465,\n"
    "                      one account `dev` whose password is printed at start-up;\n"
    "                      every message is captured, none delivered\n";

constexpr const char* kCheckHelp =
    "usage: subrelay check-config [-c PATH]\n"
    "\n"
    "Validates the configuration file: JSON syntax, every key and value, unknown keys,\n"
    "password hashes, and that the TLS certificate and key load and match.\n"
    "Prints `ok` and exits 0, or prints every error as FILE: JSON.PATH: problem and exits 1.\n";

constexpr const char* kHashHelp =
    "usage: subrelay hash-password\n"
    "\n"
    "Reads a password on standard input (asks for it without echo on a terminal; a trailing\n"
    "newline is removed) and prints the hash to put in accounts[].password_hash:\n"
    "  $scrypt$ln=15,r=8,p=1$<salt>$<key>\n"
    "Example: printf %s 'correct horse' | subrelay hash-password\n";

constexpr const char* kQueueHelp =
    "usage: subrelay queue list [--json] [-c PATH | --dev | --data-dir DIR]\n"
    "       subrelay queue show ID [--json] [--raw] [-c PATH | --dev | --data-dir DIR]\n"
    "       subrelay queue retry ID|--all [-c PATH | --dev | --data-dir DIR]\n"
    "       subrelay queue drop ID [-c PATH | --dev | --data-dir DIR]\n"
    "       subrelay queue bounce ID [-c PATH | --dev | --data-dir DIR]\n"
    "\n"
    "Reads and changes the queue database (<data_dir>/queue.db) directly; works while serve runs.\n"
    "  list         one line per message: id, age, size, account, sender, recipients with\n"
    "               state, attempts, next attempt and last error\n"
    "  show ID      one message's envelope, per-recipient state and delivery attempts\n"
    "  retry ID     make the queued and deferred recipients of ID due now (--all: of every\n"
    "               message)\n"
    "  drop ID      delete the message and its history; nobody is notified\n"
    "  bounce ID    mark its queued and deferred recipients failed (\"bounced by operator\");\n"
    "               serve then sends one DSN to the sender (none for the null sender)\n"
    "  --json       one JSON object per line (list) or one object (show)\n"
    "  --raw        (show) print exactly the stored message bytes\n"
    "  --dev        use ./subrelay-dev (the data of `serve --dev`)\n"
    "  --data-dir   use this data directory instead of the config's data_dir\n";

constexpr const char* kAccountsHelp =
    "usage: subrelay accounts [--json] [-c PATH | --dev | --data-dir DIR]\n"
    "\n"
    "Per-account meters since the queue database was created: messages accepted, refused\n"
    "by a rate limit, recipients, bytes, failed AUTH attempts; and the use of each\n"
    "day/month rate limit in its current window. Reads <data_dir>/queue.db directly and\n"
    "works while serve runs (serve writes the counters every 2 seconds and at exit).\n"
    "With the config, every configured account is listed, also those without traffic.\n"
    "  --json       one JSON object per account and line; \"webhook\" shows the account's\n"
    "               webhook: url, events, backlog (events waiting), failing, oldest,\n"
    "               last_error (null for an account without one)\n"
    "  --dev        use ./subrelay-dev (the data of `serve --dev`)\n"
    "  --data-dir   use this data directory (the config is then not read)\n";

constexpr const char* kSuppressionHelp =
    "usage: subrelay suppression list ACCOUNT [--json] [-c PATH | --dev | --data-dir DIR]\n"
    "       subrelay suppression add ACCOUNT ADDR [--reason TEXT] [-c PATH | --dev | --data-dir DIR]\n"
    "       subrelay suppression remove ACCOUNT ADDR [-c PATH | --dev | --data-dir DIR]\n"
    "\n"
    "An account's suppression list (accounts[].suppression): recipients that hard-bounced\n"
    "(5.1.x, 5.2.1) or that an operator added. serve refuses RCPT to a listed address of\n"
    "that account with \"550 5.1.1 ... recipient suppressed since DATE: REASON\"; other\n"
    "accounts are not affected. Reads and changes <data_dir>/queue.db directly; serve sees\n"
    "a change within about 2 seconds.\n"
    "  list         the account's live entries: address, since, expiry, source, reason\n"
    "  add          suppress ADDR (source \"manual\"; expires after suppression.ttl if set)\n"
    "  remove       take ADDR off the list: mail to it is accepted again\n"
    "  --reason     (add) the reason shown in the refusal (one line, at most 300 bytes)\n"
    "  --json       (list) one JSON object per entry and line\n"
    "  --dev        use ./subrelay-dev (the data of `serve --dev`, account \"dev\")\n"
    "  --data-dir   use this data directory (the config is then not read)\n";

constexpr const char* kTlsRptHelp =
    "usage: subrelay tls-rpt list [--day DAY] [--json] [-c PATH]\n"
    "       subrelay tls-rpt send [--day DAY] [-c PATH]\n"
    "\n"
    "SMTP TLS Reporting (RFC 8460, delivery.tls_rpt). serve counts the TLS sessions of each\n"
    "recipient domain whose MTA-STS/DANE policy it looked up (stored once a minute), and\n"
    "after 00:00 UTC plus a random delay (delivery.tls_rpt.max_delay) mails each domain with\n"
    "a \"_smtp._tls\" TXT record a gzipped JSON report of the day, DKIM-signed, through the\n"
    "queue.\n"
    "  list         the counts of a day (default today): per domain and policy type,\n"
    "               successful and failed sessions, each failure's result type, MX and reason\n"
    "  send         make the reports of every day up to DAY (default yesterday) that have\n"
    "               none yet, now; serve delivers them. A day is reported once: sending\n"
    "               today's counts now means none of today's later sessions are reported\n"
    "  --day DAY    today, yesterday or YYYY-MM-DD (UTC)\n"
    "  --json       list: one JSON object per line\n";

constexpr const char* kStatusHelp =
    "usage: subrelay status [--json] [-c PATH | --dev | --data-dir DIR]\n"
    "\n"
    "One screen about the gateway: whether serve runs (it rewrites <data_dir>/status every\n"
    "2 seconds), its pid, version and uptime, listeners and the metrics address, SMTP\n"
    "sessions and outbound connections open, messages accepted and delivered in the last\n"
    "minute and since start, the busiest accounts; and from <data_dir>/queue.db the\n"
    "recipients queued, deferred and in flight, the oldest waiting message and the messages\n"
    "received in the last hour by account. Works while serve is stopped (queue part only).\n"
    "  --json       one JSON object (field names are stable)\n"
    "  --dev        use ./subrelay-dev (the data of `serve --dev`)\n"
    "  --data-dir   use this data directory instead of the config's data_dir\n";

constexpr const char* kKeygenHelp =
    "usage: subrelay dkim-keygen --domain D --selector S [--algorithm rsa-sha256|ed25519-sha256]\n"
    "                            [--bits N] --out FILE [--force]\n"
    "\n"
    "Generates a DKIM signing key, writes it to FILE as PKCS#8 PEM with mode 0600 (atomically;\n"
    "an existing FILE is kept unless --force), and prints the TXT record to publish at\n"
    "S._domainkey.D in zone-file syntax (split into strings of at most 255 bytes) and the\n"
    "entry to add to the \"dkim\" array of the configuration.\n"
    "\n"
    "  --domain D        signing domain (d=): the header From domain of the mail to sign\n"
    "  --selector S      selector (s=), e.g. s2026; use a new one for each key rotation\n"
    "  --algorithm A     rsa-sha256 (default) or ed25519-sha256 (RFC 8463); configure both\n"
    "                    for dual signing, as not every receiver verifies Ed25519 yet\n"
    "  --bits N          RSA key size, 2048 (default) to 4096 (RFC 8301: no 1024)\n"
    "  --out FILE        where to write the private key\n"
    "  --force           replace FILE if it exists\n";

constexpr const char* kDnsHelp =
    "usage: subrelay dns-records --domain D [-c PATH]\n"
    "\n"
    "Prints, in zone-file syntax with a one-line explanation each, the DNS records domain D\n"
    "should publish to send through this gateway: SPF (authorising the gateway's hostname),\n"
    "the DKIM TXT record of every selector configured for D (derived from its private key),\n"
    "a DMARC starter policy (p=none with aggregate reports), and MTA-STS and TLS-RPT\n"
    "suggestions (with the MTA-STS policy file to serve over HTTPS).\n"
    "\n"
    "  --domain D          the domain whose records to print\n"
    "  -c, --config PATH   configuration file (default /etc/subrelay/config.json)\n";

constexpr const char* kTlsPolicyHelp =
    "usage: subrelay tls-policy DOMAIN [--account NAME] [--json] [-c PATH]\n"
    "\n"
    "Explains what delivery would do about TLS for a recipient in DOMAIN, and why, in the\n"
    "order delivery decides it:\n"
    "  1. smarthost: delivery.relay_overrides, the account's relay, delivery.relay; a relay's\n"
    "     own tls and verify apply, MX, DANE and MTA-STS are not consulted\n"
    "  2. delivery.tls_policy_overrides: the operator's policy wins over DANE and MTA-STS\n"
    "  3. the MX route: hosts, preferences, addresses, whether they are DNSSEC-secure and\n"
    "     whether the AD bit is trusted (delivery.dnssec)\n"
    "  4. DANE: the _25._tcp TLSA records of the MX hosts, and which are usable\n"
    "  5. MTA-STS (delivery.mta_sts): the _mta-sts TXT record and the policy, fetched now\n"
    "     over HTTPS (never written to the queue database), and which MX hosts it lists\n"
    "  6. the decision per MX host and a summary line `policy: ...` (dane, mta-sts enforce,\n"
    "     mta-sts testing, override NAME, relay ID, opportunistic, required, verify)\n"
    "Lookups use delivery.resolvers; the MX route gets 30 s, DANE and MTA-STS 60 s.\n"
    "Exits 1 when the configuration cannot be read or DOMAIN has no route (the reason on\n"
    "stderr, what was found on stdout).\n"
    "\n"
    "  --account NAME      evaluate mail sent by this account (its accounts[].relay)\n"
    "  --json              one JSON object (field names are stable)\n"
    "  -c, --config PATH   configuration file (default /etc/subrelay/config.json)\n";

int usageError(const std::string& msg, const char* cmd) {
  std::fprintf(stderr, "subrelay: %s\nRun `subrelay %s--help` for usage.\n", msg.c_str(), cmd);
  return 2;
}

struct Args {
  std::string config = kDefaultConfig;
  bool configGiven = false;
  bool help = false;
  bool dev = false;
  bool json = false;
  bool raw = false;
  bool all = false;  // queue retry --all
  std::string dataDir;
  // dkim-keygen / dns-records
  std::string domain;
  std::string selector;
  std::string algorithm;
  std::string bits;
  std::string out;
  bool force = false;
  std::string day;  // tls-rpt
  std::string account;  // tls-policy
  std::string reason;   // suppression add
  std::vector<std::string> positional;
  std::string error;
};

Args parseArgs(const std::vector<std::string>& argv) {
  Args a;
  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& s = argv[i];
    auto value = [&](const char* name) -> std::string {
      if (i + 1 >= argv.size()) {
        a.error = std::string(name) + " needs a value";
        return {};
      }
      return argv[++i];
    };
    if (s == "-h" || s == "--help") a.help = true;
    else if (s == "-c" || s == "--config") {
      a.config = value("--config");
      a.configGiven = true;
    } else if (s.rfind("--config=", 0) == 0) {
      a.config = s.substr(9);
      a.configGiven = true;
    } else if (s == "--dev") a.dev = true;
    else if (s == "--json") a.json = true;
    else if (s == "--raw") a.raw = true;
    else if (s == "--all") a.all = true;
    else if (s == "--data-dir") a.dataDir = value("--data-dir");
    else if (s == "--domain") a.domain = value("--domain");
    else if (s == "--day") a.day = value("--day");
    else if (s == "--selector") a.selector = value("--selector");
    else if (s == "--algorithm") a.algorithm = value("--algorithm");
    else if (s == "--bits") a.bits = value("--bits");
    else if (s == "--out") a.out = value("--out");
    else if (s == "--force") a.force = true;
    else if (s == "--account") a.account = value("--account");
    else if (s == "--reason") a.reason = value("--reason");
    else if (s.size() > 1 && s[0] == '-') a.error = "unknown option " + s;
    else a.positional.push_back(s);
    if (!a.error.empty()) break;
  }
  return a;
}

int cmdCheckConfig(const Args& a) {
  auto lr = config::loadConfigFile(a.config);
  std::vector<std::string> errors = lr.formatErrors();
  if (lr.config) {
    const auto& cfg = *lr.config;
    for (size_t i = 0; i < cfg.accounts.size(); ++i) {
      std::string why = policy::checkHashFormat(cfg.accounts[i].passwordHash);
      if (!why.empty())
        errors.push_back(a.config + ": accounts[" + std::to_string(i) + "].password_hash: " + why);
    }
    bool needTls = false;
    for (const auto& l : cfg.listeners) needTls = needTls || l.tls != config::ListenerTls::None;
    if (needTls && errors.empty()) {
      auto ctx = tls::TlsContext::serverFromFiles(cfg.tls.certificate, cfg.tls.privateKey);
      if (!ctx.ok()) errors.push_back(a.config + ": tls: " + ctx.error().message);
    }
    // DKIM keys load as serve loads them: readable, PEM, of the configured algorithm,
    // of an acceptable size (RFC 8301).
    std::set<size_t> reported;
    for (size_t i = 0; i < cfg.dkim.size(); ++i) {
      std::string prefix = "dkim[" + std::to_string(i) + "]";
      for (const auto& e : errors)
        if (e.find(": " + prefix + ".") != std::string::npos || e.find(": " + prefix + ":") != std::string::npos)
          reported.insert(i);
    }
    config::Config copy = cfg;
    copy.sourcePath = a.config;
    (void)loadDkimKeys(copy, errors, reported);
  }
  if (errors.empty()) {
    std::printf("ok\n");
    return 0;
  }
  for (const auto& e : errors) std::printf("%s\n", e.c_str());
  return 1;
}

std::string readPassword() {
  std::string pw;
  if (isatty(STDIN_FILENO)) {
    std::fprintf(stderr, "Password: ");
    termios old{};
    tcgetattr(STDIN_FILENO, &old);
    termios quiet = old;
    quiet.c_lflag &= ~static_cast<tcflag_t>(ECHO);
    tcsetattr(STDIN_FILENO, TCSANOW, &quiet);
    std::getline(std::cin, pw);
    tcsetattr(STDIN_FILENO, TCSANOW, &old);
    std::fprintf(stderr, "\n");
  } else {
    pw.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
    // One trailing newline (echo, here-strings) is not part of the password.
    if (!pw.empty() && pw.back() == '\n') pw.pop_back();
    if (!pw.empty() && pw.back() == '\r') pw.pop_back();
  }
  return pw;
}

int cmdHashPassword() {
  std::string pw = readPassword();
  if (pw.empty()) {
    std::fprintf(stderr, "subrelay: empty password; give the password on standard input\n");
    return 1;
  }
  auto h = policy::hashPassword(pw);
  if (!pw.empty()) std::memset(pw.data(), 0, pw.size());
  if (!h.ok()) {
    std::fprintf(stderr, "subrelay: %s\n", h.error().message.c_str());
    return 1;
  }
  std::printf("%s\n", h.value().c_str());
  return 0;
}

int cmdQueue(const Args& a) {
  if (a.positional.empty())
    return usageError("queue needs a subcommand: list, show, retry, drop or bounce", "queue ");
  const std::string& sub = a.positional[0];
  // Usage errors first (exit 2), before the config is read.
  if (sub != "list" && sub != "show" && sub != "retry" && sub != "drop" && sub != "bounce")
    return usageError("unknown queue subcommand '" + sub + "' (list, show, retry, drop, bounce)", "queue ");
  if (sub == "list" && a.positional.size() != 1) return usageError("queue list takes no arguments", "queue ");
  if (sub == "retry" && a.positional.size() != (a.all ? 1u : 2u))
    return usageError("queue retry needs one message id or --all", "queue ");
  if (sub != "list" && sub != "retry" && a.positional.size() != 2)
    return usageError("queue " + sub + " needs one message id", "queue ");
  if (a.all && sub != "retry") return usageError("--all is an option of queue retry only", "queue ");
  QueueCmdOptions o;
  o.json = a.json;
  o.raw = a.raw;
  if (!a.dataDir.empty()) {
    o.dataDir = a.dataDir;
  } else if (a.dev) {
    o.dataDir = kDevDataDir;
  } else {
    std::ifstream f(a.config, std::ios::binary);
    if (!f) {
      std::fprintf(stderr, "subrelay: cannot read %s: %s (use -c PATH, --dev or --data-dir)\n", a.config.c_str(),
                   std::strerror(errno));
      return 1;
    }
    std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    auto lr = config::parseConfig(text, a.config);
    if (!lr.config) {
      for (const auto& l : lr.formatErrors()) std::fprintf(stderr, "%s\n", l.c_str());
      return 1;
    }
    o.dataDir = lr.config->dataDir;
    o.webhookEvents = webhookEventSets(*lr.config);
  }
  if (sub == "list") return queueList(o);
  if (sub == "retry") return queueRetry(o, a.all ? std::nullopt : std::optional<std::string>(a.positional[1]));
  if (sub == "drop") return queueDrop(o, a.positional[1]);
  if (sub == "bounce") return queueBounce(o, a.positional[1]);
  return queueShow(o, a.positional[1]);
}

// The data directory of accounts and status: --data-dir, --dev, or the config's data_dir
// (then the config is kept in *cfg). False, with the errors printed, when the config is bad.
bool dataDirOf(const Args& a, std::string& dataDir, std::optional<config::Config>* cfg = nullptr) {
  if (!a.dataDir.empty()) {
    dataDir = a.dataDir;
    return true;
  }
  if (a.dev) {
    dataDir = kDevDataDir;
    return true;
  }
  auto lr = config::loadConfigFile(a.config);
  if (!lr.config) {
    for (const auto& l : lr.formatErrors()) std::fprintf(stderr, "%s\n", l.c_str());
    std::fprintf(stderr, "subrelay: cannot read the configuration (use -c PATH, --dev or --data-dir)\n");
    return false;
  }
  dataDir = lr.config->dataDir;
  if (cfg) *cfg = std::move(lr.config);
  return true;
}

int cmdAccounts(const Args& a) {
  AccountsCmdOptions o;
  o.json = a.json;
  if (!dataDirOf(a, o.dataDir, &o.config)) return 1;
  return accountsList(o);
}

int cmdSuppression(const Args& a) {
  const char* p = "suppression ";
  if (a.positional.empty()) return usageError("suppression needs a subcommand: list, add or remove", p);
  const std::string& sub = a.positional[0];
  if (sub != "list" && sub != "add" && sub != "remove")
    return usageError("unknown suppression subcommand '" + sub + "' (list, add, remove)", p);
  if (sub == "list" && a.positional.size() != 2) return usageError("suppression list needs one ACCOUNT", p);
  if (sub != "list" && a.positional.size() != 3)
    return usageError("suppression " + sub + " needs an ACCOUNT and an ADDR", p);
  if (!a.reason.empty() && sub != "add") return usageError("--reason is an option of suppression add only", p);
  if (a.json && sub != "list") return usageError("--json is an option of suppression list only", p);
  SuppressionCmdOptions o;
  o.sub = sub;
  o.account = a.positional[1];
  if (sub != "list") o.address = a.positional[2];
  o.reason = a.reason;
  o.json = a.json;
  if (a.dev && a.dataDir.empty()) o.onlyAccount = "dev";
  if (!dataDirOf(a, o.dataDir, &o.config)) return 1;
  return suppressionCommand(o);
}

int cmdTlsPolicy(const Args& a) {
  if (a.positional.size() != 1) return usageError("tls-policy needs one DOMAIN", "tls-policy ");
  if (a.dev || !a.dataDir.empty()) return usageError("tls-policy reads the configuration (-c PATH)", "tls-policy ");
  TlsPolicyCmdOptions o;
  o.config = a.config;
  o.account = a.account;
  o.json = a.json;
  std::string domain = a.positional[0];
  if (domain.size() > 1 && domain.back() == '.') domain.pop_back();
  if (!domain.empty() && domain.front() == '[') {
    o.domain = domain;  // an address literal (RFC 5321 4.1.3)
  } else {
    std::string why;
    auto ascii = idna::toAscii(domain, &why);
    if (!ascii || !config::isValidDomainName(*ascii))
      return usageError("not a domain name: " + domain + (why.empty() ? "" : " (" + why + ")"), "tls-policy ");
    o.domain = util::toLower(*ascii);
  }
  return tlsPolicyCommand(o);
}

}  // namespace

int cliMain(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) {
    std::fputs(kMainHelp, stderr);
    return 2;
  }
  std::string cmd = args[0];
  if (cmd == "-h" || cmd == "--help" || cmd == "help") {
    std::fputs(kMainHelp, stdout);
    return 0;
  }
  if (cmd == "--version" || cmd == "version") {
    std::printf("subrelay %s (TLS: %s)\n", SUBRELAY_VERSION, SUBRELAY_TLS_BACKEND);
    return 0;
  }
  Args a = parseArgs({args.begin() + 1, args.end()});
  struct Cmd {
    const char* name;
    const char* help;
  };
  static const Cmd kCmds[] = {{"serve", kServeHelp}, {"check-config", kCheckHelp},
                              {"hash-password", kHashHelp}, {"queue", kQueueHelp},
                              {"dkim-keygen", kKeygenHelp}, {"dns-records", kDnsHelp},
                              {"accounts", kAccountsHelp}, {"status", kStatusHelp},
                              {"tls-rpt", kTlsRptHelp},
                              {"tls-policy", kTlsPolicyHelp}, {"suppression", kSuppressionHelp}};
  const Cmd* found = nullptr;
  for (const auto& c : kCmds)
    if (cmd == c.name) found = &c;
  if (found == nullptr) {
    std::fprintf(stderr, "subrelay: unknown command '%s'\n\n%s", cmd.c_str(), kMainHelp);
    return 2;
  }
  if (a.help) {
    std::fputs(found->help, stdout);
    return 0;
  }
  std::string cmdPrefix = cmd + " ";
  if (!a.error.empty()) return usageError(a.error, cmdPrefix.c_str());
  if (cmd == "serve") {
    if (!a.positional.empty()) return usageError("serve takes no arguments", "serve ");
    if (a.dev && a.configGiven) return usageError("--dev and --config exclude each other", "serve ");
    return runServe(ServeOptions{a.config, a.dev});
  }
  if (cmd == "check-config") {
    if (!a.positional.empty()) return usageError("check-config takes no arguments", "check-config ");
    return cmdCheckConfig(a);
  }
  if (cmd == "hash-password") {
    if (!a.positional.empty()) return usageError("hash-password takes no arguments", "hash-password ");
    return cmdHashPassword();
  }
  if (cmd == "dkim-keygen") {
    if (!a.positional.empty()) return usageError("dkim-keygen takes no arguments", "dkim-keygen ");
    KeygenOptions o;
    o.domain = a.domain;
    o.selector = a.selector;
    if (!a.algorithm.empty()) o.algorithm = a.algorithm;
    if (!a.bits.empty()) {
      char* end = nullptr;
      long b = std::strtol(a.bits.c_str(), &end, 10);
      if (end == a.bits.c_str() || *end != '\0' || b <= 0 || b > 65536)
        return usageError("--bits: expected a number of bits, got " + a.bits, "dkim-keygen ");
      o.bits = static_cast<int>(b);
    }
    o.out = a.out;
    o.force = a.force;
    return cmdDkimKeygen(o);
  }
  if (cmd == "dns-records") {
    if (!a.positional.empty()) return usageError("dns-records takes no arguments", "dns-records ");
    return cmdDnsRecords(a.config, a.domain);
  }
  if (cmd == "accounts") {
    if (!a.positional.empty()) return usageError("accounts takes no arguments", "accounts ");
    return cmdAccounts(a);
  }
  if (cmd == "status") {
    if (!a.positional.empty()) return usageError("status takes no arguments", "status ");
    StatusCmdOptions o;
    o.json = a.json;
    if (!dataDirOf(a, o.dataDir)) return 1;
    return statusCommand(o);
  }
  if (cmd == "tls-rpt") {
    if (a.positional.size() != 1 || (a.positional[0] != "list" && a.positional[0] != "send"))
      return usageError("tls-rpt needs one subcommand: list or send", "tls-rpt ");
    if (a.json && a.positional[0] == "send") return usageError("--json is for tls-rpt list", "tls-rpt ");
    TlsRptCmdOptions o;
    o.configPath = a.config;
    o.sub = a.positional[0];
    o.day = a.day;
    o.json = a.json;
    return cmdTlsRpt(o);
  }
  if (cmd == "tls-policy") return cmdTlsPolicy(a);
  if (cmd == "suppression") return cmdSuppression(a);
  return cmdQueue(a);
}

}  // namespace subrelay::app
