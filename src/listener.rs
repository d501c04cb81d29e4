//! The public sockets: bound once, served until stop.
//!
//! [`bind`] creates each app's listening socket with socket2 (`SO_REUSEADDR`, `SO_REUSEPORT`,
//! backlog 1024) before any worker starts, so an address in use fails `corral run` at once and
//! names the address. The socket is never closed and re-bound while corral runs; handing it to a
//! new corral process (binary upgrade) will start from the same [`PublicSocket`].
//!
//! [`serve`] is the accept loop. It owns the socket from then on, turns every connection into
//! a hyper HTTP/1.1 connection (with upgrades, for WebSocket) running the [`Proxy`] service, and
//! on shutdown stops accepting, closes the socket, and lets open connections finish their
//! in-flight request within the drain deadline; tunnels still open then are closed. (hyper-util's
//! `GracefulShutdown` cannot watch upgradeable connections, so each connection task selects on
//! the shutdown token itself and the tasks are tracked by a `TaskTracker`.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::HttpLimits;
use crate::proxy::forward::Peer;
use crate::proxy::framing::FramingGuard;
use crate::proxy::Proxy;

/// Pending connections the kernel queues while we are busy (or before the first worker is up).
const BACKLOG: i32 = 1024;

/// A bound, listening public socket.
#[derive(Debug)]
pub struct PublicSocket {
    /// The address it is bound to (with the real port when the config asked for port 0).
    pub addr: SocketAddr,
    socket: std::net::TcpListener,
}

/// The public address could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// bind(2) or listen(2) failed.
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        /// The address from the config.
        addr: SocketAddr,
        /// Why, in words a user acts on.
        reason: String,
    },
}

/// Binds `addr` for the public side of an app.
pub fn bind(addr: SocketAddr) -> Result<PublicSocket, ListenError> {
    let fail = |e: std::io::Error| {
        let reason = match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                format!("the address is already in use by another process ({e})")
            }
            std::io::ErrorKind::PermissionDenied => {
                format!("permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE ({e})")
            }
            std::io::ErrorKind::AddrNotAvailable => {
                format!("no local interface has this address ({e})")
            }
            _ => e.to_string(),
        };
        ListenError::Bind { addr, reason }
    };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(fail)?;
    socket.set_reuse_address(true).map_err(fail)?;
    // SO_REUSEPORT lets a new corral binary bind beside this one during an upgrade. It also
    // lets an unrelated process bind the same port, so refuse to share with a live listener:
    // probe first, the way a plain bind would have failed.
    if addr.port() != 0 && std::net::TcpStream::connect_timeout(&probe_addr(addr), Duration::from_millis(200)).is_ok() {
        return Err(fail(std::io::Error::from(std::io::ErrorKind::AddrInUse)));
    }
    socket.set_reuse_port(true).map_err(fail)?;
    socket.set_nonblocking(true).map_err(fail)?;
    if addr.is_ipv6() {
        // "[::]:80" serves IPv6 only; list "0.0.0.0:80" too for IPv4, as nginx does.
        socket.set_only_v6(true).map_err(fail)?;
    }
    socket.bind(&addr.into()).map_err(fail)?;
    socket.listen(BACKLOG).map_err(fail)?;
    let socket: std::net::TcpListener = socket.into();
    let addr = socket.local_addr().map_err(fail)?;
    Ok(PublicSocket { addr, socket })
}

/// hyper's own limit on header fields (kept on the stack); `max_headers` defaults to it.
const fn hyper_default_max_headers() -> usize {
    100
}

/// Where to knock to see whether someone already listens on `addr`.
fn probe_addr(addr: SocketAddr) -> SocketAddr {
    let mut probe = addr;
    if addr.ip().is_unspecified() {
        probe.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    probe
}

/// Accepts connections on `socket` and serves each with `proxy` until `shutdown` fires; then
/// closes the socket and drains open connections for at most `drain`.
pub async fn serve(
    socket: PublicSocket,
    proxy: Arc<Proxy>,
    limits: HttpLimits,
    shutdown: CancellationToken,
    drain: Duration,
) -> std::io::Result<()> {
    let addr = socket.addr;
    let listener = TcpListener::from_std(socket.socket)?;
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_size);
    if limits.max_headers != hyper_default_max_headers() {
        // Any explicit value makes hyper allocate the header array on the heap per request.
        http.max_headers(limits.max_headers);
    }
    // Every connection task is tracked; on stop each connection is asked to finish its
    // in-flight request and close (hyper's graceful shutdown), and the drain waits for all.
    let connections = TaskTracker::new();

    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: keep the socket, slow down, and let clients queue.
                    warn!(%addr, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!(%peer, error = %e, "TCP_NODELAY failed");
        }
        let proxy = Arc::clone(&proxy);
        let client = Peer::new(peer);
        let service = service_fn(move |req| Arc::clone(&proxy).serve(req, client.clone()));
        let stream = FramingGuard::new(stream, limits.max_header_size);
        let conn = http.serve_connection(TokioIo::new(stream), service).with_upgrades();
        let stop = shutdown.clone();
        connections.spawn(async move {
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }

    drop(listener);
    connections.close();
    info!(%addr, open_connections = connections.len(), "stopped accepting; draining connections");
    let deadline = tokio::time::Instant::now() + drain;
    if tokio::time::timeout_at(deadline, connections.wait()).await.is_err() {
        warn!(%addr, ?drain, "drain deadline passed; closing the remaining connections");
    }
    // Tunnels (WebSocket) are not HTTP connections any more: they get the same deadline.
    proxy.drain_tunnels(deadline).await;
    Ok(())
}
