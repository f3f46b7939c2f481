#!/usr/bin/env bash
# RUSTC_WORKSPACE_WRAPPER for scripts/test.sh: clippy-driver (CLIPPY_DRIVER) compiles the
# workspace's own crates, with every warning an error: `cargo clippy --all-targets -- -D
# warnings` during a real build. Dependencies are compiled by plain rustc with unchanged flags,
# so their artifacts are the ones any other `cargo build` of the workspace uses.
# bash, not sh: dash drops environment variables whose names are not shell identifiers, such as
# the CARGO_BIN_EXE_<binary-name> that integration tests read at compile time.
exec "${CLIPPY_DRIVER:?}" "$@" -D warnings
