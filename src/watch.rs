//! `watch`: a rolling restart of an app when its files change (PM2's `watch`, without its
//! restart storms).
//!
//! One task per watching app, on the main runtime (never a proxy shard). File events come from
//! the `notify` crate (inotify on Linux; chosen because it is the maintained cross-platform
//! watcher every Rust file-watching tool uses, with no runtime of its own to carry). Directories
//! are watched one by one (non-recursive watches), walking the tree once and skipping ignored
//! directories, so `node_modules` never costs an inotify watch per directory; directories
//! created later are added as they appear.
//!
//! Debounced: the restart starts once nothing relevant has changed for `watch_delay`, so a
//! build that writes files for a minute causes one restart after it, not one per file. A
//! change during a restart leads to one more restart after it (debounced the same way), never
//! to a queue of them. A restart refused because a reload runs is tried again after the next
//! quiet period. Each restart is one `corral restart APP` (rolling: no failed request) and an
//! event, `watch_restart`, naming the first files that changed.
//!
//! Ignored, whatever `ignore_watch` says: corral's own log files (`out_file`, `error_file`,
//! `access_log`, with their slots, rotations and compressed copies), the config file (a change
//! there is for `corral reload`), and the runtime directory.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::admin::events::{Draft, Events, Kind};
use crate::config::{AppConfig, WatchConfig};
use crate::supervisor::Handle;

/// Directories watched per app at most (an inotify watch each).
const MAX_DIRS: usize = 20_000;
/// Changed paths named in the event and the log.
const NAMED: usize = 5;

/// What a watcher must never react to, besides `ignore_watch`.
#[derive(Debug, Clone, Default)]
pub struct Own {
    /// Paths ignored with everything under them (the config file, the runtime directory).
    pub paths: Vec<PathBuf>,
    /// Log files as configured: each covers its slots (`web-out-0.log`), rotations (`.1`,
    /// `.1.gz`) and the files a rotation makes on its way.
    pub logs: Vec<PathBuf>,
}

impl Own {
    /// corral's own files for `app` of the config at `config_path`, and `runtime_dir`.
    pub fn of(app: &AppConfig, config_path: &Path, runtime_dir: &Path) -> Own {
        let logs = [&app.logs.out_file, &app.logs.error_file]
            .into_iter()
            .flatten()
            .chain(app.access_log.as_ref().map(|a| &a.path))
            .cloned()
            .collect();
        Own {
            paths: vec![config_path.to_path_buf(), runtime_dir.to_path_buf()],
            logs,
        }
    }

    /// Whether `path` is one of these files.
    fn covers(&self, path: &Path) -> bool {
        self.paths.iter().any(|own| path.starts_with(own)) || self.logs.iter().any(|log| is_log_of(path, log))
    }
}

/// Whether `path` is the log file `log`, one of its slots (`STEM-N.EXT`), or one of their
/// rotations (anything after `.EXT.`): in the same directory, never a file that merely starts
/// with the same letters (`out.log` does not cover `output.js`).
fn is_log_of(path: &Path, log: &Path) -> bool {
    if path.parent() != log.parent() {
        return false;
    }
    let (Some(name), Some(stem)) = (
        path.file_name().and_then(|n| n.to_str()),
        log.file_stem().and_then(|s| s.to_str()),
    ) else {
        return false;
    };
    let ext = log
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| format!(".{e}"))
        .unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(stem) else {
        return false;
    };
    if let Some(slot) = rest.strip_prefix('-') {
        let digits = slot.len() - slot.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return false;
        }
        rest = &slot[digits..];
    }
    match rest.strip_prefix(ext.as_str()) {
        Some(tail) => tail.is_empty() || tail.starts_with('.'),
        None => false,
    }
}

/// Whether `path` is ignored: one of corral's own files, or matched by a pattern of `ignore`
/// (a name matches any component, `*` matches within one, a pattern with `/` is a path under
/// `cwd`).
pub fn ignored(path: &Path, cwd: &Path, ignore: &[String], own: &Own) -> bool {
    if own.covers(path) {
        return true;
    }
    let relative = path.strip_prefix(cwd).unwrap_or(path);
    ignore.iter().any(|pattern| {
        if pattern.contains('/') {
            let pattern = pattern.trim_start_matches("./").trim_end_matches('/');
            let text = relative.to_string_lossy();
            text == pattern || text.starts_with(&format!("{pattern}/")) || glob(pattern, &text)
        } else {
            relative
                .components()
                .any(|c| glob(pattern, &c.as_os_str().to_string_lossy()))
        }
    })
}

