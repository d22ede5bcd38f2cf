"""The installed systemd unit (build/subrelay.service, configured from
systemd/subrelay.service.in): `systemd-analyze security --offline=yes` rates it 2.0 or lower,
it keeps what the service needs (Type=notify, the watchdog, CAP_NET_BIND_SERVICE, its state
and configuration directories), every directive is explained by a comment, and every system
call `serve` makes while it accepts, queues, tries a delivery, reloads and stops is allowed by
the unit's SystemCallFilter= (checked under strace with systemd-analyze's own lists)."""

import os
import re
import signal
import subprocess
import time
import urllib.request

import harness
from harness import Account, make_message

UNIT = os.environ.get("SUBRELAY_UNIT", "")
MAX_EXPOSURE = 2.0


def unit_text():
    with open(UNIT) as f:
        return f.read()


def service_directives():
    """(key, value, explained) for each line of the [Service] section; explained: the line
    right above is a comment, or the same key (a directive given twice, like ExecReload=)."""
    out, section, above = [], None, None
    for line in unit_text().splitlines():
        s = line.strip()
        if s.startswith("["):
            section, above = s, None
            continue
        if not s:
            above = None
            continue
        if s.startswith("#"):
            above = "#"
            continue
        key, _, value = s.partition("=")
        if section == "[Service]":
            out.append((key, value, above in ("#", key)))
        above = key
    return out


def expand_filter_set(name, cache={}):
    """The system call names in a systemd-analyze syscall-filter set, nested sets expanded."""
    if name not in cache:
        proc = harness.run(["systemd-analyze", "syscall-filter", name], check=True)
        names = set()
        for line in proc.stdout.decode().splitlines()[1:]:
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            names |= expand_filter_set(s) if s.startswith("@") else {s}
        cache[name] = names
    return cache[name]


