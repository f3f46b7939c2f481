//! The one JWT signer of the tests, fuzz targets, benchmarks and the Kubernetes API stand-in: a
//! ServiceAccount-token issuer's key, RS256 (RSA 2048, kube-apiserver's default) or ES256
//! (P-256), its public half as a JWK, and compact JWS signing.
//!
//! [`Signer::generate`] names a key as kube-apiserver does (`keyIDFromPublicKey`: unpadded
//! base64url of the SHA-256 of the DER SubjectPublicKeyInfo); [`Signer::new`] gives an ES256 key
//! a chosen `kid`, for tests that name their keys.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use rsa::pkcs8::EncodePublicKey as _;
use rsa::signature::{SignatureEncoding as _, Signer as _};
use rsa::traits::PublicKeyParts as _;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// RSA keys are this long, as `openssl genrsa` and kubeadm make them.
const RSA_KEY_BITS: usize = 2048;

/// Why a key could not be made or could not sign.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SignerError(String);

/// The algorithm a key signs with, as kube-apiserver picks it from the key in
/// `--service-account-signing-key-file`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SigningAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256 and an RSA 2048 key: what clusters use by default.
    #[default]
    Rs256,
    /// ECDSA with P-256 and SHA-256.
    Es256,
}

impl SigningAlgorithm {
    /// The JOSE name (`alg`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
        }
    }
}

impl fmt::Display for SigningAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SigningAlgorithm {
    type Err = SignerError;

    fn from_str(text: &str) -> Result<Self, SignerError> {
        match text {
            "RS256" => Ok(Self::Rs256),
            "ES256" => Ok(Self::Es256),
            other => Err(SignerError(format!(
                "unknown signing algorithm {other:?} (RS256 or ES256)"
            ))),
        }
    }
}

enum PrivateKey {
    Rsa(Box<rsa::pkcs1v15::SigningKey<Sha256>>),
    P256(Box<EcdsaKeyPair>),
}

/// A signing key. The private half never leaves it, nor shows in its `Debug`.
pub struct Signer {
    /// The `kid` its tokens and its JWK carry.
    pub kid: String,
    algorithm: SigningAlgorithm,
    private: PrivateKey,
    /// The JWK's key members (`kty`, `n`/`e` or `crv`/`x`/`y`), without `kid`.
    public: Value,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A fresh key of `algorithm`, named as kube-apiserver names it.
    pub fn generate(algorithm: SigningAlgorithm) -> Result<Self, SignerError> {
        match algorithm {
            SigningAlgorithm::Rs256 => Self::generate_rsa(),
            SigningAlgorithm::Es256 => Self::generate_p256(),
        }
    }

