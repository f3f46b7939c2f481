//! Direct injection end to end: no sidecar in the pod. `iam-broker serve --tls` (a private CA)
//! admits pods with `INJECTION=direct`, in `secret` and in `projected` mode; each container's
//! environment is built from the patch exactly as the kubelet would (the Secret's token, or the
//! projected token written to a file), and three real SDKs fetch their credentials over HTTPS
//! from the broker itself: the AWS CLI (botocore), the AWS SDK for Rust (`sdk-whoami`) and the
//! AWS SDK for JavaScript v3 (`tests/js/whoami.mjs`). Each trusts the private CA the way its own
//! documentation says (README, "Direct mode"). The broker's credential cache keeps this from
//! becoming an `AssumeRole` per process, and a revoked allowance still stops the next fetch.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use iam_broker_aws::DynamoAllowanceStore;
use iam_broker_aws::clusters::DynamoClusterRegistry;
use iam_broker_kernel::allowance::Subject;
use iam_broker_kernel::cluster::RegisteredCluster;
use iam_broker_kernel::ports::{AllowanceStore, ClusterRegistry};
use iam_broker_testkit::kube_api::{DEFAULT_TOKEN, KubeApi, test_certificates};
use iam_broker_testkit::kubelet::{ProjectedTokenFile, TokenProjection};
use iam_broker_tests::proxy::{arn_of, aws_cli, container_env, node_whoami, run};
use iam_broker_tests::{CliOutput, Env, Moto, Server, Tables, binary, workspace_root};
use serde_json::{Value, json};

const ROLE: &str = "arn:aws:iam::123456789012:role/iam-broker/s3_reader";
/// What moto's GetCallerIdentity reports for a session of ROLE.
const ASSUMED: &str = "arn:aws:sts::123456789012:assumed-role/s3_reader/";

/// How each SDK is made to trust the broker's private CA, as a pod image would be:
/// - the AWS SDK for Rust reads the platform's roots, so `SSL_CERT_FILE` names a bundle;
/// - Node.js adds `NODE_EXTRA_CA_CERTS` to its built-in roots;
/// - botocore's container fetcher verifies against certifi's bundle and reads no variable
///   (`AWS_CA_BUNDLE` is not used for it), so the CA is appended to a copy of certifi, put
///   first on `PYTHONPATH` (in an image: `cat ca.pem >> "$(python -m certifi)"`).
struct Trust {
    dir: tempfile::TempDir,
}

impl Trust {
    fn new(ca_pem: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca_pem).unwrap();
        let certifi = site_packages().join("certifi");
        let copy = dir.path().join("python/certifi");
        std::fs::create_dir_all(&copy).unwrap();
        for entry in std::fs::read_dir(&certifi).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
            }
        }
        let bundle = copy.join("cacert.pem");
        let mut pem = std::fs::read_to_string(&bundle).unwrap();
        pem.push('\n');
        pem.push_str(ca_pem);
        std::fs::write(&bundle, pem).unwrap();
        Self { dir }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// `env` with every SDK trusting the CA.
    fn apply(&self, env: Env) -> Env {
        env.set("SSL_CERT_FILE", self.ca().to_string_lossy())
            .set("NODE_EXTRA_CA_CERTS", self.ca().to_string_lossy())
            .set(
                "PYTHONPATH",
                self.dir.path().join("python").to_string_lossy(),
            )
    }
}

fn site_packages() -> PathBuf {
    let lib = workspace_root().join(".venv/lib");
    let python = std::fs::read_dir(&lib)
        .unwrap_or_else(|_| panic!("the dev venv is missing: run scripts/test.sh once"))
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .expect("a python3.x directory in .venv/lib");
    python.path().join("site-packages")
}

/// The three SDKs, each in a new process: their caller-identity ARNs.
async fn three_sdks(env: &Env, broker: &Server) -> Vec<String> {
    let (node, script) = node_whoami();
    let outputs = [
        run(
            &aws_cli(),
            env,
            &["sts", "get-caller-identity", "--output", "json"],
        )
        .await
        .unwrap(),
        run(&binary("sdk-whoami").unwrap(), env, &[]).await.unwrap(),
        run(&node, env, &[script.as_str()]).await.unwrap(),
    ];
    outputs
        .iter()
        .zip(["AWS CLI", "AWS SDK for Rust", "AWS SDK for JavaScript v3"])
        .map(|(out, sdk)| {
            assert!(
                out.success,
                "{sdk}: {}\nbroker log:\n{}",
                out.stderr,
                broker.log()
            );
            arn_of(out)
        })
        .collect()
}

