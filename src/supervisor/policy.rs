//! What happens after a worker exits: PM2's restart policy, as pure functions.
//!
//! - An exit code listed in `stop_exit_codes`, or `autorestart = false`, leaves the slot
//!   *stopped* (a deliberate exit is not a crash).
//! - Otherwise the slot restarts after `restart_delay` plus an exponential backoff: the n-th
//!   failure in a row waits `exp_backoff_restart_delay * 2^(n-1)`, capped at 15 s. A run of 30 s
//!   or more resets the backoff, as in PM2. A crash-looping app thus costs a handful of starts a
//!   minute, not hundreds, and never takes the front process down.
//! - A worker that exits before `min_uptime` (or before it was ever ready) is an *unstable*
//!   restart; after more than `max_restarts` of those in a row the slot is *errored* and left
//!   alone until the next reload. PM2 counts the same way.

use std::time::Duration;

use crate::config::AppConfig;

/// The longest backoff delay.
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// A run at least this long resets the backoff.
const BACKOFF_RESET: Duration = Duration::from_secs(30);

/// An app's restart policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Restart at all.
    pub autorestart: bool,
    /// Runs shorter than this are unstable.
    pub min_uptime: Duration,
    /// Unstable restarts in a row before the slot is errored.
    pub max_restarts: u32,
    /// Fixed delay before every restart.
    pub restart_delay: Duration,
    /// First step of the exponential backoff; zero disables it.
    pub backoff_base: Duration,
    /// Exit codes that mean "do not restart".
    pub stop_exit_codes: Vec<i32>,
}

impl RestartPolicy {
    /// The policy an app's config asks for.
    pub fn of(config: &AppConfig) -> RestartPolicy {
        RestartPolicy {
            autorestart: config.autorestart,
            min_uptime: config.min_uptime,
            max_restarts: config.max_restarts,
            restart_delay: config.restart_delay,
            backoff_base: config.exp_backoff_restart_delay,
            stop_exit_codes: config.stop_exit_codes.clone(),
        }
    }

    /// The backoff after `failures` failures in a row.
    pub fn backoff(&self, failures: u32) -> Duration {
        if failures == 0 || self.backoff_base.is_zero() {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl(failures - 1).unwrap_or(u32::MAX);
        self.backoff_base.saturating_mul(factor).min(BACKOFF_MAX)
    }
}

/// A slot's recent history, updated by [`after_exit`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct History {
    /// Unstable restarts in a row.
    pub unstable: u32,
    /// Failures in a row, for the backoff.
    pub failures: u32,
}

/// What to do once a worker has exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterExit {
    /// Nothing: corral is stopping.
    Forget,
    /// Start a new worker in the slot after this delay.
    Restart(Duration),
    /// Leave the slot empty: the exit was deliberate (`stop_exit_codes`, `autorestart = false`).
    Stopped,
    /// Leave the slot empty: it kept crashing (`max_restarts`).
    Errored,
}

