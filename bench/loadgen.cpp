// subrelay-loadgen: an SMTP submission load generator (STARTTLS or implicit TLS, AUTH PLAIN,
// pooled connections or one connection per message, closed- or open-loop).
//
// It is an independent client: it links only the TLS library and the C/C++ runtime, never a
// subrelay module, so it can measure subrelay and other servers (Postfix) alike.
//
// Design: one or more event-loop threads (--threads, default 1), each owning an epoll instance
// and a share of the connections. Sockets are non-blocking, registered edge-triggered for
// reading and writing; every event drives the connection's SMTP state machine until it would
// block. TLS runs directly over the socket fd. Work is handed out as "tickets": ticket i is the
// i-th message of the run. A connection holds the ticket of the message it is about to send
// (claimed before it connects, so a server that refuses connections uses up tickets and the run
// ends). With --rate R, ticket i may not start before t0 + i/R (open loop).
//
// Latency of a message: from writing MAIL FROM to reading the reply to the final dot.

#include <openssl/err.h>
#include <openssl/ssl.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cinttypes>
#include <climits>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <map>
#include <memory>
#include <queue>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------------------------
using Nanos = int64_t;

Nanos now_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<Nanos>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

double cpu_seconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------
enum class TlsMode { Starttls, Implicit, None };

struct Options {
  std::string host = "127.0.0.1";
  std::string port = "587";
  TlsMode tls = TlsMode::Starttls;
  std::string user;
  std::string password;
  int connections = 1;
  uint64_t messages = 0;  // 0: not set
  double duration = 0;    // seconds; 0: not set
  int per_connection = 0;
  size_t size = 4096;
  std::string from = "bench@bench.test";
  std::vector<std::string> to{"rcpt@example.test"};
  double rate = 0;
  bool pipelining = false;
  bool idempotency_keys = false;
  bool json = false;
  bool resume = false;
  int threads = 1;
  double timeout = 30;
  double max_time = 900;
  std::string ehlo = "loadgen.bench.test";
  std::string cafile;
  std::string tls_max;  // "", "1.2", "1.3"
  std::string label;
};

const char* const kUsage =
    "usage: subrelay-loadgen [options]\n"
    "  --host H               server address (default 127.0.0.1)\n"
    "  --port P               server port (default 587)\n"
    "  --tls MODE             starttls (default) | implicit | none\n"
    "  --user U --password P  AUTH PLAIN with an initial response (no AUTH without --user)\n"
    "  --connections N        concurrent client connections (default 1)\n"
    "  --messages M           total messages to send (default 1000 unless --duration)\n"
    "  --duration S           send for S seconds instead (messages in flight then finish)\n"
    "  --per-connection K     messages per connection: 0 = pooled (default), 1 = new connection\n"
    "                         (TCP + TLS handshake + AUTH) for every message\n"
    "  --size BYTES           message size including headers (default 4096)\n"
    "  --from ADDR            envelope and header sender (default bench@bench.test)\n"
    "  --to ADDR[,ADDR...]    recipients (default rcpt@example.test)\n"
    "  --rate R               open loop: start at most R messages/s in total (message i is due\n"
    "                         at t0 + i/R); reports latency from the due time as well\n"
    "  --pipelining           send MAIL, RCPT and DATA in one write when PIPELINING is offered\n"
    "  --idempotency-keys     give every message its own Idempotency-Key field (the cost of\n"
    "                         the server's idempotency check)\n"
    "  --resume               reuse TLS sessions (tickets) on new connections, as MTAs do\n"
    "  --threads T            event-loop threads (default 1)\n"
    "  --timeout S            per-reply timeout in seconds (default 30)\n"
    "  --max-time S           abort the whole run after S seconds (default 900)\n"
    "  --ehlo NAME            EHLO name (default loadgen.bench.test)\n"
    "  --cafile FILE          verify the server certificate against FILE (default: no check)\n"
    "  --tls-max 1.2|1.3      highest TLS version to offer\n"
    "  --label TEXT           label echoed in the output\n"
    "  --json                 print one JSON object instead of the text report\n";

[[noreturn]] void usage_error(const std::string& msg) {
  (void)std::fprintf(stderr, "subrelay-loadgen: %s\n%s", msg.c_str(), kUsage);
  std::exit(2);
}

template <typename T>
T parse_number(const std::string& name, const std::string& value, T lo, T hi) {
  T out{};
  const char* b = value.data();
  const char* e = b + value.size();
  auto [p, ec] = std::from_chars(b, e, out);
  if (ec != std::errc() || p != e || out < lo || out > hi) {
    usage_error("bad value for " + name + ": '" + value + "'");
  }
  return out;
}

double parse_double(const std::string& name, const std::string& value, double lo, double hi) {
  char* end = nullptr;
  errno = 0;
  double v = std::strtod(value.c_str(), &end);
  if (value.empty() || errno != 0 || end != value.c_str() + value.size() || !(v >= lo) || !(v <= hi)) {
    usage_error("bad value for " + name + ": '" + value + "'");
  }
  return v;
}

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    size_t comma = s.find(',', start);
    if (comma == std::string::npos) comma = s.size();
    if (comma > start) out.push_back(s.substr(start, comma - start));
    start = comma + 1;
  }
  return out;
}

