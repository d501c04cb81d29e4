//! Prometheus metrics: counters the request path bumps, summed at scrape time, and the worker
//! gauges of the supervisor's status snapshot.
//!
//! # Shard-local counters
//!
//! The proxy runs one thread per CPU ([`crate::shards`]). A counter that every request of every
//! shard bumps (one `AtomicU64` per app) would bounce its cache line between the CPUs on each
//! request, which is exactly the cost the shards exist to avoid. So each app has one
//! [`ShardMeter`] per shard, handed to that shard's [`crate::listener::Front`] when it is built:
//! only that shard's thread ever writes it, and the scrape sums the shards. A meter is
//! `#[repr(align(128))]` in an allocation of its own, so the meters of two shards never share a
//! cache line (128 bytes: the adjacent-line prefetcher pulls pairs of 64-byte lines).
//!
//! With one writer, a bump is a plain load and store (no `lock` prefix, no read-modify-write
//! across CPUs): [`Local::add`]. The fields are still atomics so that the scrape, on another
//! thread, reads them without a data race; it may see a value a few nanoseconds old, never a
//! torn one. The one-writer rule holds because a connection, and every task its requests spawn
//! (HTTP/2 streams, tunnels), runs on the current-thread runtime of the shard that accepted it.
//!
//! What the request path records ([`ShardMeter`]): responses by status code (every code corral
//! answered, its own 4xx/5xx and 421s included; hyper's own answers to unparsable heads never
//! reach corral and are not counted), the time to the response head ([`BUCKETS`], from the
//! arrival of the request head to the moment the worker's response head is in hand, so an
//! hour-long SSE stream counts as the millisecond it took to start), requests in flight (until
//! the response's last byte is sent or the client goes away), open client connections, failed
//! connects to workers. TLS handshakes are counted per listen address ([`ListenMeter`]).
//!
//! # Worker gauges
//!
//! Workers by state, memory per slot, restarts by reason and reloads by result come from the
//! supervisor's [`Status`]: [`Registry::observe`] keeps the latest one (the sampler refreshes it
//! every [`SAMPLE_EVERY`]; a scrape handler that wants it fresh observes one first).
//!
//! # The last minute
//!
//! [`Registry::sample_every`] keeps the summed counters of the last [`WINDOW`] in a ring;
//! [`Registry::recent`] turns the difference between now and the oldest sample into requests per
//! second and a 99th percentile, which `corral status` shows: the same numbers as `/metrics`.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use tokio_util::sync::CancellationToken;

use crate::supervisor::status::Status;

mod render;

