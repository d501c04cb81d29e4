//! What happens to a worker after it is spawned, as its tasks report it: ready (into rotation,
//! or a reload's candidate, or a replacement's takeover), never ready, drained, and exited (with
//! the restart decision). These are the actor's event handlers for one worker's life.

use nix::sys::signal::Signal;
use tracing::{debug, error, info, warn};

use super::drain::kill_group;
use super::policy::{after_exit, AfterExit, RestartPolicy};
use super::worker::{describe_exit, StopReason, WorkerState};
use super::{Event, Supervisor};
use crate::admin::events::{Draft, Kind, Reason};

impl Supervisor {
    pub(super) fn on_ready(&mut self, id: u64) {
        let Some((app, index)) = self.find(id) else {
            return;
        };
        let worker = &mut self.apps[app].workers[index];
        if worker.state == WorkerState::Ready && worker.unreachable {
            worker.unreachable = false;
            if let Some(upstream) = &worker.upstream {
                upstream.set_down(false);
            }
            info!(app = %worker.spec.name, slot = worker.slot, pid = worker.pid, "worker accepts connections again; back in rotation");
            self.publish(app);
            return;
        }
        if worker.state != WorkerState::Starting || worker.was_ready {
            return;
        }
        worker.was_ready = true;
        let (pid, port, slot, boot) = (worker.pid, worker.port, worker.slot, worker.started.elapsed());
        worker.make_upstream();
        let draft = Draft::new(Kind::WorkerReady, &worker.spec.name)
            .worker(slot, Some(pid))
            .message(format!("ready after {} ms", boot.as_millis()));
        self.emit(draft);
        if self.reload.as_ref().is_some_and(|r| r.is_candidate(id)) {
            // A reload's new worker waits out of rotation until its batch is ready.
            self.reload_candidate_ready(id, boot);
            return;
        }
        self.apps[app].workers[index].state = WorkerState::Ready;
        self.watch_health(app, index);
        let name = &self.apps[app].config.name;
        info!(app = %name, slot, pid, port = port.unwrap_or(0), boot_ms = boot.as_millis() as u64, "worker ready");
        if let Some(old) = self.replacing.remove(&id) {
            // A replacement is in rotation: the worker it replaces drains, then stops, and
            // the new one's share grows over the slow start.
            if let Some(upstream) = &self.apps[app].workers[index].upstream {
                upstream.start_slow_start();
            }
            if let Some(old_index) = self.apps[app].workers.iter().position(|w| w.id == old) {
                info!(app = %name, slot, pid, "replacement ready; draining the unhealthy worker");
                self.begin_drain(app, old_index, Reason::Health);
            }
        }
        self.publish(app);
        self.announce(app);
    }

    fn announce(&mut self, app: usize) {
        let app = &mut self.apps[app];
        let ready = app.workers.iter().filter(|w| w.state == WorkerState::Ready).count();
        if !app.announced && ready == app.instances {
            app.announced = true;
            match app.config.listen {
                Some(listen) => {
                    info!(app = %app.config.name, "all {ready} workers ready; serving on http://{listen}")
                }
                None => info!(app = %app.config.name, "all {ready} workers running"),
            }
        }
    }

    pub(super) fn on_never_ready(&mut self, id: u64) {
        let Some((app, index)) = self.find(id) else {
            return;
        };
        let worker = &self.apps[app].workers[index];
        if worker.state == WorkerState::Ready && worker.unreachable {
            error!(app = %worker.spec.name, slot = worker.slot, pid = worker.pid, "worker still refuses connections after listen_timeout; replacing it");
            return self.stop(app, index, StopReason::NeverReady);
        }
        if worker.state != WorkerState::Starting {
            return;
        }
        let what = match (&worker.spec.ready_path, worker.spec.wait_ready) {
            (_, true) => "did not call process.send('ready')".to_owned(),
            (Some(path), false) => format!("did not answer 2xx on {path}"),
            (None, false) => "did not accept connections on its port".to_owned(),
        };
        let message = format!(
            "worker pid {} (slot {}) {what} within listen_timeout ({:?}). Last output:{}",
            worker.pid,
            worker.slot,
            worker.spec.listen_timeout,
            worker.last_output()
        );
        error!(app = %self.apps[app].config.name, "{message}");
        if self.reload.as_ref().is_some_and(|r| r.is_candidate(id)) {
            self.reload_failed(message);
        } else {
            self.stop(app, index, StopReason::NeverReady);
        }
    }

