//! `corral logs`: the last lines of the worker log files, and following them as they grow
//! (through rotations, like `tail -F`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

/// A log file shown under a label such as `web.0 out`.
#[derive(Debug, Clone)]
pub struct Source {
    /// What to print before each line.
    pub label: String,
    /// The file.
    pub path: PathBuf,
}

/// The last `n` lines of a file (at most the last 1 MiB of it is read).
pub fn last_lines(path: &PathBuf, n: usize) -> std::io::Result<Vec<String>> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(1 << 20);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    if start > 0 && !lines.is_empty() {
        lines.remove(0); // probably cut in the middle
    }
    let skip = lines.len().saturating_sub(n);
    Ok(lines.split_off(skip))
}

/// Prints what is appended to `sources` until the process is interrupted. A file that shrinks
/// or is replaced (rotation) is read again from its start.
pub fn follow(sources: &[Source], out: &mut impl Write) -> std::io::Result<()> {
    // (inode, offset) per source; a missing file waits to appear.
    let mut positions: Vec<Option<(u64, u64)>> = sources
        .iter()
        .map(|s| std::fs::metadata(&s.path).ok().map(|m| (m.ino(), m.len())))
        .collect();
    let mut pending: Vec<String> = vec![String::new(); sources.len()];
    loop {
        for (i, source) in sources.iter().enumerate() {
            let Ok(meta) = std::fs::metadata(&source.path) else {
                continue;
            };
            let (inode, offset) = match positions[i] {
                Some((inode, offset)) if inode == meta.ino() && offset <= meta.len() => (inode, offset),
                _ => (meta.ino(), 0),
            };
            if meta.len() > offset {
                let mut file = File::open(&source.path)?;
                file.seek(SeekFrom::Start(offset))?;
                let mut bytes = Vec::new();
                file.read_to_end(&mut bytes)?;
                pending[i].push_str(&String::from_utf8_lossy(&bytes));
                while let Some(end) = pending[i].find('\n') {
                    let line: String = pending[i].drain(..=end).collect();
                    write!(out, "{} | {line}", source.label)?;
                }
                out.flush()?;
                positions[i] = Some((inode, offset + bytes.len() as u64));
            } else {
                positions[i] = Some((inode, offset));
            }
        }
        // A CLI polling loop, not synchronisation: the files are written by another process.
        std::thread::sleep(Duration::from_millis(200));
    }
}