Options parse_options(int argc, char** argv) {
  Options o;
  bool have_messages = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::string value;
    bool has_inline = false;
    if (arg.rfind("--", 0) == 0) {
      size_t eq = arg.find('=');
      if (eq != std::string::npos) {
        value = arg.substr(eq + 1);
        arg = arg.substr(0, eq);
        has_inline = true;
      }
    }
    auto flag = [&](const char* name) {
      if (arg != name) return false;
      if (has_inline) usage_error(std::string(name) + " takes no value");
      return true;
    };
    auto opt = [&](const char* name) {
      if (arg != name) return false;
      if (!has_inline) {
        if (i + 1 >= argc) usage_error(std::string(name) + " needs a value");
        value = argv[++i];
      }
      return true;
    };
    if (flag("--help") || flag("-h")) {
      (void)std::fputs(kUsage, stdout);
      std::exit(0);
    } else if (opt("--host")) {
      o.host = value;
    } else if (opt("--port")) {
      parse_number<int>("--port", value, 1, 65535);
      o.port = value;
    } else if (opt("--tls")) {
      if (value == "starttls")
        o.tls = TlsMode::Starttls;
      else if (value == "implicit")
        o.tls = TlsMode::Implicit;
      else if (value == "none")
        o.tls = TlsMode::None;
      else
        usage_error("--tls must be starttls, implicit or none");
    } else if (opt("--user")) {
      o.user = value;
    } else if (opt("--password")) {
      o.password = value;
    } else if (opt("--connections")) {
      o.connections = parse_number<int>("--connections", value, 1, 100000);
    } else if (opt("--messages")) {
      o.messages = parse_number<uint64_t>("--messages", value, 1, 1'000'000'000);
      have_messages = true;
    } else if (opt("--duration")) {
      o.duration = parse_double("--duration", value, 0.001, 86400);
    } else if (opt("--per-connection")) {
      o.per_connection = parse_number<int>("--per-connection", value, 0, 1'000'000'000);
    } else if (opt("--size")) {
      o.size = parse_number<size_t>("--size", value, 1, 100'000'000);
    } else if (opt("--from")) {
      o.from = value;
    } else if (opt("--to")) {
      o.to = split_commas(value);
      if (o.to.empty()) usage_error("--to needs at least one address");
    } else if (opt("--rate")) {
      o.rate = parse_double("--rate", value, 0.001, 1e7);
    } else if (flag("--pipelining")) {
      o.pipelining = true;
    } else if (flag("--idempotency-keys")) {
      o.idempotency_keys = true;
    } else if (flag("--resume")) {
      o.resume = true;
    } else if (opt("--threads")) {
      o.threads = parse_number<int>("--threads", value, 1, 256);
    } else if (opt("--timeout")) {
      o.timeout = parse_double("--timeout", value, 0.001, 3600);
    } else if (opt("--max-time")) {
      o.max_time = parse_double("--max-time", value, 0.001, 86400 * 7);
    } else if (opt("--ehlo")) {
      o.ehlo = value;
    } else if (opt("--cafile")) {
      o.cafile = value;
    } else if (opt("--tls-max")) {
      if (value != "1.2" && value != "1.3") usage_error("--tls-max must be 1.2 or 1.3");
      o.tls_max = value;
    } else if (opt("--label")) {
      o.label = value;
    } else if (flag("--json")) {
      o.json = true;
    } else {
      usage_error("unknown argument '" + arg + "'");
    }
  }
  if (have_messages && o.duration > 0) usage_error("give --messages or --duration, not both");
  if (!have_messages && o.duration <= 0) o.messages = 1000;
  if (o.user.empty() != o.password.empty()) usage_error("--user and --password go together");
  if (o.resume && o.tls == TlsMode::None) usage_error("--resume needs TLS");
  if (o.threads > o.connections) o.threads = o.connections;
  for (const std::string* s : {&o.from, &o.ehlo, &o.user}) {
    if (s->find_first_of("\r\n") != std::string::npos) usage_error("CR/LF in an argument");
  }
  for (const auto& t : o.to) {
    if (t.find_first_of("\r\n") != std::string::npos) usage_error("CR/LF in an argument");
  }
  return o;
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------
std::string base64(std::string_view in) {
  static const char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 3 <= in.size(); i += 3) {
    uint32_t v =
        (static_cast<uint8_t>(in[i]) << 16) | (static_cast<uint8_t>(in[i + 1]) << 8) | static_cast<uint8_t>(in[i + 2]);
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
    out += kAlphabet[(v >> 6) & 63];
    out += kAlphabet[v & 63];
  }
  size_t rest = in.size() - i;
  if (rest == 1) {
    uint32_t v = static_cast<uint8_t>(in[i]) << 16;
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
    out += "==";
  } else if (rest == 2) {
    uint32_t v = (static_cast<uint8_t>(in[i]) << 16) | (static_cast<uint8_t>(in[i + 1]) << 8);
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
    out += kAlphabet[(v >> 6) & 63];
    out += '=';
  }
  return out;
}

std::string json_escape(std::string_view s) {
  std::string out;
  for (char ch : s) {
    auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20 || c >= 0x7f) {
          char buf[8];
          (void)std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += ch;
        }
    }
  }
  return out;
}

std::string tls_error_string() {
  std::string out;
  int guard = 0;
  for (auto e = ERR_get_error(); e != 0 && guard++ < 8; e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    if (!out.empty()) out += "; ";
    out += buf;
  }
  return out.empty() ? std::string("no detail") : out;
}

std::string domain_of(const std::string& addr) {
  size_t at = addr.rfind('@');
  return at == std::string::npos ? std::string("loadgen.invalid") : addr.substr(at + 1);
}

// ---------------------------------------------------------------------------------------------
// Message generation: fixed-width headers (so every message has the same size) and a body of
// 76-character lines shared by all messages. No body line starts with '.', so no dot-stuffing.
// ---------------------------------------------------------------------------------------------
class MessageFactory {
 public:
  MessageFactory(const Options& o)
      : from_(o.from), id_domain_(domain_of(o.from)), idempotency_keys_(o.idempotency_keys) {
    for (size_t i = 0; i < o.to.size(); ++i) to_header_ += (i ? ", " : "") + o.to[i];
    std::string probe;
    append_headers(probe, 0, 0);
    header_len_ = probe.size();
    size_t body_target = o.size > header_len_ + 2 ? o.size - header_len_ : 2;
    body_ = make_body(body_target);
  }

  // Appends one complete DATA payload, terminated by CRLF.CRLF.
  void append_message(std::string& out, uint64_t ticket, unsigned worker) const {
    append_headers(out, ticket, worker);
    out += body_;
    out += ".\r\n";
  }

  size_t message_size() const { return header_len_ + body_.size(); }

 private:
  void append_headers(std::string& out, uint64_t ticket, unsigned worker) const {
    char date[64];
    time_t t = time(nullptr);
    tm g{};
    gmtime_r(&t, &g);
    (void)strftime(date, sizeof date, "%a, %d %b %Y %H:%M:%S +0000", &g);
    char id[160];
    (void)std::snprintf(id, sizeof id, "<%016" PRIx64 ".%08x.%04x.%012" PRIu64 "@%s>", static_cast<uint64_t>(t),
                        static_cast<unsigned>(getpid()), worker & 0xffffu, ticket, id_domain_.c_str());
    char subject[64];
    (void)std::snprintf(subject, sizeof subject, "subrelay bench message %012" PRIu64, ticket);
    out += "From: ";
    out += from_;
    out += "\r\nTo: ";
    out += to_header_;
    out += "\r\nSubject: ";
    out += subject;
    out += "\r\nDate: ";
    out += date;
    out += "\r\nMessage-ID: ";
    out += id;
    if (idempotency_keys_) {
      // Unique per message (fixed width, like the other fields): every one is checked and
      // recorded, none is a repeat.
      char key[64];
      (void)std::snprintf(key, sizeof key, "%016" PRIx64 ".%08x.%04x.%012" PRIu64, static_cast<uint64_t>(t),
                          static_cast<unsigned>(getpid()), worker & 0xffffu, ticket);
      out += "\r\nIdempotency-Key: ";
      out += key;
    }
    out += "\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n";
  }

  static std::string make_body(size_t target) {
    static const char* const kWords[] = {"order",  "shipped",  "invoice", "your",     "account", "password", "reset",
                                         "link",   "thanks",   "for",     "the",      "payment", "receipt",  "total",
                                         "amount", "customer", "support", "ticket",   "update",  "delivery", "expected",
                                         "within", "three",    "days",    "please",   "contact", "us",       "if",
                                         "you",    "have",     "any",     "questions"};
    constexpr size_t kWordCount = sizeof kWords / sizeof kWords[0];
    std::string body;
    uint32_t seed = 12345;
    while (body.size() + 2 < target) {
      size_t room = std::min<size_t>(76, target - body.size() - 2);
      std::string line;
      while (line.size() < room) {
        seed = seed * 1103515245u + 12345u;
        std::string_view w = kWords[(seed >> 16) % kWordCount];
        if (!line.empty()) line += ' ';
        line += w;
      }
      line.resize(room);
      if (line.back() == ' ') line.back() = 'x';
      body += line;
      body += "\r\n";
    }
    if (body.empty()) body = "x\r\n";
    return body;
  }

