//! WebSocket and other `Upgrade` tunnels.
//!
//! The handshake is an ordinary request, balanced (and made sticky) like any other, with its
//! `Connection: upgrade` and `Upgrade` headers kept. If the worker answers `101 Switching
//! Protocols`, the client's hyper connection is upgraded, the worker's socket is taken off its
//! exchange, and [`splice`] copies bytes both ways until either side closes. The tunnel holds the request's in-flight guard, so it counts as in flight
//! (and shows in `corral status`), and a draining worker keeps its tunnels until
//! `drain_timeout`, when its `cut` token closes them. On stop, tunnels are waited for until the
//! drain deadline and closed then.
//!
//! A side that closes its half (EOF) has that half-close passed on (a `shutdown(SHUT_WR)` of
//! the other socket), so request/response protocols over the tunnel still finish; the tunnel
//! then ends [`HALF_CLOSED_LINGER`] later if the other side never closes, instead of holding
//! two sockets forever. With `tunnel_idle_timeout`, a tunnel with no byte in either direction
//! for that long is closed too (WebSocket apps that ping keep theirs).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::framing::FramingGuard;
use crate::balancer::InFlight;

/// The protocol a request asks to upgrade to, if it asks (`Connection: upgrade` + `Upgrade`).
pub fn requested(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(header::UPGRADE).cloned()).flatten()
}

/// Puts the upgrade headers back after hop-by-hop stripping.
pub fn restore(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// How long a tunnel stays open after one side closed its half while the other did not.
pub const HALF_CLOSED_LINGER: Duration = Duration::from_secs(60);

/// Copies bytes between the client and the worker once the client's side has upgraded;
/// `early` is what the worker sent right after its `101`. Ends when both sides have closed,
/// [`HALF_CLOSED_LINGER`] after the first did, after `idle` without traffic, or when `cut`
/// (worker drain deadline) or `closing` (corral stopping) fires.
pub async fn splice(
    client: OnUpgrade,
    worker: TcpStream,
    early: Bytes,
    guard: InFlight,
    budget: Option<tokio::sync::OwnedSemaphorePermit>,
    closing: CancellationToken,
    idle: Option<Duration>,
) {
    // The worker socket's place in the shard's budget, until the tunnel closes.
    let _budget = budget;
    let client = match client.await {
        Ok(client) => client,
        Err(e) => {
            debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    // The client's own socket back from hyper (plain or TLS), with what hyper had read beyond
    // the handshake; its framing guard stops following HTTP from here on.
    let client = match client.downcast::<TokioIo<FramingGuard<TcpStream>>>() {
        Ok(parts) => {
            let mut socket = parts.io.into_inner();
            socket.stop();
            return run(socket, parts.read_buf, worker, early, guard, closing, idle).await;
        }
        Err(client) => client,
    };
    match client.downcast::<TokioIo<FramingGuard<TlsStream<TcpStream>>>>() {
        Ok(parts) => {
            let mut socket = parts.io.into_inner();
            socket.stop();
            run(socket, parts.read_buf, worker, early, guard, closing, idle).await;
        }
        Err(_) => debug!("upgraded connection of an unexpected type; tunnel not opened"),
    }
}

/// The tunnel over the client's socket, until it ends or is cut.
async fn run(
    client: impl AsyncRead + AsyncWrite,
    pending: Bytes,
    mut worker: TcpStream,
    early: Bytes,
    guard: InFlight,
    closing: CancellationToken,
    idle: Option<Duration>,
) {
    let cut = guard.upstream().cut.clone();
    tokio::select! {
        ended = pump(client, &mut worker, pending, early, idle) => debug!("tunnel closed: {ended}"),
        _ = cut.cancelled() => debug!("tunnel closed: its worker's drain time is up"),
        _ = closing.cancelled() => debug!("tunnel closed: corral is stopping"),
    }
    drop(guard);
}

/// Copies both ways until the tunnel is over; says why it ended.
async fn pump(
    client: impl AsyncRead + AsyncWrite,
    worker: &mut TcpStream,
    to_worker_first: Bytes,
    to_client_first: Bytes,
    idle: Option<Duration>,
) -> &'static str {
    let start = Instant::now();
    // Milliseconds after `start` of the last byte either way (one tunnel's own counter).
    let last = AtomicU64::new(0);
    let (mut from_client, mut to_client) = tokio::io::split(client);
    let (mut from_worker, mut to_worker) = worker.split();
    let up = copy_half(&mut from_client, &mut to_worker, to_worker_first, start, &last);
    let down = copy_half(&mut from_worker, &mut to_client, to_client_first, start, &last);
    tokio::pin!(up, down);
    let (mut up_open, mut down_open) = (true, true);
    let mut half_closed_at: Option<Instant> = None;
    loop {
        let idle_at = idle.map(|d| start + Duration::from_millis(last.load(Ordering::Relaxed)) + d);
        let linger_at = half_closed_at.map(|at| at + HALF_CLOSED_LINGER);
        let wake = match (idle_at, linger_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        tokio::select! {
            copied = &mut up, if up_open => {
                up_open = false;
                if copied.is_err() {
                    return "error on the client side";
                }
                half_closed_at.get_or_insert_with(Instant::now);
            }
            copied = &mut down, if down_open => {
                down_open = false;
                if copied.is_err() {
                    return "error on the worker side";
                }
                half_closed_at.get_or_insert_with(Instant::now);
            }
            _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                let now = Instant::now();
                if linger_at.is_some_and(|at| now >= at) {
                    return "half-closed for too long";
                }
                let quiet = now.duration_since(start + Duration::from_millis(last.load(Ordering::Relaxed)));
                if idle.is_some_and(|d| quiet >= d) {
                    return "idle for tunnel_idle_timeout";
                }
            }
        }
        if !up_open && !down_open {
            return "both sides closed";
        }
    }
}

/// Copies `from` to `to` (after `first`) until `from` ends, then passes the half-close on.
async fn copy_half(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    first: Bytes,
    start: Instant,
    last: &AtomicU64,
) -> std::io::Result<()> {
    to.write_all(&first).await?;
    let mut buf = vec![0u8; 8 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}
