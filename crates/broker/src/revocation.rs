//! The kill switch's IAM half (`iam-broker sessions revoke`): an inline deny on each affected
//! role that makes the credentials already issued for a pod, a ServiceAccount or a namespace
//! useless at AWS at once, while sessions issued afterwards are untouched.
//!
//! One statement per revoked scope, in one inline policy per role ([`POLICY_NAME`]):
//!
//! ```json
//! { "Sid": "IamBrokerRevoke<16 hex>", "Effect": "Deny", "Action": "*", "Resource": "*",
//!   "Condition": { "DateLessThan": { "aws:TokenIssueTime": "<when revoked, UTC>" },
//!                  "StringEquals" | "StringLike": { <who> }, ... } }
//! ```
//!
//! `aws:TokenIssueTime` is when STS issued the session, so only sessions issued before the
//! revocation are denied (the pattern AWS's console uses for "Revoke active sessions"). Who is
//! told apart by what the broker put on the session ([`IdentityBasis`]): its session tags when
//! `STS_SESSION_TAGS` is on (exact, cluster included), else its `SourceIdentity`
//! (`[<cluster>_]<namespace>_<serviceaccount>`), else its session name
//! (`<namespace>_<serviceaccount>_<pod>` in `aws:userid`, which carries no cluster: every
//! cluster's sessions of that namespace and ServiceAccount on the role are denied). Names
//! longer than STS allows are shortened by the broker ([`crate::session`]); a prefix past 47
//! characters then matches on its first 47 ([`Scope::exact`] says so).
//!
//! A statement must stay until every session it covers has expired: the revocation time plus
//! the longest credential lifetime the broker hands out ([`prune`]).

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::session::{
    TAG_CLUSTER_NAME, TAG_NAMESPACE, TAG_POD_NAME, TAG_SERVICE_ACCOUNT, fitted_name,
    name_prefix_pattern,
};

/// The inline policy every revocation of a role goes into.
pub const POLICY_NAME: &str = "iam-broker-revocations";
/// IAM's limit on a role's inline policies, together, in characters without whitespace.
pub const MAX_INLINE_POLICY_CHARS: usize = 10_240;
/// Prefix of every statement id this module writes.
pub const SID_PREFIX: &str = "IamBrokerRevoke";

/// What the broker puts on sessions, and so what a deny can tell them apart by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityBasis {
    /// `STS_SESSION_TAGS=true`: `aws:PrincipalTag/kubernetes-*` and `eks-cluster-name`.
    SessionTags,
    /// `STS_SOURCE_IDENTITY=true`: `aws:SourceIdentity`.
    SourceIdentity,
    /// Neither: the session name in `aws:userid`.
    SessionName,
}

impl IdentityBasis {
    /// The basis for a broker with these settings (tags win: they are exact).
    pub fn of(session_tags: bool, source_identity: bool) -> Self {
        match (session_tags, source_identity) {
            (true, _) => Self::SessionTags,
            (false, true) => Self::SourceIdentity,
            (false, false) => Self::SessionName,
        }
    }

    /// For people.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SessionTags => "session tags",
            Self::SourceIdentity => "SourceIdentity",
            Self::SessionName => "session name",
        }
    }
}

/// What is revoked: a namespace, a ServiceAccount, or one pod, in a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The cluster's name as sessions carry it (`eks-cluster-name`, the `SourceIdentity`
    /// prefix); `None` for an unnamed default cluster.
    pub cluster: Option<String>,
    /// The namespace.
    pub namespace: String,
    /// The ServiceAccount; `None`: the whole namespace.
    pub service_account: Option<String>,
    /// The pod (of `service_account`); `None`: every pod.
    pub pod: Option<String>,
}

impl Scope {
    /// The statement id of this scope: the same scope revoked again replaces its statement.
    pub fn sid(&self) -> String {
        let mut digest = Sha256::new();
        for part in [
            self.cluster.as_deref().unwrap_or(""),
            &self.namespace,
            self.service_account.as_deref().unwrap_or("*"),
            self.pod.as_deref().unwrap_or("*"),
        ] {
            digest.update((part.len() as u64).to_be_bytes());
            digest.update(part.as_bytes());
        }
        format!("{SID_PREFIX}{}", &hex::encode(digest.finalize())[..16])
    }

