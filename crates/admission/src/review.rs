//! The AdmissionReview envelope (`admission.k8s.io/v1` and `v1beta1`), as the API server sends
//! and expects it. Objects stay raw JSON so the patch is computed over the pod exactly as sent.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `admission.k8s.io/v1`.
pub const V1: &str = "admission.k8s.io/v1";
/// `admission.k8s.io/v1beta1` (still sent by some older clusters).
pub const V1BETA1: &str = "admission.k8s.io/v1beta1";

/// The `apiVersion` of an AdmissionReview; the answer uses the request's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiVersion {
    /// `admission.k8s.io/v1`.
    V1,
    /// `admission.k8s.io/v1beta1`.
    V1Beta1,
}

impl ApiVersion {
    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1 => V1,
            Self::V1Beta1 => V1BETA1,
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            V1 => Some(Self::V1),
            V1BETA1 => Some(Self::V1Beta1),
            _ => None,
        }
    }
}

/// An AdmissionReview as received: its version (for the answer) and its request.
#[derive(Debug, Clone)]
pub struct AdmissionReview {
    /// `admission.k8s.io/v1` or `v1beta1`.
    pub api_version: ApiVersion,
    /// The request.
    pub request: AdmissionRequest,
}

/// Group, version and kind of the object under review.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct GroupVersionKind {
    /// API group (`""` for the core group).
    #[serde(default)]
    pub group: String,
    /// Version.
    #[serde(default)]
    pub version: String,
    /// Kind.
    #[serde(default)]
    pub kind: String,
}

/// `request.operation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Operation {
    /// `CREATE`.
    Create,
    /// `UPDATE`.
    Update,
    /// `DELETE`.
    Delete,
    /// `CONNECT`.
    Connect,
}

impl Operation {
    /// The wire form, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "CREATE",
            Self::Update => "UPDATE",
            Self::Delete => "DELETE",
            Self::Connect => "CONNECT",
        }
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `request` of an AdmissionReview. Objects stay raw JSON so the patch is computed over the pod
/// exactly as sent (a typed Pod would drop fields this version does not know).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    /// Echoed in the response.
    pub uid: String,
    /// Kind of the object.
    pub kind: GroupVersionKind,
    /// Subresource (`""` for the object itself).
    #[serde(default)]
    pub sub_resource: String,
    /// Object name (empty at CREATE with `generateName`).
    #[serde(default)]
    pub name: String,
    /// Namespace of the object; `None` for cluster-scoped objects.
    #[serde(default, deserialize_with = "non_empty")]
    pub namespace: Option<String>,
    /// What is being done.
    pub operation: Operation,
    /// The object as it will be stored (CREATE, UPDATE).
    #[serde(default)]
    pub object: Option<Value>,
    /// The object as it was (UPDATE, DELETE).
    #[serde(default)]
    pub old_object: Option<Value>,
    /// A dry run must have no side effects (absent or `null` means `false`).
    #[serde(default, deserialize_with = "null_as_false")]
    pub dry_run: bool,
}

fn non_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.filter(|s| !s.is_empty()))
}

fn null_as_false<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

impl AdmissionRequest {
    /// Whether the request is for a Pod itself (not a subresource).
    pub fn is_pod(&self) -> bool {
        self.kind.group.is_empty() && self.kind.kind == "Pod" && self.sub_resource.is_empty()
    }
}

/// Why a body is not an AdmissionReview this webhook can answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MalformedReview(pub String);

/// Parses a request body.
pub fn parse(body: &[u8]) -> Result<AdmissionReview, MalformedReview> {
    let mut value: Value = serde_json::from_slice(body).map_err(|e| {
        MalformedReview(format!(
            "the body is not an AdmissionReview (not JSON: {e})"
        ))
    })?;
    let field = |name: &str| value.get(name).and_then(Value::as_str).unwrap_or_default();
    let kind = field("kind");
    if kind != "AdmissionReview" {
        return Err(MalformedReview(format!(
            "the body is not an AdmissionReview: kind is {kind:?}"
        )));
    }
    let version = field("apiVersion");
    let Some(api_version) = ApiVersion::parse(version) else {
        return Err(MalformedReview(format!(
            "apiVersion {version:?} is not {V1} or {V1BETA1}"
        )));
    };
    let request = match value.get_mut("request").map(Value::take) {
        None | Some(Value::Null) => {
            return Err(MalformedReview(
                "the AdmissionReview has no request".to_owned(),
            ));
        }
        Some(request) => serde_json::from_value::<AdmissionRequest>(request)
            .map_err(|e| MalformedReview(format!("request is malformed: {e}")))?,
    };
    if request.uid.is_empty() {
        return Err(MalformedReview("request.uid is empty".to_owned()));
    }
    Ok(AdmissionReview {
        api_version,
        request,
    })
}

/// `response` of an AdmissionReview.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionResponse {
    /// `request.uid`.
    pub uid: String,
    /// Whether the object is admitted.
    pub allowed: bool,
    /// `JSONPatch` when `patch` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<String>,
    /// The JSON patch, base64 (standard alphabet, padded) as the API expects for `[]byte`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    /// Why the object is denied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<ResponseStatus>,
    /// Shown to the client (kubectl prints them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// `response.status` (a `metav1.Status` subset).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ResponseStatus {
    /// HTTP-like code shown to the client.
    pub code: u16,
    /// Message shown to the client.
    pub message: String,
}

impl AdmissionResponse {
    /// Allowed, no patch.
    pub fn allow(uid: &str) -> Self {
        Self {
            uid: uid.to_owned(),
            allowed: true,
            patch_type: None,
            patch: None,
            status: None,
            warnings: Vec::new(),
        }
    }

