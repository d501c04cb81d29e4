//! The running process's side of the hand-over: starting the new binary and waiting for its
//! verdict.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{hex, Generation, Handed, Manifest, Role, ToNew, ToOld, FD_ENV, VERSION};
use crate::admin::events::{Draft, Events, Kind};
use crate::supervisor::{CommandError, ErrorCode};
use crate::tls::Tickets;

/// Lines of the new process's output kept for a failure report.
const KEEP_LINES: usize = 20;

/// How long a new process that gave up (or was told to stop) has to exit before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// Starts new generations of this corral and hands them the sockets; also what `status`
/// shows of the other generation. One per process.
#[derive(Debug)]
pub struct Upgrader {
    config: PathBuf,
    binary: PathBuf,
    sticky: [u8; 32],
    tickets: Arc<Tickets>,
    events: Arc<Events>,
    /// Copies of every listening socket, to hand over; dropped when a stop begins, so that a
    /// stopping corral's sockets close with its accept loops.
    sockets: Mutex<Option<Sockets>>,
    /// The upgrade under way, or the previous generation still draining.
    peer: Mutex<Option<Generation>>,
    /// Cancelled at the switch: what stops this process's accepting (the root shutdown, the
    /// control socket, the admin listener).
    stop_accepting: Vec<CancellationToken>,
    handed_over: CancellationToken,
    /// Cancelled when a stop begins: an upgrade under way gives up (the new process is
    /// stopped), rather than taking over from a corral that was asked to stop.
    abort: CancellationToken,
    /// The channel to the process this one handed over to, open until this one exits: its
    /// end is how the new process learns that the old one is gone.
    successor: Mutex<Option<tokio::net::unix::OwnedWriteHalf>>,
    /// Upgrades under way and the replies to them: a stopping corral waits for these, so a
    /// `corral upgrade` client hears why its upgrade did not happen.
    tasks: tokio_util::task::TaskTracker,
    deadline: Duration,
}

#[derive(Debug, Default)]
struct Sockets {
    tcp: Vec<(Role, SocketAddr, Vec<OwnedFd>)>,
    control: Option<OwnedFd>,
}

impl Upgrader {
    /// An upgrader for the instance running `config`, that waits at most `deadline` for a new
    /// process's workers. `stop_accepting` are cancelled at the switch.
    pub fn new(
        config: &Path,
        binary: PathBuf,
        sticky: [u8; 32],
        tickets: Arc<Tickets>,
        events: Arc<Events>,
        deadline: Duration,
        stop_accepting: Vec<CancellationToken>,
    ) -> Upgrader {
        Upgrader {
            config: std::path::absolute(config).unwrap_or_else(|_| config.to_path_buf()),
            binary,
            sticky,
            tickets,
            events,
            sockets: Mutex::new(Some(Sockets::default())),
            peer: Mutex::new(None),
            stop_accepting,
            handed_over: CancellationToken::new(),
            abort: CancellationToken::new(),
            successor: Mutex::new(None),
            tasks: tokio_util::task::TaskTracker::new(),
            deadline,
        }
    }

    /// Keeps copies of a public address's listening sockets, to hand over.
    pub fn keep_public<F: AsFd>(&self, config: SocketAddr, sockets: &[F]) {
        self.keep_role(Role::Public, config, sockets);
    }

    /// Keeps copies of an `http_redirect` address's listening sockets, to hand over.
    pub fn keep_redirect<F: AsFd>(&self, config: SocketAddr, sockets: &[F]) {
        self.keep_role(Role::Redirect, config, sockets);
    }

    /// Keeps a copy of the admin listener.
    pub fn keep_admin<F: AsFd>(&self, config: SocketAddr, listener: &F) {
        self.keep_role(Role::Admin, config, std::slice::from_ref(listener));
    }

    fn keep_role<F: AsFd>(&self, role: Role, config: SocketAddr, sockets: &[F]) {
        let copies: Vec<OwnedFd> = sockets
            .iter()
            .filter_map(|s| s.as_fd().try_clone_to_owned().ok())
            .collect();
        if let Some(kept) = self.lock_sockets().as_mut() {
            kept.tcp.push((role, config, copies));
        }
    }

    /// Keeps a copy of the control socket's listener.
    pub fn keep_control<F: AsFd>(&self, listener: &F) {
        if let Some(kept) = self.lock_sockets().as_mut() {
            kept.control = listener.as_fd().try_clone_to_owned().ok();
        }
    }

    /// A stop begins: the copies go, no upgrade starts from now on, and one under way gives up.
    pub fn close(&self) {
        self.lock_sockets().take();
        if !self.handed_over() {
            self.abort.cancel();
        }
    }

