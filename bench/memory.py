#!/usr/bin/python3
"""Server memory: RSS of idle authenticated TLS sessions, and peak RSS under hostile clients.

    bench/memory.py [--binary build/src/app/subrelay] [--sessions 1000,5000]
                    [--cases all|ehlo-flood,noop-flood,...] [--json-only] [--keep]

A benchmark, not a test: it prints figures and never fails on what it measures. Every case
runs against its own fresh `subrelay serve` (generated config: one capture-mode account, a
self-signed ECDSA P-256 certificate from `openssl`, a STARTTLS and an implicit-TLS listener on
free 127.0.0.1 ports, connection limits raised, RLIMIT_NOFILE raised to 65536 for the script
and the server). The server's RSS is read from /proc/PID/status (VmRSS) every 20 ms by a thread.

Idle sessions (--sessions): N connections to the implicit-TLS port, each TLS + EHLO +
AUTH PLAIN (235), then idle. Reports RSS with the N sessions open, the delta over the
baseline (server started, one warm-up login done and closed) and delta/N in KiB.

Hostile cases (--cases), one line each: baseline RSS just before the flood starts, peak RSS
during the case (until the client closes its sockets), RSS 2 s after the client closed, and
VmHWM (peak reset through /proc/PID/clear_refs at the baseline) as a cross-check:
  ehlo-flood         plain TCP to the STARTTLS port, 8 MiB of "EHLO a\\r\\n", never reads
  noop-flood         the same with "NOOP\\r\\n"
  rcpt-flood         implicit TLS, AUTH, MAIL FROM, 8 MiB of "RCPT TO:<x@example.com>\\r\\n"
  header-flood-12MB  AUTH, DATA with 12 MB of "a:b\\r\\n" header fields; meanwhile 4 other
                     authenticated connections send NOOP every 10 ms (max/p99 round trip of
                     the worst one = event-loop stall; SO_REUSEPORT spreads connections over
                     the loops, hence several)
  header-flood-20MiB the same with 20 MiB (limits.max_message_bytes raised to 64 MiB)
  long-usernames     200 AUTH PLAIN attempts with 9,000-byte usernames, 2 per connection,
                     100 connections from 127.0.1.1-100 (so no address reaches the delays)
  slow-readers       200 connections each pipelining 200 KiB of NOOPs, never reading
A flood sends for at most 20 s, stops when a send makes no progress for 3 s (the server
stopped reading) or fails (the server closed); then the client keeps the connection open
without reading until the RSS stops growing (1.5 s without growth, 2-15 s), reads what the
server sent (bounded) to report the reply codes and whether it closed, and closes.
Every wait is bounded; the server is stopped (SIGTERM, then SIGKILL) after each case.

Standard library only; run with Debian's /usr/bin/python3, as root (RLIMIT_NOFILE). Client
sockets come from 127.0.0.2-127.0.0.50 (and 127.0.1.x for long-usernames): loopback only.
The client shares the 2 cores with the server: latencies include its own jitter.
"""

import argparse
import atexit
import base64
import collections
import concurrent.futures
import json
import os
import random
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOP = "127.0.0.1"
USER, PASSWORD = "webshop", "correct horse battery staple"
SOURCES = [f"127.0.0.{i}" for i in range(2, 51)]
ALL_CASES = ["ehlo-flood", "noop-flood", "rcpt-flood", "header-flood-12MB", "header-flood-20MiB",
             "long-usernames", "slow-readers"]
MIB = 1024 * 1024

FLOOD_BYTES = 8 * MIB
FLOOD_BOUND_S = 20.0
STALL_S = 3.0
RCVBUF = 65536  # --rcvbuf
NOFILE = 65536


