#!/usr/bin/env bash
# Load figures for the sidecar (RELIABILITY.md): CLIENTS concurrent clients send GET for
# DURATION seconds (60: long enough to send every token once) to `iam-broker-proxy` in front
# of `iam-broker serve` and moto, cycling through DISTINCT tokens: VALID valid ones (more than
# the cache's 64 entries, so its LRU bound evicts), the rest well-formed but unknown (the broker
# refuses each one), and every 10th request the one "hot" valid token. Prints requests/s,
# latencies, the proxy's RSS before / at most during / after the run, and how many times the
# broker was asked for the hot token (1 = it stayed in the cache throughout). Exit status 1
# when a hot request failed or the hot token left the cache.
#
#   scripts/load-proxy.sh
#   DISTINCT=100000 VALID=200 PROFILE=debug scripts/load-proxy.sh
#
# PROFILE=release (default) or debug. Everything binds 127.0.0.1 on free ports and stops on exit.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
no_arguments "$@"
cd "$ROOT"

CLIENTS=${CLIENTS:-32}
DURATION=${DURATION:-60}
DISTINCT=${DISTINCT:-10000}
VALID=${VALID:-100}
PROFILE=${PROFILE:-release}
ROLE=arn:aws:iam::123456789012:role/iam-broker/s3_reader

ensure_rust
ensure_venv
build_load_binaries iam-broker-proxy/iam-broker-proxy
start_load_world
log "minting 1 hot and $VALID other valid tokens; $((DISTINCT - VALID - 1)) unknown ones"
hot=$("$BIN/iam-broker" token create --namespace team-a --service-account app --role "$ROLE" --pod hot)
for i in $(seq "$VALID"); do
  "$BIN/iam-broker" token create --namespace team-a --service-account app --role "$ROLE" --pod "valid-$i"
done > "$work/tokens" 2>/dev/null
python3 - "$((DISTINCT - VALID - 1))" >> "$work/tokens" <<'PY'
import base64, secrets, sys
for _ in range(int(sys.argv[1])):
    print("iamb_" + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("="))
PY
# Interleave the valid tokens among the unknown ones.
shuf "$work/tokens" -o "$work/tokens"

serve_port=$(free_port)
proxy_port=$(free_port)
log "iam-broker serve on 127.0.0.1:$serve_port; iam-broker-proxy on 127.0.0.1:$proxy_port"
RUST_LOG=info "$BIN/iam-broker" serve --listen "127.0.0.1:$serve_port" 2> "$work/serve.log" &
serve_pid=$!
pids+=("$serve_pid")
wait_http "http://127.0.0.1:$serve_port/healthz"
BROKER_URL="http://127.0.0.1:$serve_port/" LISTEN_ADDR="127.0.0.1:$proxy_port" \
  "$BIN/iam-broker-proxy" 2> "$work/proxy.log" &
proxy_pid=$!
pids+=("$proxy_pid")
wait_http "http://127.0.0.1:$proxy_port/healthz"
rss() { awk '/VmRSS/ {print $2}' "/proc/$proxy_pid/status"; }
rss_before=$(rss)

# The proxy's RSS every 100 ms during the run; the largest is reported.
( while kill -0 "$proxy_pid" 2>/dev/null; do rss; sleep 0.1; done ) > "$work/rss" &
pids+=($!)

log "load: $CLIENTS clients, ${DURATION} s, $DISTINCT distinct tokens, every 10th request the hot one"
status=0
"$BIN/load-http" "http://127.0.0.1:$proxy_port/" --concurrency "$CLIENTS" --seconds "$DURATION" \
  --tokens-file "$work/tokens" --hot-token "$hot" --hot-every 10 || status=1
rss_max=$(sort -n "$work/rss" | tail -1)
hot_fetches=$(grep '"credentials served"' "$work/serve.log" | grep -c '"pod":"hot"' || true)
printf 'proxy RSS         before %s KiB, max during %s KiB, after %s KiB\n' "$rss_before" "$rss_max" "$(rss)"
printf 'proxy log         %s bytes for the whole run\n' "$(wc -c < "$work/proxy.log")"
printf 'hot token         fetched from the broker %s time(s)\n' "$hot_fetches"
printf 'CPU used          proxy %s s, serve %s s, moto %s s\n' "$(cpu "$proxy_pid")" "$(cpu "$serve_pid")" "$(cpu "$moto_pid")"
[ "$hot_fetches" = 1 ] || status=1
printf 'machine           %s cores, %s, kernel %s, profile %s\n' "$(nproc)" \
  "$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)" "$(uname -r)" "$PROFILE"
exit "$status"
