"""The queue's operator commands: `subrelay queue list/show` (per-recipient state, attempts,
next try, last error, attempt history) and `queue retry ID|--all`, `queue drop ID`,
`queue bounce ID`, while `serve` runs and after it stopped.

The account is in `deliver` mode and the resolver is 127.0.0.1:9, where nothing answers: until
delivery is wired the messages stay queued, and once it is they are deferred (DNS timeout).
Either state is accepted below; what the commands do to them is what is checked."""

import json
import re
import time

import harness
from harness import Account, make_message, submit, subrelay, token

SHOP = Account("shop", "shop-secret-Passw0rd", ["@shop.test"], mode="deliver")
SENDER = "orders@shop.test"
WAITING = ("queued", "deferred")
UNKNOWN_ID = "0000000000000000"


def out_of(proc):
    return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


def make_server(**kw):
    srv = harness.Server(accounts=[SHOP], listeners=("starttls",), **kw)
    # Nothing listens on the discard port: a delivery attempt cannot leave the machine.
    srv.extra_config = {"delivery": {"resolvers": ["127.0.0.1:9"], "port": srv.dead_smtp_port}}
    return srv


class QueueCmd(harness.ServerTestCase):
    @classmethod
    def setUpClass(cls):
        srv = make_server(name="queue-cmd")
        cls.class_servers = list(cls.class_servers) + [srv]
        srv.start()
        cls.srv = srv

    # -- helpers ---------------------------------------------------------------------------------
    def send(self, rcpts, srv=None):
        srv = srv or self.srv
        conn = harness.smtp_starttls(srv.port())
        try:
            conn.login(SHOP.username, SHOP.password)
            msg = make_message(SENDER, rcpts, f"queue cmd {token()}")
            return submit(conn, SENDER, rcpts, msg)
        finally:
            conn.quit()

    def cli(self, *args, srv=None, expect=0):
        proc = (srv or self.srv).cli(*args)
        self.assertEqual(proc.returncode, expect, f"{args}: {out_of(proc)}")
        if expect == 0:
            self.assertEqual(proc.stderr.strip(), b"", f"{args}: unexpected stderr")
        return proc.stdout.decode()

    def show(self, qid, srv=None):
        return (srv or self.srv).queue_show_json(qid)

    def assert_waiting(self, entry):
        for r in entry["recipients"]:
            self.assertIn(r["state"], WAITING, entry)

    # -- list / show -----------------------------------------------------------------------------
    def test_list_and_show_report_delivery_state(self):
        rcpts = [f"{token('a')}@example.net", f"{token('b')}@example.org"]
        qid = self.send(rcpts)
        entries = {e["id"]: e for e in self.srv.queue_list()}
        self.assertIn(qid, entries)
        e = entries[qid]
        for key in ("id", "account", "sender", "recipients", "size", "received_at", "age",
                    "captured", "attempts", "next_attempt", "last_error", "is_dsn"):
            self.assertIn(key, e)
        self.assertEqual(e["account"], "shop")
        self.assertFalse(e["captured"])
        self.assertFalse(e["is_dsn"])
        self.assertEqual([r["address"] for r in e["recipients"]], rcpts)
        for i, r in enumerate(e["recipients"]):
            for key in ("address", "state", "attempts", "next_attempt", "last_error", "index",
                        "next_attempt_in", "dsn_pending"):
                self.assertIn(key, r)
            self.assertEqual(r["index"], i)
            self.assertIn(r["state"], WAITING)
            self.assertIsInstance(r["attempts"], int)
            self.assertFalse(r["dsn_pending"])
            # A waiting recipient always has a next try, an ISO time not in the far past.
            self.assertRegex(r["next_attempt"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
            self.assertGreaterEqual(r["next_attempt_in"], 0)
            if r["attempts"] == 0:
                self.assertEqual(r["last_error"], "")
            else:
                self.assertNotEqual(r["last_error"], "", r)
        self.assertGreaterEqual(e["age"], 0)
        self.assertLess(e["age"], harness.scale(600))

        shown = self.show(qid)
        self.assertEqual(shown["id"], qid)
        self.assertIn("history", shown)
        self.assertIsInstance(shown["history"], list)
        for h in shown["history"]:  # empty until delivery is wired
            for key in ("recipient", "index", "at", "mx", "tls_version", "tls_cipher", "code",
                        "reply", "result"):
                self.assertIn(key, h)
            self.assertIn(h["recipient"], rcpts)
        self.assertEqual(sum(1 for h in shown["history"]),
                         sum(r["attempts"] for r in shown["recipients"]))

        text = self.cli("queue", "list")
        line = [l for l in text.splitlines() if l.startswith(qid)]
        self.assertEqual(len(line), 1, text)
        for r in rcpts:
            # ", in flight" while the scheduler's attempt for it is running.
            self.assertRegex(line[0], re.escape(r) + r" \((queued|deferred)(, in flight)?, \d+ attempts?, next ")
        text = self.cli("queue", "show", qid)
        self.assertIn(qid, text)
        self.assertIn("history:", text)
        for r in rcpts:
            self.assertIn(f"<{r}>", text)

    # -- retry -----------------------------------------------------------------------------------
    def test_retry_one_and_all(self):
        qid = self.send([f"{token('r')}@example.net", f"{token('r')}@example.net"])
        out = self.cli("queue", "retry", qid)
        self.assertRegex(out.strip(), rf"^retry: 2 recipients of {qid} due now$")
        for r in self.show(qid)["recipients"]:
            self.assertIn(r["state"], WAITING)
            # Due now, unless a scheduler took it at once and deferred it again.
            if r["attempts"] == 0:
                self.assertEqual(r["next_attempt_in"], 0, r)

        self.send([f"{token('r')}@example.net"])
        waiting = sum(1 for e in self.srv.queue_list() for r in e["recipients"]
                      if r["state"] in WAITING)
        out = self.cli("queue", "retry", "--all")
        m = re.match(r"^retry: (\d+) recipients? due now$", out.strip())
        self.assertTrue(m, out)
        self.assertEqual(int(m.group(1)), waiting)

        # Through --data-dir too (no config needed).
        proc = subrelay("queue", "retry", qid, "--data-dir", self.srv.data_dir)
        self.assertEqual(proc.returncode, 0, out_of(proc))

    # -- bounce ----------------------------------------------------------------------------------
    def test_bounce(self):
        rcpts = [f"{token('b')}@example.net", f"{token('b')}@example.net"]
        qid = self.send(rcpts)
        out = self.cli("queue", "bounce", qid)
        # A recipient whose attempt is running (here: waiting for the dead resolver) is
        # bounced when that attempt ends, never attempted twice; the rest at once.
        self.assertRegex(out.strip(), rf"^bounce: \d+ recipients? of {qid} failed \(bounced by operator\)"
                                      rf"(, \d+ in flight bounced when the attempt ends unless it delivers)?; "
                                      rf"a DSN to <{re.escape(SENDER)}> is pending$")
        deadline = time.monotonic() + harness.scale(30)
        while any(r["state"] != "failed" for r in self.show(qid)["recipients"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        shown = self.show(qid)
        dsn_queued = any(e["is_dsn"] and [r["address"] for r in e["recipients"]] == [SENDER]
                         for e in self.srv.queue_list())
        for r in shown["recipients"]:
            self.assertEqual(r["state"], "failed")
            self.assertEqual(r["last_error"], "bounced by operator")
            self.assertIsNone(r["next_attempt"])
            # Pending until the running scheduler has queued the DSN (once delivery is wired).
            self.assertTrue(r["dsn_pending"] or dsn_queued, r)
        self.assertIsNone(shown["next_attempt"])
        self.assertEqual(shown["last_error"], "bounced by operator")
        text = self.cli("queue", "list")
        line = [l for l in text.splitlines() if l.startswith(qid)][0]
        self.assertIn("failed", line)
        self.assertIn("bounced by operator", line)

        # Nothing is left to bounce or retry; neither is an error.
        out = self.cli("queue", "bounce", qid)
        self.assertIn("nothing bounced", out)
        out = self.cli("queue", "retry", qid)
        self.assertIn("no recipient", out)

    # -- drop ------------------------------------------------------------------------------------
    def test_drop(self):
        keep = self.send([f"{token('k')}@example.net"])
        qid = self.send([f"{token('d')}@example.net", f"{token('d')}@example.net"])
        out = self.cli("queue", "drop", qid)
        self.assertRegex(out.strip(), rf"^drop: {qid} removed from the queue .*2 recipients")
        ids = self.srv.queue_ids()
        self.assertNotIn(qid, ids)
        self.assertIn(keep, ids)
        proc = self.srv.cli("queue", "show", qid)
        self.assertEqual(proc.returncode, 1, out_of(proc))
        proc = self.srv.cli("queue", "drop", qid)
        self.assertEqual(proc.returncode, 1, out_of(proc))
        self.assertIn(qid, proc.stderr.decode())

    # -- errors ----------------------------------------------------------------------------------
    def test_unknown_id_exits_1(self):
        for args in (("retry", UNKNOWN_ID), ("drop", UNKNOWN_ID), ("bounce", UNKNOWN_ID),
                     ("show", UNKNOWN_ID), ("retry", "not-an-id"), ("bounce", "not-an-id")):
            with self.subTest(args=args):
                proc = self.srv.cli("queue", *args)
                self.assertEqual(proc.returncode, 1, out_of(proc))
                self.assertEqual(proc.stdout, b"")
                err = proc.stderr.decode().strip()
                self.assertEqual(len(err.splitlines()), 1, err)
                self.assertIn(args[1], err)

    def test_usage_errors_exit_2(self):
        cfg = self.srv.config_path
        for argv in (["queue", "retry"], ["queue", "retry", "a", "b"],
                     ["queue", "retry", UNKNOWN_ID, "--all"], ["queue", "drop"],
                     ["queue", "drop", "--all"], ["queue", "drop", "a", "b"], ["queue", "bounce"],
                     ["queue", "bounce", "a", "b"], ["queue", "bounce", UNKNOWN_ID, "--bogus"],
                     ["queue", "list", "--all"], ["queue", "show", UNKNOWN_ID, "--all"]):
            for with_cfg in (True, False):
                with self.subTest(argv=argv, config=with_cfg):
                    proc = subrelay(*argv, *(["-c", cfg] if with_cfg else []), timeout=10)
                    self.assertEqual(proc.returncode, 2, out_of(proc))
                    self.assertTrue(proc.stderr.strip())
                    self.assertEqual(proc.stdout, b"")

    def test_help(self):
        for sub in ("retry", "drop", "bounce", "list", "show"):
            for flag in ("--help", "-h"):
                with self.subTest(sub=sub, flag=flag):
                    proc = subrelay("queue", sub, flag, timeout=10)
                    self.assertEqual(proc.returncode, 0, out_of(proc))
                    text = proc.stdout.decode()
                    self.assertIn("usage", text.lower())
                    self.assertIn(f"queue {sub}", text)
        main = subrelay("--help").stdout.decode()
        for sub in ("retry", "drop", "bounce"):
            self.assertIn(f"queue {sub}", main)

    def test_missing_queue_exits_1(self):
        empty = harness.make_tmpdir("subrelay-noqueue-")
        for args in (("retry", "--all"), ("drop", UNKNOWN_ID), ("bounce", UNKNOWN_ID)):
            with self.subTest(args=args):
                proc = subrelay("queue", *args, "--data-dir", empty)
                self.assertEqual(proc.returncode, 1, out_of(proc))
                self.assertIn("no queue", proc.stderr.decode())


class QueueCmdStopped(harness.ServerTestCase):
    """The same commands with serve stopped, and what they did survives a restart."""

    def test_commands_without_serve_and_after_restart(self):
        srv = make_server(name="queue-stopped")
        self.test_servers.append(srv)
        self.addCleanup(self._finish_server, srv)
        srv.start()
        ids = []
        conn = harness.smtp_starttls(srv.port())
        conn.login(SHOP.username, SHOP.password)
        for i in range(3):
            rcpts = [f"{token('s')}@example.net", f"{token('s')}@example.org"]
            ids.append(submit(conn, SENDER, rcpts, make_message(SENDER, rcpts, f"stopped {i}")))
        conn.quit()
        self.assertEqual(srv.stop(), 0)
        self.assertFalse(srv.alive())

        keep, bounced, dropped = ids
        proc = srv.cli("queue", "retry", "--all")
        self.assertEqual(proc.returncode, 0, out_of(proc))
        self.assertEqual(proc.stdout.decode().strip(), "retry: 6 recipients due now")
        proc = srv.cli("queue", "bounce", bounced)
        self.assertEqual(proc.returncode, 0, out_of(proc))
        proc = srv.cli("queue", "drop", dropped)
        self.assertEqual(proc.returncode, 0, out_of(proc))
        entries = {e["id"]: e for e in srv.queue_list()}
        self.assertEqual(set(entries), {keep, bounced})
        for r in entries[keep]["recipients"]:
            self.assertIn(r["state"], WAITING)
            self.assertEqual(r["next_attempt_in"], 0)
        shown = srv.queue_show_json(bounced)
        for r in shown["recipients"]:
            self.assertEqual(r["state"], "failed")
            self.assertTrue(r["dsn_pending"])

        # serve starts on the changed file; the changes are there while it runs.
        srv.start()
        entries = {e["id"]: e for e in srv.queue_list()}
        self.assertIn(keep, entries)
        self.assertNotIn(dropped, entries)
        for r in entries[bounced]["recipients"]:
            self.assertEqual(r["state"], "failed")
            self.assertEqual(r["last_error"], "bounced by operator")
        self.assertEqual(srv.stop(), 0)

    def test_commands_race_serve_commits(self):
        """Writes from the CLI interleave with serve's own commits without a 'database is
        locked' failure on either side."""
        srv = make_server(name="queue-race")
        self.test_servers.append(srv)
        self.addCleanup(self._finish_server, srv)
        srv.start()
        conn = harness.smtp_starttls(srv.port())
        conn.login(SHOP.username, SHOP.password)
        ids = []
        for i in range(10):
            rcpts = [f"{token('x')}@example.net"]
            ids.append(submit(conn, SENDER, rcpts, make_message(SENDER, rcpts, f"race {i}")))
            proc = srv.cli("queue", "retry", "--all")
            self.assertEqual(proc.returncode, 0, out_of(proc))
            proc = srv.cli("queue", "retry", ids[-1])
            self.assertEqual(proc.returncode, 0, out_of(proc))
        conn.quit()
        self.assertEqual(set(ids) - set(srv.queue_ids()), set())
        self.assertTrue(srv.alive())


if __name__ == "__main__":
    harness.main()
