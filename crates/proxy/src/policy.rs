//! The cache policy as pure functions of the time: when a cached credential may be served, when a
//! background refresh starts, what to do with a fresh broker answer, and how long to back off
//! after failed refreshes. Nothing here reads a clock; callers pass `now`.
//!
//! The rules (README, "The sidecar proxy"):
//! - **Servable** means at least the entry's min validity is left before `Expiration`: the
//!   configured `min_validity`, or a third of the credentials' lifetime when that is shorter
//!   (see [`Policy::window`]). Nothing else is ever served from the cache, so expired
//!   credentials never are.
//! - **Fresh** ends at the earlier of the broker's `Cache-Control: max-age` (an upper bound,
//!   counted from when the answer arrived) and the refresh-ahead point,
//!   `Expiration - min_validity - refresh_ahead` (both of the entry's window). A servable entry past that point is still
//!   served at once, and one background refresh starts (refresh-ahead, stale-while-valid).
//! - After a failed refresh, the next one waits [`retry_delay`] (exponential backoff), while the
//!   entry keeps being served as long as it is servable.
//! - An entry that is no longer servable is never served: the caller waits for the broker, and
//!   gets the broker's answer, credentials or error. Backoff does not apply there: there is
//!   nothing better to give that caller, and concurrent callers still share one broker call.
//! - Refreshes are started by requests, not timers, so the cache never needs to keep a raw
//!   token: an idle sidecar makes no broker calls, and a request that comes after its entry fell
//!   below min validity waits for the broker. Refresh-ahead therefore pays off when several
//!   processes share a token; a lone SDK that returns only when its copy is 15 minutes from
//!   expiry usually gets a foreground fetch.

use std::time::Duration;

use time::OffsetDateTime;

/// The first retry after a failed refresh waits this long; each further failure doubles it.
pub const RETRY_BASE: Duration = Duration::from_secs(1);
/// The longest wait between refresh attempts.
pub const RETRY_MAX: Duration = Duration::from_secs(60);
pub use iam_broker_kernel::credentials::{MIN_VALIDITY_FLOOR, Window};

/// The timing knobs of the cache, from [`crate::ProxyConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The least validity left on anything served from the cache.
    pub min_validity: Duration,
    /// How long before the min-validity point a background refresh starts.
    pub refresh_ahead: Duration,
}

/// What the cache remembers about the timing of one token's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryTimes {
    /// The credentials' `Expiration`.
    pub expiration: OffsetDateTime,
    /// End of freshness: the broker's `max-age` bound, never later than `expiration`.
    pub fresh_until: OffsetDateTime,
    /// After failed refreshes: no new refresh before this instant.
    pub retry_at: Option<OffsetDateTime>,
    /// The entry's window, fixed when it was cached.
    pub window: Window,
}

impl EntryTimes {
    /// Whether the entry may be served at `now`: at least its min validity left.
    pub fn servable(&self, now: OffsetDateTime) -> bool {
        self.expiration - now >= span(self.window.min_validity)
    }
}

/// What to do with a request that finds a cached entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnHit {
    /// Serve the entry.
    Serve,
    /// Serve the entry and start a background refresh (unless one is already running).
    ServeAndRefresh,
    /// The entry must not be served: drop it and wait for the broker.
    Fetch,
}

/// What to do with credentials the broker has just returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnAnswer {
    /// Serve and cache them; they are fresh until `fresh_until`.
    Cache {
        /// End of freshness.
        fresh_until: OffsetDateTime,
        /// The entry's window.
        window: Window,
    },
    /// Serve them to the callers waiting for this broker call, but do not cache them: they
    /// already have less than `min_validity` left (or the broker said `no-store`). They are the
    /// best there is right now, and an SDK that gets them will come back soon; the next request
    /// asks the broker again.
    ServeOnce,
    /// Never serve them: they have already expired.
    Reject,
}

