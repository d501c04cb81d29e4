//! What `corral status` shows: a serialisable snapshot of the supervisor's table.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::admin::events::Reason;

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
    /// Processes left by a killed earlier run that were stopped at start.
    #[serde(default)]
    pub leftovers_stopped: usize,
    /// The `[app.env_NAME]` in use (`--env NAME`), if any.
    #[serde(default)]
    pub env: Option<String>,
    /// The other corral process during a self-upgrade: the new one starting, or the previous
    /// one still draining after handing over to this one ([`crate::upgrade`]).
    #[serde(default)]
    pub upgrade: Option<crate::upgrade::Generation>,
}

/// How a starting instance (or a new generation during an upgrade) is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Some workers are not ready yet.
    Starting,
    /// Every app runs its configured count (ready, for proxied apps).
    Up,
    /// A worker exited or is waiting for a restart before the start was complete.
    Failed {
        /// Its app.
        app: String,
        /// What happened, in words.
        report: String,
    },
}

impl Status {
    /// The start's verdict: a slot that restarted, exited or waits means the start failed.
    pub fn verdict(&self) -> Verdict {
        for app in &self.apps {
            for worker in &app.workers {
                if worker.restarts > 0 || worker.state == "waiting" || worker.last_exit.is_some() {
                    let how = worker.last_exit.as_deref().unwrap_or("it exited");
                    return Verdict::Failed {
                        app: app.name.clone(),
                        report: format!(
                            "app {:?} slot {} failed to start: {how} (restarted {} time(s))",
                            app.name, worker.slot, worker.restarts
                        ),
                    };
                }
            }
        }
        let up = self.apps.iter().all(|app| {
            let running = app.workers.iter().filter(|w| w.pid.is_some()).count();
            match app.listen {
                Some(_) => app.ready >= app.instances,
                None => running >= app.instances,
            }
        });
        if up && !self.apps.is_empty() {
            Verdict::Up
        } else {
            Verdict::Starting
        }
    }
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
    /// The TLS certificate it serves, with `[app.tls]`.
    #[serde(default)]
    pub tls: Option<crate::tls::CertStatus>,
    /// One entry per worker, or per empty slot waiting for a restart.
    pub workers: Vec<WorkerStatus>,
    /// Responses per second over the last minute (proxied apps; see [`crate::metrics`]).
    #[serde(default)]
    pub req_per_sec: Option<f64>,
    /// 99th percentile time to first byte over the last minute, milliseconds; none without a
    /// response in that minute.
    #[serde(default)]
    pub p99_ms: Option<f64>,
    /// Workers started in place of another since corral started, by reason: `crash`,
    /// `memory`, `health`, `reload` (the event reasons a worker is replaced for; `scale` and
    /// `stop` end workers without a restart).
    #[serde(default)]
    pub restarts_by_reason: BTreeMap<String, u64>,
    /// Rolling reloads of this app since corral started, by result: `ok`, `rolled_back` (a
    /// new worker failed; the old ones kept serving), `refused` (nothing was started: invalid
    /// config, another reload running, corral stopping), `partial` (a new worker failed with
    /// `reload_keep_old = false`: the reload stopped where it was).
    #[serde(default)]
    pub reloads: BTreeMap<String, u64>,
}

/// How a reload of one app ended, for `corral_reloads_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    /// Every slot runs the new generation.
    Ok,
    /// A new worker failed; the old ones serve on.
    RolledBack,
    /// Nothing was started.
    Refused,
    /// A new worker failed with `reload_keep_old = false`: the reload stopped where it was,
    /// some slots on the new generation, the others on the old one.
    Partial,
}

impl ReloadResult {
    /// Every result, in label order.
    pub const ALL: [ReloadResult; 4] = [
        ReloadResult::Ok,
        ReloadResult::RolledBack,
        ReloadResult::Refused,
        ReloadResult::Partial,
    ];

    /// The label: `ok`, `rolled_back`, `refused`, `partial`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Ok => "ok",
            ReloadResult::RolledBack => "rolled_back",
            ReloadResult::Refused => "refused",
            ReloadResult::Partial => "partial",
        }
    }
}

/// The reasons a worker is replaced for by a new one in its slot: the `reason` label of
/// `corral_worker_restarts_total` and the keys of `restarts_by_reason`.
pub const RESTARTS: [Reason; 4] = [Reason::Crash, Reason::Memory, Reason::Health, Reason::Reload];

/// Per-app counts of restarts by reason and reloads by result, kept by the supervisor.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    restarts: [u64; RESTARTS.len()],
    reloads: [u64; ReloadResult::ALL.len()],
}

impl Counts {
    /// A worker was started in place of another for `reason` (scale and stop count nothing).
    pub fn restarted(&mut self, reason: Reason) {
        if let Some(i) = RESTARTS.iter().position(|r| *r == reason) {
            self.restarts[i] += 1;
        }
    }

    /// A reload of the app ended so.
    pub fn reloaded(&mut self, result: ReloadResult) {
        self.reloads[result as usize] += 1;
    }

    /// The restarts, every reason named (zeros included, so the series exist from the start).
    pub fn restarts(&self) -> BTreeMap<String, u64> {
        RESTARTS
            .iter()
            .zip(self.restarts)
            .map(|(r, n)| (r.as_str().to_owned(), n))
            .collect()
    }

    /// The reloads, every result named.
    pub fn reloads(&self) -> BTreeMap<String, u64> {
        ReloadResult::ALL
            .iter()
            .zip(self.reloads)
            .map(|(r, n)| (r.as_str().to_owned(), n))
            .collect()
    }
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
    /// Resident memory of the worker's process tree, bytes.
    pub memory_bytes: Option<u64>,
    /// CPU use of the worker's process tree over the last 2 s, percent of one core.
    pub cpu_percent: Option<f64>,
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

/// Resources of one process group (a worker's process tree).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Resident memory, bytes.
    pub rss: u64,
    /// CPU time used so far (user + system), clock ticks.
    pub cpu_ticks: u64,
}

/// Usage of every process group on the machine, by group id, from one pass over `/proc`.
pub fn group_usage() -> std::collections::HashMap<u32, Usage> {
    let mut groups: std::collections::HashMap<u32, Usage> = std::collections::HashMap::new();
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
        // Fields after the parenthesised command name: state ppid pgrp ... utime stime ... rss.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let number = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        if let (Some(pgrp), Some(utime), Some(stime), Some(rss)) = (number(2), number(11), number(12), number(21)) {
            let usage = groups.entry(pgrp as u32).or_default();
            usage.rss += rss * page;
            usage.cpu_ticks += utime + stime;
        }
    }
    groups
}
