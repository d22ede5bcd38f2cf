#!/usr/bin/python3
"""Side-by-side delivery throughput, subrelay vs Postfix as the sending relay (issue:
"10,000 queued 4 KB messages, goal >= 3x").

    bench/delivery_vs_postfix.py [--binary build-bench/src/app/subrelay] [--messages 10000]
                                 [--runs 3] [--size 4096] [--per-domain 10] [--domains 1]
                                 [--fill-connections 8] [--postfix-tls-reuse yes|no]
                                 [--postfix-tls-level may|none]
                                 [--only subrelay|postfix] [--keep]

Run as root (Postfix, and unbound on port 53); needs postfix and unbound installed. Build
subrelay first: meson setup build-bench --buildtype=release && ninja -C build-bench.

One invocation alternates the two senders, run by run (subrelay 1, Postfix 1, subrelay 2 ...),
so drift in the load of a shared machine hits both alike. Every run starts from a fresh queue.

Common to both:
  * the same receiving MTA: a private Postfix (tests/integration/mta_peers.PostfixMx) on
    127.0.0.51, STARTTLS offered (TLS 1.3), queue files fsynced, mail discarded after queueing;
  * the same DNS: one private unbound (tests/integration/peers.Unbound) answering
    dN.bench.test MX 10 mx.bench.test, mx.bench.test A 127.0.0.51, listening on 127.0.0.1 and
    on 127.0.0.52:53. Both senders ask 127.0.0.52:53 for the MX and A records;
  * the same N messages: message i goes from app@bench.test to u<i>@d<i % domains>.bench.test,
    SIZE bytes (headers plus 76-character lines), one recipient each;
  * opportunistic STARTTLS, no certificate verification, connections reused for the next
    message to the same destination, at most --per-domain connections per destination;
  * only delivery is timed. Queueing the messages is not.

(a) subrelay, as bench/delivery.py does it: `subrelay serve` with delivery pointed at a dead
    resolver; the N messages are submitted over --fill-connections implicit-TLS connections
    (AUTH PLAIN); subrelay is stopped, `subrelay queue retry --all` makes everything due, and the
    clock runs from starting it again (delivery.resolvers = 127.0.0.52:53, delivery.port = the
    receiver's port, max_connections_per_domain = --per-domain) until every recipient is
    `delivered` in queue.db (polled every 50 ms: no recipient left queued/deferred, none failed).

(b) Postfix 3.x as the sending relay: a second private instance (own config_directory,
    queue_directory and data_directory, started with `postfix -c DIR start`, built like
    PostfixMx) with:
      smtp_tls_security_level = may             opportunistic STARTTLS, nothing verified
      smtp_tls_connection_reuse = yes           TLS connections are cached too (tlsproxy +
                                                scache); without it Postfix closes every TLS
                                                connection after one message. --postfix-tls-reuse
                                                no measures that default.
      smtp_connection_cache_on_demand = yes     (the default) cache when a destination has a
                                                backlog
      smtp_tls_session_cache_database = btree   TLS session resumption for new connections
      default_destination_concurrency_limit = --per-domain (initial_destination_concurrency 5:
                                                Postfix's slow start, as shipped)
      smtp_tcp_port = the receiver's port       (subrelay's delivery.port)
      inet_protocols = ipv4                     only A lookups (subrelay asks for AAAA too)
    DNS: Postfix has no resolver setting of its own (glibc's stub resolver reads
    /etc/resolv.conf, no port). The smtp service runs chrooted in the queue directory (the
    master.cf "chroot" column), whose etc/resolv.conf says `nameserver 127.0.0.52`: so it does
    the MX lookup of the recipient domain and the A lookup of the MX host against the same
    unbound, on port 53, without touching the machine's /etc/resolv.conf. Everything else runs
    unchrooted.
    Queueing: the instance's own smtpd on 127.0.0.61 (plain SMTP, --fill-connections parallel
    connections) with `check_recipient_access static:HOLD`, so every message waits in the hold
    queue. Then `postsuper -H ALL` moves them to the deferred queue (not timed, like `queue
    retry --all`), and the clock runs from `postqueue -f` until the queue directories
    (incoming, active, deferred, hold, maildrop) are empty (polled every 50 ms, stopping at the
    first file found, so a poll costs about what subrelay's indexed SQLite count does). The maillog
    must then show N `status=sent`.

Printed per run: msg/s, seconds, the sessions the receiver saw and messages per session, the
CPU seconds of the sending side and of the receiver, and the machine's CPU use over the window;
then the medians and the ratio subrelay/Postfix of the median msg/s.

CPU seconds: subrelay's is its process's utime+stime (it starts with the clock). Postfix's is
the sum over the instance's processes alive at the end (MAIL_CONFIG in their environment) of
their growth over the window: smtp processes that exited meanwhile (max_use = 100 deliveries
each) are missing, so it is a lower bound. The receiver's is counted the same way.

What still differs: Postfix writes its maillog through postlogd (several lines per message),
subrelay one stderr line per attempt; Postfix's sending side is many processes (qmgr, smtp,
tlsproxy, scache, tlsmgr) talking over unix sockets, subrelay one delivery thread; with TLS
reuse Postfix encrypts in tlsproxy, one more hop per message; Postfix ramps up from 5
connections (slow start) and opens a few more than the limit over a run as cached connections
expire; Postfix looks up A records only (inet_protocols = ipv4); Postfix enqueues without
AUTH/TLS (fill only, not timed), subrelay was filled over implicit TLS with AUTH. Both durable:
subrelay commits results to SQLite (WAL, synchronous=FULL), Postfix renames/unlinks queue files.
On a 2-core machine the receiving Postfix is on the same cores and takes most of the CPU: the
figures are of the whole loop, not of the sender alone.
"""