    /// The identity condition for `basis`, and whether it matches exactly this scope's sessions
    /// (`false`: it may match more, as said in the module docs).
    pub fn identity_condition(&self, basis: IdentityBasis) -> (Value, bool) {
        let (ns, sa, pod) = (
            self.namespace.as_str(),
            self.service_account.as_deref(),
            self.pod.as_deref(),
        );
        match basis {
            IdentityBasis::SessionTags => {
                let tag = |key: &str| format!("aws:PrincipalTag/{key}");
                let mut equals = serde_json::Map::new();
                equals.insert(tag(TAG_NAMESPACE), json!(ns));
                if let Some(sa) = sa {
                    equals.insert(tag(TAG_SERVICE_ACCOUNT), json!(sa));
                }
                if let Some(pod) = pod {
                    equals.insert(tag(TAG_POD_NAME), json!(pod));
                }
                let mut condition = serde_json::Map::new();
                match &self.cluster {
                    Some(cluster) => {
                        equals.insert(tag(TAG_CLUSTER_NAME), json!(cluster));
                    }
                    // Sessions of an unnamed cluster carry no cluster tag: only those.
                    None => {
                        condition
                            .insert("Null".to_owned(), json!({ tag(TAG_CLUSTER_NAME): "true" }));
                    }
                }
                condition.insert("StringEquals".to_owned(), Value::Object(equals));
                (Value::Object(condition), true)
            }
            IdentityBasis::SourceIdentity => {
                let mut prefix: Vec<&str> = self.cluster.iter().map(String::as_str).collect();
                prefix.push(ns);
                let (source, source_exact) = match sa {
                    Some(sa) => {
                        prefix.push(sa);
                        (
                            json!({ "StringEquals": { "aws:SourceIdentity": fitted_name(&prefix) } }),
                            true,
                        )
                    }
                    None => {
                        let (pattern, exact) = name_prefix_pattern(&prefix);
                        (
                            json!({ "StringLike": { "aws:SourceIdentity": pattern } }),
                            exact && self.cluster.is_some(),
                        )
                    }
                };
                match (pod, sa) {
                    // SourceIdentity names no pod: the session name does.
                    (Some(pod), Some(sa)) => {
                        let mut condition = source;
                        condition["StringLike"] =
                            json!({ "aws:userid": format!("*:{}", fitted_name(&[ns, sa, pod])) });
                        (condition, source_exact)
                    }
                    _ => (source, source_exact),
                }
            }
            IdentityBasis::SessionName => {
                let patterns = match (sa, pod) {
                    (Some(sa), Some(pod)) => vec![format!("*:{}", fitted_name(&[ns, sa, pod]))],
                    (Some(sa), None) => vec![
                        format!("*:{}", fitted_name(&[ns, sa])),
                        format!("*:{}", name_prefix_pattern(&[ns, sa]).0),
                    ],
                    (None, _) => vec![format!("*:{}", name_prefix_pattern(&[ns]).0)],
                };
                // Session names carry no cluster: never exact across clusters.
                (json!({ "StringLike": { "aws:userid": patterns } }), false)
            }
        }
    }

    /// The deny statement for sessions of this scope issued before `at`.
    pub fn deny_statement(&self, basis: IdentityBasis, at: OffsetDateTime) -> Value {
        let (identity, _) = self.identity_condition(basis);
        let mut condition = identity.as_object().cloned().unwrap_or_default();
        condition.insert(
            "DateLessThan".to_owned(),
            json!({ "aws:TokenIssueTime": iso(at) }),
        );
        json!({
            "Sid": self.sid(),
            "Effect": "Deny",
            "Action": "*",
            "Resource": "*",
            "Condition": condition,
        })
    }
}

/// `2026-12-05T19:30:00Z`: the form of the statements' time condition, and of `sessions`' output.
pub fn iso(at: OffsetDateTime) -> String {
    at.replace_nanosecond(0)
        .unwrap_or(at)
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// Why a policy document cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The role's document would pass IAM's size limit.
    #[error(
        "the role's {POLICY_NAME} policy would be {0} characters; IAM allows {MAX_INLINE_POLICY_CHARS} \
         for a role's inline policies together: remove revocations whose sessions have expired \
         (iam-broker sessions restore) or revoke a wider scope (the namespace) instead"
    )]
    TooLarge(usize),
    /// The role's policy of that name is not one this module can read.
    #[error("the role's {POLICY_NAME} policy is not a policy document iam-broker wrote: {0}")]
    Foreign(String),
}

