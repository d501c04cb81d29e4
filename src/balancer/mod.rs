//! Which worker gets the next request: the pool snapshot and the selection over it.
//!
//! The supervisor builds a [`Pool`] of the app's *ready* workers after every change and
//! [`Balancer::publish`](crate::balancer::Balancer::publish)es it; the proxy calls [`Balancer::pick`](crate::balancer::Balancer::pick) on every request. The pool is
//! immutable and swapped whole through `arc-swap`, so the request path takes no lock that the
//! supervisor holds: a request sees either the old pool or the new one, never a half-updated
//! table, and a worker that left the pool is never picked again (requests already routed to it
//! finish on it).
//!
//! A worker that replaces a warm one (a reload's new worker, the replacement of an unhealthy or
//! oversized one) starts with a small share of the requests that grows to a full share over
//! [`SLOW_START`]; a fresh Node process serves its first thousands of requests unoptimised, and
//! handing it a full share of a busy app at once showed as the p99 of a reload under load
//! (24 ms in `benches/compare.py --mode reload`; 8.8 ms with this one-second slow start, while
//! the warm workers carry more of the load).
//! Workers that start with the app, or are added by `scale`, get their full share at once.
//!
//! Every pick returns an [`InFlight`] guard. It counts the request against the worker until it
//! is dropped, which the proxy arranges to happen when the response body has been sent, so
//! "in flight" covers streamed and long-lived responses too. Draining waits on
//! [`WorkerStats::wait_idle`](crate::balancer::WorkerStats::wait_idle) for that count to reach zero.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::uri::Authority;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::{Balance, Network, Sticky};
use crate::proxy::pool::ConnPool;

pub mod sticky;

/// How long a worker that replaces a warm one takes to reach its full share of requests.
pub const SLOW_START: Duration = Duration::from_secs(1);

/// Live counters of one worker, shared by the supervisor (status, drain) and the proxy.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Requests routed to the worker and not yet finished (response body sent or aborted).
    in_flight: AtomicUsize,
    /// Requests routed to the worker since it started.
    requests: AtomicU64,
    /// Set when the worker leaves rotation; from then on the last request out wakes `idle`.
    draining: AtomicBool,
    idle: Notify,
}

impl WorkerStats {
    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests routed so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Forgets an earlier drain (the worker was put back into rotation).
    pub fn reset_draining(&self) {
        self.draining.store(false, Ordering::SeqCst);
    }

