"""The SMTP DSN extension (RFC 3461) with the real binary and real receiving MTAs on loopback
(docs/testbed.md): unbound answers the zones, aiosmtpd sinks play the MX hosts, one offering
DSN and one not, and a third is the sender's own MX, where the DSNs we generate arrive.

Covered: EHLO offers DSN; malformed and repeated RET/ENVID/NOTIFY/ORCPT get 501 5.5.4;
`queue show` lists the parameters; NOTIFY=SUCCESS to an MX without DSN -> a "relayed" DSN
at the sender's MX (with Original-Recipient, Original-Envelope-Id); NOTIFY=SUCCESS to an MX
with DSN -> RET/ENVID/NOTIFY/ORCPT passed on exactly and no DSN from us; NOTIFY=NEVER with a
550 -> no DSN; NOTIFY=FAILURE,DELAY RET=HDRS ENVID -> a failure DSN with Original-Envelope-Id
and the headers only; RET=FULL -> the whole message comes back.
"""

import email
import email.policy
import smtplib
import time

import harness
import mta_peers
from harness import Account, ServerTestCase, scale, token
from mta_peers import AioSink, make_cert
from peers import Unbound, testbed_zones

SENDER = "app@dsnsender.test"
ACCOUNT = Account("app", "app-Passw0rd", ["@dsnsender.test"], mode="deliver")

DSN_IP, PLAIN_IP, SENDER_IP = "127.0.0.91", "127.0.0.92", "127.0.0.93"
ZONES = [
    'local-zone: "dsnmx.test." static',
    'local-data: "dsnmx.test. 300 IN MX 10 mx.dsnmx.test."',
    f'local-data: "mx.dsnmx.test. 300 IN A {DSN_IP}"',
    'local-zone: "plainmx.test." static',
    'local-data: "plainmx.test. 300 IN MX 10 mx.plainmx.test."',
    f'local-data: "mx.plainmx.test. 300 IN A {PLAIN_IP}"',
    'local-zone: "dsnsender.test." static',
    'local-data: "dsnsender.test. 300 IN MX 10 mx.dsnsender.test."',
    f'local-data: "mx.dsnsender.test. 300 IN A {SENDER_IP}"',
]

_dns = None


def dns():
    global _dns
    if _dns is None:
        lines, extra = testbed_zones()
        _dns = Unbound((lines + ZONES, extra))
    return _dns


def connect(srv):
    conn = harness.smtp_ssl(srv.port("implicit"))
    conn.login(ACCOUNT.username, ACCOUNT.password)
    return conn


def submit(srv, rcpts, mail_options=(), subject="dsn"):
    """rcpts: [(address, [rcpt options])]. Returns (queue id, subject token, body token)."""
    tok, body = token(subject), token("body")
    msg = harness.make_message(SENDER, [a for a, _ in rcpts], f"{subject} {tok}",
                               body=f"The body {body}.\r\n")
    conn = connect(srv)
    code, resp = conn.mail(SENDER, list(mail_options))
    assert code == 250, (code, resp)
    for addr, opts in rcpts:
        code, resp = conn.rcpt(addr, list(opts))
        assert code == 250, (addr, opts, code, resp)
    code, resp = conn.data(msg)
    assert code == 250, (code, resp)
    conn.quit()
    return harness.queued_id(resp), tok, body


def wait_settled(srv, qid, timeout=20):
    """`queue show --json` once no recipient waits and no DSN is pending: a DSN owed is then
    in the queue (the flag is cleared in the transaction that queues it)."""
    deadline = time.monotonic() + scale(timeout)
    while True:
        info = srv.queue_show_json(qid)
        rs = info["recipients"]
        if all(r["state"] in ("delivered", "failed") and not r["dsn_pending"] for r in rs):
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"{qid} never settled: {info}")
        time.sleep(0.1)


def dsns_about(srv, qid):
    out = []
    for m in srv.queue_list():
        if m["sender"] == "" and m["is_dsn"] and m["id"] != qid:
            raw = srv.queue_raw(m["id"])
            if qid.encode() in raw:
                out.append((m, raw))
    return out


def parts(raw):
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report", msg.get_content_type()
    return msg, msg.get_payload()


