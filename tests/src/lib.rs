//! Test harness for the end-to-end suites: a private moto server per test, the real
//! `iam-broker` binary as a child process, and SDK clients pointed at moto.
//!
//! Every server binds 127.0.0.1 on a free port and is killed when its handle drops.
#![forbid(unsafe_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::Credentials;
use tokio::process::{Child, Command};

pub mod moto_iam;
pub mod proxy;

/// Access key moto accepts while IAM enforcement is off.
pub const MOTO_ACCESS_KEY: &str = "testing";
/// Secret key moto accepts while IAM enforcement is off.
pub const MOTO_SECRET_KEY: &str = "testing";
/// Region used throughout.
pub const REGION: &str = "us-east-1";
/// The account moto pretends to be.
pub const ACCOUNT_ID: &str = "123456789012";

/// A free loopback port (bound, read, released).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The workspace binaries the suites run.
pub const BINARIES: &[&str] = &[
    "iam-broker",
    "iam-broker-proxy",
    "bootstrap",
    "kube-api-standin",
];

/// Stops the whole test binary at once, with one line, when what the suites need is missing
/// (a fresh clone: `cargo test --workspace` before the binaries are built or moto is installed),
/// instead of failing every test with its own long message.
pub fn require_prerequisites() {
    static CHECKED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    CHECKED.get_or_init(|| {
        let mut missing: Vec<String> = BINARIES
            .iter()
            .filter(|name| binary_path(name).is_none_or(|p| !p.exists()))
            .map(|name| (*name).to_owned())
            .collect();
        let moto = moto_server_path();
        let moto_found = moto.exists()
            || std::env::var_os("PATH").is_some_and(|paths| {
                std::env::split_paths(&paths).any(|dir| dir.join(&moto).is_file())
            });
        if !moto_found {
            missing.push("moto_server".to_owned());
        }
        if !missing.is_empty() {
            // Straight to stderr: the harness captures eprintln! and would swallow it on exit.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "iam-broker-tests: missing {}: run scripts/test.sh (it installs moto into .venv and \
                 builds the binaries), or `cargo build --workspace --bins` with moto_server on PATH, first",
                missing.join(", ")
            );
            std::process::exit(2);
        }
    });
}

fn binary_path(name: &str) -> Option<PathBuf> {
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.join(name))
}

/// A binary of the workspace, built into the same target directory as the running test.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    require_prerequisites();
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("cannot locate the target directory")?;
    let path = profile_dir.join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}

fn moto_server_path() -> PathBuf {
    if let Some(path) = std::env::var_os("MOTO_SERVER") {
        return PathBuf::from(path);
    }
    let venv = workspace_root().join(".venv/bin/moto_server");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("moto_server")
    }
}

/// A moto server of its own for one test.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
}

impl Moto {
    /// Starts moto on a free port and waits until it answers.
    pub async fn start() -> anyhow::Result<Self> {
        require_prerequisites();
        let mut last_error = None;
        for _ in 0..3 {
            let port = free_port()?;
            let mut child = Command::new(moto_server_path())
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("cannot start moto_server (run the README's test command, which installs it into .venv)")?;
            let endpoint = format!("http://127.0.0.1:{port}");
            match wait_http(&format!("{endpoint}/moto-api/"), Duration::from_secs(30)).await {
                Ok(()) => return Ok(Self { child, endpoint }),
                Err(e) => {
                    let _ = child.kill().await;
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("moto did not start")))
    }

    /// From now on moto checks every request's signature and IAM policy
    /// (`/moto-api/reset-auth` with 0 unauthenticated actions left).
    pub async fn enforce_iam(&self) -> anyhow::Result<()> {
        let response = reqwest::Client::new()
            .post(format!("{}/moto-api/reset-auth", self.endpoint))
            .body("0")
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("moto refused reset-auth: {}", response.status());
        }
        Ok(())
    }

    /// An SDK configuration for this moto with the given static credentials.
    pub async fn sdk_config_with(&self, access_key: &str, secret_key: &str) -> SdkConfig {
        aws_config::defaults(BehaviorVersion::latest())
            .endpoint_url(&self.endpoint)
            .region(Region::new(REGION))
            .credentials_provider(Credentials::new(access_key, secret_key, None, None, "test"))
            .load()
            .await
    }

    /// An SDK configuration for this moto with the default test credentials.
    pub async fn sdk_config(&self) -> SdkConfig {
        self.sdk_config_with(MOTO_ACCESS_KEY, MOTO_SECRET_KEY).await
    }

