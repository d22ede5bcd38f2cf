"""`subrelay tls-policy DOMAIN` (issue 12 item 6): the real binary against a validating unbound
serving the DNSSEC test bed (peers.DnssecTestbed) plus static zones, and
peers.HttpsPolicyServer for the MTA-STS policies (certificates from the test CA, trusted
through delivery.tls_ca_file as delivery trusts them).

Cases: signed.test (secure MX, usable TLSA) -> dane; hosted.test (unsigned, its MX host in
signed.test) -> dane; unsigned.test -> opportunistic; enforce.test (MTA-STS enforce listing its
MX) -> mta-sts enforce; testing.test -> mta-sts testing; override.test (tls_policy_overrides)
-> override; partner.test (relay_overrides) and an account's relay -> relay, without DNS;
delivery.dnssec false -> the AD bit is not trusted; bogus.test (TLSA SERVFAIL) -> the host is
unusable; a domain that does not exist and a dead resolver -> exit 1; --json; usage errors;
--help. No serve runs, and the command writes no queue database."""

import json
import os
import socket
import time
import unittest

import harness
import peers
from harness import subrelay
from mta_peers import make_cert

STS = {"enforce.test": ("enforce", "127.0.0.51"), "testing.test": ("testing", "127.0.0.53")}
ACCOUNTS = [harness.Account("app", "app-Passw0rd", ["@sender.test"], mode="deliver"),
            harness.Account("tenant", "tenant-Passw0rd", ["@tenant.test"], mode="deliver",
                            extra={"relay": [{"host": "127.0.0.1", "port": 2525, "verify": False}]})]


def setUpModule():
    global BED, WEB, DNS, CA
    BED = peers.DnssecTestbed()
    cert = make_cert([f"mta-sts.{d}" for d in STS])
    CA = cert.ca
    WEB = peers.HttpsPolicyServer(cert.cert, cert.key)
    extra = []
    for domain, (mode, ip) in STS.items():
        extra += peers.static_mail_zone(domain, ip, WEB.ip, sts_id=mode)
        getattr(WEB, mode)(domain, [f"mx.{domain}"])
    extra += peers.static_mail_zone("override.test", "127.0.0.55")
    # An unsigned domain whose MX host is in the signed zone (RFC 7672 2.2.1: DANE still).
    extra += ['local-zone: "hosted.test." static',
              'local-data: "hosted.test. 300 IN SOA ns.hosted.test. admin.hosted.test. 1 3600 600 86400 30"',
              'local-data: "hosted.test. 300 IN MX 10 mx.signed.test."']
    DNS = peers.Unbound(BED.zones(extra_local=extra), validate=True)


def tearDownModule():
    DNS.close()
    WEB.close()
    BED.close()


def write_config(**delivery):
    srv = harness.Server(accounts=ACCOUNTS, listeners=("implicit",))
    srv.extra_config = {"delivery": {
        "resolvers": [DNS.address], "tls_ca_file": CA, "allow_private_destinations": True,
        "dnssec": True, "mta_sts": True, "mta_sts_https_port": WEB.port,
        "tls_policy_overrides": {"override.test": "required"},
        "relay_overrides": {"partner.test": [{"host": "127.0.0.1", "port": 2587, "verify": False}]},
        **delivery}}
    return srv, srv.write_config()


def out_of(proc):
    return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


