//! The control socket: how `corral status`, `corral stop` (and later `reload`) reach a running
//! front process.
//!
//! A Unix domain socket, mode 0600 in the runtime directory ([`runtime_dir`]: ours, 0700,
//! checked before every use), whose path follows from the config file's absolute path
//! ([`socket_path`]), so every CLI command given the same `-c` finds the same instance and two
//! configs never collide. The protocol is newline-delimited JSON: the client sends one
//! [`Request`] line; the server answers with [`Reply`] lines. For `stop`, the server
//! acknowledges and keeps the connection open; the client sees EOF when the front process has
//! exited, which is how `corral stop` knows the stop is complete. A `corral run` that finds a
//! socket already there asks it for a status, for at most 2 s, before deciding it is stale.
//!
//! The server owns no state: it turns requests into calls on the supervisor's [`Handle`] and
//! into a cancellation of the root shutdown token.

pub mod client;
pub mod runtime_dir;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::commands::{self, Answer};
use crate::supervisor::{CommandError, ErrorCode, Handle};
use crate::upgrade::Upgrader;
use runtime_dir::RuntimeDirError;

/// How long `corral run` waits for an existing control socket to answer before it gives up.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub use crate::commands::{Reply, Request};

/// The control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another front process already runs this config.
    #[error("corral is already running for this config (pid {pid}, control socket {})", path.display())]
    AlreadyRunning {
        /// Its pid, as it reported it.
        pid: u32,
        /// The socket.
        path: PathBuf,
    },
    /// Something listens on the socket but does not answer (a wedged instance, or not corral).
    #[error("another instance seems to be running but does not answer: {}", path.display())]
    NotAnswering {
        /// The socket.
        path: PathBuf,
    },
    /// The runtime directory is missing and cannot be created, or is not safe to use.
    #[error(transparent)]
    RuntimeDir(#[from] RuntimeDirError),
    /// Filesystem or socket failure.
    #[error("cannot create the control socket {}: {source}", path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Where the control socket of the instance running `config` lives: in [`runtime_dir::dir`].
pub fn socket_path(config: &Path) -> PathBuf {
    socket_path_in(&runtime_dir::dir(), config)
}

/// The control socket of the instance running `config`, in the runtime directory `dir`.
///
/// The file name is the config's stem plus a hash of its absolute path (socket paths are
/// limited to 107 bytes, so the config path itself cannot be used).
pub fn socket_path_in(dir: &Path, config: &Path) -> PathBuf {
    let absolute = std::path::absolute(config).unwrap_or_else(|_| config.to_path_buf());
    let stem: String = absolute
        .file_stem()
        .map(|s| {
            s.to_string_lossy()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
                .take(32)
                .collect()
        })
        .unwrap_or_default();
    dir.join(format!(
        "{stem}-{:016x}.sock",
        fnv1a(absolute.as_os_str().as_encoded_bytes())
    ))
}

/// FNV-1a: stable across Rust versions and builds, unlike `DefaultHasher`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The bound control socket; the file is removed when this is dropped, unless the socket
/// was handed over to a new corral (or not yet taken over from the previous one).
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    remove_on_drop: bool,
}

