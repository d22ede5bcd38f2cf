"""The recipient domain's TLS policy in delivery, end to end (delivery.dnssec, delivery.mta_sts):
the real binary against a validating unbound serving the DNSSEC test bed (peers.DnssecTestbed)
plus static zones for MTA-STS, peers.HttpsPolicyServer for the policies and aiosmtpd MX hosts.

DANE (RFC 7672): signed.test's MX has a TLSA record matching its certificate -> delivered,
the attempt's tls_policy "dane"; mx2.signed.test (an implicit MX, TLSA through a secure CNAME)
presents another key -> deferred, never delivered; unsigned.test -> opportunistic as before.
MTA-STS (RFC 8461): an enforce policy listing the MX (certificate valid for it) -> delivered,
"mta-sts enforce"; an enforce policy that does not list the MX -> deferred with 4.7.5; a testing
policy -> delivered, "mta-sts testing"."""

import hashlib
import json
import socket
import subprocess
import time
import unittest

import harness
import mta_peers
import peers
from harness import Account, ServerTestCase, scale, token
from mta_peers import AioSink, make_cert

SENDER = "app@sender.test"
ACCOUNT = Account("app", "app-Passw0rd", ["@sender.test"], mode="deliver")

# MTA-STS domains (static zones next to the signed ones): name -> (mode, mx patterns, MX ip).
STS = {
    "enforce.test": ("enforce", ["mx.enforce.test"], "127.0.0.51"),
    "wrongmx.test": ("enforce", ["mx.elsewhere.test"], "127.0.0.52"),
    "testing.test": ("testing", ["mx.elsewhere.test"], "127.0.0.53"),
}
# A domain whose policy host accepts TCP connections and never answers.
DEAD_STS = ("deadsts.test", "127.0.0.54", "127.0.0.60")


def spki_sha256(cert_path):
    pub = subprocess.run(["openssl", "x509", "-in", cert_path, "-pubkey", "-noout"], check=True,
                         capture_output=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pub, check=True,
                         capture_output=True).stdout
    return hashlib.sha256(der).hexdigest()


def sts_zones(web_ip):
    lines = []
    for domain, (_, _, ip) in STS.items():
        lines += peers.static_mail_zone(domain, ip, web_ip, sts_id=domain.split('.')[0])
    domain, mx_ip, web = DEAD_STS
    lines += peers.static_mail_zone(domain, mx_ip, web, sts_id="dead")
    # The sender's domain, for DSNs: no MX host at all is fine (none is expected).
    lines += ['local-zone: "sender.test." static',
              'local-data: "sender.test. 300 IN SOA ns.sender.test. admin.sender.test. 1 3600 600 86400 30"']
    return lines


def wait_states(srv, qid, pred, timeout=30):
    deadline = time.monotonic() + scale(timeout)
    while True:
        info = srv.queue_show_json(qid)
        states = {r["address"]: r["state"] for r in info["recipients"]}
        if pred(states, info):
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"states never matched for {qid}: {json.dumps(info, indent=1)}")
        time.sleep(0.1)


