"""Logged-in clients sending hostile or malformed content, against the real binary:

  A6  header section limits (limits.max_header_bytes, default 1 MiB; limits.max_header_fields,
      default 10000): 552 5.3.4 after the final dot, nothing stored, the session usable; a
      flood of 3 million tiny fields neither stalls other sessions nor eats memory;
  A7  NUL characters in content: 550 5.6.0, for DATA and BDAT, and no smuggling through them;
  A8  a message without the empty line between header and body gets one inserted before it
      is DKIM-signed, so the signatures verify (dkimpy and OpenDKIM);
  A9  a Sender: field is an address the account must own, like From:; Reply-To: is not.
"""

import os
import re
import sys
import threading
import time

import dkim

import harness
from harness import (Account, RawClient, ServerTestCase, dot_stuff, make_message, rss_kb, scale,
                     token)

WEBSHOP = Account("webshop", "correct horse battery staple", ["@shop.test"])
CI = Account("ci", "ci-secret-Passw0rd", ["@ci.test"])
MAX_BYTES = 64 * 1024 * 1024


def session(srv, account=WEBSHOP, mode="implicit", timeout=30):
    c = RawClient(srv.port(mode), implicit_tls=(mode == "implicit"), timeout=timeout)
    c.login(mode, account)
    return c


def stored_with(srv, marker):
    if isinstance(marker, str):
        marker = marker.encode()
    return [q for q in srv.queue_ids() if marker in srv.queue_raw(q)]


def header_only(subject, fields, frm="orders@shop.test"):
    """From/To/Subject, then the given fields (bytes, each with its CRLF), then the body."""
    head = (f"From: {frm}\r\nTo: alice@example.net\r\nSubject: {subject}\r\n").encode()
    return head + fields + b"\r\nbody\r\n"


