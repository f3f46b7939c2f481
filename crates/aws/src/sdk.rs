//! One SDK configuration for every client: standard credential and region chain (with
//! `AWS_ENDPOINT_URL*` honoured), a deadline on every operation, and few retries, so a dead
//! dependency turns into a quick 503 instead of a hang.
//!
//! And [`AwsError`]: a failed SDK call explained in words that name the fix (set `AWS_REGION`,
//! provide credentials, check `AWS_ENDPOINT_URL`), with the SDK's error kept as its source.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use aws_config::default_provider::credentials::DefaultCredentialsChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, future};
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use iam_broker_kernel::ports::BoxError;

/// Loads the shared SDK configuration. `call_timeout` bounds each operation, retries included.
///
/// Region and credentials come from the standard chains, run quietly: those chains log every
/// source that has nothing with the SDK's debug dump, while a missing region or missing
/// credentials is reported once, by the first call, in words that name the fix
/// ([`AwsError::NoRegion`], [`AwsError::NoCredentials`]).
pub async fn load_sdk_config(call_timeout: Duration) -> SdkConfig {
    let region = quietly(
        aws_config::default_provider::region::DefaultRegionChain::builder()
            .build()
            .region(),
    )
    .await;
    // The region is settled: `Option<Region>` as the chain's region keeps it from looking again.
    let credentials = quietly(
        DefaultCredentialsChain::builder()
            .region(region.clone())
            .build(),
    )
    .await;
    aws_config::defaults(BehaviorVersion::latest())
        .region(region)
        .credentials_provider(QuietCredentials(credentials))
        .timeout_config(timeouts(call_timeout))
        .retry_config(RetryConfig::standard().with_max_attempts(2))
        .load()
        .await
}

/// Runs `future` with its log events dropped.
fn quietly<F: std::future::Future>(future: F) -> impl std::future::Future<Output = F::Output> {
    use tracing::instrument::WithSubscriber as _;
    future.with_subscriber(tracing::subscriber::NoSubscriber::default())
}

/// The standard credential chain without its per-source warnings (see [`load_sdk_config`]); what
/// it finally returns, error included, is unchanged.
#[derive(Debug)]
struct QuietCredentials(DefaultCredentialsChain);

impl ProvideCredentials for QuietCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(quietly(self.0.provide_credentials()))
    }
}

/// The timeout settings for a given per-call deadline: the whole operation within the deadline,
/// each attempt within half of it (so one retry fits), connecting within a second at most.
pub fn timeouts(call_timeout: Duration) -> TimeoutConfig {
    TimeoutConfig::builder()
        .operation_timeout(call_timeout)
        .operation_attempt_timeout(call_timeout / 2)
        .connect_timeout(call_timeout.min(Duration::from_secs(1)))
        .build()
}

/// The AWS services iam-broker calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    /// The Allowances and Authorizations tables.
    DynamoDb,
    /// `AssumeRole`, `GetCallerIdentity`.
    Sts,
    /// The kubeconfig parameter.
    Ssm,
    /// The stack's outputs (`--stack`).
    CloudFormation,
    /// The roles' inline deny policies (`iam-broker sessions`).
    Iam,
}

impl Service {
    /// The name people use, e.g. `DynamoDB`.
    pub fn name(self) -> &'static str {
        match self {
            Self::DynamoDb => "DynamoDB",
            Self::Sts => "STS",
            Self::Ssm => "SSM",
            Self::CloudFormation => "CloudFormation",
            Self::Iam => "IAM",
        }
    }

    /// The variable that sets this service's endpoint alone, e.g. `AWS_ENDPOINT_URL_DYNAMODB`.
    pub fn endpoint_variable(self) -> &'static str {
        match self {
            Self::DynamoDb => "AWS_ENDPOINT_URL_DYNAMODB",
            Self::Sts => "AWS_ENDPOINT_URL_STS",
            Self::Ssm => "AWS_ENDPOINT_URL_SSM",
            Self::CloudFormation => "AWS_ENDPOINT_URL_CLOUDFORMATION",
            Self::Iam => "AWS_ENDPOINT_URL_IAM",
        }
    }

    fn host_prefix(self) -> &'static str {
        match self {
            Self::DynamoDb => "dynamodb",
            Self::Sts => "sts",
            Self::Ssm => "ssm",
            Self::CloudFormation => "cloudformation",
            Self::Iam => "iam",
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The variable that sets every service's endpoint.
pub const ENV_ENDPOINT_URL: &str = "AWS_ENDPOINT_URL";
/// `true` makes the SDK ignore the endpoint variables.
const ENV_IGNORE_ENDPOINT_URLS: &str = "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS";

/// Where a service's calls go, and the variable that sent them there.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The URL.
    pub url: String,
    /// `AWS_ENDPOINT_URL_<SERVICE>` or `AWS_ENDPOINT_URL`; `None` for AWS's own endpoint.
    pub variable: Option<&'static str>,
}

