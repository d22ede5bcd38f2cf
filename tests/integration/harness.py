"""Shared pieces of subrelay's integration tests (tests/integration/test_*.py).

Each test file is run by meson with SUBRELAY_BIN set to the binary under test, by Debian's
/usr/bin/python3 (the interpreter that has python3-aiosmtpd/aiosmtplib/dkim). Only the standard
library is used here.

What lives here:
  * Pki: a throw-away CA and a server certificate for localhost/127.0.0.1, made with `openssl`.
  * hash_password(): through `subrelay hash-password`, as a user would.
  * Server: writes a config with listeners on free 127.0.0.1 ports, runs `subrelay serve`,
    waits for its `listening on` lines, keeps its stderr in a file (printed when a test fails),
    reads the queue through `subrelay queue list --json` / `queue show --raw`.
  * RawClient: an SMTP client over a plain or TLS socket that sends exactly the bytes given
    (for smuggling, pipelining and bad-input tests), and helpers around smtplib.
  * check_stored(): the stored message equals what the client sent, plus the trace header and
    the Message-ID/Date that submission adds (RFC 6409 section 8).
  * main(): unittest.main() whose result prints the server logs of a failing test and whose
    exit status is non-zero on any failure.

Every wait here is bounded; scale() stretches the bounds for sanitizer builds (about 3x slower).
Everything listens on and connects to 127.0.0.1 only.
"""

import atexit
import base64
import email.utils
import json
import os
import random
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
LOOPBACK = "127.0.0.1"


# --------------------------------------------------------------------------------------------
# The binary and how slow it is
# --------------------------------------------------------------------------------------------

def _find_binary():
    path = os.environ.get("SUBRELAY_BIN")
    if not path:
        sys.stderr.write("SUBRELAY_BIN is not set: run through `meson test --suite integration` "
                         "or set it to the path of the subrelay binary\n")
        sys.exit(1)
    if not os.access(path, os.X_OK):
        sys.stderr.write(f"SUBRELAY_BIN={path} is not an executable file\n")
        sys.exit(1)
    return os.path.abspath(path)


BIN = _find_binary()


def _detect_scale():
    """Timeout multiplier: SUBRELAY_TIMEOUT_SCALE, else 3 for a sanitizer build, else 1."""
    env = os.environ.get("SUBRELAY_TIMEOUT_SCALE")
    if env:
        return max(1.0, float(env))
    try:
        with open(BIN, "rb") as f:
            data = f.read()
        if b"__asan_init" in data or b"__ubsan_handle" in data or b"__tsan_init" in data:
            return 3.0
    except OSError:
        pass
    return 1.0


SCALE = _detect_scale()


def rss_test_env():
    """Environment for a server whose RSS a test bounds: under ASan, freed memory waits in a
    quarantine (256 MB by default) before it is reused, which would count as growth; a small
    quarantine keeps RSS close to what is really live (use-after-free is still caught within
    it). Nothing changes for a build without sanitizers."""
    opts = os.environ.get("ASAN_OPTIONS", "")
    return {"ASAN_OPTIONS": (opts + ":" if opts else "") + "quarantine_size_mb=4:thread_local_quarantine_size_kb=64"}


def scale(seconds):
    return seconds * SCALE


# --------------------------------------------------------------------------------------------
# Temporary directories, processes and clean-up
# --------------------------------------------------------------------------------------------

_tmpdirs = []
_live_procs = []
_procs_lock = threading.Lock()


def make_tmpdir(prefix="subrelay-it-"):
    path = tempfile.mkdtemp(prefix=prefix)
    _tmpdirs.append(path)
    return path


def _register_proc(proc):
    with _procs_lock:
        _live_procs.append(proc)


def _kill_all():
    with _procs_lock:
        procs = list(_live_procs)
    for proc in procs:
        if proc.poll() is None:
            try:
                proc.kill()
                proc.wait(timeout=10)
            except Exception:
                pass


atexit.register(_kill_all)


def _on_signal(signum, _frame):
    _kill_all()
    sys.exit(128 + signum)


signal.signal(signal.SIGTERM, _on_signal)


