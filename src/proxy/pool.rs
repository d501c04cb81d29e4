//! Connections from corral to one worker: a small pool of HTTP/1.1 connections.
//!
//! hyper-util's general-purpose client pool hides the one thing a proxy must know to retry
//! safely: whether the request left corral. This pool is built on hyper's connection-level
//! client, so the proxy sees the three cases apart: the connect failed (nothing was sent: any
//! request may go to another worker); the connection was found closed before the request was
//! written (hyper hands the request back: same); or the request was written and the exchange
//! failed before a response head (only a bodiless idempotent request may be repeated).
//!
//! Each shard ([`crate::shards`]) keeps its own idle connections: a connection's I/O task runs on
//! the shard that opened it, and only that shard's requests use it. Idle connections are kept LIFO (the most recently used is the warmest), at most
//! [`MAX_IDLE`], and one idle longer than [`IDLE_TIMEOUT`] is not reused: Node closes idle
//! connections after 5 s, and a request must never be sent on a connection the worker is
//! closing. A connection goes back to the pool only when its response body has been read to the
//! end; dropping the pool (the worker left rotation and its last request finished) closes every
//! idle connection.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tracing::debug;

use crate::shards;

/// Idle connections kept per worker and shard.
pub const MAX_IDLE: usize = 256;
/// Idle connections older than this are closed instead of reused (Node: 5 s keep-alive).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Connecting on loopback is immediate or refused; this bounds a full accept backlog.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The body of a request on its way to a worker.
#[derive(Debug)]
pub enum UpstreamBody {
    /// No body (most GETs); such a request can be rebuilt and retried.
    Empty,
    /// The client's body, streamed.
    Stream(Incoming),
}

impl UpstreamBody {
    /// Wraps a client's body; an empty one becomes [`UpstreamBody::Empty`].
    pub fn from_client(body: Incoming) -> UpstreamBody {
        if body.is_end_stream() {
            UpstreamBody::Empty
        } else {
            UpstreamBody::Stream(body)
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpstreamBody::Empty => Poll::Ready(None),
            UpstreamBody::Stream(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Empty => true,
            UpstreamBody::Stream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Empty => SizeHint::with_exact(0),
            UpstreamBody::Stream(body) => body.size_hint(),
        }
    }
}

/// A connection to a worker: sends one request at a time.
pub type Conn = SendRequest<UpstreamBody>;

#[derive(Debug)]
struct Idle {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

/// The idle connections to one worker.
#[derive(Debug)]
pub struct ConnPool {
    addr: SocketAddr,
    /// One list per shard. Only that shard's thread takes its lock, so it is never contended;
    /// it is there because the pool is shared with the supervisor (which drops it).
    idle: Box<[Mutex<Vec<Idle>>]>,
}

impl ConnPool {
    /// An empty pool for the worker at `addr`.
    pub fn new(addr: SocketAddr) -> ConnPool {
        ConnPool {
            addr,
            idle: (0..shards::count()).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    /// The calling shard's idle connections.
    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        let list = &self.idle[shards::current() % self.idle.len()];
        // Short critical sections, no await inside: a std Mutex is right.
        list.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle connection ready for a request, if there is one.
    pub async fn checkout(&self) -> Option<Conn> {
        loop {
            let conn = self.idle().pop()?;
            if conn.sender.is_closed() || conn.since.elapsed() >= IDLE_TIMEOUT {
                continue; // dropping it closes it
            }
            let mut sender = conn.sender;
            if !sender.is_ready() {
                // Put back the moment its response ended: the connection task may still be
                // finishing that exchange. It is ready within microseconds, or it is closing.
                match tokio::time::timeout(Duration::from_millis(50), sender.ready()).await {
                    Ok(Ok(())) => {}
                    _ => continue,
                }
            }
            return Some(sender);
        }
    }

    /// Opens a new connection.
    pub async fn connect(&self) -> std::io::Result<Conn> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(self.addr))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                debug!(worker = %addr, error = %e, "worker connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Returns a connection whose exchange is complete.
    pub fn put(&self, sender: SendRequest<UpstreamBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle();
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }
}
