//! STS session naming and tagging: CloudTrail must say which pod asked, and never see the token.

use crate::allowance::Subject;

/// Longest `RoleSessionName` STS accepts.
const MAX_SESSION_NAME: usize = 64;

/// Builds a `RoleSessionName` from who asked: `<namespace>.<service account>[.<pod>]`, with
/// every character outside `[\w+=,.@-]` replaced by `-`, cut to 64 characters and padded to the
/// minimum of 2. It is built from names only, so it can never contain the token.
pub fn role_session_name(subject: &Subject, pod: Option<&str>) -> String {
    let mut raw = format!("{}.{}", subject.namespace, subject.service_account);
    if let Some(pod) = pod.filter(|p| !p.is_empty()) {
        raw.push('.');
        raw.push_str(pod);
    }
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(MAX_SESSION_NAME)
        .collect();
    while name.len() < 2 {
        name.push('-');
    }
    name
}

/// A session tag (key, value) for attribute-based access control.
pub type SessionTag = (&'static str, String);

/// Session tags naming the requester, with the keys EKS Pod Identity uses so existing ABAC
/// policies keep working: `kubernetes-namespace`, `kubernetes-service-account`,
/// `kubernetes-pod-name`.
pub fn session_tags(subject: &Subject, pod: Option<&str>) -> Vec<SessionTag> {
    let mut tags = vec![
        ("kubernetes-namespace", subject.namespace.clone()),
        (
            "kubernetes-service-account",
            subject.service_account.clone(),
        ),
    ];
    if let Some(pod) = pod.filter(|p| !p.is_empty()) {
        tags.push(("kubernetes-pod-name", pod.to_owned()));
    }
    tags
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

    #[test]
    fn names_who_asked() {
        let subject = Subject::service_account("team-a", "app").unwrap();
        assert_eq!(
            role_session_name(&subject, Some("web-7d9f")),
            "team-a.app.web-7d9f"
        );
        assert_eq!(role_session_name(&subject, None), "team-a.app");
        assert_eq!(role_session_name(&subject, Some("")), "team-a.app");
    }

    #[test]
    fn always_fits_the_sts_pattern() {
        let subject = Subject {
            namespace: "n".repeat(63),
            service_account: "s".repeat(200),
        };
        for pod in [None, Some("pod/with spaces:and~tilde"), Some("ünïcode")] {
            let name = role_session_name(&subject, pod);
            assert!(matches_sts_pattern(&name), "{name}");
        }
        let short = Subject {
            namespace: String::new(),
            service_account: String::new(),
        };
        assert!(matches_sts_pattern(&role_session_name(&short, None)));
    }

    #[test]
    fn tags_use_eks_pod_identity_keys() {
        let subject = Subject::service_account("ns", "sa").unwrap();
        let tags = session_tags(&subject, Some("pod"));
        assert_eq!(
            tags,
            vec![
                ("kubernetes-namespace", "ns".to_owned()),
                ("kubernetes-service-account", "sa".to_owned()),
                ("kubernetes-pod-name", "pod".to_owned()),
            ]
        );
    }
}
