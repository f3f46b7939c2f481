//! Kubernetes ServiceAccount tokens: a cluster's JSON Web Key Set, JWT signature verification
//! (RS256 and ES256, the algorithms kube-apiserver signs with) and the claims a projected token
//! carries.
//!
//! Nothing here trusts a token before its signature is checked: [`Unverified`] exposes only
//! what is needed to find the key (`iss`, `kid`, `alg`), and [`Unverified::verify`] is the only
//! way to the [`Claims`].

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;

/// Longest token accepted (kube-apiserver's are about 1 KiB; a bound keeps decoding cheap).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Shortest RSA modulus accepted, in bytes (2048 bits, as ring requires).
const MIN_RSA_MODULUS_BYTES: usize = 256;

/// A signature algorithm kube-apiserver signs ServiceAccount tokens with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256 (kube-apiserver's default, with an RSA key).
    Rs256,
    /// ECDSA on P-256 with SHA-256.
    Es256,
}

impl Algorithm {
    /// The JOSE name (`RS256`, `ES256`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        match name {
            "RS256" => Some(Self::Rs256),
            "ES256" => Some(Self::Es256),
            _ => None,
        }
    }
}

/// Why a JWKS could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    /// Not a JSON object with a `keys` array.
    #[error("the JWKS is not valid JSON with a \"keys\" array: {0}")]
    NotAJwks(String),
    /// A key of a supported type is malformed.
    #[error("key {kid} of the JWKS is malformed: {why}")]
    BadKey {
        /// The key's `kid` (or its position).
        kid: String,
        /// What is wrong.
        why: String,
    },
    /// No key signs with RS256 or ES256.
    #[error("the JWKS holds no RS256 or ES256 signing key")]
    NoUsableKey,
}

/// One verification key of a cluster.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// `kid`: kube-apiserver's is the unpadded base64url SHA-256 of the key's PKIX encoding.
    pub kid: Option<String>,
    /// The algorithm it verifies.
    pub algorithm: Algorithm,
    material: Material,
}

#[derive(Clone, PartialEq, Eq)]
enum Material {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// The uncompressed SEC1 point `04 || x || y`.
    Ec {
        point: Vec<u8>,
    },
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl PublicKey {
    fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        match &self.material {
            Material::Rsa { n, e } => RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, signature)
                .is_ok(),
            Material::Ec { point } => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, signature)
                    .is_ok()
            }
        }
    }
}

/// The verification keys of one cluster, from its `/openid/v1/jwks`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeySet {
    keys: Vec<PublicKey>,
    /// Keys of other types or algorithms, left out.
    skipped: usize,
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: Option<String>,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

impl KeySet {
    /// Reads a JWKS document. Keys that are not for signatures, or of a type this broker does
    /// not verify (RSA other than RS256, curves other than P-256, symmetric keys), are skipped;
    /// a malformed RSA or P-256 key is an error, and so is a set with no usable key.
    pub fn from_jwks(json: &str) -> Result<Self, JwksError> {
        let raw: RawJwks =
            serde_json::from_str(json).map_err(|e| JwksError::NotAJwks(e.to_string()))?;
        let mut set = Self::default();
        for (index, value) in raw.keys.into_iter().enumerate() {
            let jwk: RawJwk = serde_json::from_value(value).map_err(|e| JwksError::BadKey {
                kid: format!("#{index}"),
                why: e.to_string(),
            })?;
            match parse_key(&jwk, index)? {
                Some(key) => set.keys.push(key),
                None => set.skipped += 1,
            }
        }
        if set.keys.is_empty() {
            return Err(JwksError::NoUsableKey);
        }
        Ok(set)
    }

    /// The usable keys.
    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// How many keys of the document were left out as not usable.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// The `kid`s of the usable keys.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().filter_map(|k| k.kid.as_deref())
    }

    /// The keys that may have signed a token with this header: the one with its `kid`, or,
    /// for a token without `kid`, every key of its algorithm.
    fn candidates<'a>(
        &'a self,
        algorithm: Algorithm,
        kid: Option<&'a str>,
    ) -> impl Iterator<Item = &'a PublicKey> {
        self.keys
            .iter()
            .filter(move |k| k.algorithm == algorithm)
            .filter(move |k| kid.is_none() || k.kid.as_deref() == kid)
    }

    /// Whether a token with this header could be checked against this set.
    pub fn has_key_for(&self, algorithm: Algorithm, kid: Option<&str>) -> bool {
        self.candidates(algorithm, kid).next().is_some()
    }
}

