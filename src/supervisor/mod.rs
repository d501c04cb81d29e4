//! The supervisor: one task that owns every worker process.
//!
//! # Theory of operation
//!
//! [`Supervisor::run`] is an actor. It alone owns the worker table (apps → slots → workers) and
//! mutates it in response to two inputs: [`Command`]s from [`Handle`]s (the control socket, the
//! signal handler, the front process's stop sequence) and [`Event`]s from the small tasks it
//! spawns per worker (one waits for the process to exit, one probes its port, one sleeps until
//! a kill or restart deadline). Nothing else touches the table, so there is no lock around it.
//!
//! After every change that affects routing, the supervisor builds a fresh immutable pool of the
//! app's ready workers and publishes it to the app's [`Balancer`]; the proxy reads only that.
//!
//! A worker is *ready* when its port accepts a TCP connection (apps without `listen` are ready
//! once spawned). One that exits, or is not ready within `listen_timeout`, is reported with its
//! exit status and last output lines and its slot is restarted after a backoff ([`backoff`]).
//! A stop sends `kill_signal` to the worker's process group, then SIGKILL after `kill_timeout`;
//! the exit is always reaped.

mod backoff;
mod spawn;
pub mod status;
mod worker;

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::balancer::{Balancer, Pool, Upstream, WorkerStats};
use crate::config::{AppConfig, Config};
use crate::logs::{OutputSink, OutputTail, Stream};
use backoff::Backoff;
use status::{AppStatus, Status, WorkerStatus};
use worker::{after_exit, describe_exit, AfterExit, StopReason, Worker, WorkerState};

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

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, SupervisorGone> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| SupervisorGone)?;
        answer.await.map_err(|_| SupervisorGone)
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
    RestartDue {
        app: usize,
        slot: usize,
    },
}

struct App {
    config: AppConfig,
    instances: usize,
    balancer: Option<Arc<Balancer>>,
    slots: Vec<Slot>,
    announced: bool,
}

#[derive(Default)]
struct Slot {
    worker: Option<Worker>,
    restarts: u32,
    failures: u32,
    last_exit: Option<String>,
}

/// The actor. Build it with [`Supervisor::new`], run it with [`Supervisor::run`].
pub struct Supervisor {
    config_path: String,
    apps: Vec<App>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::UnboundedSender<Event>,
    event_rx: mpsc::UnboundedReceiver<Event>,
    output: OutputSink,
    backoff: Backoff,
    next_id: u64,
    started: Instant,
    /// Set once a shutdown began; holds whoever waits for its end.
    stopping: Option<Vec<oneshot::Sender<()>>>,
}

impl Supervisor {
    /// A supervisor for `config`. `balancers` has one entry per app, `Some` for proxied apps.
    pub fn new(
        config: &Config,
        balancers: Vec<Option<Arc<Balancer>>>,
        output: OutputSink,
    ) -> (Supervisor, Handle) {
        let cpus = crate::config::usable_cpus();
        let apps = config
            .apps
            .iter()
            .zip(balancers)
            .map(|(app, balancer)| {
                let instances = app.instances.resolve(cpus);
                App {
                    config: app.clone(),
                    instances,
                    balancer,
                    slots: (0..instances).map(|_| Slot::default()).collect(),
                    announced: false,
                }
            })
            .collect();
        let (tx, commands) = mpsc::channel(64);
        let (events, event_rx) = mpsc::unbounded_channel();
        let supervisor = Supervisor {
            config_path: config.path.display().to_string(),
            apps,
            commands,
            events,
            event_rx,
            output,
            backoff: Backoff::default(),
            next_id: 1,
            started: Instant::now(),
            stopping: None,
        };
        (supervisor, Handle { tx })
    }

