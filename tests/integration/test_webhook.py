"""Event webhooks (issue 13): the real subrelay delivers to a real Postfix MX (mta_peers.PostfixMx:
permfail@ -> 550 5.1.1, tempfail@ -> 450 4.2.1) and POSTs its events to a local HTTPS receiver
(http.server + ssl, certificate from the test CA, trusted through webhooks.ca_file, its name
resolved by the test bed's unbound). The receiver checks every request's signature
(hmac.compare_digest over "<timestamp>.<body>") and timestamp, and records events by id.

Covered: accepted / delivered / bounced / deferred events, and "suppressed" when a 5.1.1 puts the
recipient on the account's suppression list, with their fields and valid
signatures; the receiver down while mail flows, subrelay restarted meanwhile, the receiver
back: every event arrives, each id exactly once, and `subrelay accounts --json` showed the
backlog while it was down; an expired message; an operator's bounce; an account's `events`
filter, also after SIGHUP; nothing sent for our own DSNs; a SIGKILL may repeat but never loses."""

import hashlib
import hmac
import http.server
import json
import os
import re
import signal
import socket
import ssl
import threading
import time
import urllib.request

import harness
import mta_peers
from harness import Account, ServerTestCase, scale, token
from mta_peers import PostfixMx, make_cert
from peers import Unbound, testbed_zones

SECRET = "whsec_" + "k3y-for-the-webhook-test"
HOOK_IP = "127.0.0.31"


