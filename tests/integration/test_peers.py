"""Self-test of mta_peers.py, the receiving MTAs of the delivery tests: each peer is started on
its own 127.0.0.x address, fed with smtplib (STARTTLS verified against the test CA and the
right server name), and checked for stored content, envelope, TLS version, magic failures,
connection counters and a clean stop."""

import os
import smtplib
import ssl
import subprocess
import time
import unittest

import harness
import mta_peers as mp
from harness import scale


def message(subject, body="Hello.\r\n.leading dot\r\n"):
    return (f"From: sender@example.test\r\nTo: rcpt@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{harness.token('m')}@example.test>\r\n\r\n{body}").encode()


def lf(raw):
    return raw.replace(b"\r\n", b"\n")


class CertTest(unittest.TestCase):
    def verify(self, cert, host=None):
        argv = ["openssl", "verify", "-CAfile", harness.pki().ca]
        if host:
            argv += ["-verify_hostname", host]
        return harness.run(argv + [cert.cert]).returncode == 0

    def test_make_cert(self):
        good = mp.make_cert(["mx1.mx.test", "mx.test"], ["127.0.0.11"])
        self.assertTrue(self.verify(good, "mx1.mx.test"))
        self.assertTrue(self.verify(good, "mx.test"))
        self.assertFalse(self.verify(good, "mx2.mx.test"))
        self.assertFalse(self.verify(mp.make_cert("mx1.mx.test", expired=True)))
        self.assertFalse(self.verify(mp.make_cert("mx1.mx.test", issuer="self")))
        self.assertFalse(self.verify(mp.make_cert("mx1.mx.test", issuer="other")))
        self.assertTrue(self.verify(mp.make_cert("mx1.mx.test", key_type="rsa"), "mx1.mx.test"))
        cert, key = good
        self.assertTrue(os.path.exists(cert) and os.path.exists(key))

    def test_helpers(self):
        port = mp.free_port("127.0.0.41", "127.0.0.42")
        self.assertFalse(mp.is_listening("127.0.0.41", port))
        with self.assertRaises(mp.PeerError):
            mp.wait_listening("127.0.0.41", port, timeout=0.2)
        with self.assertRaises(ValueError):
            mp.parse_address("192.0.2.1:25")
        self.assertEqual(mp.parse_address("[::1]:2525"), ("::1", 2525))
        self.assertEqual(mp.parse_address("127.0.0.11"), ("127.0.0.11", 2525))


class AioSinkTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cert = mp.make_cert(["mx1.mx.test"])
        cls.port = mp.free_port("127.0.0.31", "127.0.0.32")
        cls.sink = mp.AioSink(("127.0.0.31", cls.port), cert=cls.cert, slow_seconds=1).start()
        cls.strict = mp.AioSink(f"127.0.0.32:{cls.port}", cert=cls.cert, require_starttls=True,
                                tls_max="TLSv1_2", data_size_limit=100000).start()

    @classmethod
    def tearDownClass(cls):
        for s in (cls.sink, cls.strict):
            pid = s.proc.pid
            s.stop()
            assert not mp._pid_alive(pid), f"{s!r} still runs"
            assert not mp.is_listening(s.ip, s.port)

    def new_messages(self, sink, before, n):
        return sink.wait_for(before + n, timeout=10)[before:]

    def test_tls_reuse_and_magic(self):
        before = len(self.sink.messages())
        conns_before = self.sink.connections()
        conn = smtplib.SMTP("127.0.0.31", self.port, local_hostname="client.test",
                            timeout=scale(15))
        conn.ehlo()
        for kw in ("starttls", "pipelining", "size", "smtputf8", "8bitmime"):
            self.assertIn(kw, conn.esmtp_features)
        self.assertNotIn("auth", conn.esmtp_features)
        conn._host = "mx1.mx.test"
        conn.starttls(context=mp.client_context())
        conn.ehlo()
        self.assertNotIn("starttls", conn.esmtp_features)
        self.assertNotIn("auth", conn.esmtp_features)
        m1, m2, m5 = message("one"), message("two"), message("slow")
        r = mp.send_message(conn, "a@shop.test", ["x@dest.test", "tempfail@dest.test",
                                                  "permfail-2@other.test"], m1)
        self.assertEqual(r["rcpt"]["x@dest.test"][0], 250)
        self.assertEqual(r["rcpt"]["tempfail@dest.test"][0], 451)
        self.assertTrue(r["rcpt"]["tempfail@dest.test"][1].startswith("4.3.0"))
        self.assertEqual(r["rcpt"]["permfail-2@other.test"][0], 550)
        self.assertTrue(r["rcpt"]["permfail-2@other.test"][1].startswith("5.1.1"))
        self.assertEqual(r["data"][0], 250)
        self.assertEqual(mp.send_message(conn, "", ["y@dest.test"], m2)["data"][0], 250)
        r = mp.send_message(conn, "a@shop.test", ["datafail@dest.test"], message("df"))
        self.assertEqual(r["rcpt"]["datafail@dest.test"][0], 250)
        self.assertEqual(r["data"][0], 554)
        self.assertTrue(r["data"][1].startswith("5.6.0"))
        r = mp.send_message(conn, "a@shop.test", ["tempdata@dest.test"], message("td"))
        self.assertEqual(r["data"][0], 451)
        started = time.monotonic()
        r = mp.send_message(conn, "a@shop.test", ["slow@dest.test"], m5)
        self.assertEqual(r["data"][0], 250)
        self.assertGreaterEqual(time.monotonic() - started, 0.9)
        conn.quit()
        self.sink.wait_idle()
        got = self.new_messages(self.sink, before, 3)
        self.assertEqual(len(self.sink.messages()), before + 3)
        self.assertEqual([g["raw"] for g in got], [m1, m2, m5])
        self.assertEqual([g["mail_from"] for g in got], ["a@shop.test", "", "a@shop.test"])
        self.assertEqual([g["rcpt_tos"] for g in got],
                         [["x@dest.test"], ["y@dest.test"], ["slow@dest.test"]])
        self.assertEqual({g["tls"] for g in got}, {"TLSv1.3"})
        self.assertEqual(len({g["connection"] for g in got}), 1, "one connection for all")
        self.assertEqual([g["txn"] for g in got], [1, 2, 5])
        self.assertEqual(got[0]["helo"], "client.test")
        self.assertEqual(got[0]["peer"][0], "127.0.0.1")
        self.assertEqual(got[0]["msg"]["Subject"], "one")
        self.assertEqual(self.sink.connections(), conns_before + 1)
        st = self.sink.stats()
        self.assertGreaterEqual(st["rejected_rcpts"], 2)
        self.assertGreaterEqual(st["failed_data"], 2)
        self.assertEqual(st["open"], 0)
        kinds = [e["event"] for e in self.sink.events() if e["conn"] == got[0]["connection"]]
        self.assertEqual(kinds[0], "connect")
        self.assertEqual(kinds[1], "starttls")
        self.assertEqual(kinds[-1], "disconnect")
        self.assertEqual(kinds.count("mail"), 5)

    def test_wrong_name_and_plain(self):
        conn = smtplib.SMTP("127.0.0.31", self.port, timeout=scale(15))
        conn.ehlo()
        conn._host = "mx2.mx.test"
        with self.assertRaises(ssl.SSLCertVerificationError):
            conn.starttls(context=mp.client_context())
        conn.close()
        before = len(self.sink.messages())
        conn = mp.smtp_connect("127.0.0.31", self.port)
        self.assertEqual(mp.send_message(conn, "p@shop.test", ["plain@dest.test"],
                                         message("plain"))["data"][0], 250)
        conn.quit()
        got = self.new_messages(self.sink, before, 1)
        self.assertIsNone(got[0]["tls"])

    def test_require_starttls_tls12_size(self):
        conn = mp.smtp_connect("127.0.0.32", self.port)
        self.assertEqual(conn.esmtp_features.get("size"), "100000")
        self.assertEqual(conn.mail("a@shop.test")[0], 530)
        conn.close()
        conn = mp.smtp_connect("127.0.0.32", self.port, "mx1.mx.test", starttls=True)
        self.assertEqual(conn.sock.version(), "TLSv1.2")
        self.assertEqual(conn.mail("a@shop.test", ["SIZE=200000"])[0], 552)
        conn.rset()
        m = message("strict")
        self.assertEqual(mp.send_message(conn, "a@shop.test", ["x@dest.test"], m)["data"][0], 250)
        conn.quit()
        got = self.strict.wait_for(1)
        self.assertEqual(got[-1]["raw"], m)
        self.assertEqual(got[-1]["tls"], "TLSv1.2")


class SmtpSinkTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        ips = ["127.0.0.21", "127.0.0.22", "127.0.0.23", "127.0.0.24"]
        cls.port = port = mp.free_port(*ips)
        cls.ok = mp.SmtpSink((ips[0], port)).start()
        cls.temp = mp.SmtpSink((ips[1], port), rcpt_tempfail=True).start()
        cls.perm = mp.SmtpSink((ips[2], port), rcpt_permfail=True).start()
        cls.c421 = mp.SmtpSink((ips[3], port), connect_421=True).start()
        cls.sinks = [cls.ok, cls.temp, cls.perm, cls.c421]

    @classmethod
    def tearDownClass(cls):
        for s in cls.sinks:
            s.stop()
            assert s.proc.poll() is not None
            assert not mp.is_listening(s.ip, s.port)

    def test_accept(self):
        conn = mp.smtp_connect("127.0.0.21", self.port, ehlo="sinkclient.test")
        self.assertNotIn("starttls", conn.esmtp_features)
        self.assertNotIn("auth", conn.esmtp_features)
        m1, m2 = message("s1"), message("s2")
        self.assertEqual(mp.send_message(conn, "a@shop.test", ["x@d.test", "y@d.test"],
                                         m1)["data"][0], 250)
        self.assertEqual(mp.send_message(conn, "", ["z@d.test"], m2)["data"][0], 250)
        conn.quit()
        got = self.ok.wait_for(2)
        self.assertEqual(sorted(lf(g["raw"]) for g in got), sorted([lf(m1), lf(m2)]))
        by_subject = {g["msg"]["Subject"]: g for g in got}
        self.assertEqual(by_subject["s1"]["mail_from"], "a@shop.test")
        self.assertEqual(by_subject["s1"]["rcpt_tos"], ["x@d.test", "y@d.test"])
        self.assertEqual(by_subject["s2"]["mail_from"], "")
        self.assertEqual(by_subject["s1"]["helo"], "sinkclient.test")
        self.assertIsNone(by_subject["s1"]["tls"])

    def test_failures(self):
        conn = mp.smtp_connect("127.0.0.22", self.port)
        r = mp.send_message(conn, "a@shop.test", ["x@d.test"], message("t"))
        self.assertEqual(r["rcpt"]["x@d.test"], (451, "4.3.0 Try again later"))
        conn.quit()
        conn = mp.smtp_connect("127.0.0.23", self.port)
        r = mp.send_message(conn, "a@shop.test", ["x@d.test"], message("p"))
        self.assertEqual(r["rcpt"]["x@d.test"], (550, "5.1.1 No such user"))
        conn.quit()
        with self.assertRaises(smtplib.SMTPConnectError) as cm:
            smtplib.SMTP("127.0.0.24", self.port, timeout=scale(10))
        self.assertEqual(cm.exception.smtp_code, 421)
        self.assertEqual(self.temp.messages() + self.perm.messages(), [])


class PostfixTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.mx1 = mp.make_cert(["mx1.mx.test"])
        cls.mx2 = mp.make_cert(["mx2.mx.test"])
        cls.port = port = mp.free_port("127.0.0.11", "127.0.0.12", "127.0.0.13")
        a1, a2 = f"127.0.0.11:{port}", ("127.0.0.12", port)
        cls.pf = mp.PostfixMx([a1, a2], certs={a1: cls.mx1, a2: cls.mx2},
                              require_tls=[a2]).start()

    @classmethod
    def tearDownClass(cls):
        pids = cls.pf.pids()
        assert pids, "no Postfix process found while running"
        cls.pf.stop()
        assert cls.pf.pids() == [], "Postfix processes left"
        left = [p for p in pids if mp._pid_alive(p)]
        assert not left, f"processes {left} survive postfix stop"

    def test_deliver_tls_plain_and_failures(self):
        before = len(self.pf.messages())
        m1, m2, m3 = message("pf1"), message("pf2"), message("pf3")
        conn = mp.smtp_connect("127.0.0.11", self.port, "mx1.mx.test", starttls=True)
        for kw in ("pipelining", "size", "smtputf8", "8bitmime"):
            self.assertIn(kw, conn.esmtp_features)
        r = mp.send_message(conn, "a@shop.test", ["x@dest.test", "tempfail@dest.test",
                                                  "permfail@any.test"], m1)
        self.assertEqual(r["rcpt"]["x@dest.test"][0], 250)
        self.assertEqual(r["rcpt"]["tempfail@dest.test"][0], 450)
        self.assertTrue(r["rcpt"]["tempfail@dest.test"][1].startswith("4.2.1"))
        self.assertEqual(r["rcpt"]["permfail@any.test"][0], 550)
        self.assertTrue(r["rcpt"]["permfail@any.test"][1].startswith("5.1.1"))
        self.assertEqual(r["data"][0], 250)
        self.assertEqual(mp.send_message(conn, "", ["bounce@shop.test"], m2)["data"][0], 250)
        conn.quit()
        conn = mp.smtp_connect("127.0.0.11", self.port)  # STARTTLS optional here
        self.assertIn("starttls", conn.esmtp_features)
        self.assertEqual(mp.send_message(conn, "b@shop.test", ["y@dest.test"], m3)["data"][0],
                         250)
        conn.quit()
        got = self.pf.wait_for(before + 3)[before:]
        by_subject = {g["msg"]["Subject"]: g for g in got}
        self.assertEqual(set(by_subject), {"pf1", "pf2", "pf3"})
        for m, subject in ((m1, "pf1"), (m2, "pf2"), (m3, "pf3")):
            # stored as sent, after Postfix's Return-Path/X-Original-To/Delivered-To/Received
            self.assertTrue(by_subject[subject]["raw"].endswith(lf(m)), subject)
        self.assertEqual(by_subject["pf1"]["mail_from"], "a@shop.test")
        self.assertEqual(by_subject["pf1"]["rcpt_tos"], ["x@dest.test"])
        self.assertEqual(by_subject["pf2"]["mail_from"], "")
        self.assertEqual(by_subject["pf1"]["tls"], "TLSv1.3")
        self.assertEqual(by_subject["pf2"]["tls"], "TLSv1.3")
        self.assertIsNone(by_subject["pf3"]["tls"])
        sessions = [s for s in self.pf.sessions() if s.get("data") == "2"]
        self.assertTrue(sessions, self.pf.sessions())
        self.assertEqual(sessions[-1]["mail"], "2")

    def test_mandatory_tls_and_cert_per_address(self):
        conn = mp.smtp_connect("127.0.0.12", self.port)
        self.assertEqual(conn.mail("a@shop.test")[0], 530)
        conn.close()
        conn = smtplib.SMTP("127.0.0.12", self.port, timeout=scale(15))
        conn.ehlo()
        conn._host = "mx1.mx.test"  # .12 presents the mx2 certificate
        with self.assertRaises(ssl.SSLCertVerificationError):
            conn.starttls(context=mp.client_context())
        conn.close()
        before = len(self.pf.messages())
        conn = mp.smtp_connect("127.0.0.12", self.port, "mx2.mx.test", starttls=True)
        m = message("mandatory")
        r = mp.send_message(conn, "a@shop.test", ["z@dest.test", "permfail@dest.test"], m)
        self.assertEqual(r["rcpt"]["permfail@dest.test"][0], 550)
        self.assertEqual(r["data"][0], 250)
        conn.quit()
        got = self.pf.wait_for(before + 1)[before:]
        self.assertEqual(got[0]["rcpt_tos"], ["z@dest.test"])
        self.assertEqual(got[0]["tls"], "TLSv1.3")
        self.assertIn("TLS connection established", self.pf.maillog())

    def test_second_instance(self):
        """Two instances coexist; stopping one leaves nothing of it and the other serving."""
        other = mp.PostfixMx(f"127.0.0.13:{self.port}", hostname="mx3.mx.test").start()
        master = other.master_pid
        self.assertNotEqual(master, self.pf.master_pid)
        self.assertNotEqual(other.queue_dir, self.pf.queue_dir)
        conn = mp.smtp_connect("127.0.0.13", self.port, "localhost", starttls=True)
        self.assertIn(b"mx3.mx.test", conn.ehlo_resp)
        m = message("second")
        self.assertEqual(mp.send_message(conn, "a@shop.test", ["q@dest.test"], m)["data"][0], 250)
        conn.quit()
        self.assertEqual(len(other.wait_for(1)), 1)
        self.assertTrue(all(g["msg"]["Subject"] != "second" for g in self.pf.messages()))
        pids = other.pids()
        self.assertIn(master, pids)
        other.stop()
        self.assertEqual(other.pids(), [])
        self.assertEqual([p for p in pids if mp._pid_alive(p)], [])
        pg = subprocess.run(["pgrep", "-P", str(master)], stdout=subprocess.PIPE)
        self.assertEqual(pg.stdout.strip(), b"", "children of the stopped master remain")
        self.assertFalse(mp.is_listening("127.0.0.13", self.port))
        other.stop()  # idempotent
        self.assertTrue(self.pf.running())
        self.assertTrue(mp.is_listening("127.0.0.11", self.port))


if __name__ == "__main__":
    harness.main()