    /// Starts every worker, then serves commands and events until a shutdown completes.
    pub async fn run(mut self) {
        for app in 0..self.apps.len() {
            let config = &self.apps[app].config;
            info!(app = %config.name, instances = self.apps[app].instances, command = ?config.command, "starting workers");
            for slot in 0..self.apps[app].instances {
                self.start(app, slot);
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
            }
            if self.stopping.is_some() && self.worker_count() == 0 {
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
                for worker in self.workers() {
                    warn!(pid = worker.pid, "killing worker now");
                    kill_group(worker.pid, Signal::SIGKILL);
                }
                let _receiver_gone = reply.send(());
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Ready { id } => self.on_ready(id),
            Event::NeverReady { id } => {
                let Some((app, slot)) = self.find(id) else {
                    return;
                };
                let config = &self.apps[app].config;
                let Some(worker) = self.apps[app].slots[slot].worker.as_ref() else {
                    return;
                };
                if worker.state != WorkerState::Starting {
                    return;
                }
                let timeout = config.listen_timeout;
                error!(
                    app = %config.name, slot, pid = worker.pid, port = ?worker.port,
                    "worker did not accept connections on its port within listen_timeout ({timeout:?}); stopping it. Last output:{}",
                    worker.last_output()
                );
                self.stop(app, slot, StopReason::NeverReady);
            }
            Event::Exited { id, status } => self.on_exit(id, status),
            Event::KillDeadline { id } => {
                let Some((app, slot)) = self.find(id) else {
                    return;
                };
                let timeout = self.apps[app].config.kill_timeout;
                let worker = self.worker_mut(app, slot);
                warn!(
                    pid = worker.pid,
                    "worker did not exit within kill_timeout ({timeout:?}); sending SIGKILL"
                );
                kill_group(worker.pid, Signal::SIGKILL);
            }
            Event::RestartDue { app, slot } => {
                if self.stopping.is_none() && self.apps[app].slots[slot].worker.is_none() {
                    self.start(app, slot);
                }
            }
        }
    }

    fn on_ready(&mut self, id: u64) {
        let Some((app, slot)) = self.find(id) else {
            return;
        };
        let worker = self.worker_mut(app, slot);
        if worker.state != WorkerState::Starting {
            return;
        }
        worker.state = WorkerState::Ready;
        worker.was_ready = true;
        let (pid, port, boot) = (worker.pid, worker.port, worker.started.elapsed());
        if let Some(port) = port {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            worker.upstream = Some(Arc::new(Upstream::new(
                id,
                slot,
                addr,
                Arc::clone(&worker.stats),
            )));
        }
        info!(app = %self.apps[app].config.name, slot, pid, ?port, boot_ms = boot.as_millis() as u64, "worker ready");
        self.publish(app);
        let app = &mut self.apps[app];
        let ready = app
            .slots
            .iter()
            .filter(|s| {
                s.worker
                    .as_ref()
                    .is_some_and(|w| w.state == WorkerState::Ready)
            })
            .count();
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

    fn on_exit(&mut self, id: u64, status: std::io::Result<std::process::ExitStatus>) {
        let Some((app_index, slot_index)) = self.find(id) else {
            return;
        };
        let shutting_down = self.stopping.is_some();
        let app = &mut self.apps[app_index];
        let slot = &mut app.slots[slot_index];
        let Some(worker) = slot.worker.take() else {
            return;
        };
        worker.probe.cancel();
        // Whatever the worker forked dies with it: nothing is left behind in its group.
        kill_group(worker.pid, Signal::SIGKILL);
        let how = describe_exit(&status);
        let name = app.config.name.clone();
        if worker.upstream.is_some() {
            self.publish(app_index);
        }
        let app = &mut self.apps[app_index];
        let slot = &mut app.slots[slot_index];
        let uptime = worker.started.elapsed();
        if worker.state == WorkerState::Stopping(StopReason::Shutdown) {
            info!(app = %name, slot = slot_index, pid = worker.pid, "worker stopped ({how})");
            return;
        }
        slot.last_exit = Some(how.clone());
        match after_exit(
            shutting_down,
            &self.backoff,
            &mut slot.failures,
            uptime,
            worker.was_ready,
        ) {
            AfterExit::Forget => {
                info!(app = %name, slot = slot_index, pid = worker.pid, "worker {how}")
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
                let events = self.events.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _supervisor_gone = events.send(Event::RestartDue {
                        app: app_index,
                        slot: slot_index,
                    });
                });
            }
        }
    }

