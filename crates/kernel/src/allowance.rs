//! Allowances: which IAM roles the pods of a namespace and ServiceAccount may assume.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::name::{ClusterName, InvalidName, validate_dns_label, validate_dns_subdomain};

/// The `service_account` value that allows every ServiceAccount of a namespace.
pub const WILDCARD_SERVICE_ACCOUNT: &str = "*";

/// Who asks for credentials: a ServiceAccount in a namespace, in a cluster.
///
/// `cluster` is `None` for the default cluster: the one the webhook serves in `secret` mode
/// (named by `CLUSTER_NAME`), whose Allowances rows carry no cluster prefix, so rows written
/// before clusters existed keep working. A registered cluster of another name has its own rows.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subject {
    /// The cluster, `None` for the default cluster.
    pub cluster: Option<ClusterName>,
    /// Kubernetes namespace.
    pub namespace: String,
    /// ServiceAccount name, or [`WILDCARD_SERVICE_ACCOUNT`] in an allowance.
    pub service_account: String,
}

impl Subject {
    /// A pod's identity: a namespace (DNS-1123 label) and a ServiceAccount (DNS-1123
    /// subdomain), validated as Kubernetes does; `*` is not a ServiceAccount.
    pub fn service_account(namespace: &str, service_account: &str) -> Result<Self, InvalidName> {
        Self::checked(namespace, service_account, false)
    }

    /// A row of the Allowances table: like [`Self::service_account`], but the ServiceAccount may
    /// be `*` (every ServiceAccount of the namespace).
    pub fn allowance_row(namespace: &str, service_account: &str) -> Result<Self, InvalidName> {
        Self::checked(namespace, service_account, true)
    }

