#!/usr/bin/env python3
"""Webhook delivery rate: fills subrelay's webhook outbox with N events (rows written straight
into the queue database while `subrelay serve` runs, as the state changes would) and times
until the outbox is empty, every event POSTed to bench/webhook_receiver.py over HTTPS.

  bench/webhook_rate.py [--events N] [--subrelay build-bench/src/app/subrelay] [--keep]

Prints events, seconds and events per second; the receiver's counts (requests, signatures
that failed, distinct ids) show nothing was lost or sent twice. Not run in CI."""
import argparse
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--subrelay", default=os.path.join(HERE, "..", "build-bench", "src", "app", "subrelay"))
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    binary = os.path.abspath(a.subrelay)
    if not os.access(binary, os.X_OK):
        sys.exit(f"webhook_rate: no subrelay binary at {binary} (--subrelay)")
    tmp = tempfile.mkdtemp(prefix="subrelay-webhook-rate-")
    procs = []
    try:
        cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "2", "-subj", "/CN=hooks.bench", "-addext",
                        "subjectAltName=DNS:hooks.bench,IP:127.0.0.1", "-keyout", key, "-out", cert],
                       check=True, capture_output=True)
        secret = os.path.join(tmp, "hook.secret")
        with open(secret, "w") as f:
            f.write("whsec_bench\n")
        os.chmod(secret, 0o600)
        hook_port, smtp_port = free_port(), free_port()
        stats = os.path.join(tmp, "stats.json")
        rx = subprocess.Popen([sys.executable, os.path.join(HERE, "webhook_receiver.py"), "--port", str(hook_port),
                               "--cert", cert, "--key", key, "--secret-file", secret, "--stats", stats])
        procs.append(rx)
        hashed = subprocess.run([binary, "hash-password"], input=b"bench-password", capture_output=True,
                                check=True).stdout.decode().strip()
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        config = {
            "hostname": "bench.test", "data_dir": data,
            "tls": {"certificate": cert, "private_key": key},
            "listeners": [{"address": f"127.0.0.1:{smtp_port}", "tls": "starttls"}],
            "accounts": [{"username": "bench", "password_hash": hashed, "senders": ["@bench.test"], "mode": "capture",
                          "webhook": {"url": f"https://127.0.0.1:{hook_port}/events", "secret_file": secret}}],
            "webhooks": {"ca_file": cert},
        }
        cfg = os.path.join(tmp, "config.json")
        with open(cfg, "w") as f:
            json.dump(config, f)
        os.chmod(key, 0o600)
        log = open(os.path.join(tmp, "serve.log"), "wb")
        srv = subprocess.Popen([binary, "serve", "-c", cfg], stderr=log, stdout=log)
        procs.append(srv)
        if not wait_port(smtp_port, srv) or not wait_port(hook_port, rx):
            sys.exit("webhook_rate: subrelay or the receiver did not start; see " + tmp)
        db = sqlite3.connect(os.path.join(data, "queue.db"), timeout=30)
        now = int(time.time())
        rows = []
        for i in range(a.events):
            eid = f"evt_bench{i:027d}"
            body = json.dumps({"id": eid, "type": "delivered", "account": "bench", "message_id": f"Q{i}",
                               "sender": "app@bench.test", "recipient": f"user{i}@example.net",
                               "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}, separators=(",", ":"))
            rows.append(("bench", eid, "delivered", body, now, now))
        with db:
            db.executemany("INSERT INTO webhook_events (account, event_id, type, body, next_at, created_at) "
                           "VALUES (?, ?, ?, ?, ?, ?)", rows)
        start = time.monotonic()
        while True:
            left = db.execute("SELECT count(*) FROM webhook_events").fetchone()[0]
            if left == 0:
                break
            if srv.poll() is not None:
                sys.exit("webhook_rate: subrelay exited; see " + tmp)
            time.sleep(0.05)
        took = time.monotonic() - start
        time.sleep(1.2)  # the receiver's stats file is rewritten every second
        got = json.load(open(stats))
        print(json.dumps({"events": a.events, "seconds": round(took, 3), "events_per_second": round(a.events / took, 1),
                          "receiver": got}))
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
        if a.keep:
            print("kept " + tmp, file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
