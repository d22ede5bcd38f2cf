"""Destination policy (issue 10, item 4): delivery never connects to loopback, private,
link-local, CGNAT, multicast or this host's own addresses, and address-literal recipients are
refused at RCPT, unless delivery.allow_private_destinations is true (what the other delivery
tests, whose MX hosts live on 127.0.0.x, set).

A real unbound answers MX records pointing at 127.0.0.x; an aiosmtpd sink listens there and
must see no connection while the switch is off.
"""

import time

import harness
import mta_peers
from harness import Account, RawClient, scale, token
from peers import testbed_zones

SENDER = "app@shop.test"
ACCOUNT = Account("app", "app-Passw0rd", ["@shop.test"], mode="deliver")

ZONES = [
    'local-zone: "internal.test." static',
    'local-data: "internal.test. 300 IN MX 10 mx.internal.test."',
    'local-data: "mx.internal.test. 300 IN A 127.0.0.51"',
    'local-zone: "metadata.test." static',
    'local-data: "metadata.test. 300 IN A 169.254.169.254"',  # no MX: implicit MX to the A record
]


def wait_state(srv, qid, want, timeout=15):
    deadline = time.monotonic() + scale(timeout)
    while True:
        info = srv.queue_show_json(qid)
        states = {r["address"]: r for r in info["recipients"]}
        if all(r["state"] == want for r in states.values()):
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"{qid} never reached {want}: {info}")
        time.sleep(0.1)


class Destinations(mta_peers.OneMxTestCase):
    MX_IP = "127.0.0.51"
    MX_NAMES = ["mx.internal.test"]

    @classmethod
    def unbound_zones(cls):
        lines, extra = testbed_zones()
        return (lines + ZONES, extra)

    def server(self, allow):
        delivery = {"resolvers": [self.dns.address], "port": self.port, "retry_schedule": ["1s"]}
        if allow is not None:
            delivery["allow_private_destinations"] = allow
        return self.start_server(accounts=[ACCOUNT], extra_config={"delivery": delivery})

    def submit(self, srv, rcpt):
        tok = token("dest")
        conn = harness.smtp_ssl(srv.port("implicit"))
        conn.login(ACCOUNT.username, ACCOUNT.password)
        qid = harness.submit(conn, SENDER, [rcpt], harness.make_message(SENDER, [rcpt], tok))
        conn.quit()
        return qid, tok

    def test_private_mx_refused_by_default(self):
        srv = self.server(None)
        qid, tok = self.submit(srv, "victim@internal.test")
        info = wait_state(srv, qid, "failed")
        last = info["recipients"][0].get("last_error", "")
        self.assertIn("5.4.4", last)
        self.assertIn("loopback", last)
        qid2, _ = self.submit(srv, "x@metadata.test")
        info2 = wait_state(srv, qid2, "failed")
        self.assertIn("link-local", info2["recipients"][0].get("last_error", ""))
        time.sleep(0.5)
        self.assertFalse([m for m in self.sink.messages() if tok.encode() in m["raw"]],
                         "delivered to a loopback MX with allow_private_destinations off")
        srv.wait_log(r"route domain=internal\.test result=failed")

    def test_address_literal_refused_at_rcpt(self):
        srv = self.server(False)
        with RawClient(srv.port("implicit"), implicit_tls=True) as c:
            c.login("implicit", ACCOUNT)
            self.assertEqual(c.cmd(f"MAIL FROM:<{SENDER}>")[0], 250)
            code, lines = c.cmd("RCPT TO:<root@[127.0.0.1]>")
            self.assertEqual(code, 550)
            self.assertEqual(lines[0], "5.7.1 Address-literal recipients are not accepted "
                                       "(delivery.allow_private_destinations)")
            code, lines = c.cmd("RCPT TO:<root@[IPv6:::1]>")
            self.assertEqual(code, 550)
            self.assertEqual(c.cmd("RCPT TO:<ok@example.com>")[0], 250)

    def test_switch_allows_private_destinations(self):
        srv = self.server(True)
        qid, tok = self.submit(srv, "victim@internal.test")
        wait_state(srv, qid, "delivered")
        self.assertTrue([m for m in self.sink.messages() if tok.encode() in m["raw"]])
        with RawClient(srv.port("implicit"), implicit_tls=True) as c:
            c.login("implicit", ACCOUNT)
            self.assertEqual(c.cmd(f"MAIL FROM:<{SENDER}>")[0], 250)
            self.assertEqual(c.cmd(f"RCPT TO:<x@[127.0.0.51]>")[0], 250)


if __name__ == "__main__":
    harness.main()
