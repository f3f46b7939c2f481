//! The lookup that turns a projected ServiceAccount token into the pod it is bound to.
//!
//! Clusters are told apart by their keys, not only their issuer: self-managed clusters often
//! share kubeadm's default issuer (`https://kubernetes.default.svc.cluster.local`), but each
//! has its own signing key, and kube-apiserver's `kid` is a hash of the public key. A token is
//! attributed to the one registered cluster with its issuer whose keys verify its signature.

use iam_broker_kernel::allowance::Subject;
use iam_broker_kernel::cluster::{ClusterName, RegisteredCluster};
use iam_broker_kernel::jwt::{JwtError, PodClaims, Unverified};

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
    use iam_broker_testkit::signer::{Signer, pod_claims};

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
    fn names_in_tokens_are_kubernetes_names() {
        let a = Signer::new("ka");
        let names_in_tokens = pod_claims(ISSUER, "Team", "app", "p", NOW);
        let clusters = [cluster("c", &[&a])];
        assert_eq!(
            identify(&a.sign(&names_in_tokens), &clusters, &verification(), NOW),
            Err(JwtError::NotAServiceAccountToken)
        );
    }
}
