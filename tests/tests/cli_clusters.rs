//! `iam-broker cluster …` and the cluster-scoped allowance commands, run as an operator would,
//! against moto and the Kubernetes API stand-in; then a projected token of the registered
//! cluster through `iam-broker serve`.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use iam_broker_testkit::Signer;
use iam_broker_testkit::kube_api::{DEFAULT_TOKEN, KubeApi};
use iam_broker_tests::{CliOutput, Env, Moto, Server, Tables, cli, workspace_root};
use serde_json::{Value, json};

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const ROLE: &str = "arn:aws:iam::123456789012:role/iam-broker/s3_reader";

async fn env() -> (Moto, Env) {
    let moto = Moto::start().await.unwrap();
    let tables = Tables::create(&moto.sdk_config().await, "cli-clusters")
        .await
        .unwrap();
    let env = moto.env().tables(&tables);
    (moto, env)
}

fn ok(out: &CliOutput) {
    assert!(
        out.success,
        "stdout:\n{}\nstderr:\n{}",
        out.stdout, out.stderr
    );
}

fn refused(out: &CliOutput, expected: &str) {
    assert!(!out.success, "should fail:\n{}", out.stdout);
    assert!(
        out.stderr.contains(expected),
        "{expected:?} not in:\n{}",
        out.stderr
    );
}

/// Writes a JWKS of fresh P-256 keys with these `kid`s to `dir/file`.
fn jwks_file(dir: &Path, file: &str, kids: &[&str]) -> PathBuf {
    let signers: Vec<Signer> = kids.iter().map(|kid| Signer::new(kid)).collect();
    let jwks = Signer::jwks(&signers.iter().collect::<Vec<_>>());
    let path = dir.join(file);
    std::fs::write(&path, jwks).unwrap();
    path
}

async fn listed(env: &Env) -> Vec<Value> {
    let out = cli(env, &["cluster", "list", "--json"]).await.unwrap();
    ok(&out);
    serde_json::from_str(&out.stdout).unwrap()
}

