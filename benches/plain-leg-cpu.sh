#!/usr/bin/env bash
# Relay CPU per GiB on a plain leg (plain SSH -> upstream sink), splice vs copy, measured on the
# sluice process alone (/proc/PID/stat utime+stime), interleaved. Needs socat.
# Usage: benches/plain-leg-cpu.sh [GiB per run, default 2] [rounds, default 3]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
BIN=$PWD/target/release/sluice
GIB=${1:-2}; ROUNDS=${2:-3}
TMP=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$TMP"' EXIT
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
SINK=$(port)
socat -u -b 262144 TCP-LISTEN:"$SINK",bind=127.0.0.1,fork,reuseaddr OPEN:/dev/null & sleep 0.5
TCK=$(getconf CLK_TCK)
echo "mode      GiB  cpu-s  cpu-s/GiB  wall-s"
for r in $(seq "$ROUNDS"); do
  for pipes in 64 0; do
    P=$(port)
    printf 'listen = ["127.0.0.1:%s"]\n[limits]\nsplice_pipes = %s\n[routes.ssh]\nupstream = "127.0.0.1:%s"\n' "$P" "$pipes" "$SINK" >"$TMP/s.toml"
    "$BIN" serve --config "$TMP/s.toml" --state-dir "$TMP/state" >/dev/null 2>&1 & PID=$!
    sleep 0.7
    T0=$(awk '{print $14+$15}' /proc/$PID/stat); S=$(date +%s.%N)
    { printf 'SSH-2.0-bulk\r\n'; head -c "${GIB}G" /dev/zero; } | socat -u -b 262144 - TCP:127.0.0.1:"$P"
    E=$(date +%s.%N); T1=$(awk '{print $14+$15}' /proc/$PID/stat)
    kill "$PID"; wait "$PID" 2>/dev/null || true
    mode=$([ "$pipes" = 0 ] && echo copy || echo splice)
    python3 -c "c=($T1-$T0)/$TCK; print(f'{\"$mode\":8} {$GIB:4} {c:6.2f} {c/$GIB:10.3f} {$E-$S:7.2f}')"
  done
done
