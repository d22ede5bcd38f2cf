"""Retention (retention.* in the config) with the real binary: the queue does not keep
messages for ever.

- A captured message disappears, bytes and all, once retention.captured has passed.
- A delivered message (to an aiosmtpd MX found through unbound) loses its body after
  retention.finished_bodies, and `queue show` says so (text, --json, --raw); after
  retention.history its envelope and history are gone too.
- A message still waiting for delivery (deferred) is never touched.

Durations are seconds here; the pruner wakes every few seconds when idle, so each wait
allows for that.
"""

import time

import harness
import mta_peers
from harness import Account, ServerTestCase, scale, token
from mta_peers import AioSink, make_cert
from peers import Unbound

SENDER = "app@keep.test"
DELIVER = Account("app", "app-Passw0rd", ["@keep.test"], mode="deliver")
CAPTURE = Account("ci", "ci-Passw0rd", ["@keep.test"], mode="capture")

ZONES = [
    'local-zone: "keep.test." static',
    'local-data: "keep.test. 300 IN MX 10 mx.keep.test."',
    'local-data: "mx.keep.test. 300 IN A 127.0.0.13"',
    # Nothing answers on 127.0.0.42: recipients there stay deferred.
    'local-zone: "later.test." static',
    'local-data: "later.test. 300 IN MX 10 mx.later.test."',
    'local-data: "mx.later.test. 300 IN A 127.0.0.42"',
]

BODIES_S, HISTORY_S, CAPTURED_S = 1, 5, 2


def submit(srv, account, rcpts):
    conn = harness.smtp_ssl(srv.port("implicit"))
    conn.login(account.username, account.password)
    msg = harness.make_message(SENDER, rcpts, f"retention {token()}", body="Keep me for a while.\r\n")
    qid = harness.submit(conn, SENDER, rcpts, msg)
    conn.quit()
    return qid


def show(srv, qid, *args):
    return srv.cli("queue", "show", qid, *args)


def gone(srv, qid):
    proc = show(srv, qid, "--json")
    if proc.returncode == 0:
        return False
    text = proc.stderr.decode(errors="replace")
    assert "no message" in text and "in the queue" in text, text
    return True


def wait_until(what, pred, timeout):
    deadline = time.monotonic() + scale(timeout)
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {scale(timeout):.0f}s")
        time.sleep(0.2)
    return time.monotonic()


class Retention(ServerTestCase):
    @classmethod
    def setUpClass(cls):
        cls.port = mta_peers.free_port("127.0.0.13")
        cls.mx = AioSink(f"127.0.0.13:{cls.port}", cert=make_cert("mx.keep.test"))
        cls.mx.start()
        cls.dns = Unbound((ZONES, []))
        cls.srv = cls.start_class_server(
            name="retention", accounts=[DELIVER, CAPTURE], listeners=("implicit",),
            extra_config={
                "delivery": {"resolvers": [cls.dns.address], "port": cls.port, "retry_schedule": ["1h"],
                             "allow_private_destinations": True},
                "retention": {"finished_bodies": f"{BODIES_S}s", "history": f"{HISTORY_S}s",
                              "captured": f"{CAPTURED_S}s"},
            })

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        cls.mx.stop()

    def test_captured_messages_disappear_after_retention_captured(self):
        srv = self.srv
        t0 = time.monotonic()
        qid = submit(srv, CAPTURE, ["someone@keep.test"])
        info = srv.queue_show_json(qid)
        self.assertTrue(info["captured"])
        self.assertFalse(info["content_removed"])
        self.assertIn(b"Keep me for a while.", srv.queue_raw(qid))
        t1 = wait_until(f"captured {qid} deleted", lambda: gone(srv, qid), CAPTURED_S + 15)
        self.assertGreaterEqual(t1 - t0, CAPTURED_S - 1)  # whole seconds: at most 1 s early
        self.assertNotIn(qid, srv.queue_ids())
        proc = show(srv, qid, "--raw")
        self.assertEqual(proc.returncode, 1)
        self.assertIn(b"in the queue", proc.stderr)

    def test_delivered_messages_lose_their_body_then_their_history(self):
        srv = self.srv
        qid = submit(srv, DELIVER, ["alice@keep.test", "bob@keep.test"])
        self.assertIn(b"Keep me for a while.", srv.queue_raw(qid))
        wait_until(f"{qid} delivered",
                   lambda: all(r["state"] == "delivered" for r in srv.queue_show_json(qid)["recipients"]), 20)
        delivered = time.monotonic()
        self.mx.wait_for(1)

        # The body goes after finished_bodies (plus the pruner's pace); the rest stays.
        wait_until(f"{qid} body removed", lambda: srv.queue_show_json(qid)["content_removed"], BODIES_S + 15)
        info = srv.queue_show_json(qid)
        self.assertIsNotNone(info["finished_at"])
        self.assertGreater(info["size"], 0)  # the original size is kept
        self.assertEqual([r["state"] for r in info["recipients"]], ["delivered", "delivered"])
        self.assertEqual(len(info["history"]), 2)
        text = show(srv, qid)
        self.assertEqual(text.returncode, 0, text.stderr)
        self.assertIn(b"content:   removed after delivery (retention.finished_bodies)", text.stdout)
        self.assertIn(b"finished:", text.stdout)
        raw = show(srv, qid, "--raw")
        self.assertEqual(raw.returncode, 1, "a removed body must not read as an empty message")
        self.assertEqual(raw.stdout, b"")
        self.assertIn(b"was removed (retention.finished_bodies)", raw.stderr)

        # Then the whole message, after history.
        t1 = wait_until(f"{qid} history deleted", lambda: gone(srv, qid), HISTORY_S + 15)
        self.assertGreaterEqual(t1 - delivered, HISTORY_S - 1)
        self.assertNotIn(qid, srv.queue_ids())

    def test_messages_waiting_for_delivery_are_kept(self):
        srv = self.srv
        qid = submit(srv, DELIVER, ["carol@later.test"])
        wait_until(f"{qid} deferred",
                   lambda: srv.queue_show_json(qid)["recipients"][0]["state"] == "deferred", 60)
        # Longer than every retention time and a pruner pause.
        time.sleep(scale(HISTORY_S + 6))
        info = srv.queue_show_json(qid)
        self.assertEqual(info["recipients"][0]["state"], "deferred")
        self.assertIsNone(info["finished_at"])
        self.assertFalse(info["content_removed"])
        self.assertIn(b"Keep me for a while.", srv.queue_raw(qid))
        # The pruner ran meanwhile (and logged what it did).
        srv.wait_log(r"retention: last \d+ s: \d+ batches", timeout=70)


if __name__ == "__main__":
    harness.main()