    /// Allowed with a JSON patch.
    pub fn patched(uid: &str, patch: &json_patch::Patch) -> Result<Self, serde_json::Error> {
        let bytes = serde_json::to_vec(patch)?;
        Ok(Self {
            patch_type: Some("JSONPatch".to_owned()),
            patch: Some(STANDARD.encode(bytes)),
            ..Self::allow(uid)
        })
    }

    /// Denied with a message.
    pub fn deny(uid: &str, code: u16, message: impl Into<String>) -> Self {
        Self {
            allowed: false,
            status: Some(ResponseStatus {
                code,
                message: message.into(),
            }),
            ..Self::allow(uid)
        }
    }

    /// Adds a warning for the client.
    pub fn warn(mut self, warning: impl Into<String>) -> Self {
        // kubectl prints every warning to the user: keep each one a sentence, not an echo.
        self.warnings.push(iam_broker_kernel::text::clip(
            &warning.into(),
            iam_broker_kernel::text::MAX_MESSAGE,
        ));
        self
    }

    /// The whole review to send back, in the request's `apiVersion`.
    pub fn into_review(self, api_version: ApiVersion) -> Value {
        serde_json::json!({
            "apiVersion": api_version.as_str(),
            "kind": "AdmissionReview",
            "response": self,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn parses_v1_and_v1beta1_and_answers_in_kind() {
        for version in [V1, V1BETA1] {
            let body = json!({ "apiVersion": version, "kind": "AdmissionReview", "request": {
                "uid": "u-1", "kind": { "group": "", "version": "v1", "kind": "Pod" },
                "namespace": "ns", "operation": "CREATE", "object": { "spec": {} },
                "dryRun": true } });
            let review = parse(&serde_json::to_vec(&body).unwrap()).unwrap();
            let request = &review.request;
            assert!(request.is_pod());
            assert!(request.dry_run);
            assert_eq!(request.operation, Operation::Create);
            assert_eq!(request.namespace.as_deref(), Some("ns"));
            let answer = AdmissionResponse::allow(&request.uid).into_review(review.api_version);
            assert_eq!(answer["apiVersion"], version);
            assert_eq!(answer["response"], json!({ "uid": "u-1", "allowed": true }));
        }
    }

    #[test]
    fn malformed_reviews_are_refused_with_a_reason() {
        for (body, why) in [
            (json!([]), "not an AdmissionReview"),
            (
                json!({ "apiVersion": V1, "kind": "AdmissionReview", "request": { "uid": "u" } }),
                "request is malformed",
            ),
            (
                json!({ "apiVersion": V1, "kind": "Pod", "request": {} }),
                "kind",
            ),
            (
                json!({ "apiVersion": "admission.k8s.io/v2", "kind": "AdmissionReview" }),
                "apiVersion",
            ),
            (
                json!({ "apiVersion": V1, "kind": "AdmissionReview" }),
                "no request",
            ),
            (
                json!({ "apiVersion": V1, "kind": "AdmissionReview", "request": {
                "uid": "", "kind": {}, "operation": "CREATE" } }),
                "uid",
            ),
        ] {
            let err = parse(&serde_json::to_vec(&body).unwrap()).unwrap_err();
            assert!(err.0.contains(why), "{} does not say {why}", err.0);
        }
        assert!(parse(b"not json").is_err());
    }

    #[test]
    fn patch_is_base64_of_the_json_patch() {
        let patch: json_patch::Patch =
            serde_json::from_value(json!([{ "op": "add", "path": "/a", "value": 1 }])).unwrap();
        let response = AdmissionResponse::patched("u", &patch).unwrap();
        assert_eq!(response.patch_type.as_deref(), Some("JSONPatch"));
        let decoded = STANDARD.decode(response.patch.unwrap()).unwrap();
        let back: Value = serde_json::from_slice(&decoded).unwrap();
        assert_eq!(back, json!([{ "op": "add", "path": "/a", "value": 1 }]));
    }

    #[test]
    fn denial_carries_status_and_subresources_are_not_pods() {
        let deny = AdmissionResponse::deny("u", 500, "down");
        let value = serde_json::to_value(&deny).unwrap();
        assert_eq!(value["allowed"], false);
        assert_eq!(value["status"], json!({ "code": 500, "message": "down" }));
        let body = json!({ "apiVersion": V1, "kind": "AdmissionReview", "request": {
            "uid": "u", "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "subResource": "ephemeralcontainers", "operation": "UPDATE" } });
        let review = parse(&serde_json::to_vec(&body).unwrap()).unwrap();
        assert!(!review.request.is_pod());
        assert_eq!(review.request.operation, Operation::Update);
    }

    #[test]
    fn dry_run_and_namespace_default_sensibly_and_unknown_operations_are_malformed() {
        for (dry_run, namespace) in [(json!(null), json!(null)), (json!(false), json!(""))] {
            let body = json!({ "apiVersion": V1, "kind": "AdmissionReview", "request": {
                "uid": "u", "kind": { "kind": "Pod" }, "operation": "DELETE",
                "dryRun": dry_run, "namespace": namespace } });
            let review = parse(&serde_json::to_vec(&body).unwrap()).unwrap();
            assert!(!review.request.dry_run);
            assert_eq!(review.request.namespace, None);
        }
        let body = json!({ "apiVersion": V1, "kind": "AdmissionReview", "request": {
            "uid": "u", "kind": { "kind": "Pod" }, "operation": "PATCH" } });
        let error = parse(&serde_json::to_vec(&body).unwrap()).unwrap_err();
        assert!(error.0.contains("request is malformed"), "{}", error.0);
    }
}
