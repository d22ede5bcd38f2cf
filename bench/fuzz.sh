#!/usr/bin/env bash
# Fuzz one target with libFuzzer under ASan+UBSan, then offer the new corpus entries.
#
#   bench/fuzz.sh TARGET [SECONDS]      TARGET: session headers dns_codec dkim_canon
#                                               client_session config; SECONDS default 1200
#
# Builds build-fuzz/ (clang, -Dfuzz=true: every module carries coverage instrumentation),
# runs one fuzzing process (leaves the other core free) seeded with tests/fuzz/corpus/TARGET,
# and on the way out merges what it found into build-fuzz/new-corpus/TARGET/ (only inputs that
# add coverage over the seed corpus). Copy those you want to keep into tests/fuzz/corpus/TARGET/:
# every build replays that directory as a test. A crash, leak or invariant failure stops the run
# with the input in build-fuzz/artifacts/.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET=${1:?usage: bench/fuzz.sh TARGET [SECONDS]}
SECONDS_TO_RUN=${2:-1200}
BUILD=$ROOT/build-fuzz
SEED=$ROOT/tests/fuzz/corpus/$TARGET
[[ -d $SEED ]] || { echo "fuzz.sh: no corpus directory $SEED" >&2; exit 2; }
if [[ ! -d $BUILD ]]; then
  CC=clang CXX=clang++ meson setup "$BUILD" "$ROOT" -Dfuzz=true -Db_sanitize=address,undefined \
    -Db_lundef=false -Dintegration_tests=false >/dev/null
fi
ninja -C "$BUILD" "tests/fuzz/fuzz_$TARGET" >/dev/null
WORK=$BUILD/fuzz-work/$TARGET
rm -rf "$WORK"
mkdir -p "$WORK/found" "$BUILD/artifacts" "$BUILD/new-corpus/$TARGET"
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
"$BUILD/tests/fuzz/fuzz_$TARGET" -max_total_time="$SECONDS_TO_RUN" -print_final_stats=1 -timeout=10 \
  -rss_limit_mb=2560 -max_len=65536 -artifact_prefix="$BUILD/artifacts/" "$WORK/found" "$SEED"
# Keep only what adds coverage over the seeds: merge into a copy of them, then take the
# files that were not seeds.
cp -r "$SEED" "$WORK/merged"
"$BUILD/tests/fuzz/fuzz_$TARGET" -merge=1 "$WORK/merged" "$WORK/found" 2>/dev/null
for f in "$WORK/merged"/*; do
  [[ -e $SEED/$(basename "$f") ]] || cp "$f" "$BUILD/new-corpus/$TARGET/"
done
echo "fuzz.sh: $(ls "$BUILD/new-corpus/$TARGET" | wc -l) new corpus entries in $BUILD/new-corpus/$TARGET"