/// Upper bounds of the latency histogram, seconds: from a 1 ms hello-world to a 2 s SSR page.
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// [`BUCKETS`] in nanoseconds, for the request path (an integer compare per bucket).
const BUCKET_NANOS: [u64; 14] = [
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Slots of the histogram: the finite buckets and `+Inf`.
const SLOTS: usize = BUCKETS.len() + 1;

/// Status codes 100..=599, one counter each.
const CODES: usize = 500;

/// How often the sampler records the counters (and refreshes the status snapshot).
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// The span of [`Registry::recent`].
pub const WINDOW: Duration = Duration::from_secs(60);

/// A counter with a single writer: the bump is a load and a store, not a locked
/// read-modify-write. Signed gauges are kept as wrapping `u64`s (read back as `i64`).
#[derive(Debug, Default)]
pub struct Local(AtomicU64);

impl Local {
    /// Adds `n` (wrapping). Only the owning thread may call this; a second writer would lose
    /// updates (never memory safety).
    #[inline]
    pub fn add(&self, n: u64) {
        self.0
            .store(self.0.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    /// Subtracts one (wrapping).
    #[inline]
    fn sub_one(&self) {
        self.add(u64::MAX);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The counters of one app on one shard, written by that shard only (see the module doc).
#[repr(align(128))]
#[derive(Debug)]
pub struct ShardMeter {
    /// Responses by status code, index `code - 100`.
    codes: [Local; CODES],
    /// Time to the response head, per bucket (not cumulative; the last is `+Inf`).
    buckets: [Local; SLOTS],
    /// Sum of those times, nanoseconds.
    sum_nanos: Local,
    /// Requests whose response has not ended (wrapping).
    in_flight: Local,
    /// Open client connections counted for this app (wrapping).
    connections: Local,
    /// Connections to a worker that failed (refused, reset, timed out).
    connect_errors: Local,
}

impl Default for ShardMeter {
    fn default() -> Self {
        ShardMeter {
            codes: std::array::from_fn(|_| Local::default()),
            buckets: std::array::from_fn(|_| Local::default()),
            sum_nanos: Local::default(),
            in_flight: Local::default(),
            connections: Local::default(),
            connect_errors: Local::default(),
        }
    }
}

impl ShardMeter {
    /// A response head with `status`, `ttfb` after its request head arrived.
    #[inline]
    pub fn answered(&self, status: u16, ttfb: Duration) {
        if let Some(counter) = self.codes.get(usize::from(status).wrapping_sub(100)) {
            counter.add(1);
        }
        let nanos = u64::try_from(ttfb.as_nanos()).unwrap_or(u64::MAX);
        let slot = BUCKET_NANOS.iter().position(|&b| nanos <= b).unwrap_or(BUCKETS.len());
        self.buckets[slot].add(1);
        self.sum_nanos.add(nanos);
    }

    /// A request in flight until the guard is dropped.
    #[inline]
    pub fn in_flight(self: &Arc<Self>) -> Flight {
        self.in_flight.add(1);
        Flight(Arc::clone(self))
    }

    /// A client connection counted open until the guard is dropped.
    pub fn connection(self: &Arc<Self>) -> Open {
        self.connections.add(1);
        Open(Arc::clone(self))
    }

    /// A connection to a worker failed.
    pub fn connect_failed(&self) {
        self.connect_errors.add(1);
    }
}

/// Counts one request in flight on its shard's meter while it lives.
#[derive(Debug)]
pub struct Flight(Arc<ShardMeter>);

impl Drop for Flight {
    fn drop(&mut self) {
        self.0.in_flight.sub_one();
    }
}

/// Counts one client connection open on its shard's meter while it lives.
#[derive(Debug)]
pub struct Open(Arc<ShardMeter>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.connections.sub_one();
    }
}

/// How a TLS handshake ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// Done (an ACME TLS-ALPN-01 validation included).
    Ok,
    /// The client sent something rustls refused, or closed the connection.
    Failed,
    /// Not done within `header_read_timeout` of the accept.
    Timeout,
}

impl Handshake {
    const ALL: [Handshake; 3] = [Handshake::Ok, Handshake::Failed, Handshake::Timeout];

    fn label(self) -> &'static str {
        match self {
            Handshake::Ok => "ok",
            Handshake::Failed => "failed",
            Handshake::Timeout => "timeout",
        }
    }
}

/// The TLS counters of one listen address on one shard, written by that shard only.
#[repr(align(128))]
#[derive(Debug, Default)]
pub struct ListenMeter {
    handshakes: [Local; 3],
}

impl ListenMeter {
    /// A handshake ended so.
    pub fn handshake(&self, result: Handshake) {
        self.handshakes[result as usize].add(1);
    }
}

/// One app's meters, one per shard (none for an app without `listen`).
#[derive(Debug)]
struct AppMeters {
    name: String,
    shards: Vec<Arc<ShardMeter>>,
    /// Access log lines lost (full channel, failed writes); bumped per lost batch, not per
    /// request, so one shared atomic is fine.
    log_drops: Arc<AtomicU64>,
}

/// The counters of one app summed over the shards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    /// Responses by status code, the codes seen only.
    pub codes: BTreeMap<u16, u64>,
    /// Every response.
    pub requests: u64,
    /// Histogram slots, not cumulative, the last is `+Inf`.
    pub buckets: [u64; SLOTS],
    /// Sum of the observed times, nanoseconds.
    pub sum_nanos: u64,
    /// Requests in flight.
    pub in_flight: i64,
    /// Open client connections.
    pub connections: i64,
    /// Failed connects to workers.
    pub connect_errors: u64,
}

/// Requests per second and 99th percentile over the last [`WINDOW`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Recent {
    /// Responses per second; `None` before a window has begun.
    pub req_per_sec: Option<f64>,
    /// 99th percentile time to first byte, ms; `None` without a response in the window.
    pub p99_ms: Option<f64>,
}

