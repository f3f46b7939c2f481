//! The lookup that turns a projected ServiceAccount token into the pod it is bound to.
//!
//! Clusters are told apart by their keys, not only their issuer: self-managed clusters often
//! share kubeadm's default issuer (`https://kubernetes.default.svc.cluster.local`), but each
//! has its own signing key, and kube-apiserver's `kid` is a hash of the public key. A token is
//! attributed to the one registered cluster with its issuer whose keys verify its signature.

use iam_broker_kernel::allowance::Subject;
use iam_broker_kernel::cluster::{ClusterName, RegisteredCluster};
pub use iam_broker_kernel::jwt::Verification;
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

/// Finds the cluster that signed `token` among `clusters`, verifies it and checks its claims.
///
/// Every registered cluster of the token's issuer that holds a key for its header is tried,
/// in registry order, until one verifies: with a `kid` that is one cluster (`cluster add`
/// keeps the key ids of one issuer apart), without a `kid` (which kube-apiserver always sets,
/// but other signers may not) every cluster of the issuer with a key of the algorithm.
///
/// [`JwtError::UnknownIssuer`] and [`JwtError::UnknownKey`] mean "not in this snapshot of the
/// registry": the caller may re-read the registry. They cost one signature check all the same,
/// like a [`JwtError::BadSignature`], so the time of a refusal does not tell what is registered.
pub fn identify(
    token: &str,
    clusters: &[RegisteredCluster],
    verification: &Verification,
    now: i64,
) -> Result<PodIdentity, JwtError> {
    let unverified = Unverified::parse(token)?;
    let (algorithm, kid) = (unverified.algorithm(), unverified.kid());
    let mut same_issuer = clusters
        .iter()
        .filter(|c| c.issuer == unverified.issuer())
        .peekable();
    let issuer_known = same_issuer.peek().is_some();
    let mut candidates = same_issuer
        .filter(|c| c.keys.has_key_for(algorithm, kid))
        .peekable();
    if candidates.peek().is_none() {
        unverified.spend_one_verification();
        return Err(if issuer_known {
            JwtError::UnknownKey
        } else {
            JwtError::UnknownIssuer
        });
    }
    let (cluster, claims) = candidates
        .find_map(|c| unverified.verify(&c.keys).ok().map(|claims| (c, claims)))
        .ok_or(JwtError::BadSignature)?;
    let claims = claims.check(verification, now)?;
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
            max_lifetime: 86_400,
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
    fn a_token_without_kid_is_tried_against_every_cluster_of_its_issuer() {
        let (a, b) = (Signer::new("ka"), Signer::new("kb"));
        let clusters = [cluster("east", &[&a]), cluster("west", &[&b])];
        let claims = pod_claims(ISSUER, "team", "app", "web-1", NOW);
        // kube-apiserver always sets `kid`; another signer may not
        let no_kid =
            |signer: &Signer| signer.sign_with(&serde_json::json!({ "alg": "ES256" }), &claims);
        let from_b = identify(&no_kid(&b), &clusters, &verification(), NOW).unwrap();
        assert_eq!(
            from_b.cluster.as_str(),
            "west",
            "not only the first cluster's keys"
        );
        let from_a = identify(&no_kid(&a), &clusters, &verification(), NOW).unwrap();
        assert_eq!(from_a.cluster.as_str(), "east");
        // a key of neither cluster still fails on its signature
        assert_eq!(
            identify(&no_kid(&Signer::new("kc")), &clusters, &verification(), NOW),
            Err(JwtError::BadSignature)
        );
        // and a kid-less RS256 token finds no RS256 key in either
        let rs = serde_json::json!({ "alg": "RS256" });
        assert_eq!(
            identify(&a.sign_with(&rs, &claims), &clusters, &verification(), NOW),
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
