//! The sidecar's cache policy, the broker's `max-age` and the broker's credential-cache reuse
//! rule, as a line-oriented JSON service for the models in `scripts/` (`scripts/pod_hour.py`):
//! the Rust code answers every decision, so a change of policy or of a default cannot leave a
//! model behind.
//!
//! One JSON object per line on stdin, one answer per line on stdout. Times are Unix seconds
//! (fractions allowed); durations are seconds.
//!
//! ```text
//! {"op":"defaults"}
//!   -> {"min_validity":900,"refresh_ahead":300,"cache_max_entries":64,"cache_margin":300,
//!       "projected_token_leeway":60,"projected_token_expiration":3600}
//! {"op":"admit","expiration":E,"max_age":M,"now":T}
//!   -> {"answer":"cache","fresh_until":F,"window":[MV,RA]} | {"answer":"serve-once"} | {"answer":"reject"}
//! {"op":"decide","expiration":E,"fresh_until":F,"window":[MV,RA],"now":T}
//!   -> {"answer":"serve"} | {"answer":"serve-and-refresh"} | {"answer":"fetch"}
//! {"op":"max_age","expiration":E,"now":T}
//!   -> {"max_age":S}          (the broker's Cache-Control: max-age)
//! {"op":"broker_reusable","expiration":E,"issued":I,"now":T}
//!   -> {"answer":true|false,"refresh_point":R}
//! ```
//!
//! `broker_reusable` is the rule of the broker's credential cache (`crates/broker/src/cache.rs`,
//! `Cached::reusable`): credentials that arrived at the broker at `I` (lifetime `E - I`, as the
//! cache measures it when `AssumeRole` returns) may be handed out again at `T` while
//! `E - T > R`, strictly, where `R` is
//! [`Window::sidecar_default`](iam_broker_kernel::credentials::Window::sidecar_default)`(E - I).refresh_point()`
//! (1200 s for one-hour credentials, 450 s for 900 s ones). `Cached` is private to the broker
//! crate and this crate does not depend on it, so the example applies the same kernel `Window`
//! with the same comparison; the broker's cache tests pin the rule on its side.
//!
//! Run: `cargo run -q -p iam-broker-proxy --example cache-policy`.
#![forbid(unsafe_code)]

use std::io::{BufRead as _, Write as _};
use std::time::Duration;

use iam_broker_kernel::config::{
    DEFAULT_PROJECTED_TOKEN_EXPIRATION_SECONDS, PROJECTED_TOKEN_LEEWAY,
};
use iam_broker_kernel::credentials::{CACHE_MARGIN_SECONDS, cache_max_age};
use iam_broker_proxy::config::{
    DEFAULT_CACHE_MAX_ENTRIES, DEFAULT_MIN_VALIDITY_SECONDS, DEFAULT_REFRESH_AHEAD_SECONDS,
};
use iam_broker_proxy::policy::{EntryTimes, OnAnswer, OnHit, Policy, Window};
use serde_json::{Value, json};
use time::OffsetDateTime;

fn main() -> anyhow::Result<()> {
    let policy = Policy {
        min_validity: Duration::from_secs(DEFAULT_MIN_VALIDITY_SECONDS),
        refresh_ahead: Duration::from_secs(DEFAULT_REFRESH_AHEAD_SECONDS),
    };
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let answer = match serde_json::from_str::<Value>(&line) {
            Ok(request) => answer(&policy, &request).unwrap_or_else(|why| json!({ "error": why })),
            Err(e) => json!({ "error": format!("not JSON: {e}") }),
        };
        writeln!(stdout, "{answer}")?;
        stdout.flush()?;
    }
    Ok(())
}

