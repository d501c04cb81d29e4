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

use std::cell::RefCell;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Method, Request, Uri, Version};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::files::{civil_from_days, LogFile, Writers, Zone};
use crate::config::{AccessLogFormat, Config};
use crate::metrics::Registry;
use crate::proxy::forward::Peer;

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
    logs: Vec<Option<Arc<AccessLog>>>,
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
            logs.push(Some(Arc::new(AccessLog {
                app: app.name.clone(),
                format: access.format,
                file,
                path: access.path.clone(),
                zone: Zone::of(app.logs.utc),
                tx: tx.clone(),
                drops: metrics.log_drops(index),
            })));
        }
        std::thread::Builder::new()
            .name("corral-access-log".into())
            .spawn(move || write_all(rx, files))?;
        Ok(Some(AccessLogs { tx, logs }))
    }

    /// The access log of app number `app` (config order), if it has one.
    pub fn log(&self, app: usize) -> Option<Arc<AccessLog>> {
        self.logs.get(app).cloned().flatten()
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

/// A response's line, from its request's head until its end.
#[derive(Debug)]
pub struct Pending {
    log: Arc<AccessLog>,
    arrived: Instant,
    time: SystemTime,
    client: IpAddr,
    method: Method,
    uri: Uri,
    version: Version,
    user_agent: Option<HeaderValue>,
    referer: Option<HeaderValue>,
    request_id: Option<HeaderValue>,
    /// The status sent, set once the response head is known.
    pub status: u16,
}

impl Pending {
    /// The line of `req` from `peer`, whose head arrived at `arrived`, with its request id.
    pub fn new<B>(
        log: &Arc<AccessLog>,
        req: &Request<B>,
        peer: &Peer,
        arrived: Instant,
        request_id: Option<HeaderValue>,
    ) -> Pending {
        let header = |name| req.headers().get(name).cloned();
        Pending {
            log: Arc::clone(log),
            arrived,
            time: SystemTime::now(),
            client: peer.ip,
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            user_agent: header(http::header::USER_AGENT),
            referer: header(http::header::REFERER),
            request_id,
            status: 0,
        }
    }

    /// The response ended after `sent` body bytes, from the worker of `slot` (none: corral
    /// answered): the line goes to this shard's buffer.
    pub fn finish(self: Box<Self>, sent: u64, slot: Option<usize>) {
        let duration = self.arrived.elapsed();
        // A body dropped while the thread's storage is being torn down loses its line.
        let _torn_down = LOCAL.try_with(|local| {
            let Ok(mut local) = local.try_borrow_mut() else {
                return;
            };
            local.append(&self, sent, slot, duration);
        });
    }
}

/// What a thread (a shard) holds for the writer.
#[derive(Default)]
struct Local {
    buffers: Vec<Buffer>,
    /// Local time and UTC.
    clocks: [Clock; 2],
    /// Lines lost since the last warning, and when that was.
    lost: u64,
    warned: Option<Instant>,
}

/// The lines of one file waiting on one thread.
struct Buffer {
    /// The log they belong to, compared by address (two apps sharing a file have a buffer
    /// each).
    log: Arc<AccessLog>,
    lines: Vec<u8>,
    count: u64,
    since: Instant,
}

thread_local! {
    static LOCAL: RefCell<Local> = RefCell::new(Local::default());
}

impl Local {
    fn append(&mut self, line: &Pending, sent: u64, slot: Option<usize>, duration: Duration) {
        let index = match self.buffers.iter().position(|b| Arc::ptr_eq(&b.log, &line.log)) {
            Some(index) => index,
            None => {
                self.buffers.push(Buffer {
                    log: Arc::clone(&line.log),
                    lines: Vec::with_capacity(BATCH + 1024),
                    count: 0,
                    since: Instant::now(),
                });
                self.buffers.len() - 1
            }
        };
        let buffer = &mut self.buffers[index];
        if buffer.count == 0 {
            buffer.since = line.arrived + duration;
        }
        let clock = &mut self.clocks[usize::from(line.log.zone == Zone::Utc)];
        match line.log.format {
            AccessLogFormat::Combined => combined(&mut buffer.lines, clock, line, sent, slot, duration),
            AccessLogFormat::Json => json(&mut buffer.lines, clock, line, sent, slot, duration),
        }
        buffer.count += 1;
        if buffer.lines.len() >= BATCH || buffer.since.elapsed() >= FLUSH_EVERY {
            self.send(index);
        }
    }

    /// Hands buffer `index` to the writer, or counts its lines lost.
    fn send(&mut self, index: usize) {
        let buffer = &mut self.buffers[index];
        if buffer.count == 0 {
            return;
        }
        let count = std::mem::take(&mut buffer.count);
        let lines = std::mem::replace(&mut buffer.lines, Vec::with_capacity(BATCH + 1024));
        let drops = Arc::clone(&buffer.log.drops);
        let batch = Msg::Batch {
            file: buffer.log.file,
            lines,
            count,
            drops,
        };
        match buffer.log.tx.try_send(batch) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                buffer.log.drops.fetch_add(count, Ordering::Relaxed);
                self.lost += count;
                if self.warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                    let path = buffer.log.path.display();
                    warn!(path = %path, lines = self.lost, shard = crate::shards::current(), "access log: lines dropped, the writer does not keep up (slow or full disk?)");
                    self.warned = Some(Instant::now());
                    self.lost = 0;
                }
            }
        }
    }

    fn send_all(&mut self) {
        for index in 0..self.buffers.len() {
            self.send(index);
        }
    }
}

