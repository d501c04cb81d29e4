//! What `corral status` shows: a serialisable snapshot of the supervisor's table.

use serde::{Deserialize, Serialize};

/// The whole running instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// Front process id.
    pub pid: u32,
    /// The config file it runs.
    pub config: String,
    /// Milliseconds since the front process started.
    pub uptime_ms: u64,
    /// True once a stop has begun.
    pub stopping: bool,
    /// True while a rolling reload runs.
    pub reloading: bool,
    /// How the last reload ended, if there was one.
    pub last_reload: Option<ReloadOutcome>,
    /// One entry per `[[app]]`.
    pub apps: Vec<AppStatus>,
}

/// The end of a reload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadOutcome {
    /// True if every slot was replaced.
    pub ok: bool,
    /// The summary, or why it failed (with the failing worker's last output).
    pub message: String,
    /// Milliseconds since the front process started, when it ended.
    pub at_ms: u64,
}

/// One app.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppStatus {
    /// Its name.
    pub name: String,
    /// Public address, if proxied.
    pub listen: Option<String>,
    /// Configured worker count (resolved).
    pub instances: usize,
    /// Workers in rotation now.
    pub ready: usize,
    /// One entry per worker, or per empty slot waiting for a restart.
    pub workers: Vec<WorkerStatus>,
}

/// One worker (or an empty slot).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Its app.
    pub app: String,
    /// `NODE_APP_INSTANCE`.
    pub slot: usize,
    /// Supervisor id (unique in this run); absent for an empty slot.
    pub id: Option<u64>,
    /// The config generation it runs (1 at start, +1 per successful reload).
    pub generation: Option<u64>,
    /// Process id; absent for an empty slot.
    pub pid: Option<u32>,
    /// Loopback port.
    pub port: Option<u16>,
    /// `starting`, `online`, `draining`, `stopping`, or `waiting` (empty slot, restart pending).
    pub state: String,
    /// Milliseconds since it was spawned.
    pub uptime_ms: u64,
    /// Restarts of this slot since corral started.
    pub restarts: u32,
    /// Requests routed to this worker.
    pub requests: u64,
    /// Requests in flight on it now.
    pub in_flight: usize,
    /// Resident memory of the process, bytes.
    pub memory_bytes: Option<u64>,
    /// How the slot's previous worker ended, if it did.
    pub last_exit: Option<String>,
}

/// Resident set size of a process, from `/proc/PID/statm`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page_size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()?;
    Some(pages * page_size as u64)
}

/// Resident memory of every process group on the machine, by group id: a worker's process tree
/// (it leads its own group), from one pass over `/proc`.
pub fn group_rss() -> std::collections::HashMap<u32, u64> {
    let mut groups = std::collections::HashMap::new();
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return groups;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command name: state ppid pgrp ... rss is the 22nd.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if let (Some(pgrp), Some(rss)) = (
            fields.get(2).and_then(|f| f.parse::<u32>().ok()),
            fields.get(21).and_then(|f| f.parse::<u64>().ok()),
        ) {
            *groups.entry(pgrp).or_insert(0) += rss * page;
        }
    }
    groups
}
