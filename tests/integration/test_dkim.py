"""DKIM signing end to end: keys made with `subrelay dkim-keygen` (RSA-2048, Ed25519) and a
traditional-PEM RSA key, one domain dual-signed and single-algorithm domains; awkward messages
submitted with smtplib (and one with BDAT); every stored message (`queue show --raw`) verified,
signature by signature, by two independent verifiers: dkimpy (`dkim.DKIM(msg).verify(idx=i,
dnsfunc=...)`) and OpenDKIM (`opendkim -t` with TestDNSData, one run per signature on a copy
holding only that signature). Also: RSA first when dual signing, x= from dkim[].expiry, a
tampered body or header fails both verifiers, a foreign DKIM-Signature is kept and not ours,
domains without a key (subdomains included) stay unsigned, check-config and serve refuse a
1024-bit key and a key of the wrong algorithm, dkim-keygen's file mode and TXT format, and
dns-records' output."""

import base64
import os
import re
import stat
import subprocess
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import dkim

import harness
from harness import Account, submit, token

ACCT = Account("signer", "dkim-test-password-1",
               ["@dual.test", "@rsa.test", "@ed.test", "@trad.test", "@nokey.test", "@sub.dual.test"])

OUR_DOMAINS = {"dual.test", "rsa.test", "ed.test", "trad.test"}


def keygen(directory, domain, selector, algorithm, bits=None, extra=()):
    path = os.path.join(directory, f"{selector}.{domain}.pem")
    args = ["dkim-keygen", "--domain", domain, "--selector", selector, "--algorithm", algorithm,
            "--out", path, *extra]
    if bits:
        args += ["--bits", str(bits)]
    proc = harness.subrelay(*args, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"dkim-keygen failed: {proc.stderr.decode(errors='replace')}")
    return path, proc.stdout.decode()


def zone_txt_value(output):
    """The TXT value from a `NAME. IN TXT ( "a" "b" )` line: the strings concatenated."""
    m = re.search(r'^(\S+)\. IN TXT \( (.*) \)$', output, re.M)
    if not m:
        raise AssertionError(f"no zone-file TXT line in {output!r}")
    strings = re.findall(r'"([^"]*)"', m.group(2))
    return m.group(1), strings, "".join(strings)


def dkim_fields(raw):
    fields, _ = harness.split_message(raw)
    return [f for f in fields if harness.field_name(f) == b"dkim-signature"]


def sig_tags(field):
    value = harness.field_value(field).decode()
    value = re.sub(r"\s+", "", value)
    tags = {}
    for part in value.split(";"):
        if "=" in part:
            k, v = part.split("=", 1)
            tags[k] = v
    return tags


