//! `sdk-whoami`: an application as the AWS SDK for Rust sees it. It loads credentials through the
//! SDK's default chain (in an injected container that is the container provider, reading
//! `AWS_CONTAINER_CREDENTIALS_FULL_URI` and `AWS_CONTAINER_AUTHORIZATION_TOKEN[_FILE]`), calls
//! `sts:GetCallerIdentity`, and prints `{"Arn", "Account", "AccessKeyId"}` as JSON. The end-to-end
//! suites run it against the sidecar proxy and the broker itself. It prints no secret. With
//! `IAMB_TIMING=1` it also prints, on stderr, when the first credentials arrived (wall clock).
#![forbid(unsafe_code)]

use aws_config::BehaviorVersion;
use aws_credential_types::provider::ProvideCredentials as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = aws_config::defaults(BehaviorVersion::latest()).load().await;
    let provider = config
        .credentials_provider()
        .ok_or_else(|| anyhow::anyhow!("the SDK found no credentials provider"))?;
    let credentials = provider.provide_credentials().await.map_err(|e| {
        // The provider's own message is generic; the cause chain says what went wrong.
        anyhow::anyhow!(iam_broker_kernel::text::error_chain(&e))
    })?;
    if std::env::var_os("IAMB_TIMING").is_some_and(|v| v == "1") {
        // For scripts/bench-direct.sh: when the first credentials arrived, on the wall clock
        // (the harness noted when it started the process).
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0);
        eprintln!("first credentials at {at:.1} ms since the epoch");
    }
    let identity = aws_sdk_sts::Client::new(&config)
        .get_caller_identity()
        .send()
        .await?;
    let answer = serde_json::json!({
        "Arn": identity.arn(),
        "Account": identity.account(),
        "AccessKeyId": credentials.access_key_id(),
        "Expiry": credentials.expiry().map(|t| {
            t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
        }),
    });
    println!("{answer}");
    Ok(())
}
