//! Kubernetes and AWS names as the domain accepts them: DNS labels and subdomains (namespaces,
//! ServiceAccounts, cluster names), and the one error that says which rule a value broke.

use std::fmt;

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

/// A registered cluster's name: a DNS-1123 label (1–63 of `a-z`, `0-9`, `-`). It scopes
/// allowances and is the `eks-cluster-name` session tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterName(String);

impl ClusterName {
    /// Validates a cluster name.
    pub fn parse(value: &str) -> Result<Self, InvalidName> {
        validate_dns_label("cluster name", value)?;
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

/// Checks a DNS-1123 label: 1–63 of `a-z`, `0-9`, `-`, not starting or ending with `-`.
pub fn validate_dns_label(what: &'static str, value: &str) -> Result<(), InvalidName> {
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

/// Checks a DNS-1123 subdomain: dot-separated labels, 1–253 characters in all.
pub fn validate_dns_subdomain(what: &'static str, value: &str) -> Result<(), InvalidName> {
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
