#!/usr/bin/python3
"""Delivery throughput: queued messages per second delivered to a local receiving MTA over
STARTTLS (issue 3).

    bench/delivery.py [--binary build-bench/src/app/subrelay] [--messages 3000] [--runs 3]
                      [--size 4096] [--per-domain 10] [--domains 1] [--mode mx|relay|both|sts]

--mode relay sends the same messages through a smarthost instead (issue 12): delivery.relay
names the same receiving Postfix by host name (mx.bench.test, looked up in the same unbound),
STARTTLS with the certificate verified against the test CA, AUTH PLAIN with Cyrus SASL
(sasldb). --mode both alternates MX and relay runs (mx 1, relay 1, mx 2, ...) and prints the
ratio of the medians and the median of the per-round ratios. The receiver is the same in
both modes: Postfix with SASL, relaying for authenticated clients and accepting MX delivery
from anyone (every domain is its own: virtual_mailbox_domains = static:all).

--mode sts measures what MTA-STS costs delivery: MX runs with delivery.mta_sts off and on
(the default) alternate. The domains publish no policy (their _mta-sts TXT lookups answer
NXDOMAIN from the local unbound), which is what most recipient domains do; each run starts
with an empty cache, so the cost includes the first lookup of every domain.

Per run: subrelay is started with delivery pointed at a dead resolver, N messages of SIZE
bytes are submitted (implicit TLS + AUTH, pooled), subrelay is stopped, `queue retry --all`
makes them due; then
it is started again with delivery.resolvers = a local unbound (MX -> 127.0.0.51) and the
clock runs from the start until every recipient is `delivered` in the queue (polled in
SQLite). The receiving MTA is a private Postfix (STARTTLS offered, TLS 1.3, queue files
fsynced, mail discarded after queueing so its local delivery is not what is measured).
Prints each run and the median. Requires root (Postfix), unbound and postfix installed.
"""

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(ROOT, "build-bench", "src", "app", "subrelay"))
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--per-domain", type=int, default=10)
    ap.add_argument("--domains", type=int, default=1, help="recipient domains (all on the one MX)")
    ap.add_argument("--mode", choices=("mx", "relay", "both", "sts"), default="mx",
                    help="direct MX delivery, through a smarthost, both alternating, or MX with MTA-STS off/on")
    args = ap.parse_args()
    if not os.access(args.binary, os.X_OK):
        raise SystemExit(f"{args.binary}: not built (meson setup build-bench --buildtype=release && ninja -C build-bench)")
    os.environ["SUBRELAY_BIN"] = args.binary
    sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
    import harness  # noqa: E402
    import mta_peers  # noqa: E402
    from peers import Unbound  # noqa: E402

    zones = []
    for d in range(args.domains):
        zones += [f'local-zone: "d{d}.bench.test." static',
                  f'local-data: "d{d}.bench.test. 300 IN MX 10 mx.bench.test."']
    zones += ['local-zone: "mx.bench.test." static', 'local-data: "mx.bench.test. 300 IN A 127.0.0.51"']
    dns = Unbound(zones)
    port = mta_peers.free_port("127.0.0.51")
    cert = mta_peers.make_cert(["mx.bench.test"])
    main_cf = {"virtual_transport": "discard:", "default_process_limit": "200",
               "smtpd_client_connection_count_limit": "0"}
    relay_password = "bench-Relay-secret"
    if args.mode == "mx":
        mx = mta_peers.PostfixMx([f"127.0.0.51:{port}"], cert=cert.cert, key=cert.key, main_cf=main_cf)
    else:
        main_cf["smtpd_relay_restrictions"] = "permit_sasl_authenticated, reject_unauth_destination"
        mx = mta_peers.PostfixRelay([f"127.0.0.51:{port}"], users={"bench": relay_password}, cert=cert.cert,
                                    key=cert.key, main_cf=main_cf, hostname="mx.bench.test")
    mx.start()
    pwfile = os.path.join(harness.make_tmpdir("subrelay-bench-relay-"), "relay.pw")
    with open(pwfile, "w") as f:
        f.write(relay_password + "\n")
    os.chmod(pwfile, 0o600)
    modes = {"both": ["mx", "relay"], "sts": ["mx-sts-off", "mx"]}.get(args.mode, [args.mode])
    acct = harness.Account("bench", "bench-Passw0rd", ["@bench.test"], mode="deliver")
    body = ("x" * 76 + "\r\n") * max(1, (args.size - 300) // 78)
    rates = {m: [] for m in modes}
    try:
        for run, mode in ((r, m) for r in range(args.runs) for m in modes):
            srv = harness.Server(accounts=[acct], listeners=("implicit",),
                                 limits={"max_connections_per_ip": 500},
                                 extra_config={
                                               "delivery": {"resolvers": ["127.0.0.1:9"], "port": port}})
            srv.start()
            conn = harness.smtp_ssl(srv.port("implicit"))
            conn.login(acct.username, acct.password)
            for i in range(args.messages):
                to = f"u{i}@d{i % args.domains}.bench.test"
                msg = harness.make_message("app@bench.test", [to], f"bench {i}", body=body)
                harness.submit(conn, "app@bench.test", [to], msg)
            conn.quit()
            srv.stop()
            # The fill phase had no DNS: what it tried is deferred; make everything due now.
            subprocess.run([args.binary, "queue", "retry", "--all", "--data-dir", srv.data_dir], check=True,
                           capture_output=True)
            delivery = {"resolvers": [dns.address], "port": port, "allow_private_destinations": True,
                        "max_connections_per_domain": args.per_domain}
            if mode == "mx-sts-off":
                delivery["mta_sts"] = False
            if mode == "relay":
                delivery["relay"] = [{"host": "mx.bench.test", "port": port, "username": "bench",
                                      "password_file": pwfile}]
                delivery["tls_ca_file"] = harness.pki().ca
                delivery["allow_private_destinations"] = False  # a relay does not need it
            srv.extra_config = {"delivery": delivery}
            db = os.path.join(srv.data_dir, "queue.db")
            t0 = time.monotonic()
            srv.start()
            done = 0
            while True:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as c:
                    done = c.execute("SELECT count(*) FROM recipients WHERE state='delivered'").fetchone()[0]
                    failed = c.execute("SELECT count(*) FROM recipients WHERE state = 'failed'").fetchone()[0]
                if done >= args.messages:
                    break
                if failed:
                    raise SystemExit(f"{failed} recipients failed; see {srv.log_path}")
                if time.monotonic() - t0 > 600:
                    raise SystemExit(f"only {done} delivered after 600 s")
                time.sleep(0.02)
            elapsed = time.monotonic() - t0
            srv.stop()
            rate = args.messages / elapsed
            rates[mode].append(rate)
            how = "through the smarthost (STARTTLS, verified, AUTH)" if mode == "relay" else "to the MX over STARTTLS"
            print(f"run {run + 1} {mode}: {args.messages} messages of {args.size} B delivered {how} in "
                  f"{elapsed:.2f} s = {rate:.0f} msg/s", flush=True)
            srv.kill()
    finally:
        mx.stop()
        dns.close()
    for mode in modes:
        print(f"median {mode}: {statistics.median(rates[mode]):.0f} msg/s delivered "
              f"(per-domain connections {args.per_domain}, {args.domains} domain(s), receiving MTA: Postfix, "
              "queue fsync on both sides)")
    if len(modes) == 2:
        a, b = modes[0], modes[1]
        pairs = [y / x for x, y in zip(rates[a], rates[b])]
        print(f"{b}/{a}: ratio of medians {statistics.median(rates[b]) / statistics.median(rates[a]):.3f}, "
              f"median of per-round ratios {statistics.median(pairs):.3f}")


if __name__ == "__main__":
    main()