fn parse_key(jwk: &RawJwk, index: usize) -> Result<Option<PublicKey>, JwksError> {
    let kid = jwk.kid.clone();
    let bad = |why: &str| JwksError::BadKey {
        kid: kid.clone().unwrap_or_else(|| format!("#{index}")),
        why: why.to_owned(),
    };
    if jwk.use_.as_deref().is_some_and(|u| u != "sig") {
        return Ok(None);
    }
    let b64 = |field: &Option<String>, name: &str| -> Result<Vec<u8>, JwksError> {
        let text = field
            .as_deref()
            .ok_or_else(|| bad(&format!("\"{name}\" is missing")))?;
        URL_SAFE_NO_PAD
            .decode(text.trim_end_matches('='))
            .map_err(|_| bad(&format!("\"{name}\" is not base64url")))
    };
    match (jwk.kty.as_deref(), jwk.alg.as_deref()) {
        (Some("RSA"), None | Some("RS256")) => {
            let n = strip_leading_zeros(b64(&jwk.n, "n")?);
            let e = strip_leading_zeros(b64(&jwk.e, "e")?);
            if n.len() < MIN_RSA_MODULUS_BYTES {
                return Err(bad("the RSA modulus is shorter than 2048 bits"));
            }
            if e.is_empty() || e.len() > 4 {
                return Err(bad("the RSA exponent is out of range"));
            }
            Ok(Some(PublicKey {
                kid,
                algorithm: Algorithm::Rs256,
                material: Material::Rsa { n, e },
            }))
        }
        (Some("EC"), None | Some("ES256")) if jwk.crv.as_deref() == Some("P-256") => {
            let x = b64(&jwk.x, "x")?;
            let y = b64(&jwk.y, "y")?;
            if x.len() != 32 || y.len() != 32 {
                return Err(bad("a P-256 coordinate is not 32 bytes"));
            }
            let mut point = Vec::with_capacity(65);
            point.push(4);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            Ok(Some(PublicKey {
                kid,
                algorithm: Algorithm::Es256,
                material: Material::Ec { point },
            }))
        }
        _ => Ok(None),
    }
}

fn strip_leading_zeros(mut bytes: Vec<u8>) -> Vec<u8> {
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    bytes.drain(..zeros);
    bytes
}

/// Why a token was refused. Every variant is a 403 `InvalidToken` to the caller; the text is
/// for logs and never holds the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts, a header or claims that are not JSON, or too long.
    #[error("malformed token")]
    Malformed,
    /// `alg` is not RS256 or ES256 (`none` and HMAC included).
    #[error("unsupported signing algorithm")]
    UnsupportedAlgorithm,
    /// No registered cluster has this issuer.
    #[error("unknown issuer")]
    UnknownIssuer,
    /// The issuer is registered, but none of its clusters holds the key.
    #[error("unknown signing key")]
    UnknownKey,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// The audience is not the broker's.
    #[error("wrong audience")]
    WrongAudience,
    /// `exp` has passed (beyond the leeway).
    #[error("expired token")]
    Expired,
    /// `nbf` or `iat` lies in the future (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// The `kubernetes.io` claims are missing or do not agree with `sub`.
    #[error("not a ServiceAccount token")]
    NotAServiceAccountToken,
    /// The token is not bound to a pod (e.g. from `kubectl create token`).
    #[error("not bound to a pod")]
    NotPodBound,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
}

/// A token whose signature is not checked yet. Only the fields that select the key are exposed.
pub struct Unverified<'a> {
    signing_input: &'a str,
    signature: Vec<u8>,
    algorithm: Algorithm,
    kid: Option<String>,
    issuer: String,
    claims: Claims,
}

