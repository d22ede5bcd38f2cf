"""The delivery engine (issue 10) against real peers on loopback: the real subrelay binary,
unbound for the zones, aiosmtpd as a well-behaved MX, and small hostile MX hosts written
here (a greeting trickled one byte a second; a server that answers every command just in
time).

Covered: stage timeouts are totals (a trickling greeting is cut at delivery.timeouts.greeting,
however many bytes arrive); the overall per-transaction deadline; hostile MX hosts are
counted per destination (many domains on one slow MX take at most
max_connections_per_domain slots and other mail still flows); domains sharing an MX share
one connection; `queue retry --all` and `queue bounce` on a recipient in flight never make
a second attempt (a bounce waits for the attempt, which delivers); typed status columns in `queue show --json`.
"""

import socket
import threading
import time

import harness
import mta_peers
from harness import Account, ServerTestCase, scale, token, wait_for
from mta_peers import AioSink, make_cert
from peers import Unbound

SENDER = "app@engine.test"
ACCOUNT = Account("app", "app-Passw0rd", ["@engine.test"], mode="deliver")
SLOW_DOMAINS = [f"slow{i}.test" for i in range(6)]

ZONES = [
    'local-zone: "good.test." static',
    'local-data: "good.test. 300 IN MX 10 mx.good.test."',
    'local-data: "mx.good.test. 300 IN A 127.0.0.61"',
    # Two domains on the same MX host (Workspace-style).
    'local-zone: "one.test." static',
    'local-data: "one.test. 300 IN MX 10 mx.shared.test."',
    'local-zone: "two.test." static',
    'local-data: "two.test. 300 IN MX 10 mx.shared.test."',
    'local-data: "mx.shared.test. 300 IN A 127.0.0.61"',
    'local-zone: "trickle.test." static',
    'local-data: "trickle.test. 300 IN MX 10 mx.trickle.test."',
    'local-data: "mx.trickle.test. 300 IN A 127.0.0.62"',
    'local-zone: "lagging.test." static',
    'local-data: "lagging.test. 300 IN MX 10 mx.lagging.test."',
    'local-data: "mx.lagging.test. 300 IN A 127.0.0.63"',
    'local-zone: "engine.test." static',
    'local-data: "engine.test. 300 IN MX 10 mx.good.test."',
]
for d in SLOW_DOMAINS:
    ZONES += [f'local-zone: "{d}." static', f'local-data: "{d}. 300 IN MX 10 mx.trickle.test."']


class HostileMx:
    """A TCP server on ip:port in a thread. mode "trickle": sends "220 " one byte a second
    and never ends the line. mode "lagging": a proper SMTP server (no STARTTLS) that waits
    `lag` seconds before every reply. Counts connections (total and at most at once)."""

    def __init__(self, ip, port, mode, lag=0.0):
        self.ip, self.port, self.mode, self.lag = ip, port, mode, lag
        self.lock = threading.Lock()
        self.total = 0
        self.open = 0
        self.max_open = 0
        self.stopping = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, port))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopping:
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.total += 1
                self.open += 1
                self.max_open = max(self.max_open, self.open)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            c.settimeout(1.0)
            if self.mode == "trickle":
                for ch in "220 " + "x" * 10000:
                    if self.stopping:
                        break
                    c.sendall(ch.encode())
                    try:
                        if c.recv(1, socket.MSG_PEEK) == b"":
                            break  # the client closed
                    except socket.timeout:
                        pass
            else:
                self._lagging(c)
        except OSError:
            pass
        finally:
            with self.lock:
                self.open -= 1
            c.close()

    def _lagging(self, c):
        def reply(text):
            time.sleep(self.lag)
            c.sendall(text.encode() + b"\r\n")
        reply("220 lagging.test ESMTP")
        buf = b""
        in_data = False
        while not self.stopping:
            try:
                chunk = c.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                return
            buf += chunk
            while b"\r\n" in buf:
                line, buf = buf.split(b"\r\n", 1)
                if in_data:
                    if line == b".":
                        in_data = False
                        reply("250 2.0.0 queued")
                    continue
                verb = line[:4].upper()
                if verb == b"EHLO":
                    reply("250-lagging.test\r\n250 8BITMIME")
                elif verb == b"DATA":
                    in_data = True
                    reply("354 go ahead")
                elif verb == b"QUIT":
                    reply("221 bye")
                    return
                else:
                    reply("250 2.1.0 ok")

    def stats(self):
        with self.lock:
            return {"total": self.total, "open": self.open, "max_open": self.max_open}

    def stop(self):
        self.stopping = True
        self.sock.close()


