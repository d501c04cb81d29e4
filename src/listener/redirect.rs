//! `http_redirect`: a plain-HTTP listener that sends every client to the https URL.
//!
//! Every request gets `308 Permanent Redirect` to `https://<host>[:port]<target>` (308 keeps
//! the method and body, where 301 lets clients turn a POST into a GET); the port is the https
//! `listen` port of the app the `Host` names, left out when it is 443. The only exception is
//! an ACME HTTP-01 challenge (`GET /.well-known/acme-challenge/<token>`) for a token being
//! validated, answered with its key authorisation. HSTS is never sent over plain HTTP (RFC
//! 6797 §7.2). A request without a valid `Host` gets 400: there is nowhere to send it; one for
//! a name no app of the address claims (several apps, none `default`) gets 421.
//!
//! Connection limits and timeouts are the first app's, as on the https address; the listener
//! runs on the shards like the public ones and stops with them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use super::conn::Protocols;
use crate::config::HttpLimits;
use crate::proxy::body::ProxyBody;
use crate::sites::{host_name, Names};
use crate::tls::Challenges;

/// Where HTTP-01 challenges are asked for.
const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// The apps one redirect address sends to https.
#[derive(Debug)]
pub struct Redirect {
    /// The plain-HTTP address.
    pub addr: SocketAddr,
    /// Which app a name belongs to.
    pub names: Names,
    /// Each app's https port, indexed like `names`' sites.
    pub ports: Vec<u16>,
    /// ACME HTTP-01 answers.
    pub challenges: Arc<Challenges>,
}

impl Redirect {
    fn answer(&self, req: &Request<Incoming>) -> Response<ProxyBody> {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        if let Some(token) = path.strip_prefix(CHALLENGE_PREFIX) {
            if req.method() == Method::GET {
                if let Some(answer) = self.challenges.http(token) {
                    return text(StatusCode::OK, answer);
                }
            }
        }
        let host = match req.uri().authority() {
            Some(authority) => Some(authority.as_str().to_owned()),
            None => req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned),
        };
        let Some(host) = host.filter(|h| crate::proxy::forward::valid_host(h.as_bytes())) else {
            return text(
                StatusCode::BAD_REQUEST,
                "a valid Host header is needed to redirect to https\n".into(),
            );
        };
        let name = host_name(&host);
        // Only to a site this address serves: with several apps and no `default`, a name none
        // of them claims is not sent anywhere.
        let Some(site) = self.names.pick(name) else {
            return text(
                StatusCode::MISDIRECTED_REQUEST,
                "no app on this address serves this host\n".into(),
            );
        };
        let port = self.ports[site];
        let location = match port {
            443 => format!("https://{name}{path}"),
            port => format!("https://{name}:{port}{path}"),
        };
        let Ok(location) = HeaderValue::try_from(location) else {
            return text(
                StatusCode::BAD_REQUEST,
                "the request target cannot be redirected\n".into(),
            );
        };
        let mut response = text(
            StatusCode::PERMANENT_REDIRECT,
            "this site is served over https\n".into(),
        );
        response.headers_mut().insert(header::LOCATION, location);
        response
    }
}

fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::message(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Serves `redirect` on `socket` (one shard's) until `shutdown`; open connections then get
/// `drain` to finish.
pub async fn serve(
    socket: std::net::TcpListener,
    redirect: Arc<Redirect>,
    limits: HttpLimits,
    per_shard: usize,
    shutdown: CancellationToken,
    drain: Duration,
) -> std::io::Result<()> {
    let listener = TcpListener::from_std(socket)?;
    let protocols = Protocols::new(&limits);
    let connections = TaskTracker::new();
    let mut gate = super::Gate::new(redirect.addr, per_shard);
    while let Some((slot, stream, peer)) = gate.next(&listener, &shutdown).await {
        let redirect = Arc::clone(&redirect);
        let service = service_fn(move |req| {
            let response = redirect.answer(&req);
            async move { Ok::<_, std::convert::Infallible>(response) }
        });
        let conn = protocols.h1.serve_connection(TokioIo::new(stream), service);
        let stop = shutdown.clone();
        connections.spawn(async move {
            let _slot = slot;
            if let Err(e) = super::until_done(conn, |c| c.graceful_shutdown(), stop).await {
                debug!(%peer, error = %e, "redirect connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    info!(addr = %redirect.addr, shard = crate::shards::current(), "http_redirect stopped accepting");
    let _ = tokio::time::timeout(drain, connections.wait()).await;
    Ok(())
}