def log(msg):
    sys.stderr.write(f"[memory.py {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def free_port():
    with socket.socket() as s:
        s.bind((LOOP, 0))
        return s.getsockname()[1]


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def mib(kib):
    return None if kib is None else round(kib / 1024, 1)


# ---------------------------------------------------------------------------------------------
# /proc sampling
# ---------------------------------------------------------------------------------------------

def proc_status(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


class Sampler(threading.Thread):
    """VmRSS of PID every `interval` seconds, as (monotonic time, KiB)."""

    def __init__(self, pid, interval=0.02):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples = []
        self.stop_ev = threading.Event()
        self.lock = threading.Lock()

    def run(self):
        while not self.stop_ev.is_set():
            v = proc_status(self.pid, "VmRSS")
            if v is None:
                break
            with self.lock:
                self.samples.append((time.monotonic(), v))
            self.stop_ev.wait(self.interval)

    def now(self):
        v = proc_status(self.pid, "VmRSS")
        if v is not None:
            with self.lock:
                self.samples.append((time.monotonic(), v))
        return v

    def peak(self, t0, t1=None):
        t1 = t1 if t1 is not None else time.monotonic()
        with self.lock:
            vals = [v for t, v in self.samples if t0 <= t <= t1]
        return max(vals) if vals else None

    def stop(self):
        self.stop_ev.set()
        self.join(2)


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------

_live = []


def _kill_live():
    for p in list(_live):
        if p.poll() is None:
            try:
                p.kill()
                p.wait(10)
            except Exception:
                pass


atexit.register(_kill_live)


def _on_signal(signum, _frame):
    _kill_live()
    sys.exit(128 + signum)


class Server:
    def __init__(self, binary, workdir, name, pki, hashed, limits=None):
        self.binary, self.name = binary, name
        self.dir = os.path.join(workdir, name)
        os.makedirs(self.dir, exist_ok=True)
        self.starttls_port, self.implicit_port = free_port(), free_port()
        lim = {"max_connections": 20000, "max_connections_per_ip": 20000,
               "max_sessions_per_account": 0, "command_timeout": "30m", "data_timeout": "30m",
               "shutdown_grace": "1s"}
        lim.update(limits or {})
        self.config = {
            "hostname": "mem.bench.test",
            "data_dir": os.path.join(self.dir, "data"),
            "tls": {"certificate": pki[0], "private_key": pki[1]},
            "listeners": [{"address": f"{LOOP}:{self.starttls_port}", "tls": "starttls"},
                          {"address": f"{LOOP}:{self.implicit_port}", "tls": "implicit"}],
            "limits": lim,
            "accounts": [{"username": USER, "password_hash": hashed, "senders": ["@shop.test"],
                          "mode": "capture"}],
            # Nothing may leave the machine: resolver and SMTP port are closed loopback ports.
            "delivery": {"resolvers": [f"{LOOP}:9"], "port": 9},
            "log_level": "warning",
        }
        self.log_path = os.path.join(self.dir, "serve.log")
        self.proc = None

    def start(self):
        cfg = os.path.join(self.dir, "config.json")
        with open(cfg, "w") as f:
            json.dump(self.config, f, indent=1)
        with open(self.log_path, "wb") as lf:
            self.proc = subprocess.Popen([self.binary, "serve", "-c", cfg], stdin=subprocess.DEVNULL,
                                         stdout=lf, stderr=subprocess.STDOUT, cwd=self.dir)
        _live.append(self.proc)
        deadline = time.monotonic() + 20
        for port in (self.starttls_port, self.implicit_port):
            while True:
                try:
                    socket.create_connection((LOOP, port), timeout=1).close()
                    break
                except OSError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"subrelay serve did not start: {self.log_tail()}")
                    time.sleep(0.05)
        return self

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def status(self):
        rc = self.proc.poll()
        if rc is None:
            return "running"
        return f"EXITED rc={rc}" + (f" ({signal.Signals(-rc).name})" if rc < 0 else "")

    def log_tail(self, n=800):
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: no exit 10 s after SIGTERM, SIGKILL")
                self.proc.kill()
                self.proc.wait(10)
        if self.proc in _live:
            _live.remove(self.proc)


# ---------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------

def client_ctx():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


CTX = client_ctx()


def auth_plain(user, pw):
    return b"AUTH PLAIN " + base64.b64encode(b"\0" + user + b"\0" + pw) + b"\r\n"


def connect(port, source, timeout, rcvbuf=0):
    """TCP connection to 127.0.0.1:port from source; rcvbuf > 0 sets SO_RCVBUF before connect
    (a client that never reads then holds only that much of the server's replies)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.bind((source, 0))
        s.settimeout(timeout)
        s.connect((LOOP, port))
    except Exception:
        s.close()
        raise
    return s


class Conn:
    def __init__(self, port, tls, source=LOOP, timeout=30, rcvbuf=0):
        raw = connect(port, source, timeout, rcvbuf)
        try:
            self.s = CTX.wrap_socket(raw, server_hostname="localhost") if tls else raw
        except Exception:
            raw.close()
            raise
        self.buf = b""

    def reply(self, timeout=30):
        deadline = time.monotonic() + timeout
        lines = []
        while True:
            while b"\n" not in self.buf:
                rem = deadline - time.monotonic()
                if rem <= 0:
                    raise socket.timeout("no reply within %.0f s" % timeout)
                self.s.settimeout(rem)
                chunk = self.s.recv(65536)
                if not chunk:
                    raise ConnectionError("closed by server")
                self.buf += chunk
            line, _, self.buf = self.buf.partition(b"\n")
            line = line.rstrip(b"\r")
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return (int(line[:3]) if line[:3].isdigit() else 0), lines

    def cmd(self, data, timeout=30):
        self.s.settimeout(timeout)
        self.s.sendall(data)
        return self.reply(timeout)

    def login(self, timeout=30):
        code, lines = self.reply(timeout)
        if code != 220:
            raise RuntimeError(f"greeting: {lines[-1][:80]!r}")
        code, lines = self.cmd(b"EHLO bench.test\r\n", timeout)
        if code != 250:
            raise RuntimeError(f"EHLO: {lines[-1][:80]!r}")
        code, lines = self.cmd(auth_plain(USER.encode(), PASSWORD.encode()), timeout)
        if code != 235:
            raise RuntimeError(f"AUTH: {lines[-1][:80]!r}")
        return self

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


def plain_conn(port, source, timeout=10, rcvbuf=0):
    return connect(port, source, timeout, rcvbuf)


def err_name(e):
    if isinstance(e, ssl.SSLError):
        return f"ssl:{e.reason or e.__class__.__name__}"
    return e.__class__.__name__


def send_bounded(sock, data, bound_s=FLOOD_BOUND_S, stall_s=STALL_S, chunk=65536):
    """Sends data without reading. Ends: complete, stalled (no progress for stall_s: the server
    stopped reading), closed:<error> (the server closed/reset), time-bound."""
    mv = memoryview(data)
    sent, t0 = 0, time.monotonic()
    end = "complete"
    sock.settimeout(stall_s)
    while sent < len(mv):
        if time.monotonic() - t0 > bound_s:
            end = "time-bound"
            break
        try:
            n = sock.send(mv[sent:sent + chunk])
        except (socket.timeout, ssl.SSLWantWriteError):
            end = "stalled"
            break
        except (OSError, ssl.SSLError) as e:
            end = "closed:" + err_name(e)
            break
        if n == 0:
            end = "closed:send0"
            break
        sent += n
    return {"sent_bytes": sent, "send_s": round(time.monotonic() - t0, 2), "send_end": end}


class Tally:
    """Reply codes of final reply lines, from bytes read off a connection."""

    def __init__(self):
        self.codes = collections.Counter()
        self.last = ""       # last final reply line other than 250
        self.last_line = ""  # last final reply line
        self.rest = b""
        self.bytes = 0

    def feed(self, data):
        self.bytes += len(data)
        data = self.rest + data
        lines = data.split(b"\n")
        self.rest = lines.pop()
        for line in lines:
            if len(line) >= 4 and line[3:4] == b"-":
                continue
            code = line[:3].decode(errors="replace")
            self.codes[code] += 1
            self.last_line = line.rstrip(b"\r")[:100].decode(errors="replace")
            if code != "250":
                self.last = self.last_line
        if len(self.rest) > 100000:
            self.rest = b""

    def next_connection(self):
        self.rest = b""

    def summary(self):
        return ",".join(f"{c}x{n}" for c, n in self.codes.most_common(4)) or "none"


def drain(sock, tally, max_bytes=32 * MIB, max_s=3.0, deadline=None):
    """Reads what the server sent (bounded), returns eof | reset:<err> | open."""
    end = time.monotonic() + max_s
    if deadline is not None:
        end = min(end, deadline)
    got = 0
    while got < max_bytes:
        rem = end - time.monotonic()
        if rem <= 0:
            return "open"
        try:
            sock.settimeout(min(rem, 0.5))
            data = sock.recv(1024 * 1024)
        except (socket.timeout, ssl.SSLWantReadError):
            return "open"
        except (OSError, ssl.SSLError) as e:
            return "reset:" + err_name(e)
        if not data:
            return "eof"
        got += len(data)
        tally.feed(data)
    return "open(read cap)"


# ---------------------------------------------------------------------------------------------
# Case framework
# ---------------------------------------------------------------------------------------------

class Case:
    def __init__(self, srv, sampler):
        self.srv, self.sampler = srv, sampler
        self.t_base = self.t_closed = None
        self.res = {}

    def mark_baseline(self):
        try:
            with open(f"/proc/{self.srv.pid}/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM
        except OSError:
            pass
        time.sleep(0.05)
        self.t_base = time.monotonic()
        self.res["baseline_kib"] = self.sampler.now()

    def hold(self, min_s=2.0, quiet_s=1.5, max_s=15.0, growth_kib=256):
        """Keeps everything as it is until the RSS stops growing."""
        t0 = time.monotonic()
        top = self.sampler.peak(self.t_base) or 0
        last_change = t0
        while True:
            time.sleep(0.1)
            now = time.monotonic()
            m = self.sampler.peak(self.t_base) or 0
            if m > top + growth_kib:
                top, last_change = m, now
            if not self.srv.alive():
                break
            if now - t0 >= min_s and now - last_change >= quiet_s:
                break
            if now - t0 >= max_s:
                break
        self.res["hold_s"] = round(time.monotonic() - t0, 1)

    def mark_closed(self):
        self.t_closed = time.monotonic()
        self.sampler.now()
        self.res["peak_kib"] = self.sampler.peak(self.t_base, self.t_closed)
        self.res["hwm_kib"] = proc_status(self.srv.pid, "VmHWM")

    def finish(self):
        if self.t_closed is None:
            self.mark_closed()
        time.sleep(max(0.0, self.t_closed + 2.0 - time.monotonic()))
        self.res["after_kib"] = self.sampler.now()
        self.res["server"] = self.srv.status()
        return self.res


def warm_up(srv):
    """One login (fills the credential cache, pays the one scrypt), then quiet."""
    c = Conn(srv.implicit_port, True, SOURCES[0]).login()
    try:
        c.cmd(b"QUIT\r\n", 5)
    except (OSError, ConnectionError):
        pass
    c.close()
    time.sleep(1.0)


def flood_case(case, port, tls, pattern, auth=False, pre=()):
    res = case.res
    if tls:
        c = Conn(port, True, SOURCES[1], rcvbuf=RCVBUF)
        if auth:
            c.login()
        for line in pre:
            code, lines = c.cmd(line)
            res.setdefault("pre_replies", []).append(lines[-1][:60].decode(errors="replace"))
        sock = c.s
        tally = Tally()
        tally.feed(c.buf)
    else:
        sock = plain_conn(port, SOURCES[1], rcvbuf=RCVBUF)
        tally = Tally()
    data = pattern * (FLOOD_BYTES // len(pattern))
    case.mark_baseline()
    res.update(send_bounded(sock, data))
    case.hold()
    res["conn_end"] = drain(sock, tally)
    res["replies"] = tally.summary()
    res["last_non250"] = tally.last
    res["last_reply"] = tally.last_line
    res["reply_bytes_read"] = tally.bytes
    try:
        sock.close()
    except OSError:
        pass
    case.mark_closed()


def case_ehlo(case):
    flood_case(case, case.srv.starttls_port, False, b"EHLO a\r\n")


def case_noop(case):
    flood_case(case, case.srv.starttls_port, False, b"NOOP\r\n")


def case_rcpt(case):
    flood_case(case, case.srv.implicit_port, True, b"RCPT TO:<x@example.com>\r\n", auth=True,
               pre=[b"MAIL FROM:<a@shop.test>\r\n"])


class Pinger(threading.Thread):
    """An authenticated connection that sends NOOP every 10 ms and records the round trips.
    A server that closes chatty sessions (421 after N commands without a transaction) is
    answered by logging in again; the NOOP that got the 421 and the re-login are not counted."""

    def __init__(self, port, source):
        super().__init__(daemon=True)
        self.port, self.source = port, source
        self.c = Conn(port, True, source).login()
        self.rtts, self.starts, self.errors = [], [], collections.Counter()
        self.stop_ev = threading.Event()

    def run(self):
        nxt = time.monotonic()
        while not self.stop_ev.is_set():
            t = time.monotonic()
            try:
                code, lines = self.c.cmd(b"NOOP\r\n", 60)
                ok = code == 250
                if not ok:
                    self.errors[f"NOOP {code}"] += 1
            except (OSError, ConnectionError, ssl.SSLError) as e:
                ok = False
                self.errors[err_name(e)] += 1
            if ok:
                self.rtts.append(time.monotonic() - t)
                self.starts.append(t)
            else:
                self.c.close()
                try:
                    self.c = Conn(self.port, True, self.source).login()
                except Exception as e:
                    self.errors["re-login " + err_name(e)] += 1
                    break
            nxt += 0.010
            time.sleep(max(0.0, nxt - time.monotonic()))
            nxt = max(nxt, time.monotonic() - 0.010)


def header_flood(case, total):
    res = case.res
    srv = case.srv
    c = Conn(srv.implicit_port, True, SOURCES[1], rcvbuf=RCVBUF).login()
    for line, want in ((b"MAIL FROM:<a@shop.test>\r\n", 250), (b"RCPT TO:<x@example.com>\r\n", 250),
                       (b"DATA\r\n", 354)):
        code, lines = c.cmd(line)
        if code != want:
            res["setup_error"] = lines[-1][:80].decode(errors="replace")
            c.close()
            case.mark_baseline()
            case.mark_closed()
            return
    head = b"From: a@shop.test\r\nTo: x@example.com\r\nSubject: header flood\r\n"
    body = b"\r\n" + b"short body\r\n" + b".\r\n"
    nfields = (total - len(head)) // 5
    data = head + b"a:b\r\n" * nfields + body
    res["header_fields"] = nfields
    pingers = [Pinger(srv.implicit_port, f"127.0.0.{60 + i}") for i in range(4)]
    case.mark_baseline()
    for p in pingers:
        p.start()
    time.sleep(0.3)
    res.update(send_bounded(c.s, data, bound_s=30.0))
    t_sent = time.monotonic()
    tally = Tally()
    if res["send_end"] == "complete":
        try:
            code, lines = c.reply(120)
            res["final_reply"] = lines[-1][:100].decode(errors="replace")
        except socket.timeout:
            res["final_reply"] = "none within 120 s"
        except (OSError, ConnectionError, ssl.SSLError) as e:
            res["final_reply"] = "connection " + err_name(e)
    else:
        # The server stopped reading or closed: what did it say?
        tally.feed(c.buf)
        res["conn_end"] = drain(c.s, tally, max_s=3.0)
        res["final_reply"] = tally.last or tally.summary()
    res["reply_after_s"] = round(time.monotonic() - t_sent, 2)
    time.sleep(0.5)
    for p in pingers:
        p.stop_ev.set()
    for p in pingers:
        p.join(65)
    worst = max(pingers, key=lambda p: max(p.rtts) if p.rtts else 0)
    res["noop_max_ms"] = round(max(worst.rtts) * 1000, 1) if worst.rtts else None
    res["noop_p99_ms"] = round(pct(worst.rtts, 99) * 1000, 1) if worst.rtts else None
    res["noop_per_conn_max_ms"] = [round(max(p.rtts) * 1000, 1) if p.rtts else None for p in pingers]
    if worst.rtts:
        i = worst.rtts.index(max(worst.rtts))
        res["noop_max_started_s_after_send"] = round(worst.starts[i] - t_sent, 2)
    res["noop_count"] = sum(len(p.rtts) for p in pingers)
    errs = sum((p.errors for p in pingers), collections.Counter())
    if errs:
        res["noop_errors"] = dict(errs)
    case.hold(min_s=0.5, quiet_s=1.0, max_s=5.0)
    for p in pingers:
        p.c.close()
    c.close()
    case.mark_closed()


def case_header12(case):
    header_flood(case, 12_000_000)


def case_header20(case):
    header_flood(case, 20 * MIB)


def case_long_usernames(case, ulen=9000):
    res = case.res
    srv = case.srv
    codes = collections.Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + 120
    attempts = {"n": 0}
    sample_line = {}

    def one_conn(i):
        left = 2
        tries = 0
        while left > 0 and time.monotonic() < deadline and tries < 4:
            tries += 1
            try:
                c = Conn(srv.implicit_port, True, f"127.0.1.{i + 1}")
            except (OSError, ssl.SSLError) as e:
                with lock:
                    codes["connect:" + err_name(e)] += 1
                continue
            try:
                code, lines = c.reply(30)
                if code != 220:
                    with lock:
                        codes[f"greeting-{code}"] += 1
                    continue
                c.cmd(b"EHLO bench.test\r\n")
                while left > 0 and time.monotonic() < deadline:
                    user = (f"u{i}-{left}-" + "x" * ulen)[:max(ulen, 8)].encode()
                    line = auth_plain(user, b"wrong-password")
                    left -= 1
                    with lock:
                        attempts["n"] += 1
                    code, lines = c.cmd(line, 60)
                    with lock:
                        codes[str(code)] += 1
                        sample_line.setdefault(code, lines[-1][:80].decode(errors="replace"))
            except (OSError, ConnectionError, ssl.SSLError) as e:
                with lock:
                    codes["closed:" + err_name(e)] += 1
            finally:
                c.close()

    res["auth_line_bytes"] = len(auth_plain(b"x" * max(ulen, 8), b"wrong-password"))
    case.mark_baseline()
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(50) as ex:
        list(ex.map(one_conn, range(100)))
    res["attempts"] = attempts["n"]
    res["run_s"] = round(time.monotonic() - t0, 1)
    res["replies"] = ",".join(f"{k}x{v}" for k, v in codes.most_common())
    res["reply_text"] = sample_line
    case.mark_closed()


def case_slow_readers(case):
    res = case.res
    srv = case.srv
    per = (200 * 1024 // 6) * 6
    data = b"NOOP\r\n" * (per // 6)
    socks = []
    connect_err = collections.Counter()
    for i in range(200):
        try:
            socks.append(plain_conn(srv.starttls_port, SOURCES[i % len(SOURCES)], rcvbuf=RCVBUF))
        except OSError as e:
            connect_err[err_name(e)] += 1
    res["connections"] = len(socks)
    if connect_err:
        res["connect_errors"] = dict(connect_err)
    case.mark_baseline()
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(50) as ex:
        outs = list(ex.map(lambda s: send_bounded(s, data), socks))
    ends = collections.Counter(o["send_end"] for o in outs)
    res["sent_bytes"] = sum(o["sent_bytes"] for o in outs)
    res["send_s"] = round(time.monotonic() - t0, 2)
    res["send_end"] = ",".join(f"{k}x{v}" for k, v in ends.most_common())
    case.hold()
    tally = Tally()
    conn_ends = collections.Counter()
    dl = time.monotonic() + 15
    for s in socks:
        tally.next_connection()
        conn_ends[drain(s, tally, max_bytes=128 * 1024, max_s=0.2, deadline=dl).split("(")[0]] += 1
    res["conn_end"] = ",".join(f"{k}x{v}" for k, v in conn_ends.most_common())
    res["replies"] = tally.summary()
    res["last_non250"] = tally.last
    for s in socks:
        try:
            s.close()
        except OSError:
            pass
    case.mark_closed()


CASES = {
    "ehlo-flood": (case_ehlo, {}),
    "noop-flood": (case_noop, {}),
    "rcpt-flood": (case_rcpt, {}),
    "header-flood-12MB": (case_header12, {}),
    "header-flood-20MiB": (case_header20, {"max_message_bytes": 64 * MIB}),
    "long-usernames": (case_long_usernames, {}),
    "slow-readers": (case_slow_readers, {}),
    # Not in "all": long-usernames with 8-byte usernames, to tell the usernames' share of its
    # peak from what 200 failed AUTHs cost anyway (one scrypt each, 32 MiB while it runs).
    "short-usernames": (lambda case: case_long_usernames(case, 8), {}),
}


def run_case(args, name, workdir, pki, hashed):
    fn, limits = CASES[name]
    srv = Server(args.binary, workdir, name, pki, hashed, limits).start()
    sampler = Sampler(srv.pid)
    sampler.start()
    case = Case(srv, sampler)
    try:
        warm_up(srv)
        fn(case)
        res = case.finish()
    except Exception as e:  # report, never crash the whole run
        res = case.res
        res["error"] = f"{err_name(e)}: {e}"[:200]
        res.setdefault("baseline_kib", None)
        if case.t_base is not None and "peak_kib" not in res:
            res["peak_kib"] = sampler.peak(case.t_base)
        res["after_kib"] = sampler.now()
        res["server"] = srv.status()
    finally:
        sampler.stop()
        if not srv.alive():
            res["server_log_tail"] = srv.log_tail(400)
        srv.stop()
    return res


def run_idle(args, n, workdir, pki, hashed):
    srv = Server(args.binary, workdir, f"idle-{n}", pki, hashed).start()
    sampler = Sampler(srv.pid, 0.2)
    sampler.start()
    res = {"sessions": n}
    conns = []
    try:
        warm_up(srv)
        res["baseline_kib"] = sampler.now()
        errors = collections.Counter()
        lock = threading.Lock()
        deadline = time.monotonic() + 300

        def one(i):
            if time.monotonic() > deadline:
                with lock:
                    errors["skipped: 300 s bound"] += 1
                return None
            try:
                return Conn(srv.implicit_port, True, SOURCES[i % len(SOURCES)]).login()
            except Exception as e:
                with lock:
                    errors[f"{err_name(e)}: {str(e)[:60]}"] += 1
                return None

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(24) as ex:
            conns = [c for c in ex.map(one, range(n)) if c is not None]
        res["setup_s"] = round(time.monotonic() - t0, 1)
        res["established"] = len(conns)
        if errors:
            res["errors"] = dict(errors.most_common(5))
        time.sleep(3.0)
        vals = []
        for _ in range(5):
            vals.append(sampler.now())
            time.sleep(0.2)
        vals = [v for v in vals if v is not None]
        res["rss_kib"] = sorted(vals)[len(vals) // 2] if vals else None
        if res["rss_kib"] is not None and res["baseline_kib"] is not None and conns:
            res["delta_kib"] = res["rss_kib"] - res["baseline_kib"]
            res["kib_per_session"] = round(res["delta_kib"] / len(conns), 1)
        # Are they still alive? NOOP on a few.
        ok = 0
        for c in random.sample(conns, min(20, len(conns))):
            try:
                ok += c.cmd(b"NOOP\r\n", 10)[0] == 250
            except Exception:
                pass
        res["noop_check"] = f"{ok}/{min(20, len(conns))}"
        res["server"] = srv.status()
    except Exception as e:
        res["error"] = f"{err_name(e)}: {e}"[:200]
        res["server"] = srv.status()
    finally:
        for c in conns:
            c.close()
        sampler.stop()
        if not srv.alive():
            res["server_log_tail"] = srv.log_tail(400)
        srv.stop()
    return res


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def fmt(v, width, digits=1):
    if v is None:
        return f"{'-':>{width}}"
    if isinstance(v, float):
        return f"{v:>{width}.{digits}f}"
    return f"{v!s:>{width}}"


def case_note(name, r):
    if "error" in r:
        return "ERROR " + r["error"]
    parts = []
    if "sent_bytes" in r:
        parts.append(f"sent {r['sent_bytes'] / MIB:.1f} MiB in {r['send_s']} s ({r['send_end']})")
    if name.startswith("header-flood"):
        parts.append(f"reply {r.get('final_reply', '-')!r} after {r.get('reply_after_s', '-')} s")
        parts.append(f"NOOP max {r.get('noop_max_ms')} ms p99 {r.get('noop_p99_ms')} ms")
        if r.get("conn_end"):
            parts.append(f"conn {r['conn_end']}")
        if r.get("noop_errors"):
            parts.append(f"pinger re-logins after {r['noop_errors']}")
    elif name in ("long-usernames", "short-usernames"):
        parts.append(f"{r.get('attempts')} attempts in {r.get('run_s')} s, replies {r.get('replies')}")
    else:
        parts.append(f"conn {r.get('conn_end')}, replies {r.get('replies')}"
                     + (f" last {r['last_non250']!r}" if r.get("last_non250", "")[:3] not in ("", "220") else ""))
    if r.get("server") != "running":
        parts.append(f"SERVER {r.get('server')}")
    return "; ".join(parts)


def print_tables(out):
    print(f"binary: {out['binary']} ({out['version']})")
    if out["idle"]:
        print("\nIdle authenticated TLS sessions (implicit TLS, AUTH PLAIN done)")
        print(f"{'sessions':>8} {'open':>6} {'setup s':>8} {'base MiB':>9} {'RSS MiB':>8} "
              f"{'delta MiB':>10} {'KiB/session':>12}  notes")
        for r in out["idle"]:
            note = r.get("error") or (f"NOOP check {r.get('noop_check')}; {r.get('server')}"
                                      + (f"; errors {r['errors']}" if r.get("errors") else ""))
            print(f"{r['sessions']:>8} {fmt(r.get('established'), 6)} {fmt(r.get('setup_s'), 8)} "
                  f"{fmt(mib(r.get('baseline_kib')), 9)} {fmt(mib(r.get('rss_kib')), 8)} "
                  f"{fmt(mib(r.get('delta_kib')), 10)} {fmt(r.get('kib_per_session'), 12)}  {note}")
    if out["cases"]:
        print("\nHostile cases (RSS in MiB; after = 2 s after the client closed; HWM = VmHWM since baseline;"
              f" never-reading sockets have SO_RCVBUF {out['flood_client_rcvbuf'] or 'default'})")
        print(f"{'case':<19} {'baseline':>8} {'peak':>8} {'+peak':>8} {'after':>8} {'HWM':>8}  what happened")
        for name, r in out["cases"].items():
            b, p = r.get("baseline_kib"), r.get("peak_kib")
            d = (p - b) if (p is not None and b is not None) else None
            print(f"{name:<19} {fmt(mib(b), 8)} {fmt(mib(p), 8)} {fmt(mib(d), 8)} "
                  f"{fmt(mib(r.get('after_kib')), 8)} {fmt(mib(r.get('hwm_kib')), 8)}  {case_note(name, r)}")


def main():
    global RCVBUF
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(ROOT, "build", "src", "app", "subrelay"))
    ap.add_argument("--sessions", default="1000,5000", help="comma list of idle-session counts; 0 or none skips")
    ap.add_argument("--cases", default="all", help="all, none, or a comma list of: " + ",".join(CASES))
    ap.add_argument("--json-only", action="store_true", help="print only the JSON line")
    ap.add_argument("--rcvbuf", type=int, default=RCVBUF,
                    help="SO_RCVBUF of the never-reading flood sockets, bytes (0: kernel autotuning, "
                         "which on loopback lets the client's kernel absorb up to tcp_rmem max of replies)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    args = ap.parse_args()
    args.binary = os.path.abspath(args.binary)
    RCVBUF = args.rcvbuf
    if not os.access(args.binary, os.X_OK):
        raise SystemExit(f"{args.binary}: no such executable")
    sessions = [] if args.sessions in ("", "0", "none") else [int(x) for x in args.sessions.split(",") if x]
    cases = ALL_CASES if args.cases == "all" else ([] if args.cases in ("", "none") else args.cases.split(","))
    for c in cases:
        if c not in CASES:
            raise SystemExit(f"unknown case {c!r}; known: {', '.join(CASES)}")
    # The server inherits it. Without CAP_SYS_RESOURCE the hard limit caps it (20000 here:
    # enough for 5,000 sessions on both sides).
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    except (ValueError, OSError):
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile < 2 * max(sessions, default=0) + 500:
        log(f"warning: RLIMIT_NOFILE is {nofile}, too low for {max(sessions)} sessions")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    workdir = tempfile.mkdtemp(prefix="subrelay-mem-")
    out = {"binary": args.binary, "cases": {}, "idle": [], "flood_client_rcvbuf": RCVBUF}
    try:
        ver = subprocess.run([args.binary, "--version"], capture_output=True, timeout=10)
        out["version"] = ver.stdout.decode(errors="replace").strip()
        key, cert = os.path.join(workdir, "key.pem"), os.path.join(workdir, "cert.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost"],
                       check=True, capture_output=True, timeout=30)
        hashed = subprocess.run([args.binary, "hash-password"], input=(PASSWORD + "\n").encode(),
                                capture_output=True, check=True, timeout=30).stdout.decode().strip()
        pki = (cert, key)
        for n in sessions:
            log(f"idle sessions: {n}")
            r = run_idle(args, n, workdir, pki, hashed)
            log(f"  {r}")
            out["idle"].append(r)
        for name in cases:
            log(f"case {name}")
            r = run_case(args, name, workdir, pki, hashed)
            log(f"  {r}")
            out["cases"][name] = r
    finally:
        _kill_live()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if not args.json_only:
        print_tables(out)
    print(json.dumps(out, separators=(",", ":")))


if __name__ == "__main__":
    main()
