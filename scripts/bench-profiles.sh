#!/usr/bin/env bash
# The release profile's trade-offs, measured: each variant below is built in its own target
# directory (target/profiles/NAME), then its `bootstrap` (the Lambda artifact, raw and zipped)
# and `iam-broker serve` are measured side by side against one moto: process start -> first
# credential, CPU per warm credential request and peak RSS (scripts/bench_original.py says how).
#
#   scripts/bench-profiles.sh                       # every variant (about 10 min of build each)
#   VARIANTS="thin-cu4 fat-cu1" RUNS=9 scripts/bench-profiles.sh
#
# Variants are NAME:LTO:CODEGEN_UNITS:OPT_LEVEL:PANIC, applied with CARGO_PROFILE_RELEASE_*;
# `fat-cu1` is Cargo.toml's release profile. Builds go through `nice`; the measurements run
# after every build is done. Needs about 4 GB of disk per variant.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
no_arguments "$@"
cd "$ROOT"

ALL="thin-cu4:thin:4:3:unwind fat-cu1:fat:1:3:unwind off-cu16:off:16:3:unwind thin-cu4-s:thin:4:s:unwind thin-cu4-abort:thin:4:3:abort"
want=${VARIANTS:-}
ROLE=arn:aws:iam::123456789012:role/iam-broker/s3_reader
ensure_rust
ensure_venv
ensure_bench_venv
export MOTO_KEEPALIVE=1

measured=()
for spec in $ALL; do
  IFS=: read -r name lto units opt panic <<<"$spec"
  if [ -n "$want" ] && ! [[ " $want " == *" $name "* ]]; then continue; fi
  log "building $name (lto=$lto codegen-units=$units opt-level=$opt panic=$panic)"
  started=$(date +%s)
  CARGO_TARGET_DIR="$ROOT/target/profiles/$name" CARGO_PROFILE_RELEASE_LTO=$lto \
    CARGO_PROFILE_RELEASE_CODEGEN_UNITS=$units CARGO_PROFILE_RELEASE_OPT_LEVEL=$opt \
    CARGO_PROFILE_RELEASE_PANIC=$panic \
    nice cargo build --quiet --release --locked -p iam-broker-lambda --bin bootstrap -p iam-broker-cli --bin iam-broker
  log "$name built in $(( $(date +%s) - started )) s (from scratch only if its directory was new)"
  measured+=("$name=$ROOT/target/profiles/$name/release")
done
[ ${#measured[@]} -gt 0 ] || die "no variant named in VARIANTS=\"$want\" (known: $ALL)"

BIN="$ROOT/target/profiles/${measured[0]%%=*}/release"
start_load_world
token=$("$BIN/iam-broker" token create --namespace team-a --service-account app --role "$ROLE" --pod bench 2>/dev/null)
log "measuring ${#measured[@]} variants ($(nproc) vCPU, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo))"
VARIANTS="${measured[*]}" BROKER_TOKEN="$token" BROKER_EVENT=events/broker-get.json \
  "$VENV/bin/python" scripts/bench_original.py