  std::string from_;
  std::string id_domain_;
  bool idempotency_keys_ = false;
  std::string to_header_;
  size_t header_len_ = 0;
  std::string body_;
};

// ---------------------------------------------------------------------------------------------
// Shared run state
// ---------------------------------------------------------------------------------------------
struct Shared {
  const Options* opt = nullptr;
  const MessageFactory* factory = nullptr;
  SSL_CTX* ctx = nullptr;
  std::vector<sockaddr_storage> addrs;
  std::vector<socklen_t> addr_lens;
  std::string auth_line;

  std::atomic<uint64_t> next_ticket{0};
  std::atomic<Nanos> t0{0};             // start of the measured interval
  std::atomic<int> initial_pending{0};  // pooled mode: connections not yet ready or failed
  Nanos start = 0;
  Nanos hard_deadline = 0;
  std::atomic<bool> aborted{false};

  // Claims the next message; false when the run is over.
  bool claim(uint64_t& ticket) {
    if (aborted.load(std::memory_order_relaxed)) return false;
    if (opt->duration > 0) {
      Nanos t = t0.load(std::memory_order_acquire);
      if (t != 0 && now_ns() >= t + static_cast<Nanos>(opt->duration * 1e9)) return false;
    }
    uint64_t t = next_ticket.fetch_add(1, std::memory_order_relaxed);
    if (opt->messages != 0 && t >= opt->messages) return false;
    ticket = t;
    return true;
  }

  // When message `ticket` is due (open loop), or 0 when there is no rate.
  Nanos due(uint64_t ticket) const {
    if (opt->rate <= 0) return 0;
    Nanos t = t0.load(std::memory_order_acquire);
    return t + static_cast<Nanos>(static_cast<double>(ticket) * 1e9 / opt->rate);
  }
};

struct Stats {
  uint64_t ok = 0;
  uint64_t failed = 0;
  uint64_t connections = 0;  // sessions that reached the ready state
  uint64_t connect_attempts = 0;
  uint64_t resumed = 0;
  std::vector<uint32_t> latency_us;        // MAIL -> final 250
  std::vector<uint32_t> due_latency_us;    // due time -> final 250 (with --rate)
  std::vector<uint32_t> setup_us;          // connect() -> ready (after AUTH)
  std::map<std::string, uint64_t> errors;  // error kind -> count
  std::string first_error;
  Nanos first_error_at = 0;
  Nanos last_done = 0;

