//! The admission decision: a pod in, a JSON patch out. Pure and synchronous.
//!
//! The patch is computed over the pod's JSON exactly as the API server sent it, so every field the
//! webhook does not own (unknown fields, init containers' `restartPolicy`, …) is kept, and it never
//! `add`s into an array that does not exist (RFC 6902 would reject that).

use std::collections::BTreeSet;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use serde_json::{Map, Value, json};

/// Name of the injected sidecar container; its presence means "already injected".
pub const SIDECAR_NAME: &str = "iam-broker-proxy";
/// Pod annotation naming the Secret that holds the pod's token (read back on DELETE).
pub const ANNOTATION_SECRET_NAME: &str = "iam-broker.io/secret-name";
/// Pod and Secret annotation holding the token's hash (the Authorizations key; not a secret).
pub const ANNOTATION_TOKEN_HASH: &str = "iam-broker.io/token-hash";
/// Pod annotation listing containers (comma-separated) that must not get credentials.
pub const ANNOTATION_SKIP_CONTAINERS: &str = "eks.amazonaws.com/skip-containers";
/// Label on every injected pod; the registration sends DELETE only for pods that carry it.
pub const LABEL_INJECTED: &str = "iam-broker.io/injected";
/// Value of [`LABEL_INJECTED`].
pub const LABEL_INJECTED_VALUE: &str = "true";
/// Label put on every Secret the webhook creates.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of [`LABEL_MANAGED_BY`].
pub const MANAGED_BY: &str = "iam-broker";
/// Data key of the token in the Secret.
pub const SECRET_TOKEN_KEY: &str = "token";
/// Prefix of every Secret name the webhook creates.
pub const SECRET_NAME_PREFIX: &str = "iam-broker-token-";
/// Name of the Secret volume when the token is also mounted as a file.
pub const TOKEN_VOLUME: &str = "iam-broker-token";
/// Directory the token volume is mounted at.
pub const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/iam-broker";

/// `AWS_CONTAINER_CREDENTIALS_FULL_URI`.
pub const ENV_FULL_URI: &str = "AWS_CONTAINER_CREDENTIALS_FULL_URI";
/// `AWS_CONTAINER_AUTHORIZATION_TOKEN`.
pub const ENV_AUTHORIZATION_TOKEN: &str = "AWS_CONTAINER_AUTHORIZATION_TOKEN";
/// `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`.
pub const ENV_AUTHORIZATION_TOKEN_FILE: &str = "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE";

/// Environment variables that mean "this container already has its own AWS credentials": such a
/// container is left alone.
pub const PRESET_CREDENTIAL_ENV: &[&str] = &[
    ENV_FULL_URI,
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    ENV_AUTHORIZATION_TOKEN,
    ENV_AUTHORIZATION_TOKEN_FILE,
    "AWS_ACCESS_KEY_ID",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
];

/// How the sidecar is added to the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SidecarMode {
    /// A regular container, appended to `spec.containers` (works on every Kubernetes version;
    /// init containers run before it starts, so they cannot reach it).
    #[default]
    Container,
    /// A native sidecar: the first init container, with `restartPolicy: Always` (Kubernetes ≥
    /// 1.29), so init containers get credentials too.
    Native,
}

/// What the webhook injects, from configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarSettings {
    /// The proxy image.
    pub image: String,
    /// Port the proxy listens on at 127.0.0.1.
    pub port: u16,
    /// Regular container or native sidecar.
    pub mode: SidecarMode,
    /// Also mount the token as a file and set `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`.
    pub token_file: bool,
    /// `AWS_REGION` / `AWS_DEFAULT_REGION` to set in containers that lack them.
    pub region: Option<String>,
    /// PEM of a private CA the sidecar must trust for the broker (in-cluster broker), passed as
    /// the sidecar's `BROKER_CA_PEM`.
    pub broker_ca_pem: Option<String>,
}

