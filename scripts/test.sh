#!/usr/bin/env bash
# Runs every check and test. Installs what it needs (moto and cargo-lambda into .venv, the SAM
# CLI into .venv-sam, the AWS SDK for JavaScript into tests/js/node_modules, Debian's musl-tools).
#   scripts/test.sh            format, lint, unit, router, adapter and end-to-end tests,
#                              the local run, the deploy rehearsal, the template checks, the
#                              static sidecar build and the Lambda build
#   SKIP_LAMBDA_BUILD=1 ...    leave out `cargo lambda build --release`
#   SKIP_MUSL_BUILD=1 ...      leave out the static (musl) build of the sidecar
#   scripts/test.sh --help     print this text
#
# On two cores the order matters (README, "Development"): downloads (Python tools, SAM CLI, the
# JavaScript SDK, musl-tools) and the two optimised builds (the Lambda artifact with fat LTO, the
# static sidecar) run in the background from the start, the builds at the lowest CPU priority,
# filling what the debug build's serial stretches, the tests (mostly waiting on I/O) and the
# one-unit LTO link leave idle. clippy lints during the one debug build. Every background job is waited for,
# and its log shown if it failed.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
no_arguments "$@"
cd "$ROOT"

ensure_rust
export PATH="$VENV/bin:$PATH"
mkdir -p target

# in_background NAME COMMAND...: runs COMMAND with its output in target/setup-NAME.log.
in_background() {
  local name=$1
  shift
  ("$@") > "target/setup-$name.log" 2>&1 &
  eval "job_$name=$!"
}
# wait_for NAME: waits for that job; its log and a failure if it failed.
wait_for() {
  local job="job_$1" status=0
  wait "${!job}" || status=$?
  [ "$status" = 0 ] || { cat "target/setup-$1.log" >&2; die "$1 failed (target/setup-$1.log)"; }
}

# The static sidecar, in the `ci` profile: what is checked is the static link, not the code
# generation BENCHMARKS measures (Cargo.toml says why). Exit 4: rustup has no musl target here.
musl_build() {
  ensure_apt musl-gcc musl-tools
  rustup target add x86_64-unknown-linux-musl || exit 4
  nice -n 19 cargo build --profile ci --locked -p iam-broker-proxy --target x86_64-unknown-linux-musl
}
# The Python tools first (cargo-lambda is one of them), then the Lambda artifact: fat LTO, the
# release profile that is shipped, at the lowest CPU priority.
venv_then_lambda() {
  ensure_venv
  touch target/venv.ready
  [ "${SKIP_LAMBDA_BUILD:-0}" = 1 ] || nice -n 19 cargo lambda build --release --locked --bin bootstrap
}
# Waits until the Python tools are installed (the job above goes on with the Lambda build).
wait_for_venv() {
  until [ -e target/venv.ready ]; do
    kill -0 "$job_lambda" 2>/dev/null || { [ -e target/venv.ready ] && break; wait_for lambda; }
    sleep 1
  done
}

# Lints run where the code is compiled: clippy-driver is the compiler of the workspace's own
# crates in every build below (what `cargo clippy` does, without its second, check-only build of
# every dependency), and every warning is an error (scripts/clippy-deny.sh). Exported, so that
# the scripts' builds and the background builds share these artifacts.
export CLIPPY_DRIVER RUSTC_WORKSPACE_WRAPPER="$ROOT/scripts/clippy-deny.sh"
CLIPPY_DRIVER="$(rustup which clippy-driver)"

rm -f target/venv.ready
in_background lambda venv_then_lambda
in_background sam ensure_sam_venv
in_background node ensure_node_modules
[ "${SKIP_MUSL_BUILD:-0}" = 1 ] || in_background musl musl_build

log "cargo fmt --check"
cargo fmt --all -- --check
# One debug build serves the lints, the tests and every run command: no dev-dependency adds a
# feature to a dependency, so `cargo build` and `cargo test` share every dependency's artifacts
# (ARCHITECTURE.md, "Who may depend on whom"); the scripts run the binaries and examples built
# here. `--all-targets` compiles (and lints) what `cargo clippy --all-targets` checks: benches too.
log "build and lint (clippy, -D warnings) binaries, examples, tests and benches"
cargo build --workspace --bins --examples --locked
cargo test --workspace --all-targets --locked --no-run
wait_for_venv
wait_for node
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
wait_for sam
log "sam validate --lint"
SAM_CLI_TELEMETRY=0 "$ROOT/.venv-sam/bin/sam" validate --lint --region us-east-1
if [ "${SKIP_MUSL_BUILD:-0}" != 1 ]; then
  log "static (musl) build of iam-broker-proxy: waiting"
  status=0
  wait "$job_musl" || status=$?
  if [ "$status" = 4 ]; then
    log "warning: rustup cannot fetch the x86_64-unknown-linux-musl target here; static build skipped"
  else
    [ "$status" = 0 ] || { cat target/setup-musl.log >&2; die "the static build failed (target/setup-musl.log)"; }
    binary=target/x86_64-unknown-linux-musl/ci/iam-broker-proxy
    file "$binary" 2>/dev/null | grep -Eq "statically linked|static-pie linked" \
      || ldd "$binary" 2>&1 | grep -Eq "statically linked|not a dynamic executable" \
      || die "iam-broker-proxy (musl) is not statically linked"
  fi
fi
log "cargo lambda build --release: waiting"
wait_for lambda
if [ "${SKIP_LAMBDA_BUILD:-0}" != 1 ]; then
  test -x target/lambda/bootstrap/bootstrap || die "cargo lambda build did not produce target/lambda/bootstrap/bootstrap"
fi
log "all checks passed"
