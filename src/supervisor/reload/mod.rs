//! Rolling reload: replace every worker of an app, a batch at a time, without ever dropping
//! below the configured capacity, and roll back if the new version does not come up (or, with
//! `reload_keep_old = false`, stop where it is).
//!
//! A reload is a state machine inside the supervisor actor ([`ReloadRun`]), advanced by the same
//! events as everything else:
//!
//! 1. The config file is re-read and validated. Invalid, or asking for something a reload cannot
//!    do (a new `listen` address, added or removed apps): nothing changes and the caller is told
//!    why.
//! 2. For each app, slots are taken `reload_batch` at a time. For each slot a new worker starts
//!    (with the new config) and is probed; it waits *out of rotation* until the whole batch is
//!    ready. Then, in one pool publication, the batch enters rotation and the old workers of those
//!    slots leave it, and the old ones start draining (in-flight requests finish; at
//!    `drain_timeout` open streams are ended cleanly).
//! 3. Old workers are not stopped while the reload can still fail: they are the rollback. When
//!    every slot of the app runs the new generation, the reload *commits*: the app's config
//!    becomes the new one and the drained old workers are stopped (`kill_signal`,
//!    `kill_timeout`, SIGKILL). The reload ends when they have all exited.
//! 4. If a new worker exits, or is not ready within `listen_timeout`, before the commit, the
//!    reload fails: the new workers leave (drained, then stopped), the old ones go back into
//!    rotation as they were, and the caller gets the failing worker's exit status and last
//!    output lines. A reload never replaces a healthy worker with a broken one.
//!
//! With `reload_keep_old = false` (read from the config the reload loads) the old workers are
//! not kept: each drains and stops as soon as its batch's replacements are in rotation, and
//! the next batch starts only once they have exited, so the app never runs more than
//! `instances + reload_batch` workers (2N with the default). Capacity still never drops: a
//! batch enters rotation before its old workers leave. With nothing to roll back to, a failure
//! stops the reload where it is (`end`): the batch still starting is stopped, the slots
//! already replaced keep the new generation, the others keep the old one (`lagging`), and the
//! caller is told which slots run which.
//!
//! One reload runs at a time; a second request while one runs is refused, not queued, so a
//! deploy script learns at once that its reload did not happen.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{error, info};

mod end;
mod lagging;

pub(super) use lagging::Lagging;

use super::status::ReloadResult;
use super::worker::{StopReason, WorkerState};
use super::{CommandError, ErrorCode, Outcome, Supervisor};
use crate::admin::events::{Draft, Events, Kind, Reason};
use crate::config::{AppConfig, Config};

/// A reload in progress.
pub(super) struct ReloadRun {
    config: Config,
    /// Apps still to reload, by index.
    queue: VecDeque<usize>,
    phase: Option<Phase>,
    progress: mpsc::UnboundedSender<String>,
    reply: Option<oneshot::Sender<Outcome>>,
    started: Instant,
    replaced: usize,
    done: Vec<String>,
    /// A restart keeps each app's current worker count (a `scale` included); a reload takes
    /// the file's `instances`.
    keep_counts: bool,
}

/// The reload of one app.
struct Phase {
    app: usize,
    spec: Arc<AppConfig>,
    generation: u64,
    instances: usize,
    /// Slots not started yet.
    todo: VecDeque<usize>,
    /// New workers of the current batch, with their slots.
    batch: Vec<(u64, usize)>,
    /// Members of `batch` that are ready.
    ready: HashSet<u64>,
    /// Every new worker of this phase.
    candidates: Vec<u64>,
    /// Old workers out of rotation, kept until the commit and then stopped (with
    /// `reload_keep_old = false`: the current batch's, stopped once drained).
    retiring: Vec<u64>,
    /// Slots whose batch entered rotation, in order.
    swapped: Vec<usize>,
    committed: bool,
}

impl ReloadRun {
    /// True for a new worker of the reload that has not been committed yet.
    pub(super) fn is_candidate(&self, id: u64) -> bool {
        self.phase
            .as_ref()
            .is_some_and(|p| !p.committed && p.candidates.contains(&id))
    }

    /// True for an old worker kept as the rollback of an uncommitted reload (never with
    /// `reload_keep_old = false`: a drained old worker stops at once).
    pub(super) fn holds(&self, id: u64) -> bool {
        self.phase
            .as_ref()
            .is_some_and(|p| !p.committed && p.spec.reload_keep_old && p.retiring.contains(&id))
    }
}