class Authenticated(ServerTestCase):
    @classmethod
    def setUpClass(cls):
        cls.srv = cls.start_class_server(accounts=[WEBSHOP, CI],
                                         limits={"max_message_bytes": MAX_BYTES},
                                         hostname="relay.auth.test")

    def setUp(self):
        super().setUp()
        self.assertTrue(self.srv.alive(), "serve died in an earlier test")

    def tearDown(self):
        self.assertTrue(self.srv.alive(), "serve is no longer running")

    def assert_reply(self, got, code, enhanced, text=None):
        c, lines = got
        self.assertEqual(c, code, lines)
        self.assertTrue(lines and lines[0].startswith(enhanced + " "),
                        f"expected enhanced code {enhanced}: {lines}")
        if text is not None:
            self.assertEqual(lines[0], f"{enhanced} {text}")

    def good_message(self, c, srv=None, frm="orders@shop.test"):
        srv = srv or self.srv
        tok = token("ok")
        msg = make_message(frm, ["alice@example.net"], f"normal {tok}")
        c.expect(f"MAIL FROM:<{frm}>", 250)
        c.expect("RCPT TO:<alice@example.net>", 250)
        code, lines = c.data(dot_stuff(msg))
        qid = harness.queued_id(lines[0])
        harness.check_stored(self, srv.queue_raw(qid), msg)
        return qid

    def send_data(self, c, msg, frm="orders@shop.test"):
        c.expect(f"MAIL FROM:<{frm}>", 250)
        c.expect("RCPT TO:<alice@example.net>", 250)
        return c.data(dot_stuff(msg), expect=None)

    # -- A6: header limits -----------------------------------------------------------------------
    def test_header_section_too_large(self):
        c = session(self.srv)
        self.addCleanup(c.close)
        # (a) 2 MiB of header in 2,048 one-KiB fields (folded, so no line is over 998).
        tok = token("bighdr")
        fields = b"".join(b"X-Fill-%04d: " % i + b"x" * 493 + b"\r\n " + b"y" * 513 + b"\r\n"
                          for i in range(2048))
        msg = header_only(tok, fields)
        self.assertGreater(msg.index(b"\r\n\r\n"), 2 * 1024 * 1024)
        got = self.send_data(c, msg)
        self.assert_reply(got, 552, "5.3.4",
                          "Message header section too large (limit 1048576 bytes)")
        self.assertIn("header", got[1][0])
        self.assertEqual(stored_with(self.srv, tok), [])
        self.good_message(c)
        # (d) 900 KB of header in 900 fields: under both limits, accepted and stored as sent.
        tok = token("okhdr")
        fields = b"".join(b"X-Fill-%04d: " % i + b"x" * 490 + b"\r\n " + b"y" * 490 + b"\r\n"
                          for i in range(900))
        msg = header_only(tok, fields)
        self.assertGreater(msg.index(b"\r\n\r\n"), 880_000)
        self.assertLess(msg.index(b"\r\n\r\n"), 1_000_000)
        code, lines = self.send_data(c, msg)
        self.assertEqual(code, 250, lines)
        harness.check_stored(self, self.srv.queue_raw(harness.queued_id(lines[0])), msg)
        self.good_message(c)

    def test_too_many_header_fields(self):
        c = session(self.srv)
        self.addCleanup(c.close)
        tok = token("manyhdr")
        msg = header_only(tok, b"a:b\r\n" * 20000)
        got = self.send_data(c, msg)
        self.assert_reply(got, 552, "5.3.4", "Too many header fields (limit 10000)")
        self.assertIn("header", got[1][0])
        self.assertEqual(stored_with(self.srv, tok), [])
        self.good_message(c)
        # 9,000 fields are within the limit.
        tok = token("somehdr")
        msg = header_only(tok, b"a:b\r\n" * 9000)
        code, lines = self.send_data(c, msg)
        self.assertEqual(code, 250, lines)
        harness.check_stored(self, self.srv.queue_raw(harness.queued_id(lines[0])), msg)

    def test_too_many_header_fields_bdat(self):
        # The same flood sent with BDAT LAST is refused the same way.
        c = session(self.srv)
        self.addCleanup(c.close)
        tok = token("bdathdr")
        msg = header_only(tok, b"a:b\r\n" * 20000)
        c.expect("MAIL FROM:<orders@shop.test>", 250)
        c.expect("RCPT TO:<alice@example.net>", 250)
        c.send(f"BDAT {len(msg)} LAST\r\n".encode() + msg)
        got = c.reply(timeout=scale(30))
        self.assert_reply(got, 552, "5.3.4", "Too many header fields (limit 10000)")
        self.assertEqual(stored_with(self.srv, tok), [])
        c.expect("RSET", 250)
        self.good_message(c)

    def test_header_field_flood_does_not_stall_others(self):
        # One event loop, so the flood and the other session share it.
        srv = self.start_server(accounts=[WEBSHOP, CI], limits={"max_message_bytes": MAX_BYTES},
                                extra_config={"workers": 1}, name="flood")
        other = session(srv, CI)
        self.addCleanup(other.close)
        flood = session(srv)
        self.addCleanup(flood.close)
        tok = token("flood")
        msg = header_only(tok, b"a:\r\n" * 3_000_000)
        self.assertGreater(len(msg), 11_900_000)
        stuffed = dot_stuff(msg)  # before the pinger starts: the regex holds the GIL
        baseline = rss_kb(srv.proc.pid)
        stop = threading.Event()
        rtts, errors, peak = [], [], [0]

        def ping():
            try:
                while not stop.is_set():
                    t = time.monotonic()
                    other.expect("NOOP", 250, timeout=scale(10))
                    rtts.append(time.monotonic() - t)
                    peak[0] = max(peak[0], rss_kb(srv.proc.pid) - baseline)
                    time.sleep(0.01)
            except Exception as e:  # reported below
                errors.append(repr(e))

        pinger = threading.Thread(target=ping, daemon=True)
        pinger.start()
        try:
            flood.expect("MAIL FROM:<orders@shop.test>", 250)
            flood.expect("RCPT TO:<alice@example.net>", 250)
            got = flood.data(stuffed, expect=None)
            time.sleep(0.5)
        finally:
            stop.set()
            pinger.join(scale(15))
        self.assertEqual(errors, [])
        self.assertGreater(len(rtts), 20)
        sys.stderr.write(f"\n  NOOP round trips during the flood: max {max(rtts) * 1000:.0f} ms, "
                         f"median {sorted(rtts)[len(rtts) // 2] * 1000:.1f} ms, {len(rtts)} NOOPs; "
                         f"RSS growth {peak[0] // 1024} MB\n")
        self.assertLess(max(rtts), scale(0.2),
                        f"a NOOP waited {max(rtts) * 1000:.0f} ms while another session sent "
                        f"3 million header fields ({len(rtts)} NOOPs)")
        self.assertLess(peak[0], 100 * 1024,
                        f"server RSS grew by {peak[0] // 1024} MB for 3 million header fields")
        code, lines = got
        self.assertEqual(code, 552, lines)
        self.assertTrue(lines[0].startswith("5.3.4 "), lines)
        self.assertIn("header", lines[0])
        self.assertEqual(srv.queue_ids(), [])
        self.good_message(flood, srv=srv)

    # -- A7: NUL ---------------------------------------------------------------------------------
    def test_nul_in_data(self):
        c = session(self.srv)
        self.addCleanup(c.close)
        tok = token("nul")
        msg = (f"From: orders@shop.test\r\nTo: alice@example.net\r\nSubject: {tok}\r\n\r\n"
               ).encode() + b"a\x00b\r\n"
        got = self.send_data(c, msg)
        self.assert_reply(got, 550, "5.6.0", "Message contains NUL characters")
        self.assertTrue(c.nothing_pending(0.3), c.format_transcript())
        self.assertEqual(stored_with(self.srv, tok), [])
        self.good_message(c)

    def test_nul_in_bdat(self):
        c = session(self.srv)
        self.addCleanup(c.close)
        tok = token("nulbdat")
        part1 = f"From: orders@shop.test\r\nTo: alice@example.net\r\nSubject: {tok}\r\n\r\n".encode()
        part2 = b"one\r\nt\x00wo\r\n"
        c.expect("MAIL FROM:<orders@shop.test>", 250)
        c.expect("RCPT TO:<alice@example.net>", 250)
        c.send(f"BDAT {len(part1)}\r\n".encode() + part1)
        self.assertEqual(c.reply()[0], 250)
        c.send(f"BDAT {len(part2)} LAST\r\n".encode() + part2)
        got = c.reply(timeout=scale(30))
        self.assert_reply(got, 550, "5.6.0", "Message contains NUL characters")
        self.assertTrue(c.nothing_pending(0.3), c.format_transcript())
        self.assertEqual(stored_with(self.srv, tok), [])
        c.expect("RSET", 250)
        self.good_message(c)

    def test_nul_smuggling(self):
        c = session(self.srv)
        self.addCleanup(c.close)
        tok = token("nulsmug")
        c.expect("MAIL FROM:<orders@shop.test>", 250)
        c.expect("RCPT TO:<alice@example.net>", 250)
        c.expect("DATA", 354)
        content = (f"From: orders@shop.test\r\nTo: alice@example.net\r\nSubject: outer {tok}\r\n"
                   f"\r\nfirst part\r\n").encode()
        content += (b"\x00.\r\nMAIL FROM:<x@shop.test>\r\nRCPT TO:<victim@example.net>\r\n"
                    b"DATA\r\nFrom: x@shop.test\r\nSubject: smuggled " + tok.encode()
                    + b"\r\n\r\nsmuggled body\r\n.\r\n")
        c.send(content)
        got = c.reply(timeout=scale(30))
        self.assert_reply(got, 550, "5.6.0", "Message contains NUL characters")
        self.assertTrue(c.nothing_pending(0.5),
                        "replies to commands inside the message:\n" + c.format_transcript())
        # No transaction was opened by the fake MAIL inside the content.
        code, lines = c.cmd("RCPT TO:<bob@example.net>")
        self.assertEqual(code, 503, lines)
        self.assertEqual(stored_with(self.srv, tok), [])
        self.good_message(c)

    # -- A9: Sender ------------------------------------------------------------------------------
    def test_sender_field_must_be_owned(self):
        c = session(self.srv)
        self.addCleanup(c.close)
        tok = token("sender")
        msg = make_message("orders@shop.test", ["alice@example.net"], f"s1 {tok}",
                           extra_headers=["Sender: ceo@paypal.com"])
        got = self.send_data(c, msg)
        self.assert_reply(got, 550, "5.7.1",
                          "Sender header address <ceo@paypal.com> not owned by this account")
        self.assertEqual(stored_with(self.srv, tok), [])
        # An owned Sender is fine; a foreign Reply-To too (contact forms).
        for name, extra in (("owned Sender", ["Sender: Orders Desk <desk@shop.test>"]),
                            ("foreign Reply-To", ["Reply-To: visitor@gmail.com"])):
            with self.subTest(case=name):
                msg = make_message("orders@shop.test", ["alice@example.net"], f"{name} {tok}",
                                   extra_headers=extra)
                code, lines = self.send_data(c, msg)
                self.assertEqual(code, 250, lines)
        # Two Sender fields: malformed (RFC 5322 3.6 allows one).
        tok2 = token("twosender")
        msg = make_message("orders@shop.test", ["alice@example.net"], f"s2 {tok2}",
                           extra_headers=["Sender: desk@shop.test", "Sender: other@shop.test"])
        got = self.send_data(c, msg)
        self.assertEqual(got[0], 550, got)
        self.assertTrue(got[1][0].startswith("5.6.0 "), got)
        self.assertEqual(stored_with(self.srv, tok2), [])
        self.good_message(c)


