//! The state file, and the stopping of what an earlier run left behind.
//!
//! corral records the workers it runs (pid and kernel start time) in a small JSON file next to
//! its control socket, rewritten atomically (write, then rename) after every change. Workers die
//! with the front process (`PR_SET_PDEATHSIG`), but whatever they forked does not: if the front
//! process was SIGKILLed, a `corral run` of the same config finds the previous run's state file,
//! sees that its front process is gone, and kills every process still in those workers' process
//! groups before starting its own, instead of leaving them behind (holding ports, memory, or
//! doubling scheduled jobs). The start times make sure a pid reused by an unrelated process is
//! never touched.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// What the file records.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    /// The front process.
    pub front: Proc,
    /// Its workers (each leads its own process group).
    pub workers: Vec<Proc>,
}

/// A process, identified beyond pid reuse.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Proc {
    /// Process id.
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/PID/stat` field 22).
    pub start: u64,
}

impl Proc {
    /// The process `pid` as it is now, if it exists.
    pub fn of(pid: u32) -> Option<Proc> {
        stat(pid).map(|(_, start)| Proc { pid, start })
    }

    /// True if this very process still runs.
    pub fn alive(&self) -> bool {
        stat(self.pid).is_some_and(|(_, start)| start == self.start)
    }
}

/// (process group, start time) of a process.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((fields.get(2)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

/// The state file of the instance whose control socket is `socket`.
pub fn path_for(socket: &Path) -> PathBuf {
    socket.with_extension("state.json")
}

/// Writes the state atomically.
pub fn save(path: &Path, state: &State) {
    let write = || -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(state).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        warn!(path = %path.display(), error = %e, "cannot write the state file");
    }
}

/// Kills what a previous, dead front process left running. Returns how many processes.
pub fn clean(path: &Path) -> usize {
    let Ok(text) = std::fs::read(path) else { return 0 };
    let Ok(previous) = serde_json::from_slice::<State>(&text) else {
        warn!(path = %path.display(), "ignoring an unreadable state file");
        return 0;
    };
    if previous.front.alive() && previous.front.pid != std::process::id() {
        // Only reachable if its control socket vanished; never touch a live instance's workers.
        warn!(
            pid = previous.front.pid,
            "the previous front process is still running; leaving its workers alone"
        );
        return 0;
    }
    let mut killed = 0;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let pids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    for pid in pids {
        let Some((group, start)) = stat(pid) else { continue };
        // A member of a recorded worker's group, started no earlier than that worker.
        let leftover = previous.workers.iter().any(|w| w.pid == group && start >= w.start);
        if leftover {
            warn!(pid, group, "stopping a leftover process of a previous run");
            if nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .is_ok()
            {
                killed += 1;
            }
        }
    }
    if killed > 0 {
        info!(killed, "stopped what the previous run of this config left behind");
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_changed_start_time_is_not() {
        let me = Proc::of(std::process::id()).expect("own /proc entry");
        assert!(me.alive());
        assert!(!Proc {
            start: me.start + 1,
            ..me
        }
        .alive());
    }

    #[test]
    fn state_round_trips_and_a_dead_front_with_dead_workers_cleans_nothing() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("x.state.json");
        let state = State {
            front: Proc {
                pid: u32::MAX - 1,
                start: 1,
            },
            workers: vec![Proc {
                pid: u32::MAX - 2,
                start: 1,
            }],
        };
        save(&path, &state);
        let back: State = serde_json::from_slice(&std::fs::read(&path)?).map_err(std::io::Error::other)?;
        assert_eq!(back, state);
        assert_eq!(clean(&path), 0);
        Ok(())
    }
}