/// `*` (any run of characters) and `?` (one), the rest literal.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Watches `app`'s files and restarts it through `supervisor` after changes, until `stop`.
/// Fails (with the reason) only when not one path could be watched.
pub fn spawn(
    app: &AppConfig,
    own: Own,
    supervisor: Handle,
    events: Arc<Events>,
    stop: CancellationToken,
) -> Result<(), String> {
    let Some(config) = app.watch.clone() else {
        return Ok(());
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let _closed = tx.send(event);
    })
    .map_err(|e| format!("app {:?}: watch: cannot start a file watcher: {e}", app.name))?;
    let cwd = app.cwd.clone();
    let mut dirs = 0;
    for root in &config.paths {
        dirs += add_tree(&mut watcher, root, &cwd, &config, &own, MAX_DIRS - dirs.min(MAX_DIRS));
    }
    if dirs == 0 {
        return Err(format!(
            "app {:?}: watch: none of {:?} could be watched",
            app.name, config.paths
        ));
    }
    info!(app = %app.name, directories = dirs, delay = ?config.delay, "watching files for changes");
    let task = Task {
        app: app.name.clone(),
        cwd,
        config,
        own,
        supervisor,
        events,
        dirs,
    };
    tokio::spawn(task.run(watcher, rx, stop));
    Ok(())
}

/// Watches `root` (a file, or a directory and the directories under it that are not ignored),
/// at most `budget` directories; how many were added.
fn add_tree(
    watcher: &mut impl Watcher,
    root: &Path,
    cwd: &Path,
    config: &WatchConfig,
    own: &Own,
    budget: usize,
) -> usize {
    let mut added = 0;
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        if added >= budget {
            warn!(root = %root.display(), "watch: more than {MAX_DIRS} directories; the rest are not watched (add them to ignore_watch)");
            break;
        }
        if ignored(&dir, cwd, &config.ignore, own) {
            continue;
        }
        match watcher.watch(&dir, RecursiveMode::NonRecursive) {
            Ok(()) => added += 1,
            Err(e) => {
                warn!(path = %dir.display(), error = %e, "watch: cannot watch");
                continue;
            }
        }
        // A symlink is watched where it points, but not walked (it could loop).
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(entry.path());
            }
        }
    }
    added
}

struct Task {
    app: String,
    cwd: PathBuf,
    config: WatchConfig,
    own: Own,
    supervisor: Handle,
    events: Arc<Events>,
    /// Directories watched so far (at most [`MAX_DIRS`] in all).
    dirs: usize,
}

