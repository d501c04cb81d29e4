//! Worker log files: `out_file` / `error_file`, timestamped lines, rotation by size
//! (`log_max_size`) and by time (`log_rotate_interval`), gzip of rotated files
//! (`log_compress`), and emptying (`corral flush`).
//!
//! Only the writer threads ([`super::OutputSink`] for worker output, [`super::access`] for the
//! access logs) touch the files, so writing never blocks the proxy or the supervisor. Rotation
//! is rename-and-reopen: `web-out.log` becomes `web-out.log.1` (and `.1` becomes `.2`, ... up
//! to `log_retain`, the oldest dropped), and a new `web-out.log` is opened for the next line.
//! Nothing is copied and nothing truncated, so no line is lost in between (pm2-logrotate's
//! copy-and-truncate loses the lines written during the copy). A rotation happens before the
//! write that would start past `log_max_size`, or at the first write or tick (once a second)
//! after the next time of `log_rotate_interval` (a cron [`Schedule`] in local time, or UTC with
//! `log_utc`), if the file is not empty.
//!
//! # Compression
//!
//! With `log_compress`, rotated files are `web-out.log.1.gz` .. `.N.gz` (`log_retain` counts
//! them the same way). The writer thread only renames the full file to a staging name
//! (`web-out.log.rotating-<ms>-<n>`, a rename: as cheap as a plain rotation) and hands it to a
//! compressor thread of its own, which, one file at a time and in order: shifts `.N.gz` (and
//! any plain `.N`) up by one, gzips the staged file into `.1.gz.tmp`, syncs it, renames it to
//! `.1.gz` and removes the staged file. So a crash never leaves a half `.gz` under a final
//! name; a staged file left by a crash is taken up again the next time the file is opened. If
//! compressing fails (full disk), the staged file becomes the plain `.1` and the reason is
//! logged. gzip is [`flate2`] with its default backend, `miniz_oxide`: small, pure Rust, no C
//! library to build or link; the level is flate2's default (6), about 10x on log text.
//!
//! # Flush
//!
//! [`Writers::truncate`] empties a file through the handle lines are appended with (opened
//! with `O_APPEND`, so the next line starts at offset 0): the writer thread does it between two
//! lines, so no line is cut or written twice. Rotated files are kept, as `pm2 flush` keeps
//! pm2-logrotate's.
//!
//! # Time
//!
//! Line timestamps are in local time with its offset (`+05:30`, PM2's default) or in UTC with
//! `log_utc` ([`Zone`]). The local zone is chrono's: `TZ` if set (a zone name or a POSIX TZ
//! string such as `IST-5:30`), else `/etc/localtime`, parsed by chrono itself (no libc
//! `localtime_r`, so it is sound in a multi-threaded process, unlike the `time` crate's local
//! offset) and re-checked at most once a second, so a changed zone is picked up while running.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Offset, TimeZone, Utc};

use crate::cron::Schedule;

/// One log file and its rotation policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFile {
    /// Where lines go.
    pub path: PathBuf,
    /// Rotate when the file reaches this size (bytes); `None`: never.
    pub max_size: Option<u64>,
    /// Rotated files kept (`path.1` .. `path.N`, or `path.1.gz` .. with `compress`).
    pub retain: usize,
    /// gzip rotated files, off the writer thread.
    pub compress: bool,
    /// Rotate at these times too (`log_rotate_interval`), in `zone`.
    pub interval: Option<Schedule>,
    /// The zone of `interval` (the zone of the timestamps).
    pub zone: Zone,
}

impl LogFile {
    /// A file rotated by size only, never compressed.
    pub fn new(path: PathBuf, max_size: Option<u64>, retain: usize) -> LogFile {
        LogFile {
            path,
            max_size,
            retain,
            compress: false,
            interval: None,
            zone: Zone::Utc,
        }
    }
}

/// The time zone of timestamps and rotation times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zone {
    /// The local zone (`TZ`, else `/etc/localtime`), with its offset.
    Local,
    /// UTC (`log_utc = true`).
    Utc,
}

impl Zone {
    /// `log_utc`.
    pub fn of(utc: bool) -> Zone {
        if utc {
            Zone::Utc
        } else {
            Zone::Local
        }
    }

