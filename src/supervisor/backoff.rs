//! Restart delays: exponential backoff for workers that keep failing.
//!
//! A worker that ran for at least [`Backoff::stable_after`] before exiting is restarted at once
//! (a crash after hours of service is news, not a loop). One that failed sooner (crashed at
//! boot, never listened) counts as a consecutive failure, and the n-th consecutive failure waits
//! `base * 2^(n-1)`, capped at `max`. A crash-looping app thus costs a handful of starts a
//! minute, not hundreds, and never takes the front process down.

use std::time::Duration;

/// The restart policy of an app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first quick failure.
    pub base: Duration,
    /// Longest delay.
    pub max: Duration,
    /// A run at least this long resets the failure count.
    pub stable_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(15),
            stable_after: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The new consecutive-failure count after a worker that ran for `uptime` and was (or was
    /// not) ever ready exits.
    pub fn failures_after_exit(&self, failures: u32, uptime: Duration, was_ready: bool) -> u32 {
        if was_ready && uptime >= self.stable_after {
            0
        } else {
            failures.saturating_add(1)
        }
    }

    /// How long to wait before restarting after `failures` consecutive failures.
    pub fn delay(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl(failures - 1).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_and_cap() {
        let b = Backoff::default();
        let delays: Vec<u128> = (0..10).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(delays, [0, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 15000]);
        assert_eq!(b.delay(u32::MAX), b.max);
    }

    #[test]
    fn a_stable_run_resets_the_count() {
        let b = Backoff::default();
        assert_eq!(b.failures_after_exit(5, Duration::from_secs(60), true), 0);
        assert_eq!(b.failures_after_exit(5, Duration::from_secs(1), true), 6);
        // Never ready is a failure however long it took.
        assert_eq!(b.failures_after_exit(0, Duration::from_secs(60), false), 1);
    }

    #[test]
    fn a_crash_loop_makes_a_handful_of_attempts_in_six_seconds() {
        let b = Backoff::default();
        let mut failures = 0;
        let mut elapsed = Duration::ZERO;
        let mut attempts = 0;
        while elapsed < Duration::from_secs(6) {
            attempts += 1;
            failures = b.failures_after_exit(failures, Duration::from_millis(50), false);
            elapsed += Duration::from_millis(50) + b.delay(failures);
        }
        assert!((4..=10).contains(&attempts), "{attempts} attempts");
    }
}
