"""Receiving MTAs for subrelay's outbound delivery tests (fake MX hosts on 127.0.0.x).

Three peers, each a context manager with start()/stop(); every live peer is also stopped at
exit (before harness.main() removes the temporary directories). Directories come from
harness.make_tmpdir(), so harness.main() removes them when all tests passed and keeps them for
inspection otherwise; peer.cleanup() removes one peer's directory at once.

  * PostfixMx: a private Postfix instance (`postfix -c DIR start`, needs root) on one or more
    ip:port, every domain into one Maildir, STARTTLS, optional mandatory TLS and its own
    certificate per address, magic recipients tempfail@ (450 4.2.1) and permfail@ (550 5.1.1).
  * SmtpSink: Postfix's smtp-sink, one dump file per message, optionally 4xx/5xx on every RCPT
    or 421 at connect. No STARTTLS.
  * AioSink: an aiosmtpd server in a /usr/bin/python3 subprocess: STARTTLS (optionally
    required), PIPELINING/SIZE/SMTPUTF8, magic local parts tempfail* / permfail* (RCPT),
    slow* / datafail* / tempdata* (DATA), and per-connection counters for connection reuse.

All three return messages() as a list of dicts with at least:
    name, path, raw (bytes as stored), msg (email.message.Message), mail_from, rcpt_tos, tls
(the TLS version the message came in with, e.g. "TLSv1.3", or None).
Postfix stores LF line ends and adds Return-Path/X-Original-To/Delivered-To/Received;
smtp-sink stores LF line ends after its own X-*/Received lines (stripped from raw, kept in
"dump"); AioSink stores the exact bytes received (CRLF, dot-unstuffed).

Certificates: make_cert() issues a certificate for any DNS names/IPs from harness.pki()'s CA
(or self-signed, or from an unrelated CA, or already expired), for `delivery.tls: verify` tests.

Only loopback addresses are accepted. Every wait is bounded and stretched by harness.scale().
"""

import atexit
import email
import email.policy
import ipaddress
import json
import os
import pwd
import random
import re
import shlex
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time

import harness
from harness import scale

PYTHON = "/usr/bin/python3"  # Debian's interpreter: the one with python3-aiosmtpd
NOBODY_UID = 65534
NOBODY_GID = 65534


class PeerError(AssertionError):
    pass


# --------------------------------------------------------------------------------------------
# Addresses and ports
# --------------------------------------------------------------------------------------------

def _check_loopback(ip):
    addr = ipaddress.ip_address(ip)
    if not addr.is_loopback:
        raise ValueError(f"{ip} is not a loopback address: test peers listen on loopback only")
    return addr


def parse_address(address, default_port=2525):
    """"127.0.0.11:2525", "[::1]:2525", "127.0.0.11", ("127.0.0.11", 2525) -> (ip, port)."""
    if isinstance(address, (tuple, list)):
        ip, port = address[0], int(address[1])
    else:
        text = str(address)
        m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", text)
        if m:
            ip, port = m.group(1), int(m.group(2) or default_port)
        elif text.count(":") == 1:
            ip, port = text.split(":")
            port = int(port)
        else:
            ip, port = text, default_port
    _check_loopback(ip)
    return ip, port


