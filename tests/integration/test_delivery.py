"""Outbound delivery (issue 3) with real peers on loopback (docs/testbed.md):
unbound answers the test zones, Postfix / aiosmtpd / smtp-sink play the MX hosts on
127.0.0.x, and the real subrelay binary resolves, connects, talks STARTTLS and records.

Covered: STARTTLS to Postfix; implicit MX; null MX (5.1.10, no connection); primary MX down ->
backup; 4xx -> retried then bounced on expiry; 5xx -> bounced at once (RFC 3464 DSN checked);
DNS timeout and SERVFAIL -> deferred; one message to three domains; connection reuse;
delivery.tls required / verify; queue retry; the per-attempt log line.
"""

import email
import email.policy
import os
import re
import socket
import time

import harness
import mta_peers
from harness import Account, ServerTestCase, scale, token
from mta_peers import AioSink, PostfixMx, SmtpSink, make_cert
from peers import Unbound, testbed_zones

SENDER = "app@bounce.test"
ACCOUNT = Account("app", "app-Passw0rd", ["@bounce.test"], mode="deliver")

# Extra zones: backup MX, a third domain, the bounce domain (DSNs come back to the sender).
EXTRA_ZONES = [
    'local-zone: "backup.test." static',
    'local-data: "backup.test. 300 IN MX 10 dead.backup.test."',
    'local-data: "backup.test. 300 IN MX 20 alive.backup.test."',
    'local-data: "dead.backup.test. 300 IN A 127.0.0.41"',
    'local-data: "alive.backup.test. 300 IN A 127.0.0.12"',
    'local-zone: "third.test." static',
    'local-data: "third.test. 300 IN MX 5 mx.third.test."',
    'local-data: "mx.third.test. 300 IN A 127.0.0.13"',
    'local-zone: "bounce.test." static',
    'local-data: "bounce.test. 300 IN MX 10 mx.bounce.test."',
    'local-data: "mx.bounce.test. 300 IN A 127.0.0.14"',
    'local-zone: "plain.test." static',
    'local-data: "plain.test. 300 IN MX 10 mx.plain.test."',
    'local-data: "mx.plain.test. 300 IN A 127.0.0.15"',
    'local-zone: "verify.test." static',
    'local-data: "verify.test. 300 IN MX 10 mx1.mx.test."',
    'local-zone: "badcert.test." static',
    'local-data: "badcert.test. 300 IN MX 10 wrongname.badcert.test."',
    'local-data: "wrongname.badcert.test. 300 IN A 127.0.0.11"',
]

_dns = None


def dns():
    global _dns
    if _dns is None:
        lines, extra = testbed_zones()
        _dns = Unbound((lines + EXTRA_ZONES, extra))
    return _dns


def message(to, subject="delivery"):
    return harness.make_message(SENDER, to if isinstance(to, list) else [to], f"{subject} {token()}",
                                body="Hello from subrelay's delivery test.\r\n.leading dot line\r\n")


def submit(srv, rcpts, msg=None):
    conn = harness.smtp_ssl(srv.port("implicit"))
    conn.login(ACCOUNT.username, ACCOUNT.password)
    qid = harness.submit(conn, SENDER, rcpts, msg or message(rcpts))
    conn.quit()
    return qid


def wait_states(srv, qid, pred, timeout=20):
    return harness.wait_states(srv, qid, pred, timeout)


def find_dsn(srv, about_qid, timeout=15):
    """The DSN subrelay queued for message about_qid (its X-Subrelay-Queue-ID)."""
    deadline = time.monotonic() + scale(timeout)
    while True:
        for m in srv.queue_list():
            if m["sender"] == "" and m["id"] != about_qid:
                raw = srv.queue_raw(m["id"])
                if about_qid.encode() in raw:
                    return m, raw
        if time.monotonic() > deadline:
            raise AssertionError(f"no DSN for {about_qid}; queue: {srv.queue_list()}")
        time.sleep(0.2)


def dsn_status_fields(raw):
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report", msg.get_content_type()
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    types = [p.get_content_type() for p in parts]
    assert types[0] == "text/plain" and types[1] in ("message/delivery-status", "message/global-delivery-status") \
        and types[2] == "text/rfc822-headers", types
    text = raw.decode(errors="replace")
    return text