def run(argv, input=None, timeout=30, cwd=None, env=None, check=False):
    """subprocess.run with a bounded, scaled timeout; bytes in, bytes out."""
    if isinstance(input, str):
        input = input.encode()
    proc = subprocess.run(argv, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=scale(timeout), cwd=cwd, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv!r} exited {proc.returncode}\nstdout: {proc.stdout!r}\n"
                             f"stderr: {proc.stderr.decode(errors='replace')}")
    return proc


def subrelay(*args, input=None, timeout=30, cwd=None):
    return run([BIN, *args], input=input, timeout=timeout, cwd=cwd)


# --------------------------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------------------------

def free_port(kind=socket.SOCK_STREAM):
    """A port on 127.0.0.1 that was free a moment ago (the kernel's choice, so parallel runs of
    the suite rarely collide; Server.start retries with new ports if a bind fails anyway)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def free_ports(n, exclude=()):
    """n distinct ports from free_port(), none of them in exclude (the kernel may hand out
    a port it just gave us again once the probing socket is closed)."""
    out = []
    while len(out) < n:
        p = free_port()
        if p not in out and p not in exclude:
            out.append(p)
    return out


def port_is_free(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def wait_ports_free(ports, timeout):
    deadline = time.monotonic() + timeout
    while True:
        busy = [p for p in ports if not port_is_free(p)]
        if not busy:
            return []
        if time.monotonic() > deadline:
            return busy
        time.sleep(0.5)


# --------------------------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------------------------

class Pki:
    """A test CA and a server certificate for DNS:localhost, IP:127.0.0.1, IP:::1 (ECDSA P-256),
    made with the openssl CLI."""

    def __init__(self, directory):
        self.dir = directory
        self.ca_key = os.path.join(directory, "ca.key")
        self.ca = os.path.join(directory, "ca.pem")
        self.key = os.path.join(directory, "key.pem")
        self.cert = os.path.join(directory, "cert.pem")
        csr = os.path.join(directory, "server.csr")
        ext = os.path.join(directory, "server.ext")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        run(["openssl", "req", "-x509", "-new", *ec, "-keyout", self.ca_key, "-out", self.ca,
             "-days", "3", "-subj", "/O=subrelay tests/CN=subrelay integration test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"], check=True)
        run(["openssl", "req", "-new", *ec, "-keyout", self.key, "-out", csr,
             "-subj", "/O=subrelay tests/CN=localhost"], check=True)
        with open(ext, "w") as f:
            f.write("basicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature,keyEncipherment\n"
                    "extendedKeyUsage=serverAuth\n"
                    "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n"
                    "subjectKeyIdentifier=hash\n"
                    "authorityKeyIdentifier=keyid,issuer\n")
        run(["openssl", "x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", self.ca_key,
             "-set_serial", str(random.randrange(1, 2**62)), "-days", "3", "-out", self.cert,
             "-extfile", ext], check=True)

    def client_context(self):
        """Verifies the server against the test CA only, hostname checked (127.0.0.1 is an IP
        SAN of the certificate)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


_pki = None


def pki():
    """One Pki per test process."""
    global _pki
    if _pki is None:
        _pki = Pki(make_tmpdir("subrelay-pki-"))
    return _pki


def client_context():
    return pki().client_context()


# --------------------------------------------------------------------------------------------
# Passwords, accounts, configuration
# --------------------------------------------------------------------------------------------

_hash_cache = {}


def hash_password(password):
    if password not in _hash_cache:
        proc = subrelay("hash-password", input=password + "\n")
        out = proc.stdout.decode(errors="replace").strip()
        if proc.returncode != 0 or not out.startswith("$scrypt$"):
            raise AssertionError(f"subrelay hash-password failed: exit {proc.returncode}, "
                                 f"stdout {proc.stdout!r}, stderr {proc.stderr!r}")
        _hash_cache[password] = out
    return _hash_cache[password]


class Account:
    def __init__(self, username, password, senders, mode="capture", rate_limits=None, extra=None):
        self.username = username
        self.password = password
        self.senders = list(senders)
        self.mode = mode
        self.rate_limits = rate_limits
        self.extra = dict(extra or {})  # more accounts[] keys, e.g. {"relay": [...]}

    def to_json(self):
        j = {"username": self.username, "password_hash": hash_password(self.password),
             "senders": self.senders, "mode": self.mode}
        if self.rate_limits:
            j["rate_limits"] = dict(self.rate_limits)
        j.update(self.extra)
        return j


