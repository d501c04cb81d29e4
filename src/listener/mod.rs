//! The public sockets: bound once, served until stop.
//!
//! [`bind`] creates an app's listening sockets with socket2 (`SO_REUSEADDR`, `SO_REUSEPORT`,
//! backlog 1024) before any worker starts, so an address in use fails `corral run` at once and
//! names the address. There is one socket per shard ([`crate::shards`]), all on the same
//! address: the kernel spreads incoming connections over them, and each shard accepts only from
//! its own. The sockets are never closed and re-bound while corral runs; a new corral process
//! (self-upgrade, [`crate::upgrade`]) gets the very same sockets and [`adopt`]s them.
//!
//! [`serve`] is one shard's accept loop for one address. It owns its socket from then on,
//! serves every connection for the apps on that address ([`conn::Front`], routing by host
//! name when several share it): plain HTTP/1.1 (with upgrades, for WebSocket), or TLS with
//! HTTP/2 or HTTP/1.1 by ALPN ([`conn`]). On shutdown it stops accepting, closes the socket,
//! and lets open connections finish their in-flight requests within the drain deadline;
//! tunnels still open then are closed. (hyper-util's `GracefulShutdown` cannot watch
//! upgradeable connections, so each connection task selects on the shutdown token itself and
//! the tasks are tracked by a `TaskTracker`.)
//!
//! Admission ([`admission`]): a per-shard share of `max_connections` and the optional
//! `max_connections_per_ip`; a plain-HTTP client over the per-address limit gets a 503 and a
//! closed connection, a TLS one a closed connection. An accept that fails for lack of file
//! descriptors backs off for [`ACCEPT_BACKOFF`] instead of spinning, with one warning per
//! [`WARN_EVERY`]. Idle keep-alive connections are closed after `header_read_timeout` (hyper
//! starts that timer whenever it waits for a request head), and each shard sweeps its stale
//! idle worker connections every [`crate::proxy::pool::SWEEP_EVERY`]. The plain-HTTP
//! `http_redirect` listeners are in [`redirect`].

mod admission;
pub mod conn;
pub mod redirect;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::HttpLimits;
use crate::proxy::client::Client;
use crate::proxy::error::ProxyError;
use crate::proxy::forward::Peer;
use admission::Throttle;
pub use admission::{Admission, PerIp};
pub use conn::Front;
use conn::Protocols;

/// How long a shard waits before accepting again after running out of file descriptors.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one warning per this, for each kind of accept-side trouble of a shard.
pub const WARN_EVERY: Duration = Duration::from_secs(5);

/// After the drain deadline, how long ended streams get to write their last bytes.
const END_STREAMS: Duration = Duration::from_secs(1);

/// Pending connections the kernel queues while we are busy (or before the first worker is up).
const BACKLOG: i32 = 1024;

/// An app's bound, listening public sockets: one per shard, all on one address.
#[derive(Debug)]
pub struct PublicSocket {
    /// The address they are bound to (with the real port when the config asked for port 0).
    pub addr: SocketAddr,
    /// The sockets, one for each shard's accept loop.
    pub sockets: Vec<std::net::TcpListener>,
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

/// Binds `addr` for the public side of an app, `count` sockets (at least one) sharing it.
pub fn bind(addr: SocketAddr, count: usize) -> Result<PublicSocket, ListenError> {
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
    // SO_REUSEPORT spreads connections over the shards' sockets and lets a new corral binary
    // bind beside this one during an upgrade. It also lets an unrelated process bind the same
    // port, so refuse to share with a live listener: probe first, the way a plain bind would
    // have failed.
    if addr.port() != 0 && std::net::TcpStream::connect_timeout(&probe_addr(addr), Duration::from_millis(200)).is_ok() {
        return Err(fail(std::io::Error::from(std::io::ErrorKind::AddrInUse)));
    }
    let first = listen_on(addr).map_err(fail)?;
    // With port 0 the kernel chose a port: the other shards join that one.
    let addr = first.local_addr().map_err(fail)?;
    let mut sockets = vec![first];
    for _ in 1..count.max(1) {
        sockets.push(listen_on(addr).map_err(fail)?);
    }
    Ok(PublicSocket { addr, sockets })
}

/// Serves the sockets a previous corral handed over ([`crate::upgrade`]): never re-bound, so
/// nothing queued on them is lost. With fewer than `count` (this process runs more shards),
/// new sockets join their `SO_REUSEPORT` group; with more, every one is still served (a
/// shard may take two), since closing one would reset the connections in its queue.
pub fn adopt(sockets: Vec<std::net::TcpListener>, count: usize) -> Result<PublicSocket, ListenError> {
    let Some(first) = sockets.first() else {
        return Err(ListenError::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            reason: "no socket was handed over".into(),
        });
    };
    let addr = first.local_addr().map_err(|e| ListenError::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        reason: e.to_string(),
    })?;
    let mut sockets = sockets;
    while sockets.len() < count {
        sockets.push(listen_on(addr).map_err(|e| ListenError::Bind {
            addr,
            reason: e.to_string(),
        })?);
    }
    Ok(PublicSocket { addr, sockets })
}

