//! The admission path: AdmissionReview bytes → `review::parse` → `patch::view` and `skip` →
//! `patch::patch`, and the patch applied to the pod as the API server would.

use arbitrary::{Result, Unstructured};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use iam_broker_admission::patch::{
    self, ANNOTATION_SECRET_NAME, ANNOTATION_SKIP_CONTAINERS, ANNOTATION_TOKEN_HASH,
    ENV_AUTHORIZATION_TOKEN, ENV_AUTHORIZATION_TOKEN_FILE, ENV_FULL_URI, InjectSettings, Injection,
    InjectionMode, LABEL_INJECTED, LABEL_INJECTED_VALUE, SIDECAR_NAME, SidecarMode, Skip,
    TOKEN_MOUNT_PATH, TOKEN_VOLUME, Via,
};
use iam_broker_admission::review::{self, AdmissionResponse, Operation};
use serde_json::{Map, Value, json};

use crate::json;

const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const BROKER_URL: &str = "https://broker.example/Prod/";

/// Mount paths that are free.
const MOUNT_PATHS: &[&str] = &["/data", "/cache", "/var/run/secrets/iam-broker/sub"];
/// Mount paths the token's mount would take.
const TOKEN_PATHS: &[&str] = &[TOKEN_MOUNT_PATH, "/var/run/secrets/iam-broker/"];

/// One in `n` (never on exhausted input, which reads as 0).
fn one_in(u: &mut Unstructured<'_>, n: u8) -> Result<bool> {
    Ok(u.int_in_range(0..=n - 1)? == n - 1)
}

/// Keys and strings a pod is made of.
pub const WORDS: &[&str] = &[
    "metadata",
    "spec",
    "annotations",
    "labels",
    "name",
    "generateName",
    "containers",
    "initContainers",
    "volumes",
    "volumeMounts",
    "mountPath",
    "env",
    "value",
    "hostNetwork",
    "serviceAccountName",
    "serviceAccount",
    "restartPolicy",
    "app",
    "web",
    "debug",
    SIDECAR_NAME,
    TOKEN_VOLUME,
    TOKEN_MOUNT_PATH,
    ANNOTATION_SKIP_CONTAINERS,
    ANNOTATION_SECRET_NAME,
    ANNOTATION_TOKEN_HASH,
    LABEL_INJECTED,
    patch::ANNOTATION_INJECTION,
    ENV_FULL_URI,
    ENV_AUTHORIZATION_TOKEN,
    ENV_AUTHORIZATION_TOKEN_FILE,
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "a/b~c",
    "",
];

/// Target: raw AdmissionReview bytes, as the webhook's `POST` receives them.
pub fn review(data: &[u8]) {
    checked_review(data);
}

/// Runs [`review`] and tells whether the review got a patch (for the smoke's coverage check).
pub fn patches(data: &[u8]) -> bool {
    checked_review(data) > 0
}

fn checked_review(data: &[u8]) -> usize {
    let parsed = review::parse(data);
    if serde_json::from_slice::<Value>(data).is_err() {
        assert!(parsed.is_err(), "a body that is not JSON was accepted");
    }
    let review = match parsed {
        Ok(review) => review,
        Err(e) => {
            assert!(!e.0.is_empty(), "a refusal without a reason");
            return 0;
        }
    };
    let request = &review.request;
    assert!(!request.uid.is_empty(), "an empty uid was accepted");
    // The answer echoes the request's uid, in the request's apiVersion.
    let answer = AdmissionResponse::allow(&request.uid).into_review(review.api_version);
    assert_eq!(answer["response"]["uid"], request.uid.as_str());
    assert_eq!(answer["apiVersion"], review.api_version.as_str());
    if request.operation != Operation::Create || !request.is_pod() {
        return 0;
    }
    let mut patches = 0;
    if let Some(pod) = &request.object {
        for settings in settings_all() {
            if let Some(patch) = decide_and_apply(pod, &settings) {
                // The patch the API server gets is base64 of the same JSON patch.
                let response = match AdmissionResponse::patched(&request.uid, &patch) {
                    Ok(response) => response,
                    Err(e) => panic!("a patch that does not serialise: {e}"),
                };
                assert_eq!(response.uid, request.uid);
                let bytes = STANDARD
                    .decode(response.patch.unwrap_or_default())
                    .unwrap_or_default();
                let back: json_patch::Patch = match serde_json::from_slice(&bytes) {
                    Ok(back) => back,
                    Err(e) => panic!("the answered patch does not decode: {e}"),
                };
                assert_eq!(back, patch);
                patches += 1;
            }
        }
    }
    patches
}