/// Whether a credential looks like a JWT (three dot-separated parts, a JSON header): the
/// broker tells projected ServiceAccount tokens from its own `iamb_` tokens by this.
pub fn looks_like_jwt(value: &str) -> bool {
    value.starts_with("eyJ") && value.bytes().filter(|b| *b == b'.').count() == 2
}

impl<'a> Unverified<'a> {
    /// Splits and decodes a compact JWS. Fails on anything but RS256 / ES256.
    pub fn parse(token: &'a str) -> Result<Self, JwtError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwtError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(header), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let decode = |part: &str| {
            URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| JwtError::Malformed)
        };
        let header: Header =
            serde_json::from_slice(&decode(header)?).map_err(|_| JwtError::Malformed)?;
        let algorithm = Algorithm::parse(&header.alg).ok_or(JwtError::UnsupportedAlgorithm)?;
        let claims: Claims =
            serde_json::from_slice(&decode(claims)?).map_err(|_| JwtError::Malformed)?;
        let signature = decode(signature)?;
        let signing_input = token
            .rsplit_once('.')
            .map(|(input, _)| input)
            .ok_or(JwtError::Malformed)?;
        Ok(Self {
            signing_input,
            signature,
            algorithm,
            kid: header.kid,
            issuer: claims.iss.clone(),
            claims,
        })
    }

    /// `iss`, as the token claims it (unverified: use it only to look up keys).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// `kid` of the header (unverified).
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// `alg` of the header.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Checks the signature against `keys`; the claims are trusted only after this.
    pub fn verify(self, keys: &KeySet) -> Result<Claims, JwtError> {
        let mut candidates = keys
            .candidates(self.algorithm, self.kid.as_deref())
            .peekable();
        if candidates.peek().is_none() {
            return Err(JwtError::UnknownKey);
        }
        let message = self.signing_input.as_bytes();
        if candidates.any(|key| key.verifies(message, &self.signature)) {
            Ok(self.claims)
        } else {
            Err(JwtError::BadSignature)
        }
    }
}

/// The claims of a Kubernetes ServiceAccount token.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Claims {
    /// `iss`.
    pub iss: String,
    /// `sub`: `system:serviceaccount:<namespace>:<name>`.
    pub sub: String,
    /// `aud` (a string or an array in JWT; always a list here).
    #[serde(deserialize_with = "one_or_many")]
    pub aud: Vec<String>,
    /// `exp`, epoch seconds.
    pub exp: i64,
    /// `nbf`, epoch seconds.
    #[serde(default)]
    pub nbf: Option<i64>,
    /// `iat`, epoch seconds.
    #[serde(default)]
    pub iat: Option<i64>,
    /// The `kubernetes.io` claims.
    #[serde(rename = "kubernetes.io", default)]
    pub kubernetes: Option<KubernetesClaims>,
}

/// The `kubernetes.io` private claims.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct KubernetesClaims {
    /// The ServiceAccount's namespace.
    pub namespace: String,
    /// The ServiceAccount.
    pub serviceaccount: ObjectClaim,
    /// The pod the token is bound to (projected tokens).
    #[serde(default)]
    pub pod: Option<ObjectClaim>,
}

/// An object named in the claims.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ObjectClaim {
    /// `name`.
    pub name: String,
    /// `uid`.
    pub uid: String,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

/// Who a verified, pod-bound token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodClaims {
    /// Namespace.
    pub namespace: String,
    /// ServiceAccount name.
    pub service_account: String,
    /// ServiceAccount uid.
    pub service_account_uid: String,
    /// Pod name.
    pub pod_name: String,
    /// Pod uid.
    pub pod_uid: String,
    /// `exp`.
    pub expires_at: i64,
}

