#!/usr/bin/python3
"""Soak: a steady submission rate for a long time, to show that retention keeps the queue flat.

    bench/soak.py [--binary build-bench/src/app/subrelay] [--rate 500] [--seconds 600]
                  [--connections 16] [--captured 60s] [--every 30] [--size 4096] [--keep]

Starts `subrelay serve` (release build) on loopback with one capture-mode account and
`retention.captured` = --captured, then submits at a steady --rate msg/s (open loop: a message
is due every 1/rate s whatever the previous one did) over --connections pooled, authenticated
implicit-TLS sessions with PIPELINING, each message --size bytes to one recipient, for
--seconds. Every --every seconds it prints: elapsed time, messages accepted in all and in the
interval, how far behind the schedule the clients are, subrelay's RSS (/proc/PID/status
VmRSS), the size of queue.db and queue.db-wal, rows in `messages`, and SQLite's free pages.
Once the first messages pass retention.captured, rows and file size must stop growing.
At the end it prints the server's "retention:" log lines (batches, rows, prune time per
batch). The clients are Python and share the machine's cores with the server.
"""

import argparse
import os
import shutil
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from auth_flood import LOOP, ROOT, Client, free_port, plain, start_serve, stop_serve  # noqa: E402

USER, PASSWORD = "soak", "soak-Passw0rd"


