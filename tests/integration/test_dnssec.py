"""The DNSSEC test bed (docs/testbed.md): a validating unbound serving signed.test (signed with
ldns-signzone, anchored), unsigned.test and bogus.test (a corrupted RRSIG), peers.DnssecTestbed.

First the bed itself, asked with dnspython: a TLSA answer from the signed zone has AD=1 (RFC 4035
3.2.3), the same from the unsigned zone has not, the bogus zone gives SERVFAIL (and its data with
CD=1, so the failure is validation), and a name missing from the signed zone is an authenticated
NXDOMAIN. Then our own resolver, dns::UvResolver through subrelay-dnsquery, against the same
unbound: TLSA records decoded, `authenticated` as the AD bit of every response used (a CNAME chain
into the unsigned zone is not authenticated), with and without DO (RFC 3225)."""

import json
import os
import unittest

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

import harness
import peers

TOOL = os.environ.get("SUBRELAY_DNSQUERY")
TLSA = "3 1 1 8cb0fc6c527506a053f4f14c8464bebbd6dede2738d11468dd953d7d6a3021f1"


def setUpModule():
    global BED, DNS
    if not TOOL or not os.access(TOOL, os.X_OK):
        raise AssertionError("SUBRELAY_DNSQUERY is not set to the subrelay-dnsquery tool")
    BED = peers.DnssecTestbed(tlsa=[TLSA])
    try:
        DNS = peers.Unbound(BED.zones(), validate=True)
    except Exception:
        BED.close()
        raise


def tearDownModule():
    DNS.close()
    BED.close()


def ask(name, rdtype="TLSA", ad=True, cd=False, do=False):
    """One query to the test bed's unbound with dnspython; returns the response."""
    q = dns.message.make_query(name, rdtype, want_dnssec=do)
    if ad:
        q.flags |= dns.flags.AD  # RFC 6840 5.7: tell me whether you validated
    if cd:
        q.flags |= dns.flags.CD
    return dns.query.udp(q, peers.LOOPBACK, port=DNS.port, timeout=harness.scale(3))


def tlsa_texts(resp):
    out = []
    for rrset in resp.answer:
        if rrset.rdtype == dns.rdatatype.TLSA:
            out += [f"{r.usage} {r.selector} {r.mtype} {r.cert.hex()}" for r in rrset]
    return out


def query(name, qtype="TLSA", dnssec_ok=False):
    argv = [TOOL, "--server", DNS.address, "--timeout-ms", "3000"]
    if dnssec_ok:
        argv.append("--dnssec-ok")
    proc = harness.run(argv + [name, qtype], timeout=30)
    if proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    return json.loads(proc.stdout.decode().strip())


class DnssecTestbedTest(unittest.TestCase):
    def dump_logs(self, stream):
        stream.write("--- unbound log ---\n" + DNS.log_text()[-4000:] + "\n")

    def test_signed_tlsa_is_authenticated(self):
        r = ask("_25._tcp.mx.signed.test")
        self.assertEqual(r.rcode(), dns.rcode.NOERROR)
        self.assertTrue(r.flags & dns.flags.AD, r)
        self.assertEqual(tlsa_texts(r), [TLSA])
        # With DO the signature comes along, and AD stays.
        r = ask("_25._tcp.mx.signed.test", ad=False, do=True)
        self.assertTrue(r.flags & dns.flags.AD, r)
        self.assertTrue(any(rr.rdtype == dns.rdatatype.RRSIG for rr in r.answer), r)

    def test_unsigned_tlsa_is_not_authenticated(self):
        r = ask("_25._tcp.mx.unsigned.test")
        self.assertEqual(r.rcode(), dns.rcode.NOERROR)
        self.assertFalse(r.flags & dns.flags.AD, r)
        self.assertEqual(tlsa_texts(r), [TLSA])

    def test_bogus_zone_is_servfail(self):
        r = ask("_25._tcp.mx.bogus.test")
        self.assertEqual(r.rcode(), dns.rcode.SERVFAIL, r)
        self.assertEqual(tlsa_texts(r), [])
        # Checking disabled: the records are there, only their signature is bad.
        r = ask("_25._tcp.mx.bogus.test", cd=True)
        self.assertEqual(r.rcode(), dns.rcode.NOERROR, r)
        self.assertEqual(tlsa_texts(r), [TLSA])
        # The rest of the zone validates.
        r = ask("mx.bogus.test", "A")
        self.assertEqual(r.rcode(), dns.rcode.NOERROR, r)
        self.assertTrue(r.flags & dns.flags.AD, r)

    def test_authenticated_denial(self):
        r = ask("_25._tcp.nodane.signed.test")
        self.assertEqual(r.rcode(), dns.rcode.NXDOMAIN, r)
        self.assertTrue(r.flags & dns.flags.AD, r)

    # ---- our resolver (dns::UvResolver) against the same server ----

    def test_resolver_signed(self):
        for dnssec_ok in (False, True):
            with self.subTest(dnssec_ok=dnssec_ok):
                a = query("_25._tcp.mx.signed.test", dnssec_ok=dnssec_ok)
                self.assertEqual(a["status"], "ok", a)
                self.assertEqual(a["type"], "TLSA")
                self.assertEqual(a["tlsa"], [TLSA])
                self.assertTrue(a["authenticated"], a)
        m = query("signed.test", "MX")
        self.assertEqual(m["mx"], [{"preference": 10, "exchange": "mx.signed.test"}])
        self.assertTrue(m["authenticated"], m)

    def test_resolver_unsigned(self):
        for dnssec_ok in (False, True):
            with self.subTest(dnssec_ok=dnssec_ok):
                a = query("_25._tcp.mx.unsigned.test", dnssec_ok=dnssec_ok)
                self.assertEqual(a["status"], "ok", a)
                self.assertEqual(a["tlsa"], [TLSA])
                self.assertFalse(a["authenticated"], a)

    def test_resolver_bogus(self):
        a = query("_25._tcp.mx.bogus.test")
        self.assertEqual(a["status"], "servfail", a)
        self.assertEqual(a["tlsa"], [])
        self.assertFalse(a["authenticated"], a)

    def test_resolver_cname_chains(self):
        # RFC 7672 2.2.3: TLSA lookups follow CNAMEs and are secure only if all of the chain is.
        a = query("_25._tcp.mx2.signed.test")
        self.assertEqual(a["status"], "ok", a)
        self.assertEqual(a["canonical_name"], "_25._tcp.mx.signed.test")
        self.assertEqual(a["tlsa"], [TLSA])
        self.assertTrue(a["authenticated"], a)
        b = query("_25._tcp.mx3.signed.test")
        self.assertEqual(b["status"], "ok", b)
        self.assertEqual(b["canonical_name"], "_25._tcp.mx.unsigned.test")
        self.assertEqual(b["tlsa"], [TLSA])
        self.assertFalse(b["authenticated"], b)

    def test_resolver_authenticated_denial(self):
        a = query("_25._tcp.nodane.signed.test")
        self.assertEqual(a["status"], "nxdomain", a)
        self.assertTrue(a["authenticated"], a)
        b = query("_25._tcp.nodane.unsigned.test")
        self.assertEqual(b["status"], "nxdomain", b)
        self.assertFalse(b["authenticated"], b)


if __name__ == "__main__":
    harness.main()