impl Claims {
    /// Checks audience, time and the `kubernetes.io` claims of verified claims: `audience` must
    /// be among `aud`; `exp` must lie after `now - leeway`, `nbf` and `iat` before
    /// `now + leeway`; `sub` must agree with the `kubernetes.io` namespace and ServiceAccount;
    /// and the token must be bound to a pod.
    pub fn check(self, audience: &str, now: i64, leeway: i64) -> Result<PodClaims, JwtError> {
        if !self.aud.iter().any(|a| a == audience) {
            return Err(JwtError::WrongAudience);
        }
        if self.exp <= now.saturating_sub(leeway) {
            return Err(JwtError::Expired);
        }
        let future = |t: Option<i64>| t.is_some_and(|t| t > now.saturating_add(leeway));
        if future(self.nbf) || future(self.iat) {
            return Err(JwtError::NotYetValid);
        }
        let k8s = self.kubernetes.ok_or(JwtError::NotAServiceAccountToken)?;
        let expected_sub = format!(
            "system:serviceaccount:{}:{}",
            k8s.namespace, k8s.serviceaccount.name
        );
        if self.sub != expected_sub {
            return Err(JwtError::NotAServiceAccountToken);
        }
        let pod = k8s.pod.ok_or(JwtError::NotPodBound)?;
        if pod.name.is_empty() || pod.uid.is_empty() {
            return Err(JwtError::NotPodBound);
        }
        Ok(PodClaims {
            namespace: k8s.namespace,
            service_account: k8s.serviceaccount.name,
            service_account_uid: k8s.serviceaccount.uid,
            pod_name: pod.name,
            pod_uid: pod.uid,
            expires_at: self.exp,
        })
    }
}

#[cfg(test)]
mod tests {
    use iam_broker_testkit::signer::{Signer, pod_claims};
    use serde_json::json;

    use super::*;

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn a_signed_pod_token_verifies_and_names_the_pod() {
        let signer = Signer::new("k1");
        let keys = KeySet::from_jwks(&Signer::jwks(&[&signer])).unwrap();
        let token = signer.sign(&pod_claims("https://issuer", "ns", "sa", "web-1", NOW));
        assert!(looks_like_jwt(&token));
        let unverified = Unverified::parse(&token).unwrap();
        assert_eq!(unverified.issuer(), "https://issuer");
        assert_eq!(unverified.kid(), Some("k1"));
        let pod = unverified
            .verify(&keys)
            .unwrap()
            .check("iam-broker", NOW, 60)
            .unwrap();
        assert_eq!(pod.namespace, "ns");
        assert_eq!(pod.service_account, "sa");
        assert_eq!(pod.pod_name, "web-1");
        assert_eq!(pod.pod_uid, "pod-uid-1");
    }

    #[test]
    fn foreign_keys_tampering_and_algorithms_are_refused() {
        let ours = Signer::new("k1");
        let keys = KeySet::from_jwks(&Signer::jwks(&[&ours])).unwrap();
        let claims = pod_claims("https://issuer", "ns", "sa", "web-1", NOW);

        // Same kid, foreign key.
        let foreign = Signer::new("k1");
        let token = foreign.sign(&claims);
        let err = Unverified::parse(&token)
            .unwrap()
            .verify(&keys)
            .unwrap_err();
        assert_eq!(err, JwtError::BadSignature);

        // Unknown kid.
        let other = Signer::new("k2");
        let err = Unverified::parse(&other.sign(&claims))
            .unwrap()
            .verify(&keys)
            .unwrap_err();
        assert_eq!(err, JwtError::UnknownKey);

        // Claims swapped after signing.
        let token = ours.sign(&claims);
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = URL_SAFE_NO_PAD
            .encode(pod_claims("https://issuer", "kube-system", "admin", "x", NOW).to_string());
        parts[1] = &forged;
        let err = Unverified::parse(&parts.join("."))
            .unwrap()
            .verify(&keys)
            .unwrap_err();
        assert_eq!(err, JwtError::BadSignature);

        // alg none and HS256 never reach a key.
        for alg in ["none", "HS256", "RS512"] {
            let token = ours.sign_with(&json!({ "alg": alg, "kid": "k1" }), &claims);
            assert_eq!(
                Unverified::parse(&token).err(),
                Some(JwtError::UnsupportedAlgorithm)
            );
        }
        // An RS256 header over an EC key's signature finds no RS256 key.
        let token = ours.sign_with(&json!({ "alg": "RS256", "kid": "k1" }), &claims);
        assert_eq!(
            Unverified::parse(&token).unwrap().verify(&keys).err(),
            Some(JwtError::UnknownKey)
        );
    }

