//! The HTTP proxy: one hyper service per public connection, forwarding each request to a worker.
//!
//! For every request the service asks the app's [`Balancer`] for a worker (a lock-free read of
//! the current pool snapshot), rewrites the head ([`forward`]), sends it on that worker's pooled
//! HTTP/1.1 client, and returns the worker's response with its body streamed as it arrives
//! ([`body`]). Bodies are never buffered, in either direction, so a 10 GB upload or an endless
//! SSE stream costs the same memory as a tiny request. The in-flight guard rides inside the
//! response body, so a worker counts as busy until the last byte of its response has left.
//!
//! Everything that goes wrong becomes a short 502/503/504 ([`error`]); the service itself never
//! fails and never panics. Malformed requests never reach it: hyper answers them with 400/431
//! under the limits set in [`crate::listener::serve`].
//!
//! The proxy owns no worker state. It learns about workers only through the pool snapshots the
//! supervisor publishes.

pub mod body;
pub mod error;
pub mod forward;
pub mod framing;
pub mod pool;
pub mod tunnel;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::balancer::sticky::{self, CookieSigner};
use crate::balancer::Balancer;
use crate::config::Sticky;
use body::ProxyBody;
use error::ProxyError;
use forward::Peer;
use http::header::SET_COOKIE;
use pool::{Conn, UpstreamBody};

/// The proxy of one app.
#[derive(Debug)]
pub struct Proxy {
    app: String,
    balancer: Arc<Balancer>,
    upstream_timeout: Duration,
    /// Cancelled by the listener at the end of its drain: open tunnels close.
    closing: CancellationToken,
    /// The open tunnels, so a stop can wait for them (up to the drain deadline).
    tunnels: TaskTracker,
    /// Signs the affinity cookies of `sticky = "cookie"`.
    cookies: CookieSigner,
}

impl Proxy {
    /// A proxy for `app` over the workers `balancer` publishes.
    pub fn new(app: String, balancer: Arc<Balancer>, upstream_timeout: Duration) -> Proxy {
        let cookies = CookieSigner::new(&app);
        Proxy {
            app,
            balancer,
            upstream_timeout,
            closing: CancellationToken::new(),
            tunnels: TaskTracker::new(),
            cookies,
        }
    }

    /// Waits until `deadline` for open tunnels (WebSocket) to end, then closes the rest.
    pub async fn drain_tunnels(&self, deadline: tokio::time::Instant) {
        self.tunnels.close();
        if !self.tunnels.is_empty() {
            tracing::info!(app = %self.app, tunnels = self.tunnels.len(), "waiting for open tunnels until the drain deadline");
        }
        if tokio::time::timeout_at(deadline, self.tunnels.wait()).await.is_err() {
            warn!(app = %self.app, tunnels = self.tunnels.len(), "drain deadline passed; closing open tunnels");
            self.closing.cancel();
            self.tunnels.wait().await;
        }
    }

    /// The balancer this proxy routes through.
    pub fn balancer(&self) -> &Arc<Balancer> {
        &self.balancer
    }

    /// Answers one request from `peer`. Never fails: errors become 502/503/504 responses.
    pub async fn serve(self: Arc<Self>, req: Request<Incoming>, peer: Peer) -> Result<Response<ProxyBody>, Infallible> {
        Ok(self.handle(req, peer).await)
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: Peer) -> Response<ProxyBody> {
        match self.forward(req, peer).await {
            Ok(response) => response,
            Err(e) => {
                if e.is_upstream() {
                    warn!(app = %self.app, error = %e, "request failed");
                } else {
                    debug!(app = %self.app, error = %e, "request refused");
                }
                e.into_response()
            }
        }
    }