    fn checked(
        namespace: &str,
        service_account: &str,
        allow_wildcard: bool,
    ) -> Result<Self, InvalidName> {
        validate_dns_label("namespace", namespace)?;
        if !(allow_wildcard && service_account == WILDCARD_SERVICE_ACCOUNT) {
            validate_dns_subdomain("service account", service_account)?;
        }
        Ok(Self {
            cluster: None,
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    /// The same subject in `cluster` (`None`: the default cluster).
    pub fn in_cluster(self, cluster: Option<ClusterName>) -> Self {
        Self { cluster, ..self }
    }

    /// The namespace-wide subject (`service_account = "*"`) of the same namespace and cluster.
    pub fn wildcard(&self) -> Self {
        Self {
            cluster: self.cluster.clone(),
            namespace: self.namespace.clone(),
            service_account: WILDCARD_SERVICE_ACCOUNT.to_owned(),
        }
    }

    /// The Allowances table's partition key for this subject: the namespace, prefixed with
    /// `<cluster>/` outside the default cluster (a namespace never holds a `/`).
    pub fn partition(&self) -> String {
        partition(self.cluster.as_ref(), &self.namespace)
    }

    /// Reads a stored partition key and ServiceAccount back (see [`Self::partition`]).
    pub fn from_partition(partition: &str, service_account: &str) -> Result<Self, InvalidName> {
        let (cluster, namespace) = match partition.split_once('/') {
            Some((cluster, namespace)) => (Some(ClusterName::parse(cluster)?), namespace),
            None => (None, partition),
        };
        Ok(Self::allowance_row(namespace, service_account)?.in_cluster(cluster))
    }
}

/// The Allowances partition key of a namespace in a cluster (see [`Subject::partition`]).
pub fn partition(cluster: Option<&ClusterName>, namespace: &str) -> String {
    match cluster {
        Some(cluster) => format!("{cluster}/{namespace}"),
        None => namespace.to_owned(),
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(cluster) = &self.cluster {
            write!(f, "{cluster}/")?;
        }
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

/// One row of the Allowances table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowance {
    /// The namespace and ServiceAccount (or `*`) the row is about.
    pub subject: Subject,
    /// Role ARNs the subject may assume.
    pub allowed_roles: BTreeSet<String>,
    /// The `ExternalId` to send with `sts:AssumeRole`, per role that needs one (a role in
    /// another account whose trust policy requires `sts:ExternalId`).
    pub external_ids: BTreeMap<String, String>,
    /// The session policy to send as `Policy` with `sts:AssumeRole`, per role that has one
    /// (compact JSON, validated by [`SessionPolicy::parse`] when written): the session gets
    /// the intersection of the role's permissions and this policy.
    pub session_policies: BTreeMap<String, String>,
    /// What an operator revoked on this row's scope (`iam-broker sessions revoke`).
    pub revocation: Revocation,
}

/// Sessions revoked on one Allowances row's scope: its ServiceAccount (or, on a `*` row, the
/// whole namespace), or single pods of its ServiceAccount. While set, the broker serves no new
/// credentials there and the webhook injects no pod there; what was issued before is denied at
/// AWS by an inline policy on each role in `denied_roles` (see `iam-broker sessions`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocation {
    /// When the whole scope was revoked (Unix seconds), if it is.
    pub at: Option<i64>,
    /// Pods of the row's ServiceAccount revoked one by one (by name).
    pub pods: BTreeSet<String>,
    /// Roles whose inline deny holds a statement of this row's scope. Kept after `sessions
    /// restore` until the deny has outlived every session it covers, so it can be removed.
    pub denied_roles: BTreeSet<String>,
}

impl Revocation {
    /// Nothing revoked and no deny to remove.
    pub fn is_empty(&self) -> bool {
        self.at.is_none() && self.pods.is_empty() && self.denied_roles.is_empty()
    }
}

/// Why new credentials are refused although a row allows the role: an operator revoked the
/// scope ([`revoked`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The row that carries the revocation (`*` for a whole namespace).
    pub row: Subject,
    /// The pod, when one pod was revoked.
    pub pod: Option<String>,
    /// When the scope was revoked (Unix seconds); `None` for a pod.
    pub at: Option<i64>,
}

impl fmt::Display for Revoked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scope = if self.row.service_account == WILDCARD_SERVICE_ACCOUNT {
            let cluster = self
                .row
                .cluster
                .as_ref()
                .map(|c| format!("{c}/"))
                .unwrap_or_default();
            format!("namespace {cluster}{}", self.row.namespace)
        } else {
            self.row.to_string()
        };
        match &self.pod {
            Some(pod) => write!(f, "sessions of pod {pod} of {scope} are revoked"),
            None => write!(f, "sessions of {scope} are revoked"),
        }?;
        f.write_str(" by an operator (iam-broker sessions restore lifts it)")
    }
}

/// The revocation that stops new credentials for a pod (named `pod`, when known) decided by
/// `rows`, if any: its ServiceAccount's or its namespace's scope, or the pod itself.
pub fn revoked(rows: &[Row], pod: Option<&str>) -> Option<Revoked> {
    rows.iter().filter_map(Row::allowance).find_map(|row| {
        let revocation = &row.revocation;
        if revocation.at.is_some() {
            return Some(Revoked {
                row: row.subject.clone(),
                pod: None,
                at: revocation.at,
            });
        }
        let pod = pod.filter(|p| revocation.pods.contains(*p))?;
        Some(Revoked {
            row: row.subject.clone(),
            pod: Some(pod.to_owned()),
            at: None,
        })
    })
}

impl Allowance {
    /// A row without external ids, session policies or revocations.
    pub fn new(subject: Subject, allowed_roles: BTreeSet<String>) -> Self {
        Self {
            subject,
            allowed_roles,
            external_ids: BTreeMap::new(),
            session_policies: BTreeMap::new(),
            revocation: Revocation::default(),
        }
    }

    /// Whether `role_arn` is allowed by this row.
    pub fn allows(&self, role_arn: &str) -> bool {
        self.allowed_roles.contains(role_arn)
    }
}

