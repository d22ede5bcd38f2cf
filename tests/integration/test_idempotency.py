"""Idempotent submission (issue 13): a message carrying `Idempotency-Key: <token>` submitted
again by the same account within idempotency.window is answered 250 with the first message's
queue id and stored once, also across a restart; the field is not stored. Another account or
another key is another message; a malformed key is refused with 550 5.6.0. The field name is
configurable (idempotency.header)."""

import smtplib

import harness
from harness import Account, make_message, submit, token

WEBSHOP = Account("webshop", "correct horse battery staple", ["@shop.test"])
CI = Account("ci", "ci-secret-Passw0rd", ["@ci.test"])


def keyed(sender, subject, key, field="Idempotency-Key"):
    return make_message(sender, ["alice@example.net"], subject, extra_headers=[f"{field}: {key}"])


class Idempotency(harness.ServerTestCase):
    def send(self, srv, account, msg, sender):
        conn = harness.smtp_starttls(srv.port("starttls"))
        try:
            conn.login(account.username, account.password)
            return submit(conn, sender, ["alice@example.net"], msg)
        finally:
            conn.quit()

    def ids_with(self, srv, marker):
        marker = marker.encode()
        return [q for q in srv.queue_ids() if marker in srv.queue_raw(q)]

    def test_same_key_stores_once_also_across_a_restart(self):
        srv = self.start_server(accounts=[WEBSHOP, CI], listeners=("starttls",))
        key = token("ci-run-")
        subject = token("idem")
        # The CI job that timed out after DATA retries with the same message and key.
        msg = keyed("build@shop.test", subject, key)
        first = self.send(srv, WEBSHOP, msg, "build@shop.test")
        again = self.send(srv, WEBSHOP, msg, "build@shop.test")
        self.assertEqual(again, first)
        self.assertEqual(self.ids_with(srv, subject), [first])
        self.assertEqual(len(srv.queue_ids()), 1)
        srv.wait_log(rf"queue: duplicate id={first} account=webshop ")

        # The key is not stored: the stored bytes are what was sent without the field.
        raw = srv.queue_raw(first)
        self.assertNotIn(b"idempotency-key", raw.lower())
        self.assertNotIn(key.encode(), raw)
        fields, _ = harness.split_message(raw)
        sent, _ = harness.split_message(msg)
        self.assertEqual(b"".join(fields[1:]),
                         b"".join(f for f in sent if harness.field_name(f) != b"idempotency-key"))

        # A restart on the same data_dir remembers the key.
        srv.stop()
        srv.start()
        self.assertEqual(self.send(srv, WEBSHOP, msg, "build@shop.test"), first)
        self.assertEqual(srv.queue_ids(), [first])

        # Another account with the same key, and the same account with another key: new messages.
        other_account = self.send(srv, CI, keyed("build@ci.test", subject, key), "build@ci.test")
        other_key = self.send(srv, WEBSHOP, keyed("build@shop.test", subject, key + "-2"), "build@shop.test")
        self.assertEqual(len({first, other_account, other_key}), 3)
        # Without a key, the same message is simply stored again.
        plain = self.send(srv, WEBSHOP, make_message("build@shop.test", ["alice@example.net"], subject),
                          "build@shop.test")
        self.assertEqual(sorted(srv.queue_ids()), sorted([first, other_account, other_key, plain]))
        # The second key repeats within the window too.
        self.assertEqual(self.send(srv, WEBSHOP, keyed("build@shop.test", subject, key + "-2"), "build@shop.test"),
                         other_key)
        self.assertEqual(len(srv.queue_ids()), 4)

    def test_malformed_or_repeated_field_is_refused_and_custom_name(self):
        srv = self.start_server(accounts=[WEBSHOP], listeners=("starttls",),
                                extra_config={"idempotency": {"header": "X-Job-Key", "window": "1h"}})
        conn = harness.smtp_starttls(srv.port("starttls"))
        self.addCleanup(conn.close)
        conn.login(WEBSHOP.username, WEBSHOP.password)
        subject = token("bad")
        for bad in (keyed("a@shop.test", subject, "x" * 201, "X-Job-Key"),
                    keyed("a@shop.test", subject, "caf\u00e9", "X-Job-Key"),
                    make_message("a@shop.test", ["alice@example.net"], subject,
                                 extra_headers=["X-Job-Key: one", "x-job-key: two"])):
            with self.assertRaises(smtplib.SMTPDataError) as cm:
                submit(conn, "a@shop.test", ["alice@example.net"], bad)
            self.assertEqual(cm.exception.smtp_code, 550)
            self.assertTrue(cm.exception.smtp_error.startswith(b"5.6.0 "), cm.exception.smtp_error)
            self.assertIn(b"X-Job-Key", cm.exception.smtp_error)
        self.assertEqual(srv.queue_ids(), [])

        # The configured name is the key; the default name is then an ordinary field.
        first = submit(conn, "a@shop.test", ["alice@example.net"], keyed("a@shop.test", subject, "k1", "x-job-key"))
        self.assertEqual(submit(conn, "a@shop.test", ["alice@example.net"],
                                keyed("a@shop.test", subject, "k1", "X-JOB-KEY")), first)
        plain = submit(conn, "a@shop.test", ["alice@example.net"], keyed("a@shop.test", subject, "k1"))
        self.assertNotEqual(plain, first)
        self.assertIn(b"Idempotency-Key: k1\r\n", srv.queue_raw(plain))
        self.assertNotIn(b"x-job-key", srv.queue_raw(first).lower())
        self.assertEqual(sorted(srv.queue_ids()), sorted([first, plain]))
        conn.quit()


if __name__ == "__main__":
    harness.main()