    #[test]
    fn audience_time_and_binding_are_checked() {
        let base = pod_claims("https://issuer", "ns", "sa", "web-1", NOW);
        let check = |patch: serde_json::Value| {
            let mut claims = base.clone();
            for (k, v) in patch.as_object().unwrap() {
                if v.is_null() {
                    claims.as_object_mut().unwrap().remove(k);
                } else {
                    claims[k] = v.clone();
                }
            }
            serde_json::from_value::<Claims>(claims)
                .unwrap()
                .check("iam-broker", NOW, 60)
                .map(|_| ())
        };
        assert_eq!(check(json!({})), Ok(()));
        assert_eq!(check(json!({ "aud": "iam-broker" })), Ok(()));
        assert_eq!(
            check(json!({ "aud": ["https://kubernetes.default.svc"] })),
            Err(JwtError::WrongAudience)
        );
        assert_eq!(check(json!({ "exp": NOW - 61 })), Err(JwtError::Expired));
        assert_eq!(check(json!({ "exp": NOW - 30 })), Ok(()), "within leeway");
        assert_eq!(
            check(json!({ "nbf": NOW + 61 })),
            Err(JwtError::NotYetValid)
        );
        assert_eq!(
            check(json!({ "iat": NOW + 61 })),
            Err(JwtError::NotYetValid)
        );
        assert_eq!(
            check(json!({ "sub": "system:serviceaccount:other:sa" })),
            Err(JwtError::NotAServiceAccountToken)
        );
        assert_eq!(
            check(json!({ "kubernetes.io": null })),
            Err(JwtError::NotAServiceAccountToken)
        );
        assert_eq!(
            check(json!({ "kubernetes.io": { "namespace": "ns",
                "serviceaccount": { "name": "sa", "uid": "u" } } })),
            Err(JwtError::NotPodBound)
        );
    }

    #[test]
    fn jwks_documents() {
        assert!(matches!(
            KeySet::from_jwks("[]"),
            Err(JwksError::NotAJwks(_))
        ));
        assert_eq!(
            KeySet::from_jwks(r#"{"keys":[]}"#),
            Err(JwksError::NoUsableKey)
        );
        assert_eq!(
            KeySet::from_jwks(r#"{"keys":[{"kty":"oct","k":"AAAA"}]}"#),
            Err(JwksError::NoUsableKey)
        );
        let short = json!({ "keys": [{ "kty": "RSA", "kid": "r", "n": URL_SAFE_NO_PAD.encode([1u8; 128]), "e": "AQAB" }] });
        assert!(matches!(
            KeySet::from_jwks(&short.to_string()),
            Err(JwksError::BadKey { .. })
        ));
        let signer = Signer::new("k1");
        let mut doc: serde_json::Value = serde_json::from_str(&Signer::jwks(&[&signer])).unwrap();
        doc["keys"]
            .as_array_mut()
            .unwrap()
            .push(json!({ "kty": "EC", "crv": "P-384", "x": "AA", "y": "AA" }));
        let set = KeySet::from_jwks(&doc.to_string()).unwrap();
        assert_eq!(set.kids().collect::<Vec<_>>(), ["k1"]);
        assert_eq!(set.skipped(), 1);
        assert!(set.has_key_for(Algorithm::Es256, Some("k1")));
        assert!(!set.has_key_for(Algorithm::Rs256, Some("k1")));
    }

    #[test]
    fn malformed_tokens() {
        for bad in ["", "a.b", "a.b.c.d", "eyJ.eyJ.", "!!!.###.$$$"] {
            assert_eq!(
                Unverified::parse(bad).err(),
                Some(JwtError::Malformed),
                "{bad}"
            );
        }
        assert!(!looks_like_jwt("iamb_abc"));
        let huge = format!("eyJ{}.e.e", "A".repeat(MAX_TOKEN_BYTES));
        assert_eq!(Unverified::parse(&huge).err(), Some(JwtError::Malformed));
    }
}
