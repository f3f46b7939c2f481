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
/// Shortest RSA modulus accepted, in bits (ring verifies 2048..=8192).
const MIN_RSA_MODULUS_BITS: usize = 2048;
/// Longest RSA modulus accepted, in bits.
const MAX_RSA_MODULUS_BITS: usize = 8192;

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
            check_rsa(&n, &e).map_err(&bad)?;
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
            // SEC1 public-key validation: coordinates below the field prime, the point on the
            // curve (P-256's cofactor is 1, so that also puts it in the right subgroup).
            if p256::PublicKey::from_sec1_bytes(&point).is_err() {
                return Err(bad("the point (x, y) is not on the P-256 curve"));
            }
            Ok(Some(PublicKey {
                kid,
                algorithm: Algorithm::Es256,
                material: Material::Ec { point },
            }))
        }
        _ => Ok(None),
    }
}

/// An RSA public key that can verify safely: a modulus of 2048..=8192 bits that is odd (an even
/// one is no product of two large primes), and an odd exponent of at least 3 that fits in 32
/// bits (`e = 1` would make every "signature" equal to its own padded message).
fn check_rsa(n: &[u8], e: &[u8]) -> Result<(), &'static str> {
    let bits = bit_length(n);
    if bits < MIN_RSA_MODULUS_BITS {
        return Err("the RSA modulus is shorter than 2048 bits");
    }
    if bits > MAX_RSA_MODULUS_BITS {
        return Err("the RSA modulus is longer than 8192 bits");
    }
    if n.last().is_some_and(|b| b & 1 == 0) {
        return Err("the RSA modulus is even");
    }
    if e.is_empty() || e.len() > 4 {
        return Err("the RSA exponent is out of range (3 ..= 2^32 - 1)");
    }
    let exponent = e.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    if exponent < 3 || exponent % 2 == 0 {
        return Err("the RSA exponent is not an odd number of at least 3");
    }
    Ok(())
}

/// Bits of a big-endian unsigned integer without leading zero bytes.
fn bit_length(bytes: &[u8]) -> usize {
    match bytes.first() {
        None => 0,
        Some(first) => bytes.len() * 8 - first.leading_zeros() as usize,
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
    /// The header lists critical extensions (`crit`, RFC 7515 §4.1.11): this broker
    /// understands none, so it must refuse the token.
    #[error("critical header extensions")]
    CriticalExtension,
    /// `exp - iat` is longer than the broker accepts, or the token has no `iat`.
    #[error("lifetime too long")]
    LifetimeTooLong,
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
    /// Whether `crit` is there: any value at all (even `null` or an empty list, which RFC 7515
    /// forbids) refuses the token.
    #[serde(default, deserialize_with = "present")]
    crit: bool,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| true)
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
        if header.crit {
            return Err(JwtError::CriticalExtension);
        }
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
    pub fn verify(&self, keys: &KeySet) -> Result<Claims, JwtError> {
        let mut candidates = keys
            .candidates(self.algorithm, self.kid.as_deref())
            .peekable();
        if candidates.peek().is_none() {
            return Err(JwtError::UnknownKey);
        }
        let message = self.signing_input.as_bytes();
        if candidates.any(|key| key.verifies(message, &self.signature)) {
            Ok(self.claims.clone())
        } else {
            Err(JwtError::BadSignature)
        }
    }

    /// Spends what checking the signature against one key costs, and throws the answer away: a
    /// token refused because no registered key could have signed it then takes as long as one
    /// refused for a bad signature, so timing does not tell which issuers and key ids are
    /// registered.
    pub fn spend_one_verification(&self) {
        let key = match self.algorithm {
            Algorithm::Rs256 => &DECOY_KEYS.0,
            Algorithm::Es256 => &DECOY_KEYS.1,
        };
        let verified = key.verifies(self.signing_input.as_bytes(), &self.signature);
        std::hint::black_box(verified);
    }
}

/// Public keys no token can be signed for (an RSA modulus whose factors were thrown away; P-256's
/// generator, whose private key is 1 and which no cluster uses), of each algorithm, for
/// [`Unverified::spend_one_verification`].
static DECOY_KEYS: std::sync::LazyLock<(PublicKey, PublicKey)> = std::sync::LazyLock::new(|| {
    const N: &str = "rRjNBHYqJVY8Yry4Mxwk4Pnjv4H8bRE8obZ2EveVdb8dpufHuDo1Lj04kBlVlPk2I-ULD1uAEgykvU5PCya8a5wG_A-vq0F6SklQQPOBT2BLodMmSNvrOqLNou4-af5AnKMaK9o_mpGfxdZNhoEH6YYlWYNWKA6OurNcaR2JjDdkwGyQ8nq2FtuJkdhiv1qytdcX1PWnNpD207fbs4PhN2VrC-3Ji_iaRmm90JlYlZk87R6kbb4zyYoTk6N1jNZo9Ty1qKCkWdfUbKHczO5QOCjjd88QB83Io_ONDlIY4zKOv2bwJkl7LrT0vXq5ez6TkEH5c_E8-g3r-7gM5c74iw";
    const G: &str =
        "BGsX0fLhLEJH-Lzm5WOkQPJ3A32BLeszoPShOUXYmMKWT-NC4v4af5uO5-tKfA-eFivOM1drMV7Oy7ZAaDe_UfU";
    let decode = |text: &str| URL_SAFE_NO_PAD.decode(text).unwrap_or_default();
    (
        PublicKey {
            kid: None,
            algorithm: Algorithm::Rs256,
            material: Material::Rsa {
                n: decode(N),
                e: vec![1, 0, 1],
            },
        },
        PublicKey {
            kid: None,
            algorithm: Algorithm::Es256,
            material: Material::Ec { point: decode(G) },
        },
    )
});

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