/// Logs a progress line and passes it to whoever asked for the reload.
fn say(progress: &mpsc::UnboundedSender<String>, feed: &Events, line: String) {
    info!("reload: {line}");
    feed.emit(Draft::global(Kind::ReloadProgress).message(line.clone()));
    let _client_gone = progress.send(line);
}

impl Supervisor {
    pub(super) fn begin_reload(
        &mut self,
        only: Option<String>,
        env: Option<String>,
        reread: bool,
        progress: mpsc::UnboundedSender<String>,
        reply: oneshot::Sender<Outcome>,
    ) {
        if let Some(run) = &self.reload {
            let why = format!("a reload is already running (started {:.1?} ago); this one was not queued: try again when it has finished", run.started.elapsed());
            return self.refuse_reload(only.as_deref(), reply, ErrorCode::Busy, why);
        }
        if self.stopping.is_some() {
            return self.refuse_reload(only.as_deref(), reply, ErrorCode::Stopping, "corral is stopping".into());
        }
        let config = if reread {
            match self.fresh_config(only.as_deref(), env.as_deref()) {
                Ok(config) => config,
                Err((code, why)) => return self.refuse_reload(only.as_deref(), reply, code, why),
            }
        } else {
            // A restart: the same configs again, as they run now.
            Config {
                path: self.config_path.clone(),
                apps: self.apps.iter().map(|a| (*a.config).clone()).collect(),
                admin: self.admin.clone(),
                corral: crate::config::CorralConfig::default(),
                env_name: self.env_name.clone(),
                warnings: Vec::new(),
            }
        };
        let queue: VecDeque<usize> = (0..self.apps.len())
            .filter(|&i| only.as_deref().is_none_or(|name| self.apps[i].config.name == name))
            .collect();
        if queue.is_empty() {
            let why = format!("there is no app named {:?}", only.as_deref().unwrap_or_default());
            return self.refuse_reload(only.as_deref(), reply, ErrorCode::NoSuchApp, why);
        }
        let run = ReloadRun {
            config,
            queue,
            phase: None,
            progress,
            reply: Some(reply),
            started: Instant::now(),
            replaced: 0,
            done: Vec::new(),
            keep_counts: !reread,
        };
        let start = if reread {
            format!(
                "config {} is valid; reloading {} app(s)",
                self.config_path.display(),
                run.queue.len()
            )
        } else {
            format!("restarting {} app(s) with the config they run", run.queue.len())
        };
        self.emit(Draft::global(Kind::ReloadStarted).message(start.clone()));
        say(&run.progress, &self.feed, start);
        self.reload = Some(run);
        crate::notify::reloading();
        self.next_phase();
    }

    /// Answers a reload request with why nothing was done; every app it was for counts a
    /// refused reload.
    fn refuse_reload(&mut self, only: Option<&str>, reply: oneshot::Sender<Outcome>, code: ErrorCode, why: String) {
        for app in self
            .apps
            .iter_mut()
            .filter(|a| only.is_none_or(|name| a.config.name == name))
        {
            app.counts.reloaded(ReloadResult::Refused);
        }
        error!("reload refused: {why}");
        self.feed
            .emit(Draft::global(Kind::ReloadFailed).message(format!("refused: {why}")));
        let _client_gone = reply.send(Err(CommandError::new(code, why)));
    }

    fn next_phase(&mut self) {
        let Some(run) = self.reload.as_mut() else {
            return;
        };
        let Some(app) = run.queue.pop_front() else {
            return self.reload_succeeded();
        };
        let name = self.apps[app].config.name.clone();
        let spec = Arc::new(
            run.config
                .app(&name)
                .cloned()
                .expect("UNWRAP: compatible() checked the app names"),
        );
        let instances = if run.keep_counts {
            self.apps[app].instances
        } else {
            spec.instances.resolve(crate::config::usable_cpus())
        };
        let generation = self.apps[app].generation + 1;
        let retire = if spec.reload_keep_old {
            ""
        } else {
            " (reload_keep_old = false: each old worker stops once its replacement is ready)"
        };
        say(
            &run.progress,
            &self.feed,
            format!(
                "{name}: replacing {} worker(s) with {instances} of generation {generation}, {} at a time{retire}",
                self.apps[app].workers.iter().filter(|w| w.is_live()).count(),
                spec.reload_batch
            ),
        );
        run.phase = Some(Phase {
            app,
            spec,
            generation,
            instances,
            todo: (0..instances).collect(),
            batch: Vec::new(),
            ready: HashSet::new(),
            candidates: Vec::new(),
            retiring: Vec::new(),
            swapped: Vec::new(),
            committed: false,
        });
        self.next_batch();
    }

