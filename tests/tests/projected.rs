//! Projected mode end to end: two Kubernetes API stand-ins issue real ServiceAccount tokens
//! (TokenRequest, RS256, kid as kube-apiserver computes it) with the same issuer and their own
//! keys; the clusters are registered in the Clusters table on moto; `iam-broker serve` verifies
//! the tokens itself and `iam-broker-proxy` forwards them with `?role=`. The AWS CLI, boto3 and
//! the AWS SDK for Rust read the token from a file kubelet-style, and nothing else.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use iam_broker_admission::patch::broker_url_with_role;
use iam_broker_aws::DynamoAllowanceStore;
use iam_broker_aws::clusters::DynamoClusterRegistry;
use iam_broker_kernel::allowance::Subject;
use iam_broker_kernel::cluster::{ClusterName, RegisteredCluster};
use iam_broker_kernel::ports::{AllowanceStore, ClusterRegistry};
use iam_broker_testkit::kube_api::KubeApi;
use iam_broker_testkit::kubelet::{ProjectedTokenFile, TokenProjection};
use iam_broker_tests::proxy::{Proxy, arn_of, aws_cli, container_env, run};
use iam_broker_tests::{Env, Moto, Server, Tables, binary, workspace_root};

const ROLE: &str = "arn:aws:iam::123456789012:role/iam-broker/s3_reader";
const WEST_ROLE: &str = "arn:aws:iam::210987654321:role/tenant/reader";
const OTHER_NS_ROLE: &str = "arn:aws:iam::123456789012:role/team-b/writer";
const AUDIENCE: &str = "iam-broker";
/// What moto's GetCallerIdentity reports for a session of ROLE.
const ASSUMED: &str = "arn:aws:sts::123456789012:assumed-role/s3_reader/";

struct World {
    moto: Moto,
    server: Server,
    east: KubeApi,
    west: KubeApi,
    registry: Arc<DynamoClusterRegistry>,
    dir: tempfile::TempDir,
}

async fn register(registry: &DynamoClusterRegistry, name: &str, api: &KubeApi) {
    let cluster = RegisteredCluster::new(
        name,
        &api.issuer(),
        &api.jwks().unwrap().to_string(),
        "file test",
        0,
    )
    .unwrap();
    match registry.insert(&cluster).await {
        Ok(()) => {}
        Err(iam_broker_kernel::ports::StoreError::AlreadyExists) => {
            registry.update(&cluster).await.unwrap()
        }
        Err(e) => panic!("{e}"),
    }
}

/// `east` is the default cluster (`CLUSTER_NAME`, unprefixed rows), `west` is scoped. Both
/// stand-ins use kubeadm's default issuer.
async fn world() -> World {
    let moto = Moto::start().await.unwrap();
    let sdk = moto.sdk_config().await;
    let tables = Tables::create(&sdk, "projected").await.unwrap();
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
    let registry = Arc::new(DynamoClusterRegistry::new(
        dynamodb.clone(),
        &tables.clusters,
    ));
    let (east, west) = (
        KubeApi::start().await.unwrap(),
        KubeApi::start().await.unwrap(),
    );
    assert_eq!(east.issuer(), west.issuer(), "the hard case: one issuer");
    register(&registry, "east", &east).await;
    register(&registry, "west", &west).await;

    let allowances = DynamoAllowanceStore::new(dynamodb, &tables.allowances);
    let subject = |ns: &str, cluster: Option<&str>| {
        Subject::service_account(ns, "app")
            .unwrap()
            .in_cluster(cluster.map(|c| ClusterName::parse(c).unwrap()))
    };
    allowances
        .allow(&subject("team-a", None), ROLE, None)
        .await
        .unwrap();
    allowances
        .allow(&subject("team-b", None), OTHER_NS_ROLE, None)
        .await
        .unwrap();
    allowances
        .allow(
            &subject("team-a", Some("west")),
            WEST_ROLE,
            Some("tenant-42"),
        )
        .await
        .unwrap();

    let env = moto
        .env()
        .tables(&tables)
        .set("CLUSTER_NAME", "east")
        .set("CLUSTER_REGISTRY_TTL_SECONDS", "1")
        .set("STS_SESSION_TAGS", "true")
        .set("STS_SOURCE_IDENTITY", "true");
    let server = Server::start(&env).await.unwrap();
    World {
        moto,
        server,
        east,
        west,
        registry,
        dir: tempfile::tempdir().unwrap(),
    }
}