/// `Authorization` for a pod of team/app with this uid, as kubelet would mount its token.
async fn pod_token(api: &KubeApi, uid: &str) -> String {
    api.put_service_account("team", "app", &[]);
    let token = api
        .issue_token("team", "app", "web-1", uid, "iam-broker", 3600)
        .await
        .unwrap();
    format!("Bearer {token}")
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `iam-broker cluster add NAME --jwks-file JWKS --issuer ISSUER`.
async fn add_from_file(env: &Env, name: &str, jwks: &Path, issuer: &str) -> CliOutput {
    cli(
        env,
        &[
            "cluster",
            "add",
            name,
            "--jwks-file",
            path(jwks),
            "--issuer",
            issuer,
        ],
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn clusters_are_added_listed_refreshed_and_removed_from_jwks_files() {
    let (_moto, env) = env().await;
    let dir = tempfile::tempdir().unwrap();
    let east = jwks_file(dir.path(), "east.json", &["k1"]);

    // GIVEN east is registered from a file
    let added = add_from_file(&env, "east", &east, ISSUER).await;
    ok(&added);
    assert!(
        added.stdout.contains("registered cluster east: issuer") && added.stdout.contains("k1"),
        "{}",
        added.stdout
    );

    // WHEN it is added again THEN it is refused, pointing at refresh
    let again = add_from_file(&env, "east", &east, ISSUER).await;
    refused(&again, "cluster east is already registered");
    refused(&again, "iam-broker cluster refresh east");

    // WHEN another cluster of the same issuer brings one of east's keys THEN it is refused
    let shared = jwks_file(dir.path(), "shared.json", &["k2", "k1"]);
    let copy = add_from_file(&env, "west", &shared, ISSUER).await;
    refused(&copy, "cluster east has the same issuer");
    refused(&copy, "already holds key k1");
    // (the same keys under another issuer are another cluster's business)
    let elsewhere =
        add_from_file(&env, "elsewhere", &shared, "https://oidc.example/elsewhere").await;
    ok(&elsewhere);
    let west = jwks_file(dir.path(), "west.json", &["k2"]);
    ok(&add_from_file(&env, "west", &west, ISSUER).await);

    // THEN the listing shows each with its issuer, keys, source and time
    let clusters = listed(&env).await;
    let names: Vec<&str> = clusters
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["east", "elsewhere", "west"]);
    let first = &clusters[0];
    assert_eq!(first["issuer"], ISSUER);
    assert_eq!(first["kids"], json!(["k1"]));
    assert_eq!(first["default"], false);
    assert!(
        first["source"].as_str().unwrap().starts_with("file /")
            && first["source"].as_str().unwrap().ends_with("east.json"),
        "{first}"
    );
    assert!(
        first["updated_at"].as_str().unwrap().ends_with('Z'),
        "{first}"
    );
    let table = cli(
        &env.clone().set("CLUSTER_NAME", "east"),
        &["cluster", "list"],
    )
    .await
    .unwrap();
    ok(&table);
    assert_eq!(table.stdout.lines().count(), 4, "{}", table.stdout);
    assert!(table.stdout.contains("east (default)"), "{}", table.stdout);

    // WHEN east's key rotates (refresh keeps the registered issuer without --issuer)
    let rotated = jwks_file(dir.path(), "east-rotated.json", &["k1", "k3"]);
    let refreshed = cli(
        &env,
        &["cluster", "refresh", "east", "--jwks-file", path(&rotated)],
    )
    .await
    .unwrap();
    ok(&refreshed);
    assert!(
        refreshed.stdout.contains("new keys: k3"),
        "{}",
        refreshed.stdout
    );
    assert_eq!(listed(&env).await[0]["kids"], json!(["k1", "k3"]));
    let retired = jwks_file(dir.path(), "east-retired.json", &["k3"]);
    let refreshed = cli(
        &env,
        &["cluster", "refresh", "east", "--jwks-file", path(&retired)],
    )
    .await
    .unwrap();
    ok(&refreshed);
    assert!(
        refreshed.stdout.contains("retired keys"),
        "{}",
        refreshed.stdout
    );
    assert!(refreshed.stdout.contains("k1"), "{}", refreshed.stdout);

    // Refresh never creates; a refresh may not take another cluster's key either.
    let unknown = cli(
        &env,
        &["cluster", "refresh", "north", "--jwks-file", path(&west)],
    )
    .await
    .unwrap();
    refused(&unknown, "cluster north is not registered");
    let stolen = cli(
        &env,
        &["cluster", "refresh", "east", "--jwks-file", path(&west)],
    )
    .await
    .unwrap();
    refused(&stolen, "cluster west has the same issuer");

    // Bad input is refused before anything is written.
    let not_jwks = dir.path().join("not-jwks.json");
    std::fs::write(&not_jwks, "{\"kid\":\"x\"}").unwrap();
    for (args, expected) in [
        (
            vec![
                "cluster",
                "add",
                "south",
                "--jwks-file",
                path(&not_jwks),
                "--issuer",
                ISSUER,
            ],
            "JWKS",
        ),
        (
            vec![
                "cluster",
                "add",
                "south",
                "--jwks-file",
                path(&west),
                "--issuer",
                "kubernetes",
            ],
            "is not an http(s) URL",
        ),
        (
            vec![
                "cluster",
                "add",
                "South_1",
                "--jwks-file",
                path(&west),
                "--issuer",
                ISSUER,
            ],
            "cluster name",
        ),
        (
            vec![
                "cluster",
                "add",
                "south",
                "--jwks-file",
                "/no/such/file",
                "--issuer",
                ISSUER,
            ],
            "cannot read the JWKS file /no/such/file",
        ),
        (
            vec!["cluster", "add", "south", "--jwks-file", path(&west)],
            "--issuer",
        ),
        (vec!["cluster", "add", "south"], "--kubeconfig"),
    ] {
        let out = cli(&env, &args).await.unwrap();
        refused(&out, expected);
    }
    assert_eq!(listed(&env).await.len(), 3);

    // WHEN west is removed, twice
    let removed = cli(&env, &["cluster", "remove", "west"]).await.unwrap();
    ok(&removed);
    assert!(
        removed.stdout.contains("removed cluster west"),
        "{}",
        removed.stdout
    );
    let gone = cli(&env, &["cluster", "remove", "west"]).await.unwrap();
    refused(&gone, "cluster west is not registered: nothing was removed");
    let names: Vec<Value> = listed(&env)
        .await
        .iter()
        .map(|c| c["name"].clone())
        .collect();
    assert_eq!(names, [json!("east"), json!("elsewhere")]);
}

#[tokio::test]
async fn keys_that_can_never_verify_safely_are_refused_at_cluster_add() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (_moto, env) = env().await;
    let dir = tempfile::tempdir().unwrap();
    // a 2048-bit odd modulus, and P-256's generator with its y changed by one bit
    let mut n = vec![0xffu8; 256];
    n[255] = 0xf1;
    let g_x = "axfR8uEsQkf4vOblY6RA8ncDfYEt6zOg9KE5RdiYwpY";
    let mut g_y = b64
        .decode("T-NC4v4af5uO5-tKfA-eFivOM1drMV7Oy7ZAaDe_UfU")
        .unwrap();
    g_y[31] ^= 1;
    let cases = [
        (
            "rsa-e1",
            json!({ "kty": "RSA", "kid": "r1", "alg": "RS256", "n": b64.encode(&n), "e": "AQ" }),
            "the RSA exponent is not an odd number of at least 3",
        ),
        (
            "rsa-short",
            json!({ "kty": "RSA", "kid": "r2", "alg": "RS256",
                "n": b64.encode(&n[..128]), "e": "AQAB" }),
            "shorter than 2048 bits",
        ),
        (
            "ec-off-curve",
            json!({ "kty": "EC", "kid": "e1", "crv": "P-256", "alg": "ES256",
                "x": g_x, "y": b64.encode(&g_y) }),
            "not on the P-256 curve",
        ),
    ];
    for (name, key, why) in cases {
        let file = dir.path().join(format!("{name}.json"));
        std::fs::write(&file, json!({ "keys": [key] }).to_string()).unwrap();
        // WHEN an operator registers a JWKS holding such a key
        let added = add_from_file(&env, name, &file, ISSUER).await;
        // THEN it is refused, naming the key and why
        refused(&added, why);
    }
    // AND the registry holds none of them
    assert!(listed(&env).await.is_empty());
    // (the same generator point, unchanged, is a key the registry takes)
    let good = dir.path().join("ec-good.json");
    let key = json!({ "kty": "EC", "kid": "e2", "crv": "P-256", "alg": "ES256", "x": g_x,
        "y": "T-NC4v4af5uO5-tKfA-eFivOM1drMV7Oy7ZAaDe_UfU" });
    std::fs::write(&good, json!({ "keys": [key] }).to_string()).unwrap();
    ok(&add_from_file(&env, "ec-good", &good, ISSUER).await);
}

#[tokio::test]
async fn a_cluster_is_registered_from_its_api_server_and_its_pods_get_credentials() {
    let (_moto, env) = env().await;
    let api = KubeApi::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path(), DEFAULT_TOKEN).unwrap();
    let kubeconfig = path(&kubeconfig);

    // GIVEN east is registered through its API server's discovery endpoints
    let added = cli(
        &env,
        &["cluster", "add", "east", "--kubeconfig", kubeconfig],
    )
    .await
    .unwrap();
    ok(&added);
    let first_kid = api.signing_key_id().unwrap();
    assert!(added.stdout.contains(&first_kid), "{}", added.stdout);
    assert!(
        !added.stdout.contains(DEFAULT_TOKEN) && !added.stderr.contains(DEFAULT_TOKEN),
        "the kubeconfig's token was printed"
    );
    let clusters = listed(&env).await;
    assert_eq!(clusters[0]["issuer"], api.issuer().as_str());
    assert_eq!(clusters[0]["source"], format!("api-server {}", api.url));
    assert_eq!(clusters[0]["kids"], json!([first_kid]));

    // The same cluster under another name would make its tokens ambiguous.
    let twice = cli(
        &env,
        &["cluster", "add", "copy", "--kubeconfig", kubeconfig],
    )
    .await
    .unwrap();
    refused(&twice, "cluster east has the same issuer");
    // Another cluster with kubeadm's issuer but its own key is fine.
    let other = KubeApi::start().await.unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let other_kubeconfig = other
        .write_kubeconfig(other_dir.path(), DEFAULT_TOKEN)
        .unwrap();
    assert_eq!(other.issuer(), api.issuer());
    ok(&cli(
        &env,
        &[
            "cluster",
            "add",
            "west",
            "--kubeconfig",
            path(&other_kubeconfig),
        ],
    )
    .await
    .unwrap());

    // WHEN the allowance names the cluster and its pod presents a projected token
    let allowed = cli(
        &env,
        &[
            "allow",
            "--cluster",
            "east",
            "--namespace",
            "team",
            "--service-account",
            "app",
            "--role",
            ROLE,
        ],
    )
    .await
    .unwrap();
    ok(&allowed);
    assert!(!allowed.stderr.contains("warning"), "{}", allowed.stderr);
    // (a registry snapshot lives 1 s, so the rotation below is seen at once)
    let server = Server::start(&env.clone().set("CLUSTER_REGISTRY_TTL_SECONDS", "1"))
        .await
        .unwrap();
    const EAST_POD: &str = "0c9a3f0e-1111-4000-8000-000000000001";
    const WEST_POD: &str = "0c9a3f0e-1111-4000-8000-000000000002";
    let answer = server
        .get("/credentials", Some(&pod_token(&api, EAST_POD).await))
        .await
        .unwrap();
    // THEN the broker verifies it against the registered keys and serves the role
    assert_eq!(answer.status, 200, "{answer:?}\n{}", server.log());
    assert_eq!(answer.json["RoleArn"], ROLE);
    // and west's pod of the same namespace and ServiceAccount gets nothing: its allowances
    // are its own
    let answer = server
        .get("/credentials", Some(&pod_token(&other, WEST_POD).await))
        .await
        .unwrap();
    assert_eq!(answer.status, 403, "{answer:?}");
    assert_eq!(answer.code(), "AllowanceRevoked");

    // WHEN east's signing key rotates and the cluster is refreshed from its API server
    let new_kid = api.rotate_signing_key().unwrap();
    let refreshed = cli(
        &env,
        &["cluster", "refresh", "east", "--kubeconfig", kubeconfig],
    )
    .await
    .unwrap();
    ok(&refreshed);
    assert!(
        refreshed.stdout.contains(&format!("new keys: {new_kid}")),
        "{}",
        refreshed.stdout
    );
    // THEN tokens signed with the new key are served
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let answer = server
        .get("/credentials", Some(&pod_token(&api, EAST_POD).await))
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{answer:?}\n{}", server.log());
    server.stop().await;

    // A context that is not in the kubeconfig, an identity the API server refuses
    let context = cli(
        &env,
        &[
            "cluster",
            "refresh",
            "east",
            "--kubeconfig",
            kubeconfig,
            "--context",
            "nope",
        ],
    )
    .await
    .unwrap();
    refused(&context, "nope");
    api.deny("get", "/openid/v1/jwks");
    let denied = cli(
        &env,
        &["cluster", "refresh", "east", "--kubeconfig", kubeconfig],
    )
    .await
    .unwrap();
    refused(&denied, "system:service-account-issuer-discovery");
    assert!(!denied.stderr.contains(DEFAULT_TOKEN));
    let missing = cli(
        &env,
        &[
            "cluster",
            "add",
            "north",
            "--kubeconfig",
            "/no/such/kubeconfig",
        ],
    )
    .await
    .unwrap();
    refused(&missing, "the kubeconfig /no/such/kubeconfig is not usable");
}