    /// Held by a transport while it answers an upgrade request (see [`Upgrader::finished`]).
    pub fn reply_token(&self) -> tokio_util::task::task_tracker::TaskTrackerToken {
        self.tasks.token()
    }

    /// Waits (at most `limit`) until every upgrade under way has ended and been answered.
    pub async fn finished(&self, limit: Duration) {
        self.tasks.close();
        let _ = tokio::time::timeout(limit, self.tasks.wait()).await;
    }

    /// True once this process has handed over to a new one.
    pub fn handed_over(&self) -> bool {
        self.handed_over.is_cancelled()
    }

    /// Cancelled when this process has handed over.
    pub fn handed_over_token(&self) -> CancellationToken {
        self.handed_over.clone()
    }

    /// The other generation, for `status`.
    pub fn peer(&self) -> Option<Generation> {
        self.peer.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sets what `status` shows of the other generation.
    pub fn set_peer(&self, peer: Option<Generation>) {
        *self.peer.lock().unwrap_or_else(|p| p.into_inner()) = peer;
    }

    fn lock_sockets(&self) -> std::sync::MutexGuard<'_, Option<Sockets>> {
        self.sockets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts `binary` (default: the one this process was started from) with the running
    /// config and `env`, hands it the sockets, and waits for it to take over. Progress lines
    /// go to `progress`. The work runs in a task of its own: a client that goes away does not
    /// stop an upgrade half-way.
    pub async fn upgrade(
        self: &Arc<Self>,
        binary: Option<PathBuf>,
        env: Option<String>,
        progress: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Result<String, CommandError> {
        if std::process::id() == 1 {
            return Err(CommandError::new(
                ErrorCode::BadRequest,
                "corral runs as PID 1 (a container): the container ends when PID 1 exits, so it cannot hand over to a new process; roll out a new image instead",
            ));
        }
        let binary = binary.unwrap_or_else(|| self.binary.clone());
        {
            let mut peer = self.peer.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(other) = peer.as_ref() {
                let why = match other.state.as_str() {
                    "starting" => format!("an upgrade is already under way (new corral pid {})", other.pid),
                    _ => format!(
                        "the previous corral (pid {}) is still draining; try again when it has exited",
                        other.pid
                    ),
                };
                return Err(CommandError::new(ErrorCode::Busy, why));
            }
            if self.handed_over() || self.lock_sockets().is_none() {
                return Err(CommandError::new(ErrorCode::Stopping, "corral is stopping"));
            }
            *peer = Some(Generation {
                pid: 0,
                state: "starting".into(),
                detail: format!("starting {}", binary.display()),
            });
        }
        let this = Arc::clone(self);
        let work = self.tasks.spawn(async move {
            let result = this.hand_over(&binary, env, &progress).await;
            if result.is_err() {
                this.set_peer(None);
            }
            result
        });
        match work.await {
            Ok(result) => result.map_err(|why| CommandError::new(ErrorCode::Failed, why)),
            Err(e) => {
                self.set_peer(None);
                Err(CommandError::new(
                    ErrorCode::Failed,
                    format!("the upgrade task failed: {e}"),
                ))
            }
        }
    }

    async fn hand_over(
        &self,
        binary: &Path,
        env: Option<String>,
        progress: &tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Result<String, String> {
        let started = Draft::global(Kind::UpgradeStarted).message(format!("starting {}", binary.display()));
        self.events.emit(started);
        let result = self.spawn_and_wait(binary, env, progress).await;
        match &result {
            Ok(message) => self
                .events
                .emit(Draft::global(Kind::UpgradeDone).message(message.clone())),
            Err(why) => {
                error!("upgrade failed: {why}");
                self.events
                    .emit(Draft::global(Kind::UpgradeFailed).message(why.clone()));
            }
        }
        result
    }

    async fn spawn_and_wait(
        &self,
        binary: &Path,
        env: Option<String>,
        progress: &tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Result<String, String> {
        let say = |line: String| {
            info!("{line}");
            let _ = progress.send(line);
        };
        // Fresh copies for the child, so that the kept ones stay ours whatever happens.
        let (tcp, control) = {
            let kept = self.lock_sockets();
            let kept = kept.as_ref().ok_or("corral is stopping")?;
            let copy = |fd: &OwnedFd| fd.try_clone().map_err(|e| format!("cannot copy a socket: {e}"));
            let mut tcp = Vec::new();
            for (role, addr, fds) in &kept.tcp {
                tcp.push((*role, *addr, fds.iter().map(copy).collect::<Result<Vec<_>, _>>()?));
            }
            let control = kept.control.as_ref().ok_or("the control socket was not kept")?;
            (tcp, copy(control)?)
        };
        let output = |fd: std::os::fd::BorrowedFd<'_>| {
            fd.try_clone_to_owned()
                .map_err(|e| format!("cannot copy corral's own output: {e}"))
        };
        let stdout = output(std::io::stdout().as_fd())?;
        let stderr = output(std::io::stderr().as_fd())?;
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().map_err(|e| format!("cannot make the hand-over channel: {e}"))?;
        let mut inherit: Vec<RawFd> = tcp
            .iter()
            .flat_map(|(_, _, fds)| fds.iter().map(AsRawFd::as_raw_fd))
            .collect();
        inherit.extend([
            control.as_raw_fd(),
            stdout.as_raw_fd(),
            stderr.as_raw_fd(),
            theirs.as_raw_fd(),
        ]);
        let manifest = Manifest {
            version: VERSION,
            pid: std::process::id(),
            binary: if binary == Path::new("/proc/self/exe") {
                self.binary.clone()
            } else {
                binary.to_path_buf()
            },
            sockets: tcp
                .iter()
                .map(|(role, config, fds)| Handed {
                    role: *role,
                    config: *config,
                    fds: fds.iter().map(AsRawFd::as_raw_fd).collect(),
                })
                .collect(),
            control: control.as_raw_fd(),
            stdout: stdout.as_raw_fd(),
            stderr: stderr.as_raw_fd(),
            sticky: hex(&self.sticky),
            tickets: self
                .tickets
                .export()
                .iter()
                .map(|(id, secret)| (hex(id), hex(secret)))
                .collect(),
        };
        let mut command = tokio::process::Command::new(binary);
        command.arg("run").arg("-c").arg(&self.config);
        if let Some(env) = &env {
            command.arg("--env").arg(env);
        }
        command
            .env(FD_ENV, theirs.as_raw_fd().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: runs in the forked child before exec; fcntl is async-signal-safe and the
        // list was allocated before the fork.
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(move || {
                for &fd in &inherit {
                    if nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = crate::reaper::spawned(|| command.spawn(), tokio::process::Child::id)
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        // The child has its own copies now.
        drop((tcp, control, stdout, stderr, theirs));
        let pid = child.id().unwrap_or_default();
        self.set_peer(Some(Generation {
            pid,
            state: "starting".into(),
            detail: "starting its workers".into(),
        }));
        say(format!("new corral started (pid {pid}, {})", binary.display()));
        let kept = Arc::new(Mutex::new(VecDeque::new()));
        let echoes = [
            child
                .stdout
                .take()
                .map(|out| tokio::spawn(echo(out, tokio::io::stdout(), Arc::clone(&kept)))),
            child
                .stderr
                .take()
                .map(|err| tokio::spawn(echo(err, tokio::io::stderr(), Arc::clone(&kept)))),
        ];
        let verdict = self.converse(ours, &mut child, manifest, pid, &say).await;
        match verdict {
            Ok(()) => {
                // Whatever the new process does from now on is its own: reap it if it ends
                // while this one still drains.
                tokio::spawn(async move {
                    if let Ok(status) = child.wait().await {
                        warn!(pid, %status, "the new corral exited while this one drained");
                    }
                    crate::reaper::waited_for(pid);
                });
                Ok(format!(
                    "upgraded: corral pid {pid} serves now; pid {} drains its connections and exits",
                    std::process::id()
                ))
            }
            Err(Failure { why, gave_up }) => {
                stop(&mut child, pid, gave_up).await;
                crate::reaper::waited_for(pid);
                for echo in echoes.into_iter().flatten() {
                    let _ = tokio::time::timeout(Duration::from_secs(2), echo).await;
                }
                let lines: Vec<String> = kept.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
                let mut report = format!("this corral (pid {}) serves on, unchanged: {why}", std::process::id());
                // A process that gave up said why (with its worker's output); one that
                // crashed or hung is described by its own last lines.
                if !gave_up && !lines.is_empty() {
                    report.push_str(&format!("\nthe new corral's last output ({} line(s)):", lines.len()));
                    for line in lines {
                        report.push_str("\n  ");
                        report.push_str(&line);
                    }
                }
                Err(report)
            }
        }
    }

    /// Sends the manifest and follows the new process until it is ready (then switches) or
    /// fails.
    async fn converse(
        &self,
        channel: std::os::unix::net::UnixStream,
        child: &mut tokio::process::Child,
        manifest: Manifest,
        pid: u32,
        say: &impl Fn(String),
    ) -> Result<(), Failure> {
        let broken = |e: std::io::Error| Failure::new(format!("the hand-over channel failed: {e}"));
        channel.set_nonblocking(true).map_err(broken)?;
        let channel = tokio::net::UnixStream::from_std(channel).map_err(broken)?;
        let (read, mut write) = channel.into_split();
        let mut line = serde_json::to_string(&manifest).map_err(|e| Failure::new(e.to_string()))?;
        line.push('\n');
        if let Err(e) = write.write_all(line.as_bytes()).await {
            return Err(match child.try_wait() {
                Ok(Some(status)) => Failure::new(format!(
                    "the new corral (pid {pid}) exited ({status}) before taking over"
                )),
                _ => broken(e),
            });
        }
        let mut lines = BufReader::new(read).lines();
        let deadline = tokio::time::sleep(self.deadline);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                line = lines.next_line() => match line {
                    Ok(Some(line)) => match serde_json::from_str::<ToOld>(&line) {
                        Ok(ToOld::Progress { message }) => {
                            self.set_peer(Some(Generation { pid, state: "starting".into(), detail: message.clone() }));
                            say(message);
                        }
                        Ok(ToOld::Failed { reason }) => return Err(Failure {
                            why: format!("the new corral (pid {pid}) gave up: {reason}"),
                            gave_up: true,
                        }),
                        Ok(ToOld::Ready { .. }) => break,
                        Err(_) => return Err(Failure::new(format!("the new corral (pid {pid}) sent something that is not a hand-over message"))),
                    },
                    Ok(None) | Err(_) => {
                        let status = tokio::time::timeout(STOP_GRACE, child.wait()).await;
                        return Err(Failure::new(match status {
                            Ok(Ok(status)) => format!("the new corral (pid {pid}) exited ({status}) before taking over"),
                            _ => format!("the new corral (pid {pid}) closed the hand-over channel before taking over"),
                        }));
                    }
                },
                status = child.wait() => {
                    let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                    return Err(Failure::new(format!("the new corral (pid {pid}) exited ({status}) before taking over")));
                }
                _ = &mut deadline => return Err(Failure::new(format!("the new corral (pid {pid}) was not ready within {:?}", self.deadline))),
                _ = self.abort.cancelled() => return Err(Failure::new("this corral is stopping".into())),
            }
        }
        // The switch: stop accepting everywhere, then tell the new process it is alone.
        if self.abort.is_cancelled() {
            return Err(Failure::new("this corral is stopping".into()));
        }
        self.handed_over.cancel();
        for token in &self.stop_accepting {
            token.cancel();
        }
        self.close();
        self.set_peer(Some(Generation {
            pid,
            state: "serving".into(),
            detail: "took over; this corral drains".into(),
        }));
        let mut line = serde_json::to_string(&ToNew::Released).unwrap_or_default();
        line.push('\n');
        if let Err(e) = write.write_all(line.as_bytes()).await {
            warn!(error = %e, "the new corral went away at the switch");
        }
        *self.successor.lock().unwrap_or_else(|p| p.into_inner()) = Some(write);
        say(format!(
            "new corral (pid {pid}) took over; draining this one (pid {})",
            std::process::id()
        ));
        Ok(())
    }
}

/// Why a new process did not take over.
struct Failure {
    why: String,
    /// It said so itself (and is stopping its workers on its own).
    gave_up: bool,
}

impl Failure {
    fn new(why: String) -> Failure {
        Failure { why, gave_up: false }
    }
}

/// Copies the new process's output to ours, line by line, keeping the last lines.
async fn echo(from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin, kept: Arc<Mutex<VecDeque<String>>>) {
    let mut lines = BufReader::new(from).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let _ = to.write_all(format!("{line}\n").as_bytes()).await;
        let mut kept = kept.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() == KEEP_LINES {
            kept.pop_front();
        }
        kept.push_back(line.chars().take(500).collect());
    }
}

/// Stops a new process that failed: SIGTERM (its stop sequence stops its workers), then
/// SIGKILL after [`STOP_GRACE`]. One that `gave_up` is already stopping: it gets the grace
/// first (a SIGTERM during its stop would kill its workers without draining).
async fn stop(child: &mut tokio::process::Child, pid: u32, gave_up: bool) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if gave_up && tokio::time::timeout(STOP_GRACE, child.wait()).await.is_ok() {
        return;
    }
    if pid > 1 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_err() {
        warn!(pid, "the new corral did not stop within {STOP_GRACE:?}; killing it");
        let _ = child.kill().await;
    }
}