    /// Seconds east of UTC at `at`.
    pub fn offset(self, at: SystemTime) -> i32 {
        match self {
            Zone::Utc => 0,
            Zone::Local => {
                let utc = DateTime::<Utc>::from(at).naive_utc();
                chrono::Local.offset_from_utc_datetime(&utc).fix().local_minus_utc()
            }
        }
    }

    /// When `schedule` next fires after `at`, in this zone.
    pub fn next(self, schedule: &Schedule, at: SystemTime) -> Option<SystemTime> {
        let at = DateTime::<Utc>::from(at);
        match self {
            Zone::Utc => schedule.next_after(&at).map(SystemTime::from),
            Zone::Local => schedule
                .next_after(&at.with_timezone(&chrono::Local))
                .map(SystemTime::from),
        }
    }
}

/// The file of a slot: `out.log` becomes `out-3.log` unless logs are merged.
pub fn slot_path(path: &Path, slot: usize, merged: bool) -> PathBuf {
    if merged {
        return path.to_path_buf();
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{slot}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{slot}"),
    };
    path.with_file_name(name)
}

/// An open file of a writer thread.
#[derive(Debug)]
struct Open {
    handle: File,
    size: u64,
    /// The next rotation time of its `interval`.
    due: Option<SystemTime>,
    /// Its policy, for rotations on a tick.
    spec: LogFile,
}

/// The open files of a writer thread.
#[derive(Debug, Default)]
pub struct Writers {
    open: HashMap<PathBuf, Open>,
    failed: HashMap<PathBuf, String>,
    /// Started at the first compressed rotation.
    compressor: Option<Compressor>,
    /// Files whose staged leftovers were looked for (once per file and run).
    adopted: std::collections::HashSet<PathBuf>,
}

impl Writers {
    /// Appends `line` to `file`, rotating first if it has reached its size or its time.
    pub fn write(&mut self, file: &LogFile, line: &str) {
        self.write_bytes(file, line.as_bytes());
    }

    /// Appends a batch of whole lines (each ending in a newline) to `file`, rotating between
    /// two lines whenever the file has reached its size, as if they were written one by one
    /// (a line is never split over two files). False if some could not be written.
    pub fn write_lines(&mut self, file: &LogFile, mut lines: &[u8]) -> bool {
        while !lines.is_empty() {
            let take = match file.max_size {
                None => lines.len(),
                Some(max) => {
                    let size = self.open.get(&file.path).map_or(0, |open| open.size);
                    let room = usize::try_from(max.saturating_sub(size)).unwrap_or(usize::MAX);
                    let first = lines.iter().position(|&b| b == b'\n').map_or(lines.len(), |i| i + 1);
                    if room >= lines.len() {
                        lines.len()
                    } else {
                        // The lines that fit, or (like a single write) the first one anyway.
                        lines[..room].iter().rposition(|&b| b == b'\n').map_or(first, |i| i + 1)
                    }
                }
            };
            if !self.write_bytes(file, &lines[..take]) {
                return false;
            }
            lines = &lines[take..];
        }
        true
    }

    /// Rotates every open file whose `log_rotate_interval` time has come (empty ones are not
    /// rotated, only rescheduled). The writer threads call this about once a second.
    pub fn rotate_due(&mut self, now: SystemTime) {
        let due: Vec<LogFile> = self
            .open
            .values()
            .filter(|open| open.due.is_some_and(|at| at <= now))
            .map(|open| open.spec.clone())
            .collect();
        for file in due {
            if let Err(e) = self.rotate_if_due(&file, now) {
                self.report(&file.path, &e);
                self.open.remove(&file.path);
            }
        }
    }

