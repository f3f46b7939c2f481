#!/usr/bin/env bash
# The deploy rehearsal: README's Deploy section (the secret-mode path and its move to projected,
# then the projected-first path, each run from README's own code blocks) -> first pods -> validate,
# proven without an AWS account (see scripts/rehearse_deploy/__main__.py for every step).
#   scripts/rehearse-deploy.sh          build the binaries, run the rehearsal
#   scripts/rehearse-deploy.sh --keep   keep the work folder (function, moto and sidecar logs)
#   scripts/rehearse-deploy.sh --help   print this text
set -euo pipefail
source "$(dirname "$0")/lib.sh"
for arg in "$@"; do
  case "$arg" in
    --keep) ;;
    -h|--help) usage; exit 0 ;;
    *) refuse_argument "$arg" ;;
  esac
done
cd "$ROOT"

ensure_rust
ensure_venv
# the direct pod's JavaScript SDK consumer (tests/js/whoami.mjs)
ensure_node_modules
log "building bootstrap, iam-broker, iam-broker-proxy, sdk-whoami and the Kubernetes API stand-in"
cargo build --quiet --locked --bins
log "deploy rehearsal: template.yaml -> SAM translator -> moto (IAM enforced) -> README's steps"
PYTHONPATH="$ROOT/scripts" "$VENV/bin/python" -m rehearse_deploy \
  --root "$ROOT" --bin "$ROOT/target/debug" \
  --moto-server "$ROOT/scripts/moto-iam-server.py" --aws "$VENV/bin/aws" "$@"
