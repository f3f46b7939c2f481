//! Projected ServiceAccount tokens as the broker verifies them (`identity::identify`, called by
//! `Broker::credentials` for every JWT), against a registry of two clusters that share kubeadm's
//! issuer and hold their own ES256 keys.
//!
//! The bytes pick one of three shapes:
//! - any string at all as the token;
//! - a validly signed token with one byte changed (a forgery of a real token);
//! - claims built from the bytes and signed with a registered key (a real cluster issuing an odd
//!   token), under a header the bytes choose: `{alg, kid}`, `{alg}` without `kid`, `{alg, kid,
//!   crit}` with a `crit` of any JSON type, or `{alg, kid}` naming the other cluster's key.
//!
//! Properties, besides "no panic": a token is only ever accepted when its signature is a
//! registered cluster's, over exactly the claims it carries; an accepted identity is exactly what
//! those claims say, with the audience, times (`iat` present, `exp - iat` at most the maximum
//! lifetime), `sub`, Kubernetes names and pod binding as documented; a changed token is never
//! accepted as anyone but the original. For claims serde_json wrote, a token with or without
//! `kid` is accepted **iff** an independent oracle says so, and then names the cluster whose key
//! signed it (without `kid`, east or west: every cluster of the issuer is tried); a token with
//! `crit` is always refused for it (`CriticalExtension`); a `kid` naming the other cluster's key
//! is refused on its signature.

// A fuzz target reports a broken property by panicking; the `expect`s here are on its own fixed
// set-up (key generation, the registration) and on the untouched token verifying, never on what
// the input decides.
#![allow(clippy::expect_used)]

use std::sync::OnceLock;

use iam_broker_broker::identity::{Verification, identify};
use iam_broker_kernel::cluster::RegisteredCluster;
use iam_broker_kernel::jwt::{JwtError, MAX_TOKEN_BYTES};
use iam_broker_testkit::Signer;
use serde_json::{Value, json};

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const AUDIENCE: &str = "iam-broker";
/// The fuzz run's "now".
const NOW: i64 = 1_900_000_000;
const LEEWAY: i64 = 60;
/// The longest `exp - iat` accepted.
const MAX_LIFETIME: i64 = 86_400;

struct World {
    keys: [Signer; 2],
    clusters: Vec<RegisteredCluster>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let keys = [Signer::new("east-key"), Signer::new("west-key")];
        let clusters = ["east", "west"]
            .iter()
            .zip(&keys)
            .map(|(name, key)| {
                RegisteredCluster::new(name, ISSUER, &Signer::jwks(&[key]), "fuzz", 0)
                    .expect("a valid registration")
            })
            .collect();
        World { keys, clusters }
    })
}

fn sign(key: &Signer, header: &Value, claims_json: &[u8]) -> String {
    key.try_sign_raw(header, claims_json).expect("signing")
}

fn verification() -> Verification {
    Verification {
        audience: AUDIENCE.to_owned(),
        leeway: LEEWAY,
        max_lifetime: MAX_LIFETIME,
    }
}

fn valid_claims(ns: &str, sa: &str) -> Value {
    json!({ "iss": ISSUER, "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "aud": [AUDIENCE], "exp": NOW + 3600, "iat": NOW, "nbf": NOW,
        "kubernetes.io": { "namespace": ns, "serviceaccount": { "name": sa, "uid": "u-sa" },
            "pod": { "name": "web-1", "uid": "u-pod" } } })
}

/// The `kubernetes.io` claims of a token, as the broker reads them.
struct K8s<'a> {
    namespace: &'a str,
    /// ServiceAccount name and uid.
    service_account: (&'a str, &'a str),
    /// Pod name and uid.
    pod: Option<(&'a str, &'a str)>,
}

/// A `{name, uid}` object claim. Like any struct read with serde, it may also come as the
/// array `[name, uid]` (exactly two strings): kube-apiserver never writes that, but only a
/// registered cluster's key can sign it, so the broker's reading it is harmless.
fn object_claim(value: &Value) -> Option<(&str, &str)> {
    match value {
        Value::Object(map) => Some((map.get("name")?.as_str()?, map.get("uid")?.as_str()?)),
        Value::Array(items) => match items.as_slice() {
            [name, uid] => Some((name.as_str()?, uid.as_str()?)),
            _ => None,
        },
        _ => None,
    }
}

/// An optional member (absent or `null` is `None`); `Err` when present with the wrong type.
fn optional<'a, T>(
    value: Option<&'a Value>,
    read: impl Fn(&'a Value) -> Option<T>,
) -> Result<Option<T>, ()> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => read(v).map(Some).ok_or(()),
    }
}