#[tokio::test]
async fn allowances_are_scoped_by_cluster_and_carry_external_ids() {
    let (_moto, env) = env().await;
    let allow = |cluster: Option<&'static str>, external_id: Option<&'static str>| {
        let env = env.clone();
        async move {
            let mut args = vec![
                "allow",
                "--namespace",
                "team",
                "--service-account",
                "app",
                "--role",
                ROLE,
            ];
            if let Some(cluster) = cluster {
                args.extend(["--cluster", cluster]);
            }
            if let Some(id) = external_id {
                args.extend(["--external-id", id]);
            }
            cli(&env, &args).await.unwrap()
        }
    };

    // GIVEN east's team/app may assume the role with an ExternalId, and so may the default
    // cluster's team/app without one
    let scoped = allow(Some("east"), Some("X-1")).await;
    ok(&scoped);
    assert!(
        scoped.stdout.contains("with ExternalId X-1"),
        "{}",
        scoped.stdout
    );
    assert!(
        scoped
            .stderr
            .contains("warning: no cluster east is registered"),
        "{}",
        scoped.stderr
    );
    ok(&allow(None, None).await);

    // THEN the listing tells them apart
    let out = cli(&env, &["allowances", "--output", "json"])
        .await
        .unwrap();
    ok(&out);
    let rows: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        rows,
        json!([
            {"namespace": "team", "service_account": "app", "allowed_roles": [ROLE]},
            {"namespace": "team", "service_account": "app", "allowed_roles": [ROLE],
             "cluster": "east", "external_ids": {ROLE: "X-1"}},
        ])
    );
    let table = cli(&env, &["allowances", "--cluster", "east"])
        .await
        .unwrap();
    ok(&table);
    assert_eq!(table.stdout.lines().count(), 2, "{}", table.stdout);
    let row = table.stdout.lines().nth(1).unwrap();
    assert!(row.starts_with("east ") && row.ends_with("X-1"), "{row}");
    let default = cli(
        &env,
        &["allowances", "--namespace", "team", "--output", "json"],
    )
    .await
    .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&default.stdout).unwrap(),
        json!([{"namespace": "team", "service_account": "app", "allowed_roles": [ROLE]}])
    );
    let scoped_namespace = cli(
        &env,
        &[
            "allowances",
            "--cluster",
            "east",
            "--namespace",
            "team",
            "--output",
            "json",
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&scoped_namespace.stdout).unwrap()[0]["cluster"],
        "east"
    );
    // CLUSTER_NAME names the default cluster: --cluster with its name means the unprefixed rows
    let named = cli(
        &env.clone().set("CLUSTER_NAME", "west"),
        &["allowances", "--cluster", "west", "--output", "json"],
    )
    .await
    .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&named.stdout).unwrap(),
        json!([{"namespace": "team", "service_account": "app", "allowed_roles": [ROLE]}])
    );

    // WHEN east's row is allowed again without an id THEN the id is removed, and it says so
    let cleared = allow(Some("east"), None).await;
    ok(&cleared);
    assert!(
        cleared.stdout.contains("ExternalId X-1 was removed"),
        "{}",
        cleared.stdout
    );

    // Invalid ids and cluster names are refused before anything is written.
    refused(&allow(Some("east"), Some("has space")).await, "external id");
    refused(&allow(Some("East_1"), None).await, "cluster name");

    // WHEN east's allowance is withdrawn THEN the default cluster's stays
    ok(&cli(
        &env,
        &[
            "disallow",
            "--cluster",
            "east",
            "--namespace",
            "team",
            "--service-account",
            "app",
            "--role",
            ROLE,
        ],
    )
    .await
    .unwrap());
    let left = cli(&env, &["allowances", "--output", "json"])
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&left.stdout).unwrap(),
        json!([{"namespace": "team", "service_account": "app", "allowed_roles": [ROLE]}])
    );
    let nothing = cli(
        &env,
        &[
            "disallow",
            "--cluster",
            "east",
            "--namespace",
            "team",
            "--service-account",
            "app",
        ],
    )
    .await
    .unwrap();
    refused(&nothing, "east/team/app has no allowance");
}