class Delivery(ServerTestCase):
    @classmethod
    def setUpClass(cls):
        cls.port = mta_peers.free_port("127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14", "127.0.0.15",
                                       "127.0.0.41")
        cls.mx1cert = make_cert(["mx1.mx.test", "mx2.mx.test", "nomx.test", "alive.backup.test"])
        cls.postfix = PostfixMx([f"127.0.0.11:{cls.port}", f"127.0.0.12:{cls.port}"], cert=cls.mx1cert.cert,
                                key=cls.mx1cert.key)
        cls.postfix.start()
        cls.third = AioSink(f"127.0.0.13:{cls.port}", cert=make_cert("mx.third.test"))
        cls.third.start()
        cls.bounces = AioSink(f"127.0.0.14:{cls.port}", cert=make_cert("mx.bounce.test"))
        cls.bounces.start()
        cls.plain = SmtpSink(f"127.0.0.15:{cls.port}")
        cls.plain.start()
        cls.srv = cls.start_class_server(accounts=[ACCOUNT], extra_config=cls.delivery_config())

    @classmethod
    def delivery_config(cls, **over):
        d = {"resolvers": [dns().address], "port": cls.port, "retry_schedule": ["1s"],
             "max_queue_time": "1h", "tls_ca_file": cls.mx1cert.ca,
             # The test MX hosts live on 127.0.0.x: a test bed is what the switch is for.
             "allow_private_destinations": True,
             "tls_policy_overrides": {"verify.test": "verify", "badcert.test": "verify",
                                      "plain.test": "required"}}
        d.update(over)
        # These tests read DSNs and delivered messages back with `queue show --raw`: keep
        # the bodies of finished messages (retention.finished_bodies defaults to "0s").
        return {"delivery": d, "retention": {"finished_bodies": "1h"}}

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        for p in (cls.postfix, cls.third, cls.bounces, cls.plain):
            p.stop()

    def postfix_message(self, subject_token, timeout=15):
        deadline = time.monotonic() + scale(timeout)
        while True:
            for m in self.postfix.messages():
                if subject_token.encode() in m["raw"]:
                    return m
            if time.monotonic() > deadline:
                raise AssertionError(f"not delivered to Postfix: {subject_token}\n{self.postfix.maillog()[-3000:]}")
            time.sleep(0.1)

    def test_starttls_to_postfix(self):
        tok = token("pf")
        qid = submit(self.srv, ["alice@mx.test"], message("alice@mx.test", tok))
        m = self.postfix_message(tok)
        self.assertIn(b"using TLSv1.3", m["raw"])
        self.assertEqual(m["rcpt_tos"], ["alice@mx.test"])
        self.assertEqual(m["mail_from"], SENDER)
        # What arrived is what was stored (after Postfix's own Received line).
        stored = self.srv.queue_raw(qid)
        self.assertTrue(m["raw"].replace(b"\n", b"\r\n").endswith(stored) or m["raw"].endswith(stored),
                        "content changed in transit")
        info = wait_states(self.srv, qid, lambda s: s == {"alice@mx.test": "delivered"})
        att = info["history"][-1]
        self.assertEqual(att["result"], "delivered")
        self.assertEqual(att["tls_version"], "TLSv1.3")
        self.assertIn("mx1.mx.test [127.0.0.11]", att["mx"])
        self.assertEqual(att["code"], 250)
        self.srv.wait_log(rf"delivered id={qid} rcpt=<alice@mx.test> mx=mx1\.mx\.test \[127\.0\.0\.11\]:\d+ tls=TLSv1\.3")

    def test_implicit_mx(self):
        tok = token("nomx")
        qid = submit(self.srv, ["bob@nomx.test"], message("bob@nomx.test", tok))
        self.postfix_message(tok)
        info = wait_states(self.srv, qid, lambda s: s == {"bob@nomx.test": "delivered"})
        self.assertIn("nomx.test [127.0.0.11]", info["history"][-1]["mx"])

    def test_null_mx_fails_at_once_with_a_dsn(self):
        qid = submit(self.srv, ["carol@nullmx.test"])
        info = wait_states(self.srv, qid, lambda s: s == {"carol@nullmx.test": "failed"})
        self.assertEqual(info["history"][-1]["mx"], "")
        self.assertIn("5.1.10", info["recipients"][0]["last_error"] + info["history"][-1]["reply"])
        dsn, raw = find_dsn(self.srv, qid)
        text = dsn_status_fields(raw)
        self.assertIn("Status: 5.1.10", text)
        self.assertIn("Final-Recipient: rfc822; carol@nullmx.test", text)
        # The DSN itself is delivered to the sender's MX, from <>.
        got = self.bounces.wait_for(1)
        mine = [m for m in self.bounces.messages() if qid.encode() in m["raw"]]
        deadline = time.monotonic() + scale(15)
        while not mine and time.monotonic() < deadline:
            time.sleep(0.2)
            mine = [m for m in self.bounces.messages() if qid.encode() in m["raw"]]
        self.assertEqual(len(mine), 1, got)
        self.assertEqual(mine[0]["mail_from"], "")
        self.assertEqual(mine[0]["rcpt_tos"], [SENDER])

    def test_primary_down_backup_used(self):
        tok = token("backup")
        qid = submit(self.srv, ["dave@backup.test"], message("dave@backup.test", tok))
        self.postfix_message(tok)
        info = wait_states(self.srv, qid, lambda s: s == {"dave@backup.test": "delivered"})
        self.assertIn("alive.backup.test [127.0.0.12]", info["history"][-1]["mx"])

    def test_5xx_bounces_at_once(self):
        qid = submit(self.srv, ["permfail-1@third.test", "ok-1@third.test"])
        info = wait_states(self.srv, qid, lambda s: s.get("permfail-1@third.test") == "failed"
                           and s.get("ok-1@third.test") == "delivered")
        perm = [a for a in info["history"] if a["result"] == "failed"]
        self.assertEqual(len(perm), 1)
        self.assertEqual(perm[0]["code"], 550)
        dsn, raw = find_dsn(self.srv, qid)
        text = dsn_status_fields(raw)
        self.assertIn("Status: 5.1.1", text)
        self.assertIn("Diagnostic-Code: smtp; 550 5.1.1", text)
        self.assertIn("Remote-MTA: dns; mx.third.test", text)
        self.assertNotIn("ok-1@third.test", text.split("text/rfc822-headers")[0].split("delivery-status")[-1])
        self.assertEqual(dsn["recipients"][0]["address"], SENDER)

    def test_4xx_retried_then_bounced_on_expiry(self):
        srv = self.start_server(accounts=[ACCOUNT], extra_config=self.delivery_config(max_queue_time="4s"))
        qid = submit(srv, ["tempfail-1@third.test"])
        info = wait_states(srv, qid, lambda s: s == {"tempfail-1@third.test": "failed"}, timeout=30)
        results = [a["result"] for a in info["history"]]
        self.assertGreaterEqual(results.count("deferred"), 2, info["history"])
        self.assertEqual(results[-1], "failed")
        self.assertTrue(info["recipients"][0]["last_error"].startswith("expired"), info)
        dsn, raw = find_dsn(srv, qid)
        text = dsn_status_fields(raw)
        self.assertIn("Status: 4.4.7", text)
        self.assertIn("451 4.3.0", text)

    def test_dns_timeout_and_servfail_defer(self):
        qid = submit(self.srv, ["x@timeout.test", "y@servfail.test"])
        info = wait_states(self.srv, qid, lambda s: s == {"x@timeout.test": "deferred", "y@servfail.test": "deferred"},
                           timeout=30)
        errs = {r["address"]: r["last_error"] for r in info["recipients"]}
        self.assertRegex(errs["x@timeout.test"].lower(), r"timeout|timed out")
        self.assertRegex(errs["y@servfail.test"].lower(), r"servfail")
        self.srv.cli("queue", "drop", qid)

    def test_one_message_three_domains(self):
        tok = token("three")
        rcpts = ["a3@mx.test", "b3@nomx.test", "c3@third.test"]
        qid = submit(self.srv, rcpts, message(rcpts, tok))
        wait_states(self.srv, qid, lambda s: all(v == "delivered" for v in s.values()) and len(s) == 3)
        got = [m for m in self.third.messages() if tok.encode() in m["raw"]]
        self.assertEqual(len(got), 1)
        self.assertEqual(got[0]["rcpt_tos"], ["c3@third.test"])
        self.assertEqual(len([m for m in self.postfix.messages() if tok.encode() in m["raw"]]), 2)

    def test_connection_reused_for_queued_messages(self):
        # Five messages queued while delivery cannot run (no DNS), then made due together:
        # with one connection allowed per domain, one connection carries all five.
        srv = self.start_server(accounts=[ACCOUNT],
                                extra_config=self.delivery_config(resolvers=["127.0.0.1:9"]))
        conn = harness.smtp_ssl(srv.port("implicit"))
        conn.login(ACCOUNT.username, ACCOUNT.password)
        qids = [harness.submit(conn, SENDER, [f"reuse{i}@third.test"], message(f"reuse{i}@third.test"))
                for i in range(5)]
        conn.quit()
        srv.stop()
        self.assertEqual(srv.cli("queue", "retry", "--all").returncode, 0)
        srv.extra_config = self.delivery_config(max_connections_per_domain=1)
        before = self.third.stats()["connections"]
        srv.start()
        for q in qids:
            wait_states(srv, q, lambda s: all(v == "delivered" for v in s.values()))
        self.third.wait_idle()
        st = self.third.stats()
        self.assertEqual(st["connections"] - before, 1, st)

    def test_tls_required_defers_without_starttls(self):
        qid = submit(self.srv, ["p@plain.test"])
        info = wait_states(self.srv, qid, lambda s: s == {"p@plain.test": "deferred"})
        self.assertIn("STARTTLS", info["recipients"][0]["last_error"])
        self.assertEqual(self.plain.messages(), [])
        self.srv.cli("queue", "drop", qid)

    def test_tls_verify(self):
        tok = token("verify")
        qid = submit(self.srv, ["v@verify.test"], message("v@verify.test", tok))
        self.postfix_message(tok)
        wait_states(self.srv, qid, lambda s: s == {"v@verify.test": "delivered"})
        qid = submit(self.srv, ["w@badcert.test"])
        info = wait_states(self.srv, qid, lambda s: s == {"w@badcert.test": "deferred"})
        self.assertRegex(info["recipients"][0]["last_error"].lower(), r"certificate|verify|tls")
        self.srv.cli("queue", "drop", qid)

    def test_delay_notice_once(self):
        srv = self.start_server(accounts=[ACCOUNT],
                                extra_config=self.delivery_config(retry_schedule=["1h"], delay_notice="1s"))
        qid = submit(srv, ["tempfail-3@third.test"])
        wait_states(srv, qid, lambda s: s == {"tempfail-3@third.test": "deferred"})
        dsn, raw = find_dsn(srv, qid)
        text = dsn_status_fields(raw)
        self.assertIn("Action: delayed", text)
        self.assertIn("Will-Retry-Until:", text)
        time.sleep(2.5)  # several scheduler ticks later: still one notice
        notices = [m for m in srv.queue_list() if m["sender"] == "" and qid.encode() in srv.queue_raw(m["id"])]
        self.assertEqual(len(notices), 1)

    def test_queue_retry_makes_a_deferred_recipient_due(self):
        srv = self.start_server(accounts=[ACCOUNT],
                                extra_config=self.delivery_config(retry_schedule=["1h"]))
        qid = submit(srv, ["tempfail-2@third.test"])
        info = wait_states(srv, qid, lambda s: s == {"tempfail-2@third.test": "deferred"})
        n = len(info["history"])
        proc = srv.cli("queue", "retry", qid)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        deadline = time.monotonic() + scale(15)
        while len(srv.queue_show_json(qid)["history"]) == n:
            self.assertLess(time.monotonic(), deadline, "retry did not cause an attempt")
            time.sleep(0.1)
        proc = srv.cli("queue", "bounce", qid)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        dsn, raw = find_dsn(srv, qid)
        self.assertIn("bounced by operator", raw.decode(errors="replace"))


if __name__ == "__main__":
    harness.main()
