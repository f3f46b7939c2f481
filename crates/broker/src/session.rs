//! STS session naming, tagging and source identity: CloudTrail must say which pod asked, ABAC
//! policies written for EKS Pod Identity must carry over, and none of it may ever hold a token.
//!
//! STS limits that apply (and what is done about them):
//! - `RoleSessionName`: 2–64 characters of `[\w+=,.@-]`. The name is
//!   `<namespace>_<service account>[_<pod>]`: Kubernetes names never hold `_`, so the parts
//!   cannot run into each other (ServiceAccount and pod names may hold dots; `team-s`, `app.x`,
//!   `p` and `team-s`, `app`, `x.p` stay apart). A name that does not fit (longer than 64, or a
//!   part that is not a Kubernetes name) keeps its first 47 characters and ends in `+` and 16 hex
//!   digits of the SHA-256 of all of its parts: `+` is in no name of the plain form, so a
//!   shortened name never equals a plain one, and 64 bits of digest keep two shortened names
//!   apart against anyone choosing pod names.
//! - `SourceIdentity`: the same alphabet, length and rule, `[<cluster>_]<namespace>_<service
//!   account>`.
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

/// Builds a `RoleSessionName` from who asked: `<namespace>_<service account>[_<pod>]`, stable
/// for the pod's life, unambiguous, fitted to STS's alphabet and length (see the module docs).
/// It is built from names only, so it can never contain the token.
pub fn role_session_name(context: &SessionContext<'_>) -> String {
    let subject = context.subject;
    let mut parts = vec![subject.namespace.as_str(), subject.service_account.as_str()];
    if let Some(pod) = context.pod_name.filter(|p| !p.is_empty()) {
        parts.push(pod);
    }
    fit_name(&parts)
}

/// The `SourceIdentity`: `[<cluster>_]<namespace>_<service account>`, fitted like the session
/// name. STS keeps it through role chaining and it cannot be changed by the session's holder.
pub fn source_identity(context: &SessionContext<'_>) -> String {
    let subject = context.subject;
    let mut parts = Vec::with_capacity(3);
    if let Some(cluster) = context.cluster {
        parts.push(cluster);
    }
    parts.extend([subject.namespace.as_str(), subject.service_account.as_str()]);
    fit_name(&parts)
}

/// Joins the parts with `_` when each is a plain Kubernetes name (`[a-z0-9.-]+`) and the whole
/// fits in 64; otherwise the shortened form: 47 characters of the join (other characters as
/// `-`), `+`, 16 hex digits of the SHA-256 of the parts.
fn fit_name(parts: &[&str]) -> String {
    let plain = |part: &&str| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
    };
    let joined = parts.join(SEPARATOR);
    if joined.len() <= MAX_NAME && parts.iter().all(plain) {
        return joined;
    }
    let mut digest = Sha256::new();
    for part in parts {
        // Length-prefixed, so the parts' boundaries are part of what is hashed.
        digest.update((part.len() as u64).to_be_bytes());
        digest.update(part.as_bytes());
    }
    let digest = hex::encode(digest.finalize());
    let mut name: String = joined
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(MAX_NAME - 1 - DIGEST_HEX)
        .collect();
    name.push('+');
    name.push_str(&digest[..DIGEST_HEX]);
    name
}

/// The name [`role_session_name`] or [`source_identity`] gives these parts.
pub fn fitted_name(parts: &[&str]) -> String {
    fit_name(parts)
}

/// An IAM `StringLike` pattern matching every name [`fitted_name`] gives parts that start with
/// `prefix` followed by at least one more part: `<prefix joined>_*`. Exact when the prefix is
/// plain and at most 47 characters long (a shortened name keeps its first 47 characters);
/// otherwise it matches on the first 47 characters and may cover other names sharing them.
/// Returns the pattern and whether it is exact.
pub fn name_prefix_pattern(prefix: &[&str]) -> (String, bool) {
    let plain = prefix.iter().all(|part| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
    });
    let keep = MAX_NAME - 1 - DIGEST_HEX;
    let mut joined = prefix.join(SEPARATOR);
    joined.push_str(SEPARATOR);
    if plain && joined.len() <= keep {
        return (format!("{joined}*"), true);
    }
    let shortened: String = joined
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(keep)
        .collect();
    (format!("{shortened}*"), false)
}