/// Hands everything this thread holds to the writer.
pub fn flush_local() {
    let _torn_down = LOCAL.try_with(|local| {
        if let Ok(mut local) = local.try_borrow_mut() {
            local.send_all();
        }
    });
}

/// On a shard until `stop`: every [`FLUSH_EVERY`], hands over what the shard holds (so the
/// lines of an idle shard are never more than that late).
pub async fn flush_every(stop: CancellationToken) {
    let mut every = tokio::time::interval(FLUSH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = every.tick() => flush_local(),
        }
    }
    flush_local();
}

/// The time of the last second formatted, per thread and zone: formatting (and looking up the
/// local offset) happens once a second.
#[derive(Default)]
struct Clock {
    second: u64,
    /// `10/Oct/2000:13:55:36 +0530`
    combined: [u8; 26],
    /// `2000-10-10T13:55:36`
    iso: [u8; 19],
    /// `+05:30`, or `Z` at offset zero.
    iso_offset: String,
}

impl Clock {
    fn at(&mut self, time: SystemTime, zone: Zone) -> (&[u8; 26], &[u8; 19], &str, u32) {
        let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        let second = since.as_secs();
        if second != self.second || self.iso[0] == 0 {
            self.second = second;
            let offset = zone.offset(time);
            let local = second as i64 + i64::from(offset);
            let (year, month, day) = civil_from_days(local.div_euclid(86_400));
            let of_day = local.rem_euclid(86_400);
            let (hour, minute, sec) = (of_day / 3600, (of_day / 60) % 60, of_day % 60);
            let sign = if offset < 0 { '-' } else { '+' };
            let (off_h, off_m) = (offset.unsigned_abs() / 3600, (offset.unsigned_abs() / 60) % 60);
            // RFC 3339 either way; `Z` whenever the offset is zero, as before local time.
            self.iso_offset = if offset == 0 {
                "Z".to_owned()
            } else {
                format!("{sign}{off_h:02}:{off_m:02}")
            };
            const MONTHS: [&str; 12] = [
                "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
            ];
            let month_name = MONTHS[(month as usize).saturating_sub(1) % 12];
            let mut combined = &mut self.combined[..];
            // Writing into a buffer of exactly the right size cannot fail for years 0..=9999.
            let _ = write!(
                combined,
                "{day:02}/{month_name}/{year:04}:{hour:02}:{minute:02}:{sec:02} {sign}{off_h:02}{off_m:02}"
            );
            let mut iso = &mut self.iso[..];
            let _ = write!(iso, "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{sec:02}");
        }
        (&self.combined, &self.iso, &self.iso_offset, since.subsec_millis())
    }
}

/// The request target as the log shows it: the path and query (an absolute-form target of
/// HTTP/1.1 in full).
fn target(uri: &Uri, version: Version) -> std::borrow::Cow<'_, str> {
    if version != Version::HTTP_2 && uri.scheme().is_some() {
        return uri.to_string().into();
    }
    uri.path_and_query().map_or("/", |p| p.as_str()).into()
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

