"""MTA-STS (RFC 8461) discovery end to end: subrelay-sts-fetch (delivery::mtasts::StsFetcher
with the real resolver, the real HTTPS client and, with --db, the real SQLite policy cache)
against a private unbound (the "_mta-sts" TXT records and the policy hosts' addresses) and
peers.HttpsPolicyServer on 127.0.0.1 and a free port (certificates from the test CA).

Cases: an enforce policy is fetched and then answered from the cache without another HTTPS
request (in one process, and across processes through the SQLite cache); a testing policy;
a certificate from an untrusted CA, a 404, a redirect (never followed), an oversized body
and a text/html policy all give no policy; no TXT record and two v=STSv1 records give no
policy without any HTTPS request. SUBRELAY_STS_FETCH names the tool."""

import json
import os
import sqlite3
import unittest

import harness
import peers
from mta_peers import make_cert

TOOL = os.environ.get("SUBRELAY_STS_FETCH")

# Policy Domain -> the TXT records of its "_mta-sts" name (None: none at all).
DOMAINS = {
    "enforce.test": ["v=STSv1; id=e1;"],
    "testing.test": ["v=STSv1; id=t1"],
    "badcert.test": ["v=STSv1; id=b1;"],
    "missing.test": ["v=STSv1; id=m1;"],
    "redirect.test": ["v=STSv1; id=r1;"],
    "oversized.test": ["v=STSv1; id=o1;"],
    "html.test": ["v=STSv1; id=h1;"],
    "persist.test": ["v=STSv1; id=p1;"],
    "nosts.test": None,
    "twotxt.test": ["v=STSv1; id=a1;", "v=STSv1; id=a2;"],
}


def zones(web_ip):
    lines = []
    for domain, txts in DOMAINS.items():
        lines.append(f'local-zone: "{domain}." static')
        lines.append(f'local-data: "{domain}. 300 IN SOA ns.{domain}. admin.{domain}. 1 3600 600 86400 30"')
        lines.append(f'local-data: "mta-sts.{domain}. 300 IN A {web_ip}"')
        for t in txts or []:
            lines.append(f"local-data: '_mta-sts.{domain}. 300 IN TXT \"{t}\"'")
    return lines


def setUpModule():
    global DNS, WEB, CERT
    if not TOOL or not os.access(TOOL, os.X_OK):
        raise AssertionError("SUBRELAY_STS_FETCH is not set to the subrelay-sts-fetch tool")
    CERT = make_cert([f"mta-sts.{d}" for d in DOMAINS])
    WEB = peers.HttpsPolicyServer(CERT.cert, CERT.key)
    DNS = peers.Unbound(zones(WEB.ip))
    WEB.enforce("enforce.test", ["mx1.enforce.test", "*.mx.enforce.test"], max_age=86400)
    WEB.testing("testing.test", ["mx.testing.test"])
    untrusted = make_cert(["mta-sts.badcert.test"], issuer="other")
    WEB.bad_certificate("badcert.test", untrusted.cert, untrusted.key)
    WEB.missing("missing.test")
    WEB.redirect("redirect.test", "enforce.test")
    WEB.oversized("oversized.test", size=100 * 1024)
    WEB.html("html.test", ["mx.html.test"])
    WEB.enforce("persist.test", ["mx.persist.test"])
    WEB.enforce("nosts.test", ["mx.nosts.test"])
    WEB.enforce("twotxt.test", ["mx.twotxt.test"])


def tearDownModule():
    WEB.close()
    DNS.close()


