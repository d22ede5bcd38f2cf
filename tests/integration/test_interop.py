"""Interoperability and operations, against the real binary:

  I10  SMTPUTF8 is recorded from the bytes (a non-ASCII address or header), not from the MAIL
       parameter alone: raw sessions, and Go's net/smtp (which adds SMTPUTF8 by itself);
  I11  a second `serve` on a listener address already in use exits 1 instead of sharing it;
  I12  MAIL FROM:<> only for accounts with allow_null_sender, whose From is still checked;
  I13  internationalised sender domains: U-labels and A-labels are the same domain;
  I14  file permissions under umask 000, a TLS client rejecting our certificate is logged as
       such, a full disk gives 452 4.3.1 and the server recovers.
"""

import copy
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time

import harness
from harness import (Account, RawClient, ServerTestCase, dot_stuff, make_message, scale, subrelay,
                     token)

WEBSHOP = Account("webshop", "correct horse battery staple", ["@shop.test"])
CI = Account("ci", "ci-secret-Passw0rd", ["@ci.test"])

IDN_U = "exämple.com"
IDN_A = "xn--exmple-cua.com"
assert IDN_U.encode("idna").decode() == IDN_A

DEV_PORTS = (2587, 2465)


class Acct(Account):
    """An Account with the accounts[].allow_null_sender key (left out when None)."""

    def __init__(self, *args, allow_null_sender=None, **kw):
        super().__init__(*args, **kw)
        self.allow_null_sender = allow_null_sender

    def to_json(self):
        j = super().to_json()
        if self.allow_null_sender is not None:
            j["allow_null_sender"] = self.allow_null_sender
        return j


def out_of(proc):
    return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


def session(srv, account, mode="implicit"):
    c = RawClient(srv.port(mode), implicit_tls=(mode == "implicit"))
    c.login(mode, account)
    return c


def mode_of(path):
    return oct(os.stat(path).st_mode & 0o777)


GO_CLIENT = r'''
// A tiny net/smtp client for subrelay's interop test: STARTTLS (verified against the test
// CA), AUTH PLAIN, one message read from a file.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/smtp"
	"os"
)

func fail(step string, err error) {
	fmt.Fprintf(os.Stderr, "%s: %v\n", step, err)
	os.Exit(1)
}

func main() {
	if len(os.Args) != 8 {
		fmt.Fprintln(os.Stderr, "usage: smtpclient ADDR CAFILE USER PASS FROM TO MSGFILE")
		os.Exit(2)
	}
	addr, caFile, user, pass := os.Args[1], os.Args[2], os.Args[3], os.Args[4]
	from, to, msgFile := os.Args[5], os.Args[6], os.Args[7]
	ca, err := os.ReadFile(caFile)
	if err != nil {
		fail("read CA", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		fail("CA", fmt.Errorf("no certificate in %s", caFile))
	}
	msg, err := os.ReadFile(msgFile)
	if err != nil {
		fail("read message", err)
	}
	c, err := smtp.Dial(addr)
	if err != nil {
		fail("dial", err)
	}
	if err := c.Hello("go.subrelay.test"); err != nil {
		fail("EHLO", err)
	}
	if err := c.StartTLS(&tls.Config{ServerName: "127.0.0.1", RootCAs: pool}); err != nil {
		fail("STARTTLS", err)
	}
	if ok, _ := c.Extension("SMTPUTF8"); !ok {
		fail("EHLO", fmt.Errorf("SMTPUTF8 not offered"))
	}
	if err := c.Auth(smtp.PlainAuth("", user, pass, "127.0.0.1")); err != nil {
		fail("AUTH", err)
	}
	if err := c.Mail(from); err != nil { // adds SMTPUTF8: the server offered it
		fail("MAIL", err)
	}
	if err := c.Rcpt(to); err != nil {
		fail("RCPT", err)
	}
	w, err := c.Data()
	if err != nil {
		fail("DATA", err)
	}
	if _, err := w.Write(msg); err != nil {
		fail("DATA write", err)
	}
	if err := w.Close(); err != nil {
		fail("end of DATA", err)
	}
	if err := c.Quit(); err != nil {
		fail("QUIT", err)
	}
	fmt.Println("sent")
}
'''


