//! Orphans: corral reaps every process the kernel re-parents to it.
//!
//! `corral run` makes itself a child subreaper (`PR_SET_CHILD_SUBREAPER`), so a process that a
//! worker double-forked and then left behind is re-parented to corral, not to init; and in a
//! container corral is often PID 1, which every orphan of the PID namespace is re-parented to.
//! Either way an orphan that exits stays a zombie until corral waits for it, and a PID 1 that
//! never does fills the process table.
//!
//! The workers are corral's children too, and tokio waits for each of them to report its exit
//! status: a reaper that called `waitpid(-1)` would steal those. So the reaper knows the
//! workers' pids ([`spawned`] records each one while holding the same lock the reaper takes,
//! so no worker is ever seen before it is recorded) and waits only for the other zombies
//! whose parent is corral, found in `/proc`. It runs on every SIGCHLD and every
//! [`SWEEP_EVERY`] (a signal can be coalesced), on the main runtime.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// A sweep runs at least this often.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// The pids of children that tokio waits for (the workers).
static WAITED: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

fn waited() -> std::sync::MutexGuard<'static, BTreeSet<u32>> {
    WAITED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `spawn` (which starts a child that something else waits for) and records the child's
/// pid, both under the reaper's lock.
pub fn spawned<T>(spawn: impl FnOnce() -> std::io::Result<T>, pid: impl Fn(&T) -> Option<u32>) -> std::io::Result<T> {
    let mut waited = waited();
    let child = spawn()?;
    if let Some(pid) = pid(&child) {
        waited.insert(pid);
    }
    Ok(child)
}

/// The child `pid`, recorded by [`spawned`], has been waited for.
pub fn waited_for(pid: u32) {
    waited().remove(&pid);
}

/// Makes corral the reaper of its descendants' orphans (PID 1 is one anyway).
pub fn become_subreaper() {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        warn!(error = %e, "cannot become a child subreaper; orphans of workers go to init");
    }
    if std::process::id() == 1 {
        info!("running as PID 1: orphans of the whole PID namespace are reaped");
    }
}

/// Reaps orphans on SIGCHLD and every [`SWEEP_EVERY`] until `stop`.
pub async fn run(stop: CancellationToken) {
    let mut sigchld = match signal(SignalKind::child()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot watch SIGCHLD; orphans are reaped every {SWEEP_EVERY:?}");
            let mut every = tokio::time::interval(SWEEP_EVERY);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = every.tick() => { reap(); }
                }
            }
        }
    };
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = sigchld.recv() => {}
            _ = every.tick() => {}
        }
        reap();
    }
}

/// Waits for every zombie child of corral that is not a recorded worker; how many.
pub fn reap() -> usize {
    let me = std::process::id();
    let waited = waited();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut reaped = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if waited.contains(&pid) {
            continue;
        }
        let Some((parent, state)) = parent_and_state(pid) else {
            continue;
        };
        if parent != me || state != 'Z' {
            continue;
        }
        let Ok(raw) = i32::try_from(pid) else { continue };
        match waitpid(Pid::from_raw(raw), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(status) => {
                reaped += 1;
                debug!(pid, ?status, "reaped an orphan");
            }
            Err(e) => debug!(pid, error = %e, "could not reap an orphan"),
        }
    }
    if reaped > 0 {
        info!(reaped, "reaped orphaned processes");
    }
    reaped
}

/// The parent pid and state letter of `pid`, from `/proc/PID/stat` (the command name, in
/// parentheses, may hold spaces and parentheses: the fields after its last `)` are read).
fn parent_and_state(pid: u32) -> Option<(u32, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    Some((parent, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stat_line_is_read_after_the_command_name() {
        let me = std::process::id();
        let (parent, state) = parent_and_state(me).expect("our own stat");
        assert_eq!(parent, nix::unistd::getppid().as_raw() as u32);
        assert!("RS".contains(state), "{state}");
    }
}