    fn begin_shutdown(&mut self, reply: Option<oneshot::Sender<()>>) {
        let first = self.stopping.is_none();
        self.stopping.get_or_insert_with(Vec::new).extend(reply);
        if !first {
            return;
        }
        info!(workers = self.worker_count(), "stopping all workers");
        for app in 0..self.apps.len() {
            for slot in 0..self.apps[app].slots.len() {
                if self.apps[app].slots[slot].worker.is_some() {
                    self.stop(app, slot, StopReason::Shutdown);
                }
            }
        }
    }

    /// Spawns a worker into an empty slot, with its exit watcher, output pumps and probe.
    fn start(&mut self, app_index: usize, slot_index: usize) {
        let taken: HashSet<u16> = self.workers().filter_map(|w| w.port).collect();
        let app = &self.apps[app_index];
        let config = &app.config;
        let port = match app
            .balancer
            .is_some()
            .then(|| spawn::free_port(&taken))
            .transpose()
        {
            Ok(port) => port,
            Err(e) => return self.start_failed(app_index, slot_index, e.to_string()),
        };
        let mut child = match spawn::spawn(config, slot_index, port) {
            Ok(child) => child,
            Err(e) => return self.start_failed(app_index, slot_index, e.to_string()),
        };
        let Some(pid) = child.id() else {
            return self.start_failed(app_index, slot_index, "the process exited at once".into());
        };
        let id = self.next_id;
        self.next_id += 1;
        let output = Arc::new(OutputTail::default());
        let prefix = format!("{}.{slot_index}", config.name);
        for (pipe, stream) in [
            (
                child
                    .stdout
                    .take()
                    .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
                Stream::Stdout,
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
                Stream::Stderr,
            ),
        ] {
            if let Some(pipe) = pipe {
                tokio::spawn(self.output.clone().pump(
                    pipe,
                    stream,
                    prefix.clone(),
                    Arc::clone(&output),
                ));
            }
        }
        let events = self.events.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _supervisor_gone = events.send(Event::Exited { id, status });
        });
        let probe = CancellationToken::new();
        match port {
            Some(port) => {
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                tokio::spawn(probe_port(
                    id,
                    addr,
                    config.listen_timeout,
                    probe.clone(),
                    self.events.clone(),
                ));
            }
            None => {
                let _supervisor_gone = self.events.send(Event::Ready { id });
            }
        }
        debug!(app = %config.name, slot = slot_index, pid, ?port, "worker spawned");
        self.apps[app_index].slots[slot_index].worker = Some(Worker {
            id,
            pid,
            port,
            state: WorkerState::Starting,
            started: Instant::now(),
            was_ready: false,
            stats: Arc::new(WorkerStats::default()),
            output,
            probe,
            upstream: None,
        });
    }

    /// A worker could not even be spawned: report, and retry with the same backoff as a crash.
    fn start_failed(&mut self, app_index: usize, slot_index: usize, reason: String) {
        let app = &mut self.apps[app_index];
        let slot = &mut app.slots[slot_index];
        slot.failures = slot.failures.saturating_add(1);
        slot.restarts += 1;
        let delay = self.backoff.delay(slot.failures);
        error!(app = %app.config.name, slot = slot_index, "cannot start worker: {reason}; retrying in {delay:?}");
        slot.last_exit = Some(reason);
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _supervisor_gone = events.send(Event::RestartDue {
                app: app_index,
                slot: slot_index,
            });
        });
    }

    /// Takes a worker out of rotation and asks it to stop; SIGKILL follows at `kill_timeout`.
    fn stop(&mut self, app_index: usize, slot_index: usize, reason: StopReason) {
        let config = &self.apps[app_index].config;
        let (signal, timeout) = (config.kill_signal, config.kill_timeout);
        let worker = self.worker_mut(app_index, slot_index);
        if matches!(worker.state, WorkerState::Stopping(_)) {
            worker.state = WorkerState::Stopping(reason);
            return;
        }
        worker.state = WorkerState::Stopping(reason);
        worker.probe.cancel();
        let had_upstream = worker.upstream.take().is_some();
        let (id, pid) = (worker.id, worker.pid);
        debug!(pid, %signal, "stopping worker");
        kill_group(pid, signal);
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let _supervisor_gone = events.send(Event::KillDeadline { id });
        });
        if had_upstream {
            self.publish(app_index);
        }
    }

    /// Publishes the app's ready workers as its new pool.
    fn publish(&self, app_index: usize) {
        let app = &self.apps[app_index];
        if let Some(balancer) = &app.balancer {
            let members = app
                .slots
                .iter()
                .filter_map(|s| s.worker.as_ref())
                .filter(|w| w.state == WorkerState::Ready)
                .filter_map(|w| w.upstream.clone())
                .collect();
            balancer.publish(Pool::new(members));
        }
    }

    fn status(&self) -> Status {
        let apps = self
            .apps
            .iter()
            .map(|app| {
                let workers: Vec<WorkerStatus> = app
                    .slots
                    .iter()
                    .enumerate()
                    .map(|(slot_index, slot)| {
                        let w = slot.worker.as_ref();
                        WorkerStatus {
                            app: app.config.name.clone(),
                            slot: slot_index,
                            id: w.map(|w| w.id),
                            pid: w.map(|w| w.pid),
                            port: w.and_then(|w| w.port),
                            state: w.map_or("waiting", |w| w.state.label()).to_owned(),
                            uptime_ms: w.map_or(0, |w| w.started.elapsed().as_millis() as u64),
                            restarts: slot.restarts,
                            requests: w.map_or(0, |w| w.stats.requests()),
                            in_flight: w.map_or(0, |w| w.stats.in_flight()),
                            memory_bytes: w.and_then(|w| status::rss_bytes(w.pid)),
                            last_exit: slot.last_exit.clone(),
                        }
                    })
                    .collect();
                AppStatus {
                    name: app.config.name.clone(),
                    listen: app.config.listen.map(|a| a.to_string()),
                    instances: app.instances,
                    ready: workers.iter().filter(|w| w.state == "online").count(),
                    workers,
                }
            })
            .collect();
        Status {
            pid: std::process::id(),
            config: self.config_path.clone(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            stopping: self.stopping.is_some(),
            apps,
        }
    }

    fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.apps
            .iter()
            .flat_map(|a| a.slots.iter())
            .filter_map(|s| s.worker.as_ref())
    }

    fn worker_count(&self) -> usize {
        self.workers().count()
    }

    fn find(&self, id: u64) -> Option<(usize, usize)> {
        self.apps.iter().enumerate().find_map(|(a, app)| {
            app.slots
                .iter()
                .position(|s| s.worker.as_ref().is_some_and(|w| w.id == id))
                .map(|s| (a, s))
        })
    }

    fn worker_mut(&mut self, app: usize, slot: usize) -> &mut Worker {
        self.apps[app].slots[slot]
            .worker
            .as_mut()
            .expect("UNWRAP: callers locate the worker with find() first")
    }
}

fn kill_group(pid: u32, signal: Signal) {
    if let Err(e) = spawn::signal_group(pid, signal) {
        warn!(pid, %signal, error = %e, "cannot signal worker process group");
    }
}

/// Reports `Ready` once `addr` accepts a connection, or `NeverReady` at the deadline.
async fn probe_port(
    id: u64,
    addr: SocketAddr,
    timeout: Duration,
    cancel: CancellationToken,
    events: mpsc::UnboundedSender<Event>,
) {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        let attempt = tokio::time::timeout_at(deadline, tokio::net::TcpStream::connect(addr));
        tokio::select! {
            _ = cancel.cancelled() => return,
            result = attempt => if let Ok(Ok(_connection)) = result {
                let _supervisor_gone = events.send(Event::Ready { id });
                return;
            },
        }
        if Instant::now() >= deadline {
            let _supervisor_gone = events.send(Event::NeverReady { id });
            return;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until((Instant::now() + pause).min(deadline)) => {}
        }
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}