class TlsPolicyCommand(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.srv, cls.cfg = write_config()

    def run_cmd(self, *args, cfg=None, expect=0):
        proc = subrelay("tls-policy", *args, "-c", cfg or self.cfg, timeout=30)
        self.assertEqual(proc.returncode, expect, out_of(proc))
        return proc

    def text(self, domain, *args, **kw):
        return self.run_cmd(domain, *args, **kw).stdout.decode()

    def json(self, domain, *args, **kw):
        proc = self.run_cmd(domain, "--json", *args, **kw)
        lines = proc.stdout.decode().splitlines()
        self.assertEqual(len(lines), 1, proc.stdout)
        return json.loads(lines[0])

    def test_dane(self):
        out = self.text("signed.test")
        self.assertIn("MX 10 mx.signed.test: 127.0.0.31 (secure)", out)
        self.assertIn("_25._tcp.mx.signed.test TLSA: ok, secure", out)
        self.assertIn("mx.signed.test: dane:", out)
        self.assertTrue(out.endswith("policy: dane\n"), out)
        j = self.json("signed.test")
        self.assertEqual(j["policy"], "dane")
        self.assertTrue(j["route"]["mx_secure"])
        self.assertEqual([t["host"] for t in j["tlsa"]], ["mx.signed.test"])
        self.assertTrue(j["tlsa"][0]["secure"])
        self.assertTrue(j["tlsa"][0]["records"][0]["usable"])
        self.assertEqual([(h["host"], h["policy"]) for h in j["hosts"]], [("mx.signed.test", "dane")])

    def test_insecure_mx_to_a_signed_host_is_dane(self):
        out = self.text("hosted.test")
        self.assertIn("3. MX route: ok, MX RRset not DNSSEC-secure", out)
        self.assertIn("MX 10 mx.signed.test: 127.0.0.31 (secure)", out)
        self.assertIn("only the MX host name is a reference identifier", out)
        self.assertTrue(out.endswith("policy: dane\n"), out)

    def test_unsigned_zone_is_opportunistic(self):
        out = self.text("unsigned.test")
        self.assertIn("4. DANE: no: no MX host has DNSSEC-secure address records", out)
        self.assertIn("_mta-sts.unsigned.test TXT: nxdomain", out)
        self.assertIn("no policy (none)", out)
        self.assertTrue(out.endswith("policy: opportunistic\n"), out)

    def test_mta_sts_enforce(self):
        before = WEB.hits("enforce.test")
        proc = self.run_cmd("enforce.test")
        out = proc.stdout.decode()
        self.assertIn('_mta-sts.enforce.test TXT: ok "v=STSv1; id=enforce;"', out)
        self.assertIn("policy (fetched): mode enforce, id enforce", out)
        self.assertIn("mx.enforce.test: matches", out)
        self.assertTrue(out.endswith("policy: mta-sts enforce\n"), out)
        self.assertEqual(proc.stderr, b"")
        self.assertEqual(WEB.hits("enforce.test") - before, 1)
        j = self.json("enforce.test")
        self.assertEqual(j["policy"], "mta-sts enforce")
        self.assertEqual(j["mta_sts"]["policy"]["mode"], "enforce")
        self.assertEqual(j["mta_sts"]["policy"]["matching_hosts"], ["mx.enforce.test"])
        self.assertEqual(j["hosts"][0]["tls"], "mta-sts")

    def test_mta_sts_testing(self):
        self.assertEqual(self.json("testing.test")["policy"], "mta-sts testing")

    def test_override(self):
        out = self.text("override.test")
        self.assertIn("2. override: delivery.tls_policy_overrides: required", out)
        self.assertIn("5. MTA-STS: not consulted", out)
        self.assertTrue(out.endswith("policy: override required\n"), out)
        self.assertEqual(self.json("override.test")["policy"], "override required")

    def test_relay(self):
        out = self.text("partner.test")
        self.assertIn("relay domain:partner.test (delivery.relay_overrides)", out)
        self.assertIn("127.0.0.1:2587 STARTTLS, certificate not verified", out)
        self.assertTrue(out.endswith("policy: relay domain:partner.test\n"), out)
        j = self.json("partner.test")
        self.assertEqual(j["relay"]["id"], "domain:partner.test")
        self.assertIsNone(j["route"])
        # The sending account's relay: only with --account, named in a note otherwise.
        self.assertIn("tenant (use --account NAME", self.text("unsigned.test"))
        self.assertEqual(self.json("unsigned.test", "--account", "tenant")["policy"], "relay account:tenant")
        self.assertEqual(self.json("unsigned.test", "--account", "app")["policy"], "opportunistic")
        proc = self.run_cmd("unsigned.test", "--account", "nobody", expect=1)
        self.assertIn("no account nobody", proc.stderr.decode())

    def test_dnssec_off_does_not_trust_the_ad_bit(self):
        _, cfg = write_config(dnssec=False)
        out = self.text("signed.test", cfg=cfg)
        self.assertIn("delivery.dnssec is false: AD bit not trusted, no DANE", out)
        self.assertIn("MX 10 mx.signed.test: 127.0.0.31 (AD, not trusted)", out)
        self.assertTrue(out.endswith("policy: opportunistic\n"), out)

    def test_no_route_exits_1(self):
        proc = self.run_cmd("nosuchdomain.signed.test", expect=1)
        err = proc.stderr.decode()
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("no route to nosuchdomain.signed.test", err)
        self.assertIn("3. MX route: permfail", proc.stdout.decode())

    def test_tlsa_servfail_makes_the_host_unusable(self):
        # bogus.test: the TLSA RRset's signature is broken, the validator answers SERVFAIL
        # (RFC 7672 2.2.1: a lookup error, the host is not used; delivery is deferred).
        out = self.text("bogus.test")
        self.assertIn("_25._tcp.mx.bogus.test TLSA: servfail", out)
        self.assertIn("mx.bogus.test: unusable: not used: TLSA lookup for _25._tcp.mx.bogus.test failed", out)
        self.assertTrue(out.endswith("policy: none usable (delivery deferred, 4.7.5)\n"), out)

    def test_dead_resolver_exits_1_in_time(self):
        srv, cfg = write_config(resolvers=[f"{harness.LOOPBACK}:{harness.free_port(socket.SOCK_DGRAM)}"])
        started = time.monotonic()
        proc = self.run_cmd("signed.test", cfg=cfg, expect=1)
        self.assertLess(time.monotonic() - started, 20)
        self.assertIn("no route to signed.test", proc.stderr.decode())
        self.assertIn("3. MX route: tempfail", proc.stdout.decode())

    def test_writes_no_queue_database(self):
        self.text("enforce.test")
        self.assertFalse(os.path.exists(os.path.join(self.srv.data_dir, "queue.db")))

    def test_usage_and_help(self):
        for argv in (["tls-policy", "-c", self.cfg], ["tls-policy", "a.test", "b.test", "-c", self.cfg],
                     ["tls-policy", "a.test", "--bogus"], ["tls-policy", "a.test", "--account"],
                     ["tls-policy", "bad..domain", "-c", self.cfg], ["tls-policy"]):
            with self.subTest(argv=argv):
                proc = subrelay(*argv, timeout=10)
                self.assertEqual(proc.returncode, 2, out_of(proc))
                self.assertTrue(proc.stderr.strip())
        for flag in ("--help", "-h"):
            proc = subrelay("tls-policy", flag, timeout=10)
            self.assertEqual(proc.returncode, 0, out_of(proc))
            self.assertIn("usage: subrelay tls-policy DOMAIN", proc.stdout.decode())
        self.assertIn("tls-policy DOMAIN", subrelay("--help").stdout.decode())


if __name__ == "__main__":
    unittest.main()
