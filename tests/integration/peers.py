"""Real peers for integration tests: Unbound, a private unbound instance on loopback;
DnssecTestbed, signed zones it serves and validates; HttpsPolicyServer, an HTTPS server for
MTA-STS policies (RFC 8461 3.3).

    from peers import Unbound, testbed_zones
    dns = Unbound(testbed_zones())      # starts it, waits until it answers
    dns.port, dns.address ("127.0.0.1:5353" form), dns.close()

    web = HttpsPolicyServer(cert_path, key_path)   # 127.0.0.1, a free port
    web.enforce("example.test", ["mx1.example.test"])   # or testing/none/missing/redirect/...
    web.port, web.hits("example.test"), web.close()

    bed = DnssecTestbed()               # keys and zones made with ldns-keygen / ldns-signzone
    dns = Unbound(bed.zones(), validate=True)

Standard library only (run by /usr/bin/python3). unbound listens on 127.0.0.1 only, on
port 5353 when that is free for both UDP and TCP, else on a free port the kernel picks.
Every wait is bounded. Instances are stopped by close() and, failing that, at exit. The
zones follow docs/testbed.md; local-zone/local-data syntax is unbound.conf(5)'s.
(MTA peers live in mta_peers.py.)
"""

import atexit
import collections
import http.server
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time

LOOPBACK = "127.0.0.1"
DEFAULT_DNS_PORT = 5353
UNBOUND = shutil.which("unbound") or "/usr/sbin/unbound"
LDNS_KEYGEN = shutil.which("ldns-keygen") or "/usr/bin/ldns-keygen"
LDNS_SIGNZONE = shutil.which("ldns-signzone") or "/usr/bin/ldns-signzone"

_live = []
_live_lock = threading.Lock()


def _stop_all():
    with _live_lock:
        peers = list(_live)
    for p in peers:
        try:
            p.close()
        except Exception:
            pass


atexit.register(_stop_all)


