"""Brute-force defence (issue 5): failed AUTHs counted per client address and per username;
progressive delays, then the address is refused (454 4.7.0 at AUTH, 421 4.7.0 at connect) for
a while; other clients' logins are unaffected; unknown usernames cost what wrong passwords
cost. Clients use distinct loopback source addresses (127.0.0.x) to be distinct clients.
"""

import base64
import re
import statistics
import time

import harness
from harness import Account, RawClient, ServerTestCase, scale

LIMITS = {
    "auth_failure_delay": "0s",
    "auth_delay_after": 3,
    "auth_delay_base": "300ms",
    "auth_delay_max": "1200ms",
    "auth_lockout_after": 6,
    "auth_lockout_window": "10m",
    "auth_lockout_duration": "4s",
    "max_auth_failures": 100,
}

WEBSHOP = Account("webshop", "correct horse battery staple", ["@shop.test"])
CI = Account("ci", "ci-secret-Passw0rd", ["@ci.test"])


def plain(user, password):
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def timed_auth(c, user, password):
    t = time.monotonic()
    code, lines = c.cmd(plain(user, password), timeout=scale(20))
    return code, lines[0] if lines else "", time.monotonic() - t


def client(srv, source):
    c = RawClient(srv.port("implicit"), implicit_tls=True, source=source)
    c.ehlo()
    return c


class BruteForce(ServerTestCase):
    def test_delays_then_lockout_then_recovery(self):
        srv = self.start_server(accounts=[WEBSHOP, CI], limits=LIMITS)
        attacker = "127.0.0.5"
        times = []
        with client(srv, attacker) as c:
            guesses = [("ci", "guess1"), ("nobody-a", "x"), ("ci", "guess2"), ("nobody-b", "y"),
                       ("ci", "guess3"), ("ci", "guess4")]
            for user, pw in guesses:
                code, text, dt = timed_auth(c, user, pw)
                self.assertEqual(code, 535, text)
                times.append(dt)
            # The first three are answered without a policy delay; then 300, 600, 1200 ms.
            self.assertGreaterEqual(times[3], 0.3)
            self.assertGreaterEqual(times[4], 0.6)
            self.assertGreaterEqual(times[5], 1.2)
            self.assertLess(times[0], times[3])
            # Locked: refused without a password check, even with the right password.
            code, text, dt = timed_auth(c, CI.username, CI.password)
            self.assertEqual(code, 454)
            self.assertRegex(text, r"^4\.7\.0 Too many authentication failures from your address; "
                                   r"try again in \d+ seconds?$")
        # A new connection from that address: 421 at the greeting, then closed.
        with RawClient(srv.port("implicit"), implicit_tls=True, source=attacker,
                       read_greeting=False) as c:
            code, lines = c.reply()
            self.assertEqual(code, 421)
            self.assertTrue(lines[0].startswith("4.7.0 Too many authentication failures"), lines)
            self.assertTrue(c.at_eof())
        # Meanwhile a legitimate client elsewhere logs in at once...
        with client(srv, "127.0.0.6") as c:
            code, text, dt = timed_auth(c, WEBSHOP.username, WEBSHOP.password)
            self.assertEqual(code, 235, text)
            self.assertLess(dt, scale(1.0))
        # ...and the owner of the attacked username too: the first time at most the
        # username's capped delay, then (a credential verified before) at once.
        with client(srv, "127.0.0.7") as c:
            code, text, dt = timed_auth(c, CI.username, CI.password)
            self.assertEqual(code, 235, text)
            self.assertLess(dt, scale(1.0) + 1.2)
        with client(srv, "127.0.0.8") as c:
            code, text, dt = timed_auth(c, CI.username, CI.password)
            self.assertEqual(code, 235, text)
            self.assertLess(dt, 0.25 * scale(1.0))
        # The lock ends after auth_lockout_duration.
        time.sleep(4.2)
        with client(srv, attacker) as c:
            code, text, dt = timed_auth(c, WEBSHOP.username, WEBSHOP.password)
            self.assertEqual(code, 235, text)
        log = srv.log_text()
        self.assertIn("reason=auth-lockout", log)
        for secret in ("guess1", "guess4", CI.password, WEBSHOP.password):
            self.assertNotIn(secret, log)
        # The failures are metered per existing account ("(unknown)" for the rest).
        srv.stop()
        out = srv.cli("accounts", "--json").stdout.decode()
        self.assertRegex(out, r'"account":"ci",[^\n]*"auth_failures":4')
        self.assertRegex(out, r'"account":"\(unknown\)",[^\n]*"auth_failures":2')

    def test_auth_abandoned_during_its_delay_counts_as_a_failure(self):
        srv = self.start_server(accounts=[WEBSHOP, CI], limits=dict(LIMITS, auth_delay_base="2s",
                                                                      auth_delay_max="2s"))
        source = "127.0.0.10"
        with client(srv, source) as c:
            for i in range(3):
                self.assertEqual(timed_auth(c, CI.username, f"bad-{i}")[0], 535)
        # Each of these would be answered after 2 s: the client gives up at once instead.
        # The server does not stop reading for it: the guess is still checked and counted
        # when its delay is over, so dropping slow attempts gains a guesser nothing.
        for i in range(3):
            c = client(srv, source)
            c.send(plain(CI.username, f"abandoned-{i}") + "\r\n")
            time.sleep(0.1)
            c.close()
        time.sleep(2.0 + scale(1.0))
        # 3 + 3 failures reach auth_lockout_after (6): the address is locked now.
        with RawClient(srv.port("implicit"), implicit_tls=True, source=source, read_greeting=False) as c:
            self.assertEqual(c.reply()[0], 421)

    def test_unknown_usernames_cost_the_same_as_wrong_passwords(self):
        srv = self.start_server(accounts=[WEBSHOP, CI], limits=dict(LIMITS, auth_delay_after=100))

        def median_time(source, user):
            samples = []
            with client(srv, source) as c:
                for i in range(5):
                    code, text, dt = timed_auth(c, user, f"wrong-{i}")
                    self.assertEqual(code, 535, text)
                    samples.append(dt)
            return statistics.median(samples)

        unknown = median_time("127.0.0.8", "no-such-user")
        wrong = median_time("127.0.0.9", WEBSHOP.username)
        # Both pay one scrypt (about 100 ms); a missing user must not answer measurably faster.
        ratio = unknown / wrong
        self.assertGreater(ratio, 0.5, (unknown, wrong))
        self.assertLess(ratio, 2.0, (unknown, wrong))
        self.assertGreater(unknown, 0.02)


if __name__ == "__main__":
    harness.main()