/// Between the parts of a name: in no Kubernetes name, and in STS's alphabet.
const SEPARATOR: &str = "_";
/// Hex digits of digest in a shortened name (64 bits).
const DIGEST_HEX: usize = 16;

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
            "team-a_app_web-7d9f"
        );
        assert_eq!(role_session_name(&context(&subject, None)), "team-a_app");
        assert_eq!(
            role_session_name(&context(&subject, Some(""))),
            "team-a_app"
        );
    }

    #[test]
    fn names_with_dots_stay_apart() {
        // the example: both were `team-s.app.x.p`
        let dotted = Subject::service_account("team-s", "app.x").unwrap();
        let plain = Subject::service_account("team-s", "app").unwrap();
        let a = role_session_name(&context(&dotted, Some("p")));
        let b = role_session_name(&context(&plain, Some("x.p")));
        assert_eq!(a, "team-s_app.x_p");
        assert_eq!(b, "team-s_app_x.p");
        assert_ne!(a, b);
        // with and without a pod, and across the cluster in SourceIdentity
        assert_ne!(
            role_session_name(&context(&plain, Some("x"))),
            role_session_name(&context(
                &Subject::service_account("team-s", "app.x").unwrap(),
                None
            ))
        );
        let mut east = context(&plain, None);
        east.cluster = Some("east");
        let unclustered = Subject::service_account("east", "team-s").unwrap();
        assert_ne!(
            source_identity(&east),
            source_identity(&context(&unclustered, None))
        );
    }

    #[test]
    fn a_shortened_name_never_equals_a_plain_one_nor_another_shortened_one() {
        let long = Subject::service_account("team", &"s".repeat(60)).unwrap();
        let short = role_session_name(&context(&long, Some("web-1")));
        assert_eq!(short.len(), 64);
        assert!(short.contains('+'), "{short}");
        // a plain name never holds `+`, whatever pod names anyone picks
        let plain = role_session_name(&context(&long, None));
        assert!(plain.contains('+'), "also too long: {plain}");
        assert_ne!(short, plain);
        // two long names that share their first 47 characters differ in their digest
        let other = role_session_name(&context(&long, Some("web-2")));
        assert_eq!(short[..47], other[..47]);
        assert_ne!(short, other);
        // parts that are not Kubernetes names take the shortened form, even when short
        let odd = Subject {
            cluster: None,
            namespace: "Team".to_owned(),
            service_account: "a_b".to_owned(),
        };
        let name = role_session_name(&context(&odd, None));
        assert!(name.contains('+') && matches_sts_pattern(&name), "{name}");
        let twin = Subject {
            cluster: None,
            namespace: "Team_a".to_owned(),
            service_account: "b".to_owned(),
        };
        assert_ne!(name, role_session_name(&context(&twin, None)));
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

    /// Kubernetes-shaped names, dots and dashes included, short and long.
    fn k8s_name() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::string::string_regex("[a-z0-9]([a-z0-9.-]{0,40}[a-z0-9])?")
            .expect("a valid pattern")
    }

    proptest::proptest! {
        /// Two different (namespace, ServiceAccount, pod) triples never share a session name
        /// or a SourceIdentity, and every name fits STS's pattern.
        #[test]
        fn different_requesters_never_share_a_name(
            a in (k8s_name(), k8s_name(), proptest::option::of(k8s_name())),
            b in (k8s_name(), k8s_name(), proptest::option::of(k8s_name())),
        ) {
            let subject = |(ns, sa, _): &(String, String, Option<String>)| Subject {
                cluster: None,
                namespace: ns.clone(),
                service_account: sa.clone(),
            };
            let (sa, sb) = (subject(&a), subject(&b));
            let name_a = role_session_name(&context(&sa, a.2.as_deref()));
            let name_b = role_session_name(&context(&sb, b.2.as_deref()));
            proptest::prop_assert!(matches_sts_pattern(&name_a), "{}", name_a);
            if a != b {
                proptest::prop_assert_ne!(&name_a, &name_b);
            }
            if (&a.0, &a.1) != (&b.0, &b.1) {
                proptest::prop_assert_ne!(
                    source_identity(&context(&sa, None)),
                    source_identity(&context(&sb, None))
                );
            }
        }
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
        assert_eq!(source_identity(&ctx), "team_app");
        ctx.cluster = Some("east");
        assert_eq!(source_identity(&ctx), "east_team_app");
    }
}
