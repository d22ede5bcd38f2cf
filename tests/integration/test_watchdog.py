"""systemd's notify protocol as `serve` speaks it, with a Python AF_UNIX datagram socket in
systemd's place: READY=1 once it listens, WATCHDOG=1 every half of WATCHDOG_USEC while its
loops run, none when WATCHDOG_PID names another process, STOPPING=1 on SIGTERM.

Stuck loops are made from outside, without a hook in the binary: every thread but the main
one is stopped with ptrace (PTRACE_SEIZE + PTRACE_INTERRUPT stop one thread, not the
process), so the loops stop stamping their heartbeats while the main thread goes on; the
pings must stop with one log line naming a loop, and resume once the threads are let go.
The decision itself is unit-tested in tests/unit/test_util.cpp (LoopWatch)."""

import ctypes
import os
import re
import signal
import socket
import time

import harness
from harness import Account

WEBSHOP = Account("webshop", "correct horse battery staple", ["@shop.test"])


class NotifySocket:
    """A bound SOCK_DGRAM socket that records each datagram with its arrival time."""

    def __init__(self, directory):
        self.path = os.path.join(directory, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages = []  # (monotonic seconds, text)

    def close(self):
        self.sock.close()

    def collect(self, seconds, until=None):
        """Reads for `seconds`, or until `until(messages)` is true."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (until is not None and until(self.messages)):
                return self.messages
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                return self.messages
            self.messages.append((time.monotonic(), data.decode(errors="replace")))

    def drain(self):
        """Reads what is already queued on the socket, without waiting."""
        self.sock.setblocking(False)
        try:
            while True:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode(errors="replace")))
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)

    def texts(self):
        return [t for _, t in self.messages]


PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
WALL = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long


def ptrace(request, tid):
    if _libc.ptrace(request, tid, None, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ptrace({request:#x}, {tid}): {os.strerror(err)}")


class FrozenThreads:
    """Stops every thread of `pid` except the main thread, until release()."""

    def __init__(self, pid):
        self.tids = []
        for name in os.listdir(f"/proc/{pid}/task"):
            tid = int(name)
            if tid == pid:
                continue
            ptrace(PTRACE_SEIZE, tid)
            self.tids.append(tid)
            ptrace(PTRACE_INTERRUPT, tid)
            os.waitpid(tid, WALL)

    def release(self):
        for tid in self.tids:
            ptrace(PTRACE_DETACH, tid)
        self.tids = []


class Watchdog(harness.ServerTestCase):
    def start_with_notify(self, **env):
        workdir = harness.make_tmpdir()
        notify = NotifySocket(workdir)
        self.addCleanup(notify.close)
        srv = harness.Server(workdir=workdir, accounts=[WEBSHOP], listeners=("starttls",),
                             extra_config={"workers": 2},
                             env=dict({"NOTIFY_SOCKET": notify.path}, **env))
        self.test_servers.append(srv)
        self.addCleanup(self._finish_server, srv)
        srv.start()
        return srv, notify

    def test_ready_then_watchdog_pings_then_stopping(self):
        srv, notify = self.start_with_notify(WATCHDOG_USEC="2000000")
        notify.collect(harness.scale(10), until=lambda m: any(t == "READY=1" for _, t in m))
        self.assertIn("READY=1", notify.texts())
        ready_at = next(at for at, t in notify.messages if t == "READY=1")
        # Half of 2 s between pings: at least two within about 3 s of READY=1.
        notify.collect(3.2, until=lambda m: sum(t == "WATCHDOG=1" for _, t in m) >= 3)
        pings = [at for at, t in notify.messages if t == "WATCHDOG=1"]
        self.assertGreaterEqual(len(pings), 2, f"datagrams: {notify.texts()}")
        self.assertLess(pings[1] - ready_at, harness.scale(3.0), f"datagrams: {notify.texts()}")
        for a, b in zip(pings, pings[1:]):
            # Never as late as the 2 s timeout (with room for a slow machine).
            self.assertLess(b - a, harness.scale(1.8), f"ping gap {b - a:.2f}s")
        self.assertRegex(srv.log_text(), r"systemd watchdog: 2000 ms; pinging every 1000 ms")
        self.assertNotIn("watchdog: worker", srv.log_text())
        self.assertNotIn("watchdog: delivery", srv.log_text())

        srv.proc.send_signal(signal.SIGTERM)
        notify.collect(harness.scale(20), until=lambda m: any(t == "STOPPING=1" for _, t in m))
        self.assertIn("STOPPING=1", notify.texts())
        self.assertEqual(srv.proc.wait(timeout=harness.scale(40)), 0)

    def test_no_pings_for_another_pid_or_without_watchdog(self):
        # WATCHDOG_PID of another process (pid 1 is never the server): the watchdog is not ours.
        srv, notify = self.start_with_notify(WATCHDOG_USEC="1000000", WATCHDOG_PID="1")
        notify.collect(2.5)
        self.assertIn("READY=1", notify.texts())
        self.assertNotIn("WATCHDOG=1", notify.texts())
        self.assertNotIn("systemd watchdog", srv.log_text())


    def test_stuck_loops_stop_the_pings_until_they_run_again(self):
        srv, notify = self.start_with_notify(WATCHDOG_USEC="2000000")
        notify.collect(harness.scale(10), until=lambda m: sum(t == "WATCHDOG=1" for _, t in m) >= 1)
        self.assertIn("WATCHDOG=1", notify.texts())
        frozen = FrozenThreads(srv.proc.pid)
        self.addCleanup(frozen.release)
        self.assertGreaterEqual(len(frozen.tids), 3, "expected two workers and the delivery thread")
        m = srv.wait_log(r"watchdog: (worker \d+|delivery) loop has not run for [0-9.]+s; "
                         r"not pinging systemd", timeout=5)
        # From the log line on, no ping for as long as the loops stay stopped (2.5 s: more
        # than two ping intervals). Pings sent before it may still wait in the socket.
        notify.drain()
        notify.messages.clear()
        notify.collect(2.5)
        self.assertNotIn("WATCHDOG=1", notify.texts())
        self.assertEqual(len(re.findall(r"loop has not run for", srv.log_text())), 1,
                         "a stuck loop is logged once")
        frozen.release()
        srv.wait_log(r"watchdog: every loop runs again; pinging systemd", timeout=5)
        notify.collect(harness.scale(5), until=lambda m: any(t == "WATCHDOG=1" for _, t in m))
        self.assertIn("WATCHDOG=1", notify.texts(), f"no ping after {m.group(1)} ran again")


if __name__ == "__main__":
    harness.main()
