//! What one client connection may hold, and how its client behaves: the books that bound an
//! HTTP/2 client (which multiplexes many requests over one socket) like an HTTP/1.1 one.
//!
//! A connection's [`Client`] lives on the shard that accepted it, so its counters are touched
//! by that one thread only; they are atomics because hyper's stream tasks must be `Send`, not
//! because anything contends for them.
//!
//! - **Worker connections per client connection.** An HTTP/1.1 connection carries one request at
//!   a time, so it holds at most one worker connection. An HTTP/2 connection may carry
//!   many at once, and a client that opens them all and never reads (a zero flow-control
//!   window) would hold that many worker connections, an fd each, for as long as it likes. So
//!   an HTTP/2 connection holds at most [`H2_WORKER_CONNS`] worker connections, and it is
//!   allowed as many concurrent streams ([`crate::listener::conn::H2_MAX_STREAMS`]); a stream
//!   that still finds no share free (one whose response body is still being sent after its
//!   stream ended for the client) waits for one, bounded by `upstream_timeout`, then 503.
//! - **Stalled clients** (nginx's `send_timeout`). Each response body tells the connection when
//!   it handed hyper a frame ([`Client::handed`]) and when hyper asked for the next
//!   ([`Client::polled`]). hyper asks only once the client has room for more (its socket
//!   drained, or its HTTP/2 window opened), so a body handed a frame and not asked again is
//!   waiting on the client, never on the worker: an SSE stream quiet for an hour is asked and
//!   waits on the worker. [`Stall`] reports a connection where every open stream waits on
//!   the client and none has moved for `send_timeout`; the listener closes it, which ends
//!   every stream and frees their worker connections. Per connection, not per stream (nginx
//!   times each HTTP/2 stream): hyper offers no way to reset one stream from outside, and a
//!   body hyper stopped polling cannot notice its own timeout. So a client that keeps one
//!   stream moving can keep its other paused streams' worker connections; the share per
//!   connection and the shard's budget bound what that costs.
//! - **Cancelled streams** (rapid reset, CVE-2023-44487). Every stream the client cancels before
//!   its response head takes a token from a bucket of [`RESET_BURST`] that refills at
//!   [`RESET_RATE`] a second; an empty bucket marks the client abusive. A bucket, not a ratio of
//!   cancelled to answered streams: a ratio could be kept low with cheap padding (requests
//!   corral answers itself), while a bucket bounds the cancelled streams' rate whatever else
//!   the client sends. A browser that cancels a navigation now and then never gets near.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Worker connections one HTTP/2 client connection may hold at once (and its streams).
pub const H2_WORKER_CONNS: usize = 32;
/// Streams a client may cancel before their response at once...
pub const RESET_BURST: u32 = 100;
/// ... and per second after that.
pub const RESET_RATE: u32 = 5;

/// One client connection's limits and behaviour.
#[derive(Debug)]
pub struct Client {
    /// Worker connections this connection may still take (HTTP/2 only).
    workers: Option<Arc<Semaphore>>,
    /// Response bodies alive (streams not yet finished), for the HTTP/2 idle timeout.
    live: AtomicU32,
    /// Bodies that handed hyper a frame and have not been asked for the next.
    waiting: AtomicU32,
    /// Polls of any body of the connection: changes whenever a response moves.
    polls: AtomicU64,
    resets: Mutex<Bucket>,
    /// Fired when the bucket runs dry.
    pub abusive: Notify,
}

#[derive(Debug)]
struct Bucket {
    tokens: u32,
    since: Instant,
    cancelled: u64,
}

impl Client {
    /// The books of an HTTP/1.1 connection.
    pub fn http1() -> Arc<Client> {
        Arc::new(Client::new(None))
    }

    /// The books of an HTTP/2 connection: at most [`H2_WORKER_CONNS`] worker connections.
    pub fn http2() -> Arc<Client> {
        Arc::new(Client::new(Some(Arc::new(Semaphore::new(H2_WORKER_CONNS)))))
    }

    fn new(workers: Option<Arc<Semaphore>>) -> Client {
        Client {
            workers,
            live: AtomicU32::new(0),
            waiting: AtomicU32::new(0),
            polls: AtomicU64::new(0),
            resets: Mutex::new(Bucket {
                tokens: RESET_BURST,
                since: Instant::now(),
                cancelled: 0,
            }),
            abusive: Notify::new(),
        }
    }