def default_accounts():
    return [
        Account("webshop", "correct horse battery staple", ["@shop.test", "alerts@example.test"]),
        Account("ci", "ci-secret-Passw0rd", ["@ci.test"]),
    ]


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------

LISTENING_RE = re.compile(r"listening on (\S+) \((\w+)\)")


class ServerError(AssertionError):
    pass


class Server:
    """One `subrelay serve -c CONFIG`, restartable on the same data_dir.

    listeners: TLS modes ("starttls", "implicit", "none"), each on its own free port.
    """

    all_servers = []

    def __init__(self, workdir=None, accounts=None, listeners=("starttls", "implicit"),
                 limits=None, hostname="relay.subrelay.test", extra_config=None, name="serve",
                 env=None):
        self.workdir = workdir or make_tmpdir()
        self.env = env  # extra environment for the server process
        self.name = name
        self.accounts = accounts if accounts is not None else default_accounts()
        self.listener_modes = list(listeners)
        self.limits = limits
        self.hostname = hostname
        self.extra_config = extra_config or {}
        self.data_dir = os.path.join(self.workdir, "data")
        self.config_path = os.path.join(self.workdir, "config.json")
        self.ports = []
        self.proc = None
        self.logs = []  # one stderr file per start
        self.dead_dns_port = free_port(socket.SOCK_DGRAM)
        self.dead_smtp_port = free_port()
        Server.all_servers.append(self)

    # -- configuration ---------------------------------------------------------------------
    def config(self):
        cfg = {
            "hostname": self.hostname,
            "data_dir": self.data_dir,
            "tls": {"certificate": pki().cert, "private_key": pki().key},
            "listeners": [{"address": f"{LOOPBACK}:{port}", "tls": mode}
                          for port, mode in zip(self.ports, self.listener_modes)],
            "accounts": [a.to_json() for a in self.accounts],
            # Nothing may leave the machine: deliver-mode accounts would resolve MX hosts, so
            # point the resolver and the SMTP port at closed ports on loopback.
            "delivery": {"resolvers": [f"{LOOPBACK}:{self.dead_dns_port}"],
                         "port": self.dead_smtp_port},
        }
        if self.limits is not None:
            cfg["limits"] = dict(self.limits)
        cfg.update(self.extra_config)
        return cfg

    def write_config(self):
        if not self.ports:
            self.ports = free_ports(len(self.listener_modes), exclude=(self.dead_smtp_port,))
        with open(self.config_path, "w") as f:
            json.dump(self.config(), f, indent=2)
        return self.config_path

    def port(self, mode="starttls"):
        return self.ports[self.listener_modes.index(mode)]

    # -- process ---------------------------------------------------------------------------
    @property
    def log_path(self):
        return self.logs[-1]

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except (OSError, IndexError):
            return ""

    def start(self, timeout=20):
        for attempt in range(3):
            self.write_config()
            log = os.path.join(self.workdir, f"{self.name}-{len(self.logs) + 1}.log")
            self.logs.append(log)
            with open(log, "wb") as errf:
                self.proc = subprocess.Popen([BIN, "serve", "-c", self.config_path],
                                             stdin=subprocess.DEVNULL, stdout=errf,
                                             stderr=subprocess.STDOUT, cwd=self.workdir,
                                             env=dict(os.environ, **self.env) if self.env else None)
            _register_proc(self.proc)
            try:
                self._wait_ready(timeout)
                return self
            except ServerError:
                text = self.log_text()
                if self.proc.poll() is not None and re.search(r"in use|EADDRINUSE", text, re.I) \
                        and attempt < 2:
                    self.ports = []  # somebody else took a port: pick new ones
                    continue
                self.kill()
                raise

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + scale(timeout)
        want = {f"{LOOPBACK}:{p}": m for p, m in zip(self.ports, self.listener_modes)}
        while True:
            seen = {}
            for m in LISTENING_RE.finditer(self.log_text()):
                seen[m.group(1)] = m.group(2)
            if all(addr in seen for addr in want):
                for addr, mode in want.items():
                    if seen[addr] != mode:
                        raise ServerError(f"listener {addr} reported tls mode {seen[addr]!r}, "
                                          f"configured {mode!r}\n{self.log_text()}")
                return
            if self.proc.poll() is not None:
                raise ServerError(f"subrelay serve exited {self.proc.returncode} before it was "
                                  f"ready; log:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise ServerError(f"subrelay serve not ready after {scale(timeout):.0f}s "
                                  f"(waiting for 'listening on' for {sorted(want)}); log:\n"
                                  f"{self.log_text()}")
            time.sleep(0.02)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=40):
        """SIGTERM and wait; returns the exit status (SIGKILL after the timeout, then raises)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=scale(timeout))
            except subprocess.TimeoutExpired:
                self.kill()
                raise ServerError(f"subrelay serve did not exit within {scale(timeout):.0f}s "
                                  f"of SIGTERM")
        return self.proc.returncode

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def wait_log(self, pattern, timeout=10):
        deadline = time.monotonic() + scale(timeout)
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.log_text())
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"log line /{pattern}/ not seen within "
                                     f"{scale(timeout):.0f}s")
            time.sleep(0.02)

    SANITIZER_RE = re.compile(r"ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:|"
                              r"WARNING: ThreadSanitizer|AddressSanitizer:DEADLYSIGNAL")

    def sanitizer_reports(self):
        found = []
        for path in self.logs:
            try:
                with open(path, "rb") as f:
                    text = f.read().decode(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                if self.SANITIZER_RE.search(line):
                    found.append(f"{os.path.basename(path)}: {line}")
        return found

    def finish(self):
        """Stops the server if it runs (SIGTERM must give exit 0) and returns a list of
        problems: a bad exit status, sanitizer reports in any of its logs."""
        problems = []
        if self.alive():
            try:
                rc = self.stop()
                if rc != 0:
                    problems.append(f"subrelay serve exited {rc} after SIGTERM")
            except ServerError as e:
                problems.append(str(e))
        problems.extend(self.sanitizer_reports())
        if problems:
            tail = "\n".join(self.log_text().splitlines()[-60:])
            problems.append(f"log tail ({self.log_path}):\n{tail}")
        return problems

    def dump_logs(self, stream=sys.stderr, tail=300):
        for path in self.logs:
            try:
                with open(path, "rb") as f:
                    lines = f.read().decode(errors="replace").splitlines()
            except OSError:
                continue
            stream.write(f"----- {path} (last {min(tail, len(lines))} of {len(lines)} lines) "
                         f"-----\n")
            for line in lines[-tail:]:
                stream.write(line + "\n")

    # -- queue -----------------------------------------------------------------------------
    def cli(self, *args, timeout=30):
        return subrelay(*args, "-c", self.config_path, timeout=timeout)

    def queue_list(self):
        proc = self.cli("queue", "list", "--json")
        if proc.returncode != 0:
            raise AssertionError(f"queue list --json exited {proc.returncode}: "
                                 f"{proc.stderr.decode(errors='replace')}")
        out = []
        for line in proc.stdout.decode().splitlines():
            if line.strip():
                out.append(json.loads(line))
        return out

    def queue_ids(self):
        return [m["id"] for m in self.queue_list()]

    def queue_raw(self, qid):
        proc = self.cli("queue", "show", qid, "--raw")
        if proc.returncode != 0:
            raise AssertionError(f"queue show {qid} --raw exited {proc.returncode}: "
                                 f"{proc.stderr.decode(errors='replace')}")
        return proc.stdout

    def queue_show_json(self, qid):
        proc = self.cli("queue", "show", qid, "--json")
        if proc.returncode != 0:
            raise AssertionError(f"queue show {qid} --json exited {proc.returncode}: "
                                 f"{proc.stderr.decode(errors='replace')}")
        return json.loads(proc.stdout)

    def queue_entry(self, qid):
        for m in self.queue_list():
            if m["id"] == qid:
                return m
        raise AssertionError(f"queue id {qid} not in `queue list`")


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------

_counter = [0]


def wait_for(pred, what, timeout=20, interval=0.1):
    """Polls pred() until it returns something true (returned), or fails after timeout
    seconds (scaled for sanitizer builds) saying what was awaited."""
    deadline = time.monotonic() + scale(timeout)
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def wait_states(srv, qid, pred, timeout=20):
    """Polls `queue show --json` of qid until pred(states) is true, states mapping each
    recipient's address to its state ("queued", "deferred", "delivered", "failed", ...);
    returns that queue show. Fails after timeout seconds (scaled) with the last one."""
    deadline = time.monotonic() + scale(timeout)
    while True:
        info = srv.queue_show_json(qid)
        states = {r["address"]: r["state"] for r in info["recipients"]}
        if pred(states):
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"states never matched for {qid}: {json.dumps(info, indent=1)}")
        time.sleep(0.1)


def token(prefix="t"):
    _counter[0] += 1
    return f"{prefix}{os.getpid()}x{_counter[0]}x{random.randrange(1 << 32):08x}"


def make_message(sender, to, subject, body="Hello.\r\n", message_id=True, date=True,
                 extra_headers=(), header_from=None):
    """RFC 5322 message bytes with CRLF line ends. body may be str (UTF-8) or bytes."""
    tok_domain = sender.split("@", 1)[1] if "@" in sender else "example.test"
    lines = [f"From: {header_from or sender}", f"To: {', '.join(to)}", f"Subject: {subject}"]
    if date:
        lines.append(f"Date: {email.utils.formatdate(localtime=False)}")
    if message_id:
        mid = message_id if isinstance(message_id, str) else f"{token('m')}@{tok_domain}"
        lines.append(f"Message-ID: <{mid}>")
    lines.extend(extra_headers)
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    if isinstance(body, str):
        body = body.encode()
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return head + body


def split_message(raw):
    """(list of header fields, each with its folded lines and final CRLF; rest of the message
    starting with the empty line)."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        head, rest = raw, b""
    else:
        head, rest = raw[:end + 2], raw[end + 2:]
    fields = []
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line + b"\r\n"
        else:
            fields.append(line + b"\r\n")
    return fields, rest