    /// Empties `path` (through its open handle if it is open); false if it does not exist.
    pub fn truncate(&mut self, path: &Path) -> std::io::Result<bool> {
        if let Some(open) = self.open.get_mut(path) {
            open.handle.set_len(0)?;
            open.size = 0;
            return Ok(true);
        }
        match OpenOptions::new().write(true).open(path) {
            Ok(file) => file.set_len(0).map(|()| true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn write_bytes(&mut self, file: &LogFile, bytes: &[u8]) -> bool {
        if let Err(e) = self.try_write(file, bytes) {
            self.report(&file.path, &e);
            self.open.remove(&file.path);
            return false;
        }
        true
    }

    /// Says what went wrong with `path` once per cause, not once per line.
    fn report(&mut self, path: &Path, e: &std::io::Error) {
        let message = e.to_string();
        if self.failed.get(path) != Some(&message) {
            tracing::error!(path = %path.display(), error = %message, "cannot write log file");
            self.failed.insert(path.to_path_buf(), message);
        }
    }

    fn try_write(&mut self, file: &LogFile, line: &[u8]) -> std::io::Result<()> {
        if !self.open.contains_key(&file.path) {
            self.adopt(file);
            self.open_file(file, None)?;
        }
        let over = file
            .max_size
            .is_some_and(|max| self.open.get(&file.path).is_some_and(|open| open.size >= max));
        if over {
            self.rotate_open(file, None)?;
        } else if file.interval.is_some() {
            self.rotate_if_due(file, SystemTime::now())?;
        }
        let open = self.open.get_mut(&file.path).expect("UNWRAP: opened above");
        open.handle.write_all(line)?;
        open.size += line.len() as u64;
        self.failed.remove(&file.path);
        Ok(())
    }

    fn open_file(&mut self, file: &LogFile, now: Option<SystemTime>) -> std::io::Result<()> {
        if let Some(dir) = file.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let handle = OpenOptions::new().create(true).append(true).open(&file.path)?;
        let size = handle.metadata()?.len();
        let now = now.unwrap_or_else(SystemTime::now);
        let due = file.interval.as_ref().and_then(|s| file.zone.next(s, now));
        let spec = file.clone();
        self.open.insert(
            file.path.clone(),
            Open {
                handle,
                size,
                due,
                spec,
            },
        );
        Ok(())
    }

    /// At its interval's time: rotates `file` if it holds anything, and schedules the next.
    fn rotate_if_due(&mut self, file: &LogFile, now: SystemTime) -> std::io::Result<()> {
        let Some(open) = self.open.get_mut(&file.path) else {
            return Ok(());
        };
        if open.due.is_none_or(|at| at > now) {
            return Ok(());
        }
        if open.size == 0 {
            open.due = file.interval.as_ref().and_then(|s| file.zone.next(s, now));
            return Ok(());
        }
        self.rotate_open(file, Some(now))
    }

    fn rotate_open(&mut self, file: &LogFile, now: Option<SystemTime>) -> std::io::Result<()> {
        self.open.remove(&file.path);
        if file.retain == 0 {
            std::fs::remove_file(&file.path)?;
        } else if file.compress {
            let staged = staging_name(&file.path);
            std::fs::rename(&file.path, &staged)?;
            self.compress(file, staged);
        } else {
            shift(&file.path, file.retain)?;
            std::fs::rename(&file.path, numbered(&file.path, 1))?;
        }
        self.open_file(file, now)
    }

    /// Hands a staged file to the compressor thread (started on first use).
    fn compress(&mut self, file: &LogFile, staged: PathBuf) {
        let job = Job {
            path: file.path.clone(),
            retain: file.retain,
            staged,
        };
        if self.compressor.is_none() {
            self.compressor = Compressor::start();
        }
        let sent = match &self.compressor {
            // A bounded queue: when gzip cannot keep up with a worker's output, writing waits
            // for it instead of staging files without end (the disk would fill whatever
            // `log_retain` says).
            Some(compressor) => match compressor.tx.try_send(job) {
                Ok(()) => Ok(()),
                Err(mpsc::TrySendError::Full(job)) => {
                    tracing::warn!(file = %file.path.display(), "log compression does not keep up with the output; writing waits for it");
                    compressor.tx.send(job).map_err(|e| e.0)
                }
                Err(mpsc::TrySendError::Disconnected(job)) => Err(job),
            },
            None => Err(job),
        };
        if let Err(job) = sent {
            // No thread: do it here rather than lose the file (it only happens if a thread
            // cannot be started).
            finish_rotation(&job);
        }
    }

    /// The first time `file` is opened in this run: staged files a crash left behind go
    /// through the rotation again (compressed or not), oldest first; stale `.gz.tmp` go.
    fn adopt(&mut self, file: &LogFile) {
        if !self.adopted.insert(file.path.clone()) {
            return;
        }
        let (Some(dir), Some(name)) = (file.path.parent(), file.path.file_name()) else {
            return;
        };
        let name = name.to_string_lossy();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut staged = Vec::new();
        for entry in entries.flatten() {
            let entry_name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = entry_name.strip_prefix(&*name) else {
                continue;
            };
            if rest.starts_with(".rotating-") {
                staged.push(entry.path());
            } else if rest.starts_with('.') && rest.ends_with(".gz.tmp") {
                if let Err(e) = std::fs::remove_file(entry.path()) {
                    tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove a half-written .gz.tmp");
                }
            }
        }
        staged.sort_by_key(|p| staged_order(p));
        for path in staged {
            tracing::info!(path = %path.display(), "log rotation left unfinished by an earlier run: finishing it");
            if file.compress && file.retain > 0 {
                self.compress(file, path);
                continue;
            }
            let finished = if file.retain == 0 {
                std::fs::remove_file(&path)
            } else {
                shift(&file.path, file.retain).and_then(|()| std::fs::rename(&path, numbered(&file.path, 1)))
            };
            if let Err(e) = finished {
                tracing::warn!(path = %path.display(), error = %e, "cannot finish the earlier rotation; the file is left as it is");
            }
        }
    }

    /// Waits until the compressor has finished every rotation handed to it (tests, and the
    /// writer threads' end).
    pub fn settle(&mut self) {
        if let Some(compressor) = self.compressor.take() {
            drop(compressor.tx);
            if compressor.thread.join().is_err() {
                tracing::error!("the log compressor thread panicked");
            }
        }
    }
}

/// A rotated file for the compressor: `staged` becomes `path.1.gz` after the shift.
#[derive(Debug)]
struct Job {
    path: PathBuf,
    retain: usize,
    staged: PathBuf,
}

/// Rotations waiting for the compressor before writing waits for it.
const COMPRESS_QUEUE: usize = 4;

/// The compressor thread of a [`Writers`]: rotations are finished in the order they happened.
#[derive(Debug)]
struct Compressor {
    tx: mpsc::SyncSender<Job>,
    thread: std::thread::JoinHandle<()>,
}

impl Compressor {
    fn start() -> Option<Compressor> {
        let (tx, rx) = mpsc::sync_channel::<Job>(COMPRESS_QUEUE);
        let spawned = std::thread::Builder::new()
            .name("corral-log-gzip".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    finish_rotation(&job);
                }
            });
        match spawned {
            Ok(thread) => Some(Compressor { tx, thread }),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the log compressor thread; rotated logs are compressed on the writer thread");
                None
            }
        }
    }
}