class TlsPolicyDelivery(ServerTestCase):
    @classmethod
    def setUpClass(cls):
        cls.port = mta_peers.free_port("127.0.0.31", "127.0.0.32", "127.0.0.41", "127.0.0.51", "127.0.0.52",
                                       "127.0.0.53", DEAD_STS[1])
        # mx.signed.test (127.0.0.31): the key its TLSA record names. mx2.signed.test
        # (127.0.0.32): another key, though its certificate is from the trusted CA.
        cls.daneCert = make_cert(["mx.signed.test"])
        cls.otherCert = make_cert(["mx2.signed.test"])
        # hosted.unsigned.test: a domain in an unsigned zone whose MX is mx.signed.test.
        cls.bed = peers.DnssecTestbed(tlsa=["3 1 1 " + spki_sha256(cls.daneCert.cert)],
                                      extra={"unsigned.test": ["hosted IN MX 10 mx.signed.test."]})
        webCert = make_cert([f"mta-sts.{d}" for d in STS])
        cls.web = peers.HttpsPolicyServer(webCert.cert, webCert.key)
        lines, clauses = cls.bed.zones(extra_local=sts_zones(cls.web.ip))
        cls.dns = peers.Unbound((lines, clauses), validate=True)
        for domain, (mode, mx, _) in STS.items():
            getattr(cls.web, mode)(domain, mx)
        # The dead policy host: the kernel completes the TCP handshake (backlog), nobody reads.
        cls.black_hole = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        cls.black_hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        cls.black_hole.bind((DEAD_STS[2], cls.web.port))
        cls.black_hole.listen(16)
        cls.sinks = {
            "signed": AioSink(f"127.0.0.31:{cls.port}", cert=cls.daneCert),
            "signed2": AioSink(f"127.0.0.32:{cls.port}", cert=cls.otherCert),
            "unsigned": AioSink(f"127.0.0.41:{cls.port}", cert=make_cert(["mx.unsigned.test"])),
        }
        for domain, (_, _, ip) in STS.items():
            cls.sinks[domain] = AioSink(f"{ip}:{cls.port}", cert=make_cert([f"mx.{domain}"]))
        cls.sinks[DEAD_STS[0]] = AioSink(f"{DEAD_STS[1]}:{cls.port}", cert=make_cert([f"mx.{DEAD_STS[0]}"]))
        for s in cls.sinks.values():
            s.start()
        cls.srv = cls.start_class_server(accounts=[ACCOUNT], extra_config={
            "delivery": {"resolvers": [cls.dns.address], "port": cls.port, "retry_schedule": ["1h"],
                         "max_queue_time": "1h", "tls_ca_file": cls.daneCert.ca,
                         "allow_private_destinations": True, "dnssec": True, "mta_sts": True,
                         "mta_sts_https_port": cls.web.port},
            "retention": {"finished_bodies": "1h"}})

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        for s in cls.sinks.values():
            s.stop()
        cls.web.close()
        cls.black_hole.close()
        cls.dns.close()
        cls.bed.close()

    def submit(self, rcpt):
        return self.submit_to(self.srv, rcpt)

    def submit_to(self, srv, rcpt):
        conn = harness.smtp_ssl(srv.port("implicit"))
        conn.login(ACCOUNT.username, ACCOUNT.password)
        msg = harness.make_message(SENDER, [rcpt], f"tls policy {token()}", body="Hello.\r\n")
        qid = harness.submit(conn, SENDER, [rcpt], msg)
        conn.quit()
        return qid

    def delivered(self, rcpt):
        qid = self.submit(rcpt)
        info = wait_states(self.srv, qid, lambda s, i: s == {rcpt: "delivered"})
        return info["history"][-1]

    def deferred(self, rcpt):
        qid = self.submit(rcpt)
        info = wait_states(self.srv, qid, lambda s, i: s == {rcpt: "deferred"} and i["history"])
        return info

    def test_dane_match_delivers(self):
        att = self.delivered("alice@signed.test")
        self.assertEqual(att["tls_policy"], "dane")
        self.assertIn("mx.signed.test [127.0.0.31]", att["mx"])
        self.assertTrue(att["tls_version"].startswith("TLSv1"), att)

    def test_dane_for_an_unsigned_domain_hosted_on_a_signed_mx(self):
        # RFC 7672 2.2.1: the MX RRset is insecure, the MX host's records are signed: DANE
        # with the host's TLSA records (as Postfix does).
        att = self.delivered("hank@hosted.unsigned.test")
        self.assertEqual(att["tls_policy"], "dane")
        self.assertIn("mx.signed.test [127.0.0.31]", att["mx"])

    def test_dane_mismatch_defers(self):
        info = self.deferred("bob@mx2.signed.test")
        att = info["history"][-1]
        self.assertEqual(att["result"], "deferred")
        self.assertEqual(att["tls_policy"], "dane")
        self.assertIn("DANE: no TLSA record matched", att["reply"])
        self.assertEqual(self.sinks["signed2"].messages(), [])

    def test_unsigned_zone_is_opportunistic(self):
        att = self.delivered("carol@unsigned.test")
        self.assertEqual(att["tls_policy"], "opportunistic (delivery.tls)")

    def test_mta_sts_enforce_delivers_verified(self):
        att = self.delivered("dave@enforce.test")
        self.assertEqual(att["tls_policy"], "mta-sts enforce id=enforce")
        self.assertGreaterEqual(self.web.hits("enforce.test"), 1)

    def test_mta_sts_enforce_mx_not_listed_defers(self):
        info = self.deferred("erin@wrongmx.test")
        att = info["history"][-1]
        self.assertEqual(att["mx"], "")
        self.assertIn("4.7.5", info["recipients"][0]["last_error"] + att["reply"])
        self.assertEqual(self.sinks["wrongmx.test"].messages(), [])
        # RFC 8461 5.1 step 3: the deferral makes serve look for an updated policy at once.
        self.srv.wait_log(r"mta-sts recheck domain=wrongmx\.test source=\w+ id=wrongmx")

    def test_mta_sts_turned_on_by_sighup(self):
        # Its own server with delivery.mta_sts false: enforce.test's policy is not looked up;
        # a SIGHUP that turns it on makes the fetcher, and the policy applies at once.
        import test_reload
        delivery = dict(self.srv.extra_config["delivery"], mta_sts=False, dnssec=False)
        srv = self.start_server(accounts=[ACCOUNT], extra_config=dict(self.srv.extra_config, delivery=delivery))
        first = self.submit_to(srv, "off@enforce.test")
        info = wait_states(srv, first, lambda s, i: s == {"off@enforce.test": "delivered"})
        self.assertEqual(info["history"][-1]["tls_policy"], "opportunistic (delivery.tls)")
        srv.extra_config = dict(srv.extra_config, delivery=dict(delivery, mta_sts=True))
        srv.write_config()
        test_reload.hup(srv, "reload done")
        second = self.submit_to(srv, "on@enforce.test")
        info = wait_states(srv, second, lambda s, i: s == {"on@enforce.test": "delivered"})
        self.assertEqual(info["history"][-1]["tls_policy"], "mta-sts enforce id=enforce")

    def test_mta_sts_testing_delivers(self):
        att = self.delivered("frank@testing.test")
        self.assertEqual(att["tls_policy"], "mta-sts testing id=testing")

    def test_dead_policy_host_delays_delivery_by_the_budget_at_most(self):
        # RFC 8461 3.3: a failed fetch without a cached policy is "no policy"; the policy
        # host is given 10 s in all (delivery_service.cpp), not the fetch's full minute.
        started = time.monotonic()
        att = self.delivered("grace@deadsts.test")
        elapsed = time.monotonic() - started
        self.assertEqual(att["tls_policy"], "opportunistic (delivery.tls)")
        self.assertGreaterEqual(elapsed, 9)
        self.assertLess(elapsed, scale(30))

    def test_requiretls_goes_to_mx_hosts_from_a_signed_zone_only(self):
        # RFC 8689 4.2.1 step 2. The sinks do not offer REQUIRETLS, so the message that may
        # go to mx.signed.test fails there with 5.7.30 (after connecting, over DANE); the
        # one for unsigned.test never leaves (5.7.10, no connection).
        results = {}
        for rcpt in ("rt@signed.test", "rt@unsigned.test"):
            conn = harness.smtp_ssl(self.srv.port("implicit"))
            conn.login(ACCOUNT.username, ACCOUNT.password)
            qid = harness.submit(conn, SENDER, [rcpt], harness.make_message(SENDER, [rcpt], f"rt {token()}"),
                                 mail_options=["REQUIRETLS"])
            conn.quit()
            results[rcpt] = wait_states(self.srv, qid, lambda s, i, r=rcpt: s == {r: "failed"})
        signed = results["rt@signed.test"]
        self.assertEqual(signed["recipients"][0]["last_status"], "5.7.30")
        self.assertIn("mx.signed.test [127.0.0.31]", signed["history"][-1]["mx"])
        self.assertEqual(signed["history"][-1]["tls_policy"], "dane")
        unsigned = results["rt@unsigned.test"]
        self.assertEqual(unsigned["recipients"][0]["last_status"], "5.7.10")
        self.assertEqual(unsigned["history"][-1]["mx"], "")


if __name__ == "__main__":
    unittest.main()