class Receiver:
    """HTTPS webhook receiver on HOOK_IP:port. Verifies every request; records good events."""

    def __init__(self, cert, secret=SECRET):
        self.cert = cert
        self.secret = secret.encode()
        self.port = mta_peers.free_port(HOOK_IP)
        self.lock = threading.Lock()
        self.ids = []        # every verified event id, in arrival order (repeats included)
        self.events = {}     # id -> parsed body
        self.bad = []        # requests that failed verification
        self.server = None
        self.conns = set()
        self.start()

    def start(self):
        rec = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: subrelay reuses connections

            def setup(self):
                super().setup()
                with rec.lock:
                    rec.conns.add(self.connection)

            def finish(self):
                with rec.lock:
                    rec.conns.discard(self.connection)
                super().finish()

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                ts = self.headers.get("X-Subrelay-Timestamp", "")
                sig = self.headers.get("X-Subrelay-Signature", "")
                eid = self.headers.get("X-Subrelay-Event-Id", "")
                why = rec.check(ts, sig, eid, body, self.headers.get("Content-Type", ""))
                status = 204
                if why:
                    with rec.lock:
                        rec.bad.append(why)
                    status = 400
                else:
                    with rec.lock:
                        rec.ids.append(eid)
                        rec.events[eid] = json.loads(body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert.cert, self.cert.key)

        class Server(http.server.ThreadingHTTPServer):
            allow_reuse_address = True
            daemon_threads = True

            def get_request(self):
                sock, addr = super().get_request()
                return ctx.wrap_socket(sock, server_side=True), addr

        self.server = Server((HOOK_IP, self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def check(self, ts, sig, eid, body, ctype):
        if not ts.isdigit():
            return f"bad timestamp {ts!r}"
        if abs(time.time() - int(ts)) > 300:
            return f"stale timestamp {ts}"
        want = "v1=" + hmac.new(self.secret, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, sig):
            return f"bad signature for {eid}"
        try:
            j = json.loads(body)
        except ValueError:
            return "body is not JSON"
        if j.get("id") != eid:
            return f"id header {eid} != body id {j.get('id')}"
        if not ctype.startswith("application/json"):
            return f"content type {ctype}"
        return ""

    def stop(self):
        """Down: no listener, and kept-alive connections cut."""
        self.server.shutdown()
        self.server.server_close()
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def snapshot(self):
        with self.lock:
            return list(self.ids), dict(self.events), list(self.bad)

    def wait(self, pred, what, timeout=30):
        deadline = time.monotonic() + scale(timeout)
        while True:
            ids, events, bad = self.snapshot()
            if bad:
                raise AssertionError(f"requests failed verification: {bad[:5]}")
            if pred(events):
                return ids, events
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; got {json.dumps(list(events.values()), indent=1)}")
            time.sleep(0.1)


def of(events, qid, rcpt=None, type_=None):
    return [e for e in events.values() if e["message_id"] == qid and (rcpt is None or e["recipient"] == rcpt)
            and (type_ is None or e["type"] == type_)]


class Webhooks(ServerTestCase):
    @classmethod
    def setUpClass(cls):
        lines, extra = testbed_zones()
        cls.dns = Unbound((lines + ['local-zone: "hooks.test." static',
                                    f'local-data: "hooks.test. 300 IN A {HOOK_IP}"'], extra))
        cls.mxport = mta_peers.free_port("127.0.0.11")
        cls.mxcert = make_cert(["mx1.mx.test"])
        cls.postfix = PostfixMx([f"127.0.0.11:{cls.mxport}"], cert=cls.mxcert.cert, key=cls.mxcert.key)
        cls.postfix.start()
        cls.hookcert = make_cert(["hooks.test"])
        cls.tmp = harness.make_tmpdir("subrelay-webhook-")
        cls.secret_file = os.path.join(cls.tmp, "hook.secret")
        with open(cls.secret_file, "w") as f:
            f.write(SECRET + "\n")
        os.chmod(cls.secret_file, 0o600)

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        cls.postfix.stop()
        cls.dns.close()

    def setUp(self):
        super().setUp()
        self.rx = Receiver(self.hookcert)
        self.addCleanup(self.rx.stop)

    def accounts(self, events=None):
        hook = {"url": f"https://hooks.test:{self.rx.port}/subrelay/events", "secret_file": self.secret_file}
        ci_hook = dict(hook, events=events or ["bounced"])
        return [Account("shop", "shop-Passw0rd", ["@shop.test"], mode="deliver", extra={"webhook": hook}),
                Account("ci", "ci-Passw0rd", ["@ci.test"], mode="deliver", extra={"webhook": ci_hook}),
                Account("quiet", "quiet-Passw0rd", ["@quiet.test"], mode="deliver")]

    def config(self):
        return {"delivery": {"resolvers": [self.dns.address], "port": self.mxport, "retry_schedule": ["1s"],
                             "max_queue_time": "1h", "allow_private_destinations": True},
                "webhooks": {"ca_file": self.hookcert.ca, "retry_schedule": ["1s"], "timeout": "5s"}}

    def send(self, srv, user, password, sender, rcpts):
        conn = harness.smtp_ssl(srv.port("implicit"))
        conn.login(user, password)
        qid = harness.submit(conn, sender, rcpts, harness.make_message(sender, rcpts, token("hook")))
        conn.quit()
        return qid

    def test_events_signed_and_complete(self):
        srv = self.start_server(accounts=self.accounts(), extra_config=self.config())
        ok, perm, temp = "alice@mx.test", "permfail@mx.test", "tempfail@mx.test"
        qid = self.send(srv, "shop", "shop-Passw0rd", "app@shop.test", [ok, perm, temp])

        def complete(ev):
            return (len(of(ev, qid, type_="accepted")) == 3 and of(ev, qid, ok, "delivered")
                    and of(ev, qid, perm, "bounced") and of(ev, qid, temp, "deferred")
                    and of(ev, qid, perm, "suppressed"))
        ids, events = self.rx.wait(complete, "accepted x3, delivered, bounced, suppressed, deferred")
        srv.cli("queue", "drop", qid)  # the deferred one would go on retrying

        acc = of(events, qid, ok, "accepted")[0]
        self.assertEqual(acc["account"], "shop")
        self.assertEqual(acc["sender"], "app@shop.test")
        self.assertRegex(acc["at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertRegex(acc["id"], r"^evt_[0-9a-f]{32}$")
        dlv = of(events, qid, ok, "delivered")[0]
        self.assertEqual(dlv["attempt"], 1)
        self.assertEqual(dlv["smtp"]["code"], 250)
        self.assertIn("mx1.mx.test", dlv["smtp"]["remote_host"])
        bnc = of(events, qid, perm, "bounced")[0]
        self.assertEqual(bnc["smtp"]["code"], 550)
        self.assertEqual(bnc["smtp"]["enhanced_code"], "5.1.1")
        # The 5.1.1 put permfail@ on shop's suppression list: "suppressed", after "bounced".
        sup = of(events, qid, perm, "suppressed")[0]
        self.assertEqual(sup["sender"], "app@shop.test")
        self.assertIn("5.1.1", sup["reason"])
        self.assertEqual(of(events, qid, type_="suppressed"), [sup])
        dfr = of(events, qid, temp, "deferred")[0]
        self.assertEqual(dfr["smtp"]["code"], 450)
        self.assertTrue(dfr["smtp"]["enhanced_code"].startswith("4."), dfr)
        # Nothing about other messages (the DSN to app@shop.test is ours: no events).
        self.assertEqual({e["message_id"] for e in events.values()}, {qid})
        # Ids are unique and none arrived twice.
        self.assertEqual(len(ids), len(set(ids)))

        # The filtered account: only "bounced" (its own list gets permfail@ too, without an
        # event); the account without a webhook: nothing.
        q2 = self.send(srv, "ci", "ci-Passw0rd", "build@ci.test", ["bob@mx.test", "permfail@mx.test"])
        q3 = self.send(srv, "quiet", "quiet-Passw0rd", "x@quiet.test", ["permfail@mx.test"])
        self.rx.wait(lambda ev: of(ev, q2, "permfail@mx.test", "bounced"), "ci's bounced event")
        harness.wait_for(lambda: all(r["state"] in ("delivered", "failed")
                                     for q in (q2, q3) for r in srv.queue_show_json(q)["recipients"]),
                         "q2 and q3 final")
        time.sleep(scale(2))
        _, events, _ = self.rx.snapshot()
        self.assertEqual([e["type"] for e in of(events, q2)], ["bounced"])
        self.assertEqual(of(events, q3), [])

    def test_expired(self):
        cfg = self.config()
        cfg["delivery"]["max_queue_time"] = "3s"
        srv = self.start_server(accounts=self.accounts(), extra_config=cfg)
        qid = self.send(srv, "shop", "shop-Passw0rd", "app@shop.test", ["tempfail@mx.test"])
        _, events = self.rx.wait(lambda ev: of(ev, qid, type_="expired"), "the expired event")
        exp = of(events, qid, type_="expired")[0]
        self.assertEqual(exp["recipient"], "tempfail@mx.test")
        self.assertTrue(exp["reason"].startswith("expired"), exp)
        self.assertGreaterEqual(len(of(events, qid, type_="deferred")), 1)
        self.assertEqual(of(events, qid, type_="bounced"), [])

    def test_operator_bounce_and_sighup_reload_of_the_events_filter(self):
        srv = self.start_server(accounts=self.accounts(), extra_config=self.config())
        # An operator's bounce is a "bounced" event too (ci wants only those): a message that
        # waits because its domain does not resolve (DNS timeout: deferred, retried).
        q1 = self.send(srv, "ci", "ci-Passw0rd", "build@ci.test", ["stuck@timeout.test"])
        out = srv.cli("queue", "bounce", q1)
        self.assertEqual(out.returncode, 0, out.stderr)
        _, events = self.rx.wait(lambda ev: of(ev, q1, "stuck@timeout.test", "bounced"), "the operator's bounce")
        self.assertEqual(of(events, q1, type_="bounced")[0]["reason"], "bounced by operator")

        # SIGHUP with ci's filter changed to "accepted": the next message gets only that.
        srv.accounts = self.accounts(events=["accepted"])
        srv.write_config()
        srv.proc.send_signal(signal.SIGHUP)
        srv.wait_log(r"reload done")
        q2 = self.send(srv, "ci", "ci-Passw0rd", "build@ci.test", ["permfail@mx.test"])
        self.rx.wait(lambda ev: of(ev, q2, type_="accepted"), "ci's accepted event after the reload")
        harness.wait_for(lambda: srv.queue_show_json(q2)["recipients"][0]["state"] == "failed", "q2 bounced")
        time.sleep(scale(2))
        _, events, _ = self.rx.snapshot()
        self.assertEqual([e["type"] for e in of(events, q2)], ["accepted"])

    def test_receiver_down_and_restart_nothing_lost_nothing_doubled(self):
        metrics_port = harness.free_port()
        cfg = self.config()
        cfg["metrics"] = {"address": f"127.0.0.1:{metrics_port}"}
        srv = self.start_server(accounts=self.accounts(), extra_config=cfg)

        def metric(name):
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            m = re.search(r"^" + re.escape(name) + r" (\S+)$", text, re.M)
            return float(m.group(1)) if m else 0.0
        self.rx.stop()
        qids = [self.send(srv, "shop", "shop-Passw0rd", "app@shop.test", [f"user{i}@mx.test"]) for i in range(3)]
        harness.wait_for(lambda: all(srv.queue_show_json(q)["recipients"][0]["state"] == "delivered" for q in qids),
                         "delivered while the receiver is down")
        srv.wait_log(r"webhook: account shop: \w+ event evt_[0-9a-f]+ attempt \d+ failed: ")
        self.assertNotIn(SECRET, srv.log_text())

        def backlog():
            out = srv.cli("accounts", "--json")
            assert out.returncode == 0, out.stderr
            rows = [json.loads(line) for line in out.stdout.decode().splitlines() if line.strip()]
            return {r["account"]: r.get("webhook") for r in rows}
        harness.wait_for(lambda: (backlog()["shop"] or {}).get("backlog") == 6, "a backlog of 6 events")
        hook = backlog()["shop"]
        self.assertTrue(hook["failing"])
        self.assertIn("connect", hook["last_error"])
        self.assertEqual(hook["url"], f"https://hooks.test:{self.rx.port}/subrelay/events")
        self.assertGreater(metric('subrelay_webhook_events_total{outcome="failed"}'), 0)
        harness.wait_for(lambda: metric("subrelay_webhook_backlog_events") == 6, "the backlog gauge", timeout=20)

        # A restart while events wait: they are in the database, not in memory.
        srv.stop()
        srv.start()
        more = self.send(srv, "shop", "shop-Passw0rd", "app@shop.test", ["late@mx.test"])
        qids.append(more)
        self.rx.start()
        ids, events = self.rx.wait(
            lambda ev: all(of(ev, q, type_="accepted") and of(ev, q, type_="delivered") for q in qids),
            "every event after the outage")
        time.sleep(scale(2))
        ids, events, bad = self.rx.snapshot()
        self.assertEqual(bad, [])
        self.assertEqual(len(ids), 8, ids)
        self.assertEqual(len(set(ids)), 8, "an event arrived twice")
        harness.wait_for(lambda: backlog()["shop"]["backlog"] == 0, "the backlog drained")
        self.assertEqual(metric('subrelay_webhook_events_total{outcome="delivered"}'), 8)
        self.assertFalse(backlog()["shop"]["failing"])

    def test_sigkill_may_repeat_but_never_loses(self):
        srv = self.start_server(accounts=self.accounts(), extra_config=self.config())
        self.rx.stop()
        qid = self.send(srv, "shop", "shop-Passw0rd", "app@shop.test", ["k1@mx.test", "k2@mx.test"])
        harness.wait_for(lambda: all(r["state"] == "delivered" for r in srv.queue_show_json(qid)["recipients"]),
                         "delivered")
        srv.kill()
        self.rx.start()
        srv.start()
        self.rx.wait(lambda ev: len(of(ev, qid)) == 4, "accepted and delivered for both recipients")


if __name__ == "__main__":
    harness.main()
