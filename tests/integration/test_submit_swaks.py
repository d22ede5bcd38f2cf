"""Submission with swaks: STARTTLS (--tls) and implicit TLS (--tlsc) with certificate
verification, AUTH PLAIN/LOGIN, --pipeline, several recipients, and swaks' exit codes
(0 ok, 2 connect, 23 MAIL, 24 no RCPT accepted, 25/26 DATA, 28 AUTH, 29 TLS)."""

import shutil

import harness
from harness import Account, token

WEBSHOP = Account("webshop", "correct horse battery staple", ["@shop.test"])
CI = Account("ci", "ci-secret-Passw0rd", ["@ci.test"])

SWAKS_EXIT = {0: "ok", 2: "connect", 6: "connection closed", 10: "prerequisite missing",
              21: "banner", 22: "HELO", 23: "MAIL", 24: "no RCPT accepted",
              25: "DATA refused", 26: "message refused after DATA", 28: "AUTH", 29: "TLS"}


class SubmitSwaks(harness.ServerTestCase):
    @classmethod
    def setUpClass(cls):
        if shutil.which("swaks") is None:
            raise AssertionError("swaks is not installed (apt-get install swaks "
                                 "libnet-ssleay-perl)")
        cls.srv = cls.start_class_server(listeners=("starttls", "implicit"),
                                         accounts=[WEBSHOP, CI],
                                         limits={"max_recipients": 5})

    def swaks(self, *args, mode="starttls", account=WEBSHOP, password=None, auth="PLAIN",
              sender="orders@shop.test", to="alice@example.net", verify=True, expect=0,
              tok=None):
        tok = tok or token("swaks")
        port = self.srv.port("starttls" if mode == "plain" else mode)
        argv = ["swaks", "--server", harness.LOOPBACK, "--port", str(port),
                "--helo", "swaks.subrelay.test", "--from", sender, "--to", to,
                "--header", f"Subject: swaks {tok}", "--body", f"body of {tok}\n",
                "--timeout", str(int(harness.scale(20)))]
        if mode == "starttls":
            argv.append("--tls")
        elif mode == "implicit":
            argv.append("--tlsc")
        if verify:
            argv += ["--tls-verify", "--tls-ca-path", harness.pki().ca]
        if auth:
            argv += ["--auth", auth, "--auth-user", account.username,
                     "--auth-password", password if password is not None else account.password]
        argv += list(args)
        proc = harness.run(argv, timeout=60)
        out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
        if proc.returncode == 10:
            raise AssertionError("swaks lacks a prerequisite (TLS needs libnet-ssleay-perl):\n"
                                 + out)
        self.assertEqual(proc.returncode, expect,
                         f"swaks exit {proc.returncode} ({SWAKS_EXIT.get(proc.returncode, '?')}),"
                         f" expected {expect} ({SWAKS_EXIT.get(expect, '?')}); transcript:\n"
                         + out)
        return tok, out

    def stored(self, tok):
        """[(queue entry, raw bytes)] for stored messages containing tok."""
        out = []
        for entry in self.srv.queue_list():
            raw = self.srv.queue_raw(entry["id"])
            if tok.encode() in raw:
                out.append((entry, raw))
        return out

    def assert_one_stored(self, tok, out, sender, rcpts, account=WEBSHOP):
        found = self.stored(tok)
        self.assertEqual(len(found), 1, f"expected one stored message with {tok}:\n{out}")
        entry, raw = found[0]
        qid = harness.queued_id(out.encode())
        self.assertEqual(entry["id"], qid)
        self.assertEqual(entry["account"], account.username)
        self.assertEqual(entry["sender"], sender)
        self.assertEqual(sorted(r["address"] for r in entry["recipients"]), sorted(rcpts))
        fields, _ = harness.split_message(raw)
        self.assertEqual(harness.field_name(fields[0]), b"received")
        self.assertIn(account.username.encode(), fields[0])
        self.assertIn(b"TLSv1.", fields[0])
        self.assertIn(f"body of {tok}\r\n".encode(), raw)
        # swaks writes its own Message-Id and Date: none is added.
        self.assertEqual(len(harness.header_values(raw, "message-id")), 1)
        self.assertEqual(len(harness.header_values(raw, "date")), 1)
        return entry, raw

    def test_starttls_auth_plain(self):
        tok, out = self.swaks(mode="starttls", auth="PLAIN")
        self.assertIn("AUTH PLAIN", out)
        self.assert_one_stored(tok, out, "orders@shop.test", ["alice@example.net"])

    def test_starttls_auth_login(self):
        tok, out = self.swaks(mode="starttls", auth="LOGIN")
        self.assertIn("AUTH LOGIN", out)
        self.assert_one_stored(tok, out, "orders@shop.test", ["alice@example.net"])

    def test_implicit_tls_plain_and_login(self):
        for auth in ("PLAIN", "LOGIN"):
            with self.subTest(auth=auth):
                tok, out = self.swaks(mode="implicit", auth=auth)
                self.assert_one_stored(tok, out, "orders@shop.test", ["alice@example.net"])

    def test_pipeline_several_recipients(self):
        rcpts = ["a@example.net", "b@example.org", "c@example.com"]
        for mode in ("starttls", "implicit"):
            with self.subTest(mode=mode):
                tok, out = self.swaks("--pipeline", mode=mode, to=",".join(rcpts))
                # swaks only pipelines if PIPELINING is advertised; its transcript then shows
                # MAIL, the RCPTs and DATA sent before the first reply is read.
                self.assertIn("PIPELINING", out)
                self.assert_one_stored(tok, out, "orders@shop.test", rcpts)

    def test_too_many_recipients_partially_accepted(self):
        rcpts = [f"r{i}@example.net" for i in range(7)]
        tok, out = self.swaks("--pipeline", to=",".join(rcpts))
        self.assertIn("452", out)
        self.assertIn("4.5.3", out)
        self.assert_one_stored(tok, out, "orders@shop.test", rcpts[:5])

    def test_wrong_password(self):
        tok, out = self.swaks(password="wrong", expect=28)
        self.assertIn("535", out)
        self.assertEqual(self.stored(tok), [])
        tok, out = self.swaks(mode="implicit", auth="LOGIN", password="wrong", expect=28)
        self.assertIn("535", out)

    def test_auth_without_tls_is_refused(self):
        # No STARTTLS: AUTH is not advertised on a starttls listener, so swaks gives up (28).
        tok, out = self.swaks(mode="plain", verify=False, expect=28)
        self.assertEqual(self.stored(tok), [])

    def test_no_auth_refused_at_mail(self):
        tok, out = self.swaks(auth=None, expect=23)
        self.assertIn("530", out)
        self.assertEqual(self.stored(tok), [])

    def test_sender_not_owned(self):
        tok, out = self.swaks(sender="ceo@bank.test", expect=23)
        self.assertIn("5.7.1", out)
        # Another account's domain.
        tok, out = self.swaks(account=CI, sender="orders@shop.test", expect=23)
        self.assertIn("5.7.1", out)

    def test_header_from_not_owned(self):
        tok, out = self.swaks("--header", "From: ceo@bank.test", expect=26)
        self.assertIn("550", out)
        self.assertIn("5.7.1", out)
        self.assertEqual(self.stored(tok), [])

    def test_unverifiable_certificate(self):
        # Verifying against the system CAs only must fail: the certificate checks are real.
        argv = ["swaks", "--server", harness.LOOPBACK, "--port", str(self.srv.port("implicit")),
                "--tlsc", "--tls-verify",
                "--quit-after", "EHLO", "--timeout", str(int(harness.scale(20)))]
        proc = harness.run(argv, timeout=60)
        self.assertEqual(proc.returncode, 29, proc.stdout.decode(errors="replace"))

    def test_connect_refused(self):
        port = harness.free_port()
        proc = harness.run(["swaks", "--server", harness.LOOPBACK, "--port", str(port),
                            "--to", "a@example.net", "--timeout", "5"], timeout=60)
        self.assertEqual(proc.returncode, 2)


if __name__ == "__main__":
    harness.main()
