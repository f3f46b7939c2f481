//! The admission decision: a pod in, a JSON patch out. Pure and synchronous.
//!
//! The patch is computed over the pod's JSON exactly as the API server sent it, so every field the
//! webhook does not own (unknown fields, init containers' `restartPolicy`, …) is kept, and it never
//! `add`s into an array that does not exist (RFC 6902 would reject that).
//!
//! Every patch applies: [`view`] refuses a pod whose shape cannot take one (a `metadata`,
//! `annotations`, `labels`, `env`, `volumeMounts`, `volumes` or `initContainers` of the wrong JSON
//! type), and [`PodView::skip`] skips one the patch would make invalid (the token volume's name or
//! mount path already in use). The webhook calls both before any lookup, so such a pod gets no
//! Secret and no record.

use std::collections::BTreeSet;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use serde_json::{Map, Value, json};

/// Name of the injected sidecar container; its presence (or [`LABEL_INJECTED`]) means "already
/// injected".
pub const SIDECAR_NAME: &str = "iam-broker-proxy";
/// Pod annotation naming the Secret that holds the pod's token (read back on DELETE).
pub const ANNOTATION_SECRET_NAME: &str = "iam-broker.io/secret-name";
/// Pod and Secret annotation holding the token's hash (the Authorizations key; not a secret).
pub const ANNOTATION_TOKEN_HASH: &str = "iam-broker.io/token-hash";
/// Pod annotation listing containers (comma-separated) that must not get credentials.
pub const ANNOTATION_SKIP_CONTAINERS: &str = "eks.amazonaws.com/skip-containers";
/// Pod annotation choosing how this pod reaches the broker, `direct` or `sidecar`; overrides
/// `INJECTION`.
pub const ANNOTATION_INJECTION: &str = "iam-broker.io/injection";
/// Label on every injected pod; the registration sends DELETE only for pods that carry it, and
/// a pod that carries it is not injected again (a `direct`-mode pod has no sidecar to tell).
pub const LABEL_INJECTED: &str = "iam-broker.io/injected";
/// Value of [`LABEL_INJECTED`].
pub const LABEL_INJECTED_VALUE: &str = "true";
/// Label put on every Secret the webhook creates.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of [`LABEL_MANAGED_BY`].
pub const MANAGED_BY: &str = "iam-broker";
pub use iam_broker_kernel::config::{InjectionMode, SidecarMode};
pub use iam_broker_kernel::ports::SECRET_TOKEN_KEY;
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

/// What the webhook injects, from configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectSettings {
    /// How pods reach the broker unless their [`ANNOTATION_INJECTION`] says otherwise.
    pub injection: InjectionMode,
    /// The proxy image (`PROXY_IMAGE`); `None` when not configured: then only `direct` pods can
    /// be injected.
    pub proxy_image: Option<String>,
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
    /// Whether a container or init container is already the sidecar, or the pod carries
    /// [`LABEL_INJECTED`] (reinvocation).
    pub already_injected: bool,
    /// The pod's [`ANNOTATION_INJECTION`], when set: `Ok` with the mode it asks for, `Err` with
    /// the (clipped) value when it is neither `direct` nor `sidecar`.
    pub requested: Option<Result<InjectionMode, String>>,
    /// The pod's [`ANNOTATION_ROLE_ARN`], when set (clipped; a non-string value as its JSON):
    /// in `projected` mode, the role the pod asks for among those its ServiceAccount is allowed.
    pub requested_role: Option<String>,
    /// `spec.hostNetwork`.
    pub host_network: bool,
    /// Containers and init containers that would get credentials, in pod order.
    pub eligible: Vec<ContainerRef>,
    /// A name or path the patch adds that the pod already uses (the token volume, or its mount in
    /// an eligible container): the patched pod would have a duplicate, which the API server
    /// rejects after the Secret and record were written.
    pub conflict: Option<String>,
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
    /// `hostNetwork` pods share the node's loopback: the proxy port would clash across pods
    /// (a `direct` pod has no proxy, and is injected).
    #[error(
        "hostNetwork pods get no sidecar: the proxy's loopback port would clash on the node \
         (annotate the pod iam-broker.io/injection: direct)"
    )]
    HostNetwork,
    /// Every container is skipped by annotation or already has AWS credentials configured.
    #[error(
        "no container needs credentials (skip-containers annotation or AWS credentials already set)"
    )]
    NoEligibleContainer,
    /// The pod already uses a name or path the patch would add (see [`PodView::conflict`]).
    #[error("the pod already uses {0}, which the injection would add")]
    Conflict(String),
}

/// Why the object is not a pod this decision can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a readable Pod: {0}")]
pub struct NotAPod(pub String);