    async fn forward(&self, mut req: Request<Incoming>, peer: Peer) -> Result<Response<ProxyBody>, ProxyError> {
        let upgrade = tunnel::requested(req.headers()).map(|protocol| (protocol, hyper::upgrade::on(&mut req)));
        let (mut head, body) = req.into_parts();
        forward::request_headers(&mut head.headers, &peer);
        if let Some((protocol, _)) = &upgrade {
            tunnel::restore(&mut head.headers, protocol.clone());
        }
        // Workers get origin-form targets ("/path?query"); Host carries the authority.
        let target = head
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        head.uri = Uri::from(target);
        head.version = Version::HTTP_11;
        let mut body = UpstreamBody::from_client(body);
        // Kept only for requests that may be repeated after they were sent (see below).
        let mut resend = (is_idempotent(&head.method) && matches!(body, UpstreamBody::Empty)).then(|| head.clone());

        let (sticky_mode, affinity) = self.balancer.with_routing(|routing| {
            let affinity = match routing.sticky {
                Sticky::None => None,
                Sticky::Cookie => self.cookies.slot_from(&head.headers, &routing.cookie),
                Sticky::Ip => Some(sticky::ip_slot(
                    sticky::client_ip(peer.ip, &head.headers, &routing.trusted),
                    routing.instances,
                )),
            };
            (routing.sticky, affinity)
        });
        let mut tried: Vec<u64> = Vec::new();
        let mut last_error = ProxyError::NoWorker;
        loop {
            let Some(guard) = self.balancer.pick_for(affinity, &tried) else {
                return Err(last_error);
            };
            let upstream = guard.upstream();
            let conn = match upstream.pool.checkout().await {
                Some(conn) => conn,
                None => match upstream.pool.connect().await {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Nothing was sent: any request may go to another worker.
                        self.balancer.report_unreachable(upstream);
                        tried.push(upstream.id);
                        last_error = ProxyError::Connect {
                            worker: upstream.addr,
                            reason: e.to_string(),
                        };
                        continue;
                    }
                },
            };
            let mut sender: Conn = conn;
            let sent = sender.try_send_request(Request::from_parts(head, body));
            match tokio::time::timeout(self.upstream_timeout, sent).await {
                Err(_) => {
                    return Err(ProxyError::Timeout {
                        worker: upstream.addr,
                        after: self.upstream_timeout,
                    })
                }
                Ok(Ok(mut response)) => {
                    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                        if let Some((_, client)) = upgrade {
                            let protocol = response.headers().get(http::header::UPGRADE).cloned();
                            let worker = hyper::upgrade::on(&mut response);
                            self.tunnels
                                .spawn(tunnel::splice(client, worker, guard, self.closing.clone()));
                            let (mut parts, _) = response.into_parts();
                            forward::response_headers(&mut parts.headers);
                            if let Some(protocol) = protocol {
                                tunnel::restore(&mut parts.headers, protocol);
                            }
                            return Ok(Response::from_parts(parts, ProxyBody::message(Bytes::new())));
                        }
                    }
                    let (mut parts, incoming) = response.into_parts();
                    forward::response_headers(&mut parts.headers);
                    let slot = guard.upstream().slot;
                    if sticky_mode == Sticky::Cookie && affinity != Some(slot) {
                        // No valid cookie, or its slot is not serving: pin the client here.
                        let cookie = self.balancer.with_routing(|r| self.cookies.set_cookie(&r.cookie, slot));
                        parts.headers.append(SET_COOKIE, cookie);
                    }
                    return Ok(Response::from_parts(
                        parts,
                        ProxyBody::upstream(incoming, guard, sender),
                    ));
                }
                Ok(Err(mut failed)) => {
                    let reason = failed.error().to_string();
                    if let Some(unsent) = failed.take_message() {
                        // The connection closed before the request was written: retry anywhere.
                        (head, body) = unsent.into_parts();
                        tried.push(upstream.id);
                        last_error = ProxyError::Upstream {
                            worker: upstream.addr,
                            reason,
                        };
                        continue;
                    }
                    // Written, then the exchange failed before a response head: the worker
                    // died or closed the connection just as we sent. Like nginx, repeat an
                    // idempotent request without a body, once, on another worker.
                    match resend.take() {
                        Some(again) => {
                            head = again;
                            body = UpstreamBody::Empty;
                            tried.push(upstream.id);
                            last_error = ProxyError::Upstream {
                                worker: upstream.addr,
                                reason,
                            };
                        }
                        None => {
                            return Err(ProxyError::Upstream {
                                worker: upstream.addr,
                                reason,
                            })
                        }
                    }
                }
            }
        }
    }
}

/// Methods that RFC 9110 defines as idempotent.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}
