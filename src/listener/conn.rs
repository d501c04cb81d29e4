//! One client connection: TLS handshake (when the address has `[app.tls]`), HTTP/1.1 or
//! HTTP/2 by ALPN, and the app each request goes to ([`Front`]).
//!
//! Deadlines: on a TLS address one deadline, `header_read_timeout`, runs from accept to the end
//! of the first request head, the handshake included, so a client that handshakes slowly or
//! never sends a request holds its slot no longer than one that sends its head slowly. After
//! the first request, hyper's own timer closes HTTP/1.1 connections idle for
//! `header_read_timeout`; an HTTP/2 connection with no open stream for as long gets GOAWAY
//! (hyper has no idle timer for HTTP/2), and one whose client stops answering pings (every
//! [`H2_PING`]) is closed after [`H2_PING_TIMEOUT`]. On both, a client that takes no byte of
//! its responses for `send_timeout` is dropped ([`crate::proxy::client`]).
//!
//! HTTP/2 limits, chosen on purpose: at most [`H2_MAX_STREAMS`] concurrent streams, as many as
//! the worker connections one HTTP/2 connection may hold
//! ([`crate::proxy::client::H2_WORKER_CONNS`]; nginx allows 128 streams, each with an upstream
//! connection of its own). Not more streams than that: a stream waiting for a worker connection
//! would leave its request body unread, and unread DATA fills the connection's flow-control
//! window that every stream shares, so 33 large uploads at once could stall all 32 that hold a
//! worker connection. A browser queues the rest itself, as it queues HTTP/1.1 requests; a header list no larger than `max_header_size` (the same limit as HTTP/1.1, which also
//! bounds a CONTINUATION flood: the h2 crate stops decoding a header block past it and answers
//! with an error); at most [`H2_PENDING_RESETS`] streams reset by the client before the proxy
//! saw them. Rapid reset (CVE-2023-44487) is the attack where a client opens and cancels
//! streams as fast as it can, so the concurrency limit never holds while each stream still
//! costs the server work (here: a request to a worker). corral counts, per connection, the
//! streams the client cancels before their response head, in a token bucket
//! ([`crate::proxy::client`]); when it runs dry the connection gets GOAWAY and is closed, and
//! its address is logged.
//!
//! Stopping (a stop, or the old process after a self-upgrade): HTTP/2 connections get GOAWAY,
//! which tells the client which streams were not served, so it retries them elsewhere. An
//! HTTP/1.1 connection has no such signal, and closing it while idle races a request its client
//! may be sending at that moment (the client sees a closed connection, not an answer): so for
//! [`LINGER`] every response carries `Connection: close` and the connection closes after it,
//! and only a connection still idle then is closed by corral (the race that remains is the one
//! every keep-alive timeout has, for clients idle for a whole second).
//!
//! WebSocket stays on HTTP/1.1: corral does not announce extended CONNECT (RFC 8441) on HTTP/2,
//! so browsers open their WebSocket on a connection of its own, negotiated as `http/1.1`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::HttpLimits;
use crate::metrics::{Handshake, ListenMeter, Open, ShardMeter};
use crate::proxy::body::ProxyBody;
use crate::proxy::client::{Client, Stall};
use crate::proxy::error::ProxyError;
use crate::proxy::forward::Peer;
use crate::proxy::framing::FramingGuard;
use crate::proxy::{Proxy, Via};
use crate::sites::{host_name, Names};

/// Concurrent streams one HTTP/2 connection may have.
pub const H2_MAX_STREAMS: u32 = crate::proxy::client::H2_WORKER_CONNS as u32;
/// Streams the client may reset before the server accepted them (the h2 crate's guard).
pub const H2_PENDING_RESETS: usize = 20;
/// An idle HTTP/2 connection is pinged this often...
pub const H2_PING: Duration = Duration::from_secs(30);
/// ... and closed when the ping is not answered within this.
pub const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// The apps served on one address, as one shard sees them.
#[derive(Debug)]
pub struct Front {
    /// The address.
    pub addr: SocketAddr,
    /// Which app a name belongs to.
    pub names: Arc<Names>,
    /// The apps' proxies, indexed like `names`' sites.
    pub sites: Vec<Arc<Proxy>>,
    /// This shard's meters of the apps, indexed like `sites`: only this shard writes them.
    pub meters: Vec<Arc<ShardMeter>>,
    /// This shard's TLS handshake counters of the address (TLS addresses).
    pub tls_meter: Option<Arc<ListenMeter>>,
    /// This shard's budget of worker connections for the address's apps.
    pub budget: Arc<Semaphore>,
}