/// The broker's `credentials served` lines that called STS (`miss`) and that did not (`hit`).
fn lookups(server: &Server) -> (usize, usize) {
    let log = server.log();
    (
        log.matches(r#""cache":"miss""#).count(),
        log.matches(r#""cache":"hit""#).count(),
    )
}

/// An AdmissionReview (Pod CREATE) for pod `name` of ServiceAccount `app` in `team-a`.
fn review(name: &str, uid: &str, annotations: Value) -> Value {
    json!({ "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": { "uid": "uid-d", "kind": { "group": "", "version": "v1", "kind": "Pod" },
        "resource": { "group": "", "version": "v1", "resource": "pods" },
        "namespace": "team-a", "operation": "CREATE", "userInfo": { "username": "e2e" },
        "object": { "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "uid": uid, "namespace": "team-a",
                "annotations": annotations },
            "spec": { "serviceAccountName": "app",
                "containers": [{ "name": "app", "image": "app:1" }] } } } })
}

/// Sends `review` to the webhook and applies the patch it answers to the pod.
async fn admit(server: &Server, review: &Value) -> (Value, Value) {
    let answer = server.post("/", review).await.unwrap();
    assert_eq!(answer.status, 200, "{:?}", answer.json);
    let response = answer.json["response"].clone();
    let patch = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        response["patch"].as_str().expect("a patch"),
    )
    .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).unwrap();
    (pod, response)
}