impl Policy {
    /// The window of credentials that have `lifetime` left when the broker returns them:
    /// `min_validity` and `refresh_ahead` as configured, each capped (to a third and a sixth of
    /// the lifetime) so that short-lived credentials are cached too. With the defaults (900 s and
    /// 300 s) one-hour credentials keep 900 s / 300 s, while STS's shortest, 900 s, get 300 s /
    /// 150 s: cached for ten minutes and refreshed ahead after about seven, instead of never
    /// cached and fetched from the broker (an STS call) on every SDK request. An SDK that wants
    /// more left than the entry has (botocore refreshes 15 minutes ahead) comes back on its next
    /// call and is served from the cache: a loopback round trip, not an STS call.
    /// Credentials with less than [`MIN_VALIDITY_FLOOR`] to live are not cached at all.
    pub fn window(&self, lifetime: Duration) -> Window {
        Window::for_lifetime(self.min_validity, self.refresh_ahead, lifetime)
    }

    /// The instant from which a request should start a background refresh.
    pub fn refresh_at(&self, times: &EntryTimes) -> OffsetDateTime {
        let ahead = times
            .expiration
            .checked_sub(span(times.window.min_validity))
            .and_then(|t| t.checked_sub(span(times.window.refresh_ahead)))
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        ahead.min(times.fresh_until)
    }

    /// Decides how to answer a request that finds `times` in the cache at `now`.
    pub fn decide(&self, times: &EntryTimes, now: OffsetDateTime) -> OnHit {
        if !times.servable(now) {
            OnHit::Fetch
        } else if now >= self.refresh_at(times) && times.retry_at.is_none_or(|at| now >= at) {
            OnHit::ServeAndRefresh
        } else {
            OnHit::Serve
        }
    }

    /// Decides what to do with credentials expiring at `expiration` that the broker returned at
    /// `now` with `Cache-Control: max-age=max_age` (`None` when absent: freshness is then bounded
    /// by the expiry alone) and possibly `no-store`.
    pub fn admit(
        &self,
        expiration: OffsetDateTime,
        max_age: Option<u64>,
        no_store: bool,
        now: OffsetDateTime,
    ) -> OnAnswer {
        let lifetime = Duration::try_from(expiration - now).unwrap_or(Duration::ZERO);
        let window = self.window(lifetime);
        if expiration <= now {
            OnAnswer::Reject
        } else if no_store || lifetime < window.min_validity {
            OnAnswer::ServeOnce
        } else {
            let bound = max_age
                .and_then(|seconds| i64::try_from(seconds).ok())
                .and_then(|seconds| now.checked_add(time::Duration::seconds(seconds)))
                .unwrap_or(expiration);
            OnAnswer::Cache {
                fresh_until: bound.min(expiration),
                window,
            }
        }
    }

    /// When the next refresh may start after `failures` failed attempts in a row, the last at
    /// `now`.
    pub fn retry_at(&self, failures: u32, now: OffsetDateTime) -> OffsetDateTime {
        now.saturating_add(span(retry_delay(failures)))
    }
}

/// The wait after `failures` failed refreshes in a row: 1 s, 2 s, 4 s, ... up to [`RETRY_MAX`].
pub fn retry_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    RETRY_BASE.saturating_mul(1 << doublings).min(RETRY_MAX)
}

