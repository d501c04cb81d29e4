//! The way in: [`Handle`], the cheap cloneable sender every other part of corral holds, and the
//! [`Command`]s it sends (with [`Scale`], the argument of `corral scale`). Kept apart from the
//! actor so the public surface of the supervisor reads in one place; `mod.rs` re-exports it.

use tokio::sync::{mpsc, oneshot};

use super::status::Status;

/// Why a command was not carried out: a kind a transport can act on (an HTTP status, an exit
/// code) and the words for a person. Shared by the control socket and the admin API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error("{message}")]
pub struct CommandError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// What happened, in words a user acts on.
    pub message: String,
}

/// The kinds of [`CommandError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// No app has that name.
    NoSuchApp,
    /// The request itself is malformed (a bad worker count, say).
    BadRequest,
    /// Another operation (a reload) is running; try again when it has finished.
    Busy,
    /// corral is stopping.
    Stopping,
    /// The config file is invalid; nothing changed.
    InvalidConfig,
    /// The config changes what a rolling reload cannot (the set of apps, a `listen` address,
    /// the edge or admin listeners): a new corral process takes over instead
    /// ([`crate::upgrade`]).
    Topology,
    /// The operation ran and failed (a reload rolled back).
    Failed,
    /// The supervisor is gone.
    Unavailable,
}

impl ErrorCode {
    /// The HTTP status the admin API answers with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::NoSuchApp => 404,
            ErrorCode::BadRequest => 400,
            ErrorCode::Busy => 409,
            ErrorCode::Stopping | ErrorCode::Unavailable => 503,
            ErrorCode::InvalidConfig | ErrorCode::Topology => 422,
            ErrorCode::Failed => 500,
        }
    }
}

impl CommandError {
    /// An error of kind `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> CommandError {
        CommandError {
            code,
            message: message.into(),
        }
    }
}

impl From<SupervisorGone> for CommandError {
    fn from(gone: SupervisorGone) -> CommandError {
        CommandError::new(ErrorCode::Unavailable, gone.to_string())
    }
}

/// What a command that changes the table answers: its summary, or why not.
pub type Outcome = Result<String, CommandError>;

/// The supervisor task has ended; nothing more can be asked of it.
#[derive(Debug, thiserror::Error)]
#[error("the supervisor has stopped")]
pub struct SupervisorGone;

/// A cheap, cloneable way to talk to the supervisor.
#[derive(Debug, Clone)]
pub struct Handle {
    pub(super) tx: mpsc::Sender<Command>,
}

impl Handle {
    /// A snapshot of every app and worker.
    pub async fn status(&self) -> Result<Status, SupervisorGone> {
        self.ask(Command::Status).await
    }

    /// Stops every worker (kill_signal, kill_timeout, SIGKILL) and waits until all have exited.
    pub async fn shutdown(&self) -> Result<(), SupervisorGone> {
        self.ask(Command::Shutdown).await
    }

    /// SIGKILLs every worker's process group now.
    pub async fn kill(&self) -> Result<(), SupervisorGone> {
        self.ask(Command::Kill).await
    }

    /// Re-reads the config file and replaces the workers of `app` (or of every app), slot by
    /// slot. Progress lines go to `progress`; the answer is the summary, or why nothing (or
    /// not everything) changed.
    pub async fn reload(
        &self,
        app: Option<String>,
        env: Option<String>,
        progress: mpsc::UnboundedSender<String>,
    ) -> Outcome {
        self.ask(|reply| Command::Reload {
            app,
            env,
            reread: true,
            progress,
            reply,
        })
        .await?
    }

    /// Replaces the workers of `app` (or of every app), slot by slot, with the config they run
    /// now (PM2's `restart`, without its downtime): no file is read.
    pub async fn restart(&self, app: Option<String>, progress: mpsc::UnboundedSender<String>) -> Outcome {
        self.ask(|reply| Command::Reload {
            app,
            env: None,
            reread: false,
            progress,
            reply,
        })
        .await?
    }

