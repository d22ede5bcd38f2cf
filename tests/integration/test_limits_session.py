"""Session-level limits and hostile input over raw sockets (exact bytes, TLS from Python's ssl):
SMTP smuggling, bare CR/LF, long lines, recipient and size limits, pipelining order, the STARTTLS
command injection of CVE-2011-0411, garbage floods, many idle connections, the bad-command
limit, BDAT."""

import os
import random
import socket
import ssl
import threading
import time

import harness
from harness import Account, RawClient, dot_stuff, make_message, token

WEBSHOP = Account("webshop", "correct horse battery staple", ["@shop.test"])
CI = Account("ci", "ci-secret-Passw0rd", ["@ci.test"])
MAX_BYTES = 20000
MAX_RCPTS = 5


class LimitsSession(harness.ServerTestCase):
    @classmethod
    def setUpClass(cls):
        cls.srv = cls.start_class_server(
            listeners=("starttls", "implicit", "none"), accounts=[WEBSHOP, CI],
            limits={"max_message_bytes": MAX_BYTES, "max_recipients": MAX_RCPTS},
            hostname="relay.limits.test")

    def setUp(self):
        super().setUp()
        self.assertTrue(self.srv.alive(), "serve died in an earlier test")

    def tearDown(self):
        # Whatever a test threw at it, the process must still be up.
        self.assertTrue(self.srv.alive(), "serve is no longer running")

    # -- helpers ---------------------------------------------------------------------------------
    def session(self, mode="implicit"):
        c = RawClient(self.srv.port(mode), implicit_tls=(mode == "implicit"))
        self.addCleanup(c.close)
        self.assertEqual(c.greeting[0], 220)
        c.login(mode, WEBSHOP)
        return c

    def stored_with(self, marker):
        if isinstance(marker, str):
            marker = marker.encode()
        return [q for q in self.srv.queue_ids() if marker in self.srv.queue_raw(q)]

    def good_message(self, c, rcpts=("alice@example.net",)):
        """A normal message on session c is accepted and stored."""
        tok = token("ok")
        msg = make_message("orders@shop.test", list(rcpts), f"normal {tok}")
        c.expect("MAIL FROM:<orders@shop.test>", 250)
        for r in rcpts:
            c.expect(f"RCPT TO:<{r}>", 250)
        code, lines = c.data(dot_stuff(msg))
        qid = harness.queued_id(lines[0])
        harness.check_stored(self, self.srv.queue_raw(qid), msg, account="webshop")
        return qid

    def fresh_session_works(self):
        c = self.session("implicit")
        self.good_message(c)
        c.cmd("QUIT")

    def assert_enhanced(self, lines, prefix):
        self.assertTrue(lines and lines[0].startswith(prefix),
                        f"expected enhanced code {prefix}: {lines}")

    # -- SMTP smuggling --------------------------------------------------------------------------
    def test_smuggling_does_not_end_data(self):
        variants = {"LF.LF": b"\n.\n", "CRLF.LF": b"\r\n.\n", "LF.CRLF": b"\n.\r\n",
                    "CR.CR": b"\r.\r", "CRLF.CR": b"\r\n.\r", "CR.CRLF": b"\r.\r\n"}
        for name, seq in variants.items():
            with self.subTest(variant=name):
                c = self.session()
                tok = token("smug")
                c.expect("MAIL FROM:<orders@shop.test>", 250)
                c.expect("RCPT TO:<alice@example.net>", 250)
                c.expect("DATA", 354)
                head = make_message("orders@shop.test", ["alice@example.net"], f"outer {tok}",
                                    body=f"first part {tok}")
                smuggled = (b"MAIL FROM:<orders@shop.test>\r\nRCPT TO:<victim@example.net>\r\n"
                            b"DATA\r\nFrom: orders@shop.test\r\nSubject: smuggled " + tok.encode()
                            + b"\r\n\r\nsmuggled body\r\n")
                c.send(head[:-2] + seq + smuggled)
                self.assertTrue(c.nothing_pending(0.5),
                                f"{name} ended DATA: the server replied before <CRLF>.<CRLF>; "
                                f"transcript:\n{c.format_transcript()}")
                c.send(b".\r\n")
                code, lines = c.reply()
                self.assertGreaterEqual(code, 500, f"{name}: message with a bare CR/LF "
                                                   f"accepted: {code} {lines}")
                self.assertLess(code, 600)
                self.assertTrue(c.nothing_pending(0.3),
                                f"{name}: replies to smuggled commands; transcript:\n"
                                + c.format_transcript())
                c.expect("NOOP", 250)
                self.assertEqual(self.stored_with(tok), [], f"{name}: something was stored")
                self.good_message(c)

    def test_bare_lf_and_bare_cr_messages_refused(self):
        cases = {
            "all LF": b"From: orders@shop.test\nTo: alice@example.net\nSubject: {tok}\n\nbody\n",
            "LF in body": b"From: orders@shop.test\r\nSubject: {tok}\r\n\r\nline one\nline two\r\n",
            "LF in header": b"From: orders@shop.test\r\nSubject: {tok}\nX-A: b\r\n\r\nbody\r\n",
            "CR in body": b"From: orders@shop.test\r\nSubject: {tok}\r\n\r\nline\rone\r\n",
            "CR at line end": b"From: orders@shop.test\r\nSubject: {tok}\r\n\r\nline\r\r\n",
        }
        c = self.session()
        for name, template in cases.items():
            with self.subTest(case=name):
                tok = token("bare")
                c.expect("MAIL FROM:<orders@shop.test>", 250)
                c.expect("RCPT TO:<alice@example.net>", 250)
                content = template.replace(b"{tok}", tok.encode())
                if not content.endswith(b"\r\n"):
                    content += b"\r\n"  # only CRLF.CRLF ends DATA
                code, lines = c.data(content + b".\r\n", expect=None)
                self.assertGreaterEqual(code, 500, f"{name}: accepted {code} {lines}")
                self.assertLess(code, 600)
                self.assertTrue(c.nothing_pending(0.2))
                self.assertEqual(self.stored_with(tok), [])
        # After the refused messages, the same session still submits.
        self.good_message(c)

    def test_bare_lf_in_command(self):
        c = self.session()
        for line in (b"NOOP\n", b"MAIL FROM:<orders@shop.test>\n", b"RSET\r\rNOOP\r\n"):
            with self.subTest(line=line):
                c.send(line)
                code, lines = c.reply()
                self.assertEqual(code, 500, f"{line!r}: {code} {lines}")
                self.assert_enhanced(lines, "5.5.2")
                self.assertTrue(c.nothing_pending(0.2), c.format_transcript())
                c.expect("NOOP", 250)
        self.good_message(c)

    def test_overlong_command_line(self):
        # RFC 5321 4.5.3.1.4 sets 512 octets as the least a server must take; subrelay takes
        # up to 2048 like Postfix. Well past both:
        c = self.session()
        code, lines = c.cmd(b"NOOP " + b"a" * 10000)
        self.assertEqual(code, 500, lines)
        self.assertTrue(c.nothing_pending(0.2), c.format_transcript())
        c.expect("NOOP", 250)
        code, lines = c.cmd(b"MAIL FROM:<" + b"x" * 5000 + b"@shop.test>")
        self.assertEqual(code, 500, lines)
        self.good_message(c)

    # -- limits ----------------------------------------------------------------------------------
    def test_too_many_recipients(self):
        c = self.session()
        c.expect("MAIL FROM:<orders@shop.test>", 250)
        rcpts = [f"r{i}@example.net" for i in range(MAX_RCPTS)]
        for r in rcpts:
            c.expect(f"RCPT TO:<{r}>", 250)
        for extra in ("r-extra1@example.net", "r-extra2@example.net"):
            code, lines = c.cmd(f"RCPT TO:<{extra}>")
            self.assertEqual(code, 452, lines)
            self.assert_enhanced(lines, "4.5.3")
        tok = token("rcpt")
        msg = make_message("orders@shop.test", rcpts, f"five {tok}")
        code, lines = c.data(dot_stuff(msg))
        entry = self.srv.queue_entry(harness.queued_id(lines[0]))
        self.assertEqual([r["address"] for r in entry["recipients"]], rcpts)

    def test_oversize_message(self):
        c = self.session()
        caps = c.ehlo()
        self.assertIn(f"SIZE {MAX_BYTES}", caps)
        tok = token("big")
        big = make_message("orders@shop.test", ["alice@example.net"], f"big {tok}",
                           body=("0123456789" * 7 + "\r\n") * 1000)
        self.assertGreater(len(big), 3 * MAX_BYTES)
        c.expect("MAIL FROM:<orders@shop.test>", 250)
        c.expect("RCPT TO:<alice@example.net>", 250)
        code, lines = c.data(dot_stuff(big), expect=None)
        self.assertEqual(code, 552, lines)
        self.assert_enhanced(lines, "5.3.4")
        self.assertEqual(self.stored_with(tok), [])
        # Just over the limit, counting the bytes the client sent.
        over = make_message("orders@shop.test", ["alice@example.net"], f"over {tok}",
                            body="y" * 70 + "\r\n")
        over = over[:-2] + b"z" * (MAX_BYTES + 10 - len(over)) + b"\r\n"
        c.expect("MAIL FROM:<orders@shop.test>", 250)
        c.expect("RCPT TO:<alice@example.net>", 250)
        code, lines = c.data(dot_stuff(over), expect=None)
        self.assertEqual(code, 552, lines)
        self.assertEqual(self.stored_with(tok), [])
        # A message well under the limit on the same session is fine.
        self.good_message(c)

    def test_size_parameter(self):
        c = self.session()
        code, lines = c.cmd(f"MAIL FROM:<orders@shop.test> SIZE={MAX_BYTES + 1}")
        self.assertEqual(code, 552, lines)
        self.assert_enhanced(lines, "5.3.4")
        code, lines = c.cmd("MAIL FROM:<orders@shop.test> SIZE=99999999999999999999999")
        self.assertIn(code, (501, 552), lines)
        c.expect("MAIL FROM:<orders@shop.test> SIZE=1000", 250)
        c.expect("RSET", 250)
        self.good_message(c)

    def test_oversize_bdat(self):
        c = self.session()
        tok = token("bdatbig")
        chunk = (f"Subject: {tok}\r\n\r\n" + "b" * (MAX_BYTES * 2) + "\r\n").encode()
        c.expect("MAIL FROM:<orders@shop.test>", 250)
        c.expect("RCPT TO:<alice@example.net>", 250)
        c.send(f"BDAT {len(chunk)} LAST\r\n".encode() + chunk)
        code, lines = c.reply(timeout=harness.scale(30))
        self.assertEqual(code, 552, lines)
        self.assertEqual(self.stored_with(tok), [])
        c.expect("RSET", 250)
        self.good_message(c)

    # -- protocol --------------------------------------------------------------------------------
    def test_pipelined_replies_in_order(self):
        c = self.session()
        c.send(b"MAIL FROM:<orders@shop.test>\r\nRCPT TO:<a@example.net>\r\nRCPT TO:<>\r\n"
               b"RCPT TO:<b@example.net>\r\nDATA\r\n")
        codes = [c.reply()[0] for _ in range(5)]
        self.assertEqual(codes[0:2], [250, 250], codes)
        self.assertGreaterEqual(codes[2], 500, codes)
        self.assertEqual(codes[3:], [250, 354], codes)
        tok = token("pipe")
        msg = make_message("orders@shop.test", ["a@example.net", "b@example.net"], f"p {tok}")
        c.send(dot_stuff(msg))
        code, lines = c.reply()
        self.assertEqual(code, 250, lines)
        entry = self.srv.queue_entry(harness.queued_id(lines[0]))
        self.assertEqual([r["address"] for r in entry["recipients"]],
                         ["a@example.net", "b@example.net"])
        # A refused MAIL in a pipelined group: the RCPT and the DATA after it must fail too
        # (a 354 here would make the following lines message content).
        c.send(b"MAIL FROM:<ceo@bank.test>\r\nRCPT TO:<a@example.net>\r\nDATA\r\n")
        codes = [c.reply() for _ in range(3)]
        self.assertIn(codes[0][0], (550, 553), codes)
        self.assertGreaterEqual(codes[1][0], 500, codes)
        self.assertGreaterEqual(codes[2][0], 500, codes)
        self.assertTrue(c.nothing_pending(0.2))
        # Many commands in one write: one reply each, in order.
        c.send(b"NOOP\r\n" * 40 + b"RSET\r\n" + b"NOOP\r\n")
        for i in range(42):
            code, lines = c.reply()
            self.assertEqual(code, 250, (i, lines))
        self.assertTrue(c.nothing_pending(0.2))
        self.good_message(c)

    def test_sequence_errors(self):
        c = self.session()
        code, lines = c.cmd("RCPT TO:<a@example.net>")
        self.assertEqual(code, 503, lines)
        self.assert_enhanced(lines, "5.5.1")
        code, lines = c.cmd("DATA")
        self.assertEqual(code, 503, lines)
        c.expect("MAIL FROM:<orders@shop.test>", 250)
        code, lines = c.cmd("MAIL FROM:<orders@shop.test>")
        self.assertEqual(code, 503, lines)
        code, lines = c.cmd("DATA")
        self.assertIn(code, (503, 554), lines)
        code, lines = c.cmd("AUTH PLAIN AGZvbwBiYXI=")
        self.assertEqual(code, 503, lines)
        c.expect("RSET", 250)
        self.good_message(c)

    def test_starttls_command_injection(self):
        """CVE-2011-0411: commands sent in the same packet as STARTTLS, before the handshake,
        must be discarded, not executed inside the TLS session."""
        c = RawClient(self.srv.port("starttls"))
        self.addCleanup(c.close)
        c.ehlo()
        c.send(b"STARTTLS\r\nMAIL FROM:<orders@shop.test>\r\nRCPT TO:<x@example.net>\r\n"
               b"NOOP\r\n")
        code, lines = c.reply()
        self.assertEqual(code, 220, lines)
        self.assertEqual(c.buf, b"", f"more plaintext after the 220: {c.buf!r}")
        c.sock = harness.client_context().wrap_socket(c.sock, server_hostname=harness.LOOPBACK)
        code, lines = c.cmd("EHLO after.tls.test")
        self.assertEqual(code, 250, f"first reply inside TLS is not the EHLO's: {code} {lines}; "
                                    f"transcript:\n{c.format_transcript()}")
        self.assertEqual(lines[0].split()[0], "relay.limits.test", lines)
        self.assertTrue(c.nothing_pending(0.3), c.format_transcript())
        c.auth_plain(WEBSHOP.username, WEBSHOP.password)
        # No transaction was started by the injected MAIL/RCPT.
        code, lines = c.cmd("DATA")
        self.assertEqual(code, 503, lines)
        c.expect("NOOP", 250)
        self.assertTrue(c.nothing_pending(0.2), c.format_transcript())

    def test_starttls_twice_and_after_tls(self):
        c = RawClient(self.srv.port("starttls"))
        self.addCleanup(c.close)
        c.ehlo()
        c.starttls()
        c.ehlo()
        code, lines = c.cmd("STARTTLS")
        self.assertGreaterEqual(code, 500, lines)
        c.expect("NOOP", 250)
        # Implicit TLS and `none` listeners do not offer STARTTLS.
        for mode in ("implicit", "none"):
            d = RawClient(self.srv.port(mode), implicit_tls=(mode == "implicit"))
            self.addCleanup(d.close)
            self.assertNotIn("STARTTLS", d.ehlo())
            code, lines = d.cmd("STARTTLS")
            self.assertGreaterEqual(code, 500, lines)

    def test_headers_only_message(self):
        c = self.session()
        tok = token("hdronly")
        msg = (f"From: orders@shop.test\r\nTo: alice@example.net\r\nSubject: {tok}\r\n"
               ).encode()
        c.expect("MAIL FROM:<orders@shop.test>", 250)
        c.expect("RCPT TO:<alice@example.net>", 250)
        code, lines = c.data(msg + b".\r\n")
        harness.check_stored(self, self.srv.queue_raw(harness.queued_id(lines[0])), msg,
                             account="webshop", tls_version="TLSv1.")

    def test_bdat_and_data_do_not_mix(self):
        c = self.session()
        c.expect("MAIL FROM:<orders@shop.test>", 250)
        c.expect("RCPT TO:<alice@example.net>", 250)
        c.send(b"BDAT 5\r\nabcde")
        self.assertEqual(c.reply()[0], 250)
        code, lines = c.cmd("DATA")
        self.assertEqual(code, 503, lines)
        c.expect("RSET", 250)
        self.good_message(c)

    def test_bdat(self):
        c = self.session()
        tok = token("bdat")
        # Chunk content is not dot-stuffed; a CRLF.CRLF inside it is just content.
        part1 = (f"From: orders@shop.test\r\nTo: alice@example.net\r\nSubject: bdat {tok}\r\n"
                 f"Message-ID: <{tok}@shop.test>\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\n"
                 ).encode()
        part2 = b"line\r\n.\r\n..two dots stay two\r\n.leading dot\r\n"
        part3 = b"last line\r\n"
        c.expect("MAIL FROM:<orders@shop.test>", 250)
        c.expect("RCPT TO:<alice@example.net>", 250)
        c.send(f"BDAT {len(part1)}\r\n".encode() + part1)
        self.assertEqual(c.reply()[0], 250)
        # Pipelined: the next chunk and the LAST one in a single write.
        c.send(f"BDAT {len(part2)}\r\n".encode() + part2
               + f"BDAT {len(part3)} LAST\r\n".encode() + part3)
        self.assertEqual(c.reply()[0], 250)
        code, lines = c.reply()
        self.assertEqual(code, 250, lines)
        qid = harness.queued_id(lines[0])
        harness.check_stored(self, self.srv.queue_raw(qid), part1 + part2 + part3,
                             account="webshop", tls_version="TLSv1.")
        # BDAT without a transaction: the chunk is read (RFC 3030 2) and refused.
        c.send(b"BDAT 10\r\n0123456789")
        code, lines = c.reply()
        self.assertEqual(code, 503, lines)
        c.expect("NOOP", 250)

    def test_smtputf8_required_for_utf8_addresses(self):
        c = self.session()
        code, lines = c.cmd("MAIL FROM:<jörg@shop.test>".encode())
        self.assertGreaterEqual(code, 500, lines)
        c.expect("MAIL FROM:<orders@shop.test>", 250)
        code, lines = c.cmd("RCPT TO:<用户@例子.test>".encode())
        self.assertGreaterEqual(code, 500, lines)
        c.expect("RSET", 250)
        c.expect("MAIL FROM:<jörg@shop.test> SMTPUTF8".encode(), 250)
        c.expect("RCPT TO:<用户@例子.test>".encode(), 250)
        c.expect("RSET", 250)

    def auth_session(self):
        c = RawClient(self.srv.port("implicit"), implicit_tls=True)
        self.addCleanup(c.close)
        c.ehlo()
        return c

    def test_auth_edge_cases(self):
        import base64
        b64 = lambda s: base64.b64encode(s.encode()).decode()
        # Unknown mechanism.
        c = self.auth_session()
        code, lines = c.cmd("AUTH CRAM-MD5")
        self.assertEqual(code, 504, lines)
        # Not base64.
        code, lines = c.cmd("AUTH PLAIN !!!not-base64!!!")
        self.assertEqual(code, 501, lines)
        # The client cancels an exchange with "*" (RFC 4954 4).
        c = self.auth_session()
        self.assertEqual(c.cmd("AUTH LOGIN")[0], 334)
        code, lines = c.cmd("*")
        self.assertEqual(code, 501, lines)
        c.expect("NOOP", 250)
        # PLAIN without an initial response: an empty 334 challenge, then the credentials.
        code, lines = c.cmd("AUTH PLAIN")
        self.assertEqual(code, 334, lines)
        code, lines = c.cmd(b64(f"\0{WEBSHOP.username}\0{WEBSHOP.password}"))
        self.assertEqual(code, 235, lines)
        # Once authenticated, AUTH is refused (RFC 4954 4).
        code, lines = c.cmd("AUTH PLAIN " + b64(f"\0{CI.username}\0{CI.password}"))
        self.assertEqual(code, 503, lines)
        code, lines = c.cmd("MAIL FROM:<build@ci.test>")
        self.assertIn(code, (550, 553), lines)
        # An authorization identity other than the authenticated one must not let webshop's
        # password act as ci.
        c = self.auth_session()
        code, lines = c.cmd("AUTH PLAIN " + b64(f"{CI.username}\0{WEBSHOP.username}\0"
                                                f"{WEBSHOP.password}"))
        if code == 235:
            code, lines = c.cmd("MAIL FROM:<build@ci.test>")
            self.assertIn(code, (550, 553), f"authzid let webshop send as ci: {lines}")
        else:
            self.assertIn(code, (535, 501), lines)
        # LOGIN with a wrong password, then the right one on the same connection.
        c = self.auth_session()
        self.assertEqual(c.cmd("AUTH LOGIN " + b64(WEBSHOP.username))[0], 334)
        code, lines = c.cmd(b64("wrong"), timeout=harness.scale(10))
        self.assertEqual(code, 535, lines)
        self.assert_enhanced(lines, "5.7.8")
        self.assertEqual(c.cmd("AUTH LOGIN")[0], 334)
        self.assertEqual(c.cmd(b64(WEBSHOP.username))[0], 334)
        code, lines = c.cmd(b64(WEBSHOP.password))
        self.assertEqual(code, 235, lines)
        self.good_message(c)

    # -- hostile traffic -------------------------------------------------------------------------
    def flood(self, sock, data, chunk=16384):
        try:
            for i in range(0, len(data), chunk):
                sock.sendall(data[i:i + chunk])
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, socket.timeout, OSError):
            pass

    def drain_until_closed(self, sock, timeout):
        """Reads until EOF; True if the server closed within timeout."""
        sock.settimeout(1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not sock.recv(65536):
                    return True
            except (socket.timeout, TimeoutError):
                continue
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError, OSError):
                return True
        return False

    def test_garbage_and_floods(self):
        rnd = random.Random(1234)
        garbage = bytes(rnd.getrandbits(8) for _ in range(256 * 1024))
        # 1. Binary garbage on the plaintext listener.
        s = socket.create_connection((harness.LOOPBACK, self.srv.port("none")), timeout=10)
        self.flood(s, garbage)
        self.drain_until_closed(s, harness.scale(10))
        s.close()
        # 2. Not TLS on the implicit-TLS listener.
        s = socket.create_connection((harness.LOOPBACK, self.srv.port("implicit")), timeout=10)
        self.flood(s, b"EHLO not-tls\r\n" + garbage)
        self.assertTrue(self.drain_until_closed(s, harness.scale(10)),
                        "a non-TLS client on the implicit listener was not disconnected")
        s.close()
        # 3. Garbage instead of a ClientHello after STARTTLS.
        c = RawClient(self.srv.port("starttls"))
        c.ehlo()
        c.expect("STARTTLS", 220)
        self.flood(c.sock, garbage)
        self.assertTrue(self.drain_until_closed(c.sock, harness.scale(10)))
        c.close()
        # 4. A 4 MiB line without an end, inside TLS.
        c = self.session()
        self.flood(c.sock, b"NOOP " + b"A" * (4 << 20))
        c.close()
        # 5. DATA followed by garbage and a hang-up: nothing stored.
        c = self.session()
        tok = token("garbage")
        c.expect("MAIL FROM:<orders@shop.test>", 250)
        c.expect("RCPT TO:<alice@example.net>", 250)
        c.expect("DATA", 354)
        self.flood(c.sock, f"Subject: {tok}\r\n\r\n".encode() + garbage)
        c.close()
        # 6. Half a TLS record, then silence and a hang-up; a TCP connect and immediate close.
        s = socket.create_connection((harness.LOOPBACK, self.srv.port("implicit")), timeout=10)
        s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        s.close()
        for _ in range(20):
            socket.create_connection((harness.LOOPBACK, self.srv.port("starttls")),
                                     timeout=10).close()
        time.sleep(0.2)
        self.assertTrue(self.srv.alive())
        self.assertEqual(self.stored_with(tok), [])
        self.fresh_session_works()

    def test_many_idle_connections(self):
        conns = []
        try:
            modes = ["starttls", "implicit", "none"] * 10
            for mode in modes:
                c = RawClient(self.srv.port(mode), implicit_tls=(mode == "implicit"))
                self.assertEqual(c.greeting[0], 220)
                conns.append(c)
            # With 30 idle sessions open, a client still gets through.
            self.fresh_session_works()
            # ... and the idle ones are all still served.
            for c in conns:
                c.expect("NOOP", 250)
            # Some of them do a full submission concurrently.
            errors = []

            def work(c):
                try:
                    c.login("implicit", WEBSHOP)
                    self.good_message(c)
                except Exception as e:  # reported below
                    errors.append(repr(e) + "\n" + c.format_transcript())

            threads = [threading.Thread(target=work, args=(c,))
                       for c in conns if isinstance(c.sock, ssl.SSLSocket)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=harness.scale(60))
            self.assertEqual(errors, [])
        finally:
            for c in conns:
                c.close()

    def test_bad_command_limit(self):
        c = self.session()
        got_421 = None
        for i in range(200):
            try:
                code, lines = c.cmd(f"XYZZY{i}")
            except harness.ConnectionClosed:
                self.fail(f"closed without a 421 after {i} bad commands")
            if code == 421:
                got_421 = i
                break
            self.assertIn(code, (500, 502), lines)
        self.assertIsNotNone(got_421, "200 bad commands and still no 421")
        self.assertTrue(c.at_eof(harness.scale(5)), "connection not closed after the 421")
        self.fresh_session_works()

    def assert_refused(self, port, source):
        """The server turns a connection away: a plaintext 421 (or 554) and a close, which an
        implicit-TLS client sees as a failed handshake."""
        extra = None
        try:
            extra = RawClient(port, implicit_tls=True, read_greeting=False, source=source)
            code, lines = extra.reply()
            self.assertIn(code, (421, 554), f"from {source}: {code} {lines}")
        except (harness.ConnectionClosed, ConnectionResetError, BrokenPipeError, ssl.SSLError):
            pass
        finally:
            if extra is not None:
                extra.close()

    def test_connections_per_ip_limit(self):
        # Clients on 127.0.0.1, 127.0.0.2, 127.0.0.3 (all of 127/8 is local on Linux).
        srv = self.start_server(listeners=("implicit",), accounts=[WEBSHOP],
                                limits={"max_connections_per_ip": 3, "max_connections": 5},
                                name="perip")
        port = srv.port("implicit")
        conns = []
        try:
            for _ in range(3):
                conns.append(RawClient(port, implicit_tls=True, source="127.0.0.1"))
                self.assertEqual(conns[-1].greeting[0], 220)
            self.assert_refused(port, "127.0.0.1")
            # Another address has its own allowance, up to the global limit of 5.
            for _ in range(2):
                conns.append(RawClient(port, implicit_tls=True, source="127.0.0.2"))
                self.assertEqual(conns[-1].greeting[0], 220)
            self.assert_refused(port, "127.0.0.3")
            for c in conns:
                c.expect("NOOP", 250)
            # Slots free when connections close (one hang-up, one QUIT): 127.0.0.2 gets in
            # again, 127.0.0.1 still has its three.
            conns.pop().close()
            last = conns.pop()
            last.expect("QUIT", 221)
            last.close()
            self.assert_refused(port, "127.0.0.1")
            deadline = time.monotonic() + harness.scale(5)
            while True:
                try:
                    c = RawClient(port, implicit_tls=True, source="127.0.0.2")
                    if c.greeting[0] == 220:
                        conns.append(c)
                        break
                    c.close()
                except (harness.ConnectionClosed, ConnectionResetError, ssl.SSLError):
                    pass
                self.assertLess(time.monotonic(), deadline, "slot not freed after QUIT")
                time.sleep(0.1)
        finally:
            for c in conns:
                c.close()


if __name__ == "__main__":
    harness.main()
