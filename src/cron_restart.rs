//! `cron_restart` (PM2's): a rolling restart of an app at the times a five-field cron
//! expression names, in local time ([`crate::cron`]).
//!
//! One task per app, on the main runtime. It sleeps towards the next firing in steps of at
//! most a minute, re-reading the wall clock at each step, so a clock that is set (NTP, a
//! suspended VM) does not make it fire hours late. A restart is `corral restart APP`: rolling,
//! no failed request, and never two at once with a reload: when a reload (or another restart)
//! runs as the time comes, it waits for that to finish and then restarts, once. A firing
//! missed entirely (corral was not running) is not made up for. Each restart is an event,
//! `cron_restart`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::events::{Draft, Events, Kind};
use crate::config::AppConfig;
use crate::cron::Schedule;
use crate::logs::files::Zone;
use crate::supervisor::{ErrorCode, Handle};

/// The longest single sleep: the wall clock is looked at again after it.
const STEP: Duration = Duration::from_secs(60);
/// How often a restart refused because a reload runs is asked again.
const RETRY: Duration = Duration::from_secs(1);

/// Starts `app`'s cron task, if it has `cron_restart`.
pub fn spawn(app: &AppConfig, supervisor: Handle, events: Arc<Events>, stop: CancellationToken) {
    if let Some(schedule) = app.cron_restart.clone() {
        info!(app = %app.name, cron = %schedule, "cron_restart scheduled");
        tokio::spawn(run(app.name.clone(), schedule, supervisor, events, stop));
    }
}

async fn run(app: String, schedule: Schedule, supervisor: Handle, events: Arc<Events>, stop: CancellationToken) {
    loop {
        let Some(next) = Zone::Local.next(&schedule, SystemTime::now()) else {
            warn!(app = %app, cron = %schedule, "cron_restart never fires again");
            return;
        };
        // Towards `next`, a step at a time.
        loop {
            let left = next.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
            if left.is_zero() {
                break;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(left.min(STEP)) => {}
            }
        }
        loop {
            let (progress, mut lines) = mpsc::unbounded_channel();
            let restart = supervisor.restart(Some(app.clone()), progress);
            tokio::pin!(restart);
            let outcome = loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    outcome = &mut restart => break outcome,
                    Some(_) = lines.recv() => {}
                }
            };
            match outcome {
                Ok(message) => {
                    events.emit(Draft::new(Kind::CronRestart, &app).message(format!("{schedule}: {message}")));
                    break;
                }
                Err(e) if e.code == ErrorCode::Busy => {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(RETRY) => {}
                    }
                }
                Err(e) if e.code == ErrorCode::Stopping => return,
                Err(e) => {
                    warn!(app = %app, cron = %schedule, error = %e.message, "cron_restart failed");
                    break;
                }
            }
        }
    }
}
