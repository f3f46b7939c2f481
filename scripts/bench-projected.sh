#!/usr/bin/env bash
# STS calls and broker requests per pod-hour in projected mode, token rotation included, for
# both injections side by side: `sidecar` (SDK -> sidecar -> broker) and `direct` (SDK ->
# broker), with the broker's credential cache on and off. botocore's real RefreshableCredentials
# and ContainerProvider on a fake clock, in front of the sidecar's own cache policy and the
# broker's cache reuse rule (both answered by crates/proxy/examples/cache-policy.rs) and a model
# of the broker (scripts/pod_hour.py says what is real and what is a model). Simulates 24 hours
# per CREDENTIAL_DURATION_SECONDS, workload, injection and broker cache (and again with a token
# never rotated); no network, nothing started. `--durations 900,3600` took 14 minutes on a
# 2-core machine (the 900 s rows dominate: botocore fetches at every AWS call there); the four
# default durations take longer. Prints Markdown tables for BENCHMARKS.md.
#
#   scripts/bench-projected.sh                        # 900,1800,2700,3600 s; default workloads
#   scripts/bench-projected.sh --durations 900,3600 --workloads cli:60,cli:10
#   scripts/bench-projected.sh --injection direct --broker-cache on --hours 48
#   scripts/bench-projected.sh --help                 # every option of pod_hour.py
#
# Installs the dev venv (.venv, requirements-dev.txt: botocore comes with awscli) when missing.
# The broker's own verification cost per request is the bench binary instead:
#   cargo bench -p iam-broker-tests --bench projected
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

for arg in "$@"; do
  case "$arg" in
    -h|--help) usage; echo; ensure_venv; exec "$VENV/bin/python" scripts/pod_hour.py --help ;;
  esac
done
ensure_venv
# The sidecar's policy, the broker cache's reuse rule and the defaults come from the Rust code
# itself (pod_hour.py's `Rust`).
log "cargo build --example cache-policy"
cargo build --quiet --locked --example cache-policy
export CACHE_POLICY_BIN="$ROOT/target/debug/examples/cache-policy"
exec "$VENV/bin/python" scripts/pod_hour.py "$@"
