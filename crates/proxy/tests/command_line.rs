//! The `iam-broker-proxy` binary's command line: `--help` and `--version` answer and exit 0,
//! anything else is a usage error (exit 2) that starts nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

use iam_broker_proxy::config::{
    DEFAULT_BROKER_TIMEOUT_MS, DEFAULT_CACHE_MAX_ENTRIES, DEFAULT_HEADER_READ_TIMEOUT_MS,
    DEFAULT_LISTEN_ADDR, DEFAULT_MAX_CONNECTIONS, DEFAULT_MIN_VALIDITY_SECONDS,
    DEFAULT_REFRESH_AHEAD_SECONDS, ENV_BROKER_CA_PEM, ENV_BROKER_TIMEOUT_MS, ENV_BROKER_URL,
    ENV_CACHE_MAX_ENTRIES, ENV_HEADER_READ_TIMEOUT_MS, ENV_LISTEN_ADDR, ENV_MAX_CONNECTIONS,
    ENV_MIN_VALIDITY_SECONDS, ENV_REFRESH_AHEAD_SECONDS,
};

fn proxy(args: &[&str]) -> Output {
    // No BROKER_URL: were the arguments ignored, the proxy would fail on its configuration
    // instead, with another exit status and nothing on stdout.
    Command::new(env!("CARGO_BIN_EXE_iam-broker-proxy"))
        .args(args)
        .env_clear()
        .output()
        .unwrap()
}

#[test]
fn help_names_every_variable_with_its_default() {
    for flag in ["--help", "-h"] {
        let out = proxy(&[flag]);
        assert_eq!(out.status.code(), Some(0), "{flag}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("Usage: iam-broker-proxy"), "{text}");
        for variable in [
            ENV_BROKER_URL,
            ENV_LISTEN_ADDR,
            ENV_MIN_VALIDITY_SECONDS,
            ENV_REFRESH_AHEAD_SECONDS,
            ENV_BROKER_TIMEOUT_MS,
            ENV_CACHE_MAX_ENTRIES,
            ENV_BROKER_CA_PEM,
            ENV_HEADER_READ_TIMEOUT_MS,
            ENV_MAX_CONNECTIONS,
            "RUST_LOG",
        ] {
            assert!(text.contains(variable), "{variable} missing from {flag}");
        }
        for default in [
            DEFAULT_LISTEN_ADDR.to_owned(),
            DEFAULT_MIN_VALIDITY_SECONDS.to_string(),
            DEFAULT_REFRESH_AHEAD_SECONDS.to_string(),
            DEFAULT_BROKER_TIMEOUT_MS.to_string(),
            DEFAULT_CACHE_MAX_ENTRIES.to_string(),
            DEFAULT_HEADER_READ_TIMEOUT_MS.to_string(),
            DEFAULT_MAX_CONNECTIONS.to_string(),
        ] {
            assert!(
                text.contains(&format!("(default {default})")),
                "default {default} missing from {flag}"
            );
        }
    }
}

#[test]
fn version_prints_the_version() {
    let out = proxy(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("iam-broker-proxy {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn any_other_argument_is_a_usage_error() {
    for args in [
        &["--listen", "127.0.0.1:1"][..],
        &["serve"],
        &["--help", "x"],
    ] {
        let out = proxy(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        let text = String::from_utf8(out.stderr).unwrap();
        assert!(
            text.contains(&format!("unexpected argument {:?}", args[0])) && text.contains("--help"),
            "{args:?}: {text}"
        );
    }
}