impl Endpoint {
    /// The endpoint of `service` as the process environment sets it (the SDK reads the same
    /// variables, the service's own first).
    pub fn of(service: Service, region: Option<&str>) -> Self {
        Self::resolve(service, region, |name| std::env::var(name).ok())
    }

    /// [`Endpoint::of`] over any key/value source.
    pub fn resolve(
        service: Service,
        region: Option<&str>,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Self {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let ignored = get(ENV_IGNORE_ENDPOINT_URLS).is_some_and(|v| v.eq_ignore_ascii_case("true"));
        if !ignored {
            for variable in [service.endpoint_variable(), ENV_ENDPOINT_URL] {
                if let Some(url) = get(variable) {
                    return Self {
                        url: url.trim().to_owned(),
                        variable: Some(variable),
                    };
                }
            }
        }
        let region = region.unwrap_or("<region>");
        let domain = if region.starts_with("cn-") {
            "amazonaws.com.cn"
        } else {
            "amazonaws.com"
        };
        Self {
            url: format!("https://{}.{region}.{domain}", service.host_prefix()),
            variable: None,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.variable {
            Some(variable) => write!(f, "{} (from {variable})", self.url),
            None => f.write_str(&self.url),
        }
    }
}

/// A failed AWS call, explained: what is wrong and what to set. The SDK's error is the source.
#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    /// No region in the environment, the profile or instance metadata.
    #[error("no AWS region is set: set AWS_REGION (for example AWS_REGION=us-east-1)")]
    NoRegion(#[source] BoxError),
    /// No source of the standard chain holds credentials.
    #[error(
        "no AWS credentials found (tried AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the profile \
         AWS_PROFILE names in ~/.aws/credentials and ~/.aws/config, web identity \
         (AWS_WEB_IDENTITY_TOKEN_FILE), the container endpoint (AWS_CONTAINER_CREDENTIALS_*) and \
         EC2 instance metadata): set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    )]
    NoCredentials(#[source] BoxError),
    /// A credential source is configured but failed (a broken profile, an expired SSO session).
    #[error(
        "the AWS credentials could not be loaded: check AWS_PROFILE and its entry in \
         ~/.aws/config, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    )]
    CredentialsUnusable(#[source] BoxError),
    /// AWS does not accept the credentials (unknown key, bad secret, expired session).
    #[error(
        "{service} does not accept the AWS credentials ({code}): check AWS_ACCESS_KEY_ID, \
         AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN, or AWS_PROFILE"
    )]
    CredentialsRejected {
        /// The service that refused.
        service: Service,
        /// Its error code, e.g. `InvalidClientTokenId`.
        code: String,
        /// The SDK's error.
        #[source]
        source: BoxError,
    },
    /// An endpoint variable that is not an `http://` or `https://` URL.
    #[error(
        "{} is not a URL ({:?}): set it to http://host:port or https://host, or unset it",
        endpoint.variable.unwrap_or(ENV_ENDPOINT_URL),
        endpoint.url
    )]
    BadEndpoint {
        /// The endpoint as the variable gives it.
        endpoint: Endpoint,
        /// The SDK's error (its own text quotes the whole request, so it is not printed).
        #[source]
        source: SdkFailure,
    },
    /// No connection: refused, unknown host, TLS failure, or no answer to the connect.
    #[error("cannot reach {service} at {endpoint}: {}", unreachable_fix(endpoint))]
    Unreachable {
        /// The service called.
        service: Service,
        /// Where the call went.
        endpoint: Endpoint,
        /// The SDK's error.
        #[source]
        source: BoxError,
    },
    /// Something answered, but not as AWS does (an HTML page, some other JSON).
    #[error(
        "{endpoint} answered HTTP {status}{}, which is not {service}: {}",
        content_type.as_deref().map(|t| format!(" ({t})")).unwrap_or_default(),
        not_aws_fix(endpoint)
    )]
    NotAws {
        /// The service called.
        service: Service,
        /// Where the call went.
        endpoint: Endpoint,
        /// The HTTP status of the answer.
        status: u16,
        /// Its `Content-Type`.
        content_type: Option<String>,
        /// The SDK's error.
        #[source]
        source: BoxError,
    },
    /// The call did not finish within its deadline.
    #[error("{service} at {endpoint} did not answer in time (the deadline is AWS_CALL_TIMEOUT_MS)")]
    TimedOut {
        /// The service called.
        service: Service,
        /// Where the call went.
        endpoint: Endpoint,
        /// The SDK's error.
        #[source]
        source: BoxError,
    },
    /// Any other failure, in the SDK's words (e.g. `service error: AccessDeniedException: ...`).
    #[error(transparent)]
    Call(BoxError),
}

