//! Everything that can go wrong on the request path, classified once and mapped to a status.
//!
//! Upstream errors (the worker refused, closed, or was too slow) become 502 or 504 and are
//! logged as warnings; "no worker ready" is 503; problems with the client's request are 400. The
//! body is one short line naming the cause, so `curl` shows what happened.

use std::net::SocketAddr;
use std::time::Duration;

use http::{header, HeaderValue, Response, StatusCode};

use super::body::ProxyBody;

/// Why a request could not be proxied.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The pool is empty: workers are starting, restarting or crashing.
    #[error("no worker is ready")]
    NoWorker,
    /// Could not connect to the worker (refused, reset, timed out).
    #[error("could not connect to worker {worker}: {reason}")]
    Connect {
        /// The worker's address.
        worker: SocketAddr,
        /// The cause.
        reason: String,
    },
    /// The worker closed or broke the connection before a complete response head.
    #[error("worker {worker} failed before responding: {reason}")]
    Upstream {
        /// The worker's address.
        worker: SocketAddr,
        /// The cause.
        reason: String,
    },
    /// No response head within `upstream_timeout`.
    #[error("worker {worker} did not respond within {after:?}")]
    Timeout {
        /// The worker's address.
        worker: SocketAddr,
        /// The limit.
        after: Duration,
    },
    /// The request target cannot be forwarded.
    #[error("the request target cannot be forwarded")]
    BadTarget,
}

impl ProxyError {
    /// True when the worker side failed (worth a warning), false for client-side problems and
    /// an empty pool.
    pub fn is_upstream(&self) -> bool {
        matches!(
            self,
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } | ProxyError::Timeout { .. }
        )
    }

    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoWorker => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadTarget => StatusCode::BAD_REQUEST,
        }
    }

    /// The response sent to the client.
    pub fn into_response(self) -> Response<ProxyBody> {
        let status = self.status();
        let reason = status.canonical_reason().unwrap_or("Error");
        let text = format!("{} {reason}: {self}\n", status.as_u16());
        let mut response = Response::new(ProxyBody::message(text));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::BAD_REQUEST {
            // The rest of this connection's bytes cannot be trusted.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let worker = SocketAddr::from(([127, 0, 0, 1], 1));
        let cases = [
            (ProxyError::NoWorker, 503),
            (
                ProxyError::Connect {
                    worker,
                    reason: "refused".into(),
                },
                502,
            ),
            (
                ProxyError::Upstream {
                    worker,
                    reason: "closed".into(),
                },
                502,
            ),
            (
                ProxyError::Timeout {
                    worker,
                    after: Duration::from_secs(1),
                },
                504,
            ),
            (ProxyError::BadTarget, 400),
        ];
        for (error, code) in cases {
            let text = error.to_string();
            let response = error.into_response();
            assert_eq!(response.status().as_u16(), code, "{text}");
        }
    }
}