def field_name(field):
    return field.split(b":", 1)[0].strip().lower()


def field_value(field):
    return field.split(b":", 1)[1].strip() if b":" in field else b""


def header_values(raw, name):
    fields, _ = split_message(raw)
    return [field_value(f) for f in fields if field_name(f) == name.lower().encode()]


def check_stored(tc, stored, sent, account=None, tls_version=None):
    """The stored bytes are: a Received: field first, the fields the client sent (in order,
    byte for byte), a Message-ID and a Date if the client had none, then the body unchanged."""
    s_fields, s_rest = split_message(stored)
    c_fields, c_rest = split_message(sent)
    tc.assertTrue(s_fields, f"stored message has no header: {stored[:300]!r}")
    tc.assertEqual(field_name(s_fields[0]), b"received",
                   f"first stored header field is not Received: {s_fields[0]!r}")
    received = s_fields[0]
    if account is not None:
        tc.assertIn(account.encode(), received,
                    f"Received does not name the account {account!r}: {received!r}")
    if tls_version is not None:
        tc.assertIn(tls_version.encode(), received,
                    f"Received does not name the TLS version {tls_version}: {received!r}")
    rest = s_fields[1:]
    client_names = {field_name(f) for f in c_fields}
    for name in (b"message-id", b"date"):
        if name in client_names:
            continue
        added = [f for f in rest if field_name(f) == name]
        tc.assertEqual(len(added), 1, f"expected exactly one added {name.decode()} field, "
                                      f"got {added!r}")
        value = field_value(added[0]).decode()
        if name == b"message-id":
            tc.assertRegex(value, r"^<[^<>@\s]+@[^<>@\s]+>$", "added Message-ID malformed")
        else:
            tc.assertIsNotNone(email.utils.parsedate_to_datetime(value),
                               f"added Date unparsable: {value!r}")
        rest.remove(added[0])
    tc.assertEqual(b"".join(rest), b"".join(c_fields),
                   "stored header fields differ from the ones the client sent")
    tc.assertEqual(s_rest, c_rest, "stored body differs from the one the client sent")
    return received


