#!/usr/bin/python3
"""What a flood of failed AUTH attempts from one address does to a legitimate client.

    bench/auth_flood.py [--binary build-bench/src/app/subrelay] [--attempts 1000] [--parallel 50]
                        [--seconds 10] [--runs 3] [--settings defaults,no-lockout,none]

Starts `subrelay serve` (release build) on loopback with two accounts. For each defence setting
it measures a legitimate client from 127.0.0.6 (a) connection per message: TCP + implicit TLS +
AUTH PLAIN + one 4 KB message + QUIT, and (b) pooled: one logged-in connection sending message
after message; first with nobody else around (baseline), then while an attacker from 127.0.0.5
makes ATTEMPTS failed AUTHs over PARALLEL connections (reconnecting whenever it is refused or
dropped). Settings:
  defaults : the shipped thresholds (delay after 3 failures, lockout after 10 for 15 min)
  no-lockout: progressive delays only (auth_lockout_after 0, delays capped at 2 s)
  none     : no defence at all (no delays, no lockout): every attempt costs one scrypt
Prints median and p99 latency per phase and the attacker's outcome counts. The attacker and the
legitimate client are Python and share the 2 cores with the server: compare phases, not absolutes.
"""

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOP = "127.0.0.1"


def free_port():
    s = socket.socket()
    s.bind((LOOP, 0))
    p = s.getsockname()[1]
    s.close()
    return p


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class Client:
    def __init__(self, port, source, ctx, timeout=60):
        raw = socket.create_connection((LOOP, port), timeout=timeout, source_address=(source, 0))
        self.s = ctx.wrap_socket(raw, server_hostname=LOOP)
        self.buf = b""

    def reply(self):
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.s.recv(65536)
                if not chunk:
                    raise ConnectionError("closed")
                self.buf += chunk
            line, _, self.buf = self.buf.partition(b"\r\n")
            if len(line) < 4 or line[3:4] != b"-":
                return int(line[:3]), line

    def cmd(self, data):
        self.s.sendall(data)
        return self.reply()

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


def plain(user, pw):
    return b"AUTH PLAIN " + base64.b64encode(f"\0{user}\0{pw}".encode()) + b"\r\n"


BODY = (b"From: app@bench.test\r\nTo: to@example.net\r\nSubject: flood bench\r\n\r\n"
        + (b"x" * 76 + b"\r\n") * 50)


def send_message(c):
    assert c.cmd(b"MAIL FROM:<app@bench.test>\r\n")[0] == 250
    assert c.cmd(b"RCPT TO:<to@example.net>\r\n")[0] == 250
    assert c.cmd(b"DATA\r\n")[0] == 354
    code, line = c.cmd(BODY + b".\r\n")
    assert code == 250, line


def legit_per_message(port, ctx, seconds):
    lat = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.monotonic()
        c = Client(port, "127.0.0.6", ctx)
        try:
            assert c.reply()[0] == 220
            c.cmd(b"EHLO legit.test\r\n")
            code, line = c.cmd(plain("legit", "legit-Passw0rd"))
            assert code == 235, line
            send_message(c)
            c.cmd(b"QUIT\r\n")
        finally:
            c.close()
        lat.append(time.monotonic() - t)
    return lat


def legit_pooled(port, ctx, seconds):
    c = Client(port, "127.0.0.6", ctx)
    assert c.reply()[0] == 220
    c.cmd(b"EHLO legit.test\r\n")
    assert c.cmd(plain("legit", "legit-Passw0rd"))[0] == 235
    lat = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.monotonic()
        send_message(c)
        lat.append(time.monotonic() - t)
    c.close()
    return lat


class Attacker:
    def __init__(self, port, ctx, attempts, parallel):
        self.port, self.ctx, self.left, self.parallel = port, ctx, attempts, parallel
        self.lock = threading.Lock()
        self.counts = {"535": 0, "454": 0, "421-at-connect": 0, "dropped": 0}
        self.threads = []
        self.started = self.finished = None

    def take(self):
        with self.lock:
            if self.left <= 0:
                return False
            self.left -= 1
            return True

    def count(self, k):
        with self.lock:
            self.counts[k] += 1

    def worker(self, n):
        i = 0
        while self.take():
            try:
                c = Client(self.port, "127.0.0.5", self.ctx)
            except OSError:
                self.count("dropped")
                continue
            try:
                code, _ = c.reply()
                if code != 220:
                    self.count("421-at-connect")
                    continue
                c.cmd(b"EHLO bot.test\r\n")
                first = True
                while first or self.take():
                    first = False
                    i += 1
                    code, _ = c.cmd(plain("legit" if i % 2 else f"guess{n}-{i}", f"wrong-{n}-{i}"))
                    if code == 535:
                        self.count("535")
                    elif code == 454:
                        self.count("454")
                    else:
                        self.count("dropped")
                        break
            except (OSError, ConnectionError, ssl.SSLError):
                self.count("dropped")
            finally:
                c.close()

    def start(self):
        self.started = time.monotonic()
        for n in range(self.parallel):
            t = threading.Thread(target=self.worker, args=(n,), daemon=True)
            t.start()
            self.threads.append(t)

    def running(self):
        return any(t.is_alive() for t in self.threads)

    def join(self, timeout):
        for t in self.threads:
            t.join(timeout)
        self.finished = time.monotonic()