/// One of the rows that decide for a subject, as the store read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Row {
    /// There is no such row.
    Absent,
    /// The row, read.
    Found(Allowance),
    /// The store holds a row it cannot read (an attribute of the wrong type, a key that is no
    /// name). It allows nothing; when no readable row allows the role either, the refusal names
    /// it, so an operator can fix it. A data problem, not an outage: retrying cannot help.
    Unreadable(UnreadableRow),
}

impl Row {
    /// The readable row, if any.
    pub fn allowance(&self) -> Option<&Allowance> {
        match self {
            Self::Found(row) => Some(row),
            Self::Absent | Self::Unreadable(_) => None,
        }
    }
}

impl From<Option<Allowance>> for Row {
    fn from(row: Option<Allowance>) -> Self {
        row.map_or(Self::Absent, Self::Found)
    }
}

/// A row of the Allowances table that cannot be read: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the row (namespace {partition:?}, service_account {service_account:?}) of {store} cannot be read: {problem}"
)]
pub struct UnreadableRow {
    /// Which store (`DynamoDB table <name>`).
    pub store: String,
    /// The row's partition key (`[<cluster>/]<namespace>`), clipped.
    pub partition: String,
    /// The row's sort key (a ServiceAccount or `*`), clipped.
    pub service_account: String,
    /// What is wrong with it.
    pub problem: String,
}

impl UnreadableRow {
    /// The unreadable row at `subject`'s key.
    pub fn at(subject: &Subject, store: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            store: store.into(),
            partition: crate::text::clip(&subject.partition(), crate::text::MAX_ECHO),
            service_account: crate::text::clip(&subject.service_account, crate::text::MAX_ECHO),
            problem: crate::text::clip(&problem.into(), crate::text::MAX_MESSAGE),
        }
    }
}

/// Whether any readable row among `rows` (the exact subject's and the namespace wildcard's)
/// allows the role.
pub fn is_allowed<'a>(rows: impl IntoIterator<Item = &'a Row>, role_arn: &str) -> bool {
    rows.into_iter()
        .filter_map(Row::allowance)
        .any(|row| row.allows(role_arn))
}

/// The first unreadable row among `rows`, if any.
pub fn unreadable<'a>(rows: impl IntoIterator<Item = &'a Row>) -> Option<&'a UnreadableRow> {
    rows.into_iter().find_map(|row| match row {
        Row::Unreadable(unreadable) => Some(unreadable),
        Row::Absent | Row::Found(_) => None,
    })
}

/// A role the rows allow, with what `sts:AssumeRole` needs to go with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permitted {
    /// The role.
    pub role_arn: RoleArn,
    /// Its `ExternalId`, from the first row (exact before wildcard) that allows the role.
    pub external_id: Option<String>,
    /// Its session policy, from the same row.
    pub session_policy: Option<String>,
}

/// What an allowance of one role carries besides the role: written together, in one write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoleTerms {
    /// The `ExternalId` to send (`None`: none, and any earlier one is removed).
    pub external_id: Option<String>,
    /// The session policy to send (`None`: none, and any earlier one is removed).
    pub session_policy: Option<SessionPolicy>,
}

/// STS's limit on a session policy's plaintext, in characters.
pub const MAX_SESSION_POLICY_CHARS: usize = 2048;

/// A session policy as STS takes it: a JSON IAM policy document, kept compact (whitespace
/// counts against STS's 2,048 characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionPolicy(String);

/// Why a text is not a session policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the session policy is not valid: {0}")]
pub struct InvalidSessionPolicy(pub String);

