//! Lifecycle events: one broadcast of what the supervisor does, kept for late listeners.
//!
//! The supervisor [`Events::emit`]s an [`Event`] at each phase of a worker's life and of a
//! reload; each gets the next id and the time, goes to corral's log, into a ring of the last
//! [`KEPT`], and to every open `GET /api/events` stream as Server-Sent Events:
//!
//! ```text
//! id: 42
//! event: worker_exited
//! data: {"id":42,"time":"2026-12-02T07:50:01.123Z","app":"web","slot":1,"pid":4711,"reason":"crash","message":"exit code 1"}
//! ```
//!
//! A client that reconnects with `Last-Event-ID` first gets every kept event after that id,
//! then the live ones; one that falls more than [`BUFFER`] events behind is disconnected, and
//! resumes from the ring when it reconnects, as browsers' `EventSource` does by itself.
//!
//! Event names ([`Kind`]): `worker_spawned`, `worker_ready`, `worker_exited`, `worker_restarting`,
//! `worker_unhealthy`, `worker_drained`, `reload_started`, `reload_progress`, `reload_done`,
//! `reload_failed`, `leftovers_stopped`. Reasons of `worker_exited` and `worker_drained`
//! ([`Reason`]): `crash` (it exited by itself), `memory` (over `max_memory_restart`), `health`
//! (failed health checks or never ready), `reload`, `scale`, `stop` (an app or corral stopped).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::AdminBody;

/// Events kept for clients that reconnect.
pub const KEPT: usize = 1000;
/// Events a slow stream may fall behind before it is disconnected.
pub const BUFFER: usize = 256;
/// A comment line this often keeps idle streams open through proxies.
const HEARTBEAT: Duration = Duration::from_secs(15);

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A worker process was started.
    WorkerSpawned,
    /// A worker entered rotation.
    WorkerReady,
    /// A worker process ended.
    WorkerExited,
    /// A slot will be restarted after a backoff.
    WorkerRestarting,
    /// A worker failed its health checks and left rotation.
    WorkerUnhealthy,
    /// A worker finished its in-flight requests after leaving rotation.
    WorkerDrained,
    /// A reload (or restart) began.
    ReloadStarted,
    /// A step of a reload.
    ReloadProgress,
    /// A reload replaced every worker it meant to.
    ReloadDone,
    /// A reload was refused or rolled back.
    ReloadFailed,
    /// Processes left by a killed earlier run were found and stopped.
    LeftoversStopped,
    /// ACME issued or renewed an app's certificate, now served to new handshakes.
    CertificateRenewed,
    /// A reload re-read an app's certificate files, now served to new handshakes.
    CertificateReloaded,
    /// Files under `watch` changed and the app was restarted (rolling).
    WatchRestart,
    /// `cron_restart` fired and the app was restarted (rolling).
    CronRestart,
    /// A self-upgrade began: a new corral process starts.
    UpgradeStarted,
    /// The new corral process took over; this one drains and exits.
    UpgradeDone,
    /// The new corral process failed; this one serves on.
    UpgradeFailed,
}

impl Kind {
    /// The SSE `event:` name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::WorkerSpawned => "worker_spawned",
            Kind::WorkerReady => "worker_ready",
            Kind::WorkerExited => "worker_exited",
            Kind::WorkerRestarting => "worker_restarting",
            Kind::WorkerUnhealthy => "worker_unhealthy",
            Kind::WorkerDrained => "worker_drained",
            Kind::ReloadStarted => "reload_started",
            Kind::ReloadProgress => "reload_progress",
            Kind::ReloadDone => "reload_done",
            Kind::ReloadFailed => "reload_failed",
            Kind::LeftoversStopped => "leftovers_stopped",
            Kind::CertificateRenewed => "certificate_renewed",
            Kind::CertificateReloaded => "certificate_reloaded",
            Kind::WatchRestart => "watch_restart",
            Kind::CronRestart => "cron_restart",
            Kind::UpgradeStarted => "upgrade_started",
            Kind::UpgradeDone => "upgrade_done",
            Kind::UpgradeFailed => "upgrade_failed",
        }
    }
}

/// Why a worker left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// It exited by itself.
    Crash,
    /// Its memory passed `max_memory_restart`.
    Memory,
    /// It failed its health checks, or never became ready.
    Health,
    /// A reload or restart replaced it.
    Reload,
    /// A scale-down removed its slot.
    Scale,
    /// Its app, or corral, was stopped.
    Stop,
}

impl Reason {
    /// The name, as in the events' JSON and the restart metric's label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Crash => "crash",
            Reason::Memory => "memory",
            Reason::Health => "health",
            Reason::Reload => "reload",
            Reason::Scale => "scale",
            Reason::Stop => "stop",
        }
    }
}

/// One event, as it is logged and sent.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Its number: increasing, unique in this run.
    pub id: u64,
    /// What happened.
    #[serde(skip)]
    pub kind: Kind,
    /// When, RFC 3339 UTC.
    pub time: String,
    /// The app, if it is about one.
    pub app: Option<String>,
    /// The slot, if it is about a worker.
    pub slot: Option<usize>,
    /// The worker's pid.
    pub pid: Option<u32>,
    /// Why, for exits and drains.
    pub reason: Option<Reason>,
    /// Details in words (an exit status, a reload step).
    pub message: Option<String>,
}

/// An event before it has an id and a time.
#[derive(Debug, Clone)]
pub struct Draft {
    kind: Kind,
    app: Option<String>,
    slot: Option<usize>,
    pid: Option<u32>,
    reason: Option<Reason>,
    message: Option<String>,
}