import argparse
import os
import re
import shutil
import smtplib
import sqlite3
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MX_IP = "127.0.0.51"
DNS_IP = "127.0.0.52"
RELAY_IP = "127.0.0.61"
POLL = 0.05
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# Measuring helpers
# --------------------------------------------------------------------------------------------

def machine_cpu():
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]  # idle + iowait
    return sum(parts) - idle, sum(parts)


def proc_cpu(pid):
    """utime+stime of pid (and of its waited-for children) in seconds, 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def cpu_of(pids):
    return {p: proc_cpu(p) for p in pids}


def cpu_delta(before, after):
    return sum(v - before.get(p, 0.0) for p, v in after.items())


DISCONNECT_RE = re.compile(r"smtpd\[\d+\]: disconnect from \S+ (.*)$")


def receiver_sessions(mx, offset):
    """Sessions the receiving Postfix finished since maillog byte `offset`:
    (sessions, messages, sessions with STARTTLS)."""
    with open(mx.maillog_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    sessions = msgs = tls = 0
    for line in text.splitlines():
        m = DISCONNECT_RE.search(line)
        if not m:
            continue
        d = dict(kv.split("=", 1) for kv in m.group(1).split() if "=" in kv)
        sessions += 1
        msgs += int(d.get("data", "0").split("/")[0])
        tls += "starttls" in d
    return sessions, msgs, tls


def maillog_size(mx):
    try:
        return os.path.getsize(mx.maillog_path)
    except OSError:
        return 0


# --------------------------------------------------------------------------------------------
# Filling a queue over SMTP with several connections at once
# --------------------------------------------------------------------------------------------

def fill(n_messages, connections, connect, send):
    """Sends message indexes 0..n-1 over `connections` threads; connect() returns a fresh
    smtplib connection, send(conn, i) sends message i. Raises the first error."""
    errors = []
    counter = [0]
    lock = threading.Lock()

    def worker():
        try:
            conn = connect()
            while True:
                with lock:
                    i = counter[0]
                    counter[0] += 1
                if i >= n_messages or errors:
                    break
                send(conn, i)
            conn.quit()
        except Exception as e:  # reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(max(1, connections))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------------------------
# The main program
# --------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(ROOT, "build-bench", "src", "app", "subrelay"))
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--per-domain", type=int, default=10,
                    help="subrelay delivery.max_connections_per_domain = Postfix "
                         "default_destination_concurrency_limit")
    ap.add_argument("--domains", type=int, default=1, help="recipient domains (all on the one MX)")
    ap.add_argument("--fill-connections", type=int, default=8, help="parallel connections while queueing")
    ap.add_argument("--postfix-tls-reuse", choices=("yes", "no"), default="yes",
                    help="Postfix smtp_tls_connection_reuse (default yes: comparable to subrelay)")
    ap.add_argument("--postfix-tls-level", choices=("may", "none"), default="may",
                    help="Postfix smtp_tls_security_level; none (plaintext) only to see what TLS costs it")
    ap.add_argument("--only", choices=("subrelay", "postfix"), help="run one side only")
    ap.add_argument("--timeout", type=float, default=900, help="give up on a run after this many seconds")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directories")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (private Postfix instances, unbound on port 53)")
    args.binary = os.path.abspath(args.binary)
    if not os.access(args.binary, os.X_OK):
        raise SystemExit(f"{args.binary}: not built (meson setup build-bench --buildtype=release "
                         "&& ninja -C build-bench)")
    os.environ["SUBRELAY_BIN"] = args.binary
    sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
    import harness  # noqa: E402
    import mta_peers  # noqa: E402
    from peers import Unbound  # noqa: E402

    if not mta_peers.port_is_free(DNS_IP, 53):
        raise SystemExit(f"{DNS_IP}:53 is taken: the Postfix side needs its resolver on port 53")

    # ---- Postfix as a sending relay --------------------------------------------------------
    class PostfixRelay(mta_peers.PostfixMx):
        """A private Postfix whose smtpd on RELAY_IP only queues (everything on hold) and whose
        smtp client delivers to the MX found in DNS, on mx_port."""

        prefix = "subrelay-pfrelay-"

        def __init__(self, address, mx_port, concurrency, tls_reuse, tls_level):
            super().__init__([address], tls=False, hostname="relay.pfbench.test")
            self.tls_level = tls_level
            self.mx_port = mx_port
            self.concurrency = concurrency
            self.tls_reuse = tls_reuse

        def main_cf_settings(self):
            # PostfixMx's settings (paths, names, loopback, no aliases or rewriting), less
            # its Maildir delivery and smtpd TLS (the relay's smtpd offers none), plus the
            # queueing smtpd and the outbound smtp client.
            cf = {k: v for k, v in super().main_cf_settings().items()
                  if not k.startswith(("virtual_", "smtpd_tls_"))}
            cf.update({
                "relay_domains": "",
                # queueing: accept from loopback and put every message on hold
                "smtpd_relay_restrictions": "permit_mynetworks, reject",
                "smtpd_recipient_restrictions": "check_recipient_access static:HOLD, permit_mynetworks, reject",
                # no deferred-queue scan of its own during a run; `postqueue -f` starts delivery
                "queue_run_delay": "3600s",
                "minimal_backoff_time": "3600s",
                "maximal_backoff_time": "3600s",
                # the outbound relay
                "default_transport": "smtp",
                "smtp_tcp_port": str(self.mx_port),
                "smtp_tls_security_level": self.tls_level,
                "smtp_tls_loglevel": "1",
                "smtp_tls_connection_reuse": self.tls_reuse,
                "smtp_tls_session_cache_database": f"btree:{self.data_dir}/smtp_scache",
                "smtp_connection_cache_on_demand": "yes",
                "default_destination_concurrency_limit": str(self.concurrency),
                "smtp_destination_concurrency_limit": str(self.concurrency),
                "smtp_dns_support_level": "enabled",
                "smtp_host_lookup": "dns",
            })
            return cf

        def master_cf(self):
            services = mta_peers._MASTER_CF_SERVICES
            # the smtp client chrooted into the queue directory: it reads etc/resolv.conf there
            services = re.sub(r"(?m)^smtp      unix  -       -       n ",
                              "smtp      unix  -       -       y ", services)
            if "smtp      unix  -       -       y " not in services:
                raise RuntimeError("master.cf template changed: cannot chroot smtp")
            services += "tlsproxy  unix  -       -       n       -       0       tlsproxy\n"
            ip, port = self.addresses[0]
            return f"{ip}:{port} inet n - n - - smtpd\n" + services

        def start(self, timeout=20):
            etc = os.path.join(self.queue_dir, "etc")
            os.makedirs(etc, exist_ok=True)
            with open(os.path.join(etc, "resolv.conf"), "w") as f:
                f.write(f"nameserver {DNS_IP}\noptions timeout:2 attempts:2\n")
            return super().start(timeout)

        def postcmd(self, *argv):
            return subprocess.run([argv[0], "-c", self.conf_dir, *argv[1:]], capture_output=True,
                                  text=True, timeout=600)

        def queue_count(self, names=("incoming", "active", "deferred", "hold", "maildrop")):
            n = 0
            for name in names:
                for _, _, files in os.walk(os.path.join(self.queue_dir, name)):
                    n += len(files)
            return n

        def queue_empty(self):
            """True when no queue file is left; stops at the first one found (a poll of a
            full queue must not cost a walk of 10,000 names)."""
            def empty(path):
                try:
                    with os.scandir(path) as it:
                        for e in it:
                            if not e.is_dir(follow_symlinks=False) or not empty(e.path):
                                return False
                except FileNotFoundError:
                    pass
                return True
            return all(empty(os.path.join(self.queue_dir, n))
                       for n in ("incoming", "active", "deferred", "hold", "maildrop"))

        def log_count(self, pattern):
            return len(re.findall(pattern, self.maillog()))

    # ---- the shared peers ------------------------------------------------------------------
    zones = [f"interface: {DNS_IP}@53"]
    for d in range(args.domains):
        zones += [f'local-zone: "d{d}.bench.test." static',
                  f'local-data: "d{d}.bench.test. 300 IN MX 10 mx.bench.test."']
    zones += ['local-zone: "mx.bench.test." static', f'local-data: "mx.bench.test. 300 IN A {MX_IP}"']
    dns = Unbound(zones)
    port = mta_peers.free_port(MX_IP, RELAY_IP)
    cert = mta_peers.make_cert(["mx.bench.test"])
    mx = mta_peers.PostfixMx([f"{MX_IP}:{port}"], cert=cert.cert, key=cert.key,
                             main_cf={"virtual_transport": "discard:", "default_process_limit": "200",
                                      "smtpd_client_connection_count_limit": "0",
                                      # No inflow throttling at the receiver: with it, smtpd
                                      # waits for a queue-manager token before each message
                                      # on a long-lived connection, and the receiver, not the
                                      # sender, sets the pace (~200 msg/s for either sender).
                                      "in_flow_delay": "0s"})
    mx.start()
    acct = harness.Account("bench", "bench-Passw0rd", ["@bench.test"], mode="deliver")

    def rcpt(i):
        return f"u{i}@d{i % args.domains}.bench.test"

    # The body fills the message up to --size bytes: lines of 76 characters and a shorter last.
    head = len(harness.make_message("app@bench.test", [rcpt(args.messages)], f"bench {args.messages}",
                                    body=""))
    room = max(80, args.size - head + 2)
    body = ("x" * 76 + "\r\n") * (room // 78) + ("x" * (room % 78 - 2) + "\r\n" if room % 78 > 2 else "")

    def message(i):
        return harness.make_message("app@bench.test", [rcpt(i)], f"bench {i}", body=body)

    print(f"{args.messages} messages of {len(message(0))} B, {args.domains} domain(s), "
          f"{args.per_domain} connections per destination, receiver Postfix on {MX_IP}:{port}, "
          f"DNS unbound on {DNS_IP}:53, Postfix smtp_tls_security_level={args.postfix_tls_level} "
          f"smtp_tls_connection_reuse={args.postfix_tls_reuse}",
          flush=True)

    def window_stats(cpu0, log0, sender_cpu, mx_cpu0):
        busy1, total1 = machine_cpu()
        busy0, total0 = cpu0
        sessions, msgs, tls = receiver_sessions(mx, log0)
        return {"machine": 100.0 * (busy1 - busy0) / max(1, total1 - total0),
                "sessions": sessions, "rx_msgs": msgs, "tls_sessions": tls,
                "sender_cpu": sender_cpu, "mx_cpu": cpu_delta(mx_cpu0, cpu_of(mx.pids()))}

    def report(side, run, elapsed, st):
        rate = args.messages / elapsed
        per = st["rx_msgs"] / st["sessions"] if st["sessions"] else float("nan")
        print(f"run {run} {side:8}: {rate:7.0f} msg/s  {elapsed:7.2f} s  receiver: {st['sessions']} "
              f"sessions ({st['tls_sessions']} with STARTTLS), {per:.0f} msg/session  "
              f"cpu s: sender {st['sender_cpu']:.1f}, receiver {st['mx_cpu']:.1f}  "
              f"machine busy {st['machine']:.0f}%", flush=True)
        return rate

    # ---- (a) subrelay ----------------------------------------------------------------------
    def run_subrelay(run):
        srv = harness.Server(accounts=[acct], listeners=("implicit",),
                             limits={"max_connections_per_ip": 500, "max_sessions_per_account": 0},
                             extra_config={"delivery": {"resolvers": ["127.0.0.1:9"], "port": port}})
        srv.start()
        try:
            def connect():
                conn = harness.smtp_ssl(srv.port("implicit"), timeout=120)
                conn.login(acct.username, acct.password)
                return conn
            fill(args.messages, args.fill_connections, connect,
                 lambda conn, i: harness.submit(conn, "app@bench.test", [rcpt(i)], message(i)))
            srv.stop()
            # The fill phase had no DNS: what it tried is deferred; make everything due now.
            subprocess.run([args.binary, "queue", "retry", "--all", "--data-dir", srv.data_dir],
                           check=True, capture_output=True)
            srv.extra_config = {"delivery": {"resolvers": [f"{DNS_IP}:53"], "port": port,
                                             "allow_private_destinations": True,
                                             "max_connections_per_domain": args.per_domain}}
            db = os.path.join(srv.data_dir, "queue.db")
            log0, cpu0, mx_cpu0 = maillog_size(mx), machine_cpu(), cpu_of(mx.pids())
            t0 = time.monotonic()
            srv.start()
            # Polled through the (state, next_attempt) index: what is left, not what is done,
            # so a poll costs little however far the run is (about as little as Postfix's).
            while True:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as c:
                    left, failed = c.execute(
                        "SELECT (SELECT count(*) FROM recipients WHERE state IN ('queued', 'deferred')), "
                        "(SELECT count(*) FROM recipients WHERE state = 'failed')").fetchone()
                if failed:
                    raise SystemExit(f"{failed} recipients failed; see {srv.log_path}")
                if left == 0:
                    break
                if time.monotonic() - t0 > args.timeout:
                    raise SystemExit(f"subrelay: {left} not delivered after {args.timeout:.0f} s; "
                                     f"see {srv.log_path}")
                time.sleep(POLL)
            elapsed = time.monotonic() - t0
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as c:
                done = c.execute("SELECT count(*) FROM recipients WHERE state = 'delivered'").fetchone()[0]
            if done != args.messages:
                raise SystemExit(f"subrelay: {done} delivered, wanted {args.messages}; see {srv.log_path}")
            sender_cpu = proc_cpu(srv.proc.pid)
            time.sleep(0.5)
            srv.stop()  # QUITs the idle connections: the receiver logs their disconnects
            time.sleep(0.3)
            return report("subrelay", run, elapsed, window_stats(cpu0, log0, sender_cpu, mx_cpu0))
        finally:
            srv.kill()
            if not args.keep:
                shutil.rmtree(srv.workdir, ignore_errors=True)

    # ---- (b) Postfix -----------------------------------------------------------------------
    def run_postfix(run):
        relay = PostfixRelay(f"{RELAY_IP}:{port}", port, args.per_domain, args.postfix_tls_reuse,
                             args.postfix_tls_level)
        relay.start()
        try:
            def connect():
                return smtplib.SMTP(RELAY_IP, port, local_hostname="fill.pfbench.test", timeout=120)

            def send(conn, i):
                refused = conn.sendmail("app@bench.test", [rcpt(i)], message(i))
                if refused:
                    raise RuntimeError(f"Postfix refused {refused}")
            fill(args.messages, args.fill_connections, connect, send)
            deadline = time.monotonic() + 300
            while relay.queue_count(("hold",)) < args.messages or \
                    relay.queue_count(("incoming", "active", "maildrop")):
                if time.monotonic() > deadline:
                    raise SystemExit(f"Postfix: {relay.queue_count(('hold',))} on hold after 300 s; "
                                     f"see {relay.maillog_path}")
                time.sleep(0.1)
            out = relay.postcmd("postsuper", "-H", "ALL")
            if out.returncode != 0 or relay.queue_count(("deferred",)) != args.messages:
                raise SystemExit(f"postsuper -H ALL: exit {out.returncode}, "
                                 f"{relay.queue_count(('deferred',))} deferred\n{out.stderr}")
            if relay.log_count(r"status=sent"):
                raise SystemExit("Postfix delivered before the release: the hold did not hold")
            log0, cpu0, mx_cpu0 = maillog_size(mx), machine_cpu(), cpu_of(mx.pids())
            relay_cpu0 = cpu_of(relay.pids())
            t0 = time.monotonic()
            out = relay.postcmd("postqueue", "-f")
            if out.returncode != 0:
                raise SystemExit(f"postqueue -f: exit {out.returncode}\n{out.stderr}")
            while not relay.queue_empty():
                if time.monotonic() - t0 > args.timeout:
                    raise SystemExit(f"Postfix: {relay.queue_count()} still queued after "
                                     f"{args.timeout:.0f} s; see {relay.maillog_path}")
                time.sleep(POLL)
            elapsed = time.monotonic() - t0
            sender_cpu = cpu_delta(relay_cpu0, cpu_of(relay.pids()))
            time.sleep(0.5)
            relay.stop()  # closes the cached connections: the receiver logs their disconnects
            time.sleep(0.3)
            st = window_stats(cpu0, log0, sender_cpu, mx_cpu0)
            sent = relay.log_count(r"status=sent")
            bad = relay.log_count(r"status=(deferred|bounced)")
            if sent != args.messages or bad:
                raise SystemExit(f"Postfix: {sent} status=sent, {bad} deferred/bounced; "
                                 f"see {relay.maillog_path}")
            return report("postfix", run, elapsed, st)
        finally:
            relay.stop()
            if not args.keep:
                shutil.rmtree(relay.dir, ignore_errors=True)

    rates = {"subrelay": [], "postfix": []}
    try:
        for run in range(1, args.runs + 1):
            if args.only != "postfix":
                rates["subrelay"].append(run_subrelay(run))
            if args.only != "subrelay":
                rates["postfix"].append(run_postfix(run))
    finally:
        mx.stop()
        dns.close()
        if not args.keep:
            # this run's directories only: the receiver's, the certificates', any run's left over
            for d in [mx.dir, *harness._tmpdirs]:
                shutil.rmtree(d, ignore_errors=True)
        else:
            print(f"kept: receiver {mx.dir}", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in rates.items() if v}
    print()
    for side, m in med.items():
        print(f"median {side:8}: {m:7.0f} msg/s  (runs: {', '.join(f'{r:.0f}' for r in rates[side])})")
    if len(med) == 2:
        print(f"ratio subrelay/postfix: {med['subrelay'] / med['postfix']:.2f}x  (goal >= 3x)")


if __name__ == "__main__":
    main()