/// What verified claims must satisfy besides their signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// The audience tokens must carry (`PROJECTED_AUDIENCE`).
    pub audience: String,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
    pub leeway: i64,
    /// The longest lifetime (`exp - iat`, seconds) accepted
    /// (`PROJECTED_MAX_TOKEN_LIFETIME_SECONDS`): a token minted to outlive its pod by far is
    /// refused, whoever was allowed to request it.
    pub max_lifetime: i64,
}

impl Claims {
    /// Checks audience, time and the `kubernetes.io` claims of verified claims: the audience
    /// must be among `aud`; `exp` must lie after `now - leeway`, `nbf` and `iat` before
    /// `now + leeway`; `iat` must be present and `exp - iat` at most the maximum lifetime;
    /// `sub` must agree with the `kubernetes.io` namespace and ServiceAccount; and the token
    /// must be bound to a pod.
    pub fn check(self, rules: &Verification, now: i64) -> Result<PodClaims, JwtError> {
        let leeway = rules.leeway;
        if !self.aud.contains(&rules.audience) {
            return Err(JwtError::WrongAudience);
        }
        if self.exp <= now.saturating_sub(leeway) {
            return Err(JwtError::Expired);
        }
        let future = |t: Option<i64>| t.is_some_and(|t| t > now.saturating_add(leeway));
        if future(self.nbf) || future(self.iat) {
            return Err(JwtError::NotYetValid);
        }
        // kube-apiserver always writes `iat`; without it the lifetime cannot be bounded.
        let issued = self.iat.ok_or(JwtError::LifetimeTooLong)?;
        if self.exp.saturating_sub(issued) > rules.max_lifetime {
            return Err(JwtError::LifetimeTooLong);
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
    use iam_broker_testkit::signer::{Signer, SigningAlgorithm, pod_claims};
    use serde_json::json;

    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn rules() -> Verification {
        Verification {
            audience: "iam-broker".to_owned(),
            leeway: 60,
            max_lifetime: 86_400,
        }
    }

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
            .check(&rules(), NOW)
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
                .check(&rules(), NOW)
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
    fn a_lifetime_beyond_the_maximum_is_refused() {
        let base = pod_claims("https://issuer", "ns", "sa", "web-1", NOW);
        let check = |iat: Option<i64>, exp: i64| {
            let mut claims = base.clone();
            claims["exp"] = json!(exp);
            match iat {
                Some(iat) => claims["iat"] = json!(iat),
                None => {
                    claims.as_object_mut().unwrap().remove("iat");
                }
            }
            serde_json::from_value::<Claims>(claims)
                .unwrap()
                .check(&rules(), NOW)
                .map(|_| ())
        };
        // exactly the maximum, issued now or a while ago
        assert_eq!(check(Some(NOW), NOW + 86_400), Ok(()));
        assert_eq!(check(Some(NOW - 80_000), NOW + 6_400), Ok(()));
        // a hundred years, or a second too many
        let century = 100 * 365 * 86_400;
        assert_eq!(
            check(Some(NOW), NOW + century),
            Err(JwtError::LifetimeTooLong)
        );
        assert_eq!(
            check(Some(NOW), NOW + 86_401),
            Err(JwtError::LifetimeTooLong)
        );
        // an `iat` far in the past cannot stretch a long token into the window (exp - iat
        // only grows), and a missing `iat` cannot hide the lifetime
        assert_eq!(
            check(Some(NOW - century), NOW + 60),
            Err(JwtError::LifetimeTooLong)
        );
        assert_eq!(check(None, NOW + 600), Err(JwtError::LifetimeTooLong));
        // extreme values do not overflow
        assert_eq!(
            check(Some(i64::MIN), i64::MAX),
            Err(JwtError::LifetimeTooLong)
        );
    }

    #[test]
    fn critical_header_extensions_are_refused() {
        let signer = Signer::new("k1");
        let keys = KeySet::from_jwks(&Signer::jwks(&[&signer])).unwrap();
        let claims = pod_claims("https://issuer", "ns", "sa", "web-1", NOW);
        for crit in [
            json!(["urn:example:must-understand"]),
            json!(["exp"]),
            json!([]),
            json!("b64"),
            json!(null),
        ] {
            let header = json!({ "alg": "ES256", "kid": "k1", "crit": crit });
            let token = signer.sign_with(&header, &claims);
            assert_eq!(
                Unverified::parse(&token).err(),
                Some(JwtError::CriticalExtension),
                "{crit}"
            );
        }
        // the same token without `crit` verifies
        let token = signer.sign_with(&json!({ "alg": "ES256", "kid": "k1" }), &claims);
        assert!(Unverified::parse(&token).unwrap().verify(&keys).is_ok());
    }

    fn rsa_jwk(n: &[u8], e: &[u8]) -> String {
        json!({ "keys": [{ "kty": "RSA", "kid": "r", "alg": "RS256", "use": "sig",
            "n": URL_SAFE_NO_PAD.encode(n), "e": URL_SAFE_NO_PAD.encode(e) }] })
        .to_string()
    }

    fn ec_jwk(x: &[u8], y: &[u8]) -> String {
        json!({ "keys": [{ "kty": "EC", "kid": "e", "crv": "P-256", "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y) }] })
        .to_string()
    }

    fn refusal(jwks: &str) -> String {
        match KeySet::from_jwks(jwks) {
            Err(JwksError::BadKey { why, .. }) => why,
            other => panic!("accepted or refused for another reason: {other:?}"),
        }
    }

    #[test]
    fn keys_that_cannot_verify_safely_are_refused_when_read() {
        // a real 2048-bit modulus: odd, top bit set
        let mut n = vec![0xffu8; 256];
        n[255] = 0xf1;
        assert!(KeySet::from_jwks(&rsa_jwk(&n, &[1, 0, 1])).is_ok());
        assert!(KeySet::from_jwks(&rsa_jwk(&n, &[3])).is_ok());
        assert!(refusal(&rsa_jwk(&n, &[1])).contains("exponent"));
        assert!(refusal(&rsa_jwk(&n, &[2])).contains("exponent"));
        assert!(refusal(&rsa_jwk(&n, &[1, 0, 0])).contains("exponent"));
        assert!(refusal(&rsa_jwk(&n, &[])).contains("exponent"));
        assert!(refusal(&rsa_jwk(&n, &[1, 0, 0, 0, 1])).contains("exponent"));
        // 256 bytes, but only 2041 bits: too short
        let mut short = n.clone();
        short[0] = 0x01;
        assert!(refusal(&rsa_jwk(&short, &[1, 0, 1])).contains("2048 bits"));
        // leading zero bytes do not count
        let mut padded = vec![0u8; 4];
        padded.extend_from_slice(&n[..255]);
        assert!(refusal(&rsa_jwk(&padded, &[1, 0, 1])).contains("2048 bits"));
        let mut even = n.clone();
        even[255] = 0xf0;
        assert!(refusal(&rsa_jwk(&even, &[1, 0, 1])).contains("even"));
        let mut huge = vec![0xffu8; 1025];
        huge[1024] = 0x01;
        assert!(refusal(&rsa_jwk(&huge, &[1, 0, 1])).contains("8192"));

        // P-256: the generator is on the curve; (x, y + 1) is not; nor are coordinates at or
        // beyond the field prime
        let g_x = hex_bytes("6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296");
        let g_y = hex_bytes("4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5");
        assert!(KeySet::from_jwks(&ec_jwk(&g_x, &g_y)).is_ok());
        let mut off = g_y.clone();
        off[31] ^= 1;
        assert!(refusal(&ec_jwk(&g_x, &off)).contains("not on the P-256 curve"));
        let p = hex_bytes("ffffffff00000001000000000000000000000000ffffffffffffffffffffffff");
        assert!(refusal(&ec_jwk(&p, &g_y)).contains("not on the P-256 curve"));
        assert!(refusal(&ec_jwk(&[0; 32], &[0; 32])).contains("not on the P-256 curve"));
        // and every key the test signer makes passes
        for algorithm in [SigningAlgorithm::Es256, SigningAlgorithm::Rs256] {
            let signer = Signer::generate(algorithm).unwrap();
            assert!(KeySet::from_jwks(&Signer::jwks(&[&signer])).is_ok());
        }
    }

    #[test]
    fn the_decoy_keys_are_keys_a_cluster_could_hold() {
        let (rsa, ec) = &*DECOY_KEYS;
        match (&rsa.material, &ec.material) {
            (Material::Rsa { n, e }, Material::Ec { point }) => {
                assert_eq!(check_rsa(n, e), Ok(()));
                assert!(p256::PublicKey::from_sec1_bytes(point).is_ok());
            }
            _ => panic!("decoys of the wrong kinds"),
        }
        // and spending a verification on any token never panics
        let signer = Signer::new("k1");
        let token = signer.sign(&pod_claims("https://issuer", "ns", "sa", "web-1", NOW));
        Unverified::parse(&token).unwrap().spend_one_verification();
        let rsa_header = signer.sign_with(&json!({ "alg": "RS256" }), &json!({ "iss": "x" }));
        if let Ok(unverified) = Unverified::parse(&rsa_header) {
            unverified.spend_one_verification();
        }
    }

    fn hex_bytes(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
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