fn parse(document: Option<&str>) -> Result<Vec<Value>, PolicyError> {
    let Some(document) = document else {
        return Ok(Vec::new());
    };
    let value: Value =
        serde_json::from_str(document).map_err(|e| PolicyError::Foreign(e.to_string()))?;
    match &value["Statement"] {
        Value::Array(list) => Ok(list.clone()),
        Value::Object(_) => Ok(vec![value["Statement"].clone()]),
        _ => Err(PolicyError::Foreign("no Statement".to_owned())),
    }
}

fn render(statements: Vec<Value>) -> Result<Option<String>, PolicyError> {
    if statements.is_empty() {
        return Ok(None);
    }
    let text = json!({ "Version": "2012-10-17", "Statement": statements }).to_string();
    let chars = text.chars().filter(|c| !c.is_whitespace()).count();
    if chars > MAX_INLINE_POLICY_CHARS {
        return Err(PolicyError::TooLarge(chars));
    }
    Ok(Some(text))
}

/// The role's revocations policy with `statement` added (replacing one of the same `Sid`).
pub fn with_statement(document: Option<&str>, statement: Value) -> Result<String, PolicyError> {
    let sid = statement["Sid"].clone();
    let mut statements: Vec<Value> = parse(document)?
        .into_iter()
        .filter(|s| s["Sid"] != sid)
        .collect();
    statements.push(statement);
    render(statements)?.ok_or_else(|| PolicyError::Foreign("empty".to_owned()))
}

/// When a statement's revocation happened (its `aws:TokenIssueTime` bound).
pub fn revoked_at(statement: &Value) -> Option<OffsetDateTime> {
    let text = statement["Condition"]["DateLessThan"]["aws:TokenIssueTime"].as_str()?;
    OffsetDateTime::parse(text, &Rfc3339).ok()
}

/// What [`prune`] left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pruned {
    /// The document to write back; `None`: no statement is left (delete the policy).
    pub document: Option<String>,
    /// Statement ids removed.
    pub removed: Vec<String>,
    /// Statements of `sids` that must stay, with the time they may go.
    pub kept: Vec<(String, OffsetDateTime)>,
}

