//! The new process's side of the hand-over: what it inherited, and the take-over itself.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{unhex, Generation, Handed, Manifest, Role, ToNew, ToOld, Upgrader, FD_ENV, MAX_LINE, VERSION};
use crate::supervisor::status::Verdict;
use crate::supervisor::Handle;

/// How long the new process waits for the manifest line.
const MANIFEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the new process looks at its workers while it waits for them.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// Output lines of the failing worker sent with a failure.
const REPORT_LINES: usize = 10;

/// The hand-over could not be read: the new process refuses to start (the old one serves on).
#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    /// The variable does not name a usable descriptor.
    #[error("{FD_ENV}={0:?} does not name an inherited socket (it is set only by `corral upgrade`)")]
    Variable(String),
    /// The manifest could not be read.
    #[error("cannot read the hand-over from the running corral: {0}")]
    Read(std::io::Error),
    /// The manifest is not one this binary understands.
    #[error("the running corral handed over something this binary does not understand: {0}")]
    Manifest(String),
}

/// What the old process handed over, until each piece is claimed.
#[derive(Debug)]
pub struct Inherited {
    old_pid: u32,
    binary: PathBuf,
    sockets: Vec<(Role, SocketAddr, Vec<OwnedFd>)>,
    control: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: OwnedFd,
    sticky: [u8; 32],
    tickets: Vec<([u8; 4], [u8; 32])>,
    channel: UnixStream,
}

impl Inherited {
    /// Reads the hand-over named by [`FD_ENV`], if the variable is set, and removes the
    /// variable (workers must not see it). Call before any other thread starts.
    pub fn from_env() -> Result<Option<Inherited>, InheritError> {
        let Some(value) = std::env::var_os(FD_ENV) else {
            return Ok(None);
        };
        std::env::remove_var(FD_ENV);
        let text = value.to_string_lossy().into_owned();
        let fd: RawFd = text.parse().map_err(|_| InheritError::Variable(text.clone()))?;
        let channel = claim(fd).ok_or_else(|| InheritError::Variable(text.clone()))?;
        let channel = UnixStream::from(channel);
        channel
            .set_read_timeout(Some(MANIFEST_TIMEOUT))
            .map_err(InheritError::Read)?;
        let mut line = String::new();
        BufReader::new((&channel).take(MAX_LINE))
            .read_line(&mut line)
            .map_err(InheritError::Read)?;
        channel.set_read_timeout(None).map_err(InheritError::Read)?;
        let manifest: Manifest = serde_json::from_str(&line).map_err(|e| InheritError::Manifest(e.to_string()))?;
        Inherited::from_manifest(manifest, channel)
    }

    fn from_manifest(m: Manifest, channel: UnixStream) -> Result<Option<Inherited>, InheritError> {
        let bad = |what: &str| InheritError::Manifest(what.to_owned());
        if m.version != super::VERSION {
            return Err(bad(&format!(
                "hand-over version {} (this binary speaks {VERSION})",
                m.version
            )));
        }
        // Each number once, never stdin/stdout/stderr or the channel itself.
        let mut seen: HashSet<RawFd> = [0, 1, 2, channel.as_raw_fd()].into();
        let mut take = |fd: RawFd| -> Result<OwnedFd, InheritError> {
            if !seen.insert(fd) {
                return Err(bad(&format!("descriptor {fd} named twice")));
            }
            claim(fd).ok_or_else(|| bad(&format!("descriptor {fd} is not open")))
        };
        let mut sockets = Vec::new();
        for Handed { role, config, fds } in m.sockets {
            let fds = fds.into_iter().map(&mut take).collect::<Result<Vec<_>, _>>()?;
            sockets.push((role, config, fds));
        }
        let control = Some(take(m.control)?);
        let (stdout, stderr) = (take(m.stdout)?, take(m.stderr)?);
        let sticky = unhex::<32>(&m.sticky).ok_or_else(|| bad("sticky key"))?;
        let tickets = m
            .tickets
            .iter()
            .map(|(id, secret)| Some((unhex::<4>(id)?, unhex::<32>(secret)?)))
            .collect::<Option<Vec<_>>>()
            .filter(|keys| !keys.is_empty() && keys.len() <= 2)
            .ok_or_else(|| bad("ticket keys"))?;
        Ok(Some(Inherited {
            old_pid: m.pid,
            binary: m.binary,
            sockets,
            control,
            stdout,
            stderr,
            sticky,
            tickets,
            channel,
        }))
    }

