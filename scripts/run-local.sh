#!/usr/bin/env bash
# Runs iam-broker locally against moto (a local AWS): creates the tables, allows a role, mints a
# token, serves the broker, and fetches credentials with curl the way a pod's sidecar would.
#   scripts/run-local.sh          keep serving until Ctrl-C when run from a terminal
#   scripts/run-local.sh --once   stop after printing the credentials
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

once=0
[ "${1:-}" = "--once" ] && once=1
[ -t 0 ] || once=1

ensure_rust
ensure_venv
log "building iam-broker"
cargo build --quiet --bins
BIN="$ROOT/target/debug/iam-broker"

moto_port=$(free_port)
serve_port=$(free_port)
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

log "starting moto on 127.0.0.1:$moto_port"
"$VENV/bin/moto_server" -H 127.0.0.1 -p "$moto_port" > "$work/moto.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$moto_port/moto-api/"

export AWS_ENDPOINT_URL="http://127.0.0.1:$moto_port" AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
ROLE=arn:aws:iam::123456789012:role/s3_reader

log "iam-broker tables create"
"$BIN" tables create
log "iam-broker allow --namespace team-a --service-account app --role $ROLE"
"$BIN" allow --namespace team-a --service-account app --role "$ROLE"
log "iam-broker token create --namespace team-a --service-account app --role $ROLE --pod web-1"
TOKEN=$("$BIN" token create --namespace team-a --service-account app --role "$ROLE" --pod web-1 2>/dev/null)

log "iam-broker serve --listen 127.0.0.1:$serve_port"
"$BIN" serve --listen "127.0.0.1:$serve_port" 2> "$work/serve.log" &
pids+=($!)
wait_http "http://127.0.0.1:$serve_port/healthz"

log "curl -H 'Authorization: <token>' http://127.0.0.1:$serve_port/credentials"
curl -sS -D "$work/headers" -H "Authorization: $TOKEN" "http://127.0.0.1:$serve_port/credentials" > "$work/body"
grep -i '^cache-control' "$work/headers" >&2 || true
python3 -m json.tool < "$work/body"
log "broker log:"
cat "$work/serve.log" >&2

if [ "$once" = 0 ]; then
  log "serving on http://127.0.0.1:$serve_port (moto on :$moto_port); try:"
  echo "  curl -H 'Authorization: $TOKEN' http://127.0.0.1:$serve_port/credentials" >&2
  log "Ctrl-C to stop"
  wait "${pids[1]}"
fi