fn unreachable_fix(endpoint: &Endpoint) -> String {
    match endpoint.variable {
        Some(variable) => format!(
            "check {variable} (is the URL right, and is the service running there?) or unset it \
             to call AWS itself"
        ),
        None => "check the network, any HTTPS_PROXY, and AWS_REGION".to_owned(),
    }
}

fn not_aws_fix(endpoint: &Endpoint) -> String {
    match endpoint.variable {
        Some(variable) => format!(
            "{variable} must name an AWS endpoint (or a stand-in such as moto), or be unset"
        ),
        None => "a proxy or firewall answered instead of AWS: check HTTPS_PROXY".to_owned(),
    }
}

/// An SDK error kept as a source. It reads as the SDK's own words ("service error", "dispatch
/// failure") followed by its causes, minus the link the SDK repeats: an operation error (e.g.
/// `ScanError`) displays exactly as the modeled error it wraps, which would print
/// `ResourceNotFoundException: ...: ResourceNotFoundException: ...`.
#[derive(Debug)]
pub struct SdkFailure {
    error: BoxError,
    causes: bool,
}

impl SdkFailure {
    /// Wraps an SDK error.
    pub fn new(error: impl StdError + Send + Sync + 'static) -> Self {
        Self {
            error: Box::new(error),
            causes: true,
        }
    }

    /// Wraps an SDK error whose causes are not fit to print.
    fn without_causes(error: impl StdError + Send + Sync + 'static) -> Self {
        Self {
            error: Box::new(error),
            causes: false,
        }
    }

    /// The SDK's error itself (e.g. to downcast to `SdkError<ScanError, _>`).
    pub fn sdk_error(&self) -> &(dyn StdError + Send + Sync + 'static) {
        self.error.as_ref()
    }
}

impl fmt::Display for SdkFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl StdError for SdkFailure {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        if !self.causes {
            return None;
        }
        let mut link = self.error.source()?;
        while let Some(next) = link.source() {
            if next.to_string() != link.to_string() {
                break;
            }
            link = next;
        }
        Some(link)
    }
}

fn sdk(error: impl StdError + Send + Sync + 'static) -> BoxError {
    Box::new(SdkFailure::new(error))
}

/// Error codes that mean AWS does not accept the caller's credentials.
const REJECTED_CREDENTIAL_CODES: &[&str] = &[
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "SignatureDoesNotMatch",
    "InvalidSignatureException",
    "ExpiredToken",
    "ExpiredTokenException",
];

/// The error code of a failed call: the SDK's, or, when the SDK could not read the body, the
/// `<Code>` of an XML error body (moto answers IAM refusals of JSON-protocol calls, such as
/// SSM's, in XML).
pub fn error_code<E: ProvideErrorMetadata>(error: &SdkError<E, HttpResponse>) -> Option<String> {
    let SdkError::ServiceError(failure) = error else {
        return None;
    };
    failure.err().code().map(str::to_owned).or_else(|| {
        failure
            .raw()
            .body()
            .bytes()
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|body| xml_text(body, "Code"))
    })
}

/// The text of the first `<tag>...</tag>` in an XML error body.
pub(crate) fn xml_text(body: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = body.find(&open)? + open.len();
    let end = body[start..].find(&format!("</{tag}>"))?;
    Some(body[start..start + end].to_owned())
}