    fn next_batch(&mut self) {
        let Some(phase) = self.reload.as_mut().and_then(|r| r.phase.as_mut()) else {
            return;
        };
        if phase.todo.is_empty() {
            return self.commit();
        }
        let take = phase.spec.reload_batch.min(phase.todo.len());
        let slots: Vec<usize> = phase.todo.drain(..take).collect();
        let (app, spec, generation) = (phase.app, Arc::clone(&phase.spec), phase.generation);
        for slot in slots {
            let app_state = &mut self.apps[app];
            if app_state.slots.len() <= slot {
                app_state.slots.resize_with(slot + 1, Default::default);
            }
            match self.spawn_worker(app, slot, Arc::clone(&spec), generation) {
                Ok(id) => {
                    let pid = self.apps[app].workers.last().map_or(0, |w| w.pid);
                    let run = self.reload.as_mut().expect("UNWRAP: checked above");
                    let phase = run.phase.as_mut().expect("UNWRAP: checked above");
                    phase.batch.push((id, slot));
                    phase.candidates.push(id);
                    say(
                        &run.progress,
                        &self.feed,
                        format!("{} slot {slot}: started new worker pid {pid}", spec.name),
                    );
                }
                Err(reason) => {
                    return self.reload_failed(format!("cannot start a new worker for slot {slot}: {reason}"))
                }
            }
        }
    }

    pub(super) fn reload_candidate_ready(&mut self, id: u64, boot: Duration) {
        let Some(run) = self.reload.as_mut() else {
            return;
        };
        let Some(phase) = run.phase.as_mut() else {
            return;
        };
        phase.ready.insert(id);
        let app = phase.app;
        let (slot, pid) = self.apps[app]
            .workers
            .iter()
            .find(|w| w.id == id)
            .map_or((0, 0), |w| (w.slot, w.pid));
        say(
            &run.progress,
            &self.feed,
            format!(
                "{} slot {slot}: new worker pid {pid} ready in {} ms",
                phase.spec.name,
                boot.as_millis()
            ),
        );
        if phase.batch.iter().all(|(id, _)| phase.ready.contains(id)) {
            self.swap_batch();
        }
    }

    /// Puts the ready batch into rotation and takes the old workers of its slots out, in one
    /// pool publication, then starts the next batch.
    fn swap_batch(&mut self) {
        let Some(run) = self.reload.as_mut() else {
            return;
        };
        let Some(phase) = run.phase.as_mut() else {
            return;
        };
        let app = phase.app;
        let generation = phase.generation;
        let batch = std::mem::take(&mut phase.batch);
        phase.ready.clear();
        let mut lines = Vec::new();
        let mut retiring = Vec::new();
        for &(id, slot) in &batch {
            let workers = &mut self.apps[app].workers;
            let Some(new) = workers.iter_mut().find(|w| w.id == id) else {
                continue;
            };
            new.state = WorkerState::Ready;
            // It takes over from a warm worker: its share grows over the slow start.
            if let Some(upstream) = &new.upstream {
                upstream.start_slow_start();
            }
            let new_pid = new.pid;
            let old: Vec<(u64, u32)> = workers
                .iter()
                .filter(|w| w.slot == slot && w.generation < generation && w.is_live())
                .map(|w| (w.id, w.pid))
                .collect();
            let old_pids: Vec<String> = old.iter().map(|(_, pid)| pid.to_string()).collect();
            lines.push(if old.is_empty() {
                format!("slot {slot}: pid {new_pid} in rotation")
            } else {
                format!(
                    "slot {slot}: pid {new_pid} in rotation; old pid {} out of rotation, draining",
                    old_pids.join(", ")
                )
            });
            retiring.extend(old.into_iter().map(|(id, _)| id));
        }
        self.drain_where(app, Reason::Reload, |w| retiring.contains(&w.id));
        for &(id, _) in &batch {
            if let Some(index) = self.apps[app].workers.iter().position(|w| w.id == id) {
                self.watch_health(app, index);
            }
        }
        self.publish(app);
        let run = self.reload.as_mut().expect("UNWRAP: checked above");
        let phase = run.phase.as_mut().expect("UNWRAP: checked above");
        phase.retiring.extend(retiring);
        phase.swapped.extend(batch.iter().map(|&(_, slot)| slot));
        run.replaced += batch.len();
        let name = phase.spec.name.clone();
        for line in lines {
            say(&run.progress, &self.feed, format!("{name} {line}"));
        }
        // Without the rollback, the old workers just swapped out exit before the next batch
        // starts: that is what bounds the peak to N + reload_batch (`reload_worker_gone`).
        if phase.spec.reload_keep_old || phase.retiring.is_empty() {
            self.next_batch();
        }
    }