impl SessionPolicy {
    /// Reads a policy document: a JSON object with a `Version` string and a `Statement` (an
    /// object or a non-empty array of objects, each with an `Effect` of `Allow` or `Deny`),
    /// at most [`MAX_SESSION_POLICY_CHARS`] characters once compacted.
    pub fn parse(text: &str) -> Result<Self, InvalidSessionPolicy> {
        let invalid = |why: &str| InvalidSessionPolicy(why.to_owned());
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| InvalidSessionPolicy(format!("not JSON ({e})")))?;
        let document = value
            .as_object()
            .ok_or_else(|| invalid("it is not a JSON object"))?;
        if !document
            .get("Version")
            .is_some_and(serde_json::Value::is_string)
        {
            return Err(invalid("it has no \"Version\" string (\"2012-10-17\")"));
        }
        let statements: Vec<&serde_json::Value> = match document.get("Statement") {
            Some(serde_json::Value::Array(list)) if !list.is_empty() => list.iter().collect(),
            Some(statement @ serde_json::Value::Object(_)) => vec![statement],
            _ => {
                return Err(invalid(
                    "it has no \"Statement\" (an object or a non-empty array)",
                ));
            }
        };
        for statement in statements {
            let effect = statement.get("Effect").and_then(serde_json::Value::as_str);
            if !matches!(effect, Some("Allow" | "Deny")) {
                return Err(invalid(
                    "a statement's \"Effect\" is not \"Allow\" or \"Deny\"",
                ));
            }
        }
        let compact = value.to_string();
        let chars = compact.chars().count();
        if chars > MAX_SESSION_POLICY_CHARS {
            return Err(InvalidSessionPolicy(format!(
                "it is {chars} characters compacted; STS takes at most {MAX_SESSION_POLICY_CHARS}"
            )));
        }
        Ok(Self(compact))
    }

    /// The compact JSON.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why no role could be chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The requested role (or, when none was requested, every role) is not allowed.
    NotAllowed,
    /// No role was requested and the rows allow several.
    Ambiguous(usize),
    /// No readable row allows the role, and a row that might is unreadable.
    Unreadable(UnreadableRow),
}

/// Chooses the role for a request: `requested` when a readable row allows it; with no request,
/// the one role the readable rows allow. `rows` go exact subject first, then the namespace
/// wildcard. An unreadable row allows nothing, so a valid exact row keeps working beside a
/// corrupt `*` row; a refusal that such a row might have changed is [`Refusal::Unreadable`].
pub fn permit(rows: &[Row], requested: Option<&RoleArn>) -> Result<Permitted, Refusal> {
    let readable = || rows.iter().filter_map(Row::allowance);
    let terms = |role: &str| {
        readable()
            .find(|row| row.allows(role))
            .map(|row| {
                (
                    row.external_ids.get(role).cloned(),
                    row.session_policies.get(role).cloned(),
                )
            })
            .unwrap_or_default()
    };
    let not_allowed = || match unreadable(rows) {
        Some(row) => Refusal::Unreadable(row.clone()),
        None => Refusal::NotAllowed,
    };
    let role = match requested {
        Some(role) if is_allowed(rows, role.as_str()) => role.clone(),
        Some(_) => return Err(not_allowed()),
        None => {
            let roles: BTreeSet<&String> = readable().flat_map(|r| &r.allowed_roles).collect();
            let mut valid = roles.iter().filter_map(|r| RoleArn::parse(r).ok());
            match (roles.len(), valid.next()) {
                (0, _) | (_, None) => return Err(not_allowed()),
                (1, Some(role)) => role,
                (n, Some(_)) => return Err(Refusal::Ambiguous(n)),
            }
        }
    };
    let (external_id, session_policy) = terms(role.as_str());
    Ok(Permitted {
        external_id,
        session_policy,
        role_arn: role,
    })
}

/// The subjects whose Allowances rows decide for `subject`: its own rows and, for a subject of
/// the default cluster (no prefix) when that cluster has a name (`CLUSTER_NAME`), also the rows
/// written under that name (`iam-broker allow --cluster <name>`), first. A cluster name thus
/// means the same rows whatever `CLUSTER_NAME` is, and the unprefixed rows written before the
/// default cluster had a name keep working. The named rows come first, so their `ExternalId`
/// wins when both allow a role.
pub fn deciding_subjects(subject: &Subject, default_cluster: Option<&ClusterName>) -> Vec<Subject> {
    match (&subject.cluster, default_cluster) {
        (None, Some(name)) => vec![
            subject.clone().in_cluster(Some(name.clone())),
            subject.clone(),
        ],
        _ => vec![subject.clone()],
    }
}

