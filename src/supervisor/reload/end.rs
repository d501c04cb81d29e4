//! How a reload ends: done (every slot of every app it was for runs the new generation),
//! failed, or interrupted by corral stopping.
//!
//! A failure ends the app's phase one of two ways, as its `reload_keep_old` says:
//!
//! - **Rolled back** (`true`, the default): the new workers leave (drained if they were in
//!   rotation, else stopped at once), the old ones held since their swap go back into rotation
//!   untouched, and the app's config and generation stay as they were.
//! - **Stopped where it is** (`false`): the old workers of the replaced slots are gone, so there
//!   is nothing to roll back to. The batch still starting (never in rotation) is stopped; the
//!   slots already swapped keep their new workers; the others keep their old ones. The app takes
//!   the new config and generation (a later crash of a replaced slot restarts the new command,
//!   and the next reload is one generation on), and every slot left behind remembers what it
//!   runs (a [`Lagging`], see `lagging`). The caller is told which slots run which generation.
//!
//! Either way the caller gets the failing worker's exit status and last output lines, and a
//! slot left without a live worker (its worker crashed meanwhile) gets one again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tracing::{error, info};

use super::{Lagging, Phase};
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
        self.record_reload(run.reply.take(), Ok(message));
    }

    /// How a reload ended, in the event stream and the status, and to its caller.
    fn record_reload(
        &mut self,
        reply: Option<tokio::sync::oneshot::Sender<super::Outcome>>,
        result: Result<String, String>,
    ) {
        let (ok, message) = match &result {
            Ok(message) => (true, message.clone()),
            Err(message) => (false, message.clone()),
        };
        let kind = if ok { Kind::ReloadDone } else { Kind::ReloadFailed };
        self.emit(Draft::global(kind).message(message.clone()));
        self.last_reload = Some(ReloadOutcome {
            ok,
            message,
            at_ms: self.started.elapsed().as_millis() as u64,
        });
        if let Some(reply) = reply {
            let _client_gone = reply.send(result.map_err(|message| CommandError::new(ErrorCode::Failed, message)));
        }
    }

    /// A new worker failed: undo the uncommitted part of the reload, or stop it where it is,
    /// and report.
    pub(in crate::supervisor) fn reload_failed(&mut self, why: String) {
        let Some(mut run) = self.reload.take() else {
            return;
        };
        crate::notify::ready();
        let rolled_back = "rolled back: the new workers were stopped and the previous ones keep serving".to_owned();
        let outcome = match run.phase.take().filter(|p| !p.committed) {
            Some(phase) if !phase.spec.reload_keep_old => {
                let (outcome, replaced_any) = self.stop_partway(phase);
                if replaced_any {
                    // The app runs the new config now, in part: its environment stays too.
                    self.env_name.clone_from(&run.config.env_name);
                }
                outcome
            }
            Some(phase) => {
                self.roll_back(phase);
                rolled_back
            }
            None => rolled_back,
        };
        let mut message = format!("reload failed: {why}\n{outcome}");
        if !run.done.is_empty() {
            message.push_str(&format!(
                " (already reloaded before the failure: {})",
                run.done.join(", ")
            ));
        }
        error!("{message}");
        self.record_reload(run.reply.take(), Err(message));
    }

    /// `reload_keep_old = true`: the new workers leave, the held old ones return to rotation.
    fn roll_back(&mut self, phase: Phase) {
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
        // Slots whose old worker died meanwhile get one again, from the config they ran.
        self.refill(app);
    }

    /// `reload_keep_old = false`: stops the batch still starting and keeps every slot on the
    /// generation it runs. Returns the report, and whether any slot runs the new generation.
    fn stop_partway(&mut self, phase: Phase) -> (String, bool) {
        let app = phase.app;
        // The batch in progress never entered rotation: the old workers of its slots serve on.
        for &(id, _) in &phase.batch {
            if let Some(index) = self.apps[app].workers.iter().position(|w| w.id == id && w.is_live()) {
                self.stop(app, index, StopReason::RolledBack);
            }
        }
        let swapped: BTreeSet<usize> = phase.swapped.iter().copied().collect();
        let state = &mut self.apps[app];
        let Some(&last) = swapped.last() else {
            state.counts.reloaded(ReloadResult::RolledBack);
            self.refill(app);
            let report = self.generations(app, phase.generation);
            return (
                format!("stopped before any slot was replaced (reload_keep_old = false): {report}"),
                false,
            );
        };
        state.counts.reloaded(ReloadResult::Partial);
        for _ in &swapped {
            state.counts.restarted(Reason::Reload);
        }
        let (old, old_generation) = (Arc::clone(&state.config), state.generation);
        state.config = Arc::clone(&phase.spec);
        state.generation = phase.generation;
        // Every slot that runs keeps running: the old ones a smaller `instances` would have
        // removed at the commit, and the new ones a larger one added so far.
        state.instances = state.instances.max(last + 1);
        if state.slots.len() < state.instances {
            state.slots.resize_with(state.instances, Default::default);
        }
        for (index, slot) in state.slots.iter_mut().enumerate().take(state.instances) {
            if swapped.contains(&index) {
                slot.parked = None;
                slot.history = Default::default();
                slot.lagging = None;
            } else if slot.lagging.is_none() {
                slot.lagging = Some(Lagging::of(Arc::clone(&old), old_generation));
            }
        }
        // One publication: the new config's routing (sticky, balance) over the slots.
        self.publish(app);
        self.refill(app);
        let report = self.generations(app, phase.generation);
        (
            format!(
                "stopped where it was (reload_keep_old = false, so the replaced slots are not rolled back): {report}; a reload of a fixed build replaces the rest"
            ),
            true,
        )
    }

    /// Starts a worker in every slot of `app` that has no live one, with the config the slot
    /// runs.
    fn refill(&mut self, app: usize) {
        for slot in 0..self.apps[app].instances {
            if !self.apps[app].workers.iter().any(|w| w.slot == slot && w.is_live()) {
                let (config, generation) = self.slot_spec(app, slot);
                self.start(app, slot, config, generation);
            }
        }
    }

    /// Which slots of `app` run which generation, `new` being the failed reload's: "web:0
    /// web:1 run the new command (generation 2); web:2 still runs the old one (generation 1)".
    fn generations(&self, app: usize, new: u64) -> String {
        let state = &self.apps[app];
        let mut by_generation: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for slot in 0..state.instances {
            let generation = state
                .workers
                .iter()
                .find(|w| w.slot == slot && w.is_live())
                .map(|w| w.generation)
                .or_else(|| state.slots.get(slot)?.lagging.as_ref().map(|l| l.generation))
                .unwrap_or(state.generation);
            by_generation
                .entry(generation)
                .or_default()
                .push(format!("{}:{slot}", state.config.name));
        }
        let any_new = by_generation.contains_key(&new);
        by_generation
            .into_iter()
            .rev()
            .map(|(generation, slots)| {
                let one = slots.len() == 1;
                let (verb, what) = match (generation == new, any_new) {
                    (true, _) => (if one { "runs" } else { "run" }, "the new command"),
                    (false, true) => (if one { "still runs" } else { "still run" }, "the old one"),
                    (false, false) => (if one { "still runs" } else { "still run" }, "the old command"),
                };
                format!("{} {verb} {what} (generation {generation})", slots.join(" "))
            })
            .collect::<Vec<_>>()
            .join("; ")
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
