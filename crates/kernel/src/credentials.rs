//! Temporary credentials and their ECS container-credentials JSON form.

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

/// How long before `Expiration` caches must stop reusing an answer (README, "HTTP API": 5 minutes).
pub const CACHE_MARGIN_SECONDS: i64 = 300;

/// How much validity the AWS SDKs want left on container credentials: botocore's advisory
/// refresh (and the Rust and JavaScript SDKs' buffer) starts 15 minutes before `Expiration`.
pub const SDK_MIN_VALIDITY: Duration = Duration::from_secs(900);
/// How long before [`SDK_MIN_VALIDITY`] the sidecar refreshes ahead, by default.
pub const DEFAULT_REFRESH_AHEAD: Duration = Duration::from_secs(300);
/// The least validity a window ever asks for (unless the configured minimum is smaller): a
/// credential is never cached to be served with seconds to live, which a request in flight
/// could outlast.
pub const MIN_VALIDITY_FLOOR: Duration = Duration::from_secs(60);

/// The timing knobs that apply to one cached credential, shrunk for short-lived credentials
/// (see [`Window::for_lifetime`]). Used by the sidecar's cache and the broker's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The least validity left on anything served from this entry.
    pub min_validity: Duration,
    /// How long before the min-validity point a refresh starts.
    pub refresh_ahead: Duration,
}

impl Window {
    /// The window of credentials that have `lifetime` left when they arrive: `min_validity` and
    /// `refresh_ahead` as configured, each capped (to a third and a sixth of the lifetime) so
    /// that short-lived credentials are cached too. With 900 s and 300 s, one-hour credentials
    /// keep 900 s / 300 s, while STS's shortest, 900 s, get 300 s / 150 s. The minimum never
    /// drops below [`MIN_VALIDITY_FLOOR`] unless `min_validity` itself is smaller.
    pub fn for_lifetime(
        min_validity: Duration,
        refresh_ahead: Duration,
        lifetime: Duration,
    ) -> Self {
        Self {
            min_validity: min_validity.min((lifetime / 3).max(MIN_VALIDITY_FLOOR)),
            refresh_ahead: refresh_ahead.min(lifetime / 6),
        }
    }

    /// The sidecar's default window ([`SDK_MIN_VALIDITY`], [`DEFAULT_REFRESH_AHEAD`]) for
    /// credentials of `lifetime`.
    pub fn sidecar_default(lifetime: Duration) -> Self {
        Self::for_lifetime(SDK_MIN_VALIDITY, DEFAULT_REFRESH_AHEAD, lifetime)
    }

    /// The point, counted back from `Expiration`, where a refresh starts:
    /// `min_validity + refresh_ahead`.
    pub fn refresh_point(&self) -> Duration {
        self.min_validity.saturating_add(self.refresh_ahead)
    }
}

/// Temporary AWS credentials from `sts:AssumeRole`.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// `ASIA...` access key id.
    pub access_key_id: String,
    /// Secret access key. Never logged.
    pub secret_access_key: String,
    /// Session token. Never logged.
    pub session_token: String,
    /// When the credentials stop working.
    pub expiration: OffsetDateTime,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &"<redacted>")
            .field("expiration", &self.expiration)
            .finish()
    }
}

/// The JSON body the AWS SDKs' container credential provider reads. Its `Debug` leaves out the
/// secret key and the session token, so an answer (or the broker's `BrokerAnswer` holding
/// one) can never print them.
#[derive(Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EcsCredentials {
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// Session token.
    pub token: String,
    /// RFC 3339 UTC with a `Z` and whole seconds (the Rust and JS SDKs reject offsets).
    pub expiration: String,
    /// Account of the role, so SDKs can do account-based endpoint routing.
    pub account_id: String,
    /// The role the credentials belong to.
    pub role_arn: String,
}

impl fmt::Debug for EcsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EcsCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("token", &"<redacted>")
            .field("expiration", &self.expiration)
            .field("account_id", &self.account_id)
            .field("role_arn", &self.role_arn)
            .finish()
    }
}

impl EcsCredentials {
    /// Builds the answer for `credentials` of `role_arn` in `account_id`.
    pub fn new(credentials: &Credentials, role_arn: &str, account_id: &str) -> Self {
        Self {
            access_key_id: credentials.access_key_id.clone(),
            secret_access_key: credentials.secret_access_key.clone(),
            token: credentials.session_token.clone(),
            expiration: format_expiration(credentials.expiration),
            account_id: account_id.to_owned(),
            role_arn: role_arn.to_owned(),
        }
    }
}

/// Formats an instant as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_expiration(instant: OffsetDateTime) -> String {
    let utc = instant
        .to_offset(UtcOffset::UTC)
        .replace_nanosecond(0)
        .unwrap_or(instant);
    // RFC 3339 formatting of a UTC instant with whole seconds cannot fail for years 0..=9999;
    // fall back to the unix timestamp rather than panic if it ever did.
    utc.format(&Rfc3339)
        .unwrap_or_else(|_| utc.unix_timestamp().to_string())
}

/// `max-age` for an answer whose credentials expire at `expiration`: the seconds until five
/// minutes before expiry, never negative.
pub fn cache_max_age(expiration: OffsetDateTime, now: OffsetDateTime) -> u64 {
    let seconds = (expiration - now).whole_seconds() - CACHE_MARGIN_SECONDS;
    u64::try_from(seconds).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn expiration_is_utc_with_z_and_whole_seconds() {
        let t = datetime!(2026-11-22 08:00:00.123 +01:00);
        assert_eq!(format_expiration(t), "2026-11-22T07:00:00Z");
    }

    #[test]
    fn max_age_is_five_minutes_short_of_expiry_and_never_negative() {
        let now = datetime!(2026-11-22 06:00:00 UTC);
        assert_eq!(cache_max_age(datetime!(2026-11-22 07:00:00 UTC), now), 3300);
        assert_eq!(cache_max_age(datetime!(2026-11-22 06:05:00 UTC), now), 0);
        assert_eq!(cache_max_age(datetime!(2026-11-22 06:04:00 UTC), now), 0);
        assert_eq!(cache_max_age(datetime!(2026-11-22 05:00:00 UTC), now), 0);
    }

    #[test]
    fn ecs_json_uses_the_sdk_field_names_and_debug_hides_secrets() {
        let creds = Credentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: "secret-value".into(),
            session_token: "session-value".into(),
            expiration: datetime!(2026-11-22 07:00:00 UTC),
        };
        let answer = EcsCredentials::new(
            &creds,
            "arn:aws:iam::123456789012:role/iam-broker/r",
            "123456789012",
        );
        let json = serde_json::to_value(&answer).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "AccessKeyId": "ASIAEXAMPLE",
                "SecretAccessKey": "secret-value",
                "Token": "session-value",
                "Expiration": "2026-11-22T07:00:00Z",
                "AccountId": "123456789012",
                "RoleArn": "arn:aws:iam::123456789012:role/iam-broker/r"
            })
        );
        for debug in [format!("{creds:?}"), format!("{answer:?}")] {
            assert!(
                !debug.contains("secret-value") && !debug.contains("session-value"),
                "{debug}"
            );
            assert!(debug.contains("ASIAEXAMPLE") && debug.contains("<redacted>"));
        }
    }
}
