//! The state file, and the stopping of what an earlier run left behind.
//!
//! corral records the workers it runs (pid and kernel start time) in a small JSON file next to
//! its control socket, rewritten atomically after every change: written to a temporary file
//! created exclusively (`O_CREAT | O_EXCL | O_NOFOLLOW`, mode 0600, after unlinking a stale one
//! without following it), then renamed over the state file. Workers die with the front process
//! (`PR_SET_PDEATHSIG`), but whatever they forked does not: if the front process was SIGKILLed,
//! a `corral run` of the same config finds the previous run's state file, sees that its front
//! process is gone, and stops what is left of those workers before starting its own, instead of
//! leaving it behind (holding ports, memory, or doubling scheduled jobs).
//!
//! A stale state file is normal (a second SIGINT leaves one), and pids are reused, so cleanup
//! signals only what it can prove is its own ([`decide`]):
//!
//! - a recorded worker that is alive with exactly its recorded start time is that worker: its
//!   whole process group is SIGKILLed;
//! - a recorded pid that is alive with another start time belongs to someone else now: nothing
//!   in that group is signalled;
//! - a recorded worker that is dead (the usual case: `PR_SET_PDEATHSIG` took it) may have left
//!   children in its group, but a group id alone proves nothing (the pid may have been reused
//!   by a process that made a group of its own and exited). Each worker carries
//!   [`MARKER`]`=<front pid>.<front start time>` in its environment, which its children inherit;
//!   only members of the group that started after the worker and carry the previous front's
//!   marker (read from `/proc/PID/environ`) are SIGKILLed, one by one. A child that cleared its
//!   environment, or moved to another process group, cannot be found safely and is left alone
//!   (the log says so).
//!
//! Never signalled, whatever the file says: pid 0 or 1, corral's own pid, corral's own group.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

/// The environment variable that marks a worker (and what it forks) as started by one run of
/// corral: `<front pid>.<front start time>`.
pub const MARKER: &str = "CORRAL_RUN_ID";

/// A state file larger than this is not one corral wrote.
const MAX_STATE_BYTES: u64 = 1 << 20;

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

    /// The value of [`MARKER`] for the workers of the front process `self`.
    pub fn marker(&self) -> String {
        format!("{}.{}", self.pid, self.start)
    }
}

/// The value of [`MARKER`] this process gives its workers (`None` if /proc cannot tell our
/// start time; then workers go unmarked and their orphans cannot be cleaned up).
pub fn own_marker() -> Option<&'static str> {
    static MARK: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    MARK.get_or_init(|| Proc::of(std::process::id()).map(|p| p.marker()))
        .as_deref()
}

/// (process group, start time) of a process.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain ") ": the last one ends it.
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((fields.get(2)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

/// The state file of the instance whose control socket is `socket`.
pub fn path_for(socket: &Path) -> PathBuf {
    socket.with_extension("state.json")
}

/// The state file of a corral that took over by self-upgrade: one per process, so that the
/// previous one (still draining, with its own workers) and this one never write one file.
pub fn generation_path(socket: &Path, pid: u32) -> PathBuf {
    socket.with_extension(format!("{pid}.state.json"))
}

/// [`clean`]s the instance's state file and those of every generation (a killed run after an
/// upgrade); returns how many processes were signalled.
pub fn clean_all(socket: &Path) -> usize {
    let main = path_for(socket);
    let mut killed = clean(&main);
    let (Some(dir), Some(stem)) = (socket.parent(), socket.file_stem().and_then(|s| s.to_str())) else {
        return killed;
    };
    let prefix = format!("{stem}.");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return killed;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let pid = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".state.json"))
            .filter(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
        if pid.is_some() {
            let path = entry.path();
            killed += clean(&path);
            if load(&path).is_none_or(|state| !state.front.alive()) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    killed
}

/// The temporary file that [`save`] writes and renames over `path`.
pub fn tmp_path(path: &Path) -> PathBuf {
    path.with_extension("tmp")
}

/// Writes the state atomically: a new file (exclusive, not following links, 0600), renamed
/// over `path`.
pub fn save(path: &Path, state: &State) {
    let write = || -> std::io::Result<()> {
        let tmp = tmp_path(path);
        // unlink does not follow a symbolic link: a planted one goes, its target stays.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&tmp)?;
        file.write_all(&serde_json::to_vec(state).map_err(std::io::Error::other)?)?;
        drop(file);
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        warn!(path = %path.display(), error = %e, "cannot write the state file");
    }
}

/// Reads the state file: not following links, a regular file, at most [`MAX_STATE_BYTES`].
fn load(path: &Path) -> Option<State> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC | nix::libc::O_NONBLOCK)
        .open(path);
    let file = match file {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "ignoring a state file that cannot be opened");
            return None;
        }
    };
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        warn!(path = %path.display(), "ignoring a state file that is not a regular file");
        return None;
    }
    let mut bytes = Vec::new();
    if let Err(e) = file.take(MAX_STATE_BYTES + 1).read_to_end(&mut bytes) {
        warn!(path = %path.display(), error = %e, "ignoring an unreadable state file");
        return None;
    }
    if bytes.len() as u64 > MAX_STATE_BYTES {
        warn!(path = %path.display(), "ignoring a state file over 1 MiB");
        return None;
    }
    match serde_json::from_slice::<State>(&bytes) {
        Ok(state) => Some(state),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "ignoring an unreadable state file");
            None
        }
    }
}