def fetch(*domains, repeat=1, db=None, ca=None, timeout_ms=10000, allow_private=True):
    argv = [TOOL, "--server", DNS.address, "--port", str(WEB.port), "--ca", ca or harness.pki().ca,
            "--timeout-ms", str(timeout_ms), "--repeat", str(repeat)]
    if allow_private:  # the policy server listens on 127.0.0.x
        argv.append("--allow-private")
    if db:
        argv += ["--db", db]
    argv += list(domains)
    proc = harness.run(argv, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    lines = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    if len(lines) != len(domains) * repeat:
        raise AssertionError(f"expected {len(domains) * repeat} answers, got {proc.stdout!r}")
    return lines


class MtaStsTest(unittest.TestCase):
    def dump_logs(self, stream):
        stream.write("--- unbound log ---\n" + DNS.log_text()[-4000:] + "\n")
        stream.write(f"--- policy server requests ---\n{WEB.requests()}\n")

    def assertNoPolicy(self, answer, detail_has):
        self.assertIsNone(answer["policy"], answer)
        self.assertEqual(answer["source"], "none", answer)
        self.assertIn(detail_has, answer["detail"], answer)

    def test_enforce_fetched_then_cached(self):
        before = WEB.hits("enforce.test")
        first, second = fetch("enforce.test", repeat=2)
        self.assertEqual(first["source"], "fetched", first)
        p = first["policy"]
        self.assertEqual(p["id"], "e1")
        self.assertEqual(p["mode"], "enforce")
        self.assertEqual(p["max_age"], 86400)
        self.assertEqual(p["mx"], ["mx1.enforce.test", "*.mx.enforce.test"])
        self.assertEqual(p["expires_at"] - p["fetched_at"], 86400)
        # The second question is answered from memory: no lookup, no HTTPS request.
        self.assertEqual(second["source"], "cache", second)
        self.assertEqual(second["policy"], p)
        self.assertEqual(second["stats"]["https_requests"], 1, second)
        self.assertEqual(second["stats"]["txt_lookups"], 1, second)
        self.assertEqual(WEB.hits("enforce.test") - before, 1)
        host, path = WEB.requests()[-1]
        self.assertEqual((host, path), ("mta-sts.enforce.test", "/.well-known/mta-sts.txt"))

    def test_cached_in_sqlite_across_processes(self):
        db = os.path.join(harness.make_tmpdir(), "queue.db")
        before = WEB.hits("persist.test")
        first, = fetch("persist.test", db=db)
        self.assertEqual(first["source"], "fetched", first)
        self.assertEqual(first["policy"]["mode"], "enforce")
        again, = fetch("persist.test", db=db)
        self.assertEqual(again["source"], "cache", again)
        self.assertEqual(again["policy"], first["policy"])
        self.assertEqual(again["stats"]["https_requests"], 0, again)
        self.assertEqual(again["stats"]["txt_lookups"], 0, again)
        self.assertEqual(WEB.hits("persist.test") - before, 1)
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT domain, policy_id, mode, mx, policy, expires_at - fetched_at "
                                "FROM sts_policies").fetchall()
        self.assertEqual(rows, [("persist.test", "p1", "enforce", "mx.persist.test",
                                 peers.sts_policy("enforce", ["mx.persist.test"]), 604800)])

    def test_testing_policy(self):
        a, = fetch("testing.test")
        self.assertEqual(a["source"], "fetched", a)
        self.assertEqual(a["policy"]["mode"], "testing")
        self.assertEqual(a["policy"]["id"], "t1")
        self.assertEqual(a["policy"]["mx"], ["mx.testing.test"])

    def test_untrusted_certificate_is_a_fetch_failure(self):
        connections = WEB.connections
        a, = fetch("badcert.test")
        self.assertNoPolicy(a, "tls")
        self.assertEqual(a["stats"]["fetch_failures"], 1, a)
        # It did connect (the failure is the certificate's), and sent no request.
        self.assertGreater(WEB.connections, connections)
        self.assertEqual(WEB.hits("badcert.test"), 0)
        # The same server, the same certificate, but the client does not trust its CA.
        b, = fetch("enforce.test", ca=make_cert(["x.test"], issuer="other").ca)
        self.assertNoPolicy(b, "tls")

    def test_missing_policy_is_no_policy(self):
        a, = fetch("missing.test")
        self.assertNoPolicy(a, "HTTP status 404")

    def test_redirect_is_not_followed(self):
        target = WEB.hits("enforce.test")
        a, = fetch("redirect.test")
        self.assertNoPolicy(a, "HTTP status 301")
        self.assertEqual(WEB.hits("redirect.test"), 1)
        self.assertEqual(WEB.hits("enforce.test"), target)

    def test_oversized_body_is_rejected(self):
        a, = fetch("oversized.test")
        self.assertNoPolicy(a, "too-large")

    def test_wrong_content_type_is_rejected(self):
        a, = fetch("html.test")
        self.assertNoPolicy(a, "content type is not text/plain")
        self.assertEqual(WEB.hits("html.test"), 1)

    def test_no_txt_record_means_no_fetch(self):
        a, = fetch("nosts.test")
        self.assertNoPolicy(a, "no TXT record")
        self.assertEqual(a["stats"]["https_requests"], 0)
        self.assertEqual(WEB.hits("nosts.test"), 0)

    def test_policy_host_on_loopback_is_refused_by_default(self):
        # The policy host's address comes from the recipient domain's DNS: without
        # delivery.allow_private_destinations a loopback or internal address is never
        # fetched from (no SSRF through MTA-STS), as MX hosts are never connected to.
        before = WEB.connections
        a, = fetch("enforce.test", allow_private=False)
        self.assertNoPolicy(a, "is loopback (delivery.allow_private_destinations is false)")
        self.assertEqual(a["stats"]["https_requests"], 0, a)
        self.assertEqual(WEB.connections, before)

    def test_two_sts_records_are_invalid(self):
        a, = fetch("twotxt.test")
        self.assertNoPolicy(a, "2 v=STSv1 TXT records")
        self.assertEqual(WEB.hits("twotxt.test"), 0)


if __name__ == "__main__":
    harness.main()
