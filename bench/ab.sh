#!/usr/bin/env bash
# A/B cost of a change on the submission hot path: bench/submission.sh run against two
# release build directories, alternated run by run in one invocation (a shared, noisy
# machine drifts for both alike), then each scenario's median and the ratio B/A.
#
#   bench/ab.sh --a DIR --b DIR [--runs N] [--duration S] [--scenarios pooled,permsg] [--dkim rsa]
#               [--compare-postfix] [--a-args "ARGS"] [--b-args "ARGS"]
#
# DIR is a release build directory of the tree to measure (made with
# `meson setup DIR --buildtype=release` in that tree; bench/submission.sh builds it when
# missing). With --compare-postfix, each round also runs Postfix + OpenDKIM once, so the
# lead over Postfix can be quoted for both builds from the same invocation. --a-args and
# --b-args pass more options to bench/submission.sh for one side only, so the same build
# can be compared with itself, e.g. --a-args "--metrics off" --b-args "--metrics on".
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=3
DURATION=10
SCENARIOS=pooled,permsg
DKIM=rsa
A=""
B=""
POSTFIX=0
A_ARGS=""
B_ARGS=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --a) A=$(realpath "$2"); shift 2 ;;
    --b) B=$(realpath "$2"); shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --scenarios) SCENARIOS=$2; shift 2 ;;
    --dkim) DKIM=$2; shift 2 ;;
    --compare-postfix) POSTFIX=1; shift ;;
    --a-args) A_ARGS=$2; shift 2 ;;
    --b-args) B_ARGS=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "ab.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[[ -n $A && -n $B ]] || { echo "ab.sh: --a DIR and --b DIR are required" >&2; exit 2; }

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for ((i = 1; i <= RUNS; i++)); do
  for side in a b; do
    dir=$A; extra=$A_ARGS
    [[ $side == b ]] && { dir=$B; extra=$B_ARGS; }
    # shellcheck disable=SC2086
    "$ROOT/bench/submission.sh" --runs 1 --duration "$DURATION" --scenarios "$SCENARIOS" --dkim "$DKIM" \
      --build-dir "$dir" $extra >"$OUT/$side.$i.log" 2>&1 || { tail -20 "$OUT/$side.$i.log" >&2; exit 1; }
    grep -E '^  .* subrelay [0-9.]+ msg/s' "$OUT/$side.$i.log" | sed "s/^/run $i $side:/"
  done
  if [[ $POSTFIX == 1 ]]; then
    "$ROOT/bench/submission.sh" --runs 1 --duration "$DURATION" --scenarios "$SCENARIOS" --postfix-only \
      --build-dir "$B" >"$OUT/postfix.$i.log" 2>&1 || { tail -20 "$OUT/postfix.$i.log" >&2; exit 1; }
    grep -E '^  .* postfix [0-9.]+ msg/s' "$OUT/postfix.$i.log" | sed "s/^/run $i postfix:/" || true
  fi
done

/usr/bin/python3 - "$OUT" "$RUNS" <<'EOF'
import re, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
rows = {}
for side in ("a", "b", "postfix"):
    for i in range(1, runs + 1):
        try:
            lines = open(f"{out}/{side}.{i}.log").read().splitlines()
        except OSError:
            continue
        for line in lines:
            m = re.match(r"^  (.*?)\s+(subrelay|postfix) ([0-9.]+) msg/s \(p99 ([0-9.]+) ms", line)
            if m:
                rows.setdefault((m.group(1), side), []).append((float(m.group(3)), float(m.group(4))))
print()
# B/A is the ratio of the medians; "pair" is the median of each round's own B/A, which a
# machine drifting during the invocation (both sides slower by the last round) moves less.
print(f"{'scenario':24} {'A msg/s':>9} {'B msg/s':>9} {'B/A':>6} {'pair':>6} {'postfix':>8} {'A/pf':>6} {'B/pf':>6}  p99 ms A / B")
for scen in sorted({s for s, _ in rows}):
    a = rows.get((scen, "a"), [])
    b = rows.get((scen, "b"), [])
    if not a or not b:
        continue
    ma = statistics.median(x for x, _ in a)
    mb = statistics.median(x for x, _ in b)
    pa = statistics.median(p for _, p in a)
    pb = statistics.median(p for _, p in b)
    pf = rows.get((scen, "postfix"), [])
    mp = statistics.median(x for x, _ in pf) if pf else float("nan")
    pair = statistics.median(y / x for (x, _), (y, _) in zip(a, b))
    print(f"{scen:24} {ma:9.0f} {mb:9.0f} {mb / ma:6.3f} {pair:6.3f} {mp:8.0f} {ma / mp:6.2f} {mb / mp:6.2f}  "
          f"{pa:.2f} / {pb:.2f}")
EOF
