//! The cluster registry's entries: each Kubernetes cluster whose projected ServiceAccount tokens
//! the broker accepts, with its issuer and verification keys. (The lookup that turns a token into
//! the pod it is bound to is the broker's: `iam_broker_broker::identity`.)
//!
//! Clusters are told apart by their keys, not only their issuer: self-managed clusters often
//! share kubeadm's default issuer (`https://kubernetes.default.svc.cluster.local`), but each
//! has its own signing key, and kube-apiserver's `kid` is a hash of the public key. A token is
//! attributed to the one registered cluster with its issuer whose keys verify its signature.

use crate::jwt::{JwksError, KeySet};
pub use crate::name::ClusterName;
use crate::name::InvalidName;

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

#[cfg(test)]
mod tests {
    use iam_broker_testkit::Signer;

    use super::*;

    const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
    const NOW: i64 = 1_800_000_000;

    fn cluster(name: &str, signers: &[&Signer]) -> RegisteredCluster {
        RegisteredCluster::new(name, ISSUER, &Signer::jwks(signers), "file test", NOW).unwrap()
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
    }
}
