//! The CLI side of the control socket.

use std::path::Path;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::UnixStream;

use super::runtime_dir::{self, Presence, RuntimeDirError};
use super::{Reply, Request};

/// Talking to the running instance failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No instance runs for this config.
    #[error("corral is not running for this config (no control socket at {path})")]
    NotRunning {
        /// The socket path looked at.
        path: String,
    },
    /// The socket exists but the conversation failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The runtime directory is not safe to talk through (someone else could own the socket).
    #[error(transparent)]
    RuntimeDir(#[from] RuntimeDirError),
    /// The instance answered something unreadable.
    #[error("unexpected reply from the running instance: {0}")]
    Protocol(String),
}

/// The replies to one request, read line by line.
#[derive(Debug)]
pub struct Replies {
    lines: Lines<BufReader<OwnedReadHalf>>,
    path: String,
}

impl Replies {
    /// The next reply, or `None` when the instance closed the connection.
    pub async fn next(&mut self) -> Result<Option<Reply>, ClientError> {
        let line = self.lines.next_line().await.map_err(|source| ClientError::Io {
            path: self.path.clone(),
            source,
        })?;
        match line {
            None => Ok(None),
            Some(line) => serde_json::from_str(&line)
                .map(Some)
                .map_err(|e| ClientError::Protocol(format!("{e}: {line}"))),
        }
    }
}

/// Sends `request` to the instance listening on `socket`, after checking the runtime
/// directory that holds it ([`runtime_dir::check`]): a socket in a directory that someone else
/// could write to may not be corral's at all.
pub async fn request(socket: &Path, request: &Request) -> Result<Replies, ClientError> {
    let path = socket.display().to_string();
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        if runtime_dir::check(dir)? == Presence::Missing {
            return Err(ClientError::NotRunning { path });
        }
    }
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning { path: path.clone() }
            }
            _ => ClientError::Io {
                path: path.clone(),
                source,
            },
        })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push('\n');
    write
        .write_all(line.as_bytes())
        .await
        .map_err(|source| ClientError::Io {
            path: path.clone(),
            source,
        })?;
    Ok(Replies {
        lines: BufReader::new(read).lines(),
        path,
    })
}