# --------------------------------------------------------------------------------------------
# SMTP clients
# --------------------------------------------------------------------------------------------

QUEUED_RE = re.compile(rb"queued as (\S+)")


def queued_id(reply):
    if isinstance(reply, str):
        reply = reply.encode()
    m = QUEUED_RE.search(reply)
    if not m:
        raise AssertionError(f"no 'queued as <ID>' in reply {reply!r}")
    return m.group(1).decode()


def smtp_starttls(port, timeout=15, ehlo="client.subrelay.test", ctx=None):
    conn = smtplib.SMTP(LOOPBACK, port, local_hostname=ehlo, timeout=scale(timeout))
    conn.ehlo()
    conn.starttls(context=ctx or client_context())
    conn.ehlo()
    return conn


def smtp_ssl(port, timeout=15, ehlo="client.subrelay.test", ctx=None):
    conn = smtplib.SMTP_SSL(LOOPBACK, port, local_hostname=ehlo, timeout=scale(timeout),
                            context=ctx or client_context())
    conn.ehlo()
    return conn


def submit(conn, sender, rcpts, msg, mail_options=(), rcpt_options=()):
    """MAIL/RCPT/DATA on an smtplib connection; returns the queue id from the 250 reply, raises
    smtplib exceptions on refusals."""
    code, resp = conn.mail(sender, list(mail_options))
    if code != 250:
        conn.rset()
        raise smtplib.SMTPSenderRefused(code, resp, sender)
    for r in rcpts:
        code, resp = conn.rcpt(r, list(rcpt_options))
        if code not in (250, 251):
            conn.rset()
            raise smtplib.SMTPRecipientsRefused({r: (code, resp)})
    code, resp = conn.data(msg)
    if code != 250:
        raise smtplib.SMTPDataError(code, resp)
    if not re.match(rb"^2\.0\.0 Ok: queued as \S+$", resp):
        raise AssertionError(f"250 after DATA is not '2.0.0 Ok: queued as <ID>': {resp!r}")
    return queued_id(resp)


