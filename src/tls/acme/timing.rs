//! When to order a certificate, and how long to wait after a failure: pure functions of the
//! clock, so the loop in `acme` only sleeps and acts.

use std::time::{Duration, SystemTime};

/// The first wait after a failed attempt; each further failure doubles it, up to
/// [`MAX_RETRY`]. Short enough that a directory that was down for a moment is retried soon,
/// long enough that a broken setup does not hammer the CA.
pub(super) const FIRST_RETRY: Duration = Duration::from_secs(10);

/// The longest wait between attempts.
pub(super) const MAX_RETRY: Duration = Duration::from_secs(3600);

/// The longest single sleep: the wall clock is looked at again at least this often, so a
/// suspended machine or a clock that was set does not postpone a renewal by weeks.
pub(super) const MAX_SLEEP: Duration = Duration::from_secs(3600);

/// When a certificate valid from `not_before` to `not_after` should be renewed: once a third
/// of its lifetime is left (day 60 of Let's Encrypt's 90, as certbot and Caddy do).
pub(super) fn renew_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    match not_after.duration_since(not_before) {
        Ok(lifetime) => not_before + lifetime.mul_f64(2.0 / 3.0),
        // A certificate that ends before it starts is due now.
        Err(_) => not_before.min(not_after),
    }
}

/// The wait after the `failures`-th failure in a row (counting from 1).
pub(super) fn retry_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_RETRY.saturating_mul(1 << doublings).min(MAX_RETRY)
}

/// How long to sleep before looking again at a renewal due at `due`: zero if it is due.
pub(super) fn sleep_before(now: SystemTime, due: SystemTime) -> Duration {
    due.duration_since(now).unwrap_or(Duration::ZERO).min(MAX_SLEEP)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn at(days: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + DAY * 1000 + DAY * days as u32
    }

    #[test]
    fn renewal_comes_when_a_third_of_the_lifetime_is_left() {
        // Let's Encrypt's 90 days: renew on day 60.
        assert_eq!(renew_at(at(0), at(90)), at(60));
        // Six-day certificates: day 4.
        assert_eq!(renew_at(at(0), at(6)), at(4));
        // Nonsense validity is due at once.
        assert_eq!(renew_at(at(5), at(1)), at(1));
    }

    #[test]
    fn sleeps_are_capped_and_never_negative() {
        assert_eq!(sleep_before(at(0), at(60)), MAX_SLEEP);
        assert_eq!(
            sleep_before(at(0), at(0) + Duration::from_secs(5)),
            Duration::from_secs(5)
        );
        assert_eq!(sleep_before(at(61), at(60)), Duration::ZERO);
    }

    #[test]
    fn retries_double_from_ten_seconds_to_an_hour() {
        let delays: Vec<u64> = (1..=11).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600]);
        assert_eq!(retry_delay(0), FIRST_RETRY);
        assert_eq!(retry_delay(u32::MAX), MAX_RETRY);
    }
}