    /// A share of the connection's worker connections for one request, waiting up to `wait`
    /// for one; `Ok(None)` on HTTP/1.1, which needs none; `Err` when `wait` passed.
    pub async fn worker_share(&self, wait: Duration) -> Result<Option<OwnedSemaphorePermit>, ()> {
        let Some(workers) = &self.workers else {
            return Ok(None);
        };
        if let Ok(permit) = Arc::clone(workers).try_acquire_owned() {
            return Ok(Some(permit));
        }
        match tokio::time::timeout(wait, Arc::clone(workers).acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Some(permit)),
            _ => Err(()),
        }
    }

    /// A stream began (its request arrived).
    pub fn opened(&self) {
        self.live.fetch_add(1, Ordering::Relaxed);
    }

    /// A stream ended (its response body is gone, or the request was cancelled).
    pub fn closed(&self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }

    /// Streams open now.
    pub fn live(&self) -> u32 {
        self.live.load(Ordering::Relaxed)
    }

    /// A body was asked for a frame; `was_waiting` if it had handed one before.
    pub fn polled(&self, was_waiting: bool) {
        self.polls.fetch_add(1, Ordering::Relaxed);
        if was_waiting {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// A body handed hyper a frame and waits to be asked again.
    pub fn handed(&self) {
        self.waiting.fetch_add(1, Ordering::Relaxed);
    }

    /// A body that was waiting is gone.
    pub fn gone_waiting(&self) {
        self.waiting.fetch_sub(1, Ordering::Relaxed);
    }

    /// The progress mark for [`Stall`]: `None` unless every open stream waits on the client.
    /// One stream the client paused (a paused video, an unread download) beside one that waits
    /// on its worker (a quiet event stream) is a client that still reads: its connection stays,
    /// and the paused stream keeps its worker connection, within the connection's share.
    pub fn mark(&self) -> Option<u64> {
        let waiting = self.waiting.load(Ordering::Relaxed);
        (waiting > 0 && waiting >= self.live.load(Ordering::Relaxed)).then(|| self.polls.load(Ordering::Relaxed))
    }

    /// A stream was cancelled by the client before its response head: takes a token, and
    /// fires [`Client::abusive`] when there is none left.
    pub fn cancelled(&self) {
        self.cancelled_at(Instant::now());
    }

    fn cancelled_at(&self, now: Instant) {
        let mut bucket = self.resets.lock().unwrap_or_else(|p| p.into_inner());
        bucket.cancelled += 1;
        let earned = now.duration_since(bucket.since).as_millis() * u128::from(RESET_RATE) / 1000;
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            bucket.tokens = bucket.tokens.saturating_add(earned).min(RESET_BURST);
            bucket.since = now;
        }
        match bucket.tokens.checked_sub(1) {
            Some(left) => bucket.tokens = left,
            None => self.abusive.notify_one(),
        }
    }

    /// Streams the client has cancelled so far.
    pub fn cancels(&self) -> u64 {
        self.resets.lock().unwrap_or_else(|p| p.into_inner()).cancelled
    }
}

/// Watches one connection for a client that stopped reading: [`Stall::tick`] every `period`
/// says for how long some body has waited on the client with no body of the connection
/// moving (measured in whole periods, so it errs on the long side by up to one).
#[derive(Debug, Default)]
pub struct Stall {
    last: Option<u64>,
    stalled: Duration,
}

impl Stall {
    /// One tick, `period` after the last one: how long the client has been stalled.
    pub fn tick(&mut self, client: &Client, period: Duration) -> Duration {
        let mark = client.mark();
        if mark.is_some() && mark == self.last {
            self.stalled += period;
        } else {
            self.stalled = Duration::ZERO;
        }
        self.last = mark;
        self.stalled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reset_bucket_allows_a_burst_then_fires() {
        let client = Client::new(None);
        let fired = |client: &Client| {
            let notified = client.abusive.notified();
            tokio::pin!(notified);
            notified.as_mut().enable()
        };
        let start = client.resets.lock().unwrap().since;
        for _ in 0..RESET_BURST {
            client.cancelled_at(start);
        }
        assert!(!fired(&client));
        client.cancelled_at(start);
        assert!(fired(&client));
        // A second later RESET_RATE more are allowed, and the next one fires.
        let later = start + Duration::from_secs(1);
        for _ in 0..RESET_RATE {
            client.cancelled_at(later);
        }
        assert!(!fired(&client));
        client.cancelled_at(later);
        assert!(fired(&client));
        assert_eq!(client.cancels(), u64::from(RESET_BURST + RESET_RATE) + 2);
    }

    #[test]
    fn a_stall_needs_a_waiting_body_and_no_progress_for_two_ticks() {
        let client = Client::new(None);
        let mut stall = Stall::default();
        let second = Duration::from_secs(1);
        let mut tick = || stall.tick(&client, second).as_secs();
        // One stream. Nothing waits on the client (an idle SSE stream waits on its worker).
        client.opened();
        client.polled(false);
        assert_eq!([tick(), tick(), tick()], [0, 0, 0]);
        client.handed();
        assert_eq!([tick(), tick(), tick()], [0, 1, 2]);
        // It moved: the count starts over.
        client.polled(true);
        client.handed();
        assert_eq!([tick(), tick()], [0, 1]);
        // A second stream, waiting on its worker: the client still reads, nothing counts.
        client.opened();
        assert_eq!([tick(), tick()], [0, 0]);
        client.closed();
        client.gone_waiting();
        client.closed();
        assert_eq!(tick(), 0);
    }
}