/// Decides what follows an exit of a worker that ran for `uptime`.
pub fn after_exit(
    policy: &RestartPolicy,
    history: &mut History,
    shutting_down: bool,
    uptime: Duration,
    was_ready: bool,
    exit_code: Option<i32>,
) -> AfterExit {
    if shutting_down {
        return AfterExit::Forget;
    }
    if exit_code.is_some_and(|code| policy.stop_exit_codes.contains(&code)) || !policy.autorestart {
        return AfterExit::Stopped;
    }
    let unstable = !was_ready || uptime < policy.min_uptime;
    history.unstable = if unstable {
        history.unstable.saturating_add(1)
    } else {
        0
    };
    history.failures = if was_ready && uptime >= BACKOFF_RESET {
        0
    } else {
        history.failures.saturating_add(1)
    };
    if history.unstable > policy.max_restarts {
        return AfterExit::Errored;
    }
    AfterExit::Restart(policy.restart_delay + policy.backoff(history.failures))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            autorestart: true,
            min_uptime: Duration::from_secs(1),
            max_restarts: 16,
            restart_delay: Duration::ZERO,
            backoff_base: Duration::from_millis(100),
            stop_exit_codes: vec![],
        }
    }

    #[test]
    fn delays_double_and_cap() {
        let p = policy();
        let delays: Vec<u128> = (0..10).map(|n| p.backoff(n).as_millis()).collect();
        assert_eq!(delays, [0, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 15000]);
        assert_eq!(p.backoff(u32::MAX), BACKOFF_MAX);
        let off = RestartPolicy {
            backoff_base: Duration::ZERO,
            ..policy()
        };
        assert_eq!(off.backoff(5), Duration::ZERO);
    }

    #[test]
    fn exits_while_stopping_are_not_restarted() {
        let mut history = History {
            unstable: 3,
            failures: 3,
        };
        assert_eq!(
            after_exit(&policy(), &mut history, true, Duration::ZERO, false, Some(1)),
            AfterExit::Forget
        );
        assert_eq!(
            history,
            History {
                unstable: 3,
                failures: 3
            }
        );
    }

    #[test]
    fn quick_failures_back_off_and_a_long_run_restarts_at_once() {
        let p = RestartPolicy {
            restart_delay: Duration::from_millis(50),
            ..policy()
        };
        let mut h = History::default();
        let ms = Duration::from_millis;
        let table = [
            (ms(30), false, AfterExit::Restart(ms(150))),
            (ms(30), false, AfterExit::Restart(ms(250))),
            (Duration::from_secs(2), true, AfterExit::Restart(ms(450))),
            (Duration::from_secs(3600), true, AfterExit::Restart(ms(50))),
        ];
        for (uptime, ready, want) in table {
            assert_eq!(
                after_exit(&p, &mut h, false, uptime, ready, Some(1)),
                want,
                "{uptime:?}"
            );
        }
        assert_eq!(
            h,
            History {
                unstable: 0,
                failures: 0
            }
        );
    }

    #[test]
    fn a_crash_loop_is_errored_after_max_restarts() {
        let p = RestartPolicy {
            max_restarts: 3,
            ..policy()
        };
        let mut h = History::default();
        let outcomes: Vec<AfterExit> = (0..4)
            .map(|_| after_exit(&p, &mut h, false, Duration::from_millis(10), false, Some(1)))
            .collect();
        assert!(matches!(
            outcomes[..3],
            [AfterExit::Restart(_), AfterExit::Restart(_), AfterExit::Restart(_)]
        ));
        assert_eq!(outcomes[3], AfterExit::Errored);
        // A stable run in between resets the count.
        let mut h = History {
            unstable: 3,
            failures: 3,
        };
        assert!(matches!(
            after_exit(&p, &mut h, false, Duration::from_secs(5), true, Some(1)),
            AfterExit::Restart(_)
        ));
        assert_eq!(h.unstable, 0);
    }

    #[test]
    fn deliberate_exits_stop_the_slot() {
        let p = RestartPolicy {
            stop_exit_codes: vec![0, 3],
            ..policy()
        };
        let mut h = History::default();
        assert_eq!(
            after_exit(&p, &mut h, false, Duration::from_secs(5), true, Some(3)),
            AfterExit::Stopped
        );
        assert!(matches!(
            after_exit(&p, &mut h, false, Duration::from_secs(5), true, Some(1)),
            AfterExit::Restart(_)
        ));
        assert!(matches!(
            after_exit(&p, &mut h, false, Duration::from_secs(5), true, None),
            AfterExit::Restart(_)
        ));
        let never = RestartPolicy {
            autorestart: false,
            ..policy()
        };
        assert_eq!(
            after_exit(&never, &mut h, false, Duration::from_secs(5), true, Some(1)),
            AfterExit::Stopped
        );
    }

    #[test]
    fn a_boot_crash_loop_makes_a_handful_of_attempts_in_six_seconds() {
        let p = policy();
        let mut h = History::default();
        let mut elapsed = Duration::ZERO;
        let mut attempts = 0;
        while elapsed < Duration::from_secs(6) {
            attempts += 1;
            match after_exit(&p, &mut h, false, Duration::from_millis(50), false, Some(1)) {
                AfterExit::Restart(delay) => elapsed += Duration::from_millis(50) + delay,
                other => panic!("{other:?}"),
            }
        }
        assert!((4..=10).contains(&attempts), "{attempts} attempts");
    }
}