# --------------------------------------------------------------------------------------------
# A8: DKIM over a message without the empty line after its header
# --------------------------------------------------------------------------------------------

def keygen(directory, domain, selector, algorithm):
    path = os.path.join(directory, f"{selector}.{domain}.pem")
    proc = harness.subrelay("dkim-keygen", "--domain", domain, "--selector", selector,
                            "--algorithm", algorithm, "--out", path, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"dkim-keygen failed: {proc.stderr.decode(errors='replace')}")
    m = re.search(r'^(\S+)\. IN TXT \( (.*) \)$', proc.stdout.decode(), re.M)
    if not m:
        raise AssertionError(f"no TXT record in {proc.stdout!r}")
    return path, m.group(1), "".join(re.findall(r'"([^"]*)"', m.group(2)))


def sig_tags(field):
    value = re.sub(r"\s+", "", harness.field_value(field).decode())
    return dict(p.split("=", 1) for p in value.split(";") if "=" in p)


class DkimNoEmptyLine(ServerTestCase):
    def test_missing_empty_line_inserted_before_signing(self):
        keydir = harness.make_tmpdir("subrelay-dkim-")
        dns, entries = {}, []
        for sel, alg in (("r1", "rsa-sha256"), ("e1", "ed25519-sha256")):
            path, name, value = keygen(keydir, "shop.test", sel, alg)
            dns[name] = value
            entries.append({"domain": "shop.test", "selector": sel, "algorithm": alg,
                            "private_key": path})
        srv = self.start_server(accounts=[WEBSHOP], extra_config={"dkim": entries})
        tok = token("noempty")
        msg = (f"From: a@shop.test\r\nTo: b@example.com\r\nSubject: x {tok}\r\n"
               "This line is body text\r\n").encode()
        with session(srv) as c:
            c.expect("MAIL FROM:<a@shop.test>", 250)
            c.expect("RCPT TO:<b@example.com>", 250)
            code, lines = c.data(dot_stuff(msg))
            qid = harness.queued_id(lines[0])
        raw = srv.queue_raw(qid)
        self.assertIn(b"\r\n\r\nThis line is body text\r\n", raw,
                      f"no empty line inserted before the body: {raw!r}")
        self.assertTrue(raw.endswith(b"\r\n\r\nThis line is body text\r\n"), raw)
        fields, _ = harness.split_message(raw)
        self.assertIn(f"Subject: x {tok}\r\n".encode(), fields)
        sigs = [f for f in fields if harness.field_name(f) == b"dkim-signature"]
        self.assertEqual(sorted(sig_tags(f)["a"] for f in sigs), ["ed25519-sha256", "rsa-sha256"])

        def dnsfunc(name, timeout=5):
            if isinstance(name, bytes):
                name = name.decode()
            return dns.get(name.rstrip("."), "").encode() or None

        testdns = os.path.join(keydir, "testdns.txt")
        with open(testdns, "w") as f:
            for name, value in dns.items():
                f.write(f"{name} {value}\n")
        odconf = os.path.join(keydir, "opendkim.conf")
        with open(odconf, "w") as f:
            f.write(f"Mode v\nTestDNSData file:{testdns}\n")
        for idx, field in enumerate(sigs):
            tags = sig_tags(field)
            with self.subTest(algorithm=tags["a"]):
                try:
                    ok = bool(dkim.DKIM(raw).verify(idx=idx, dnsfunc=dnsfunc))
                except dkim.DKIMException as e:
                    ok = f"{e!r}"
                self.assertIs(ok, True, f"dkimpy rejects the {tags['a']} signature: {field!r}")
                # opendkim -t reports one signature per run: a copy with only this one.
                only = b"".join(f for f in fields if harness.field_name(f) != b"dkim-signature"
                                or f == field) + raw[raw.index(b"\r\n\r\n") + 2:]
                path = os.path.join(keydir, f"{token('eml')}.eml")
                with open(path, "wb") as f:
                    f.write(only)
                proc = harness.run(["opendkim", "-x", odconf, "-t", path], timeout=30)
                out = (proc.stdout + proc.stderr).decode(errors="replace")
                good = re.search(r"verification \(s=%s, d=shop\.test[,)].*\) succeeded"
                                 % re.escape(tags["s"]), out)
                self.assertTrue(good and "failed" not in out,
                                f"opendkim rejects the {tags['a']} signature: {out}")


if __name__ == "__main__":
    harness.main()