/// Reads the pod's JSON, and refuses it unless every place the patch touches has the type the
/// patch needs: the pod, `metadata`, `metadata.annotations`, `metadata.labels` and `spec.volumes`
/// absent, `null` or of their type, `spec.containers` an array (`spec.initContainers` an array,
/// absent or `null`) of objects with a string `name`, and each eligible container's `env` and
/// `volumeMounts` arrays (or absent or `null`).
pub fn view(pod: &Value) -> Result<PodView, NotAPod> {
    let pod = pod
        .as_object()
        .ok_or_else(|| NotAPod(format!("the object is {}", kind(pod))))?;
    let spec = pod
        .get("spec")
        .and_then(Value::as_object)
        .ok_or_else(|| NotAPod("spec is missing".to_owned()))?;
    let metadata = optional_object(pod, "metadata", "")?;
    let annotations = match metadata {
        Some(m) => optional_object(m, "annotations", "metadata.")?,
        None => None,
    };
    let labels = match metadata {
        Some(m) => optional_object(m, "labels", "metadata.")?,
        None => None,
    };
    let labelled = labels
        .and_then(|l| l.get(LABEL_INJECTED))
        .and_then(Value::as_str)
        == Some(LABEL_INJECTED_VALUE);
    let requested = annotations
        .and_then(|a| a.get(ANNOTATION_INJECTION))
        .map(|v| {
            let text = v.as_str().unwrap_or_default();
            InjectionMode::parse(text).ok_or_else(|| {
                iam_broker_kernel::text::clip(&v.to_string(), iam_broker_kernel::text::MAX_ECHO)
            })
        });
    let requested_role = annotations
        .and_then(|a| a.get(ANNOTATION_ROLE_ARN))
        .map(|v| {
            let text = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
            iam_broker_kernel::text::clip(&text, iam_broker_kernel::text::MAX_ECHO)
        });
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

    if spec.get("containers").is_none_or(Value::is_null) {
        return Err(NotAPod("spec.containers is missing".to_owned()));
    }
    let volumes = optional_array(spec, "volumes", "spec.")?;
    let mut conflict = volumes
        .into_iter()
        .flatten()
        .any(|v| v.get("name").and_then(Value::as_str) == Some(TOKEN_VOLUME))
        .then(|| format!("a volume named {TOKEN_VOLUME}"));
    let mut already_injected = labelled;
    let mut eligible = Vec::new();
    for list in [ContainerList::Init, ContainerList::Main] {
        let field = list.field();
        let Some(containers) = optional_array(spec, field, "spec.")? else {
            continue;
        };
        for (index, container) in containers.iter().enumerate() {
            let name = container
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| NotAPod(format!("spec.{field}[{index}] has no name")))?;
            if name == SIDECAR_NAME {
                already_injected = true;
                continue;
            }
            if skip.contains(name) || has_preset_credentials(container) {
                continue;
            }
            // Only objects have a `name`, so `container` is one.
            let container = container
                .as_object()
                .ok_or_else(|| NotAPod(format!("spec.{field}[{index}] is not an object")))?;
            // Messages name the place, never the pod's own (user-controlled) values.
            let path = format!("spec.{field}[{index}].");
            optional_array(container, "env", &path)?;
            let mounts = optional_array(container, "volumeMounts", &path)?;
            let taken = mounts.into_iter().flatten().find_map(|m| {
                if m.get("name").and_then(Value::as_str) == Some(TOKEN_VOLUME) {
                    Some(format!(
                        "a volume mount named {TOKEN_VOLUME} in {path}volumeMounts"
                    ))
                } else if m
                    .get("mountPath")
                    .and_then(Value::as_str)
                    .is_some_and(|p| p.trim_end_matches('/') == TOKEN_MOUNT_PATH)
                {
                    Some(format!(
                        "the mount path {TOKEN_MOUNT_PATH} in {path}volumeMounts"
                    ))
                } else {
                    None
                }
            });
            conflict = conflict.or(taken);
            eligible.push(ContainerRef {
                list,
                index,
                name: name.to_owned(),
            });
        }
    }
    Ok(PodView {
        service_account,
        name,
        already_injected,
        requested,
        requested_role,
        host_network: spec.get("hostNetwork").and_then(Value::as_bool) == Some(true),
        eligible,
        conflict,
    })
}

/// The JSON type of `value`, for messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `parent[field]` when it is an object; `None` when it is absent or `null` (the patch then adds
/// it whole); refused when it is of another type (the patch could not add into it).
fn optional_object<'a>(
    parent: &'a Map<String, Value>,
    field: &str,
    path: &str,
) -> Result<Option<&'a Map<String, Value>>, NotAPod> {
    match parent.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map)),
        Some(other) => Err(NotAPod(format!(
            "{path}{field} is {}, not an object",
            kind(other)
        ))),
    }
}

/// `parent[field]` when it is an array; `None` when it is absent or `null`; refused when it is of
/// another type (the patch would replace it, dropping what the pod had).
fn optional_array<'a>(
    parent: &'a Map<String, Value>,
    field: &str,
    path: &str,
) -> Result<Option<&'a Vec<Value>>, NotAPod> {
    match parent.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => Ok(Some(items)),
        Some(other) => Err(NotAPod(format!(
            "{path}{field} is {}, not an array",
            kind(other)
        ))),
    }
}