/// Shifts the rotated files and puts `job.staged` at `.1.gz`, or at `.1` if gzip fails.
fn finish_rotation(job: &Job) {
    if let Err(e) = shift(&job.path, job.retain) {
        tracing::error!(path = %job.path.display(), error = %e, "cannot shift rotated log files");
    }
    let target = gz(&numbered(&job.path, 1));
    let mut tmp = target.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let compressed = gzip(&job.staged, &tmp).and_then(|()| std::fs::rename(&tmp, &target));
    match compressed {
        Ok(()) => {
            if let Err(e) = std::fs::remove_file(&job.staged) {
                tracing::warn!(path = %job.staged.display(), error = %e, "compressed, but cannot remove the plain rotated file");
            }
        }
        Err(e) => {
            let _not_there = std::fs::remove_file(&tmp);
            let plain = numbered(&job.path, 1);
            tracing::warn!(path = %job.path.display(), error = %e, kept = %plain.display(), "cannot compress a rotated log file; keeping it uncompressed");
            if let Err(e) = std::fs::rename(&job.staged, &plain) {
                tracing::error!(path = %job.staged.display(), error = %e, "cannot rename the rotated log file");
            }
        }
    }
}

/// gzips `from` into a new file `to` and syncs it.
fn gzip(from: &Path, to: &Path) -> std::io::Result<()> {
    let mut input = File::open(from)?;
    let output = OpenOptions::new().write(true).create_new(true).open(to)?;
    let mut encoder = flate2::write::GzEncoder::new(std::io::BufWriter::new(output), flate2::Compression::default());
    std::io::copy(&mut input, &mut encoder)?;
    let output = encoder.finish()?.into_inner().map_err(|e| e.into_error())?;
    output.sync_all()
}

static STAGED: AtomicU64 = AtomicU64::new(0);

/// `path.rotating-<ms since the epoch>-<n>`: unique, and sortable in rotation order.
fn staging_name(path: &Path) -> PathBuf {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let n = STAGED.fetch_add(1, Ordering::Relaxed);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".rotating-{ms:013}-{n:06}"));
    PathBuf::from(name)
}