class Interop(ServerTestCase):
    # -- I10: SMTPUTF8 from the bytes ------------------------------------------------------------
    def smtputf8_of(self, srv, qid):
        shown = srv.queue_show_json(qid)
        self.assertIn("smtputf8", shown)
        return shown["smtputf8"]

    def test_smtputf8_recorded_from_the_content(self):
        srv = self.start_server(accounts=[WEBSHOP])
        cases = [
            ("all ASCII", "MAIL FROM:<a@shop.test> SMTPUTF8", "bob@example.net",
             f"plain ascii {token()}", False),
            ("UTF-8 Subject", "MAIL FROM:<a@shop.test> SMTPUTF8", "bob@example.net",
             f"Grüße {token()}", True),
            ("UTF-8 recipient", "MAIL FROM:<a@shop.test> SMTPUTF8", "jörg@例子.test",
             f"ascii to utf8 {token()}", True),
            ("no SMTPUTF8 parameter", "MAIL FROM:<a@shop.test>", "bob@example.net",
             f"no param {token()}", False),
        ]
        with session(srv, WEBSHOP) as c:
            for name, mail, rcpt, subject, want in cases:
                with self.subTest(case=name):
                    msg = make_message("a@shop.test", [rcpt], subject)
                    c.expect(mail.encode(), 250)
                    c.expect(f"RCPT TO:<{rcpt}>".encode(), 250)
                    code, lines = c.data(dot_stuff(msg))
                    qid = harness.queued_id(lines[0])
                    self.assertEqual(self.smtputf8_of(srv, qid), want,
                                     f"{name}: smtputf8 of {qid} ({mail!r}, RCPT {rcpt!r})")

    def build_go_client(self):
        if shutil.which("go") is None:
            return None
        d = harness.make_tmpdir("subrelay-go-")
        src = os.path.join(d, "src")
        os.makedirs(src)
        with open(os.path.join(src, "main.go"), "w") as f:
            f.write(GO_CLIENT)
        with open(os.path.join(src, "go.mod"), "w") as f:
            f.write("module smtpclient\n\ngo 1.19\n")
        env = dict(os.environ, GOCACHE=os.path.join(d, "cache"), GOPATH=os.path.join(d, "gopath"),
                   HOME=os.path.join(d, "home"), GOFLAGS="-mod=mod", GOPROXY="off",
                   CGO_ENABLED="0", GOTOOLCHAIN="local")
        exe = os.path.join(d, "smtpclient")
        proc = harness.run(["go", "build", "-o", exe, "."], cwd=src, env=env, timeout=180)
        if proc.returncode != 0:
            self.fail(f"go build failed: {out_of(proc)}")
        return exe

    def test_smtputf8_go_net_smtp(self):
        exe = self.build_go_client()
        if exe is None:
            sys.stderr.write("\n*** test_smtputf8_go_net_smtp: `go` is not installed (Debian "
                             "package golang-go, in scripts/lib/deps.sh TEST_PACKAGES); the Go "
                             "net/smtp case did NOT run, only the raw-session case did ***\n")
            self.skipTest("go (golang-go) not installed: Go net/smtp case not run")
        srv = self.start_server(accounts=[WEBSHOP])
        tok = token("go")
        msg = make_message("app@shop.test", ["bob@example.net"], f"go ascii {tok}")
        path = os.path.join(srv.workdir, "go-msg.eml")
        with open(path, "wb") as f:
            f.write(msg)
        proc = harness.run([exe, f"127.0.0.1:{srv.port('starttls')}", harness.pki().ca,
                            WEBSHOP.username, WEBSHOP.password, "app@shop.test",
                            "bob@example.net", path], timeout=60)
        self.assertEqual(proc.returncode, 0, out_of(proc))
        qids = [q for q in srv.queue_ids() if tok.encode() in srv.queue_raw(q)]
        self.assertEqual(len(qids), 1, srv.queue_ids())
        self.assertIs(self.smtputf8_of(srv, qids[0]), False,
                      "an all-ASCII message from Go's net/smtp (MAIL ... SMTPUTF8) was recorded "
                      "as SMTPUTF8")

    # -- I11: a listener address in use ----------------------------------------------------------
    def test_second_serve_on_same_address_exits(self):
        srv = self.start_server(accounts=[WEBSHOP], listeners=("starttls",))
        port = srv.port("starttls")
        other = copy.deepcopy(srv.config())
        other["data_dir"] = os.path.join(srv.workdir, "data-second")
        path = os.path.join(srv.workdir, "second.json")
        with open(path, "w") as f:
            json.dump(other, f)
        errpath = os.path.join(srv.workdir, "second.stderr")
        with open(errpath, "wb") as errf:
            proc = subprocess.Popen([harness.BIN, "serve", "-c", path], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=errf, cwd=srv.workdir)
        harness._register_proc(proc)
        try:
            rc = proc.wait(timeout=scale(10))
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        with open(errpath, "rb") as f:
            err = f.read().decode(errors="replace")
        self.assertIsNotNone(rc, f"a second serve on 127.0.0.1:{port} (another data_dir) was "
                                 f"still running after {scale(10):.0f}s; its stderr:\n{err}")
        self.assertEqual(rc, 1, err)
        self.assertIn(f"127.0.0.1:{port}", err)
        self.assertIn("in use", err)
        # The first one keeps serving, every connection.
        qids = []
        for _ in range(4):
            conn = harness.smtp_starttls(port)
            conn.login(WEBSHOP.username, WEBSHOP.password)
            qids.append(harness.submit(conn, "app@shop.test", ["bob@example.net"],
                                       make_message("app@shop.test", ["bob@example.net"],
                                                    f"first {token()}")))
            conn.quit()
        self.assertEqual(sorted(srv.queue_ids()), sorted(qids))

    # -- I12: null sender ------------------------------------------------------------------------
    def test_null_sender_refused_by_default(self):
        srv = self.start_server(accounts=[WEBSHOP])
        with session(srv, WEBSHOP) as c:
            code, lines = c.cmd("MAIL FROM:<>")
            self.assertEqual(code, 550, lines)
            self.assertEqual(lines[0], "5.7.1 Null sender <> not allowed for this account "
                                       "(accounts[].allow_null_sender)")
            c.expect("MAIL FROM:<orders@shop.test>", 250)

    def test_null_sender_allowed_with_allow_null_sender(self):
        bouncer = Acct("bouncer", "bouncer-Passw0rd", ["@shop.test"], allow_null_sender=True)
        srv = self.start_server(accounts=[bouncer, CI])
        with session(srv, bouncer) as c:
            tok = token("null")
            c.expect("MAIL FROM:<>", 250)
            c.expect("RCPT TO:<bob@example.net>", 250)
            code, lines = c.data(dot_stuff(make_message(
                "mailer-daemon@shop.test", ["bob@example.net"], f"bounce {tok}")))
            qid = harness.queued_id(lines[0])
            self.assertEqual(srv.queue_entry(qid)["sender"], "")
            # The header From is still checked.
            tok2 = token("nullforeign")
            c.expect("MAIL FROM:<>", 250)
            c.expect("RCPT TO:<bob@example.net>", 250)
            code, lines = c.data(dot_stuff(make_message(
                "ceo@bank.test", ["bob@example.net"], f"foreign {tok2}")), expect=None)
            self.assertEqual(code, 550, lines)
            self.assertTrue(lines[0].startswith("5.7.1 "), lines)
            self.assertFalse([q for q in srv.queue_ids() if tok2.encode() in srv.queue_raw(q)])
        # Other accounts on the same server: still refused.
        with session(srv, CI) as c:
            code, lines = c.cmd("MAIL FROM:<>")
            self.assertEqual(code, 550, lines)
            self.assertTrue(lines[0].startswith("5.7.1 Null sender"), lines)

    def check_config(self, accounts):
        srv = harness.Server(accounts=accounts)
        path = srv.write_config()
        return path, subrelay("check-config", "-c", path)

    def test_check_config_allow_null_sender(self):
        path, proc = self.check_config([Acct("b", "b-Passw0rd", ["@shop.test"],
                                             allow_null_sender=True)])
        self.assertEqual((proc.returncode, proc.stdout.strip()), (0, b"ok"), out_of(proc))
        path, proc = self.check_config([Acct("b", "b-Passw0rd", ["@shop.test"],
                                             allow_null_sender=False)])
        self.assertEqual((proc.returncode, proc.stdout.strip()), (0, b"ok"), out_of(proc))
        path, proc = self.check_config([Acct("b", "b-Passw0rd", ["@shop.test"],
                                             allow_null_sender="yes")])
        text = out_of(proc)
        self.assertEqual(proc.returncode, 1, text)
        self.assertRegex(text, re.escape(path) + r": accounts\[0\]\.allow_null_sender: \S")

    # -- I13: IDN --------------------------------------------------------------------------------
    def test_idn_sender_domain_in_u_label_form(self):
        acct = Account("idn", "idn-Passw0rd", ["@" + IDN_U])
        path, proc = self.check_config([acct])
        self.assertEqual((proc.returncode, proc.stdout.strip()), (0, b"ok"), out_of(proc))
        srv = self.start_server(accounts=[acct])
        with session(srv, acct) as c:
            c.expect(f"MAIL FROM:<a@{IDN_A}>", 250)
            c.expect("RSET", 250)
            c.expect(f"MAIL FROM:<a@{IDN_U}> SMTPUTF8".encode(), 250)
            c.expect("RCPT TO:<bob@example.net>", 250)
            code, lines = c.data(dot_stuff(make_message(f"a@{IDN_U}", ["bob@example.net"],
                                                        f"idn {token()}")))
            self.assertEqual(code, 250, lines)
            code, lines = c.cmd("MAIL FROM:<a@exämple.org> SMTPUTF8".encode())
            self.assertEqual(code, 553, lines)
            self.assertTrue(lines[0].startswith("5.7.1 "), lines)

    def test_idn_sender_domain_in_a_label_form(self):
        acct = Account("idn", "idn-Passw0rd", ["@" + IDN_A])
        srv = self.start_server(accounts=[acct])
        with session(srv, acct) as c:
            c.expect(f"MAIL FROM:<a@{IDN_U}> SMTPUTF8".encode(), 250)
            c.expect("RCPT TO:<bob@example.net>", 250)
            code, lines = c.data(dot_stuff(make_message(f"a@{IDN_U}", ["bob@example.net"],
                                                        f"idn upper {token()}",
                                                        header_from="a@EXÄMPLE.com")))
            self.assertEqual(code, 250, lines)
            c.expect(f"MAIL FROM:<a@{IDN_A}>", 250)
            c.expect("RSET", 250)
            code, lines = c.cmd("MAIL FROM:<a@exämple.org> SMTPUTF8".encode())
            self.assertEqual(code, 553, lines)
            self.assertTrue(lines[0].startswith("5.7.1 "), lines)

    def test_check_config_refuses_invalid_punycode(self):
        path, proc = self.check_config([Account("idn", "idn-Passw0rd", ["@xn--a.com"])])
        text = out_of(proc)
        self.assertEqual(proc.returncode, 1, text)
        self.assertRegex(text, re.escape(path) + r": accounts\[0\]\.senders\[0\]: \S")

    # -- I14: permissions, certificate rejection, full disk --------------------------------------
    def test_permissions_under_umask_000(self):
        # Certificates, password hashes and the config file are made first, with the usual
        # umask: only serve itself runs under umask 000.
        srv = harness.Server(accounts=[WEBSHOP])
        srv.write_config()
        self.test_servers.append(srv)
        self.addCleanup(self._finish_server, srv)
        old = os.umask(0)
        try:
            srv.start()
        finally:
            os.umask(old)
        conn = harness.smtp_ssl(srv.port("implicit"))
        conn.login(WEBSHOP.username, WEBSHOP.password)
        harness.submit(conn, "app@shop.test", ["bob@example.net"],
                       make_message("app@shop.test", ["bob@example.net"], f"perm {token()}"))
        conn.quit()
        self.assertEqual(mode_of(srv.data_dir), "0o700", "data_dir")
        db = os.path.join(srv.data_dir, "queue.db")
        self.assertEqual(mode_of(db), "0o600", "queue.db")
        for extra in ("queue.db-wal", "queue.db-shm"):
            p = os.path.join(srv.data_dir, extra)
            if os.path.exists(p):
                self.assertEqual(mode_of(p), "0o600", extra)

    def test_dev_permissions_under_umask_000(self):
        cwd = harness.make_tmpdir("subrelay-devperm-")
        log = os.path.join(cwd, "dev.log")
        self.dev_log = log

        def text():
            with open(log, "rb") as f:
                return f.read().decode(errors="replace")

        give_up = time.monotonic() + scale(120)
        while True:
            busy = harness.wait_ports_free(DEV_PORTS, timeout=max(0, give_up - time.monotonic()))
            self.assertEqual(busy, [], f"ports {busy} stayed busy; cannot run serve --dev")
            with open(log, "wb") as errf:
                proc = subprocess.Popen([harness.BIN, "serve", "--dev"], cwd=cwd,
                                        stdin=subprocess.DEVNULL, stdout=errf,
                                        stderr=subprocess.STDOUT, preexec_fn=lambda: os.umask(0))
            harness._register_proc(proc)
            self.addCleanup(lambda p=proc: p.poll() is None and (p.kill(), p.wait(10)))
            deadline = time.monotonic() + scale(30)
            ready = False
            while proc.poll() is None and time.monotonic() < deadline:
                if len(set(harness.LISTENING_RE.findall(text()))) >= 2:
                    ready = True
                    break
                time.sleep(0.05)
            if ready:
                break
            self.assertTrue(re.search(r"in use|EADDRINUSE", text(), re.I)
                            and time.monotonic() < give_up,
                            f"serve --dev not ready (exit {proc.poll()}):\n{text()}")
            time.sleep(1)
        dev = os.path.join(cwd, "subrelay-dev")
        key = os.path.join(dev, "tls", "key.pem")
        try:
            self.assertEqual(mode_of(dev), "0o700", "./subrelay-dev")
            self.assertTrue(os.path.isfile(key), f"no {key}")
            self.assertEqual(mode_of(key), "0o600", "./subrelay-dev/tls/key.pem")
        finally:
            proc.send_signal(signal.SIGTERM)
            self.assertEqual(proc.wait(timeout=scale(30)), 0, text())

    def test_client_rejecting_our_certificate_is_logged(self):
        srv = self.start_server(accounts=[WEBSHOP])
        needle = "client rejected our certificate"
        cases = [("implicit, TLS 1.3 (default)", "implicit", None),
                 ("implicit, TLS 1.2", "implicit", ssl.TLSVersion.TLSv1_2),
                 ("STARTTLS, TLS 1.3 (default)", "starttls", None)]
        for name, mode, maxver in cases:
            with self.subTest(case=name):
                before = srv.log_text().count(needle)
                ctx = ssl.create_default_context()  # system CAs only: our test CA is unknown
                if maxver is not None:
                    ctx.maximum_version = maxver
                with self.assertRaises(ssl.SSLCertVerificationError):
                    if mode == "implicit":
                        RawClient(srv.port("implicit"), implicit_tls=True, ctx=ctx)
                    else:
                        with RawClient(srv.port("starttls")) as c:
                            c.ehlo()
                            c.starttls(ctx=ctx)
                deadline = time.monotonic() + scale(5)
                while srv.log_text().count(needle) <= before:
                    if time.monotonic() > deadline:
                        tail = [l for l in srv.log_text().splitlines() if "TLS" in l][-1:]
                        self.fail(f"no log line with {needle!r} for a client that refused our "
                                  f"certificate ({name}); last TLS log line: {tail}")
                    time.sleep(0.05)

    def test_full_disk(self):
        mnt = harness.make_tmpdir("subrelay-tmpfs-")
        proc = harness.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", mnt])
        self.assertEqual(proc.returncode, 0, f"cannot mount a tmpfs (need root): {out_of(proc)}")

        def unmount():
            harness.run(["umount", "-l", mnt])
        self.addCleanup(unmount)  # runs after the server's own clean-up (LIFO)
        srv = harness.Server(accounts=[WEBSHOP])
        srv.data_dir = os.path.join(mnt, "data")
        self.test_servers.append(srv)
        self.addCleanup(self._finish_server, srv)
        srv.start()
        # A first message so the queue and its WAL exist.
        with session(srv, WEBSHOP) as c:
            c.expect("MAIL FROM:<app@shop.test>", 250)
            c.expect("RCPT TO:<bob@example.net>", 250)
            c.data(dot_stuff(make_message("app@shop.test", ["bob@example.net"], "first")))
        filler = os.path.join(mnt, "filler")

        def free():
            st = os.statvfs(mnt)
            return st.f_bavail * st.f_frsize

        with open(filler, "wb") as f:
            while free() > 1_300_000:
                f.write(b"\0" * (1 << 20))
                f.flush()
            while free() > 200_000:
                f.write(b"\0" * 16384)
                f.flush()
        self.assertLess(free(), 220_000)
        tok = token("full")
        big = make_message("app@shop.test", ["bob@example.net"], f"big {tok}",
                           body=("0123456789" * 7 + "\r\n") * 14000)
        self.assertGreater(len(big), 1_000_000)
        with session(srv, WEBSHOP) as c:
            code, lines = c.cmd("MAIL FROM:<app@shop.test>")
            if code == 250:
                c.expect("RCPT TO:<bob@example.net>", 250)
                code, lines = c.data(dot_stuff(big), expect=None)
            self.assertEqual(code, 452, f"a 1 MB message with 200 KB free: {code} {lines}")
            self.assertTrue(lines[0].startswith("4.3.1 Insufficient system storage"), lines)
        self.assertTrue(srv.alive(), "serve died on a full disk")
        os.unlink(filler)
        # A 452 asks the client to come back later; the server may look at the free space
        # again only every second or so: a client retrying 2 s later gets through.
        time.sleep(2)
        with session(srv, WEBSHOP) as c:
            c.expect("MAIL FROM:<app@shop.test>", 250)
            c.expect("RCPT TO:<bob@example.net>", 250)
            code, lines = c.data(dot_stuff(big))
            self.assertEqual(code, 250, lines)
        self.assertTrue(srv.alive())


if __name__ == "__main__":
    harness.main()