/// The summed counters at one moment, per app (requests and histogram slots).
#[derive(Debug)]
struct Sample {
    at: Instant,
    apps: Vec<(u64, [u64; SLOTS])>,
}

/// Every metric of a running corral.
#[derive(Debug)]
pub struct Registry {
    apps: Vec<AppMeters>,
    /// TLS listen addresses, each with its meters per shard.
    listens: Vec<(SocketAddr, Vec<Arc<ListenMeter>>)>,
    /// Samples of the last [`WINDOW`], oldest first.
    window: Mutex<VecDeque<Sample>>,
    /// The latest supervisor status, for the worker gauges.
    latest: ArcSwapOption<Status>,
}

impl Registry {
    /// Meters for `apps` (name, and whether it listens: only those get request meters), the
    /// TLS addresses `tls`, on `shards` shards.
    pub fn new<'a>(apps: impl IntoIterator<Item = (&'a str, bool)>, tls: &[SocketAddr], shards: usize) -> Registry {
        let shards = shards.max(1);
        let apps = apps
            .into_iter()
            .map(|(name, proxied)| AppMeters {
                name: name.to_owned(),
                shards: if proxied {
                    (0..shards).map(|_| Arc::new(ShardMeter::default())).collect()
                } else {
                    Vec::new()
                },
                log_drops: Arc::default(),
            })
            .collect();
        let listens = tls
            .iter()
            .map(|&addr| (addr, (0..shards).map(|_| Arc::default()).collect()))
            .collect();
        let registry = Registry {
            apps,
            listens,
            window: Mutex::new(VecDeque::new()),
            latest: ArcSwapOption::empty(),
        };
        registry.sample();
        registry
    }

    /// The meter of app number `app` (config order) for `shard`; `None` for an app without
    /// `listen`.
    pub fn shard(&self, app: usize, shard: usize) -> Option<Arc<ShardMeter>> {
        let shards = &self.apps.get(app)?.shards;
        shards.get(shard % shards.len().max(1)).cloned()
    }

    /// The TLS meter of `addr` for `shard`.
    pub fn listen(&self, addr: SocketAddr, shard: usize) -> Option<Arc<ListenMeter>> {
        let (_, shards) = self.listens.iter().find(|(a, _)| *a == addr)?;
        shards.get(shard % shards.len().max(1)).cloned()
    }

    /// The lost-lines counter of app number `app`'s access log.
    pub fn log_drops(&self, app: usize) -> Arc<AtomicU64> {
        self.apps.get(app).map(|a| Arc::clone(&a.log_drops)).unwrap_or_default()
    }

    /// App number `app`'s counters summed over the shards.
    pub fn totals(&self, app: usize) -> Totals {
        let mut totals = Totals::default();
        let Some(meters) = self.apps.get(app) else {
            return totals;
        };
        let (mut in_flight, mut connections) = (0u64, 0u64);
        for meter in &meters.shards {
            for (index, counter) in meter.codes.iter().enumerate() {
                let n = counter.get();
                if n > 0 {
                    *totals.codes.entry(index as u16 + 100).or_default() += n;
                }
            }
            for (slot, counter) in totals.buckets.iter_mut().zip(&meter.buckets) {
                *slot += counter.get();
            }
            totals.sum_nanos = totals.sum_nanos.wrapping_add(meter.sum_nanos.get());
            in_flight = in_flight.wrapping_add(meter.in_flight.get());
            connections = connections.wrapping_add(meter.connections.get());
            totals.connect_errors += meter.connect_errors.get();
        }
        // The histogram's count is the sum of its slots, so `+Inf` and `_count` always agree.
        totals.requests = totals.buckets.iter().sum();
        // A scrape between a shard's increment and another's decrement never goes below zero.
        totals.in_flight = (in_flight as i64).max(0);
        totals.connections = (connections as i64).max(0);
        totals
    }

    /// Keeps `status` for the worker gauges of the next renders.
    pub fn observe(&self, status: Status) {
        self.latest.store(Some(Arc::new(status)));
    }

    /// Records the summed counters now, and forgets samples older than [`WINDOW`].
    pub fn sample(&self) {
        let sample = Sample {
            at: Instant::now(),
            apps: (0..self.apps.len())
                .map(|app| {
                    let totals = self.totals(app);
                    (totals.requests, totals.buckets)
                })
                .collect(),
        };
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        window.push_back(sample);
        while window
            .front()
            .is_some_and(|s| s.at.elapsed() > WINDOW + Duration::from_millis(500))
        {
            window.pop_front();
        }
    }

    /// Requests per second and p99 of app number `app` from the oldest sample of the window to
    /// now.
    pub fn recent(&self, app: usize) -> Recent {
        if self.apps.get(app).is_none_or(|a| a.shards.is_empty()) {
            return Recent::default();
        }
        let now = self.totals(app);
        let window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let Some(oldest) = window.front() else {
            return Recent::default();
        };
        let elapsed = oldest.at.elapsed().as_secs_f64();
        let Some((requests, buckets)) = oldest.apps.get(app) else {
            return Recent::default();
        };
        let count = now.requests.saturating_sub(*requests);
        let mut slots = [0u64; SLOTS];
        for ((slot, now), then) in slots.iter_mut().zip(&now.buckets).zip(buckets) {
            *slot = now.saturating_sub(*then);
        }
        Recent {
            req_per_sec: (elapsed >= 0.1).then(|| count as f64 / elapsed),
            p99_ms: quantile(0.99, &slots).map(|seconds| seconds * 1000.0),
        }
    }

    /// Every `SAMPLE_EVERY` until `stop`: a sample of the counters, and a fresh status snapshot
    /// from `supervisor`. Runs on the main runtime.
    pub async fn sample_every(self: Arc<Self>, supervisor: crate::supervisor::Handle, stop: CancellationToken) {
        let mut every = tokio::time::interval(SAMPLE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            self.sample();
            match supervisor.status().await {
                Ok(status) => self.observe(status),
                Err(_) => return,
            }
        }
    }
}