/// The (ms, n) of a staged name, for sorting.
fn staged_order(path: &Path) -> (u128, u64) {
    let name = path.to_string_lossy();
    let tail = name.rsplit(".rotating-").next().unwrap_or_default();
    let (ms, n) = tail.split_once('-').unwrap_or((tail, "0"));
    (ms.parse().unwrap_or(0), n.parse().unwrap_or(0))
}

fn numbered(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn gz(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".gz");
    PathBuf::from(name)
}

/// Makes room for a new `.1`: `.N` and `.N.gz` go up by one, those at `retain` are dropped.
fn shift(path: &Path, retain: usize) -> std::io::Result<()> {
    let ignore_missing = |result: std::io::Result<()>| match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    };
    for last in [numbered(path, retain), gz(&numbered(path, retain))] {
        ignore_missing(std::fs::remove_file(last))?;
    }
    for n in (1..retain).rev() {
        ignore_missing(std::fs::rename(numbered(path, n), numbered(path, n + 1)))?;
        ignore_missing(std::fs::rename(gz(&numbered(path, n)), gz(&numbered(path, n + 1))))?;
    }
    Ok(())
}

/// A line timestamp in PM2's `log_date_format` notation (moment.js tokens: `YYYY MM DD HH mm ss
/// SSS Z ZZ`; anything else is copied), in UTC.
pub fn timestamp(format: &str, now: SystemTime) -> String {
    timestamp_at(format, now, 0)
}

/// [`timestamp`] in `zone`: local time shows its offset (`+05:30` for `Z`, `+0530` for `ZZ`).
pub fn timestamp_in(format: &str, now: SystemTime, zone: Zone) -> String {
    timestamp_at(format, now, zone.offset(now))
}