impl Front {
    /// Sends `req` to the app its `Host` (or `:authority`) names. On TLS, `sni` is the app the
    /// handshake's server name picked (`None` without a server name); a request for another
    /// app is 421, so the client retries on a connection of its own. On an address several
    /// apps share, the connection is counted open for the app of its first request (unless
    /// the handshake already chose one).
    async fn serve(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: Peer,
        sni: Option<Option<usize>>,
        watch: &Watch,
    ) -> Response<ProxyBody> {
        let (site, misdirected) = self.route(&req, sni);
        if watch.open.get().is_none() {
            watch.open.get_or_init(|| self.meters[site].connection());
        }
        let refused = misdirected.map(|why| ProxyError::Refused {
            status: StatusCode::MISDIRECTED_REQUEST,
            why,
        });
        self.answer(site, req, peer, &watch.client, refused).await
    }

    /// Sends `req` to the proxy of `site`, or has it answered with `refused`.
    pub(super) async fn answer(
        &self,
        site: usize,
        req: Request<Incoming>,
        peer: Peer,
        client: &Client,
        refused: Option<ProxyError>,
    ) -> Response<ProxyBody> {
        // Borrowed, not cloned: the proxy is shared by every shard, and a reference count
        // bumped per request would be a cache line every CPU writes.
        let proxy = &self.sites[site];
        let via = Via {
            meter: &self.meters[site],
            budget: &self.budget,
            client,
        };
        match proxy.serve(req, peer, via, refused).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }

    /// The app `req` goes to, and why it is refused with 421 if it is. A request no app
    /// claims is counted (and logged) by the address's default app, else its first.
    pub(super) fn route(&self, req: &Request<Incoming>, sni: Option<Option<usize>>) -> (usize, Option<&'static str>) {
        if self.sites.len() == 1 {
            // The only app takes every name (and every SNI picked it).
            return (0, None);
        }
        let authority = match req.uri().authority() {
            Some(authority) => Some(authority.as_str()),
            None => req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()),
        };
        let site = match authority {
            Some(authority) => self.names.pick(host_name(authority)),
            None => sni.flatten().or(self.names.pick_sni(None)),
        };
        // A handshake without a server name was given the default app's certificate: it is
        // that app's connection.
        let sni = sni.map(|by_sni| by_sni.or(self.names.pick_sni(None)));
        match (site, sni) {
            (None, _) => (
                self.names.pick_sni(None).unwrap_or_default(),
                Some("no app on this address serves this host"),
            ),
            (Some(site), Some(Some(by_sni))) if site != by_sni => {
                (site, Some("this connection was made for another host: open a new one"))
            }
            (Some(site), _) => (site, None),
        }
    }
}

/// Per-connection protocol settings, built once per shard.
#[derive(Clone)]
pub(super) struct Protocols {
    pub(super) h1: http1::Builder,
    pub(super) h2: http2::Builder<TokioExecutor>,
    pub(super) header_read_timeout: Duration,
    pub(super) send_timeout: Duration,
}

impl Protocols {
    pub(super) fn new(limits: &HttpLimits) -> Protocols {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .keep_alive(true)
            .header_read_timeout(limits.header_read_timeout)
            .max_header_size(limits.max_header_size);
        if limits.max_headers != 100 {
            // Any explicit value makes hyper allocate the header array on the heap per request.
            h1.max_headers(limits.max_headers);
        }
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_STREAMS)
            .max_header_list_size(u32::try_from(limits.max_header_size).unwrap_or(u32::MAX))
            .max_pending_accept_reset_streams(H2_PENDING_RESETS)
            .max_local_error_reset_streams(1024)
            .keep_alive_interval(H2_PING)
            .keep_alive_timeout(H2_PING_TIMEOUT);
        Protocols {
            h1,
            h2,
            header_read_timeout: limits.header_read_timeout,
            send_timeout: limits.send_timeout,
        }
    }
}

/// What one connection's requests tell its task: that the first request head arrived, the
/// client's books ([`Client`]); and for which app it is counted open.
#[derive(Debug)]
pub(super) struct Watch {
    first: AtomicBool,
    /// A stop began: HTTP/1 responses from now on say `Connection: close`.
    closing: AtomicBool,
    streams: AtomicU64,
    client: Arc<Client>,
    /// Counts the connection open for its app until the connection (and so this) is gone.
    open: OnceLock<Open>,
}

