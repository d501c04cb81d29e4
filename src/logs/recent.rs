//! Recent worker output, kept in memory per app whether or not it also goes to files: what
//! `GET /api/logs` and `corral logs` (without log files) show.
//!
//! Bounded twice: at most [`LINES`] lines and [`BYTES`] bytes of text per app, oldest dropped
//! first, so a worker printing megabytes costs a fixed amount of memory. Lines arrive already
//! capped at 16 KiB by the output pumps.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::Stream;

/// Lines kept per app.
pub const LINES: usize = 1000;
/// Bytes of text kept per app.
pub const BYTES: usize = 1 << 20;

/// One line of worker output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// When it was read, milliseconds since the epoch.
    pub time_ms: u64,
    /// The app.
    pub app: String,
    /// The worker's slot.
    pub slot: usize,
    /// `out` or `err`.
    pub stream: String,
    /// The text, without its newline.
    pub text: String,
}

/// `lines` as a failure report shows them: a heading, then one indented `[app slot] text` line
/// each; empty without lines.
pub fn report(lines: &[LogLine]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let mut out = format!("its last output ({} line(s)):\n", lines.len());
    for line in lines {
        out.push_str(&format!("  [{} {}] {}\n", line.app, line.slot, line.text));
    }
    out
}

/// One app's recent output.
#[derive(Debug, Default)]
pub struct Recent {
    kept: Mutex<(VecDeque<LogLine>, usize)>,
}

impl Recent {
    /// Keeps `text`, written by `slot` of `app` on `stream`.
    pub fn push(&self, app: &str, slot: usize, stream: Stream, text: &str) {
        let time_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let line = LogLine {
            time_ms,
            app: app.to_owned(),
            slot,
            stream: match stream {
                Stream::Stdout => "out",
                Stream::Stderr => "err",
            }
            .to_owned(),
            text: text.to_owned(),
        };
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.1 += line.text.len();
        kept.0.push_back(line);
        while kept.0.len() > LINES || kept.1 > BYTES {
            match kept.0.pop_front() {
                Some(old) => kept.1 -= old.text.len(),
                None => break,
            }
        }
    }

    /// The last `n` lines, oldest first.
    pub fn last(&self, n: usize) -> Vec<LogLine> {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let skip = kept.0.len().saturating_sub(n);
        kept.0.iter().skip(skip).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_keeps_the_newest_lines_within_both_bounds() {
        let recent = Recent::default();
        for i in 0..LINES + 10 {
            recent.push("web", i % 2, Stream::Stdout, &format!("line {i}"));
        }
        let last = recent.last(usize::MAX);
        assert_eq!(last.len(), LINES);
        assert_eq!(last.last().map(|l| l.text.as_str()), Some("line 1009"));
        assert_eq!(recent.last(2).len(), 2);

        let big = "x".repeat(16 * 1024);
        for _ in 0..100 {
            recent.push("web", 0, Stream::Stderr, &big);
        }
        let last = recent.last(usize::MAX);
        assert!(last.iter().map(|l| l.text.len()).sum::<usize>() <= BYTES);
        assert_eq!(last.last().map(|l| l.stream.as_str()), Some("err"));
    }
}
