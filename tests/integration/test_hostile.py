"""Hostile clients without (or with failed) credentials, against the real binary:

  H1a  junk commands (NOOP RSET HELP VRFY EHLO HELO) are limited per session
       (limits.max_junk_commands, default 100); an accepted message resets the count;
  H1b  a client that pipelines without reading cannot make the server buffer unbounded
       output: it stops reading past ~64 KiB of unsent replies and closes the connection
       (reason=output-stalled) when they do not drain within command_timeout;
  H2   refusing a locked-out address at connect does not leak its per-IP connection slots;
  H3   max_connections_per_ip counts IPv6 clients by /64 (in a private network namespace);
  H4   overlong usernames and passwords are refused before any work, and not counted as
       guesses;
  H5   guessing a username's password does not slow its owner down; smtplib's PLAIN-then-
       LOGIN retry of one wrong password is one failure.

Clients use distinct loopback source addresses (127.0.0.x) to be distinct clients.
"""

import base64
import os
import random
import select
import shutil
import socket
import ssl
import string
import subprocess
import sys
import threading
import time

import harness
from harness import (Account, RawClient, ServerTestCase, SocketRawClient, connect_socket,
                     dot_stuff, make_message, rss_kb, scale, token)

WEBSHOP = Account("webshop", "correct horse battery staple", ["@shop.test"])
CI = Account("ci", "ci-secret-Passw0rd", ["@ci.test"])

JUNK_REPLIES = {"NOOP": 250, "RSET": 250, "HELP": 214, "VRFY": 252, "EHLO": 250, "HELO": 250}
JUNK_CYCLE = ["NOOP", "RSET", "HELP", "VRFY someone@example.net", "EHLO junk.subrelay.test",
              "HELO junk.subrelay.test"]

MB = 1024 * 1024


def plain(user, password):
    raw = b"\0" + _b(user) + b"\0" + _b(password)
    return b"AUTH PLAIN " + base64.b64encode(raw)


def _b(s):
    return s if isinstance(s, bytes) else s.encode()


def b64(s):
    return base64.b64encode(_b(s))


def implicit_client(srv, source=None, timeout=10):
    c = RawClient(srv.port("implicit"), implicit_tls=True, source=source, timeout=timeout)
    if c.greeting[0] != 220:
        c.close()
        raise AssertionError(f"greeting from {source}: {c.greeting}")
    c.ehlo()
    return c


def timed(c, line, timeout=20):
    t = time.monotonic()
    code, lines = c.cmd(line, timeout=scale(timeout))
    return code, (lines[0] if lines else ""), time.monotonic() - t


def send_message(tc, c, tag="ok"):
    """One normal message on a logged-in RawClient; returns the queue id."""
    tok = token(tag)
    c.expect("MAIL FROM:<orders@shop.test>", 250)
    c.expect("RCPT TO:<alice@example.net>", 250)
    code, lines = c.data(dot_stuff(make_message("orders@shop.test", ["alice@example.net"],
                                                f"{tag} {tok}")))
    return harness.queued_id(lines[0])