    /// Every slot runs the new generation: adopt the new config, and stop the old workers as
    /// soon as they have drained.
    fn commit(&mut self) {
        let Some(phase) = self.reload.as_mut().and_then(|r| r.phase.as_mut()) else {
            return;
        };
        let (app, generation) = (phase.app, phase.generation);
        // Old workers no batch replaced (slots removed by a smaller `instances`, restarts).
        let leftovers = self.drain_where(app, Reason::Reload, |w| w.generation < generation);
        let run = self.reload.as_mut().expect("UNWRAP: checked above");
        let phase = run.phase.as_mut().expect("UNWRAP: checked above");
        phase.retiring.extend(leftovers);
        phase.committed = true;
        let state = &mut self.apps[app];
        for _ in &phase.candidates {
            state.counts.restarted(Reason::Reload);
        }
        state.config = Arc::clone(&phase.spec);
        state.instances = phase.instances;
        state.generation = generation;
        if state.slots.len() < phase.instances {
            state.slots.resize_with(phase.instances, Default::default);
        }
        // A new version gets a clean slate: errored and stopped slots run again, and no slot
        // lags behind an earlier reload any more.
        for slot in &mut state.slots {
            slot.parked = None;
            slot.history = Default::default();
            slot.lagging = None;
        }
        let waiting = phase.retiring.len();
        say(
            &run.progress,
            &self.feed,
            format!(
                "{}: every slot runs generation {generation}; stopping {waiting} old worker(s) once drained",
                phase.spec.name
            ),
        );
        let drained: Vec<u64> = phase.retiring.clone();
        for id in drained {
            if let Some(index) = self.apps[app].workers.iter().position(|w| w.id == id && w.drained) {
                self.stop(app, index, StopReason::Replaced);
            }
        }
        // One publication: leftovers out, and the new config's routing (sticky, balance) in.
        self.publish(app);
        self.check_phase_done();
    }

    /// A worker that was stopping or draining has exited.
    pub(super) fn reload_worker_gone(&mut self, id: u64) {
        let Some(phase) = self.reload.as_mut().and_then(|r| r.phase.as_mut()) else {
            return;
        };
        let before = phase.retiring.len();
        phase.retiring.retain(|&r| r != id);
        let waiting = !phase.committed && !phase.spec.reload_keep_old && phase.batch.is_empty();
        if waiting && before > 0 && phase.retiring.is_empty() {
            // The old workers of the last batch have exited: the next one may start.
            let Some(run) = self.reload.as_ref() else {
                return;
            };
            if let Some(phase) = run.phase.as_ref().filter(|p| !p.todo.is_empty()) {
                say(
                    &run.progress,
                    &self.feed,
                    format!(
                        "{}: the replaced old worker(s) have exited; next batch",
                        phase.spec.name
                    ),
                );
            }
            return self.next_batch();
        }
        self.check_phase_done();
    }

    fn check_phase_done(&mut self) {
        let Some(run) = self.reload.as_mut() else {
            return;
        };
        let Some(phase) = run.phase.as_ref() else {
            return;
        };
        if !phase.committed || !phase.retiring.is_empty() {
            return;
        }
        let name = phase.spec.name.clone();
        self.apps[phase.app].counts.reloaded(ReloadResult::Ok);
        say(&run.progress, &self.feed, format!("{name}: old workers stopped"));
        run.done.push(name);
        run.phase = None;
        self.next_phase();
    }
}
