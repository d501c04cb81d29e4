//! The supervisor: one task that owns every worker process.
//!
//! # Theory of operation
//!
//! [`Supervisor::run`] is an actor. It alone owns the worker table (per app: its workers and
//! per-slot counters) and mutates it in response to two inputs: [`Command`]s from [`Handle`]s
//! (the control socket, the signal handler, the front process's stop sequence) and `Event`s
//! from the small tasks it spawns per worker (one waits for the process to exit, one probes its
//! readiness, one sleeps until a deadline). Nothing else touches the table, so there is no lock
//! around it.
//!
//! After every change that affects routing, the supervisor builds a fresh immutable pool of the
//! app's ready workers and publishes it to the app's [`Balancer`]; the proxy reads only that.
//!
//! A worker is *ready* when its port accepts a TCP connection, or, with `ready_path`, when that
//! path answers 2xx (apps without `listen` are ready once spawned). One that exits, or is not
//! ready within `listen_timeout`, is reported with its exit status and last output lines and its
//! slot is restarted as PM2's restart policy says (`policy`). Stopping sends `kill_signal` to the
//! worker's process group, then SIGKILL after `kill_timeout`; the exit is always reaped.
//!
//! Rolling reloads (`reload`) run inside the same actor as a state machine driven by the
//! same events, so a reload, a crash and a status request never race each other.
//!
//! The actor's methods are split by concern: this file has the event loop, spawning, exits and
//! stops; `reload` the rolling reload; `health` passive and active health checks, the
//! memory cap and replacements; `admin` `status`, `scale` and `stop APP`; `probe` the
//! readiness checks; `policy` the restart decisions; `spawn` the process-level work.

mod admin;
mod health;
mod policy;
mod probe;
mod reload;
mod spawn;
pub mod status;
mod worker;

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::balancer::{Balancer, Pool, Routing, WorkerStats};
use crate::config::{AppConfig, Config};
use crate::logs::files::{self, LogFile};
use crate::logs::{OutputSink, OutputTail, Stream, Target};
use policy::{after_exit, AfterExit, History, RestartPolicy};
use probe::{wait_for_ready_message, Readiness};
use reload::ReloadRun;
use status::{ReloadOutcome, Status};
use worker::{describe_exit, StopReason, Worker, WorkerState};

/// How long a worker's exit waits for the rest of its output (pipes a grandchild still holds
/// open are not waited for longer).
const OUTPUT_DRAIN: Duration = Duration::from_millis(500);

/// The supervisor task has ended; nothing more can be asked of it.
#[derive(Debug, thiserror::Error)]
#[error("the supervisor has stopped")]
pub struct SupervisorGone;

/// A cheap, cloneable way to talk to the supervisor.
#[derive(Debug, Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
}

impl Handle {
    /// A snapshot of every app and worker.
    pub async fn status(&self) -> Result<Status, SupervisorGone> {
        self.ask(Command::Status).await
    }

    /// Stops every worker (kill_signal, kill_timeout, SIGKILL) and waits until all have exited.
    pub async fn shutdown(&self) -> Result<(), SupervisorGone> {
        self.ask(Command::Shutdown).await
    }

    /// SIGKILLs every worker's process group now.
    pub async fn kill(&self) -> Result<(), SupervisorGone> {
        self.ask(Command::Kill).await
    }

    /// Re-reads the config file and replaces the workers of `app` (or of every app), slot by
    /// slot. Progress lines go to `progress`; the answer is the summary, or why nothing (or
    /// not everything) changed.
    pub async fn reload(
        &self,
        app: Option<String>,
        progress: mpsc::UnboundedSender<String>,
    ) -> Result<Result<String, String>, SupervisorGone> {
        self.ask(|reply| Command::Reload { app, progress, reply }).await
    }

    /// Changes the worker count of `app` (until the next reload, which applies the file's
    /// `instances`). New workers enter rotation when ready; removed ones drain, then stop.
    pub async fn scale(&self, app: String, change: Scale) -> Result<Result<String, String>, SupervisorGone> {
        self.ask(|reply| Command::Scale { app, change, reply }).await
    }

    /// Stops one app's workers (draining them first); they stay stopped until a reload of it.
    pub async fn stop_app(&self, app: String) -> Result<Result<String, String>, SupervisorGone> {
        self.ask(|reply| Command::StopApp { app, reply }).await
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, SupervisorGone> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| SupervisorGone)?;
        answer.await.map_err(|_| SupervisorGone)
    }
}

