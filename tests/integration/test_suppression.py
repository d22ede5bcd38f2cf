"""Per-account suppression lists (issue 13) with the real binary and a real receiving MTA
(a private Postfix on 127.0.0.11, tests/integration/mta_peers.py) behind unbound.

Covered: a 550 5.1.1 from the MX -> the DSN reaches the sender (through Postfix), the address
is on the account's list, the next RCPT to it from that account is refused at once with
"550 5.1.1 ... suppressed since ...", nothing queued, while another account still sends to it;
`suppression list --json`, `accounts --json` and the metric show it; `remove` makes it accepted
again while serve runs; `add` refuses; an unknown account is an error; a 452 4.2.2 and a
550 5.7.1 do not suppress; accounts[].suppression false neither records nor refuses;
suppression.ttl expiry; a capture-mode account's reserved address subrelay-bounce+TAG@ bounces
with a DSN and is suppressed.
"""

import json
import smtplib
import time
import urllib.request

import harness
import mta_peers
from harness import Account, ServerTestCase, scale, token
from mta_peers import PostfixMx, make_cert
from peers import Unbound, testbed_zones

SHOP = Account("shop", "shop-Passw0rd", ["@supp.test"], mode="deliver")
OTHER = Account("other", "other-Passw0rd", ["@other.test"], mode="deliver")
NOSUPP = Account("nosupp", "nosupp-Passw0rd", ["@nosupp.test"], mode="deliver", extra={"suppression": False})
CAPTURE = Account("cap", "cap-Passw0rd", ["@cap.test"], mode="capture")
ACCOUNTS = [SHOP, OTHER, NOSUPP, CAPTURE]
SENDERS = {"shop": "app@supp.test", "other": "app@other.test", "nosupp": "app@nosupp.test", "cap": "ci@cap.test"}
PASSWORDS = {a.username: a.password for a in ACCOUNTS}

# Every test domain, the senders' domains included (DSNs come back to them), has its MX on
# the Postfix at 127.0.0.11.
DOMAINS = ["supp.test", "other.test", "nosupp.test", "cap.test"] + [f"s{i}.test" for i in range(1, 10)]
ZONES = []
for d in DOMAINS:
    ZONES += [f'local-zone: "{d}." static', f'local-data: "{d}. 300 IN MX 10 mx1.mx.test."']

_dns = None


def dns():
    global _dns
    if _dns is None:
        lines, extra = testbed_zones()
        _dns = Unbound((lines + ZONES, extra))
    return _dns


def connect(srv, account):
    conn = harness.smtp_ssl(srv.port("implicit"))
    conn.login(account, PASSWORDS[account])
    return conn


def submit(srv, account, rcpts, subject=None):
    sender = SENDERS[account]
    subject = subject or token("supp")
    msg = harness.make_message(sender, rcpts, subject)
    conn = connect(srv, account)
    try:
        return harness.submit(conn, sender, rcpts, msg)
    finally:
        conn.quit()


def rcpt_reply(srv, account, rcpt):
    """(code, text) of RCPT TO:<rcpt> in a fresh transaction of `account`; nothing is sent."""
    conn = connect(srv, account)
    try:
        code, _ = conn.mail(SENDERS[account])
        assert code == 250, code
        code, resp = conn.rcpt(rcpt)
        conn.rset()
        return code, resp.decode(errors="replace")
    finally:
        conn.quit()


def wait_states(srv, qid, pred, timeout=30):
    return harness.wait_states(srv, qid, pred, timeout)


