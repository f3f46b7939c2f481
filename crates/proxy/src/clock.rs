//! Clocks for the sidecar: the cache policy reads wall-clock time through [`Clock`] (from the
//! core crate), so tests can move time by hand with [`ManualClock`].

use std::sync::Mutex;
use std::time::Duration;

pub use iam_broker_kernel::clock::{Clock, SystemClock};
use time::OffsetDateTime;

/// A clock that stands still until told to move (tests, benchmarks).
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<OffsetDateTime>,
}

impl ManualClock {
    /// A clock showing `now`.
    pub fn new(now: OffsetDateTime) -> Self {
        Self {
            now: Mutex::new(now),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self
            .now
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *now = now.saturating_add(time::Duration::try_from(by).unwrap_or(time::Duration::MAX));
    }

    /// Sets the clock to `to`.
    pub fn set(&self, to: OffsetDateTime) {
        *self
            .now
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self
            .now
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(datetime!(2026-11-22 06:00:00 UTC));
        assert_eq!(clock.now(), datetime!(2026-11-22 06:00:00 UTC));
        clock.advance(Duration::from_secs(90));
        assert_eq!(clock.now(), datetime!(2026-11-22 06:01:30 UTC));
        clock.set(datetime!(2026-11-22 05:00:00 UTC));
        assert_eq!(clock.now(), datetime!(2026-11-22 05:00:00 UTC));
    }
}
