//! How a reload ends: done (every slot of every app it was for runs the new generation),
//! failed and rolled back, or interrupted by corral stopping.

use std::sync::Arc;

use tracing::{error, info};

use crate::admin::events::{Draft, Kind, Reason};
use crate::supervisor::status::{ReloadOutcome, ReloadResult};
use crate::supervisor::worker::{StopReason, WorkerState};
use crate::supervisor::{CommandError, ErrorCode, Supervisor};

impl Supervisor {
    pub(super) fn reload_succeeded(&mut self) {
        let Some(mut run) = self.reload.take() else {
            return;
        };
        crate::notify::ready();
        // The environment the reload chose stays for the next ones.
        self.env_name.clone_from(&run.config.env_name);
        let message = format!(
            "reload done: {} worker(s) replaced in {:.1?} ({})",
            run.replaced,
            run.started.elapsed(),
            run.done.join(", ")
        );
        info!("{message}");
        self.emit(Draft::global(Kind::ReloadDone).message(message.clone()));
        self.last_reload = Some(ReloadOutcome {
            ok: true,
            message: message.clone(),
            at_ms: self.started.elapsed().as_millis() as u64,
        });
        if let Some(reply) = run.reply.take() {
            let _client_gone = reply.send(Ok(message));
        }
    }

    /// A new worker failed: undo the uncommitted part of the reload and report.
    pub(in crate::supervisor) fn reload_failed(&mut self, why: String) {
        let Some(mut run) = self.reload.take() else {
            return;
        };
        crate::notify::ready();
        if let Some(phase) = run.phase.take().filter(|p| !p.committed) {
            let app = phase.app;
            self.apps[app].counts.reloaded(ReloadResult::RolledBack);
            for id in &phase.candidates {
                let Some(index) = self.apps[app].workers.iter().position(|w| w.id == *id) else {
                    continue;
                };
                match self.apps[app].workers[index].state {
                    // In rotation already: let its requests finish first (it stops once drained).
                    WorkerState::Ready => self.begin_drain(app, index, Reason::Reload),
                    WorkerState::Starting => self.stop(app, index, StopReason::RolledBack),
                    _ => {}
                }
            }
            for id in &phase.retiring {
                let Some(worker) = self.apps[app]
                    .workers
                    .iter_mut()
                    .find(|w| w.id == *id && w.state == WorkerState::Draining)
                else {
                    continue;
                };
                if let Some(drain) = worker.drain.take() {
                    drain.cancel();
                }
                worker.state = WorkerState::Ready;
                worker.drained = false;
                worker.stats.reset_draining();
                worker.make_upstream();
                if let Some(index) = self.apps[app].workers.iter().position(|w| w.id == *id) {
                    self.watch_health(app, index);
                }
            }
            self.publish(app);
            // Slots whose old worker died meanwhile get one again, from the old config.
            let config = Arc::clone(&self.apps[app].config);
            let generation = self.apps[app].generation;
            for slot in 0..self.apps[app].instances {
                if !self.apps[app].workers.iter().any(|w| w.slot == slot && w.is_live()) {
                    self.start(app, slot, Arc::clone(&config), generation);
                }
            }
        }
        let mut message = format!(
            "reload failed: {why}\nrolled back: the new workers were stopped and the previous ones keep serving"
        );
        if !run.done.is_empty() {
            message.push_str(&format!(
                " (already reloaded before the failure: {})",
                run.done.join(", ")
            ));
        }
        error!("{message}");
        self.emit(Draft::global(Kind::ReloadFailed).message(message.clone()));
        self.last_reload = Some(ReloadOutcome {
            ok: false,
            message: message.clone(),
            at_ms: self.started.elapsed().as_millis() as u64,
        });
        if let Some(reply) = run.reply.take() {
            let _client_gone = reply.send(Err(CommandError::new(ErrorCode::Failed, message)));
        }
    }

    /// corral is stopping: the reload ends where it is (everything is being stopped anyway).
    pub(in crate::supervisor) fn reload_aborted(&mut self, why: &str) {
        if let Some(mut run) = self.reload.take() {
            if let Some(reply) = run.reply.take() {
                let _client_gone = reply.send(Err(CommandError::new(
                    ErrorCode::Stopping,
                    format!("reload interrupted: {why}"),
                )));
            }
        }
    }
}