/// The parts of a pod the decision needs, read from its JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    /// `spec.serviceAccountName` (or the deprecated `spec.serviceAccount`), `default` if empty.
    pub service_account: String,
    /// `metadata.name`, else `metadata.generateName` (at CREATE a pod may have only the prefix).
    pub name: Option<String>,
    /// Whether a container or init container is already the sidecar (reinvocation).
    pub already_injected: bool,
    /// `spec.hostNetwork`.
    pub host_network: bool,
    /// Containers and init containers that would get credentials, in pod order.
    pub eligible: Vec<ContainerRef>,
}

/// Which list a container is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ContainerList {
    /// `spec.initContainers`.
    Init,
    /// `spec.containers`.
    Main,
}

impl ContainerList {
    fn field(self) -> &'static str {
        match self {
            Self::Init => "initContainers",
            Self::Main => "containers",
        }
    }
}

/// A container by list and index, with its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRef {
    /// Which list.
    pub list: ContainerList,
    /// Index in that list.
    pub index: usize,
    /// `name`.
    pub name: String,
}

/// Why a pod gets no patch before any lookup is made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    /// The pod already carries the sidecar (the API server re-invoked the webhook).
    #[error("the pod already carries the {SIDECAR_NAME} sidecar")]
    AlreadyInjected,
    /// `hostNetwork` pods share the node's loopback: the proxy port would clash across pods.
    #[error("hostNetwork pods are not injected: the proxy's loopback port would clash on the node")]
    HostNetwork,
    /// Every container is skipped by annotation or already has AWS credentials configured.
    #[error(
        "no container needs credentials (skip-containers annotation or AWS credentials already set)"
    )]
    NoEligibleContainer,
}

/// Why the object is not a pod this decision can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a readable Pod: {0}")]
pub struct NotAPod(pub String);

/// Reads the pod's JSON.
pub fn view(pod: &Value) -> Result<PodView, NotAPod> {
    let spec = pod
        .get("spec")
        .and_then(Value::as_object)
        .ok_or_else(|| NotAPod("spec is missing".to_owned()))?;
    let metadata = pod.get("metadata").and_then(Value::as_object);
    let annotations = metadata
        .and_then(|m| m.get("annotations"))
        .and_then(Value::as_object);
    let skip: BTreeSet<&str> = annotations
        .and_then(|a| a.get(ANNOTATION_SKIP_CONTAINERS))
        .and_then(Value::as_str)
        .map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();

    let non_empty = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let service_account = non_empty(spec.get("serviceAccountName"))
        .or_else(|| non_empty(spec.get("serviceAccount")))
        .unwrap_or_else(|| "default".to_owned());
    let name = non_empty(metadata.and_then(|m| m.get("name")))
        .or_else(|| non_empty(metadata.and_then(|m| m.get("generateName"))));

    let mut already_injected = false;
    let mut eligible = Vec::new();
    for list in [ContainerList::Init, ContainerList::Main] {
        let Some(containers) = spec.get(list.field()) else {
            continue;
        };
        let containers = containers
            .as_array()
            .ok_or_else(|| NotAPod(format!("spec.{} is not an array", list.field())))?;
        for (index, container) in containers.iter().enumerate() {
            let name = container
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| NotAPod(format!("spec.{}[{index}] has no name", list.field())))?;
            if name == SIDECAR_NAME {
                already_injected = true;
                continue;
            }
            if skip.contains(name) || has_preset_credentials(container) {
                continue;
            }
            eligible.push(ContainerRef {
                list,
                index,
                name: name.to_owned(),
            });
        }
    }
    if spec.get("containers").and_then(Value::as_array).is_none() {
        return Err(NotAPod("spec.containers is missing".to_owned()));
    }
    Ok(PodView {
        service_account,
        name,
        already_injected,
        host_network: spec.get("hostNetwork").and_then(Value::as_bool) == Some(true),
        eligible,
    })
}