    /// Waits until no request is in flight. Call after the worker left the pool.
    pub async fn wait_idle(&self) {
        self.draining.store(true, Ordering::SeqCst);
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// A ready worker as the proxy sees it: where it listens, and a connection pool to it.
///
/// Each upstream has its own connection pool: when the worker leaves the pool and the last
/// request on it finishes, the `Upstream` is dropped and its idle connections close with it, so
/// nothing can be sent to a worker on its way out.
#[derive(Debug)]
pub struct Upstream {
    /// The worker's supervisor id.
    pub id: u64,
    /// The worker's slot (`NODE_APP_INSTANCE`).
    pub slot: usize,
    /// The worker's loopback address.
    pub addr: SocketAddr,
    /// `127.0.0.1:PORT`, ready for request URIs.
    pub authority: Authority,
    /// Idle HTTP/1.1 connections to this worker.
    pub pool: ConnPool,
    /// Counters shared with the supervisor.
    pub stats: Arc<WorkerStats>,
    /// Cancelled at the drain deadline: responses still streaming from this worker (SSE) end
    /// cleanly, so clients reconnect to a worker in rotation.
    pub cut: CancellationToken,
    /// Set by the proxy when the worker refused a connection: selection skips it at once,
    /// before the supervisor has re-probed it and published a new pool.
    down: AtomicBool,
    /// When its slow start began, if it has one.
    slow_start: OnceLock<Instant>,
}

impl Upstream {
    /// An upstream for a worker listening on `addr`.
    pub fn new(id: u64, slot: usize, addr: SocketAddr, stats: Arc<WorkerStats>) -> Upstream {
        let authority =
            Authority::try_from(addr.to_string().as_str()).expect("UNWRAP: a socket address is a valid authority");
        Upstream {
            id,
            slot,
            addr,
            authority,
            pool: ConnPool::new(addr),
            stats,
            cut: CancellationToken::new(),
            down: AtomicBool::new(false),
            slow_start: OnceLock::new(),
        }
    }

    /// Starts its slow start now (once; later calls change nothing).
    pub fn start_slow_start(&self) {
        let _ = self.slow_start.get_or_init(Instant::now);
    }

    /// Whether pick number `turn` may go to it at `now`: always once its slow start is over;
    /// before, for a share of the turns that grows from 5% to 100% (turns are spread by a
    /// multiplicative hash, so the share holds whatever the rotation order).
    fn takes_turn(&self, now: Instant, turn: usize) -> bool {
        let Some(since) = self.slow_start.get() else {
            return true;
        };
        let age = now.saturating_duration_since(*since);
        if age >= SLOW_START {
            return true;
        }
        let share = 51 + (age.as_millis() * 973 / SLOW_START.as_millis()) as usize;
        ((turn as u32).wrapping_mul(2_654_435_761) >> 22) < share as u32
    }

    /// When its slow start ends, if one is running.
    fn slow_start_end(&self) -> Option<Instant> {
        self.slow_start.get().map(|since| *since + SLOW_START)
    }

    /// True while the worker is believed to refuse connections.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Sets or clears the "refuses connections" mark.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }
}

/// How an app routes requests; part of each pool snapshot, so a reload can change it.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Selection without affinity.
    pub balance: Balance,
    /// Affinity mode.
    pub sticky: Sticky,
    /// Affinity cookie name.
    pub cookie: String,
    /// Peers whose X-Forwarded-For is believed.
    pub trusted: Vec<Network>,
    /// Configured worker count (the range of slots).
    pub instances: usize,
}

impl Default for Routing {
    fn default() -> Self {
        Routing {
            balance: Balance::RoundRobin,
            sticky: Sticky::None,
            cookie: String::new(),
            trusted: Vec::new(),
            instances: 1,
        }
    }
}

/// An immutable set of ready workers.
#[derive(Debug, Default)]
pub struct Pool {
    members: Vec<Arc<Upstream>>,
    routing: Arc<Routing>,
    /// While a member's slow start runs: when the last one ends. Cleared (once) by the first
    /// pick after that, so picks only read the clock while it matters.
    ramping: AtomicBool,
    ramp_end: Option<Instant>,
}

impl Pool {
    /// A pool of these upstreams, in slot order, routed as `routing` says.
    pub fn new(mut members: Vec<Arc<Upstream>>, routing: Arc<Routing>) -> Pool {
        members.sort_by_key(|u| u.slot);
        let ramp_end = members.iter().filter_map(|u| u.slow_start_end()).max();
        let ramping = AtomicBool::new(ramp_end.is_some_and(|end| end > Instant::now()));
        Pool {
            members,
            routing,
            ramping,
            ramp_end,
        }
    }

    /// The time now, if some member's slow start may still run.
    fn ramp_clock(&self) -> Option<Instant> {
        if !self.ramping.load(Ordering::Relaxed) {
            return None;
        }
        let now = Instant::now();
        if self.ramp_end.is_none_or(|end| now >= end) {
            self.ramping.store(false, Ordering::Relaxed);
            return None;
        }
        Some(now)
    }

    /// Number of ready workers.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// True when no worker is ready.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

/// Counts a request against a worker while it lives.
#[derive(Debug)]
pub struct InFlight {
    upstream: Arc<Upstream>,
}

impl InFlight {
    fn new(upstream: Arc<Upstream>) -> InFlight {
        upstream.stats.requests.fetch_add(1, Ordering::Relaxed);
        upstream.stats.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight { upstream }
    }

    /// The worker this request is routed to.
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let stats = &self.upstream.stats;
        let before = stats.in_flight.fetch_sub(1, Ordering::SeqCst);
        if before == 1 && stats.draining.load(Ordering::SeqCst) {
            stats.idle.notify_waiters();
        }
    }
}

/// The first of `members` in turn from `start` that `take` accepts, or, with `least_conn`, the
/// accepted one with the fewest requests in flight (ties to the first in turn, so equally idle
/// workers still share the load).
fn select<'a>(
    members: &'a [Arc<Upstream>],
    start: usize,
    balance: Balance,
    take: impl Fn(&'a Arc<Upstream>) -> bool,
) -> Option<&'a Arc<Upstream>> {
    let n = members.len();
    let mut in_turn = (0..n).map(|i| &members[(start + i) % n]).filter(|u| take(u));
    match balance {
        Balance::RoundRobin => in_turn.next(),
        Balance::LeastConn => in_turn.min_by_key(|u| u.stats.in_flight()),
    }
}

