"""Smarthost delivery (issue 12, item 1): delivery.relay, accounts[].relay and
delivery.relay_overrides against a real Postfix acting as the upstream, with Cyrus SASL
(sasldb), STARTTLS required on one port and TLS from the first byte on another.

The server keeps a dead resolver and a dead delivery.port and never sets
allow_private_destinations: mail reaching the upstream on 127.0.0.x proves there was no MX
lookup and that the destination policy does not apply to a configured relay.
"""

import os
import signal
import socket
import time

import harness
import mta_peers
from harness import Account, scale, token
from mta_peers import PostfixRelay, free_port, make_cert

SENDER = "app@shop.test"
TENANT1 = Account("tenant1", "tenant1-Passw0rd", ["@shop.test"], mode="deliver")
TENANT2 = Account("tenant2", "tenant2-Passw0rd", ["@two.test"], mode="deliver")
RELAY_IP = "127.0.0.61"
RELAY2_IP = "127.0.0.62"
RELAY_USER, RELAY_PASSWORD = "relayuser", "relay-Pa55-secret"
TENANT2_USER, TENANT2_PASSWORD = "tenant2-upstream", "t2-Upstream-secret"


def wait_states(srv, qid, want, timeout=20):
    deadline = time.monotonic() + scale(timeout)
    while True:
        info = srv.queue_show_json(qid)
        if all(r["state"] == want for r in info["recipients"]):
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"{qid} never reached {want}: {info}\nlog:\n{srv.log_text()[-3000:]}")
        time.sleep(0.1)


