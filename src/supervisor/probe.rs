//! Readiness checks of new workers: a TCP connect, an HTTP `ready_path`, or PM2's
//! `process.send('ready')` over the worker's IPC channel.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Event;

/// How to tell that a new worker is ready.
pub(super) struct Readiness {
    pub(super) addr: SocketAddr,
    /// `GET` this and expect 2xx; `None` means a TCP connect is enough.
    pub(super) path: Option<String>,
    pub(super) timeout: Duration,
}

impl Readiness {
    /// The readiness check `spec` asks for, of a worker at `addr`.
    pub(super) fn of(addr: SocketAddr, spec: &crate::config::AppConfig) -> Readiness {
        Readiness {
            addr,
            path: spec.ready_path.clone(),
            timeout: spec.listen_timeout,
        }
    }

    /// Reports `Ready` once the check passes, or `NeverReady` at the deadline.
    pub(super) async fn run(self, id: u64, cancel: CancellationToken, events: mpsc::UnboundedSender<Event>) {
        let deadline = Instant::now() + self.timeout;
        let mut pause = Duration::from_millis(5);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                passed = tokio::time::timeout_at(deadline, self.check()) => if passed == Ok(true) {
                    let _supervisor_gone = events.send(Event::Ready { id });
                    return;
                },
            }
            if Instant::now() >= deadline {
                let _supervisor_gone = events.send(Event::NeverReady { id });
                return;
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until((Instant::now() + pause).min(deadline)) => {}
            }
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    async fn check(&self) -> bool {
        http_ok(self.addr, self.path.as_deref()).await
    }
}

/// True if `addr` accepts a connection and, with a `path`, answers `GET path` with 2xx.
pub(super) async fn http_ok(addr: SocketAddr, path: Option<&str>) -> bool {
    probe(addr, path).await == Some(true)
}

/// Like [`http_ok`], but `None` when corral itself could not open a connection (out of file
/// descriptors): that says nothing about the worker, and a health check skips it.
pub(super) async fn probe(addr: SocketAddr, path: Option<&str>) -> Option<bool> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = match tokio::net::TcpStream::connect(addr).await {
        Ok(stream) => stream,
        Err(e) if crate::limits::is_exhausted(&e) => return None,
        Err(_) => return Some(false),
    };
    let Some(path) = path else { return Some(true) };
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: corral-health\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return Some(false);
    }
    let mut head = [0u8; 12];
    Some(stream.read_exact(&mut head).await.is_ok() && head.starts_with(b"HTTP/1.") && head[9] == b'2')
}

/// PM2's `wait_ready`: reports `Ready` when the worker's `process.send('ready')` arrives on its
/// IPC channel (newline-delimited JSON), or `NeverReady` at the deadline. Other messages are
/// ignored; the channel is read until the worker closes it, so the worker never blocks on it.
pub(super) async fn wait_for_ready_message(
    id: u64,
    channel: tokio::net::UnixStream,
    timeout: Duration,
    cancel: CancellationToken,
    events: mpsc::UnboundedSender<Event>,
) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(channel).lines();
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut ready = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled(), if !ready => return,
            _ = &mut deadline, if !ready => {
                let _supervisor_gone = events.send(Event::NeverReady { id });
                return;
            }
            line = lines.next_line() => match line {
                Ok(Some(line)) => {
                    let message: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                    if !ready && (message == "ready" || message["type"] == "ready") {
                        ready = true;
                        let _supervisor_gone = events.send(Event::Ready { id });
                    }
                }
                // Closed or broken: the worker exited (its exit is reported) or closed its
                // channel without saying it is ready (the deadline reports that).
                Ok(None) | Err(_) => {
                    if !ready {
                        tokio::select! {
                            _ = cancel.cancelled() => {}
                            _ = &mut deadline => {
                                let _supervisor_gone = events.send(Event::NeverReady { id });
                            }
                        }
                    }
                    return;
                }
            },
        }
    }
}