/// Checks an `ExternalId` as STS does: 2–1224 characters of `[\w+=,.@:/-]`.
pub fn validate_external_id(value: &str) -> Result<(), InvalidName> {
    let ok = (2..=1224).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+=,.@:/-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(InvalidName {
            what: "external id",
            value: value.to_owned(),
            why: "it must be 2 to 1224 of A-Z a-z 0-9 _ + = , . @ : / -",
        })
    }
}

/// An IAM role ARN, `arn:<partition>:iam::<account>:role/<path><name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoleArn(String);

impl RoleArn {
    /// Validates the shape of a role ARN.
    pub fn parse(value: &str) -> Result<Self, InvalidName> {
        let invalid = |why| InvalidName {
            what: "role ARN",
            value: value.to_owned(),
            why,
        };
        let mut parts = value.splitn(6, ':');
        let (Some("arn"), Some(partition), Some("iam"), Some(""), Some(account), Some(resource)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(invalid(
                "expected arn:<partition>:iam::<account>:role/<name>",
            ));
        };
        if !partition.starts_with("aws") {
            return Err(invalid(
                "the partition must be aws, aws-cn, aws-us-gov, ...",
            ));
        }
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("the account must be 12 digits"));
        }
        let Some(name) = resource.strip_prefix("role/") else {
            return Err(invalid("the resource must start with role/"));
        };
        let name_ok = !name.is_empty()
            && name.len() <= 512
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-/".contains(&b))
            && !name.ends_with('/');
        if !name_ok {
            return Err(invalid("the role name holds characters IAM does not allow"));
        }
        Ok(Self(value.to_owned()))
    }

    /// The ARN.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 12-digit account the role lives in.
    pub fn account_id(&self) -> &str {
        self.0.split(':').nth(4).unwrap_or_default()
    }
}