class Dsn(ServerTestCase):
    @classmethod
    def setUpClass(cls):
        cls.port = mta_peers.free_port(DSN_IP, PLAIN_IP, SENDER_IP)
        cls.dsnmx = AioSink(f"{DSN_IP}:{cls.port}", cert=make_cert("mx.dsnmx.test"), dsn=True)
        cls.dsnmx.start()
        cls.plainmx = AioSink(f"{PLAIN_IP}:{cls.port}", cert=make_cert("mx.plainmx.test"))
        cls.plainmx.start()
        cls.sendermx = AioSink(f"{SENDER_IP}:{cls.port}", cert=make_cert("mx.dsnsender.test"))
        cls.sendermx.start()
        d = {"resolvers": [dns().address], "port": cls.port, "retry_schedule": ["1s"],
             "max_queue_time": "1h", "allow_private_destinations": True}
        cls.srv = cls.start_class_server(accounts=[ACCOUNT], extra_config={
            "delivery": d, "retention": {"finished_bodies": "1h"}})

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        for p in (cls.dsnmx, cls.plainmx, cls.sendermx):
            p.stop()

    def arrived(self, sink, needle, timeout=15):
        deadline = time.monotonic() + scale(timeout)
        while True:
            mine = [m for m in sink.messages() if needle.encode() in m["raw"]]
            if mine:
                return mine
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing with {needle} at {sink!r}: {sink.log()[-2000:]}")
            time.sleep(0.1)

    # --- submission ---------------------------------------------------------------------

    def test_ehlo_offers_dsn_and_bad_parameters_get_501(self):
        conn = connect(self.srv)
        self.assertTrue(conn.has_extn("dsn"))
        bad_mail = {
            "RET=PART": b"Bad RET parameter",
            "ENVID=a+2x": b"Bad ENVID parameter",
            "ENVID=" + "e" * 101: b"Bad ENVID parameter",
        }
        for opt, text in bad_mail.items():
            code, resp = conn.mail(SENDER, [opt])
            self.assertEqual(code, 501, (opt, resp))
            self.assertTrue(resp.startswith(b"5.5.4 " + text), (opt, resp))
        code, resp = conn.mail(SENDER, ["RET=FULL", "RET=HDRS"])
        self.assertEqual((code, resp), (501, b"5.5.4 Duplicate RET parameter"))
        code, resp = conn.mail(SENDER, ["SIZE=10", "SIZE=10"])
        self.assertEqual((code, resp), (501, b"5.5.4 Duplicate SIZE parameter"))
        self.assertEqual(conn.mail(SENDER, ["RET=HDRS"])[0], 250)
        bad_rcpt = {
            ("NOTIFY=NEVER,SUCCESS",): b"Bad NOTIFY parameter",
            ("NOTIFY=SOMETIMES",): b"Bad NOTIFY parameter",
            ("ORCPT=bob@plainmx.test",): b"Bad ORCPT parameter",
            ("ORCPT=rfc822;" + "x" * 494,): b"Bad ORCPT parameter",
            ("NOTIFY=DELAY", "NOTIFY=FAILURE"): b"Duplicate NOTIFY parameter",
        }
        for opts, text in bad_rcpt.items():
            code, resp = conn.rcpt("bob@plainmx.test", list(opts))
            self.assertEqual(code, 501, (opts, resp))
            self.assertTrue(resp.startswith(b"5.5.4 " + text), (opts, resp))
        conn.quit()

    def test_queue_show_lists_the_parameters(self):
        conn = connect(self.srv)
        self.assertEqual(conn.mail(SENDER, ["RET=HDRS", "ENVID=SHOW+2B1"])[0], 250)
        self.assertEqual(conn.rcpt("tempfail-show@plainmx.test", ["NOTIFY=FAILURE,DELAY",
                                                                 "ORCPT=rfc822;Show+2Bx@plainmx.test"])[0], 250)
        code, resp = conn.data(harness.make_message(SENDER, ["tempfail-show@plainmx.test"], "show"))
        self.assertEqual(code, 250)
        conn.quit()
        qid = harness.queued_id(resp)
        info = self.srv.queue_show_json(qid)
        self.assertEqual(info["dsn_ret"], "HDRS")
        self.assertEqual(info["dsn_envid"], "SHOW+2B1")
        self.assertEqual(info["recipients"][0]["dsn_notify"], "FAILURE,DELAY")
        self.assertEqual(info["recipients"][0]["dsn_orcpt"], "rfc822;Show+2Bx@plainmx.test")
        text = self.srv.cli("queue", "show", qid).stdout.decode()
        self.assertIn("dsn-params: RET=HDRS ENVID=SHOW+2B1", text)
        self.assertIn("notify=FAILURE,DELAY", text)
        self.assertIn("orcpt=rfc822;Show+2Bx@plainmx.test", text)
        self.srv.cli("queue", "drop", qid)

    # --- success ------------------------------------------------------------------------

    def test_notify_success_to_an_mx_without_dsn_gets_a_relayed_dsn(self):
        qid, tok, _ = submit(self.srv, [("okplain@plainmx.test", ["NOTIFY=SUCCESS",
                                                                 "ORCPT=rfc822;OkPlain@plainmx.test"])],
                             mail_options=["ENVID=SUCC+2B1"], subject="relayed")
        got = self.arrived(self.plainmx, tok)
        # Nothing of DSN reached the MX that does not offer it (aiosmtpd would answer 555).
        self.assertEqual(got[0]["dsn_mail"], [])
        self.assertEqual(got[0]["rcpt_options"], [])
        wait_settled(self.srv, qid)
        found = dsns_about(self.srv, qid)
        self.assertEqual(len(found), 1, found)
        _, raw = found[0]
        msg, ps = parts(raw)
        self.assertEqual(msg["Subject"], "Successful Mail Delivery Report")
        status = ps[1].as_string()
        self.assertIn("Action: relayed", status)
        self.assertIn("Status: 2.0.0", status)
        self.assertIn("Final-Recipient: rfc822; okplain@plainmx.test", status)
        self.assertIn("Original-Recipient: rfc822; OkPlain@plainmx.test", status)
        self.assertIn("Original-Envelope-Id: SUCC+1", status)
        self.srv.wait_log(rf"success-notice id={qid} dsn=\S+ to=<{SENDER}>")
        # And it is delivered to the sender's MX, from <>.
        back = self.arrived(self.sendermx, qid)
        self.assertEqual(back[0]["mail_from"], "")
        self.assertEqual(back[0]["rcpt_tos"], [SENDER])

    def test_notify_success_to_an_mx_with_dsn_is_passed_on_and_no_dsn_from_us(self):
        qid, tok, _ = submit(self.srv, [("okdsn@dsnmx.test", ["NOTIFY=SUCCESS,FAILURE",
                                                             "ORCPT=rfc822;OkDsn+2Bx@dsnmx.test"]),
                                        ("other@dsnmx.test", [])],
                             mail_options=["RET=HDRS", "ENVID=Pass+2BOn"], subject="passon")
        got = self.arrived(self.dsnmx, tok)
        self.assertEqual(len(got), 1)
        m = got[0]
        # RFC 3461 5.2.1: RET and ENVID exactly as received, NOTIFY only where given, ORCPT
        # as given (case kept) or added for the recipient that had none.
        self.assertEqual(m["dsn_mail"], ["RET=HDRS", "ENVID=Pass+2BOn"])
        self.assertEqual(m["dsn_rcpt"]["okdsn@dsnmx.test"],
                         ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;OkDsn+2Bx@dsnmx.test"])
        self.assertEqual(m["dsn_rcpt"]["other@dsnmx.test"], ["ORCPT=rfc822;other@dsnmx.test"])
        info = wait_settled(self.srv, qid)
        self.assertEqual({r["state"] for r in info["recipients"]}, {"delivered"})
        self.assertEqual(dsns_about(self.srv, qid), [])

    # --- failure ------------------------------------------------------------------------

    def test_notify_never_with_a_550_gets_no_dsn(self):
        qid, _, _ = submit(self.srv, [("permfail-never@plainmx.test", ["NOTIFY=NEVER"])], subject="never")
        info = wait_settled(self.srv, qid)
        self.assertEqual(info["recipients"][0]["state"], "failed")
        self.assertEqual(dsns_about(self.srv, qid), [])
        self.srv.wait_log(rf"failed id={qid} dsn=none why=.*NOTIFY")

    def test_failure_dsn_with_envid_and_headers_only(self):
        qid, tok, body = submit(self.srv, [("permfail-hdrs@plainmx.test", ["NOTIFY=FAILURE,DELAY"])],
                                mail_options=["RET=HDRS", "ENVID=QQ+2B314"], subject="hdrs")
        wait_settled(self.srv, qid)
        found = dsns_about(self.srv, qid)
        self.assertEqual(len(found), 1, found)
        raw = found[0][1]
        msg, ps = parts(raw)
        self.assertEqual(msg["Subject"], "Undelivered Mail Returned to Sender")
        status = ps[1].as_string()
        self.assertIn("Original-Envelope-Id: QQ+314", status)
        self.assertIn("Action: failed", status)
        self.assertNotIn("Original-Recipient", status)
        self.assertEqual(ps[2].get_content_type(), "text/rfc822-headers")
        self.assertIn(tok.encode(), raw)
        self.assertNotIn(body.encode(), raw)

    def test_ret_full_returns_the_whole_message(self):
        qid, tok, body = submit(self.srv, [("permfail-full@plainmx.test", [])],
                                mail_options=["RET=FULL"], subject="full")
        wait_settled(self.srv, qid)
        found = dsns_about(self.srv, qid)
        self.assertEqual(len(found), 1, found)
        raw = found[0][1]
        _, ps = parts(raw)
        self.assertEqual(ps[2].get_content_type(), "message/rfc822")
        self.assertIn(body.encode(), raw)
        self.assertNotIn(b"Original-Envelope-Id", raw)


if __name__ == "__main__":
    harness.main()