    /// The last `lines` lines of output of `app`'s workers (or every app's), oldest first.
    pub async fn logs(
        &self,
        app: Option<String>,
        lines: usize,
    ) -> Result<Vec<crate::logs::recent::LogLine>, CommandError> {
        self.ask(|reply| Command::Logs { app, lines, reply }).await?
    }

    /// Empties the log files of `app` (of every app for `None`): its workers' `out_file` and
    /// `error_file` and its access log, through their writer threads; rotated files stay.
    pub async fn flush(&self, app: Option<String>) -> Outcome {
        self.ask(|reply| Command::Flush { app, reply }).await?
    }

    /// Starts the workers of `app` that `stop_app` (or a crash loop) left stopped.
    pub async fn start_app(&self, app: String) -> Outcome {
        self.ask(|reply| Command::StartApp { app, reply }).await?
    }

    /// Changes the worker count of `app` (until the next reload, which applies the file's
    /// `instances`). New workers enter rotation when ready; removed ones drain, then stop.
    pub async fn scale(&self, app: String, change: Scale) -> Outcome {
        self.ask(|reply| Command::Scale { app, change, reply }).await?
    }

    /// Stops one app's workers (draining them first); they stay stopped until a reload of it.
    pub async fn stop_app(&self, app: String) -> Outcome {
        self.ask(|reply| Command::StopApp { app, reply }).await?
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, SupervisorGone> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| SupervisorGone)?;
        answer.await.map_err(|_| SupervisorGone)
    }
}

/// A change of worker count: `N`, `+N` or `-N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// Exactly this many.
    To(usize),
    /// This many more.
    Up(usize),
    /// This many fewer (never below 1).
    Down(usize),
}

impl std::str::FromStr for Scale {
    type Err = String;

    fn from_str(text: &str) -> Result<Scale, String> {
        let number = |digits: &str| {
            digits
                .parse::<usize>()
                .map_err(|_| format!("{text:?} is not N, +N or -N"))
        };
        match text.as_bytes().first() {
            Some(b'+') => number(&text[1..]).map(Scale::Up),
            Some(b'-') => number(&text[1..]).map(Scale::Down),
            _ => match number(text)? {
                0 => Err("an app needs at least one worker (use `corral stop` to stop everything)".into()),
                n => Ok(Scale::To(n)),
            },
        }
    }
}

/// Requests to the supervisor.
#[derive(Debug)]
pub enum Command {
    /// Reply with a status snapshot.
    Status(oneshot::Sender<Status>),
    /// Stop all workers; reply when they are gone.
    Shutdown(oneshot::Sender<()>),
    /// SIGKILL all workers; reply at once.
    Kill(oneshot::Sender<()>),
    /// Stop one app's workers.
    StopApp {
        /// The app.
        app: String,
        /// What was done, or why not.
        reply: oneshot::Sender<Outcome>,
    },
    /// Change an app's worker count.
    Scale {
        /// The app.
        app: String,
        /// The change.
        change: Scale,
        /// What was done, or why not.
        reply: oneshot::Sender<Outcome>,
    },
    /// Recent worker output.
    Logs {
        /// Only this app.
        app: Option<String>,
        /// How many lines.
        lines: usize,
        /// The lines, oldest first.
        reply: oneshot::Sender<Result<Vec<crate::logs::recent::LogLine>, CommandError>>,
    },
    /// Empty log files (`corral flush`).
    Flush {
        /// Only this app.
        app: Option<String>,
        /// What was done, or why not.
        reply: oneshot::Sender<Outcome>,
    },
    /// Start an app's stopped slots.
    StartApp {
        /// The app.
        app: String,
        /// What was done, or why not.
        reply: oneshot::Sender<Outcome>,
    },
    /// Rolling reload; reply when it succeeded or was rolled back.
    Reload {
        /// Only this app.
        app: Option<String>,
        /// `--env NAME`: this `[app.env_NAME]` from now on (a reload only).
        env: Option<String>,
        /// Read the config file (a reload), or run the current configs again (a restart).
        reread: bool,
        /// Progress lines.
        progress: mpsc::UnboundedSender<String>,
        /// The outcome.
        reply: oneshot::Sender<Outcome>,
    },
}
