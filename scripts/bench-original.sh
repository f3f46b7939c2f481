#!/usr/bin/env bash
# iam-broker side by side with the original Python broker (cuppett/ocp-iam-broker, seed 000):
# process start -> first credential served, process CPU per credential request and peak RSS,
# one run, one moto, the same machine. Prints Markdown tables with each figure's ratio to the
# original (scripts/bench_original.py says how each is measured).
#
#   scripts/bench-original.sh
#   RUNS=9 REQUESTS=500 scripts/bench-original.sh
#   ORIGINAL_SRC=~/src/ocp-iam-broker scripts/bench-original.sh   # the original's own code
#
# Without ORIGINAL_SRC the original is scripts/original_broker.py, a reproduction of what the
# original does per request (same SDK, same calls, same imports). Its dependencies go into
# .venv-bench (requirements-bench.txt), with moto under waitress: AWS keeps connections alive,
# moto_server closes each (scripts/moto_keepalive.py). iam-broker runs as release
# `iam-broker serve` and release `bootstrap` under a local Lambda Runtime API. Everything binds 127.0.0.1 on free ports
# and stops on exit.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
no_arguments "$@"
cd "$ROOT"

ROLE=arn:aws:iam::123456789012:role/iam-broker/s3_reader
ensure_rust
ensure_venv
ensure_bench_venv
export MOTO_KEEPALIVE=1
log "cargo build --release (iam-broker, bootstrap)"
cargo build --quiet --release --locked -p iam-broker-cli --bin iam-broker -p iam-broker-lambda --bin bootstrap
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
start_load_world

broker_token=$("$BIN/iam-broker" token create --namespace team-a --service-account app --role "$ROLE" --pod bench 2>/dev/null)
# The original keeps tokens in clear in its own table (`auth_token`, `role_arn`).
original_token=$("$VENV/bin/python" -c 'import secrets, string; print("".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(64)))')
AUTH_TABLE=role_perms "$BENCH_VENV/bin/python" scripts/original_broker.py setup role_perms "$original_token" "$ROLE"

log "measuring (moto on the same machine; machine: $(nproc) vCPU, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo))"
IAM_BROKER="$BIN/iam-broker" BOOTSTRAP="$BIN/bootstrap" BROKER_TOKEN="$broker_token" \
  BROKER_EVENT=events/broker-get.json ORIGINAL_PYTHON="$BENCH_VENV/bin/python" \
  ORIGINAL_SCRIPT=scripts/original_broker.py ORIGINAL_TOKEN="$original_token" AUTH_TABLE=role_perms \
  "$VENV/bin/python" scripts/bench_original.py