class UnitHardening(harness.ServerTestCase):
    def test_unit_is_the_configured_one(self):
        self.assertTrue(UNIT and os.path.isfile(UNIT), f"SUBRELAY_UNIT={UNIT!r} is not a file")
        text = unit_text()
        self.assertNotIn("@bindir@", text)
        self.assertNotIn("@docdir@", text)
        for m in re.finditer(r"^Exec\w+=(\S+)", text, re.M):
            self.assertTrue(m.group(1).startswith("/"), m.group(0))

    def test_exposure_level_at_most_2(self):
        proc = harness.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", UNIT])
        out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
        self.assertIsNotNone(m, f"no exposure level in:\n{out}")
        level = float(m.group(1))
        print(f"systemd-analyze security: overall exposure level {level}")
        self.assertLessEqual(level, MAX_EXPOSURE, out)

    def test_what_the_service_needs_is_kept(self):
        d = {}
        for key, value, _ in service_directives():
            d.setdefault(key, []).append(value)
        self.assertEqual(d["Type"], ["notify"])
        self.assertEqual(d["NotifyAccess"], ["main"])
        self.assertEqual(d["WatchdogSec"], ["30s"])
        self.assertEqual(d["AmbientCapabilities"], ["CAP_NET_BIND_SERVICE"])
        self.assertEqual(d["CapabilityBoundingSet"], ["CAP_NET_BIND_SERVICE"])
        # A user namespace would take CAP_NET_BIND_SERVICE away (ports 587 and 465).
        self.assertNotIn("PrivateUsers", d)
        # Delivery reaches any MX host: no IP address allow list, no private network.
        self.assertNotIn("IPAddressDeny", d)
        self.assertNotIn("PrivateNetwork", d)
        self.assertEqual(d["StateDirectory"], ["subrelay"])
        self.assertEqual(d["StateDirectoryMode"], ["0700"])
        self.assertEqual(d["ConfigurationDirectory"], ["subrelay"])
        families = set(d["RestrictAddressFamilies"][0].split())
        self.assertEqual(families, {"AF_INET", "AF_INET6", "AF_UNIX"})
        self.assertIn("~@privileged @resources", d["SystemCallFilter"])

    def test_every_directive_is_explained(self):
        unexplained = [key for key, _, explained in service_directives() if not explained]
        self.assertEqual(unexplained, [], "directives without a comment line above them")

    def test_syscalls_serve_makes_pass_the_filter(self):
        d = {}
        for key, value, _ in service_directives():
            d.setdefault(key, []).append(value)
        allowed = set()
        for value in d["SystemCallFilter"]:
            deny = value.startswith("~")
            names = set()
            for item in value.lstrip("~").split():
                names |= expand_filter_set(item) if item.startswith("@") else {item}
            allowed = allowed - names if deny else allowed | names

        srv = harness.Server(accounts=[Account("webshop", "pw-webshop-1", ["@shop.test"]),
                                       Account("out", "pw-out-1", ["@out.test"], mode="deliver")],
                             listeners=("starttls", "implicit"))
        # The metrics listener's thread (libmicrohttpd) is under the filter too. Its port is
        # none of the listeners' (serve is started by hand here, without Server.start's
        # retry on a port clash).
        srv.ports = harness.free_ports(2)
        metrics_port = harness.free_ports(1, exclude=srv.ports + [srv.dead_smtp_port])[0]
        srv.extra_config["metrics"] = {"address": f"127.0.0.1:{metrics_port}"}
        cfg = srv.write_config()
        trace = os.path.join(srv.workdir, "strace.out")
        log = os.path.join(srv.workdir, "serve-strace.log")
        srv.logs.append(log)
        notify = os.path.join(srv.workdir, "no-notify.sock")  # nobody listens: sendto fails
        with open(log, "wb") as errf:
            proc = subprocess.Popen(["strace", "-f", "-qq", "-o", trace, harness.BIN, "serve", "-c", cfg],
                                    stdin=subprocess.DEVNULL, stdout=errf, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, NOTIFY_SOCKET=notify, WATCHDOG_USEC="2000000"))
        harness._register_proc(proc)
        srv.proc = proc  # dumped on failure
        srv._wait_ready(30)
        conn = harness.smtp_starttls(srv.port("starttls"), ctx=harness.client_context())
        conn.login("webshop", "pw-webshop-1")
        conn.sendmail("a@shop.test", ["b@example.org"], make_message("a@shop.test", ["b@example.org"], "s"))
        conn.quit()
        conn = harness.smtp_ssl(srv.port("implicit"), ctx=harness.client_context())
        conn.login("out", "pw-out-1")
        conn.sendmail("a@out.test", ["b@example.org"], make_message("a@out.test", ["b@example.org"], "d"))
        conn.quit()
        srv.wait_log(r"deferred id=", timeout=20)  # the delivery loop resolved and gave up
        maddr = srv.extra_config["metrics"]["address"]
        with urllib.request.urlopen(f"http://{maddr}/metrics", timeout=harness.scale(10)) as r:
            self.assertIn(b"subrelay_messages_accepted_total", r.read())
        time.sleep(2.5)  # a flush of the meters and a few watchdog checks
        # strace forwards nothing: the signals go to serve itself (strace's only child).
        child = int(subprocess.run(["pgrep", "-P", str(proc.pid)], stdout=subprocess.PIPE).stdout.split()[0])
        os.kill(child, signal.SIGHUP)
        srv.wait_log(r"reload done", timeout=10)
        os.kill(child, signal.SIGTERM)
        self.assertEqual(proc.wait(timeout=harness.scale(60)), 0, srv.log_text())

        used = set()
        with open(trace, errors="replace") as f:
            for line in f:
                m = re.match(r"^\d+\s+(?:<\.\.\. )?([a-z0-9_]+)[( ]", line)
                if m:
                    used.add(m.group(1))
        self.assertIn("epoll_wait", used, "strace saw nothing useful")
        # SQLite calls fchown() on the files it creates only when running as root (it gives
        # them the owner of the database); the service runs as `subrelay`, where it does not.
        blocked = used - allowed - {"fchown"}
        self.assertEqual(blocked, set(), f"system calls serve makes that the unit would refuse; "
                                         f"used: {sorted(used)}")


if __name__ == "__main__":
    harness.main()
