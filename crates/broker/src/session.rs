//! STS session naming, tagging and source identity: CloudTrail must say which pod asked, ABAC
//! policies written for EKS Pod Identity must carry over, and none of it may ever hold a token.
//!
//! STS limits that apply (and what is done about them):
//! - `RoleSessionName`: 2–64 characters of `[\w+=,.@-]`. Other characters become `-`; a longer
//!   name keeps its first 55 characters, a `-` and 8 hex digits of the SHA-256 of the whole
//!   name, so two long names that share a prefix stay apart.
//! - `SourceIdentity`: the same alphabet and 2–64 characters, same rule.
//! - Session tags: at most 50, keys up to 128 characters, values up to 256 characters of
//!   letters, digits, spaces and `_.:/=+-@`. Kubernetes names and uids only use `a-z0-9.-`;
//!   values are cut to 256 characters all the same. The packed size of tags and policies is
//!   checked by STS (`PackedPolicyTooLarge`), which the broker reports as `AssumeRoleFailed`.

use sha2::{Digest, Sha256};

use iam_broker_kernel::allowance::Subject;

/// Longest `RoleSessionName` and `SourceIdentity` STS accepts.
const MAX_NAME: usize = 64;
/// Longest session tag value STS accepts.
const MAX_TAG_VALUE: usize = 256;

/// Session tag key: the pod's namespace (as EKS Pod Identity).
pub const TAG_NAMESPACE: &str = "kubernetes-namespace";
/// Session tag key: the pod's ServiceAccount.
pub const TAG_SERVICE_ACCOUNT: &str = "kubernetes-service-account";
/// Session tag key: the pod's name.
pub const TAG_POD_NAME: &str = "kubernetes-pod-name";
/// Session tag key: the pod's uid.
pub const TAG_POD_UID: &str = "kubernetes-pod-uid";
/// Session tag key: the cluster's name (EKS Pod Identity's key, so `aws:PrincipalTag`
/// conditions on it carry over).
pub const TAG_CLUSTER_NAME: &str = "eks-cluster-name";

/// Who a session is for: what the token record or the verified token says about the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionContext<'a> {
    /// Namespace and ServiceAccount.
    pub subject: &'a Subject,
    /// The cluster's name: the registered cluster's for projected tokens, `CLUSTER_NAME` for
    /// Secret-mode tokens; `None` when unnamed.
    pub cluster: Option<&'a str>,
    /// The pod's name (Secret mode: as known at admission, possibly the `generateName` prefix).
    pub pod_name: Option<&'a str>,
    /// The pod's uid (projected tokens only: a pod has no uid yet at admission).
    pub pod_uid: Option<&'a str>,
}

/// Builds a `RoleSessionName` from who asked: `<namespace>.<service account>[.<pod>]`, stable
/// for the pod's life, fitted to STS's alphabet and length (see the module docs). It is built
/// from names only, so it can never contain the token.
pub fn role_session_name(context: &SessionContext<'_>) -> String {
    let subject = context.subject;
    let mut raw = format!("{}.{}", subject.namespace, subject.service_account);
    if let Some(pod) = context.pod_name.filter(|p| !p.is_empty()) {
        raw.push('.');
        raw.push_str(pod);
    }
    fit_name(&raw)
}

/// The `SourceIdentity`: `[<cluster>.]<namespace>.<service account>`, fitted like the session
/// name. STS keeps it through role chaining and it cannot be changed by the session's holder.
pub fn source_identity(context: &SessionContext<'_>) -> String {
    let subject = context.subject;
    let raw = match context.cluster {
        Some(cluster) => format!(
            "{cluster}.{}.{}",
            subject.namespace, subject.service_account
        ),
        None => format!("{}.{}", subject.namespace, subject.service_account),
    };
    fit_name(&raw)
}

/// Fits a value to STS's `[\w+=,.@-]{2,64}`.
fn fit_name(raw: &str) -> String {
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    if name.len() > MAX_NAME {
        let digest = hex::encode(Sha256::digest(raw.as_bytes()));
        name.truncate(MAX_NAME - 9);
        name.push('-');
        name.push_str(&digest[..8]);
    }
    while name.len() < 2 {
        name.push('-');
    }
    name
}

