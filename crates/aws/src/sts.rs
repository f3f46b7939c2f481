//! [`CredentialIssuer`] on `sts:AssumeRole`.

use async_trait::async_trait;
use aws_config::Region;
use aws_sdk_sts::Client;
use aws_sdk_sts::config::http::HttpResponse;
use aws_sdk_sts::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sts::operation::assume_role::AssumeRoleError;
use aws_sdk_sts::types::Tag;
use iam_broker_kernel::Credentials;
use iam_broker_kernel::ports::{AssumeRoleRequest, CredentialIssuer, IssueError, StsRetryable};
use time::OffsetDateTime;

use crate::sdk::{AwsError, Service, explain, xml_text};

/// STS error codes that mean "try again later" rather than "no".
const RETRYABLE_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "ServiceUnavailable",
    "InternalFailure",
];

/// Issues credentials with `sts:AssumeRole`, using the process's own AWS identity.
#[derive(Debug, Clone)]
pub struct StsCredentialIssuer {
    client: Client,
}

impl StsCredentialIssuer {
    /// Wraps an STS client.
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

#[async_trait]
impl CredentialIssuer for StsCredentialIssuer {
    async fn assume_role(&self, request: &AssumeRoleRequest) -> Result<Credentials, IssueError> {
        let tags = request
            .tags
            .iter()
            .map(|(key, value)| Tag::builder().key(*key).value(value).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| IssueError::Unavailable(Box::new(e)))?;
        let duration = i32::try_from(request.duration.as_secs()).unwrap_or(3600);
        let output = self
            .client
            .assume_role()
            .role_arn(&request.role_arn)
            .role_session_name(&request.session_name)
            .duration_seconds(duration)
            .set_tags((!tags.is_empty()).then_some(tags))
            .set_source_identity(request.source_identity.clone())
            .set_external_id(request.external_id.clone())
            .set_policy(request.policy.clone())
            .send()
            .await
            .map_err(|e| classify(self.client.config().region(), e))?;
        let credentials = output.credentials.ok_or_else(|| IssueError::Refused {
            code: "MissingCredentials".to_owned(),
            message: "STS answered without credentials".to_owned(),
        })?;
        let expiration = OffsetDateTime::from_unix_timestamp(credentials.expiration.secs())
            .map_err(|e| IssueError::Unavailable(Box::new(e)))?;
        Ok(Credentials {
            access_key_id: credentials.access_key_id,
            secret_access_key: credentials.secret_access_key,
            session_token: credentials.session_token,
            expiration,
        })
    }
}

fn classify(region: Option<&Region>, error: SdkError<AssumeRoleError, HttpResponse>) -> IssueError {
    match &error {
        SdkError::ServiceError(service) => {
            // Some STS-compatible endpoints (moto among them) wrap the error in an extra
            // <Errors> element the SDK's parser does not read; fall back to the raw body so the
            // operator still sees STS's own code.
            let raw = service
                .raw()
                .body()
                .bytes()
                .and_then(|b| std::str::from_utf8(b).ok());
            let code = service
                .err()
                .code()
                .map(str::to_owned)
                .or_else(|| raw.and_then(|body| xml_text(body, "Code")))
                .unwrap_or_else(|| format!("HTTP{}", service.raw().status().as_u16()));
            if RETRYABLE_CODES.contains(&code.as_str()) {
                return IssueError::Unavailable(Box::new(StsRetryable {
                    code,
                    source: Box::new(explain(Service::Sts, region, error)),
                }));
            }
            let message = service
                .err()
                .message()
                .map(str::to_owned)
                .or_else(|| raw.and_then(|body| xml_text(body, "Message")))
                .unwrap_or_default();
            IssueError::Refused { code, message }
        }
        _ => IssueError::Unavailable(Box::new(explain(Service::Sts, region, error))),
    }
}

/// `sts:GetCallerIdentity`: the ARN the process runs as (for `iam-broker doctor`).
pub async fn caller_arn(sts: &aws_sdk_sts::Client) -> Result<String, AwsError> {
    sts.get_caller_identity()
        .send()
        .await
        .map_err(|e| explain(Service::Sts, sts.config().region(), e))
        .map(|identity| identity.arn.unwrap_or_default())
}