impl PodView {
    /// Whether the pod is out of scope before any lookup: already injected, `hostNetwork`, or
    /// nothing to inject into.
    pub fn skip(&self) -> Option<Skip> {
        if self.already_injected {
            Some(Skip::AlreadyInjected)
        } else if self.host_network {
            Some(Skip::HostNetwork)
        } else if self.eligible.is_empty() {
            Some(Skip::NoEligibleContainer)
        } else {
            None
        }
    }
}

fn env_names(container: &Value) -> BTreeSet<&str> {
    container
        .get("env")
        .and_then(Value::as_array)
        .map(|env| {
            env.iter()
                .filter_map(|e| e.get("name").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default()
}

fn has_preset_credentials(container: &Value) -> bool {
    let names = env_names(container);
    PRESET_CREDENTIAL_ENV.iter().any(|n| names.contains(n))
}

/// The Secret name for a token hash: deterministic, so DELETE can check that a pod's two
/// annotations belong together.
pub fn secret_name(token_hash: &str) -> String {
    let short = token_hash.get(..16).unwrap_or(token_hash);
    format!("{SECRET_NAME_PREFIX}{short}")
}

/// What the patch points the pod at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injection<'a> {
    /// The Secret holding the token.
    pub secret_name: &'a str,
    /// The token's hash (annotated on the pod for DELETE).
    pub token_hash: &'a str,
    /// The broker URL the sidecar calls.
    pub broker_url: &'a str,
}

/// The JSON patch that injects the sidecar, the environment and the annotations into `pod`.
///
/// `view` must be [`view`]`(pod)`. Operations touch only what the webhook owns; arrays and maps
/// are created whole when missing and appended to otherwise.
pub fn patch(
    pod: &Value,
    view: &PodView,
    settings: &SidecarSettings,
    injection: &Injection<'_>,
) -> Patch {
    let mut ops = Vec::new();

    // Annotations for DELETE, and the label that selects the pod for the DELETE webhook (the
    // registration's objectSelector), so pods that never had credentials cost no call.
    let annotations = [
        (ANNOTATION_SECRET_NAME, injection.secret_name),
        (ANNOTATION_TOKEN_HASH, injection.token_hash),
    ];
    let labels = [(LABEL_INJECTED, LABEL_INJECTED_VALUE)];
    let map = |entries: &[(&str, &str)]| {
        Value::Object(Map::from_iter(
            entries.iter().map(|(k, v)| ((*k).to_owned(), json!(v))),
        ))
    };
    match pod.get("metadata") {
        None => add(
            &mut ops,
            &["metadata"],
            json!({ "annotations": map(&annotations), "labels": map(&labels) }),
        ),
        Some(metadata) => {
            for (field, entries) in [("annotations", &annotations[..]), ("labels", &labels[..])] {
                if metadata.get(field).is_none_or(Value::is_null) {
                    add(&mut ops, &["metadata", field], map(entries));
                } else {
                    for (key, value) in entries {
                        add(&mut ops, &["metadata", field, key], json!(value));
                    }
                }
            }
        }
    }

    let full_uri = format!("http://127.0.0.1:{}/", settings.port);
    let mount_file = format!("{TOKEN_MOUNT_PATH}/{SECRET_TOKEN_KEY}");
    for target in &view.eligible {
        let container = &pod["spec"][target.list.field()][target.index];
        let existing = env_names(container);
        let mut env = vec![
            json!({ "name": ENV_FULL_URI, "value": full_uri }),
            json!({ "name": ENV_AUTHORIZATION_TOKEN, "valueFrom": { "secretKeyRef": {
                "name": injection.secret_name, "key": SECRET_TOKEN_KEY } } }),
        ];
        if settings.token_file {
            env.push(json!({ "name": ENV_AUTHORIZATION_TOKEN_FILE, "value": mount_file }));
        }
        if let Some(region) = &settings.region {
            for name in ["AWS_REGION", "AWS_DEFAULT_REGION"] {
                if !existing.contains(name) {
                    env.push(json!({ "name": name, "value": region }));
                }
            }
        }
        let index = target.index.to_string();
        let base = ["spec", target.list.field(), index.as_str()];
        append_all(&mut ops, container.get("env"), &base, "env", env);
        if settings.token_file {
            let mount =
                json!({ "name": TOKEN_VOLUME, "mountPath": TOKEN_MOUNT_PATH, "readOnly": true });
            append_all(
                &mut ops,
                container.get("volumeMounts"),
                &base,
                "volumeMounts",
                vec![mount],
            );
        }
    }

    if settings.token_file {
        let volume = json!({ "name": TOKEN_VOLUME, "secret": {
            "secretName": injection.secret_name,
            "items": [{ "key": SECRET_TOKEN_KEY, "path": SECRET_TOKEN_KEY }],
        } });
        append_all(
            &mut ops,
            pod["spec"].get("volumes"),
            &["spec"],
            "volumes",
            vec![volume],
        );
    }

    // The sidecar goes last: inserting it at the front of initContainers shifts indices, and
    // every operation above addresses containers by their index in the pod as sent.
    let sidecar = sidecar(settings, injection.broker_url);
    match settings.mode {
        SidecarMode::Container => add(&mut ops, &["spec", "containers", "-"], sidecar),
        SidecarMode::Native => {
            let mut sidecar = sidecar;
            if let Some(object) = sidecar.as_object_mut() {
                object.insert("restartPolicy".to_owned(), json!("Always"));
            }
            match pod["spec"].get("initContainers") {
                Some(Value::Array(_)) => add(&mut ops, &["spec", "initContainers", "0"], sidecar),
                _ => add(&mut ops, &["spec", "initContainers"], json!([sidecar])),
            }
        }
    }
    Patch(ops)
}

/// The sidecar container. Restricted-v2 compatible: non-root without a fixed UID, no privilege
/// escalation, no capabilities, read-only root filesystem, RuntimeDefault seccomp.
pub fn sidecar(settings: &SidecarSettings, broker_url: &str) -> Value {
    let mut env = vec![
        json!({ "name": "BROKER_URL", "value": broker_url }),
        json!({ "name": "LISTEN_ADDR", "value": format!("127.0.0.1:{}", settings.port) }),
    ];
    if let Some(pem) = &settings.broker_ca_pem {
        env.push(json!({ "name": "BROKER_CA_PEM", "value": pem }));
    }
    json!({
        "name": SIDECAR_NAME,
        "image": settings.image,
        "imagePullPolicy": "IfNotPresent",
        "env": env,
        "resources": {
            "requests": { "cpu": "10m", "memory": "16Mi" },
            "limits": { "cpu": "200m", "memory": "32Mi" },
        },
        "securityContext": {
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "capabilities": { "drop": ["ALL"] },
            "readOnlyRootFilesystem": true,
            "seccompProfile": { "type": "RuntimeDefault" },
        },
    })
}

fn pointer(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

fn add(ops: &mut Vec<PatchOperation>, path: &[&str], value: Value) {
    ops.push(PatchOperation::Add(AddOperation {
        path: pointer(path),
        value,
    }));
}

/// Appends `items` to the array at `base/field`: one `add` of the whole array when it is missing
/// (or null), else one `add …/-` per item.
fn append_all(
    ops: &mut Vec<PatchOperation>,
    current: Option<&Value>,
    base: &[&str],
    field: &str,
    items: Vec<Value>,
) {
    let mut path: Vec<&str> = base.to_vec();
    path.push(field);
    match current {
        Some(Value::Array(_)) => {
            path.push("-");
            for item in items {
                add(ops, &path, item);
            }
        }
        _ => add(ops, &path, Value::Array(items)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(mode: SidecarMode, token_file: bool, region: Option<&str>) -> SidecarSettings {
        SidecarSettings {
            image: "registry.example/iam-broker-proxy:1".to_owned(),
            port: 53080,
            mode,
            token_file,
            region: region.map(str::to_owned),
            broker_ca_pem: None,
        }
    }

    const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn injection(secret: &str) -> Injection<'_> {
        Injection {
            secret_name: secret,
            token_hash: HASH,
            broker_url: "https://broker.example/Prod/",
        }
    }

    fn apply(pod: &Value, settings: &SidecarSettings) -> Value {
        let view = view(pod).unwrap();
        let secret = secret_name(HASH);
        let patch = patch(pod, &view, settings, &injection(&secret));
        let mut patched = pod.clone();
        json_patch::patch(&mut patched, &patch).unwrap();
        patched
    }

    fn env_of(container: &Value) -> Vec<String> {
        container["env"]
            .as_array()
            .map(|e| {
                e.iter()
                    .map(|v| v["name"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn a_minimal_pod_gets_sidecar_env_and_annotations() {
        // GIVEN a pod with no env, no annotations and no init containers
        let pod = json!({ "metadata": { "name": "app" }, "spec": { "containers": [
            { "name": "app", "image": "app:1" } ] } });
        // WHEN the patch is applied by an RFC 6902 implementation
        let patched = apply(&pod, &settings(SidecarMode::Container, false, None));
        // THEN the app container has both variables and the sidecar is appended
        let app = &patched["spec"]["containers"][0];
        assert_eq!(
            app["env"][0],
            json!({ "name": ENV_FULL_URI, "value": "http://127.0.0.1:53080/" })
        );
        assert_eq!(
            app["env"][1]["valueFrom"]["secretKeyRef"],
            json!({ "name": "iam-broker-token-0123456789abcdef", "key": "token" })
        );
        let sidecar = &patched["spec"]["containers"][1];
        assert_eq!(sidecar["name"], SIDECAR_NAME);
        assert_eq!(sidecar["securityContext"]["runAsNonRoot"], true);
        assert!(sidecar["securityContext"].get("runAsUser").is_none());
        assert_eq!(
            sidecar["env"][0]["value"],
            json!("https://broker.example/Prod/")
        );
        assert_eq!(
            patched["metadata"]["annotations"][ANNOTATION_SECRET_NAME],
            "iam-broker-token-0123456789abcdef"
        );
        assert_eq!(
            patched["metadata"]["annotations"][ANNOTATION_TOKEN_HASH],
            HASH
        );
        // and the label the DELETE webhook selects on
        assert_eq!(patched["metadata"]["labels"][LABEL_INJECTED], "true");
        // and the patched pod is now "already injected"
        assert_eq!(view(&patched).unwrap().skip(), Some(Skip::AlreadyInjected));
    }

    #[test]
    fn existing_env_and_annotations_are_appended_to_and_unknown_fields_kept() {
        let pod = json!({
            "metadata": { "generateName": "web-", "annotations": { "a/b": "c" },
                          "labels": { "app": "web" } },
            "spec": {
                "futureField": { "x": 1 },
                "containers": [{ "name": "web", "env": [{ "name": "X", "value": "1" }],
                                 "futureContainerField": true }] } });
        let patched = apply(
            &pod,
            &settings(SidecarMode::Container, false, Some("eu-west-1")),
        );
        assert_eq!(patched["metadata"]["annotations"]["a/b"], "c");
        assert_eq!(patched["metadata"]["labels"]["app"], "web");
        assert_eq!(patched["metadata"]["labels"][LABEL_INJECTED], "true");
        assert_eq!(patched["spec"]["futureField"], json!({ "x": 1 }));
        assert_eq!(
            patched["spec"]["containers"][0]["futureContainerField"],
            true
        );
        assert_eq!(
            env_of(&patched["spec"]["containers"][0]),
            vec![
                "X",
                ENV_FULL_URI,
                ENV_AUTHORIZATION_TOKEN,
                "AWS_REGION",
                "AWS_DEFAULT_REGION"
            ]
        );
        assert_eq!(view(&pod).unwrap().name.as_deref(), Some("web-"));
    }

    #[test]
    fn region_is_not_overridden() {
        let pod = json!({ "spec": { "containers": [{ "name": "a",
            "env": [{ "name": "AWS_REGION", "value": "us-east-2" }] }] } });
        let patched = apply(
            &pod,
            &settings(SidecarMode::Container, false, Some("eu-west-1")),
        );
        let env = env_of(&patched["spec"]["containers"][0]);
        assert_eq!(env.iter().filter(|n| *n == "AWS_REGION").count(), 1);
        assert!(env.contains(&"AWS_DEFAULT_REGION".to_owned()));
        assert_eq!(
            patched["spec"]["containers"][0]["env"][0]["value"],
            "us-east-2"
        );
        // a pod without metadata at all still gets its annotations
        assert!(patched["metadata"]["annotations"][ANNOTATION_TOKEN_HASH].is_string());
        assert_eq!(patched["metadata"]["labels"][LABEL_INJECTED], "true");
    }

    #[test]
    fn native_sidecar_goes_first_and_init_containers_keep_restart_policy() {
        let pod = json!({ "spec": {
            "initContainers": [
                { "name": "migrate" },
                { "name": "log-shipper", "restartPolicy": "Always" } ],
            "containers": [{ "name": "app" }] } });
        let patched = apply(&pod, &settings(SidecarMode::Native, false, None));
        let init = patched["spec"]["initContainers"].as_array().unwrap();
        assert_eq!(init.len(), 3);
        assert_eq!(init[0]["name"], SIDECAR_NAME);
        assert_eq!(init[0]["restartPolicy"], "Always");
        assert_eq!(init[1]["name"], "migrate");
        assert_eq!(
            env_of(&init[1]),
            vec![ENV_FULL_URI, ENV_AUTHORIZATION_TOKEN]
        );
        assert_eq!(init[2]["restartPolicy"], "Always");
        assert_eq!(
            env_of(&init[2]),
            vec![ENV_FULL_URI, ENV_AUTHORIZATION_TOKEN]
        );
        assert_eq!(patched["spec"]["containers"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn native_sidecar_creates_init_containers_when_missing() {
        let pod = json!({ "spec": { "containers": [{ "name": "app" }] } });
        let patched = apply(&pod, &settings(SidecarMode::Native, false, None));
        assert_eq!(patched["spec"]["initContainers"][0]["name"], SIDECAR_NAME);
    }

    #[test]
    fn token_file_mounts_the_secret_and_sets_the_file_variable() {
        let pod = json!({ "spec": {
            "volumes": [{ "name": "data", "emptyDir": {} }],
            "containers": [
                { "name": "a", "volumeMounts": [{ "name": "data", "mountPath": "/data" }] },
                { "name": "b" } ] } });
        let patched = apply(&pod, &settings(SidecarMode::Container, true, None));
        let volumes = patched["spec"]["volumes"].as_array().unwrap();
        assert_eq!(volumes.len(), 2);
        assert_eq!(
            volumes[1]["secret"]["secretName"],
            "iam-broker-token-0123456789abcdef"
        );
        for i in 0..2 {
            let c = &patched["spec"]["containers"][i];
            assert!(env_of(c).contains(&ENV_AUTHORIZATION_TOKEN_FILE.to_owned()));
            let mounts = c["volumeMounts"].as_array().unwrap();
            assert!(mounts.iter().any(|m| m["name"] == TOKEN_VOLUME));
        }
        // the sidecar itself gets no token
        assert!(
            env_of(&patched["spec"]["containers"][2])
                .iter()
                .all(|n| !n.starts_with("AWS_"))
        );
    }

    #[test]
    fn skipped_and_preconfigured_containers_are_left_alone() {
        let pod = json!({
            "metadata": { "annotations": { ANNOTATION_SKIP_CONTAINERS: "istio-proxy, debug" } },
            "spec": { "containers": [
                { "name": "istio-proxy" },
                { "name": "debug" },
                { "name": "keys", "env": [{ "name": "AWS_ACCESS_KEY_ID", "value": "AKIA" }] },
                { "name": "irsa", "env": [{ "name": "AWS_WEB_IDENTITY_TOKEN_FILE", "value": "/t" }] },
                { "name": "ecs", "env": [{ "name": ENV_FULL_URI, "value": "http://x/" }] },
                { "name": "app" } ] } });
        let v = view(&pod).unwrap();
        assert_eq!(
            v.eligible
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
            vec!["app"]
        );
        let patched = apply(&pod, &settings(SidecarMode::Container, false, None));
        for i in 0..5 {
            assert_eq!(
                patched["spec"]["containers"][i],
                pod["spec"]["containers"][i]
            );
        }
    }

    #[test]
    fn skips_before_any_lookup() {
        let host = json!({ "spec": { "hostNetwork": true, "containers": [{ "name": "a" }] } });
        assert_eq!(view(&host).unwrap().skip(), Some(Skip::HostNetwork));
        let none = json!({ "metadata": { "annotations": {
            ANNOTATION_SKIP_CONTAINERS: "a" } }, "spec": { "containers": [{ "name": "a" }] } });
        assert_eq!(view(&none).unwrap().skip(), Some(Skip::NoEligibleContainer));
        let ok = json!({ "spec": { "containers": [{ "name": "a" }] } });
        assert_eq!(view(&ok).unwrap().skip(), None);
    }

    #[test]
    fn service_account_defaults_and_deprecated_field() {
        let pod = json!({ "spec": { "containers": [{ "name": "a" }] } });
        assert_eq!(view(&pod).unwrap().service_account, "default");
        let pod = json!({ "spec": { "serviceAccount": "old", "containers": [{ "name": "a" }] } });
        assert_eq!(view(&pod).unwrap().service_account, "old");
        let pod = json!({ "spec": { "serviceAccountName": "new", "serviceAccount": "old",
            "containers": [{ "name": "a" }] } });
        assert_eq!(view(&pod).unwrap().service_account, "new");
    }

    #[test]
    fn unreadable_pods_are_refused() {
        assert!(view(&json!({})).is_err());
        assert!(view(&json!({ "spec": {} })).is_err());
        assert!(view(&json!({ "spec": { "containers": {} } })).is_err());
        assert!(view(&json!({ "spec": { "containers": [{ "image": "x" }] } })).is_err());
    }

    #[test]
    fn a_private_broker_ca_is_handed_to_the_sidecar() {
        let pod = json!({ "spec": { "containers": [{ "name": "a" }] } });
        let mut s = settings(SidecarMode::Container, false, None);
        s.broker_ca_pem =
            Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into());
        let patched = apply(&pod, &s);
        let env = &patched["spec"]["containers"][1]["env"];
        assert_eq!(env[2]["name"], "BROKER_CA_PEM");
        assert!(
            env[2]["value"]
                .as_str()
                .unwrap()
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        // the app container never sees it
        assert!(!env_of(&patched["spec"]["containers"][0]).contains(&"BROKER_CA_PEM".to_owned()));
    }

    #[test]
    fn annotation_keys_with_slashes_are_escaped() {
        let pod = json!({ "metadata": { "annotations": {} }, "spec": { "containers": [{ "name": "a" }] } });
        let v = view(&pod).unwrap();
        let secret = secret_name(HASH);
        let patch = patch(
            &pod,
            &v,
            &settings(SidecarMode::Container, false, None),
            &injection(&secret),
        );
        let text = serde_json::to_string(&patch).unwrap();
        assert!(text.contains("/metadata/annotations/iam-broker.io~1secret-name"));
    }
}
