#!/usr/bin/env bash
# Load figures for `iam-broker serve` (RELIABILITY.md): CLIENTS concurrent clients send GET /
# with valid tokens (one per client) for DURATION seconds against `iam-broker serve` and moto
# (DynamoDB and STS), while SLOW connections sit there sending a partial request head. Prints
# requests/s, p50/p99, the error count (must be 0), when the slow connections were cut, the
# same clients on /healthz alone (no moto), and the machine. Exit status 1 when any request
# failed or a slow connection was never cut.
#
#   scripts/load-serve.sh
#   CLIENTS=64 DURATION=30 SLOW=256 PROFILE=debug scripts/load-serve.sh
#
# PROFILE=release (default) or debug. Everything binds 127.0.0.1 on free ports and stops on exit.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
no_arguments "$@"
cd "$ROOT"

CLIENTS=${CLIENTS:-32}
DURATION=${DURATION:-20}
SLOW=${SLOW:-64}
PROFILE=${PROFILE:-release}
ROLE=arn:aws:iam::123456789012:role/iam-broker/s3_reader

ensure_rust
ensure_venv
build_load_binaries
start_load_world
log "minting $CLIENTS tokens"
for i in $(seq "$CLIENTS"); do
  "$BIN/iam-broker" token create --namespace team-a --service-account app --role "$ROLE" --pod "load-$i"
done > "$work/tokens" 2>/dev/null

port=$(free_port)
log "iam-broker serve --listen 127.0.0.1:$port"
RUST_LOG=warn "$BIN/iam-broker" serve --listen "127.0.0.1:$port" 2> "$work/serve.log" &
serve_pid=$!
pids+=("$serve_pid")
wait_http "http://127.0.0.1:$port/healthz"

# SLOW connections that send a partial head and then nothing: each must be cut by the server
# (header-read timeout, 10 s by default) while the load below keeps getting answers.
python3 - "$port" "$SLOW" > "$work/slow.txt" <<'PY' &
import socket, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
opened = time.monotonic()
conns = []
for _ in range(count):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: 1")
    s.settimeout(60)
    conns.append(s)
cuts = []
for s in conns:
    try:
        while s.recv(1024):
            pass
        cuts.append(time.monotonic() - opened)
    except socket.timeout:
        pass
    except OSError:
        cuts.append(time.monotonic() - opened)
print(f"slow connections {count} held open with a partial head; {len(cuts)} cut by the server, "
      f"first after {min(cuts, default=0):.2f} s, last after {max(cuts, default=0):.2f} s")
sys.exit(0 if len(cuts) == count else 1)
PY
slow_pid=$!
sleep 0.5

log "load: $CLIENTS clients, ${DURATION} s, GET / with a valid token each"
status=0
aws_before=$(grep -c '"POST ' "$work/moto.log" || true)
cpu_before=$(cpu "$serve_pid")
"$BIN/load-http" "http://127.0.0.1:$port/" --concurrency "$CLIENTS" --seconds "$DURATION" \
  --tokens-file "$work/tokens" | tee "$work/load.txt" || status=1
# Every AWS call (DynamoDB and STS alike) is one POST in moto's request log.
aws_calls=$(( $(grep -c '"POST ' "$work/moto.log" || true) - aws_before ))
answered=$(awk '/^requests +[0-9]+ answered/ {print $2}' "$work/load.txt")
awk -v calls="$aws_calls" -v n="${answered:-0}" -v before="$cpu_before" -v after="$(cpu "$serve_pid")" \
  'BEGIN { if (n > 0) printf "per request      %.2f AWS calls (DynamoDB and STS), %.2f ms of serve CPU\n", calls / n, (after - before) * 1000 / n }' 
wait "$slow_pid" || status=1
cat "$work/slow.txt"
# The HTTP layer alone (no AWS call): GET /healthz, same clients, 5 s.
log "load: $CLIENTS clients, 5 s, GET /healthz (the connection loop and router without moto)"
"$BIN/load-http" "http://127.0.0.1:$port/healthz" --concurrency "$CLIENTS" --seconds 5 \
  | grep -E '^(requests|latency|errors)' || status=1
printf 'serve RSS after   %s\n' "$(awk '/VmRSS/ {print $2, $3}' "/proc/$serve_pid/status")"
printf 'CPU used          serve %s s, moto %s s (moto, one Python process, is the bottleneck when it is near DURATION)\n' \
  "$(cpu "$serve_pid")" "$(cpu "$moto_pid")"
printf 'machine           %s cores, %s, kernel %s, profile %s\n' "$(nproc)" \
  "$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)" "$(uname -r)" "$PROFILE"
exit "$status"
