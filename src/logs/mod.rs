//! Logging: corral's own events through `tracing`, and the workers' output.
//!
//! corral's events go to stderr, human-readable (coloured on a terminal) or JSON lines
//! (`--log-format json` or `CORRAL_LOG_FORMAT=json`); `RUST_LOG`/`CORRAL_LOG` filter them.
//!
//! Workers' stdout and stderr are read line by line and printed by `corral run` on its own
//! stdout and stderr, each line prefixed with `app.slot | `. Printing goes through one writer
//! thread fed by a bounded channel: a slow terminal or a full pipe back-pressures the worker
//! that is writing (as if it wrote to the terminal itself), never the proxy, and lines from
//! different workers are never interleaved mid-line. The last lines of each worker are also
//! kept in memory ([`OutputTail`]) so a worker that fails can be reported with what it said.
//! With `out_file` / `error_file`, lines go to those files instead, timestamped (local time
//! with its offset, or UTC with `log_utc`), rotated by size and time and maybe gzipped
//! ([`files`]); the same thread empties them for `corral flush` and, about once a second,
//! rotates the files whose `log_rotate_interval` time has come. The per-app access logs
//! ([`access`]) have a writer thread of their own, with the same files, rotation and zone.

pub mod access;
pub mod files;
pub mod recent;
pub mod tail;

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};

use std::path::PathBuf;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use tokio::sync::{mpsc, oneshot};
use tracing_subscriber::EnvFilter;

/// Lines kept per worker for error reports.
const TAIL_LINES: usize = 20;
/// Longer lines are split: a worker printing megabytes without a newline must not grow memory.
const MAX_LINE: usize = 16 * 1024;

/// Format of corral's own log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable, coloured on a terminal.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global tracing subscriber.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("CORRAL_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless: the first subscriber stays.
    let result = match format {
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .try_init(),
    };
    if let Err(e) = result {
        eprintln!("corral: logging was already set up: {e}");
    }
}

/// Which of a worker's streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The worker's stdout.
    Stdout,
    /// The worker's stderr.
    Stderr,
}

/// The last lines a worker printed.
#[derive(Debug, Default)]
pub struct OutputTail {
    lines: Mutex<VecDeque<String>>,
}

impl OutputTail {
    fn push(&self, line: &str) {
        // Short critical section, no await inside: std Mutex is right here.
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        if lines.len() == TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line.to_owned());
    }

    /// A copy of the kept lines, oldest first.
    pub fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// Where a worker's lines are kept in memory for `GET /api/logs` (besides `target`).
#[derive(Debug, Clone)]
pub struct Keep {
    /// The app's recent output.
    pub recent: Arc<recent::Recent>,
    /// The app.
    pub app: Arc<str>,
    /// The worker's slot.
    pub slot: usize,
    /// Which of its streams.
    pub stream: Stream,
}

/// Where one stream of a worker's output goes.
#[derive(Debug, Clone)]
pub enum Target {
    /// corral's own stdout or stderr, each line prefixed with `app.slot | `.
    Terminal(Stream),
    /// A log file, each line prefixed with a timestamp.
    File {
        /// The file and its rotation.
        file: Arc<files::LogFile>,
        /// `log_date_format`.
        date_format: Arc<str>,
        /// Local time or UTC (`log_utc`).
        zone: files::Zone,
        /// Merged files also name the slot on each line.
        merged: bool,
    },
}

enum Line {
    Terminal(Stream, String),
    File(Arc<files::LogFile>, String),
    /// Empty these files (`corral flush`); the answer is how many there were.
    Flush(Vec<PathBuf>, oneshot::Sender<usize>),
    /// Time to look for files whose `log_rotate_interval` has come.
    Tick,
}

/// How often the output thread checks for rotations by time.
const TICK: std::time::Duration = std::time::Duration::from_secs(1);

/// Where worker output goes: a handle to the writer thread. Cheap to clone.
#[derive(Clone)]
pub struct OutputSink {
    tx: mpsc::Sender<Line>,
}

impl std::fmt::Debug for OutputSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutputSink")
    }
}

