"""Submission with nodemailer (what Node web apps use), through nodemailer_send.js: STARTTLS with
requireTLS on the 587-style listener, implicit TLS (secure: true) on the 465-style one, the test
CA as the only trusted CA, and a pooled transport sending 20 messages at once."""

import fcntl
import hashlib
import json
import os
import shutil

import harness
from harness import Account, token

WEBSHOP = Account("webshop", "correct horse battery staple", ["@shop.test"])

SCRIPT = os.path.join(harness.HERE, "nodemailer_send.js")


def ensure_node_modules():
    """`npm ci` in tests/integration if nodemailer is not installed yet. The project's test
    script normally did it already; a lock keeps two suites (plain and ASan builds) running at
    once from installing into the same folder together."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise AssertionError("node and npm are required for this test")
    marker = os.path.join(harness.HERE, "node_modules", "nodemailer", "package.json")
    if os.path.exists(marker):
        return
    lock_name = "subrelay-npm-" + hashlib.sha1(harness.HERE.encode()).hexdigest()[:12] + ".lock"
    with open(os.path.join("/tmp", lock_name), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(marker):
            proc = harness.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=harness.HERE,
                               timeout=300)
            if proc.returncode != 0 or not os.path.exists(marker):
                raise AssertionError("npm ci failed in " + harness.HERE + ":\n"
                                     + proc.stdout.decode(errors="replace")
                                     + proc.stderr.decode(errors="replace"))


class SubmitNodemailer(harness.ServerTestCase):
    @classmethod
    def setUpClass(cls):
        ensure_node_modules()
        cls.srv = cls.start_class_server(listeners=("starttls", "implicit"), accounts=[WEBSHOP])

    def node(self, messages, mode="starttls", password=None, pool=False, **extra):
        job = {
            "host": harness.LOOPBACK,
            "port": self.srv.port(mode),
            "secure": mode == "implicit",
            "requireTLS": mode == "starttls",
            "user": WEBSHOP.username,
            "pass": password if password is not None else WEBSHOP.password,
            "ca": harness.pki().ca,
            "pool": pool,
            "timeoutMs": int(harness.scale(20) * 1000),
            "messages": messages,
        }
        job.update(extra)
        path = os.path.join(self.srv.workdir, f"job-{token('j')}.json")
        with open(path, "w") as f:
            json.dump(job, f)
        proc = harness.run(["node", SCRIPT, path], cwd=harness.HERE, timeout=90)
        out = proc.stdout.decode(errors="replace")
        err = proc.stderr.decode(errors="replace")
        self.assertEqual(proc.returncode, 0, f"node exited {proc.returncode}:\n{out}\n{err}")
        results = [json.loads(line) for line in out.splitlines() if line.strip()]
        self.assertEqual(len(results), len(messages), f"{out}\n{err}")
        return results

    def message(self, to=("alice@example.net",), cc=(), bcc=(), sender="orders@shop.test",
                **extra):
        tok = token("nm")
        m = {"from": f'"Shop" <{sender}>', "to": list(to), "cc": list(cc), "bcc": list(bcc),
             "subject": f"nodemailer {tok}", "text": f"Hello from nodemailer, {tok}.\nÄÖÜ ✓\n",
             "messageId": f"<{tok}@shop.test>"}
        m.update(extra)
        return tok, m

    def check(self, tok, m, result, envelope_from=None, envelope_to=None):
        self.assertTrue(result["ok"], result)
        self.assertRegex(result["response"], r"^250 2\.0\.0 ")
        qid = harness.queued_id(result["response"])
        entry = self.srv.queue_entry(qid)
        want_rcpts = envelope_to or (m["to"] + m["cc"] + m["bcc"])
        self.assertEqual(entry["account"], WEBSHOP.username)
        self.assertEqual(entry["sender"], envelope_from or m["from"].split("<")[1].rstrip(">"))
        self.assertEqual(sorted(r["address"] for r in entry["recipients"]), sorted(want_rcpts))
        raw = self.srv.queue_raw(qid)
        fields, body = harness.split_message(raw)
        self.assertEqual(harness.field_name(fields[0]), b"received")
        self.assertIn(WEBSHOP.username.encode(), fields[0])
        self.assertIn(b"TLSv1.", fields[0])
        self.assertEqual(harness.header_values(raw, "message-id"), [m["messageId"].encode()])
        self.assertEqual(len(harness.header_values(raw, "date")), 1)
        self.assertEqual(harness.header_values(raw, "bcc"), [], "Bcc header stored")
        self.assertIn(tok.encode(), raw)
        return qid

    def test_starttls_require_tls(self):
        msgs = [self.message(), self.message(to=["a@example.net", "b@example.org"],
                                             cc=["c@example.com"], bcc=["hidden@example.net"])]
        results = self.node([m for _, m in msgs], mode="starttls")
        for (tok, m), r in zip(msgs, results):
            self.check(tok, m, r)

    def test_implicit_tls(self):
        msgs = [self.message(bcc=["audit@example.net"]) for _ in range(3)]
        results = self.node([m for _, m in msgs], mode="implicit")
        qids = {self.check(tok, m, r) for (tok, m), r in zip(msgs, results)}
        self.assertEqual(len(qids), 3)

    def test_pool_twenty_messages(self):
        for mode in ("starttls", "implicit"):
            with self.subTest(mode=mode):
                msgs = [self.message(to=[f"user{i}@example.net"],
                                     cc=[f"cc{i}@example.org"] if i % 4 == 0 else [])
                        for i in range(20)]
                results = self.node([m for _, m in msgs], mode=mode, pool=True,
                                    maxConnections=3, maxMessages=8)
                qids = [self.check(tok, m, r) for (tok, m), r in zip(msgs, results)]
                self.assertEqual(len(set(qids)), 20)

    def test_explicit_envelope(self):
        tok, m = self.message(envelope={"from": "bounces@shop.test",
                                        "to": ["x@example.net", "y@example.net"]})
        [r] = self.node([m])
        self.check(tok, m, r, envelope_from="bounces@shop.test",
                   envelope_to=["x@example.net", "y@example.net"])

    def test_wrong_password(self):
        tok, m = self.message()
        [r] = self.node([m], password="not the password")
        self.assertFalse(r["ok"], r)
        self.assertEqual(r["code"], "EAUTH", r)
        self.assertEqual(r["responseCode"], 535, r)

    def test_sender_not_owned(self):
        tok, m = self.message(sender="ceo@bank.test")
        [r] = self.node([m], mode="implicit")
        self.assertFalse(r["ok"], r)
        self.assertIn(r["responseCode"], (550, 553), r)
        self.assertIn("5.7.1", r["response"], r)


if __name__ == "__main__":
    harness.main()
