//! The front process: wires the parts together and runs the stop sequence.
//!
//! Start: raise the file-descriptor limit ([`crate::limits`]), start the proxy's shard threads,
//! bind every public socket (so a taken address fails before any worker starts), bind the
//! control socket (after checking the runtime directory, see [`crate::control::runtime_dir`];
//! so a second `corral run` of the same config is refused), start the supervisor on this
//! thread's runtime, then one accept loop per proxied app and shard, on that shard. Each accept
//! loop waits for its app's first ready worker before accepting (up to `listen_timeout`), so
//! clients that connect during boot queue in the kernel's backlog instead of getting 503s.
//!
//! Taking over ([`crate::upgrade`]): the sockets, control socket, cookie key and ticket keys
//! come from the corral that started this process instead of being made; the leftover cleanup
//! is skipped (the state file is one of this process's own); and the accept loops, the control
//! socket, the admin listener and `READY=1` all wait for the switch. A process that handed over
//! runs the stop sequence below without `STOPPING=1` and without removing the control socket.
//!
//! Stop (SIGTERM, SIGINT or `corral stop`): one root [`CancellationToken`] is cancelled; the
//! accept loops stop accepting, close their sockets and drain their open connections (in-flight
//! requests finish, bounded by `drain_timeout`); then the supervisor stops the workers
//! (`kill_signal`, `kill_timeout`, SIGKILL) and reaps them; then the process exits 0. A second
//! SIGTERM/SIGINT during that sequence SIGKILLs the workers and exits at once.

mod fronts;

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::admin::events::{Draft, Events, Kind};
use crate::admin::Admin;
use crate::balancer::Balancer;
use crate::config::Config;
use crate::control::Request;
use crate::control::{ControlError, ControlSocket};
use crate::listener::{self, ListenError};
use crate::logs::access::AccessLogs;
use crate::logs::OutputSink;
use crate::metrics::Registry;
use crate::shards::Shards;
use crate::signals::{Intent, Signals};
use crate::supervisor::{Handle, Supervisor};
use crate::tls::{CertError, CertStore, Challenges, Tickets};
use crate::upgrade::{Inherited, Upgrader};

