//! Projected ServiceAccount tokens as the broker verifies them (`identity::identify`, called by
//! `Broker::credentials` for every JWT), against a registry of two clusters that share kubeadm's
//! issuer and hold their own ES256 keys.
//!
//! The bytes pick one of three shapes:
//! - any string at all as the token;
//! - a validly signed token with one byte changed (a forgery of a real token);
//! - claims built from the bytes and signed with a registered key (a real cluster issuing an odd
//!   token).
//!
//! Properties, besides "no panic": a token is only ever accepted when its signature is a
//! registered cluster's, over exactly the claims it carries; an accepted identity is exactly what
//! those claims say, with the audience, times, `sub` and pod binding as documented; a changed
//! token is never accepted as anyone but the original.

// A fuzz target reports a broken property by panicking; the `expect`s here are on its own fixed
// set-up (key generation, the registration) and on the untouched token verifying, never on what
// the input decides.
#![allow(clippy::expect_used)]

use std::sync::OnceLock;

use iam_broker_broker::identity::{Verification, identify};
use iam_broker_kernel::cluster::RegisteredCluster;
use iam_broker_testkit::Signer;
use serde_json::{Value, json};

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const AUDIENCE: &str = "iam-broker";
/// The fuzz run's "now".
const NOW: i64 = 1_900_000_000;
const LEEWAY: i64 = 60;

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
    }
}

fn valid_claims(ns: &str, sa: &str) -> Value {
    json!({ "iss": ISSUER, "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "aud": [AUDIENCE], "exp": NOW + 3600, "iat": NOW, "nbf": NOW,
        "kubernetes.io": { "namespace": ns, "serviceaccount": { "name": sa, "uid": "u-sa" },
            "pod": { "name": "web-1", "uid": "u-pod" } } })
}

/// What a verified token's claims must say for it to be accepted (independent of the code
/// under test).
fn acceptable(claims: &Value) -> bool {
    let k8s = &claims["kubernetes.io"];
    let (Some(ns), Some(sa)) = (
        k8s["namespace"].as_str(),
        k8s["serviceaccount"]["name"].as_str(),
    ) else {
        return false;
    };
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
        && claims["sub"] == format!("system:serviceaccount:{ns}:{sa}")
        && k8s["pod"]["name"].as_str().is_some_and(|p| !p.is_empty())
        && k8s["pod"]["uid"].as_str().is_some_and(|p| !p.is_empty())
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
        _ => {
            // A registered cluster signs claims made from the bytes.
            let key_index = usize::from(mode / 3 % 2);
            let key = &w.keys[key_index];
            let claims_json = claims_from(rest);
            let token = sign(
                key,
                &json!({ "alg": "ES256", "kid": key.kid }),
                &claims_json,
            );
            let result = identify(&token, &w.clusters, &verification(), NOW);
            let claims: Option<Value> = serde_json::from_slice(&claims_json).ok();
            match (&result, &claims) {
                (Ok(identity), Some(claims)) => {
                    assert!(acceptable(claims), "accepted {claims}");
                    assert_eq!(identity.cluster.as_str(), ["east", "west"][key_index]);
                    let k8s = &claims["kubernetes.io"];
                    assert_eq!(
                        identity.subject.namespace,
                        k8s["namespace"].as_str().unwrap_or("")
                    );
                    assert_eq!(
                        identity.subject.service_account,
                        k8s["serviceaccount"]["name"].as_str().unwrap_or("")
                    );
                    assert_eq!(
                        identity.claims.pod_uid,
                        k8s["pod"]["uid"].as_str().unwrap_or("")
                    );
                    assert_eq!(claims["iss"], ISSUER);
                }
                (Ok(identity), None) => {
                    panic!("claims that are not JSON were accepted: {identity:?}")
                }
                (Err(_), _) => {}
            }
        }
    }
}

/// Claims from bytes: mostly a valid token's claims with fields changed or dropped, so the
/// checks behind the signature are reached; sometimes the bytes themselves.
fn claims_from(data: &[u8]) -> Vec<u8> {
    let Some((&choice, rest)) = data.split_first() else {
        return valid_claims("team-a", "app").to_string().into_bytes();
    };
    if choice % 8 == 0 {
        return rest.to_vec();
    }
    let mut claims = valid_claims("team-a", "app");
    let text = String::from_utf8_lossy(rest).into_owned();
    let number = rest
        .iter()
        .take(8)
        .fold(0i64, |n, b| n.wrapping_mul(256).wrapping_add(i64::from(*b)));
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
    ];
    for (i, field) in fields.iter().enumerate() {
        if (choice >> (i % 7)) & 1 == 0 {
            continue;
        }
        let Some(slot) = claims.pointer_mut(field) else {
            continue;
        };
        *slot = match (choice as usize + i) % 5 {
            0 => Value::Null,
            1 => json!(text),
            2 => json!(number),
            3 => json!(NOW + (number % 7200)),
            _ => json!([text, AUDIENCE]),
        };
    }
    claims.to_string().into_bytes()
}
