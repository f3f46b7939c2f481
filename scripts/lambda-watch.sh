#!/usr/bin/env bash
# `cargo lambda watch` with everything the files in events/ need: moto (tables, an allowance, the
# fixtures' token record), the Kubernetes API stand-in (ServiceAccount team-a/app annotated with
# the role), PROXY_IMAGE and the fixtures' WEBHOOK_PATH_SECRET.
#   scripts/lambda-watch.sh          run until Ctrl-C: the http handler on port 9000, the cleanup
#                                    handler on 9001; invoke with
#                                    cargo lambda invoke bootstrap -A 127.0.0.1 -P 9000 --data-file events/<event>.json
#   scripts/lambda-watch.sh --check  invoke every event once and compare with events/README.md
#   scripts/lambda-watch.sh --help   print this text
set -euo pipefail
source "$(dirname "$0")/lib.sh"
check=0
for arg in "$@"; do
  case "$arg" in
    --check) check=1 ;;
    -h|--help) usage; exit 0 ;;
    *) refuse_argument "$arg" ;;
  esac
done
cd "$ROOT"

ensure_rust
ensure_venv
export PATH="$VENV/bin:$PATH"
log "building iam-broker, bootstrap and the Kubernetes API stand-in"
cargo build --quiet --locked --bins
BIN="$ROOT/target/debug"

start_work

# What the fixtures in events/ carry (scripts/gen-admission-events.py); none of it is secret.
ROLE=arn:aws:iam::123456789012:role/iam-broker/s3_reader
FIXTURE_TOKEN=iamb_AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA
FIXTURE_PATH_SECRET=fixture-path-secret-0123456789abcdef

start_moto
"$BIN/iam-broker" tables create >&2
"$BIN/iam-broker" allow --namespace team-a --service-account app --role "$ROLE" >&2
start_kube_standin "$BIN/kube-api-standin" "team-a/app=$ROLE"

# The fixtures' token record (their token is public; a real one is only ever minted). Its hash
# and Secret name come from the webhook's own code.
derived=$(cargo run --quiet --locked --example token-secret -- "$FIXTURE_TOKEN")
cat > "$work/seed.py" <<PY
import json, time, boto3
derived = json.loads('$derived')
now = int(time.time())
boto3.client("dynamodb").put_item(TableName="iam-broker-authorizations", Item={
    "token_hash": {"S": derived["token_hash"]},
    "namespace": {"S": "team-a"}, "service_account": {"S": "app"},
    "role_arn": {"S": "$ROLE"}, "pod_name": {"S": "web-1"},
    "secret_name": {"S": derived["secret_name"]},
    "created_at": {"N": str(now)}, "expires": {"N": str(now + 14 * 86400)}})
PY
seed() { "$VENV/bin/python" "$work/seed.py"; }
seed

export KUBECONFIG="$work/kubeconfig" PROXY_IMAGE=registry.example/iam-broker-proxy:0.1.0
export WEBHOOK_PATH_SECRET="$FIXTURE_PATH_SECRET" RUST_LOG=${RUST_LOG:-info}
# One binary, two handlers (template.yaml's Handler settings): http for the API Gateway events,
# cleanup for the stream batch and the sweep, each under its own `cargo lambda watch`.
http_port=9000 cleanup_port=9001
if [ "$check" = 1 ]; then http_port=$(free_port); cleanup_port=$(free_port); fi
watch() { # port handler log
  cargo lambda watch --quiet --bin bootstrap -A 127.0.0.1 -P "$1" --env-var "_HANDLER=$2" --env-var AWS_LAMBDA_HTTP_IGNORE_STAGE_IN_PATH=true > "$3" 2>&1 &
  pids+=($!)
}
watch "$http_port" http "$work/watch-http.log"
watch "$cleanup_port" cleanup "$work/watch-cleanup.log"
for port in "$http_port" "$cleanup_port"; do
  for _ in $(seq 600); do
    curl -s -o /dev/null "http://127.0.0.1:$port/" && break
    sleep 0.2
  done
done
log "cargo lambda watch: http on 127.0.0.1:$http_port, cleanup on 127.0.0.1:$cleanup_port (moto $AWS_ENDPOINT_URL, Kubernetes API stand-in, fixtures seeded)"
if [ "$check" = 0 ]; then
  echo "  cargo lambda invoke bootstrap -A 127.0.0.1 -P $http_port --data-file events/broker-get.json" >&2
  echo "  cargo lambda invoke bootstrap -A 127.0.0.1 -P $cleanup_port --data-file events/sweep.json" >&2
  log "Ctrl-C to stop (function logs: $work/watch-*.log)"
  tail -f "$work/watch-http.log" "$work/watch-cleanup.log"
  exit 0
fi
log "every event of events/ through cargo lambda invoke"
"$VENV/bin/python" scripts/lambda_events_check.py events "$http_port" "$cleanup_port" \
  "$VENV/bin/python" "$work/seed.py" \
  || { tail -n 20 "$work/watch-http.log" "$work/watch-cleanup.log" >&2; exit 1; }
log "every event gave its documented answer"