fn projection(ns: &str, pod: &str, uid: &str) -> TokenProjection {
    TokenProjection {
        namespace: ns.to_owned(),
        service_account: "app".to_owned(),
        pod_name: pod.to_owned(),
        pod_uid: uid.to_owned(),
        audience: AUDIENCE.to_owned(),
        expiration_seconds: 3600,
    }
}

impl World {
    /// A pod's sidecar for `role`, as the webhook configures it.
    async fn sidecar(&self, role: &str) -> Proxy {
        let broker = format!("{}/", self.server.url);
        Proxy::start(&broker_url_with_role(&broker, role))
            .await
            .unwrap()
    }

    /// kubelet's token volume for a pod of `api`, written once.
    async fn volume(&self, name: &str, api: &KubeApi, p: &TokenProjection) -> ProjectedTokenFile {
        api.put_service_account(&p.namespace, &p.service_account, &[]);
        let file = ProjectedTokenFile::new(self.dir.path().join(name)).unwrap();
        file.refresh(api, p).await.unwrap();
        file
    }

    /// An injected container's environment: the credentials URI and the token file only.
    fn app_env(&self, proxy: &Proxy, file: &ProjectedTokenFile) -> Env {
        container_env(&self.moto.endpoint, &proxy.url).set(
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
            file.path().to_string_lossy(),
        )
    }

    /// The caller identity's ARN; on failure, the broker's log says why.
    fn arn(&self, out: &iam_broker_tests::CliOutput) -> String {
        if !out.success {
            panic!(
                "no caller identity: {}\nbroker log:\n{}",
                out.stderr,
                self.server.log()
            );
        }
        arn_of(out)
    }

    async fn code(&self, token: &str, role: Option<&str>) -> (u16, String) {
        let path = match role {
            Some(role) => broker_url_with_role("/", role),
            None => "/".to_owned(),
        };
        let answer = self.server.get(&path, Some(token)).await.unwrap();
        (answer.status, answer.code().to_owned())
    }
}

#[tokio::test]
async fn aws_cli_and_rust_sdk_read_the_token_file_and_follow_its_rotation() {
    let w = world().await;
    let pod = projection("team-a", "web-1", "8d5c2b7e-0000-4000-8000-00000000a001");
    let file = w.volume("web-1", &w.east, &pod).await;
    let proxy = w.sidecar(ROLE).await;
    let env = w.app_env(&proxy, &file);
    let args = ["sts", "get-caller-identity", "--output", "json"];

    // The AWS CLI (botocore's container provider) reads the file and gets the role, with a
    // session named after the pod.
    let arn = w.arn(&run(&aws_cli(), &env, &args).await.unwrap());
    assert!(arn.starts_with(ASSUMED), "{arn}");
    assert!(arn.ends_with("team-a_app_web-1"), "{arn}");
    // The AWS SDK for Rust too.
    let whoami = binary("sdk-whoami").unwrap();
    assert!(
        w.arn(&run(&whoami, &env, &[]).await.unwrap())
            .starts_with(ASSUMED)
    );

    // kubelet rotates the file: the next fetch sends the new token, nothing restarts.
    let before = w.server.log().matches("credentials served").count();
    let rotated = file.refresh(&w.east, &pod).await.unwrap();
    assert_eq!(std::fs::read_to_string(file.path()).unwrap(), rotated);
    assert!(
        w.arn(&run(&aws_cli(), &env, &args).await.unwrap())
            .starts_with(ASSUMED)
    );
    assert_eq!(
        w.server.log().matches("credentials served").count(),
        before + 1,
        "the new token was sent to the broker (the proxy caches per token)"
    );

    // The cluster rotates its signing key: the new key is registered (cluster refresh), and a
    // moment later (this world's registry TTL and refresh interval are 1 s: a re-read of the
    // registry is allowed again) the first token signed with it is served, nothing restarted.
    w.east.rotate_signing_key().unwrap();
    register(&w.registry, "east", &w.east).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    file.refresh(&w.east, &pod).await.unwrap();
    assert!(
        w.arn(&run(&whoami, &env, &[]).await.unwrap())
            .starts_with(ASSUMED)
    );

    // Nothing logged a token.
    let (proxy_log, server_log) = (proxy.stop().await, w.server.log());
    for log in [&proxy_log, &server_log] {
        assert!(!log.contains(&rotated), "a log holds a token");
        assert!(!log.contains("SecretAccessKey"));
    }
}