/// The `kubernetes.io` claims when well typed (an object, or serde's array form
/// `[namespace, serviceaccount, pod?]`).
fn kubernetes_claims(value: &Value) -> Option<K8s<'_>> {
    let (namespace, service_account, pod) = match value {
        Value::Object(map) => (
            map.get("namespace")?,
            map.get("serviceaccount")?,
            map.get("pod"),
        ),
        Value::Array(items) => match items.as_slice() {
            [ns, sa] => (ns, sa, None),
            [ns, sa, pod] => (ns, sa, Some(pod)),
            _ => return None,
        },
        _ => return None,
    };
    Some(K8s {
        namespace: namespace.as_str()?,
        service_account: object_claim(service_account)?,
        pod: optional(pod, object_claim).ok()?,
    })
}

/// A DNS-1123 label as the broker documents Kubernetes names: 1 to 63 of `[a-z0-9-]`, starting
/// and ending with a letter or digit.
fn dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'))
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A DNS-1123 subdomain: 1 to 253 characters of dot-separated labels.
fn dns_subdomain(name: &str) -> bool {
    (1..=253).contains(&name.len()) && name.split('.').all(dns_label)
}

/// Whether the broker must accept a token signed by a registered cluster with these claims:
/// every claim it reads has the type it reads it as, the issuer is the registered one, and
/// the checks of [`acceptable`] and the names' hold (independent of the code under test).
fn expected_accepted(claims: &Value) -> bool {
    let Value::Object(map) = claims else {
        return false;
    };
    let int = |name: &str| optional(map.get(name), Value::as_i64);
    let audience_typed = match map.get("aud") {
        Some(Value::String(_)) => true,
        Some(Value::Array(many)) => many.iter().all(Value::is_string),
        _ => false,
    };
    let well_typed = map.get("iss").is_some_and(Value::is_string)
        && map.get("sub").is_some_and(Value::is_string)
        && audience_typed
        && map.get("exp").and_then(Value::as_i64).is_some()
        && int("nbf").is_ok()
        && int("iat").is_ok()
        && optional(map.get("kubernetes.io"), kubernetes_claims).is_ok();
    well_typed && map.get("iss").and_then(Value::as_str) == Some(ISSUER) && acceptable(claims)
}

/// What a verified token's claims must say for it to be accepted (independent of the code
/// under test).
fn acceptable(claims: &Value) -> bool {
    let Some(k8s) = kubernetes_claims(&claims["kubernetes.io"]) else {
        return false;
    };
    let (ns, (sa, _)) = (k8s.namespace, k8s.service_account);
    let audience_ok = match &claims["aud"] {
        Value::String(one) => one == AUDIENCE,
        Value::Array(many) => many.iter().any(|a| a == AUDIENCE),
        _ => false,
    };
    let time = |name: &str| claims[name].as_i64();
    let future = |t: Option<i64>| t.is_some_and(|t| t > NOW + LEEWAY);
    audience_ok
        && time("exp").is_some_and(|exp| exp > NOW - LEEWAY)
        && !future(time("nbf"))
        && !future(time("iat"))
        && time("iat").is_some_and(|iat| {
            time("exp").is_some_and(|exp| exp.saturating_sub(iat) <= MAX_LIFETIME)
        })
        && claims["sub"] == format!("system:serviceaccount:{ns}:{sa}")
        && dns_label(ns)
        && dns_subdomain(sa)
        && k8s
            .pod
            .is_some_and(|(name, uid)| !name.is_empty() && !uid.is_empty())
}

/// The header a registered cluster signs claims from the bytes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeaderShape {
    /// `{alg, kid}`, as kube-apiserver writes it.
    Kid,
    /// `{alg}`: no `kid`, so every cluster of the issuer must be tried.
    NoKid,
    /// `{alg, kid, crit}`: a critical extension, never accepted.
    Crit,
    /// `{alg, kid}` with the other cluster's `kid`: the signature is not that cluster's.
    OtherKid,
}

/// A `crit` member from the bytes (RFC 7515 wants a non-empty list of names; any value at all
/// must refuse the token).
fn crit_from(choice: u8, text: &str) -> Value {
    match choice % 11 {
        0 => Value::Null,
        1 => json!([]),
        2 => json!([text]),
        3 => json!(text),
        4 => json!(text.len()),
        5 => json!(["exp"]),
        6 => json!({ text: text }),
        7 => json!(true),
        8 => json!(["b64"]),
        9 => json!([text, "kid"]),
        _ => json!(false),
    }
}

