"""SMTP TLS Reporting (RFC 8460) end to end: the real binary delivers under DANE and MTA-STS
(a validating unbound over peers.DnssecTestbed plus static zones, peers.HttpsPolicyServer,
aiosmtpd MX hosts), counts each Policy Domain's sessions, stores the counts at shutdown,
shows them (`tls-rpt list --json`), makes the reports (`tls-rpt send --day today`), and the
restarted serve mails them to the rua of "_smtp._tls.<domain>" (another aiosmtpd MX), where
each is checked: TLS-Report-* headers, a DKIM signature by the reporting domain that dkimpy
verifies, and the gzipped JSON with the day's counts and failure details.

Sessions: alice@signed.test (DANE, match), bob@mx2.signed.test (DANE, the MX presents another
key: tlsa-invalid), dave@enforce.test (MTA-STS enforce, valid certificate), erin@wrongmx.test
(enforce, the MX is not in the policy: validation-failure, never connected), fay@badcert.test
(enforce, the MX's certificate names another host: certificate-host-mismatch) and
carol@unsigned.test (no policy, no TLSRPT record: counted, nothing mailed)."""

import base64
import gzip
import json
import os
import re
import time
import unittest
import urllib.request

import dkim

import harness
import mta_peers
import peers
from harness import Account, ServerTestCase, scale, token
from mta_peers import AioSink, make_cert
from test_tls_policy import spki_sha256

SENDER = "app@sender.test"
ACCOUNT = Account("app", "app-Passw0rd", ["@sender.test"], mode="deliver")
RUA = "tlsrpt@reports.test"
RECORD = f'"v=TLSRPTv1; rua=mailto:{RUA}"'

# MTA-STS domains: name -> (mx patterns in the enforce policy, MX ip, names in its certificate).
STS = {
    "enforce.test": (["mx.enforce.test"], "127.0.0.71", ["mx.enforce.test"]),
    "wrongmx.test": (["mx.elsewhere.test"], "127.0.0.72", ["mx.wrongmx.test"]),
    "badcert.test": (["mx.badcert.test"], "127.0.0.73", ["mx.other.test"]),
}
REPORTS_IP = "127.0.0.75"


def static_zones(web_ip, dkim_txt):
    def soa(domain):
        return [f'local-zone: "{domain}." static',
                f'local-data: "{domain}. 300 IN SOA ns.{domain}. admin.{domain}. 1 3600 600 86400 30"']
    lines = []
    for domain, (_, ip, _) in STS.items():
        lines += soa(domain) + [
            f'local-data: "{domain}. 300 IN MX 10 mx.{domain}."',
            f'local-data: "mx.{domain}. 300 IN A {ip}"',
            f'local-data: "mta-sts.{domain}. 300 IN A {web_ip}"',
            f"local-data: '_mta-sts.{domain}. 300 IN TXT \"v=STSv1; id={domain.split('.')[0]};\"'",
            f"local-data: '_smtp._tls.{domain}. 300 IN TXT {RECORD}'",
        ]
    lines += soa("reports.test") + [
        'local-data: "reports.test. 300 IN MX 10 mx.reports.test."',
        f'local-data: "mx.reports.test. 300 IN A {REPORTS_IP}"',
    ]
    lines += soa("sender.test") + [f"local-data: 'rpt._domainkey.sender.test. 300 IN TXT \"{dkim_txt}\"'"]
    return lines


def gunzip_report(raw):
    """The JSON of the application/tlsrpt+gzip part of a report mail."""
    text = raw.decode()
    start = text.index("Content-Type: application/tlsrpt+gzip")
    body = text[text.index("\r\n\r\n", start) + 4:]
    body = body[:body.index("\r\n--")]
    return json.loads(gzip.decompress(base64.b64decode("".join(body.split()))))