impl PodView {
    /// Whether the pod is out of scope before any lookup when injected `via`: already
    /// injected, `hostNetwork` (with a sidecar), nothing to inject into, or a name the injection
    /// adds already in use.
    pub fn skip(&self, via: InjectionMode) -> Option<Skip> {
        if self.already_injected {
            Some(Skip::AlreadyInjected)
        } else if self.host_network && via == InjectionMode::Sidecar {
            Some(Skip::HostNetwork)
        } else if self.eligible.is_empty() {
            Some(Skip::NoEligibleContainer)
        } else {
            self.conflict.clone().map(Skip::Conflict)
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
    /// The broker URL the sidecar (or, `direct`, the SDK) calls.
    pub broker_url: &'a str,
}

/// How the patched pod's SDKs reach the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via<'a> {
    /// Through the sidecar of this image, on `http://127.0.0.1:<port>/`.
    Sidecar {
        /// The proxy image.
        image: &'a str,
    },
    /// Straight to the broker's https URL: no sidecar.
    Direct,
}

/// What the patch points a `projected`-mode pod at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectedInjection<'a> {
    /// `audience` of the projected ServiceAccount token.
    pub audience: &'a str,
    /// `expirationSeconds` of the token (kubelet rewrites the file at 80 % of it).
    pub expiration_seconds: u64,
    /// The role the ServiceAccount's annotation names: sent as `?role=` by the sidecar.
    pub role_arn: &'a str,
    /// The broker URL the sidecar (or, `direct`, the SDK) calls (without the role).
    pub broker_url: &'a str,
}

/// Pod annotation naming the role of a `projected`-mode pod. Set by the pod's author, it chooses
/// among the roles the ServiceAccount is allowed; the webhook writes (or keeps) it with the role
/// it gave (for people; the credentials URL's `?role=` carries it to the broker).
pub const ANNOTATION_ROLE_ARN: &str = "iam-broker.io/role-arn";

/// How a pod's containers get their credential.
enum Credential<'a> {
    /// An `iamb_` token in a Secret: env from the Secret (and optionally its file).
    Secret(&'a Injection<'a>),
    /// A projected ServiceAccount token file.
    Projected(&'a ProjectedInjection<'a>),
}

/// The JSON patch that injects the environment, the annotations and (`via` a sidecar) the
/// sidecar into `pod`. `direct`, each eligible container's `AWS_CONTAINER_CREDENTIALS_FULL_URI`
/// is the broker's URL itself and no container is added.
///
/// `view` must be [`view`]`(pod)`, and [`PodView::skip`]`(via)` `None`: then the patch applies
/// to `pod`. Operations touch only what the webhook owns; arrays and maps are created whole when
/// missing (or `null`) and appended to otherwise.
pub fn patch(
    pod: &Value,
    view: &PodView,
    settings: &InjectSettings,
    injection: &Injection<'_>,
    via: Via<'_>,
) -> Patch {
    build(pod, view, settings, &Credential::Secret(injection), via)
}

/// The patch of `projected` mode: a projected ServiceAccount token volume (audience and
/// expiration from `injection`) mounted into every eligible container, with
/// `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` pointing at it and the credentials URI at the
/// sidecar, which calls the broker with `?role=` (or, `direct`, at the broker's URL with
/// `?role=`). No Secret is referenced. Same preconditions and guarantees as [`patch`].
pub fn patch_projected(
    pod: &Value,
    view: &PodView,
    settings: &InjectSettings,
    injection: &ProjectedInjection<'_>,
    via: Via<'_>,
) -> Patch {
    build(pod, view, settings, &Credential::Projected(injection), via)
}

/// `broker_url` with `?role=<role ARN>` (or `&role=`), the ARN percent-encoded.
pub fn broker_url_with_role(broker_url: &str, role_arn: &str) -> String {
    let mut encoded = String::with_capacity(role_arn.len());
    for byte in role_arn.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~:/@,".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    let separator = if broker_url.contains('?') { '&' } else { '?' };
    format!("{broker_url}{separator}role={encoded}")
}

