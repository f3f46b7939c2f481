# Shared helpers for the scripts in this folder. Source it; do not run it.
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

# Prints the calling script's header comment (its usage).
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
# For an argument the script does not take: says so with the usage on stderr, exits 2.
refuse_argument() { { printf '%s: unknown argument %s\n' "scripts/${0##*/}" "$1"; usage; } >&2; exit 2; }
# For a script that takes no argument: --help prints the usage, anything else is refused.
no_arguments() {
  local arg
  for arg in "$@"; do
    case "$arg" in
      -h|--help) usage; exit 0 ;;
      *) refuse_argument "$arg" ;;
    esac
  done
}

# Each line carries the seconds since the script started, so a slow step shows in any log.
log() { printf '\033[1m==> %s\033[0m (%ss)\n' "$*" "$SECONDS" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Creates the virtualenv $1 from the requirements file $2 when missing or changed (a checksum of
# $2 is kept in the venv); $3 names what it holds, for the log.
ensure_venv_from() { # venv requirements description
  local venv=$1 requirements=$2 stamp="$1/.requirements.sha256" want
  command -v python3 >/dev/null || die "python3 is required"
  want="$(sha256sum "$requirements" | cut -d' ' -f1)"
  if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  log "installing $3 into ${venv#"$ROOT"/}"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet -r "$requirements"
  echo "$want" > "$stamp"
}

# .venv: requirements-dev.txt, what the tests and the local run use.
ensure_venv() {
  ensure_venv_from "$VENV" "$ROOT/requirements-dev.txt" "Python tools (moto, cargo-lambda, awscli)"
}

# .venv-bench: requirements-bench.txt, the side-by-side benchmarks' Python (the original
# broker's dependencies, moto under waitress).
BENCH_VENV="$ROOT/.venv-bench"
ensure_bench_venv() {
  ensure_venv_from "$BENCH_VENV" "$ROOT/requirements-bench.txt" "the benchmarks' Python (the original broker's dependencies, moto, waitress)"
}

# .venv-sam: requirements-sam.txt, the AWS SAM CLI.
ensure_sam_venv() {
  ensure_venv_from "$ROOT/.venv-sam" "$ROOT/requirements-sam.txt" "the AWS SAM CLI"
}

# Installs Debian packages when a command is missing (root or sudo).
ensure_apt() { # command package
  command -v "$1" >/dev/null && return
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  log "installing $2 from Debian"
  # Background jobs of one script may install at once; apt takes one at a time.
  (
    flock 9
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$2" >/dev/null
  ) 9>"${TMPDIR:-/tmp}/iam-broker-apt.lock"
}

# tests/js/node_modules: the AWS SDK for JavaScript v3 that tests/js/whoami.mjs runs on, exactly
# as tests/js/package-lock.json pins it; installed again when the lock file is newer than npm's
# record of the last install. Node.js and npm come from Debian when missing.
ensure_node_modules() {
  local js="$ROOT/tests/js" installed major
  ensure_apt node nodejs
  ensure_apt npm npm
  major="$(node -p 'process.versions.node.split(".")[0]')"
  # The SDK's `engines` says node >= 20 (Debian 12's own nodejs is 18): npm only warns.
  [ "$major" -ge 20 ] || log "warning: node $(node --version) is older than the AWS SDK for JavaScript supports (20)"
  installed="$js/node_modules/.package-lock.json"
  [ -f "$installed" ] && [ "$installed" -nt "$js/package-lock.json" ] && return
  log "installing the AWS SDK for JavaScript into tests/js/node_modules (npm ci)"
  npm ci --prefix "$js" --no-audit --no-fund --loglevel=error
}

ensure_rust() {
  command -v curl >/dev/null || die "curl is required"
  command -v cargo >/dev/null || die "cargo is required: https://rustup.rs"
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt >/dev/null 2>&1 || true
}

# Prints a free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Waits until a URL answers (any status), up to $2 seconds (default 30).
wait_http() {
  local url=$1 seconds=${2:-30} i
  for ((i = 0; i < seconds * 10; i++)); do
    curl -s -o /dev/null "$url" && return 0
    sleep 0.1
  done
  die "$url did not answer within ${seconds}s"
}

# A temporary folder ($work) and background processes ($pids) that end with the script.
start_work() {
  work=$(mktemp -d)
  pids=()
  trap stop_work EXIT INT TERM
}
stop_work() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}

# Starts moto on a free port (log in $work/moto.log) and points the AWS SDKs and CLIs at it.
# With MOTO_KEEPALIVE=1 (the side-by-side benchmarks), moto's app runs under waitress from
# .venv-bench (ensure_bench_venv), which keeps connections alive as AWS does.
start_moto() {
  local port
  port=$(free_port)
  log "starting moto (DynamoDB, STS) on 127.0.0.1:$port"
  if [ "${MOTO_KEEPALIVE:-0}" = 1 ]; then
    "$BENCH_VENV/bin/python" "$ROOT/scripts/moto_keepalive.py" "$port" > "$work/moto.log" 2>&1 &
  else
    "$VENV/bin/moto_server" -H 127.0.0.1 -p "$port" > "$work/moto.log" 2>&1 &
  fi
  pids+=($!)
  wait_http "http://127.0.0.1:$port/moto-api/"
  export AWS_ENDPOINT_URL="http://127.0.0.1:$port" AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
  export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
}

# Starts the Kubernetes API stand-in ($1: its binary) holding ServiceAccounts NAMESPACE/NAME=ROLE
# ($2...); its kubeconfig is $work/kubeconfig.
start_kube_standin() {
  local bin=$1
  shift
  "$bin" "$work/kubeconfig" "$@" 2> "$work/kube.log" &
  pids+=($!)
  for _ in $(seq 100); do [ -s "$work/kubeconfig" ] && break; sleep 0.1; done
  [ -s "$work/kubeconfig" ] || die "the Kubernetes API stand-in did not start: $(cat "$work/kube.log")"
}

# For the load scripts: builds `iam-broker`, the load driver and each extra PACKAGE/BINARY
# argument for $PROFILE (release or debug), and sets BIN to the directory they are in.
build_load_binaries() {
  local flag="" spec specs=("iam-broker-cli/iam-broker" "iam-broker-tests/load-http" "$@")
  [ "$PROFILE" = release ] && flag="--release"
  log "cargo build $flag (${specs[*]##*/})"
  for spec in "${specs[@]}"; do
    cargo build --quiet $flag -p "${spec%/*}" --bin "${spec#*/}"
  done
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE"
}

# For the load scripts: moto (its pid in moto_pid) with both tables, and $ROLE allowed for
# team-a/app.
start_load_world() {
  start_work
  start_moto
  moto_pid=${pids[-1]}
  "$BIN/iam-broker" tables create >/dev/null
  "$BIN/iam-broker" allow --namespace team-a --service-account app --role "$ROLE" >/dev/null
}

# CPU seconds process $1 has used so far (user + system).
cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.1f", ($14 + $15) / hz}' "/proc/$1/stat"; }
