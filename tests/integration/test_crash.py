"""Durability (README.md "Durability"): a 250 after DATA means the message is committed. Clients
send under load, serve is SIGKILLed at a random moment, restarted on the same data_dir, and
every acknowledged message must be there, byte for byte, once. Messages that were in flight
(sent, no reply yet) may or may not be there, but never twice and never truncated.

SUBRELAY_CRASH_SEED=N replays one run's kill moments and message sizes."""

import concurrent.futures
import os
import random
import smtplib
import ssl
import sys
import threading
import time

import harness
from harness import Account, check_stored, make_message

APP = Account("app", "crash-test-password", ["@crash.test"])
THREADS = 8
CYCLES = 4


class Worker(threading.Thread):
    """Sends messages in a loop until stopped or the server goes away. Records, per token,
    the message bytes and whether the final dot was sent and whether a 250 came back."""

    def __init__(self, srv, cycle, index, rng, book):
        super().__init__(daemon=True)
        self.srv, self.cycle, self.index, self.rng, self.book = srv, cycle, index, rng, book
        self.stop = threading.Event()
        self.seq = 0
        self.error = None  # first exception, with the time it happened

    def connect(self):
        if self.index % 2 == 0:
            conn = harness.smtp_starttls(self.srv.port("starttls"), timeout=20,
                                         ehlo=f"worker{self.index}.crash.test")
        else:
            conn = harness.smtp_ssl(self.srv.port("implicit"), timeout=20,
                                    ehlo=f"worker{self.index}.crash.test")
        conn.login(APP.username, APP.password)
        return conn

    def run(self):
        conn = None
        try:
            while not self.stop.is_set():
                if conn is None:
                    conn = self.connect()
                    left_on_conn = self.rng.randint(1, 12)
                self.seq += 1
                tok = f"c{self.cycle}w{self.index}n{self.seq}r{self.rng.randrange(1 << 30):x}"
                size = self.rng.choice([200, 1000, 4000, 16000, 60000])
                line = (tok + " ").encode() * 8 + b"\r\n"
                body = line * max(1, size // len(line))
                rcpts = [f"r{j}@example.net" for j in range(self.rng.randint(1, 3))]
                msg = make_message("sender@crash.test", rcpts, f"crash {tok}", body,
                                   message_id=f"{tok}@crash.test")
                code, resp = conn.mail("sender@crash.test")
                if code != 250:
                    raise AssertionError(f"MAIL refused: {code} {resp}")
                for r in rcpts:
                    code, resp = conn.rcpt(r)
                    if code != 250:
                        raise AssertionError(f"RCPT refused: {code} {resp}")
                self.book.sending(tok, msg, rcpts)
                code, resp = conn.data(msg)
                if code != 250:
                    raise AssertionError(f"DATA refused: {code} {resp}")
                self.book.acked(tok, harness.queued_id(resp))
                left_on_conn -= 1
                if left_on_conn == 0:
                    conn.quit()
                    conn = None
        except Exception as e:  # the kill ends every worker this way
            self.error = (time.monotonic(), e)
        finally:
            if conn is not None:
                try:
                    conn.close()
                except Exception:
                    pass


class Book:
    """What the clients know: every message whose DATA was sent, and the 250s."""

    def __init__(self):
        self.lock = threading.Lock()
        self.msgs = {}      # token -> (bytes, recipients)
        self.acks = {}      # token -> queue id
        self.first_ack = threading.Event()

    def sending(self, tok, msg, rcpts):
        with self.lock:
            self.msgs[tok] = (msg, rcpts)

    def acked(self, tok, qid):
        with self.lock:
            self.acks[tok] = qid
        self.first_ack.set()


class CrashDurability(harness.ServerTestCase):
    def integrity_check(self, srv):
        db = os.path.join(srv.data_dir, "queue.db")
        self.assertTrue(os.path.exists(db), f"no database at {db}")
        proc = harness.run(["sqlite3", db, "PRAGMA integrity_check;"], timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(proc.stdout.decode().strip(), "ok",
                         f"integrity_check: {proc.stdout[:2000]!r}")

    def test_sigkill_under_load(self):
        seed = int(os.environ.get("SUBRELAY_CRASH_SEED", str(int(time.time() * 1000) % 10**9)))
        print(f"\ncrash test seed {seed} (SUBRELAY_CRASH_SEED={seed} to replay)", file=sys.stderr)
        rng = random.Random(seed)
        srv = self.start_server(listeners=("starttls", "implicit"), accounts=[APP], name="crash")
        book = Book()
        verified = {}      # queue id -> token, checked byte for byte once
        by_token = {}      # token -> queue id (stored)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)
        self.addCleanup(pool.shutdown)
        summary = []
        for cycle in range(CYCLES):
            before_acks = len(book.acks)
            before_msgs = len(book.msgs)
            book.first_ack.clear()
            workers = [Worker(srv, cycle, i, random.Random(rng.random()), book)
                       for i in range(THREADS)]
            load_started = time.monotonic()
            for w in workers:
                w.start()
            # Kill 0.3 to 1.5 s into the load, counted from the first 250 of this cycle:
            # the first logins after a start take a while (scrypt), more so under ASan.
            kill_after = rng.uniform(0.3, 1.5)
            self.assertTrue(book.first_ack.wait(harness.scale(20)),
                            f"cycle {cycle}: no message acknowledged within "
                            f"{harness.scale(20):.0f}s; worker errors: "
                            f"{[w.error for w in workers if w.error]}")
            flowing = time.monotonic()
            time.sleep(kill_after)
            killed_at = time.monotonic()
            self.assertTrue(srv.alive(), f"serve died on its own during cycle {cycle}")
            srv.proc.kill()
            srv.proc.wait(timeout=30)
            for w in workers:
                w.stop.set()
            for w in workers:
                w.join(timeout=harness.scale(30))
                self.assertFalse(w.is_alive(), f"worker {w.index} hangs after the kill")
                # A worker may only fail because of the kill.
                if w.error and w.error[0] < killed_at - 0.05:
                    self.fail(f"cycle {cycle} worker {w.index} failed before the kill: "
                              f"{w.error[1]!r}")

            srv.start()
            self.integrity_check(srv)
            with book.lock:
                msgs = dict(book.msgs)
                acks = dict(book.acks)
            entries = {e["id"]: e for e in srv.queue_list()}

            # Every acknowledged message is listed under the id its 250 gave.
            lost = [(t, q) for t, q in acks.items() if q not in entries]
            self.assertEqual(lost, [], f"cycle {cycle}: acknowledged messages lost after "
                                       f"SIGKILL (token, queue id): {lost[:20]}")
            # Previously verified ones are all still there.
            gone = [q for q in verified if q not in entries]
            self.assertEqual(gone, [], f"cycle {cycle}: stored messages vanished: {gone[:20]}")

            new_ids = [q for q in entries if q not in verified]
            raws = dict(zip(new_ids, pool.map(srv.queue_raw, new_ids)))
            for qid, raw in raws.items():
                mids = harness.header_values(raw, "message-id")
                self.assertEqual(len(mids), 1, f"{qid}: Message-ID fields {mids!r}")
                tok = mids[0].decode().strip("<>").split("@")[0]
                self.assertIn(tok, msgs, f"{qid}: stored message {tok!r} was never sent "
                                         f"in full by any client")
                self.assertNotIn(tok, by_token, f"{tok} stored twice: {by_token.get(tok)} "
                                                f"and {qid}")
                if tok in acks:
                    self.assertEqual(acks[tok], qid, f"{tok}: stored under {qid}, the 250 "
                                                     f"said {acks[tok]}")
                msg, rcpts = msgs[tok]
                check_stored(self, raw, msg, account=APP.username, tls_version="TLSv1.")
                e = entries[qid]
                self.assertEqual(e["sender"], "sender@crash.test")
                self.assertEqual([r["address"] for r in e["recipients"]], rcpts)
                by_token[tok] = qid
                verified[qid] = tok

            cycle_acks = len(acks) - before_acks
            cycle_sent = len(msgs) - before_msgs
            in_flight = [t for t in msgs if t not in acks and t.startswith(f"c{cycle}w")]
            stored_anyway = [t for t in in_flight if t in by_token]
            line = (f"cycle {cycle}: killed {killed_at - flowing:.2f}s after the first 250 "
                    f"({flowing - load_started:.2f}s after the clients started); "
                    f"{cycle_sent} messages sent, {cycle_acks} acknowledged (all present), "
                    f"{len(in_flight)} in flight, {len(stored_anyway)} of those stored anyway")
            summary.append(line)
            print(line, file=sys.stderr)

        # A clean stop after the last restart keeps everything, and the database is sound.
        self.assertEqual(srv.stop(), 0)
        self.integrity_check(srv)
        final = set(srv.queue_ids())
        self.assertEqual(set(verified) - final, set())
        self.assertEqual(final - set(verified), set(), "messages appeared after a clean stop")
        total_in_flight = len([t for t in book.msgs if t not in book.acks])
        print(f"total: {len(book.msgs)} sent, {len(book.acks)} acknowledged and all present, "
              f"{total_in_flight} in flight at a kill, "
              f"{len([t for t in book.msgs if t not in book.acks and t in by_token])} of those "
              f"stored anyway; {len(final)} in the queue", file=sys.stderr)
        self.assertGreater(len(book.acks), 0)


if __name__ == "__main__":
    harness.main()