/// Target: a pod built from the bytes, with wrong types, `null`s and missing fields at every
/// place the patch touches, and the names the patch adds sometimes already in use.
pub fn pod(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(pod) = arbitrary_pod(&mut u) else {
        return;
    };
    let Ok(settings) = arbitrary_settings(&mut u) else {
        return;
    };
    decide_and_apply(&pod, &settings);
}

/// An AdmissionReview (Pod CREATE) around a pod built from the bytes, for seeds and the smoke.
pub fn arbitrary_review(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let pod = arbitrary_pod(u)?;
    let version = *u.choose(&[review::V1, review::V1BETA1])?;
    let body = json!({ "apiVersion": version, "kind": "AdmissionReview", "request": {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "kind": { "group": "", "version": "v1", "kind": "Pod" },
        "namespace": "team-a", "operation": "CREATE", "object": pod, "dryRun": u.arbitrary::<bool>()? } });
    Ok(serde_json::to_vec(&body).unwrap_or_default())
}

const IMAGE: &str = "registry.example/iam-broker-proxy:1";

fn settings_all() -> [InjectSettings; 3] {
    let base = InjectSettings {
        injection: InjectionMode::Sidecar,
        proxy_image: Some(IMAGE.to_owned()),
        port: 53080,
        mode: SidecarMode::Container,
        token_file: false,
        region: None,
        broker_ca_pem: None,
    };
    [
        base.clone(),
        InjectSettings {
            mode: SidecarMode::Native,
            token_file: true,
            region: Some("eu-west-1".to_owned()),
            ..base.clone()
        },
        InjectSettings {
            injection: InjectionMode::Direct,
            proxy_image: None,
            ..base
        },
    ]
}

fn arbitrary_settings(u: &mut Unstructured<'_>) -> Result<InjectSettings> {
    Ok(InjectSettings {
        injection: if u.arbitrary()? {
            InjectionMode::Direct
        } else {
            InjectionMode::Sidecar
        },
        proxy_image: Some(IMAGE.to_owned()),
        port: u.arbitrary()?,
        mode: if u.arbitrary()? {
            SidecarMode::Native
        } else {
            SidecarMode::Container
        },
        token_file: u.arbitrary()?,
        region: u.arbitrary::<bool>()?.then(|| "eu-west-1".to_owned()),
        broker_ca_pem: None,
    })
}

