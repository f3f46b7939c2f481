#!/usr/bin/env bash
# Fuzzing: every target of crates/fuzz-targets under libFuzzer when the nightly toolchain and
# cargo-fuzz are installed, else the stable smoke of the same functions (what CI runs).
#   scripts/fuzz.sh                    each libFuzzer target for 60 s (or the stable smoke)
#   scripts/fuzz.sh --seconds N        each target for N seconds
#   scripts/fuzz.sh --target NAME      only NAME (repeatable): admission_review, admission_pod,
#                                      authorization, token_record, stream_event, cache_policy,
#                                      proxy_request, projected_token, jwks
#   scripts/fuzz.sh --smoke            the stable smoke, even where nightly is installed
#   scripts/fuzz.sh --help             print this text
# New corpus entries go to fuzz/corpus/<target> (ignored by git); fuzz/seeds/<target> and
# fuzz/dicts/<target>.dict are used when present. A crash leaves its input in
# fuzz/artifacts/<target>/ and makes this script fail; replay it with
#   cargo +nightly fuzz run -s none <target> fuzz/artifacts/<target>/<file>
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ALL_TARGETS=(admission_review admission_pod authorization token_record stream_event cache_policy proxy_request projected_token jwks)
seconds=60
smoke=false
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) [ $# -ge 2 ] || refuse_argument "$1"; seconds="$2"; shift ;;
    --target) [ $# -ge 2 ] || refuse_argument "$1"; targets+=("$2"); shift ;;
    --smoke) smoke=true ;;
    -h|--help) usage; exit 0 ;;
    *) refuse_argument "$1" ;;
  esac
  shift
done
[ ${#targets[@]} -gt 0 ] || targets=("${ALL_TARGETS[@]}")
cd "$ROOT"
ensure_rust

if ! $smoke && cargo +nightly --version >/dev/null 2>&1 && cargo fuzz --version >/dev/null 2>&1; then
  log "libFuzzer, ${seconds} s per target ($(cargo +nightly --version))"
  # Safe Rust: no sanitizer (-s none), which runs several times faster than ASan.
  cargo +nightly fuzz build -s none
  for target in "${targets[@]}"; do
    corpus=("fuzz/corpus/$target")
    mkdir -p "${corpus[0]}"
    [ -d "fuzz/seeds/$target" ] && corpus+=("fuzz/seeds/$target")
    options=("-max_total_time=$seconds" "-print_final_stats=1")
    [ -f "fuzz/dicts/$target.dict" ] && options+=("-dict=fuzz/dicts/$target.dict")
    log "fuzzing $target"
    cargo +nightly fuzz run -s none "$target" "${corpus[@]}" -- "${options[@]}"
  done
else
  log "no nightly toolchain with cargo-fuzz (or --smoke): the stable smoke of every target"
  cargo test --locked -p iam-broker-fuzz-targets
fi
