#!/bin/bash
# Runs sluice under heaptrack for the compare bench (COMPARE_SLUICE_WRAP=benches/heaptrack-wrap.sh):
# heaptrack gets its own session, so the bench's TERM to sluice's process group reaches sluice
# through this trap and heaptrack can finish writing. Output: $HEAPTRACK_OUT (default
# ./heaptrack.sluice.zst); read it with `heaptrack_print`.
set -u
out=${HEAPTRACK_OUT:-$PWD/heaptrack.sluice}
setsid heaptrack -o "$out" "$@" > "$out.log" 2>&1 &
trap 'pkill -TERM -f "$1 serve"; wait; exit 0' TERM
wait
