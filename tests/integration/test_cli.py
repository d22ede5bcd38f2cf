"""The command line: --help everywhere, usage errors, hash-password, check-config, serve --dev,
queue list/show while serve runs, and serve's SIGTERM/SIGINT behaviour."""

import base64
import copy
import json
import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import time

import harness
from harness import Account, check_stored, make_message, submit, subrelay, token

WEBSHOP = Account("webshop", "correct horse battery staple", ["@shop.test"])
CI = Account("ci", "ci-secret-Passw0rd", ["@ci.test"])

DEV_PORTS = (2587, 2465)


def out_of(proc):
    return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


class Cli(harness.ServerTestCase):
    # -- help and usage --------------------------------------------------------------------------
    def listed_commands(self):
        """Commands named in the `commands:` section of `subrelay --help` (first words)."""
        text = out_of(subrelay("--help"))
        cmds, in_section = [], False
        for line in text.splitlines():
            if line.strip().lower().startswith("commands"):
                in_section = True
                continue
            if in_section:
                if not line.strip() or not line.startswith(" "):
                    if cmds and not line.strip():
                        break
                    continue
                m = re.match(r"\s{1,4}([a-z][a-z-]*)(?:\s+([a-z][a-z-]*))?", line)
                if m and not line.startswith(" " * 8):
                    words = [m.group(1)]
                    if m.group(1) == "queue" and m.group(2):
                        words.append(m.group(2))
                    cmds.append(tuple(words))
        return cmds

    def test_help_everywhere(self):
        proc = subrelay("--help")
        self.assertEqual(proc.returncode, 0, out_of(proc))
        self.assertRegex(out_of(proc).lower(), r"usage")
        commands = {("serve",), ("check-config",), ("hash-password",), ("queue",),
                    ("queue", "list"), ("queue", "show")}
        commands.update(self.listed_commands())
        for cmd in sorted(commands):
            for flag in ("--help", "-h"):
                with self.subTest(cmd=cmd, flag=flag):
                    proc = subrelay(*cmd, flag, timeout=10)
                    self.assertEqual(proc.returncode, 0, out_of(proc))
                    self.assertIn("usage", out_of(proc).lower())
                    self.assertIn(cmd[0], out_of(proc))

    def test_usage_errors_exit_2(self):
        # A readable config for the queue commands, so only the usage error is left.
        srv = harness.Server(accounts=[WEBSHOP], listeners=("starttls",))
        cfg = srv.write_config()
        for argv in (["frobnicate"], [], ["serve", "--no-such-option"],
                     ["hash-password", "extra-argument"], ["queue", "frobnicate", "-c", cfg],
                     ["queue", "show", "-c", cfg], ["queue", "-c", cfg],
                     ["queue", "list", "--bogus", "-c", cfg], ["check-config", "-c"],
                     # Usage errors win over a missing default config file (SPEC: exit 2).
                     ["queue", "show"], ["queue", "frobnicate"], ["queue", "list", "extra"]):
            with self.subTest(argv=argv):
                proc = subrelay(*argv, timeout=10, input=b"")
                self.assertEqual(proc.returncode, 2, out_of(proc))
                self.assertTrue(proc.stderr.strip(), "no message on stderr")

    def test_version(self):
        proc = subrelay("--version")
        self.assertEqual(proc.returncode, 0, out_of(proc))
        self.assertRegex(out_of(proc), r"\d+\.\d+")

    # -- hash-password ---------------------------------------------------------------------------
    def test_hash_password(self):
        hashes = {}
        for name, stdin in (("newline", b"s3cret pass\n"), ("no-newline", b"s3cret pass"),
                            ("crlf-free-utf8", "pässwörd ✓\n".encode())):
            proc = subrelay("hash-password", input=stdin)
            self.assertEqual(proc.returncode, 0, out_of(proc))
            lines = proc.stdout.decode().splitlines()
            self.assertEqual(len(lines), 1, proc.stdout)
            self.assertRegex(lines[0], r"^\$scrypt\$\S+$")
            hashes[name] = lines[0]
        self.assertNotEqual(hashes["newline"], hashes["no-newline"], "no random salt")
        # The hashes work: both spellings of stdin give the password without the newline.
        srv = harness.Server(accounts=[WEBSHOP], listeners=("implicit",))
        cfg_accounts = [
            {"username": "a1", "password_hash": hashes["newline"], "senders": ["@a.test"],
             "mode": "capture"},
            {"username": "a2", "password_hash": hashes["no-newline"], "senders": ["@a.test"],
             "mode": "capture"},
            {"username": "a3", "password_hash": hashes["crlf-free-utf8"], "senders": ["@a.test"],
             "mode": "capture"},
        ]
        srv.extra_config = {"accounts": cfg_accounts}
        self.test_servers.append(srv)
        self.addCleanup(self._finish_server, srv)
        srv.start()
        for user, pw in (("a1", "s3cret pass"), ("a2", "s3cret pass"), ("a3", "pässwörd ✓")):
            with self.subTest(user=user):
                conn = harness.smtp_ssl(srv.port("implicit"))
                # RFC 4616: PLAIN carries UTF-8 (smtplib's auth() would encode it as ASCII).
                cred = base64.b64encode(f"\0{user}\0{pw}".encode()).decode()
                code, resp = conn.docmd("AUTH", "PLAIN " + cred)
                self.assertEqual(code, 235, resp)
                conn.close()

    # -- check-config ----------------------------------------------------------------------------
    def base_config(self):
        srv = harness.Server(accounts=[WEBSHOP], listeners=("starttls", "implicit", "none"))
        srv.write_config()
        with open(srv.config_path) as f:
            return srv.workdir, json.load(f)

    def check_config(self, cfg, name="c.json"):
        workdir = harness.make_tmpdir()
        path = os.path.join(workdir, name)
        with open(path, "w") as f:
            f.write(cfg if isinstance(cfg, str) else json.dumps(cfg, indent=1))
        proc = subrelay("check-config", "-c", path)
        return path, proc

    def test_check_config_ok(self):
        _, cfg = self.base_config()
        path, proc = self.check_config(cfg)
        self.assertEqual(proc.returncode, 0, out_of(proc))
        self.assertEqual(proc.stdout.decode().strip(), "ok")
        # Also with the full set of documented keys (README.md's example, on loopback).
        cfg["limits"] = {"max_message_bytes": 1000000, "max_recipients": 10,
                         "max_connections": 100, "max_connections_per_ip": 10}
        cfg["accounts"][0]["rate_limits"] = {"messages_per_minute": 120,
                                             "messages_per_day": 20000,
                                             "recipients_per_hour": 5000}
        cfg["delivery"].update({"tls": "opportunistic",
                                "retry_schedule": ["5m", "10m", "1h"], "max_queue_time": "5d",
                                "max_connections": 20, "max_connections_per_domain": 2})
        path, proc = self.check_config(cfg)
        self.assertEqual(proc.returncode, 0, out_of(proc))
        self.assertEqual(proc.stdout.decode().strip(), "ok")

    def assert_errors(self, cfg, paths, name="c.json"):
        path, proc = self.check_config(cfg, name)
        text = out_of(proc)
        self.assertEqual(proc.returncode, 1, text)
        lines = [l for l in text.splitlines() if l.strip()]
        for p in paths:
            rx = re.compile(re.escape(path) + r": " + p + r"(\.[^:\s]+|\[\d+\])*: \S")
            self.assertTrue(any(rx.match(l) for l in lines),
                            f"no line `{path}: {p}: message` in:\n{text}")
        self.assertNotIn("ok", [l.strip() for l in lines])
        return lines

    def test_check_config_errors(self):
        _, base = self.base_config()
        cases = []
        cfg = copy.deepcopy(base)
        cfg["limits"] = {"max_recipients": "ten"}
        cases.append(("wrong type", cfg, [r"limits\.max_recipients"]))
        cfg = copy.deepcopy(base)
        cfg["limits"] = {"max_recipientz": 10}
        cases.append(("unknown nested key", cfg, [r"limits\.max_recipientz"]))
        cfg = copy.deepcopy(base)
        cfg["bogus_key"] = True
        cases.append(("unknown top-level key", cfg, [r"bogus_key"]))
        cfg = copy.deepcopy(base)
        cfg["accounts"][0]["sendrs"] = ["@shop.test"]
        cases.append(("unknown account key", cfg, [r"accounts\[0\]\.sendrs"]))
        cfg = copy.deepcopy(base)
        cfg["accounts"][0]["mode"] = "blackhole"
        cases.append(("bad enum", cfg, [r"accounts\[0\]\.mode"]))
        cfg = copy.deepcopy(base)
        cfg["listeners"][2]["address"] = "0.0.0.0:" + cfg["listeners"][2]["address"].split(":")[1]
        cases.append(("none listener off loopback", cfg, [r"listeners\[2\]"]))
        cfg = copy.deepcopy(base)
        cfg["listeners"].append({"address": "[::]:2599", "tls": "none"})
        cases.append(("none listener on ::", cfg, [r"listeners\[3\]"]))
        cfg = copy.deepcopy(base)
        cfg["accounts"][0]["senders"] = ["@shop.test", "shop.test"]
        cases.append(("sender pattern", cfg, [r"accounts\[0\]\.senders\[1\]"]))
        cfg = copy.deepcopy(base)
        cfg["delivery"]["max_queue_time"] = "5 days"
        cases.append(("bad duration", cfg, [r"delivery\.max_queue_time"]))
        cfg = copy.deepcopy(base)
        cfg["limits"] = {"max_recipients": -1, "max_conections": 5}
        cfg["accounts"][0]["mode"] = 7
        cfg["hostnmae"] = "x"
        cases.append(("several errors", cfg, [r"limits\.max_recipients", r"limits\.max_conections",
                                              r"accounts\[0\]\.mode", r"hostnmae"]))
        for name, cfg, paths in cases:
            with self.subTest(case=name):
                lines = self.assert_errors(cfg, paths)
                self.assertGreaterEqual(len(lines), len(paths), "one line per error expected")

    def test_check_config_unreadable(self):
        path, proc = self.check_config('{"hostname": "x", ', name="broken.json")
        self.assertEqual(proc.returncode, 1, out_of(proc))
        self.assertIn(path, out_of(proc))
        proc = subrelay("check-config", "-c", "/nonexistent/subrelay.json")
        self.assertEqual(proc.returncode, 1, out_of(proc))
        self.assertIn("/nonexistent/subrelay.json", out_of(proc))

    def test_serve_refuses_bad_config(self):
        _, cfg = self.base_config()
        cfg["limits"] = {"max_recipientz": 10}
        path, _ = self.check_config(cfg)
        proc = subrelay("serve", "-c", path, timeout=30)
        self.assertEqual(proc.returncode, 1, out_of(proc))
        self.assertIn("limits.max_recipientz", out_of(proc))

    def test_serve_port_in_use_and_second_serve_exit_1(self):
        # A port someone else holds: one clear line and exit 1 (not a crash on the way out).
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        self.addCleanup(holder.close)
        _, cfg = self.base_config()
        cfg["listeners"] = [{"address": f"127.0.0.1:{holder.getsockname()[1]}", "tls": "starttls"}]
        path, _ = self.check_config(cfg)
        proc = subrelay("serve", "-c", path, timeout=30)
        self.assertEqual(proc.returncode, 1, out_of(proc))
        self.assertIn("Address already in use", out_of(proc))
        # A second serve on the data_dir of a running one is refused before it listens.
        srv = self.start_server(accounts=[WEBSHOP], listeners=("starttls",))
        other = dict(srv.config())
        other["listeners"] = [{"address": f"127.0.0.1:{harness.free_port()}", "tls": "starttls"}]
        path2 = os.path.join(srv.workdir, "second.json")
        with open(path2, "w") as f:
            json.dump(other, f)
        proc = subrelay("serve", "-c", path2, timeout=30)
        self.assertEqual(proc.returncode, 1, out_of(proc))
        self.assertIn("another `subrelay serve` is using data_dir", out_of(proc))

    # -- queue list / show while serve runs ------------------------------------------------------
    def test_queue_list_and_show(self):
        srv = self.start_server(accounts=[WEBSHOP, CI], listeners=("starttls",))
        conn = harness.smtp_starttls(srv.port(), ehlo="helo-name.cli.test")
        self.addCleanup(conn.close)
        conn.login(WEBSHOP.username, WEBSHOP.password)
        tls_version, tls_cipher = conn.sock.version(), conn.sock.cipher()[0]
        msg1 = make_message("orders@shop.test", ["a@example.net", "b@example.net"],
                            f"one {token()}", message_id=False)
        qid1 = submit(conn, "orders@shop.test", ["a@example.net", "b@example.net"], msg1)
        msg2 = make_message("orders@shop.test", ["c@example.net"], f"two {token()}",
                            body=b"x" * 5000 + b"\r\n")
        qid2 = submit(conn, "orders@shop.test", ["c@example.net"], msg2)
        self.assertTrue(srv.alive())

        proc = srv.cli("queue", "list")
        self.assertEqual(proc.returncode, 0, out_of(proc))
        lines = proc.stdout.decode().splitlines()
        self.assertEqual(len([l for l in lines if qid1 in l]), 1, lines)
        self.assertEqual(len([l for l in lines if qid2 in l]), 1, lines)

        entries = {e["id"]: e for e in srv.queue_list()}
        self.assertEqual(set(entries), {qid1, qid2})
        for qid, msg, rcpts in ((qid1, msg1, ["a@example.net", "b@example.net"]),
                                (qid2, msg2, ["c@example.net"])):
            e = entries[qid]
            for key in ("id", "account", "sender", "recipients", "size", "received_at", "age",
                        "captured"):
                self.assertIn(key, e)
            self.assertEqual(e["account"], "webshop")
            self.assertEqual(e["sender"], "orders@shop.test")
            self.assertTrue(e["captured"])
            self.assertEqual([r["address"] for r in e["recipients"]], rcpts)
            for r in e["recipients"]:
                for key in ("address", "state", "attempts", "next_attempt", "last_error"):
                    self.assertIn(key, r)
                self.assertEqual(r["state"], "captured")
            raw = srv.queue_raw(qid)
            check_stored(self, raw, msg, account="webshop", tls_version=tls_version)
            self.assertGreaterEqual(e["size"], len(msg))
            self.assertLessEqual(e["size"], len(raw))
            self.assertIsInstance(e["age"], (int, float))
            self.assertGreaterEqual(e["age"], 0)
            shown = srv.queue_show_json(qid)
            for key in ("id", "account", "sender", "recipients", "size", "received_at",
                        "client_address", "helo", "tls_version", "tls_cipher"):
                self.assertIn(key, shown)
            self.assertEqual(shown["id"], qid)
            self.assertIn("127.0.0.1", shown["client_address"])
            self.assertEqual(shown["helo"], "helo-name.cli.test")
            self.assertEqual(shown["tls_version"], tls_version)
            self.assertEqual(shown["tls_cipher"], tls_cipher)
            proc = srv.cli("queue", "show", qid)
            self.assertEqual(proc.returncode, 0, out_of(proc))
            self.assertIn(qid, proc.stdout.decode())

        for args in (("queue", "show", "0000000000000000"), ("queue", "show", "no-such-id"),
                     ("queue", "show", "0000000000000000", "--raw"),
                     ("queue", "show", "0000000000000000", "--json")):
            with self.subTest(args=args):
                proc = srv.cli(*args)
                self.assertEqual(proc.returncode, 1, out_of(proc))
                self.assertTrue(proc.stderr.strip())
                self.assertEqual(proc.stdout, b"")
        conn.quit()
        self.assertEqual(srv.stop(), 0)
        # And after serve has stopped.
        self.assertEqual(set(srv.queue_ids()), {qid1, qid2})

    # -- serve: signals --------------------------------------------------------------------------
    def test_sigterm_lets_transaction_finish(self):
        srv = self.start_server(accounts=[WEBSHOP], listeners=("starttls", "implicit"))
        raw = harness.RawClient(srv.port("implicit"), implicit_tls=True)
        self.addCleanup(raw.close)
        raw.login("implicit", WEBSHOP)
        raw.expect("MAIL FROM:<orders@shop.test>", 250)
        raw.expect("RCPT TO:<a@example.net>", 250)
        raw.expect("DATA", 354)
        msg = make_message("orders@shop.test", ["a@example.net"], f"inflight {token()}")
        raw.send(msg[:40])
        srv.proc.send_signal(signal.SIGTERM)
        # New connections are refused once it stops accepting.
        deadline = time.monotonic() + harness.scale(10)
        while True:
            try:
                with socket.create_connection((harness.LOOPBACK, srv.port("starttls")),
                                              timeout=2) as s:
                    s.settimeout(2)
                    data = s.recv(100)
                    if not data or not data.startswith(b"220"):
                        break
            except (ConnectionRefusedError, ConnectionResetError, socket.timeout):
                break
            self.assertLess(time.monotonic(), deadline, "still accepting after SIGTERM")
            time.sleep(0.05)
        self.assertTrue(srv.alive(), "exited with a transaction in flight")
        raw.send(msg[40:] + b".\r\n")
        code, lines = raw.reply()
        self.assertEqual(code, 250, lines)
        qid = harness.queued_id(lines[0])
        try:
            raw.cmd("QUIT")
        except (harness.ConnectionClosed, OSError):
            pass
        self.assertEqual(srv.stop(timeout=30), 0)
        self.assertIn(qid, srv.queue_ids())

    def test_sigterm_grace_is_bounded(self):
        srv = self.start_server(accounts=[WEBSHOP], listeners=("implicit",),
                                limits={"shutdown_grace": "2s"})
        raw = harness.RawClient(srv.port("implicit"), implicit_tls=True)
        self.addCleanup(raw.close)
        raw.login("implicit", WEBSHOP)
        raw.expect("MAIL FROM:<orders@shop.test>", 250)
        raw.expect("RCPT TO:<a@example.net>", 250)
        raw.expect("DATA", 354)
        tok = token("grace")
        raw.send(f"Subject: {tok}\r\n\r\nnever finished".encode())
        # An idle second connection must not hold the shutdown up either.
        idle = harness.RawClient(srv.port("implicit"), implicit_tls=True)
        self.addCleanup(idle.close)
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(timeout=harness.scale(2 + 8))
        except subprocess.TimeoutExpired:
            self.fail(f"serve still running {harness.scale(10):.0f}s after SIGTERM with "
                      "shutdown_grace 2s")
        self.assertEqual(srv.proc.returncode, 0)
        self.assertGreaterEqual(time.monotonic() - started, 1.5,
                                "did not wait for the transaction in flight")
        ids = srv.queue_ids()
        self.assertFalse(any(tok.encode() in srv.queue_raw(q) for q in ids))

    def test_sigterm_not_held_by_stalled_handshakes(self):
        # Clients that connected but never finish a TLS handshake (implicit TLS, or after
        # STARTTLS) have nothing in flight: shutdown must not wait the grace time for them.
        srv = self.start_server(accounts=[WEBSHOP], listeners=("starttls", "implicit"),
                                limits={"shutdown_grace": "30s"})
        stalled_implicit = socket.create_connection((harness.LOOPBACK, srv.port("implicit")), timeout=10)
        self.addCleanup(stalled_implicit.close)
        raw = harness.RawClient(srv.port("starttls"))
        self.addCleanup(raw.close)
        raw.ehlo()
        raw.expect("STARTTLS", 220)  # and then no ClientHello
        time.sleep(0.3)
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(timeout=harness.scale(10))
        except subprocess.TimeoutExpired:
            self.fail("stalled TLS handshakes held the shutdown for the whole grace time")
        self.assertEqual(srv.proc.returncode, 0)
        self.assertLess(time.monotonic() - started, harness.scale(10))

    def test_sigint_exits_0(self):
        srv = self.start_server(accounts=[WEBSHOP], listeners=("starttls",))
        srv.proc.send_signal(signal.SIGINT)
        srv.proc.wait(timeout=harness.scale(20))
        self.assertEqual(srv.proc.returncode, 0)

    # -- serve --dev -----------------------------------------------------------------------------
    def start_dev(self, cwd):
        """Starts `serve --dev` in cwd; returns (process, log text function, credentials).

        `serve --dev` has fixed ports (2587, 2465). Another build's suite (plain and ASan run
        side by side in CI) may hold them right now: wait, bounded, until they are free, and
        if the other suite grabbed them between our check and our bind, wait and try again."""
        log = os.path.join(cwd, "dev.log")
        self.dev_log = log

        def text():
            with open(log, "rb") as f:
                return f.read().decode(errors="replace")

        give_up = time.monotonic() + harness.scale(120)
        while True:
            busy = harness.wait_ports_free(DEV_PORTS, timeout=max(0, give_up - time.monotonic()))
            self.assertEqual(busy, [], f"ports {busy} stayed busy; cannot run serve --dev")
            with open(log, "wb") as errf:
                proc = subprocess.Popen([harness.BIN, "serve", "--dev"], cwd=cwd,
                                        stdin=subprocess.DEVNULL, stdout=errf,
                                        stderr=subprocess.STDOUT)
            harness._register_proc(proc)
            self.addCleanup(lambda p=proc: p.poll() is None and (p.kill(), p.wait(10)))
            deadline = time.monotonic() + harness.scale(30)
            while True:
                t = text()
                cred = re.search(r"dev credentials: username=(\S+) password=(\S+)", t)
                listening = set(harness.LISTENING_RE.findall(t))
                if cred and ("127.0.0.1:2587", "starttls") in listening \
                        and ("127.0.0.1:2465", "implicit") in listening:
                    return proc, text, cred
                if proc.poll() is not None:
                    break
                self.assertLess(time.monotonic(), deadline, f"serve --dev not ready:\n{t}")
                time.sleep(0.05)
            t = text()
            raced = re.search(r"in use|EADDRINUSE", t, re.I)
            self.assertTrue(raced and time.monotonic() < give_up,
                            f"serve --dev exited {proc.returncode}:\n{t}")
            time.sleep(1)

    def test_serve_dev(self):
        cwd = harness.make_tmpdir("subrelay-dev-")
        proc, text, cred = self.start_dev(cwd)
        user, password = cred.group(1), cred.group(2)
        self.assertEqual(user, "dev")
        cert = os.path.join(cwd, "subrelay-dev", "tls", "cert.pem")
        self.assertTrue(os.path.isfile(cert), "no ./subrelay-dev/tls/cert.pem")
        ctx = ssl.create_default_context(cafile=cert)

        qids = []
        for port, mode, host in ((2587, "starttls", "127.0.0.1"), (2465, "implicit", "localhost")):
            with self.subTest(mode=mode):
                if mode == "starttls":
                    conn = smtplib.SMTP(host, port, timeout=harness.scale(10))
                    conn.starttls(context=ctx)
                else:
                    conn = smtplib.SMTP_SSL(host, port, context=ctx, timeout=harness.scale(10))
                with conn:
                    self.assertEqual(conn.login(user, password)[0], 235)
                    msg = make_message("app@localhost", ["someone@example.net"],
                                       f"dev {token()}")
                    qid = submit(conn, "app@localhost", ["someone@example.net"], msg)
                    qids.append((qid, msg))
                    with self.assertRaises(smtplib.SMTPAuthenticationError):
                        conn2 = smtplib.SMTP_SSL("127.0.0.1", 2465, context=ctx,
                                                 timeout=harness.scale(10))
                        with conn2:
                            conn2.login(user, password + "x")
        for qid, _ in qids:
            self.assertRegex(text(), rf"accepted.*{qid}")
        # The queue, read through a config that names the dev data directory.
        srv = harness.Server(accounts=[WEBSHOP], listeners=("starttls",))
        srv.data_dir = os.path.join(cwd, "subrelay-dev")
        srv.write_config()
        entries = {e["id"]: e for e in srv.queue_list()}
        for qid, msg in qids:
            self.assertIn(qid, entries)
            self.assertTrue(entries[qid]["captured"])
            self.assertEqual(entries[qid]["account"], "dev")
            self.assertEqual([r["state"] for r in entries[qid]["recipients"]], ["captured"])
            check_stored(self, srv.queue_raw(qid), msg, account="dev", tls_version="TLSv1.")
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(timeout=harness.scale(30)), 0, text())
        reports = [l for l in text().splitlines() if harness.Server.SANITIZER_RE.search(l)]
        self.assertEqual(reports, [], text())


if __name__ == "__main__":
    harness.main()
