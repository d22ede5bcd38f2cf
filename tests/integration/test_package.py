"""The Debian package from scripts/build-deb, made from this build dir and installed into this
machine with dpkg (root; registered only with -Dpackage_tests, i.e. in build/): its files are
where they belong, postinst made the user `subrelay` and /var/lib/subrelay (0700), the
installed /usr/bin/subrelay runs as that user on /var/lib/subrelay with a configuration in
/etc/subrelay (as the unit runs it; systemd is not PID 1 in a container, so the unit itself is
started only where it is), takes a message over STARTTLS + AUTH, and `queue list` shows it.
`dpkg --purge` then removes it all again, also when a step failed."""

import grp
import json
import os
import pwd
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import time

import harness
from harness import Account, make_message

BUILD_DIR = os.environ.get("SUBRELAY_BUILD_DIR", "")
SOURCE_DIR = os.environ.get("SUBRELAY_SOURCE_DIR", "")
PKG = "subrelay"
ETC = "/etc/subrelay"
STATE = "/var/lib/subrelay"
BIN = "/usr/bin/subrelay"
UNIT = "/usr/lib/systemd/system/subrelay.service"
ACCOUNT = Account("webshop", "pkg-test correct horse", ["@shop.test"], mode="capture")


def installed():
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", PKG], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL)
    return b"install ok installed" in proc.stdout or b"config-files" in proc.stdout


def systemd_runs():
    return os.path.isdir("/run/systemd/system")


def as_service_user(*argv):
    """argv run as subrelay:subrelay (no supplementary groups), as the unit's User= does."""
    return ["setpriv", "--reuid=subrelay", "--regid=subrelay", "--clear-groups", "--", *argv]


def mode_owner(path):
    st = os.stat(path)
    return (stat.S_IMODE(st.st_mode), pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name)