/// Round-robin selection over the current pool of one app.
#[derive(Debug)]
pub struct Balancer {
    pool: ArcSwap<Pool>,
    next: AtomicUsize,
    /// Ready-worker count, for those who wait for the first worker (the accept loop).
    ready: watch::Sender<usize>,
    /// Where the proxy reports a worker that refused a connection (the supervisor re-probes it).
    unreachable: OnceLock<mpsc::UnboundedSender<u64>>,
}

impl Default for Balancer {
    fn default() -> Self {
        Balancer {
            pool: ArcSwap::from_pointee(Pool::default()),
            next: AtomicUsize::new(0),
            ready: watch::Sender::new(0),
            unreachable: OnceLock::new(),
        }
    }
}

impl Balancer {
    /// Replaces the pool; requests from now on see only `pool`.
    pub fn publish(&self, pool: Pool) {
        let ready = pool.len();
        self.pool.store(Arc::new(pool));
        self.ready.send_replace(ready);
    }

    /// The next worker in rotation, counted in flight; `None` when no worker is ready.
    pub fn pick(&self) -> Option<InFlight> {
        self.pick_for(None, &[])
    }

    /// Reads how the current pool routes, without taking a reference count on it (a shared
    /// counter every request would otherwise bounce between cores).
    pub fn with_routing<T>(&self, read: impl FnOnce(&Routing) -> T) -> T {
        read(&self.pool.load().routing)
    }

    /// A worker for a request: the ready worker of slot `affinity` if there is one, else the
    /// app's balancing method; never one in `tried` (by id) or marked down.
    pub fn pick_for(&self, affinity: Option<usize>, tried: &[u64]) -> Option<InFlight> {
        let pool = self.pool.load();
        let eligible = |u: &&Arc<Upstream>| !u.is_down() && !tried.contains(&u.id);
        if let Some(slot) = affinity {
            if let Some(u) = pool.members.iter().filter(eligible).find(|u| u.slot == slot) {
                return Some(InFlight::new(Arc::clone(u)));
            }
        }
        let n = pool.members.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let balance = pool.routing.balance;
        let chosen = match pool.ramp_clock() {
            None => select(&pool.members, start, balance, |u| eligible(&u)),
            // Skip a worker in slow start when this turn is not in its share; if every
            // candidate is, fall back to plain selection (never refuse a request).
            Some(now) => select(&pool.members, start, balance, |u| {
                eligible(&u) && u.takes_turn(now, start)
            })
            .or_else(|| select(&pool.members, start, balance, |u| eligible(&u))),
        };
        chosen.map(|u| InFlight::new(Arc::clone(u)))
    }

    /// Sets where [`Balancer::report_unreachable`] sends worker ids (once, by the supervisor).
    pub fn set_reporter(&self, tx: mpsc::UnboundedSender<u64>) {
        let _already_set = self.unreachable.set(tx);
    }

    /// The worker refused a connection: skip it from now on and tell the supervisor.
    pub fn report_unreachable(&self, upstream: &Upstream) {
        if !upstream.down.swap(true, Ordering::Relaxed) {
            if let Some(tx) = self.unreachable.get() {
                let _supervisor_gone = tx.send(upstream.id);
            }
        }
    }

    /// Closes the calling shard's stale idle connections to every worker in rotation (workers
    /// that left it close theirs when their pool is dropped).
    pub fn sweep_idle(&self) {
        for upstream in &self.pool.load().members {
            upstream.pool.sweep();
        }
    }

    /// Ends every response still streaming from a worker in rotation (SSE ends with its
    /// terminating chunk): the stop sequence's drain deadline has passed.
    pub fn cut_all(&self) {
        for upstream in &self.pool.load().members {
            upstream.cut.cancel();
        }
    }

