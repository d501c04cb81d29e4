//! Bringing a worker up: the process (through `spawn`), its output pumps and log targets, its
//! exit watcher and readiness probe, and its entry in the table; plus `start`, which retries a
//! failed spawn with the crash backoff. `OUTPUT_DRAIN` moved here too, as only the exit watcher
//! uses it.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

use super::policy::{after_exit, AfterExit, RestartPolicy};
use super::probe::{wait_for_ready_message, Readiness};
use super::spawn;
use super::worker::{Worker, WorkerState};
use super::{Event, Supervisor};
use crate::admin::events::{Draft, Kind};
use crate::balancer::WorkerStats;
use crate::config::AppConfig;
use crate::logs::files;
use crate::logs::{OutputTail, Stream, Target};

/// How long a worker's exit waits for the rest of its output (pipes a grandchild still holds
/// open are not waited for longer).
const OUTPUT_DRAIN: Duration = Duration::from_millis(500);

impl Supervisor {
    /// Spawns a worker for `slot` from `spec`, with its exit watcher, output pumps and probe.
    /// Returns its id, or the reason it could not be started.
    pub(super) fn spawn_worker(
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
        let (port, port_hold) = match proxied.then(|| spawn::free_port(&taken)).transpose() {
            Ok(Some((port, hold))) => (Some(port), Some(hold)),
            Ok(None) => (None, None),
            Err(e) => return Err(e.to_string()),
        };
        let spawn::Spawned { mut child, channel } = spawn::spawn(&spec, slot, port).map_err(|e| e.to_string())?;
        let pid = child.id().ok_or("the process exited at once")?;
        let id = self.next_id;
        self.next_id += 1;
        let output = Arc::new(OutputTail::default());
        let prefix = format!("{}.{slot}", spec.name);
        let mut pumps = Vec::new();
        if let Some(pipe) = child.stdout.take() {
            let keep = self.keep(app_index, slot, Stream::Stdout);
            pumps.push(tokio::spawn(self.output.clone().pump(
                pipe,
                log_target(&spec, slot, Stream::Stdout),
                prefix.clone(),
                Arc::clone(&output),
                keep,
            )));
        }
        if let Some(pipe) = child.stderr.take() {
            let keep = self.keep(app_index, slot, Stream::Stderr);
            pumps.push(tokio::spawn(self.output.clone().pump(
                pipe,
                log_target(&spec, slot, Stream::Stderr),
                prefix,
                Arc::clone(&output),
                keep,
            )));
        }
        let events = self.events.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            crate::reaper::waited_for(pid);
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
        self.emit(
            Draft::new(Kind::WorkerSpawned, &spec.name)
                .worker(slot, Some(pid))
                .message(format!("generation {generation}")),
        );
        if generation == self.apps[app_index].generation {
            // The slot runs the app's current config now: it no longer lags behind a reload.
            if let Some(slot) = self.apps[app_index].slots.get_mut(slot) {
                slot.lagging = None;
            }
        }
        self.apps[app_index].workers.push(Worker {
            id,
            leaving: None,
            slot,
            generation,
            spec,
            pid,
            start_time: crate::leftovers::Proc::of(pid).map_or(0, |p| p.start),
            usage: None,
            port,
            port_hold,
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
    pub(super) fn start(&mut self, app_index: usize, slot_index: usize, spec: Arc<AppConfig>, generation: u64) {
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
                    app.counts.restarted(crate::admin::events::Reason::Crash);
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
            file: Arc::new(config.logs.file(files::slot_path(path, slot, config.logs.merge_logs))),
            date_format: Arc::from(config.logs.date_format.as_str()),
            zone: files::Zone::of(config.logs.utc),
            merged: config.logs.merge_logs,
        },
    }
}