class Relay(harness.ServerTestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = harness.make_tmpdir("subrelay-relay-")
        cls.p_starttls = free_port_on(RELAY_IP)
        cls.p_implicit = free_port_on(RELAY_IP, exclude={cls.p_starttls})
        cls.relay = PostfixRelay(
            [f"{RELAY_IP}:{cls.p_starttls}", f"{RELAY_IP}:{cls.p_implicit}"],
            users={RELAY_USER: RELAY_PASSWORD},
            wrappermode=[f"{RELAY_IP}:{cls.p_implicit}"],
            cert=None, hostname="smtp.upstream.test")
        cls.relay.cert, cls.relay.key = make_cert(ips=[RELAY_IP])
        cls.relay.start()
        # The second upstream: a good certificate on one port, one from an unknown CA on
        # the other.
        cls.q_good = free_port_on(RELAY2_IP)
        cls.q_untrusted = free_port_on(RELAY2_IP, exclude={cls.q_good})
        good = make_cert(ips=[RELAY2_IP])
        cls.relay2 = PostfixRelay(
            [f"{RELAY2_IP}:{cls.q_good}", f"{RELAY2_IP}:{cls.q_untrusted}"],
            users={TENANT2_USER: TENANT2_PASSWORD},
            cert=good.cert, key=good.key,
            certs={f"{RELAY2_IP}:{cls.q_untrusted}": make_cert(ips=[RELAY2_IP], issuer="other")},
            hostname="smtp2.upstream.test")
        cls.relay2.start()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        cls.relay.stop()
        cls.relay2.stop()

    # -- helpers ---------------------------------------------------------------------------
    def password_file(self, name, text, mode=0o600):
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def upstream(self, port, password=RELAY_PASSWORD, user=RELAY_USER, tls=None, host=RELAY_IP, name="pw"):
        u = {"host": host, "port": port}
        if tls:
            u["tls"] = tls
        if user:
            u["username"] = user
            u["password_file"] = self.password_file(f"{name}-{port}", password + "\n")
        return u

    def server(self, relay=None, accounts=(TENANT1,), **delivery_extra):
        delivery = {
            # Dead: any MX lookup or direct delivery would hang or fail, never deliver.
            "resolvers": [f"127.0.0.1:{harness.free_port(socket.SOCK_DGRAM)}"],
            "port": harness.free_port(),
            "tls_ca_file": harness.pki().ca,
            "retry_schedule": ["1h"],
        }
        if relay is not None:
            delivery["relay"] = relay
        delivery.update(delivery_extra)
        return self.start_server(accounts=list(accounts), extra_config={"delivery": delivery})

    def submit(self, srv, rcpts, account=TENANT1, sender=SENDER):
        tok = token("relay")
        conn = harness.smtp_ssl(srv.port("implicit"))
        conn.login(account.username, account.password)
        qid = harness.submit(conn, sender, rcpts, harness.make_message(sender, rcpts, tok))
        conn.quit()
        return qid, tok

    def arrived(self, peer, tok, n=1):
        deadline = time.monotonic() + scale(20)
        while True:
            got = [m for m in peer.messages() if tok.encode() in m["raw"]]
            if len(got) >= n:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"{n} message(s) with {tok} never reached {peer!r}; maillog:\n" +
                                     "\n".join(peer.maillog().splitlines()[-30:]))
            time.sleep(0.1)

    # -- tests -----------------------------------------------------------------------------
    def test_starttls_auth_delivers_every_domain_in_one_transaction(self):
        srv = self.server([self.upstream(self.p_starttls)])
        qid, tok = self.submit(srv, ["x@example.com", "y@other.example"])
        info = wait_states(srv, qid, "delivered")
        msgs = self.arrived(self.relay, tok, 2)
        for m in msgs:
            received = str(m["msg"].get_all("Received")[0])
            self.assertIn(f"Authenticated sender: {RELAY_USER}", received)
            self.assertEqual(m["tls"], "TLSv1.3")
        self.assertIn((RELAY_USER,), [(u.split("@")[0],) for _, u in self.relay.sasl_logins()])
        # One connection, one transaction for both domains.
        sessions = [s for s in self.relay.sessions() if s.get("auth")]
        self.assertEqual(sessions[-1].get("rcpt"), "2")
        self.assertEqual(sessions[-1].get("mail"), "1")
        mx = info["history"][-1]["mx"]
        self.assertIn(f"[{RELAY_IP}]:{self.p_starttls}", mx)
        srv.wait_log(rf"delivered id={qid} .*mx={RELAY_IP} \[{RELAY_IP}\]:{self.p_starttls} .*relay=delivery\.relay\[0\]")
        self.assertNotIn(RELAY_PASSWORD, srv.log_text())

    def test_failover_to_the_second_upstream_over_implicit_tls(self):
        dead = free_port_on(RELAY_IP, exclude={self.p_starttls, self.p_implicit})
        srv = self.server([{"host": RELAY_IP, "port": dead},
                           self.upstream(self.p_implicit, tls="implicit")])
        qid, tok = self.submit(srv, ["z@example.com"])
        info = wait_states(srv, qid, "delivered")
        self.arrived(self.relay, tok)
        self.assertIn(f":{self.p_implicit}", info["history"][-1]["mx"])
        srv.wait_log(rf"relay-failover relay=delivery\.relay\[0\] mx={RELAY_IP} \[{RELAY_IP}\]:{dead} ")
        self.assertIn(f"TLS connection established from unknown[127.0.0.1]", self.relay.maillog())

    def test_wrong_password_defers_without_bounces_until_fixed(self):
        pw = self.upstream(self.p_starttls, password="wrong-password-123", name="wrong")
        srv = self.server([pw])
        qids = [self.submit(srv, [f"w{i}@example.com"])[0] for i in range(3)]
        for qid in qids:
            info = wait_states(srv, qid, "deferred")
            r = info["recipients"][0]
            self.assertEqual(r["last_status"], "4.7.8")
            self.assertIn("authentication", r["last_error"])
            self.assertIn("535", r["last_error"])
        log = srv.wait_log(r"relay-auth-failed relay=delivery\.relay\[0\] .*user=relayuser")
        self.assertIn("hint=\"check delivery.relay[0].username and .password_file\"", srv.log_text())
        self.assertNotIn("wrong-password-123", srv.log_text())
        self.assertIn("authentication failed", self.relay.maillog())
        # No DSN: the sender is not told about our configuration problem.
        self.assertEqual(len(srv.queue_list()), 3, srv.queue_list())
        # Fix the file, reload, retry: everything goes.
        with open(pw["password_file"], "w") as f:
            f.write(RELAY_PASSWORD + "\n")
        srv.proc.send_signal(signal.SIGHUP)
        srv.wait_log(r"reload", timeout=15)
        harness.wait_for(lambda: srv.cli("queue", "retry", "--all").returncode == 0, "queue retry")
        for qid in qids:
            wait_states(srv, qid, "delivered")

    def test_untrusted_certificate_never_gets_credentials(self):
        logins_before = len(self.relay2.sasl_logins())
        sessions_before = len(self.relay2.sessions())
        srv = self.server([{"host": RELAY2_IP, "port": self.q_untrusted, "username": TENANT2_USER,
                            "password_file": self.password_file("t2", TENANT2_PASSWORD)}])
        qid, _ = self.submit(srv, ["u@example.com"])
        info = wait_states(srv, qid, "deferred")
        self.assertRegex(info["recipients"][0]["last_error"], r"certificate|verify")
        harness.wait_for(lambda: len(self.relay2.sessions()) > sessions_before, "the refused session")
        self.assertEqual(len(self.relay2.sasl_logins()), logins_before, self.relay2.maillog())
        self.assertFalse([s for s in self.relay2.sessions()[sessions_before:] if "auth" in s],
                         self.relay2.sessions())

    def test_each_tenant_uses_its_own_upstream_and_identity(self):
        t2 = Account(TENANT2.username, TENANT2.password, TENANT2.senders, mode="deliver", extra={"relay": [
            {"host": RELAY2_IP, "port": self.q_good, "username": TENANT2_USER,
             "password_file": self.password_file("t2good", TENANT2_PASSWORD)}]})
        srv = self.server([self.upstream(self.p_starttls, name="t1")], accounts=(TENANT1, t2))
        q1, tok1 = self.submit(srv, ["a@example.com"])
        q2, tok2 = self.submit(srv, ["b@example.com"], account=TENANT2, sender="app@two.test")
        wait_states(srv, q1, "delivered")
        wait_states(srv, q2, "delivered")
        self.arrived(self.relay, tok1)
        self.arrived(self.relay2, tok2)
        self.assertFalse([m for m in self.relay.messages() if tok2.encode() in m["raw"]])
        self.assertFalse([m for m in self.relay2.messages() if tok1.encode() in m["raw"]])
        self.assertIn(TENANT2_USER, [u.split("@")[0] for _, u in self.relay2.sasl_logins()])

    def test_requiretls_through_a_relay_that_offers_it(self):
        """RFC 8689: REQUIRETLS is accepted inside TLS, stored, and passed to an upstream that
        offers it (a second subrelay, which advertises REQUIRETLS inside TLS); an upstream
        without it (Postfix) gets nothing and the sender gets a bounce with 5.7.30."""
        up_account = Account("upstream", "upstream-Passw0rd", ["@shop.test"], mode="capture")
        upstream = self.start_server(accounts=[up_account], listeners=("starttls",), name="upstream")
        srv = self.server([{"host": "127.0.0.1", "port": upstream.port("starttls"), "username": "upstream",
                            "password_file": self.password_file("up", up_account.password)}])
        tok = token("rtls")
        conn = harness.smtp_ssl(srv.port("implicit"))
        self.assertIn("requiretls", conn.esmtp_features)
        conn.login(TENANT1.username, TENANT1.password)
        qid = harness.submit(conn, SENDER, ["r@example.com"], harness.make_message(SENDER, ["r@example.com"], tok),
                             mail_options=["REQUIRETLS"])
        opt_tok = token("optional")
        opt_msg = harness.make_message(SENDER, ["o@example.com"], opt_tok).replace(
            b"Subject:", b"TLS-Required: No\r\nSubject:", 1)
        qid_opt = harness.submit(conn, SENDER, ["o@example.com"], opt_msg)
        conn.quit()
        self.assertEqual(srv.queue_show_json(qid)["tls_required"], "requiretls")
        self.assertEqual(srv.queue_show_json(qid_opt)["tls_required"], "optional")
        wait_states(srv, qid, "delivered")
        wait_states(srv, qid_opt, "delivered")
        tags = {}
        for m in harness.wait_for(lambda: len(upstream.queue_list()) >= 2 and upstream.queue_list(),
                                  "both messages at the upstream"):
            raw = upstream.queue_raw(m["id"])
            info = upstream.queue_show_json(m["id"])
            if tok.encode() in raw:
                tags["required"] = info["tls_required"]
            if opt_tok.encode() in raw:
                tags["optional"] = info["tls_required"]
        self.assertEqual(tags, {"required": "requiretls", "optional": "optional"})

        # The Postfix upstream does not offer REQUIRETLS: the message is not sent there.
        srv2 = self.server([self.upstream(self.p_starttls, name="rtls")])
        conn = harness.smtp_ssl(srv2.port("implicit"))
        conn.login(TENANT1.username, TENANT1.password)
        tok2 = token("rtls-no")
        q2 = harness.submit(conn, SENDER, ["n@example.com"], harness.make_message(SENDER, ["n@example.com"], tok2),
                            mail_options=["REQUIRETLS"])
        conn.quit()
        info = wait_states(srv2, q2, "failed")
        self.assertEqual(info["recipients"][0]["last_status"], "5.7.30")
        self.assertFalse([m for m in self.relay.messages() if tok2.encode() in m["raw"]])

    def test_check_config_reports_relay_mistakes_with_paths(self):
        srv = harness.Server(accounts=[TENANT1], extra_config={"delivery": {"relay": [
            {"host": RELAY_IP, "port": self.p_starttls, "username": "u", "verify": False,
             "password_file": self.password_file("open", "x\n", 0o644)},
            {"host": RELAY_IP, "port": self.p_implicit, "username": "u",
             "password_file": self.password_file("open2", "x\n", 0o644)}]}})
        path = srv.write_config()
        r = srv.cli("check-config")
        self.assertEqual(r.returncode, 1, r)
        out = (r.stdout + r.stderr).decode(errors="replace")
        self.assertIn("delivery.relay[0].verify: AUTH is sent only over verified TLS", out)
        self.assertIn(path, out)
        # The file checks run once the document itself is valid.
        srv2 = harness.Server(accounts=[TENANT1], extra_config={"delivery": {"relay": [
            {"host": RELAY_IP, "port": self.p_implicit, "username": "u",
             "password_file": self.password_file("open3", "x\n", 0o644)}]}})
        srv2.write_config()
        r2 = srv2.cli("check-config")
        self.assertEqual(r2.returncode, 1)
        out2 = (r2.stdout + r2.stderr).decode(errors="replace")
        self.assertIn("delivery.relay[0].password_file: cannot read", out2)
        self.assertIn("mode 0644", out2)


def free_port_on(ip, exclude=()):
    for _ in range(100):
        p = free_port(ip)
        if p not in exclude:
            return p
    raise AssertionError(f"no free port on {ip}")


if __name__ == "__main__":
    harness.main()