def socket_ended(sock, wait=0.0):
    """True if the peer has closed (FIN or RST) the connection, without reading from it."""
    p = select.poll()
    p.register(sock.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    ev = p.poll(int(wait * 1000))
    return any(e & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, e in ev)


class Flooder(threading.Thread):
    """Sends `unit` repeated up to `total` bytes on sock and never reads. Records how the
    sending ended (all sent, or an error such as a reset by the server)."""

    def __init__(self, sock, unit, total):
        super().__init__(daemon=True)
        self.sock = sock
        self.chunk = unit * max(1, 65536 // len(unit))
        self.total = total
        self.sent = 0
        self.error = None
        self.finished_at = None

    def run(self):
        try:
            while self.sent < self.total:
                self.sock.sendall(self.chunk)
                self.sent += len(self.chunk)
        except (OSError, ssl.SSLError, ValueError) as e:
            self.error = e
        self.finished_at = time.monotonic()


class Hostile(ServerTestCase):
    def assert_enhanced(self, lines, prefix):
        self.assertTrue(lines and lines[0].startswith(prefix),
                        f"expected enhanced code {prefix}: {lines}")

    def assert_junk_421(self, c, code, lines, after):
        self.assertEqual(code, 421, f"junk command {after + 1} answered {code} {lines}; "
                                    f"transcript:\n{c.format_transcript()}")
        self.assert_enhanced(lines, "4.7.0")
        self.assertIn("Too many commands without a mail transaction", lines[0])
        self.assertTrue(c.at_eof(scale(5)), "connection not closed after the junk 421")

    # -- H1a: junk commands ----------------------------------------------------------------------
    def test_junk_commands_limited(self):
        srv = self.start_server(accounts=[WEBSHOP], limits={"max_junk_commands": 20})
        with implicit_client(srv) as c:  # its EHLO is junk command 1
            for i in range(1, 20):
                cmd = JUNK_CYCLE[i % len(JUNK_CYCLE)]
                code, lines = c.cmd(cmd)
                self.assertEqual(code, JUNK_REPLIES[cmd.split()[0]],
                                 f"junk command {i + 1} ({cmd}): {code} {lines}")
            code, lines = c.cmd("NOOP")
            self.assert_junk_421(c, code, lines, 20)
        # Every kind counts, HELP and VRFY included; on the STARTTLS listener, in clear.
        for kind in ("HELP", "VRFY someone@example.net", "HELO x.test", "RSET"):
            with self.subTest(kind=kind):
                with RawClient(srv.port("starttls")) as c:
                    for i in range(20):
                        code, lines = c.cmd(kind)
                        self.assertEqual(code, JUNK_REPLIES[kind.split()[0]], (i, lines))
                    code, lines = c.cmd(kind)
                    self.assert_junk_421(c, code, lines, 20)
        # Others are not affected.
        with implicit_client(srv) as c:
            c.auth_plain(WEBSHOP.username, WEBSHOP.password)
            send_message(self, c)

    def test_junk_count_resets_with_each_accepted_message(self):
        srv = self.start_server(accounts=[WEBSHOP], limits={"max_junk_commands": 20})
        with implicit_client(srv) as c:  # EHLO: 1
            c.auth_plain(WEBSHOP.username, WEBSHOP.password)
            for rnd in range(4):
                # 15 junk commands, a transaction abandoned with RSET (junk too), a message.
                for i in range(14):
                    c.expect("NOOP" if i % 2 else "RSET", 250)
                c.expect("MAIL FROM:<orders@shop.test>", 250)
                c.expect("RCPT TO:<alice@example.net>", 250)
                c.expect("RSET", 250)
                send_message(self, c, tag=f"round{rnd}")
            # 4 x 16 junk commands in all, never more than 16 since the last message.
            for i in range(20):
                cmd = JUNK_CYCLE[i % len(JUNK_CYCLE)]
                code, lines = c.cmd(cmd)
                self.assertEqual(code, JUNK_REPLIES[cmd.split()[0]],
                                 f"junk command {i + 1} since the last message ({cmd}): "
                                 f"{code} {lines}")
            code, lines = c.cmd("RSET")
            self.assert_junk_421(c, code, lines, 20)
        self.assertEqual(len(srv.queue_ids()), 4)

    def test_junk_commands_default_100_and_0_unlimited(self):
        srv = self.start_server(accounts=[WEBSHOP], listeners=("starttls",))
        with RawClient(srv.port("starttls")) as c:
            c.send(b"NOOP\r\n" * 100)
            for i in range(100):
                code, lines = c.reply()
                self.assertEqual(code, 250, f"NOOP {i + 1}: {code} {lines}")
            code, lines = c.cmd("NOOP")
            self.assert_junk_421(c, code, lines, 100)
        srv2 = self.start_server(accounts=[WEBSHOP], listeners=("starttls",),
                                 limits={"max_junk_commands": 0}, name="unlimited")
        with RawClient(srv2.port("starttls")) as c:
            c.send(b"NOOP\r\n" * 150)
            for i in range(150):
                code, lines = c.reply()
                self.assertEqual(code, 250, f"NOOP {i + 1} with max_junk_commands 0: {lines}")
            c.expect("QUIT", 221)

    # -- H1b: unread output ----------------------------------------------------------------------
    def watch(self, srv, sock, flooder, baseline_kb, timeout, rss_limit_kb, reader=None):
        """Waits until the connection has ended (the flooder got an error, the socket saw FIN
        or RST, or the reader saw EOF), the server's RSS grew by more than rss_limit_kb, or
        the timeout. Returns (ended after seconds or None, max RSS growth in KiB)."""
        started = time.monotonic()
        deadline = started + timeout
        peak = 0
        while True:
            peak = max(peak, rss_kb(srv.proc.pid) - baseline_kb)
            ended = (flooder.error is not None or (reader is not None and reader.eof_at)
                     or (reader is None and socket_ended(sock, 0.05)))
            if ended:
                return time.monotonic() - started, peak
            if peak > rss_limit_kb or time.monotonic() > deadline or not srv.alive():
                return None, peak
            time.sleep(0.05)

    def test_unread_output_bounded_and_stalled_connection_closed(self):
        srv = self.start_server(accounts=[WEBSHOP, CI], limits={"command_timeout": "3s"},
                                env=harness.rss_test_env())
        sock = connect_socket(srv.port("implicit"), rcvbuf=4096, timeout=30)
        c = SocketRawClient(sock, implicit_tls=True, timeout=30)
        self.addCleanup(c.close)
        self.assertEqual(c.greeting[0], 220)
        c.login("implicit", WEBSHOP)
        c.expect("MAIL FROM:<orders@shop.test>", 250)
        time.sleep(0.2)
        baseline = rss_kb(srv.proc.pid)
        flooder = Flooder(c.sock, b"RCPT TO:<x@example.com>\r\n", 24 * MB)
        flooder.start()
        time.sleep(0.5)
        # Another client is served normally meanwhile.
        t = time.monotonic()
        with implicit_client(srv, source="127.0.0.9") as other:
            other.auth_plain(CI.username, CI.password)
            other.expect("MAIL FROM:<build@ci.test>", 250)
            other.expect("RCPT TO:<dev@example.net>", 250)
            code, lines = other.data(dot_stuff(make_message(
                "build@ci.test", ["dev@example.net"], f"meanwhile {token()}")))
        self.assertLess(time.monotonic() - t, scale(5), "the other client was slow")
        ended, peak = self.watch(srv, c.sock, flooder, baseline, scale(15), 30 * 1024)
        flooder.join(scale(10))
        self.assertLess(peak, 30 * 1024,
                        f"server RSS grew by {peak // 1024} MB while a client did not read its "
                        f"replies ({flooder.sent // MB} MiB of RCPT sent)")
        self.assertIsNotNone(ended, f"connection still open {scale(15):.0f}s after a client "
                                    f"stopped reading (command_timeout 3s); "
                                    f"{flooder.sent // 1024} KiB of RCPT sent")
        self.assertLess(flooder.sent, 24 * MB, "the server read the whole flood")
        srv.wait_log(r"reason=output-stalled", timeout=5)
        self.assertTrue(srv.alive())
        with implicit_client(srv) as c2:
            c2.auth_plain(WEBSHOP.username, WEBSHOP.password)
            send_message(self, c2)

    def test_slow_reader_deadline_not_rearmed_by_progress(self):
        # Reads 2 KiB every 250 ms: the output makes progress but never drains; the deadline
        # is a total one, so the connection is closed about command_timeout after it stalled.
        srv = self.start_server(accounts=[WEBSHOP], listeners=("none", "implicit"),
                                env=harness.rss_test_env(),
                                limits={"command_timeout": "3s"})
        sock = connect_socket(srv.port("none"), rcvbuf=4096, timeout=30)
        c = SocketRawClient(sock, timeout=30)
        self.addCleanup(c.close)
        c.ehlo()
        c.auth_plain(WEBSHOP.username, WEBSHOP.password)
        c.expect("MAIL FROM:<orders@shop.test>", 250)
        flooder = Flooder(sock, b"RCPT TO:<x@example.com>\r\n", 64 * MB)

        class SlowReader(threading.Thread):
            eof_at = None
            got = 0

            def run(self):
                while True:
                    time.sleep(0.25)
                    try:
                        data = sock.recv(2048)
                    except socket.timeout:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        self.eof_at = time.monotonic()
                        return
                    self.got += len(data)

        reader = SlowReader(daemon=True)
        baseline = rss_kb(srv.proc.pid)
        flooder.start()
        reader.start()
        ended, peak = self.watch(srv, sock, flooder, baseline, scale(20), 30 * 1024,
                                 reader=reader)
        self.assertLess(peak, 30 * 1024, f"server RSS grew by {peak // 1024} MB")
        self.assertIsNotNone(ended, f"a slowly reading client (read {reader.got} bytes) was "
                                    f"still connected after {scale(20):.0f}s with "
                                    f"command_timeout 3s")
        self.assertLess(ended, scale(12), "the output deadline was re-armed by partial progress")
        srv.wait_log(r"reason=output-stalled", timeout=5)
        self.assertTrue(srv.alive())

    def test_plaintext_ehlo_flood_without_reading(self):
        srv = self.start_server(accounts=[WEBSHOP], limits={"command_timeout": "3s"},
                                env=harness.rss_test_env())
        with implicit_client(srv):
            pass
        time.sleep(0.2)
        baseline = rss_kb(srv.proc.pid)
        sock = connect_socket(srv.port("starttls"), rcvbuf=4096, timeout=30)
        self.addCleanup(sock.close)
        flooder = Flooder(sock, b"EHLO a\r\n", 8 * MB)
        flooder.start()
        ended, peak = self.watch(srv, sock, flooder, baseline, scale(15), 30 * 1024)
        self.assertLess(peak, 30 * 1024,
                        f"server RSS grew by {peak // 1024} MB from an EHLO flood that was "
                        f"never read ({flooder.sent // 1024} KiB sent)")
        self.assertIsNotNone(ended, "the EHLO flood's connection was not closed")
        self.assertTrue(srv.alive())
        with implicit_client(srv) as c:
            c.auth_plain(WEBSHOP.username, WEBSHOP.password)
            send_message(self, c)

    # -- H2: lockout and per-IP slots ------------------------------------------------------------
    def test_lockout_refusals_do_not_leak_connection_slots(self):
        srv = self.start_server(accounts=[WEBSHOP], limits={
            "max_connections_per_ip": 3, "auth_lockout_after": 3, "auth_lockout_duration": "3s",
            "auth_delay_after": 100, "auth_failure_delay": "0s", "max_auth_failures": 100})
        source = "127.0.0.5"
        with implicit_client(srv, source=source) as c:
            for i in range(3):
                code, text, _ = timed(c, plain(WEBSHOP.username, f"wrong-{i}"))
                self.assertEqual(code, 535, text)
            locked_at = time.monotonic()
            try:
                c.cmd("QUIT")
            except (harness.ConnectionClosed, OSError):
                pass
            c.at_eof(scale(2))
        for i in range(10):
            # The server may release a slot a moment after the client has seen the close (it
            # is released when the server's close completes, possibly on another worker):
            # "Too many connections" is retried for a short while, a leaked slot stays.
            retry_until = time.monotonic() + scale(1.0)
            while True:
                with RawClient(srv.port("starttls"), source=source, read_greeting=False) as r:
                    code, lines = r.reply()
                    self.assertTrue(r.at_eof(scale(5)))
                if code == 421 and "Too many connections" in lines[0] \
                        and time.monotonic() < retry_until:
                    time.sleep(0.05)
                    continue
                break
            self.assertEqual(code, 421, f"connection {i + 1} while locked: {code} {lines}")
            self.assertTrue(lines[0].startswith("4.7.0 Too many authentication failures"),
                            f"connection {i + 1} while locked: {lines}")
        left = locked_at + scale(3.5) - time.monotonic()
        if left > 0:
            time.sleep(left)
        with RawClient(srv.port("starttls"), source=source, read_greeting=False) as r:
            code, lines = r.reply()
            self.assertEqual(code, 220, f"after the lock expired: {code} {lines}")
            r.ehlo()
            r.starttls()
            r.ehlo()
            r.auth_plain(WEBSHOP.username, WEBSHOP.password)

    # -- H3: IPv6 /64 --------------------------------------------------------------------------
    def test_connections_per_ip_counts_ipv6_by_64(self):
        if shutil.which("unshare") is None:
            self.fail("unshare (util-linux) is not installed")
        proc = subprocess.run(["unshare", "-n", sys.executable, os.path.abspath(__file__),
                               "--ipv6-netns-child"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=scale(90), env=os.environ)
        out = proc.stdout.decode(errors="replace")
        self.assertEqual(proc.returncode, 0, f"in the network namespace:\n{out}")
        self.assertIn("IPV6-CHILD-OK", out)

    # -- H4: overlong credentials ----------------------------------------------------------------
    def test_overlong_credentials_refused_early_and_not_counted(self):
        srv = self.start_server(accounts=[WEBSHOP], limits={
            "auth_lockout_after": 3, "auth_delay_after": 2, "auth_failure_delay": "0s"})
        rnd = random.Random()
        long_user = "".join(rnd.choice(string.ascii_lowercase) for _ in range(9000))
        source = "127.0.0.7"
        # PLAIN: a 9,000-byte username fits the AUTH line but not the username limit. (From
        # another address: whether these count as failures is not what is tested here.)
        with implicit_client(srv, source="127.0.0.8") as c:
            line = plain(long_user, "whatever")
            self.assertLess(len(line), 12288)
            code, lines = c.cmd(line)
            self.assertEqual(code, 501, lines)
            self.assertEqual(lines[0], "5.5.2 Username too long (at most 255 bytes)")
            c.expect("NOOP", 250)
        # LOGIN: refused right after the username, no password prompt.
        with implicit_client(srv, source="127.0.0.8") as c:
            c.expect("AUTH LOGIN", 334)
            code, lines = c.cmd(b64(long_user))
            self.assertEqual(code, 501, f"after a 9000-byte LOGIN username: {code} {lines}")
            self.assertEqual(lines[0], "5.5.2 Username too long (at most 255 bytes)")
            self.assertTrue(c.nothing_pending(0.3), c.format_transcript())
            c.expect("NOOP", 250)
        # Passwords over 1,024 bytes: 535 at once, and not counted as guesses.
        long_pw = "p" * 1500
        times = []
        for i in range(10):
            with implicit_client(srv, source=source) as c:
                if i % 2 == 0:
                    code, text, dt = timed(c, plain(WEBSHOP.username, long_pw + str(i)))
                else:
                    c.expect("AUTH LOGIN", 334)
                    c.expect(b64(WEBSHOP.username), 334)
                    code, text, dt = timed(c, b64(long_pw + str(i)))
                self.assertEqual((code, text), (535, "5.7.8 Authentication credentials invalid"),
                                 f"attempt {i + 1} with a {len(long_pw)}-byte password")
                times.append(dt)
        self.assertLess(max(times), scale(0.5), f"overlong passwords were delayed: {times}")
        with implicit_client(srv, source=source) as c:
            code, text, dt = timed(c, plain(WEBSHOP.username, WEBSHOP.password))
            self.assertEqual(code, 235, f"right password after 10 overlong ones: {text}")
            self.assertLess(dt, scale(0.5))
        log = srv.log_text()
        self.assertIn("reason=username-too-long", log)
        self.assertIn("reason=password-too-long", log)
        for part in (long_user[:16], long_user[4000:4016], long_user[-16:]):
            self.assertNotIn(part, log, "the overlong username appears in the log")
        self.assertNotIn("p" * 64, log)

    # -- H5: the victim of a guesser -------------------------------------------------------------
    def test_guessing_does_not_delay_the_owner(self):
        srv = self.start_server(accounts=[WEBSHOP, CI], limits={
            "auth_failure_delay": "0s", "auth_delay_after": 2, "auth_delay_base": "200ms",
            "auth_delay_max": "8s", "auth_lockout_after": 50, "max_auth_failures": 100})
        with implicit_client(srv, source="127.0.0.5") as attacker:
            times = []
            for i in range(6):
                code, text, dt = timed(attacker, plain(WEBSHOP.username, f"guess-{i}"))
                self.assertEqual(code, 535, text)
                times.append(dt)
            self.assertGreaterEqual(times[5], 0.8, f"the guesser is not slowed down: {times}")
            with implicit_client(srv, source="127.0.0.6") as owner:
                code, text, dt = timed(owner, plain(WEBSHOP.username, WEBSHOP.password))
                self.assertEqual(code, 235, text)
                self.assertLess(dt, scale(0.5), f"the owner waited {dt:.2f}s to log in while "
                                                f"someone else guessed its password")
            code, text, dt = timed(attacker, plain(WEBSHOP.username, "guess-6"))
            self.assertEqual(code, 535, text)
            self.assertGreaterEqual(dt, 1.0, "the guesser's delay was reset by the owner's login")

    def test_smtplib_plain_then_login_retry_is_one_failure(self):
        import smtplib
        srv = self.start_server(accounts=[WEBSHOP, CI], limits={"auth_failure_delay": "0s"})
        conn = harness.smtp_ssl(srv.port("implicit"))
        self.addCleanup(conn.close)
        auths = conn.esmtp_features.get("auth", "").upper().split()
        self.assertIn("PLAIN", auths)
        self.assertIn("LOGIN", auths)
        with self.assertRaises(smtplib.SMTPAuthenticationError):
            conn.login(WEBSHOP.username, "not the password")
        try:
            conn.quit()
        except smtplib.SMTPException:
            pass
        self.assertEqual(srv.stop(), 0)
        meters = harness.accounts_meters(srv)
        self.assertIn("webshop", meters, meters)
        self.assertEqual(meters["webshop"].get("auth_failures"), 1,
                         f"smtplib's PLAIN then LOGIN with one wrong password: {meters['webshop']}")


# --------------------------------------------------------------------------------------------
# H3's body: runs as root inside `unshare -n` (a private network namespace); every address
# used exists only there.
# --------------------------------------------------------------------------------------------

V6_SAME_A = "2001:db8:1:2::10"
V6_SAME_B = "2001:db8:1:2::11"
V6_OTHER = "2001:db8:1:3::10"


class _V6Server(harness.Server):
    def __init__(self, v6port, **kw):
        super().__init__(**kw)
        self.v6port = v6port

    def config(self):
        cfg = super().config()
        cfg["listeners"].append({"address": f"[::]:{self.v6port}", "tls": "starttls"})
        return cfg


def _ipv6_child():
    def sh(*argv):
        subprocess.run(argv, check=True, timeout=30)

    sh("ip", "link", "set", "lo", "up")
    for a in (V6_SAME_A, V6_SAME_B, V6_OTHER):
        sh("ip", "-6", "addr", "add", f"{a}/64", "dev", "lo", "nodad")
    v6port = harness.free_port()
    srv = _V6Server(v6port, accounts=[WEBSHOP], listeners=("implicit",),
                    limits={"max_connections_per_ip": 2})
    held = []
    ok = False
    try:
        srv.start()
        srv.wait_log(r"listening on \[::\]:%d" % v6port)

        def connect(source):
            s = connect_socket(v6port, host="::1", source=source)
            c = SocketRawClient(s, read_greeting=False)
            held.append(c)
            return c, c.reply()

        for i in range(2):
            c, (code, lines) = connect(V6_SAME_A)
            assert code == 220, f"connection {i + 1} from {V6_SAME_A}: {code} {lines}"
        c, (code, lines) = connect(V6_SAME_B)
        assert code == 421 and lines[0].startswith("4.7.0") and "Too many connections" in \
            lines[0], f"third connection from the /64 ({V6_SAME_B}): {code} {lines}"
        c, (code, lines) = connect(V6_OTHER)
        assert code == 220, f"connection from another /64 ({V6_OTHER}): {code} {lines}"
        c.ehlo()
        for c in held[:2]:
            c.expect("NOOP", 250)
        ok = True
    except Exception as e:  # reported through the exit status and output
        print(f"FAILED: {e!r}")
    finally:
        for c in held:
            c.close()
        problems = srv.finish()
        srv.kill()
        if not ok or problems:
            print("\n".join(problems))
            srv.dump_logs(sys.stdout, tail=80)
        for d in harness._tmpdirs:
            shutil.rmtree(d, ignore_errors=True)
    if ok and not problems:
        print("IPV6-CHILD-OK")
        sys.exit(0)
    sys.exit(1)


if __name__ == "__main__":
    if sys.argv[1:] == ["--ipv6-netns-child"]:
        _ipv6_child()
    else:
        harness.main()
