#!/usr/bin/python3
"""AUTH latency of an account's owner while its username is being guessed (issue 9, item 5).

    bench/victim_auth.py [--binary PATH ...] [--logins 10] [--attackers 4]

For each binary (give --binary several times to compare builds in one invocation) it starts
`subrelay serve` with the shipped brute-force thresholds and one account, `legit`. The owner
logs in from 127.0.0.6 LOGINS times with nobody else around, then LOGINS times while attackers
guess `legit`'s password from rotating addresses (127.0.0.20 and up: each address guesses until
it is locked, then the next one takes over). Before every owner login the server gets a SIGHUP,
which drops the credential cache: each login is a first login after a restart, the case where
the owner used to pay the username's delay (about 8 s) on every login.
Prints p50/p99 of the AUTH round trip (the AUTH command to its 235) per phase and binary.
"""

import argparse
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from auth_flood import Client, free_port, pct, plain, start_serve, stop_serve  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOP = "127.0.0.1"
PASSWORD = "legit-Passw0rd"


class Attackers:
    """Guess `legit`'s password from 127.0.0.20, .21, ... until stopped."""

    def __init__(self, port, ctx, parallel):
        self.port, self.ctx, self.parallel = port, ctx, parallel
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.next_addr = 20
        self.guesses = 0
        self.threads = []

    def address(self):
        with self.lock:
            a = f"127.0.0.{self.next_addr}"
            self.next_addr = 20 + (self.next_addr - 19) % 200
            return a

    def worker(self):
        addr = self.address()
        i = 0
        while not self.stop.is_set():
            try:
                c = Client(self.port, addr, self.ctx, timeout=60)
            except (OSError, ssl.SSLError):
                addr = self.address()
                continue
            try:
                if c.reply()[0] != 220:  # locked at connect: move on
                    addr = self.address()
                    continue
                c.cmd(b"EHLO bot.test\r\n")
                while not self.stop.is_set():
                    i += 1
                    code, _ = c.cmd(plain("legit", f"wrong-{addr}-{i}"))
                    with self.lock:
                        self.guesses += 1
                    if code == 454:
                        addr = self.address()
                        break
                    if code != 535:
                        break
            except (OSError, ConnectionError, ssl.SSLError):
                pass
            finally:
                c.close()

    def start(self):
        for _ in range(self.parallel):
            t = threading.Thread(target=self.worker, daemon=True)
            t.start()
            self.threads.append(t)

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(60)


def owner_login(port, ctx, proc):
    proc.send_signal(signal.SIGHUP)  # reload: the credential cache starts empty
    time.sleep(0.3)
    c = Client(port, "127.0.0.6", ctx, timeout=120)
    try:
        assert c.reply()[0] == 220
        c.cmd(b"EHLO owner.test\r\n")
        t = time.monotonic()
        code, line = c.cmd(plain("legit", PASSWORD))
        dt = time.monotonic() - t
        assert code == 235, line
        c.cmd(b"QUIT\r\n")
        return dt
    finally:
        c.close()


def run(binary, args, workdir, tag):
    port = free_port()
    data = os.path.join(workdir, tag)
    os.makedirs(data, exist_ok=True)
    h = subprocess.run([binary, "hash-password"], input=PASSWORD.encode(), capture_output=True,
                       check=True).stdout.decode().strip()
    cfg = {
        "hostname": "victim.bench.test", "data_dir": data,
        "tls": {"certificate": os.path.join(workdir, "cert.pem"), "private_key": os.path.join(workdir, "key.pem")},
        "listeners": [{"address": f"{LOOP}:{port}", "tls": "implicit"}],
        "accounts": [{"username": "legit", "password_hash": h, "senders": ["@bench.test"], "mode": "capture"}],
        "log_level": "error",
    }
    proc, log = start_serve(binary, cfg, workdir, tag)
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        base = [owner_login(port, ctx, proc) for _ in range(args.logins)]
        att = Attackers(port, ctx, args.attackers)
        att.start()
        time.sleep(3)  # let the name collect failures (the first addresses get locked)
        during = [owner_login(port, ctx, proc) for _ in range(args.logins)]
        att.finish()
        return base, during, att.guesses
    finally:
        stop_serve(proc, log)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", action="append")
    ap.add_argument("--logins", type=int, default=10)
    ap.add_argument("--attackers", type=int, default=4)
    args = ap.parse_args()
    binaries = args.binary or [os.path.join(ROOT, "build-bench", "src", "app", "subrelay")]
    workdir = tempfile.mkdtemp(prefix="subrelay-victim-")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", os.path.join(workdir, "key.pem"), "-out", os.path.join(workdir, "cert.pem"),
                    "-days", "2", "-subj", "/CN=localhost"], check=True, capture_output=True)
    try:
        print(f"{'binary':50} {'no attack p50/p99 ms':>22} {'under attack p50/p99 ms':>25} {'guesses':>8}")
        for i, b in enumerate(binaries):
            base, during, guesses = run(b, args, workdir, f"run{i}")
            print(f"{b[-50:]:50} {pct(base, 50) * 1000:10.1f}/{pct(base, 99) * 1000:9.1f}"
                  f" {pct(during, 50) * 1000:12.1f}/{pct(during, 99) * 1000:10.1f} {guesses:8d}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