  void error(const std::string& kind, const std::string& detail, bool message_failed) {
    if (message_failed) ++failed;
    ++errors[kind];
    if (first_error.empty()) {
      first_error = detail;
      first_error_at = now_ns();
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Connection state machine
// ---------------------------------------------------------------------------------------------
enum class Phase {
  Waiting,  // waiting for a timer (due time, start barrier, back-off), no socket
  Connecting,
  Handshake,
  Greeting,
  Ehlo,
  StartTls,
  Auth,
  Ready,  // authenticated, waiting for the message's due time or the start barrier
  Mail,
  Rcpt,
  Data,
  Body,
  BodyAbort,  // a pipelined transaction had a refused recipient but DATA got 354
  Rset,
  Quit,
  Done,
};

struct Reply {
  int code = 0;
  std::string text;                // all lines joined by " | "
  std::vector<std::string> lines;  // text of each line (after the code and separator)
};

struct Conn {
  int index = 0;
  int fd = -1;
  SSL* ssl = nullptr;
  Phase phase = Phase::Waiting;
  bool after_wait_connect = false;  // the pending timer starts a connection (else a message)
  bool has_ticket = false;
  uint64_t ticket = 0;
  bool counted_initial = false;
  bool tls_active = false;
  bool ext_starttls = false;
  bool ext_pipelining = false;
  bool ext_auth_plain = false;
  int msgs_on_conn = 0;
  size_t rcpt_index = 0;  // next RCPT reply expected
  bool txn_failed = false;
  bool pipelined = false;  // this transaction was pipelined
  std::string txn_error;
  std::string txn_error_kind;
  std::string inbuf;
  std::string outbuf;
  size_t out_off = 0;
  int pending_write = 0;  // SSL_write length to repeat after WANT_WRITE
  Reply cur;              // reply being assembled
  Nanos timer_at = 0;
  Nanos deadline = 0;
  Nanos connect_started = 0;
  Nanos mail_sent = 0;
  Nanos due = 0;
  uint64_t gen = 0;  // bumped when the socket is closed
};

class Worker {
 public:
  Worker(Shared& sh, unsigned id) : sh_(sh), opt_(*sh.opt), id_(id) {}
  ~Worker() {
    for (auto& c : conns_) close_conn(*c);
    if (session_) SSL_SESSION_free(session_);
    if (tfd_ >= 0) close(tfd_);
    if (ep_ >= 0) close(ep_);
  }
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  void add_connection() { conns_.push_back(std::make_unique<Conn>()); }
  Stats& stats() { return st_; }

  void run() {
    ep_ = epoll_create1(EPOLL_CLOEXEC);
    if (ep_ < 0) {
      st_.error("internal", std::string("epoll_create1: ") + std::strerror(errno), false);
      sh_.aborted = true;
      return;
    }
    // A timerfd wakes the loop for due messages with sub-millisecond precision (an epoll
    // timeout is rounded up to whole milliseconds, which would show up in the latencies).
    tfd_ = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (tfd_ >= 0) {
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.ptr = nullptr;
      if (epoll_ctl(ep_, EPOLL_CTL_ADD, tfd_, &ev) != 0) {
        close(tfd_);
        tfd_ = -1;
      }
    }
    for (size_t i = 0; i < conns_.size(); ++i) {
      Conn& c = *conns_[i];
      c.index = static_cast<int>(i);
      if (!sh_.claim(c.ticket)) {
        c.phase = Phase::Done;
        note_initial_done(c);
        continue;
      }
      c.has_ticket = true;
      ++active_;
      begin_connection(c);
    }
    epoll_event events[256];
    Nanos last_sweep = now_ns();
    while (active_ > 0) {
      Nanos now = now_ns();
      if (now >= sh_.hard_deadline) {
        if (!sh_.aborted.exchange(true)) {
          st_.error("aborted", "run aborted after --max-time", false);
        }
        break;
      }
      int timeout_ms = 100;
      if (!timers_.empty()) {
        Nanos next = timers_.top().first;
        Nanos wait = next - now;
        if (wait <= 0) {
          timeout_ms = 0;
        } else if (tfd_ >= 0) {
          if (next != armed_) {
            itimerspec its{};
            its.it_value.tv_sec = static_cast<time_t>(next / 1'000'000'000);
            its.it_value.tv_nsec = static_cast<long>(next % 1'000'000'000);
            timerfd_settime(tfd_, TFD_TIMER_ABSTIME, &its, nullptr);
            armed_ = next;
          }
        } else {
          timeout_ms = static_cast<int>(std::min<Nanos>(100, (wait + 999'999) / 1'000'000));
        }
      }
      if (!barrier_waiters_.empty()) timeout_ms = std::min(timeout_ms, 1);
      int n = epoll_wait(ep_, events, 256, timeout_ms);
      if (n < 0 && errno != EINTR) {
        st_.error("internal", std::string("epoll_wait: ") + std::strerror(errno), false);
        sh_.aborted = true;
        break;
      }
      for (int i = 0; i < n; ++i) {
        if (events[i].data.ptr == nullptr) {  // the timerfd
          uint64_t expirations = 0;
          if (read(tfd_, &expirations, sizeof expirations) < 0) { /* nothing to do */
          }
          armed_ = 0;
          continue;
        }
        Conn& c = *static_cast<Conn*>(events[i].data.ptr);
        drive(c, events[i].events);
      }
      fire_timers();
      release_barrier();
      now = now_ns();
      if (now - last_sweep >= 100'000'000) {
        last_sweep = now;
        sweep_timeouts(now);
      }
    }
  }

 private:
  // --- lifecycle ----------------------------------------------------------------------------
  void begin_connection(Conn& c) {
    // Open loop with one connection per batch: the message is due before we connect.
    if (opt_.rate > 0 && opt_.per_connection > 0) {
      c.due = sh_.due(c.ticket);
      if (c.due > now_ns()) {
        c.after_wait_connect = true;
        set_wait(c, c.due);
        return;
      }
    }
    start_connect(c);
  }

  void start_connect(Conn& c) {
    reset_session(c);
    ++st_.connect_attempts;
    c.connect_started = now_ns();
    const sockaddr_storage& sa = sh_.addrs[attempt_++ % sh_.addrs.size()];
    socklen_t len = sh_.addr_lens[(attempt_ - 1) % sh_.addrs.size()];
    c.fd = socket(sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c.fd < 0) {
      conn_failed(c, "socket", std::string("socket: ") + std::strerror(errno));
      return;
    }
    int one = 1;
    setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.ptr = &c;
    if (epoll_ctl(ep_, EPOLL_CTL_ADD, c.fd, &ev) != 0) {
      conn_failed(c, "internal", std::string("epoll_ctl: ") + std::strerror(errno));
      return;
    }
    c.phase = Phase::Connecting;
    c.deadline = c.connect_started + timeout_ns();
    int r = connect(c.fd, reinterpret_cast<const sockaddr*>(&sa), len);
    if (r != 0 && errno != EINPROGRESS) {
      conn_failed(c, "connect", std::string("connect: ") + std::strerror(errno));
      return;
    }
    // Completion (or failure) is reported as EPOLLOUT/EPOLLERR.
  }

  void reset_session(Conn& c) {
    c.tls_active = false;
    c.ext_starttls = c.ext_pipelining = c.ext_auth_plain = false;
    c.msgs_on_conn = 0;
    c.inbuf.clear();
    c.outbuf.clear();
    c.out_off = 0;
    c.pending_write = 0;
    c.cur = Reply{};
  }

  void close_conn(Conn& c) {
    if (c.ssl) {
      if (c.tls_active) SSL_shutdown(c.ssl);  // one close_notify, no waiting
      SSL_free(c.ssl);
      c.ssl = nullptr;
    }
    if (c.fd >= 0) {
      if (ep_ >= 0) epoll_ctl(ep_, EPOLL_CTL_DEL, c.fd, nullptr);
      close(c.fd);
      c.fd = -1;
    }
    c.tls_active = false;
    ++c.gen;
    ERR_clear_error();
  }

  // The session broke (connect, TLS, EOF, timeout, 421, protocol error): the held message fails.
  void conn_failed(Conn& c, const std::string& kind, const std::string& detail) {
    close_conn(c);
    note_initial_done(c);
    if (c.has_ticket) {
      c.has_ticket = false;
      st_.error(kind, detail, true);
      st_.last_done = now_ns();
    } else {
      st_.error(kind, detail, false);
    }
    if (!sh_.claim(c.ticket)) {
      finish(c);
      return;
    }
    c.has_ticket = true;
    // Short back-off so a dead server does not turn into a busy loop.
    c.after_wait_connect = true;
    set_wait(c, now_ns() + 10'000'000);
  }

  void finish(Conn& c) {
    close_conn(c);
    if (c.phase != Phase::Done) {
      c.phase = Phase::Done;
      --active_;
    }
  }

  void note_initial_done(Conn& c) {
    if (c.counted_initial) return;
    c.counted_initial = true;
    if (sh_.initial_pending.fetch_sub(1) == 1) {
      Nanos expected = 0;
      sh_.t0.compare_exchange_strong(expected, now_ns());
    }
  }

  // --- timers -------------------------------------------------------------------------------
  void set_wait(Conn& c, Nanos at) {
    c.phase = Phase::Waiting;
    c.deadline = 0;
    c.timer_at = at;
    timers_.push({at, &c});
  }

  void fire_timers() {
    Nanos now = now_ns();
    int guard = 0;
    while (!timers_.empty() && timers_.top().first <= now && guard++ < 100000) {
      auto [at, cp] = timers_.top();
      timers_.pop();
      Conn& c = *cp;
      if (c.timer_at != at) continue;  // stale entry
      c.timer_at = 0;
      if (c.phase == Phase::Waiting && c.after_wait_connect) {
        c.after_wait_connect = false;
        start_connect(c);
      } else if (c.phase == Phase::Ready) {
        send_mail(c);
        if (c.fd >= 0) drive(c, 0);
      }
    }
  }

  void release_barrier() {
    if (barrier_waiters_.empty() || sh_.t0.load(std::memory_order_acquire) == 0) return;
    std::vector<Conn*> waiters;
    waiters.swap(barrier_waiters_);
    for (Conn* c : waiters) {
      if (c->phase != Phase::Ready) continue;
      start_message(*c);
      if (c->fd >= 0 && c->phase != Phase::Ready) drive(*c, 0);  // flush the MAIL just queued
    }
  }

  void sweep_timeouts(Nanos now) {
    for (auto& cp : conns_) {
      Conn& c = *cp;
      if (c.fd >= 0 && c.deadline != 0 && now > c.deadline) {
        conn_failed(c, "timeout", "timeout waiting for the server (phase " + phase_name(c.phase) + ")");
      }
    }
  }

  Nanos timeout_ns() const { return static_cast<Nanos>(opt_.timeout * 1e9); }

  static std::string phase_name(Phase p) {
    switch (p) {
      case Phase::Waiting:
        return "waiting";
      case Phase::Connecting:
        return "connect";
      case Phase::Handshake:
        return "TLS handshake";
      case Phase::Greeting:
        return "greeting";
      case Phase::Ehlo:
        return "EHLO";
      case Phase::StartTls:
        return "STARTTLS";
      case Phase::Auth:
        return "AUTH";
      case Phase::Ready:
        return "ready";
      case Phase::Mail:
        return "MAIL";
      case Phase::Rcpt:
        return "RCPT";
      case Phase::Data:
        return "DATA";
      case Phase::Body:
      case Phase::BodyAbort:
        return "end of data";
      case Phase::Rset:
        return "RSET";
      case Phase::Quit:
        return "QUIT";
      case Phase::Done:
        return "done";
    }
    return "?";
  }

  // --- I/O ----------------------------------------------------------------------------------
  void send(Conn& c, std::string_view bytes) {
    if (c.out_off == c.outbuf.size()) {
      c.outbuf.clear();
      c.out_off = 0;
    }
    c.outbuf.append(bytes);
    c.deadline = now_ns() + timeout_ns();
  }

  // Writes what it can. False if the connection failed (already handled).
  bool flush(Conn& c) {
    int guard = 0;
    while (c.out_off < c.outbuf.size() && guard++ < 100000) {
      if (c.tls_active) {
        int len = c.pending_write;
        if (len == 0) len = static_cast<int>(std::min<size_t>(c.outbuf.size() - c.out_off, 1 << 20));
        int r = SSL_write(c.ssl, c.outbuf.data() + c.out_off, len);
        if (r > 0) {
          c.pending_write = 0;
          c.out_off += static_cast<size_t>(r);
          continue;
        }
        int err = SSL_get_error(c.ssl, r);
        if (err == SSL_ERROR_WANT_WRITE || err == SSL_ERROR_WANT_READ) {
          c.pending_write = len;
          return true;
        }
        conn_failed(c, "tls", "TLS write: " + tls_error_string());
        return false;
      }
      ssize_t r = ::send(c.fd, c.outbuf.data() + c.out_off, c.outbuf.size() - c.out_off, MSG_NOSIGNAL);
      if (r > 0) {
        c.out_off += static_cast<size_t>(r);
        continue;
      }
      if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
      if (r < 0 && errno == EINTR) continue;
      conn_failed(c, "io", std::string("write: ") + std::strerror(errno));
      return false;
    }
    return true;
  }

  enum class ReadResult { Ok, Eof, Failed };

  // Reads everything available into inbuf.
  ReadResult read_available(Conn& c) {
    char buf[16384];
    int guard = 0;
    while (guard++ < 100000) {
      if (c.tls_active) {
        int r = SSL_read(c.ssl, buf, sizeof buf);
        if (r > 0) {
          c.inbuf.append(buf, static_cast<size_t>(r));
          continue;
        }
        int err = SSL_get_error(c.ssl, r);
        if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) return ReadResult::Ok;
        if (err == SSL_ERROR_ZERO_RETURN) return ReadResult::Eof;
        if (err == SSL_ERROR_SYSCALL && ERR_peek_error() == 0) return ReadResult::Eof;
        conn_failed(c, "tls", "TLS read: " + tls_error_string());
        return ReadResult::Failed;
      }
      ssize_t r = ::recv(c.fd, buf, sizeof buf, 0);
      if (r > 0) {
        c.inbuf.append(buf, static_cast<size_t>(r));
        continue;
      }
      if (r == 0) return ReadResult::Eof;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return ReadResult::Ok;
      if (errno == EINTR) continue;
      if (errno == ECONNRESET) return ReadResult::Eof;
      conn_failed(c, "io", std::string("read: ") + std::strerror(errno));
      return ReadResult::Failed;
    }
    return ReadResult::Ok;
  }

  // Takes one complete reply from inbuf. 0: none yet; 1: got one; -1: protocol error (handled).
  int take_reply(Conn& c, Reply& out) {
    size_t pos = 0;
    int guard = 0;
    while (guard++ < 10000) {
      size_t eol = c.inbuf.find("\r\n", pos);
      if (eol == std::string::npos) {
        if (c.inbuf.size() - pos > 8192) {
          conn_failed(c, "protocol", "reply line too long");
          return -1;
        }
        c.inbuf.erase(0, pos);
        return 0;
      }
      std::string_view line(c.inbuf.data() + pos, eol - pos);
      pos = eol + 2;
      if (line.size() < 3 || !std::isdigit(static_cast<unsigned char>(line[0])) ||
          !std::isdigit(static_cast<unsigned char>(line[1])) || !std::isdigit(static_cast<unsigned char>(line[2])) ||
          (line.size() > 3 && line[3] != ' ' && line[3] != '-')) {
        conn_failed(c, "protocol", "malformed reply line: " + std::string(line.substr(0, 200)));
        return -1;
      }
      int code = (line[0] - '0') * 100 + (line[1] - '0') * 10 + (line[2] - '0');
      if (c.cur.lines.empty()) {
        c.cur.code = code;
      } else if (code != c.cur.code) {
        conn_failed(c, "protocol", "reply code changed inside a multi-line reply");
        return -1;
      }
      std::string text(line.size() > 4 ? line.substr(4) : std::string_view());
      if (!c.cur.text.empty()) c.cur.text += " | ";
      c.cur.text += text;
      c.cur.lines.push_back(std::move(text));
      if (c.cur.lines.size() > 1000) {
        conn_failed(c, "protocol", "reply with too many lines");
        return -1;
      }
      if (line.size() == 3 || line[3] == ' ') {
        out = std::move(c.cur);
        c.cur = Reply{};
        c.inbuf.erase(0, pos);
        return 1;
      }
    }
    conn_failed(c, "protocol", "reply parser guard");
    return -1;
  }

  // Runs the connection until it would block.
  void drive(Conn& c, uint32_t events) {
    if (c.fd < 0) return;
    if (c.phase == Phase::Connecting) {
      int err = 0;
      socklen_t len = sizeof err;
      if (getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
      if (err != 0) {
        conn_failed(c, "connect", std::string("connect: ") + std::strerror(err));
        return;
      }
      if (!(events & (EPOLLOUT | EPOLLIN | EPOLLHUP | EPOLLERR))) return;
      c.deadline = now_ns() + timeout_ns();
      if (opt_.tls == TlsMode::Implicit) {
        if (!start_tls(c)) return;
      } else {
        c.phase = Phase::Greeting;
      }
    }
    int guard = 0;
    while (c.fd >= 0 && guard++ < 10000) {
      if (c.phase == Phase::Handshake) {
        ERR_clear_error();
        int r = SSL_connect(c.ssl);
        if (r != 1) {
          int err = SSL_get_error(c.ssl, r);
          if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) return;
          conn_failed(c, "tls", "TLS handshake: " + tls_error_string());
          return;
        }
        c.tls_active = true;
        if (SSL_session_reused(c.ssl)) ++st_.resumed;
        if (opt_.tls == TlsMode::Implicit) {
          c.phase = Phase::Greeting;
        } else {
          send_ehlo(c);
        }
      }
      if (!flush(c)) return;
      ReadResult rr = read_available(c);
      if (rr == ReadResult::Failed) return;
      bool progressed = false;
      Reply reply;
      int got = 0;
      int rguard = 0;
      const uint64_t gen = c.gen;
      while (c.fd >= 0 && c.phase != Phase::Handshake && rguard++ < 10000 && (got = take_reply(c, reply)) == 1) {
        progressed = true;
        on_reply(c, reply);
        if (c.gen != gen) return;  // closed (and maybe reconnecting): the new socket gets its own events
      }
      if (got < 0 || c.fd < 0) return;
      if (rr == ReadResult::Eof && c.phase != Phase::Handshake) {
        if (c.phase == Phase::Quit) {
          quit_done(c);
        } else {
          conn_failed(c, "closed", "connection closed by the server (phase " + phase_name(c.phase) + ")");
        }
        return;
      }
      if (c.phase == Phase::Handshake) continue;
      if (!progressed) {
        if (!flush(c)) return;
        return;
      }
    }
  }

  bool start_tls(Conn& c) {
    c.ssl = SSL_new(sh_.ctx);
    if (c.ssl == nullptr || SSL_set_fd(c.ssl, c.fd) != 1) {
      conn_failed(c, "tls", "SSL_new: " + tls_error_string());
      return false;
    }
    SSL_set_app_data(c.ssl, this);
    if (opt_.resume && session_ != nullptr) SSL_set_session(c.ssl, session_);
    c.phase = Phase::Handshake;
    c.deadline = now_ns() + timeout_ns();
    return true;
  }

  // --- SMTP ---------------------------------------------------------------------------------
  void send_ehlo(Conn& c) {
    c.phase = Phase::Ehlo;
    send(c, "EHLO " + opt_.ehlo + "\r\n");
  }

  void on_reply(Conn& c, const Reply& r) {
    if (r.code == 421) {
      conn_failed(c, "421", "421 " + r.text + " (phase " + phase_name(c.phase) + ")");
      return;
    }
    switch (c.phase) {
      case Phase::Greeting:
        if (r.code != 220) return session_error(c, "greeting", r);
        send_ehlo(c);
        break;
      case Phase::Ehlo: {
        if (r.code != 250) return session_error(c, "EHLO", r);
        c.ext_starttls = c.ext_pipelining = c.ext_auth_plain = false;
        for (size_t i = 1; i < r.lines.size(); ++i) {
          std::string kw = r.lines[i];
          for (auto& ch : kw) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
          if (kw == "STARTTLS")
            c.ext_starttls = true;
          else if (kw == "PIPELINING")
            c.ext_pipelining = true;
          else if ((kw.rfind("AUTH ", 0) == 0 || kw.rfind("AUTH=", 0) == 0) && kw.find("PLAIN") != std::string::npos)
            c.ext_auth_plain = true;
        }
        if (opt_.tls == TlsMode::Starttls && !c.tls_active) {
          if (!c.ext_starttls) {
            conn_failed(c, "setup", "STARTTLS not advertised");
            return;
          }
          c.phase = Phase::StartTls;
          send(c, "STARTTLS\r\n");
        } else if (!opt_.user.empty()) {
          if (!c.ext_auth_plain) {
            conn_failed(c, "setup", "AUTH PLAIN not advertised");
            return;
          }
          c.phase = Phase::Auth;
          send(c, sh_.auth_line);
        } else {
          became_ready(c);
        }
        break;
      }
      case Phase::StartTls:
        if (r.code != 220) return session_error(c, "STARTTLS", r);
        if (!c.inbuf.empty()) {
          conn_failed(c, "protocol", "data after the STARTTLS reply (injection)");
          return;
        }
        start_tls(c);
        break;
      case Phase::Auth:
        if (r.code != 235) return session_error(c, "AUTH", r);
        became_ready(c);
        break;
      case Phase::Mail:
        if (r.code != 250) txn_fail(c, "MAIL", r);
        if (c.txn_failed && !c.pipelined) return begin_rset(c);
        c.phase = Phase::Rcpt;
        c.rcpt_index = 0;
        if (!c.pipelined) send(c, "RCPT TO:<" + opt_.to[0] + ">\r\n");
        break;
      case Phase::Rcpt:
        if (r.code != 250 && r.code != 251) txn_fail(c, "RCPT", r);
        if (c.txn_failed && !c.pipelined) return begin_rset(c);
        ++c.rcpt_index;
        if (c.rcpt_index < opt_.to.size()) {
          if (!c.pipelined) send(c, "RCPT TO:<" + opt_.to[c.rcpt_index] + ">\r\n");
        } else {
          c.phase = Phase::Data;
          if (!c.pipelined) send(c, "DATA\r\n");
        }
        break;
      case Phase::Data:
        if (r.code == 354) {
          // After a refused recipient (pipelined), the message still goes to the accepted
          // ones, as a real client would send it, but it counts as failed.
          c.phase = c.txn_failed ? Phase::BodyAbort : Phase::Body;
          std::string msg;
          msg.reserve(sh_.factory->message_size() + 8);
          sh_.factory->append_message(msg, c.ticket, id_);
          send(c, msg);
        } else {
          txn_fail(c, "DATA", r);
          begin_rset(c);
        }
        break;
      case Phase::Body:
        if (r.code != 250) {
          txn_fail(c, "end of data", r);
          return message_failed(c);
        }
        message_ok(c);
        break;
      case Phase::BodyAbort:
        message_failed(c);
        break;
      case Phase::Rset:
        if (r.code != 250) return session_error(c, "RSET", r);
        after_message(c);
        break;
      case Phase::Quit:
        quit_done(c);
        break;
      default:
        conn_failed(
            c, "protocol",
            "unexpected reply " + std::to_string(r.code) + " " + r.text + " (phase " + phase_name(c.phase) + ")");
        break;
    }
  }

  void session_error(Conn& c, const char* what, const Reply& r) {
    conn_failed(c, std::to_string(r.code), std::string(what) + ": " + std::to_string(r.code) + " " + r.text);
  }

  void txn_fail(Conn& c, const char* what, const Reply& r) {
    if (!c.txn_failed) {
      c.txn_failed = true;
      c.txn_error = std::string(what) + ": " + std::to_string(r.code) + " " + r.text;
      c.txn_error_kind = std::to_string(r.code);
    }
  }

  void begin_rset(Conn& c) {
    // The transaction is over (failed): count it, then reset before the next one.
    record_txn_failure(c);
    c.phase = Phase::Rset;
    send(c, "RSET\r\n");
  }

  void message_failed(Conn& c) {
    record_txn_failure(c);
    after_message(c);
  }

  void record_txn_failure(Conn& c) {
    if (c.has_ticket) {
      c.has_ticket = false;
      st_.error(c.txn_error_kind.empty() ? "reply" : c.txn_error_kind, c.txn_error, true);
      st_.last_done = now_ns();
      ++c.msgs_on_conn;
    }
  }

  void message_ok(Conn& c) {
    Nanos t = now_ns();
    ++st_.ok;
    st_.latency_us.push_back(static_cast<uint32_t>(std::min<Nanos>((t - c.mail_sent) / 1000, UINT32_MAX)));
    if (opt_.rate > 0) {
      Nanos from = c.due != 0 ? c.due : c.mail_sent;
      st_.due_latency_us.push_back(static_cast<uint32_t>(std::clamp<Nanos>((t - from) / 1000, 0, UINT32_MAX)));
    }
    st_.last_done = t;
    c.has_ticket = false;
    ++c.msgs_on_conn;
    after_message(c);
  }

  void after_message(Conn& c) {
    if (opt_.per_connection > 0 && c.msgs_on_conn >= opt_.per_connection) return begin_quit(c);
    if (!sh_.claim(c.ticket)) return begin_quit(c);
    c.has_ticket = true;
    start_message(c);
  }

  void begin_quit(Conn& c) {
    c.phase = Phase::Quit;
    send(c, "QUIT\r\n");
  }

  void quit_done(Conn& c) {
    close_conn(c);
    if (c.has_ticket || sh_.claim(c.ticket)) {
      c.has_ticket = true;
      begin_connection(c);
    } else {
      finish(c);
    }
  }

  void became_ready(Conn& c) {
    ++st_.connections;
    st_.setup_us.push_back(static_cast<uint32_t>(std::min<Nanos>((now_ns() - c.connect_started) / 1000, UINT32_MAX)));
    note_initial_done(c);
    c.phase = Phase::Ready;
    c.deadline = 0;
    if (sh_.t0.load(std::memory_order_acquire) == 0) {
      barrier_waiters_.push_back(&c);  // pooled mode: all connections start together
      return;
    }
    start_message(c);
  }

  // Connection is authenticated and holds a ticket: send now or when the message is due.
  void start_message(Conn& c) {
    c.phase = Phase::Ready;
    c.deadline = 0;
    c.due = 0;
    if (opt_.rate > 0) {
      c.due = sh_.due(c.ticket);
      if (c.due > now_ns()) {
        c.timer_at = c.due;
        timers_.push({c.due, &c});
        return;
      }
    }
    send_mail(c);
  }

  void send_mail(Conn& c) {
    c.txn_failed = false;
    c.txn_error.clear();
    c.txn_error_kind.clear();
    c.pipelined = opt_.pipelining && c.ext_pipelining;
    c.phase = Phase::Mail;
    std::string cmd = "MAIL FROM:<" + opt_.from + ">\r\n";
    if (c.pipelined) {
      for (const auto& rcpt : opt_.to) cmd += "RCPT TO:<" + rcpt + ">\r\n";
      cmd += "DATA\r\n";
    }
    c.mail_sent = now_ns();
    send(c, cmd);
  }

 public:
  // Called by OpenSSL/BoringSSL when the server sends a session ticket.
  static int on_new_session(SSL* ssl, SSL_SESSION* sess) {
    auto* w = static_cast<Worker*>(SSL_get_app_data(ssl));
    if (w == nullptr || !SSL_SESSION_is_resumable(sess)) return 0;
    if (w->session_) SSL_SESSION_free(w->session_);
    w->session_ = sess;
    return 1;  // we keep the reference
  }

 private:
  Shared& sh_;
  const Options& opt_;
  unsigned id_;
  int ep_ = -1;
  int tfd_ = -1;
  Nanos armed_ = 0;
  int active_ = 0;
  size_t attempt_ = 0;
  SSL_SESSION* session_ = nullptr;
  std::vector<std::unique_ptr<Conn>> conns_;
  std::vector<Conn*> barrier_waiters_;
  using TimerEntry = std::pair<Nanos, Conn*>;
  struct TimerLater {
    bool operator()(const TimerEntry& a, const TimerEntry& b) const { return a.first > b.first; }
  };
  std::priority_queue<TimerEntry, std::vector<TimerEntry>, TimerLater> timers_;
  Stats st_;
};

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------
double percentile_ms(const std::vector<uint32_t>& sorted, double p) {
  if (sorted.empty()) return 0;
  size_t rank = static_cast<size_t>(std::ceil(p * static_cast<double>(sorted.size())));
  if (rank == 0) rank = 1;
  return sorted[std::min(rank, sorted.size()) - 1] / 1000.0;
}

struct Summary {
  double p50 = 0, p90 = 0, p99 = 0, max = 0, mean = 0;
  static Summary of(std::vector<uint32_t>& v) {
    Summary s;
    if (v.empty()) return s;
    std::sort(v.begin(), v.end());
    s.p50 = percentile_ms(v, 0.50);
    s.p90 = percentile_ms(v, 0.90);
    s.p99 = percentile_ms(v, 0.99);
    s.max = v.back() / 1000.0;
    double sum = 0;
    for (uint32_t x : v) sum += x;
    s.mean = sum / static_cast<double>(v.size()) / 1000.0;
    return s;
  }
};

std::string tls_name(TlsMode m) {
  switch (m) {
    case TlsMode::Starttls:
      return "starttls";
    case TlsMode::Implicit:
      return "implicit";
    case TlsMode::None:
      return "none";
  }
  return "?";
}

}  // namespace

int main(int argc, char** argv) {
  (void)std::signal(SIGPIPE, SIG_IGN);
  Options opt = parse_options(argc, argv);

  rlimit rl{};
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }

  Shared sh;
  sh.opt = &opt;
  MessageFactory factory(opt);
  sh.factory = &factory;
  if (!opt.user.empty()) {
    std::string creds;
    creds += '\0';
    creds += opt.user;
    creds += '\0';
    creds += opt.password;
    sh.auth_line = "AUTH PLAIN " + base64(creds) + "\r\n";
  }

  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  int gai = getaddrinfo(opt.host.c_str(), opt.port.c_str(), &hints, &res);
  if (gai != 0) {
    (void)std::fprintf(stderr, "subrelay-loadgen: cannot resolve %s: %s\n", opt.host.c_str(), gai_strerror(gai));
    return 1;
  }
  for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
    sockaddr_storage ss{};
    std::memcpy(&ss, ai->ai_addr, ai->ai_addrlen);
    sh.addrs.push_back(ss);
    sh.addr_lens.push_back(ai->ai_addrlen);
    break;  // the first address only: a benchmark talks to one endpoint
  }
  freeaddrinfo(res);

  SSL_CTX* ctx = nullptr;
  if (opt.tls != TlsMode::None) {
    ctx = SSL_CTX_new(TLS_client_method());
    if (ctx == nullptr) {
      (void)std::fprintf(stderr, "subrelay-loadgen: SSL_CTX_new: %s\n", tls_error_string().c_str());
      return 1;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    if (opt.tls_max == "1.2") SSL_CTX_set_max_proto_version(ctx, TLS1_2_VERSION);
    if (opt.tls_max == "1.3") SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    if (!opt.cafile.empty()) {
      if (SSL_CTX_load_verify_locations(ctx, opt.cafile.c_str(), nullptr) != 1) {
        (void)std::fprintf(stderr, "subrelay-loadgen: cannot load %s: %s\n", opt.cafile.c_str(),
                           tls_error_string().c_str());
        return 1;
      }
      SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nullptr);
    } else {
      SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, nullptr);
    }
    if (opt.resume) {
      SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
      SSL_CTX_sess_set_new_cb(ctx, &Worker::on_new_session);
    } else {
      SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
      SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    }
  }
  sh.ctx = ctx;

  // Pooled connections start together once all are authenticated; otherwise t0 is now.
  sh.start = now_ns();
  sh.hard_deadline = sh.start + static_cast<Nanos>(opt.max_time * 1e9);
  if (opt.per_connection == 0) {
    sh.initial_pending = opt.connections;
  } else {
    sh.initial_pending = INT_MAX / 2;
    sh.t0 = sh.start;
  }

  std::vector<std::unique_ptr<Worker>> workers;
  workers.reserve(static_cast<size_t>(opt.threads));
  for (int i = 0; i < opt.threads; ++i) workers.push_back(std::make_unique<Worker>(sh, static_cast<unsigned>(i)));
  for (int i = 0; i < opt.connections; ++i) workers[static_cast<size_t>(i % opt.threads)]->add_connection();

  double cpu_before = cpu_seconds();
  std::vector<std::thread> threads;
  threads.reserve(workers.size());
  for (auto& w : workers) threads.emplace_back([&w] { w->run(); });
  for (auto& t : threads) t.join();
  double cpu_used = cpu_seconds() - cpu_before;
  Nanos wall_end = now_ns();

  Stats all;
  for (auto& w : workers) {
    Stats& s = w->stats();
    all.ok += s.ok;
    all.failed += s.failed;
    all.connections += s.connections;
    all.connect_attempts += s.connect_attempts;
    all.resumed += s.resumed;
    all.latency_us.insert(all.latency_us.end(), s.latency_us.begin(), s.latency_us.end());
    all.due_latency_us.insert(all.due_latency_us.end(), s.due_latency_us.begin(), s.due_latency_us.end());
    all.setup_us.insert(all.setup_us.end(), s.setup_us.begin(), s.setup_us.end());
    for (auto& [k, v] : s.errors) all.errors[k] += v;
    if (!s.first_error.empty() && (all.first_error.empty() || s.first_error_at < all.first_error_at)) {
      all.first_error = s.first_error;
      all.first_error_at = s.first_error_at;
    }
    all.last_done = std::max(all.last_done, s.last_done);
  }
  workers.clear();
  if (ctx) SSL_CTX_free(ctx);

  Nanos t0 = sh.t0.load();
  if (t0 == 0) t0 = sh.start;
  Nanos end = all.last_done > t0 ? all.last_done : wall_end;
  double elapsed = static_cast<double>(end - t0) / 1e9;
  double wall = static_cast<double>(wall_end - sh.start) / 1e9;
  double rate = elapsed > 0 ? static_cast<double>(all.ok) / elapsed : 0;
  double conn_rate = elapsed > 0 ? static_cast<double>(all.connections) / elapsed : 0;
  Summary lat = Summary::of(all.latency_us);
  Summary due = Summary::of(all.due_latency_us);
  Summary setup = Summary::of(all.setup_us);
  double cpu_pct = wall > 0 ? 100.0 * cpu_used / wall : 0;
  std::string mode = opt.per_connection == 0 ? "pooled" : std::to_string(opt.per_connection) + " per connection";
  bool aborted = sh.aborted.load();

  if (opt.json) {
    std::printf(
        "{\"label\":\"%s\",\"host\":\"%s\",\"port\":%s,\"tls\":\"%s\",\"connections\":%d,"
        "\"per_connection\":%d,\"size\":%zu,\"pipelining\":%s,\"resume\":%s,\"threads\":%d,"
        "\"rate_target\":%.3f,"
        "\"messages_ok\":%" PRIu64 ",\"messages_failed\":%" PRIu64
        ",\"first_error\":\"%s\","
        "\"errors\":{",
        json_escape(opt.label).c_str(), json_escape(opt.host).c_str(), opt.port.c_str(), tls_name(opt.tls).c_str(),
        opt.connections, opt.per_connection, factory.message_size(), opt.pipelining ? "true" : "false",
        opt.resume ? "true" : "false", opt.threads, opt.rate, all.ok, all.failed, json_escape(all.first_error).c_str());
    bool first = true;
    for (auto& [k, v] : all.errors) {
      std::printf("%s\"%s\":%" PRIu64, first ? "" : ",", json_escape(k).c_str(), v);
      first = false;
    }
    std::printf(
        "},\"elapsed_s\":%.4f,\"msgs_per_s\":%.2f,"
        "\"latency_ms\":{\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"max\":%.3f,\"mean\":%.3f},",
        elapsed, rate, lat.p50, lat.p90, lat.p99, lat.max, lat.mean);
    if (opt.rate > 0) {
      std::printf("\"latency_from_due_ms\":{\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"max\":%.3f,\"mean\":%.3f},",
                  due.p50, due.p90, due.p99, due.max, due.mean);
    }
    std::printf("\"sessions\":%" PRIu64 ",\"connect_attempts\":%" PRIu64
                ",\"connections_per_s\":%.2f,"
                "\"tls_resumed\":%" PRIu64
                ","
                "\"setup_ms\":{\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"max\":%.3f},"
                "\"client_cpu_s\":%.3f,\"client_cpu_pct_of_one_core\":%.1f,\"wall_s\":%.4f,\"aborted\":%s}\n",
                all.connections, all.connect_attempts, conn_rate, all.resumed, setup.p50, setup.p90, setup.p99,
                setup.max, cpu_used, cpu_pct, wall, aborted ? "true" : "false");
  } else {
    std::printf("subrelay-loadgen%s%s: %s:%s tls=%s, %d connection%s (%s), %zu-byte messages%s%s, %d thread%s\n",
                opt.label.empty() ? "" : " ", opt.label.c_str(), opt.host.c_str(), opt.port.c_str(),
                tls_name(opt.tls).c_str(), opt.connections, opt.connections == 1 ? "" : "s", mode.c_str(),
                factory.message_size(), opt.pipelining ? ", pipelining" : "", opt.resume ? ", TLS resumption" : "",
                opt.threads, opt.threads == 1 ? "" : "s");
    std::printf("  messages ok     %" PRIu64 "\n", all.ok);
    std::printf("  failed          %" PRIu64, all.failed);
    if (!all.first_error.empty()) std::printf("  (first error: %s)", all.first_error.c_str());
    std::printf("\n");
    if (!all.errors.empty()) {
      std::printf("  errors by kind ");
      for (auto& [k, v] : all.errors) std::printf(" %s=%" PRIu64, k.c_str(), v);
      std::printf("\n");
    }
    std::printf("  elapsed         %.3f s\n", elapsed);
    std::printf("  throughput      %.1f msg/s", rate);
    if (opt.rate > 0) std::printf("  (target %.1f msg/s)", opt.rate);
    std::printf("\n");
    std::printf("  latency ms      p50 %.2f  p90 %.2f  p99 %.2f  max %.2f  (MAIL -> reply to final dot)\n", lat.p50,
                lat.p90, lat.p99, lat.max);
    if (opt.rate > 0) {
      std::printf(
          "  from due time   p50 %.2f  p90 %.2f  p99 %.2f  max %.2f  (includes waiting for a free connection)\n",
          due.p50, due.p90, due.p99, due.max);
    }
    std::printf("  connections     %" PRIu64 " ready (%.1f/s), %" PRIu64 " attempts, %" PRIu64 " TLS resumed\n",
                all.connections, conn_rate, all.connect_attempts, all.resumed);
    std::printf("  setup ms        p50 %.2f  p99 %.2f  max %.2f  (connect -> ready after AUTH)\n", setup.p50, setup.p99,
                setup.max);
    std::printf("  client cpu      %.2f s = %.0f%% of one core over %.2f s (client and server share this machine)\n",
                cpu_used, cpu_pct, wall);
    if (cpu_pct > 80.0 * opt.threads) {
      std::printf("  WARNING: the client used most of its %d thread%s: it may be the bottleneck (try --threads)\n",
                  opt.threads, opt.threads == 1 ? "" : "s");
    }
    if (aborted) std::printf("  ABORTED: --max-time reached\n");
  }
  return (all.ok > 0 && !aborted) ? 0 : 1;
}