def tls_version_of(conn):
    return conn.sock.version()


class ConnectionClosed(AssertionError):
    pass


class RawClient:
    """Exact bytes over a TCP (and then TLS) socket. Every read is bounded by `timeout`."""

    def __init__(self, port, implicit_tls=False, timeout=10, ctx=None, read_greeting=True,
                 source=None, sock=None):
        self.timeout = scale(timeout)
        # sock: a socket the caller connected itself (options set before connect).
        self.sock = sock or socket.create_connection((LOOPBACK, port), timeout=self.timeout,
                                                     source_address=(source, 0) if source else None)
        self.sock.settimeout(self.timeout)
        self.buf = b""
        self.transcript = []
        if implicit_tls:
            self.sock = (ctx or client_context()).wrap_socket(self.sock,
                                                               server_hostname=LOOPBACK)
        self.greeting = self.reply() if read_greeting else None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.transcript.append(b"C: " + data)
        self.sock.sendall(data)

    def _fill(self, timeout=None):
        self.sock.settimeout(timeout if timeout is not None else self.timeout)
        try:
            chunk = self.sock.recv(65536)
        finally:
            self.sock.settimeout(self.timeout)
        if not chunk:
            raise ConnectionClosed("server closed the connection; transcript:\n"
                                   + self.format_transcript())
        self.buf += chunk

    def line(self, timeout=None):
        while b"\n" not in self.buf:
            self._fill(timeout)
        line, _, self.buf = self.buf.partition(b"\n")
        line += b"\n"
        self.transcript.append(b"S: " + line)
        if not line.endswith(b"\r\n"):
            raise AssertionError(f"server sent a line without CRLF: {line!r}")
        return line[:-2].decode(errors="replace")

    def reply(self, timeout=None):
        """(code, [text lines]) of one possibly multi-line reply."""
        lines = []
        while True:
            line = self.line(timeout)
            if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in " -"):
                raise AssertionError(f"malformed reply line {line!r}; transcript:\n"
                                     + self.format_transcript())
            lines.append(line)
            if len(line) == 3 or line[3] == " ":
                codes = {l[:3] for l in lines}
                if len(codes) != 1:
                    raise AssertionError(f"multi-line reply with mixed codes: {lines!r}")
                return int(line[:3]), [l[4:] for l in lines]

    def cmd(self, line, timeout=None):
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.reply(timeout)

    def expect(self, line, code, timeout=None):
        got = self.cmd(line, timeout)
        if got[0] != code:
            raise AssertionError(f"{line!r}: expected {code}, got {got!r}; transcript:\n"
                                 + self.format_transcript())
        return got

    def nothing_pending(self, wait=0.3):
        """True if the server has sent nothing more within `wait` seconds (EOF is not data)."""
        if self.buf:
            return False
        self.sock.settimeout(scale(wait))
        try:
            chunk = self.sock.recv(65536)
        except (socket.timeout, ssl.SSLWantReadError):
            return True
        finally:
            self.sock.settimeout(self.timeout)
        if chunk:
            self.buf += chunk
            self.transcript.append(b"S(unexpected): " + chunk)
            return False
        return True

    def at_eof(self, timeout=None):
        """True if the server closes the connection (before sending anything more)."""
        try:
            self.sock.settimeout(timeout if timeout is not None else self.timeout)
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
                self.transcript.append(b"S(before close): " + chunk)
        except (ConnectionResetError, BrokenPipeError):
            return True
        except (socket.timeout, TimeoutError):
            return False
        except ssl.SSLError:
            return True

    def ehlo(self, name="raw.subrelay.test"):
        code, lines = self.cmd(f"EHLO {name}")
        if code != 250:
            raise AssertionError(f"EHLO refused: {code} {lines}")
        return [l.upper() for l in lines[1:]]

    def starttls(self, ctx=None):
        code, lines = self.cmd("STARTTLS")
        if code != 220:
            raise AssertionError(f"STARTTLS refused: {code} {lines}")
        if self.buf:
            raise AssertionError(f"data after the 220 to STARTTLS: {self.buf!r}")
        self.sock = (ctx or client_context()).wrap_socket(self.sock, server_hostname=LOOPBACK)
        self.transcript.append(b"-- TLS " + self.sock.version().encode())

    def auth_plain(self, user, password, expect=235):
        cred = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return self.expect(f"AUTH PLAIN {cred}", expect, timeout=scale(10))

    def login(self, port_mode, account, ehlo="raw.subrelay.test"):
        """EHLO [STARTTLS EHLO] AUTH PLAIN for a listener of the given mode."""
        caps = self.ehlo(ehlo)
        if port_mode == "starttls":
            self.starttls()
            caps = self.ehlo(ehlo)
        self.auth_plain(account.username, account.password)
        return caps

    def data(self, content, expect=250):
        """DATA, then the already dot-stuffed content which must end with CRLF.CRLF."""
        self.expect("DATA", 354)
        self.send(content)
        code, lines = self.reply(timeout=scale(30))
        if expect is not None and code != expect:
            raise AssertionError(f"after DATA: expected {expect}, got {code} {lines}; "
                                 "transcript:\n" + self.format_transcript())
        return code, lines

    def format_transcript(self, limit=4000):
        out = []
        for t in self.transcript[-60:]:
            s = repr(t)[2:-1]
            out.append(s if len(s) < 400 else s[:400] + f"... ({len(t)} bytes)")
        text = "\n".join(out)
        return text[-limit:]