pub use iam_broker_kernel::ports::SessionTag;

/// Session tags naming the requester, with the keys EKS Pod Identity uses:
/// `kubernetes-namespace`, `kubernetes-service-account`, `kubernetes-pod-name`,
/// `kubernetes-pod-uid` and `eks-cluster-name`; those whose value is unknown are left out.
pub fn session_tags(context: &SessionContext<'_>) -> Vec<SessionTag> {
    let subject = context.subject;
    let mut tags = vec![
        (TAG_NAMESPACE, subject.namespace.as_str()),
        (TAG_SERVICE_ACCOUNT, subject.service_account.as_str()),
    ];
    let optional = [
        (TAG_POD_NAME, context.pod_name),
        (TAG_POD_UID, context.pod_uid),
        (TAG_CLUSTER_NAME, context.cluster),
    ];
    for (key, value) in optional {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            tags.push((key, value));
        }
    }
    tags.into_iter()
        .map(|(key, value)| (key, value.chars().take(MAX_TAG_VALUE).collect()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches_sts_pattern(name: &str) -> bool {
        (2..=64).contains(&name.len())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c))
    }

    fn context<'a>(subject: &'a Subject, pod: Option<&'a str>) -> SessionContext<'a> {
        SessionContext {
            subject,
            cluster: None,
            pod_name: pod,
            pod_uid: None,
        }
    }

    #[test]
    fn names_who_asked() {
        let subject = Subject::service_account("team-a", "app").unwrap();
        assert_eq!(
            role_session_name(&context(&subject, Some("web-7d9f"))),
            "team-a.app.web-7d9f"
        );
        assert_eq!(role_session_name(&context(&subject, None)), "team-a.app");
        assert_eq!(
            role_session_name(&context(&subject, Some(""))),
            "team-a.app"
        );
    }

    #[test]
    fn always_fits_the_sts_pattern_and_long_names_stay_apart() {
        let subject = Subject {
            cluster: None,
            namespace: "n".repeat(63),
            service_account: "s".repeat(200),
        };
        let mut seen = std::collections::BTreeSet::new();
        for pod in [None, Some("pod/with spaces:and~tilde"), Some("ünïcode")] {
            let name = role_session_name(&context(&subject, pod));
            assert!(matches_sts_pattern(&name), "{name}");
            assert!(seen.insert(name), "long names that differ stay apart");
        }
        let short = Subject {
            cluster: None,
            namespace: String::new(),
            service_account: String::new(),
        };
        assert!(matches_sts_pattern(&role_session_name(&context(
            &short, None
        ))));
        assert!(matches_sts_pattern(&source_identity(&context(
            &subject, None
        ))));
    }

    #[test]
    fn tags_use_eks_pod_identity_keys() {
        let subject = Subject::service_account("ns", "sa").unwrap();
        let tags = session_tags(&SessionContext {
            subject: &subject,
            cluster: Some("east"),
            pod_name: Some("pod"),
            pod_uid: Some("0f1e2d3c-aaaa-bbbb-cccc-123456789abc"),
        });
        assert_eq!(
            tags,
            vec![
                ("kubernetes-namespace", "ns".to_owned()),
                ("kubernetes-service-account", "sa".to_owned()),
                ("kubernetes-pod-name", "pod".to_owned()),
                (
                    "kubernetes-pod-uid",
                    "0f1e2d3c-aaaa-bbbb-cccc-123456789abc".to_owned()
                ),
                ("eks-cluster-name", "east".to_owned()),
            ]
        );
        let tags = session_tags(&context(&subject, None));
        assert_eq!(tags.len(), 2, "unknown values are left out");
        let long = "p".repeat(300);
        let tags = session_tags(&context(&subject, Some(&long)));
        assert_eq!(tags[2].1.len(), 256);
    }

    #[test]
    fn source_identity_names_the_service_account() {
        let subject = Subject::service_account("team", "app").unwrap();
        let mut ctx = context(&subject, Some("web"));
        assert_eq!(source_identity(&ctx), "team.app");
        ctx.cluster = Some("east");
        assert_eq!(source_identity(&ctx), "east.team.app");
    }
}
