#!/usr/bin/env bash
# Runs every check and test. Installs what it needs (moto and cargo-lambda into .venv).
#   scripts/test.sh            format, lint, unit, router, adapter and end-to-end tests,
#                              the local run, and the Lambda build
#   SKIP_LAMBDA_BUILD=1 ...    leave out `cargo lambda build --release`
set -euo pipefail
source "$(dirname "$0")/lib.sh"
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
grep -q '"AccessKeyId"' target/run-local.out || { cat target/run-local.out; die "run-local did not print credentials"; }
if [ "${SKIP_LAMBDA_BUILD:-0}" != 1 ]; then
  log "cargo lambda build --release"
  cargo lambda build --release --locked --bin bootstrap
  test -x target/lambda/bootstrap/bootstrap || die "cargo lambda build did not produce target/lambda/bootstrap/bootstrap"
fi
log "all checks passed"