    /// A fresh ES256 key named `kid`. Panics only when the system's random source fails.
    #[allow(
        clippy::expect_used,
        reason = "a test kit: no RNG means no test can run"
    )]
    pub fn new(kid: &str) -> Self {
        Self::generate(SigningAlgorithm::Es256)
            .expect("the system random source makes a P-256 key")
            .with_kid(kid)
    }

    /// The same key under another `kid`.
    pub fn with_kid(mut self, kid: &str) -> Self {
        kid.clone_into(&mut self.kid);
        self
    }

    fn generate_rsa() -> Result<Self, SignerError> {
        let private = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, RSA_KEY_BITS)
            .map_err(|e| SignerError(format!("generating an RSA key: {e}")))?;
        let public = private.to_public_key();
        let spki = public
            .to_public_key_der()
            .map_err(|e| SignerError(format!("encoding the RSA public key: {e}")))?;
        Ok(Self {
            kid: key_id(spki.as_bytes()),
            algorithm: SigningAlgorithm::Rs256,
            private: PrivateKey::Rsa(Box::new(rsa::pkcs1v15::SigningKey::new(private))),
            public: json!({ "kty": "RSA",
                "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
                "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()) }),
        })
    }

    fn generate_p256() -> Result<Self, SignerError> {
        use rcgen::PublicKeyData as _;
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| SignerError("generating a P-256 key failed".to_owned()))?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|_| SignerError("reading the P-256 key back failed".to_owned()))?;
        let spki = rcgen::KeyPair::try_from(pkcs8.as_ref())
            .map_err(|e| SignerError(format!("encoding the P-256 public key: {e}")))?
            .subject_public_key_info();
        // An uncompressed point: 0x04, then x and y of 32 bytes each.
        let point = pair.public_key().as_ref();
        let (x, y) = point.get(1..33).zip(point.get(33..65)).ok_or_else(|| {
            SignerError("the P-256 public key is not an uncompressed point".to_owned())
        })?;
        let public = json!({ "kty": "EC", "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y) });
        Ok(Self {
            kid: key_id(&spki),
            algorithm: SigningAlgorithm::Es256,
            private: PrivateKey::P256(Box::new(pair)),
            public,
        })
    }

    /// What the key signs with.
    pub fn algorithm(&self) -> SigningAlgorithm {
        self.algorithm
    }

    /// The public key as a JWKS lists it (`use`, `alg`, `kid` and the key members).
    pub fn jwk(&self) -> Value {
        let mut jwk = json!({ "use": "sig", "alg": self.algorithm.name(), "kid": self.kid });
        if let (Some(jwk), Some(public)) = (jwk.as_object_mut(), self.public.as_object()) {
            jwk.extend(public.clone());
        }
        jwk
    }

    /// A JWKS document of `signers`' public keys.
    pub fn jwks(signers: &[&Signer]) -> String {
        json!({ "keys": signers.iter().map(|s| s.jwk()).collect::<Vec<_>>() }).to_string()
    }

    /// The JWS signature of `signing_input` (PKCS#1 v1.5, or ECDSA as `r || s`).
    pub fn signature(&self, signing_input: &[u8]) -> Result<Vec<u8>, SignerError> {
        match &self.private {
            PrivateKey::Rsa(key) => key
                .try_sign(signing_input)
                .map(|signature| signature.to_vec())
                .map_err(|e| SignerError(format!("RS256 signing failed: {e}"))),
            PrivateKey::P256(pair) => pair
                .sign(&SystemRandom::new(), signing_input)
                .map(|signature| signature.as_ref().to_vec())
                .map_err(|_| SignerError("ES256 signing failed".to_owned())),
        }
    }

    /// A compact JWS of any `header` over any claim bytes (for tokens no issuer would make).
    pub fn try_sign_raw(&self, header: &Value, claims: &[u8]) -> Result<String, SignerError> {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let signature = self.signature(input.as_bytes())?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }

    /// A compact JWS of `claims` with kube-apiserver's header (`alg` and `kid`, no `typ`).
    pub fn try_sign(&self, claims: &Value) -> Result<String, SignerError> {
        let header = json!({ "alg": self.algorithm.name(), "kid": self.kid });
        self.try_sign_raw(&header, claims.to_string().as_bytes())
    }

    /// [`Self::try_sign_raw`] with JSON claims. Panics only when the key cannot sign.
    #[allow(
        clippy::expect_used,
        reason = "a test kit: a key that cannot sign fails the test"
    )]
    pub fn sign_with(&self, header: &Value, claims: &Value) -> String {
        self.try_sign_raw(header, claims.to_string().as_bytes())
            .expect("a generated key signs")
    }

    /// [`Self::try_sign`]. Panics only when the key cannot sign.
    #[allow(
        clippy::expect_used,
        reason = "a test kit: a key that cannot sign fails the test"
    )]
    pub fn sign(&self, claims: &Value) -> String {
        self.try_sign(claims).expect("a generated key signs")
    }
}

/// Kubernetes' key id (`keyIDFromPublicKey`): unpadded base64url of the SHA-256 of the DER
/// PKIX SubjectPublicKeyInfo.
pub fn key_id(spki_der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(spki_der))
}

/// The claims kube-apiserver puts in a pod-bound token of audience `iam-broker`, issued at
/// `now` for an hour.
pub fn pod_claims(iss: &str, ns: &str, sa: &str, pod: &str, now: i64) -> Value {
    json!({
        "iss": iss, "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "aud": ["iam-broker"], "exp": now + 3600, "iat": now, "nbf": now,
        "kubernetes.io": { "namespace": ns,
            "serviceaccount": { "name": sa, "uid": "sa-uid-1" },
            "pod": { "name": pod, "uid": "pod-uid-1" } },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_algorithms_sign_what_their_jwk_describes() {
        for algorithm in [SigningAlgorithm::Rs256, SigningAlgorithm::Es256] {
            let signer = Signer::generate(algorithm).unwrap();
            let jwk = signer.jwk();
            assert_eq!(jwk["alg"], algorithm.name());
            assert_eq!(jwk["kid"], signer.kid);
            // Kubernetes key ids are 43 characters of unpadded base64url.
            assert_eq!(signer.kid.len(), 43, "{algorithm}");
            let token = signer.sign(&json!({ "sub": "x" }));
            assert_eq!(token.split('.').count(), 3);
        }
        let named = Signer::new("k1");
        assert_eq!(named.jwk()["kid"], "k1");
        assert!(Signer::jwks(&[&named]).contains("\"kid\":\"k1\""));
    }

    #[test]
    fn signing_keys_never_show_their_private_half() {
        let key = Signer::generate(SigningAlgorithm::Es256).unwrap();
        let shown = format!("{key:?}");
        assert!(shown.contains(&key.kid));
        assert!(!shown.contains("private"));
    }
}