fn answer(policy: &Policy, request: &Value) -> Result<Value, String> {
    match request["op"].as_str() {
        Some("defaults") => Ok(json!({
            "min_validity": DEFAULT_MIN_VALIDITY_SECONDS,
            "refresh_ahead": DEFAULT_REFRESH_AHEAD_SECONDS,
            "cache_max_entries": DEFAULT_CACHE_MAX_ENTRIES,
            "cache_margin": CACHE_MARGIN_SECONDS,
            "projected_token_leeway": PROJECTED_TOKEN_LEEWAY.as_secs(),
            "projected_token_expiration": DEFAULT_PROJECTED_TOKEN_EXPIRATION_SECONDS,
        })),
        Some("admit") => {
            let max_age = request["max_age"].as_u64();
            let admitted = policy.admit(
                instant(request, "expiration")?,
                max_age,
                false,
                instant(request, "now")?,
            );
            Ok(match admitted {
                OnAnswer::Cache {
                    fresh_until,
                    window,
                } => json!({
                    "answer": "cache",
                    "fresh_until": seconds(fresh_until),
                    "window": [window.min_validity.as_secs_f64(), window.refresh_ahead.as_secs_f64()],
                }),
                OnAnswer::ServeOnce => json!({ "answer": "serve-once" }),
                OnAnswer::Reject => json!({ "answer": "reject" }),
            })
        }
        Some("decide") => {
            let window = request["window"]
                .as_array()
                .and_then(|w| Some((w.first()?.as_f64()?, w.get(1)?.as_f64()?)))
                .ok_or("window must be [min_validity, refresh_ahead]")?;
            let times = EntryTimes {
                expiration: instant(request, "expiration")?,
                fresh_until: instant(request, "fresh_until")?,
                retry_at: None,
                window: Window {
                    min_validity: duration(window.0)?,
                    refresh_ahead: duration(window.1)?,
                },
            };
            let decision = match policy.decide(&times, instant(request, "now")?) {
                OnHit::Serve => "serve",
                OnHit::ServeAndRefresh => "serve-and-refresh",
                OnHit::Fetch => "fetch",
            };
            Ok(json!({ "answer": decision }))
        }
        Some("max_age") => Ok(json!({
            "max_age": cache_max_age(instant(request, "expiration")?, instant(request, "now")?),
        })),
        Some("broker_reusable") => {
            let expiration = instant(request, "expiration")?;
            let issued = instant(request, "issued")?;
            let now = instant(request, "now")?;
            // As `CredentialCache::get_or_issue`: the lifetime left when the credentials arrive
            // (none if already past), and `Cached::reusable`'s strict comparison.
            let lifetime = Duration::try_from(expiration - issued).unwrap_or(Duration::ZERO);
            let refresh_point =
                iam_broker_kernel::credentials::Window::sidecar_default(lifetime).refresh_point();
            let span = time::Duration::try_from(refresh_point).unwrap_or(time::Duration::MAX);
            Ok(json!({
                "answer": expiration - now > span,
                "refresh_point": refresh_point.as_secs_f64(),
            }))
        }
        _ => Err(format!("unknown op in {request}")),
    }
}

fn instant(request: &Value, field: &str) -> Result<OffsetDateTime, String> {
    let value = request[field]
        .as_f64()
        .ok_or_else(|| format!("{field} must be a number of seconds"))?;
    // Whole nanoseconds; the models' times are far inside f64's exact range at that precision.
    #[allow(
        clippy::cast_possible_truncation,
        reason = "checked by the conversion below"
    )]
    let nanos = (value * 1e9).round() as i128;
    OffsetDateTime::from_unix_timestamp_nanos(nanos).map_err(|e| format!("{field}: {e}"))
}

fn seconds(instant: OffsetDateTime) -> f64 {
    // The inverse of `instant`: what the model hands in comes back unchanged.
    #[allow(
        clippy::cast_precision_loss,
        reason = "Unix nanoseconds of the models' era"
    )]
    let seconds = instant.unix_timestamp_nanos() as f64 / 1e9;
    seconds
}

fn duration(seconds: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{seconds} s: {e}"))
}