impl ControlSocket {
    /// Binds the socket for `config`. Creates or checks the runtime directory first. Refuses
    /// if an instance answers on the socket, or if something listens there without answering
    /// within 2 s (`PROBE_TIMEOUT`); removes the file only when nobody listens on it.
    pub async fn bind(config: &Path) -> Result<ControlSocket, ControlError> {
        let path = socket_path(config);
        let io = |source| ControlError::Io {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            runtime_dir::ensure(dir)?;
        }
        // lstat: a dangling link or any other leftover entry is ours (the directory is) and
        // goes the same way as a stale socket.
        if std::fs::symlink_metadata(&path).is_ok() {
            match tokio::time::timeout(PROBE_TIMEOUT, probe(&path)).await {
                Err(_) | Ok(Probe::Mute) => return Err(ControlError::NotAnswering { path }),
                Ok(Probe::Running(pid)) => return Err(ControlError::AlreadyRunning { pid, path }),
                Ok(Probe::Failed(source)) => return Err(io(source)),
                Ok(Probe::Stale) => {
                    debug!(path = %path.display(), "removing stale control socket");
                    std::fs::remove_file(&path).map_err(io)?;
                }
            }
        }
        let listener = UnixListener::bind(&path).map_err(io)?;
        {
            // The directory is 0700 and ours, so nobody can reach the socket between the bind
            // and this chmod.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
        Ok(ControlSocket {
            listener,
            path,
            remove_on_drop: true,
        })
    }

    /// The control socket of `config` as the previous corral handed it over: served (and its
    /// file owned) only once [`ControlSocket::own`] is called at the switch.
    pub fn adopt(config: &Path, listener: std::os::unix::net::UnixListener) -> Result<ControlSocket, ControlError> {
        let path = socket_path(config);
        let listener = UnixListener::from_std(listener).map_err(|source| ControlError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(ControlSocket {
            listener,
            path,
            remove_on_drop: false,
        })
    }

    /// This process answers on the socket from now on, and removes its file at exit.
    pub fn own(&mut self) {
        self.remove_on_drop = true;
    }

    /// The listener, for a copy to hand over.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves requests until the process exits, or until `handed_over` (then the socket and
    /// its file are the new corral's). `stop` cancels `shutdown`.
    pub async fn serve(
        mut self,
        supervisor: Handle,
        shutdown: CancellationToken,
        upgrader: Arc<Upgrader>,
        handed_over: CancellationToken,
    ) {
        loop {
            let accepted = tokio::select! {
                biased;
                _ = handed_over.cancelled() => {
                    self.remove_on_drop = false;
                    return;
                }
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(handle(
                        stream,
                        supervisor.clone(),
                        shutdown.clone(),
                        Arc::clone(&upgrader),
                    ));
                }
                Err(e) => {
                    warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// What an existing control socket turned out to be.
enum Probe {
    /// Nobody listens: a file left by a dead instance.
    Stale,
    /// An instance answered with its status.
    Running(u32),
    /// Something accepted the connection but answered nothing usable.
    Mute,
    /// The connection failed for another reason (permissions...).
    Failed(std::io::Error),
}

/// Asks the socket at `path` for a status (the caller bounds the wait).
async fn probe(path: &Path) -> Probe {
    match client::request(path, &Request::Status).await {
        Ok(mut replies) => match replies.next().await {
            Ok(Some(Reply::Status(status))) => Probe::Running(status.pid),
            _ => Probe::Mute,
        },
        Err(client::ClientError::NotRunning { .. }) => Probe::Stale,
        // A full backlog: someone listens but does not accept.
        Err(client::ClientError::Io { source, .. }) if source.kind() == std::io::ErrorKind::WouldBlock => Probe::Mute,
        Err(client::ClientError::Io { source, .. }) => Probe::Failed(source),
        Err(client::ClientError::RuntimeDir(e)) => Probe::Failed(std::io::Error::other(e)),
        Err(client::ClientError::Protocol(_)) => Probe::Mute,
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if !self.remove_on_drop {
            return;
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            debug!(path = %self.path.display(), error = %e, "could not remove control socket");
        }
    }
}

async fn handle(stream: UnixStream, supervisor: Handle, shutdown: CancellationToken, upgrader: Arc<Upgrader>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(64 * 1024));
    if let Err(e) = reader.read_line(&mut line).await {
        debug!(error = %e, "control request unreadable");
        return;
    }
    let request = match serde_json::from_str::<Request>(&line) {
        Ok(request) => request,
        Err(e) => {
            let error = CommandError::new(ErrorCode::BadRequest, format!("bad control request: {e}"));
            send(&mut write, &Reply::from(error)).await;
            return;
        }
    };
    if matches!(request, Request::Stop) {
        info!("stop requested over the control socket");
    }
    // An upgrade's answer is sent before this process may exit.
    let _answering = matches!(request, Request::Upgrade { .. }).then(|| upgrader.reply_token());
    let (progress, mut lines) = mpsc::unbounded_channel();
    let answer = commands::execute(request, &supervisor, &shutdown, &upgrader, progress);
    tokio::pin!(answer);
    let answer = loop {
        tokio::select! {
            Some(message) = lines.recv() => send(&mut write, &Reply::Progress { message }).await,
            answer = &mut answer => break answer,
        }
    };
    while let Ok(message) = lines.try_recv() {
        send(&mut write, &Reply::Progress { message }).await;
    }
    let stopping = matches!(answer, Ok(Answer::Stopping(_)));
    send(&mut write, &Reply::from_answer(answer)).await;
    if stopping {
        // The connection stays open until the process exits: the client's EOF tells it
        // that the stop is complete.
        std::future::pending::<()>().await;
    }
}

/// Writes one reply line; a client that went away is not an error worth more than a debug line.
async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, reply: &Reply) {
    let mut text = match serde_json::to_string(reply) {
        Ok(text) => text,
        Err(e) => {
            warn!(error = %e, "cannot encode control reply");
            return;
        }
    };
    text.push('\n');
    if let Err(e) = write.write_all(text.as_bytes()).await {
        debug!(error = %e, "control client went away");
    }
}
