//! Operator commands that change or report the table: `status`, `scale`, `stop APP`; and
//! `flush`, which empties the log files through their writer threads.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::oneshot;
use tracing::info;

use super::status::{self, AppStatus, Status, WorkerStatus};
use super::{CommandError, ErrorCode, Outcome, Scale, Supervisor};
use crate::admin::events::Reason;

impl Supervisor {
    /// Empties the current log files of `name` (of every app for `None`), answering on
    /// `reply` once the writer threads have done it (the actor does not wait for them).
    pub(super) fn flush(&mut self, name: Option<String>, reply: oneshot::Sender<Outcome>) {
        let apps: Vec<usize> = match &name {
            Some(name) => match self.app_named(name) {
                Ok(app) => vec![app],
                Err(e) => {
                    let _client_gone = reply.send(Err(e));
                    return;
                }
            },
            None => (0..self.apps.len()).collect(),
        };
        let mut paths: Vec<PathBuf> = Vec::new();
        for &index in &apps {
            let app = &self.apps[index];
            // The app's files for every slot it has, and those its running workers write
            // (after a reload that moved them, old workers may still write the old ones).
            let specs = std::iter::once((&app.config, None)).chain(app.workers.iter().map(|w| (&w.spec, Some(w.slot))));
            for (spec, slot) in specs {
                let slots: Vec<usize> = match slot {
                    Some(slot) => vec![slot],
                    None => (0..app.instances.max(app.slots.len())).collect(),
                };
                for file in [&spec.logs.out_file, &spec.logs.error_file].into_iter().flatten() {
                    for &slot in &slots {
                        let path = crate::logs::files::slot_path(file, slot, spec.logs.merge_logs);
                        if !paths.contains(&path) {
                            paths.push(path);
                        }
                    }
                }
            }
        }
        let output = self.output.clone();
        let access = self.access_logs.clone();
        tokio::spawn(async move {
            let mut emptied = output.flush(paths).await.unwrap_or(0);
            if let Some(access) = access {
                emptied += access.empty(name.as_deref()).await;
            }
            let whose = name.map_or_else(|| "every app".to_owned(), |n| format!("app {n:?}"));
            info!(files = emptied, "log files of {whose} flushed on request");
            let _client_gone = reply.send(Ok(format!(
                "flushed {emptied} log file{} of {whose}",
                if emptied == 1 { "" } else { "s" }
            )));
        });
    }

    pub(super) fn stop_app(&mut self, name: &str) -> Outcome {
        if self.reload.is_some() {
            return Err(CommandError::new(
                ErrorCode::Busy,
                "a reload is running; stop the app when it has finished",
            ));
        }
        let app = self.app_named(name)?;
        for slot in &mut self.apps[app].slots {
            slot.parked = Some("stopped");
        }
        let live = self.drain_where(app, Reason::Stop, |_| true);
        self.publish(app);
        info!(app = %name, workers = live.len(), "app stopped on request");
        Ok(format!(
            "{name}: stopping {} worker(s) after their in-flight requests; `corral reload {name}` starts them again",
            live.len()
        ))
    }

    pub(super) fn start_app(&mut self, name: &str) -> Outcome {
        if self.stopping.is_some() {
            return Err(CommandError::new(ErrorCode::Stopping, "corral is stopping"));
        }
        if self.reload.is_some() {
            return Err(CommandError::new(
                ErrorCode::Busy,
                "a reload is running; start the app when it has finished",
            ));
        }
        let app = self.app_named(name)?;
        let config = Arc::clone(&self.apps[app].config);
        let generation = self.apps[app].generation;
        let mut started = 0;
        for slot in 0..self.apps[app].instances {
            self.apps[app].slots[slot].parked = None;
            if !self.apps[app].workers.iter().any(|w| w.slot == slot && w.is_live()) {
                self.start(app, slot, Arc::clone(&config), generation);
                started += 1;
            }
        }
        info!(app = %name, started, "app started on request");
        Ok(if started == 0 {
            format!("{name}: every worker is already running")
        } else {
            format!("{name}: starting {started} worker(s); they enter rotation when ready")
        })
    }