/// One `combined` line.
fn combined(out: &mut Vec<u8>, clock: &mut Clock, line: &Pending, sent: u64, slot: Option<usize>, duration: Duration) {
    let (time, _, _, _) = clock.at(line.time, line.log.zone);
    // Writing to a Vec cannot fail.
    let _ = write!(out, "{} - - [", line.client);
    out.extend_from_slice(time);
    out.extend_from_slice(b"] \"");
    escape_combined(out, line.method.as_str().as_bytes());
    out.push(b' ');
    escape_combined(out, target(&line.uri, line.version).as_bytes());
    out.push(b' ');
    out.extend_from_slice(protocol(line.version).as_bytes());
    let _ = write!(out, "\" {} {sent} \"", line.status);
    quoted_or_dash(out, line.referer.as_ref());
    out.extend_from_slice(b"\" \"");
    quoted_or_dash(out, line.user_agent.as_ref());
    let _ = write!(
        out,
        "\" rt={}.{:06} slot=",
        duration.as_secs(),
        duration.subsec_micros()
    );
    match slot {
        Some(slot) => {
            let _ = write!(out, "{slot}");
        }
        None => out.push(b'-'),
    }
    out.extend_from_slice(b" id=");
    match &line.request_id {
        Some(id) => escape_combined(out, id.as_bytes()),
        None => out.push(b'-'),
    }
    out.push(b'\n');
}

fn quoted_or_dash(out: &mut Vec<u8>, value: Option<&HeaderValue>) {
    match value {
        Some(value) => escape_combined(out, value.as_bytes()),
        None => out.push(b'-'),
    }
}