def format_address(ip, port):
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _family(ip):
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def port_is_free(ip, port):
    with socket.socket(_family(ip), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True


def free_port(*ips, attempts=100):
    """A TCP port free on every given loopback address (default 127.0.0.1) a moment ago. Give
    all the MX addresses of one test, since subrelay's `delivery.port` is one port for all."""
    ips = ips or (harness.LOOPBACK,)
    for ip in ips:
        _check_loopback(ip)
    for _ in range(attempts):
        with socket.socket(_family(ips[0]), socket.SOCK_STREAM) as s:
            s.bind((ips[0], 0))
            port = s.getsockname()[1]
        if all(port_is_free(ip, port) for ip in ips[1:]):
            return port
    raise PeerError(f"no common free port on {ips}")


def _proc_net_hex(ip):
    packed = ipaddress.ip_address(ip).packed
    # /proc/net/tcp{,6} print each 32-bit word in host (little-endian) order
    return "".join(packed[i:i + 4][::-1].hex().upper() for i in range(0, len(packed), 4))


def is_listening(ip, port):
    """True if a TCP socket listens on ip:port (or the wildcard address), from /proc/net/tcp
    (no connection is made, so peers do not count a probe as a client). Falls back to a
    connect() probe where /proc is unavailable."""
    fname = "/proc/net/tcp6" if ":" in ip else "/proc/net/tcp"
    want = {f"{_proc_net_hex(ip)}:{port:04X}",
            f"{'0' * (32 if ':' in ip else 8)}:{port:04X}"}
    try:
        with open(fname) as f:
            next(f)
            for line in f:
                parts = line.split()
                if len(parts) > 3 and parts[3] == "0A" and parts[1] in want:
                    return True
        return False
    except OSError:
        try:
            with socket.create_connection((ip, port), timeout=1):
                return True
        except OSError:
            return False


def wait_listening(ip, port, timeout=10, alive=None):
    """Waits (bounded, scaled) until ip:port listens; raises PeerError on timeout or when the
    optional alive() callable returns False (the server process died)."""
    deadline = time.monotonic() + scale(timeout)
    while not is_listening(ip, port):
        if alive is not None and not alive():
            raise PeerError(f"server for {format_address(ip, port)} died before listening")
        if time.monotonic() > deadline:
            raise PeerError(f"nothing listens on {format_address(ip, port)} after "
                            f"{scale(timeout):.0f}s")
        time.sleep(0.02)
    return True


def _pid_alive(pid):
    """True if pid exists and is not a zombie (this machine's init reaps orphans slowly)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _wait_pids_gone(pids, timeout):
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if _pid_alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


# --------------------------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------------------------

class Cert:
    """Paths of a certificate and its key (plus the CA that issued it, None if self-signed)."""

    def __init__(self, cert, key, ca=None):
        self.cert = cert
        self.key = key
        self.ca = ca

    def __iter__(self):  # cert, key = make_cert(...)
        return iter((self.cert, self.key))

    def __repr__(self):
        return f"Cert({self.cert!r})"


_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
_RSA = ["-newkey", "rsa:2048", "-nodes"]


def _new_ca(directory, stem, key_args):
    ca_key = os.path.join(directory, stem + ".ca.key")
    ca = os.path.join(directory, stem + ".ca.pem")
    harness.run(["openssl", "req", "-x509", "-new", *key_args, "-keyout", ca_key, "-out", ca,
                 "-days", "3", "-subj", f"/O=subrelay tests/CN=unrelated CA {stem}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign"], check=True)
    return ca, ca_key


def make_cert(dns_names=(), ips=(), *, pki=None, directory=None, name=None, issuer="ca",
              expired=False, days=3, key_type="ec"):
    """A server certificate with the given subjectAltNames, e.g. make_cert(["mx1.mx.test"]).

    issuer: "ca" (signed by pki's CA, default harness.pki(): valid for clients that trust
    pki.ca), "self" (self-signed: untrusted), "other" (a fresh unrelated CA: untrusted).
    expired: validity 2020-01-01..2020-01-02 (needs an issuing CA). key_type: "ec" or "rsa".
    Returns a Cert (cert, key, ca paths)."""
    pki = pki or harness.pki()
    directory = directory or pki.dir
    if isinstance(dns_names, str):
        dns_names = [dns_names]
    if isinstance(ips, str):
        ips = [ips]
    sans = [f"DNS:{n}" for n in dns_names] + [f"IP:{i}" for i in ips]
    if not sans:
        raise ValueError("make_cert needs at least one DNS name or IP")
    stem = name or re.sub(r"[^A-Za-z0-9_.-]", "_", (list(dns_names) + list(ips))[0]) + \
        f".{random.randrange(1 << 32):08x}"
    key_args = _EC if key_type == "ec" else _RSA
    key = os.path.join(directory, stem + ".key.pem")
    cert = os.path.join(directory, stem + ".cert.pem")
    csr = os.path.join(directory, stem + ".csr")
    ext = os.path.join(directory, stem + ".ext")
    cn = (list(dns_names) + list(ips))[0]
    with open(ext, "w") as f:
        f.write("basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\n"
                f"subjectAltName={','.join(sans)}\n"
                "subjectKeyIdentifier=hash\n" +
                ("authorityKeyIdentifier=keyid,issuer\n" if issuer != "self" else ""))
    if issuer == "self":
        if expired:
            raise ValueError("expired needs an issuing CA (issuer='ca' or 'other')")
        harness.run(["openssl", "req", "-x509", "-new", *key_args, "-keyout", key, "-out", cert,
                     "-days", str(days), "-subj", f"/O=subrelay tests/CN={cn}",
                     "-extensions", "v3_x", "-config", _req_config(directory, stem, ext)],
                    check=True)
        return Cert(cert, key, None)
    if issuer == "ca":
        ca, ca_key = pki.ca, pki.ca_key
    elif issuer == "other":
        ca, ca_key = _new_ca(directory, stem, key_args)
    else:
        raise ValueError(f"issuer must be 'ca', 'self' or 'other', not {issuer!r}")
    harness.run(["openssl", "req", "-new", *key_args, "-keyout", key, "-out", csr,
                 "-subj", f"/O=subrelay tests/CN={cn}"], check=True)
    if expired:
        _sign_with_dates(directory, stem, csr, ca, ca_key, ext, cert,
                         "20200101000000Z", "20200102000000Z")
    else:
        harness.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key,
                     "-set_serial", str(random.randrange(1, 2**62)), "-days", str(days),
                     "-out", cert, "-extfile", ext], check=True)
    return Cert(cert, key, ca)


def _req_config(directory, stem, ext):
    path = os.path.join(directory, stem + ".req.cnf")
    with open(ext) as f:
        extensions = f.read()
    with open(path, "w") as f:
        f.write("[req]\ndistinguished_name = dn\n[dn]\n[v3_x]\n" + extensions)
    return path


def _sign_with_dates(directory, stem, csr, ca, ca_key, ext, out, start, end):
    """`openssl x509 -req` (OpenSSL 3.0) cannot backdate; `openssl ca` can."""
    cadir = os.path.join(directory, stem + ".cadb")
    os.makedirs(cadir, exist_ok=True)
    open(os.path.join(cadir, "index.txt"), "w").close()
    with open(os.path.join(cadir, "serial"), "w") as f:
        f.write(f"{random.randrange(1 << 60, 1 << 62):X}\n")
    conf = os.path.join(cadir, "ca.cnf")
    with open(conf, "w") as f:
        f.write(f"[ca]\ndefault_ca = tca\n[tca]\ndatabase = {cadir}/index.txt\n"
                f"new_certs_dir = {cadir}\nserial = {cadir}/serial\ndefault_md = sha256\n"
                "policy = pol\nunique_subject = no\ncopy_extensions = none\n"
                "[pol]\norganizationName = optional\ncommonName = supplied\n")
    harness.run(["openssl", "ca", "-batch", "-config", conf, "-cert", ca, "-keyfile", ca_key,
                 "-in", csr, "-out", out, "-startdate", start, "-enddate", end,
                 "-extfile", ext, "-notext"], check=True)


def client_context(ca=None, tls_max=None):
    """Client TLS context trusting only `ca` (default: the test CA), hostname checked;
    tls_max: an ssl.TLSVersion name such as "TLSv1_2"."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca or harness.pki().ca)
    if tls_max:
        ctx.maximum_version = getattr(ssl.TLSVersion, tls_max)
    return ctx


def smtp_connect(ip, port, server_name=None, starttls=False, ctx=None, timeout=15,
                 ehlo="client.subrelay.test"):
    """smtplib.SMTP to ip:port; with starttls=True, STARTTLS verified against `server_name`
    (default: the ip) with `ctx` (default: trusts the test CA). Returns the connection."""
    conn = smtplib.SMTP(ip, port, local_hostname=ehlo, timeout=scale(timeout))
    conn.ehlo()
    if starttls:
        conn._host = server_name or ip  # smtplib passes _host as server_hostname to wrap_socket
        conn.starttls(context=ctx or client_context())
        conn.ehlo()
    return conn


def send_message(conn, mail_from, rcpt_tos, msg, mail_options=(), rcpt_options=()):
    """One transaction on an open smtplib connection, never raising on SMTP refusals:
    returns {"mail": (code, text), "rcpt": {rcpt: (code, text)}, "data": (code, text) or None}
    and RSETs after a failed MAIL or when no recipient was accepted."""
    if isinstance(msg, str):
        msg = msg.encode()
    out = {"mail": None, "rcpt": {}, "data": None}
    code, text = conn.mail(mail_from, list(mail_options))
    out["mail"] = (code, text.decode(errors="replace"))
    if code != 250:
        conn.rset()
        return out
    for r in rcpt_tos:
        code, text = conn.rcpt(r, list(rcpt_options))
        out["rcpt"][r] = (code, text.decode(errors="replace"))
    if not any(c in (250, 251) for c, _ in out["rcpt"].values()):
        conn.rset()
        return out
    code, text = conn.data(msg)
    out["data"] = (code, text.decode(errors="replace"))
    return out


# --------------------------------------------------------------------------------------------
# Common peer plumbing
# --------------------------------------------------------------------------------------------

_live = []
_live_lock = threading.Lock()


def stop_all():
    """Stops every peer still running (called at exit and before harness.main() cleans up)."""
    with _live_lock:
        peers = list(_live)
    for p in reversed(peers):
        try:
            p.stop()
        except Exception as e:  # keep stopping the others
            sys.stderr.write(f"mta_peers: stopping {p!r} failed: {e}\n")


atexit.register(stop_all)

# harness.main() calls harness._kill_all() and then removes the temporary directories: stop the
# peers first (Postfix daemonizes, so harness does not know its processes).
_harness_kill_all = harness._kill_all


def _kill_all_and_peers():
    stop_all()
    _harness_kill_all()


harness._kill_all = _kill_all_and_peers


class _Peer:
    prefix = "subrelay-peer-"

    def __init__(self, directory=None):
        self.dir = directory or harness.make_tmpdir(self.prefix)
        os.chmod(self.dir, 0o755)  # unprivileged daemons (postfix, nobody) must traverse it
        self.started = False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # For peers that are one child process (self.proc, log in self.log_path); PostfixMx,
    # which daemonizes, has its own stop().
    def stop(self, timeout=10):
        if not self.started:
            return
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=scale(timeout))
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=scale(timeout))
        finally:
            self.started = False
            self._unregister()

    def log(self):
        return _read(self.log_path)

    def _register(self):
        with _live_lock:
            if self not in _live:
                _live.append(self)

    def _unregister(self):
        with _live_lock:
            if self in _live:
                _live.remove(self)

    def cleanup(self):
        """Stops the peer and removes its directory now."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def _wait_messages(get, n, timeout, what, diag):
        deadline = time.monotonic() + scale(timeout)
        while True:
            msgs = get()
            if len(msgs) >= n:
                return msgs
            if time.monotonic() > deadline:
                raise PeerError(f"{what}: {len(msgs)} message(s) after {scale(timeout):.0f}s, "
                                f"wanted {n}\n{diag()}")
            time.sleep(0.05)


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _parse(raw):
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def _angle(s):
    s = s.strip()
    return s[1:-1] if s.startswith("<") and s.endswith(">") else s


TLS_RECEIVED_RE = re.compile(r"\(using (TLSv[\d.]+|SSLv[\d.]+) with cipher ([^\s)]+)")


# --------------------------------------------------------------------------------------------
# Postfix
# --------------------------------------------------------------------------------------------

_MASTER_CF_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

DISCONNECT_RE = re.compile(r"postfix[^:]*/smtpd\[(\d+)\]: disconnect from (\S+) (.*)$")


class PostfixMx(_Peer):
    """A private Postfix instance that accepts mail for every domain into one Maildir.

    addresses:    ["127.0.0.11:2525", ("127.0.0.12", 2525), "[::1]:2525"]; one smtpd each.
    cert, key:    certificate chain for STARTTLS on every address (default: harness.pki()'s
                  localhost certificate); tls=False offers no STARTTLS at all.
    certs:        {address: Cert or (cert, key)} per-address certificate overriding `cert`.
    require_tls:  addresses where STARTTLS is mandatory (smtpd_tls_security_level=encrypt,
                  "530 5.7.0 Must issue a STARTTLS command first"); True for all.
    recipient_access: extra {pattern: action} entries checked before the built-in
                  tempfail@ -> 450 4.2.1 and permfail@ -> 550 5.1.1 (patterns "user@" match
                  that local part in every domain, see access(5)).
    main_cf:      extra main.cf settings, e.g. {"message_size_limit": "100000"}.
    hostname:     myhostname (greeting, Received).

    Needs root (postfix -c DIR start); uses its own queue/data directories, so instances can
    coexist as long as their addresses differ."""

    prefix = "subrelay-postfix-"

    def __init__(self, addresses, cert=None, key=None, tls=True, certs=None, require_tls=(),
                 recipient_access=None, main_cf=None, hostname="mx.test", directory=None):
        super().__init__(directory)
        if isinstance(addresses, str) or (isinstance(addresses, tuple) and len(addresses) == 2
                                          and isinstance(addresses[1], int)):
            addresses = [addresses]  # one address
        self.addresses = [parse_address(a) for a in addresses]
        if not self.addresses:
            raise ValueError("PostfixMx needs at least one address")
        self.tls = tls
        if tls and cert is None:
            cert, key = harness.pki().cert, harness.pki().key
        self.cert, self.key = cert, key
        self.certs = {parse_address(a): tuple(c) for a, c in (certs or {}).items()}
        if require_tls is True:
            self.require_tls = set(self.addresses)
        else:
            self.require_tls = {parse_address(a) for a in require_tls}
        self.recipient_access = dict(recipient_access or {})
        self.main_cf_extra = dict(main_cf or {})
        self.hostname = hostname
        self.conf_dir = os.path.join(self.dir, "conf")
        self.queue_dir = os.path.join(self.dir, "queue")
        self.data_dir = os.path.join(self.dir, "data")
        self.mail_dir = os.path.join(self.dir, "mail")
        self.maildir = os.path.join(self.mail_dir, "inbox")
        self.maillog_path = os.path.join(self.dir, "maillog")
        self.master_pid = None
        self.start_output = ""

    def __repr__(self):
        return f"PostfixMx({[format_address(*a) for a in self.addresses]}, dir={self.dir})"

    @property
    def port(self):
        return self.addresses[0][1]

    # -- configuration ---------------------------------------------------------------------
    def main_cf_settings(self):
        """main.cf as a dict; a subclass changes what differs and keeps the rest."""
        access = [f"{{{k} = {v}}}" for k, v in self.recipient_access.items()]
        access += ["{tempfail@ = 450 4.2.1 try later}", "{permfail@ = 550 5.1.1 no such user}"]
        v6 = any(":" in ip for ip, _ in self.addresses)
        cf = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir,
            "maillog_file": self.maillog_path,
            "maillog_file_prefixes": self.dir,
            "myhostname": self.hostname,
            "mydomain": self.hostname.split(".", 1)[-1] if "." in self.hostname else "mx.test",
            "myorigin": "$myhostname",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "all" if v6 else "ipv4",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8" + (" [::1]/128" if v6 else ""),
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            "smtp_dns_support_level": "disabled",
            "smtpd_peername_lookup": "no",
            # clients on loopback would count as local (permit_inet_interfaces): Postfix would
            # then add Message-ID/Date/From and rewrite addresses. Store mail as received.
            "local_header_rewrite_clients": "",
            "virtual_mailbox_domains": "static:all",
            "virtual_mailbox_base": self.mail_dir,
            "virtual_mailbox_maps": "static:inbox/",
            "virtual_uid_maps": f"static:{NOBODY_UID}",
            "virtual_gid_maps": f"static:{NOBODY_GID}",
            "virtual_mailbox_limit": "0",
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_recipient_restrictions":
                "check_recipient_access inline:{ " + ", ".join(access) + " }",
            "smtpd_tls_security_level": "may" if self.tls else "none",
            "smtpd_tls_received_header": "yes",
            "smtpd_tls_loglevel": "1",
        }
        if self.tls:
            cf["smtpd_tls_chain_files"] = f"{self.key}, {self.cert}"
        cf.update(self.main_cf_extra)
        return cf

    def main_cf(self):
        return "".join(f"{k} = {v}\n" for k, v in self.main_cf_settings().items())

    def master_cf(self):
        lines = []
        for addr in self.addresses:
            opts = []
            if addr in self.require_tls:
                opts.append("-o smtpd_tls_security_level=encrypt")
            if addr in self.certs:
                c, k = self.certs[addr]
                opts.append(f"-o smtpd_tls_chain_files={k},{c}")
            lines.append(f"{format_address(*addr)} inet n - n - - smtpd {' '.join(opts)}".rstrip())
        return "\n".join(lines) + "\n" + _MASTER_CF_SERVICES

    # -- process ---------------------------------------------------------------------------
    def _postfix(self, action, timeout=30):
        """`postfix -c CONF action` under `script` so that Postfix, which logs errors to stderr
        only when it is a terminal (and otherwise to the absent syslog), shows them."""
        cmd = f"postfix -c {shlex.quote(self.conf_dir)} {action}"
        proc = subprocess.run(["script", "-qec", cmd, "/dev/null"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=scale(timeout))
        return proc.returncode, proc.stdout.decode(errors="replace").replace("\r\n", "\n")

    def start(self, timeout=20):
        if self.started:
            return self
        if os.geteuid() != 0:
            raise PeerError("PostfixMx needs root (postfix -c DIR start)")
        if shutil.which("postfix") is None:
            raise PeerError("postfix is not installed (scripts/lib/deps.sh installs it)")
        postfix_user = pwd.getpwnam("postfix")
        for d, mode in ((self.conf_dir, 0o755), (self.queue_dir, 0o755),
                        (self.data_dir, 0o700), (self.mail_dir, 0o755)):
            os.makedirs(d, exist_ok=True)
            os.chmod(d, mode)
        os.chown(self.data_dir, postfix_user.pw_uid, -1)
        os.chown(self.mail_dir, NOBODY_UID, NOBODY_GID)
        past = time.time() - 60
        for name, text in (("main.cf", self.main_cf()), ("master.cf", self.master_cf())):
            path = os.path.join(self.conf_dir, name)
            with open(path, "w") as f:
                f.write(text)
            # Postfix rereads a configuration file modified in the last ~2 s (300 ms sleeps,
            # "being edited"): that made every start take 2-3 s. Backdate it.
            os.utime(path, (past, past))
        for ip, port in self.addresses:
            if is_listening(ip, port):
                raise PeerError(f"{format_address(ip, port)} is already in use")
        self._register()
        self.started = True
        rc, out = self._postfix("start", timeout)
        self.start_output = out
        pidfile = os.path.join(self.queue_dir, "pid", "master.pid")
        try:
            with open(pidfile) as f:
                self.master_pid = int(f.read().strip())
        except (OSError, ValueError):
            self.master_pid = None
        if rc != 0 or self.master_pid is None or not _pid_alive(self.master_pid):
            self.stop()
            raise PeerError(f"postfix -c {self.conf_dir} start failed (exit {rc}):\n{out}\n"
                            f"maillog:\n{self.maillog()}")
        try:
            for ip, port in self.addresses:
                wait_listening(ip, port, timeout, alive=lambda: _pid_alive(self.master_pid))
        except PeerError as e:
            self.stop()
            raise PeerError(f"{e}\npostfix start said:\n{out}\nmaillog:\n{self.maillog()}")
        return self

    def pids(self):
        """Live (non-zombie) processes of this instance: the master and its children, found by
        MAIL_CONFIG=<conf dir> in their environment (Postfix passes it to every child)."""
        marker = b"MAIL_CONFIG=" + self.conf_dir.encode() + b"\0"
        found = set()
        if self.master_pid and _pid_alive(self.master_pid):
            found.add(self.master_pid)
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = f.read()
            except OSError:
                continue
            if marker in env and _pid_alive(int(entry)):
                found.add(int(entry))
        return sorted(found)

    def stop(self, timeout=15):
        """`postfix stop`, wait for the master to exit, then SIGKILL whatever of this instance
        is left. Idempotent."""
        if not self.started:
            return
        try:
            if os.path.exists(os.path.join(self.conf_dir, "main.cf")) and \
                    self.master_pid and _pid_alive(self.master_pid):
                try:
                    self._postfix("stop", timeout)
                except subprocess.TimeoutExpired:
                    pass
                _wait_pids_gone([self.master_pid], scale(timeout))
            for _ in range(3):
                left = self.pids()
                if not left:
                    break
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                _wait_pids_gone(left, scale(5))
            left = self.pids()
            if left:
                raise PeerError(f"{self!r}: processes {left} survive SIGKILL")
        finally:
            self.started = False
            self._unregister()

    def running(self):
        return bool(self.master_pid) and _pid_alive(self.master_pid)

    # -- results ---------------------------------------------------------------------------
    def maillog(self):
        return _read(self.maillog_path)

    def message_files(self):
        new = os.path.join(self.maildir, "new")
        try:
            names = os.listdir(new)
        except FileNotFoundError:
            return []

        def order(n):  # maildir names: SECONDS.VdevIinoMusec.host
            m = re.match(r"(\d+)\.\S*?M(\d+)", n)
            return (int(m.group(1)), int(m.group(2)), n) if m else (1 << 62, 0, n)
        return [os.path.join(new, n) for n in sorted(names, key=order)]

    def messages(self):
        """Delivered messages in delivery order: dicts with name, path, raw (bytes, LF line ends,
        with Postfix's Return-Path/X-Original-To/Delivered-To/Received on top), msg, mail_from
        (Return-Path), rcpt_tos ([Delivered-To]: one file per recipient), tls (version from the
        Received header, None without TLS), cipher, queue_id."""
        out = []
        for path in self.message_files():
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except OSError:
                continue
            msg = _parse(raw)
            received = str(msg.get("Received", ""))
            tls = TLS_RECEIVED_RE.search(received)
            qid = re.search(r"with E?SMTPS?A? id (\w+)", received)
            out.append({
                "name": os.path.basename(path), "path": path, "raw": raw, "msg": msg,
                "mail_from": _angle(str(msg.get("Return-Path", ""))),
                "rcpt_tos": [str(v).strip() for v in msg.get_all("Delivered-To", [])],
                "tls": tls.group(1) if tls else None,
                "cipher": tls.group(2) if tls else None,
                "queue_id": qid.group(1) if qid else None,
            })
        return out

    def wait_for(self, n, timeout=10):
        """Waits until at least n messages were delivered; returns messages()."""
        return self._wait_messages(self.messages, n, timeout, repr(self),
                                   lambda: "maillog tail:\n" +
                                   "\n".join(self.maillog().splitlines()[-30:]))

    def sessions(self):
        """One dict per finished SMTP session from the maillog's "disconnect from" lines: the
        client plus the command counters, e.g. {"client": "unknown[127.0.0.1]", "ehlo": "2",
        "starttls": "1", "mail": "3", "rcpt": "3", "data": "3", "quit": "1", ...}
        (a refused command shows as "ok/total", e.g. "rcpt": "0/1")."""
        out = []
        for line in self.maillog().splitlines():
            m = DISCONNECT_RE.search(line)
            if m:
                d = {"pid": int(m.group(1)), "client": m.group(2)}
                for kv in m.group(3).split():
                    if "=" in kv:
                        k, v = kv.split("=", 1)
                        d[k] = v
                out.append(d)
        return out


class PostfixRelay(PostfixMx):
    """A PostfixMx that acts as a smarthost: it relays only for clients that authenticated
    with Cyrus SASL (sasldb, PLAIN and LOGIN), and only inside TLS (smtpd_tls_auth_only).
    Loopback clients get no free pass (mynetworks is empty).

    users:        {"name": "password"} in the sasldb, realm relay.test.
    wrappermode:  addresses that speak TLS from the first byte (port 465 style).
    Every other argument is PostfixMx's; STARTTLS is required on the other addresses.
    Needs sasl2-bin (saslpasswd2) and libsasl2-modules-db (scripts/lib/deps.sh)."""

    prefix = "subrelay-postfix-relay-"
    REALM = "relay.test"

    def __init__(self, addresses, users, wrappermode=(), **kw):
        super().__init__(addresses, **kw)
        self.users = dict(users)
        self.wrappermode = {parse_address(a) for a in wrappermode}
        self.require_tls |= set(self.addresses) - self.wrappermode
        self.sasl_dir = os.path.join(self.conf_dir, "sasl")
        self.sasldb = os.path.join(self.dir, "sasldb2")

    def __repr__(self):
        return f"PostfixRelay({[format_address(*a) for a in self.addresses]}, dir={self.dir})"

    def main_cf_settings(self):
        cf = super().main_cf_settings()
        cf.update({
            "mynetworks": "",
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "cyrus",
            "smtpd_sasl_path": "smtpd",
            "cyrus_sasl_config_path": self.sasl_dir,
            "smtpd_sasl_local_domain": self.REALM,
            "smtpd_sasl_security_options": "noanonymous",
            "smtpd_tls_auth_only": "yes",
            "smtpd_sasl_authenticated_header": "yes",
            "smtpd_relay_restrictions": "permit_sasl_authenticated, reject",
        })
        cf.update(self.main_cf_extra)
        return cf

    def master_cf(self):
        text = super().master_cf()
        for addr in self.wrappermode:
            head = f"{format_address(*addr)} inet n - n - - smtpd"
            text = text.replace(head, head + " -o smtpd_tls_wrappermode=yes", 1)
        return text

    def start(self, timeout=20):
        if self.started:
            return self
        if shutil.which("saslpasswd2") is None:
            raise PeerError("saslpasswd2 is missing (sasl2-bin; scripts/lib/deps.sh installs it)")
        # Debian's smtpd reads smtpd.conf from $config_directory/sasl, whatever
        # cyrus_sasl_config_path says; it is written there.
        os.makedirs(self.sasl_dir, exist_ok=True)
        with open(os.path.join(self.sasl_dir, "smtpd.conf"), "w") as f:
            f.write(f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nsasldb_path: {self.sasldb}\n"
                    "mech_list: PLAIN LOGIN\n")
        for user, password in self.users.items():
            subprocess.run(["saslpasswd2", "-c", "-p", "-f", self.sasldb, "-u", self.REALM, user],
                           input=password.encode(), check=True, timeout=scale(10))
        os.chown(self.sasldb, pwd.getpwnam("postfix").pw_uid, -1)
        os.chmod(self.sasldb, 0o600)
        return super().start(timeout)

    def sasl_logins(self):
        """[(method, username)] of every successful AUTH, from the maillog."""
        return re.findall(r"sasl_method=(\w+), sasl_username=([^\s,]+)", self.maillog())


# --------------------------------------------------------------------------------------------
# smtp-sink
# --------------------------------------------------------------------------------------------

class SmtpSink(_Peer):
    """Postfix's smtp-sink on one ip:port, dumping each message to a file.

    rcpt_tempfail: every RCPT gets `soft_reply` (-r RCPT -b, default "451 4.3.0 Try again later")
    rcpt_permfail: every RCPT gets `hard_reply` (-f RCPT -B, default "550 5.1.1 No such user")
    connect_421:   421 and disconnect instead of the greeting (-Q CONNECT)
    extra_args:    more smtp-sink options, e.g. ["-q", "."] (drop the connection after the
                   final dot without replying), ["-w", "5"] (delay the DATA reply), ["-p"] (no
                   PIPELINING), ["-Q", "MAIL"] (421 after MAIL).
    No STARTTLS (smtp-sink has none)."""

    prefix = "subrelay-sink-"

    def __init__(self, address, rcpt_tempfail=False, rcpt_permfail=False, connect_421=False,
                 soft_reply="451 4.3.0 Try again later", hard_reply="550 5.1.1 No such user",
                 hostname="sink.mx.test", extra_args=(), directory=None):
        super().__init__(directory)
        self.ip, self.port = parse_address(address)
        self.hostname = hostname
        self.dump_dir = os.path.join(self.dir, "dump")
        self.log_path = os.path.join(self.dir, "smtp-sink.log")
        args = ["-h", hostname, "-a", "-C", "-F"]  # an MX: no AUTH, XCLIENT, XFORWARD
        if os.geteuid() == 0:
            args += ["-u", "nobody"]
        if rcpt_tempfail:
            args += ["-r", "RCPT", "-b", soft_reply]
        if rcpt_permfail:
            args += ["-f", "RCPT", "-B", hard_reply]
        if connect_421:
            args += ["-Q", "CONNECT"]
        args += list(extra_args)
        self.argv = ["smtp-sink", *args, "-d", os.path.join(self.dump_dir, "%Y%m%d%H%M%S."),
                     format_address(self.ip, self.port), "128"]
        self.proc = None

    def __repr__(self):
        return f"SmtpSink({format_address(self.ip, self.port)}, dir={self.dir})"

    def start(self, timeout=10):
        if self.started:
            return self
        os.makedirs(self.dump_dir, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(self.dump_dir, NOBODY_UID, NOBODY_GID)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        harness._register_proc(self.proc)
        self._register()
        self.started = True
        try:
            wait_listening(self.ip, self.port, timeout, alive=lambda: self.proc.poll() is None)
        except PeerError as e:
            self.stop()
            raise PeerError(f"{e}\nsmtp-sink log:\n{self.log()}")
        return self


    def _open_files(self):
        """Dump files smtp-sink still writes (a transaction in progress)."""
        open_ = set()
        if self.proc is None or self.proc.poll() is not None:
            return open_
        fd_dir = f"/proc/{self.proc.pid}/fd"
        try:
            for fd in os.listdir(fd_dir):
                try:
                    open_.add(os.readlink(os.path.join(fd_dir, fd)))
                except OSError:
                    pass
        except OSError:
            pass
        return open_

    def messages(self):
        """Complete dumped messages, oldest first (by mtime, ties by inode: the dump names
        have one-second resolution): dicts with name, path, raw (the message as
        received, LF line ends), msg, mail_from, mail_args, rcpt_tos, rcpt_args, helo, client,
        dump (the whole file), tls (always None)."""
        busy = self._open_files()
        files = []
        for root, _, names in os.walk(self.dump_dir):
            for n in names:
                p = os.path.join(root, n)
                if p in busy:
                    continue
                try:
                    st = os.stat(p)
                    files.append((st.st_mtime_ns, st.st_ino, p))
                except OSError:
                    pass
        out = []
        for _, _, path in sorted(files):
            with open(path, "rb") as f:
                dump = f.read()
            lines = dump.split(b"\n")
            meta = {"X-Mail-Args": [], "X-Rcpt-Args": [], "X-Helo-Args": [], "X-Client-Addr": []}
            i = 0
            while i < len(lines) and not lines[i].startswith(b"Received:"):
                k, _, v = lines[i].decode(errors="replace").partition(":")
                meta.setdefault(k, []).append(v.strip())
                i += 1
            i += 1  # Received: + its two continuation lines
            while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
                i += 1
            raw = b"\n".join(lines[i:])
            if raw.endswith(b"\n\n"):
                raw = raw[:-1]  # smtp-sink appends one empty line
            mail_args = meta["X-Mail-Args"][0] if meta["X-Mail-Args"] else ""
            out.append({
                "name": os.path.relpath(path, self.dump_dir), "path": path, "raw": raw,
                "msg": _parse(raw), "dump": dump,
                "mail_from": _angle(mail_args.split(" ")[0]) if mail_args else None,
                "mail_args": mail_args,
                "rcpt_tos": [_angle(a.split(" ")[0]) for a in meta["X-Rcpt-Args"]],
                "rcpt_args": meta["X-Rcpt-Args"],
                "helo": meta["X-Helo-Args"][0] if meta["X-Helo-Args"] else None,
                "client": meta["X-Client-Addr"][0] if meta["X-Client-Addr"] else None,
                "tls": None,
            })
        return out

    def wait_for(self, n, timeout=10):
        return self._wait_messages(self.messages, n, timeout, repr(self),
                                   lambda: "smtp-sink log:\n" + self.log()[-3000:])


# --------------------------------------------------------------------------------------------
# aiosmtpd
# --------------------------------------------------------------------------------------------

AIOSINK_SERVER = r'''
"""aiosmtpd receiving MTA for subrelay's tests (written by mta_peers.py; config in argv[1])."""
import asyncio, json, logging, os, re, ssl, sys, time
from aiosmtpd.smtp import SMTP

CFG = json.load(open(sys.argv[1]))
DIR = CFG["dir"]
MSGS = os.path.join(DIR, "msgs")
os.makedirs(MSGS, exist_ok=True)
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(asctime)s %(name)s %(levelname)s %(message)s")
STATE = {"connections": 0, "open": 0, "transactions": 0, "messages": 0,
         "rejected_rcpts": 0, "failed_data": 0, "starttls": 0}
SEQ = [0]
EVENTS = open(os.path.join(DIR, "events.jsonl"), "a", buffering=1)


def atomic_write(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def event(kind, **kw):
    kw["event"] = kind
    kw["time"] = time.time()
    EVENTS.write(json.dumps(kw) + "\n")
    atomic_write(os.path.join(DIR, "stats.json"), json.dumps(STATE).encode())


def sender(addr):
    return "" if addr == "<>" else addr


def local_part(addr):
    return (addr.rsplit("@", 1)[0] if "@" in addr else addr).lower()


def tls_info(server):
    extra = server.session.ssl if server.session else None
    obj = extra.get("ssl_object") if extra else None
    if obj is None and server.transport is not None:
        obj = server.transport.get_extra_info("ssl_object")
    if obj is None:
        return None, None
    cipher = obj.cipher()
    return obj.version(), cipher[0] if cipher else None


DSN_KEYS = ("RET", "ENVID", "NOTIFY", "ORCPT")


def split_dsn(arg):
    """("FROM:<a@b> SIZE=1 RET=HDRS", ...) -> ("FROM:<a@b> SIZE=1", ["RET=HDRS"]): aiosmtpd
    refuses parameters it does not know, so the DSN ones (RFC 3461) are taken out first and
    kept exactly as sent (aiosmtpd upper-cases what it records)."""
    end = arg.rfind(">")
    if end < 0:
        return arg, []
    keep, dsn = [], []
    for p in arg[end + 1:].split():
        (dsn if p.split("=", 1)[0].upper() in DSN_KEYS else keep).append(p)
    return " ".join([arg[:end + 1]] + keep), dsn


class Server(SMTP):
    # DSN (RFC 3461) when the sink offers it: the parameters are recorded, not refused.
    async def smtp_MAIL(self, arg):
        self.dsn_params = []
        if CFG["dsn"] and arg:
            arg, self.dsn_params = split_dsn(arg)
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg):
        self.dsn_params = []
        if CFG["dsn"] and arg:
            arg, self.dsn_params = split_dsn(arg)
        await super().smtp_RCPT(arg)

    def connection_made(self, transport):
        first = self.transport is None
        super().connection_made(transport)
        if first:
            STATE["connections"] += 1
            STATE["open"] += 1
            self.conn_id = STATE["connections"]
            self.txn = 0
            self.gone = False
            event("connect", conn=self.conn_id, peer=list(self.session.peer))
        else:
            STATE["starttls"] += 1
            version, cipher = tls_info(self)
            event("starttls", conn=self.conn_id, tls=version, cipher=cipher)

    def connection_lost(self, error):
        try:
            super().connection_lost(error)
        finally:
            if not getattr(self, "gone", True):
                self.gone = True
                STATE["open"] -= 1
                event("disconnect", conn=self.conn_id, transactions=self.txn)


class Handler:
    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        out = [r for r in responses if not r[4:].upper().startswith("AUTH")]
        extra = list(CFG["ehlo_extra"])
        if CFG["dsn"]:
            extra.append("DSN")
        if CFG["pipelining"]:
            extra.insert(0, "PIPELINING")
        return out[:-1] + ["250-" + e for e in extra] + out[-1:]

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        envelope.mail_from = address  # "<>" for the null sender (aiosmtpd needs it truthy)
        envelope.mail_options.extend(mail_options)
        envelope.dsn_mail = list(getattr(server, "dsn_params", []))
        envelope.dsn_rcpt = {}
        server.txn += 1
        STATE["transactions"] += 1
        event("mail", conn=server.conn_id, txn=server.txn, mail_from=sender(address),
              options=mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        lp = local_part(address)
        if lp.startswith("tempfail"):
            reply = f"451 4.3.0 <{address}>: temporary failure (tempfail)"
        elif lp.startswith("permfail"):
            reply = f"550 5.1.1 <{address}>: no such user (permfail)"
        else:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            getattr(envelope, "dsn_rcpt", {})[address] = list(getattr(server, "dsn_params", []))
            reply = "250 2.1.5 OK"
        if not reply.startswith("250"):
            STATE["rejected_rcpts"] += 1
        event("rcpt", conn=server.conn_id, txn=server.txn, rcpt=address, reply=reply)
        return reply

    async def handle_DATA(self, server, session, envelope):
        lps = [local_part(r) for r in envelope.rcpt_tos]
        delay = 0.0
        for lp in lps:
            m = re.match(r"slow(\d+(?:\.\d+)?)?", lp)
            if m:
                delay = max(delay, float(m.group(1)) if m.group(1) else CFG["slow_seconds"])
        if delay:
            await asyncio.sleep(delay)
        version, cipher = tls_info(server)
        reply = None
        if any(lp.startswith("datafail") for lp in lps):
            reply = "554 5.6.0 message refused (datafail)"
        elif any(lp.startswith("tempdata") for lp in lps):
            reply = "451 4.3.0 try again later (tempdata)"
        if reply:
            STATE["failed_data"] += 1
            event("data", conn=server.conn_id, txn=server.txn, reply=reply,
                  size=len(envelope.original_content))
            return reply
        SEQ[0] += 1
        name = "%06d" % SEQ[0]
        STATE["messages"] += 1
        atomic_write(os.path.join(MSGS, name + ".eml"), envelope.original_content)
        meta = {
            "seq": SEQ[0], "mail_from": sender(envelope.mail_from),
            "mail_options": envelope.mail_options, "rcpt_tos": envelope.rcpt_tos,
            "rcpt_options": envelope.rcpt_options, "smtputf8": envelope.smtp_utf8,
            "dsn_mail": getattr(envelope, "dsn_mail", []), "dsn_rcpt": getattr(envelope, "dsn_rcpt", {}),
            "tls": version, "cipher": cipher,
            "peer": list(session.peer) if session.peer else None, "helo": session.host_name,
            "connection": server.conn_id, "txn": server.txn,
            "size": len(envelope.original_content), "time": time.time(), "delay": delay,
        }
        # the JSON last: its presence means the message is complete
        atomic_write(os.path.join(MSGS, name + ".json"), json.dumps(meta).encode())
        reply = f"250 2.0.0 OK queued as {name}"
        event("data", conn=server.conn_id, txn=server.txn, reply=reply, size=meta["size"])
        return reply


async def main():
    loop = asyncio.get_running_loop()
    ctx = None
    if CFG["cert"]:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(CFG["cert"], CFG["key"])
        if CFG["tls_min"]:
            ctx.minimum_version = getattr(ssl.TLSVersion, CFG["tls_min"])
        if CFG["tls_max"]:
            ctx.maximum_version = getattr(ssl.TLSVersion, CFG["tls_max"])
    handler = Handler()

    def factory():
        return Server(handler, hostname=CFG["hostname"], tls_context=ctx,
                      require_starttls=CFG["require_starttls"],
                      enable_SMTPUTF8=CFG["smtputf8"], data_size_limit=CFG["data_size_limit"],
                      timeout=CFG["timeout"], loop=loop)

    await loop.create_server(factory, host=CFG["host"], port=CFG["port"], reuse_address=True)
    atomic_write(os.path.join(DIR, "stats.json"), json.dumps(STATE).encode())
    atomic_write(os.path.join(DIR, "ready"), str(os.getpid()).encode())
    await asyncio.Event().wait()


asyncio.run(main())
'''


class AioSink(_Peer):
    """An aiosmtpd receiving MTA in its own /usr/bin/python3 process.

    address:          "127.0.0.31:2525" or (ip, port)
    cert, key:        STARTTLS certificate (a Cert, paths, or None for harness.pki()'s);
                      starttls=False offers no STARTTLS.
    require_starttls: 530 for MAIL/RCPT/DATA before STARTTLS.
    tls_min, tls_max: "TLSv1_2" / "TLSv1_3" (ssl.TLSVersion names) to restrict the server.
    data_size_limit:  advertised SIZE and enforced limit (aiosmtpd default 32 MiB; 0 = none).
    smtputf8:         advertise SMTPUTF8. pipelining: advertise PIPELINING (aiosmtpd 1.4.3
                      handles pipelined commands but does not advertise it itself).
    ehlo_extra:       more EHLO keywords to advertise (AUTH is never advertised).
    dsn:              advertise DSN (RFC 3461) and accept RET/ENVID/NOTIFY/ORCPT, recorded as
                      sent in messages()' dsn_mail and dsn_rcpt ({rcpt: [params]}). Without
                      it, any DSN parameter gets aiosmtpd's 555.
    slow_seconds:     DATA delay for a "slow" recipient without a number.

    Magic local parts (any domain, case-insensitive prefix):
      tempfail* -> 451 4.3.0 at RCPT;  permfail* -> 550 5.1.1 at RCPT
      slow*     -> the reply to the final dot waits slow_seconds (slow5@ -> 5 s, slow0.5@ ...)
      datafail* -> RCPT accepted, 554 5.6.0 after the final dot (nothing stored)
      tempdata* -> RCPT accepted, 451 4.3.0 after the final dot (nothing stored)
    Each accepted message is msgs/NNNNNN.eml (exact bytes) plus NNNNNN.json, written last."""

    prefix = "subrelay-aiosink-"

    def __init__(self, address, cert=None, key=None, starttls=True, require_starttls=False,
                 tls_min=None, tls_max=None, data_size_limit=None, smtputf8=True,
                 pipelining=True, ehlo_extra=(), slow_seconds=3.0, hostname="aio.mx.test",
                 timeout=300, directory=None, dsn=False):
        super().__init__(directory)
        self.ip, self.port = parse_address(address)
        if isinstance(cert, Cert):
            cert, key = cert.cert, cert.key
        if starttls and cert is None:
            cert, key = harness.pki().cert, harness.pki().key
        self.config = {
            "dir": self.dir, "host": self.ip, "port": self.port, "hostname": hostname,
            "cert": cert if starttls else None, "key": key if starttls else None,
            "require_starttls": bool(require_starttls and starttls),
            "tls_min": tls_min, "tls_max": tls_max,
            "data_size_limit": 33554432 if data_size_limit is None else data_size_limit,
            "smtputf8": smtputf8, "pipelining": pipelining, "ehlo_extra": list(ehlo_extra),
            "slow_seconds": slow_seconds, "timeout": timeout, "dsn": bool(dsn),
        }
        self.msg_dir = os.path.join(self.dir, "msgs")
        self.log_path = os.path.join(self.dir, "aiosink.log")
        self.proc = None

    def __repr__(self):
        return f"AioSink({format_address(self.ip, self.port)}, dir={self.dir})"

    def start(self, timeout=15):
        if self.started:
            return self
        script = os.path.join(self.dir, "aiosink_server.py")
        with open(script, "w") as f:
            f.write(AIOSINK_SERVER)
        cfg = os.path.join(self.dir, "config.json")
        with open(cfg, "w") as f:
            json.dump(self.config, f, indent=1)
        ready = os.path.join(self.dir, "ready")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([PYTHON, "-u", script, cfg], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        harness._register_proc(self.proc)
        self._register()
        self.started = True
        deadline = time.monotonic() + scale(timeout)
        while not os.path.exists(ready):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise PeerError(f"{self!r} did not start (exit {self.proc.returncode}):\n"
                                f"{self.log()}")
            time.sleep(0.02)
        wait_listening(self.ip, self.port, timeout, alive=lambda: self.proc.poll() is None)
        return self


    def messages(self):
        """Accepted messages in order: the JSON envelope (seq, mail_from, mail_options,
        rcpt_tos, rcpt_options, dsn_mail, dsn_rcpt, smtputf8, tls, cipher, peer, helo, connection, txn, size,
        time, delay) plus name, path, raw (exact bytes), msg."""
        out = []
        try:
            names = sorted(n for n in os.listdir(self.msg_dir) if n.endswith(".json"))
        except FileNotFoundError:
            return out
        for n in names:
            path = os.path.join(self.msg_dir, n[:-5] + ".eml")
            try:
                with open(os.path.join(self.msg_dir, n)) as f:
                    meta = json.load(f)
                with open(path, "rb") as f:
                    raw = f.read()
            except (OSError, ValueError):
                continue
            meta.update(name=n[:-5], path=path, raw=raw, msg=_parse(raw))
            out.append(meta)
        return out

    def wait_for(self, n, timeout=10):
        return self._wait_messages(self.messages, n, timeout, repr(self),
                                   lambda: f"stats {self.stats()}\nlog tail:\n" +
                                   self.log()[-3000:])

    def stats(self):
        """{"connections", "open", "transactions" (MAIL accepted), "messages" (stored),
        "rejected_rcpts", "failed_data", "starttls"} since start."""
        try:
            with open(os.path.join(self.dir, "stats.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def connections(self):
        return self.stats().get("connections", 0)

    def transactions(self):
        return self.stats().get("transactions", 0)

    def events(self):
        """Every connect/starttls/mail/rcpt/data/disconnect event as a dict (with "conn")."""
        out = []
        for line in _read(os.path.join(self.dir, "events.jsonl")).splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line being written
        return out

    def wait_idle(self, timeout=10):
        """Waits until no connection is open (e.g. the client sent QUIT after its batch)."""
        deadline = time.monotonic() + scale(timeout)
        while self.stats().get("open", 0) != 0:
            if time.monotonic() > deadline:
                raise PeerError(f"{self!r}: connections still open after {scale(timeout):.0f}s: "
                                f"{self.stats()}")
            time.sleep(0.05)


class OneMxTestCase(harness.ServerTestCase):
    """A test class with unbound serving ZONES (or what unbound_zones() returns) and one
    aiosmtpd MX on MX_IP with a certificate for MX_NAMES (SINK_OPTIONS go to AioSink).
    The class gets cls.dns, cls.port (the MX's port) and cls.sink; both stop with the class."""

    ZONES = []
    MX_IP = "127.0.0.31"
    MX_NAMES = ["mx.sink.test"]
    SINK_OPTIONS = {}

    @classmethod
    def unbound_zones(cls):
        return cls.ZONES

    @classmethod
    def setUpClass(cls):
        from peers import Unbound  # peers imports this module's neighbours; import late
        cls.dns = Unbound(cls.unbound_zones())
        cls.port = free_port(cls.MX_IP)
        cls.sink = AioSink(f"{cls.MX_IP}:{cls.port}", cert=make_cert(list(cls.MX_NAMES)), **cls.SINK_OPTIONS)
        cls.sink.start()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        cls.sink.stop()
        cls.dns.close()