    /// Waits until at least one worker is ready.
    pub async fn wait_ready(&self) {
        let mut ready = self.ready.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = ready.wait_for(|n| *n > 0).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn upstream(id: u64, slot: usize) -> Arc<Upstream> {
        let addr = SocketAddr::from(([127, 0, 0, 1], 40_000 + slot as u16));
        Arc::new(Upstream::new(id, slot, addr, Arc::default()))
    }

    #[tokio::test]
    async fn round_robin_visits_every_worker_evenly() {
        let balancer = Balancer::default();
        assert!(balancer.pick().is_none());
        balancer.publish(Pool::new(
            vec![upstream(1, 0), upstream(2, 1), upstream(3, 2)],
            Arc::default(),
        ));
        let mut counts = [0; 3];
        for _ in 0..30 {
            let guard = balancer.pick().expect("pool is not empty");
            counts[guard.upstream().slot] += 1;
        }
        assert_eq!(counts, [10, 10, 10]);
    }

    #[tokio::test]
    async fn a_worker_out_of_the_pool_is_never_picked() {
        let balancer = Balancer::default();
        let (a, b) = (upstream(1, 0), upstream(2, 1));
        balancer.publish(Pool::new(vec![a.clone(), b.clone()], Arc::default()));
        balancer.publish(Pool::new(vec![b.clone()], Arc::default()));
        for _ in 0..10 {
            assert_eq!(balancer.pick().expect("b is ready").upstream().id, 2);
        }
    }

    #[tokio::test]
    async fn affinity_wins_when_its_slot_is_ready_and_falls_back_otherwise() {
        let balancer = Balancer::default();
        balancer.publish(Pool::new(vec![upstream(1, 0), upstream(2, 1)], Arc::default()));
        for _ in 0..5 {
            assert_eq!(balancer.pick_for(Some(1), &[]).expect("ready").upstream().slot, 1);
        }
        assert!(
            balancer.pick_for(Some(7), &[]).is_some(),
            "an unknown slot is balanced normally"
        );
        assert_eq!(
            balancer.pick_for(Some(1), &[2]).expect("ready").upstream().slot,
            0,
            "a tried worker is skipped"
        );
    }

    #[tokio::test]
    async fn least_conn_avoids_the_busy_worker() {
        let balancer = Balancer::default();
        let routing = Arc::new(Routing {
            balance: Balance::LeastConn,
            ..Routing::default()
        });
        let (a, b) = (upstream(1, 0), upstream(2, 1));
        balancer.publish(Pool::new(vec![a, b], routing));
        let busy: Vec<InFlight> = (0..3)
            .map(|_| balancer.pick_for(Some(0), &[]).expect("ready"))
            .collect();
        for _ in 0..10 {
            let guard = balancer.pick().expect("ready");
            assert_eq!(guard.upstream().slot, 1, "slot 0 has {} in flight", busy.len());
        }
    }

    #[test]
    fn a_slow_start_share_grows_from_a_twentieth_to_all_turns() {
        let u = upstream(1, 0);
        let now = Instant::now();
        let taken = |at: Instant| (0..4096).filter(|&turn| u.takes_turn(at, turn)).count();
        assert_eq!(taken(now), 4096, "no slow start: every turn");
        u.start_slow_start();
        let since = *u.slow_start.get().expect("started");
        let at_start = taken(since);
        let halfway = taken(since + SLOW_START / 2);
        assert!((100..=300).contains(&at_start), "about 5% at first: {at_start}");
        assert!((1800..=2400).contains(&halfway), "about half halfway: {halfway}");
        assert_eq!(taken(since + SLOW_START), 4096, "all turns once it is over");
    }

    #[tokio::test]
    async fn workers_in_slow_start_still_serve_when_nothing_else_can() {
        let balancer = Balancer::default();
        let (a, b) = (upstream(1, 0), upstream(2, 1));
        a.start_slow_start();
        b.start_slow_start();
        balancer.publish(Pool::new(vec![a.clone(), b.clone()], Arc::default()));
        let mut counts = [0; 2];
        for _ in 0..200 {
            counts[balancer.pick().expect("never refused").upstream().slot] += 1;
        }
        assert!(counts.iter().all(|&c| c > 0), "both serve: {counts:?}");
        // Beside a warm worker, a new one gets a small share at first.
        let warm = upstream(3, 0);
        let new = upstream(4, 1);
        new.start_slow_start();
        balancer.publish(Pool::new(vec![warm, new], Arc::default()));
        let to_new = (0..1000)
            .filter(|_| balancer.pick().expect("ready").upstream().id == 4)
            .count();
        assert!(
            to_new < 900,
            "the new worker got {to_new} of 1000 at the start of its slow start"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_the_last_guard() {
        let balancer = Balancer::default();
        let a = upstream(1, 0);
        balancer.publish(Pool::new(vec![a.clone()], Arc::default()));
        let first = balancer.pick().expect("ready");
        let second = balancer.pick().expect("ready");
        assert_eq!(a.stats.in_flight(), 2);
        balancer.publish(Pool::default());
        let stats = a.stats.clone();
        let drained = tokio::spawn(async move { stats.wait_idle().await });
        drop(first);
        tokio::task::yield_now().await;
        assert!(!drained.is_finished());
        drop(second);
        tokio::time::timeout(Duration::from_secs(1), drained)
            .await
            .expect("drain finished")
            .expect("task ran");
        assert_eq!(a.stats.in_flight(), 0);
        assert_eq!(a.stats.requests(), 2);
    }
}
