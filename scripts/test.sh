#!/usr/bin/env bash
# Runs every check and test. Installs what it needs (moto and cargo-lambda into .venv).
#   scripts/test.sh            format, lint, unit, router, adapter and end-to-end tests,
#                              the local run, and the Lambda build
#   SKIP_LAMBDA_BUILD=1 ...    leave out `cargo lambda build --release`
#   SKIP_MUSL_BUILD=1 ...      leave out the static (musl) build of the sidecar
#   scripts/test.sh --help     print this text
set -euo pipefail
source "$(dirname "$0")/lib.sh"
no_arguments "$@"
cd "$ROOT"

ensure_rust
ensure_venv
export PATH="$VENV/bin:$PATH"

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "build binaries"
cargo build --workspace --bins --locked
log "cargo test"
cargo test --workspace --locked
log "the README's run command (scripts/run-local.sh --once)"
scripts/run-local.sh --once > target/run-local.out
grep -q '"Arn": "arn:aws:sts::123456789012:assumed-role/s3_reader/' target/run-local.out \
  || { cat target/run-local.out; die "run-local did not print the assumed role"; }
log "the projected mode of the run command (scripts/run-local.sh --projected --once)"
scripts/run-local.sh --projected --once > target/run-local-projected.out
# Two identities: before and after the cluster's signing-key rotation.
[ "$(grep -c '"Arn": "arn:aws:sts::123456789012:assumed-role/s3_reader/' target/run-local-projected.out)" = 2 ] \
  || { cat target/run-local-projected.out; die "run-local --projected did not print the assumed role twice"; }
log "every file of events/ through cargo lambda watch / invoke (scripts/lambda-watch.sh --check)"
scripts/lambda-watch.sh --check
log "deploy rehearsal: template.yaml -> moto with IAM enforced -> README's Deploy steps -> first pod"
scripts/rehearse-deploy.sh
log "cfn-lint template.yaml"
"$VENV/bin/cfn-lint" template.yaml
ensure_sam_venv
log "sam validate --lint"
SAM_CLI_TELEMETRY=0 "$ROOT/.venv-sam/bin/sam" validate --lint --region us-east-1
if [ "${SKIP_MUSL_BUILD:-0}" != 1 ]; then
  log "static (musl) build of iam-broker-proxy"
  ensure_apt musl-gcc musl-tools
  if ! rustup target add x86_64-unknown-linux-musl >/dev/null 2>&1; then
    log "warning: rustup cannot fetch the x86_64-unknown-linux-musl target here; static build skipped"
  else
  cargo build --release --locked -p iam-broker-proxy --target x86_64-unknown-linux-musl
  file target/x86_64-unknown-linux-musl/release/iam-broker-proxy 2>/dev/null | grep -Eq "statically linked|static-pie linked" \
    || ldd target/x86_64-unknown-linux-musl/release/iam-broker-proxy 2>&1 | grep -Eq "statically linked|not a dynamic executable" \
    || die "iam-broker-proxy (musl) is not statically linked"
  fi
fi
if [ "${SKIP_LAMBDA_BUILD:-0}" != 1 ]; then
  log "cargo lambda build --release"
  cargo lambda build --release --locked --bin bootstrap
  test -x target/lambda/bootstrap/bootstrap || die "cargo lambda build did not produce target/lambda/bootstrap/bootstrap"
fi
log "all checks passed"