class Package(harness.ServerTestCase):
    @classmethod
    def setUpClass(cls):
        if os.geteuid() != 0:
            raise AssertionError("test_package installs a .deb: it needs root")
        if installed():
            # Left by an interrupted run of this test (nothing else installs subrelay here).
            subprocess.run(["dpkg", "--purge", PKG], check=False)
        if os.path.exists(ETC) or os.path.exists(STATE):
            raise AssertionError(f"{ETC} or {STATE} exists before the package is installed: "
                                 f"not touching a machine that has a subrelay of its own")
        cls.tmp = harness.make_tmpdir("subrelay-pkg-")
        proc = harness.run([os.path.join(SOURCE_DIR, "scripts", "build-deb"), "--build-dir", BUILD_DIR,
                            "--out-dir", cls.tmp, "--no-rebuild"], timeout=300)
        if proc.returncode != 0:
            raise AssertionError(f"scripts/build-deb exited {proc.returncode}:\n"
                                 f"{proc.stderr.decode(errors='replace')}")
        cls.deb = proc.stdout.decode().strip().splitlines()[-1]

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        # Whatever happened: the machine is left as it was.
        if installed():
            shutil.rmtree(ETC, ignore_errors=True)
            subprocess.run(["dpkg", "--purge", PKG], stdout=subprocess.DEVNULL, check=False)

    def dpkg(self, *args):
        proc = harness.run(["dpkg", *args], timeout=120)
        self.assertEqual(proc.returncode, 0, f"dpkg {' '.join(args)}:\n{proc.stdout.decode()}"
                                             f"{proc.stderr.decode(errors='replace')}")
        return proc

    def check_package_metadata(self):
        name = os.path.basename(self.deb)
        arch = harness.run(["dpkg", "--print-architecture"], check=True).stdout.decode().strip()
        version = harness.run([harness.BIN, "--version"], check=True).stdout.decode().split()[1]
        self.assertEqual(name, f"subrelay_{version}_{arch}.deb")
        info = harness.run(["dpkg-deb", "-f", self.deb, "Depends"], check=True).stdout.decode()
        for lib in ("libuv1", "libsqlite3-0", "libldns3", "libidn2-0", "adduser"):
            self.assertIn(lib, info)
        backend = os.environ.get("SUBRELAY_TLS_BACKEND", "boringssl")
        self.assertIn("android-libboringssl" if backend == "boringssl" else "libssl3", info)

    def check_installed_files(self):
        self.assertTrue(os.access(BIN, os.X_OK))
        version = harness.run([BIN, "--version"], check=True).stdout.decode()
        self.assertIn("subrelay", version)
        with open(UNIT) as f:
            unit = f.read()
        self.assertIn("ExecStart=/usr/bin/subrelay serve -c /etc/subrelay/config.json", unit)
        self.assertIn("ExecStartPre=/usr/bin/subrelay check-config", unit)
        page = "/usr/share/man/man8/subrelay.8.gz"
        self.assertTrue(os.path.isfile(page))
        proc = harness.run(["man", "-l", page], env=dict(os.environ, MANWIDTH="80"))
        self.assertIn("SUBRELAY(8)", proc.stdout.decode())
        for doc in ("README.md", "copyright", "examples/config.example.json"):
            self.assertTrue(os.path.isfile(f"/usr/share/doc/subrelay/{doc}"), doc)
        self.dpkg("--verify", PKG)  # every file as shipped (md5sums)

        user = pwd.getpwnam("subrelay")
        self.assertLess(user.pw_uid, 1000, "not a system user")
        self.assertEqual(user.pw_dir, STATE)
        self.assertIn(user.pw_shell, ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false"))
        self.assertEqual(grp.getgrgid(user.pw_gid).gr_name, "subrelay")
        self.assertEqual(mode_owner(STATE), (0o700, "subrelay", "subrelay"))
        self.assertEqual(mode_owner(ETC), (0o750, "root", "subrelay"))
        self.assertEqual(os.listdir(ETC), [], "the package ships no configuration in /etc")

    def write_config(self, ports):
        """/etc/subrelay/config.json and the certificate, readable by the group subrelay only."""
        pki = harness.pki()
        os.makedirs(f"{ETC}/tls", mode=0o750)
        os.chown(f"{ETC}/tls", 0, grp.getgrnam("subrelay").gr_gid)
        for src, dst in ((pki.cert, f"{ETC}/tls/cert.pem"), (pki.key, f"{ETC}/tls/key.pem")):
            shutil.copyfile(src, dst)
        cfg = {
            "hostname": "relay.subrelay.test",
            "data_dir": STATE,
            "tls": {"certificate": f"{ETC}/tls/cert.pem", "private_key": f"{ETC}/tls/key.pem"},
            "listeners": [{"address": f"127.0.0.1:{ports[0]}", "tls": "starttls"},
                          {"address": f"127.0.0.1:{ports[1]}", "tls": "implicit"}],
            "accounts": [ACCOUNT.to_json()],
            "delivery": {"resolvers": [f"127.0.0.1:{harness.free_port(socket.SOCK_DGRAM)}"]},
        }
        with open(f"{ETC}/config.json", "w") as f:
            json.dump(cfg, f, indent=2)
        for path in (f"{ETC}/config.json", f"{ETC}/tls/cert.pem", f"{ETC}/tls/key.pem"):
            os.chown(path, 0, grp.getgrnam("subrelay").gr_gid)
            os.chmod(path, 0o640)
        return f"{ETC}/config.json"

    def start_service(self, config, log):
        """serve as the unit runs it: by systemd where it is PID 1, else as the user subrelay."""
        check = harness.run(as_service_user(BIN, "check-config", "-c", config))
        self.assertEqual(check.returncode, 0, check.stdout.decode() + check.stderr.decode())
        if systemd_runs():
            harness.run(["systemctl", "start", "subrelay.service"], check=True, timeout=60)
            return None
        errf = open(log, "wb")
        self.addCleanup(errf.close)
        proc = subprocess.Popen(as_service_user(BIN, "serve", "-c", config), stdin=subprocess.DEVNULL,
                                stdout=errf, stderr=subprocess.STDOUT, cwd="/")
        harness._register_proc(proc)
        return proc

    def test_install_run_as_service_user_purge(self):
        self.check_package_metadata()
        self.dpkg("-i", self.deb)
        self.check_installed_files()

        ports = (harness.free_port(), harness.free_port())
        config = self.write_config(ports)
        log = os.path.join(self.tmp, "serve.log")
        self.log = log
        proc = self.start_service(config, log)
        try:
            deadline = time.monotonic() + harness.scale(20)
            while not all(not harness.port_is_free(p) for p in ports):
                if proc is not None and proc.poll() is not None:
                    self.fail(f"serve exited {proc.returncode}:\n{open(log).read()}")
                self.assertLess(time.monotonic(), deadline, "serve did not listen")
                time.sleep(0.05)
            if proc is not None:
                # The process really is the service user's, with no capability to spare.
                with open(f"/proc/{proc.pid}/status") as f:
                    status = f.read()
                uid = pwd.getpwnam("subrelay").pw_uid
                self.assertRegex(status, rf"(?m)^Uid:\s+{uid}\s+{uid}\s+{uid}\s+{uid}$")

            conn = smtplib.SMTP("127.0.0.1", ports[0], timeout=harness.scale(15))
            conn.ehlo("client.subrelay.test")
            conn.starttls(context=harness.client_context())
            conn.ehlo("client.subrelay.test")
            conn.login(ACCOUNT.username, ACCOUNT.password)
            subject = harness.token("pkg")
            msg = make_message("orders@shop.test", ["someone@example.org"], subject)
            conn.mail("orders@shop.test")
            conn.rcpt("someone@example.org")
            code, reply = conn.data(msg)
            conn.quit()
            self.assertEqual(code, 250, reply)
            qid = harness.queued_id(reply)

            # As the service user: root would leave root-owned -wal/-shm files behind.
            listing = harness.run(as_service_user(BIN, "queue", "list", "--json", "-c", config), check=True)
            entries = [json.loads(l) for l in listing.stdout.decode().splitlines() if l.strip()]
            self.assertIn(qid, [e["id"] for e in entries], listing.stdout.decode())
            raw = harness.run(as_service_user(BIN, "queue", "show", qid, "--raw", "-c", config), check=True)
            self.assertIn(subject.encode(), raw.stdout)
        finally:
            if proc is None:
                harness.run(["systemctl", "stop", "subrelay.service"], timeout=120)
            elif proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=harness.scale(60))
        if proc is not None:
            self.assertEqual(proc.returncode, 0, open(log).read())
        for name in os.listdir(STATE):
            mode, owner, _ = mode_owner(os.path.join(STATE, name))
            self.assertEqual(owner, "subrelay", name)
            self.assertEqual(mode & 0o077, 0, f"{name} is open to others: {oct(mode)}")
        self.assertIn("queue.db", os.listdir(STATE))

        # Purge: the administrator's files go first (postrm keeps a non-empty /etc/subrelay
        # and the user with it), then everything of the package.
        shutil.rmtree(ETC)
        self.dpkg("--purge", PKG)
        self.assertFalse(installed())
        for path in (BIN, UNIT, STATE, ETC, "/usr/share/doc/subrelay"):
            self.assertFalse(os.path.exists(path), f"{path} left after purge")
        with self.assertRaises(KeyError):
            pwd.getpwnam("subrelay")
        with self.assertRaises(KeyError):
            grp.getgrnam("subrelay")

    def dump_logs(self, stream):
        log = getattr(self, "log", None)
        if log and os.path.exists(log):
            with open(log, "rb") as f:
                stream.write(f"----- {log} -----\n" + f.read().decode(errors="replace")[-20000:])


if __name__ == "__main__":
    harness.main()