def start_serve(binary, cfg, workdir, name):
    """Writes cfg, runs `subrelay serve`, waits until its first listener answers."""
    path = os.path.join(workdir, name + ".json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    log = open(os.path.join(workdir, name + ".log"), "wb")
    proc = subprocess.Popen([binary, "serve", "-c", path], stdout=log, stderr=log)
    host, port = cfg["listeners"][0]["address"].rsplit(":", 1)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return proc, log
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                stop_serve(proc, log)
                raise SystemExit(f"subrelay did not start; see {log.name}")
            time.sleep(0.05)


def stop_serve(proc, log):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def run_setting(args, name, limits, workdir):
    port = free_port()
    data = os.path.join(workdir, name)
    os.makedirs(data, exist_ok=True)
    key, cert = os.path.join(workdir, "key.pem"), os.path.join(workdir, "cert.pem")
    hashes = {}
    for user, pw in (("legit", "legit-Passw0rd"),):
        hashes[user] = subprocess.run([args.binary, "hash-password"], input=pw.encode(),
                                      capture_output=True, check=True).stdout.decode().strip()
    cfg = {
        "hostname": "flood.bench.test", "data_dir": data,
        "tls": {"certificate": cert, "private_key": key},
        "listeners": [{"address": f"{LOOP}:{port}", "tls": "implicit"}],
        "limits": dict({"max_connections_per_ip": 100}, **limits),
        "accounts": [{"username": "legit", "password_hash": hashes["legit"], "senders": ["@bench.test"],
                      "mode": "capture"}],
        "log_level": "error",
    }
    proc, log = start_serve(args.binary, cfg, workdir, name)
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        legit_per_message(port, ctx, 1)  # warm-up (fills the credential cache)
        res = {"setting": name}
        res["base_permsg"] = legit_per_message(port, ctx, args.seconds)
        res["base_pooled"] = legit_pooled(port, ctx, args.seconds)
        att = Attacker(port, ctx, args.attempts, args.parallel)
        att.start()
        time.sleep(0.5)
        flood_permsg, flood_pooled = [], []
        end = time.monotonic() + args.seconds
        # Measure while the attack runs (at least one window even if it ends early).
        while True:
            flood_permsg += legit_per_message(port, ctx, 1)
            flood_pooled += legit_pooled(port, ctx, 1)
            if time.monotonic() > end or not att.running():
                break
        att.join(600)
        res["flood_permsg"], res["flood_pooled"] = flood_permsg, flood_pooled
        res["attacker"] = dict(att.counts, seconds=round(att.finished - att.started, 1))
        return res
    finally:
        stop_serve(proc, log)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(ROOT, "build-bench", "src", "app", "subrelay"))
    ap.add_argument("--attempts", type=int, default=1000)
    ap.add_argument("--parallel", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--settings", default="defaults,no-lockout,none")
    ap.add_argument("--runs", type=int, default=3, help="runs per setting; the table shows each and the median")
    args = ap.parse_args()
    if not os.access(args.binary, os.X_OK):
        raise SystemExit(f"{args.binary}: not built (meson setup build-bench --buildtype=release && ninja -C build-bench)")
    settings = {
        "defaults": {},
        "no-lockout": {"auth_lockout_after": 0, "auth_delay_max": "2s"},
        "none": {"auth_lockout_after": 0, "auth_failure_delay": "0s", "auth_delay_after": 1000000},
    }
    workdir = tempfile.mkdtemp(prefix="subrelay-flood-")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", os.path.join(workdir, "key.pem"), "-out", os.path.join(workdir, "cert.pem"),
                    "-days", "2", "-subj", "/CN=localhost"], check=True, capture_output=True)
    keys = (("base_permsg", "conn/msg, no attack"), ("flood_permsg", "conn/msg, during attack"),
            ("base_pooled", "pooled, no attack"), ("flood_pooled", "pooled, during attack"))
    try:
        for name in args.settings.split(","):
            runs = [run_setting(args, f"{name}-{i}", settings[name], workdir) for i in range(args.runs)]
            print(f"\n== {name}: attacker {args.attempts} attempts over {args.parallel} connections from 127.0.0.5")
            for i, r in enumerate(runs):
                print(f"   run {i + 1} attacker: {r['attacker']}")
            print(f"{'legit client (127.0.0.6)':30} " + " ".join(f"{'run' + str(i + 1) + ' p50/p99':>16}" for i in range(len(runs)))
                  + f" {'MEDIAN p50/p99 ms':>18}")
            for key, label in keys:
                cells, p50s, p99s = [], [], []
                for r in runs:
                    a, b = pct(r[key], 50) * 1000, pct(r[key], 99) * 1000
                    p50s.append(a)
                    p99s.append(b)
                    cells.append(f"{a:7.1f}/{b:7.1f}")
                print(f"{label:30} " + " ".join(f"{c:>16}" for c in cells)
                      + f" {statistics.median(p50s):8.1f}/{statistics.median(p99s):8.1f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
