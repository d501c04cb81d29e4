//! Self-upgrade: a new corral process takes over the public sockets from the running one, with
//! zero failed requests (`corral upgrade [--binary PATH]`, `SIGUSR2`, and a reload that adds or
//! removes apps or listeners).
//!
//! ## The hand-over
//!
//! 1. The running corral (the *old* one, [`Upgrader`]) starts the new binary as
//!    `corral run -c CONFIG [--env NAME]` with [`FD_ENV`] naming one end of a Unix socket pair.
//!    The descriptors it hands over are **inherited**: the pre-exec hook clears close-on-exec
//!    on exactly those (each shard's `SO_REUSEPORT` listening socket of every public address,
//!    every `http_redirect` and admin listener, the control socket, and a copy of corral's own
//!    stdout and stderr), so the new process has the very same sockets, with whatever the
//!    kernel has queued on them. The first line on the socket pair is the [`Manifest`] (JSON):
//!    which descriptor is which socket, the sticky-cookie key and the TLS session ticket keys.
//!    Secrets go over the socket pair, never in the environment or argv, which other tools
//!    read.
//! 2. The new process ([`Inherited`]) puts close-on-exec back on every descriptor it got (its
//!    workers must not inherit a listening socket), adopts the sockets whose address its own
//!    config still names (binding fresh ones for new addresses, failing cleanly if one is
//!    taken, and closing the ones no longer named), skips the leftover cleanup and the
//!    "already running" probe (the instance handing over is alive on purpose), and starts its
//!    own workers. Its stdout and stderr are pipes to the old process until the switch, so a
//!    new binary that fails is reported with its last output lines.
//! 3. When every worker of the new process is ready ([`crate::supervisor::status::Verdict`]),
//!    it says [`ToOld::Ready`]. The old process stops accepting (public sockets, admin and
//!    control), says [`ToNew::Released`], and drains as for a stop: in-flight requests finish,
//!    keep-alive connections close after their current response, SSE and WebSocket end at
//!    `drain_timeout`; then it stops its workers and exits 0. Only then does the new process
//!    accept, so one generation accepts at a time and `status` has one answer; connections
//!    that arrive in between wait in the socket's backlog, which both processes share.
//! 4. A new process that exits, rejects its config, cannot bind, or whose workers are not all
//!    ready by its deadline never accepted a connection: it stops its own workers and exits
//!    non-zero (the old one SIGTERMs it at its deadline, then SIGKILLs it), and the old one
//!    answers the `corral upgrade` with the reason and those last lines, having served
//!    throughout.
//!
//! Why inherited descriptors and not SCM_RIGHTS over the socket pair (HAProxy, ecdysis, and
//! Pingora pass them that way): the new process is our own child, started by us, so
//! inheritance is the simplest mechanism that is also atomic (the descriptors exist in the new
//! process before it runs one instruction, with no message size or per-message limit of 253
//! descriptors to chunk around, and no ancillary-data parsing to get wrong); nginx does the
//! same. A module of our own rather than the `ecdysis` crate: ecdysis owns the process model
//! (it forks, and it wants the listeners created through it), while corral's listeners are
//! bound per shard by [`crate::listener`] and its readiness is "every worker ready", which only
//! the supervisor can tell; the part ecdysis would save us is the ~100 lines below.
//!
//! systemd: the new process announces `MAINPID=<its pid>` and `READY=1` once it has taken
//! over (the unit from `corral startup` says `NotifyAccess=all` so systemd accepts a message
//! from a process other than the main one), and the old one sends nothing after the switch
//! (a `STOPPING=1` would stop the unit).
//!
//! As PID 1 (a container) corral refuses to upgrade: the container ends when PID 1 exits, so
//! the old process could never leave; roll out a new image instead.

mod new;
mod old;

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use new::{InheritError, Inherited};
pub use old::Upgrader;

/// The environment variable that names the socket pair's descriptor in the new process.
pub const FD_ENV: &str = "CORRAL_UPGRADE_FD";

/// Bumped when the manifest changes incompatibly; a new binary refuses a version it does not
/// know, so the old one keeps serving.
const VERSION: u32 = 1;

/// A manifest line larger than this is not one corral wrote.
const MAX_LINE: u64 = 1 << 20;

/// What the old process hands over, as the first line on the socket pair.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    /// The old process.
    pid: u32,
    /// The binary a later `corral upgrade` without `--binary` starts.
    binary: PathBuf,
    /// Every listening TCP socket.
    sockets: Vec<Handed>,
    /// The control socket's listening descriptor.
    control: i32,
    /// Copies of the old process's stdout and stderr, for after the switch.
    stdout: i32,
    stderr: i32,
    /// The sticky-cookie key, hex.
    sticky: String,
    /// The TLS ticket keys, current first: (id, secret), hex.
    tickets: Vec<(String, String)>,
}

/// What a listening socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Role {
    /// An address apps `listen` on (one descriptor per shard).
    Public,
    /// An `http_redirect` address.
    Redirect,
    /// The `[admin]` listener.
    Admin,
}

/// One listening address and its descriptors.
#[derive(Debug, Serialize, Deserialize)]
struct Handed {
    role: Role,
    /// The address as the config names it (port 0 included).
    config: SocketAddr,
    fds: Vec<i32>,
}

/// New to old.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ToOld {
    /// A step, for the `corral upgrade` client and `status`.
    Progress { message: String },
    /// Every worker is ready: stop accepting.
    Ready { pid: u32 },
    /// The new process gives up (it exits after stopping its workers).
    Failed { reason: String },
}

/// Old to new.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ToNew {
    /// The old process accepts no more: take over.
    Released,
}

/// The other generation, as `status` shows it during and after an upgrade.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Generation {
    /// Its front pid.
    pub pid: u32,
    /// `starting` (a new corral this one is handing over to) or `draining` (the previous
    /// corral, finishing its connections after handing over to this one).
    pub state: String,
    /// Its last progress line.
    #[serde(default)]
    pub detail: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The path the running binary was started from, read once at start (before an upgrade can
/// replace the file), so that `corral upgrade` without `--binary` starts whatever is at that
/// path now.
pub fn own_binary() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        std::env::current_exe()
            .map(|p| {
                // A binary replaced while running reads as "PATH (deleted)".
                let text = p.to_string_lossy();
                PathBuf::from(text.strip_suffix(" (deleted)").unwrap_or(&text).to_owned())
            })
            .unwrap_or_else(|_| PathBuf::from("corral"))
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let key = [0u8, 1, 0xab, 0xff];
        assert_eq!(unhex::<4>(&hex(&key)), Some(key));
        assert_eq!(unhex::<4>("00"), None);
        assert_eq!(unhex::<2>("zz00"), None);
        assert_eq!(unhex::<2>("é0"), None);
    }

    #[test]
    fn messages_have_stable_names() {
        let line = serde_json::to_string(&ToOld::Ready { pid: 7 }).expect("encode");
        assert_eq!(line, r#"{"type":"ready","pid":7}"#);
        let line = serde_json::to_string(&ToNew::Released).expect("encode");
        assert_eq!(line, r#"{"type":"released"}"#);
    }
}
