"""Submission with Python's smtplib: STARTTLS and implicit TLS verified against a test CA, AUTH
PLAIN and LOGIN, the stored bytes, RFC 6409 section 8 duties, refusals, the loopback `none`
listener and capture mode."""

import base64
import smtplib
import ssl
import time

import harness
from harness import Account, check_stored, make_message, submit, token


WEBSHOP = Account("webshop", "correct horse battery staple", ["@shop.test", "alerts@example.test"])
CI = Account("ci", "ci-secret-Passw0rd", ["@ci.test"])
DELIVERER = Account("deliverer", "deliver-me-pw", ["@deliver.test"], mode="deliver")


class SubmitSmtplib(harness.ServerTestCase):
    @classmethod
    def setUpClass(cls):
        cls.srv = cls.start_class_server(listeners=("starttls", "implicit", "none"),
                                         accounts=[WEBSHOP, CI, DELIVERER],
                                         hostname="relay.smtplib.test")

    # -- helpers -------------------------------------------------------------------------------
    def starttls_login(self, account=WEBSHOP, mech="PLAIN"):
        conn = harness.smtp_starttls(self.srv.port("starttls"))
        self.addCleanup(conn.close)
        self.auth(conn, account, mech)
        return conn

    def auth(self, conn, account, mech="PLAIN", initial_response_ok=True):
        conn.user, conn.password = account.username, account.password
        method = {"PLAIN": conn.auth_plain, "LOGIN": conn.auth_login}[mech]
        code, resp = conn.auth(mech, method, initial_response_ok=initial_response_ok)
        self.assertEqual(code, 235, resp)
        return resp

    def assert_queued(self, qid, sent, account, sender, rcpts, tls_version):
        stored = self.srv.queue_raw(qid)
        check_stored(self, stored, sent, account=account.username, tls_version=tls_version)
        entry = self.srv.queue_entry(qid)
        self.assertEqual(entry["account"], account.username)
        self.assertEqual(entry["sender"], sender)
        self.assertEqual(sorted(r["address"] for r in entry["recipients"]), sorted(rcpts))
        return entry

    def stored_with(self, marker):
        """Queue ids whose stored bytes contain marker."""
        return [qid for qid in self.srv.queue_ids() if marker.encode() in self.srv.queue_raw(qid)]

    # -- capabilities ----------------------------------------------------------------------------
    def test_greeting_and_ehlo_before_and_after_starttls(self):
        conn = smtplib.SMTP(harness.LOOPBACK, self.srv.port("starttls"),
                            timeout=harness.scale(10))
        self.addCleanup(conn.close)
        # smtplib keeps no greeting; ask for it again the hard way with a raw client below.
        code, _ = conn.ehlo("client.test")
        self.assertEqual(code, 250)
        for ext in ("pipelining", "size", "8bitmime", "enhancedstatuscodes", "smtputf8",
                    "chunking", "starttls"):
            self.assertTrue(conn.has_extn(ext), f"{ext} not advertised before TLS: "
                                                f"{conn.esmtp_features}")
        self.assertEqual(conn.esmtp_features["size"].strip(), "26214400")
        self.assertFalse(conn.has_extn("auth"), "AUTH advertised before TLS on a starttls listener")
        conn.starttls(context=harness.client_context())
        code, _ = conn.ehlo("client.test")
        self.assertEqual(code, 250)
        self.assertFalse(conn.has_extn("starttls"), "STARTTLS advertised again inside TLS")
        self.assertTrue(conn.has_extn("auth"))
        mechs = conn.esmtp_features["auth"].upper().split()
        self.assertIn("PLAIN", mechs)
        self.assertIn("LOGIN", mechs)
        self.assertNotIn("CRAM-MD5", mechs)

        with harness.RawClient(self.srv.port("starttls")) as raw:
            code, lines = raw.greeting
            self.assertEqual(code, 220)
            self.assertTrue(lines[0].startswith("relay.smtplib.test ESMTP subrelay"), lines)

    def test_certificate_is_verified(self):
        # A client that trusts only the system CAs must refuse the test certificate: the
        # verification in the other tests is real.
        ctx = ssl.create_default_context()
        with self.assertRaises(ssl.SSLCertVerificationError):
            conn = smtplib.SMTP_SSL(harness.LOOPBACK, self.srv.port("implicit"), context=ctx,
                                    timeout=harness.scale(10))
            conn.close()
        # ... and a client checking the name "localhost" against the test CA accepts it.
        conn = smtplib.SMTP_SSL("localhost", self.srv.port("implicit"),
                                context=harness.client_context(), timeout=harness.scale(10))
        conn.ehlo()
        conn.quit()

    # -- accepted mail ---------------------------------------------------------------------------
    def test_starttls_auth_plain_stored_byte_exact(self):
        conn = self.starttls_login(WEBSHOP, "PLAIN")
        tls = harness.tls_version_of(conn)
        tok = token()
        # No Message-ID, no Date: submission adds them (RFC 6409 8.2, 8.3). Lines starting
        # with a dot are dot-stuffed by smtplib and must be stored unstuffed.
        body = (f"token {tok}\r\n.leading dot\r\n..two dots\r\n.\r\n"
                "trailing spaces   \r\n\ttab line\r\n" + "x" * 990 + "\r\n\r\n\r\n")
        msg = make_message("orders@shop.test", ["alice@example.net", "bob@example.org"],
                           f"Order {tok}", body, message_id=False, date=False,
                           extra_headers=["X-Folded: first part", "\tsecond part",
                                          "X-Empty:", "Reply-To: <service@shop.test>"],
                           header_from='"Shop Orders" <orders@shop.test>')
        qid = submit(conn, "orders@shop.test", ["alice@example.net", "bob@example.org"], msg)
        self.assertTrue(self.srv.wait_log(rf"accepted.*{qid}|{qid}.*accepted"))
        self.assert_queued(qid, msg, WEBSHOP, "orders@shop.test",
                           ["alice@example.net", "bob@example.org"], tls)
        conn.quit()

    def test_message_id_and_date_detection(self):
        """Only real header fields named Message-ID / Date (any case) count as present."""
        conn = self.starttls_login(WEBSHOP)
        tls = harness.tls_version_of(conn)
        cases = {
            "other case": dict(message_id=False, date=False, extra_headers=[
                f"MESSAGE-id: <{token()}@shop.test>", "dATe: Thu, 1 Jan 2026 00:00:00 +0000"]),
            "resent fields only": dict(message_id=False, date=False, extra_headers=[
                f"Resent-Message-ID: <{token()}@shop.test>",
                "Resent-Date: Thu, 1 Jan 2026 00:00:00 +0000"]),
            "lookalikes in the body": dict(message_id=False, date=False, body=(
                f"Message-ID: <{token()}@shop.test>\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\n")),
            "folded values": dict(message_id=False, date=False, extra_headers=[
                "Message-ID:", f" <{token()}@shop.test>", "Date: Thu, 1 Jan 2026",
                "\t00:00:00 +0000"]),
        }
        for name, kw in cases.items():
            with self.subTest(case=name):
                msg = make_message("orders@shop.test", ["alice@example.net"],
                                   f"{name} {token()}", **kw)
                qid = submit(conn, "orders@shop.test", ["alice@example.net"], msg)
                self.assert_queued(qid, msg, WEBSHOP, "orders@shop.test", ["alice@example.net"],
                                   tls)

    def test_implicit_tls_auth_login(self):
        for initial_response_ok in (False, True):
            with self.subTest(initial_response=initial_response_ok):
                conn = harness.smtp_ssl(self.srv.port("implicit"))
                self.addCleanup(conn.close)
                tls = harness.tls_version_of(conn)
                self.assertTrue(conn.has_extn("auth"))
                self.auth(conn, WEBSHOP, "LOGIN", initial_response_ok=initial_response_ok)
                msg = make_message("alerts@example.test", ["ops@example.net"], f"Alert {token()}")
                qid = submit(conn, "alerts@example.test", ["ops@example.net"], msg)
                self.assert_queued(qid, msg, WEBSHOP, "alerts@example.test", ["ops@example.net"],
                                   tls)
                conn.quit()

    def test_login_helper_picks_a_mechanism(self):
        # smtplib.login() tries CRAM-MD5, PLAIN, LOGIN in that order, as advertised.
        conn = harness.smtp_starttls(self.srv.port("starttls"))
        self.addCleanup(conn.close)
        code, _ = conn.login(CI.username, CI.password)
        self.assertEqual(code, 235)
        msg = make_message("build@ci.test", ["dev@example.net"], f"Build {token()}")
        conn.sendmail("build@ci.test", ["dev@example.net"], msg)
        conn.quit()

    def test_several_messages_on_one_connection(self):
        conn = self.starttls_login(WEBSHOP)
        tls = harness.tls_version_of(conn)
        sent = {}
        for i in range(6):
            rcpts = [f"user{j}@example.net" for j in range(i % 3 + 1)]
            msg = make_message("orders@shop.test", rcpts, f"Message {i} {token()}",
                               f"number {i}\r\n" * (i * 50 + 1))
            qid = submit(conn, "orders@shop.test", rcpts, msg)
            self.assertNotIn(qid, sent, "queue id reused within one session")
            sent[qid] = (msg, rcpts)
            if i == 2:
                self.assertEqual(conn.rset()[0], 250)
                self.assertEqual(conn.noop()[0], 250)
        for qid, (msg, rcpts) in sent.items():
            self.assert_queued(qid, msg, WEBSHOP, "orders@shop.test", rcpts, tls)
        conn.quit()

    def test_8bit_body(self):
        conn = self.starttls_login(WEBSHOP)
        body = "Grüße aus Köln — ✓ 日本語\r\n".encode() + bytes(range(0x80, 0x100)) + b"\r\n"
        msg = make_message("orders@shop.test", ["kunde@example.net"], f"8bit {token()}", body,
                           extra_headers=["MIME-Version: 1.0",
                                          "Content-Type: text/plain; charset=utf-8",
                                          "Content-Transfer-Encoding: 8bit"])
        qid = submit(conn, "orders@shop.test", ["kunde@example.net"], msg,
                     mail_options=["BODY=8BITMIME"])
        self.assert_queued(qid, msg, WEBSHOP, "orders@shop.test", ["kunde@example.net"],
                           harness.tls_version_of(conn))

    def test_smtputf8(self):
        conn = self.starttls_login(WEBSHOP)
        sender = "jörg@shop.test"
        rcpts = ["用户@例子.test", "zoë@example.net"]
        msg = make_message(sender, rcpts, f"SMTPUTF8 {token()} — ünïcödé", "Grüße\r\n",
                           header_from="Jörg Müller <jörg@shop.test>",
                           extra_headers=["MIME-Version: 1.0",
                                          "Content-Type: text/plain; charset=utf-8"])
        qid = submit(conn, sender, rcpts, msg, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        self.assert_queued(qid, msg, WEBSHOP, sender, rcpts, harness.tls_version_of(conn))

    # -- refusals --------------------------------------------------------------------------------
    def test_wrong_password(self):
        conn = harness.smtp_starttls(self.srv.port("starttls"))
        self.addCleanup(conn.close)
        started = time.monotonic()
        with self.assertRaises(smtplib.SMTPAuthenticationError) as cm:
            conn.user, conn.password = WEBSHOP.username, "wrong password"
            code, resp = conn.auth("PLAIN", conn.auth_plain)
            raise AssertionError(f"bad password accepted: {code} {resp}")
        elapsed = time.monotonic() - started
        self.assertEqual(cm.exception.smtp_code, 535)
        self.assertIn(b"5.7.8", cm.exception.smtp_error)
        self.assertGreaterEqual(elapsed, 0.7, "no delay after a failed AUTH")
        # A user name that does not exist gets the same answer.
        with self.assertRaises(smtplib.SMTPAuthenticationError) as cm:
            conn.user, conn.password = "nobody", "whatever"
            conn.auth("LOGIN", conn.auth_login, initial_response_ok=False)
        self.assertEqual(cm.exception.smtp_code, 535)
        # Still no transaction without AUTH, and the right password still works afterwards.
        self.assertEqual(conn.mail("orders@shop.test")[0], 530)
        self.auth(conn, WEBSHOP)

    def test_mail_before_auth(self):
        conn = harness.smtp_starttls(self.srv.port("starttls"))
        self.addCleanup(conn.close)
        code, resp = conn.mail("orders@shop.test")
        self.assertEqual(code, 530, resp)
        self.assertIn(b"5.7.0", resp)
        code, resp = conn.rcpt("alice@example.net")
        self.assertGreaterEqual(code, 500, resp)
        code, resp = conn.docmd("DATA")
        self.assertGreaterEqual(code, 500, resp)
        # Implicit TLS listener: same.
        conn2 = harness.smtp_ssl(self.srv.port("implicit"))
        self.addCleanup(conn2.close)
        code, resp = conn2.mail("orders@shop.test")
        self.assertEqual(code, 530, resp)

    def test_auth_before_starttls(self):
        conn = smtplib.SMTP(harness.LOOPBACK, self.srv.port("starttls"), timeout=harness.scale(10))
        self.addCleanup(conn.close)
        conn.ehlo("client.test")
        self.assertFalse(conn.has_extn("auth"))
        cred = base64.b64encode(f"\0{WEBSHOP.username}\0{WEBSHOP.password}".encode()).decode()
        code, resp = conn.docmd("AUTH", "PLAIN " + cred)
        self.assertEqual(code, 538, resp)
        self.assertIn(b"5.7.11", resp)
        code, resp = conn.docmd("AUTH", "LOGIN")
        self.assertEqual(code, 538, resp)
        code, resp = conn.mail("orders@shop.test")
        self.assertEqual(code, 530, resp)
        # smtplib's own login() refuses too, since AUTH is not advertised.
        with self.assertRaises(smtplib.SMTPNotSupportedError):
            conn.login(WEBSHOP.username, WEBSHOP.password)

    def test_sender_not_owned(self):
        conn = self.starttls_login(WEBSHOP)
        for sender in ("ceo@bank.test", "build@ci.test", "orders@shop.test.evil.test",
                       "alerts@sub.example.test", "other@example.test"):
            with self.subTest(sender=sender):
                code, resp = conn.mail(sender)
                self.assertIn(code, (550, 553), resp)
                self.assertIn(b"5.7.1", resp)
                code, resp = conn.rcpt("alice@example.net")
                self.assertGreaterEqual(code, 500, f"RCPT after refused MAIL: {code} {resp}")
                conn.rset()
        # Domain match is case-insensitive; the right sender still works on this session.
        msg = make_message("Orders@SHOP.test", ["alice@example.net"], f"case {token()}")
        submit(conn, "Orders@SHOP.test", ["alice@example.net"], msg)

    def test_header_from_not_owned(self):
        conn = self.starttls_login(WEBSHOP)
        cases = [(h, ()) for h in (
            "ceo@bank.test", '"Shop" <ceo@bank.test>', "orders@shop.test, ceo@bank.test",
            '"orders@shop.test" <ceo@bank.test>', "Shop\r\n <ceo@bank.test>",
            "ceo@bank.test (orders@shop.test)", "<ceo@bank.test>", "ceo@BANK.test")]
        # Two From fields, the second one foreign (a malformed message may be refused as
        # such, 5.6.x, rather than as not owned).
        cases.append(("orders@shop.test", ("From: ceo@bank.test",)))
        for header_from, extra in cases:
            with self.subTest(header_from=header_from, extra=extra):
                tok = token("hdr")
                msg = make_message("orders@shop.test", ["alice@example.net"], f"Spoof {tok}",
                                   header_from=header_from, extra_headers=extra)
                code, resp = conn.mail("orders@shop.test")
                self.assertEqual(code, 250, resp)
                code, resp = conn.rcpt("alice@example.net")
                self.assertEqual(code, 250, resp)
                code, resp = conn.data(msg)
                self.assertEqual(code, 550, resp)
                if extra:
                    self.assertRegex(resp, rb"^(5\.7\.1|5\.6\.\d) ")
                else:
                    self.assertIn(b"5.7.1", resp)
                self.assertEqual(self.stored_with(tok), [], "refused message was stored")
        # Session still usable.
        msg = make_message("orders@shop.test", ["alice@example.net"], f"fine {token()}")
        submit(conn, "orders@shop.test", ["alice@example.net"], msg)

    def test_header_from_owned_variants(self):
        conn = self.starttls_login(WEBSHOP)
        tls = harness.tls_version_of(conn)
        for header_from in ('"ceo@bank.test" <orders@shop.test>',
                            "=?utf-8?q?Shop_=C3=96?= <orders@shop.test>",
                            "Orders@SHOP.TEST", "orders@shop.test (Shop orders)",
                            "Shop Orders\r\n <orders@shop.test>",
                            "orders@shop.test, alerts@example.test"):
            with self.subTest(header_from=header_from):
                msg = make_message("orders@shop.test", ["alice@example.net"],
                                   f"owned {token()}", header_from=header_from)
                qid = submit(conn, "orders@shop.test", ["alice@example.net"], msg)
                self.assert_queued(qid, msg, WEBSHOP, "orders@shop.test", ["alice@example.net"],
                                   tls)

    # -- the loopback `none` listener ------------------------------------------------------------
    def test_none_listener_requires_auth(self):
        conn = smtplib.SMTP(harness.LOOPBACK, self.srv.port("none"), timeout=harness.scale(10))
        self.addCleanup(conn.close)
        conn.ehlo("app.local")
        self.assertFalse(conn.has_extn("starttls"))
        self.assertTrue(conn.has_extn("auth"), "AUTH not advertised on a loopback none listener")
        code, resp = conn.mail("orders@shop.test")
        self.assertEqual(code, 530, resp)
        self.assertIn(b"5.7.0", resp)
        with self.assertRaises(smtplib.SMTPAuthenticationError):
            conn.login(WEBSHOP.username, "not the password")
        conn.login(WEBSHOP.username, WEBSHOP.password)
        tok = token()
        msg = make_message("orders@shop.test", ["alice@example.net"], f"plain {tok}",
                           message_id=False)
        qid = submit(conn, "orders@shop.test", ["alice@example.net"], msg)
        self.assert_queued(qid, msg, WEBSHOP, "orders@shop.test", ["alice@example.net"], None)
        conn.quit()

    # -- capture mode ----------------------------------------------------------------------------
    def test_capture_mode(self):
        conn = self.starttls_login(CI)
        msg = make_message("build@ci.test", ["a@example.net", "b@example.net"], f"CI {token()}")
        qid = submit(conn, "build@ci.test", ["a@example.net", "b@example.net"], msg)
        entry = self.srv.queue_entry(qid)
        self.assertTrue(entry["captured"], entry)
        self.assertEqual([r["state"] for r in entry["recipients"]], ["captured", "captured"],
                         entry)
        # A deliver-mode account's message is not captured (its delivery goes nowhere: the
        # test config points the resolver at a closed loopback port).
        conn2 = self.starttls_login(DELIVERER)
        msg = make_message("app@deliver.test", ["c@example.net"], f"deliver {token()}")
        qid2 = submit(conn2, "app@deliver.test", ["c@example.net"], msg)
        entry2 = self.srv.queue_entry(qid2)
        self.assertFalse(entry2["captured"], entry2)
        self.assertNotEqual(entry2["recipients"][0]["state"], "captured", entry2)


if __name__ == "__main__":
    harness.main()