impl Watch {
    /// A watch for a connection to `front` with `client`'s books, counted open at once when
    /// the address has one app.
    fn new(front: &Front, client: Arc<Client>) -> Arc<Watch> {
        let watch = Arc::new(Watch {
            first: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            streams: AtomicU64::new(0),
            client,
            open: OnceLock::new(),
        });
        if let [meter] = &front.meters[..] {
            watch.open.get_or_init(|| meter.connection());
        }
        watch
    }
}

/// One stream until its response is produced: counted open in the client's books, and
/// cancelled if it is dropped before then (the response body takes over the count).
struct Pending<'a> {
    client: &'a Client,
    answered: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.client.closed();
            self.client.cancelled();
        }
    }
}

/// How a connection is driven: HTTP/2 has an idle timeout of corral's own.
#[derive(Clone, Copy)]
struct Timers {
    /// The connection is closed if no request head has arrived by then.
    first_deadline: Option<Instant>,
    /// With no stream open for this long, the connection is finished (HTTP/2).
    idle: Option<Duration>,
    /// `send_timeout`.
    send: Duration,
    /// HTTP/1: how long an idle keep-alive connection stays open after a stop begins, so
    /// that a request its client is sending gets an answer (with `Connection: close`) rather
    /// than a closed connection. HTTP/2 needs none: GOAWAY tells the client which streams
    /// were not served.
    linger: Option<Duration>,
}

/// [`Timers::linger`] for HTTP/1 connections.
pub const LINGER: Duration = Duration::from_secs(1);

