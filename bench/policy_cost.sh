#!/usr/bin/env bash
# The cost of the account policy checks (issue 5): bench/submission.sh with --limits none and
# --limits all, alternated run by run in one invocation (so slow drifts of a shared machine
# hit both alike), then the median of each and the ratio.
#
#   bench/policy_cost.sh [--runs N] [--duration S] [--scenarios pooled,permsg] [--dkim none]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=3
DURATION=10
SCENARIOS=pooled,permsg
DKIM=none
while [[ $# -gt 0 ]]; do
  case "$1" in
    --runs) RUNS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --scenarios) SCENARIOS=$2; shift 2 ;;
    --dkim) DKIM=$2; shift 2 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "policy_cost.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for ((i = 1; i <= RUNS; i++)); do
  for mode in none all; do
    "$ROOT/bench/submission.sh" --runs 1 --duration "$DURATION" --scenarios "$SCENARIOS" --dkim "$DKIM" \
      --limits "$mode" >"$OUT/$mode.$i.log" 2>&1 || { tail -20 "$OUT/$mode.$i.log" >&2; exit 1; }
    grep -E '^  .* subrelay [0-9.]+ msg/s' "$OUT/$mode.$i.log" | sed "s/^/run $i limits=$mode:/"
  done
done

python3 - "$OUT" "$RUNS" <<'EOF'
import re, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
rows = {}
for mode in ("none", "all"):
    for i in range(1, runs + 1):
        for line in open(f"{out}/{mode}.{i}.log"):
            m = re.match(r"^  (.*?)\s+subrelay ([0-9.]+) msg/s \(p99 ([0-9.]+) ms", line)
            if m:
                rows.setdefault((m.group(1), mode), []).append((float(m.group(2)), float(m.group(3))))
print()
print(f"{'scenario':24} {'no limits msg/s':>16} {'all limits msg/s':>17} {'ratio':>6}  p99 ms (none / all)")
for scen in sorted({s for s, _ in rows}):
    a = rows.get((scen, "none"), [])
    b = rows.get((scen, "all"), [])
    if not a or not b:
        continue
    ma = statistics.median(x for x, _ in a)
    mb = statistics.median(x for x, _ in b)
    pa = statistics.median(p for _, p in a)
    pb = statistics.median(p for _, p in b)
    print(f"{scen:24} {ma:16.0f} {mb:17.0f} {mb / ma:6.3f}  {pa:.2f} / {pb:.2f}")
EOF
