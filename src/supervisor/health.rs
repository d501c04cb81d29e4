//! Health of ready workers, and their replacement without downtime.
//!
//! Passive: the proxy reports a worker that refused a connection; it leaves rotation and is
//! probed until it accepts again (or is replaced). Active (`health_check`): a periodic GET; a
//! failing worker leaves rotation, and past `unhealthy_threshold` it is replaced. Memory
//! (`max_memory_restart`): every 2 s the process-tree usage of every worker is sampled (also for
//! `status`), and a worker over its cap is replaced. A replacement starts a new worker for the
//! slot; once it is ready, the old one drains and stops, so capacity never drops.

use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::probe::{probe, Readiness};
use super::status;
use super::worker::WorkerState;
use super::{Event, Supervisor};
use crate::admin::events::{Draft, Kind, Reason};
use crate::config::units;

impl Supervisor {
    /// The proxy could not connect to a ready worker: out of rotation, and probe it again.
    pub(super) fn on_unreachable(&mut self, id: u64) {
        let Some((app, index)) = self.find(id) else {
            return;
        };
        let worker = &mut self.apps[app].workers[index];
        if worker.state != WorkerState::Ready || worker.unreachable {
            return;
        }
        worker.unreachable = true;
        warn!(app = %worker.spec.name, slot = worker.slot, pid = worker.pid, "worker refused a connection; out of rotation until it accepts again");
        if let Some(addr) = worker.addr() {
            let check = Readiness::of(addr, &worker.spec);
            worker.probe = CancellationToken::new();
            tokio::spawn(check.run(id, worker.probe.clone(), self.events.clone()));
        }
        self.publish(app);
    }

    /// Starts the app's active health checks (if configured) on a ready worker.
    pub(super) fn watch_health(&mut self, app: usize, index: usize) {
        let worker = &mut self.apps[app].workers[index];
        let (Some(check), Some(addr)) = (worker.spec.health_check.clone(), worker.addr()) else {
            return;
        };
        let token = CancellationToken::new();
        if let Some(previous) = worker.health.replace(token.clone()) {
            previous.cancel();
        }
        let (id, events) = (worker.id, self.events.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(check.interval) => {}
                }
                let ok = match tokio::time::timeout(check.timeout, probe(addr, Some(&check.path))).await {
                    // corral is out of file descriptors: no verdict on the worker this time.
                    Ok(None) => continue,
                    Ok(Some(ok)) => ok,
                    Err(_) => false,
                };
                if events.send(Event::Health { id, ok }).is_err() {
                    return;
                }
            }
        });
    }

    /// An active health check result: a failing worker leaves rotation; past the threshold it
    /// is replaced (the new worker is ready before the old one drains).
    pub(super) fn on_health(&mut self, id: u64, ok: bool) {
        let Some((app, index)) = self.find(id) else { return };
        let worker = &mut self.apps[app].workers[index];
        if worker.state != WorkerState::Ready {
            return;
        }
        let Some(check) = worker.spec.health_check.clone() else {
            return;
        };
        if ok {
            worker.health_failures = 0;
            if worker.unhealthy {
                worker.unhealthy = false;
                info!(app = %worker.spec.name, slot = worker.slot, pid = worker.pid, "worker passes its health check again; back in rotation");
                self.publish(app);
            }
            return;
        }
        worker.health_failures += 1;
        let failures = worker.health_failures;
        if !worker.unhealthy {
            worker.unhealthy = true;
            warn!(app = %worker.spec.name, slot = worker.slot, pid = worker.pid, "worker failed its health check ({}); out of rotation", check.path);
            let draft = Draft::new(Kind::WorkerUnhealthy, &worker.spec.name)
                .worker(worker.slot, Some(worker.pid))
                .reason(Reason::Health)
                .message(format!("GET {} failed", check.path));
            self.emit(draft);
            self.publish(app);
        }
        if failures.is_multiple_of(check.unhealthy_threshold) {
            self.replace(
                app,
                id,
                format!("failed {failures} health checks in a row"),
                Reason::Health,
            );
        }
    }

    /// Starts a new worker for the slot of worker `id`; once it is ready, `id` drains and stops.
    /// Nothing happens while corral stops or reloads, or if a replacement is already starting.
    pub(super) fn replace(&mut self, app: usize, id: u64, why: String, reason: Reason) {
        let busy = self.stopping.is_some() || self.reload.is_some() || self.replacing.values().any(|&old| old == id);
        let Some(worker) = self.apps[app].workers.iter().find(|w| w.id == id) else {
            return;
        };
        if busy {
            return;
        }
        let (slot, pid) = (worker.slot, worker.pid);
        let (spec, generation) = if self.apps[app].slots.get(slot).is_some_and(|s| s.lagging.is_some()) {
            // A slot a reload left on an older generation: that one again, if still on disk.
            self.slot_spec(app, slot)
        } else {
            (Arc::clone(&worker.spec), worker.generation)
        };
        if let Some(old) = self.apps[app].workers.iter_mut().find(|w| w.id == id) {
            old.leaving = Some(reason);
        }
        warn!(app = %spec.name, slot, pid, "worker {why}; replacing it without downtime");
        if let Some(s) = self.apps[app].slots.get_mut(slot) {
            s.last_exit = Some(format!("pid {pid} replaced: {why}"));
        }
        match self.spawn_worker(app, slot, spec, generation) {
            Ok(new) => {
                self.replacing.insert(new, id);
                self.apps[app].counts.restarted(reason);
            }
            Err(e) => error!(app = %self.apps[app].config.name, slot, "cannot start a replacement worker: {e}"),
        }
    }

    /// Replaces every ready worker whose process tree is over its app's `max_memory_restart`.
    pub(super) fn check_memory(&mut self) {
        let groups = status::group_usage();
        let ticks_per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        let now = Instant::now();
        for worker in self.apps.iter_mut().flat_map(|a| a.workers.iter_mut()) {
            let Some(&usage) = groups.get(&worker.pid) else {
                continue;
            };
            let cpu = worker.usage.map(|(before, at, _)| {
                let seconds = now.duration_since(at).as_secs_f64().max(0.001);
                (usage.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / ticks_per_second) / seconds * 100.0
            });
            worker.usage = Some((usage, now, cpu));
        }
        let mut over = Vec::new();
        for (app_index, app) in self.apps.iter().enumerate() {
            for worker in app.workers.iter().filter(|w| w.state == WorkerState::Ready) {
                let (Some(cap), Some(rss)) = (worker.spec.max_memory_restart, worker.usage.map(|u| u.0.rss)) else {
                    continue;
                };
                if rss > cap {
                    over.push((
                        app_index,
                        worker.id,
                        format!(
                            "uses {} of memory, over max_memory_restart {}",
                            units::format_size(rss),
                            units::format_size(cap)
                        ),
                    ));
                }
            }
        }
        for (app, id, why) in over {
            self.replace(app, id, why, Reason::Memory);
        }
    }
}