def submit(srv, rcpts, subject=None):
    conn = harness.smtp_ssl(srv.port("implicit"))
    conn.login(ACCOUNT.username, ACCOUNT.password)
    msg = harness.make_message(SENDER, rcpts, subject or f"engine {token()}", body="engine test\r\n")
    qid = harness.submit(conn, SENDER, rcpts, msg)
    conn.quit()
    return qid




def states(srv, qid):
    return {r["address"]: r for r in srv.queue_show_json(qid)["recipients"]}


class DeliveryEngine(ServerTestCase):
    @classmethod
    def setUpClass(cls):
        cls.dns = Unbound(ZONES)
        cls.port = mta_peers.free_port("127.0.0.61", "127.0.0.62", "127.0.0.63")
        cls.good = AioSink(f"127.0.0.61:{cls.port}", cert=make_cert(["mx.good.test", "mx.shared.test"]),
                           slow_seconds=4.0)
        cls.good.start()
        cls.trickle = HostileMx("127.0.0.62", cls.port, "trickle")
        cls.lagging = HostileMx("127.0.0.63", cls.port, "lagging", lag=1.5)

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        cls.good.stop()
        cls.trickle.stop()
        cls.lagging.stop()
        cls.dns.close()

    def config(self, **over):
        d = {"resolvers": [self.dns.address], "port": self.port, "retry_schedule": ["1h"],
             "max_queue_time": "1d", "allow_private_destinations": True}
        d.update(over)
        return {"delivery": d}

    def server(self, **over):
        return self.start_server(accounts=[ACCOUNT], extra_config=self.config(**over))

    def test_trickled_greeting_is_cut_at_the_stage_total(self):
        # One byte a second would re-arm a per-read timer for ever; the greeting stage is a
        # total: 3 s, then the attempt is deferred with a timeout.
        srv = self.server(timeouts={"greeting": "3s"})
        t0 = time.monotonic()
        qid = submit(srv, ["victim@trickle.test"])
        info = wait_for(lambda: (s := states(srv, qid)["victim@trickle.test"])["state"] == "deferred" and s,
                        "the trickled attempt to be deferred", timeout=20)
        elapsed = time.monotonic() - t0
        self.assertLess(elapsed, scale(12), elapsed)
        self.assertIn("timeout", info["last_error"])
        self.assertEqual(info["last_status"], "4.4.2")
        self.assertFalse(info["in_flight"])
        hist = srv.queue_show_json(qid)["history"]
        self.assertEqual(len(hist), 1, hist)
        self.assertEqual(hist[0]["status"], "4.4.2")

    def test_transaction_deadline_bounds_a_server_answering_just_in_time(self):
        # Each reply comes 1.5 s late, inside the 3 s command timeout; the transaction as a
        # whole (MAIL, RCPT, DATA, dot = 6 s) overruns its 4 s bound and is aborted.
        srv = self.server(timeouts={"command": "3s", "data_init": "3s", "data_end": "3s", "transaction": "4s"})
        qid = submit(srv, ["late@lagging.test"])
        info = wait_for(lambda: (s := states(srv, qid)["late@lagging.test"])["state"] == "deferred" and s,
                        "the lagging transaction to be aborted", timeout=30)
        self.assertIn("exceeded 4s", info["last_error"])
        self.assertEqual(len(srv.queue_show_json(qid)["history"]), 1)
        # Without the bound the same server delivers: the deadline is what stopped it.
        srv2 = self.server(timeouts={"command": "3s", "data_init": "3s", "data_end": "3s"})
        qid2 = submit(srv2, ["late2@lagging.test"])
        wait_for(lambda: states(srv2, qid2)["late2@lagging.test"]["state"] == "delivered",
                 "delivery without the transaction bound", timeout=30)

    def test_slow_mx_counted_per_destination_does_not_starve_others(self):
        # Six tenant domains all pointing at one trickling MX, max 3 connections in all and
        # 2 per destination: the trickler holds at most 2, so mail for good.test still goes.
        before = self.trickle.stats()["total"]
        srv = self.server(max_connections=3, max_connections_per_domain=2, timeouts={"greeting": "60s"})
        for d in SLOW_DOMAINS:
            submit(srv, [f"user@{d}"])
        wait_for(lambda: self.trickle.stats()["total"] - before >= 2, "connections to the trickler")
        time.sleep(1.0)
        self.assertLessEqual(self.trickle.stats()["open"], 2, self.trickle.stats())
        tok = token("starve")
        qid = submit(srv, ["ok@good.test"], subject=f"engine {tok}")
        wait_for(lambda: states(srv, qid)["ok@good.test"]["state"] == "delivered",
                 "delivery to good.test beside a trickling MX", timeout=15)
        self.assertLessEqual(self.trickle.stats()["max_open"], 2, self.trickle.stats())
        srv.stop()

    def test_domains_sharing_an_mx_share_one_connection(self):
        srv = self.server(resolvers=["127.0.0.1:9"])  # queue while DNS is dead
        qids = [submit(srv, [f"u{i}@one.test" if i % 2 else f"u{i}@two.test"]) for i in range(6)]
        srv.stop()
        self.assertEqual(srv.cli("queue", "retry", "--all").returncode, 0)
        self.good.wait_idle()
        before = self.good.stats().get("connections", 0)
        srv.extra_config = self.config(max_connections_per_domain=1)
        srv.start()
        for q in qids:
            wait_for(lambda q=q: all(r["state"] == "delivered" for r in states(srv, q).values()),
                     f"delivery of {q}", timeout=20)
        self.good.wait_idle()
        self.assertEqual(self.good.stats()["connections"] - before, 1, self.good.stats())

    def test_queue_retry_and_bounce_in_flight_never_duplicate(self):
        srv = self.server()
        tok = token("inflight")
        # slow*: the MX answers the final dot after 4 s, so the recipient is in flight.
        qid = submit(srv, ["slow4@good.test"], subject=f"engine {tok}")
        wait_for(lambda: states(srv, qid)["slow4@good.test"]["in_flight"], "the attempt to be in flight")
        for _ in range(3):
            self.assertEqual(srv.cli("queue", "retry", "--all").returncode, 0)
        r = srv.cli("queue", "bounce", qid)
        self.assertEqual(r.returncode, 0, r.stderr)
        shown = states(srv, qid)["slow4@good.test"]
        self.assertEqual(shown["state"], "queued")  # nothing changes while in flight
        self.assertEqual(shown["pending_request"], "bounce")
        wait_for(lambda: states(srv, qid)["slow4@good.test"]["state"] == "delivered", "the delivery", timeout=20)
        time.sleep(1.5)  # a second attempt would start within the tick
        got = [m for m in self.good.messages() if tok.encode() in m["raw"]]
        self.assertEqual(len(got), 1, "delivered twice")
        info = srv.queue_show_json(qid)
        self.assertEqual(len(info["history"]), 1, info["history"])
        self.assertEqual(info["recipients"][0]["last_status"], "2.0.0")
        self.assertIsNone(info["recipients"][0]["pending_request"])
        # The delivery stands: no bounce DSN was queued for it.
        self.assertFalse([m for m in srv.queue_list() if m["sender"] == ""], srv.queue_list())


if __name__ == "__main__":
    harness.main()