def dot_stuff(msg):
    """Dot-stuffing for DATA (RFC 5321 4.5.2) plus the terminating CRLF.CRLF."""
    out = re.sub(rb"(^|\r\n)\.", rb"\1..", msg)
    return out + b".\r\n"


# --------------------------------------------------------------------------------------------
# unittest glue
# --------------------------------------------------------------------------------------------

class ServerTestCase(unittest.TestCase):
    """Keeps track of the servers a test (or its class) started, so their logs are printed when
    the test fails, and stops them afterwards."""

    class_servers = []

    @classmethod
    def start_class_server(cls, **kw):
        srv = Server(**kw).start()
        cls.class_servers = list(cls.class_servers) + [srv]
        return srv

    @classmethod
    def tearDownClass(cls):
        problems = []
        for srv in cls.class_servers:
            problems.extend(srv.finish())
            srv.kill()
        if problems:
            raise AssertionError("\n".join(problems))

    def setUp(self):
        self.test_servers = []

    def start_server(self, **kw):
        srv = Server(**kw)
        self.test_servers.append(srv)
        self.addCleanup(self._finish_server, srv)
        return srv.start()

    def _finish_server(self, srv):
        problems = srv.finish()
        srv.kill()
        if problems:
            self.fail("\n".join(problems))

    def dump_logs(self, stream):
        for srv in list(type(self).class_servers) + list(getattr(self, "test_servers", [])):
            srv.dump_logs(stream)
        # A `serve --dev` run by the test itself (not a Server) leaves its log here.
        log = getattr(self, "dev_log", None)
        if log and os.path.exists(log):
            with open(log, "rb") as f:
                stream.write(f"----- {log} -----\n" + f.read().decode(errors="replace")[-20000:])


