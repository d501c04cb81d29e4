//! One worker process as the supervisor tracks it, and the pure rules of its lifecycle.
//!
//! ```text
//!   spawn ──► Starting ──(ready)──► Ready ──(replaced)──► Draining ──(idle or drain_timeout)──┐
//!                │                    │                                                      │
//!                │                    └──(stop)──► Stopping ◄────────────────────────────────┘
//!                ├──(listen_timeout)──► Stopping(NeverReady)            Stopping ──(exit)──► gone
//!                └──(exit)──► gone, restart later
//! ```
//!
//! Only `Ready` workers are in the pool. A reload's new worker stays `Starting` (ready but out
//! of rotation) until its whole batch is ready, then the batch is swapped in at once. The decisions (is this exit a failure, restart or not)
//! are functions of the state, tested below; the supervisor carries out their side effects.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admin::events::Reason;
use crate::balancer::{Upstream, WorkerStats};
use crate::config::AppConfig;
use crate::logs::OutputTail;

/// Why a worker is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// corral is stopping.
    Shutdown,
    /// It did not accept connections within `listen_timeout`.
    NeverReady,
    /// A reload replaced it (or scaled its slot away) and it has drained.
    Replaced,
    /// It belonged to a reload that failed.
    RolledBack,
}

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Running, not yet accepting connections.
    Starting,
    /// Accepting connections; in the pool.
    Ready,
    /// Out of the pool, finishing its in-flight requests before it is stopped.
    Draining,
    /// Signalled to stop; waiting for it to exit (SIGKILL at the deadline).
    Stopping(StopReason),
}

impl WorkerState {
    /// The word `corral status` shows.
    pub fn label(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "online",
            WorkerState::Draining => "draining",
            WorkerState::Stopping(_) => "stopping",
        }
    }
}

/// A running worker process.
#[derive(Debug)]
pub struct Worker {
    /// Unique for the life of the front process.
    pub id: u64,
    /// Why it is leaving rotation, once it is (a reload, a scale-down, its health...).
    pub leaving: Option<Reason>,
    /// Its slot (`NODE_APP_INSTANCE`).
    pub slot: usize,
    /// The app's config generation it was started from (1 at start, +1 per reload).
    pub generation: u64,
    /// The app config it was started from (its stop signal and timeouts apply to it).
    pub spec: Arc<AppConfig>,
    /// Process id, also its process group id.
    pub pid: u32,
    /// Kernel start time (for the state file).
    pub start_time: u64,
    /// Last resource sample: usage, when, and CPU percent since the sample before.
    pub usage: Option<(crate::supervisor::status::Usage, Instant, Option<f64>)>,
    /// Its loopback port (proxied apps only).
    pub port: Option<u16>,
    /// Keeps that port from being handed to anyone else (see [`super::spawn::PortHold`]);
    /// only held, never read.
    #[allow(dead_code)]
    pub port_hold: Option<super::spawn::PortHold>,
    /// Lifecycle state.
    pub state: WorkerState,
    /// When it was spawned.
    pub started: Instant,
    /// Whether it ever became ready.
    pub was_ready: bool,
    /// Request counters, shared with the proxy through `upstream`.
    pub stats: Arc<WorkerStats>,
    /// Its last output lines.
    pub output: Arc<OutputTail>,
    /// Cancels the readiness probe when the worker exits first.
    pub probe: CancellationToken,
    /// Its entry in the pool, while ready.
    pub upstream: Option<Arc<Upstream>>,
    /// Cancels the drain timer (a rollback puts the worker back into rotation).
    pub drain: Option<CancellationToken>,
    /// True once a drain finished (idle, or drain_timeout passed).
    pub drained: bool,
    /// Ready, but it refused a connection: out of rotation until a probe passes again.
    pub unreachable: bool,
    /// Ready, but its last active health check failed: out of rotation until one passes.
    pub unhealthy: bool,
    /// Active health checks failed in a row.
    pub health_failures: u32,
    /// Stops its active health checks.
    pub health: Option<CancellationToken>,
}

impl Worker {
    /// Its loopback address (proxied apps only).
    pub fn addr(&self) -> Option<SocketAddr> {
        self.port.map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    }

    /// Gives it a fresh entry for the pool (a new connection pool, and a drain token nobody
    /// has cancelled). Publishing is the caller's.
    pub fn make_upstream(&mut self) {
        self.upstream = self
            .addr()
            .map(|addr| Arc::new(Upstream::new(self.id, self.slot, addr, Arc::clone(&self.stats))));
    }

    /// True when it should be in the pool.
    pub fn in_rotation(&self) -> bool {
        self.state == WorkerState::Ready && !self.unreachable && !self.unhealthy
    }

    /// Stops the background tasks that watch it (readiness probe, health checks).
    pub fn stop_watching(&mut self) {
        self.probe.cancel();
        if let Some(health) = self.health.take() {
            health.cancel();
        }
    }

    /// The word `corral status` shows.
    pub fn label(&self) -> &'static str {
        if self.state == WorkerState::Ready && self.unreachable {
            "unreachable"
        } else if self.state == WorkerState::Ready && self.unhealthy {
            "unhealthy"
        } else {
            self.state.label()
        }
    }

    /// True while it serves or is about to: its slot is taken.
    pub fn is_live(&self) -> bool {
        matches!(self.state, WorkerState::Starting | WorkerState::Ready)
    }

    /// The last output lines, indented for a log message; empty when it printed nothing.
    pub fn last_output(&self) -> String {
        let lines = self.output.lines();
        if lines.is_empty() {
            return "(no output)".into();
        }
        lines.iter().map(|l| format!("\n    {l}")).collect()
    }
}

/// Describes an exit status the way a user reads it.
pub fn describe_exit(status: &std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Err(e) => format!("could not be waited for: {e}"),
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(signal)) => {
                let name = nix::sys::signal::Signal::try_from(signal)
                    .map_or_else(|_| signal.to_string(), |s| s.as_str().to_owned());
                format!("was killed by {name}")
            }
            (None, None) => "exited".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    #[test]
    fn exit_descriptions() {
        assert_eq!(describe_exit(&Ok(ExitStatus::from_raw(1 << 8))), "exited with code 1");
        assert_eq!(describe_exit(&Ok(ExitStatus::from_raw(9))), "was killed by SIGKILL");
        assert_eq!(WorkerState::Ready.label(), "online");
    }
}
