//! A role's inline policy by name, on IAM: what `iam-broker sessions` reads and writes (the
//! revocations policy of [`iam_broker_broker::revocation`]). Needs `iam:GetRolePolicy`,
//! `iam:PutRolePolicy` and `iam:DeleteRolePolicy` on the brokered roles.

use aws_sdk_iam::Client;
use aws_sdk_iam::error::ProvideErrorMetadata as _;

use crate::sdk::{AwsError, Service, explain};

/// Inline role policies through the IAM API.
#[derive(Debug, Clone)]
pub struct RolePolicies {
    client: Client,
}

/// The role name of a role ARN: its last path segment (`arn:aws:iam::1:role/a/b` → `b`).
pub fn role_name(role_arn: &str) -> Option<&str> {
    let (_, path) = role_arn.split_once(":role/")?;
    path.rsplit('/').next().filter(|n| !n.is_empty())
}

impl RolePolicies {
    /// Policies through `client`.
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// Policies through a client of this SDK configuration.
    pub fn from_sdk(sdk: &aws_config::SdkConfig) -> Self {
        Self::new(Client::new(sdk))
    }

    /// The policy document (JSON text), `None` when the role has no policy of that name.
    pub async fn get(&self, role: &str, policy: &str) -> Result<Option<String>, AwsError> {
        let answer = self
            .client
            .get_role_policy()
            .role_name(role)
            .policy_name(policy)
            .send()
            .await;
        match answer {
            Ok(output) => Ok(Some(decode_document(output.policy_document()))),
            Err(error)
                if error.as_service_error().and_then(|e| e.code()) == Some("NoSuchEntity") =>
            {
                // A missing role is an error; a missing policy is none.
                let message = error
                    .as_service_error()
                    .and_then(|e| e.message())
                    .unwrap_or_default();
                if message.contains("policy") || message.contains("Policy") {
                    Ok(None)
                } else {
                    Err(explain(Service::Iam, None, error))
                }
            }
            Err(error) => Err(explain(Service::Iam, None, error)),
        }
    }

    /// Creates or replaces the policy.
    pub async fn put(&self, role: &str, policy: &str, document: &str) -> Result<(), AwsError> {
        self.client
            .put_role_policy()
            .role_name(role)
            .policy_name(policy)
            .policy_document(document)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| explain(Service::Iam, None, e))
    }

    /// Deletes the policy; `Ok` when it was already gone.
    pub async fn delete(&self, role: &str, policy: &str) -> Result<(), AwsError> {
        match self
            .client
            .delete_role_policy()
            .role_name(role)
            .policy_name(policy)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(error)
                if error.as_service_error().and_then(|e| e.code()) == Some("NoSuchEntity") =>
            {
                Ok(())
            }
            Err(error) => Err(explain(Service::Iam, None, error)),
        }
    }
}

/// IAM answers policy documents URL-encoded (RFC 3986); emulators sometimes do not.
fn decode_document(text: &str) -> String {
    if text.trim_start().starts_with('{') {
        return text.to_owned();
    }
    iam_broker_kernel::text::percent_decode(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_and_encoded_documents() {
        assert_eq!(
            role_name("arn:aws:iam::123456789012:role/a/b/app"),
            Some("app")
        );
        assert_eq!(role_name("arn:aws:iam::123456789012:role/app"), Some("app"));
        assert_eq!(role_name("arn:aws:iam::123456789012:user/app"), None);
        assert_eq!(decode_document("%7B%22a%22%3A1%7D"), "{\"a\":1}");
        assert_eq!(decode_document("{\"a\":1}"), "{\"a\":1}");
    }
}
