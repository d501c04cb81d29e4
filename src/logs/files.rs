//! Worker log files: `out_file` / `error_file`, timestamped lines, size-based rotation.
//!
//! Only the output thread ([`super::OutputSink`]) touches the files, so writing never blocks the
//! proxy or the supervisor. Rotation is rename-and-reopen: `web-out.log` becomes
//! `web-out.log.1` (and `.1` becomes `.2`, ... up to `log_retain`, the oldest dropped), and a new
//! `web-out.log` is opened for the next line. Nothing is copied and nothing truncated, so no line
//! is lost in between (pm2-logrotate's copy-and-truncate loses the lines written during the
//! copy).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// One log file and its rotation policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFile {
    /// Where lines go.
    pub path: PathBuf,
    /// Rotate when the file reaches this size (bytes); `None`: never.
    pub max_size: Option<u64>,
    /// Rotated files kept (`path.1` .. `path.N`).
    pub retain: usize,
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

/// The open files of the output thread.
#[derive(Debug, Default)]
pub struct Writers {
    open: HashMap<PathBuf, (File, u64)>,
    failed: HashMap<PathBuf, String>,
}

impl Writers {
    /// Appends `line` to `file`, rotating first if it has reached its size.
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
                    let size = self.open.get(&file.path).map_or(0, |(_, size)| *size);
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

    fn write_bytes(&mut self, file: &LogFile, bytes: &[u8]) -> bool {
        if let Err(e) = self.try_write(file, bytes) {
            let message = e.to_string();
            // Say it once per file and cause, not once per line.
            if self.failed.get(&file.path) != Some(&message) {
                tracing::error!(path = %file.path.display(), error = %message, "cannot write log file");
                self.failed.insert(file.path.clone(), message);
            }
            self.open.remove(&file.path);
            return false;
        }
        true
    }

    fn try_write(&mut self, file: &LogFile, line: &[u8]) -> std::io::Result<()> {
        if !self.open.contains_key(&file.path) {
            if let Some(dir) = file.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let handle = OpenOptions::new().create(true).append(true).open(&file.path)?;
            let size = handle.metadata()?.len();
            self.open.insert(file.path.clone(), (handle, size));
        }
        let over = file
            .max_size
            .is_some_and(|max| self.open.get(&file.path).is_some_and(|(_, size)| *size >= max));
        if over {
            self.open.remove(&file.path);
            rotate(&file.path, file.retain)?;
            let handle = OpenOptions::new().create(true).append(true).open(&file.path)?;
            self.open.insert(file.path.clone(), (handle, 0));
        }
        let (handle, size) = self.open.get_mut(&file.path).expect("UNWRAP: opened above");
        handle.write_all(line)?;
        *size += line.len() as u64;
        self.failed.remove(&file.path);
        Ok(())
    }
}

fn numbered(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// `path` -> `path.1` -> `path.2` ... keeping `retain` rotated files.
fn rotate(path: &Path, retain: usize) -> std::io::Result<()> {
    if retain == 0 {
        return std::fs::remove_file(path);
    }
    match std::fs::remove_file(numbered(path, retain)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    for n in (1..retain).rev() {
        match std::fs::rename(numbered(path, n), numbered(path, n + 1)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    std::fs::rename(path, numbered(path, 1))
}

/// A line timestamp in PM2's `log_date_format` notation (moment.js tokens: `YYYY MM DD HH mm ss
/// SSS Z`; anything else is copied), in UTC.
pub fn timestamp(format: &str, now: SystemTime) -> String {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let (hour, minute, second) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let millis = since.subsec_millis();
    let mut out = String::with_capacity(format.len() + 8);
    let mut rest = format;
    let tokens: [(&str, String); 8] = [
        ("YYYY", format!("{year:04}")),
        ("SSS", format!("{millis:03}")),
        ("MM", format!("{month:02}")),
        ("DD", format!("{day:02}")),
        ("HH", format!("{hour:02}")),
        ("mm", format!("{minute:02}")),
        ("ss", format!("{second:02}")),
        ("Z", "+00:00".to_owned()),
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
        let file = LogFile {
            path: dir.path().join("access.log"),
            max_size: Some(100),
            retain: 100,
        };
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
        let file = LogFile {
            path: dir.path().join("out.log"),
            max_size: Some(100),
            retain: 2,
        };
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
}