/// Drives `conn` to its end: finishes it gracefully on `stop`, when its client abuses stream
/// resets or when it has been idle too long, drops it at `first_deadline` if no request head
/// has arrived by then, and drops it when its client stalls.
async fn drive<C: Future<Output = Result<(), hyper::Error>>>(
    conn: C,
    graceful: fn(Pin<&mut C>),
    stop: CancellationToken,
    watch: &Watch,
    timers: Timers,
    peer: SocketAddr,
) {
    tokio::pin!(conn);
    let (mut stopping, mut abusive, mut deadline) = (false, false, timers.first_deadline);
    // One tick checks both the stall (two ticks without progress) and the idle time.
    let period = timers.idle.map_or(timers.send, |idle| idle.min(timers.send)) / 2;
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut stall, mut idle_for) = (Stall::default(), Duration::ZERO);
    let client = &watch.client;
    let mut lingering: Option<Instant> = None;
    let result = loop {
        tokio::select! {
            result = conn.as_mut() => break result,
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                watch.closing.store(true, Ordering::Relaxed);
                match timers.linger {
                    Some(linger) => lingering = Some(Instant::now() + linger),
                    None => graceful(conn.as_mut()),
                }
            }
            _ = tokio::time::sleep_until(lingering.unwrap_or_else(Instant::now)), if lingering.is_some() => {
                lingering = None;
                graceful(conn.as_mut());
            }
            _ = client.abusive.notified(), if !abusive => {
                abusive = true;
                warn!(%peer, cancelled = client.cancels(), streams = watch.streams.load(Ordering::Relaxed), "client cancels HTTP/2 streams faster than allowed (rapid reset): closing the connection");
                graceful(conn.as_mut());
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                if !watch.first.load(Ordering::Relaxed) {
                    debug!(%peer, "no request head within header_read_timeout of accept; closing");
                    return;
                }
                deadline = None;
            }
            _ = tick.tick() => {
                if stall.tick(client, period) >= timers.send {
                    info!(%peer, send_timeout = ?timers.send, streams = client.live(), "client took no byte of its responses within send_timeout; closing the connection");
                    return;
                }
                idle_for = if client.live() == 0 { idle_for + period } else { Duration::ZERO };
                if timers.idle.is_some_and(|idle| idle_for >= idle) && !stopping {
                    debug!(%peer, "HTTP/2 connection idle for header_read_timeout; closing");
                    stopping = true;
                    graceful(conn.as_mut());
                }
            }
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// The service of one connection: every request goes through [`Front::serve`].
fn service(
    front: &Arc<Front>,
    peer: Peer,
    sni: Option<Option<usize>>,
    watch: &Arc<Watch>,
) -> impl hyper::service::Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible, Future: Send> + Clone
{
    let front = Arc::clone(front);
    let watch = Arc::clone(watch);
    service_fn(move |req| {
        let (front, peer, watch) = (Arc::clone(&front), peer.clone(), Arc::clone(&watch));
        async move {
            watch.first.store(true, Ordering::Relaxed);
            watch.streams.fetch_add(1, Ordering::Relaxed);
            watch.client.opened();
            let mut pending = Pending {
                client: &watch.client,
                answered: false,
            };
            let h2 = req.version() == http::Version::HTTP_2;
            let mut response = front.serve(req, peer, sni, &watch).await;
            if h2 {
                // Connection-specific fields do not exist in HTTP/2 (RFC 9113 §8.2.2).
                response.headers_mut().remove(http::header::CONNECTION);
            } else if watch.closing.load(Ordering::Relaxed)
                && response.status() != http::StatusCode::SWITCHING_PROTOCOLS
            {
                // Stopping: the client learns from this answer not to send another.
                response
                    .headers_mut()
                    .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
            }
            // The body counts the stream open from here, and reports when it waits on the client.
            response.body_mut().watch(Arc::clone(&watch.client));
            pending.answered = true;
            drop(pending);
            Ok::<_, Infallible>(response)
        }
    })
}

/// Serves a plain-HTTP connection (HTTP/1.1, with upgrades).
pub(super) async fn plain(
    stream: TcpStream,
    front: Arc<Front>,
    peer: Peer,
    protocols: Protocols,
    stop: CancellationToken,
    max_head: usize,
) {
    let watch = Watch::new(&front, Client::http1());
    let addr = peer.addr;
    let service = service(&front, peer, None, &watch);
    let io = TokioIo::new(FramingGuard::new(stream, max_head));
    let conn = protocols.h1.serve_connection(io, service).with_upgrades();
    let timers = Timers {
        first_deadline: None,
        idle: None,
        send: protocols.send_timeout,
        linger: Some(LINGER),
    };
    drive(conn, |c| c.graceful_shutdown(), stop, &watch, timers, addr).await;
}

/// Serves a TLS connection: the handshake within `deadline`, then HTTP/2 or HTTP/1.1 as ALPN
/// chose (a TLS-ALPN-01 validation ends after its handshake).
#[allow(clippy::too_many_arguments)]
pub(super) async fn tls(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    deadline: Instant,
    front: Arc<Front>,
    peer: Peer,
    protocols: Protocols,
    stop: CancellationToken,
    max_head: usize,
) {
    let addr = peer.addr;
    let handshake = tokio::time::timeout_at(deadline, acceptor.accept(stream)).await;
    if let Some(meter) = &front.tls_meter {
        meter.handshake(match &handshake {
            Ok(Ok(_)) => Handshake::Ok,
            Ok(Err(_)) => Handshake::Failed,
            Err(_) => Handshake::Timeout,
        });
    }
    let mut stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return debug!(peer = %addr, error = %e, "TLS handshake failed"),
        Err(_) => return debug!(peer = %addr, "TLS handshake not done within header_read_timeout"),
    };
    let session = stream.get_ref().1;
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    if alpn.as_deref() == Some(crate::tls::ACME_ALPN) {
        debug!(peer = %addr, "TLS-ALPN-01 validation handshake");
        let _ = stream.shutdown().await;
        return;
    }
    let sni = Some(session.server_name().and_then(|name| front.names.pick(name)));
    let h2 = alpn.as_deref() == Some(b"h2");
    let watch = Watch::new(&front, if h2 { Client::http2() } else { Client::http1() });
    if let Some(Some(site)) = sni {
        watch.open.get_or_init(|| front.meters[site].connection());
    }
    let service = service(&front, peer, sni, &watch);
    let timers = Timers {
        first_deadline: Some(deadline),
        idle: h2.then_some(protocols.header_read_timeout),
        send: protocols.send_timeout,
        linger: (!h2).then_some(LINGER),
    };
    if h2 {
        let conn = protocols.h2.serve_connection(TokioIo::new(stream), service);
        drive(conn, |c| c.graceful_shutdown(), stop, &watch, timers, addr).await;
    } else {
        let io = TokioIo::new(FramingGuard::new(stream, max_head));
        let conn = protocols.h1.serve_connection(io, service).with_upgrades();
        drive(conn, |c| c.graceful_shutdown(), stop, &watch, timers, addr).await;
    }
}
