#!/usr/bin/python3
"""What the recipient domain's TLS policy costs delivery (issue 12), counted, not timed: the
DNS queries, MTA-STS fetches and cache answers per delivered message, from serve's own
/metrics, for a DANE domain, an MTA-STS enforce domain, a domain without any policy and the
same mail through a smarthost.

    bench/tls_policy_cost.py [--binary build/src/app/subrelay] [--messages 200] [--batches 4]

Each case is its own serve (fresh caches) delivering --messages messages in --batches
batches a little over a minute apart, so routes expire (delivery re-resolves a domain after
60 s) and caches are what they would be in steady traffic: the first batch pays the lookups,
later ones show what repeats. The test bed is the integration tests': a validating unbound
with the signed zone (peers.DnssecTestbed), peers.HttpsPolicyServer for the policy, aiosmtpd
receivers with certificates from the test CA. Counts do not depend on machine load.
"""

import argparse
import os
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(ROOT, "build", "src", "app", "subrelay"))
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--gap", type=float, default=65.0, help="seconds between batches (route TTL is 60 s)")
    args = ap.parse_args()
    os.environ["SUBRELAY_BIN"] = args.binary
    os.environ.setdefault("SUBRELAY_TLS_BACKEND", "boringssl")
    sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
    import harness
    import mta_peers
    import peers
    from harness import Account
    from mta_peers import AioSink, make_cert
    from test_tls_policy import spki_sha256

    account = Account("app", "app-Passw0rd", ["@sender.test"], mode="deliver")
    port = mta_peers.free_port("127.0.0.31", "127.0.0.41", "127.0.0.51")
    dane_cert = make_cert(["mx.signed.test"])
    bed = peers.DnssecTestbed(tlsa=["3 1 1 " + spki_sha256(dane_cert.cert)])
    web_cert = make_cert(["mta-sts.enforce.test"])
    web = peers.HttpsPolicyServer(web_cert.cert, web_cert.key)
    static = peers.static_mail_zone("enforce.test", "127.0.0.51", web.ip, "e1") + [
        'local-zone: "sender.test." static',
        'local-data: "sender.test. 300 IN SOA ns.sender.test. admin.sender.test. 1 3600 600 86400 30"',
        'local-zone: "relay.test." static',
        'local-data: "relay.test. 300 IN SOA ns.relay.test. admin.relay.test. 1 3600 600 86400 30"',
        'local-data: "smtp.relay.test. 300 IN A 127.0.0.41"',
    ]
    lines, clauses = bed.zones(extra_local=static)
    dns = peers.Unbound((lines, clauses), validate=True)
    web.enforce("enforce.test", ["mx.enforce.test"])
    sinks = [AioSink(f"127.0.0.31:{port}", cert=dane_cert),
             AioSink(f"127.0.0.41:{port}", cert=make_cert(["mx.unsigned.test", "smtp.relay.test"])),
             AioSink(f"127.0.0.51:{port}", cert=make_cert(["mx.enforce.test"]))]
    for s in sinks:
        s.start()
    cases = [("dane", "signed.test", {}), ("mta-sts enforce", "enforce.test", {}),
             ("no policy", "unsigned.test", {}),
             ("smarthost", "unsigned.test", {"relay": [{"host": "smtp.relay.test", "port": port, "tls": "starttls"}]})]
    rows = []
    try:
        for name, domain, extra in cases:
            metrics_port = harness.free_port()
            delivery = {"resolvers": [dns.address], "port": port, "tls_ca_file": dane_cert.ca,
                        "allow_private_destinations": True, "dnssec": True, "mta_sts": True,
                        "mta_sts_https_port": web.port, **extra}
            srv = harness.Server(accounts=[account], extra_config={
                "delivery": delivery, "metrics": {"address": f"127.0.0.1:{metrics_port}"}}).start()
            try:
                per_batch = max(1, args.messages // args.batches)
                sent = 0
                for b in range(args.batches):
                    conn = harness.smtp_ssl(srv.port("implicit"))
                    conn.login(account.username, account.password)
                    for i in range(per_batch):
                        rcpt = f"r{b}-{i}@{domain}"
                        harness.submit(conn, "app@sender.test", [rcpt],
                                       harness.make_message("app@sender.test", [rcpt], f"cost {b}-{i}"))
                    conn.quit()
                    sent += per_batch
                    harness.wait_for(lambda: value(metrics_port, 'subrelay_delivery_attempts_total',
                                                   'result="delivered"') >= sent,
                                     f"{sent} delivered", timeout=120, interval=0.2)
                    if b + 1 < args.batches:
                        time.sleep(args.gap)
                text = scrape(metrics_port)
                rows.append((name, sent, {
                    "MX": total(text, "subrelay_dns_queries_total", 'type="MX"'),
                    "A/AAAA": total(text, "subrelay_dns_queries_total", 'type="A"') +
                    total(text, "subrelay_dns_queries_total", 'type="AAAA"'),
                    "TLSA": total(text, "subrelay_dns_queries_total", 'type="TLSA"'),
                    "TXT": total(text, "subrelay_dns_queries_total", 'type="TXT"'),
                    "policy lookups": total(text, "subrelay_tls_policy_decisions_total", ""),
                    "sts cache": total(text, "subrelay_mta_sts_answers_total", 'source="cache"'),
                    "sts fetched": total(text, "subrelay_mta_sts_answers_total", 'source="fetched"'),
                    "sts none": total(text, "subrelay_mta_sts_answers_total", 'source="none"'),
                }))
            finally:
                srv.stop()
    finally:
        for s in sinks:
            s.stop()
        web.close()
        dns.close()
        bed.close()
    print(f"{args.messages} messages per case in {args.batches} batches {args.gap:.0f} s apart; counts from /metrics")
    keys = list(rows[0][2].keys())
    print(f"{'case':<16} {'msgs':>5} " + " ".join(f"{k:>14}" for k in keys))
    for name, sent, c in rows:
        print(f"{name:<16} {sent:>5} " + " ".join(f"{c[k]:>14.0f}" for k in keys))
    print("per delivered message:")
    for name, sent, c in rows:
        print(f"{name:<16} " + ", ".join(f"{k} {c[k] / sent:.3f}" for k in keys))


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def total(text, name, label):
    """The sum of the samples of `name` whose label set contains `label`."""
    out = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in "{ ") and label in line:
            out += float(line.split()[-1])
    return out


def value(port, name, label):
    return total(scrape(port), name, label)


if __name__ == "__main__":
    main()