    /// Environment for a child process that talks to this moto.
    pub fn env(&self) -> Env {
        Env::new()
            .set("AWS_ENDPOINT_URL", &self.endpoint)
            .set("AWS_REGION", REGION)
            .set("AWS_ACCESS_KEY_ID", MOTO_ACCESS_KEY)
            .set("AWS_SECRET_ACCESS_KEY", MOTO_SECRET_KEY)
    }

    /// Stops the server now.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Polls a URL until it answers with any HTTP status.
pub async fn wait_http(url: &str, within: Duration) -> anyhow::Result<()> {
    wait_http_with(&client_trusting(None)?, url, within).await
}

pub use iam_broker_testkit::client_trusting;

/// [`wait_http`] with a given client.
pub async fn wait_http_with(
    client: &reqwest::Client,
    url: &str,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if client.get(url).send().await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{url} did not answer within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An explicit environment for child processes: nothing is inherited but `PATH`, so tests do
/// not depend on the developer's shell (or their real AWS credentials).
#[derive(Debug, Clone, Default)]
pub struct Env(Vec<(String, String)>);

impl Env {
    /// An empty environment.
    pub fn new() -> Self {
        Self::default()
    }

    /// The variables, in the order they were set.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Sets (or replaces) a variable.
    pub fn set(mut self, name: &str, value: impl AsRef<str>) -> Self {
        self.0.retain(|(n, _)| n != name);
        self.0.push((name.to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Removes a variable.
    pub fn without(mut self, name: &str) -> Self {
        self.0.retain(|(n, _)| n != name);
        self
    }

    /// Tables with names unique to one test.
    pub fn tables(self, tables: &Tables) -> Self {
        self.set("ALLOWANCES_TABLE", &tables.allowances)
            .set("AUTHORIZATIONS_TABLE", &tables.authorizations)
            .set("CLUSTERS_TABLE", &tables.clusters)
    }

    /// Makes `command` run with exactly this environment (plus `PATH` and `RUST_LOG=info`).
    pub fn apply(&self, command: &mut Command) {
        command.env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            command.env("PATH", path);
        }
        command.env("RUST_LOG", "info");
        for (name, value) in &self.0 {
            command.env(name, value);
        }
    }
}

/// Table names of one test.
#[derive(Debug, Clone)]
pub struct Tables {
    /// Allowances table.
    pub allowances: String,
    /// Authorizations table.
    pub authorizations: String,
    /// Clusters table (the registry of projected mode).
    pub clusters: String,
}

impl Tables {
    /// Creates the three tables (through the same code `iam-broker tables create` uses).
    pub async fn create(sdk: &SdkConfig, prefix: &str) -> anyhow::Result<Self> {
        let tables = Self {
            allowances: format!("{prefix}-allowances"),
            authorizations: format!("{prefix}-authorizations"),
            clusters: format!("{prefix}-clusters"),
        };
        let client = aws_sdk_dynamodb::Client::new(sdk);
        iam_broker_aws::schema::create_tables(&client, &tables.allowances, &tables.authorizations)
            .await?;
        iam_broker_aws::schema::create_clusters_table(&client, &tables.clusters).await?;
        Ok(tables)
    }
}

/// What a finished CLI run printed.
#[derive(Debug)]
pub struct CliOutput {
    /// Exit status was success.
    pub success: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// The exit code (`None`: killed by a signal).
    pub code: Option<i32>,
}

/// Runs `iam-broker <args>` to completion.
pub async fn cli(env: &Env, args: &[&str]) -> anyhow::Result<CliOutput> {
    cli_with_stdin(env, args, None).await
}

/// Runs `iam-broker <args>` with something on stdin.
pub async fn cli_with_stdin(
    env: &Env,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<CliOutput> {
    run_program(&binary("iam-broker")?, env, args, stdin).await
}

/// Runs any program to completion (60 s at most) with exactly `env`, feeding it `stdin`.
pub async fn run_program(
    program: &Path,
    env: &Env,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<CliOutput> {
    use tokio::io::AsyncWriteExt as _;
    let mut command = Command::new(program);
    command.args(args);
    env.apply(&mut command);
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn()?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).await?;
        drop(pipe);
    }
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .with_context(|| format!("{} did not finish within 60 s", program.display()))??;
    Ok(CliOutput {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        code: output.status.code(),
    })
}

/// `iam-broker allow`; fails with the CLI's message unless it succeeds.
pub async fn allow(
    env: &Env,
    namespace: &str,
    service_account: &str,
    role: &str,
) -> anyhow::Result<()> {
    let out = cli(
        env,
        &[
            "allow",
            "--namespace",
            namespace,
            "--service-account",
            service_account,
            "--role",
            role,
        ],
    )
    .await?;
    if !out.success {
        bail!("iam-broker allow failed: {}", out.stderr);
    }
    Ok(())
}

/// `iam-broker disallow` of every role of a ServiceAccount; fails with the CLI's message unless
/// it succeeds.
pub async fn disallow(env: &Env, namespace: &str, service_account: &str) -> anyhow::Result<()> {
    let out = cli(
        env,
        &[
            "disallow",
            "--namespace",
            namespace,
            "--service-account",
            service_account,
        ],
    )
    .await?;
    if !out.success {
        bail!("iam-broker disallow failed: {}", out.stderr);
    }
    Ok(())
}

/// `iam-broker token create` (pod `web-1`); the token it printed.
pub async fn mint_token(
    env: &Env,
    namespace: &str,
    service_account: &str,
    role: &str,
) -> anyhow::Result<String> {
    let out = cli(
        env,
        &[
            "token",
            "create",
            "--namespace",
            namespace,
            "--service-account",
            service_account,
            "--role",
            role,
            "--pod",
            "web-1",
        ],
    )
    .await?;
    if !out.success {
        bail!("iam-broker token create failed: {}", out.stderr);
    }
    Ok(out.stdout.trim().to_owned())
}

/// A running `iam-broker serve`, its log captured to a file.
pub struct Server {
    child: Child,
    client: reqwest::Client,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts `iam-broker serve` with `env` and waits for `/healthz`.
    pub async fn start(env: &Env) -> anyhow::Result<Self> {
        Self::start_with(env, None).await
    }

    /// Starts `iam-broker serve` over HTTPS with this certificate and key (PEM files), trusting
    /// `ca_pem` to wait for it.
    pub async fn start_tls(
        env: &Env,
        cert: &Path,
        key: &Path,
        ca_pem: &str,
    ) -> anyhow::Result<Self> {
        Self::start_with(env, Some((cert, key, ca_pem))).await
    }

    async fn start_with(env: &Env, tls: Option<(&Path, &Path, &str)>) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("serve.log");
        let port = free_port()?;
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let mut command = Command::new(binary("iam-broker")?);
        command.args(["serve", "--listen", &address.to_string()]);
        if let Some((cert, key, _)) = tls {
            command
                .arg("--tls-cert")
                .arg(cert)
                .arg("--tls-key")
                .arg(key);
        }
        env.apply(&mut command);
        let file = std::fs::File::create(&log)?;
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true);
        let child = command.spawn()?;
        let url = match tls {
            Some(_) => format!("https://{address}"),
            None => format!("http://{address}"),
        };
        let client = client_trusting(tls.map(|(_, _, ca)| ca))?;
        let mut server = Self {
            child,
            client,
            url,
            log,
            _dir: dir,
        };
        if let Err(e) = wait_http_with(
            &server.client,
            &format!("{}/healthz", server.url),
            Duration::from_secs(20),
        )
        .await
        {
            let log = server.log();
            let _ = server.child.kill().await;
            bail!("iam-broker serve did not come up: {e}\n{log}");
        }
        Ok(server)
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET <path>` with an optional `Authorization` header.
    pub async fn get(&self, path: &str, authorization: Option<&str>) -> anyhow::Result<Answer> {
        let mut request = self.client.get(format!("{}{path}", self.url));
        if let Some(value) = authorization {
            request = request.header("Authorization", value);
        }
        Answer::read(request.send().await?).await
    }

    /// `POST <path>` with a JSON body.
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<Answer> {
        let response = self
            .client
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await?;
        Answer::read(response).await
    }

    /// Stops the server (SIGKILL) and returns its log.
    pub async fn stop(mut self) -> String {
        let _ = self.child.kill().await;
        self.log()
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Response headers.
    pub headers: reqwest::header::HeaderMap,
    /// Body parsed as JSON (`Null` when it is not JSON).
    pub json: serde_json::Value,
}

impl Answer {
    async fn read(response: reqwest::Response) -> anyhow::Result<Self> {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await?;
        Ok(Self {
            status,
            headers,
            json: serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        })
    }

    /// A header as a string ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// The `Code` of an error body.
    pub fn code(&self) -> &str {
        self.json["Code"].as_str().unwrap_or_default()
    }
}
