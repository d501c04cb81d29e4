//! The runtime directory: where the control socket and the state file live, and the checks
//! that make it safe to trust what is in it.
//!
//! Everything in this directory is trusted: the control socket is where `corral stop` sends its
//! stop, and the state file names processes that a later run may kill. So the directory must be
//! ours alone: corral creates it with mode 0700 when it is missing, and before using it (to run,
//! or to talk to a running instance) checks with `lstat` that it is a directory, not a symbolic
//! link, owned by corral's effective uid, with mode exactly 0700. Anything else is refused with
//! the path and what is wrong; corral never repairs a directory it did not create (a mode or
//! owner it did not set means someone else was there first).
//!
//! Which directory ([`resolve`]): `$CORRAL_RUNTIME_DIR`; else `$RUNTIME_DIRECTORY` (set by
//! systemd for `RuntimeDirectory=`); else, as root, `/run/corral` (the unit's directory, so
//! `corral status` from a root shell finds the unit's instance); else `$XDG_RUNTIME_DIR/corral`;
//! else `/tmp/corral-EUID`.

use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The runtime directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeDirError {
    /// It exists but someone else could have written to it.
    #[error("runtime directory {} {why}: refusing to use it", path.display())]
    Unsafe {
        /// The directory.
        path: PathBuf,
        /// What is wrong ("is a symbolic link", "has mode 0755, not 0700", ...).
        why: String,
    },
    /// It could not be created or inspected.
    #[error("cannot {step} runtime directory {}: {source}", path.display())]
    Io {
        /// "create" or "inspect".
        step: &'static str,
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// The runtime directory for this process (see the module docs for the order).
pub fn dir() -> PathBuf {
    resolve(|name| std::env::var_os(name), nix::unistd::geteuid().as_raw())
}

/// The runtime directory given the environment (`var`) and the effective uid.
pub fn resolve(var: impl Fn(&str) -> Option<OsString>, euid: u32) -> PathBuf {
    let set = |name: &str| var(name).filter(|v| !v.is_empty());
    if let Some(dir) = set("CORRAL_RUNTIME_DIR") {
        return PathBuf::from(dir);
    }
    // systemd joins several `RuntimeDirectory=` entries with ':'; the unit has one.
    if let Some(dirs) = set("RUNTIME_DIRECTORY") {
        let bytes = dirs.as_encoded_bytes();
        let first = bytes.split(|&b| b == b':').next().unwrap_or(bytes);
        if !first.is_empty() {
            return PathBuf::from(OsString::from(String::from_utf8_lossy(first).into_owned()));
        }
    }
    if euid == 0 {
        return PathBuf::from("/run/corral");
    }
    if let Some(xdg) = set("XDG_RUNTIME_DIR") {
        return PathBuf::from(xdg).join("corral");
    }
    PathBuf::from(format!("/tmp/corral-{euid}"))
}

/// Creates `dir` (mode 0700; missing parents with the default mode) unless it exists, then
/// [`check`]s it. For `corral run`.
pub fn ensure(dir: &Path) -> Result<(), RuntimeDirError> {
    use std::os::unix::fs::DirBuilderExt;
    let io = |step, source| RuntimeDirError::Io {
        step,
        path: dir.to_path_buf(),
        source,
    };
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| io("create", e))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {
            // Ours: the umask may have taken bits away from 0700, so set it exactly. Through a
            // descriptor opened without following links, so it is the directory just made.
            let fd = nix::fcntl::open(
                dir,
                nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(|e| io("create", e.into()))?;
            nix::sys::stat::fchmod(&fd, nix::sys::stat::Mode::from_bits_truncate(0o700))
                .map_err(|e| io("create", e.into()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("create", e)),
    }
    match check(dir)? {
        Presence::Present => Ok(()),
        Presence::Missing => Err(io("create", std::io::ErrorKind::NotFound.into())),
    }
}

/// Whether the runtime directory exists (it passed every check if it does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// It exists, and is safe.
    Present,
    /// It does not exist: no instance can be running.
    Missing,
}

/// Checks `dir` with `lstat`: a directory, not a symbolic link, owned by our effective uid,
/// mode exactly 0700. For every command that uses it.
pub fn check(dir: &Path) -> Result<Presence, RuntimeDirError> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Presence::Missing),
        Err(source) => {
            return Err(RuntimeDirError::Io {
                step: "inspect",
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let euid = nix::unistd::geteuid().as_raw();
    let problem = verdict(&meta, euid);
    match problem {
        None => Ok(Presence::Present),
        Some(why) => Err(RuntimeDirError::Unsafe {
            path: dir.to_path_buf(),
            why,
        }),
    }
}

/// What is wrong with a runtime directory of this `lstat` metadata, if anything.
fn verdict(meta: &std::fs::Metadata, euid: u32) -> Option<String> {
    let kind = meta.file_type();
    if kind.is_symlink() {
        return Some("is a symbolic link".into());
    }
    if !kind.is_dir() {
        return Some("is not a directory".into());
    }
    if meta.uid() != euid {
        return Some(format!("is owned by uid {}, not {euid}", meta.uid()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode != 0o700 {
        return Some(format!("has mode {mode:04o}, not 0700"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| OsString::from(v))
    }

    #[test]
    fn the_override_then_systemd_then_root_then_xdg_then_tmp() {
        let all = [
            ("CORRAL_RUNTIME_DIR", "/a"),
            ("RUNTIME_DIRECTORY", "/run/corral:/run/other"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
        ];
        assert_eq!(resolve(env(&all), 1000), PathBuf::from("/a"));
        assert_eq!(resolve(env(&all[1..]), 1000), PathBuf::from("/run/corral"));
        assert_eq!(resolve(env(&all[2..]), 1000), PathBuf::from("/run/user/1000/corral"));
        assert_eq!(
            resolve(env(&all[2..]), 0),
            PathBuf::from("/run/corral"),
            "root: the unit's dir"
        );
        assert_eq!(resolve(env(&[]), 1000), PathBuf::from("/tmp/corral-1000"));
        assert_eq!(
            resolve(env(&[("CORRAL_RUNTIME_DIR", ""), ("XDG_RUNTIME_DIR", "")]), 7),
            PathBuf::from("/tmp/corral-7"),
            "empty variables are unset"
        );
    }

    #[test]
    fn only_a_0700_directory_of_ours_passes() -> Result<(), Box<dyn std::error::Error>> {
        let base = tempfile::tempdir()?;
        let dir = base.path().join("run");
        ensure(&dir)?;
        assert_eq!(check(&dir)?, Presence::Present);
        let euid = nix::unistd::geteuid().as_raw();
        let meta = std::fs::symlink_metadata(&dir)?;
        assert_eq!(
            verdict(&meta, euid.wrapping_add(1)),
            Some(format!("is owned by uid {euid}, not {}", euid.wrapping_add(1)))
        );

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750))?;
        let e = check(&dir).expect_err("0750 accepted").to_string();
        assert!(
            e.contains("has mode 0750, not 0700") && e.contains(&dir.display().to_string()),
            "{e}"
        );
        let e = ensure(&dir)
            .expect_err("ensure repaired a directory it did not create")
            .to_string();
        assert!(e.contains("has mode 0750"), "{e}");

        let link = base.path().join("link");
        std::os::unix::fs::symlink(&dir, &link)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let e = check(&link).expect_err("symlink accepted").to_string();
        assert!(e.contains("is a symbolic link"), "{e}");

        let file = base.path().join("file");
        std::fs::write(&file, b"")?;
        let e = check(&file).expect_err("file accepted").to_string();
        assert!(e.contains("is not a directory"), "{e}");

        assert_eq!(check(&base.path().join("missing"))?, Presence::Missing);
        Ok(())
    }
}
