#!/usr/bin/env python3
"""Counts test cases over meson's testlog.json files and prints our own summary line.

A meson test that is a doctest executable counts its doctest cases; a Python unittest
file counts its tests; anything else counts as one. A meson test that failed without a
parsable failure count counts as one failure (a crash must never read as a pass).
Arguments: DIR|TESTLOG (or DIR|BUILD-FAILED). Exit 1 when anything failed.
"""
import json
import re
import sys

DOCTEST = re.compile(r"\[doctest\] test cases:\s*(\d+)\s*\|\s*(\d+) passed\s*\|\s*(\d+) failed")
RAN = re.compile(r"^Ran (\d+) tests? in", re.M)
FAILED = re.compile(r"^FAILED \(([^)]*)\)", re.M)
SKIPPED = re.compile(r"skipped=(\d+)")


def count(entry):
    out = (entry.get("stdout") or "") + (entry.get("stderr") or "")
    ok = entry.get("result") in ("OK", "EXPECTEDFAIL")
    m = DOCTEST.findall(out)
    if m:
        total, passed, failed = map(int, m[-1])
        if not ok and failed == 0:
            failed = 1
        return passed, failed, 0
    m = RAN.findall(out)
    if m:
        ran = int(m[-1])
        failed = 0
        skipped = 0
        fm = FAILED.findall(out)
        if fm:
            failed = sum(int(x) for x in re.findall(r"(?:failures|errors)=(\d+)", fm[-1]))
        sm = SKIPPED.findall(out)
        if sm:
            skipped = int(sm[-1])
        if not ok and failed == 0:
            failed = 1
        return max(ran - failed - skipped, 0), failed, skipped
    if entry.get("result") == "SKIP":
        return 0, 0, 1
    return (1, 0, 0) if ok else (0, 1, 0)


def main():
    tp = tf = ts = 0
    for arg in sys.argv[1:]:
        name, _, path = arg.partition("|")
        if path == "BUILD-FAILED":
            print(f"{name}: build failed")
            tf += 1
            continue
        p = f = s = 0
        try:
            with open(path) as fh:
                for line in fh:
                    line = line.strip()
                    if line:
                        a, b, c = count(json.loads(line))
                        p, f, s = p + a, f + b, s + c
        except OSError as e:
            print(f"{name}: no test log ({e})")
            f += 1
        print(f"{name}: {p} passed, {f} failed" + (f", {s} skipped" if s else ""))
        tp, tf, ts = tp + p, tf + f, ts + s
    print(f"{tp} passed, {tf} failed" + (f", {ts} skipped" if ts else ""))
    return 1 if tf else 0


if __name__ == "__main__":
    sys.exit(main())
