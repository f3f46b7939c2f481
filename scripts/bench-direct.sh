#!/usr/bin/env bash
# Direct mode next to sidecar mode with the real SDKs (botocore, the AWS SDK for Rust, the AWS
# SDK for JavaScript v3): process start to first credentials against `iam-broker serve --tls`
# (broker cache warm, cache miss, cold broker) and through the sidecar (warm, cold), and the
# sidecar's memory. Prints Markdown for BENCHMARKS.md ("Direct mode"); scripts/bench_direct.py
# says what each row is. Takes about two minutes.
#
#   scripts/bench-direct.sh
#   RUNS=15 scripts/bench-direct.sh
#
# Builds release binaries, installs the dev venv and tests/js/node_modules when missing. A
# private CA made with openssl stands in for the in-cluster broker's; each SDK trusts it the way
# README's "Direct mode" says. Everything binds 127.0.0.1 on free ports and stops on exit.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
no_arguments "$@"
cd "$ROOT"

RUNS=${RUNS:-7}
PROFILE=release
ROLE=arn:aws:iam::123456789012:role/iam-broker/s3_reader

ensure_rust
ensure_venv
ensure_node_modules
# The Rust SDK consumer in release too: its TLS handshake is part of what is measured.
build_load_binaries iam-broker-proxy/iam-broker-proxy iam-broker-tests/sdk-whoami
whoami="$BIN/sdk-whoami"
start_load_world

log "a private CA and a certificate for 127.0.0.1"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj "/CN=iam-broker bench CA" -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
  -keyout "$work/tls.key" -out "$work/tls.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > "$work/san.ext"
openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
  -CAcreateserial -days 1 -extfile "$work/san.ext" -out "$work/tls.crt" 2>/dev/null
# botocore verifies the container endpoint against certifi's bundle only: a copy with the CA.
certifi=$("$VENV/bin/python" -c 'import certifi, os; print(os.path.dirname(certifi.__file__))')
mkdir -p "$work/python"
cp -r "$certifi" "$work/python/certifi"
cat "$work/ca.pem" >> "$work/python/certifi/cacert.pem"

token=$("$BIN/iam-broker" token create --namespace team-a --service-account app --role "$ROLE" \
  --pod bench-1 2>/dev/null)

log "measuring ($RUNS runs per cell)"
"$VENV/bin/python" scripts/bench_direct.py --work "$work" --runs "$RUNS" \
  --iam-broker "$BIN/iam-broker" --proxy "$BIN/iam-broker-proxy" \
  --sdk-whoami "$whoami" --js-whoami "$ROOT/tests/js/whoami.mjs" \
  --python "$VENV/bin/python" --ca "$work/ca.pem" --cert "$work/tls.crt" --key "$work/tls.key" \
  --token "$token" --certifi-path "$work/python"