/// [`timestamp`] at `offset` seconds east of UTC.
pub fn timestamp_at(format: &str, now: SystemTime, offset: i32) -> String {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64 + i64::from(offset);
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let of_day = secs.rem_euclid(86_400);
    let (hour, minute, second) = (of_day / 3600, (of_day / 60) % 60, of_day % 60);
    let millis = since.subsec_millis();
    let sign = if offset < 0 { '-' } else { '+' };
    let (off_h, off_m) = (offset.unsigned_abs() / 3600, (offset.unsigned_abs() / 60) % 60);
    let mut out = String::with_capacity(format.len() + 8);
    let mut rest = format;
    let tokens: [(&str, String); 9] = [
        ("YYYY", format!("{year:04}")),
        ("SSS", format!("{millis:03}")),
        ("MM", format!("{month:02}")),
        ("DD", format!("{day:02}")),
        ("HH", format!("{hour:02}")),
        ("mm", format!("{minute:02}")),
        ("ss", format!("{second:02}")),
        ("ZZ", format!("{sign}{off_h:02}{off_m:02}")),
        ("Z", format!("{sign}{off_h:02}:{off_m:02}")),
    ];
    'outer: while !rest.is_empty() {
        for (token, value) in &tokens {
            if let Some(after) = rest.strip_prefix(token) {
                out.push_str(value);
                rest = after;
                continue 'outer;
            }
        }
        let mut chars = rest.chars();
        if let Some(c) = chars.next() {
            out.push(c);
        }
        rest = chars.as_str();
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_follow_the_pm2_format() {
        let at = UNIX_EPOCH + Duration::from_millis(1_764_000_000_123); // 2025-11-24T16:00:00.123Z
        assert_eq!(
            timestamp("YYYY-MM-DDTHH:mm:ss.SSSZ", at),
            "2025-11-24T16:00:00.123+00:00"
        );
        assert_eq!(timestamp("DD/MM/YYYY HH:mm", at), "24/11/2025 16:00");
        // Local time carries its offset; the date follows the local day.
        assert_eq!(
            timestamp_at("YYYY-MM-DDTHH:mm:ss.SSSZ", at, 5 * 3600 + 1800),
            "2025-11-24T21:30:00.123+05:30"
        );
        assert_eq!(timestamp_at("HH:mm ZZ", at, 5 * 3600 + 1800), "21:30 +0530");
        assert_eq!(
            timestamp_at("YYYY-MM-DD HH:mm Z", at, -5 * 3600),
            "2025-11-24 11:00 -05:00"
        );
        assert_eq!(
            timestamp_at("YYYY-MM-DD HH:mm Z", at, 9 * 3600),
            "2025-11-25 01:00 +09:00"
        );
        assert_eq!(timestamp_in("Z", at, Zone::Utc), "+00:00");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn slot_files_and_merged_files() {
        assert_eq!(
            slot_path(Path::new("/l/web-out.log"), 2, false),
            Path::new("/l/web-out-2.log")
        );
        assert_eq!(slot_path(Path::new("/l/out"), 0, false), Path::new("/l/out-0"));
        assert_eq!(
            slot_path(Path::new("/l/web-out.log"), 2, true),
            Path::new("/l/web-out.log")
        );
    }

    #[test]
    fn batches_rotate_between_lines_as_single_lines_would() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = LogFile::new(dir.path().join("access.log"), Some(100), 100);
        let mut writers = Writers::default();
        let mut next = 0;
        for batch in [1, 7, 30, 2, 50] {
            let mut lines = String::new();
            for _ in 0..batch {
                lines.push_str(&format!("request {next:04} {}\n", "x".repeat(next % 20)));
                next += 1;
            }
            assert!(writers.write_lines(&file, lines.as_bytes()));
        }
        let mut numbers = Vec::new();
        for n in (1..100).rev() {
            let Ok(text) = std::fs::read_to_string(dir.path().join(format!("access.log.{n}"))) else {
                continue;
            };
            // A file holds whole lines, and no more than one line past the size.
            assert!(text.ends_with('\n'), "{text:?}");
            assert!(text.len() < 100 + 40, "{}", text.len());
            numbers.extend(text.lines().map(|l| l[8..12].parse::<u32>().expect("number")));
        }
        let current = std::fs::read_to_string(&file.path)?;
        numbers.extend(current.lines().map(|l| l[8..12].parse::<u32>().expect("number")));
        assert_eq!(numbers, (0..90).collect::<Vec<u32>>());
        assert!(dir.path().join("access.log.5").exists());
        Ok(())
    }

    #[test]
    fn rotation_keeps_every_line_and_the_retained_files() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = LogFile::new(dir.path().join("out.log"), Some(100), 2);
        let mut writers = Writers::default();
        for n in 0..50 {
            writers.write(&file, &format!("line {n:03}\n"));
        }
        let mut lines = Vec::new();
        for name in ["out.log.2", "out.log.1", "out.log"] {
            lines.extend(
                std::fs::read_to_string(dir.path().join(name))?
                    .lines()
                    .map(str::to_owned),
            );
        }
        assert!(!dir.path().join("out.log.3").exists());
        // Kept files hold the newest lines, in order, with none missing between them.
        let numbers: Vec<u32> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("line ")?.parse().ok())
            .collect();
        assert_eq!(numbers.last(), Some(&49));
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
        Ok(())
    }

    fn numbers_in(text: &str) -> Vec<u32> {
        text.lines()
            .map(|l| {
                l.strip_prefix("line ")
                    .and_then(|n| n.parse().ok())
                    .expect("a numbered line")
            })
            .collect()
    }

    fn gunzip(path: &Path) -> std::io::Result<String> {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(File::open(path)?), &mut text)?;
        Ok(text)
    }

    /// Every line of `path` and its rotated files (plain or gzipped), oldest first.
    fn all_lines(path: &Path) -> std::io::Result<Vec<u32>> {
        let mut numbers = Vec::new();
        for n in (1..200).rev() {
            let plain = numbered(path, n);
            let text = if plain.exists() {
                std::fs::read_to_string(plain)?
            } else if gz(&plain).exists() {
                gunzip(&gz(&plain))?
            } else {
                continue;
            };
            assert!(text.ends_with('\n'), "a rotated file ends with a whole line: {text:?}");
            numbers.extend(numbers_in(&text));
        }
        numbers.extend(numbers_in(&std::fs::read_to_string(path)?));
        Ok(numbers)
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".rotating-") || n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn compressed_rotation_keeps_every_line_in_gz_files() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut file = LogFile::new(dir.path().join("out.log"), Some(200), 100);
        file.compress = true;
        let mut writers = Writers::default();
        for n in 0..500 {
            writers.write(&file, &format!("line {n:04}\n"));
        }
        writers.settle();
        assert!(gz(&numbered(&file.path, 1)).exists());
        assert!(
            !numbered(&file.path, 1).exists(),
            "the plain .1 is gone once compressed"
        );
        assert_eq!(all_lines(&file.path)?, (0..500).collect::<Vec<u32>>());
        assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));

        // log_retain counts the .gz files.
        let mut kept = LogFile::new(dir.path().join("kept.log"), Some(200), 3);
        kept.compress = true;
        for n in 0..500 {
            writers.write(&kept, &format!("line {n:04}\n"));
        }
        writers.settle();
        for n in 1..=3 {
            assert!(gz(&numbered(&kept.path, n)).exists(), "{n}");
        }
        assert!(!gz(&numbered(&kept.path, 4)).exists());
        let numbers = all_lines(&kept.path)?;
        assert_eq!(numbers.last(), Some(&499));
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
        Ok(())
    }

    #[test]
    fn a_failed_compression_keeps_the_plain_rotated_file() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut file = LogFile::new(dir.path().join("out.log"), Some(100), 10);
        file.compress = true;
        // Something that is not a file where the compressor writes: creating it fails.
        std::fs::create_dir(dir.path().join("out.log.1.gz.tmp"))?;
        let mut writers = Writers::default();
        for n in 0..40 {
            writers.write(&file, &format!("line {n:04}\n"));
        }
        writers.settle();
        assert!(numbered(&file.path, 1).exists() && numbered(&file.path, 2).exists());
        assert!(!gz(&numbered(&file.path, 1)).exists());
        assert_eq!(all_lines(&file.path)?, (0..40).collect::<Vec<u32>>());
        Ok(())
    }

    #[test]
    fn a_rotation_left_by_a_crash_is_finished_on_the_next_open() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("out.log");
        std::fs::write(dir.path().join("out.log.rotating-0000000000002-000000"), "line 0002\n")?;
        std::fs::write(dir.path().join("out.log.rotating-0000000000001-000007"), "line 0001\n")?;
        std::fs::write(dir.path().join("out.log.1.gz.tmp"), "half")?;
        let mut file = LogFile::new(path.clone(), Some(1 << 20), 5);
        file.compress = true;
        let mut writers = Writers::default();
        writers.write(&file, "line 0003\n");
        writers.settle();
        assert_eq!(gunzip(&gz(&numbered(&path, 2)))?, "line 0001\n");
        assert_eq!(gunzip(&gz(&numbered(&path, 1)))?, "line 0002\n");
        assert_eq!(all_lines(&path)?, [1, 2, 3]);
        assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
        Ok(())
    }

    #[test]
    fn rotation_by_time_happens_once_the_schedule_fires_and_skips_empty_files() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut file = LogFile::new(dir.path().join("out.log"), None, 5);
        file.interval = Some(Schedule::parse("* * * * *").map_err(std::io::Error::other)?);
        let mut writers = Writers::default();
        writers.write(&file, "line 0000\n");
        let now = SystemTime::now();
        writers.rotate_due(now);
        assert!(!numbered(&file.path, 1).exists(), "not before the next minute");
        // The next minute has begun (at most 60 s from now): rotated.
        writers.rotate_due(now + std::time::Duration::from_secs(61));
        assert_eq!(std::fs::read_to_string(numbered(&file.path, 1))?, "line 0000\n");
        assert_eq!(std::fs::read_to_string(&file.path)?, "");
        // An empty file is not rotated, only rescheduled.
        writers.rotate_due(now + std::time::Duration::from_secs(200));
        assert!(!numbered(&file.path, 2).exists());
        writers.write(&file, "line 0001\n");
        assert_eq!(all_lines(&file.path)?, [0, 1]);
        Ok(())
    }

    #[test]
    fn truncate_empties_through_the_open_handle() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = LogFile::new(dir.path().join("out.log"), Some(200), 5);
        let mut writers = Writers::default();
        for n in 0..50 {
            writers.write(&file, &format!("line {n:04}\n"));
        }
        assert!(numbered(&file.path, 1).exists());
        assert!(writers.truncate(&file.path)?);
        writers.write(&file, "line 0050\n");
        // Appends start again at 0, and the size is counted from there.
        assert_eq!(std::fs::read_to_string(&file.path)?, "line 0050\n");
        assert!(numbered(&file.path, 1).exists(), "rotated files are kept");
        let other = dir.path().join("closed.log");
        std::fs::write(&other, "old\n")?;
        assert!(writers.truncate(&other)?);
        assert_eq!(std::fs::read_to_string(&other)?, "");
        assert!(!writers.truncate(&dir.path().join("missing.log"))?);
        Ok(())
    }
}
