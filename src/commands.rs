//! The one set of operator commands, whichever transport carries them: the control socket
//! (newline-delimited JSON, [`crate::control`]) and the admin HTTP API ([`crate::admin`]).
//!
//! A [`Request`] is parsed by the transport, [`execute`]d here against the supervisor's
//! [`Handle`], and answered with an [`Answer`] or a typed [`CommandError`] (its
//! [`ErrorCode`] becomes an HTTP status on the admin API and a non-zero exit in the CLI).
//! Progress of long commands (a reload) goes to a channel the transport drains as it likes:
//! lines on the socket, nothing on HTTP (the event stream shows it).

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use crate::logs::recent::LogLine;
use crate::supervisor::status::Status;
use crate::supervisor::{CommandError, ErrorCode, Handle, Scale};
use crate::upgrade::Upgrader;

/// A command.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Report every worker.
    Status,
    /// Graceful stop of the whole instance.
    Stop,
    /// Stop one app's workers; corral keeps running.
    StopApp {
        /// The app.
        app: String,
    },
    /// Start the workers of an app that was stopped (with the running config).
    StartApp {
        /// The app.
        app: String,
    },
    /// Rolling replacement of the workers with the config they run (no file is read).
    Restart {
        /// Only this app.
        app: Option<String>,
    },
    /// Change an app's worker count.
    Scale {
        /// The app.
        app: String,
        /// `N`, `+N` or `-N`.
        count: String,
    },
    /// Rolling reload, re-reading the config file.
    Reload {
        /// Only this app.
        app: Option<String>,
        /// `--env NAME`: merge this `[app.env_NAME]` from now on (else the one in use stays).
        #[serde(default)]
        env: Option<String>,
    },
    /// Empty the log files (worker out/err files and the access log) of an app, or of all.
    Flush {
        /// Only this app.
        app: Option<String>,
    },
    /// Self-upgrade: a new corral process (this binary's path, or `binary`) takes over.
    Upgrade {
        /// The new binary (absolute); default: the path this corral was started from.
        #[serde(default)]
        binary: Option<std::path::PathBuf>,
    },
    /// Recent worker output kept in memory.
    Logs {
        /// Only this app.
        app: Option<String>,
        /// How many lines (at most 1,000 per app are kept).
        lines: usize,
    },
}

/// What a command that succeeded answers.
#[derive(Debug, Clone)]
pub enum Answer {
    /// The status snapshot.
    Status(Box<Status>),
    /// Done; the summary.
    Done(String),
    /// The stop has begun (the process exits when it is complete).
    Stopping(String),
    /// Recent output lines, oldest first.
    Logs(Vec<LogLine>),
}

/// Carries out `request`; progress lines of a reload go to `progress`.
pub async fn execute(
    request: Request,
    supervisor: &Handle,
    shutdown: &CancellationToken,
    upgrader: &Arc<Upgrader>,
    progress: mpsc::UnboundedSender<String>,
) -> Result<Answer, CommandError> {
    match request {
        Request::Status => {
            let mut status = supervisor.status().await?;
            status.upgrade = upgrader.peer();
            Ok(Answer::Status(Box::new(status)))
        }
        Request::Upgrade { binary } => {
            let status = supervisor.status().await?;
            if status.stopping || shutdown.is_cancelled() {
                return Err(CommandError::new(ErrorCode::Stopping, "corral is stopping"));
            }
            if status.reloading {
                return Err(CommandError::new(
                    ErrorCode::Busy,
                    "a reload is running; upgrade when it has finished",
                ));
            }
            if let Some(path) = binary.as_ref().filter(|p| !p.is_absolute()) {
                return Err(CommandError::new(
                    ErrorCode::BadRequest,
                    format!("--binary {}: give an absolute path", path.display()),
                ));
            }
            upgrader.upgrade(binary, status.env, progress).await.map(Answer::Done)
        }
        Request::Reload { app, env } => match supervisor.reload(app, env.clone(), progress.clone()).await {
            Err(e) if e.code == ErrorCode::Topology => {
                // The same binary (even if its file was replaced since), the new config.
                let _ = progress.send(format!(
                    "{}: a rolling reload cannot change the listeners or the set of apps, so a new corral process takes over with the new config (every app's workers are replaced, without a failed request)",
                    e.message
                ));
                let env = match env {
                    Some(env) => Some(env),
                    None => supervisor.status().await?.env,
                };
                let self_exe = std::path::PathBuf::from("/proc/self/exe");
                upgrader.upgrade(Some(self_exe), env, progress).await.map(Answer::Done)
            }
            other => other.map(Answer::Done),
        },
        Request::Stop => {
            shutdown.cancel();
            Ok(Answer::Stopping(
                "stopping: draining connections, then stopping workers".into(),
            ))
        }
        Request::StopApp { app } => supervisor.stop_app(app).await.map(Answer::Done),
        Request::StartApp { app } => supervisor.start_app(app).await.map(Answer::Done),
        Request::Restart { app } => supervisor.restart(app, progress).await.map(Answer::Done),
        Request::Scale { app, count } => {
            let change = count
                .parse::<Scale>()
                .map_err(|message| CommandError::new(ErrorCode::BadRequest, message))?;
            supervisor.scale(app, change).await.map(Answer::Done)
        }
        Request::Logs { app, lines } => supervisor.logs(app, lines).await.map(Answer::Logs),
        Request::Flush { app } => supervisor.flush(app).await.map(Answer::Done),
    }
}

/// A reply line on the control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// The status snapshot.
    Status(Status),
    /// Progress of a long command.
    Progress {
        /// What happened.
        message: String,
    },
    /// The request succeeded; the summary.
    Done {
        /// What was done.
        message: String,
    },
    /// Recent output lines.
    Logs {
        /// Oldest first.
        lines: Vec<LogLine>,
    },
    /// The request failed.
    Error {
        /// Why.
        message: String,
        /// What kind of failure (absent from replies of older versions).
        #[serde(default)]
        code: Option<ErrorCode>,
    },
}

impl Reply {
    /// The last reply line for `answer`.
    pub fn from_answer(answer: Result<Answer, CommandError>) -> Reply {
        match answer {
            Ok(Answer::Status(status)) => Reply::Status(*status),
            Ok(Answer::Done(message)) => Reply::Done { message },
            // A progress line: the client waits for the end of the connection.
            Ok(Answer::Stopping(message)) => Reply::Progress { message },
            Ok(Answer::Logs(lines)) => Reply::Logs { lines },
            Err(error) => Reply::from(error),
        }
    }
}

impl From<CommandError> for Reply {
    fn from(error: CommandError) -> Reply {
        Reply::Error {
            message: error.message,
            code: Some(error.code),
        }
    }
}