impl Task {
    async fn run(
        mut self,
        mut watcher: notify::RecommendedWatcher,
        mut rx: mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
        stop: CancellationToken,
    ) {
        let mut changed: BTreeSet<PathBuf> = BTreeSet::new();
        let mut quiet_at: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                event = rx.recv() => {
                    let Some(event) = event else { return };
                    if self.note(&mut watcher, event, &mut changed) {
                        quiet_at = Some(Instant::now() + self.config.delay);
                    }
                }
                _ = tokio::time::sleep_until(quiet_at.unwrap_or_else(Instant::now)), if quiet_at.is_some() => {
                    quiet_at = None;
                    if !self.restart(&mut changed, &stop).await {
                        // Refused (a reload runs): try again after another quiet period.
                        quiet_at = Some(Instant::now() + self.config.delay);
                    }
                }
            }
        }
    }

    /// Records what `event` changed; true if anything relevant did. New directories are
    /// watched too.
    fn note(
        &mut self,
        watcher: &mut notify::RecommendedWatcher,
        event: notify::Result<notify::Event>,
        changed: &mut BTreeSet<PathBuf>,
    ) -> bool {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                warn!(app = %self.app, error = %e, "watch: the file watcher reported an error");
                return false;
            }
        };
        if matches!(event.kind, EventKind::Access(_)) {
            return false;
        }
        let mut relevant = false;
        for path in event.paths {
            if ignored(&path, &self.cwd, &self.config.ignore, &self.own) {
                continue;
            }
            // A directory made, or moved in (`mv dist.tmp dist`): watched from now on, within
            // the budget of watches.
            let arrived = matches!(
                event.kind,
                EventKind::Create(_) | EventKind::Modify(notify::event::ModifyKind::Name(_))
            );
            if arrived && path.is_dir() {
                let budget = MAX_DIRS.saturating_sub(self.dirs);
                self.dirs += add_tree(watcher, &path, &self.cwd, &self.config, &self.own, budget);
            }
            debug!(app = %self.app, path = %path.display(), kind = ?event.kind, "watch: changed");
            changed.insert(path);
            relevant = true;
        }
        relevant
    }

    /// One rolling restart for `changed` (emptied); false if the supervisor refused it for now.
    async fn restart(&self, changed: &mut BTreeSet<PathBuf>, stop: &CancellationToken) -> bool {
        let names: Vec<String> = changed
            .iter()
            .take(NAMED)
            .map(|p| p.strip_prefix(&self.cwd).unwrap_or(p).display().to_string())
            .collect();
        let more = changed.len().saturating_sub(NAMED);
        let what = if more > 0 {
            format!("{} and {more} more", names.join(", "))
        } else {
            names.join(", ")
        };
        let (progress, mut lines) = mpsc::unbounded_channel();
        let restart = self.supervisor.restart(Some(self.app.clone()), progress);
        tokio::pin!(restart);
        let outcome = loop {
            tokio::select! {
                _ = stop.cancelled() => return true,
                outcome = &mut restart => break outcome,
                Some(line) = lines.recv() => debug!(app = %self.app, "watch restart: {line}"),
            }
        };
        match outcome {
            Ok(message) => {
                changed.clear();
                self.events
                    .emit(Draft::new(Kind::WatchRestart, &self.app).message(format!("changed: {what}; {message}")));
                true
            }
            Err(e) if e.code == crate::supervisor::ErrorCode::Busy => {
                debug!(app = %self.app, "watch: a reload runs; restarting after it");
                false
            }
            Err(e) => {
                changed.clear();
                warn!(app = %self.app, error = %e.message, "watch: the restart after {what} failed");
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_patterns_paths_and_own_files_are_ignored() {
        let cwd = Path::new("/srv/app");
        let ignore: Vec<String> = ["node_modules", ".git", "*.tmp", "public/uploads"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let own = Own {
            paths: vec![PathBuf::from("/srv/app/proxy.toml"), PathBuf::from("/run/corral")],
            logs: vec![
                PathBuf::from("/srv/app/logs/web-out.log"),
                PathBuf::from("/srv/app/out.log"),
            ],
        };
        let is = |p: &str| ignored(Path::new(p), cwd, &ignore, &own);
        assert!(is("/srv/app/node_modules/x/index.js"));
        assert!(is("/srv/app/src/.git/HEAD"));
        assert!(is("/srv/app/src/a.tmp"));
        assert!(is("/srv/app/public/uploads/cat.png"));
        assert!(is("/srv/app/logs/web-out-0.log.1.gz"));
        assert!(is("/srv/app/logs/web-out.log"));
        assert!(is("/srv/app/logs/web-out-12.log.rotating-1700000000-3"));
        assert!(is("/srv/app/out-1.log"));
        assert!(is("/srv/app/proxy.toml"));
        // Files that only start like a log file, or a config, are the app's.
        assert!(!is("/srv/app/output/index.js"));
        assert!(!is("/srv/app/outbound.js"));
        assert!(!is("/srv/app/out-of-band.log"));
        assert!(!is("/srv/app/logs/web-out.logger.js"));
        assert!(!is("/srv/app/proxy.toml.d/x"));
        assert!(!is("/srv/app/src/server.js"));
        assert!(!is("/srv/app/public/index.html"));
        assert!(!is("/srv/app/logs/other.log"));
        assert!(glob("a*b?c", "axxbyc") && !glob("a*b?c", "axxbc") && glob("*", ""));
    }
}