impl OutputSink {
    /// Starts the writer thread that prints worker lines on corral's stdout and stderr.
    pub fn start() -> OutputSink {
        let (tx, mut rx) = mpsc::channel::<Line>(1024);
        let spawned = std::thread::Builder::new().name("corral-output".into()).spawn(move || {
            let (stdout, stderr) = (std::io::stdout(), std::io::stderr());
            let mut files = files::Writers::default();
            while let Some(line) = rx.blocking_recv() {
                // A closed stdout (corral piped into `head`) must not stop supervision.
                let _ignored = match line {
                    Line::Terminal(Stream::Stdout, text) => stdout.lock().write_all(text.as_bytes()),
                    Line::Terminal(Stream::Stderr, text) => stderr.lock().write_all(text.as_bytes()),
                    Line::File(file, text) => {
                        files.write(&file, &text);
                        Ok(())
                    }
                    Line::Flush(paths, done) => {
                        let _asker_gone = done.send(flush(&mut files, &paths));
                        Ok(())
                    }
                    Line::Tick => {
                        files.rotate_due(std::time::SystemTime::now());
                        Ok(())
                    }
                };
            }
            files.settle();
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the output thread; worker output is discarded");
        }
        // The clock of rotations by time. It holds a weak sender, so it does not keep the
        // thread alive: once every sink is gone, it ends too.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let ticks = tx.downgrade();
            runtime.spawn(async move {
                let mut every = tokio::time::interval(TICK);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    let Some(tx) = ticks.upgrade() else { return };
                    // Full: lines are flowing, and each write checks its own file's time.
                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(Line::Tick) {
                        return;
                    }
                }
            });
        }
        OutputSink { tx }
    }

    /// Empties the log files at `paths` between two lines (those that exist); the answer is how
    /// many were emptied.
    pub async fn flush(&self, paths: Vec<PathBuf>) -> Option<usize> {
        let (done, answer) = oneshot::channel();
        self.tx.send(Line::Flush(paths, done)).await.ok()?;
        answer.await.ok()
    }

    /// Reads `reader` line by line until EOF, printing each line with `prefix` and keeping it
    /// in `tail`.
    pub async fn pump(
        self,
        reader: impl AsyncRead + Unpin,
        target: Target,
        prefix: String,
        tail: Arc<OutputTail>,
        keep: Keep,
    ) {
        let mut reader = BufReader::new(reader);
        let mut line = Vec::with_capacity(256);
        loop {
            line.clear();
            match read_line_capped(&mut reader, &mut line).await {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(%prefix, error = %e, "worker output read failed");
                    return;
                }
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\n', '\r']);
            tail.push(text);
            keep.recent.push(&keep.app, keep.slot, keep.stream, text);
            let line = match &target {
                Target::Terminal(stream) => Line::Terminal(*stream, format!("{prefix} | {text}\n")),
                Target::File {
                    file,
                    date_format,
                    zone,
                    merged,
                } => {
                    let at = files::timestamp_in(date_format, std::time::SystemTime::now(), *zone);
                    let text = if *merged {
                        format!("{at} {prefix} | {text}\n")
                    } else {
                        format!("{at} {text}\n")
                    };
                    Line::File(Arc::clone(file), text)
                }
            };
            if self.tx.send(line).await.is_err() {
                return;
            }
        }
    }
}

/// Empties each of `paths` that exists, saying what failed; how many were emptied.
fn flush(files: &mut files::Writers, paths: &[PathBuf]) -> usize {
    let mut emptied = 0;
    for path in paths {
        match files.truncate(path) {
            Ok(true) => emptied += 1,
            Ok(false) => {}
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "flush: cannot empty the log file"),
        }
    }
    emptied
}

/// Reads up to and including a newline, or `MAX_LINE` bytes, whichever comes first.
async fn read_line_capped(reader: &mut (impl AsyncBufReadExt + Unpin), line: &mut Vec<u8>) -> std::io::Result<usize> {
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(line.len());
        }
        let room = MAX_LINE - line.len();
        let (take, done) = match available.iter().take(room).position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len().min(room), available.len() >= room),
        };
        line.extend_from_slice(&available[..take]);
        reader.consume(take);
        if done {
            return Ok(line.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn long_lines_are_split_and_the_tail_is_bounded() {
        let mut input = Vec::new();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        input.push(b'\n');
        for i in 0..30 {
            input.extend(format!("line {i}\r\n").bytes());
        }
        input.extend(b"no newline at the end");
        let mut reader = BufReader::new(&input[..]);
        let mut lines = Vec::new();
        let mut line = Vec::new();
        while read_line_capped(&mut reader, &mut line).await.expect("in-memory read") > 0 {
            lines.push(String::from_utf8_lossy(&line).into_owned());
            line.clear();
        }
        assert_eq!(lines[0].len(), MAX_LINE);
        assert_eq!(lines[1], "xxxxxxxxxx\n");
        assert_eq!(lines.last().map(String::as_str), Some("no newline at the end"));
        assert_eq!(lines.len(), 2 + 30 + 1);

        let tail = OutputTail::default();
        for l in &lines {
            tail.push(l);
        }
        let kept = tail.lines();
        assert_eq!(kept.len(), TAIL_LINES);
        assert_eq!(kept.last().map(String::as_str), Some("no newline at the end"));
    }
}
