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

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Scheme;
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use tracing::{debug, warn};

use crate::balancer::Balancer;
use body::ProxyBody;
use error::ProxyError;

/// The proxy of one app.
#[derive(Debug)]
pub struct Proxy {
    app: String,
    balancer: Arc<Balancer>,
    upstream_timeout: Duration,
}

impl Proxy {
    /// A proxy for `app` over the workers `balancer` publishes.
    pub fn new(app: String, balancer: Arc<Balancer>, upstream_timeout: Duration) -> Proxy {
        Proxy {
            app,
            balancer,
            upstream_timeout,
        }
    }

    /// The balancer this proxy routes through.
    pub fn balancer(&self) -> &Arc<Balancer> {
        &self.balancer
    }

    /// Answers one request from `peer`. Never fails: errors become 502/503/504 responses.
    pub async fn serve(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<ProxyBody>, Infallible> {
        Ok(self.handle(req, peer).await)
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
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

    async fn forward(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (mut head, body) = req.into_parts();
        let guard = self.balancer.pick().ok_or(ProxyError::NoWorker)?;
        let upstream = Arc::clone(guard.upstream());

        forward::request_headers(&mut head.headers, peer.ip());
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(upstream.authority.clone());
        uri.path_and_query = head
            .uri
            .path_and_query()
            .cloned()
            .or_else(|| Some("/".parse().expect("UNWRAP: literal")));
        head.uri = Uri::from_parts(uri).map_err(|_| ProxyError::BadTarget)?;
        head.version = Version::HTTP_11;

        let sent = upstream.client.request(Request::from_parts(head, body));
        let response = match tokio::time::timeout(self.upstream_timeout, sent).await {
            Err(_) => {
                return Err(ProxyError::Timeout {
                    worker: upstream.addr,
                    after: self.upstream_timeout,
                })
            }
            Ok(Err(e)) => return Err(ProxyError::from_client(upstream.addr, &e)),
            Ok(Ok(response)) => response,
        };
        let (mut head, body) = response.into_parts();
        forward::response_headers(&mut head.headers);
        Ok(Response::from_parts(head, ProxyBody::upstream(body, guard)))
    }
}
