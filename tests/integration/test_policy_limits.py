"""Per-account rate limits, concurrent sessions per account, metering (issue 5).

The real binary, real clients (raw sockets and smtplib) on loopback:
  * messages_per_second: the limit is hit (451 4.7.1 with the wait in the text), the session
    stays usable, and after the wait the same session sends again;
  * recipients_per_minute: the RCPT beyond it gets 452 4.5.3, the message goes to the others;
  * bytes_per_day: a message that can never fit gets 552 5.3.4; smaller ones count;
  * messages_per_day survives a graceful restart and a SIGKILL (windows are written every
    few seconds, not per message);
  * limits.max_sessions_per_account: the AUTH beyond it gets 454 4.7.0, a slot frees on QUIT;
  * `subrelay accounts [--json]` shows the counters while serve runs and after a restart.
"""

import re
import smtplib
import time

import harness
from harness import Account, RawClient, ServerTestCase, dot_stuff, make_message, scale, token

SENDER = "app@limits.test"


def msg(subject="limits", size=0):
    body = "Hello.\r\n"
    if size:
        line = "x" * 76 + "\r\n"
        body = line * (size // len(line) + 1)
    return make_message(SENDER, ["to@example.net"], subject + " " + token(), body=body)


def send_raw(c, rcpts=("to@example.net",), size=0, expect_mail=250):
    """MAIL/RCPT/DATA on a logged-in RawClient; returns (code, text) of the last step."""
    code, lines = c.cmd(f"MAIL FROM:<{SENDER}>")
    if code != 250:
        return code, " ".join(lines)
    for r in rcpts:
        c.expect(f"RCPT TO:<{r}>", 250)
    code, lines = c.data(dot_stuff(msg(size=size)), expect=None)
    return code, " ".join(lines)


accounts_json = harness.accounts_meters


def wait_accounts(srv, pred, timeout=10):
    deadline = time.monotonic() + scale(timeout)
    while True:
        got = accounts_json(srv)
        if pred(got):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"accounts never satisfied the condition: {got}")
        time.sleep(0.2)


class RateLimits(ServerTestCase):
    def test_messages_per_second_hit_and_recovered_in_the_same_session(self):
        acct = Account("burst", "burst-Passw0rd", ["@limits.test"], rate_limits={"messages_per_second": 2})
        srv = self.start_server(accounts=[acct])
        with RawClient(srv.port("implicit"), implicit_tls=True) as c:
            c.login("implicit", acct)
            self.assertEqual(send_raw(c)[0], 250)
            self.assertEqual(send_raw(c)[0], 250)
            code, text = send_raw(c)
            self.assertEqual(code, 451, text)
            self.assertRegex(text, r"^4\.7\.1 Rate limit messages_per_second exceeded; try again in \d+ seconds?$")
            wait = int(re.search(r"in (\d+) second", text).group(1))
            self.assertLessEqual(wait, 1)
            # The refusal was at MAIL: no transaction is open, the session is usable.
            c.expect("NOOP", 250)
            time.sleep(wait + 0.1)
            self.assertEqual(send_raw(c)[0], 250)
            c.expect("QUIT", 221)
        self.assertEqual(len(srv.queue_ids()), 3)

    def test_recipients_per_minute(self):
        acct = Account("fanout", "fanout-Passw0rd", ["@limits.test"], rate_limits={"recipients_per_minute": 3})
        srv = self.start_server(accounts=[acct])
        with RawClient(srv.port("implicit"), implicit_tls=True) as c:
            c.login("implicit", acct)
            c.expect(f"MAIL FROM:<{SENDER}>", 250)
            for i in range(3):
                c.expect(f"RCPT TO:<r{i}@example.net>", 250)
            code, lines = c.cmd("RCPT TO:<r3@example.net>")
            self.assertEqual(code, 452)
            self.assertRegex(lines[0], r"^4\.5\.3 Rate limit recipients_per_minute exceeded; try again in \d+ seconds$")
            c.data(dot_stuff(msg()))
        (entry,) = srv.queue_list()
        self.assertEqual(sorted(r["address"] for r in entry["recipients"]),
                         ["r0@example.net", "r1@example.net", "r2@example.net"])

    def test_bytes_per_day(self):
        acct = Account("bulk", "bulk-Passw0rd", ["@limits.test"], rate_limits={"bytes_per_day": 12000})
        srv = self.start_server(accounts=[acct])
        with RawClient(srv.port("implicit"), implicit_tls=True) as c:
            c.login("implicit", acct)
            # Declared too big for the rule at all: permanent, at MAIL.
            code, lines = c.cmd(f"MAIL FROM:<{SENDER}> SIZE=50000")
            self.assertEqual(code, 552, lines)
            self.assertIn("5.3.4", lines[0])
            # Not declared: found out at the end of data, nothing stored.
            code, text = send_raw(c, size=20000)
            self.assertEqual(code, 552, text)
            self.assertEqual(srv.queue_ids(), [])
            self.assertEqual(send_raw(c, size=4000)[0], 250)
            self.assertEqual(send_raw(c, size=4000)[0], 250)
            code, text = send_raw(c, size=4000)
            self.assertEqual(code, 451, text)
            self.assertIn("bytes_per_day", text)
        self.assertEqual(len(srv.queue_ids()), 2)

    def test_day_counter_survives_restart_and_sigkill(self):
        acct = Account("daily", "daily-Passw0rd", ["@limits.test"], rate_limits={"messages_per_day": 4})
        srv = self.start_server(accounts=[acct])

        def one():
            with RawClient(srv.port("implicit"), implicit_tls=True) as c:
                c.login("implicit", acct)
                return send_raw(c)

        self.assertEqual(one()[0], 250)
        self.assertEqual(one()[0], 250)
        self.assertEqual(srv.stop(), 0)  # graceful: written at exit
        srv.start()
        self.assertEqual(one()[0], 250)
        # Written by the periodic flush (every 2 s) before the kill.
        wait_accounts(srv, lambda a: a.get("daily", {}).get("accepted") == 3)
        srv.kill()
        srv.start()
        self.assertEqual(one()[0], 250)
        code, text = one()
        self.assertEqual(code, 451, text)
        self.assertIn("messages_per_day", text)
        got = wait_accounts(srv, lambda a: a.get("daily", {}).get("refused_by_limit") == 1)
        lim = {l["rule"]: l for l in got["daily"]["limits"]}
        self.assertEqual(lim["messages_per_day"], {"rule": "messages_per_day", "limit": 4, "used": 4})


