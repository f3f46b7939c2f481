//! A clock for tests and benchmarks.

use iam_broker_kernel::clock::Clock;
use time::OffsetDateTime;

/// A clock that always says the same time.
#[derive(Debug, Clone, Copy)]
pub struct FixedClock(pub OffsetDateTime);

impl Clock for FixedClock {
    fn now(&self) -> OffsetDateTime {
        self.0
    }
}