/// What cleanup does about one recorded worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The worker itself still runs: SIGKILL it and its process group.
    KillGroup,
    /// The worker is gone: SIGKILL the members of its group that carry the previous run's
    /// marker.
    KillMarkedMembers,
    /// The pid now belongs to another process: signal nothing.
    Reused,
    /// A pid that is never signalled (0, 1, out of range, corral itself or its group).
    Forbidden,
}

/// The rule for one recorded `worker`, given what `/proc` says of its pid now (`now`: its
/// process group and start time, if it exists) and who we are (`me`: pid and process group).
pub fn decide(worker: Proc, now: Option<(u32, u64)>, me: (u32, u32)) -> Decision {
    if worker.pid <= 1 || worker.pid > i32::MAX as u32 || worker.pid == me.0 || worker.pid == me.1 {
        return Decision::Forbidden;
    }
    match now {
        // While the worker lives, its pid (and so the group id) cannot be anyone else's.
        Some((_, start)) if start == worker.start => Decision::KillGroup,
        Some(_) => Decision::Reused,
        None => Decision::KillMarkedMembers,
    }
}

/// True if the environment of `pid` holds exactly `MARKER=marker`.
fn carries(pid: u32, marker: &str) -> bool {
    let Ok(file) = std::fs::File::open(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let mut environ = Vec::new();
    // The initial environment is bounded by the kernel's argument limits; stop at 8 MiB anyway.
    if file.take(8 << 20).read_to_end(&mut environ).is_err() {
        return false;
    }
    let wanted = format!("{MARKER}={marker}");
    environ.split(|&b| b == 0).any(|entry| entry == wanted.as_bytes())
}

/// Stops what a previous, dead front process left running. Returns how many processes (or
/// groups) were signalled.
pub fn clean(path: &Path) -> usize {
    let Some(previous) = load(path) else { return 0 };
    let me = std::process::id();
    if previous.front.alive() && previous.front.pid != me {
        // Only reachable if its control socket vanished; never touch a live instance's workers.
        warn!(
            pid = previous.front.pid,
            "the previous front process is still running; leaving its workers alone"
        );
        return 0;
    }
    let my_group = nix::unistd::getpgrp().as_raw() as u32;
    let marker = previous.front.marker();
    // (pid, group, start) of every process, read once, only if a dead worker needs it.
    let mut table: Option<Vec<(u32, u32, u64)>> = None;
    let mut killed = 0;
    for worker in &previous.workers {
        match decide(*worker, stat(worker.pid), (me, my_group)) {
            Decision::Forbidden => {
                warn!(
                    pid = worker.pid,
                    "the state file names a pid that is never signalled; ignoring it"
                );
            }
            Decision::Reused => {
                info!(
                    pid = worker.pid,
                    "a previous worker's pid now belongs to another process; leaving it alone"
                );
            }
            Decision::KillGroup => {
                warn!(
                    pid = worker.pid,
                    "stopping a leftover process of a previous run (its worker, with its process group)"
                );
                let leader = Pid::from_raw(worker.pid as i32);
                // The worker may have moved to another group: signal it by pid too.
                match (killpg(leader, Signal::SIGKILL), kill(leader, Signal::SIGKILL)) {
                    (Err(e), Err(_)) => debug!(pid = worker.pid, error = %e, "leftover already gone"),
                    _ => killed += 1,
                }
            }
            Decision::KillMarkedMembers => {
                let table = table.get_or_insert_with(processes);
                let mut unmarked = 0;
                for &(pid, group, start) in table.iter() {
                    if group != worker.pid || start < worker.start || pid <= 1 || pid == me {
                        continue;
                    }
                    if !carries(pid, &marker) {
                        unmarked += 1;
                        continue;
                    }
                    warn!(pid, group, "stopping a leftover process of a previous run");
                    match kill(Pid::from_raw(pid as i32), Signal::SIGKILL) {
                        Ok(()) => killed += 1,
                        Err(e) => debug!(pid, error = %e, "leftover already gone"),
                    }
                }
                if unmarked > 0 {
                    warn!(
                        group = worker.pid,
                        unmarked,
                        "processes in the group of a dead previous worker lack its run's {MARKER}: they may not be corral's, so they are left alone"
                    );
                }
            }
        }
    }
    if killed > 0 {
        info!(killed, "stopped what the previous run of this config left behind");
    }
    killed
}

/// (pid, process group, start time) of every process in /proc.
fn processes() -> Vec<(u32, u32, u64)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| stat(pid).map(|(group, start)| (pid, group, start)))
        .collect()
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
    fn only_the_recorded_leader_or_marked_orphans_are_signalled() {
        let me = (500, 400);
        let worker = Proc { pid: 1000, start: 77 };
        assert_eq!(decide(worker, Some((1000, 77)), me), Decision::KillGroup);
        assert_eq!(decide(worker, Some((1000, 78)), me), Decision::Reused, "pid reused");
        assert_eq!(decide(worker, Some((1000, 76)), me), Decision::Reused);
        assert_eq!(decide(worker, Some((3, 78)), me), Decision::Reused);
        assert_eq!(
            decide(worker, Some((3, 77)), me),
            Decision::KillGroup,
            "left its group, still ours"
        );
        assert_eq!(decide(worker, None, me), Decision::KillMarkedMembers);
        for pid in [0, 1, 500, 400, u32::MAX, i32::MAX as u32 + 1] {
            let w = Proc { pid, start: 77 };
            assert_eq!(decide(w, Some((pid, 77)), me), Decision::Forbidden, "pid {pid}");
        }
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
                pid: i32::MAX as u32 - 2,
                start: 1,
            }],
        };
        save(&path, &state);
        let back: State = serde_json::from_slice(&std::fs::read(&path)?).map_err(std::io::Error::other)?;
        assert_eq!(back, state);
        assert_eq!(clean(&path), 0);
        Ok(())
    }

    #[test]
    fn a_planted_tmp_link_is_replaced_not_followed() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("x.state.json");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious")?;
        std::os::unix::fs::symlink(&victim, tmp_path(&path))?;
        save(&path, &State::default());
        assert_eq!(std::fs::read(&victim)?, b"precious");
        assert_eq!(load(&path), Some(State::default()));
        assert!(!tmp_path(&path).exists());
        Ok(())
    }

    #[test]
    fn hostile_state_files_are_ignored() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("x.state.json");
        for bytes in [
            &b"\xff\xfe"[..],
            b"{\"front\":{\"pid\":-1,\"start\":0},\"workers\":[]}",
            b"[]",
            b"",
        ] {
            std::fs::write(&path, bytes)?;
            assert_eq!(load(&path), None);
            assert_eq!(clean(&path), 0);
        }
        std::fs::write(&path, vec![b' '; (MAX_STATE_BYTES + 1) as usize])?;
        assert_eq!(load(&path), None);
        std::fs::remove_file(&path)?;
        std::os::unix::fs::symlink("/etc/hostname", &path)?;
        assert_eq!(load(&path), None, "a link is not followed");
        Ok(())
    }
}