/// One non-blocking listening socket on `addr`, in the port's `SO_REUSEPORT` group.
fn listen_on(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    if addr.is_ipv6() {
        // "[::]:80" serves IPv6 only; list "0.0.0.0:80" too for IPv4, as nginx does.
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Closes the shard's stale idle worker connections of every app on the address every
/// `SWEEP_EVERY` until `shutdown`.
async fn sweep_idle(front: Arc<Front>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(crate::proxy::pool::SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => for proxy in &front.sites {
                proxy.balancer().sweep_idle();
            },
        }
    }
}

/// Answers every request of a connection over `max_connections_per_ip` with 503, then closes.
/// The answers count, and are logged, as the app's the request named.
async fn refuse(
    stream: tokio::net::TcpStream,
    http: hyper::server::conn::http1::Builder,
    front: Arc<Front>,
    peer: Peer,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let service = service_fn(move |req| {
        let (front, peer) = (Arc::clone(&front), peer.clone());
        async move {
            let (site, _) = front.route(&req, None);
            let refused = ProxyError::Exhausted {
                reason: "max_connections_per_ip".into(),
            };
            let mut response = front.answer(site, req, peer, &Client::http1(), Some(refused)).await;
            response
                .headers_mut()
                .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    if let Err(e) = http.serve_connection(TokioIo::new(stream), service).await {
        debug!(error = %e, "refused connection ended with an error");
    }
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

/// Drives a plain HTTP/1.1 connection to its end; when `stop` fires it finishes the request in
/// flight (hyper's graceful shutdown) and closes.
pub(crate) async fn until_done<C: std::future::Future<Output = Result<(), hyper::Error>>>(
    conn: C,
    graceful: fn(std::pin::Pin<&mut C>),
    stop: CancellationToken,
) -> Result<(), hyper::Error> {
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => result,
        _ = stop.cancelled() => {
            graceful(conn.as_mut());
            conn.await
        }
    }
}

/// One shard's way in: a connection slot (its share of `max_connections`), then a connection.
pub(crate) struct Gate {
    addr: SocketAddr,
    per_shard: usize,
    slots: Arc<tokio::sync::Semaphore>,
    full_warning: Throttle,
    accept_warning: Throttle,
}

impl Gate {
    pub(crate) fn new(addr: SocketAddr, per_shard: usize) -> Gate {
        Gate {
            addr,
            per_shard,
            slots: Arc::new(tokio::sync::Semaphore::new(per_shard.max(1))),
            full_warning: Throttle::default(),
            accept_warning: Throttle::default(),
        }
    }

    /// The next connection with its slot, or `None` once `shutdown` fires. At the limit it
    /// waits for a slot (clients queue in the backlog); out of fds it backs off.
    pub(crate) async fn next(
        &mut self,
        listener: &TcpListener,
        shutdown: &CancellationToken,
    ) -> Option<(tokio::sync::OwnedSemaphorePermit, tokio::net::TcpStream, SocketAddr)> {
        let addr = self.addr;
        loop {
            if self.slots.available_permits() == 0 && self.full_warning.ready() {
                warn!(%addr, shard = crate::shards::current(), per_shard = self.per_shard, "max_connections reached: new clients wait in the backlog");
            }
            let slot = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return None,
                slot = Arc::clone(&self.slots).acquire_owned() => slot.expect("UNWRAP: the semaphore is never closed"),
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return None,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => return Some((slot, stream, peer)),
                    Err(e) if crate::limits::is_exhausted(&e) => {
                        // Keep the socket, slow down, and let clients queue until fds are free.
                        if self.accept_warning.ready() {
                            warn!(%addr, shard = crate::shards::current(), error = %e, "accept failed: out of file descriptors; backing off");
                        }
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    // A connection that went away while queued, and the like: the next one.
                    Err(e) => debug!(%addr, error = %e, "accept failed"),
                },
            }
        }
    }
}

/// Accepts connections on `socket` (one of the sockets bound for the front's address) and
/// serves each for the apps of `front`, over TLS when `tls` is given, until `shutdown` fires;
/// then closes the socket and drains open connections for at most `drain`. Runs on a shard:
/// the connections it accepts are served on the same thread. `limits` are the connection-level
/// limits of the address (its first app's).
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    socket: std::net::TcpListener,
    front: Arc<Front>,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: HttpLimits,
    admission: Admission,
    shutdown: CancellationToken,
    drain: Duration,
) -> std::io::Result<()> {
    let addr = front.addr;
    let listener = TcpListener::from_std(socket)?;
    let protocols = Protocols::new(&limits);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    // Every connection task is tracked; on stop each connection is asked to finish its
    // in-flight request and close (hyper's graceful shutdown), and the drain waits for all.
    let connections = TaskTracker::new();
    let mut gate = Gate::new(addr, admission.per_shard);
    let sweeper = tokio::spawn(sweep_idle(Arc::clone(&front), shutdown.clone()));

    while let Some((slot, stream, peer)) = gate.next(&listener, &shutdown).await {
        let accepted_at = tokio::time::Instant::now();
        // The address the client reached (only a wildcard listen address needs asking).
        let local = if addr.ip().is_unspecified() {
            stream.local_addr().unwrap_or(addr)
        } else {
            addr
        };
        let client = Peer::new(peer, local, acceptor.is_some());
        let ip_slot = match &admission.per_ip {
            None => None,
            Some(table) => match table.admit(peer.ip().to_canonical()) {
                Some(ip_slot) => Some(ip_slot),
                // Over TLS a plain 503 would be noise to the client: the connection is closed.
                None if acceptor.is_some() => continue,
                None => {
                    connections.spawn(refuse(stream, protocols.h1.clone(), Arc::clone(&front), client, slot));
                    continue;
                }
            },
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!(%peer, error = %e, "TCP_NODELAY failed");
        }
        let (front, protocols, stop) = (Arc::clone(&front), protocols.clone(), shutdown.clone());
        let max_head = limits.max_header_size;
        let acceptor = acceptor.clone();
        connections.spawn(async move {
            // Held while the HTTP connection is open (a tunnel it turns into is not counted).
            let _admitted = (slot, ip_slot);
            match acceptor {
                None => conn::plain(stream, front, client, protocols, stop, max_head).await,
                Some(acceptor) => {
                    let deadline = accepted_at + protocols.header_read_timeout;
                    conn::tls(stream, acceptor, deadline, front, client, protocols, stop, max_head).await;
                }
            }
        });
    }

    drop(listener);
    sweeper.abort();
    connections.close();
    info!(%addr, shard = crate::shards::current(), open_connections = connections.len(), "stopped accepting; draining connections");
    let deadline = tokio::time::Instant::now() + drain;
    if tokio::time::timeout_at(deadline, connections.wait()).await.is_err() {
        warn!(%addr, shard = crate::shards::current(), ?drain, "drain deadline passed; ending open streams, then closing the remaining connections");
        // Streams (SSE) end cleanly, as at a worker's drain deadline, so clients reconnect
        // (after an upgrade: to the new corral); what is still open a moment later is closed.
        for proxy in &front.sites {
            proxy.balancer().cut_all();
        }
        let _ = tokio::time::timeout(END_STREAMS, connections.wait()).await;
    }
    // Tunnels (WebSocket) are not HTTP connections any more: they get the same deadline.
    for proxy in &front.sites {
        proxy.drain_tunnels(deadline).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{ErrorKind, Read, Write};

    #[test]
    fn every_shard_socket_shares_the_port_the_kernel_chose_and_together_they_take_every_connection() {
        let public = bind(SocketAddr::from(([127, 0, 0, 1], 0)), 3).expect("bind");
        assert_ne!(public.addr.port(), 0);
        assert_eq!(public.sockets.len(), 3);
        for socket in &public.sockets {
            assert_eq!(socket.local_addr().expect("bound"), public.addr);
        }
        let mut clients: Vec<_> = (0..12)
            .map(|_| std::net::TcpStream::connect(public.addr).expect("connect"))
            .collect();
        for client in &mut clients {
            client.write_all(b"x").expect("write");
        }
        // Every connection is queued on one of the sockets: accept them all, without waiting.
        let mut accepted = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while accepted < clients.len() && std::time::Instant::now() < deadline {
            for socket in &public.sockets {
                match socket.accept() {
                    Ok((mut conn, _)) => {
                        conn.set_nonblocking(false).expect("blocking");
                        let mut byte = [0u8; 1];
                        conn.read_exact(&mut byte).expect("read");
                        assert_eq!(&byte, b"x");
                        accepted += 1;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::yield_now(),
                    Err(e) => panic!("accept failed: {e}"),
                }
            }
        }
        assert_eq!(accepted, clients.len());
    }

    #[test]
    fn a_port_with_a_live_listener_is_refused() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("bound");
        let err = bind(addr, 2).expect_err("the port is taken");
        assert!(err.to_string().contains("already in use"), "{err}");
    }
}
