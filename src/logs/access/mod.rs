//! The access log: one line per response, formatted on the shard, written by a thread of its own.
//!
//! A line is written when the response ends: its body ([`crate::proxy::body::ProxyBody`]) is
//! dropped, which hyper does once the last byte is handed to the socket or the client has gone
//! away, so it shows the bytes actually sent and the whole duration. The shard formats the line
//! into a buffer of its own (a thread-local: no lock, no atomic per request) and hands the buffer
//! to the writer thread in one piece when it reaches [`BATCH`] bytes or its first line is
//! [`FLUSH_EVERY`] old; a task on every shard ([`flush_every`]) sends what an idle shard holds, and
//! the stop sequence flushes every shard before corral exits ([`AccessLogs::finish`]).
//!
//! Never blocking a shard: the hand-over is a `try_send` on a bounded channel. When the writer
//! cannot keep up (a slow or full disk), the batch is dropped, its lines are counted
//! (`corral_access_log_dropped_lines_total`) and a warning says so, at most every
//! [`WARN_EVERY`] per shard; a failed write is counted the same way by the writer. Files are
//! opened, appended and rotated exactly like the worker logs ([`super::files`]: `log_max_size`,
//! `log_rotate_interval`, `log_retain`, `log_compress`), a line never split over two files, and
//! emptied by `corral flush` like them (lines a shard still holds, at most [`FLUSH_EVERY`] old,
//! land after the flush).
//!
//! Times are local with their offset, as nginx's `$time_local` (`[10/Oct/2000:13:55:36 +0530]`,
//! JSON `"2000-10-10T13:55:36.123+05:30"`), or UTC with the app's `log_utc` (`+0000`, JSON
//! `...Z`, as whenever the offset is zero), the same zone as the app's worker logs.
//!
//! Client bytes never shape a line: the method, target, user agent and referer are escaped.
//! In `combined`, as nginx does, every byte below 0x20, 0x7f and above, `"` and `\` becomes
//! `\xHH`; in `json`, strings are JSON-escaped (a value that is not UTF-8 has its bytes above
//! 0x7f shown as the code points U+0080..U+00FF). So no value can end its field, start a new one
//! or split the line.
//!
//! `combined` is nginx's `combined` with three fields added:
//! `CLIENT - - [TIME] "METHOD TARGET PROTOCOL" STATUS BYTES "REFERER" "USER_AGENT" rt=SECONDS
//! slot=SLOT id=REQUEST_ID` (`-` for what is missing; TIME is when the request head arrived).
//! `json` writes `time`, `app`, `client`, `method`, `target`, `protocol`, `status`, `bytes`,
//! `duration_ms`, `slot`, `request_id`, `user_agent`, `referer` (`null` when missing).

mod line;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::warn;

use super::files::{LogFile, Writers, Zone};
use crate::config::{AccessLogFormat, Config};
use crate::metrics::Registry;
pub use line::{escape_combined, escape_json, flush_every, flush_local, Pending};

/// A shard hands its buffer over once it holds this much.
pub const BATCH: usize = 32 * 1024;
/// ... or once its first line is this old.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Batches waiting for the writer; past this, new ones are dropped (and counted).
const QUEUE: usize = 256;
/// At most one warning about lost lines per shard this often.
const WARN_EVERY: Duration = Duration::from_secs(5);
/// How long the stop sequence waits for the writer to write what it was given.
const FINISH_WITHIN: Duration = Duration::from_secs(5);

/// What the shards send the writer thread.
enum Msg {
    /// Whole lines for file number `file`; `count` of them, lost into `drops` if they cannot
    /// be written.
    Batch {
        file: usize,
        lines: Vec<u8>,
        count: u64,
        drops: Arc<AtomicU64>,
    },
    /// Answered once everything sent before it has been written.
    Flushed(mpsc::Sender<()>),
    /// Empty these files (`corral flush`); answered with how many were emptied.
    Empty(Vec<PathBuf>, mpsc::Sender<usize>),
}

/// The access logs of a running corral: the writer thread and one [`AccessLog`] per app that
/// has `access_log`.
#[derive(Debug)]
pub struct AccessLogs {
    tx: SyncSender<Msg>,
    /// Made once at start and kept for the life of the process (see [`line`]).
    logs: Vec<Option<&'static AccessLog>>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

/// One app's access log, as the request path sees it.
#[derive(Debug)]
pub struct AccessLog {
    app: String,
    /// `app` as a JSON string.
    app_json: Vec<u8>,
    format: AccessLogFormat,
    /// Its file's number in the writer thread (apps naming one path share it).
    file: usize,
    /// Its file, for warnings.
    path: PathBuf,
    /// The zone of its times (`log_utc`).
    zone: Zone,
    tx: SyncSender<Msg>,
    /// Lines lost (shared with the metrics).
    drops: Arc<AtomicU64>,
}

impl AccessLogs {
    /// Starts the writer thread for the apps of `config` that have `access_log` (`None` when no
    /// app has one). `metrics` counts their lost lines.
    pub fn start(config: &Config, metrics: &Registry) -> std::io::Result<Option<AccessLogs>> {
        if config.apps.iter().all(|a| a.access_log.is_none()) {
            return Ok(None);
        }
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let mut files: Vec<LogFile> = Vec::new();
        let mut logs = Vec::new();
        for (index, app) in config.apps.iter().enumerate() {
            let Some(access) = &app.access_log else {
                logs.push(None);
                continue;
            };
            let file = match files.iter().position(|f| f.path == access.path) {
                Some(file) => file,
                None => {
                    files.push(app.logs.file(access.path.clone()));
                    files.len() - 1
                }
            };
            let mut app_json = Vec::new();
            escape_json(&mut app_json, app.name.as_bytes());
            // Leaked on purpose: one per app for the whole run, and a `&'static` costs the
            // request path no reference count.
            logs.push(Some(&*Box::leak(Box::new(AccessLog {
                app: app.name.clone(),
                app_json,
                format: access.format,
                file,
                path: access.path.clone(),
                zone: Zone::of(app.logs.utc),
                tx: tx.clone(),
                drops: metrics.log_drops(index),
            }))));
        }
        std::thread::Builder::new()
            .name("corral-access-log".into())
            .spawn(move || write_all(rx, files))?;
        Ok(Some(AccessLogs { tx, logs }))
    }