class _Result(unittest.TextTestResult):
    def _dump(self, test):
        dump = getattr(test, "dump_logs", None)
        if dump is not None:
            self.stream.write("\n=== server logs for " + str(test) + " ===\n")
            try:
                dump(self.stream)
            except Exception as e:  # never hide the failure itself
                self.stream.write(f"(could not dump logs: {e})\n")
            self.stream.flush()

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._dump(test)

    def addError(self, test, err):
        super().addError(test, err)
        self._dump(test)


def main():
    sys.stderr.write(f"subrelay binary: {BIN} (timeout scale {SCALE:g}, "
                     f"tls backend {os.environ.get('SUBRELAY_TLS_BACKEND', '?')})\n")
    runner = unittest.TextTestRunner(resultclass=_Result, verbosity=2, stream=sys.stderr)
    started = time.monotonic()
    prog = unittest.main(testRunner=runner, exit=False)
    result = prog.result
    ok = result.wasSuccessful() and result.testsRun > 0
    _kill_all()
    if ok and not os.environ.get("SUBRELAY_KEEP_TMP"):
        for d in _tmpdirs:
            shutil.rmtree(d, ignore_errors=True)
    elif not ok:
        sys.stderr.write("temporary files kept for inspection: " + " ".join(_tmpdirs) + "\n")
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    passed = max(0, result.testsRun - failed - len(result.skipped))
    sys.stderr.write(f"{time.monotonic() - started:.1f}s\n")
    print(f"{passed} passed, {failed} failed" +
          (f", {len(result.skipped)} skipped" if result.skipped else ""), flush=True)
    sys.exit(0 if ok else 1)


# --------------------------------------------------------------------------------------------
# Additions for test_hostile.py, test_authenticated.py and test_interop.py (nothing above
# depends on them)
# --------------------------------------------------------------------------------------------

def rss_kb(pid):
    """VmRSS of a process in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def connect_socket(port, host=LOOPBACK, source=None, rcvbuf=None, sndbuf=None, timeout=10):
    """A connected TCP socket; rcvbuf/sndbuf (SO_RCVBUF/SO_SNDBUF) are set before connect(),
    so the window the kernel offers is small from the start. IPv6 when host contains ':'."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sndbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        if source:
            s.bind((source, 0))
        s.settimeout(scale(timeout))
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return s


class SocketRawClient(RawClient):
    """RawClient over a socket the caller connected (see connect_socket)."""

    def __init__(self, sock, implicit_tls=False, timeout=10, ctx=None, read_greeting=True):
        super().__init__(None, implicit_tls=implicit_tls, timeout=timeout, ctx=ctx,
                         read_greeting=read_greeting, sock=sock)


def accounts_meters(srv, *extra):
    """`subrelay accounts --json` as {account name: object}."""
    proc = srv.cli("accounts", "--json", *extra)
    if proc.returncode != 0:
        raise AssertionError(f"subrelay accounts --json exited {proc.returncode}: "
                             f"{proc.stderr.decode(errors='replace')}")
    out = {}
    for line in proc.stdout.decode().splitlines():
        if line.strip():
            o = json.loads(line)
            out[o["account"]] = o
    return out
