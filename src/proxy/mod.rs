//! The HTTP proxy: one hyper service per public connection, forwarding each request to a worker.
//!
//! For every request the service asks the app's [`Balancer`] for a worker (a lock-free read of
//! the current pool snapshot), rewrites the head ([`forward`]), sends it on one of that
//! worker's pooled connections ([`pool`], [`upstream`]), and returns the worker's response with
//! its body streamed as it arrives ([`body`]). Bodies are never buffered, in either direction, so a 10 GB upload or an endless
//! SSE stream costs the same memory as a tiny request. The in-flight guard rides inside the
//! response body, so a worker counts as busy until the last byte of its response has left.
//!
//! Everything that goes wrong becomes a short 4xx/5xx ([`error`]); the service itself never
//! fails and never panics. Malformed heads never reach it: hyper answers them with 400/431
//! under the limits set in [`crate::listener::serve`], and [`framing`] makes it refuse the
//! ones hyper would read leniently. What hyper accepts, [`forward::check`] checks once more
//! (Host, transfer codings) before any byte goes to a worker. The framing of what is forwarded
//! is always corral's own (see [`forward`]): one request in, one request out.
//!
//! A client whose body breaks off, stalls past `client_body_timeout` or grows past
//! `max_body_size` ends its exchange at once: the worker's connection, which holds a request
//! that cannot finish, is closed, and nothing waits for `upstream_timeout`. Running out of file
//! descriptors while connecting to a worker is a 503 and never marks the worker down.
//!
//! The books of each response: its status code and time to the response head go to the
//! shard's [`ShardMeter`] (time from the request head's arrival to the worker's response head,
//! or corral's own answer), it counts in flight until its body ends, and with `access_log` the
//! body writes its line when it is dropped ([`crate::logs::access`]). With `request_id`, the
//! request's id ([`request_id`]) goes to the worker and comes back on the response.
//!
//! The proxy owns no worker state. It learns about workers only through the pool snapshots the
//! supervisor publishes.

pub mod body;
pub mod client;
pub mod error;
pub mod forward;
pub mod framing;
mod h1;
pub mod pool;
pub mod request_id;
pub mod tunnel;
pub mod upload;
pub mod upstream;

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::balancer::sticky::{self, CookieSigner};
use crate::balancer::{Balancer, InFlight};
use crate::config::{HttpLimits, Sticky};
use crate::logs::access::{AccessLog, Pending};
use crate::metrics::ShardMeter;
use body::ProxyBody;
use client::Client;
use error::ProxyError;
use forward::Framing;
use forward::Peer;
use http::header::{CONTENT_LENGTH, SET_COOKIE};
use upstream::{ClientFault, Failure, Limits, ResponseBody, UpstreamBody};

/// Where a request came in, as the shard serving it sees it.
#[derive(Debug, Clone, Copy)]
pub struct Via<'a> {
    /// The app's meter on this shard.
    pub meter: &'a Arc<ShardMeter>,
    /// The shard's budget of worker connections for the address: its share of
    /// `max_connections`, so that client and worker connections together stay within the fd
    /// limit however many streams an HTTP/2 client multiplexes.
    pub budget: &'a Arc<Semaphore>,
    /// The client connection's books.
    pub client: &'a Client,
}

/// The proxy of one app.
#[derive(Debug)]
pub struct Proxy {
    app: String,
    balancer: Arc<Balancer>,
    limits: Limits,
    /// `tunnel_idle_timeout`.
    tunnel_idle: Option<std::time::Duration>,
    /// `max_headers` (hyper counts them on HTTP/1.1; this, on HTTP/2).
    max_headers: usize,
    /// Cancelled by the listener at the end of its drain: open tunnels close.
    closing: CancellationToken,
    /// The open tunnels, so a stop can wait for them (up to the drain deadline).
    tunnels: TaskTracker,
    /// Signs the affinity cookies of `sticky = "cookie"`.
    cookies: CookieSigner,
    /// `Strict-Transport-Security` for responses over TLS (`hsts`).
    hsts: Option<http::HeaderValue>,
    /// `request_id`: an `X-Request-Id` for every request, to the worker and back.
    request_id: bool,
    /// `access_log`: one line per response.
    access_log: Option<&'static AccessLog>,
}