/// Explains a failed call to `service` made by a client configured for `region`.
pub fn explain<E>(
    service: Service,
    region: Option<&Region>,
    error: SdkError<E, HttpResponse>,
) -> AwsError
where
    E: StdError + ProvideErrorMetadata + Send + Sync + 'static,
{
    let endpoint = || Endpoint::of(service, region.map(Region::as_ref));
    let before_sending = matches!(
        error,
        SdkError::ConstructionFailure(_) | SdkError::DispatchFailure(_)
    );
    if before_sending && region.is_none() {
        return AwsError::NoRegion(sdk(error));
    }
    if let Some(credentials) = find::<CredentialsError>(&error) {
        return if matches!(credentials, CredentialsError::CredentialsNotLoaded(_)) {
            AwsError::NoCredentials(sdk(error))
        } else {
            AwsError::CredentialsUnusable(sdk(error))
        };
    }
    if before_sending {
        let endpoint = endpoint();
        let url = endpoint.url.to_ascii_lowercase();
        if endpoint.variable.is_some()
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return AwsError::BadEndpoint {
                endpoint,
                source: SdkFailure::without_causes(error),
            };
        }
    }
    match &error {
        SdkError::DispatchFailure(failure) if failure.is_io() || failure.is_timeout() => {
            AwsError::Unreachable {
                service,
                endpoint: endpoint(),
                source: sdk(error),
            }
        }
        SdkError::TimeoutError(_) => AwsError::TimedOut {
            service,
            endpoint: endpoint(),
            source: sdk(error),
        },
        SdkError::ServiceError(failure) => match error_code(&error) {
            Some(code) if REJECTED_CREDENTIAL_CODES.contains(&code.as_str()) => {
                AwsError::CredentialsRejected {
                    service,
                    code,
                    source: sdk(error),
                }
            }
            None if !answered_by_aws(failure.raw()) => {
                let (status, content_type) = status_and_type(failure.raw());
                not_aws(service, endpoint(), status, content_type, sdk(error))
            }
            _ => AwsError::Call(sdk(error)),
        },
        SdkError::ResponseError(failure) if !answered_by_aws(failure.raw()) => {
            let (status, content_type) = status_and_type(failure.raw());
            not_aws(service, endpoint(), status, content_type, sdk(error))
        }
        _ => AwsError::Call(sdk(error)),
    }
}

fn not_aws(
    service: Service,
    endpoint: Endpoint,
    status: u16,
    content_type: Option<String>,
    source: BoxError,
) -> AwsError {
    AwsError::NotAws {
        service,
        endpoint,
        status,
        content_type,
        source,
    }
}

/// The HTTP status and the media type (without parameters) of an answer.
fn status_and_type(raw: &HttpResponse) -> (u16, Option<String>) {
    let content_type = raw
        .headers()
        .get("content-type")
        .map(|t| t.split(';').next().unwrap_or(t).trim().to_owned());
    (raw.status().as_u16(), content_type)
}

/// Every AWS service (and moto, and LocalStack) sends a request id with each answer; a web
/// server, a proxy's error page or another API does not.
fn answered_by_aws(raw: &HttpResponse) -> bool {
    ["x-amzn-requestid", "x-amz-request-id", "x-amzn-request-id"]
        .iter()
        .any(|name| raw.headers().get(*name).is_some())
}

/// The first error of type `T` in `error`'s source chain (itself included).
fn find<'a, T: StdError + 'static>(error: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    iam_broker_kernel::text::sources(error).find_map(|e| e.downcast_ref::<T>())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::{Endpoint, Service};

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn the_service_variable_wins_over_the_global_one() {
        let env = lookup(&[
            ("AWS_ENDPOINT_URL", "http://a:1"),
            ("AWS_ENDPOINT_URL_DYNAMODB", "http://d:2"),
        ]);
        let dynamodb = Endpoint::resolve(Service::DynamoDb, Some("eu-west-1"), &env);
        assert_eq!(dynamodb.url, "http://d:2");
        assert_eq!(dynamodb.variable, Some("AWS_ENDPOINT_URL_DYNAMODB"));
        assert_eq!(
            dynamodb.to_string(),
            "http://d:2 (from AWS_ENDPOINT_URL_DYNAMODB)"
        );
        let sts = Endpoint::resolve(Service::Sts, Some("eu-west-1"), &env);
        assert_eq!(sts.variable, Some("AWS_ENDPOINT_URL"));
    }

    #[test]
    fn reads_codes_from_either_xml_error_shape() {
        use super::xml_text;
        let nested = "<ErrorResponse><Errors><Error><Code>AccessDenied</Code><Message>no</Message></Error></Errors></ErrorResponse>";
        assert_eq!(xml_text(nested, "Code").as_deref(), Some("AccessDenied"));
        assert_eq!(xml_text(nested, "Message").as_deref(), Some("no"));
        assert_eq!(xml_text("<x/>", "Code"), None);
    }

    #[test]
    fn without_variables_the_endpoint_is_aws_own() {
        let none = lookup(&[]);
        let ssm = Endpoint::resolve(Service::Ssm, Some("eu-west-1"), &none);
        assert_eq!(ssm.to_string(), "https://ssm.eu-west-1.amazonaws.com");
        let ignored = lookup(&[
            ("AWS_ENDPOINT_URL", "http://a:1"),
            ("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true"),
        ]);
        let sts = Endpoint::resolve(Service::Sts, Some("cn-north-1"), &ignored);
        assert_eq!(sts.url, "https://sts.cn-north-1.amazonaws.com.cn");
        assert_eq!(sts.variable, None);
    }
}