/// Why `corral run` could not start or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A public address could not be bound.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// The control socket could not be set up (or another instance runs).
    #[error(transparent)]
    Control(#[from] ControlError),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// The proxy's threads could not be started.
    #[error("cannot start the proxy threads: {0}")]
    Shards(std::io::Error),
    /// The admin listener could not start.
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    /// An app's certificate could not be loaded.
    #[error("app {0:?}: tls.{1}")]
    Tls(String, CertError),
    /// The system gave no randomness for the TLS ticket keys.
    #[error("cannot make TLS session ticket keys: the system has no randomness to give")]
    Random,
    /// The access log's writer thread could not be started.
    #[error("cannot start the access log writer: {0}")]
    AccessLog(std::io::Error),
    /// A second stop signal arrived; workers were killed without waiting.
    #[error("stopped by a second {0}: workers were killed without draining")]
    Forced(&'static str),
    /// This process was started to take over from a running corral and gave up (the running
    /// one serves on; it reports why).
    #[error("the upgrade was abandoned: the running corral serves on")]
    UpgradeAbandoned,
}

/// Runs `config` until stopped; with `inherited`, takes over from the corral that started this
/// process ([`crate::upgrade`]).
pub async fn run(config: Config, mut inherited: Option<Inherited>) -> Result<(), RunError> {
    // Before any worker exists, so that every orphan of theirs comes to corral.
    crate::reaper::become_subreaper();
    crate::limits::raise();
    let mut signals = Signals::install().map_err(RunError::Signals)?;

    crate::proxy::request_id::init();
    let shards = Shards::start(crate::config::usable_cpus()).map_err(RunError::Shards)?;
    for warning in &config.warnings {
        warn!("{}:{}: {}", config.path.display(), warning.line, warning.message);
    }
    // One front per public address: the apps that share it (several when they name `hosts`).
    // A socket the previous corral handed over is served as it is; others are bound here.
    let open = |addr: std::net::SocketAddr, handed: Option<Vec<std::net::TcpListener>>| match handed {
        Some(handed) => listener::adopt(handed, shards.len()),
        None => listener::bind(addr, shards.len()),
    };
    let addresses = group_by(&config, |app| app.listen);
    let sockets = addresses
        .iter()
        .map(|(addr, _)| open(*addr, inherited.as_mut().and_then(|i| i.public(*addr))))
        .collect::<Result<Vec<_>, _>>()?;
    let redirects = group_by(&config, |app| app.http_redirect);
    let redirect_sockets = redirects
        .iter()
        .map(|(addr, _)| open(*addr, inherited.as_mut().and_then(|i| i.redirect(*addr))))
        .collect::<Result<Vec<_>, _>>()?;
    // Certificates are loaded before anything starts: a file that broke since `check` fails
    // the start with its name.
    let mut certs: Vec<Option<Arc<CertStore>>> = Vec::new();
    for app in &config.apps {
        certs.push(match &app.tls {
            Some(tls) => Some(CertStore::load(tls).map_err(|e| RunError::Tls(app.name.clone(), e))?),
            None => None,
        });
    }
    // The meters: one per app and shard for the request path, summed at scrape time.
    let tls_addresses: Vec<std::net::SocketAddr> = addresses
        .iter()
        .filter(|(_, apps)| config.apps[apps[0]].tls.is_some())
        .map(|(addr, _)| *addr)
        .collect();
    let metrics = Arc::new(Registry::new(
        config.apps.iter().map(|a| (a.name.as_str(), a.listen.is_some())),
        &tls_addresses,
        shards.len(),
    ));
    let access_logs = AccessLogs::start(&config, &metrics).map_err(RunError::AccessLog)?;
    let mut control = match inherited.as_mut().and_then(Inherited::control) {
        Some(listener) => ControlSocket::adopt(&config.path, listener)?,
        None => ControlSocket::bind(&config.path).await?,
    };
    info!(config = %config.path.display(), control = %control.path().display(), pid = std::process::id(), "corral starting");

    let balancers: Vec<Option<Arc<Balancer>>> = config.apps.iter().map(|a| a.listen.map(|_| Arc::default())).collect();
    // The control socket is ours, so no live instance runs this config: whatever its state
    // files still list was left behind by a killed front process. A process taking over
    // leaves the running one's workers alone and keeps a state file of its own.
    let (state_file, leftovers) = match &inherited {
        Some(_) => (crate::leftovers::generation_path(control.path(), std::process::id()), 0),
        None => (
            crate::leftovers::path_for(control.path()),
            crate::leftovers::clean_all(control.path()),
        ),
    };
    let events = Arc::new(Events::default());
    if leftovers > 0 {
        events.emit(Draft::global(Kind::LeftoversStopped).message(format!(
            "{leftovers} process(es) left by a killed earlier run were stopped"
        )));
    }
    let (supervisor, handle) = Supervisor::new(&config, balancers.clone(), OutputSink::start());
    let supervisor = supervisor
        .with_state_file(state_file.clone())
        .with_certs(certs.clone())
        .with_events(Arc::clone(&events))
        .with_leftovers(leftovers)
        .with_metrics(Arc::clone(&metrics))
        .with_access_logs(access_logs.as_ref().map(AccessLogs::emptier));

    let shutdown = CancellationToken::new();
    // The admin listener stops with the stop sequence's end, so `/readyz` says "stopping"
    // while connections drain (or at the switch, after handing over).
    let admin_stop = CancellationToken::new();
    let tickets = match &inherited {
        Some(handed) => Tickets::with_keys(handed.ticket_keys()),
        None => Tickets::new(),
    }
    .ok_or(RunError::Random)?;
    if let Some(handed) = &inherited {
        crate::balancer::sticky::adopt_process_key(handed.sticky_key());
    }
    let upgrader = Arc::new(Upgrader::new(
        &config.path,
        inherited
            .as_ref()
            .map_or_else(crate::upgrade::own_binary, Inherited::binary),
        crate::balancer::sticky::process_key(),
        Arc::clone(&tickets),
        Arc::clone(&events),
        takeover_deadline(&config) + Duration::from_secs(60),
        vec![shutdown.clone(), admin_stop.clone()],
    ));
    if let Some(handed) = &inherited {
        // No upgrade of this one until the previous one has exited.
        upgrader.set_peer(Some(crate::upgrade::Generation {
            pid: handed.old_pid(),
            state: "handing over".into(),
            detail: String::new(),
        }));
    }
    for (socket, (addr, _)) in sockets.iter().zip(&addresses) {
        upgrader.keep_public(*addr, &socket.sockets);
    }
    for (socket, (addr, _)) in redirect_sockets.iter().zip(&redirects) {
        upgrader.keep_redirect(*addr, &socket.sockets);
    }
    upgrader.keep_control(control.listener());
    tokio::spawn(crate::reaper::run(shutdown.child_token()));
    tokio::spawn(Arc::clone(&metrics).sample_every(handle.clone(), shutdown.child_token()));
    let runtime_dir = control
        .path()
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    for app in &config.apps {
        crate::cron_restart::spawn(app, handle.clone(), Arc::clone(&events), shutdown.child_token());
        let own = crate::watch::Own::of(app, &config.path, &runtime_dir);
        if let Err(why) = crate::watch::spawn(app, own, handle.clone(), Arc::clone(&events), shutdown.child_token()) {
            // Serving matters more than watching: the app runs, the log says why nothing is watched.
            error!("{why}");
        }
    }
    if access_logs.is_some() {
        for runtime in shards.handles() {
            runtime.spawn(crate::logs::access::flush_every(shutdown.child_token()));
        }
    }
    // Bound before anything is served, so a taken admin address fails the start.
    let admin = match &config.admin {
        Some(admin) => {
            let bound = Admin::bind(
                admin,
                inherited.as_mut().and_then(|i| i.admin(admin.listen)),
                handle.clone(),
                shutdown.clone(),
                Arc::clone(&events),
                Arc::clone(&metrics),
                Arc::clone(&upgrader),
            )
            .await?;
            upgrader.keep_admin(admin.listen, bound.listener());
            Some(bound)
        }
        None => None,
    };
    // Every socket is claimed by now; what the previous corral had and this config does not
    // name is closed.
    let takeover = match inherited.take().map(Inherited::into_takeover) {
        Some(Ok(takeover)) => Some(takeover),
        Some(Err(e)) => {
            error!(error = %e, "the hand-over channel failed");
            return Err(RunError::UpgradeAbandoned);
        }
        None => None,
    };
    // Cancelled when this process may accept: at once, or after the switch when taking over.
    let released = CancellationToken::new();
    let abandoned = CancellationToken::new();
    let supervisor = tokio::spawn(supervisor.run());
    let challenges = Arc::new(Challenges::default());
    tokio::spawn(Arc::clone(&tickets).rotate_every_period(shutdown.clone()));
    for (app, store) in config.apps.iter().zip(&certs) {
        if let (Some(crate::config::Tls::Acme(acme)), Some(store)) = (&app.tls, store) {
            // On this (the main) runtime, never a shard: it serves from its cache at once and
            // orders or renews in the background, until the stop.
            tokio::spawn(crate::tls::acme::run(
                app.name.clone(),
                acme.clone(),
                Arc::clone(store),
                Arc::clone(&challenges),
                app.http_redirect.is_some(),
                Arc::clone(&events),
                shutdown.child_token(),
            ));
        }
    }
    let balancers_ready: Vec<(Arc<Balancer>, std::time::Duration)> = config
        .apps
        .iter()
        .zip(&balancers)
        .filter_map(|(app, b)| b.as_ref().map(|b| (Arc::clone(b), app.listen_timeout)))
        .collect();
    let mut accept_loops = JoinSet::new();
    let runtimes: Vec<tokio::runtime::Handle> = shards.handles().cloned().collect();
    let serving = fronts::Serving {
        config: &config,
        addresses: &addresses,
        redirects: &redirects,
        balancers: &balancers,
        certs: &certs,
        access_logs: access_logs.as_ref(),
        metrics: &metrics,
        challenges: &challenges,
        tickets: &tickets,
        runtimes: &runtimes,
        shutdown: &shutdown,
        hold: takeover.is_some().then_some(&released),
    };
    serving.spawn(sockets, redirect_sockets, &mut accept_loops);
    match takeover {
        Some(takeover) => {
            let (supervisor, upgrader) = (handle.clone(), Arc::clone(&upgrader));
            let deadline = takeover_deadline(&config);
            tokio::spawn(takeover.run(supervisor, upgrader, deadline, released.clone(), abandoned.clone()));
        }
        None => released.cancel(),
    }
    // One corral answers the control socket at a time: a process taking over starts at the
    // switch (connections meanwhile wait in the socket's backlog).
    let control_task = tokio::spawn({
        let (handle, shutdown, upgrader, released) = (
            handle.clone(),
            shutdown.clone(),
            Arc::clone(&upgrader),
            released.clone(),
        );
        async move {
            released.cancelled().await;
            control.own();
            let handed_over = upgrader.handed_over_token();
            control.serve(handle, shutdown, upgrader, handed_over).await;
        }
    });
    if let Some(admin) = admin {
        let (admin_stop, released) = (admin_stop.clone(), released.clone());
        tokio::spawn(async move {
            released.cancelled().await;
            admin.serve(admin_stop).await;
        });
    }
    // READY=1 once every proxied app accepts connections (or its boot wait is over); after a
    // take-over, with this process's pid as the service's main pid.
    let ready: Vec<_> = balancers_ready.into_iter().collect();
    let go = released.clone();
    tokio::spawn(async move {
        go.cancelled().await;
        for (balancer, boot) in ready {
            if tokio::time::timeout(boot, balancer.wait_ready()).await.is_err() {
                break;
            }
        }
        crate::notify::ready();
    });

    let reason = tokio::select! {
        intent = wait_for_stop(&mut signals, &handle, &shutdown, &upgrader) => intent,
        _ = shutdown.cancelled() => if upgrader.handed_over() { "handed over to the new corral" } else { "corral stop" },
        _ = abandoned.cancelled() => "upgrade abandoned",
    };
    info!("{reason}: stopping gracefully");
    // No new upgrade from now on, and the kept copies of the sockets close.
    upgrader.close();
    if !upgrader.handed_over() && !abandoned.is_cancelled() {
        // After a switch the service runs on in the new process: a STOPPING=1 would stop it.
        crate::notify::stopping();
    }
    shutdown.cancel();

    let graceful = async {
        while let Some(result) = accept_loops.join_next().await {
            if let Err(e) = result {
                error!(error = %e, "accept loop panicked");
            }
        }
        info!("connections drained");
        if let Some(logs) = &access_logs {
            logs.finish(shards.handles()).await;
        }
        if handle.shutdown().await.is_err() {
            error!("the supervisor ended before the stop; workers may need a manual check");
        }
    };
    let outcome = tokio::select! {
        _ = graceful => Ok(()),
        signal = wait_for_stop(&mut signals, &handle, &shutdown, &upgrader) => {
            warn!("{signal} again: killing workers now");
            if handle.kill().await.is_err() {
                error!("the supervisor is gone; cannot kill workers");
            }
            Err(RunError::Forced(signal))
        }
    };
    // An upgrade that a stop interrupted is stopped and answered before this process exits.
    upgrader.finished(Duration::from_secs(40)).await;
    control_task.abort();
    admin_stop.cancel();
    if outcome.is_ok() {
        // Everything stopped cleanly: nothing is left for a next run to clean up.
        if let Err(e) = std::fs::remove_file(&state_file) {
            tracing::debug!(error = %e, "no state file to remove");
        }
    }
    if outcome.is_ok() {
        if let Err(e) = supervisor.await {
            error!(error = %e, "supervisor task failed");
        }
        info!("stopped");
    }
    if abandoned.is_cancelled() {
        return outcome.and(Err(RunError::UpgradeAbandoned));
    }
    outcome
}

/// How long a process taking over waits for its workers before it gives up.
pub fn takeover_deadline(config: &Config) -> Duration {
    let longest = config.apps.iter().map(|a| a.listen_timeout).max().unwrap_or_default();
    longest * 2 + Duration::from_secs(30)
}

/// Waits for SIGTERM or SIGINT; SIGHUP starts a rolling reload and SIGUSR2 an upgrade in the
/// background, as `corral reload` and `corral upgrade` would (progress and outcome go to the
/// log).
async fn wait_for_stop(
    signals: &mut Signals,
    supervisor: &Handle,
    shutdown: &CancellationToken,
    upgrader: &Arc<Upgrader>,
) -> &'static str {
    loop {
        let (name, request) = match signals.next().await {
            Intent::Stop(name) => return name,
            Intent::Reload => ("SIGHUP", Request::Reload { app: None, env: None }),
            Intent::Upgrade => ("SIGUSR2", Request::Upgrade { binary: None }),
        };
        info!(
            "{name}: {}",
            if name == "SIGHUP" { "rolling reload" } else { "upgrade" }
        );
        let (supervisor, shutdown, upgrader) = (supervisor.clone(), shutdown.clone(), Arc::clone(upgrader));
        tokio::spawn(async move {
            // Progress lines are logged where they are made.
            let (progress, _lines) = tokio::sync::mpsc::unbounded_channel();
            match crate::commands::execute(request, &supervisor, &shutdown, &upgrader, progress).await {
                Ok(crate::commands::Answer::Done(summary)) => info!("{name}: {summary}"),
                Ok(_) => {}
                Err(why) => error!("{name}: {why}"),
            }
        });
    }
}

/// The apps' addresses (as `key` gives them), each with the indices of the apps on it, in
/// config order.
fn group_by(
    config: &Config,
    key: impl Fn(&crate::config::AppConfig) -> Option<std::net::SocketAddr>,
) -> Vec<(std::net::SocketAddr, Vec<usize>)> {
    let mut groups: Vec<(std::net::SocketAddr, Vec<usize>)> = Vec::new();
    for (index, app) in config.apps.iter().enumerate() {
        let Some(addr) = key(app) else { continue };
        match groups.iter_mut().find(|(a, _)| *a == addr) {
            Some((_, apps)) => apps.push(index),
            None => groups.push((addr, vec![index])),
        }
    }
    groups
}

/// How long `corral stop` waits for the instance to exit before giving up: the longest
/// drain plus kill deadline of any app, plus a margin.
pub fn stop_deadline(config: &Config) -> Duration {
    config
        .apps
        .iter()
        .map(|a| a.drain_timeout + a.kill_timeout)
        .max()
        .unwrap_or_default()
        + Duration::from_secs(10)
}