impl Draft {
    /// An event of `kind` about `app`.
    pub fn new(kind: Kind, app: &str) -> Draft {
        Draft {
            kind,
            app: Some(app.to_owned()),
            slot: None,
            pid: None,
            reason: None,
            message: None,
        }
    }

    /// An event about corral itself (a reload of several apps, leftovers).
    pub fn global(kind: Kind) -> Draft {
        Draft {
            kind,
            app: None,
            slot: None,
            pid: None,
            reason: None,
            message: None,
        }
    }

    /// About this worker.
    pub fn worker(mut self, slot: usize, pid: Option<u32>) -> Draft {
        self.slot = Some(slot);
        self.pid = pid;
        self
    }

    /// With this reason.
    pub fn reason(mut self, reason: Reason) -> Draft {
        self.reason = Some(reason);
        self
    }

    /// With these words.
    pub fn message(mut self, message: impl Into<String>) -> Draft {
        self.message = Some(message.into());
        self
    }
}

/// The broadcast and its ring.
#[derive(Debug)]
pub struct Events {
    kept: Mutex<(u64, VecDeque<Arc<Event>>)>,
    live: broadcast::Sender<Arc<Event>>,
}

impl Default for Events {
    fn default() -> Events {
        Events {
            kept: Mutex::new((0, VecDeque::with_capacity(KEPT))),
            live: broadcast::channel(BUFFER).0,
        }
    }
}

impl Events {
    /// Numbers, logs, keeps and broadcasts `draft`.
    pub fn emit(&self, draft: Draft) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.0 += 1;
        let event = Arc::new(Event {
            id: kept.0,
            kind: draft.kind,
            time: crate::logs::files::timestamp("YYYY-MM-DDTHH:mm:ss.SSSZ", SystemTime::now()).replace("+00:00", "Z"),
            app: draft.app,
            slot: draft.slot,
            pid: draft.pid,
            reason: draft.reason,
            message: draft.message,
        });
        info!(
            event = %event.kind.name(),
            id = event.id,
            app = %event.app.as_deref().unwrap_or("-"),
            slot = ?event.slot,
            pid = ?event.pid,
            reason = ?event.reason,
            "{}",
            event.message.as_deref().unwrap_or("")
        );
        if kept.1.len() == KEPT {
            kept.1.pop_front();
        }
        kept.1.push_back(Arc::clone(&event));
        // Sent under the lock, so a new stream's replay and its live part never overlap.
        let _nobody_listens = self.live.send(event);
    }

    /// The kept events after `after` (all of them for `None`).
    pub fn since(&self, after: Option<u64>) -> Vec<Arc<Event>> {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.1
            .iter()
            .filter(|e| after.is_none_or(|id| e.id > id))
            .cloned()
            .collect()
    }

    /// `GET /api/events`: the kept events after `last` (the client's `Last-Event-ID`; none:
    /// only live ones), then the live ones, until the client goes or corral stops.
    pub fn stream(&self, last: Option<u64>, stop: CancellationToken) -> Response<AdminBody> {
        let (replay, mut live) = {
            let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
            let replay: Vec<Arc<Event>> = match last {
                Some(id) => kept.1.iter().filter(|e| e.id > id).cloned().collect(),
                None => Vec::new(),
            };
            (replay, self.live.subscribe())
        };
        let (tx, rx) = mpsc::channel::<Bytes>(BUFFER);
        tokio::spawn(async move {
            // Tell EventSource how soon to come back if the stream ends.
            if tx.send(Bytes::from_static(b"retry: 2000\n\n")).await.is_err() {
                return;
            }
            for event in replay {
                if tx.send(frame(&event)).await.is_err() {
                    return;
                }
            }
            let mut beat = tokio::time::interval(HEARTBEAT);
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tx.closed() => return,
                    _ = beat.tick() => Bytes::from_static(b": keep-alive\n\n"),
                    event = live.recv() => match event {
                        Ok(event) => frame(&event),
                        // Too far behind: end the stream; the client resumes from the ring.
                        Err(_) => return,
                    },
                };
                if tx.send(next).await.is_err() {
                    return;
                }
            }
        });
        let mut response = Response::new(AdminBody::Stream(rx));
        *response.status_mut() = StatusCode::OK;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        response
    }
}

/// One event as an SSE frame.
fn frame(event: &Event) -> Bytes {
    let data = serde_json::to_string(event).unwrap_or_else(|_| "{}".into());
    Bytes::from(format!(
        "id: {}\nevent: {}\ndata: {data}\n\n",
        event.id,
        event.kind.name()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_numbered_kept_up_to_the_limit_and_framed_for_sse() {
        let events = Events::default();
        for slot in 0..KEPT + 5 {
            events.emit(Draft::new(Kind::WorkerReady, "web").worker(slot, Some(100)));
        }
        let all = events.since(None);
        assert_eq!(all.len(), KEPT);
        assert_eq!(all[0].id, 6);
        assert_eq!(events.since(Some(KEPT as u64 + 3)).len(), 2);
        let text = String::from_utf8(frame(&all[0]).to_vec()).expect("utf-8");
        assert!(text.starts_with("id: 6\nevent: worker_ready\ndata: {"), "{text}");
        assert!(
            text.contains("\"app\":\"web\"") && text.contains("\"slot\":5") && text.ends_with("}\n\n"),
            "{text}"
        );
    }
}
