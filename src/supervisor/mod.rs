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
//! The actor's methods are split by concern: this file has the table, the event loop and the
//! small helpers every part uses (`find`, `after`, `publish`); `handle` the public way in
//! ([`Handle`], [`Command`], [`Scale`]); `launch` spawning a worker and starting a slot;
//! `lifecycle` what follows from a worker's events (ready, never ready, drained, exited);
//! `drain` stops, drains and the shutdown; `reload` the rolling reload (and the slots a
//! reload that stopped partway left on an older generation); `health` passive and
//! active health checks, the memory cap and replacements; `admin` `status`, `scale`,
//! `stop APP` and `flush`; `probe` the readiness checks; `policy` the restart decisions; `spawn` the
//! process-level work.

mod admin;
mod drain;
mod handle;
mod health;
mod launch;
mod lifecycle;
mod policy;
mod probe;
mod reload;
mod reread;
mod spawn;
pub mod status;
mod worker;

pub use handle::{Command, CommandError, ErrorCode, Handle, Outcome, Scale, SupervisorGone};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::balancer::{Balancer, Pool, Routing};
use crate::config::{AppConfig, Config};
use crate::logs::OutputSink;
use drain::kill_group;
use policy::History;
use reload::ReloadRun;
use status::ReloadOutcome;
use worker::Worker;

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
    /// Its certificates, with `[app.tls]`: re-read on reload, shown by status.
    certs: Option<Arc<crate::tls::CertStore>>,
    /// Its workers' recent output (`GET /api/logs`).
    recent: Arc<crate::logs::recent::Recent>,
    slots: Vec<Slot>,
    workers: Vec<Worker>,
    announced: bool,
    /// Restarts by reason and reloads by result, for status and metrics.
    counts: status::Counts,
}

#[derive(Default)]
struct Slot {
    restarts: u32,
    history: History,
    /// Left empty on purpose: `Some("stopped")` or `Some("errored")`, until the next reload.
    parked: Option<&'static str>,
    last_exit: Option<String>,
    /// Set when a reload with `reload_keep_old = false` stopped before reaching this slot: the
    /// older config it runs, restarted while its command is on disk (see `reload::lagging`).
    lagging: Option<reload::Lagging>,
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
    /// `[admin]` as it was at start (a reload cannot change it).
    admin: Option<crate::config::AdminConfig>,
    /// The `[app.env_NAME]` in use (`--env NAME`): it stays until a reload names another.
    env_name: Option<String>,
    /// Where lifecycle events go (the log, the admin event stream).
    feed: Arc<crate::admin::events::Events>,
    /// Processes of a killed earlier run stopped at start.
    leftovers: usize,
    /// The proxy's counters, for the last minute's rates in `status`.
    metrics: Option<Arc<crate::metrics::Registry>>,
    /// The access logs' writer, for `corral flush`.
    access_logs: Option<crate::logs::access::Emptier>,
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
                    certs: None,
                    recent: Arc::default(),
                    slots: (0..instances).map(|_| Slot::default()).collect(),
                    workers: Vec::new(),
                    announced: false,
                    counts: status::Counts::default(),
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
            admin: config.admin.clone(),
            env_name: config.env_name.clone(),
            feed: Arc::default(),
            leftovers: 0,
            metrics: None,
            access_logs: None,
        };
        (supervisor, Handle { tx })
    }

    /// Keeps the state file at `path` up to date (pids of the running workers).
    pub fn with_state_file(mut self, path: PathBuf) -> Supervisor {
        self.state_file = Some(path);
        self
    }

    /// Sends lifecycle events to `events` (by default they go to a broadcast nobody hears).
    pub fn with_events(mut self, events: Arc<crate::admin::events::Events>) -> Supervisor {
        self.feed = events;
        self
    }

    /// How many leftovers of a killed earlier run were stopped at start (for status).
    pub fn with_leftovers(mut self, stopped: usize) -> Supervisor {
        self.leftovers = stopped;
        self
    }

    /// Where the output pumps of a worker of `app` in `slot` keep its `stream`'s lines.
    fn keep(&self, app: usize, slot: usize, stream: crate::logs::Stream) -> crate::logs::Keep {
        crate::logs::Keep {
            recent: Arc::clone(&self.apps[app].recent),
            app: Arc::from(self.apps[app].config.name.as_str()),
            slot,
            stream,
        }
    }

    /// The last `lines` lines of `app`'s workers (of every app for `None`), oldest first.
    fn recent_output(
        &self,
        app: Option<&str>,
        lines: usize,
    ) -> Result<Vec<crate::logs::recent::LogLine>, CommandError> {
        if let Some(name) = app {
            return Ok(self.apps[self.app_named(name)?].recent.last(lines));
        }
        let mut all: Vec<_> = self.apps.iter().flat_map(|a| a.recent.last(lines)).collect();
        all.sort_by_key(|l| l.time_ms);
        let skip = all.len().saturating_sub(lines);
        Ok(all.split_off(skip))
    }

    /// Emits a lifecycle event.
    fn emit(&self, draft: crate::admin::events::Draft) {
        self.feed.emit(draft);
    }

    /// Reads the last minute's request rates and p99 from `metrics` for `status`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Registry>) -> Supervisor {
        self.metrics = Some(metrics);
        self
    }

    /// Lets `corral flush` empty the access logs too.
    pub fn with_access_logs(mut self, emptier: Option<crate::logs::access::Emptier>) -> Supervisor {
        self.access_logs = emptier;
        self
    }

    /// The apps' certificate stores (one entry per app, `Some` with `[app.tls]`).
    pub fn with_certs(mut self, certs: Vec<Option<Arc<crate::tls::CertStore>>>) -> Supervisor {
        for (app, store) in self.apps.iter_mut().zip(certs) {
            app.certs = store;
        }
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
            Command::Reload {
                app,
                env,
                reread,
                progress,
                reply,
            } => self.begin_reload(app, env, reread, progress, reply),
            Command::Logs { app, lines, reply } => {
                let _client_gone = reply.send(self.recent_output(app.as_deref(), lines));
            }
            Command::Flush { app, reply } => self.flush(app, reply),
            Command::StartApp { app, reply } => {
                let _client_gone = reply.send(self.start_app(&app));
            }
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
                    let (config, generation) = self.slot_spec(app, slot);
                    self.start(app, slot, config, generation);
                }
            }
        }
    }

    /// The index of the app called `name`.
    fn app_named(&self, name: &str) -> Result<usize, CommandError> {
        self.apps
            .iter()
            .position(|a| a.config.name == name)
            .ok_or_else(|| CommandError::new(ErrorCode::NoSuchApp, format!("there is no app named {name:?}")))
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