    /// The pid of the process handing over.
    pub fn old_pid(&self) -> u32 {
        self.old_pid
    }

    /// The binary a later upgrade without `--binary` starts.
    pub fn binary(&self) -> PathBuf {
        self.binary.clone()
    }

    /// The sticky-cookie key (cookies of the old process stay valid).
    pub fn sticky_key(&self) -> [u8; 32] {
        self.sticky
    }

    /// The TLS ticket keys, current first.
    pub fn ticket_keys(&self) -> &[([u8; 4], [u8; 32])] {
        &self.tickets
    }

    /// The public listening sockets for `config` (the address as the config names it), if
    /// the old process had it.
    pub fn public(&mut self, config: SocketAddr) -> Option<Vec<std::net::TcpListener>> {
        self.take(Role::Public, config)
    }

    /// The `http_redirect` listening sockets for `config`.
    pub fn redirect(&mut self, config: SocketAddr) -> Option<Vec<std::net::TcpListener>> {
        self.take(Role::Redirect, config)
    }

    /// The admin listener for `config`.
    pub fn admin(&mut self, config: SocketAddr) -> Option<std::net::TcpListener> {
        self.take(Role::Admin, config)?.into_iter().next()
    }

    fn take(&mut self, role: Role, config: SocketAddr) -> Option<Vec<std::net::TcpListener>> {
        let at = self.sockets.iter().position(|(r, a, _)| *r == role && *a == config)?;
        let (_, _, fds) = self.sockets.swap_remove(at);
        let listeners: Vec<std::net::TcpListener> = fds
            .into_iter()
            .filter_map(|fd| {
                let socket = socket2::Socket::from(fd);
                // Only what is really a listening TCP socket is used as one.
                let listening = socket.r#type().ok() == Some(socket2::Type::STREAM)
                    && socket.is_listener().unwrap_or(false)
                    && socket.local_addr().ok().and_then(|a| a.as_socket()).is_some();
                (listening && socket.set_nonblocking(true).is_ok()).then(|| socket.into())
            })
            .collect();
        (!listeners.is_empty()).then_some(listeners)
    }

    /// The control socket's listener.
    pub fn control(&mut self) -> Option<std::os::unix::net::UnixListener> {
        let socket = socket2::Socket::from(self.control.take()?);
        if socket.domain().ok() != Some(socket2::Domain::UNIX) || !socket.is_listener().unwrap_or(false) {
            warn!("the handed-over control socket is not a listening Unix socket; binding a new one");
            return None;
        }
        let listener = std::os::unix::net::UnixListener::from(OwnedFd::from(socket));
        listener.set_nonblocking(true).ok()?;
        Some(listener)
    }

    /// What is left for the take-over; every socket not claimed by now (an address the new
    /// config no longer names) is closed here.
    pub fn into_takeover(self) -> std::io::Result<Takeover> {
        for (role, addr, _) in &self.sockets {
            info!(?role, %addr, "no longer in the config: its socket is closed");
        }
        self.channel.set_nonblocking(true)?;
        Ok(Takeover {
            old_pid: self.old_pid,
            channel: tokio::net::UnixStream::from_std(self.channel)?,
            stdout: self.stdout,
            stderr: self.stderr,
        })
    }
}

/// Claims an inherited descriptor: it must be open, and gets close-on-exec back.
fn claim(fd: RawFd) -> Option<OwnedFd> {
    if fd < 0 {
        return None;
    }
    // SAFETY: F_GETFD and F_SETFD only read and set the descriptor's flags; the descriptor
    // was inherited for this process to own (the manifest names each once, checked by the
    // caller), so nothing else in the process holds it.
    #[allow(unsafe_code)]
    unsafe {
        if nix::libc::fcntl(fd, nix::libc::F_GETFD) < 0 {
            return None;
        }
        if nix::libc::fcntl(fd, nix::libc::F_SETFD, nix::libc::FD_CLOEXEC) < 0 {
            return None;
        }
        Some(OwnedFd::from_raw_fd(fd))
    }
}