def suppressions(srv, account):
    proc = srv.cli("suppression", "list", account, "--json")
    if proc.returncode != 0:
        raise AssertionError(f"suppression list exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    return [json.loads(line) for line in proc.stdout.decode().splitlines() if line.strip()]


def wait_refused(srv, account, rcpt, timeout=10):
    return harness.wait_for(lambda: (lambda r: r if r[0] == 550 else None)(rcpt_reply(srv, account, rcpt)),
                            f"RCPT {rcpt} from {account} refused", timeout=timeout, interval=0.2)


def wait_accepted(srv, account, rcpt, timeout=10):
    return harness.wait_for(lambda: (lambda r: r if r[0] == 250 else None)(rcpt_reply(srv, account, rcpt)),
                            f"RCPT {rcpt} from {account} accepted", timeout=timeout, interval=0.2)


class Suppression(ServerTestCase):
    @classmethod
    def setUpClass(cls):
        cls.port = mta_peers.free_port("127.0.0.11")
        cls.cert = make_cert(["mx1.mx.test"])
        cls.postfix = PostfixMx([f"127.0.0.11:{cls.port}"], cert=cls.cert.cert, key=cls.cert.key,
                                recipient_access={"policy@": "550 5.7.1 rejected by local policy",
                                                  "full@": "452 4.2.2 mailbox full"})
        cls.postfix.start()
        cls.metrics_port = harness.free_port()
        cls.srv = cls.start_class_server(accounts=ACCOUNTS, extra_config=cls.config(
            metrics={"address": f"127.0.0.1:{cls.metrics_port}"}))

    @classmethod
    def config(cls, **over):
        d = {"resolvers": [dns().address], "port": cls.port, "retry_schedule": ["1s"], "max_queue_time": "1h",
             "tls_ca_file": cls.cert.ca, "allow_private_destinations": True}
        cfg = {"delivery": d, "retention": {"finished_bodies": "1h"}}
        cfg.update(over)
        return cfg

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        cls.postfix.stop()

    def dsn_at_postfix(self, qid, sender, timeout=30):
        """The DSN about qid that Postfix received for `sender` (from <>)."""
        def find():
            for m in self.postfix.messages():
                if m["mail_from"] == "" and m["rcpt_tos"] == [sender] and qid.encode() in m["raw"]:
                    return m
            return None
        return harness.wait_for(find, f"the DSN about {qid} at the sender's MX", timeout=timeout)

    def test_hard_bounce_suppresses_then_refuses_for_that_account_only(self):
        srv = self.srv
        rcpt = "permfail@s1.test"
        qid = submit(srv, "shop", [rcpt])
        wait_states(srv, qid, lambda s: s == {rcpt: "failed"})
        # The sender hears of it: the DSN crossed the real MTA.
        dsn = self.dsn_at_postfix(qid, SENDERS["shop"])
        self.assertIn(b"Status: 5.1.1", dsn["raw"])
        # The address is on the account's list, with the reply as its reason.
        rows = harness.wait_for(lambda: [r for r in suppressions(srv, "shop") if r["address"] == rcpt],
                                "the suppression row")
        self.assertEqual(len(rows), 1)
        self.assertEqual(rows[0]["source"], "bounce")
        self.assertIn("5.1.1", rows[0]["reason"])
        self.assertIsNone(rows[0]["expires_at"])
        self.assertEqual([r for r in suppressions(srv, "other") if r["address"] == rcpt], [])
        # The next RCPT from that account is refused at once, within the reload interval.
        before = len(srv.queue_list())
        code, text = wait_refused(srv, "shop", rcpt)
        self.assertRegex(text, r"^5\.1\.1 <permfail@s1\.test>: recipient suppressed since "
                               r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC: .*5\.1\.1")
        # The whole transaction: a second, good recipient goes; the suppressed one is not queued.
        conn = connect(srv, "shop")
        with self.assertRaises(smtplib.SMTPRecipientsRefused):
            harness.submit(conn, SENDERS["shop"], ["ok@s1.test", rcpt],
                           harness.make_message(SENDERS["shop"], ["ok@s1.test", rcpt], token("x")))
        conn.quit()
        self.assertEqual(len(srv.queue_list()), before)
        srv.wait_log(r"suppressed account=shop rcpt=<permfail@s1\.test>")
        # Another account still sends to it (and gets its own bounce).
        qid2 = submit(srv, "other", [rcpt])
        wait_states(srv, qid2, lambda s: s == {rcpt: "failed"})
        # accounts shows the count; the metric counts the refusals.
        acc = {json.loads(l)["account"]: json.loads(l)
               for l in srv.cli("accounts", "--json").stdout.decode().splitlines() if l.strip()}
        self.assertGreaterEqual(acc["shop"]["suppressed"], 1)
        self.assertEqual(acc["other"]["suppressed"], 1)  # its own bounce
        table = srv.cli("accounts").stdout.decode()
        self.assertIn("SUPPRESSED", table.splitlines()[0])
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        self.assertRegex(body, r'subrelay_suppressed_rcpts_total\{account="shop"\} [1-9]')
        # remove: accepted again while serve runs.
        proc = srv.cli("suppression", "remove", "shop", rcpt)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        wait_accepted(srv, "shop", rcpt)
        self.assertEqual([r for r in suppressions(srv, "shop") if r["address"] == rcpt], [])
        proc = srv.cli("suppression", "remove", "shop", rcpt)
        self.assertEqual(proc.returncode, 1)

    def test_add_refuses_and_unknown_account_is_an_error(self):
        srv = self.srv
        rcpt = "Complained@S2.test"
        self.assertEqual(rcpt_reply(srv, "shop", rcpt)[0], 250)
        proc = srv.cli("suppression", "add", "shop", rcpt, "--reason", "asked us to stop")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        code, text = wait_refused(srv, "shop", "Complained@s2.test")
        self.assertIn("asked us to stop", text)
        self.assertIn("<Complained@s2.test>", text)
        rows = [r for r in suppressions(srv, "shop") if r["address"] == "Complained@s2.test"]
        self.assertEqual(len(rows), 1)
        self.assertEqual(rows[0]["source"], "manual")
        proc = srv.cli("suppression", "add", "nobody", "x@s2.test")
        self.assertEqual(proc.returncode, 1)
        self.assertIn("no such account: nobody", proc.stderr.decode())
        proc = srv.cli("suppression", "list", "nobody")
        self.assertEqual(proc.returncode, 1)
        proc = srv.cli("suppression", "add", "shop", "not-an-address")
        self.assertEqual(proc.returncode, 1)
        self.assertEqual(srv.cli("suppression", "frob", "shop").returncode, 2)
        self.assertEqual(srv.cli("suppression", "list").returncode, 2)
        srv.cli("suppression", "remove", "shop", "Complained@s2.test")
        wait_accepted(srv, "shop", "Complained@s2.test")

    def test_soft_and_policy_failures_do_not_suppress(self):
        srv = self.srv
        # One message: a hard bounce beside a policy refusal (5.7.1) and a full mailbox (4.2.2).
        qid = submit(srv, "shop", ["policy@s3.test", "full@s3.test", "permfail@s3.test"])
        wait_states(srv, qid, lambda s: s.get("policy@s3.test") == "failed" and s.get("full@s3.test") == "deferred"
                    and s.get("permfail@s3.test") == "failed")
        self.dsn_at_postfix(qid, SENDERS["shop"])
        wait_refused(srv, "shop", "permfail@s3.test")
        time.sleep(scale(3))  # longer than serve's reload interval
        self.assertEqual([r["address"] for r in suppressions(srv, "shop") if r["address"].endswith("@s3.test")],
                         ["permfail@s3.test"])
        self.assertEqual(rcpt_reply(srv, "shop", "policy@s3.test")[0], 250)
        self.assertEqual(rcpt_reply(srv, "shop", "full@s3.test")[0], 250)
        srv.cli("queue", "drop", qid)

    def test_switched_off_neither_records_nor_refuses(self):
        srv = self.srv
        rcpt = "permfail@s4.test"
        qid = submit(srv, "nosupp", [rcpt])
        wait_states(srv, qid, lambda s: s == {rcpt: "failed"})
        self.dsn_at_postfix(qid, SENDERS["nosupp"])
        self.assertEqual(suppressions(srv, "nosupp"), [])
        # Even an entry added by hand is not enforced while the switch is off; the same entry
        # of an account with the switch on is.
        self.assertEqual(srv.cli("suppression", "add", "nosupp", "manual@s4.test").returncode, 0)
        self.assertEqual(srv.cli("suppression", "add", "shop", "manual@s4.test").returncode, 0)
        wait_refused(srv, "shop", "manual@s4.test")
        time.sleep(scale(3))
        self.assertEqual(rcpt_reply(srv, "nosupp", rcpt)[0], 250)
        self.assertEqual(rcpt_reply(srv, "nosupp", "manual@s4.test")[0], 250)

    def test_ttl_expires_entries(self):
        srv = self.start_server(accounts=ACCOUNTS, extra_config=self.config(suppression={"ttl": "8s"}))
        rcpt = "permfail@s5.test"
        qid = submit(srv, "shop", [rcpt])
        wait_states(srv, qid, lambda s: s == {rcpt: "failed"})
        rows = harness.wait_for(lambda: suppressions(srv, "shop"), "the suppression row")
        self.assertIsNotNone(rows[0]["expires_at"])
        wait_refused(srv, "shop", rcpt, timeout=6)
        # After the ttl the entry no longer refuses, and the pruner deletes it.
        wait_accepted(srv, "shop", rcpt, timeout=20)
        harness.wait_for(lambda: srv.cli("suppression", "list", "shop", "--json").stdout.strip() == b"",
                         "the expired entry gone", timeout=20)

    def test_capture_mode_reserved_address_simulates_a_hard_bounce(self):
        srv = self.srv
        bounce = "subrelay-bounce+ci42@example.test"
        qid = submit(srv, "cap", [bounce, "someone@example.test"])
        info = srv.queue_show_json(qid)
        states = {r["address"]: r["state"] for r in info["recipients"]}
        self.assertEqual(states, {bounce: "failed", "someone@example.test": "captured"})
        # The sender's DSN is delivered like a real bounce's.
        dsn = self.dsn_at_postfix(qid, SENDERS["cap"])
        self.assertIn(b"Status: 5.1.1", dsn["raw"])
        self.assertIn(b"subrelay-bounce+ci42@example.test", dsn["raw"])
        rows = harness.wait_for(lambda: suppressions(srv, "cap"), "the suppression row")
        self.assertEqual([r["address"] for r in rows], [bounce])
        code, text = wait_refused(srv, "cap", bounce)
        self.assertIn("suppressed since", text)
        # Other addresses of the capture account are captured as before.
        self.assertEqual(rcpt_reply(srv, "cap", "subrelay-bounce-not@example.test")[0], 250)


if __name__ == "__main__":
    harness.main()