class TlsRptTest(ServerTestCase):
    @classmethod
    def setUpClass(cls):
        cls.port = mta_peers.free_port("127.0.0.31", "127.0.0.32", "127.0.0.41", REPORTS_IP,
                                       *[ip for _, ip, _ in STS.values()])
        cls.keydir = harness.make_tmpdir()
        key = os.path.join(cls.keydir, "rpt.sender.test.pem")
        proc = harness.subrelay("dkim-keygen", "--domain", "sender.test", "--selector", "rpt",
                                "--algorithm", "ed25519-sha256", "--out", key, timeout=60)
        if proc.returncode != 0:
            raise AssertionError(f"dkim-keygen failed: {proc.stderr.decode(errors='replace')}")
        out = proc.stdout.decode()
        cls.dkim_txt = "".join(re.findall(r'"([^"]*)"', out.split("IN TXT", 1)[1]))
        cls.daneCert = make_cert(["mx.signed.test"])
        cls.bed = peers.DnssecTestbed(tlsa=["3 1 1 " + spki_sha256(cls.daneCert.cert)], extra={
            "signed.test": [f"_smtp._tls IN TXT {RECORD}", f"_smtp._tls.mx2 IN TXT {RECORD}"]})
        webCert = make_cert([f"mta-sts.{d}" for d in STS])
        cls.web = peers.HttpsPolicyServer(webCert.cert, webCert.key)
        lines, clauses = cls.bed.zones(extra_local=static_zones(cls.web.ip, cls.dkim_txt))
        cls.dns = peers.Unbound((lines, clauses), validate=True)
        for domain, (mx, _, _) in STS.items():
            cls.web.enforce(domain, mx)
        cls.sinks = {
            "signed": AioSink(f"127.0.0.31:{cls.port}", cert=cls.daneCert),
            "signed2": AioSink(f"127.0.0.32:{cls.port}", cert=make_cert(["mx2.signed.test"])),
            "unsigned": AioSink(f"127.0.0.41:{cls.port}", cert=make_cert(["mx.unsigned.test"])),
            "reports": AioSink(f"{REPORTS_IP}:{cls.port}", cert=make_cert(["mx.reports.test"])),
        }
        for domain, (_, ip, names) in STS.items():
            cls.sinks[domain] = AioSink(f"{ip}:{cls.port}", cert=make_cert(names))
        for s in cls.sinks.values():
            s.start()
        cls.metrics_port = harness.free_port()
        cls.srv = cls.start_class_server(accounts=[ACCOUNT], hostname="relay.sender.test", extra_config={
            "metrics": {"address": f"127.0.0.1:{cls.metrics_port}"},
            "dkim": [{"domain": "sender.test", "selector": "rpt", "algorithm": "ed25519-sha256",
                      "private_key": key}],
            "delivery": {"resolvers": [cls.dns.address], "port": cls.port, "retry_schedule": ["1h"],
                         "max_queue_time": "1h", "tls_ca_file": cls.daneCert.ca,
                         "allow_private_destinations": True, "dnssec": True, "mta_sts": True,
                         "mta_sts_https_port": cls.web.port,
                         "tls_rpt": {"from": "tlsrpt@sender.test", "organization": "Subrelay Test",
                                     "contact": "postmaster@sender.test"}},
            "retention": {"finished_bodies": "1h"}})

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        for s in cls.sinks.values():
            s.stop()
        cls.web.close()
        cls.dns.close()
        cls.bed.close()

    def dump_logs(self, stream):
        stream.write("--- unbound log ---\n" + self.dns.log_text()[-3000:] + "\n")

    def submit(self, rcpt):
        conn = harness.smtp_ssl(self.srv.port("implicit"))
        conn.login(ACCOUNT.username, ACCOUNT.password)
        qid = harness.submit(conn, SENDER, [rcpt], harness.make_message(SENDER, [rcpt], f"rpt {token()}"))
        conn.quit()
        return qid

    def wait_state(self, qid, rcpt, state):
        deadline = time.monotonic() + scale(30)
        while True:
            info = self.srv.queue_show_json(qid)
            if info["recipients"][0]["state"] == state and info["history"]:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"{rcpt} never {state}: {json.dumps(info, indent=1)}")
            time.sleep(0.1)

    def test_counts_reports_and_mails_them_once(self):
        expect = {"alice@signed.test": "delivered", "bob@mx2.signed.test": "deferred",
                  "dave@enforce.test": "delivered", "erin@wrongmx.test": "deferred",
                  "fay@badcert.test": "deferred", "carol@unsigned.test": "delivered"}
        for rcpt, state in expect.items():
            self.wait_state(self.submit(rcpt), rcpt, state)
        # What each policy cost, in /metrics (counters are in the serve process).
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()

        def value(series):
            for line in metrics.splitlines():
                if line.startswith(series + " "):
                    return float(line.split()[-1])
            return 0.0
        self.assertGreaterEqual(value('subrelay_tls_policy_decisions_total{policy="dane",usable="yes"}'), 2, metrics)
        self.assertGreaterEqual(value('subrelay_tls_policy_decisions_total{policy="mta-sts-enforce",usable="no"}'), 1)
        self.assertGreaterEqual(value('subrelay_mta_sts_answers_total{source="fetched"}'), 3)
        self.assertGreaterEqual(value('subrelay_tls_rpt_sessions_total{result="success"}'), 3)
        self.assertGreaterEqual(value('subrelay_tls_rpt_sessions_total{result="failure"}'), 3)
        self.assertGreaterEqual(value('subrelay_dns_queries_total{type="TLSA"}'), 2)

        # SIGTERM: serve stores the counts it holds before it exits.
        self.assertEqual(self.srv.stop(), 0)

        proc = harness.subrelay("tls-rpt", "list", "--json", "-c", self.srv.config_path)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        listed = {(o["domain"], o["policy_type"]): o for o in map(json.loads, proc.stdout.decode().splitlines())}
        self.assertEqual(listed[("signed.test", "tlsa")]["successful"], 1, listed)
        self.assertEqual(listed[("signed.test", "tlsa")]["failed"], 0)
        bob = listed[("mx2.signed.test", "tlsa")]
        self.assertEqual((bob["successful"], bob["failed"]), (0, 1), bob)
        self.assertEqual(bob["failures"][0]["result"], "tlsa-invalid")
        self.assertEqual(bob["failures"][0]["ip"], "127.0.0.32")
        self.assertEqual(listed[("enforce.test", "sts")]["successful"], 1)
        erin = listed[("wrongmx.test", "sts")]
        self.assertEqual((erin["successful"], erin["failures"][0]["result"]), (0, "validation-failure"), erin)
        fay = listed[("badcert.test", "sts")]
        self.assertEqual((fay["successful"], fay["failures"][0]["result"]), (0, "certificate-host-mismatch"), fay)
        self.assertEqual(listed[("unsigned.test", "no-policy-found")]["successful"], 1)

        proc = harness.subrelay("tls-rpt", "send", "--day", "today", "-c", self.srv.config_path, timeout=60)
        out = proc.stdout.decode()
        self.assertEqual(proc.returncode, 0, out + proc.stderr.decode())
        self.assertIn("5 report(s) queued, 1 domain(s) without a TLSRPT record", out)
        self.assertIn("unsigned.test: no TLSRPT record", out)

        # A second run finds the day done: nothing is mailed twice.
        again = harness.subrelay("tls-rpt", "send", "--day", "today", "-c", self.srv.config_path, timeout=60)
        self.assertIn("0 report(s) queued", again.stdout.decode())

        self.srv.start()
        sink = self.sinks["reports"]
        harness.wait_for(lambda: len(sink.messages()) >= 5, "five reports at the rua's MX", timeout=scale(30))
        time.sleep(0.5)
        msgs = sink.messages()
        self.assertEqual(len(msgs), 5, [m["rcpt_tos"] for m in msgs])
        reports = {}
        for m in msgs:
            raw = m["raw"]
            self.assertEqual(m["rcpt_tos"], [RUA])
            self.assertEqual(m["mail_from"], "tlsrpt@sender.test")
            domain = harness.header_values(raw, "TLS-Report-Domain")[0].decode().strip()
            self.assertEqual(harness.header_values(raw, "TLS-Report-Submitter")[0].decode().strip(), "sender.test")
            subject = b" ".join(harness.header_values(raw, "Subject")[0].split()).decode()
            self.assertTrue(subject.startswith(f"Report Domain: {domain} Submitter: sender.test Report-ID: <"),
                            subject)
            # RFC 8460 3: DKIM-signed by the reporting domain, no l= tag.
            sig = harness.header_values(raw, "DKIM-Signature")[0].decode()
            self.assertIn("d=sender.test", sig.replace(" ", ""))
            self.assertNotIn("l=", sig.replace(" ", "").replace("\r\n", ""))
            self.assertTrue(dkim.verify(raw, dnsfunc=self.dnsfunc), f"DKIM does not verify for {domain}")
            reports[domain] = gunzip_report(raw)

        self.assertEqual(set(reports), {"signed.test", "mx2.signed.test", "enforce.test", "wrongmx.test",
                                        "badcert.test"})
        for domain, r in reports.items():
            self.assertEqual(r["organization-name"], "Subrelay Test")
            self.assertEqual(r["contact-info"], "postmaster@sender.test")
            self.assertTrue(r["date-range"]["start-datetime"].endswith("T00:00:00Z"), r)
            self.assertTrue(r["date-range"]["end-datetime"].endswith("T23:59:59Z"), r)
            for p in r["policies"]:
                self.assertEqual(p["policy"]["policy-domain"], domain)

        def only(domain):
            pols = reports[domain]["policies"]
            self.assertEqual(len(pols), 1, pols)
            return pols[0]

        p = only("signed.test")
        self.assertEqual(p["policy"]["policy-type"], "tlsa")
        self.assertEqual(p["policy"]["policy-string"], ["3 1 1 " + spki_sha256(self.daneCert.cert).upper()])
        self.assertEqual(p["policy"]["mx-host"], ["mx.signed.test"])
        self.assertEqual(p["summary"], {"total-successful-session-count": 1, "total-failure-session-count": 0})
        p = only("mx2.signed.test")
        self.assertEqual(p["summary"]["total-failure-session-count"], 1)
        d = p["failure-details"][0]
        self.assertEqual((d["result-type"], d["receiving-mx-hostname"], d["receiving-ip"]),
                         ("tlsa-invalid", "mx2.signed.test", "127.0.0.32"))
        self.assertIn("DANE", d["failure-reason-code"])
        p = only("enforce.test")
        self.assertEqual(p["policy"]["policy-type"], "sts")
        self.assertIn("mode: enforce", p["policy"]["policy-string"])
        self.assertIn("mx: mx.enforce.test", p["policy"]["policy-string"])
        self.assertEqual(p["policy"]["mx-host"], ["mx.enforce.test"])
        self.assertEqual(p["summary"]["total-successful-session-count"], 1)
        p = only("wrongmx.test")
        self.assertEqual(p["failure-details"][0]["result-type"], "validation-failure")
        self.assertEqual(p["failure-details"][0]["receiving-mx-hostname"], "mx.wrongmx.test")
        p = only("badcert.test")
        self.assertEqual(p["failure-details"][0]["result-type"], "certificate-host-mismatch")
        self.assertEqual(p["failure-details"][0]["receiving-ip"], "127.0.0.73")
        # The reports themselves go out whatever the rua domain's TLS: they are not counted.
        self.assertEqual(self.sinks["wrongmx.test"].messages(), [])

    def dnsfunc(self, name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode()
        return self.dkim_txt.encode() if name.rstrip(".") == "rpt._domainkey.sender.test" else None


if __name__ == "__main__":
    unittest.main()