    pub(super) fn on_exit(&mut self, id: u64, status: std::io::Result<std::process::ExitStatus>) {
        let Some((app_index, index)) = self.find(id) else {
            return;
        };
        let app = &mut self.apps[app_index];
        let mut worker = app.workers.swap_remove(index);
        worker.stop_watching();
        self.replacing.remove(&id);
        if let Some(drain) = &worker.drain {
            drain.cancel();
        }
        // Whatever the worker forked dies with it: nothing is left behind in its group.
        kill_group(worker.pid, Signal::SIGKILL);
        let how = describe_exit(&status);
        let name = app.config.name.clone();
        let slot_index = worker.slot;
        let reason = match (worker.state, worker.leaving) {
            (WorkerState::Stopping(StopReason::Shutdown), leaving) => leaving.unwrap_or(Reason::Stop),
            (WorkerState::Stopping(StopReason::NeverReady), _) => Reason::Health,
            (WorkerState::Stopping(StopReason::RolledBack), _) => Reason::Reload,
            (WorkerState::Stopping(StopReason::Replaced) | WorkerState::Draining, leaving) => {
                leaving.unwrap_or(Reason::Reload)
            }
            (_, leaving) => leaving.unwrap_or(Reason::Crash),
        };
        self.emit(
            Draft::new(Kind::WorkerExited, &name)
                .worker(slot_index, Some(worker.pid))
                .reason(reason)
                .message(how.clone()),
        );
        self.save_state();
        if worker.state == WorkerState::Ready {
            self.publish(app_index);
        }
        match worker.state {
            WorkerState::Stopping(StopReason::Shutdown | StopReason::Replaced | StopReason::RolledBack)
            | WorkerState::Draining => {
                info!(app = %name, slot = slot_index, pid = worker.pid, generation = worker.generation, "worker stopped ({how})");
                self.reload_worker_gone(id);
                return;
            }
            _ => {}
        }
        if self.reload.as_ref().is_some_and(|r| r.is_candidate(id)) {
            let message = format!(
                "new worker pid {} (slot {slot_index}) {how} before it was ready. Last output:{}",
                worker.pid,
                worker.last_output()
            );
            error!(app = %name, "{message}");
            self.reload_failed(message);
            return;
        }
        let shutting_down = self.stopping.is_some();
        let Some(slot) = self.apps[app_index].slots.get_mut(slot_index) else {
            return;
        };
        slot.last_exit = Some(how.clone());
        let uptime = worker.started.elapsed();
        let code = status.as_ref().ok().and_then(|s| s.code());
        let policy = RestartPolicy::of(&worker.spec);
        match after_exit(
            &policy,
            &mut slot.history,
            shutting_down,
            uptime,
            worker.was_ready,
            code,
        ) {
            AfterExit::Forget => {
                info!(app = %name, slot = slot_index, pid = worker.pid, "worker {how}")
            }
            AfterExit::Stopped => {
                slot.parked = Some("stopped");
                info!(app = %name, slot = slot_index, pid = worker.pid, "worker {how}; not restarted (autorestart = false or a stop_exit_codes code)");
            }
            AfterExit::Errored => {
                slot.parked = Some("errored");
                error!(app = %name, slot = slot_index, pid = worker.pid, "worker {how}; {} unstable restarts in a row (max_restarts = {}): the slot is errored and not restarted until the next reload. Last output:{}", slot.history.unstable, policy.max_restarts, worker.last_output());
            }
            AfterExit::Restart(delay) => {
                slot.restarts += 1;
                let hint = if !worker.was_ready && how == "exited with code 0" {
                    " (it exited before listening; a server that finds its port taken may do this)"
                } else {
                    ""
                };
                let last = worker.last_output();
                if worker.was_ready {
                    warn!(app = %name, slot = slot_index, pid = worker.pid, "worker {how} after {uptime:?}; restarting in {delay:?}. Last output:{last}");
                } else {
                    error!(app = %name, slot = slot_index, pid = worker.pid, "worker {how} before it was ready{hint}; restarting in {delay:?}. Last output:{last}");
                }
                let draft = Draft::new(Kind::WorkerRestarting, &name)
                    .worker(slot_index, None)
                    .reason(reason)
                    .message(format!("restart {} in {} ms", slot.restarts, delay.as_millis()));
                self.feed.emit(draft);
                // Counted by the reason of the exit event (crash, or health for a worker that
                // was never ready or kept refusing connections).
                self.apps[app_index].counts.restarted(reason);
                self.after(
                    delay,
                    Event::RestartDue {
                        app: app_index,
                        slot: slot_index,
                    },
                );
            }
        }
    }

    pub(super) fn on_drained(&mut self, id: u64) {
        let Some((app, index)) = self.find(id) else {
            return;
        };
        let worker = &mut self.apps[app].workers[index];
        if worker.state != WorkerState::Draining {
            return;
        }
        worker.drained = true;
        debug!(pid = worker.pid, "worker drained");
        let mut draft = Draft::new(Kind::WorkerDrained, &worker.spec.name).worker(worker.slot, Some(worker.pid));
        if let Some(reason) = worker.leaving {
            draft = draft.reason(reason);
        }
        self.emit(draft);
        // The old workers of a reload still in progress stay until it commits (they are the
        // rollback); any other drained worker stops now.
        if !self.reload.as_ref().is_some_and(|r| r.holds(id)) {
            self.stop(app, index, StopReason::Replaced);
        }
    }
}
