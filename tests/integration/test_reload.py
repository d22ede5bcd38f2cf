"""SIGHUP reload (issue 5): accounts, limits, keys and certificates are reloaded atomically; a
broken configuration is refused with a logged error and the old one stays in force; sessions in
progress keep the accounts/senders/keys/certificate they started with.

Rate-limit counters and brute-force thresholds are shared state, not session state: a new
limit applies at once to every session of the account (that is what stops a leaked tenant).
"""

import hashlib
import json
import os
import signal
import ssl
import subprocess

import harness
from harness import Account, RawClient, ServerTestCase, dot_stuff, make_message, scale, token


def send(c, sender, expect_mail=250):
    code, lines = c.cmd(f"MAIL FROM:<{sender}>")
    if code != 250:
        return code, " ".join(lines)
    c.expect("RCPT TO:<to@example.net>", 250)
    code, lines = c.data(dot_stuff(make_message(sender, ["to@example.net"], "reload " + token())),
                         expect=None)
    return code, " ".join(lines)


def hup(srv, marker):
    """SIGHUP and wait for the reload's verdict line; returns the log text after it."""
    before = srv.log_text().count(marker)
    srv.proc.send_signal(signal.SIGHUP)
    import time
    deadline = time.monotonic() + scale(15)
    while srv.log_text().count(marker) <= before:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {marker!r} after SIGHUP; log:\n{srv.log_text()}")
        if not srv.alive():
            raise AssertionError(f"serve died on SIGHUP; log:\n{srv.log_text()}")
        time.sleep(0.05)
    return srv.log_text()


def cert_fingerprint(port):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    import socket
    with socket.create_connection((harness.LOOPBACK, port), timeout=scale(10)) as s:
        with ctx.wrap_socket(s) as t:
            return hashlib.sha256(t.getpeercert(binary_form=True)).hexdigest()


class Reload(ServerTestCase):
    def test_new_accounts_and_limits_apply_sessions_keep_theirs(self):
        shop = Account("shop", "shop-Passw0rd", ["@shop.test"])
        srv = self.start_server(accounts=[shop])
        old = RawClient(srv.port("implicit"), implicit_tls=True)
        self.addCleanup(old.close)
        old.login("implicit", shop)
        self.assertEqual(send(old, "a@shop.test")[0], 250)

        shop2 = Account("shop", "shop-Passw0rd", ["@new.test"], rate_limits={"messages_per_minute": 1})
        late = Account("late", "late-Passw0rd", ["@late.test"])
        srv.accounts = [shop2, late]
        srv.write_config()
        log = hup(srv, "reload done")
        self.assertIn("generation 2", log)

        # The session that started before keeps its senders...
        code, text = send(old, "b@shop.test")
        self.assertEqual(code, 250, text)
        # ...and the new limit applies to the account at once (the one token is used now).
        code, text = send(old, "c@shop.test")
        self.assertEqual(code, 451, text)
        self.assertIn("messages_per_minute", text)
        # New sessions get the new senders and the new account.
        with RawClient(srv.port("implicit"), implicit_tls=True) as c:
            c.login("implicit", shop2)
            code, lines = c.cmd("MAIL FROM:<a@shop.test>")
            self.assertEqual(code, 553, lines)
            code, text = send(c, "a@new.test")
            self.assertEqual(code, 451, text)
        with RawClient(srv.port("implicit"), implicit_tls=True) as c:
            c.login("implicit", late)
            self.assertEqual(send(c, "x@late.test")[0], 250)
        # A removed account can no longer log in.
        srv.accounts = [late]
        srv.write_config()
        hup(srv, "reload done")
        with RawClient(srv.port("implicit"), implicit_tls=True) as c:
            c.ehlo()
            c.auth_plain(shop.username, shop.password, expect=535)

    def test_broken_config_is_refused_and_the_old_one_stays(self):
        shop = Account("shop", "shop-Passw0rd", ["@shop.test"])
        srv = self.start_server(accounts=[shop])
        good = open(srv.config_path).read()

        def still_serving():
            with RawClient(srv.port("implicit"), implicit_tls=True) as c:
                c.login("implicit", shop)
                self.assertEqual(send(c, "a@shop.test")[0], 250)

        with open(srv.config_path, "w") as f:
            f.write('{ "hostname": "x", ')
        log = hup(srv, "reload refused")
        self.assertIn(srv.config_path, log)
        still_serving()

        cfg = json.loads(good)
        cfg["limits"] = {"max_recipientz": 5}
        with open(srv.config_path, "w") as f:
            json.dump(cfg, f)
        log = hup(srv, "reload refused")
        self.assertIn("limits.max_recipientz", log)
        still_serving()

        cfg = json.loads(good)
        cfg["tls"]["certificate"] = os.path.join(srv.workdir, "missing.pem")
        cfg["accounts"].append({"username": "new", "password_hash": harness.hash_password("new-Passw0rd"),
                                "senders": ["@new.test"], "mode": "capture"})
        with open(srv.config_path, "w") as f:
            json.dump(cfg, f)
        log = hup(srv, "reload refused")
        self.assertIn("missing.pem", log)
        # Atomic: the new account of the refused file did not sneak in.
        with RawClient(srv.port("implicit"), implicit_tls=True) as c:
            c.ehlo()
            c.auth_plain("new", "new-Passw0rd", expect=535)
        still_serving()
        self.assertTrue(srv.alive())

    def test_certificate_is_reloaded(self):
        srv = self.start_server()
        before = cert_fingerprint(srv.port("implicit"))
        d = srv.workdir
        key, cert = os.path.join(d, "new-key.pem"), os.path.join(d, "new-cert.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
        srv.extra_config = {"tls": {"certificate": cert, "private_key": key}}
        srv.write_config()
        hup(srv, "reload done")
        after = cert_fingerprint(srv.port("implicit"))
        self.assertNotEqual(before, after)
        with open(cert, "rb") as f:
            der = ssl.PEM_cert_to_DER_cert(f.read().decode())
        self.assertEqual(after, hashlib.sha256(der).hexdigest())

    def test_dkim_keys_are_reloaded(self):
        shop = Account("shop", "shop-Passw0rd", ["@shop.test"])
        srv = self.start_server(accounts=[shop])
        with RawClient(srv.port("implicit"), implicit_tls=True) as c:
            c.login("implicit", shop)
            self.assertEqual(send(c, "a@shop.test")[0], 250)
        key = os.path.join(srv.workdir, "shop.ed.pem")
        proc = harness.subrelay("dkim-keygen", "--domain", "shop.test", "--selector", "r1",
                                "--algorithm", "ed25519-sha256", "--out", key)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        srv.extra_config = {"dkim": [{"domain": "shop.test", "selector": "r1", "algorithm": "ed25519-sha256",
                                      "private_key": key}]}
        srv.write_config()
        hup(srv, "reload done")
        with RawClient(srv.port("implicit"), implicit_tls=True) as c:
            c.login("implicit", shop)
            self.assertEqual(send(c, "b@shop.test")[0], 250)
        raws = [srv.queue_raw(i) for i in srv.queue_ids()]
        signed = [r for r in raws if b"DKIM-Signature:" in r]
        self.assertEqual(len(signed), 1)
        self.assertIn(b"s=r1", signed[0])


if __name__ == "__main__":
    harness.main()