/// Target.
pub fn projected_token(data: &[u8]) {
    let w = world();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            // Anything at all: without a registered key's signature nothing is accepted.
            let token = String::from_utf8_lossy(rest);
            assert!(
                identify(&token, &w.clusters, &verification(), NOW).is_err(),
                "an unsigned input was accepted: {token:?}"
            );
        }
        1 => {
            // A real token, one byte changed.
            let key = &w.keys[usize::from(mode / 3 % 2)];
            let claims = valid_claims("team-a", "app");
            let token = sign(
                key,
                &json!({ "alg": "ES256", "kid": key.kid }),
                claims.to_string().as_bytes(),
            );
            let original = identify(&token, &w.clusters, &verification(), NOW)
                .expect("the untouched token verifies");
            let (Some(&at), Some(&with)) = (rest.first(), rest.get(1)) else {
                return;
            };
            let mut bytes = token.into_bytes();
            let at = usize::from(at) * bytes.len() / 256;
            bytes[at] = with;
            let forged = String::from_utf8_lossy(&bytes);
            if let Ok(identity) = identify(&forged, &w.clusters, &verification(), NOW) {
                // Only base64's unused trailing bits can change without changing the bytes.
                assert_eq!(identity, original, "a changed token named someone else");
            }
        }
        _ => signed_by_a_cluster(mode / 3, rest),
    }
}

/// A registered cluster signs claims made from the bytes, under a header chosen by `choice`.
fn signed_by_a_cluster(choice: u8, rest: &[u8]) {
    let w = world();
    let key_index = usize::from(choice % 2);
    let key = &w.keys[key_index];
    let other = &w.keys[1 - key_index];
    let shape = [
        HeaderShape::Kid,
        HeaderShape::NoKid,
        HeaderShape::Crit,
        HeaderShape::OtherKid,
    ][usize::from(choice / 2 % 4)];
    let header = match shape {
        HeaderShape::Kid => json!({ "alg": "ES256", "kid": key.kid }),
        HeaderShape::NoKid => json!({ "alg": "ES256" }),
        HeaderShape::Crit => {
            let text = String::from_utf8_lossy(rest.get(1..).unwrap_or_default());
            json!({ "alg": "ES256", "kid": key.kid, "crit": crit_from(choice / 8, &text) })
        }
        HeaderShape::OtherKid => json!({ "alg": "ES256", "kid": other.kid }),
    };
    let (claims_json, structured) = claims_from(rest);
    let token = sign(key, &header, &claims_json);
    let result = identify(&token, &w.clusters, &verification(), NOW);
    if token.len() > MAX_TOKEN_BYTES {
        // Refused before anything is decoded, whatever it holds.
        assert_eq!(
            result.err(),
            Some(JwtError::Malformed),
            "a token over the bound"
        );
        return;
    }
    match shape {
        HeaderShape::Crit => {
            assert_eq!(
                result.err(),
                Some(JwtError::CriticalExtension),
                "a token with `crit` was not refused for it: {header}"
            );
            return;
        }
        HeaderShape::OtherKid => {
            // The kid names the other cluster, whose key did not sign: only that cluster is
            // tried. (Claims that do not parse, or name another issuer, are refused before.)
            let good = serde_json::from_slice(&claims_json)
                .ok()
                .is_some_and(|claims: Value| expected_accepted(&claims));
            match result {
                Err(JwtError::BadSignature) => {}
                Err(_) if !good => {}
                other => panic!("a token under another cluster's kid: {other:?}"),
            }
            return;
        }
        HeaderShape::Kid | HeaderShape::NoKid => {}
    }
    let claims: Option<Value> = serde_json::from_slice(&claims_json).ok();
    if structured {
        // Claims written by serde_json from a value: the oracle knows exactly what the broker
        // must accept, with or without `kid` (every cluster of the issuer is tried).
        let claims = claims
            .as_ref()
            .expect("claims written by serde_json are JSON");
        assert_eq!(
            result.is_ok(),
            expected_accepted(claims),
            "{shape:?} token {}: {result:?} for {claims}",
            if result.is_ok() {
                "accepted"
            } else {
                "refused"
            }
        );
    }
    match (&result, &claims) {
        (Ok(identity), Some(claims)) => {
            assert!(acceptable(claims), "accepted {claims}");
            assert_eq!(
                identity.cluster.as_str(),
                ["east", "west"][key_index],
                "{shape:?} token attributed to the wrong cluster"
            );
            let k8s = kubernetes_claims(&claims["kubernetes.io"])
                .expect("acceptable claims have kubernetes.io claims");
            let (pod_name, pod_uid) = k8s.pod.expect("acceptable claims bind a pod");
            assert_eq!(identity.subject.namespace, k8s.namespace);
            assert_eq!(identity.subject.service_account, k8s.service_account.0);
            assert_eq!(identity.claims.namespace, k8s.namespace);
            assert_eq!(identity.claims.service_account, k8s.service_account.0);
            assert_eq!(identity.claims.service_account_uid, k8s.service_account.1);
            assert_eq!(identity.claims.pod_name, pod_name);
            assert_eq!(identity.claims.pod_uid, pod_uid);
            assert_eq!(Some(identity.claims.expires_at), claims["exp"].as_i64());
            assert_eq!(claims["iss"], ISSUER);
        }
        (Ok(identity), None) => {
            panic!("claims that are not JSON were accepted: {identity:?}")
        }
        (Err(_), _) => {}
    }
}