class Dkim(harness.ServerTestCase):
    @classmethod
    def setUpClass(cls):
        cls.keydir = harness.make_tmpdir("subrelay-dkim-")
        cls.dns = {}  # "sel._domainkey.domain" -> TXT value
        specs = [("dual.test", "r2026", "rsa-sha256"), ("dual.test", "e2026", "ed25519-sha256"),
                 ("rsa.test", "s1", "rsa-sha256"), ("ed.test", "e1", "ed25519-sha256")]
        cls.keygen_out = {}
        entries = []
        for domain, sel, alg in specs:
            path, out = keygen(cls.keydir, domain, sel, alg)
            name, _, value = zone_txt_value(out)
            cls.dns[name] = value
            cls.keygen_out[(domain, sel)] = (path, out)
            entry = {"domain": domain, "selector": sel, "algorithm": alg, "private_key": path}
            if domain == "rsa.test":
                entry["expiry"] = "7d"
            entries.append(entry)
        # Configured Ed25519 first: dual signing must still put RSA first.
        entries.sort(key=lambda e: e["algorithm"] != "ed25519-sha256")
        # A traditional "BEGIN RSA PRIVATE KEY" file, as older tools write them.
        trad = os.path.join(cls.keydir, "trad.pem")
        harness.run(["openssl", "genrsa", "-traditional", "-out", trad, "2048"], check=True, timeout=60)
        pub = harness.run(["openssl", "rsa", "-in", trad, "-pubout", "-outform", "DER"], check=True).stdout
        cls.dns["t1._domainkey.trad.test"] = "v=DKIM1; k=rsa; p=" + base64.b64encode(pub).decode()
        # ... and simple/simple canonicalisation there, the strict alternative to relaxed.
        entries.append({"domain": "trad.test", "selector": "t1", "algorithm": "rsa-sha256",
                        "private_key": trad, "canonicalization": "simple/simple"})
        cls.srv = cls.start_class_server(accounts=[ACCT], hostname="relay.dkim.test",
                                         extra_config={"dkim": entries})
        cls.testdns = os.path.join(cls.keydir, "testdns.txt")
        with open(cls.testdns, "w") as f:
            for name, value in cls.dns.items():
                f.write(f"{name} {value}\n")
        cls.odconf = os.path.join(cls.keydir, "opendkim.conf")
        with open(cls.odconf, "w") as f:
            f.write(f"Mode v\nTestDNSData file:{cls.testdns}\n")
        cls.checked = 0

    # -- verifiers -----------------------------------------------------------------------------
    def dnsfunc(self, name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode()
        return self.dns.get(name.rstrip("."), "").encode() or None

    def dkimpy_ok(self, raw, idx):
        d = dkim.DKIM(raw)
        try:
            return bool(d.verify(idx=idx, dnsfunc=self.dnsfunc))
        except dkim.DKIMException:
            return False

    def opendkim_ok(self, raw, keep_field):
        """opendkim -t on a copy of raw that holds only the DKIM-Signature keep_field: it
        reports one verification per run, so each signature gets its own run."""
        fields, rest = harness.split_message(raw)
        fields = [f for f in fields if harness.field_name(f) != b"dkim-signature" or f == keep_field]
        path = os.path.join(self.keydir, f"{token('eml')}.eml")
        with open(path, "wb") as f:
            f.write(b"".join(fields) + rest)
        proc = harness.run(["opendkim", "-x", self.odconf, "-t", path], timeout=30)
        out = (proc.stdout + proc.stderr).decode(errors="replace")
        tags = sig_tags(keep_field)
        # "opendkim: F: verification (s=SEL, d=DOM, 2048-bit key) succeeded" (exit code is 0
        # either way; docs/testbed.md).
        ok = re.search(r"verification \(s=%s, d=%s[,)].*\) succeeded" % (re.escape(tags["s"]), re.escape(tags["d"])),
                       out) is not None
        bad = "failed" in out or "no signature" in out
        return ok and not bad, out

    def ours(self, raw):
        """(index among all DKIM-Signature fields, field) of the signatures with our d=."""
        return [(i, f) for i, f in enumerate(dkim_fields(raw)) if sig_tags(f).get("d") in OUR_DOMAINS]

    def assert_verifies(self, raw, expect_algs, label):
        mine = self.ours(raw)
        self.assertEqual([sig_tags(f)["a"] for _, f in mine], expect_algs,
                         f"{label}: signatures {[sig_tags(f) for _, f in mine]!r}")
        for idx, field in mine:
            self.assertTrue(self.dkimpy_ok(raw, idx), f"{label}: dkimpy rejects signature {idx}: {field!r}")
            ok, out = self.opendkim_ok(raw, field)
            self.assertTrue(ok, f"{label}: opendkim rejects signature {idx}: {out}")
            type(self).checked += 1
        return mine

    def assert_fails_both(self, raw, label):
        mine = self.ours(raw)
        self.assertTrue(mine)
        for idx, field in mine:
            self.assertFalse(self.dkimpy_ok(raw, idx), f"{label}: dkimpy accepts signature {idx}")
            ok, out = self.opendkim_ok(raw, field)
            self.assertFalse(ok, f"{label}: opendkim accepts signature {idx}: {out}")

    # -- submission ----------------------------------------------------------------------------
    def send(self, sender, msg, rcpts=("someone@example.net",), options=()):
        conn = harness.smtp_starttls(self.srv.port("starttls"))
        self.addCleanup(conn.close)
        conn.login(ACCT.username, ACCT.password)
        qid = submit(conn, sender, list(rcpts), msg, mail_options=options)
        conn.quit()
        return qid, self.srv.queue_raw(qid)

    def awkward_messages(self, domain):
        frm = f"app@{domain}"
        out = []
        out.append(("plain", harness.make_message(frm, ["a@example.net"], "plain " + token()), ()))
        long_subject = "Long subject " + " ".join(f"word{i}" for i in range(120))
        # A field whose value starts on the continuation line. opendkim -t (2.11) fails
        # simple/simple signatures over such a field even when dkimpy makes them itself
        # (checked by hand: it alters the field when reading the file), so the simple/simple
        # domain gets the value on the first line instead; relaxed domains keep the odd form.
        reply_to = ("Reply-To: Replies\r\n <reply@" + domain + ">\r\n" if domain == "trad.test"
                    else "Reply-To:\r\n <reply@" + domain + ">\r\n")
        folded = (f"From: App Name <{frm}>\r\n"
                  "To: one@example.net,\r\n  two@example.net,\r\n\tthree@example.net\r\n"
                  f"Subject: {long_subject[:70]}\r\n {long_subject[70:400]}\r\n\t{long_subject[400:]}\r\n"
                  "X-Spaces:   lots   of\t \t spaces   \r\n"
                  "X-Long: " + "x" * 900 + "\r\n"
                  + reply_to +
                  "MIME-Version: 1.0\r\n"
                  "Content-Type: text/plain;\r\n  charset=us-ascii\r\n"
                  "\r\n"
                  "Body with trailing spaces   \r\n\tand a tab line\t\r\n\r\n\r\n\r\n").encode()
        out.append(("folded headers", folded, ()))
        mp = MIMEMultipart()
        mp["From"] = frm
        mp["To"] = "b@example.net"
        mp["Subject"] = "attachment " + token()
        mp.attach(MIMEText("See the attachment.\n", "plain"))
        mp.attach(MIMEApplication(os.urandom(60000), Name="data.bin"))
        out.append(("multipart", mp.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), ()))
        utf8 = (f"From: Jürgen Öhler <{frm}>\r\nTo: zoë@example.net\r\nSubject: Grüße, 日本語 {token()}\r\n"
                "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                "Content-Transfer-Encoding: 8bit\r\n\r\n"
                "Größe: 10 €\r\nこんにちは\r\n").encode()
        out.append(("utf-8", utf8, ("SMTPUTF8", "BODY=8BITMIME")))
        dots = harness.make_message(frm, ["c@example.net"], "dots " + token(),
                                    body=".leading dot\r\n..two dots\r\n.\r\n...\r\nend\r\n.")
        out.append(("dot lines", dots, ()))
        foreign = harness.make_message(
            frm, ["d@example.net"], "foreign " + token(),
            extra_headers=["DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=foreign.test;",
                           " s=old; h=from:subject; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;",
                           " b=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"])
        out.append(("foreign signature", foreign, ()))
        return out

    # -- tests ---------------------------------------------------------------------------------
    def test_awkward_messages_verify_with_dkimpy_and_opendkim(self):
        expect = {"dual.test": ["rsa-sha256", "ed25519-sha256"], "rsa.test": ["rsa-sha256"],
                  "ed.test": ["ed25519-sha256"], "trad.test": ["rsa-sha256"]}
        for domain, algs in expect.items():
            for label, msg, opts in self.awkward_messages(domain):
                with self.subTest(domain=domain, message=label):
                    qid, raw = self.send(f"app@{domain}", msg, options=opts)
                    fields, _ = harness.split_message(raw)
                    n = len(algs)
                    # Ours first (RSA before Ed25519), then our Received, then the message.
                    self.assertTrue(all(harness.field_name(f) == b"dkim-signature" for f in fields[:n]), fields[:n + 1])
                    self.assertEqual(harness.field_name(fields[n]), b"received")
                    self.assertEqual(raw[raw.index(b"\r\n\r\n"):], msg[msg.index(b"\r\n\r\n"):],
                                     "body changed")
                    mine = self.assert_verifies(raw, algs, f"{domain}/{label}/{qid}")
                    for _, f in mine:
                        t = sig_tags(f)
                        self.assertEqual(t["d"], domain)
                        self.assertEqual(t.get("c"), "simple/simple" if domain == "trad.test" else "relaxed/relaxed")
                        self.assertIn("t", t)
                        if domain == "rsa.test":
                            self.assertEqual(int(t["x"]), int(t["t"]) + 7 * 86400)
                        else:
                            self.assertNotIn("x", t)
                        self.assertIn("from", t["h"].lower().split(":"))
                    if label == "foreign signature":
                        all_sigs = dkim_fields(raw)
                        self.assertEqual(len(all_sigs), n + 1)
                        self.assertIn(b"d=foreign.test", b"".join(all_sigs))

    def test_bdat_with_odd_chunks(self):
        msg = harness.make_message("app@dual.test", ["e@example.net"], "bdat " + token(),
                                   body="line one\r\n.dot\r\nno final newline")
        msg = msg[:-2]  # BDAT: the server adds the final CRLF, the hash must agree
        with harness.RawClient(self.srv.port("starttls")) as c:
            c.login("starttls", ACCT)
            c.expect("MAIL FROM:<app@dual.test>", 250)
            c.expect("RCPT TO:<e@example.net>", 250)
            cut = [0, 7, len(msg) // 2, len(msg) - 3, len(msg)]
            for a, b in zip(cut, cut[1:]):
                last = b == len(msg)
                c.send(f"BDAT {b - a}{' LAST' if last else ''}\r\n".encode() + msg[a:b])
                code, lines = c.reply(timeout=harness.scale(30))
                self.assertEqual(code, 250, lines)
            qid = harness.queued_id(lines[-1])
        raw = self.srv.queue_raw(qid)
        self.assertTrue(raw.endswith(b"no final newline\r\n"))
        self.assert_verifies(raw, ["rsa-sha256", "ed25519-sha256"], "bdat")

    def test_tampering_fails_both_verifiers(self):
        _, raw = self.send("app@dual.test", harness.make_message(
            "app@dual.test", ["f@example.net"], "tamper " + token(), body="Pay 10 EUR.\r\n"))
        self.assert_verifies(raw, ["rsa-sha256", "ed25519-sha256"], "before tampering")
        self.assert_fails_both(raw.replace(b"Pay 10 EUR.", b"Pay 99 EUR."), "tampered body")
        self.assert_fails_both(raw.replace(b"Subject: tamper", b"Subject: Tamper"), "tampered subject")

    def test_domains_without_key_stay_unsigned(self):
        for frm in ("app@nokey.test", "app@sub.dual.test"):
            with self.subTest(sender=frm):
                _, raw = self.send(frm, harness.make_message(frm, ["g@example.net"], "unsigned " + token()))
                self.assertEqual(dkim_fields(raw), [])
                fields, _ = harness.split_message(raw)
                self.assertEqual(harness.field_name(fields[0]), b"received")

    def test_header_from_domain_picks_the_key(self):
        # Envelope sender of one domain, header From of another: d= follows the header From.
        msg = harness.make_message("app@rsa.test", ["h@example.net"], "from " + token(),
                                   header_from="App <app@ed.test>")
        _, raw = self.send("app@rsa.test", msg)
        mine = self.assert_verifies(raw, ["ed25519-sha256"], "header from")
        self.assertEqual(sig_tags(mine[0][1])["d"], "ed.test")

    def test_dkim_keygen_files_and_records(self):
        d = harness.make_tmpdir("subrelay-keygen-")
        path, out = keygen(d, "example.test", "k1", "ed25519-sha256")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path) as f:
            self.assertIn("BEGIN PRIVATE KEY", f.read())
        name, strings, value = zone_txt_value(out)
        self.assertEqual(name, "k1._domainkey.example.test")
        self.assertTrue(value.startswith("v=DKIM1; k=ed25519; p="), value)
        self.assertEqual(len(base64.b64decode(value.split("p=", 1)[1])), 32)
        self.assertIn('"private_key": "%s"' % path, out)

        path, out = keygen(d, "example.test", "k2", "rsa-sha256", bits=4096)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        name, strings, value = zone_txt_value(out)
        self.assertTrue(value.startswith("v=DKIM1; k=rsa; p="), value)
        self.assertGreater(len(strings), 1)
        self.assertTrue(all(len(s.encode()) <= 255 for s in strings), [len(s) for s in strings])
        der = base64.b64decode(value.split("p=", 1)[1])
        proc = harness.run(["openssl", "pkey", "-pubin", "-inform", "DER", "-noout", "-text"], input=der)
        self.assertIn(b"4096 bit", proc.stdout + proc.stderr)

        # No overwrite without --force; --force replaces, still 0600.
        before = open(path, "rb").read()
        proc = harness.subrelay("dkim-keygen", "--domain", "example.test", "--selector", "k2", "--out", path)
        self.assertEqual(proc.returncode, 1)
        self.assertIn(b"exists", proc.stderr)
        self.assertEqual(open(path, "rb").read(), before)
        keygen(d, "example.test", "k2", "rsa-sha256", extra=("--force",))
        self.assertNotEqual(open(path, "rb").read(), before)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(sorted(os.listdir(d)), ["k1.example.test.pem", "k2.example.test.pem"])

        # Usage errors: 1024-bit RSA, --bits with Ed25519, missing --out, unknown algorithm.
        for args in (["--bits", "1024"], ["--algorithm", "ed25519-sha256", "--bits", "2048"],
                     ["--algorithm", "rsa-sha1"]):
            proc = harness.subrelay("dkim-keygen", "--domain", "example.test", "--selector", "x",
                                    "--out", os.path.join(d, "x.pem"), *args)
            self.assertEqual(proc.returncode, 2, (args, proc.stderr))
        proc = harness.subrelay("dkim-keygen", "--domain", "example.test", "--selector", "x")
        self.assertEqual(proc.returncode, 2)
        self.assertFalse(os.path.exists(os.path.join(d, "x.pem")))
        for cmd in ("dkim-keygen", "dns-records"):
            proc = harness.subrelay(cmd, "--help")
            self.assertEqual(proc.returncode, 0)
            self.assertIn(b"usage: subrelay " + cmd.encode(), proc.stdout)
        proc = harness.subrelay("--help")
        self.assertIn(b"dkim-keygen", proc.stdout)
        self.assertIn(b"dns-records", proc.stdout)

    def test_dns_records(self):
        proc = harness.subrelay("dns-records", "--domain", "dual.test", "-c", self.srv.config_path)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        out = proc.stdout.decode()
        self.assertIn('dual.test. IN TXT "v=spf1 a:relay.dkim.test ~all"', out)
        for sel in ("r2026", "e2026"):
            name, _, value = zone_txt_value("\n".join(l for l in out.splitlines() if l.startswith(sel + ".")))
            self.assertEqual(value, self.dns[f"{sel}._domainkey.dual.test"])
        self.assertIn('_dmarc.dual.test. IN TXT "v=DMARC1; p=none; rua=mailto:dmarc-reports@dual.test; '
                      'adkim=r; aspf=r"', out)
        self.assertRegex(out, r'_mta-sts\.dual\.test\. IN TXT "v=STSv1; id=\d{14}"')
        self.assertIn("https://mta-sts.dual.test/.well-known/mta-sts.txt", out)
        self.assertIn("version: STSv1", out)
        self.assertIn('_smtp._tls.dual.test. IN TXT "v=TLSRPTv1; rua=mailto:tls-reports@dual.test"', out)
        # Every record line has a ; explanation before it.
        lines = out.splitlines()
        for i, line in enumerate(lines):
            if " IN TXT " in line:
                self.assertTrue(lines[i - 1].startswith(";"), line)
        # A domain without keys: no DKIM record, a hint instead.
        proc = harness.subrelay("dns-records", "--domain", "nokey.test", "-c", self.srv.config_path)
        self.assertEqual(proc.returncode, 0)
        self.assertNotIn(b"_domainkey", proc.stdout.replace(b"dkim-keygen", b""))
        self.assertIn(b"no key is configured", proc.stdout)
        self.assertEqual(harness.subrelay("dns-records", "-c", self.srv.config_path).returncode, 2)

    def test_bad_keys_fail_check_config_and_serve(self):
        d = harness.make_tmpdir("subrelay-badkey-")
        weak = os.path.join(d, "weak.pem")
        harness.run(["openssl", "genrsa", "-out", weak, "1024"], check=True)
        ed = self.keygen_out[("ed.test", "e1")][0]
        cases = [
            ({"domain": "weak.test", "selector": "w", "algorithm": "rsa-sha256", "private_key": weak},
             "1024"),
            ({"domain": "mix.test", "selector": "m", "algorithm": "rsa-sha256", "private_key": ed},
             "ed25519"),
        ]
        for entry, needle in cases:
            with self.subTest(needle=needle):
                srv = harness.Server(accounts=[ACCT], extra_config={"dkim": [entry]})
                path = srv.write_config()
                proc = harness.subrelay("check-config", "-c", path)
                out = proc.stdout.decode() + proc.stderr.decode()
                self.assertEqual(proc.returncode, 1, out)
                self.assertIn(f"{path}: dkim[0].private_key: ", out)
                self.assertIn(needle, out.lower())
                proc = harness.subrelay("serve", "-c", path, timeout=30)
                err = proc.stderr.decode()
                self.assertEqual(proc.returncode, 1, err)
                self.assertIn("dkim[0].private_key", err)
        # The class server's config (all keys good) passes.
        proc = harness.subrelay("check-config", "-c", self.srv.config_path)
        self.assertEqual(proc.stdout.strip(), b"ok", proc.stdout + proc.stderr)

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        import sys
        sys.stderr.write(f"signatures verified by both dkimpy and opendkim: {cls.checked}\n")


if __name__ == "__main__":
    harness.main()