/// The new process's link to the old one, from its workers' start to the old one's exit.
#[derive(Debug)]
pub struct Takeover {
    old_pid: u32,
    channel: tokio::net::UnixStream,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

impl Takeover {
    /// Waits until every worker is ready (then takes over: `released` is cancelled once the old
    /// process accepts no more) or gives up (then `failed` is cancelled with the reason sent
    /// to the old process). `deadline` bounds the wait for the workers.
    pub async fn run(
        self,
        supervisor: Handle,
        upgrader: Arc<Upgrader>,
        deadline: Duration,
        released: CancellationToken,
        failed: CancellationToken,
    ) {
        let Takeover {
            old_pid,
            channel,
            stdout,
            stderr,
        } = self;
        let (read, mut write) = channel.into_split();
        let mut lines = tokio::io::BufReader::new(read).lines();
        let mut say = async |message: &ToOld| {
            let mut text = serde_json::to_string(message).unwrap_or_default();
            text.push('\n');
            write.write_all(text.as_bytes()).await.is_ok()
        };
        let outcome = tokio::time::timeout(deadline, async {
            let mut last = String::new();
            loop {
                let Ok(status) = supervisor.status().await else {
                    return Err("the supervisor ended".to_owned());
                };
                match status.verdict() {
                    Verdict::Up => return Ok(()),
                    Verdict::Failed { app, report } => {
                        let output = recent_output(&supervisor, &app).await;
                        return Err(format!("{report}{output}"));
                    }
                    Verdict::Starting => {}
                }
                let progress = status
                    .apps
                    .iter()
                    .map(|a| format!("{} {}/{} ready", a.name, a.ready, a.instances))
                    .collect::<Vec<_>>()
                    .join(", ");
                if progress != last {
                    say(&ToOld::Progress {
                        message: format!("new corral (pid {}): {progress}", std::process::id()),
                    })
                    .await;
                    last = progress;
                }
                tokio::time::sleep(POLL_EVERY).await;
            }
        })
        .await
        .unwrap_or_else(|_| Err(format!("its workers were not all ready within {deadline:?}")));
        if let Err(reason) = outcome {
            warn!("upgrade abandoned: {reason}");
            say(&ToOld::Failed { reason }).await;
            failed.cancel();
            return;
        }
        say(&ToOld::Ready {
            pid: std::process::id(),
        })
        .await;
        // Released, or the old process is gone (killed meanwhile): either way nobody else
        // accepts now.
        match lines.next_line().await {
            Ok(Some(line)) if serde_json::from_str::<ToNew>(&line).is_ok() => {}
            Ok(Some(line)) => {
                warn!(line = %line.chars().take(200).collect::<String>(), "unexpected hand-over message; taking over")
            }
            Ok(None) | Err(_) => warn!(pid = old_pid, "the old corral went away before releasing; taking over"),
        }
        upgrader.set_peer(Some(Generation {
            pid: old_pid,
            state: "draining".into(),
            detail: String::new(),
        }));
        switch_output(&stdout, &stderr);
        drop((stdout, stderr));
        released.cancel();
        info!(previous = old_pid, "took over: accepting connections");
        // The old process closes its end when it exits.
        while let Ok(Some(_)) = lines.next_line().await {}
        info!(previous = old_pid, "the previous corral has exited");
        upgrader.set_peer(None);
    }
}

/// Points this process's stdout and stderr where the old process's went (until now they
/// were pipes to it).
fn switch_output(stdout: &OwnedFd, stderr: &OwnedFd) {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    for (from, to) in [(stdout.as_raw_fd(), 1), (stderr.as_raw_fd(), 2)] {
        // SAFETY: dup2 onto 1 and 2, which this process owns for its whole life; Rust's
        // stdout/stderr handles refer to the numbers, not to what they point at.
        #[allow(unsafe_code)]
        let done = unsafe { nix::libc::dup2(from, to) };
        if done < 0 {
            warn!(error = %std::io::Error::last_os_error(), fd = to, "cannot take over the previous corral's output");
        }
    }
}

/// The failing app's last output lines, for the failure report.
async fn recent_output(supervisor: &Handle, app: &str) -> String {
    let lines = supervisor
        .logs(Some(app.to_owned()), REPORT_LINES)
        .await
        .unwrap_or_default();
    match crate::logs::recent::report(&lines) {
        report if report.is_empty() => report,
        report => format!("\n{}", report.trim_end()),
    }
}
