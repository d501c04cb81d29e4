//! Starting and signalling worker processes: one of the two places with `unsafe` (the
//! `pre_exec` hook; the other is `corral start`'s `setsid`).
//!
//! A worker runs in its own process group (so a stop reaches whatever it forked too), with
//! `PR_SET_PDEATHSIG = SIGKILL` (so it dies with the front process even if that is SIGKILLed),
//! stdin closed and stdout/stderr piped to corral, and the soft `RLIMIT_NOFILE` corral started
//! with (corral raises its own, see [`crate::limits`]). Its environment is corral's without
//! `NOTIFY_SOCKET` (systemd's socket is for corral alone), plus the app's `env`, plus `PORT` (or
//! `port_env`), `HOST=127.0.0.1`, `NODE_APP_INSTANCE=<slot>` and the run's marker
//! ([`crate::leftovers::MARKER`], how leftover cleanup recognises what a worker forked).
//! With `user` (and `group`), a worker started by a root corral runs as that user, with the
//! user's supplementary groups and `USER`, `LOGNAME` and `HOME` (systemd's `User=` does the
//! same); its working directory is entered before the switch.
//!
//! The pre-exec hook runs in the forked child of a multi-threaded process: it may only make
//! async-signal-safe calls, so it allocates nothing (errors are raw errno values,
//! `io::Error::from_raw_os_error`, never a formatted message).
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked exits, not the process. Workers are
//! spawned from the supervisor task, which runs on the runtime's worker threads; those live as
//! long as the runtime, which is as long as corral. (Blocking-pool threads, which come and go,
//! never spawn workers.)

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;

use std::os::fd::AsRawFd;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::config::AppConfig;

