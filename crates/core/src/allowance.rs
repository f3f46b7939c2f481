//! Allowances: which IAM roles the pods of a namespace and ServiceAccount may assume.

use std::collections::BTreeSet;
use std::fmt;

/// The `service_account` value that allows every ServiceAccount of a namespace.
pub const WILDCARD_SERVICE_ACCOUNT: &str = "*";

/// Why a name or ARN was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {} is not valid: {why}", crate::text::quoted(value))]
pub struct InvalidName {
    /// What kind of value it was (`namespace`, `service account`, `role ARN`).
    pub what: &'static str,
    /// The value as given.
    pub value: String,
    /// What rule it broke.
    pub why: &'static str,
}

/// Who asks for credentials: a ServiceAccount in a namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subject {
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
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    /// The namespace-wide subject (`service_account = "*"`) of the same namespace.
    pub fn wildcard(&self) -> Self {
        Self {
            namespace: self.namespace.clone(),
            service_account: WILDCARD_SERVICE_ACCOUNT.to_owned(),
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
}

impl Allowance {
    /// Whether `role_arn` is allowed by this row.
    pub fn allows(&self, role_arn: &str) -> bool {
        self.allowed_roles.contains(role_arn)
    }
}

/// Whether any of the given rows (the exact subject's and the namespace wildcard's) allows the role.
pub fn is_allowed<'a>(
    rows: impl IntoIterator<Item = &'a Option<Allowance>>,
    role_arn: &str,
) -> bool {
    rows.into_iter().flatten().any(|row| row.allows(role_arn))
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

fn validate_dns_label(what: &'static str, value: &str) -> Result<(), InvalidName> {
    let invalid = |why| InvalidName {
        what,
        value: value.to_owned(),
        why,
    };
    if value.is_empty() || value.len() > 63 {
        return Err(invalid("it must be 1 to 63 characters"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(invalid(
            "only lowercase letters, digits and '-' are allowed",
        ));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(invalid("it must start and end with a letter or digit"));
    }
    Ok(())
}

fn validate_dns_subdomain(what: &'static str, value: &str) -> Result<(), InvalidName> {
    if value.is_empty() || value.len() > 253 {
        return Err(InvalidName {
            what,
            value: value.to_owned(),
            why: "it must be 1 to 253 characters",
        });
    }
    value
        .split('.')
        .try_for_each(|label| validate_dns_label(what, label))
        .map_err(|e| InvalidName {
            value: value.to_owned(),
            ..e
        })
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
        let exact = Allowance {
            subject: Subject::service_account("ns", "sa").unwrap(),
            allowed_roles: ["arn:aws:iam::123456789012:role/a".to_owned()].into(),
        };
        let wildcard = Allowance {
            subject: Subject::allowance_row("ns", "*").unwrap(),
            allowed_roles: ["arn:aws:iam::123456789012:role/b".to_owned()].into(),
        };
        let rows = [Some(exact), Some(wildcard)];
        assert!(is_allowed(&rows, "arn:aws:iam::123456789012:role/a"));
        assert!(is_allowed(&rows, "arn:aws:iam::123456789012:role/b"));
        assert!(!is_allowed(&rows, "arn:aws:iam::123456789012:role/c"));
        assert!(!is_allowed(
            &[None, None],
            "arn:aws:iam::123456789012:role/a"
        ));
    }
}
