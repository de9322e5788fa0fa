#!/usr/bin/env bash
# Resident memory per idle, established TLS connection: N clients (Python ssl, ALPN http/1.1)
# complete the handshake and are relayed to an upstream that holds them open; sluice's VmRSS is
# read before and after. Usage: benches/idle-memory.sh [connections, default 4000]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
BIN=$PWD/target/release/sluice
N=${1:-4000}
TMP=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$TMP"' EXIT
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
SINK=$(port); P=$(port)
python3 - "$SINK" <<'PY' &
import socket, sys
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", int(sys.argv[1]))); l.listen(4096)
held = []
while True:
    c, _ = l.accept(); held.append(c)
PY
sleep 0.5
printf 'listen = ["127.0.0.1:%s"]\n[limits]\nmax_connections = 20000\nmax_connections_per_ip = 20000\n[routes.http]\nupstream = "127.0.0.1:%s"\n' "$P" "$SINK" >"$TMP/s.toml"
"$BIN" serve --config "$TMP/s.toml" --state-dir "$TMP/state" >/dev/null 2>&1 & PID=$!
sleep 0.7
ulimit -n "$(ulimit -Hn)"
python3 - "$P" "$N" "$PID" <<'PY'
import socket, ssl, sys, time
port, n, pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rss = lambda: next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:"))
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["http/1.1"])
base = rss(); conns = []
for _ in range(n):
    conns.append(ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost"))
time.sleep(2)
after = rss()
print(f"{n} idle TLS connections: RSS {base} KiB -> {after} KiB, {(after - base) / n:.1f} KiB per connection")
PY
