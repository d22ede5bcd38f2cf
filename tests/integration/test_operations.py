"""Operations (issue 11) against the real binary: the metrics listener scraped and parsed by
python3-prometheus-client (Prometheus text and OpenMetrics), /healthz and /readyz, JSON log
lines parsed one by one and joined on the queue id, `subrelay status [--json]` with the
server running and stopped, counters kept across SIGHUP, and the Grafana dashboard's
queries checked against the metric names the server exports (so it cannot drift).

Peers: unbound serves ops.test with its MX on 127.0.0.71, where aiosmtpd receives (its
magic local parts: permfail* -> 550 5.1.1, tempfail* -> 451 4.3.0).
"""

import json
import os
import re
import signal
import socket
import smtplib
import time
import urllib.error
import urllib.request

from prometheus_client.openmetrics import parser as om_parser
from prometheus_client.parser import text_string_to_metric_families

import harness
import mta_peers
from harness import Account, scale, token, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
DASHBOARD = os.path.join(HERE, "..", "..", "contrib", "grafana", "subrelay-dashboard.json")
APP = Account("app", "app-Passw0rd-ops", ["@ops.test"], mode="deliver")
CI = Account("ci", "ci-Passw0rd-ops", ["@ci.test"], mode="capture")
ZONES = [
    'local-zone: "ops.test." static',
    'local-data: "ops.test. 300 IN MX 10 mx.ops.test."',
    'local-data: "mx.ops.test. 300 IN A 127.0.0.71"',
]




def http(port, path, accept=None, method="GET"):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    if accept:
        req.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(req, timeout=scale(10)) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def samples(text):
    """{(sample name, frozenset(labels)): value} from the Prometheus text format."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(smp, name, **labels):
    return smp.get((name, frozenset(labels.items())), 0.0)


def total(smp, name, **labels):
    """Sum over every sample of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in smp.items() if n == name and want <= set(ls))


def send(srv, account, sender, rcpts):
    conn = harness.smtp_ssl(srv.port("implicit"))
    conn.login(account.username, account.password)
    msg = harness.make_message(sender, rcpts, f"ops {token()}", body="operations test\r\n")
    qid = harness.submit(conn, sender, rcpts, msg)
    conn.quit()
    return qid


