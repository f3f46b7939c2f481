//! The cluster registry: each Kubernetes cluster whose projected ServiceAccount tokens the broker
//! accepts, with its issuer and verification keys, and the lookup that turns a token into the
//! pod it is bound to.
//!
//! Clusters are told apart by their keys, not only their issuer: self-managed clusters often
//! share kubeadm's default issuer (`https://kubernetes.default.svc.cluster.local`), but each
//! has its own signing key, and kube-apiserver's `kid` is a hash of the public key. A token is
//! attributed to the one registered cluster with its issuer whose keys verify its signature.

use std::fmt;

use crate::allowance::{InvalidName, Subject};
use crate::jwt::{JwksError, JwtError, KeySet, PodClaims, Unverified};

/// A registered cluster's name: a DNS-1123 label (1–63 of `a-z`, `0-9`, `-`). It scopes
/// allowances and is the `eks-cluster-name` session tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterName(String);

impl ClusterName {
    /// Validates a cluster name.
    pub fn parse(value: &str) -> Result<Self, InvalidName> {
        crate::allowance::validate_dns_label("cluster name", value)?;
        Ok(Self(value.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a cluster could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterRegistrationError {
    /// The name is not a DNS label.
    #[error(transparent)]
    Name(#[from] InvalidName),
    /// The issuer is not an `https://` URL (or `http://` for a local test cluster).
    #[error("issuer {0:?} is not an http(s) URL")]
    Issuer(String),
    /// The key set is unusable.
    #[error(transparent)]
    Jwks(#[from] JwksError),
    /// Another registered cluster with the same issuer holds one of the keys: tokens could not
    /// be told apart.
    #[error("cluster {other} has the same issuer and already holds key {kid}")]
    SharedKey {
        /// The other cluster.
        other: ClusterName,
        /// The shared `kid`.
        kid: String,
    },
}

/// One registered cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredCluster {
    /// Its name.
    pub name: ClusterName,
    /// The `iss` of its ServiceAccount tokens.
    pub issuer: String,
    /// The JWKS document as fetched (stored verbatim).
    pub jwks: String,
    /// The parsed keys of [`Self::jwks`].
    pub keys: KeySet,
    /// Where the keys came from (`api-server https://…` or `file …`), for `cluster list`.
    pub source: String,
    /// When the keys were last stored, epoch seconds.
    pub updated_at: i64,
}

impl RegisteredCluster {
    /// Builds a cluster from what an operator or the store gives, validating all of it.
    pub fn new(
        name: &str,
        issuer: &str,
        jwks: &str,
        source: &str,
        updated_at: i64,
    ) -> Result<Self, ClusterRegistrationError> {
        let name = ClusterName::parse(name)?;
        let issuer_ok = (issuer.starts_with("https://") || issuer.starts_with("http://"))
            && issuer.len() <= 2048
            && !issuer.chars().any(char::is_whitespace);
        if !issuer_ok {
            return Err(ClusterRegistrationError::Issuer(crate::text::clip(
                issuer,
                crate::text::MAX_ECHO,
            )));
        }
        let keys = KeySet::from_jwks(jwks)?;
        Ok(Self {
            name,
            issuer: issuer.to_owned(),
            jwks: jwks.to_owned(),
            keys,
            source: source.to_owned(),
            updated_at,
        })
    }

    /// Refuses to register `self` next to `others` when a cluster with the same issuer already
    /// holds one of its `kid`s (re-registering the same name is fine).
    pub fn check_distinct(
        &self,
        others: &[RegisteredCluster],
    ) -> Result<(), ClusterRegistrationError> {
        for other in others
            .iter()
            .filter(|o| o.name != self.name && o.issuer == self.issuer)
        {
            if let Some(kid) = self
                .keys
                .kids()
                .find(|kid| other.keys.kids().any(|k| k == *kid))
            {
                return Err(ClusterRegistrationError::SharedKey {
                    other: other.name.clone(),
                    kid: kid.to_owned(),
                });
            }
        }
        Ok(())
    }
}

/// A pod identified by a verified projected ServiceAccount token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    /// The cluster whose key signed the token.
    pub cluster: ClusterName,
    /// Namespace and ServiceAccount (validated as Kubernetes names).
    pub subject: Subject,
    /// The verified claims.
    pub claims: PodClaims,
}

/// Settings of token verification.
#[derive(Debug, Clone)]
pub struct Verification {
    /// The audience tokens must carry (`PROJECTED_AUDIENCE`).
    pub audience: String,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
    pub leeway: i64,
}

/// Finds the cluster that signed `token` among `clusters`, verifies it and checks its claims.
///
/// [`JwtError::UnknownIssuer`] and [`JwtError::UnknownKey`] mean "not in this snapshot of the
/// registry": the caller may re-read the registry once and try again.
pub fn identify(
    token: &str,
    clusters: &[RegisteredCluster],
    verification: &Verification,
    now: i64,
) -> Result<PodIdentity, JwtError> {
    let unverified = Unverified::parse(token)?;
    let mut same_issuer = clusters
        .iter()
        .filter(|c| c.issuer == unverified.issuer())
        .peekable();
    if same_issuer.peek().is_none() {
        return Err(JwtError::UnknownIssuer);
    }
    let cluster = same_issuer
        .find(|c| c.keys.has_key_for(unverified.algorithm(), unverified.kid()))
        .ok_or(JwtError::UnknownKey)?;
    let claims = unverified.verify(&cluster.keys)?.check(
        &verification.audience,
        now,
        verification.leeway,
    )?;
    let subject = Subject::service_account(&claims.namespace, &claims.service_account)
        .map_err(|_| JwtError::NotAServiceAccountToken)?;
    Ok(PodIdentity {
        cluster: cluster.name.clone(),
        subject,
        claims,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::tests::{Signer, pod_claims};

    const NOW: i64 = 1_800_000_000;
    const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

    fn cluster(name: &str, signers: &[&Signer]) -> RegisteredCluster {
        RegisteredCluster::new(name, ISSUER, &Signer::jwks(signers), "file test", NOW).unwrap()
    }

    fn verification() -> Verification {
        Verification {
            audience: "iam-broker".to_owned(),
            leeway: 60,
        }
    }

    #[test]
    fn clusters_with_one_issuer_are_told_apart_by_their_keys() {
        let (a, b) = (Signer::new("ka"), Signer::new("kb"));
        let clusters = [cluster("east", &[&a]), cluster("west", &[&b])];
        let claims = pod_claims(ISSUER, "team", "app", "web-1", NOW);
        let from_b = identify(&b.sign(&claims), &clusters, &verification(), NOW).unwrap();
        assert_eq!(from_b.cluster.as_str(), "west");
        assert_eq!(
            from_b.subject,
            Subject::service_account("team", "app").unwrap()
        );
        let from_a = identify(&a.sign(&claims), &clusters, &verification(), NOW).unwrap();
        assert_eq!(from_a.cluster.as_str(), "east");

        // A key that claims east's kid but is not east's key.
        let impostor = Signer::new("ka");
        assert_eq!(
            identify(&impostor.sign(&claims), &clusters, &verification(), NOW),
            Err(JwtError::BadSignature)
        );
        let other_issuer = pod_claims("https://elsewhere", "team", "app", "web-1", NOW);
        assert_eq!(
            identify(&a.sign(&other_issuer), &clusters, &verification(), NOW),
            Err(JwtError::UnknownIssuer)
        );
        assert_eq!(
            identify(
                &Signer::new("kc").sign(&claims),
                &clusters,
                &verification(),
                NOW
            ),
            Err(JwtError::UnknownKey)
        );
    }

    #[test]
    fn a_key_cannot_belong_to_two_clusters_of_one_issuer() {
        let a = Signer::new("ka");
        let east = cluster("east", &[&a]);
        let west = cluster("west", &[&a]);
        assert!(matches!(
            west.check_distinct(std::slice::from_ref(&east)),
            Err(ClusterRegistrationError::SharedKey { .. })
        ));
        assert_eq!(east.check_distinct(std::slice::from_ref(&east)), Ok(()));
    }

    #[test]
    fn registrations_are_validated() {
        let a = Signer::new("ka");
        let jwks = Signer::jwks(&[&a]);
        assert!(RegisteredCluster::new("Bad_Name", ISSUER, &jwks, "", 0).is_err());
        assert!(RegisteredCluster::new("c", "kubernetes.default", &jwks, "", 0).is_err());
        assert!(RegisteredCluster::new("c", ISSUER, "{}", "", 0).is_err());
        let names_in_tokens = pod_claims(ISSUER, "Team", "app", "p", NOW);
        let clusters = [cluster("c", &[&a])];
        assert_eq!(
            identify(&a.sign(&names_in_tokens), &clusters, &verification(), NOW),
            Err(JwtError::NotAServiceAccountToken)
        );
    }
}
