//! `corral start` (PM2's `pm2 start`): `corral run` detached, and a verdict once it is up.
//!
//! The child gets a session of its own (`setsid`: no controlling terminal, so closing the
//! terminal sends it no SIGHUP), stdin from `/dev/null`, and stdout and stderr appended to
//! corral's log file: `[corral] log_file`, else `<control socket>.log` beside the state file
//! in the runtime directory. `start` then polls the instance's control socket, never sleeping
//! for a fixed time as a guess:
//!
//! - every app has all its workers in rotation (or running, for an app without `listen`):
//!   prints the status table and exits 0;
//! - a worker fails while starting (it exited, was restarted, or its slot waits for a
//!   restart): prints which, how it ended and its last output, stops the instance so that a
//!   failed start leaves nothing behind, and exits 1;
//! - the child exits (a port in use, a runtime directory it refuses): prints the end of the
//!   log file and exits 1;
//! - none of these within the deadline (the longest `listen_timeout`, twice, plus 30 s):
//!   says so, stops the instance, exits 1.
//!
//! A second `start` of a config that is running says so and exits 1 (`reload` or `restart`
//! replace its workers).

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::{load, table, EXIT_CONFIG};
use crate::config::Config;
use crate::control::client::{self, ClientError};
use crate::control::{socket_path, Reply, Request};
use crate::logs::LogFormat;
use crate::supervisor::status::{Status, Verdict};

/// How often the instance is asked how it is doing while it starts.
const POLL: Duration = Duration::from_millis(100);

/// Lines of a failing worker's output shown.
const REPORT_LINES: usize = 20;

/// Runs `corral start`.
pub(super) fn start(path: &Path, env: Option<&str>, log_format: LogFormat) -> anyhow::Result<ExitCode> {
    let config = match load(path, env) {
        Ok(config) => config,
        Err(code) => return Ok(code),
    };
    let socket = socket_path(&config.path);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let status = |rt: &tokio::runtime::Runtime| rt.block_on(ask_status(&socket));
    if let Ok(Some(running)) = status(&runtime) {
        eprintln!(
            "corral: already running for {} (pid {}): `corral reload` re-reads the config, `corral restart` replaces the workers",
            config.path.display(),
            running.pid
        );
        return Ok(ExitCode::FAILURE);
    }
    let log_path = log_path(&config, &socket);
    let log = open_log(&log_path).with_context(|| format!("cannot open corral's log file {}", log_path.display()))?;
    let mut command = Command::new(std::env::current_exe().context("cannot find the corral binary")?);
    command
        .arg("--config")
        .arg(&config.path)
        .arg("--log-format")
        .arg(match log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
        .arg("run");
    if let Some(name) = env {
        command.arg("--env").arg(name);
    }
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("cannot share the log file")?)
        .stderr(log);
    // SAFETY: between fork and exec only async-signal-safe calls are allowed; setsid(2) is
    // one, and the closure touches no memory of the parent. (std has `process_group`, which
    // is setpgid, but nothing for a new session.)
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
    }
    let mut child = command.spawn().context("cannot start corral run")?;
    let deadline = Instant::now() + boot_deadline(&config);
    loop {
        if let Some(exit) = child.try_wait().context("cannot watch the started corral")? {
            eprintln!(
                "corral: the started instance exited ({exit}); the end of its log, {}:",
                log_path.display()
            );
            eprint!("{}", tail(&log_path, REPORT_LINES));
            return Ok(if exit.code() == Some(i32::from(EXIT_CONFIG)) {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            });
        }
        // Until the control socket is up there is no status: ask again.
        if let Ok(Some(status)) = status(&runtime) {
            match status.verdict() {
                Verdict::Up => {
                    print!("{}", table(&status));
                    println!(
                        "corral is running in the background (pid {}); its log: {}",
                        child.id(),
                        log_path.display()
                    );
                    return Ok(ExitCode::SUCCESS);
                }
                Verdict::Failed { app, report } => {
                    eprintln!("corral: {report}");
                    eprint!("{}", runtime.block_on(recent_output(&socket, &app)));
                    stop(&runtime, &socket, &mut child);
                    eprintln!("corral: the instance was stopped; its log: {}", log_path.display());
                    return Ok(ExitCode::FAILURE);
                }
                Verdict::Starting => {}
            }
        }
        if Instant::now() > deadline {
            eprintln!(
                "corral: not every worker was ready within {:?}; the instance was stopped; its log: {}",
                boot_deadline(&config),
                log_path.display()
            );
            stop(&runtime, &socket, &mut child);
            return Ok(ExitCode::FAILURE);
        }
        std::thread::park_timeout(POLL);
    }
}

/// corral's own log when started in the background.
fn log_path(config: &Config, socket: &Path) -> PathBuf {
    config
        .corral
        .log_file
        .clone()
        .unwrap_or_else(|| socket.with_extension("log"))
}

/// Opens (appends to) the log, private to corral's user; creates the runtime directory as
/// `corral run` would if the log goes there.
fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        if dir == crate::control::runtime_dir::dir() {
            crate::control::runtime_dir::ensure(dir).map_err(std::io::Error::other)?;
        }
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}

/// How long a start may take before `start` gives up.
fn boot_deadline(config: &Config) -> Duration {
    let longest = config
        .apps
        .iter()
        .map(|a| a.listen_timeout)
        .max()
        .unwrap_or(Duration::from_secs(10));
    longest * 2 + Duration::from_secs(30)
}

/// `corral status` of the instance at `socket`: `None` when none runs there (yet).
async fn ask_status(socket: &Path) -> Result<Option<Status>, ClientError> {
    let asked = async {
        let mut replies = match client::request(socket, &Request::Status).await {
            Ok(replies) => replies,
            Err(ClientError::NotRunning { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        while let Some(reply) = replies.next().await? {
            if let Reply::Status(status) = reply {
                return Ok(Some(status));
            }
        }
        Ok(None)
    };
    tokio::time::timeout(Duration::from_secs(10), asked)
        .await
        .unwrap_or(Ok(None))
}

/// The last lines `app`'s workers printed, as corral keeps them in memory.
async fn recent_output(socket: &Path, app: &str) -> String {
    let asked = async {
        let request = Request::Logs {
            app: Some(app.to_owned()),
            lines: REPORT_LINES,
        };
        let mut replies = client::request(socket, &request).await.ok()?;
        while let Some(reply) = replies.next().await.ok()? {
            if let Reply::Logs { lines } = reply {
                return Some(lines);
            }
        }
        None
    };
    let lines = tokio::time::timeout(Duration::from_secs(10), asked)
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    crate::logs::recent::report(&lines)
}

/// Stops the instance at `socket` and reaps `child`.
fn stop(runtime: &tokio::runtime::Runtime, socket: &Path, child: &mut std::process::Child) {
    let asked = async {
        if let Ok(mut replies) = client::request(socket, &Request::Stop).await {
            while let Ok(Some(_)) = replies.next().await {}
        }
    };
    if runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(120), asked).await })
        .is_err()
    {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// The last `n` lines of the file at `path` (at most its last 64 KiB are read).
fn tail(path: &Path, n: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    let mut out = lines[lines.len().saturating_sub(n)..].join("\n");
    out.push('\n');
    out
}
