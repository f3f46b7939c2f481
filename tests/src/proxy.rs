//! The sidecar proxy as a child process, and the real SDK consumers that read credentials from
//! it: the AWS CLI (botocore's container provider), the AWS SDK for Rust (`sdk-whoami`) and the
//! AWS SDK for JavaScript v3 (`tests/js/whoami.mjs` under Node.js).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::bail;
use tokio::process::{Child, Command};

use crate::{CliOutput, Env, binary, free_port, wait_http, workspace_root};

/// A running `iam-broker-proxy`, its log captured to a file.
pub struct Proxy {
    child: Child,
    /// `http://127.0.0.1:<port>/`: what `AWS_CONTAINER_CREDENTIALS_FULL_URI` points at.
    pub url: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proxy {
    /// Starts the proxy in front of `broker_url` and waits for its `/healthz`.
    pub async fn start(broker_url: &str) -> anyhow::Result<Self> {
        Self::start_with(broker_url, Env::new()).await
    }

    /// [`Self::start`] with extra environment (e.g. `BROKER_CA_PEM`).
    pub async fn start_with(broker_url: &str, extra: Env) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("proxy.log");
        let address = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut command = Command::new(binary("iam-broker-proxy")?);
        extra
            .set("BROKER_URL", broker_url)
            .set("LISTEN_ADDR", address.to_string())
            .apply(&mut command);
        let file = std::fs::File::create(&log)?;
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true);
        let child = command.spawn()?;
        let mut proxy = Self {
            child,
            url: format!("http://{address}/"),
            log,
            _dir: dir,
        };
        if let Err(e) = wait_http(&format!("{}healthz", proxy.url), Duration::from_secs(20)).await {
            let log = proxy.log();
            let _ = proxy.child.kill().await;
            bail!("iam-broker-proxy did not come up: {e}\n{log}");
        }
        Ok(proxy)
    }

    /// Everything the proxy logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the proxy and returns its log.
    pub async fn stop(mut self) -> String {
        let _ = self.child.kill().await;
        self.log()
    }
}

/// The AWS CLI of the project's venv (`requirements-dev.txt`), else the one on `PATH`.
pub fn aws_cli() -> PathBuf {
    let venv = workspace_root().join(".venv/bin/aws");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("aws")
    }
}

/// `node` (from `PATH`) and `tests/js/whoami.mjs`: an application on the AWS SDK for JavaScript
/// v3's default chain. Run it as `run(&node, &env, &[script])`: it prints the caller identity as
/// JSON, as `sdk-whoami` does ([`arn_of`] reads it); with the extra argument `twice` it prints
/// `first <AccessKeyId>`, waits for a line on stdin, fetches again past the SDK's cache and prints
/// `second <AccessKeyId>`.
///
/// Panics when Node.js or `tests/js/node_modules` (the SDK, as `tests/js/package-lock.json`
/// pins it) is missing: `scripts/test.sh` installs both.
pub fn node_whoami() -> (PathBuf, String) {
    let js = workspace_root().join("tests/js");
    let node = std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("node"))
                .find(|path| path.is_file())
        })
        .unwrap_or_else(|| {
            panic!("node is not on PATH: run scripts/test.sh once (it installs Node.js)")
        });
    for package in ["@aws-sdk/client-sts", "@aws-sdk/credential-providers"] {
        assert!(
            js.join("node_modules").join(package).is_dir(),
            "{} lacks {package}: run scripts/test.sh once (it runs `npm ci --prefix tests/js`)",
            js.join("node_modules").display()
        );
    }
    let script = js.join("whoami.mjs").to_string_lossy().into_owned();
    (node, script)
}

/// Runs a program to completion with exactly `env` (nothing else inherited but `PATH`).
pub async fn run(program: &Path, env: &Env, args: &[&str]) -> anyhow::Result<CliOutput> {
    crate::run_program(program, env, args, None).await
}

/// The environment of a container the webhook injected: the container-credentials variables
/// and the AWS endpoint (moto), and no other credential source at all (no keys, no profile
/// files, no instance metadata).
pub fn container_env(moto_endpoint: &str, proxy_url: &str) -> Env {
    Env::new()
        .set("AWS_CONTAINER_CREDENTIALS_FULL_URI", proxy_url)
        .set("AWS_ENDPOINT_URL", moto_endpoint)
        .set("AWS_REGION", crate::REGION)
        .set("AWS_DEFAULT_REGION", crate::REGION)
        .set("AWS_CONFIG_FILE", "/nonexistent/aws/config")
        .set(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/aws/credentials",
        )
        .set("AWS_EC2_METADATA_DISABLED", "true")
        .set("HOME", "/nonexistent")
}

/// The `Arn` of `aws sts get-caller-identity --output json` (or `sdk-whoami`): panics with the
/// program's output when it failed or printed something else.
pub fn arn_of(out: &CliOutput) -> String {
    let json: Option<serde_json::Value> = out
        .success
        .then(|| serde_json::from_str(&out.stdout).ok())
        .flatten();
    match json.as_ref().and_then(|j| j["Arn"].as_str()) {
        Some(arn) => arn.to_owned(),
        None => panic!(
            "no caller identity\nstdout: {}\nstderr: {}",
            out.stdout, out.stderr
        ),
    }
}