/// The `q` quantile of a histogram's (non-cumulative) slots, seconds, interpolated linearly
/// inside its bucket as Prometheus' `histogram_quantile` does; the largest finite bound when
/// it falls in `+Inf`. `None` for an empty histogram.
pub fn quantile(q: f64, slots: &[u64; SLOTS]) -> Option<f64> {
    let count: u64 = slots.iter().sum();
    if count == 0 {
        return None;
    }
    let rank = q * count as f64;
    let mut below = 0u64;
    for (index, &n) in slots.iter().enumerate() {
        if n > 0 && (below + n) as f64 >= rank {
            let Some(&upper) = BUCKETS.get(index) else {
                return BUCKETS.last().copied();
            };
            let lower = if index == 0 { 0.0 } else { BUCKETS[index - 1] };
            let share = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
            return Some(lower + (upper - lower) * share);
        }
        below += n;
    }
    BUCKETS.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::status::{AppStatus, WorkerStatus};

    fn registry() -> Registry {
        Registry::new(
            [("web", true), ("queue", false)],
            &["127.0.0.1:8443".parse().expect("addr")],
            3,
        )
    }

    fn lines<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.starts_with(prefix)).collect()
    }

    #[test]
    fn meters_of_different_shards_never_share_a_cache_line() {
        let registry = registry();
        assert_eq!(std::mem::align_of::<ShardMeter>(), 128);
        assert_eq!(std::mem::size_of::<ShardMeter>() % 128, 0);
        let a = registry.shard(0, 0).expect("proxied");
        let b = registry.shard(0, 1).expect("proxied");
        let (a, b) = (Arc::as_ptr(&a) as usize, Arc::as_ptr(&b) as usize);
        assert_eq!(a % 128, 0);
        assert_eq!(b % 128, 0);
        assert!(a.abs_diff(b) >= std::mem::size_of::<ShardMeter>());
        assert!(
            registry.shard(1, 0).is_none(),
            "an app without listen has no request meters"
        );
    }

    #[test]
    fn counts_from_every_shard_are_summed_exactly() {
        let registry = registry();
        // Each shard's meter written from a thread of its own, as the shards do.
        std::thread::scope(|scope| {
            for shard in 0..3 {
                let meter = registry.shard(0, shard).expect("proxied");
                scope.spawn(move || {
                    for i in 0..1000u64 {
                        let status = if i % 10 == 0 { 502 } else { 200 };
                        meter.answered(status, Duration::from_micros(300 + i));
                    }
                    meter.answered(421, Duration::from_millis(2));
                });
            }
        });
        let totals = registry.totals(0);
        assert_eq!(totals.codes.get(&200), Some(&2700));
        assert_eq!(totals.codes.get(&502), Some(&300));
        assert_eq!(totals.codes.get(&421), Some(&3));
        assert_eq!(totals.requests, 3003);
        // 300..1299 µs: the first 201 (≤ 500 µs) in the first bucket, the rest ≤ 1 ms or 2.5 ms.
        assert_eq!(totals.buckets[0], 3 * 201);
        assert_eq!(totals.buckets[1], 3 * 500);
        assert_eq!(totals.buckets[2], 3 * 299 + 3);
        let sum: u64 = (0..1000u64).map(|i| (300 + i) * 1000).sum::<u64>() * 3 + 3 * 2_000_000;
        assert_eq!(totals.sum_nanos, sum);
    }

    #[test]
    fn guards_count_in_flight_and_open_connections_until_dropped() {
        let registry = registry();
        let meter = registry.shard(0, 2).expect("proxied");
        let flights: Vec<Flight> = (0..5).map(|_| meter.in_flight()).collect();
        let open = meter.connection();
        assert_eq!(registry.totals(0).in_flight, 5);
        assert_eq!(registry.totals(0).connections, 1);
        drop(flights);
        drop(open);
        assert_eq!(registry.totals(0).in_flight, 0);
        assert_eq!(registry.totals(0).connections, 0);
    }

    #[test]
    fn the_text_format_has_help_type_and_cumulative_buckets() {
        let registry = registry();
        let meter = registry.shard(0, 1).expect("proxied");
        meter.answered(200, Duration::from_micros(700));
        meter.answered(200, Duration::from_millis(2000));
        meter.answered(404, Duration::from_secs(20));
        meter.connect_failed();
        let _flight = meter.in_flight();
        registry
            .listen("127.0.0.1:8443".parse().expect("addr"), 0)
            .expect("tls address")
            .handshake(Handshake::Failed);
        let mut text = String::new();
        registry.render(&mut text);
        for name in [
            "corral_http_requests_total",
            "corral_http_request_duration_seconds",
            "corral_http_requests_in_flight",
            "corral_connections_open",
            "corral_upstream_connect_errors_total",
            "corral_tls_handshakes_total",
        ] {
            assert_eq!(lines(&text, &format!("# HELP {name} ")).len(), 1, "{name}\n{text}");
            assert_eq!(lines(&text, &format!("# TYPE {name} ")).len(), 1, "{name}\n{text}");
        }
        assert!(
            text.contains("corral_http_requests_total{app=\"web\",code=\"200\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("corral_http_requests_total{app=\"web\",code=\"404\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("le=\"0.0005\"} 0\n"), "{text}");
        assert!(
            text.contains("corral_http_request_duration_seconds_bucket{app=\"web\",le=\"0.001\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("corral_http_request_duration_seconds_bucket{app=\"web\",le=\"2.5\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("corral_http_request_duration_seconds_bucket{app=\"web\",le=\"10\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("corral_http_request_duration_seconds_bucket{app=\"web\",le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("corral_http_request_duration_seconds_count{app=\"web\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("corral_http_request_duration_seconds_sum{app=\"web\"} 22.0007\n"),
            "{text}"
        );
        assert!(
            text.contains("corral_http_requests_in_flight{app=\"web\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("corral_upstream_connect_errors_total{app=\"web\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("corral_tls_handshakes_total{listen=\"127.0.0.1:8443\",result=\"failed\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("corral_tls_handshakes_total{listen=\"127.0.0.1:8443\",result=\"ok\"} 0\n"),
            "{text}"
        );
        assert!(
            !text.contains("app=\"queue\""),
            "no request metrics for an app without listen:\n{text}"
        );
        // Every sample line is `name{labels} value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').expect("a value");
            assert!(value.parse::<f64>().is_ok(), "{line}");
            assert!(series.starts_with("corral_") && series.ends_with('}'), "{line}");
        }
    }

    #[test]
    fn worker_gauges_come_from_the_observed_status() {
        let registry = registry();
        let worker = |slot, state: &str, memory| WorkerStatus {
            app: "web".into(),
            slot,
            id: Some(1),
            generation: Some(1),
            pid: Some(1),
            port: Some(1),
            state: state.into(),
            uptime_ms: 0,
            restarts: 0,
            requests: 0,
            in_flight: 0,
            memory_bytes: memory,
            cpu_percent: None,
            last_exit: None,
        };
        let status = Status {
            pid: 1,
            config: "proxy.toml".into(),
            uptime_ms: 0,
            stopping: false,
            reloading: false,
            last_reload: None,
            leftovers_stopped: 0,
            env: None,
            upgrade: None,
            apps: vec![AppStatus {
                name: "web".into(),
                listen: Some("127.0.0.1:1".into()),
                instances: 2,
                ready: 1,
                tls: None,
                workers: vec![
                    worker(0, "online", Some(1000)),
                    worker(0, "draining", Some(500)),
                    worker(1, "waiting", None),
                ],
                req_per_sec: None,
                p99_ms: None,
                restarts_by_reason: [("crash".to_owned(), 2), ("memory".to_owned(), 0)].into(),
                reloads: [("ok".to_owned(), 1)].into(),
            }],
        };
        registry.observe(status);
        let mut text = String::new();
        registry.render(&mut text);
        assert!(
            text.contains("corral_workers{app=\"web\",state=\"online\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("corral_workers{app=\"web\",state=\"draining\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("corral_workers{app=\"web\",state=\"errored\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("corral_worker_memory_bytes{app=\"web\",slot=\"0\"} 1500\n"),
            "{text}"
        );
        assert!(!text.contains("slot=\"1\""), "{text}");
        assert!(
            text.contains("corral_worker_restarts_total{app=\"web\",reason=\"crash\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("corral_reloads_total{app=\"web\",result=\"ok\"} 1\n"),
            "{text}"
        );
        assert_eq!(lines(&text, "# TYPE corral_workers gauge").len(), 1);
    }

    #[test]
    fn the_p99_falls_in_the_bucket_of_the_slowest_percent() {
        let mut slots = [0u64; SLOTS];
        assert_eq!(quantile(0.99, &slots), None);
        // 99 fast requests (≤ 1 ms) and one of 2 s: p99 is still in the 1 ms bucket.
        slots[1] = 99;
        slots[11] = 1;
        let p99 = quantile(0.99, &slots).expect("requests");
        assert!((0.0005..=0.001).contains(&p99), "{p99}");
        // 10 fast, 90 at 250-500 ms: inside (0.25, 0.5].
        slots = [0; SLOTS];
        slots[1] = 10;
        slots[9] = 90;
        let p99 = quantile(0.99, &slots).expect("requests");
        assert!(p99 > 0.25 && p99 <= 0.5, "{p99}");
        slots = [0; SLOTS];
        slots[SLOTS - 1] = 3;
        assert_eq!(quantile(0.99, &slots), Some(10.0));
    }

    #[test]
    fn recent_rates_are_the_difference_to_the_oldest_sample() {
        let registry = registry();
        let meter = registry.shard(0, 0).expect("proxied");
        for _ in 0..40 {
            meter.answered(200, Duration::from_millis(300));
        }
        let before = Instant::now();
        // The window began when the registry was made.
        let recent = registry.recent(0);
        let rate = recent.req_per_sec;
        let p99 = recent.p99_ms.expect("responses in the window");
        assert!(p99 > 250.0 && p99 <= 500.0, "{p99}");
        if let Some(rate) = rate {
            assert!(rate >= 40.0 / (before.elapsed().as_secs_f64() + 60.0), "{rate}");
        }
        // A new sample starts nothing over: the oldest one still begins the window.
        registry.sample();
        assert_eq!(registry.recent(0).p99_ms, Some(p99));
        assert_eq!(registry.recent(1), Recent::default(), "no request meters: no rates");
    }
}