#[tokio::test]
async fn the_projected_registration_example_is_what_render_webhook_prints() {
    let example_url = "https://API_ID.execute-api.REGION.amazonaws.com/Prod/mutate/\
                       YOUR_WEBHOOK_PATH_SECRET_OF_43_CHARACTERS";
    let out = cli(
        &Env::new(),
        &[
            "render-webhook",
            "--identity-mode",
            "projected",
            "--url",
            example_url,
        ],
    )
    .await
    .unwrap();
    ok(&out);
    let example = std::fs::read_to_string(
        workspace_root()
            .join("deploy/overlays/projected/30-mutatingwebhook.projected.example.yaml"),
    )
    .unwrap();
    let body: String = example
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        out.stdout, body,
        "deploy/overlays/projected/30-mutatingwebhook.projected.example.yaml is stale"
    );
    assert!(body.contains("sideEffects: None\n") && !body.contains("DELETE"));
}

#[tokio::test]
async fn a_cluster_name_means_the_same_rows_whatever_cluster_name_is() {
    // GIVEN a stack whose default cluster is named alpha (its functions run with
    // CLUSTER_NAME=alpha) and an operator's shell that does not know that name
    let (_moto, shell) = env().await;
    let stack = shell.clone().set("CLUSTER_NAME", "alpha");
    let rule = |verb: &'static str, sa: &'static str, cluster: Option<&'static str>| {
        let mut args = vec![
            verb,
            "--namespace",
            "team",
            "--service-account",
            sa,
            "--role",
            ROLE,
        ];
        args.extend(cluster.iter().flat_map(|c| ["--cluster", *c]));
        args
    };

    // WHEN the operator allows with --cluster alpha (rows alpha/team), and, as before clusters
    // had names, another ServiceAccount without --cluster (unprefixed rows)
    ok(&cli(&shell, &rule("allow", "app", Some("alpha")))
        .await
        .unwrap());
    ok(&cli(&shell, &rule("allow", "old", None)).await.unwrap());

    // THEN the stack's broker serves both: alpha's pods read alpha's rows and the unprefixed
    // ones (before, the first answered 403 AllowanceRevoked)
    let server = Server::start(&stack).await.unwrap();
    let app = iam_broker_tests::mint_token(&stack, "team", "app", ROLE)
        .await
        .unwrap();
    let old = iam_broker_tests::mint_token(&stack, "team", "old", ROLE)
        .await
        .unwrap();
    for token in [&app, &old] {
        let answer = server.get("/", Some(token)).await.unwrap();
        assert_eq!(answer.status, 200, "{:?}\n{}", answer.json, server.log());
    }
    // AND token create, which checks the allowance, does not warn
    let created = cli(
        &stack,
        &[
            "token",
            "create",
            "--namespace",
            "team",
            "--service-account",
            "app",
            "--role",
            ROLE,
        ],
    )
    .await
    .unwrap();
    ok(&created);
    assert!(!created.stderr.contains("warning"), "{}", created.stderr);
    // AND the listing of alpha shows both kinds of rows
    let listed = cli(
        &stack,
        &["allowances", "--cluster", "alpha", "--output", "json"],
    )
    .await
    .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&listed.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        2,
        "{}",
        listed.stdout
    );

    // WHEN the role is granted both ways and then withdrawn with the name known (CLUSTER_NAME,
    // or --stack's ClusterName output)
    ok(&cli(&shell, &rule("allow", "app", None)).await.unwrap());
    let withdrawn = cli(&stack, &rule("disallow", "app", Some("alpha")))
        .await
        .unwrap();
    ok(&withdrawn);
    // THEN both rows lose it, and the next fetch is refused
    assert!(
        withdrawn
            .stdout
            .contains("alpha/team/app may no longer assume")
            && withdrawn.stdout.contains("\nteam/app may no longer assume"),
        "{}",
        withdrawn.stdout
    );
    let answer = server.get("/", Some(&app)).await.unwrap();
    assert_eq!(answer.status, 403);
    assert_eq!(answer.code(), "AllowanceRevoked");
    // AND the other ServiceAccount's unprefixed row is untouched
    assert_eq!(server.get("/", Some(&old)).await.unwrap().status, 200);
}