impl Proxy {
    /// A proxy for `app` over the workers `balancer` publishes, under the app's `limits`.
    pub fn new(app: String, balancer: Arc<Balancer>, limits: &HttpLimits) -> Proxy {
        let cookies = CookieSigner::new(&app);
        Proxy {
            app,
            balancer,
            limits: Limits {
                upstream_timeout: limits.upstream_timeout,
                client_body_timeout: limits.client_body_timeout,
                max_body_size: limits.max_body_size,
                client_body_buffer_size: limits.client_body_buffer_size,
            },
            tunnel_idle: limits.tunnel_idle_timeout,
            max_headers: limits.max_headers,
            closing: CancellationToken::new(),
            tunnels: TaskTracker::new(),
            cookies,
            hsts: None,
            request_id: true,
            access_log: None,
        }
    }

    /// Gives every request an `X-Request-Id` (`request_id`, on by default) or not.
    pub fn with_request_id(mut self, on: bool) -> Proxy {
        self.request_id = on;
        self
    }

    /// Writes a line per response to `log`.
    pub fn with_access_log(mut self, log: Option<&'static AccessLog>) -> Proxy {
        self.access_log = log;
        self
    }

    /// Sends `Strict-Transport-Security: max-age=<max_age>` on every response over TLS
    /// (unless the worker sent its own).
    pub fn with_hsts(mut self, max_age: Option<std::time::Duration>) -> Proxy {
        // Static, so the per-request clone copies a pointer instead of bumping a reference
        // count every CPU shares: one small string per app, made once.
        self.hsts = max_age.map(|age| {
            let text: &'static str = Box::leak(format!("max-age={}", age.as_secs()).into_boxed_str());
            http::HeaderValue::from_static(text)
        });
        self
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

    /// Answers one request from `peer`, or with `refused` when corral already knows its answer
    /// (a 421, a 503 over `max_connections_per_ip`). Never fails: errors become 4xx/5xx
    /// responses.
    pub async fn serve(
        &self,
        req: Request<Incoming>,
        peer: Peer,
        via: Via<'_>,
        refused: Option<ProxyError>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let meter = via.meter;
        let arrived = std::time::Instant::now();
        let flight = meter.in_flight();
        let id = self.request_id.then(|| request_id::pick(req.headers()));
        let log = self
            .access_log
            .map(|log| Box::new(Pending::new(log, &req, &peer, arrived, id.clone())));
        let hsts = if peer.tls { self.hsts.clone() } else { None };
        let mut response = match refused {
            Some(error) => error.into_response(),
            None => self.handle(req, peer, id.as_ref(), via).await,
        };
        let status = response.status().as_u16();
        meter.answered(status, arrived.elapsed());
        let headers = response.headers_mut();
        if let Some(hsts) = hsts {
            headers.entry(http::header::STRICT_TRANSPORT_SECURITY).or_insert(hsts);
        }
        if let Some(id) = id {
            headers.insert(&request_id::X_REQUEST_ID, id);
        }
        let log = log.map(|mut log| {
            log.status = status;
            log
        });
        response.body_mut().track(flight, log);
        Ok(response)
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: Peer,
        id: Option<&http::HeaderValue>,
        via: Via<'_>,
    ) -> Response<ProxyBody> {
        match self.forward(req, peer, id, via).await {
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

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        peer: Peer,
        id: Option<&http::HeaderValue>,
        via: Via<'_>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let meter = via.meter;
        let upgrade = tunnel::requested(req.headers()).map(|protocol| (protocol, hyper::upgrade::on(&mut req)));
        let (head, body) = req.into_parts();
        let host = forward::check(&head, &peer, self.max_headers)?;
        // The framing towards the worker comes from what hyper decoded, never from the
        // client's header map (whose framing fields a `Connection` token could have named).
        let declared = http_body::Body::size_hint(&body).exact();
        if let (Some(max), Some(length)) = (self.limits.max_body_size, declared) {
            if length > max {
                return Err(ProxyError::TooLarge { limit: max });
            }
        }
        let mut body = UpstreamBody::from_client(body);
        let framing = match (&body, declared) {
            (UpstreamBody::Empty, _) if !head.headers.contains_key(CONTENT_LENGTH) => Framing::None,
            (_, Some(length)) => Framing::Length(length),
            (UpstreamBody::Empty, None) => Framing::Length(0),
            (UpstreamBody::Stream(_), None) => Framing::Chunked,
        };
        let (sticky_mode, affinity, trusted) = self.balancer.with_routing(|routing| {
            let affinity = match routing.sticky {
                Sticky::None => None,
                Sticky::Cookie => self.cookies.slot_from(&head.headers, &routing.cookie),
                Sticky::Ip => Some(sticky::ip_slot(
                    sticky::client_ip(peer.ip, &head.headers, &routing.trusted),
                    routing.instances,
                )),
            };
            let trusted = !routing.trusted.is_empty() && routing.trusted.iter().any(|n| n.contains(peer.ip));
            (routing.sticky, affinity, trusted)
        });
        // Encoded once: a retry sends the same bytes.
        let mut encoded = forward::encode_request(
            &head,
            &peer,
            &host,
            trusted,
            upgrade.as_ref().map(|(p, _)| p),
            framing,
            id,
        );
        if let (UpstreamBody::Stream(incoming), Framing::Length(length)) = (&mut body, framing) {
            if length <= self.limits.client_body_buffer_size {
                encoded.reserve(usize::try_from(length).unwrap_or(0));
                upload::read_whole(incoming, &mut encoded, self.limits.client_body_timeout)
                    .await
                    .map_err(|fault| self.client_fault(fault))?;
                body = UpstreamBody::Empty;
            }
        }
        // After a request was written and the exchange failed, only an idempotent request whose
        // body (if any) is in hand may be sent again (once, elsewhere), as nginx does. The
        // encoded request is only borrowed by an exchange, so that costs no copy.
        let mut may_resend = is_idempotent(&head.method) && matches!(body, UpstreamBody::Empty);
        // An HTTP/2 connection's requests share a bounded number of worker connections.
        let mut share = via
            .client
            .worker_share(self.limits.upstream_timeout)
            .await
            .map_err(|()| ProxyError::Exhausted {
                reason: "every worker connection this HTTP/2 connection may hold is busy".into(),
            })?;
        let mut tried: Vec<u64> = Vec::new();
        let mut last_error = ProxyError::NoWorker;
        loop {
            let Some(guard) = self.balancer.pick_for(affinity, &tried) else {
                return Err(last_error);
            };
            let upstream = guard.upstream();
            let (conn, reused) = match upstream.pool.checkout() {
                Some(conn) => (conn, true),
                None => match upstream.pool.connect(self.budget_place(via.budget).await?).await {
                    Ok(conn) => (conn, false),
                    Err(e) if crate::limits::is_exhausted(&e) => {
                        // corral's own limit, not the worker's: it stays in rotation.
                        return Err(ProxyError::Exhausted { reason: e.to_string() });
                    }
                    Err(e) => {
                        // Nothing was sent: any request may go to another worker.
                        meter.connect_failed();
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
            let chunked = framing == Framing::Chunked;
            let exchange = conn.exchange(
                &encoded,
                &head.method,
                &mut body,
                chunked,
                upgrade.is_some(),
                self.limits,
            );
            let failure = match exchange.await {
                Ok(response) => {
                    let mut response = self.respond(response, guard, upgrade, sticky_mode, affinity, peer.tls);
                    response.body_mut().hold(share.take());
                    return Ok(response);
                }
                Err(failure) => failure,
            };
            let (retry, reason) = match failure {
                Failure::Timeout => {
                    return Err(ProxyError::Timeout {
                        worker: upstream.addr,
                        after: self.limits.upstream_timeout,
                    })
                }
                Failure::Client(fault) => return Err(self.client_fault(fault)),
                // A pooled connection the worker had closed as the request went out: like
                // nginx, a bodiless idempotent request gets a try that does not count, on a
                // connection (and maybe a worker) of the next pick. Each such try uses up an
                // idle connection, so they are bounded by the pool.
                Failure::Dropped(_) if reused && may_resend => continue,
                // The connection was found closed before the request went out: retry anywhere.
                Failure::NotSent(e) => (true, e.to_string()),
                // Written, then the exchange failed before a response head: the worker died or
                // closed the connection just as we sent.
                Failure::Dropped(e) | Failure::Failed(e) => (std::mem::take(&mut may_resend), e.to_string()),
            };
            let error = ProxyError::Upstream {
                worker: upstream.addr,
                reason,
            };
            if !retry {
                return Err(error);
            }
            tried.push(upstream.id);
            last_error = error;
        }
    }

    /// The client's response for a worker's `response` (its hop-by-hop headers already left
    /// out): the affinity cookie set when needed, the tunnel started for a `101`.
    fn respond(
        &self,
        response: Response<ResponseBody>,
        guard: InFlight,
        upgrade: Option<(http::HeaderValue, hyper::upgrade::OnUpgrade)>,
        sticky_mode: Sticky,
        affinity: Option<usize>,
        secure: bool,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = response.into_parts();
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            // exchange() accepts a 101 only for a request that asked to upgrade.
            if let Some(protocol) = parts.headers.get(http::header::UPGRADE).cloned() {
                tunnel::restore(&mut parts.headers, protocol);
            }
            let slot = guard.upstream().slot;
            if let (Some((_, client)), Some((worker, early, budget))) = (upgrade, body.into_upgraded()) {
                self.tunnels.spawn(tunnel::splice(
                    client,
                    worker,
                    early,
                    guard,
                    budget,
                    self.closing.clone(),
                    self.tunnel_idle,
                ));
            }
            return Response::from_parts(parts, ProxyBody::switched(slot));
        }
        let slot = guard.upstream().slot;
        if sticky_mode == Sticky::Cookie && affinity != Some(slot) {
            // No valid cookie, or its slot is not serving: pin the client here.
            let cookie = self
                .balancer
                .with_routing(|r| self.cookies.set_cookie(&r.cookie, slot, secure));
            parts.headers.append(SET_COOKIE, cookie);
        }
        Response::from_parts(parts, ProxyBody::upstream(body, guard))
    }
}

impl Proxy {
    /// A place in the shard's budget of worker connections for a new one. When every place is
    /// taken (by connections in use, or idle ones, which close within seconds), waits up to
    /// `upstream_timeout` for one.
    async fn budget_place(&self, budget: &Arc<Semaphore>) -> Result<OwnedSemaphorePermit, ProxyError> {
        if let Ok(place) = Arc::clone(budget).try_acquire_owned() {
            return Ok(place);
        }
        debug!(app = %self.app, "every worker connection of this shard is open; waiting for one");
        match tokio::time::timeout(self.limits.upstream_timeout, Arc::clone(budget).acquire_owned()).await {
            Ok(Ok(place)) => Ok(place),
            _ => Err(ProxyError::Exhausted {
                reason: "every worker connection this shard may open is in use (max_connections)".into(),
            }),
        }
    }

    /// The error for a client whose body failed.
    fn client_fault(&self, fault: ClientFault) -> ProxyError {
        match fault {
            ClientFault::Broken(reason) => ProxyError::ClientBody { reason },
            ClientFault::Stalled => ProxyError::ClientStalled {
                after: self.limits.client_body_timeout,
            },
            ClientFault::TooLarge => ProxyError::TooLarge {
                limit: self.limits.max_body_size.unwrap_or_default(),
            },
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
