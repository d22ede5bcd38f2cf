"""dns/ end to end: subrelay-dnsquery (dns::UvResolver, the real resolver) against a private
unbound (peers.Unbound, the zones of docs/testbed.md plus a CNAME chain and a name with 80 A
records). Cases: MX order and preferences, no MX (nodata: delivery then uses the implicit MX),
null MX (RFC 7505: exchange ""), NXDOMAIN, SERVFAIL, timeout (a `deny` zone drops queries),
REFUSED, CNAME chains for A/AAAA/MX, AAAA, TXT with several strings, TC over UDP -> TCP
(all 80 addresses, and the tool reports one TCP query), and two servers where the first is a
dead UDP port -> the answer comes from the second. SUBRELAY_DNSQUERY names the tool."""

import json
import os
import subprocess
import sys
import time
import unittest

import harness
import peers

TOOL = os.environ.get("SUBRELAY_DNSQUERY")


def setUpModule():
    global DNS
    if not TOOL or not os.access(TOOL, os.X_OK):
        raise AssertionError("SUBRELAY_DNSQUERY is not set to the subrelay-dnsquery tool")
    DNS = peers.Unbound(peers.testbed_zones())


def tearDownModule():
    DNS.close()


def query(name, qtype, servers=None, timeout_ms=2000, attempts=None):
    argv = [TOOL]
    for s in servers or [DNS.address]:
        argv += ["--server", s]
    argv += ["--timeout-ms", str(timeout_ms)]
    if attempts:
        argv += ["--attempts", str(attempts)]
    argv += [name, qtype]
    proc = harness.run(argv, timeout=30)
    if proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    lines = proc.stdout.decode().splitlines()
    if len(lines) != 1:
        raise AssertionError(f"expected one JSON line, got {proc.stdout!r}")
    return json.loads(lines[0])


class DnsTest(unittest.TestCase):
    def dump_logs(self, stream):
        stream.write("--- unbound log ---\n" + DNS.log_text()[-4000:] + "\n")

    def test_mx_order_and_preferences(self):
        a = query("MX.Test.", "MX")
        self.assertEqual(a["status"], "ok", a)
        self.assertEqual(a["name"], "mx.test")
        self.assertEqual(sorted((m["preference"], m["exchange"]) for m in a["mx"]),
                         [(10, "mx1.mx.test"), (20, "mx2.mx.test")])
        self.assertGreater(a["ttl"], 0)
        self.assertLessEqual(a["ttl"], 300)

    def test_no_mx_is_nodata_and_a_exists(self):
        a = query("nomx.test", "MX")
        self.assertEqual(a["status"], "nodata", a)
        self.assertEqual(a["mx"], [])
        b = query("nomx.test", "A")
        self.assertEqual(b["status"], "ok", b)
        self.assertEqual(b["addresses"], ["127.0.0.11"])

    def test_null_mx(self):
        a = query("nullmx.test", "MX")
        self.assertEqual(a["status"], "ok", a)
        self.assertEqual(a["mx"], [{"preference": 0, "exchange": ""}])

    def test_bad_mx_host_is_nxdomain(self):
        a = query("badmx.test", "MX")
        self.assertEqual(a["mx"], [{"preference": 10, "exchange": "nowhere.badmx.test"}])
        b = query("nowhere.badmx.test", "A")
        self.assertIn(b["status"], ("nxdomain", "nodata"), b)

    def test_nxdomain(self):
        a = query("does-not-exist.test", "A")
        self.assertEqual(a["status"], "nxdomain", a)
        self.assertEqual(a["addresses"], [])
        self.assertIn("NXDOMAIN", a["detail"])

    def test_servfail(self):
        a = query("servfail.test", "MX", timeout_ms=3000)
        self.assertEqual(a["status"], "servfail", a)
        self.assertIn(DNS.address, a["detail"])

    def test_timeout(self):
        start = time.monotonic()
        a = query("timeout.test", "A", timeout_ms=200, attempts=2)
        elapsed = time.monotonic() - start
        self.assertEqual(a["status"], "timeout", a)
        self.assertGreaterEqual(elapsed, 0.35)
        self.assertLess(elapsed, harness.scale(5))

    def test_refused(self):
        a = query("refused.test", "A")
        self.assertEqual(a["status"], "refused", a)

    def test_cname_chain(self):
        a = query("www.cname.test", "A")
        self.assertEqual(a["status"], "ok", a)
        self.assertEqual(a["name"], "www.cname.test")
        self.assertEqual(a["canonical_name"], "host.cname.test")
        self.assertEqual(a["addresses"], ["127.0.0.21"])
        self.assertLessEqual(a["ttl"], 120)  # the smallest TTL on the chain
        m = query("mail.cname.test", "MX")
        self.assertEqual(m["status"], "ok", m)
        self.assertEqual(m["canonical_name"], "mx.test")
        self.assertEqual(len(m["mx"]), 2)
        c = query("www.cname.test", "CNAME")
        self.assertEqual(c["status"], "ok", c)
        self.assertEqual(c["canonical_name"], "alias1.cname.test")

    def test_aaaa(self):
        a = query("mx3.mx.test", "AAAA")
        self.assertEqual(a["status"], "ok", a)
        self.assertEqual(a["addresses"], ["::1"])
        b = query("www.cname.test", "AAAA")
        self.assertEqual(b["addresses"], ["::1"])
        c = query("mx1.mx.test", "AAAA")
        self.assertEqual(c["status"], "nodata", c)

    def test_txt(self):
        a = query("sel._domainkey.example.test", "TXT")
        self.assertEqual(a["status"], "ok", a)
        self.assertEqual(a["texts"], ["first part, second part"])

    def test_truncated_udp_retried_over_tcp(self):
        a = query("many.big.test", "A")
        self.assertEqual(a["status"], "ok", a)
        self.assertEqual(len(a["addresses"]), 80)
        self.assertEqual(len(set(a["addresses"])), 80)
        self.assertEqual(a["stats"]["tcp_queries"], 1, a["stats"])

    def test_first_server_dead_second_answers(self):
        start = time.monotonic()
        a = query("mx.test", "MX", servers=["127.0.0.1:9", DNS.address], timeout_ms=1500)
        self.assertEqual(a["status"], "ok", a)
        self.assertEqual(len(a["mx"]), 2)
        # Port 9 answers UDP with ICMP port unreachable: no need to wait for the timeout.
        self.assertLess(time.monotonic() - start, harness.scale(1.4))

    def test_only_dead_server(self):
        a = query("mx.test", "MX", servers=["127.0.0.1:9"], timeout_ms=300)
        self.assertIn(a["status"], ("error", "timeout"), a)
        self.assertIn("127.0.0.1:9", a["detail"])

    def test_bad_usage(self):
        proc = harness.run([TOOL, "mx.test", "SRV"])
        self.assertEqual(proc.returncode, 2)
        proc = harness.run([TOOL, "--server", "dns.example:53", "mx.test", "MX"])
        self.assertEqual(proc.returncode, 2)
        self.assertIn(b"dns.example:53", proc.stderr)

    def test_invalid_name(self):
        a = query("bad..name", "A")
        self.assertEqual(a["status"], "error", a)


if __name__ == "__main__":
    harness.main()
