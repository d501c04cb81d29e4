//! Slots a reload left behind: after a reload with `reload_keep_old = false` stopped partway,
//! the slots it had not reached keep the old generation, and the app's config is the new one.
//! Each such slot carries a [`Lagging`]: the config and generation it runs, so that a crash
//! restarts *that* (not the new build the reload did not get to, nor a mix).
//!
//! # The old command's files
//!
//! A deploy often removes the old build once it has shipped the new one (a release directory
//! deleted, `dist/` rebuilt), and the old command cannot run again: restarting it would
//! crash-loop, each attempt failing in the same way until `max_restarts` parks the slot. So a
//! restart of a lagging slot first checks what the old command needs: its `cwd`, its program
//! (a path relative to `cwd`, or found on `PATH`) and each argument that named a file when
//! the reload stopped (`node dist/server.js`: the script). While they exist the old command is
//! restarted. When one is gone, the slot moves to the app's current config and generation
//! instead: that build already serves the replaced slots, so it is the one the operator has
//! shipped, and running it keeps the slot's capacity. corral logs a warning naming the
//! missing file, and the slot's `last_exit` (in `status --json` and `corral describe`) says
//! so; the worker's generation in `status` shows the move. Only presence is checked, not
//! content: a build written over the old one in place is started with the old config.
//!
//! A later reload that replaces every slot, or any worker started in the slot from the app's
//! current config (`scale`, `start`), ends the lag.

use std::path::PathBuf;
use std::sync::Arc;

use tracing::warn;

use crate::config::AppConfig;
use crate::supervisor::Supervisor;

/// The generation a slot kept when a reload stopped before reaching it.
#[derive(Debug)]
pub(in crate::supervisor) struct Lagging {
    /// The config its workers run.
    pub(in crate::supervisor) spec: Arc<AppConfig>,
    /// Their generation.
    pub(in crate::supervisor) generation: u64,
    /// The files its command ran, found when the reload stopped.
    files: Vec<PathBuf>,
}

impl Lagging {
    /// The slot runs `spec` of `generation`; its command's files are looked up now.
    pub(in crate::supervisor) fn of(spec: Arc<AppConfig>, generation: u64) -> Lagging {
        let files = command_files(&spec);
        Lagging {
            spec,
            generation,
            files,
        }
    }

    /// What the old command needs and is no longer on disk, if anything.
    fn missing(&self) -> Option<String> {
        if !self.spec.cwd.is_dir() {
            return Some(format!(
                "its working directory {} no longer exists",
                self.spec.cwd.display()
            ));
        }
        self.files
            .iter()
            .find(|file| !file.is_file())
            .map(|file| format!("{} no longer exists on disk", file.display()))
    }
}

/// The files `spec`'s command runs: its program, and each argument naming a file (relative to
/// `cwd`), such as the script.
fn command_files(spec: &AppConfig) -> Vec<PathBuf> {
    let Some((program, args)) = spec.command.split_first() else {
        return Vec::new();
    };
    let program = if program.contains('/') {
        Some(spec.cwd.join(program))
    } else {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    };
    let scripts = args
        .iter()
        .filter(|arg| !arg.starts_with('-'))
        .map(|arg| spec.cwd.join(arg))
        .filter(|path| path.is_file());
    program.into_iter().chain(scripts).collect()
}

impl Supervisor {
    /// The config and generation a new worker of `slot` runs outside a reload: the app's, or,
    /// for a slot a reload left behind, the one it ran while its command is still on disk
    /// (see the module docs for when it is not).
    pub(in crate::supervisor) fn slot_spec(&mut self, app: usize, slot: usize) -> (Arc<AppConfig>, u64) {
        let state = &mut self.apps[app];
        let current = (Arc::clone(&state.config), state.generation);
        let Some(lag) = state.slots.get_mut(slot) else {
            return current;
        };
        let Some(lagging) = &lag.lagging else {
            return current;
        };
        let Some(what) = lagging.missing() else {
            return (Arc::clone(&lagging.spec), lagging.generation);
        };
        let note = format!(
            "not restarted with generation {} (the command it ran before a reload stopped partway): {what}; it runs generation {} (the app's current command) instead",
            lagging.generation, current.1
        );
        warn!(app = %state.config.name, slot, "slot {slot} {note}");
        lag.last_exit = Some(match lag.last_exit.take() {
            Some(exit) => format!("{exit}; {note}"),
            None => note,
        });
        lag.lagging = None;
        current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cwd: &std::path::Path, command: &[&str]) -> Arc<AppConfig> {
        let text = format!(
            "[[app]]\nname = \"a\"\ncommand = {:?}\ncwd = {:?}\n",
            command,
            cwd.display().to_string()
        );
        let config = crate::config::Config::from_str(&text, &cwd.join("proxy.toml")).expect("valid");
        Arc::new(config.apps[0].clone())
    }

    #[test]
    fn the_old_command_is_missing_once_its_script_or_cwd_is_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let release = dir.path().join("v1");
        std::fs::create_dir(&release).expect("mkdir");
        std::fs::write(release.join("server.js"), "").expect("write");
        let lagging = Lagging::of(spec(&release, &["sh", "--flag", "server.js", "production"]), 1);
        // `sh` from PATH and the script; neither the option nor the word that is no file.
        assert_eq!(lagging.files.len(), 2, "{:?}", lagging.files);
        assert_eq!(lagging.missing(), None);

        std::fs::remove_file(release.join("server.js")).expect("rm");
        let what = lagging.missing().expect("the script is gone");
        assert!(what.contains("server.js no longer exists on disk"), "{what}");

        std::fs::remove_dir(&release).expect("rmdir");
        let what = lagging.missing().expect("the cwd is gone");
        assert!(what.contains("working directory"), "{what}");
    }
}