/// The app container's environment variables, by name.
fn env_of(pod: &Value) -> BTreeMap<String, Value> {
    pod["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e.clone()))
        .collect()
}

fn container_names(pod: &Value) -> Vec<String> {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|l| pod["spec"][l].as_array().cloned().unwrap_or_default())
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

struct Tls {
    _dir: tempfile::TempDir,
    ca: String,
    cert: PathBuf,
    key: PathBuf,
}

fn tls() -> Tls {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_certificates().unwrap();
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    Tls {
        _dir: dir,
        ca,
        cert: cert_path,
        key: key_path,
    }
}

async fn start(env: &Env, tls: &Tls) -> Server {
    Server::start_tls(env, &tls.cert, &tls.key, &tls.ca)
        .await
        .unwrap()
}

#[tokio::test]
async fn secret_mode_direct_pods_get_credentials_over_https_from_three_sdks() {
    // GIVEN `serve --tls` with INJECTION=direct, no PROXY_IMAGE and no BROKER_URL (the
    // webhook's own https URL is what pods call)
    let moto = Moto::start().await.unwrap();
    let tables = Tables::create(&moto.sdk_config().await, "direct")
        .await
        .unwrap();
    let api = KubeApi::start().await.unwrap();
    api.put_service_account("team-a", "app", &[("eks.amazonaws.com/role-arn", ROLE)]);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path(), DEFAULT_TOKEN).unwrap();
    let env = moto
        .env()
        .tables(&tables)
        .set("KUBECONFIG", kubeconfig.to_string_lossy())
        .set("INJECTION", "direct");
    iam_broker_tests::allow(&env, "team-a", "app", ROLE)
        .await
        .unwrap();
    let tls = tls();
    let server = start(&env, &tls).await;

    // WHEN a pod is admitted
    let (pod, response) = admit(&server, &review("web-1", "uid-1", json!({}))).await;
    assert!(response["warnings"].is_null(), "{response}");
    // THEN it has no sidecar, and its SDKs are pointed at the broker's https URL
    assert_eq!(container_names(&pod), ["app"]);
    let vars = env_of(&pod);
    let uri = vars["AWS_CONTAINER_CREDENTIALS_FULL_URI"]["value"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(uri, format!("{}/", server.url));
    assert!(uri.starts_with("https://"));
    // AND its token comes from the Secret the webhook created (as the kubelet resolves it)
    let reference = &vars["AWS_CONTAINER_AUTHORIZATION_TOKEN"]["valueFrom"]["secretKeyRef"];
    let token = api
        .secret_token("team-a", reference["name"].as_str().unwrap())
        .expect("the Secret");

    // WHEN the AWS CLI, the Rust SDK and the JavaScript SDK each fetch, one process each
    let trust = Trust::new(&tls.ca);
    let app = trust
        .apply(container_env(&moto.endpoint, &uri))
        .set("AWS_CONTAINER_AUTHORIZATION_TOKEN", &token);
    let arns = three_sdks(&app, &server).await;
    // THEN each assumed the role as this pod, over HTTPS, with no sidecar
    for arn in &arns {
        assert!(arn.starts_with(ASSUMED), "{arn}");
        assert!(arn.ends_with("team-a_app_web-1"), "{arn}");
    }
    // AND three processes (four fetches: sdk-whoami asks its provider for the key id it
    // prints, then its client's identity cache asks again) cost one AssumeRole: the broker's
    // cache served the other three
    assert_eq!(lookups(&server), (1, 3), "{}", server.log());

    // AND an SDK that does not trust the CA gets nothing: each really verifies the broker
    let untrusting =
        container_env(&moto.endpoint, &uri).set("AWS_CONTAINER_AUTHORIZATION_TOKEN", &token);
    let (node, script) = node_whoami();
    for (program, args) in [
        (binary("sdk-whoami").unwrap(), vec![]),
        (aws_cli(), vec!["sts", "get-caller-identity"]),
        (node, vec![script.as_str()]),
    ] {
        let out = run(&program, &untrusting, &args).await.unwrap();
        assert!(!out.success, "{}: {}", program.display(), out.stdout);
    }
    // (`AWS_CA_BUNDLE` does not reach botocore's container fetcher: certifi's bundle does.)
    let out = run(
        &aws_cli(),
        &untrusting.set("AWS_CA_BUNDLE", trust.ca().to_string_lossy()),
        &["sts", "get-caller-identity"],
    )
    .await
    .unwrap();
    assert!(!out.success, "{}", out.stdout);
    assert_eq!(lookups(&server), (1, 3), "refused at the TLS handshake");

    // WHEN the allowance is revoked, the next fetch is refused, cached credentials or not
    let dynamodb = aws_sdk_dynamodb::Client::new(&moto.sdk_config().await);
    DynamoAllowanceStore::new(dynamodb, &tables.allowances)
        .disallow(
            &Subject::service_account("team-a", "app").unwrap(),
            Some(ROLE),
        )
        .await
        .unwrap();
    let out = run(&binary("sdk-whoami").unwrap(), &app, &[])
        .await
        .unwrap();
    assert!(!out.success);
    assert!(server.log().contains("AllowanceRevoked"));
    assert_no_secret_logged(&server, &[&token], &[&out]);
}

#[tokio::test]
async fn projected_mode_direct_pods_read_the_token_file_over_https_and_follow_its_rotation() {
    // GIVEN a registered cluster, `serve --tls` in projected mode with INJECTION=direct
    let moto = Moto::start().await.unwrap();
    let sdk = moto.sdk_config().await;
    let tables = Tables::create(&sdk, "directp").await.unwrap();
    let api = KubeApi::start().await.unwrap();
    api.put_service_account("team-a", "app", &[("eks.amazonaws.com/role-arn", ROLE)]);
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
    DynamoClusterRegistry::new(dynamodb.clone(), &tables.clusters)
        .insert(
            &RegisteredCluster::new(
                "east",
                &api.issuer(),
                &api.jwks().unwrap().to_string(),
                "file test",
                0,
            )
            .unwrap(),
        )
        .await
        .unwrap();
    DynamoAllowanceStore::new(dynamodb, &tables.allowances)
        .allow(
            &Subject::service_account("team-a", "app").unwrap(),
            ROLE,
            None,
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path(), DEFAULT_TOKEN).unwrap();
    let env = moto
        .env()
        .tables(&tables)
        .set("KUBECONFIG", kubeconfig.to_string_lossy())
        .set("IDENTITY_MODE", "projected")
        .set("CLUSTER_NAME", "east")
        .set("INJECTION", "direct");
    let tls = tls();
    let server = start(&env, &tls).await;

    // WHEN a pod is admitted
    let uid = "8d5c2b7e-0000-4000-8000-00000000d001";
    let (pod, _) = admit(&server, &review("web-1", uid, json!({}))).await;
    // THEN: no sidecar; the URI is the broker's https URL with the role; a token file
    assert_eq!(container_names(&pod), ["app"]);
    let vars = env_of(&pod);
    let uri = vars["AWS_CONTAINER_CREDENTIALS_FULL_URI"]["value"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        uri,
        format!(
            "{}/?role=arn:aws:iam::123456789012:role/iam-broker/s3_reader",
            server.url
        )
    );
    let projection = &pod["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(projection["audience"], "iam-broker");

    // The kubelet writes the pod's token where the mount says (here: a temp dir).
    let p = TokenProjection {
        namespace: "team-a".to_owned(),
        service_account: "app".to_owned(),
        pod_name: "web-1".to_owned(),
        pod_uid: uid.to_owned(),
        audience: projection["audience"].as_str().unwrap().to_owned(),
        expiration_seconds: projection["expirationSeconds"].as_i64().unwrap(),
    };
    let file = ProjectedTokenFile::new(dir.path().join("volume")).unwrap();
    let first = file.refresh(&api, &p).await.unwrap();
    assert_eq!(
        vars["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"]["value"],
        "/var/run/secrets/iam-broker/token"
    );
    let trust = Trust::new(&tls.ca);
    let app = trust.apply(container_env(&moto.endpoint, &uri)).set(
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
        file.path().to_string_lossy(),
    );

    // WHEN the three SDKs fetch, one process each
    for arn in three_sdks(&app, &server).await {
        assert!(arn.starts_with(ASSUMED), "{arn}");
        assert!(arn.ends_with("team-a_app_web-1"), "{arn}");
    }
    assert_eq!(lookups(&server), (1, 3), "{}", server.log());

    // WHEN the kubelet rotates the file, between two fetches of one long-lived process of
    // each of botocore and the JavaScript SDK
    let rotated = rotate_between_fetches(&app, &file, &api, &p, &server).await;
    assert_ne!(rotated, first);
    // AND a new Rust SDK process reads the rotated file too
    let out = run(&binary("sdk-whoami").unwrap(), &app, &[])
        .await
        .unwrap();
    assert!(arn_of(&out).starts_with(ASSUMED));
    // THEN every fetch was served, and the new tokens (same pod) cost no AssumeRole
    assert_eq!(lookups(&server), (1, 9), "{}", server.log());
    assert_no_secret_logged(&server, &[&first, &rotated], &[]);
}

/// Runs boto3 and the JavaScript SDK as one long-lived process each: fetch, the kubelet rotates
/// the token file, fetch again (past the SDK's own cache). Returns the last token written.
async fn rotate_between_fetches(
    app: &Env,
    file: &ProjectedTokenFile,
    api: &KubeApi,
    p: &TokenProjection,
    server: &Server,
) -> String {
    let python = workspace_root().join(".venv/bin/python");
    let boto = r#"
import sys
from botocore.credentials import ContainerProvider
provider = ContainerProvider()
print("first", provider.load().get_frozen_credentials().access_key, flush=True)
sys.stdin.readline()
print("second", provider.load().get_frozen_credentials().access_key, flush=True)
"#;
    let (node, script) = node_whoami();
    let mut last = String::new();
    for (program, args) in [
        (python.clone(), vec!["-c", boto]),
        (node.clone(), vec![script.as_str(), "twice"]),
    ] {
        let served = server.log().matches("credentials served").count();
        let out = fetch_rotate_fetch(&program, &args, app, || async {
            file.refresh(api, p).await.unwrap()
        })
        .await;
        last = out.1;
        let lines: Vec<&str> = out.0.stdout.lines().collect();
        assert!(
            out.0.success && lines.len() == 2,
            "{}: {}\n{}",
            program.display(),
            out.0.stdout,
            out.0.stderr
        );
        assert!(lines[0].starts_with("first ASIA") && lines[1].starts_with("second ASIA"));
        assert_eq!(
            server.log().matches("credentials served").count(),
            served + 2,
            "{}: the rotated token was sent (two fetches, both served)",
            program.display()
        );
        assert!(
            server.log().contains(r#""pod":"web-1""#),
            "{}",
            server.log()
        );
    }
    last
}

/// Starts `program`, waits for its `first` line, calls `rotate`, lets it fetch again.
async fn fetch_rotate_fetch<F, Fut>(
    program: &Path,
    args: &[&str],
    env: &Env,
    rotate: F,
) -> (CliOutput, String)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let mut command = tokio::process::Command::new(program);
    command.args(args);
    env.apply(&mut command);
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(std::time::Duration::from_secs(60), stdout.next_line())
        .await
        .expect("the first fetch in time")
        .unwrap()
        .unwrap_or_default();
    let token = rotate().await;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"go\n").await.unwrap();
    drop(stdin);
    let mut rest = vec![first];
    while let Some(line) = stdout.next_line().await.unwrap() {
        rest.push(line);
    }
    let output = child.wait_with_output().await.unwrap();
    (
        CliOutput {
            success: output.status.success(),
            stdout: rest.join("\n"),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            code: output.status.code(),
        },
        token,
    )
}

/// No token, secret key or session token in the broker's log or the programs' output.
fn assert_no_secret_logged(server: &Server, tokens: &[&str], outputs: &[&CliOutput]) {
    let log = server.log();
    for token in tokens {
        assert!(!log.contains(token), "the broker logged a token");
        for out in outputs {
            assert!(!out.stderr.contains(token) && !out.stdout.contains(token));
        }
    }
    assert!(!log.contains("SecretAccessKey"));
}