#[tokio::test]
async fn one_boto3_process_picks_up_a_rotated_file_without_restarting() {
    let w = world().await;
    let pod = projection("team-a", "web-2", "8d5c2b7e-0000-4000-8000-00000000a002");
    let file = w.volume("web-2", &w.east, &pod).await;
    let proxy = w.sidecar(ROLE).await;
    let python = workspace_root().join(".venv/bin/python");
    if !python.exists() {
        panic!("the dev venv is missing: run scripts/test.sh once");
    }
    // botocore's container provider, loaded twice in one process; between the loads the file
    // is rotated (the script waits for a line on stdin).
    let script = r#"
import sys
from botocore.credentials import ContainerProvider
provider = ContainerProvider()
first = provider.load().get_frozen_credentials()
print("first", first.access_key, flush=True)
sys.stdin.readline()
second = provider.load().get_frozen_credentials()
print("second", second.access_key, flush=True)
"#;
    let mut command = tokio::process::Command::new(&python);
    command.args(["-c", script]);
    w.app_env(&proxy, &file).apply(&mut command);
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(60), stdout.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap_or_default();
    assert!(first.starts_with("first ASIA"), "{first}");
    let served = w.server.log().matches("credentials served").count();

    file.refresh(&w.east, &pod).await.unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"go\n").await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(60), stdout.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap_or_default();
    let output = child.wait_with_output().await.unwrap();
    assert!(
        second.starts_with("second ASIA"),
        "{second}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        w.server.log().matches("credentials served").count(),
        served + 1,
        "the second load sent the rotated token"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn foreign_stale_and_misdirected_tokens_are_refused_with_403() {
    let w = world().await;
    w.east.put_service_account("team-a", "app", &[]);
    async fn issue(api: &KubeApi, audience: &str) -> String {
        api.issue_token("team-a", "app", "web-3", "uid-3", audience, 3600)
            .await
            .unwrap()
    }
    let good = issue(&w.east, AUDIENCE).await;
    assert_eq!(w.code(&good, None).await, (200, String::new()));

    // Another audience (e.g. the API server's own tokens).
    let other_audience = issue(&w.east, "https://kubernetes.default.svc").await;
    // An unregistered cluster with the same issuer: a foreign key.
    let foreign = KubeApi::start().await.unwrap();
    foreign.put_service_account("team-a", "app", &[]);
    let foreign_key = issue(&foreign, AUDIENCE).await;
    // An issuer nobody registered.
    let elsewhere = KubeApi::start_with(
        iam_broker_testkit::kube_api::StandinOptions::default().issuer("https://elsewhere.example"),
    )
    .await
    .unwrap();
    elsewhere.put_service_account("team-a", "app", &[]);
    let unknown_issuer = issue(&elsewhere, AUDIENCE).await;
    // Expired an hour ago, signed by east's real key.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let expired = w
        .east
        .sign_claims(&serde_json::json!({
            "iss": w.east.issuer(), "sub": "system:serviceaccount:team-a:app",
            "aud": [AUDIENCE], "iat": now - 7200, "nbf": now - 7200, "exp": now - 3600,
            "kubernetes.io": { "namespace": "team-a",
                "serviceaccount": { "name": "app", "uid": "sa-uid" },
                "pod": { "name": "web-3", "uid": "uid-3" } },
        }))
        .unwrap();
    // Claims a real pod token carries, signed by east's real key in odd ways: a lifetime of a
    // hundred years; a critical header extension the broker does not understand.
    let claims = |exp: i64| {
        serde_json::json!({
            "iss": w.east.issuer(), "sub": "system:serviceaccount:team-a:app",
            "aud": [AUDIENCE], "iat": now, "nbf": now, "exp": exp,
            "kubernetes.io": { "namespace": "team-a",
                "serviceaccount": { "name": "app", "uid": "sa-uid" },
                "pod": { "name": "web-3", "uid": "uid-3" } },
        })
    };
    let century = w
        .east
        .sign_claims(&claims(now + 100 * 365 * 86_400))
        .unwrap();
    let east_kid = w.east.signing_key_id().unwrap();
    let alg = if w.east.jwks().unwrap().to_string().contains("ES256") {
        "ES256"
    } else {
        "RS256"
    };
    let critical = w
        .east
        .sign_with_header(
            &serde_json::json!({ "alg": alg, "kid": east_kid,
                "crit": ["urn:example:must-understand"] }),
            &claims(now + 3600),
        )
        .unwrap();
    let mut messages = std::collections::BTreeSet::new();
    for (what, token) in [
        ("other audience", &other_audience),
        ("foreign key", &foreign_key),
        ("unknown issuer", &unknown_issuer),
        ("expired", &expired),
        ("a hundred years", &century),
        ("critical extension", &critical),
    ] {
        let answer = w.server.get("/", Some(token)).await.unwrap();
        assert_eq!(
            (answer.status, answer.code()),
            (403, "InvalidToken"),
            "{what}"
        );
        messages.insert(answer.json["Message"].as_str().unwrap().to_owned());
    }
    // One message for every refusal: none tells whether an issuer or key is registered.
    assert_eq!(messages.len(), 1, "{messages:?}");
    // The log keeps the detail.
    let log = w.server.log();
    for reason in [
        "issuer of no registered cluster",
        "signing key of no registered cluster",
        "lifetime",
        "critical",
    ] {
        assert!(log.contains(reason), "{reason}: {log}");
    }

    // A token without `kid` (kube-apiserver always sets one; other signers may not) from the
    // second of two clusters with one issuer is attributed to it, not refused: west's role
    // (which east does not allow) is served.
    w.west.put_service_account("team-a", "app", &[]);
    let west_claims = serde_json::json!({
        "iss": w.west.issuer(), "sub": "system:serviceaccount:team-a:app",
        "aud": [AUDIENCE], "iat": now, "nbf": now, "exp": now + 3600,
        "kubernetes.io": { "namespace": "team-a",
            "serviceaccount": { "name": "app", "uid": "sa-uid" },
            "pod": { "name": "web-4", "uid": "uid-4" } },
    });
    let kidless = w
        .west
        .sign_with_header(&serde_json::json!({ "alg": alg }), &west_claims)
        .unwrap();
    assert_eq!(
        w.code(&kidless, Some(WEST_ROLE)).await,
        (200, String::new())
    );

    // Namespace A cannot get namespace B's role, however it asks.
    assert_eq!(
        w.code(&good, Some(OTHER_NS_ROLE)).await,
        (403, "AllowanceRevoked".to_owned())
    );

    // A removed cluster's tokens stop working within the registry TTL (1 s here).
    w.registry
        .remove(&ClusterName::parse("east").unwrap())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(w.code(&good, None).await, (403, "InvalidToken".to_owned()));
}

#[tokio::test]
async fn two_clusters_with_the_same_names_get_only_their_own_allowances() {
    let w = world().await;
    for api in [&w.east, &w.west] {
        api.put_service_account("team-a", "app", &[]);
    }
    let from_east = w
        .east
        .issue_token("team-a", "app", "web-1", "uid-e", AUDIENCE, 3600)
        .await
        .unwrap();
    let from_west = w
        .west
        .issue_token("team-a", "app", "web-1", "uid-w", AUDIENCE, 3600)
        .await
        .unwrap();

    let east = w.server.get("/", Some(&from_east)).await.unwrap();
    assert_eq!(east.status, 200);
    assert_eq!(east.json["RoleArn"], ROLE);
    let west = w.server.get("/", Some(&from_west)).await.unwrap();
    assert_eq!(west.status, 200, "{}", west.json);
    assert_eq!(west.json["RoleArn"], WEST_ROLE);
    assert_eq!(west.json["AccountId"], "210987654321", "the role's account");

    // Each cluster asking for the other's role is refused.
    assert_eq!(
        w.code(&from_east, Some(WEST_ROLE)).await,
        (403, "AllowanceRevoked".to_owned())
    );
    assert_eq!(
        w.code(&from_west, Some(ROLE)).await,
        (403, "AllowanceRevoked".to_owned())
    );
    let log = w.server.log();
    assert!(log.contains(r#""cluster":"west""#), "{log}");
}

#[tokio::test]
async fn projected_admission_through_serve_patches_the_pod_and_writes_nothing() {
    use iam_broker_testkit::kube_api::DEFAULT_TOKEN;
    let moto = Moto::start().await.unwrap();
    let sdk = moto.sdk_config().await;
    let tables = Tables::create(&sdk, "admit").await.unwrap();
    let api = KubeApi::start().await.unwrap();
    api.put_service_account("team-a", "app", &[("eks.amazonaws.com/role-arn", ROLE)]);
    api.put_service_account(
        "team-a",
        "other",
        &[("eks.amazonaws.com/role-arn", OTHER_NS_ROLE)],
    );
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path(), DEFAULT_TOKEN).unwrap();
    let env = moto
        .env()
        .tables(&tables)
        .set("KUBECONFIG", kubeconfig.to_string_lossy())
        .set("PROXY_IMAGE", "registry.example/iam-broker-proxy:0.1.0")
        .set("IDENTITY_MODE", "projected")
        .set("PROJECTED_TOKEN_EXPIRATION_SECONDS", "7200")
        .set("BROKER_URL", "https://broker.example/Prod/");
    iam_broker_tests::allow(&env, "team-a", "app", ROLE)
        .await
        .unwrap();
    let server = Server::start(&env).await.unwrap();

    let review = |sa: &str, dry_run: bool| {
        serde_json::json!({ "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": { "uid": "uid-p", "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "team-a", "operation": "CREATE", "userInfo": { "username": "e2e" },
            "dryRun": dry_run,
            "object": { "apiVersion": "v1", "kind": "Pod",
                "metadata": { "generateName": "web-", "namespace": "team-a" },
                "spec": { "serviceAccountName": sa,
                    "containers": [{ "name": "app", "image": "app:1" }] } } } })
    };
    for dry_run in [false, true] {
        let answer = server.post("/", &review("app", dry_run)).await.unwrap();
        assert_eq!(answer.status, 200);
        let response = &answer.json["response"];
        assert_eq!(response["allowed"], true);
        let patch = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            response["patch"].as_str().expect("a patch"),
        )
        .unwrap();
        let patch: serde_json::Value = serde_json::from_slice(&patch).unwrap();
        let text = patch.to_string();
        assert!(text.contains(r#""serviceAccountToken":{"audience":"iam-broker","expirationSeconds":7200,"path":"token"}"#), "{text}");
        assert!(text.contains("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"));
        assert!(text.contains(
            "https://broker.example/Prod/?role=arn:aws:iam::123456789012:role/iam-broker/s3_reader"
        ));
        assert!(!text.contains("secretKeyRef"), "no Secret is referenced");
    }
    // A ServiceAccount whose role is not allowed: admitted unpatched, told why, no Event.
    let answer = server.post("/", &review("other", false)).await.unwrap();
    assert!(answer.json["response"]["patch"].is_null());
    assert!(!answer.json["response"]["warnings"][0].is_null());

    // Nothing was written: only reads reached the API server, and no record exists.
    api.settled().await;
    let writes: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|(method, _)| method != axum::http::Method::GET)
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
    let records = aws_sdk_dynamodb::Client::new(&sdk)
        .scan()
        .table_name(&tables.authorizations)
        .send()
        .await
        .unwrap();
    assert_eq!(records.count(), 0);
    server.stop().await;
}