    /// The access log of app number `app` (config order), if it has one.
    pub fn log(&self, app: usize) -> Option<&'static AccessLog> {
        self.logs.get(app).copied().flatten()
    }

    /// A way to empty the access logs (`corral flush`), for the supervisor.
    pub fn emptier(&self) -> Emptier {
        let files = self
            .logs
            .iter()
            .flatten()
            .map(|log| (log.app.clone(), log.path.clone()))
            .collect();
        Emptier {
            tx: self.tx.clone(),
            files,
        }
    }

    /// After the connections have drained: every shard (one per runtime of `shards`) hands
    /// over what it holds, and the writer writes it (waiting at most [`FINISH_WITHIN`]).
    pub async fn finish<'a>(&self, shards: impl IntoIterator<Item = &'a tokio::runtime::Handle>) {
        for shard in shards {
            if let Err(e) = shard.spawn(async { flush_local() }).await {
                warn!(error = %e, "access log: a shard could not hand over its last lines");
            }
        }
        let tx = self.tx.clone();
        let written = tokio::task::spawn_blocking(move || {
            let (ack, done) = mpsc::channel();
            tx.send(Msg::Flushed(ack)).is_ok() && done.recv_timeout(FINISH_WITHIN).is_ok()
        });
        if !matches!(written.await, Ok(true)) {
            warn!("access log: the writer did not finish within {FINISH_WITHIN:?}; its last lines may be missing");
        }
    }
}

/// Empties the access logs of an app, or of every app, through their writer thread.
#[derive(Debug, Clone)]
pub struct Emptier {
    tx: SyncSender<Msg>,
    /// (app, its file)
    files: Vec<(String, PathBuf)>,
}

impl Emptier {
    /// Empties the access log of `app` (of every app for `None`); how many files were emptied.
    pub async fn empty(&self, app: Option<&str>) -> usize {
        let mut paths: Vec<PathBuf> = self
            .files
            .iter()
            .filter(|(name, _)| app.is_none_or(|app| app == name))
            .map(|(_, path)| path.clone())
            .collect();
        paths.dedup();
        if paths.is_empty() {
            return 0;
        }
        let tx = self.tx.clone();
        // The queue may be full for a moment: wait for room off the async thread.
        let emptied = tokio::task::spawn_blocking(move || {
            let (ack, done) = mpsc::channel();
            tx.send(Msg::Empty(paths, ack)).ok()?;
            done.recv_timeout(FINISH_WITHIN).ok()
        });
        match emptied.await {
            Ok(Some(n)) => n,
            _ => {
                warn!("access log: the writer did not answer the flush within {FINISH_WITHIN:?}");
                0
            }
        }
    }
}

/// The writer thread: appends each batch to its file until every sender is gone, and rotates
/// by time about once a second.
fn write_all(rx: Receiver<Msg>, files: Vec<LogFile>) {
    let mut writers = Writers::default();
    let timed = files.iter().any(|f| f.interval.is_some());
    loop {
        let msg = if timed {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(msg) => msg,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    writers.rotate_due(SystemTime::now());
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(msg) => msg,
                Err(_) => break,
            }
        };
        if timed {
            writers.rotate_due(SystemTime::now());
        }
        match msg {
            Msg::Empty(paths, ack) => {
                let mut emptied = 0;
                for path in &paths {
                    match writers.truncate(path) {
                        Ok(true) => emptied += 1,
                        Ok(false) => {}
                        Err(e) => warn!(path = %path.display(), error = %e, "flush: cannot empty the access log"),
                    }
                }
                let _asker_gone = ack.send(emptied);
            }
            Msg::Batch {
                file,
                lines,
                count,
                drops,
            } => {
                // Writers says what went wrong, once per file and cause.
                let written = files.get(file).is_some_and(|f| writers.write_lines(f, &lines));
                if !written {
                    drops.fetch_add(count, Ordering::Relaxed);
                }
            }
            Msg::Flushed(ack) => {
                let _stopper_gone = ack.send(());
            }
        }
    }
    writers.settle();
}
