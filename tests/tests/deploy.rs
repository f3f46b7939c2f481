//! The cluster manifests in `deploy/` against what the code needs: RBAC grants exactly the
//! permissions the webhook, cleanup and sweep use (the list `iam-broker doctor` checks), and the
//! in-cluster Deployment is restricted-v2 compatible and serves TLS as the webhook's identity.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use iam_broker_kube::REQUIRED_PERMISSIONS;
use iam_broker_tests::workspace_root;
use serde_json::Value;

fn documents(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(workspace_root().join(path)).unwrap();
    serde_saphyr::from_multiple(&text).unwrap()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

#[test]
fn rbac_grants_exactly_what_the_webhook_uses() {
    let docs = documents("deploy/components/rbac-secret/20-rbac.yaml");
    let role = kind(&docs, "ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        assert_eq!(
            rule["apiGroups"],
            serde_json::json!([""]),
            "core group only"
        );
        for resource in rule["resources"].as_array().unwrap() {
            for verb in rule["verbs"].as_array().unwrap() {
                granted.insert((
                    verb.as_str().unwrap().to_owned(),
                    resource.as_str().unwrap().to_owned(),
                ));
            }
        }
    }
    let needed: BTreeSet<_> = REQUIRED_PERMISSIONS
        .iter()
        .map(|p| (p.verb.to_owned(), p.resource.to_owned()))
        .collect();
    assert_eq!(granted, needed);
    let binding = kind(&docs, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["name"], "iam-broker-webhook");
    assert_eq!(binding["subjects"][0]["namespace"], "iam-broker");
}

#[test]
fn the_service_account_and_its_token_secret_match_the_kubeconfig_command() {
    let docs = documents("deploy/components/webhook-identity/10-serviceaccount.yaml");
    let secret = kind(&docs, "Secret");
    assert_eq!(secret["type"], "kubernetes.io/service-account-token");
    assert_eq!(
        secret["metadata"]["annotations"]["kubernetes.io/service-account.name"],
        kind(&docs, "ServiceAccount")["metadata"]["name"]
    );
    // README: iam-broker kubeconfig --from-secret iam-broker/iam-broker-webhook-token
    assert_eq!(secret["metadata"]["name"], "iam-broker-webhook-token");
    assert_eq!(secret["metadata"]["namespace"], "iam-broker");
}

#[test]
fn the_in_cluster_broker_is_restricted_and_serves_tls() {
    let docs = documents("deploy/overlays/in-cluster/broker.yaml");
    let deployment = kind(&docs, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "iam-broker-webhook");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let container = &pod["containers"][0];
    let sc = &container["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(sc.get("runAsUser").is_none() && pod["securityContext"].get("runAsUser").is_none());
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.contains(&"--tls-cert") && args.contains(&"--tls-key"),
        "{args:?}"
    );
    let env: BTreeSet<&str> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for name in ["BROKER_URL", "PROXY_IMAGE", "PROXY_BROKER_CA_PEM"] {
        assert!(env.contains(name), "{name}");
    }
    let service = kind(&docs, "Service");
    assert_eq!(service["spec"]["ports"][0]["port"], 443);
}

#[test]
fn the_namespace_enforces_the_restricted_pod_security_level() {
    let docs = documents("deploy/base/00-namespace.yaml");
    assert_eq!(
        kind(&docs, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
}

#[test]
fn the_in_cluster_sweep_runs_hourly_as_the_webhook_with_the_brokers_tables() {
    let docs = documents("deploy/overlays/in-cluster/broker.yaml");
    let cron = kind(&docs, "CronJob");
    assert_eq!(cron["spec"]["concurrencyPolicy"], "Forbid");
    let schedule = cron["spec"]["schedule"].as_str().unwrap();
    assert_eq!(schedule.split(' ').nth(1), Some("*"), "hourly: {schedule}");
    let pod = &cron["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "iam-broker-webhook");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["args"], serde_json::json!(["sweep"]));
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    // the sweep must look at the same tables as the broker it cleans up after
    let env = |doc: &Value| -> BTreeSet<String> {
        doc["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"].as_str().unwrap().ends_with("_TABLE"))
            .map(|e| format!("{}={}", e["name"], e["value"]))
            .collect()
    };
    let broker = &kind(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(env(container), env(broker));
    assert_eq!(env(container).len(), 3);
}

#[test]
fn the_in_cluster_broker_and_sweep_hold_no_static_aws_key() {
    let docs = documents("deploy/overlays/in-cluster/broker.yaml");
    let text = std::fs::read_to_string(
        iam_broker_tests::workspace_root().join("deploy/overlays/in-cluster/broker.yaml"),
    )
    .unwrap();
    assert!(
        !text.contains("AWS_ACCESS_KEY_ID") && !text.contains("envFrom"),
        "no key, no Secret of keys"
    );
    // The profile every container uses is a credential_process (tests/tests/keyless.rs runs one)
    // whose certificate and key are mounted where it reads them.
    let config = kind(&docs, "ConfigMap")["data"]["config"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        config.starts_with(
            "[profile roles-anywhere]\ncredential_process = /aws_signing_helper credential-process"
        ),
        "{config}"
    );
    for pod in [
        &kind(&docs, "Deployment")["spec"]["template"]["spec"],
        &kind(&docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"],
    ] {
        let container = &pod["containers"][0];
        let env: BTreeSet<String> = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                format!(
                    "{}={}",
                    e["name"].as_str().unwrap(),
                    e["value"].as_str().unwrap_or("")
                )
            })
            .collect();
        assert!(
            env.contains("AWS_PROFILE=roles-anywhere")
                && env.contains("AWS_CONFIG_FILE=/aws/config"),
            "{env:?}"
        );
        let mounts: BTreeSet<&str> = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["mountPath"].as_str().unwrap())
            .collect();
        for path in ["/aws", "/roles-anywhere"] {
            assert!(mounts.contains(path), "{path}: {mounts:?}");
        }
        for argument in ["/roles-anywhere/tls.crt", "/roles-anywhere/tls.key"] {
            assert!(config.contains(argument), "{argument}");
        }
        let volumes: BTreeSet<&str> = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert!(
            volumes.contains("aws-config") && volumes.contains("roles-anywhere"),
            "{volumes:?}"
        );
    }
    let broker = &kind(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0];
    let names: BTreeSet<&str> = broker["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for name in ["CLUSTERS_TABLE", "IDENTITY_MODE"] {
        assert!(names.contains(name), "{name}");
    }
}