/// nginx's escaping: `"`, `\`, bytes below 0x20 and from 0x7f become `\xHH`.
pub fn escape_combined(out: &mut Vec<u8>, bytes: &[u8]) {
    let plain = |b: u8| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\';
    if bytes.iter().all(|&b| plain(b)) {
        out.extend_from_slice(bytes);
        return;
    }
    for &b in bytes {
        if plain(b) {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'\\', b'x', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        }
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// One `json` line.
fn json(out: &mut Vec<u8>, clock: &mut Clock, line: &Pending, sent: u64, slot: Option<usize>, duration: Duration) {
    let (_, iso, offset, millis) = clock.at(line.time, line.log.zone);
    out.extend_from_slice(b"{\"time\":\"");
    out.extend_from_slice(iso);
    // Writing to a Vec cannot fail.
    let _ = write!(out, ".{millis:03}{offset}\",\"app\":");
    escape_json(out, line.log.app.as_bytes());
    let _ = write!(out, ",\"client\":\"{}\",\"method\":", line.client);
    escape_json(out, line.method.as_str().as_bytes());
    out.extend_from_slice(b",\"target\":");
    escape_json(out, target(&line.uri, line.version).as_bytes());
    let _ = write!(
        out,
        ",\"protocol\":\"{}\",\"status\":{},\"bytes\":{sent},\"duration_ms\":{}.{:03},\"slot\":",
        protocol(line.version),
        line.status,
        duration.as_millis(),
        duration.subsec_micros() % 1000
    );
    match slot {
        Some(slot) => {
            let _ = write!(out, "{slot}");
        }
        None => out.extend_from_slice(b"null"),
    }
    for (key, value) in [
        (&b",\"request_id\":"[..], &line.request_id),
        (b",\"user_agent\":", &line.user_agent),
        (b",\"referer\":", &line.referer),
    ] {
        out.extend_from_slice(key);
        match value {
            Some(value) => escape_json(out, value.as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
    }
    out.extend_from_slice(b"}\n");
}

/// `bytes` as a JSON string, quotes included. UTF-8 text keeps its characters (with `"`, `\`,
/// controls, DEL, U+2028 and U+2029 escaped); other bytes are read as Latin-1, so every byte
/// from 0x80 becomes `\u00HH`. The output is always one line of valid JSON.
pub fn escape_json(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    let plain = |b: u8| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\';
    if bytes.iter().all(|&b| plain(b)) {
        out.extend_from_slice(bytes);
    } else {
        let escaped = |out: &mut Vec<u8>, c: u32| {
            let _ = write!(out, "\\u{c:04x}");
        };
        match std::str::from_utf8(bytes) {
            Ok(text) => {
                for c in text.chars() {
                    match c {
                        '"' => out.extend_from_slice(b"\\\""),
                        '\\' => out.extend_from_slice(b"\\\\"),
                        '\n' => out.extend_from_slice(b"\\n"),
                        '\r' => out.extend_from_slice(b"\\r"),
                        '\t' => out.extend_from_slice(b"\\t"),
                        c if (c as u32) < 0x20 || c == '\u{7f}' || c == '\u{2028}' || c == '\u{2029}' => {
                            escaped(out, c as u32)
                        }
                        c => {
                            let mut utf8 = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
                        }
                    }
                }
            }
            Err(_) => {
                for &b in bytes {
                    match b {
                        b'"' => out.extend_from_slice(b"\\\""),
                        b'\\' => out.extend_from_slice(b"\\\\"),
                        b if plain(b) => out.push(b),
                        b => escaped(out, u32::from(b)),
                    }
                }
            }
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with(format: AccessLogFormat, tx: SyncSender<Msg>) -> Arc<AccessLog> {
        Arc::new(AccessLog {
            app: "web".into(),
            format,
            file: 0,
            path: PathBuf::from("access.log"),
            zone: Zone::Utc,
            tx,
            drops: Arc::default(),
        })
    }

    fn log(format: AccessLogFormat) -> Arc<AccessLog> {
        log_with(format, mpsc::sync_channel(1).0)
    }

    fn pending(format: AccessLogFormat, request: http::request::Builder) -> Pending {
        let req = request.body(()).expect("request");
        let peer = Peer::new(
            "[::ffff:10.1.2.3]:5555".parse().expect("addr"),
            "127.0.0.1:80".parse().expect("addr"),
            false,
        );
        let mut pending = Pending::new(
            &log(format),
            &req,
            &peer,
            Instant::now(),
            Some(HeaderValue::from_static("abc-0-1")),
        );
        pending.time = UNIX_EPOCH + Duration::from_millis(1_764_000_000_123); // 2025-11-24T16:00:00.123Z
        pending.status = 200;
        pending
    }

    fn line(format: AccessLogFormat, request: http::request::Builder, slot: Option<usize>) -> String {
        let pending = pending(format, request);
        let mut out = Vec::new();
        let duration = Duration::from_micros(1_234_567);
        match format {
            AccessLogFormat::Combined => combined(&mut out, &mut Clock::default(), &pending, 512, slot, duration),
            AccessLogFormat::Json => json(&mut out, &mut Clock::default(), &pending, 512, slot, duration),
        }
        String::from_utf8(out).expect("the line is UTF-8")
    }

    #[test]
    fn a_combined_line_has_every_field() {
        let request = http::Request::builder()
            .method("GET")
            .uri("/a?b=1")
            .header("user-agent", "curl/8.0")
            .header("referer", "https://example.com/");
        assert_eq!(
            line(AccessLogFormat::Combined, request, Some(2)),
            "10.1.2.3 - - [24/Nov/2025:16:00:00 +0000] \"GET /a?b=1 HTTP/1.1\" 200 512 \"https://example.com/\" \"curl/8.0\" rt=1.234567 slot=2 id=abc-0-1\n"
        );
        let bare = http::Request::builder().method("HEAD").uri("http://h.example/x");
        assert_eq!(
            line(AccessLogFormat::Combined, bare, None),
            "10.1.2.3 - - [24/Nov/2025:16:00:00 +0000] \"HEAD http://h.example/x HTTP/1.1\" 200 512 \"-\" \"-\" rt=1.234567 slot=- id=abc-0-1\n"
        );
    }

    #[test]
    fn a_json_line_is_one_object_with_every_field() {
        let request = http::Request::builder()
            .method("POST")
            .uri("/p")
            .version(Version::HTTP_2)
            .header("user-agent", "Mozilla/5.0 (X11; Linux) \"quoted\" ünï");
        let text = line(AccessLogFormat::Json, request, Some(0));
        assert!(text.ends_with("}\n") && text.matches('\n').count() == 1, "{text}");
        let value: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(value["time"], "2025-11-24T16:00:00.123Z");
        assert_eq!(value["app"], "web");
        assert_eq!(value["client"], "10.1.2.3");
        assert_eq!(value["method"], "POST");
        assert_eq!(value["target"], "/p");
        assert_eq!(value["protocol"], "HTTP/2.0");
        assert_eq!(value["status"], 200);
        assert_eq!(value["bytes"], 512);
        assert_eq!(value["duration_ms"], 1234.567);
        assert_eq!(value["slot"], 0);
        assert_eq!(value["request_id"], "abc-0-1");
        assert_eq!(value["user_agent"], "Mozilla/5.0 (X11; Linux) \"quoted\" ünï");
        assert!(value["referer"].is_null());
    }

    #[test]
    fn hostile_bytes_cannot_split_or_forge_a_line() {
        // What hyper lets through in a header value: quotes, backslashes, tabs, obs-text.
        let hostile: &[u8] = b"x\" 200 1 \"-\" \"forged\\\x09\xff\xfe";
        let request = || {
            http::Request::builder()
                .method("GET")
                .uri("/")
                .header(
                    "user-agent",
                    HeaderValue::from_bytes(hostile).expect("obs-text is a valid value"),
                )
                .header(
                    "referer",
                    HeaderValue::from_bytes(b"\xe2\x80\xa8line separator").expect("value"),
                )
        };
        let text = line(AccessLogFormat::Combined, request(), None);
        assert!(
            text.contains(
                "\"\\xe2\\x80\\xa8line separator\" \"x\\x22 200 1 \\x22-\\x22 \\x22forged\\x5c\\x09\\xff\\xfe\" rt="
            ),
            "{text}"
        );
        // Exactly the six quotes corral writes, one newline at the end, all ASCII.
        assert_eq!(text.matches('"').count(), 6, "{text}");
        assert_eq!(text.matches('\n').count(), 1);
        assert!(text.is_ascii());

        let text = line(AccessLogFormat::Json, request(), None);
        assert_eq!(text.matches('\n').count(), 1);
        let value: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        // Not UTF-8: every byte is kept, as Latin-1 code points.
        let ua: Vec<u32> = value["user_agent"]
            .as_str()
            .expect("string")
            .chars()
            .map(|c| c as u32)
            .collect();
        assert_eq!(ua, hostile.iter().map(|&b| u32::from(b)).collect::<Vec<u32>>());
        assert_eq!(value["referer"], "\u{2028}line separator");
        assert!(text.contains("\\u2028"), "{text}");
        assert_eq!(value.as_object().map(|o| o.len()), Some(13), "{text}");

        // Controls never get this far (hyper refuses them), and are escaped all the same.
        let mut out = Vec::new();
        escape_combined(&mut out, b"a\nb\r\x00\x7f");
        assert_eq!(out, b"a\\x0ab\\x0d\\x00\\x7f");
        out.clear();
        escape_json(&mut out, b"a\nb\x00\x7f\xc3\xa9");
        assert_eq!(String::from_utf8_lossy(&out), "\"a\\nb\\u0000\\u007f\u{e9}\"");
    }

    #[test]
    fn lines_are_batched_per_thread_and_counted_lost_when_the_writer_is_full() {
        // A channel of one batch that nobody reads: the second batch is dropped.
        let (tx, rx) = mpsc::sync_channel(1);
        let log = log_with(AccessLogFormat::Combined, tx);
        let thread = std::thread::spawn(move || {
            for _ in 0..3 {
                let mut pending = pending(AccessLogFormat::Combined, http::Request::builder().uri("/"));
                pending.log = Arc::clone(&log);
                Box::new(pending).finish(10, Some(0));
            }
            flush_local();
            assert_eq!(log.drops.load(Ordering::Relaxed), 0, "the first batch fits");
            let mut pending = pending(AccessLogFormat::Combined, http::Request::builder().uri("/"));
            pending.log = Arc::clone(&log);
            Box::new(pending).finish(10, Some(0));
            flush_local();
            assert_eq!(log.drops.load(Ordering::Relaxed), 1, "the second is lost, and counted");
        });
        thread.join().expect("the thread ran");
        match rx.try_recv() {
            Ok(Msg::Batch { lines, count, .. }) => {
                assert_eq!(count, 3);
                assert_eq!(lines.iter().filter(|&&b| b == b'\n').count(), 3);
            }
            other => panic!("one batch of three lines, not {other:?}"),
        }
    }
}