fn span(duration: Duration) -> time::Duration {
    time::Duration::try_from(duration).unwrap_or(time::Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-11-22 06:00:00 UTC);
    const POLICY: Policy = Policy {
        min_validity: Duration::from_secs(900),
        refresh_ahead: Duration::from_secs(300),
    };

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// Credentials fetched at T0 that expire an hour later, with the broker's max-age
    /// (expiry minus five minutes).
    fn one_hour_entry() -> EntryTimes {
        let expiration = T0 + time::Duration::hours(1);
        let OnAnswer::Cache {
            fresh_until,
            window,
        } = POLICY.admit(expiration, Some(3300), false, T0)
        else {
            panic!("one-hour credentials must be cached");
        };
        assert_eq!(window, POLICY.window(secs(3600)));
        EntryTimes {
            expiration,
            fresh_until,
            retry_at: None,
            window,
        }
    }

    #[test]
    fn servable_means_at_least_min_validity_left() {
        let entry = EntryTimes {
            expiration: T0 + time::Duration::minutes(30),
            fresh_until: T0,
            retry_at: None,
            window: POLICY.window(secs(1800)),
        };
        assert_eq!(
            entry.window.min_validity,
            secs(600),
            "a third of 30 minutes"
        );
        let clock = ManualClock::new(T0);
        assert!(entry.servable(clock.now()));
        clock.advance(secs(20 * 60));
        assert!(entry.servable(clock.now()), "exactly 10 minutes left");
        clock.advance(secs(1));
        assert!(!entry.servable(clock.now()));
        clock.advance(secs(3600));
        assert!(!entry.servable(clock.now()), "expired");
    }

    #[test]
    fn windows_shrink_for_short_lived_credentials_only() {
        // One hour or more: as configured.
        for lifetime in [3600, 3599, 2700, 43_200] {
            let window = POLICY.window(secs(lifetime));
            assert_eq!(window.min_validity, secs(900), "{lifetime}");
            assert_eq!(window.refresh_ahead, secs(300), "{lifetime}");
        }
        // STS's shortest: a third and a sixth.
        assert_eq!(
            POLICY.window(secs(900)),
            Window {
                min_validity: secs(300),
                refresh_ahead: secs(150)
            }
        );
        // Never below the floor, unless configured lower.
        assert_eq!(POLICY.window(secs(90)).min_validity, MIN_VALIDITY_FLOOR);
        let low = Policy {
            min_validity: secs(30),
            refresh_ahead: secs(10),
        };
        assert_eq!(low.window(secs(900)).min_validity, secs(30));
    }

    #[test]
    fn an_entry_is_served_then_refreshed_ahead_then_fetched() {
        // GIVEN one-hour credentials, min validity 15 minutes, refresh 5 minutes ahead of that
        let entry = one_hour_entry();
        let clock = ManualClock::new(T0);
        assert_eq!(POLICY.refresh_at(&entry), T0 + time::Duration::minutes(40));
        // THEN they are served as they are for 40 minutes
        assert_eq!(POLICY.decide(&entry, clock.now()), OnHit::Serve);
        clock.advance(secs(40 * 60 - 1));
        assert_eq!(POLICY.decide(&entry, clock.now()), OnHit::Serve);
        // THEN served with a background refresh until 15 minutes are left
        clock.advance(secs(1));
        assert_eq!(POLICY.decide(&entry, clock.now()), OnHit::ServeAndRefresh);
        clock.advance(secs(5 * 60));
        assert_eq!(POLICY.decide(&entry, clock.now()), OnHit::ServeAndRefresh);
        // THEN never served again
        clock.advance(secs(1));
        assert_eq!(POLICY.decide(&entry, clock.now()), OnHit::Fetch);
        clock.advance(secs(3600));
        assert_eq!(POLICY.decide(&entry, clock.now()), OnHit::Fetch);
    }

    #[test]
    fn the_brokers_max_age_bounds_freshness() {
        let expiration = T0 + time::Duration::hours(1);
        let OnAnswer::Cache {
            fresh_until,
            window,
        } = POLICY.admit(expiration, Some(60), false, T0)
        else {
            panic!("must be cached");
        };
        assert_eq!(fresh_until, T0 + time::Duration::seconds(60));
        let entry = EntryTimes {
            expiration,
            fresh_until,
            retry_at: None,
            window,
        };
        assert_eq!(
            POLICY.decide(&entry, T0 + time::Duration::seconds(59)),
            OnHit::Serve
        );
        assert_eq!(
            POLICY.decide(&entry, T0 + time::Duration::seconds(60)),
            OnHit::ServeAndRefresh
        );
    }

    #[test]
    fn a_max_age_beyond_the_expiry_or_absent_is_capped_by_the_expiry() {
        let expiration = T0 + time::Duration::hours(1);
        for max_age in [None, Some(7200), Some(u64::MAX)] {
            assert_eq!(
                POLICY.admit(expiration, max_age, false, T0),
                OnAnswer::Cache {
                    fresh_until: expiration,
                    window: POLICY.window(secs(3600)),
                },
                "{max_age:?}"
            );
        }
        // The refresh-ahead point still comes first.
        let entry = EntryTimes {
            expiration,
            fresh_until: expiration,
            retry_at: None,
            window: POLICY.window(secs(3600)),
        };
        assert_eq!(POLICY.refresh_at(&entry), T0 + time::Duration::minutes(40));
    }

    #[test]
    fn short_lived_answers_are_cached_for_a_shorter_window_and_expired_ones_never_served() {
        let now = T0;
        let admit =
            |left: i64| POLICY.admit(now + time::Duration::seconds(left), Some(0), false, now);
        assert!(matches!(admit(900), OnAnswer::Cache { .. }));
        // STS's 900 s arrive with a little less: cached, not served once (the call storm of
        // issue 12: every SDK request went to the broker and STS).
        assert!(matches!(
            admit(899),
            OnAnswer::Cache { window, .. } if window.min_validity == secs(899) / 3
        ));
        assert!(matches!(admit(60), OnAnswer::Cache { .. }));
        assert_eq!(admit(59), OnAnswer::ServeOnce, "below the floor");
        assert_eq!(admit(1), OnAnswer::ServeOnce);
        assert_eq!(admit(0), OnAnswer::Reject);
        assert_eq!(admit(-60), OnAnswer::Reject);
        assert_eq!(
            POLICY.admit(now + time::Duration::hours(1), Some(3300), true, now),
            OnAnswer::ServeOnce,
            "no-store"
        );
    }

    #[test]
    fn a_refresh_waits_for_its_backoff_but_serving_does_not() {
        // GIVEN an entry in its refresh window whose last refresh failed at `failed`
        let mut entry = one_hour_entry();
        let failed = T0 + time::Duration::minutes(41);
        entry.retry_at = Some(POLICY.retry_at(1, failed));
        // THEN it is served without a refresh until the backoff is over
        assert_eq!(POLICY.decide(&entry, failed), OnHit::Serve);
        assert_eq!(
            POLICY.decide(&entry, failed + time::Duration::milliseconds(999)),
            OnHit::Serve
        );
        assert_eq!(
            POLICY.decide(&entry, failed + time::Duration::seconds(1)),
            OnHit::ServeAndRefresh
        );
        // THEN a backoff never keeps an entry servable past min validity
        entry.retry_at = Some(T0 + time::Duration::hours(2));
        assert_eq!(
            POLICY.decide(&entry, T0 + time::Duration::minutes(46)),
            OnHit::Fetch
        );
    }

    #[test]
    fn retry_delay_doubles_up_to_a_minute() {
        let delays: Vec<u64> = (1..=9).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(retry_delay(0), RETRY_BASE);
        assert_eq!(retry_delay(u32::MAX), RETRY_MAX);
    }

    #[test]
    fn refresh_ahead_of_zero_refreshes_at_the_min_validity_point() {
        let policy = Policy {
            refresh_ahead: Duration::ZERO,
            ..POLICY
        };
        let expiration = T0 + time::Duration::hours(1);
        let OnAnswer::Cache {
            fresh_until,
            window,
        } = policy.admit(expiration, None, false, T0)
        else {
            panic!("must be cached");
        };
        assert_eq!(window.refresh_ahead, Duration::ZERO);
        let entry = EntryTimes {
            expiration,
            fresh_until,
            retry_at: None,
            window,
        };
        assert_eq!(policy.refresh_at(&entry), T0 + time::Duration::minutes(45));
    }
}