#[tokio::test]
async fn a_session_policy_is_checked_when_written_listed_and_sent_to_sts() {
    let (_moto, env) = env().await;
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    };
    let allow = |policy: String| {
        let env = env.clone();
        async move {
            cli(
                &env,
                &[
                    "allow",
                    "--namespace",
                    "team",
                    "--service-account",
                    "app",
                    "--role",
                    ROLE,
                    "--session-policy",
                    &policy,
                ],
            )
            .await
            .unwrap()
        }
    };
    // A policy that is not one, or too long for STS, is refused before anything is written.
    refused(
        &allow(file("bad.json", "{\"Statement\": 1}")).await,
        "Version",
    );
    let long = format!(
        r#"{{"Version":"2012-10-17","Statement":{{"Effect":"Allow","Action":"s3:*","Resource":"arn:aws:s3:::{}"}}}}"#,
        "b".repeat(2100)
    );
    refused(&allow(file("long.json", &long)).await, "at most 2048");
    let listed = cli(&env, &["allowances", "--output", "json"])
        .await
        .unwrap();
    assert_eq!(listed.stdout.trim(), "[]", "nothing was written");

    // A valid one is stored compact with the role, and listed.
    let policy = r#"{
      "Version": "2012-10-17",
      "Statement": [{ "Effect": "Allow", "Action": "s3:GetObject", "Resource": "*" }]
    }"#;
    let out = allow(file("ok.json", policy)).await;
    ok(&out);
    assert!(
        out.stdout.contains("with a session policy of"),
        "{}",
        out.stdout
    );
    let listed = cli(&env, &["allowances", "--output", "json"])
        .await
        .unwrap();
    let rows: Value = serde_json::from_str(&listed.stdout).unwrap();
    let stored = rows[0]["session_policies"][ROLE].as_str().unwrap();
    assert!(
        !stored.contains('\n') && stored.contains("s3:GetObject"),
        "{stored}"
    );
    let table = cli(&env, &["allowances"]).await.unwrap();
    assert!(table.stdout.contains("SESSION POLICY") && table.stdout.contains(" chars "));

    // The broker sends it with AssumeRole (moto accepts Policy) and serves the credentials.
    let server = Server::start(&env).await.unwrap();
    let token = iam_broker_tests::mint_token(&env, "team", "app", ROLE)
        .await
        .unwrap();
    let answer = server.get("/", Some(&token)).await.unwrap();
    assert_eq!(answer.status, 200, "{:?}", answer.json);

    // Allowed again without it: removed, and said so.
    let out = cli(
        &env,
        &[
            "allow",
            "--namespace",
            "team",
            "--service-account",
            "app",
            "--role",
            ROLE,
        ],
    )
    .await
    .unwrap();
    ok(&out);
    assert!(
        out.stdout.contains("session policy was removed"),
        "{}",
        out.stdout
    );
}