    pub(super) fn scale(&mut self, name: &str, change: Scale) -> Outcome {
        if self.stopping.is_some() {
            return Err(CommandError::new(ErrorCode::Stopping, "corral is stopping"));
        }
        if self.reload.is_some() {
            return Err(CommandError::new(
                ErrorCode::Busy,
                "a reload is running; scale again when it has finished",
            ));
        }
        let app = self.app_named(name)?;
        let from = self.apps[app].instances;
        let to = match change {
            Scale::To(n) => n,
            Scale::Up(n) => from.saturating_add(n),
            Scale::Down(n) => from.saturating_sub(n).max(1),
        };
        if to > 1024 {
            return Err(CommandError::new(
                ErrorCode::BadRequest,
                format!("{to} workers is more than the limit of 1024"),
            ));
        }
        let state = &mut self.apps[app];
        state.instances = to;
        if state.slots.len() < to {
            state.slots.resize_with(to, Default::default);
        }
        info!(app = %name, from, to, "scaling");
        let config = Arc::clone(&state.config);
        let generation = state.generation;
        for slot in from..to {
            self.apps[app].slots[slot].parked = None;
            if !self.apps[app].workers.iter().any(|w| w.slot == slot && w.is_live()) {
                self.start(app, slot, Arc::clone(&config), generation);
            }
        }
        let removed = self.drain_where(app, Reason::Scale, |w| w.slot >= to);
        self.publish(app);
        Ok(match to.cmp(&from) {
            std::cmp::Ordering::Greater => {
                format!("{name}: scaling from {from} to {to} workers; the new ones enter rotation when ready")
            }
            std::cmp::Ordering::Less => format!(
                "{name}: scaling from {from} to {to} workers; {} drain, then stop",
                removed.len()
            ),
            std::cmp::Ordering::Equal => format!("{name}: already {to} workers"),
        })
    }

    pub(super) fn status(&self) -> Status {
        let apps = self
            .apps
            .iter()
            .enumerate()
            .map(|(index, app)| {
                let mut workers: Vec<WorkerStatus> = app
                    .workers
                    .iter()
                    .map(|w| {
                        let slot = app.slots.get(w.slot);
                        WorkerStatus {
                            app: app.config.name.clone(),
                            slot: w.slot,
                            id: Some(w.id),
                            generation: Some(w.generation),
                            pid: Some(w.pid),
                            port: w.port,
                            state: w.label().to_owned(),
                            uptime_ms: w.started.elapsed().as_millis() as u64,
                            restarts: slot.map_or(0, |s| s.restarts),
                            requests: w.stats.requests(),
                            in_flight: w.stats.in_flight(),
                            memory_bytes: w.usage.map(|u| u.0.rss).or_else(|| status::rss_bytes(w.pid)),
                            cpu_percent: w.usage.and_then(|u| u.2),
                            last_exit: slot.and_then(|s| s.last_exit.clone()),
                        }
                    })
                    .collect();
                for (index, slot) in app.slots.iter().enumerate().take(app.instances) {
                    if !app.workers.iter().any(|w| w.slot == index && w.is_live()) {
                        workers.push(WorkerStatus {
                            app: app.config.name.clone(),
                            slot: index,
                            id: None,
                            generation: None,
                            pid: None,
                            port: None,
                            state: slot.parked.unwrap_or("waiting").into(),
                            uptime_ms: 0,
                            restarts: slot.restarts,
                            requests: 0,
                            in_flight: 0,
                            memory_bytes: None,
                            cpu_percent: None,
                            last_exit: slot.last_exit.clone(),
                        });
                    }
                }
                workers.sort_by_key(|w| (w.slot, w.generation, w.id));
                let recent = self.metrics.as_ref().map(|m| m.recent(index)).unwrap_or_default();
                AppStatus {
                    name: app.config.name.clone(),
                    listen: app.config.listen.map(|a| a.to_string()),
                    instances: app.instances,
                    ready: workers.iter().filter(|w| w.state == "online").count(),
                    tls: app.certs.as_ref().map(|c| c.status()),
                    workers,
                    req_per_sec: recent.req_per_sec,
                    p99_ms: recent.p99_ms,
                    restarts_by_reason: app.counts.restarts(),
                    reloads: app.counts.reloads(),
                }
            })
            .collect();
        Status {
            pid: std::process::id(),
            config: self.config_path.display().to_string(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            stopping: self.stopping.is_some(),
            reloading: self.reload.is_some(),
            last_reload: self.last_reload.clone(),
            apps,
            leftovers_stopped: self.leftovers,
            env: self.env_name.clone(),
            upgrade: None,
        }
    }
}
