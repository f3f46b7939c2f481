//! The sidecar's cache policy (`iam_broker_proxy::policy`) and the `max-age` it answers with
//! (`credentials::cache_max_age`), driven through a sequence of broker answers, requests and
//! failed refreshes the way the cache drives them, at arbitrary instants.

use std::time::Duration;

use arbitrary::{Result, Unstructured};
use iam_broker_kernel::credentials::cache_max_age;
use iam_broker_proxy::policy::{
    EntryTimes, MIN_VALIDITY_FLOOR, OnAnswer, OnHit, Policy, RETRY_BASE, RETRY_MAX, retry_delay,
};
use time::OffsetDateTime;

/// An instant: mostly near a fixed "now", sometimes at the ends of what `time` can hold.
fn instant(u: &mut Unstructured<'_>, near: OffsetDateTime) -> Result<OffsetDateTime> {
    let offset = match u.choose_index(4)? {
        0 => i64::from(u.arbitrary::<i16>()?),
        1 => i64::from(u.arbitrary::<i32>()?),
        2 => i64::from(u.int_in_range(-7200..=7200i32)?),
        _ => u.arbitrary::<i64>()?,
    };
    let at = near
        .checked_add(time::Duration::seconds(offset))
        .unwrap_or(if offset < 0 {
            OffsetDateTime::UNIX_EPOCH
        } else {
            near
        });
    Ok(at)
}

fn duration(u: &mut Unstructured<'_>) -> Result<Duration> {
    Ok(match u.choose_index(3)? {
        0 => Duration::from_secs(u.int_in_range(0..=7200u64)?),
        1 => Duration::from_millis(u.arbitrary()?),
        _ => Duration::from_secs(u.arbitrary()?),
    })
}

fn span(d: Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

/// Target: a policy and a run of events against one cache entry.
pub fn cache_policy(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let policy = Policy {
        min_validity: duration(u)?,
        refresh_ahead: duration(u)?,
    };
    let start =
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let mut now = start;
    let mut entry: Option<(EntryTimes, u32)> = None;
    for _ in 0..u.int_in_range(1..=24u8)? {
        match u.choose_index(4)? {
            // The broker answers.
            0 => {
                let expiration = instant(u, now)?;
                let max_age = if u.arbitrary()? {
                    Some(u.arbitrary::<u64>()? % 100_000)
                } else {
                    u.arbitrary()?
                };
                let no_store = u.ratio(1u8, 8u8)?;
                let verdict = policy.admit(expiration, max_age, no_store, now);
                check_answer(&policy, expiration, max_age, no_store, now, verdict);
                if let OnAnswer::Cache {
                    fresh_until,
                    window,
                } = verdict
                {
                    entry = Some((
                        EntryTimes {
                            expiration,
                            fresh_until,
                            retry_at: None,
                            window,
                        },
                        0,
                    ));
                }
                // What the sidecar then answers never promises past the expiry.
                let max_age = cache_max_age(expiration, now);
                if expiration > now {
                    let promised = i64::try_from(max_age).unwrap_or(i64::MAX);
                    assert!(now + time::Duration::seconds(promised) <= expiration);
                } else {
                    assert_eq!(max_age, 0);
                }
            }
            // A request finds the entry.
            1 => {
                if let Some((times, _)) = &entry {
                    let hit = policy.decide(times, now);
                    check_hit(&policy, times, now, hit);
                    if hit == OnHit::Fetch {
                        entry = None;
                    }
                }
            }
            // A background refresh failed.
            2 => {
                if let Some((times, failures)) = &mut entry {
                    *failures = failures.saturating_add(1);
                    let at = policy.retry_at(*failures, now);
                    assert!(at >= now);
                    let delay = retry_delay(*failures);
                    assert!((RETRY_BASE..=RETRY_MAX).contains(&delay));
                    assert!(retry_delay(failures.saturating_add(1)) >= delay);
                    times.retry_at = Some(at);
                }
            }
            // Time passes (or the clock steps back).
            _ => now = instant(u, now)?,
        }
    }
    Ok(())
}

fn check_answer(
    policy: &Policy,
    expiration: OffsetDateTime,
    max_age: Option<u64>,
    no_store: bool,
    now: OffsetDateTime,
    verdict: OnAnswer,
) {
    let left = expiration - now;
    // The documented window: the configured min validity, shrunk to a third of the lifetime but
    // never below the floor (unless configured lower).
    let lifetime = std::time::Duration::try_from(left).unwrap_or_default();
    let min_validity = policy
        .min_validity
        .min((lifetime / 3).max(MIN_VALIDITY_FLOOR));
    match verdict {
        OnAnswer::Reject => assert!(expiration <= now, "rejected with {left} left"),
        OnAnswer::ServeOnce => {
            assert!(expiration > now, "expired credentials served");
            assert!(no_store || left < span(min_validity));
        }
        OnAnswer::Cache {
            fresh_until,
            window,
        } => {
            assert!(!no_store, "no-store answer cached");
            assert_eq!(window.min_validity, min_validity);
            assert!(window.refresh_ahead <= policy.refresh_ahead);
            assert!(left >= span(window.min_validity), "cached with {left} left");
            assert!(fresh_until <= expiration, "fresh past the expiry");
            assert!(fresh_until >= now);
            let bound = max_age
                .and_then(|s| i64::try_from(s).ok())
                .and_then(|s| now.checked_add(time::Duration::seconds(s)));
            if let Some(bound) = bound {
                assert!(fresh_until <= bound, "fresh past max-age");
            }
        }
    }
}

fn check_hit(policy: &Policy, times: &EntryTimes, now: OffsetDateTime, hit: OnHit) {
    let left = times.expiration - now;
    let min_validity = times.window.min_validity;
    assert!(min_validity >= policy.min_validity.min(MIN_VALIDITY_FLOOR));
    match hit {
        OnHit::Fetch => assert!(left < span(min_validity)),
        OnHit::Serve | OnHit::ServeAndRefresh => {
            // Never served below the entry's min validity, hence never past expiry.
            assert!(left >= span(min_validity), "served with {left} left");
            assert!(times.expiration > now || min_validity.is_zero());
            let refresh =
                now >= policy.refresh_at(times) && times.retry_at.is_none_or(|at| now >= at);
            assert_eq!(hit == OnHit::ServeAndRefresh, refresh);
        }
    }
    assert!(policy.refresh_at(times) <= times.fresh_until);
}