fn build(
    pod: &Value,
    view: &PodView,
    settings: &InjectSettings,
    credential: &Credential<'_>,
    via: Via<'_>,
) -> Patch {
    let mut ops = Vec::new();

    // Annotations for DELETE (Secret mode) or for people (projected mode), and the label that
    // selects the pod for the DELETE webhook (the registration's objectSelector), so pods that
    // never had credentials cost no call.
    let annotations: Vec<(&str, &str)> = match credential {
        Credential::Secret(injection) => vec![
            (ANNOTATION_SECRET_NAME, injection.secret_name),
            (ANNOTATION_TOKEN_HASH, injection.token_hash),
        ],
        Credential::Projected(injection) => vec![(ANNOTATION_ROLE_ARN, injection.role_arn)],
    };
    let labels = [(LABEL_INJECTED, LABEL_INJECTED_VALUE)];
    let map = |entries: &[(&str, &str)]| {
        Value::Object(Map::from_iter(
            entries.iter().map(|(k, v)| ((*k).to_owned(), json!(v))),
        ))
    };
    match pod.get("metadata").filter(|m| !m.is_null()) {
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

    let token_file = settings.token_file || matches!(credential, Credential::Projected(_));
    let broker_url = match credential {
        Credential::Secret(injection) => injection.broker_url.to_owned(),
        Credential::Projected(injection) => {
            broker_url_with_role(injection.broker_url, injection.role_arn)
        }
    };
    let full_uri = match via {
        Via::Sidecar { .. } => format!("http://127.0.0.1:{}/", settings.port),
        Via::Direct => broker_url.clone(),
    };
    let mount_file = format!("{TOKEN_MOUNT_PATH}/{SECRET_TOKEN_KEY}");
    for target in &view.eligible {
        let container = &pod["spec"][target.list.field()][target.index];
        let existing = env_names(container);
        let mut env = vec![json!({ "name": ENV_FULL_URI, "value": full_uri })];
        if let Credential::Secret(injection) = credential {
            env.push(
                json!({ "name": ENV_AUTHORIZATION_TOKEN, "valueFrom": { "secretKeyRef": {
                "name": injection.secret_name, "key": SECRET_TOKEN_KEY } } }),
            );
        }
        if token_file {
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
        if token_file {
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

    if token_file {
        let volume = match credential {
            Credential::Secret(injection) => json!({ "name": TOKEN_VOLUME, "secret": {
                "secretName": injection.secret_name,
                "items": [{ "key": SECRET_TOKEN_KEY, "path": SECRET_TOKEN_KEY }],
            } }),
            Credential::Projected(injection) => json!({ "name": TOKEN_VOLUME, "projected": {
                "sources": [{ "serviceAccountToken": {
                    "audience": injection.audience,
                    "expirationSeconds": injection.expiration_seconds,
                    "path": SECRET_TOKEN_KEY,
                } }],
            } }),
        };
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
    let Via::Sidecar { image } = via else {
        return Patch(ops);
    };
    let sidecar = sidecar(settings, image, &broker_url);
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
pub fn sidecar(settings: &InjectSettings, image: &str, broker_url: &str) -> Value {
    let mut env = vec![
        json!({ "name": "BROKER_URL", "value": broker_url }),
        json!({ "name": "LISTEN_ADDR", "value": format!("127.0.0.1:{}", settings.port) }),
    ];
    if let Some(pem) = &settings.broker_ca_pem {
        env.push(json!({ "name": "BROKER_CA_PEM", "value": pem }));
    }
    json!({
        "name": SIDECAR_NAME,
        "image": image,
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

    fn settings(mode: SidecarMode, token_file: bool, region: Option<&str>) -> InjectSettings {
        InjectSettings {
            injection: InjectionMode::Sidecar,
            proxy_image: Some("registry.example/iam-broker-proxy:1".to_owned()),
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

    const IMAGE: Via<'static> = Via::Sidecar {
        image: "registry.example/iam-broker-proxy:1",
    };

    fn apply(pod: &Value, settings: &InjectSettings) -> Value {
        let view = view(pod).unwrap();
        let secret = secret_name(HASH);
        let patch = patch(pod, &view, settings, &injection(&secret), IMAGE);
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
        assert_eq!(
            view(&patched).unwrap().skip(InjectionMode::Sidecar),
            Some(Skip::AlreadyInjected)
        );
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
        assert_eq!(
            view(&host).unwrap().skip(InjectionMode::Sidecar),
            Some(Skip::HostNetwork)
        );
        let none = json!({ "metadata": { "annotations": {
            ANNOTATION_SKIP_CONTAINERS: "a" } }, "spec": { "containers": [{ "name": "a" }] } });
        assert_eq!(
            view(&none).unwrap().skip(InjectionMode::Sidecar),
            Some(Skip::NoEligibleContainer)
        );
        let ok = json!({ "spec": { "containers": [{ "name": "a" }] } });
        assert_eq!(view(&ok).unwrap().skip(InjectionMode::Sidecar), None);
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
    fn a_pod_whose_annotations_are_not_an_object_is_skipped_before_any_write() {
        // GIVEN forged pods whose metadata.annotations is a string, an array, a number, a bool
        for annotations in [json!("x"), json!(["a", "b"]), json!(3), json!(true)] {
            let pod = json!({ "metadata": { "name": "p", "annotations": annotations },
                "spec": { "containers": [{ "name": "app" }] } });
            // WHEN the webhook decides (view, then skip, before any lookup or write)
            let decision = view(&pod).map(|v| v.skip(InjectionMode::Sidecar));
            // THEN it is refused or skipped, so no Secret and no record are written for a patch
            // that the API server could not apply
            assert!(
                matches!(decision, Err(_) | Ok(Some(_))),
                "annotations = {annotations}: decision {decision:?} would write a Secret"
            );
        }
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
            IMAGE,
        );
        let text = serde_json::to_string(&patch).unwrap();
        assert!(text.contains("/metadata/annotations/iam-broker.io~1secret-name"));
    }
}

/// Property: over generated pods (valid ones, and ones with wrong-typed, missing or `null` fields
/// at every place the patch touches, and names the patch adds already in use), the decision is
/// either "skip" (nothing written) for a reason the pod really has, or a patch that applies and
/// delivers everything it promises.
#[cfg(test)]
mod properties {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use proptest::prelude::*;
    use proptest::sample::select;

    use super::*;

    const SECRET: &str = "iam-broker-token-0123456789abcdef";
    const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const URL: &str = "https://broker.example/Prod/";

    /// A field: absent (`None`), `null`, `valid`, or (when `noisy`) a value of every other JSON
    /// type; the flag tells whether the choice is of the wrong type for a field of kind `object`
    /// or array. Half the pods are not noisy, so that many reach the patch.
    fn field(
        valid: BoxedStrategy<Value>,
        object: bool,
        noisy: bool,
    ) -> BoxedStrategy<(Option<Value>, bool)> {
        let wrong_other = if object {
            json!([1])
        } else {
            json!({ "k": "v" })
        };
        prop_oneof![
            2 => Just((None, false)),
            1 => Just((Some(Value::Null), false)),
            6 => valid.prop_map(|v| (Some(v), false)),
            u32::from(noisy) => select(vec![json!("x"), json!(3), json!(true), wrong_other])
                .prop_map(|v| (Some(v), true)),
        ]
        .boxed()
    }

    fn insert(object: &mut Map<String, Value>, key: &str, value: Option<Value>) {
        if let Some(value) = value {
            object.insert(key.to_owned(), value);
        }
    }

    fn env_entry() -> BoxedStrategy<Value> {
        prop_oneof![
            8 => select(vec![
                "X", "PATH", "AWS_REGION", "AWS_DEFAULT_REGION", ENV_FULL_URI,
                ENV_AUTHORIZATION_TOKEN, "AWS_ACCESS_KEY_ID", "AWS_WEB_IDENTITY_TOKEN_FILE",
            ])
            .prop_map(|name| json!({ "name": name, "value": "v" })),
            1 => Just(json!("not an env entry")),
            1 => Just(json!({ "name": 7 })),
        ]
        .boxed()
    }

    /// Mostly `usual`, sometimes `taken` (a name or path the patch adds).
    fn mostly(usual: Vec<&'static str>, taken: Vec<&'static str>) -> BoxedStrategy<&'static str> {
        prop_oneof![12 => select(usual), 1 => select(taken)].boxed()
    }

    fn mount() -> BoxedStrategy<Value> {
        (
            mostly(vec!["data", "cache"], vec![TOKEN_VOLUME]),
            mostly(
                vec!["/data", "/cache", "/var/run/secrets/iam-broker/sub"],
                vec![TOKEN_MOUNT_PATH, "/var/run/secrets/iam-broker/"],
            ),
        )
            .prop_map(|(name, path)| json!({ "name": name, "mountPath": path }))
            .boxed()
    }

    /// A container, and whether a field of it has the wrong type.
    fn container(noisy: bool) -> BoxedStrategy<(Value, bool)> {
        let noise = u32::from(noisy);
        let name = prop_oneof![
            20 => select(vec!["app", "web", "debug", "istio-proxy"]).prop_map(|n| Some(json!(n))),
            1 => Just(Some(json!(SIDECAR_NAME))),
            noise => Just(None),
            noise => Just(Some(json!(42))),
        ];
        let env = prop::collection::vec(env_entry(), 0..4)
            .prop_map(Value::Array)
            .boxed();
        let env = field(env, false, noisy);
        let mounts = prop::collection::vec(mount(), 0..3)
            .prop_map(Value::Array)
            .boxed();
        let mounts = field(mounts, false, noisy);
        prop_oneof![
            20 => (name, env, mounts).prop_map(|(name, (env, bad_env), (mounts, bad_mounts))| {
                let mut c = Map::new();
                insert(&mut c, "name", name);
                c.insert("image".to_owned(), json!("img:1"));
                insert(&mut c, "env", env);
                insert(&mut c, "volumeMounts", mounts);
                (Value::Object(c), bad_env || bad_mounts)
            }),
            noise => Just((json!("not a container"), false)),
        ]
        .boxed()
    }

    /// A list of containers, and whether any of them has a wrong-typed field.
    fn containers(max: usize, noisy: bool) -> BoxedStrategy<(Value, bool)> {
        prop::collection::vec(container(noisy), 0..max)
            .prop_map(|cs| {
                let bad = cs.iter().any(|(_, bad)| *bad);
                (Value::Array(cs.into_iter().map(|(c, _)| c).collect()), bad)
            })
            .boxed()
    }

    /// A generated pod, with what the generator knows about it.
    #[derive(Debug, Clone)]
    struct Generated {
        pod: Value,
        /// A place the patch touches outside the containers has the wrong type.
        wrong_outside_containers: bool,
    }

    fn pod() -> impl Strategy<Value = Generated> {
        prop::bool::ANY.prop_flat_map(pod_with)
    }

    fn pod_with(noisy: bool) -> impl Strategy<Value = Generated> {
        let noise = u32::from(noisy);
        let annotations = prop::collection::btree_map(
            select(vec![
                ANNOTATION_SKIP_CONTAINERS,
                ANNOTATION_SECRET_NAME,
                ANNOTATION_INJECTION,
                "a/b",
                "note",
            ]),
            prop_oneof![
                select(vec![
                    "app",
                    "app,web",
                    " debug , istio-proxy",
                    "",
                    "old",
                    "direct"
                ])
                .prop_map(|s| json!(s)),
                Just(json!(1)),
            ],
            0..3,
        )
        .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
        .boxed();
        let labels = prop::collection::btree_map(
            select(vec![LABEL_INJECTED, "app"]),
            select(vec!["false", "web", "true"]).prop_map(|s| json!(s)),
            0..2,
        )
        .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
        .boxed();
        let metadata = (
            field(annotations, true, noisy),
            field(labels, true, noisy),
            prop::option::of(select(vec!["p", "web-"])),
        )
            .prop_map(|((a, bad_a), (l, bad_l), name)| {
                let mut m = Map::new();
                insert(&mut m, "name", name.map(|n| json!(n)));
                insert(&mut m, "annotations", a);
                insert(&mut m, "labels", l);
                (Value::Object(m), bad_a || bad_l)
            })
            .boxed();
        let metadata = prop_oneof![
            2 => Just((None, false)),
            1 => Just((Some(Value::Null), false)),
            8 => metadata.prop_map(|(m, bad)| (Some(m), bad)),
            noise => select(vec![json!("x"), json!(3), json!([])]).prop_map(|v| (Some(v), true)),
        ];
        let volume = mostly(vec!["data", "cache"], vec![TOKEN_VOLUME])
            .prop_map(|n| json!({ "name": n, "emptyDir": {} }));
        let volumes = prop::collection::vec(volume, 0..3)
            .prop_map(Value::Array)
            .boxed();
        let volumes = field(volumes, false, noisy);
        // Containers: mostly a valid array; sometimes wrong, absent or null (refused either way).
        let main = prop_oneof![
            12 => containers(4, noisy).prop_map(|(c, bad)| (Some(c), bad, false)),
            noise => Just((None, false, false)),
            noise => Just((Some(Value::Null), false, false)),
            noise => select(vec![json!("x"), json!({ "name": "app" })])
                .prop_map(|v| (Some(v), false, true)),
        ];
        let init = field(
            containers(3, noisy).prop_map(|(c, _)| c).boxed(),
            false,
            noisy,
        );
        let host = select(vec![
            None,
            None,
            None,
            Some(json!(true)),
            Some(json!(false)),
            Some(json!("true")),
        ]);
        let shapes = if noisy { 0..20u8 } else { 2..20u8 };
        (metadata, volumes, main, init, host, shapes).prop_map(
            |(
                (metadata, bad_meta),
                (volumes, bad_vol),
                (main, _, bad_main),
                (init, bad_init),
                host,
                shape,
            )| {
                let mut spec = Map::new();
                insert(&mut spec, "containers", main);
                insert(&mut spec, "initContainers", init);
                insert(&mut spec, "volumes", volumes);
                insert(&mut spec, "hostNetwork", host);
                spec.insert("futureField".to_owned(), json!({ "x": 1 }));
                let mut pod = Map::new();
                insert(&mut pod, "metadata", metadata);
                pod.insert("spec".to_owned(), Value::Object(spec));
                let pod = match shape {
                    0 => json!(["not", "a", "pod"]),
                    1 => json!({ "metadata": {}, "spec": "x" }),
                    _ => Value::Object(pod),
                };
                Generated {
                    pod,
                    wrong_outside_containers: bad_meta || bad_vol || bad_main || bad_init,
                }
            },
        )
    }

    const IMAGE: &str = "registry.example/iam-broker-proxy:1";

    fn settings() -> impl Strategy<Value = InjectSettings> {
        (
            prop::bool::ANY,
            prop::bool::ANY,
            prop::option::of(select(vec!["eu-west-1", "us-east-1"])),
            prop::bool::ANY,
        )
            .prop_map(|(native, token_file, region, direct)| InjectSettings {
                injection: if direct {
                    InjectionMode::Direct
                } else {
                    InjectionMode::Sidecar
                },
                proxy_image: Some("registry.example/iam-broker-proxy:1".to_owned()),
                port: 53080,
                mode: if native {
                    SidecarMode::Native
                } else {
                    SidecarMode::Container
                },
                token_file,
                region: region.map(str::to_owned),
                broker_ca_pem: None,
            })
    }

    fn names(list: &Value, key: &str) -> Vec<String> {
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e.get(key).and_then(Value::as_str).map(str::to_owned))
            .collect()
    }

    /// Whether the pod's containers include the sidecar (either list).
    fn carries_sidecar(pod: &Value) -> bool {
        ["initContainers", "containers"].iter().any(|list| {
            names(&pod["spec"][list], "name")
                .iter()
                .any(|n| n == SIDECAR_NAME)
        })
    }

    /// How `s` injects.
    fn via(s: &InjectSettings) -> Via<'_> {
        match s.injection {
            InjectionMode::Sidecar => Via::Sidecar {
                image: s.proxy_image.as_deref().unwrap_or(IMAGE),
            },
            InjectionMode::Direct => Via::Direct,
        }
    }

    /// Checks everything the patch promises on the patched pod.
    fn check_patched(pod: &Value, view: &PodView, s: &InjectSettings, patched: &Value) {
        let annotations = &patched["metadata"]["annotations"];
        assert_eq!(annotations[ANNOTATION_SECRET_NAME], SECRET);
        assert_eq!(annotations[ANNOTATION_TOKEN_HASH], HASH);
        assert_eq!(
            patched["metadata"]["labels"][LABEL_INJECTED],
            LABEL_INJECTED_VALUE
        );
        // Annotations and labels the pod had are kept (ours overwrite theirs).
        for field in ["annotations", "labels"] {
            if let Some(before) = pod["metadata"][field].as_object() {
                for (key, value) in before {
                    if key != ANNOTATION_SECRET_NAME && key != LABEL_INJECTED {
                        assert_eq!(&patched["metadata"][field][key], value, "{field}.{key}");
                    }
                }
            }
        }
        // The sidecar, exactly once, where the mode puts it; none at all `direct`.
        let image = s.proxy_image.as_deref().unwrap_or(IMAGE);
        let mut expected = sidecar(s, image, URL);
        let direct = s.injection == InjectionMode::Direct;
        let shift = match s.mode {
            _ if direct => 0,
            SidecarMode::Container => {
                let last = patched["spec"]["containers"]
                    .as_array()
                    .unwrap()
                    .last()
                    .unwrap();
                assert_eq!(last, &expected);
                0
            }
            SidecarMode::Native => {
                expected["restartPolicy"] = json!("Always");
                assert_eq!(patched["spec"]["initContainers"][0], expected);
                1
            }
        };
        let count: usize = ["initContainers", "containers"]
            .iter()
            .map(|l| {
                names(&patched["spec"][l], "name")
                    .iter()
                    .filter(|n| *n == SIDECAR_NAME)
                    .count()
            })
            .sum();
        assert_eq!(count, usize::from(!direct), "one sidecar, or none direct");
        // Every eligible container has the variables (once each) and, with a token file, the mount.
        for target in &view.eligible {
            let shift = if target.list == ContainerList::Init {
                shift
            } else {
                0
            };
            let before = &pod["spec"][target.list.field()][target.index];
            let after = &patched["spec"][target.list.field()][target.index + shift];
            assert_eq!(after["name"], before["name"]);
            let env = names(&after["env"], "name");
            let mut wanted = vec![ENV_FULL_URI, ENV_AUTHORIZATION_TOKEN];
            if s.token_file {
                wanted.push(ENV_AUTHORIZATION_TOKEN_FILE);
            }
            if s.region.is_some() {
                wanted.extend(["AWS_REGION", "AWS_DEFAULT_REGION"]);
            }
            for name in wanted {
                assert!(env.iter().any(|n| n == name), "{name} in {env:?}");
            }
            for name in [
                ENV_FULL_URI,
                ENV_AUTHORIZATION_TOKEN,
                ENV_AUTHORIZATION_TOKEN_FILE,
            ] {
                assert!(
                    env.iter().filter(|n| *n == name).count() <= 1,
                    "{name} twice"
                );
            }
            let value = |name: &str| {
                after["env"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|e| e["name"] == name)
                    .unwrap()
                    .clone()
            };
            assert_eq!(
                value(ENV_AUTHORIZATION_TOKEN)["valueFrom"]["secretKeyRef"]["name"],
                SECRET
            );
            // Direct, the SDK calls the broker's https URL; else the sidecar on loopback.
            let uri = value(ENV_FULL_URI)["value"].as_str().unwrap().to_owned();
            if direct {
                assert_eq!(uri, URL);
            } else {
                assert_eq!(uri, format!("http://127.0.0.1:{}/", s.port));
            }
            // What the container had is kept, in front.
            if let Some(had) = before["env"].as_array() {
                assert_eq!(&after["env"].as_array().unwrap()[..had.len()], &had[..]);
            }
            let mounts = names(&after["volumeMounts"], "name");
            let ours = mounts.iter().filter(|n| *n == TOKEN_VOLUME).count();
            assert_eq!(
                ours,
                usize::from(s.token_file),
                "token mounts in {mounts:?}"
            );
        }
        let volumes = names(&patched["spec"]["volumes"], "name");
        let ours = volumes.iter().filter(|n| *n == TOKEN_VOLUME).count();
        assert_eq!(
            ours,
            usize::from(s.token_file),
            "token volumes in {volumes:?}"
        );
        // Unknown fields are kept, and the patched pod reads as already injected.
        assert_eq!(patched["spec"]["futureField"], pod["spec"]["futureField"]);
        for mode in [InjectionMode::Sidecar, InjectionMode::Direct] {
            assert_eq!(
                super::view(patched).map(|v| v.skip(mode)),
                Ok(Some(Skip::AlreadyInjected))
            );
        }
    }

    fn view_skip(pod: &Value) -> Result<Option<Skip>, NotAPod> {
        view(pod).map(|v| v.skip(InjectionMode::Sidecar))
    }

    /// The skip is for a reason the pod really has.
    fn check_skip(pod: &Value, view: &PodView, skip: &Skip, mode: InjectionMode) {
        match skip {
            Skip::AlreadyInjected => assert!(
                carries_sidecar(pod)
                    || pod["metadata"]["labels"][LABEL_INJECTED] == LABEL_INJECTED_VALUE
            ),
            Skip::HostNetwork => {
                assert_eq!(pod["spec"]["hostNetwork"], true);
                assert_eq!(
                    mode,
                    InjectionMode::Sidecar,
                    "a direct pod needs no loopback port"
                );
            }
            Skip::NoEligibleContainer => assert!(view.eligible.is_empty()),
            Skip::Conflict(_) => {
                let volume = names(&pod["spec"]["volumes"], "name")
                    .iter()
                    .any(|n| n == TOKEN_VOLUME);
                let mount = view.eligible.iter().any(|t| {
                    let c = &pod["spec"][t.list.field()][t.index];
                    names(&c["volumeMounts"], "name")
                        .iter()
                        .any(|n| n == TOKEN_VOLUME)
                        || names(&c["volumeMounts"], "mountPath")
                            .iter()
                            .any(|p| p.trim_end_matches('/') == TOKEN_MOUNT_PATH)
                });
                assert!(volume || mount, "conflict without a conflicting name");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        #[test]
        fn every_patch_applies_and_every_skip_writes_nothing(generated in pod(), s in settings()) {
            let pod = &generated.pod;
            match view(pod) {
                // Refused: the webhook answers without any lookup or write.
                Err(_) => {}
                Ok(v) => {
                    prop_assert!(
                        !generated.wrong_outside_containers,
                        "a wrong-typed metadata/annotations/labels/volumes/containers was accepted"
                    );
                    match v.skip(s.injection) {
                        Some(skip) => check_skip(pod, &v, &skip, s.injection),
                        None => {
                            let p = patch(pod, &v, &s, &Injection {
                                secret_name: SECRET, token_hash: HASH, broker_url: URL,
                            }, via(&s));
                            let mut patched = pod.clone();
                            let applied = json_patch::patch(&mut patched, &p);
                            prop_assert!(applied.is_ok(), "{applied:?}\npod {pod}\npatch {}",
                                serde_json::to_string(&p).unwrap());
                            check_patched(pod, &v, &s, &patched);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn each_wrong_type_at_a_patched_place_is_refused() {
        // One valid pod, then each place the patch touches set to each wrong type in turn.
        let valid = json!({ "metadata": { "annotations": {}, "labels": {} }, "spec": {
            "volumes": [], "initContainers": [],
            "containers": [{ "name": "app", "env": [], "volumeMounts": [] }] } });
        assert_eq!(view_skip(&valid), Ok(None));
        let places: [(&str, &[&str]); 8] = [
            ("object", &["metadata"]),
            ("object", &["metadata", "annotations"]),
            ("object", &["metadata", "labels"]),
            ("array", &["spec", "volumes"]),
            ("array", &["spec", "initContainers"]),
            ("array", &["spec", "containers"]),
            ("array", &["spec", "containers", "0", "env"]),
            ("array", &["spec", "containers", "0", "volumeMounts"]),
        ];
        for (kind, path) in places {
            let wrong: &[Value] = if kind == "object" {
                &[json!("x"), json!(["a"]), json!(3), json!(false)]
            } else {
                &[json!("x"), json!({ "a": 1 }), json!(3), json!(false)]
            };
            for value in wrong {
                let mut pod = valid.clone();
                *pod.pointer_mut(&format!("/{}", path.join("/"))).unwrap() = value.clone();
                assert!(view(&pod).is_err(), "{path:?} = {value} was accepted");
            }
        }
    }

    #[test]
    fn a_null_metadata_annotations_labels_or_list_is_created_whole() {
        for s in [InjectSettings {
            injection: InjectionMode::Sidecar,
            proxy_image: Some("i".to_owned()),
            port: 1,
            mode: SidecarMode::Native,
            token_file: true,
            region: None,
            broker_ca_pem: None,
        }] {
            for pod in [
                json!({ "metadata": null, "spec": { "containers": [{ "name": "a" }] } }),
                json!({ "metadata": { "annotations": null, "labels": null }, "spec": {
                    "volumes": null, "initContainers": null,
                    "containers": [{ "name": "a", "env": null, "volumeMounts": null }] } }),
            ] {
                let v = view(&pod).unwrap();
                assert_eq!(v.skip(s.injection), None);
                let p = patch(
                    &pod,
                    &v,
                    &s,
                    &Injection {
                        secret_name: SECRET,
                        token_hash: HASH,
                        broker_url: URL,
                    },
                    via(&s),
                );
                let mut patched = pod.clone();
                json_patch::patch(&mut patched, &p).unwrap();
                check_patched(&pod, &v, &s, &patched);
            }
        }
    }

    #[test]
    fn the_token_volume_name_or_mount_path_in_use_is_a_skip() {
        for pod in [
            json!({ "spec": { "volumes": [{ "name": TOKEN_VOLUME }],
                "containers": [{ "name": "a" }] } }),
            json!({ "spec": { "containers": [{ "name": "a", "volumeMounts": [
                { "name": "x", "mountPath": TOKEN_MOUNT_PATH }] }] } }),
            json!({ "spec": { "containers": [{ "name": "a", "volumeMounts": [
                { "name": TOKEN_VOLUME, "mountPath": "/t" }] }] } }),
        ] {
            assert!(
                matches!(view_skip(&pod), Ok(Some(Skip::Conflict(_)))),
                "{pod}"
            );
        }
        // The reason names the place, not the pod's (user-controlled) names.
        let long = "x".repeat(100_000);
        let pod = json!({ "spec": { "containers": [{ "name": long, "volumeMounts": [
            { "name": "y", "mountPath": TOKEN_MOUNT_PATH }] }] } });
        let reason = view_skip(&pod).unwrap().unwrap().to_string();
        assert!(reason.len() < 200, "{} bytes", reason.len());
    }

    #[test]
    fn the_role_rides_in_the_broker_url_percent_encoded() {
        assert_eq!(
            broker_url_with_role(
                "https://x.example/Prod/",
                "arn:aws:iam::123456789012:role/a+b=c,d@e_f"
            ),
            "https://x.example/Prod/?role=arn:aws:iam::123456789012:role/a%2Bb%3Dc,d@e_f"
        );
        assert_eq!(
            broker_url_with_role("https://x/?v=1", "arn:aws:iam::123456789012:role/r"),
            "https://x/?v=1&role=arn:aws:iam::123456789012:role/r"
        );
    }
}