fn arbitrary_pod(u: &mut Unstructured<'_>) -> Result<Value> {
    let words = WORDS;
    // Half the pods are well typed everywhere (most then reach the patch), half are not.
    let noisy = u.arbitrary::<bool>()?;
    let string_map = |u: &mut Unstructured<'_>| -> Result<Value> {
        let mut map = Map::new();
        for _ in 0..u.int_in_range(0..=3u8)? {
            let key = json::string(u, words)?;
            let value = if u.ratio(1u8, 8u8)? {
                json::any(u, words, 1)?
            } else {
                Value::String(json::string(
                    u,
                    &["app", "app, web", " debug ,istio", "x", "true", "direct"],
                )?)
            };
            map.insert(key, value);
        }
        Ok(Value::Object(map))
    };
    let named = |u: &mut Unstructured<'_>, extra: &[(&str, &[&str])]| -> Result<Value> {
        let mut map = Map::new();
        json::put(
            &mut map,
            "name",
            json::shaped(u, words, noisy, |u| {
                Ok(Value::String(json::string(u, words)?))
            })?,
        );
        for (key, values) in extra {
            json::put(
                &mut map,
                key,
                json::shaped(u, words, noisy, |u| {
                    Ok(Value::String(json::string(u, values)?))
                })?,
            );
        }
        Ok(Value::Object(map))
    };
    let env = |u: &mut Unstructured<'_>| -> Result<Value> {
        Ok(Value::Array(json::list(u, |u| {
            named(u, &[("value", &["v"])])
        })?))
    };
    let mounts = |u: &mut Unstructured<'_>| -> Result<Value> {
        Ok(Value::Array(json::list(u, |u| {
            let paths = if one_in(u, 16)? {
                TOKEN_PATHS
            } else {
                MOUNT_PATHS
            };
            named(u, &[("mountPath", paths)])
        })?))
    };
    let container = |u: &mut Unstructured<'_>| -> Result<Value> {
        let mut c = match named(u, &[])? {
            Value::Object(c) => c,
            _ => Map::new(),
        };
        json::put(&mut c, "env", json::shaped(u, words, noisy, env)?);
        json::put(
            &mut c,
            "volumeMounts",
            json::shaped(u, words, noisy, mounts)?,
        );
        Ok(Value::Object(c))
    };
    let containers = |u: &mut Unstructured<'_>| -> Result<Value> {
        Ok(Value::Array(json::list(u, |u| {
            json::shaped(u, words, noisy, container).map(|c| c.unwrap_or(Value::Null))
        })?))
    };
    let volumes = |u: &mut Unstructured<'_>| -> Result<Value> {
        Ok(Value::Array(json::list(u, |u| named(u, &[]))?))
    };
    let metadata = |u: &mut Unstructured<'_>| -> Result<Value> {
        let mut m = Map::new();
        json::put(&mut m, "name", Some(Value::String(json::string(u, words)?)));
        json::put(
            &mut m,
            "annotations",
            json::shaped(u, words, noisy, string_map)?,
        );
        json::put(&mut m, "labels", json::shaped(u, words, noisy, string_map)?);
        Ok(Value::Object(m))
    };
    let spec = |u: &mut Unstructured<'_>| -> Result<Value> {
        let mut s = Map::new();
        json::put(
            &mut s,
            "containers",
            json::shaped(u, words, noisy, containers)?,
        );
        json::put(
            &mut s,
            "initContainers",
            json::shaped(u, words, noisy, containers)?,
        );
        json::put(&mut s, "volumes", json::shaped(u, words, noisy, volumes)?);
        json::put(
            &mut s,
            "hostNetwork",
            json::shaped(u, words, noisy, |u| Ok(Value::Bool(one_in(u, 8)?)))?,
        );
        Ok(Value::Object(s))
    };
    let mut pod = Map::new();
    json::put(
        &mut pod,
        "metadata",
        json::shaped(u, words, noisy, metadata)?,
    );
    json::put(&mut pod, "spec", json::shaped(u, words, noisy, spec)?);
    Ok(Value::Object(pod))
}

fn names<'a>(list: &'a Value, key: &str) -> Vec<&'a str> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.get(key).and_then(Value::as_str))
        .collect()
}