/// Claims from bytes, and whether they are structured (written by serde_json from a value):
/// mostly a valid token's claims with fields changed or dropped, so the checks behind the
/// signature are reached; sometimes the bytes themselves.
///
/// Layout: a choice byte (`% 8 == 0`: the rest as the claims), a second byte selecting which
/// fields change (with the choice's high bits), one byte per changed field for its new value,
/// then the text the values are made from.
fn claims_from(data: &[u8]) -> (Vec<u8>, bool) {
    let Some((&choice, rest)) = data.split_first() else {
        return (valid_claims("team-a", "app").to_string().into_bytes(), true);
    };
    if choice % 8 == 0 {
        return (rest.to_vec(), false);
    }
    let (&select, mut rest) = rest.split_first().unwrap_or((&0, &[]));
    let selected = u16::from(choice >> 3) << 8 | u16::from(select);
    let fields = [
        "/iss",
        "/sub",
        "/aud",
        "/exp",
        "/nbf",
        "/iat",
        "/kubernetes.io/namespace",
        "/kubernetes.io/serviceaccount/name",
        "/kubernetes.io/pod",
        "/kubernetes.io/pod/uid",
        "/kubernetes.io",
        "/kubernetes.io/serviceaccount",
        "/kubernetes.io/pod/name",
    ];
    let mut kinds = Vec::new();
    for i in 0..fields.len() {
        if selected >> i & 1 == 1 {
            let (&kind, after) = rest.split_first().unwrap_or((&0, &[]));
            kinds.push((i, kind));
            rest = after;
        }
    }
    let text = String::from_utf8_lossy(rest).into_owned();
    let number = rest
        .iter()
        .take(8)
        .fold(0i64, |n, b| n.wrapping_mul(256).wrapping_add(i64::from(*b)));
    let mut claims = valid_claims("team-a", "app");
    let mut agreeing_sub = false;
    for (i, kind) in kinds {
        let field = fields[i];
        let value = match kind % 11 {
            0 => Value::Null,
            1 => json!(text),
            2 => json!(number),
            3 => json!(NOW + (number % 7200)),
            4 => json!([text, AUDIENCE]),
            5 => {
                // Dropped.
                if let Some((parent, name)) = field.rsplit_once('/') {
                    let parent = if parent.is_empty() {
                        Some(&mut claims)
                    } else {
                        claims.pointer_mut(parent)
                    };
                    if let Some(Value::Object(map)) = parent {
                        map.remove(name);
                    }
                }
                continue;
            }
            6 => json!({ "name": text, "uid": text }),
            7 => json!([text, text]),
            8 => match field {
                // Right at the lifetime bound (the valid claims have exp = iat + 3600).
                "/iat" => json!(NOW + 3600 - MAX_LIFETIME - 2 + number.rem_euclid(5)),
                "/exp" => json!(NOW + MAX_LIFETIME - 2 + number.rem_euclid(5)),
                _ => json!(NOW + LEEWAY - 2 + number.rem_euclid(5)),
            },
            9 if field == "/sub" => {
                // `sub` made to agree with the names the claims end up with.
                agreeing_sub = true;
                continue;
            }
            9 => {
                // A valid name, so the checks after the names are reached.
                let name: String = text
                    .bytes()
                    .filter(u8::is_ascii_alphanumeric)
                    .map(|b| char::from(b.to_ascii_lowercase()))
                    .take(20)
                    .collect();
                json!(if name.is_empty() {
                    "x".to_owned()
                } else {
                    name
                })
            }
            _ => json!([text, { "name": text, "uid": text }]),
        };
        if let Some(slot) = claims.pointer_mut(field) {
            *slot = value;
        }
    }
    if agreeing_sub {
        let k8s = &claims["kubernetes.io"];
        if let (Some(ns), Some(sa)) = (
            k8s["namespace"].as_str(),
            k8s["serviceaccount"]["name"].as_str(),
        ) {
            claims["sub"] = json!(format!("system:serviceaccount:{ns}:{sa}"));
        }
    }
    (claims.to_string().into_bytes(), true)
}
