#!/usr/bin/env python3
"""A fast HTTPS webhook receiver for the benchmarks (bench/submission.sh --webhook on,
bench/webhook_rate.py): HTTP/1.1 keep-alive, answers 204 to every POST, and with --secret-file
checks each X-Subrelay-Signature (HMAC-SHA256 of "<timestamp>.<body>", hmac.compare_digest).
Counts requests, good and bad, into --stats FILE (JSON, rewritten every second) and on exit.

  bench/webhook_receiver.py --port 19443 --cert cert.pem --key key.pem [--secret-file F] [--stats F]
"""
import argparse
import hashlib
import hmac
import http.server
import json
import signal
import ssl
import sys
import threading
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--secret-file")
    ap.add_argument("--stats")
    a = ap.parse_args()
    secret = open(a.secret_file, "rb").read().strip() if a.secret_file else None
    lock = threading.Lock()
    counts = {"requests": 0, "good": 0, "bad": 0, "ids": 0}
    seen = set()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            ok = True
            if secret is not None:
                ts = self.headers.get("X-Subrelay-Timestamp", "")
                want = "v1=" + hmac.new(secret, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
                ok = hmac.compare_digest(want, self.headers.get("X-Subrelay-Signature", ""))
            with lock:
                counts["requests"] += 1
                counts["good" if ok else "bad"] += 1
                seen.add(self.headers.get("X-Subrelay-Event-Id", ""))
                counts["ids"] = len(seen)
            self.send_response(204 if ok else 400)
            self.send_header("Content-Length", "0")
            self.end_headers()

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)

    class Server(http.server.ThreadingHTTPServer):
        allow_reuse_address = True
        daemon_threads = True

        def get_request(self):
            sock, addr = super().get_request()
            return ctx.wrap_socket(sock, server_side=True), addr

    srv = Server((a.address, a.port), Handler)

    def write_stats():
        if a.stats:
            with lock:
                text = json.dumps(counts)
            with open(a.stats + ".tmp", "w") as f:
                f.write(text)
            import os
            os.replace(a.stats + ".tmp", a.stats)

    def stats_loop():
        while True:
            time.sleep(1)
            write_stats()

    threading.Thread(target=stats_loop, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: (write_stats(), sys.exit(0)))
    try:
        srv.serve_forever()
    finally:
        write_stats()


if __name__ == "__main__":
    main()
