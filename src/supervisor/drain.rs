//! Taking workers out of service: stopping one (its `kill_signal`, then SIGKILL at
//! `kill_timeout`), draining ready ones of their in-flight requests first, and the shutdown that
//! stops them all. `kill_group` is here because every stop, and every exit, ends with it.

use std::sync::Arc;

use nix::sys::signal::Signal;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::spawn;
use super::worker::{StopReason, Worker, WorkerState};
use super::{Event, Supervisor};
use crate::admin::events::Reason;

impl Supervisor {
    /// Takes a worker out of rotation and asks it to stop; SIGKILL follows at `kill_timeout`.
    pub(super) fn stop(&mut self, app_index: usize, index: usize, reason: StopReason) {
        let worker = &mut self.apps[app_index].workers[index];
        if let WorkerState::Stopping(_) = worker.state {
            worker.state = WorkerState::Stopping(reason);
            return;
        }
        let was_ready = worker.state == WorkerState::Ready;
        worker.state = WorkerState::Stopping(reason);
        worker.stop_watching();
        if let Some(drain) = worker.drain.take() {
            drain.cancel();
        }
        worker.upstream = None;
        let (id, pid, signal, timeout) = (worker.id, worker.pid, worker.spec.kill_signal, worker.spec.kill_timeout);
        debug!(pid, %signal, ?reason, "stopping worker");
        kill_group(pid, signal);
        self.after(timeout, Event::KillDeadline { id });
        if was_ready {
            self.publish(app_index);
        }
    }

    /// Takes a ready worker out of rotation (the caller publishes) and starts its drain: when
    /// its in-flight requests are done, or at `drain_timeout` (which also ends its open
    /// streams), `Drained` follows.
    pub(super) fn begin_drain(&mut self, app_index: usize, index: usize, reason: Reason) {
        let worker = &mut self.apps[app_index].workers[index];
        if !worker.is_live() {
            return;
        }
        worker.leaving.get_or_insert(reason);
        worker.state = WorkerState::Draining;
        worker.stop_watching();
        // Keep only the stream-cutting token: once the last in-flight request is done, the
        // upstream and its pooled idle connections to this worker are dropped (closed).
        let cut = worker.upstream.take().map(|u| u.cut.clone());
        let token = CancellationToken::new();
        worker.drain = Some(token.clone());
        let (id, stats, timeout) = (worker.id, Arc::clone(&worker.stats), worker.spec.drain_timeout);
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = token.cancelled() => return,
                idle = tokio::time::timeout(timeout, stats.wait_idle()) => {
                    if idle.is_err() {
                        if let Some(cut) = cut {
                            warn!(worker = id, in_flight = stats.in_flight(), "drain_timeout passed; ending the worker's open responses");
                            cut.cancel();
                        }
                    }
                }
            }
            let _supervisor_gone = events.send(Event::Drained { id });
        });
    }

    /// Starts draining every live worker of `app` that `which` selects; returns their ids.
    pub(super) fn drain_where(&mut self, app: usize, reason: Reason, which: impl Fn(&Worker) -> bool) -> Vec<u64> {
        let chosen: Vec<(usize, u64)> = self.apps[app]
            .workers
            .iter()
            .enumerate()
            .filter(|(_, w)| w.is_live() && which(w))
            .map(|(index, w)| (index, w.id))
            .collect();
        // Draining changes states, not positions: the indexes stay valid through the loop.
        for &(index, _) in &chosen {
            self.begin_drain(app, index, reason);
        }
        chosen.into_iter().map(|(_, id)| id).collect()
    }

    pub(super) fn begin_shutdown(&mut self, reply: Option<oneshot::Sender<()>>) {
        let first = self.stopping.is_none();
        self.stopping.get_or_insert_with(Vec::new).extend(reply);
        if !first {
            return;
        }
        self.reload_aborted("corral is stopping");
        let count: usize = self.apps.iter().map(|a| a.workers.len()).sum();
        info!(workers = count, "stopping all workers");
        for app in 0..self.apps.len() {
            for index in 0..self.apps[app].workers.len() {
                self.stop(app, index, StopReason::Shutdown);
            }
        }
    }
}

pub(super) fn kill_group(pid: u32, signal: Signal) {
    if let Err(e) = spawn::signal_group(pid, signal) {
        warn!(pid, %signal, error = %e, "cannot signal worker process group");
    }
}