class SessionsAndMeters(ServerTestCase):
    def test_concurrent_sessions_per_account(self):
        acct = Account("pool", "pool-Passw0rd", ["@limits.test"])
        srv = self.start_server(accounts=[acct], limits={"max_sessions_per_account": 2})
        a = RawClient(srv.port("implicit"), implicit_tls=True)
        b = RawClient(srv.port("implicit"), implicit_tls=True)
        c = RawClient(srv.port("implicit"), implicit_tls=True)
        try:
            a.login("implicit", acct)
            b.login("implicit", acct)
            c.ehlo()
            code, lines = c.auth_plain(acct.username, acct.password, expect=454)
            self.assertIn("4.7.0", lines[0])
            self.assertIn("Too many concurrent sessions", lines[0])
            # The refused session holds no slot and is still usable; a QUIT frees one.
            a.expect("QUIT", 221)
            a.at_eof()
            deadline = time.monotonic() + scale(5)
            while True:
                code, lines = c.cmd("AUTH PLAIN " + __import__("base64").b64encode(
                    f"\0{acct.username}\0{acct.password}".encode()).decode(), timeout=scale(10))
                if code == 235 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            self.assertEqual(code, 235, lines)
            self.assertEqual(send_raw(c)[0], 250)
            self.assertEqual(send_raw(b)[0], 250)
        finally:
            for x in (a, b, c):
                x.close()

    def test_accounts_command_while_serving(self):
        shop = Account("shop", "shop-Passw0rd", ["@limits.test"],
                       rate_limits={"messages_per_minute": 3, "messages_per_day": 1000})
        idle = Account("idle", "idle-Passw0rd", ["@idle.test"], mode="deliver")
        srv = self.start_server(accounts=[shop, idle])
        conn = harness.smtp_ssl(srv.port("implicit"))
        conn.login(shop.username, shop.password)
        for _ in range(3):
            harness.submit(conn, SENDER, ["a@example.net", "b@example.net"], msg())
        with self.assertRaises(smtplib.SMTPSenderRefused):
            harness.submit(conn, SENDER, ["a@example.net"], msg())
        conn.quit()
        with RawClient(srv.port("implicit"), implicit_tls=True) as bad:
            bad.ehlo()
            bad.auth_plain(shop.username, "wrong password", expect=535)
        got = wait_accounts(srv, lambda a: a.get("shop", {}).get("auth_failures") == 1
                            and a["shop"]["accepted"] == 3)
        s = got["shop"]
        self.assertEqual(s["mode"], "capture")
        self.assertEqual(s["recipients"], 6)
        self.assertEqual(s["refused_by_limit"], 1)
        self.assertGreater(s["bytes"], 3 * 200)
        lim = {l["rule"]: l for l in s["limits"]}
        self.assertEqual(lim["messages_per_day"]["used"], 3)
        self.assertIsNone(lim["messages_per_minute"]["used"])
        # Accounts without traffic are listed too.
        self.assertEqual(got["idle"]["accepted"], 0)
        self.assertEqual(got["idle"]["mode"], "deliver")
        text = srv.cli("accounts").stdout.decode()
        # ... AUTHFAIL 1, SUPPRESSED 0 (the account's suppression list), then the limits.
        self.assertRegex(text, r"(?m)^shop\s+capture\s+3\s+1\s+6\s+\d+\s+1\s+0\s+messages_per_day=3/1000 messages_per_minute=3$")
        self.assertEqual(s["suppressed"], 0)
        # --data-dir works without the config; --help exits 0.
        proc = harness.subrelay("accounts", "--data-dir", srv.data_dir)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("shop", proc.stdout.decode())
        self.assertEqual(harness.subrelay("accounts", "--help").returncode, 0)
        self.assertEqual(harness.subrelay("accounts", "extra").returncode, 2)
        # After a restart the totals are still there.
        srv.stop()
        self.assertEqual(accounts_json(srv)["shop"]["accepted"], 3)


if __name__ == "__main__":
    harness.main()
