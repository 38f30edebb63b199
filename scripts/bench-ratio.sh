#!/usr/bin/env bash
# bench-ratio.sh [MODEL] [N] [REPS] [C...] — inferlet/native ratio of time per
# output token with `pie bench generate`: for each concurrency C, one process
# runs the inferlet and the native loop in turn (--both), REPS runs of each,
# and prints the median of each and the ratio. One process means one backend
# and one set of tuned kernels for both (the CUDA backend times its matmul
# choices at start, and near ties go either way between processes). A pie
# without --both (an older build) gets the runs as separate processes,
# interleaved (inferlet, native, inferlet, ...).
# PIE (default ./build/pie; may be a command such as "bundle/run pie") and
# BACKEND (default cpu) select the binary and backend.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-random:stories15M}; n=${2:-128}; reps=${3:-5}; shift 3 || true
cs=${*:-1 8 64}
pie=${PIE:-./build/pie}; backend=${BACKEND:-cpu}
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
field() { sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p"; }
gen() { $pie bench generate --model "$model" --backend "$backend" -c "$1" -n "$n" "${@:2}" --json 2>/dev/null; }
row() { printf "%-6s %12.3f %12.3f %8.3f %14.1f %14.1f\n" "$@"; }
both=0
$pie bench generate --help 2>&1 | grep -q -- "--both" && both=1
printf "%-6s %12s %12s %8s %14s %14s\n" C inferlet_ms native_ms ratio inferlet_tok/s native_tok/s
for c in $cs; do
  if [ $both = 1 ]; then
    j=$(gen "$c" --both --reps "$reps")
    row "$c" "$(field inferlet_ms_per_token <<< "$j")" "$(field native_ms_per_token <<< "$j")" \
        "$(field ratio <<< "$j")" "$(field inferlet_tokens_per_s <<< "$j")" \
        "$(field native_tokens_per_s <<< "$j")"
    continue
  fi
  : > /tmp/bench-i.$$; : > /tmp/bench-n.$$
  for r in $(seq "$reps"); do
    gen "$c" >> /tmp/bench-i.$$
    gen "$c" --native >> /tmp/bench-n.$$
  done
  mi=$(field ms_per_token < /tmp/bench-i.$$ | median); mn=$(field ms_per_token < /tmp/bench-n.$$ | median)
  ti=$(field tokens_per_s < /tmp/bench-i.$$ | median); tn=$(field tokens_per_s < /tmp/bench-n.$$ | median)
  row "$c" "$mi" "$mn" "$(awk -v a="$mi" -v b="$mn" 'BEGIN{print a/b}')" "$ti" "$tn"
done
rm -f /tmp/bench-i.$$ /tmp/bench-n.$$