impl fmt::Display for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_kubernetes_naming() {
        assert!(Subject::service_account("team-a", "app.sa").is_ok());
        assert!(Subject::allowance_row("team-a", "*").is_ok());
        assert!(Subject::service_account("team-a", "*").is_err());
        assert!(Subject::service_account("Team", "app").is_err());
        assert!(Subject::service_account("", "app").is_err());
        assert!(Subject::service_account("a", "-app").is_err());
        assert!(Subject::service_account(&"a".repeat(64), "app").is_err());
    }

    #[test]
    fn role_arns() {
        let arn = RoleArn::parse("arn:aws:iam::123456789012:role/path/s3_reader").unwrap();
        assert_eq!(arn.account_id(), "123456789012");
        assert!(RoleArn::parse("arn:aws-cn:iam::123456789012:role/x").is_ok());
        for bad in [
            "",
            "arn:aws:iam::12345678901:role/x",
            "arn:aws:iam::123456789012:user/x",
            "arn:aws:s3:::bucket",
            "arn:aws:iam::123456789012:role/",
            "arn:aws:iam::123456789012:role/a b",
            "arn:gcp:iam::123456789012:role/x",
        ] {
            assert!(RoleArn::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn wildcard_or_exact_row_allows() {
        let exact = Allowance::new(
            Subject::service_account("ns", "sa").unwrap(),
            ["arn:aws:iam::123456789012:role/a".to_owned()].into(),
        );
        let wildcard = Allowance::new(
            Subject::allowance_row("ns", "*").unwrap(),
            ["arn:aws:iam::123456789012:role/b".to_owned()].into(),
        );
        let rows = [Row::Found(exact), Row::Found(wildcard)];
        assert!(is_allowed(&rows, "arn:aws:iam::123456789012:role/a"));
        assert!(is_allowed(&rows, "arn:aws:iam::123456789012:role/b"));
        assert!(!is_allowed(&rows, "arn:aws:iam::123456789012:role/c"));
        assert!(!is_allowed(
            &[Row::Absent, Row::Absent],
            "arn:aws:iam::123456789012:role/a"
        ));
    }

    const A: &str = "arn:aws:iam::123456789012:role/a";
    const B: &str = "arn:aws:iam::210987654321:role/b";

    fn row(sa: &str, roles: &[&str], external: &[(&str, &str)]) -> Row {
        Row::Found(Allowance {
            subject: Subject::allowance_row("ns", sa).unwrap(),
            allowed_roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            external_ids: external
                .iter()
                .map(|(r, e)| ((*r).to_owned(), (*e).to_owned()))
                .collect(),
            session_policies: BTreeMap::new(),
            revocation: Revocation::default(),
        })
    }

    #[test]
    fn a_revocation_on_either_row_stops_the_subject_and_a_pod_only_itself() {
        let revoke = |row: Row, at: Option<i64>, pods: &[&str]| match row {
            Row::Found(mut a) => {
                a.revocation.at = at;
                a.revocation.pods = pods.iter().map(|p| (*p).to_owned()).collect();
                Row::Found(a)
            }
            other => other,
        };
        let exact = row("app", &[A], &[]);
        let star = row("*", &[B], &[]);
        assert_eq!(revoked(&[exact.clone(), star.clone()], Some("web-1")), None);
        let by_sa = revoked(&[revoke(exact.clone(), Some(7), &[]), star.clone()], None).unwrap();
        assert_eq!(
            (by_sa.row.service_account.as_str(), by_sa.at),
            ("app", Some(7))
        );
        assert!(
            by_sa
                .to_string()
                .starts_with("sessions of ns/app are revoked"),
            "{by_sa}"
        );
        let by_ns = revoked(
            &[exact.clone(), revoke(star.clone(), Some(9), &[])],
            Some("x"),
        )
        .unwrap();
        assert!(
            by_ns
                .to_string()
                .starts_with("sessions of namespace ns are revoked"),
            "{by_ns}"
        );
        let pods = [revoke(exact, None, &["web-1"]), star];
        assert_eq!(revoked(&pods, Some("web-2")), None);
        assert_eq!(revoked(&pods, None), None);
        let pod = revoked(&pods, Some("web-1")).unwrap();
        assert_eq!(pod.pod.as_deref(), Some("web-1"));
        // A revocation is not an allowance: the role stays granted by the rows, refused by this.
        assert!(is_allowed(&pods, A));
    }

    #[test]
    fn permit_picks_the_requested_or_the_only_role() {
        let a = RoleArn::parse(A).unwrap();
        let b = RoleArn::parse(B).unwrap();
        let one = [row("sa", &[A], &[]), Row::Absent];
        assert_eq!(permit(&one, None).unwrap().role_arn, a);
        assert_eq!(permit(&one, Some(&a)).unwrap().role_arn, a);
        assert_eq!(permit(&one, Some(&b)), Err(Refusal::NotAllowed));
        assert_eq!(
            permit(&[Row::Absent, Row::Absent], None),
            Err(Refusal::NotAllowed)
        );

        let two = [row("sa", &[A], &[]), row("*", &[B], &[(B, "ext-b")])];
        assert_eq!(permit(&two, None), Err(Refusal::Ambiguous(2)));
        let chosen = permit(&two, Some(&b)).unwrap();
        assert_eq!(chosen.external_id.as_deref(), Some("ext-b"));
        assert_eq!(permit(&two, Some(&a)).unwrap().external_id, None);

        // The exact row's external id wins over the wildcard's.
        let both = [
            row("sa", &[B], &[(B, "exact")]),
            row("*", &[B], &[(B, "wide")]),
        ];
        assert_eq!(
            permit(&both, None).unwrap().external_id.as_deref(),
            Some("exact")
        );
    }

    fn corrupt(sa: &str) -> Row {
        let subject = Subject::allowance_row("ns", sa).unwrap();
        Row::Unreadable(UnreadableRow::at(
            &subject,
            "DynamoDB table t",
            "allowed_roles is not a string set",
        ))
    }

    #[test]
    fn an_unreadable_row_allows_nothing_and_is_named_when_it_might_have() {
        let a = RoleArn::parse(A).unwrap();
        let b = RoleArn::parse(B).unwrap();
        // a valid exact row keeps working beside a corrupt `*` row, asked or not
        let rows = [row("sa", &[A], &[]), corrupt("*")];
        assert_eq!(permit(&rows, Some(&a)).unwrap().role_arn, a);
        assert_eq!(permit(&rows, None).unwrap().role_arn, a);
        assert!(is_allowed(&rows, A));
        // a role only the corrupt row could allow: refused, naming that row
        match permit(&rows, Some(&b)) {
            Err(Refusal::Unreadable(row)) => {
                assert_eq!(row.service_account, "*");
                assert_eq!(row.partition, "ns");
                let text = row.to_string();
                assert!(text.contains("DynamoDB table t"), "{text}");
                assert!(text.contains("allowed_roles"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        // a corrupt exact row and no wildcard: refused, naming the exact row
        let rows = [corrupt("sa"), Row::Absent];
        assert!(matches!(
            permit(&rows, Some(&a)),
            Err(Refusal::Unreadable(row)) if row.service_account == "sa"
        ));
        assert!(matches!(permit(&rows, None), Err(Refusal::Unreadable(_))));
        // a corrupt exact row beside a `*` row that allows the role: served
        let rows = [corrupt("sa"), row("*", &[A], &[])];
        assert_eq!(permit(&rows, Some(&a)).unwrap().role_arn, a);
        assert_eq!(
            unreadable(&rows).map(|r| r.service_account.as_str()),
            Some("sa")
        );
    }

    #[test]
    fn unreadable_rows_are_named_in_bounded_text() {
        let subject = Subject {
            cluster: None,
            namespace: "n".repeat(100_000),
            service_account: "s".repeat(100_000),
        };
        let row = UnreadableRow::at(&subject, "DynamoDB table t", "p".repeat(100_000));
        assert!(row.to_string().len() < 2048, "{}", row.to_string().len());
    }

    #[test]
    fn partitions_scope_rows_to_clusters() {
        let plain = Subject::service_account("team", "app").unwrap();
        assert_eq!(plain.partition(), "team");
        assert_eq!(plain.to_string(), "team/app");
        let scoped = plain
            .clone()
            .in_cluster(Some(ClusterName::parse("east").unwrap()));
        assert_eq!(scoped.partition(), "east/team");
        assert_eq!(scoped.to_string(), "east/team/app");
        assert_eq!(scoped.wildcard().partition(), "east/team");
        assert_eq!(Subject::from_partition("east/team", "app").unwrap(), scoped);
        assert_eq!(Subject::from_partition("team", "app").unwrap(), plain);
        assert!(Subject::from_partition("East/team", "app").is_err());
        assert!(Subject::from_partition("east/te/am", "app").is_err());
    }

    #[test]
    fn external_ids_follow_sts_rules() {
        assert!(validate_external_id("tenant-42:prod/x").is_ok());
        assert!(validate_external_id("x").is_err());
        assert!(validate_external_id("has space").is_err());
        assert!(validate_external_id(&"a".repeat(1225)).is_err());
    }

    #[test]
    fn the_default_clusters_name_means_its_named_rows_too() {
        let east = ClusterName::parse("east").unwrap();
        let pod = Subject::service_account("team", "app").unwrap();
        // The default cluster, named east: east's rows first, then the unprefixed ones.
        assert_eq!(
            deciding_subjects(&pod, Some(&east)),
            [pod.clone().in_cluster(Some(east.clone())), pod.clone()]
        );
        // No name: the unprefixed rows only.
        assert_eq!(deciding_subjects(&pod, None), std::slice::from_ref(&pod));
        // Another cluster: its own rows only, never the default cluster's.
        let west = pod
            .clone()
            .in_cluster(Some(ClusterName::parse("west").unwrap()));
        assert_eq!(
            deciding_subjects(&west, Some(&east)),
            std::slice::from_ref(&west)
        );
        // The named row's ExternalId wins when both rows allow the role.
        let role = "arn:aws:iam::123456789012:role/a";
        let mut named =
            Allowance::new(pod.clone().in_cluster(Some(east)), [role.to_owned()].into());
        named
            .external_ids
            .insert(role.to_owned(), "named".to_owned());
        let mut plain = Allowance::new(pod, [role.to_owned()].into());
        plain
            .external_ids
            .insert(role.to_owned(), "plain".to_owned());
        let rows = [
            Row::Found(named),
            Row::Absent,
            Row::Found(plain),
            Row::Absent,
        ];
        let permitted = permit(&rows, Some(&RoleArn::parse(role).unwrap())).unwrap();
        assert_eq!(permitted.external_id.as_deref(), Some("named"));
    }

    const POLICY: &str = r#"{
        "Version": "2012-10-17",
        "Statement": [{ "Effect": "Allow", "Action": "s3:GetObject", "Resource": "*" }]
    }"#;

    #[test]
    fn session_policies_are_checked_and_kept_compact() {
        let policy = SessionPolicy::parse(POLICY).unwrap();
        // Compact (the key order is serde_json's, which depends on its features): the same
        // document, without a byte of whitespace.
        assert!(
            !policy.as_str().contains([' ', '\n']),
            "{}",
            policy.as_str()
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(policy.as_str()).unwrap(),
            serde_json::from_str::<serde_json::Value>(POLICY).unwrap()
        );
        assert_eq!(policy.as_str().len(), 96);
        // A single statement object is a policy too.
        SessionPolicy::parse(
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Deny","Action":"*","Resource":"*"}}"#,
        )
        .unwrap();
        for (text, why) in [
            ("not json", "not JSON"),
            ("[]", "not a JSON object"),
            (r#"{"Statement":[{"Effect":"Allow"}]}"#, "Version"),
            (r#"{"Version":"2012-10-17"}"#, "Statement"),
            (r#"{"Version":"2012-10-17","Statement":[]}"#, "Statement"),
            (
                r#"{"Version":"2012-10-17","Statement":[{"Effect":"Maybe"}]}"#,
                "Effect",
            ),
        ] {
            let err = SessionPolicy::parse(text).unwrap_err();
            assert!(err.to_string().contains(why), "{text}: {err}");
        }
        // 2,048 characters once compacted: whitespace does not count, content does.
        let padded = format!(
            r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"s3:GetObject","Resource":"arn:aws:s3:::{}"}}]}}"#,
            "b".repeat(1900)
        );
        assert!(SessionPolicy::parse(&padded).is_ok());
        let spaced = padded.replace(',', ",          ");
        assert!(SessionPolicy::parse(&spaced).is_ok());
        let long = padded.replace(&"b".repeat(1900), &"b".repeat(2000));
        let err = SessionPolicy::parse(&long).unwrap_err();
        assert!(err.to_string().contains("at most 2048"), "{err}");
    }

    #[test]
    fn the_session_policy_comes_with_the_row_that_allows_the_role() {
        let role = "arn:aws:iam::123456789012:role/a";
        let mut exact = Allowance::new(
            Subject::service_account("ns", "sa").unwrap(),
            [role.to_owned()].into(),
        );
        exact.session_policies.insert(
            role.to_owned(),
            SessionPolicy::parse(POLICY).unwrap().as_str().to_owned(),
        );
        let wide = Allowance::new(
            Subject::allowance_row("ns", "*").unwrap(),
            [role.to_owned()].into(),
        );
        let permitted = permit(
            &[Row::Found(exact), Row::Found(wide.clone())],
            Some(&RoleArn::parse(role).unwrap()),
        )
        .unwrap();
        assert!(permitted.session_policy.unwrap().contains("s3:GetObject"));
        let permitted = permit(&[Row::Absent, Row::Found(wide)], None).unwrap();
        assert_eq!(permitted.session_policy, None);
    }
}