/// A change of worker count: `N`, `+N` or `-N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// Exactly this many.
    To(usize),
    /// This many more.
    Up(usize),
    /// This many fewer (never below 1).
    Down(usize),
}

impl std::str::FromStr for Scale {
    type Err = String;

    fn from_str(text: &str) -> Result<Scale, String> {
        let number = |digits: &str| {
            digits
                .parse::<usize>()
                .map_err(|_| format!("{text:?} is not N, +N or -N"))
        };
        match text.as_bytes().first() {
            Some(b'+') => number(&text[1..]).map(Scale::Up),
            Some(b'-') => number(&text[1..]).map(Scale::Down),
            _ => match number(text)? {
                0 => Err("an app needs at least one worker (use `corral stop` to stop everything)".into()),
                n => Ok(Scale::To(n)),
            },
        }
    }
}

/// Requests to the supervisor.
#[derive(Debug)]
pub enum Command {
    /// Reply with a status snapshot.
    Status(oneshot::Sender<Status>),
    /// Stop all workers; reply when they are gone.
    Shutdown(oneshot::Sender<()>),
    /// SIGKILL all workers; reply at once.
    Kill(oneshot::Sender<()>),
    /// Stop one app's workers.
    StopApp {
        /// The app.
        app: String,
        /// What was done, or why not.
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// Change an app's worker count.
    Scale {
        /// The app.
        app: String,
        /// The change.
        change: Scale,
        /// What was done, or why not.
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// Rolling reload; reply when it succeeded or was rolled back.
    Reload {
        /// Only this app.
        app: Option<String>,
        /// Progress lines.
        progress: mpsc::UnboundedSender<String>,
        /// The outcome.
        reply: oneshot::Sender<Result<String, String>>,
    },
}

/// What the per-worker tasks report.
#[derive(Debug)]
enum Event {
    Ready {
        id: u64,
    },
    NeverReady {
        id: u64,
    },
    Exited {
        id: u64,
        status: std::io::Result<std::process::ExitStatus>,
    },
    KillDeadline {
        id: u64,
    },
    Drained {
        id: u64,
    },
    Unreachable {
        id: u64,
    },
    Health {
        id: u64,
        ok: bool,
    },
    MemoryTick,
    RestartDue {
        app: usize,
        slot: usize,
    },
}

struct App {
    config: Arc<AppConfig>,
    instances: usize,
    generation: u64,
    balancer: Option<Arc<Balancer>>,
    slots: Vec<Slot>,
    workers: Vec<Worker>,
    announced: bool,
}

#[derive(Default)]
struct Slot {
    restarts: u32,
    history: History,
    /// Left empty on purpose: `Some("stopped")` or `Some("errored")`, until the next reload.
    parked: Option<&'static str>,
    last_exit: Option<String>,
}

/// The actor. Build it with [`Supervisor::new`], run it with [`Supervisor::run`].
pub struct Supervisor {
    config_path: PathBuf,
    apps: Vec<App>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::UnboundedSender<Event>,
    event_rx: mpsc::UnboundedReceiver<Event>,
    /// Workers the proxy found refusing connections.
    unreachable_rx: mpsc::UnboundedReceiver<u64>,
    output: OutputSink,
    next_id: u64,
    started: Instant,
    /// Set once a shutdown began; holds whoever waits for its end.
    stopping: Option<Vec<oneshot::Sender<()>>>,
    /// The rolling reload in progress, if any.
    reload: Option<ReloadRun>,
    /// Where the list of running workers is kept for the next run (see [`crate::leftovers`]).
    state_file: Option<PathBuf>,
    /// Replacements of unhealthy workers in progress: new worker id -> old worker id.
    replacing: HashMap<u64, u64>,
    last_reload: Option<ReloadOutcome>,
}

impl Supervisor {
    /// A supervisor for `config`. `balancers` has one entry per app, `Some` for proxied apps.
    pub fn new(config: &Config, balancers: Vec<Option<Arc<Balancer>>>, output: OutputSink) -> (Supervisor, Handle) {
        let cpus = crate::config::usable_cpus();
        let apps: Vec<App> = config
            .apps
            .iter()
            .zip(balancers)
            .map(|(app, balancer)| {
                let instances = app.instances.resolve(cpus);
                App {
                    config: Arc::new(app.clone()),
                    instances,
                    generation: 1,
                    balancer,
                    slots: (0..instances).map(|_| Slot::default()).collect(),
                    workers: Vec::new(),
                    announced: false,
                }
            })
            .collect();
        let (tx, commands) = mpsc::channel(64);
        let (events, event_rx) = mpsc::unbounded_channel();
        let (unreachable, unreachable_rx) = mpsc::unbounded_channel();
        for app in &apps {
            if let Some(balancer) = &app.balancer {
                balancer.set_reporter(unreachable.clone());
            }
        }
        let supervisor = Supervisor {
            config_path: config.path.clone(),
            apps,
            commands,
            events,
            event_rx,
            unreachable_rx,
            output,
            next_id: 1,
            started: Instant::now(),
            stopping: None,
            reload: None,
            replacing: HashMap::new(),
            state_file: None,
            last_reload: None,
        };
        (supervisor, Handle { tx })
    }

    /// Keeps the state file at `path` up to date (pids of the running workers).
    pub fn with_state_file(mut self, path: PathBuf) -> Supervisor {
        self.state_file = Some(path);
        self
    }

    fn save_state(&self) {
        let Some(path) = &self.state_file else { return };
        let state = crate::leftovers::State {
            front: crate::leftovers::Proc::of(std::process::id()).unwrap_or_default(),
            workers: self
                .apps
                .iter()
                .flat_map(|a| a.workers.iter())
                .map(|w| crate::leftovers::Proc {
                    pid: w.pid,
                    start: w.start_time,
                })
                .collect(),
        };
        crate::leftovers::save(path, &state);
    }

    /// Starts every worker, then serves commands and events until a shutdown completes.
    pub async fn run(mut self) {
        // Every 2 s: CPU and memory of each worker's process tree, and the memory caps.
        let ticks = self.events.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_secs(2));
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                if ticks.send(Event::MemoryTick).is_err() {
                    return;
                }
            }
        });
        for app in 0..self.apps.len() {
            let config = Arc::clone(&self.apps[app].config);
            info!(app = %config.name, instances = self.apps[app].instances, command = ?config.command, "starting workers");
            for slot in 0..self.apps[app].instances {
                self.start(app, slot, Arc::clone(&config), 1);
            }
        }
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    // Every handle is gone: nobody can ask for a stop any more, so stop now.
                    None => self.begin_shutdown(None),
                },
                Some(event) = self.event_rx.recv() => self.on_event(event),
                Some(id) = self.unreachable_rx.recv() => self.on_event(Event::Unreachable { id }),
            }
            if self.stopping.is_some() && self.apps.iter().all(|a| a.workers.is_empty()) {
                break;
            }
        }
        info!("all workers stopped");
        for waiter in self.stopping.take().into_iter().flatten() {
            let _receiver_gone = waiter.send(());
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Status(reply) => {
                let _receiver_gone = reply.send(self.status());
            }
            Command::Shutdown(reply) => self.begin_shutdown(Some(reply)),
            Command::Kill(reply) => {
                for worker in self.apps.iter().flat_map(|a| a.workers.iter()) {
                    warn!(pid = worker.pid, "killing worker now");
                    kill_group(worker.pid, Signal::SIGKILL);
                }
                let _receiver_gone = reply.send(());
            }
            Command::Reload { app, progress, reply } => self.begin_reload(app, progress, reply),
            Command::StopApp { app, reply } => {
                let _client_gone = reply.send(self.stop_app(&app));
            }
            Command::Scale { app, change, reply } => {
                let _client_gone = reply.send(self.scale(&app, change));
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Ready { id } => self.on_ready(id),
            Event::NeverReady { id } => self.on_never_ready(id),
            Event::Exited { id, status } => self.on_exit(id, status),
            Event::KillDeadline { id } => {
                let Some((app, index)) = self.find(id) else {
                    return;
                };
                let worker = &self.apps[app].workers[index];
                warn!(
                    pid = worker.pid,
                    "worker did not exit within kill_timeout ({:?}); sending SIGKILL", worker.spec.kill_timeout
                );
                kill_group(worker.pid, Signal::SIGKILL);
            }
            Event::Drained { id } => self.on_drained(id),
            Event::Unreachable { id } => self.on_unreachable(id),
            Event::Health { id, ok } => self.on_health(id, ok),
            Event::MemoryTick => self.check_memory(),
            Event::RestartDue { app, slot } => {
                let occupied = self.apps[app].workers.iter().any(|w| w.slot == slot && w.is_live())
                    || self.apps[app].slots.get(slot).is_some_and(|s| s.parked.is_some());
                if self.stopping.is_none() && !occupied && slot < self.apps[app].instances {
                    let config = Arc::clone(&self.apps[app].config);
                    let generation = self.apps[app].generation;
                    self.start(app, slot, config, generation);
                }
            }
        }
    }

    fn on_ready(&mut self, id: u64) {
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
                self.begin_drain(app, old_index);
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

    fn on_never_ready(&mut self, id: u64) {
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

    fn on_exit(&mut self, id: u64, status: std::io::Result<std::process::ExitStatus>) {
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

    fn on_drained(&mut self, id: u64) {
        let Some((app, index)) = self.find(id) else {
            return;
        };
        let worker = &mut self.apps[app].workers[index];
        if worker.state != WorkerState::Draining {
            return;
        }
        worker.drained = true;
        debug!(pid = worker.pid, "worker drained");
        // The old workers of a reload still in progress stay until it commits (they are the
        // rollback); any other drained worker stops now.
        if !self.reload.as_ref().is_some_and(|r| r.holds(id)) {
            self.stop(app, index, StopReason::Replaced);
        }
    }

    fn begin_shutdown(&mut self, reply: Option<oneshot::Sender<()>>) {
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

    /// Spawns a worker for `slot` from `spec`, with its exit watcher, output pumps and probe.
    /// Returns its id, or the reason it could not be started.
    fn spawn_worker(
        &mut self,
        app_index: usize,
        slot: usize,
        spec: Arc<AppConfig>,
        generation: u64,
    ) -> Result<u64, String> {
        let taken: HashSet<u16> = self
            .apps
            .iter()
            .flat_map(|a| a.workers.iter())
            .filter_map(|w| w.port)
            .collect();
        let proxied = self.apps[app_index].balancer.is_some();
        let port = proxied
            .then(|| spawn::free_port(&taken))
            .transpose()
            .map_err(|e| e.to_string())?;
        let spawn::Spawned { mut child, channel } = spawn::spawn(&spec, slot, port).map_err(|e| e.to_string())?;
        let pid = child.id().ok_or("the process exited at once")?;
        let id = self.next_id;
        self.next_id += 1;
        let output = Arc::new(OutputTail::default());
        let prefix = format!("{}.{slot}", spec.name);
        let mut pumps = Vec::new();
        if let Some(pipe) = child.stdout.take() {
            pumps.push(tokio::spawn(self.output.clone().pump(
                pipe,
                log_target(&spec, slot, Stream::Stdout),
                prefix.clone(),
                Arc::clone(&output),
            )));
        }
        if let Some(pipe) = child.stderr.take() {
            pumps.push(tokio::spawn(self.output.clone().pump(
                pipe,
                log_target(&spec, slot, Stream::Stderr),
                prefix,
                Arc::clone(&output),
            )));
        }
        let events = self.events.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            // The exit is reported with the worker's last lines, so wait for its pipes to be
            // read to their end first; a grandchild may keep them open, hence the bound.
            let drained = async {
                for pump in pumps {
                    let _ = pump.await;
                }
            };
            let _still_open = tokio::time::timeout(OUTPUT_DRAIN, drained).await;
            let _supervisor_gone = events.send(Event::Exited { id, status });
        });
        let probe = CancellationToken::new();
        match (channel, port) {
            (Some(channel), _) => {
                tokio::spawn(wait_for_ready_message(
                    id,
                    channel,
                    spec.listen_timeout,
                    probe.clone(),
                    self.events.clone(),
                ));
            }
            (None, Some(port)) => {
                let check = Readiness::of(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), &spec);
                tokio::spawn(check.run(id, probe.clone(), self.events.clone()));
            }
            (None, None) => {
                let _supervisor_gone = self.events.send(Event::Ready { id });
            }
        }
        debug!(app = %spec.name, slot, pid, port = port.unwrap_or(0), generation, "worker spawned");
        self.apps[app_index].workers.push(Worker {
            id,
            slot,
            generation,
            spec,
            pid,
            start_time: crate::leftovers::Proc::of(pid).map_or(0, |p| p.start),
            usage: None,
            port,
            state: WorkerState::Starting,
            started: Instant::now(),
            was_ready: false,
            stats: Arc::new(WorkerStats::default()),
            output,
            probe,
            upstream: None,
            drain: None,
            drained: false,
            unreachable: false,
            unhealthy: false,
            health_failures: 0,
            health: None,
        });
        self.save_state();
        Ok(id)
    }

    /// Starts a worker into a slot outside any reload; a failure to spawn is retried with the
    /// same backoff as a crash.
    fn start(&mut self, app_index: usize, slot_index: usize, spec: Arc<AppConfig>, generation: u64) {
        if let Err(reason) = self.spawn_worker(app_index, slot_index, spec, generation) {
            let app = &mut self.apps[app_index];
            let policy = RestartPolicy::of(&app.config);
            let slot = &mut app.slots[slot_index];
            slot.last_exit = Some(reason.clone());
            match after_exit(
                &policy,
                &mut slot.history,
                self.stopping.is_some(),
                Duration::ZERO,
                false,
                None,
            ) {
                AfterExit::Restart(delay) => {
                    slot.restarts += 1;
                    error!(app = %app.config.name, slot = slot_index, "cannot start worker: {reason}; retrying in {delay:?}");
                    self.after(
                        delay,
                        Event::RestartDue {
                            app: app_index,
                            slot: slot_index,
                        },
                    );
                }
                AfterExit::Errored | AfterExit::Stopped => {
                    slot.parked = Some("errored");
                    error!(app = %app.config.name, slot = slot_index, "cannot start worker: {reason}; giving up (max_restarts)");
                }
                AfterExit::Forget => {}
            }
        }
    }

    /// Takes a worker out of rotation and asks it to stop; SIGKILL follows at `kill_timeout`.
    fn stop(&mut self, app_index: usize, index: usize, reason: StopReason) {
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
    fn begin_drain(&mut self, app_index: usize, index: usize) {
        let worker = &mut self.apps[app_index].workers[index];
        if !worker.is_live() {
            return;
        }
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
    fn drain_where(&mut self, app: usize, which: impl Fn(&Worker) -> bool) -> Vec<u64> {
        let chosen: Vec<(usize, u64)> = self.apps[app]
            .workers
            .iter()
            .enumerate()
            .filter(|(_, w)| w.is_live() && which(w))
            .map(|(index, w)| (index, w.id))
            .collect();
        // Draining changes states, not positions: the indexes stay valid through the loop.
        for &(index, _) in &chosen {
            self.begin_drain(app, index);
        }
        chosen.into_iter().map(|(_, id)| id).collect()
    }

    /// The index of the app called `name`.
    fn app_named(&self, name: &str) -> Result<usize, String> {
        self.apps
            .iter()
            .position(|a| a.config.name == name)
            .ok_or_else(|| format!("there is no app named {name:?}"))
    }

    /// Sends `event` to the actor after `delay`.
    fn after(&self, delay: Duration, event: Event) {
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _supervisor_gone = events.send(event);
        });
    }

    /// Publishes the app's ready workers as its new pool.
    fn publish(&self, app_index: usize) {
        let app = &self.apps[app_index];
        if let Some(balancer) = &app.balancer {
            let members = app
                .workers
                .iter()
                .filter(|w| w.in_rotation())
                .filter_map(|w| w.upstream.clone())
                .collect();
            balancer.publish(Pool::new(members, routing(&app.config, app.instances)));
        }
    }

    fn find(&self, id: u64) -> Option<(usize, usize)> {
        self.apps
            .iter()
            .enumerate()
            .find_map(|(a, app)| app.workers.iter().position(|w| w.id == id).map(|i| (a, i)))
    }
}

/// Where a worker's stdout or stderr goes: its log file, or corral's own stream.
fn log_target(config: &AppConfig, slot: usize, stream: Stream) -> Target {
    let path = match stream {
        Stream::Stdout => config.logs.out_file.as_ref(),
        Stream::Stderr => config.logs.error_file.as_ref(),
    };
    match path {
        None => Target::Terminal(stream),
        Some(path) => Target::File {
            file: Arc::new(LogFile {
                path: files::slot_path(path, slot, config.logs.merge_logs),
                max_size: config.logs.max_size,
                retain: config.logs.retain,
            }),
            date_format: Arc::from(config.logs.date_format.as_str()),
            merged: config.logs.merge_logs,
        },
    }
}

/// How the proxy routes for `config` with `instances` slots.
fn routing(config: &AppConfig, instances: usize) -> Arc<Routing> {
    Arc::new(Routing {
        balance: config.balance,
        sticky: config.sticky,
        cookie: config.sticky_cookie.clone(),
        trusted: config.trusted_proxies.clone(),
        instances,
    })
}

fn kill_group(pid: u32, signal: Signal) {
    if let Err(e) = spawn::signal_group(pid, signal) {
        warn!(pid, %signal, error = %e, "cannot signal worker process group");
    }
}