/// The decision for `pod`; when it is a patch, applies it and checks what it promises. Returns
/// the patch, if any.
pub fn decide_and_apply(pod: &Value, settings: &InjectSettings) -> Option<json_patch::Patch> {
    let view = patch::view(pod).ok()?;
    let direct = settings.injection == InjectionMode::Direct;
    if let Some(skip) = view.skip(settings.injection) {
        // A skip writes nothing; check it is for a reason the pod has.
        match skip {
            Skip::AlreadyInjected => assert!(
                ["initContainers", "containers"]
                    .iter()
                    .any(|l| names(&pod["spec"][l], "name").contains(&SIDECAR_NAME))
                    || pod["metadata"]["labels"][LABEL_INJECTED] == LABEL_INJECTED_VALUE,
                "already injected without a sidecar or the label"
            ),
            Skip::HostNetwork => {
                assert_eq!(pod["spec"]["hostNetwork"], true);
                assert!(!direct, "a direct pod has no loopback port to clash");
            }
            Skip::NoEligibleContainer => assert!(view.eligible.is_empty()),
            Skip::Conflict(_) => assert!(view.conflict.is_some()),
        }
        return None;
    }
    let secret = patch::secret_name(HASH);
    let injection = Injection {
        secret_name: &secret,
        token_hash: HASH,
        broker_url: BROKER_URL,
    };
    let via = if direct {
        Via::Direct
    } else {
        Via::Sidecar { image: IMAGE }
    };
    let patch = patch::patch(pod, &view, settings, &injection, via);
    let mut patched = pod.clone();
    if let Err(e) = json_patch::patch(&mut patched, &patch) {
        panic!(
            "a patch the webhook would answer does not apply: {e}\npod: {pod}\npatch: {}",
            serde_json::to_string(&patch).unwrap_or_default()
        );
    }
    // Annotations for DELETE and the label the DELETE registration selects on.
    assert_eq!(
        patched["metadata"]["annotations"][ANNOTATION_SECRET_NAME],
        secret.as_str()
    );
    assert_eq!(
        patched["metadata"]["annotations"][ANNOTATION_TOKEN_HASH],
        HASH
    );
    assert_eq!(
        patched["metadata"]["labels"][LABEL_INJECTED],
        LABEL_INJECTED_VALUE
    );
    // One sidecar, where the mode puts it; none direct.
    let sidecars: usize = ["initContainers", "containers"]
        .iter()
        .map(|l| {
            names(&patched["spec"][l], "name")
                .iter()
                .filter(|n| **n == SIDECAR_NAME)
                .count()
        })
        .sum();
    assert_eq!(sidecars, usize::from(!direct), "sidecars in {patched}");
    let shift = match settings.mode {
        _ if direct => 0,
        SidecarMode::Native => {
            assert_eq!(patched["spec"]["initContainers"][0]["name"], SIDECAR_NAME);
            1
        }
        SidecarMode::Container => 0,
    };
    for target in &view.eligible {
        let list = match target.list {
            patch::ContainerList::Init => "initContainers",
            patch::ContainerList::Main => "containers",
        };
        let index = target.index + if list == "initContainers" { shift } else { 0 };
        let container = &patched["spec"][list][index];
        assert_eq!(container["name"], target.name.as_str());
        let env = names(&container["env"], "name");
        for name in [ENV_FULL_URI, ENV_AUTHORIZATION_TOKEN] {
            assert_eq!(
                env.iter().filter(|n| **n == name).count(),
                1,
                "{name} in {env:?}"
            );
        }
        // Direct, the SDK calls the broker's https URL itself; else the sidecar on loopback.
        let uri = container["env"]
            .as_array()
            .and_then(|e| e.iter().find(|v| v["name"] == ENV_FULL_URI))
            .map(|v| v["value"].clone());
        if direct {
            assert_eq!(uri, Some(json!(BROKER_URL)));
        } else {
            assert_eq!(
                uri,
                Some(json!(format!("http://127.0.0.1:{}/", settings.port)))
            );
        }
        if settings.token_file {
            assert!(env.contains(&ENV_AUTHORIZATION_TOKEN_FILE));
            assert_eq!(
                names(&container["volumeMounts"], "name")
                    .iter()
                    .filter(|n| **n == TOKEN_VOLUME)
                    .count(),
                1
            );
        }
        if settings.region.is_some() {
            assert!(env.contains(&"AWS_REGION") && env.contains(&"AWS_DEFAULT_REGION"));
        }
    }
    let volumes = names(&patched["spec"]["volumes"], "name");
    let token_volumes = volumes.iter().filter(|n| **n == TOKEN_VOLUME).count();
    assert_eq!(
        token_volumes,
        usize::from(settings.token_file),
        "volumes {volumes:?}"
    );
    // A reinvocation of the webhook on the patched pod changes nothing more.
    for mode in [InjectionMode::Sidecar, InjectionMode::Direct] {
        assert_eq!(
            patch::view(&patched).map(|v| v.skip(mode)),
            Ok(Some(Skip::AlreadyInjected))
        );
    }
    Some(patch)
}