/// A worker process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// No free loopback port.
    #[error("cannot find a free loopback port: {0}")]
    Port(std::io::Error),
    /// fork/exec failed (program missing, not executable, cwd gone...).
    #[error("cannot start `{program}` in {cwd}: {source}")]
    Exec {
        /// argv[0].
        program: String,
        /// The working directory.
        cwd: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The file descriptor of Node's IPC channel in a worker (`NODE_CHANNEL_FD`).
const CHANNEL_FD: i32 = 3;

/// A started worker: the process, and with `wait_ready` corral's end of its IPC channel.
pub struct Spawned {
    /// The process.
    pub child: Child,
    /// Messages from `process.send()` arrive here (newline-delimited JSON).
    pub channel: Option<tokio::net::UnixStream>,
}

/// Starts one worker of `app` in `slot`, listening on `port` if the app is proxied.
pub fn spawn(app: &AppConfig, slot: usize, port: Option<u16>) -> Result<Spawned, SpawnError> {
    let exec_error = |source| SpawnError::Exec {
        program: app.command[0].clone(),
        cwd: app.cwd.display().to_string(),
        source,
    };
    let mut command = Command::new(&app.command[0]);
    command
        .args(&app.command[1..])
        .current_dir(&app.cwd)
        // Only corral talks to the service manager; removed before the app's own `env`, so an
        // app may still set one explicitly.
        .env_remove("NOTIFY_SOCKET");
    // `user`/`group`: the identity is switched in the pre-exec hook; the groups are looked up
    // here, where allocating is allowed.
    let euid = nix::unistd::geteuid();
    let identity = match &app.run_as {
        // Already that user: nothing to switch.
        Some(user) if !euid.is_root() && euid.as_raw() == user.uid => None,
        None => None,
        Some(user) => {
            if !euid.is_root() {
                return Err(exec_error(std::io::Error::other(format!(
                    "running workers as user {} needs corral to run as root",
                    user.name
                ))));
            }
            let name = std::ffi::CString::new(user.name.as_str()).map_err(|e| exec_error(std::io::Error::other(e)))?;
            let groups = nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(user.gid))
                .map_err(|e| exec_error(e.into()))?;
            command
                .env("USER", &user.name)
                .env("LOGNAME", &user.name)
                .env("HOME", &user.home);
            Some((
                nix::unistd::Uid::from_raw(user.uid),
                nix::unistd::Gid::from_raw(user.gid),
                groups,
            ))
        }
    };
    command
        .envs(app.env.iter().map(|(k, v)| (k, v)))
        .env("NODE_APP_INSTANCE", slot.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(port) = port {
        command.env(&app.port_env, port.to_string()).env("HOST", "127.0.0.1");
    }
    // PM2's `wait_ready`: a Node worker gets an IPC channel (a socketpair, its end on fd 3,
    // NODE_CHANNEL_FD=3), so its `process.send('ready')` reaches corral.
    let channel = if app.wait_ready {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC)
            .map_err(|e| exec_error(e.into()))?;
        command
            .env("NODE_CHANNEL_FD", CHANNEL_FD.to_string())
            .env("NODE_CHANNEL_SERIALIZATION_MODE", "json");
        Some((ours, theirs))
    } else {
        None
    };
    if let Some(marker) = crate::leftovers::own_marker() {
        command.env(crate::leftovers::MARKER, marker);
    }
    let child_channel = channel.as_ref().map(|(_, theirs)| theirs.as_raw_fd());
    let parent = std::process::id();
    let nofile = crate::limits::for_workers();
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (setgroups, setgid, setuid, prctl, getppid, setrlimit, dup2, fcntl); it
    // allocates nothing: every error
    // is an errno wrapped by `from_raw_os_error`, which stores the number inline.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || {
            let errno = |e: nix::errno::Errno| std::io::Error::from_raw_os_error(e as i32);
            // First: a change of uid clears the parent-death signal set below.
            if let Some((uid, gid, groups)) = &identity {
                nix::unistd::setgroups(groups).map_err(errno)?;
                nix::unistd::setgid(*gid).map_err(errno)?;
                nix::unistd::setuid(*uid).map_err(errno)?;
            }
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(errno)?;
            // If corral died between fork and prctl, nobody would ever signal this child.
            // ESRCH ("no such process"): the parent is gone.
            if nix::unistd::getppid().as_raw() as u32 != parent {
                return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            if let Some((soft, hard)) = nofile {
                nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, soft, hard)
                    .map_err(errno)?;
            }
            if let Some(fd) = child_channel {
                if fd == CHANNEL_FD {
                    // Already in place: only drop close-on-exec.
                    if libc_fcntl_clear_cloexec(fd) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if nix::libc::dup2(fd, CHANNEL_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(exec_error)?;
    let channel = match channel {
        None => None,
        Some((ours, theirs)) => {
            drop(theirs);
            let stream = std::os::unix::net::UnixStream::from(ours);
            stream.set_nonblocking(true).map_err(exec_error)?;
            Some(tokio::net::UnixStream::from_std(stream).map_err(exec_error)?)
        }
    };
    Ok(Spawned { child, channel })
}

/// Clears FD_CLOEXEC on `fd` (async-signal-safe; for the pre-exec hook).
#[allow(unsafe_code)]
unsafe fn libc_fcntl_clear_cloexec(fd: i32) -> i32 {
    // SAFETY: fcntl on a descriptor we own; no memory is touched.
    unsafe { nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) }
}

/// A loopback port kept for a worker: a socket bound to it with `SO_REUSEADDR` that never
/// listens. The worker's own `listen` on the port succeeds beside it (Node sets `SO_REUSEADDR`
/// too, and the held socket is not listening), but the kernel hands the port to nobody else
/// that asks for any free port (`bind` to port 0, or an outgoing connection's local port) while
/// it is held. Without it, two corral instances (or a worker and a client) picked the same
/// free port now and then; a second worker then failed with EADDRINUSE while its readiness
/// probe reached the first one. Held for the worker's life (one descriptor, close-on-exec).
#[derive(Debug)]
pub struct PortHold {
    _socket: socket2::Socket,
}

/// A free loopback port not in `taken`, held for the worker that will listen on it.
pub fn free_port(taken: &HashSet<u16>) -> Result<(u16, PortHold), SpawnError> {
    for _ in 0..16 {
        let hold =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).map_err(SpawnError::Port)?;
        hold.set_reuse_address(true).map_err(SpawnError::Port)?;
        hold.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
            .map_err(SpawnError::Port)?;
        let port = hold
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .map(|a| a.port())
            .ok_or_else(|| SpawnError::Port(std::io::Error::other("no local address")))?;
        if !taken.contains(&port) {
            return Ok((port, PortHold { _socket: hold }));
        }
    }
    Err(SpawnError::Port(std::io::Error::other(
        "the kernel kept offering ports already in use",
    )))
}

/// Sends `signal` to the process group led by `pid`. A group that is already gone is not an error.
pub fn signal_group(pid: u32, signal: Signal) -> nix::Result<()> {
    match killpg(Pid::from_raw(pid as i32), signal) {
        Err(nix::errno::Errno::ESRCH) => Ok(()),
        other => other,
    }
}