def _port_free(port):
    """Free on 127.0.0.1 for both UDP and TCP."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                return False
    return True


def _pick_port(preferred):
    if preferred and _port_free(preferred):
        return preferred
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
        if _port_free(port):
            return port
    raise RuntimeError("no free port for unbound on 127.0.0.1")


def dns_query_packet(name, qtype=1, qid=0x1234):
    """A minimal RFC 1035 query (RD set), for readiness probes."""
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\x00" + struct.pack("!HH", qtype, 1)


def testbed_zones():
    """The zones of docs/testbed.md plus a CNAME chain and a name with 80 A records (more than
    fits in 1232 bytes of UDP: the answer is truncated, TC=1, and must be fetched over TCP)."""
    lines = [
        'local-zone: "mx.test." static',
        'local-data: "mx.test. 300 IN MX 10 mx1.mx.test."',
        'local-data: "mx.test. 300 IN MX 20 mx2.mx.test."',
        'local-data: "mx.test. 300 IN SOA ns.mx.test. admin.mx.test. 1 3600 600 86400 30"',
        'local-data: "mx1.mx.test. 300 IN A 127.0.0.11"',
        'local-data: "mx2.mx.test. 300 IN A 127.0.0.12"',
        'local-data: "mx3.mx.test. 300 IN AAAA ::1"',
        'local-zone: "nomx.test." static',
        'local-data: "nomx.test. 300 IN A 127.0.0.11"',
        'local-data: "nomx.test. 300 IN SOA ns.nomx.test. admin.nomx.test. 1 3600 600 86400 30"',
        'local-zone: "nullmx.test." static',
        'local-data: "nullmx.test. 300 IN MX 0 ."',
        'local-zone: "badmx.test." static',
        'local-data: "badmx.test. 300 IN MX 10 nowhere.badmx.test."',
        'local-zone: "timeout.test." deny',
        'local-zone: "refused.test." refuse',
        'local-zone: "servfail.test." transparent',
        'local-data: \'sel._domainkey.example.test. 300 IN TXT "first part, " "second part"\'',
        # CNAME chain: www -> alias1 -> alias2 -> host (A and AAAA), and a loop.
        'local-zone: "cname.test." static',
        'local-data: "www.cname.test. 300 IN CNAME alias1.cname.test."',
        'local-data: "alias1.cname.test. 300 IN CNAME alias2.cname.test."',
        'local-data: "alias2.cname.test. 120 IN CNAME host.cname.test."',
        'local-data: "host.cname.test. 300 IN A 127.0.0.21"',
        'local-data: "host.cname.test. 300 IN AAAA ::1"',
        'local-data: "mail.cname.test. 300 IN CNAME mx.test."',
        # 80 A records: about 1.3 kB over UDP, over the 1232-byte EDNS size.
        'local-zone: "big.test." static',
    ]
    for i in range(80):
        lines.append(f'local-data: "many.big.test. 300 IN A 127.0.{i // 250 + 1}.{i % 250 + 1}"')
    forward = [
        "forward-zone:",
        '    name: "servfail.test."',
        "    forward-addr: 127.0.0.1@9",
        "    forward-tcp-upstream: yes",
    ]
    return lines, forward


class Unbound:
    """unbound on 127.0.0.1:port with the given server-clause lines (local-zone/local-data)
    and extra top-level clauses (forward-zone...). `zones` is a list of lines, or the
    (lines, extra) pair testbed_zones() returns."""

    def __init__(self, zones=None, port=DEFAULT_DNS_PORT, workdir=None, start=True, timeout=10,
                 validate=False):
        # validate: run unbound's DNSSEC validator before the iterator, so answers from
        # signed auth-zones carry AD=1 (or SERVFAIL when bogus): see DnssecTestbed.
        self.modules = "validator iterator" if validate else "iterator"
        if zones is None:
            zones = testbed_zones()
        if isinstance(zones, tuple):
            self.local_lines, self.extra_lines = list(zones[0]), list(zones[1])
        else:
            self.local_lines, self.extra_lines = list(zones), []
        self.preferred_port = port
        self.port = None
        self.own_dir = workdir is None
        self.dir = workdir or tempfile.mkdtemp(prefix="subrelay-unbound-")
        self.conf = os.path.join(self.dir, "unbound.conf")
        self.log = os.path.join(self.dir, "unbound.log")
        self.proc = None
        if start:
            self.start(timeout=timeout)

    @property
    def address(self):
        return f"{LOOPBACK}:{self.port}"

    def write_config(self):
        server = [
            "server:",
            f"    interface: {LOOPBACK}@{self.port}",
            f"    port: {self.port}",
            "    do-ip6: no",
            "    do-tcp: yes",
            '    username: ""',
            '    chroot: ""',
            f'    directory: "{self.dir}"',
            "    do-daemonize: no",
            f'    pidfile: "{os.path.join(self.dir, "unbound.pid")}"',
            f'    logfile: "{self.log}"',
            "    use-syslog: no",
            "    verbosity: 1",
            f'    module-config: "{self.modules}"',
            "    do-not-query-localhost: no",
            "    access-control: 127.0.0.0/8 allow",
            "    num-threads: 1",
            "    so-reuseport: no",
            "    edns-buffer-size: 1232",
            "    max-udp-size: 1232",
            "    minimal-responses: yes",
            "    tcp-upstream: no",
            "    root-hints: \"\"",
        ]
        server += ["    " + line for line in self.local_lines]
        with open(self.conf, "w") as f:
            f.write("\n".join(server + self.extra_lines) + "\n")

    def start(self, timeout=10):
        deadline = time.monotonic() + timeout
        last_err = ""
        for _ in range(5):
            self.port = _pick_port(self.preferred_port if self.port is None else None)
            self.write_config()
            if os.path.exists(UNBOUND + "-checkconf"):
                check = subprocess.run([UNBOUND + "-checkconf", self.conf], capture_output=True,
                                       timeout=30)
                if check.returncode != 0:
                    raise RuntimeError(f"unbound-checkconf: {check.stdout.decode()}{check.stderr.decode()}")
            self.proc = subprocess.Popen([UNBOUND, "-d", "-c", self.conf], stdout=subprocess.DEVNULL,
                                         stderr=open(os.path.join(self.dir, "stderr.log"), "wb"),
                                         start_new_session=True)
            with _live_lock:
                _live.append(self)
            if self._wait_ready(deadline):
                return self
            last_err = self.log_text()
            self._kill()
            if time.monotonic() > deadline:
                break
        raise RuntimeError(f"unbound did not answer on {self.address}:\n{last_err}")

    def _wait_ready(self, deadline):
        probe = dns_query_packet("mx.test", 15)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(0.2)
                try:
                    s.sendto(probe, (LOOPBACK, self.port))
                    data, _ = s.recvfrom(4096)
                    if len(data) >= 12 and data[:2] == probe[:2]:
                        return True
                except OSError:
                    pass
            time.sleep(0.05)
        return False

    def log_text(self):
        out = ""
        for name in ("unbound.log", "stderr.log"):
            try:
                with open(os.path.join(self.dir, name), errors="replace") as f:
                    out += f.read()
            except OSError:
                pass
        return out

    def _kill(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def close(self):
        self._kill()
        with _live_lock:
            if self in _live:
                _live.remove(self)
        if self.own_dir and not os.environ.get("SUBRELAY_KEEP_TMP"):
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------------------------
# MTA-STS policy host
# --------------------------------------------------------------------------------------------

def static_mail_zone(domain, mx_ip, web_ip=None, sts_id=None):
    """unbound local-data lines for a static (unsigned) zone `domain` with MX 10 mx.<domain>
    at mx_ip; with web_ip the MTA-STS policy host mta-sts.<domain> there, with sts_id the
    "_mta-sts" TXT record "v=STSv1; id=<sts_id>;" (RFC 8461 3.1)."""
    lines = [
        f'local-zone: "{domain}." static',
        f'local-data: "{domain}. 300 IN SOA ns.{domain}. admin.{domain}. 1 3600 600 86400 30"',
        f'local-data: "{domain}. 300 IN MX 10 mx.{domain}."',
        f'local-data: "mx.{domain}. 300 IN A {mx_ip}"',
    ]
    if web_ip:
        lines.append(f'local-data: "mta-sts.{domain}. 300 IN A {web_ip}"')
    if sts_id:
        lines.append(f"local-data: '_mta-sts.{domain}. 300 IN TXT \"v=STSv1; id={sts_id};\"'")
    return lines


def sts_policy(mode, mx=(), max_age=604800, line_end="\r\n"):
    """The text of an MTA-STS policy (RFC 8461 3.2)."""
    lines = ["version: STSv1", f"mode: {mode}"] + [f"mx: {m}" for m in mx] + [f"max_age: {max_age}"]
    return line_end.join(lines) + line_end


class HttpsPolicyServer:
    """An HTTPS server on ip:port (127.0.0.1 and a free port by default) that serves
    /.well-known/mta-sts.txt for the policy hosts "mta-sts.<domain>" it was told about,
    chosen by the Host header, with a certificate chosen by SNI (the default `cert`/`key`,
    or a per-domain one: a certificate the client must not trust). Each domain gets one of:

      enforce(d, mx) / testing(d, mx) / none(d)    a policy, 200, text/plain
      serve(d, body, status, content_type, headers) anything else
      missing(d)                                   404 (no policy published)
      redirect(d, to_domain)                       301 to to_domain's policy URL
      oversized(d, size)                           200 text/plain, a body of `size` bytes
      html(d, mx)                                  a valid policy as text/html
      bad_certificate(d, cert, key)                a policy behind another certificate

    hits(d) counts the requests for d's policy host (any path); requests() lists
    (host, path) in order; connections counts accepted connections. Threads only: a request is served in its own thread; close()
    stops it. Only loopback addresses are accepted."""

    def __init__(self, cert, key, ip=LOOPBACK, port=0, start=True):
        if not ip.startswith("127."):
            raise ValueError("HttpsPolicyServer listens on loopback only")
        self.ip = ip
        self.port = port
        self.cert, self.key = cert, key
        self._routes = {}      # host -> (status, content_type, body bytes, extra headers)
        self._sni = {}         # host -> SSLContext
        self._lock = threading.Lock()
        self._hits = collections.Counter()
        self._log = []
        self._server = None
        self._thread = None
        self.connections = 0          # TCP connections accepted
        self.handshake_failures = 0   # seen by the server (TLS 1.3 clients reject a
                                      # certificate after the server's side is done)
        if start:
            self.start()

    @staticmethod
    def _context(cert, key):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert, key)
        return ctx

    # -- what to serve ------------------------------------------------------------------

    def serve(self, domain, body, status=200, content_type="text/plain", headers=()):
        if isinstance(body, str):
            body = body.encode()
        with self._lock:
            self._routes["mta-sts." + domain] = (status, content_type, body, list(headers))

    def enforce(self, domain, mx, max_age=604800):
        self.serve(domain, sts_policy("enforce", mx, max_age))

    def testing(self, domain, mx, max_age=604800):
        self.serve(domain, sts_policy("testing", mx, max_age))

    def none(self, domain, max_age=604800):
        self.serve(domain, sts_policy("none", (), max_age))

    def missing(self, domain):
        self.serve(domain, "no policy here\n", status=404)

    def redirect(self, domain, to_domain):
        self.serve(domain, "moved\n", status=301,
                   headers=[("Location", f"https://mta-sts.{to_domain}/.well-known/mta-sts.txt")])

    def oversized(self, domain, size=100 * 1024, mx=("mx.example.test",)):
        body = sts_policy("enforce", mx)
        body += "x_padding: " + "a" * max(0, size - len(body) - 14) + "\r\n"
        self.serve(domain, body)

    def html(self, domain, mx):
        self.serve(domain, sts_policy("enforce", mx), content_type="text/html")

    def bad_certificate(self, domain, cert, key, mx=("mx.example.test",)):
        self.enforce(domain, mx)
        with self._lock:
            self._sni["mta-sts." + domain] = self._context(cert, key)

    # -- counters -----------------------------------------------------------------------

    def hits(self, domain):
        with self._lock:
            return self._hits["mta-sts." + domain]

    def requests(self):
        with self._lock:
            return list(self._log)

    # -- life -------------------------------------------------------------------------------

    def start(self):
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10

            def log_message(self, *args):
                pass

            def do_GET(self):
                host = (self.headers.get("Host") or "").split(":")[0].lower()
                with owner._lock:
                    owner._hits[host] += 1
                    owner._log.append((host, self.path))
                    route = owner._routes.get(host)
                if route is None or self.path != "/.well-known/mta-sts.txt":
                    route = (404, "text/plain", b"not found\n", [])
                status, ctype, body, headers = route
                self.send_response(status)
                if ctype:
                    self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass  # the client stopped reading (a body over its cap)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def get_request(self):
                sock, addr = self.socket.accept()
                with owner._lock:
                    owner.connections += 1
                sock.settimeout(10)
                try:
                    tls = owner._default_ctx.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError):
                    with owner._lock:
                        owner.handshake_failures += 1
                    sock.close()
                    raise
                return tls, addr

            def handle_error(self, request, client_address):
                pass

        ctx = self._context(self.cert, self.key)

        def sni(sslsock, server_name, _ctx):
            with owner._lock:
                other = owner._sni.get((server_name or "").lower())
            if other is not None:
                sslsock.context = other

        ctx.sni_callback = sni
        self._default_ctx = ctx
        self._server = Server((self.ip, self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)
        self._thread.start()
        with _live_lock:
            _live.append(self)

    def close(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with _live_lock:
            if self in _live:
                _live.remove(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
class DnssecTestbed:
    """Zones for DNSSEC and DANE tests, for one validating unbound:

        bed = DnssecTestbed()                       # or DnssecTestbed(tlsa=["3 1 1 <hex>"])
        dns = Unbound(bed.zones(), validate=True)
        ...
        dns.close(); bed.close()

      signed.test    signed with a fresh ECDSA P-256 key (ldns-keygen, ldns-signzone, NSEC);
                     the key's DS is unbound's trust anchor, so answers come with AD=1, and so
                     do denials (NXDOMAIN / NODATA proven by NSEC).
      unsigned.test  not signed, declared domain-insecure: the same records without AD.
      bogus.test     signed and anchored like signed.test, but the RRSIG over its TLSA RRset
                     is corrupted after signing: SERVFAIL (with CD=1 the data still comes back).

    Each zone has MX 10 mx.<zone>, mx.<zone> A 127.0.0.3x and _25._tcp.mx.<zone> TLSA with
    the records given (RFC 7672 2.2.3 names). signed.test also has _25._tcp.mx2 CNAME to
    _25._tcp.mx (a secure chain), _25._tcp.mx3 CNAME into unsigned.test (a chain that ends
    insecure) and nodane.signed.test, a host without TLSA records.

    One unbound plays both parts: each zone is an `auth-zone` with `for-upstream: yes` and
    `for-downstream: no`, which makes unbound use the zone file as if it had fetched the data
    from the zone's servers, so the validator module checks it like any other answer (a
    local-zone would be served before validation and never get AD). `local-zone: "test."
    nodefault` lifts unbound's built-in RFC 6761 answer (NXDOMAIN) for test. names. There
    are no root hints: names outside these zones fail (SERVFAIL) unless Unbound is also
    given local zones."""

    ZONES = ("signed.test", "unsigned.test", "bogus.test")
    DEFAULT_TLSA = ("3 1 1 8cb0fc6c527506a053f4f14c8464bebbd6dede2738d11468dd953d7d6a3021f1",)

    def __init__(self, tlsa=DEFAULT_TLSA, workdir=None, extra=None):
        self.tlsa = list(tlsa)
        # More records per zone, zone-file lines relative to the zone ("_smtp._tls IN TXT ...").
        self.extra = dict(extra or {})
        self.own_dir = workdir is None
        self.dir = workdir or tempfile.mkdtemp(prefix="subrelay-dnssec-")
        self.zonefiles = {}
        self.trust_anchors = []  # DS records as one-line strings
        for i, zone in enumerate(self.ZONES):
            path = os.path.join(self.dir, zone + ".zone")
            with open(path, "w") as f:
                f.write(self._zone_text(zone, 31 + 10 * i))
            if zone == "unsigned.test":
                self.zonefiles[zone] = path
                continue
            self.zonefiles[zone] = self._sign(zone, path)
            if zone == "bogus.test":
                self._corrupt_signature(self.zonefiles[zone], "TLSA")

    def _zone_text(self, zone, host):
        lines = [
            f"$ORIGIN {zone}.",
            "$TTL 300",
            f"@ IN SOA ns.{zone}. admin.{zone}. 1 3600 600 86400 30",
            f"@ IN NS ns.{zone}.",
            "ns IN A 127.0.0.1",
            f"@ IN MX 10 mx.{zone}.",
            f"mx IN A 127.0.0.{host}",
        ]
        lines += [f"_25._tcp.mx IN TLSA {t}" for t in self.tlsa]
        if zone == "signed.test":
            lines += [
                f"mx2 IN A 127.0.0.{host + 1}",
                "_25._tcp.mx2 IN CNAME _25._tcp.mx.signed.test.",
                f"mx3 IN A 127.0.0.{host + 2}",
                "_25._tcp.mx3 IN CNAME _25._tcp.mx.unsigned.test.",
                f"nodane IN A 127.0.0.{host + 3}",
            ]
        lines += list(self.extra.get(zone, ()))
        return "\n".join(lines) + "\n"

    def _run(self, argv):
        proc = subprocess.run(argv, cwd=self.dir, capture_output=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
        return proc.stdout.decode()

    def _sign(self, zone, path):
        # One key with the SEP flag (-k) signs everything: enough for a validator, which only
        # needs the DNSKEY RRset to be signed by a key matching the trust anchor's DS.
        base = self._run([LDNS_KEYGEN, "-a", "ECDSAP256SHA256", "-k", zone]).strip()
        with open(os.path.join(self.dir, base + ".ds")) as f:
            self.trust_anchors.append(" ".join(f.read().split()))
        self._run([LDNS_SIGNZONE, "-o", zone, path, base])
        return path + ".signed"

    @staticmethod
    def _corrupt_signature(path, covered):
        """Flips the first base64 character of the signature of every RRSIG over `covered`."""
        out = []
        with open(path) as f:
            for line in f:
                fields = line.split()
                if len(fields) > 5 and fields[3] == "RRSIG" and fields[4] == covered:
                    sig = fields[-1]
                    fields[-1] = ("B" if sig[0] != "B" else "C") + sig[1:]
                    line = "\t".join(fields) + "\n"
                out.append(line)
        with open(path, "w") as f:
            f.writelines(out)

    def zones(self, extra_local=()):
        """(server-clause lines, top-level clauses) for Unbound(..., validate=True)."""
        lines = ['local-zone: "test." nodefault', 'domain-insecure: "unsigned.test."']
        lines += [f'trust-anchor: "{ds}"' for ds in self.trust_anchors]
        lines += list(extra_local)
        clauses = []
        for zone, path in self.zonefiles.items():
            clauses += [
                "auth-zone:",
                f'    name: "{zone}."',
                f'    zonefile: "{path}"',
                "    for-downstream: no",
                "    for-upstream: yes",
                "    fallback-enabled: no",
            ]
        return lines, clauses

    def close(self):
        if self.own_dir and not os.environ.get("SUBRELAY_KEEP_TMP"):
            shutil.rmtree(self.dir, ignore_errors=True)