/// Removes the statements of `sids` (all of this module's when `None`) whose sessions have all
/// expired: revoked at least `lifetime` before `now`. The others stay: removing them would
/// make sessions issued before the revocation valid again.
pub fn prune(
    document: Option<&str>,
    sids: Option<&[String]>,
    now: OffsetDateTime,
    lifetime: std::time::Duration,
) -> Result<Pruned, PolicyError> {
    let lifetime = time::Duration::try_from(lifetime).unwrap_or(time::Duration::MAX);
    let mut kept_statements = Vec::new();
    let (mut removed, mut kept) = (Vec::new(), Vec::new());
    for statement in parse(document)? {
        let sid = statement["Sid"].as_str().unwrap_or("").to_owned();
        let ours = sid.starts_with(SID_PREFIX) && sids.is_none_or(|wanted| wanted.contains(&sid));
        match (ours, revoked_at(&statement)) {
            (true, Some(at)) if at + lifetime <= now => removed.push(sid),
            (true, Some(at)) => {
                kept.push((sid, at + lifetime));
                kept_statements.push(statement);
            }
            _ => kept_statements.push(statement),
        }
    }
    Ok(Pruned {
        document: render(kept_statements)?,
        removed,
        kept,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn scope(sa: Option<&str>, pod: Option<&str>, cluster: Option<&str>) -> Scope {
        Scope {
            cluster: cluster.map(str::to_owned),
            namespace: "team-a".to_owned(),
            service_account: sa.map(str::to_owned),
            pod: pod.map(str::to_owned),
        }
    }

    /// IAM's condition operators as documented (StringEquals, StringLike with `*`, Null,
    /// DateLessThan; all keys of a block and all blocks must hold; a key absent from the
    /// request fails every operator but `Null: true`), over a session's context keys. Used to
    /// show which sessions a generated deny hits: no local emulator evaluates these keys.
    fn denies(statement: &Value, session: &[(&str, &str)]) -> bool {
        let get = |key: &str| session.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        let like = |pattern: &str, value: &str| glob(pattern, value);
        statement["Condition"]
            .as_object()
            .unwrap()
            .iter()
            .all(|(op, keys)| {
                keys.as_object().unwrap().iter().all(|(key, expected)| {
                    let expected: Vec<&str> = match expected {
                        Value::Array(list) => list.iter().filter_map(Value::as_str).collect(),
                        other => vec![other.as_str().unwrap()],
                    };
                    let actual = get(key);
                    match op.as_str() {
                        "Null" => (actual.is_none()) == (expected[0] == "true"),
                        "StringEquals" => actual.is_some_and(|a| expected.contains(&a)),
                        "StringLike" => actual.is_some_and(|a| expected.iter().any(|e| like(e, a))),
                        "DateLessThan" => actual.is_some_and(|a| {
                            let a = OffsetDateTime::parse(a, &Rfc3339).unwrap();
                            expected
                                .iter()
                                .any(|e| a < OffsetDateTime::parse(e, &Rfc3339).unwrap())
                        }),
                        other => panic!("operator {other} not modelled"),
                    }
                })
            })
    }

    /// IAM's `StringLike`: `*` matches any run of characters (no `?` is generated here).
    fn glob(pattern: &str, value: &str) -> bool {
        let parts: Vec<&str> = pattern.split('*').collect();
        let (first, last) = (parts[0], parts[parts.len() - 1]);
        if parts.len() == 1 {
            return pattern == value;
        }
        if !value.starts_with(first) || value.len() < first.len() + last.len() {
            return false;
        }
        let mut rest = &value[first.len()..];
        for middle in &parts[1..parts.len() - 1] {
            match rest.find(middle) {
                Some(at) => rest = &rest[at + middle.len()..],
                None => return false,
            }
        }
        rest.ends_with(last)
    }

    const BEFORE: &str = "2026-12-05T10:00:00Z";
    const AFTER: &str = "2026-12-05T12:00:00Z";

    fn at() -> OffsetDateTime {
        OffsetDateTime::parse("2026-12-05T11:00:00Z", &Rfc3339).unwrap()
    }

    /// A session as the broker makes it, for `basis`.
    fn session(
        basis: IdentityBasis,
        cluster: Option<&str>,
        sa: &str,
        pod: &str,
        issued: &'static str,
    ) -> Vec<(&'static str, String)> {
        let mut keys = vec![("aws:TokenIssueTime", issued.to_owned())];
        let name = fitted_name(&["team-a", sa, pod]);
        keys.push(("aws:userid", format!("AROAEXAMPLE:{name}")));
        match basis {
            IdentityBasis::SessionTags => {
                keys.push(("aws:PrincipalTag/kubernetes-namespace", "team-a".to_owned()));
                keys.push(("aws:PrincipalTag/kubernetes-service-account", sa.to_owned()));
                keys.push(("aws:PrincipalTag/kubernetes-pod-name", pod.to_owned()));
                if let Some(c) = cluster {
                    keys.push(("aws:PrincipalTag/eks-cluster-name", c.to_owned()));
                }
            }
            IdentityBasis::SourceIdentity => {
                let mut parts: Vec<&str> = cluster.into_iter().collect();
                parts.extend(["team-a", sa]);
                keys.push(("aws:SourceIdentity", fitted_name(&parts)));
            }
            IdentityBasis::SessionName => {}
        }
        keys
    }

    fn hits(statement: &Value, keys: &[(&'static str, String)]) -> bool {
        let borrowed: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (*k, v.as_str())).collect();
        denies(statement, &borrowed)
    }

    #[test]
    fn each_basis_denies_the_scopes_older_sessions_only() {
        for basis in [
            IdentityBasis::SessionTags,
            IdentityBasis::SourceIdentity,
            IdentityBasis::SessionName,
        ] {
            for cluster in [None, Some("alpha")] {
                let sa_scope = scope(Some("app"), None, cluster).deny_statement(basis, at());
                let pod_scope =
                    scope(Some("app"), Some("web-1"), cluster).deny_statement(basis, at());
                let ns_scope = scope(None, None, cluster).deny_statement(basis, at());
                let s = |sa, pod, issued| session(basis, cluster, sa, pod, issued);
                let case = format!("{basis:?} {cluster:?}");
                // The scope's sessions issued before: denied.
                assert!(hits(&sa_scope, &s("app", "web-1", BEFORE)), "{case}");
                assert!(hits(&pod_scope, &s("app", "web-1", BEFORE)), "{case}");
                assert!(hits(&ns_scope, &s("other", "x", BEFORE)), "{case}");
                // Issued after the revocation: not denied.
                assert!(!hits(&sa_scope, &s("app", "web-1", AFTER)), "{case}");
                assert!(!hits(&ns_scope, &s("app", "web-1", AFTER)), "{case}");
                // Another ServiceAccount, another pod: not denied.
                assert!(
                    !hits(&sa_scope, &s("app2", "web-1", BEFORE)),
                    "{case}: app2"
                );
                assert!(!hits(&sa_scope, &s("ap", "p-web-1", BEFORE)), "{case}: ap");
                assert!(
                    !hits(&pod_scope, &s("app", "web-2", BEFORE)),
                    "{case}: web-2"
                );
                assert!(
                    !hits(&pod_scope, &s("app", "web-1x", BEFORE)),
                    "{case}: web-1x"
                );
            }
        }
    }

    #[test]
    fn tags_and_source_identity_tell_clusters_apart_and_session_names_cannot() {
        let revoke = scope(Some("app"), None, Some("alpha"));
        for (basis, apart) in [
            (IdentityBasis::SessionTags, true),
            (IdentityBasis::SourceIdentity, true),
            (IdentityBasis::SessionName, false),
        ] {
            let statement = revoke.deny_statement(basis, at());
            let other_cluster = session(basis, Some("beta"), "app", "web-1", BEFORE);
            assert_eq!(!hits(&statement, &other_cluster), apart, "{basis:?}");
            assert_eq!(
                revoke.identity_condition(basis).1,
                apart,
                "{basis:?} exactness"
            );
        }
        // An unnamed default cluster's revocation (tags) does not reach a named cluster's.
        let unnamed =
            scope(Some("app"), None, None).deny_statement(IdentityBasis::SessionTags, at());
        assert!(!hits(
            &unnamed,
            &session(IdentityBasis::SessionTags, Some("beta"), "app", "w", BEFORE)
        ));
    }

    #[test]
    fn statements_are_replaced_by_scope_bounded_in_size_and_pruned_only_when_expired() {
        let basis = IdentityBasis::SessionTags;
        let one = scope(Some("app"), None, None);
        let doc = with_statement(None, one.deny_statement(basis, at())).unwrap();
        let later = at() + time::Duration::hours(1);
        let doc = with_statement(Some(&doc), one.deny_statement(basis, later)).unwrap();
        let statements = parse(Some(&doc)).unwrap();
        assert_eq!(statements.len(), 1, "the same scope replaces its statement");
        assert_eq!(revoked_at(&statements[0]), Some(later));
        let doc = with_statement(
            Some(&doc),
            scope(Some("b"), None, None).deny_statement(basis, at()),
        )
        .unwrap();
        assert_eq!(parse(Some(&doc)).unwrap().len(), 2);

        // An hour's credentials: a statement goes an hour after its revocation, not before.
        let hour = Duration::from_secs(3600);
        let early = prune(
            Some(&doc),
            Some(&[one.sid()]),
            later + time::Duration::minutes(59),
            hour,
        )
        .unwrap();
        assert!(early.removed.is_empty());
        assert_eq!(
            early.kept,
            vec![(one.sid(), later + time::Duration::hours(1))]
        );
        let due = prune(
            Some(&doc),
            Some(&[one.sid()]),
            later + time::Duration::hours(1),
            hour,
        )
        .unwrap();
        assert_eq!(due.removed, vec![one.sid()]);
        assert_eq!(parse(due.document.as_deref()).unwrap().len(), 1);
        let all = prune(Some(&doc), None, later + time::Duration::hours(2), hour).unwrap();
        assert_eq!(all.document, None);

        // Too many statements for IAM's 10,240 characters: refused before anything is written.
        let mut doc: Option<String> = None;
        let mut refused = None;
        for i in 0..200 {
            let s =
                scope(Some(&format!("sa-{i}")), None, Some("alpha")).deny_statement(basis, at());
            match with_statement(doc.as_deref(), s) {
                Ok(d) => doc = Some(d),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        assert!(matches!(refused, Some(PolicyError::TooLarge(n)) if n > MAX_INLINE_POLICY_CHARS));
        assert!(matches!(
            with_statement(Some("not json"), json!({})),
            Err(PolicyError::Foreign(_))
        ));
    }
}