#[tokio::test]
async fn doctor_in_projected_mode_checks_the_registration_and_no_rbac_without_a_lookup() {
    let (_moto, env) = env().await;
    // A projected stack without a kubeconfig: the webhook never calls the cluster.
    let projected = env
        .clone()
        .set("IDENTITY_MODE", "projected")
        .set("INJECTION", "direct")
        .set("CLUSTER_NAME", "prod-eu-1");

    // GIVEN the cluster is not registered yet
    let before = cli(&projected, &["doctor"]).await.unwrap();
    assert!(!before.success, "{}", before.stdout);
    assert!(
        before.stdout.contains(
            "FAIL  cluster registration: prod-eu-1 is not registered, so the broker refuses its \
             pods' tokens"
        ),
        "{}",
        before.stdout
    );
    // AND no Kubernetes check runs: nothing there is called
    assert!(
        before.stdout.contains(
            "ok    Kubernetes: not called: IDENTITY_MODE=projected without SERVICE_ACCOUNT_LOOKUP"
        ),
        "{}",
        before.stdout
    );
    assert!(
        !before.stdout.contains("Kubernetes RBAC"),
        "{}",
        before.stdout
    );

    // WHEN it is registered THEN doctor passes
    let dir = tempfile::tempdir().unwrap();
    let jwks = jwks_file(dir.path(), "prod.json", &["k1"]);
    ok(&add_from_file(&env, "prod-eu-1", &jwks, ISSUER).await);
    let after = cli(&projected, &["doctor"]).await.unwrap();
    ok(&after);
    assert!(
        after.stdout.contains(&format!(
            "ok    cluster registration: prod-eu-1 is registered (issuer {ISSUER}, 1 keys)"
        )),
        "{}",
        after.stdout
    );

    // A projected stack without a cluster name is told it needs one.
    let unnamed = env
        .clone()
        .set("IDENTITY_MODE", "projected")
        .set("INJECTION", "direct");
    let out = cli(&unnamed, &["doctor"]).await.unwrap();
    assert!(!out.success);
    assert!(
        out.stdout
            .contains("FAIL  cluster registration: IDENTITY_MODE=projected needs CLUSTER_NAME"),
        "{}",
        out.stdout
    );

    // With a lookup, only `get serviceaccounts` is checked (deploy/components/rbac-projected/20-rbac.projected.yaml).
    let api = KubeApi::start().await.unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path(), DEFAULT_TOKEN).unwrap();
    api.deny("get", "serviceaccounts");
    let lookup = projected
        .clone()
        .set("SERVICE_ACCOUNT_LOOKUP", "true")
        .set("KUBECONFIG", kubeconfig.to_string_lossy());
    let out = cli(&lookup, &["doctor"]).await.unwrap();
    assert!(!out.success);
    assert!(
        out.stdout.contains(
            "FAIL  Kubernetes RBAC get serviceaccounts: denied: apply deploy/components/rbac-projected/20-rbac.projected.yaml"
        ),
        "{}",
        out.stdout
    );
    assert!(
        !out.stdout.contains("RBAC create secrets"),
        "{}",
        out.stdout
    );
}