def message(size):
    head = (b"From: app@soak.test\r\nTo: to@example.net\r\nSubject: soak\r\n"
            b"Message-ID: <soak@soak.test>\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\n")
    lines = max(1, (size - len(head)) // 78)
    return head + (b"x" * 76 + b"\r\n") * lines


class Pacer:
    """Hands out send times start + n / rate; open loop, shared by every client."""

    def __init__(self, rate, end):
        self.rate, self.end = rate, end
        self.start = time.monotonic()
        self.n = 0
        self.lock = threading.Lock()
        self.lag = 0.0  # the latest slot's lateness when taken, seconds

    def next(self):
        with self.lock:
            t = self.start + self.n / self.rate
            self.n += 1
        if t >= self.end:
            return None
        delay = t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            self.lag = -delay
        return t


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.accepted = 0
        self.errors = 0
        self.last_error = ""

    def ok(self):
        with self.lock:
            self.accepted += 1

    def fail(self, e):
        with self.lock:
            self.errors += 1
            self.last_error = str(e)[:200]


def client(port, ctx, pacer, stats, body, stop):
    c = None
    while not stop.is_set():
        try:
            if c is None:
                c = Client(port, LOOP, ctx)
                assert c.reply()[0] == 220
                c.cmd(b"EHLO soak.test\r\n")
                code, line = c.cmd(plain(USER, PASSWORD))
                if code != 235:
                    raise RuntimeError(line)
            if pacer.next() is None:
                break
            # PIPELINING: MAIL, RCPT and DATA in one write, then their three replies.
            c.s.sendall(b"MAIL FROM:<app@soak.test>\r\nRCPT TO:<to@example.net>\r\nDATA\r\n")
            codes = [c.reply()[0] for _ in range(3)]
            if codes != [250, 250, 354]:
                raise RuntimeError(f"replies {codes}")
            code, line = c.cmd(body + b".\r\n")
            if code != 250:
                raise RuntimeError(line)
            stats.ok()
        except Exception as e:  # count, reconnect, go on
            stats.fail(e)
            if c is not None:
                c.close()
            c = None
            time.sleep(0.05)
    if c is not None:
        try:
            c.cmd(b"QUIT\r\n")
        except Exception:
            pass
        c.close()


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def size_mib(path):
    try:
        return os.path.getsize(path) / 1048576
    except OSError:
        return 0.0


def queue_rows(db):
    """Rows in messages and free pages, through a read-only connection (WAL: no blocking)."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            rows = con.execute("SELECT count(*) FROM messages").fetchone()[0]
            free = con.execute("PRAGMA freelist_count").fetchone()[0]
            pages = con.execute("PRAGMA page_count").fetchone()[0]
            return rows, free, pages
        finally:
            con.close()
    except sqlite3.Error as e:
        return f"? ({e})", "?", "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(ROOT, "build-bench", "src", "app", "subrelay"))
    ap.add_argument("--rate", type=float, default=500, help="messages per second (default 500)")
    ap.add_argument("--seconds", type=float, default=600, help="duration (default 600)")
    ap.add_argument("--connections", type=int, default=16, help="pooled sessions (default 16)")
    ap.add_argument("--captured", default="60s", help="retention.captured (default 60s)")
    ap.add_argument("--every", type=float, default=30, help="report interval in seconds (default 30)")
    ap.add_argument("--size", type=int, default=4096, help="message size in bytes (default 4096)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (config, log, queue)")
    args = ap.parse_args()
    if not os.access(args.binary, os.X_OK):
        raise SystemExit(f"{args.binary}: not built (meson setup build-bench --buildtype=release && "
                         "ninja -C build-bench)")

    workdir = tempfile.mkdtemp(prefix="subrelay-soak-")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", os.path.join(workdir, "key.pem"), "-out", os.path.join(workdir, "cert.pem"),
                    "-days", "2", "-subj", "/CN=localhost"], check=True, capture_output=True)
    pw_hash = subprocess.run([args.binary, "hash-password"], input=PASSWORD.encode(), capture_output=True,
                             check=True).stdout.decode().strip()
    port = free_port()
    data = os.path.join(workdir, "data")
    os.makedirs(data)
    cfg = {
        "hostname": "soak.bench.test", "data_dir": data,
        "tls": {"certificate": os.path.join(workdir, "cert.pem"), "private_key": os.path.join(workdir, "key.pem")},
        "listeners": [{"address": f"{LOOP}:{port}", "tls": "implicit"}],
        "limits": {"max_connections_per_ip": max(100, args.connections * 2)},
        "accounts": [{"username": USER, "password_hash": pw_hash, "senders": ["@soak.test"], "mode": "capture"}],
        "retention": {"captured": args.captured},
        # Nothing is delivered (capture), but keep the resolver on loopback all the same.
        "delivery": {"resolvers": [f"{LOOP}:9"]},
        "log_level": "info",
    }
    proc, log = start_serve(args.binary, cfg, workdir, "soak")
    db = os.path.join(data, "queue.db")
    stop = threading.Event()
    stats = Stats()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    body = message(args.size)
    print(f"soak: {args.rate:g} msg/s of {len(body)} bytes over {args.connections} pooled implicit-TLS sessions "
          f"for {args.seconds:g} s; capture mode, retention.captured {args.captured}; pid {proc.pid}, "
          f"work dir {workdir}", flush=True)
    print(f"{'elapsed':>8} {'accepted':>9} {'msg/s':>7} {'behind':>7} {'errors':>6} {'RSS MiB':>8} "
          f"{'db MiB':>8} {'wal MiB':>8} {'rows':>8} {'free pg':>8} {'pages':>8}", flush=True)
    t0 = time.monotonic()
    pacer = Pacer(args.rate, t0 + args.seconds)
    threads = [threading.Thread(target=client, args=(port, ctx, pacer, stats, body, stop), daemon=True)
               for _ in range(args.connections)]
    for t in threads:
        t.start()
    last_n, last_t = 0, t0
    try:
        while any(t.is_alive() for t in threads):
            nxt = last_t + args.every
            while time.monotonic() < nxt and any(t.is_alive() for t in threads):
                time.sleep(0.2)
            now = time.monotonic()
            n = stats.accepted
            rows, free, pages = queue_rows(db)
            behind = pacer.lag
            print(f"{now - t0:8.0f} {n:9d} {(n - last_n) / max(now - last_t, 1e-9):7.0f} {behind:7.2f} "
                  f"{stats.errors:6d} {rss_mib(proc.pid):8.1f} {size_mib(db):8.1f} {size_mib(db + '-wal'):8.1f} "
                  f"{rows:>8} {free:>8} {pages:>8}", flush=True)
            last_n, last_t = n, now
            if proc.poll() is not None:
                print(f"subrelay exited with {proc.returncode}", flush=True)
                break
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        if stats.errors:
            print(f"errors: {stats.errors}, last: {stats.last_error}", flush=True)
        stop_serve(proc, log)
        with open(os.path.join(workdir, "soak.log"), errors="replace") as f:
            lines = [ln.rstrip() for ln in f if "retention" in ln or "auto-vacuum" in ln]
        print("server log, retention lines:", flush=True)
        for ln in lines[-40:]:
            print("  " + ln, flush=True)
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