def keygen(directory):
    path = os.path.join(directory, "ops.ed.pem")
    proc = harness.subrelay("dkim-keygen", "--domain", "ops.test", "--selector", "e1", "--algorithm",
                            "ed25519-sha256", "--out", path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return path


class Operations(mta_peers.OneMxTestCase):
    ZONES = ZONES
    MX_IP = "127.0.0.71"
    MX_NAMES = ["mx.ops.test"]

    def server(self, metrics_port, log_format="json"):
        workdir = harness.make_tmpdir()
        extra = {
            "delivery": {"resolvers": [self.dns.address], "port": self.port, "retry_schedule": ["1h"],
                         "max_queue_time": "1d", "allow_private_destinations": True},
            "dkim": [{"domain": "ops.test", "selector": "e1", "algorithm": "ed25519-sha256",
                      "private_key": keygen(workdir)}],
            "log": {"format": log_format, "level": "info"},
            "retention": {"finished_bodies": "1d"},
        }
        if metrics_port:
            extra["metrics"] = {"address": f"127.0.0.1:{metrics_port}"}
        return self.start_server(workdir=workdir, accounts=[APP, CI], extra_config=extra)

    def scrape(self, port):
        status, ctype, body = http(port, "/metrics")
        self.assertEqual(status, 200)
        self.assertTrue(ctype.startswith("text/plain; version=0.0.4"), ctype)
        return body

    def test_metrics_logs_status_and_dashboard(self):
        mport = harness.free_port()
        srv = self.server(mport)

        # --- traffic: delivered, failed (DSN), deferred, captured, refused, bad AUTH
        delivered = [send(srv, APP, "app@ops.test", [f"ok{i}@ops.test"]) for i in range(3)]
        failed = send(srv, APP, "app@ops.test", ["permfail@ops.test"])
        deferred = send(srv, APP, "app@ops.test", ["tempfail@ops.test"])
        captured = send(srv, CI, "build@ci.test", ["dev@example.org"])
        conn = harness.smtp_ssl(srv.port("implicit"))
        conn.login(APP.username, APP.password)
        code, _ = conn.mail("someone@not-owned.test")
        self.assertEqual(code, 553)
        conn.quit()
        evil_user = 'ev"il\x01\\x'
        for user in (evil_user, APP.username):
            conn = harness.smtp_ssl(srv.port("implicit"))
            with self.assertRaises(smtplib.SMTPAuthenticationError):
                conn.login(user, "wrong-password")
            conn.close()

        def state(qid, rcpt):
            return {r["address"]: r["state"] for r in srv.queue_show_json(qid)["recipients"]}[rcpt]
        for i, q in enumerate(delivered):
            wait_for(lambda: state(q, f"ok{i}@ops.test") == "delivered", "delivery")
        wait_for(lambda: state(failed, "permfail@ops.test") == "failed", "the permanent failure")
        wait_for(lambda: state(deferred, "tempfail@ops.test") == "deferred", "the deferral")

        # --- /metrics in the Prometheus text format, parsed by prometheus_client
        def scraped():
            s = samples(self.scrape(mport))
            ok = (total(s, "subrelay_dsns_total", type="failure") >= 1 and
                  value(s, "subrelay_queue_recipients", state="deferred") >= 1)
            return s if ok else None
        smp = wait_for(scraped, "the DSN and the queue gauges in /metrics", timeout=20, interval=0.5)
        self.assertEqual(value(smp, "subrelay_messages_accepted_total", account="app"), 5)
        self.assertEqual(value(smp, "subrelay_messages_accepted_total", account="ci"), 1)
        self.assertGreater(value(smp, "subrelay_message_bytes_total", account="app"), 5 * 100)
        self.assertEqual(value(smp, "subrelay_message_recipients_total", account="app"), 5)
        self.assertEqual(value(smp, "subrelay_messages_refused_total", stage="mail", reason="5.7.1"), 1)
        self.assertGreaterEqual(value(smp, "subrelay_auth_total", result="success"), 7)
        self.assertGreaterEqual(value(smp, "subrelay_auth_total", result="failure"), 1)
        self.assertGreaterEqual(value(smp, "subrelay_smtp_connections_accepted_total", listener="implicit"), 8)
        self.assertGreaterEqual(total(smp, "subrelay_tls_handshakes_total"), 8)
        self.assertEqual(value(smp, "subrelay_dkim_signatures_total", algorithm="ed25519-sha256"), 5)
        self.assertEqual(value(smp, "subrelay_dkim_sign_seconds_count"), 5)
        self.assertEqual(value(smp, "subrelay_accept_latency_seconds_count"), 6)
        self.assertGreaterEqual(value(smp, "subrelay_commit_latency_seconds_count"), 6)
        self.assertEqual(value(smp, "subrelay_accept_latency_seconds_bucket", le="+Inf"), 6)
        self.assertGreaterEqual(total(smp, "subrelay_delivery_attempts_total", result="delivered"), 3)
        self.assertEqual(total(smp, "subrelay_delivery_attempts_total", result="failed"), 1)
        self.assertEqual(total(smp, "subrelay_delivery_attempts_total", result="deferred"), 1)
        self.assertGreaterEqual(value(smp, "subrelay_delivery_attempts_total", result="delivered", tls="TLSv1.3"), 3)
        self.assertGreaterEqual(value(smp, "subrelay_delivery_latency_seconds_count"), 3)
        self.assertGreaterEqual(value(smp, "subrelay_dns_queries_total", type="MX"), 1)
        self.assertEqual(value(smp, "subrelay_build_info", version="0.1.0",
                               tls_backend=os.environ.get("SUBRELAY_TLS_BACKEND", "boringssl")), 1)
        self.assertGreater(value(smp, "subrelay_start_time_seconds"), time.time() - 3600)
        self.assertGreaterEqual(value(smp, "subrelay_queue_oldest_message_age_seconds"), 0)
        # Bounded cardinality: account labels only for configured accounts, never for
        # the name a client tried.
        accounts = {dict(ls).get("account") for (n, ls) in smp if "account" in dict(ls)}
        self.assertLessEqual(accounts, {"app", "ci"}, accounts)

        # --- OpenMetrics when asked for, parsed by prometheus_client's OpenMetrics parser
        status, ctype, body = http(mport, "/metrics",
                                   accept="application/openmetrics-text;version=1.0.0,text/plain;q=0.5")
        self.assertEqual(status, 200)
        self.assertTrue(ctype.startswith("application/openmetrics-text; version=1.0.0"), ctype)
        self.assertTrue(body.endswith("# EOF\n"))
        fams = {f.name: f for f in om_parser.text_string_to_metric_families(body)}
        self.assertEqual(fams["subrelay_messages_accepted"].type, "counter")
        self.assertEqual(fams["subrelay_delivery_latency_seconds"].type, "histogram")

        # --- health and readiness, and what else the listener answers
        self.assertEqual(http(mport, "/healthz")[0], 200)
        self.assertEqual(http(mport, "/readyz")[:1], (200,))
        self.assertEqual(http(mport, "/nope")[0], 404)
        self.assertEqual(http(mport, "/metrics", method="POST")[0], 405)

        # --- the dashboard only uses metrics the server exports
        with open(DASHBOARD) as f:
            dash = json.load(f)
        exported = {n for (n, _) in smp}
        families = set()
        for fam in text_string_to_metric_families(self.scrape(mport)):
            families.add(fam.name)
        panels = [p for p in dash["panels"] if p.get("type") != "row"]
        self.assertGreaterEqual(len(panels), 8)
        for p in panels:
            self.assertTrue(p.get("targets"), f"panel {p.get('title')} has no query")
            for t in p["targets"]:
                names = set(re.findall(r"\bsubrelay_[a-z0-9_]+", t["expr"]))
                self.assertTrue(names, f"panel {p['title']}: no subrelay metric in {t['expr']}")
                for n in names:
                    # A family with no sample yet (no rate-limit refusal so far) still has
                    # its HELP and TYPE lines: prometheus_client names a counter family
                    # without _total, a histogram without _bucket/_sum/_count.
                    base = re.sub(r"_(total|bucket|sum|count)$", "", n)
                    self.assertTrue(n in exported or n in families or base in families,
                                    f"panel {p['title']!r} queries {n}, which /metrics does not export")

        # --- subrelay status while serve runs (it refreshes data_dir/status every 2 s)
        def status_json():
            proc = srv.cli("status", "--json")
            self.assertEqual(proc.returncode, 0, proc.stderr)
            st = json.loads(proc.stdout)
            q = st["queue"]
            return st if st.get("accepted_total") == 6 and q["queued"] == 0 and q["in_flight"] == 0 else None
        # (the DSN to app@ops.test is delivered too before the queue is down to the deferral)
        st = wait_for(status_json, "status to count the accepted messages", timeout=15, interval=0.5)
        self.assertTrue(st["running"])
        self.assertEqual(len(st["listeners"]), 2)
        self.assertGreaterEqual(st["uptime_seconds"], 0)
        self.assertEqual(st["metrics_address"], f"127.0.0.1:{mport}")
        self.assertEqual(st["accepted_last_minute"], 6)
        self.assertGreaterEqual(st["delivered_last_minute"], 3)
        self.assertEqual(st["queue"]["deferred"], 1)
        self.assertEqual(st["top_senders"][0]["account"], "app")
        self.assertEqual(st["top_senders"][0]["accepted_last_minute"], 5)
        self.assertEqual(st["received_last_hour"], 7)  # 6 + the DSN
        self.assertEqual(st["captured_last_hour"], 1)
        text = srv.cli("status").stdout.decode()
        self.assertRegex(text, r"subrelay \S+: running, pid \d+, up ")
        self.assertIn("queue: 0 queued, 1 deferred, 0 in flight", text)
        self.assertIn("top senders (last minute / since start): app 5/5", text)

        # --- counters are process-lifetime: a reload keeps them
        srv.proc.send_signal(signal.SIGHUP)
        srv.wait_log(r"reload done", timeout=10)
        smp2 = samples(self.scrape(mport))
        self.assertEqual(value(smp2, "subrelay_messages_accepted_total", account="app"), 5)
        self.assertEqual(value(smp2, "subrelay_config_reloads_total", result="ok"), 1)

        # --- `queue drop` from the command line: serve logs the dropped event (its tick
        # reads what the command recorded), so it joins the message's other events
        proc = srv.cli("queue", "drop", deferred)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(proc.stderr, b"")
        srv.wait_log(r'"event":"dropped","queue_id":"' + deferred + '"', timeout=10)

        # --- JSON logs: every line an object; each message's events join on queue_id
        srv.stop()
        events = []
        for line in srv.log_text().splitlines():
            obj = json.loads(line)  # every line, or the test fails here
            for k in ("time", "level", "component", "event"):
                self.assertIn(k, obj, line)
            events.append(obj)
        by_id = {}
        for e in events:
            if "queue_id" in e:
                by_id.setdefault(e["queue_id"], []).append(e)
        q = delivered[0]
        kinds = [e["event"] for e in by_id[q]]
        self.assertEqual(kinds, ["signed", "accepted", "delivered"], by_id[q])
        acc = next(e for e in by_id[q] if e["event"] == "accepted")
        self.assertEqual(acc["account"], "app")
        self.assertEqual(acc["client"], "127.0.0.1")
        self.assertTrue(acc["tls"].startswith("TLSv1."))
        dl = next(e for e in by_id[q] if e["event"] == "delivered")
        self.assertEqual(dl["recipient"], "ok0@ops.test")
        self.assertRegex(dl["mx"], r"^mx\.ops\.test \[127\.0\.0\.71\]:\d+$")
        self.assertEqual(dl["tls"], "TLSv1.3")
        self.assertEqual(dl["status"], "2.0.0")
        self.assertTrue(dl["reply"].startswith("250"), dl)
        self.assertEqual([e["event"] for e in by_id[failed]], ["signed", "accepted", "failed", "bounced"])
        self.assertEqual(next(e for e in by_id[failed] if e["event"] == "failed")["status"], "5.1.1")
        kinds = [e["event"] for e in by_id[deferred]]
        self.assertEqual(kinds[:3], ["signed", "accepted", "deferred"], kinds)
        dropped = next(e for e in by_id[deferred] if e["event"] == "dropped")
        self.assertEqual((dropped["account"], dropped["by"], dropped["rcpts"]), ("app", "operator", 1))
        self.assertEqual([e["event"] for e in by_id[captured]], ["accepted"])
        # The hostile AUTH name is in a valid JSON string, escaped, and no password anywhere.
        log = srv.log_text()
        for secret in (APP.password, CI.password, "wrong-password"):
            self.assertNotIn(secret, log)

        # --- status with serve stopped: the queue part, and why it is not running
        proc = srv.cli("status", "--json")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        st = json.loads(proc.stdout)
        self.assertFalse(st["running"])
        self.assertEqual(st["queue"], {"queued": 0, "deferred": 0, "in_flight": 0, "oldest_age_seconds": 0})
        self.assertEqual(st["received_last_hour"], 6)  # the dropped one is gone
        self.assertIn("not running", srv.cli("status").stdout.decode())


    def test_metrics_address_in_use_is_a_clear_startup_error(self):
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        try:
            srv = harness.Server(accounts=[APP], extra_config={"metrics": {"address": f"127.0.0.1:{port}"}})
            proc = harness.subrelay("serve", "-c", srv.write_config(), timeout=scale(20))
            err = proc.stderr.decode()
            self.assertEqual(proc.returncode, 1, err)
            self.assertIn(f"cannot listen on 127.0.0.1:{port} for metrics", err)
            self.assertIn("change metrics.address", err)
            self.assertNotIn("listening on", err)  # it stops before any SMTP listener
        finally:
            busy.close()

    def test_metrics_off_by_default_and_text_logs_unchanged(self):
        srv = self.start_server(accounts=[CI])
        qid = send(srv, CI, "build@ci.test", ["dev@example.org"])
        self.assertRegex(srv.log_text(), rf"info queue: accepted id={qid} account=ci from=<build@ci\.test> rcpts=1 "
                                         r"size=\d+ client=127\.0\.0\.1 tls=TLSv1\.\d captured=yes")
        self.assertNotIn("metrics on", srv.log_text())


if __name__ == "__main__":
    harness.main()
