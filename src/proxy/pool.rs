//! Connections from corral to one worker: a small pool of idle HTTP/1.1 connections.
//!
//! The pool only keeps connections; the exchanges on them are [`super::upstream`]'s, which
//! tells the proxy apart the three cases a safe retry depends on: the connect failed (nothing
//! was sent: any request may go to another worker); nothing of the request could be written
//! (same); or the request was written and no response head came back (only a bodiless
//! idempotent request may be repeated).
//!
//! Each shard ([`crate::shards`]) keeps its own idle connections, so only that shard's thread
//! ever uses them. Idle connections are kept LIFO (the most recently used is the warmest), at
//! most [`MAX_IDLE`], and one idle longer than [`IDLE_TIMEOUT`] is not reused: Node closes idle
//! connections after 5 s, and a request must never be sent on a connection the worker is
//! closing. One the worker has already closed is noticed at checkout and dropped. Stale
//! connections are also closed from the old end of the list whenever one is returned, and by
//! [`ConnPool::sweep`], which each shard runs every [`SWEEP_EVERY`] while it accepts: without
//! it, a quiet app kept every connection Node had closed in CLOSE_WAIT, an fd each. A connection
//! goes back to the pool only when its response body has been read to the end; dropping the
//! pool (the worker left rotation and its last request finished) closes every idle connection.
//!
//! Every connection holds a place in its shard's budget of worker connections
//! ([`super::Via::budget`]) for as long as it is open, idle ones included: they are fds too. A
//! connection returned while the budget is full is closed instead of kept, so a request that
//! waits for a place gets one at once.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;

pub use super::upstream::Conn;
use crate::shards;

/// Idle connections kept per worker and shard.
pub const MAX_IDLE: usize = 256;
/// Idle connections older than this are closed instead of reused (Node: 5 s keep-alive).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// How often each shard closes its stale idle connections.
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// Connecting on loopback is immediate or refused; this bounds a full accept backlog.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Idle {
    conn: Conn,
    since: Instant,
}

/// The idle connections to one worker.
#[derive(Debug)]
pub struct ConnPool {
    addr: SocketAddr,
    /// One list per shard. Only that shard's thread takes its lock, so it is never contended;
    /// it is there because the pool is shared with the supervisor (which drops it).
    /// Oldest first: connections are returned at the back and taken from the back.
    idle: Box<[Mutex<VecDeque<Idle>>]>,
}

impl ConnPool {
    /// An empty pool for the worker at `addr`.
    pub fn new(addr: SocketAddr) -> ConnPool {
        ConnPool {
            addr,
            idle: (0..shards::count()).map(|_| Mutex::new(VecDeque::new())).collect(),
        }
    }

    /// The calling shard's idle connections.
    fn idle(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        let list = &self.idle[shards::current() % self.idle.len()];
        // Short critical sections, no await inside: a std Mutex is right.
        list.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle connection ready for a request, if there is one.
    pub fn checkout(&self) -> Option<Conn> {
        loop {
            let idle = self.idle().pop_back()?;
            if idle.since.elapsed() < IDLE_TIMEOUT && idle.conn.is_reusable() {
                return Some(idle.conn);
            }
            // Dropping it closes it.
        }
    }

    /// Opens a new connection, which holds `budget` (its place in the shard's budget of worker
    /// connections) until it closes.
    pub async fn connect(&self, budget: OwnedSemaphorePermit) -> std::io::Result<Conn> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(self.addr))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        Ok(Conn::new(stream).counted(budget))
    }

    /// Returns a connection whose exchange is complete. When the shard's budget of worker
    /// connections is used up, it is closed instead, so that a request waiting for a place
    /// gets this one's (it may be for another worker).
    pub fn put(&self, conn: Conn) {
        if conn.budget_full() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle();
        close_stale(&mut idle, now);
        if idle.len() < MAX_IDLE {
            idle.push_back(Idle { conn, since: now });
        }
    }

    /// Closes the calling shard's idle connections that are too old to be reused.
    pub fn sweep(&self) {
        close_stale(&mut self.idle(), Instant::now());
    }
}

/// Drops (closes) the connections at the old end of `idle` that are past [`IDLE_TIMEOUT`].
fn close_stale(idle: &mut VecDeque<Idle>, now: Instant) {
    while idle
        .front()
        .is_some_and(|oldest| now.duration_since(oldest.since) >= IDLE_TIMEOUT)
    {
        idle.pop_front();
    }
}
