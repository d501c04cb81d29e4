//! Everything that can go wrong on the request path, classified once and mapped to a status.
//!
//! Upstream errors (the worker refused, closed, or was too slow) become 502 or 504 and are
//! logged as warnings with the worker's address; "no worker ready" and corral running short of
//! file descriptors are 503 (the latter is never held against a worker); problems with the
//! client's request are 4xx (400, 405, 408, 413) or 501, and close the connection, since what
//! follows on it cannot be trusted. The body is one short line naming the cause, so `curl`
//! shows what happened; it never carries a worker's loopback address or an internal error
//! text, which stay in corral's log.

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
    /// No response head within `upstream_timeout` of the end of the request.
    #[error("worker {worker} did not respond within {after:?}")]
    Timeout {
        /// The worker's address.
        worker: SocketAddr,
        /// The limit.
        after: Duration,
    },
    /// corral itself is out of a resource (file descriptors, socket buffers): no worker is to
    /// blame, and none is taken out of rotation.
    #[error("corral is short of resources: {reason}")]
    Exhausted {
        /// The cause.
        reason: String,
    },
    /// The request cannot be forwarded as it is (ambiguous or unsupported).
    #[error("refused: {why}")]
    Refused {
        /// 400, 405 or 501.
        status: StatusCode,
        /// What is wrong, in words a client's developer acts on.
        why: &'static str,
    },
    /// The client's body is malformed or ended early (the client went away).
    #[error("the request body is malformed or incomplete: {reason}")]
    ClientBody {
        /// The cause.
        reason: String,
    },
    /// The client sent nothing of its body for `client_body_timeout`.
    #[error("the request body stalled for more than {after:?}")]
    ClientStalled {
        /// The limit.
        after: Duration,
    },
    /// The body is larger than `max_body_size`.
    #[error("the request body is larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
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
            ProxyError::NoWorker | ProxyError::Exhausted { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Refused { status, .. } => *status,
            ProxyError::ClientBody { .. } => StatusCode::BAD_REQUEST,
            ProxyError::ClientStalled { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    /// What the client is told: the cause without internal addresses or error texts.
    fn public_text(&self) -> String {
        match self {
            ProxyError::NoWorker => "no worker is ready".into(),
            ProxyError::Connect { .. } => "could not connect to a worker".into(),
            ProxyError::Upstream { .. } => "the worker failed before responding".into(),
            ProxyError::Timeout { after, .. } => format!("the worker did not respond within {after:?}"),
            ProxyError::Exhausted { .. } => "the proxy is out of connections; try again".into(),
            ProxyError::Refused { why, .. } => (*why).into(),
            ProxyError::ClientBody { .. } => "the request body is malformed or incomplete".into(),
            other => other.to_string(),
        }
    }

    /// The response sent to the client.
    pub fn into_response(self) -> Response<ProxyBody> {
        let status = self.status();
        let reason = status.canonical_reason().unwrap_or("Error");
        let text = format!("{} {reason}: {}\n", status.as_u16(), self.public_text());
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
        if status.is_client_error() || status == StatusCode::NOT_IMPLEMENTED {
            // The rest of this connection's bytes cannot be trusted (or were not read).
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
            (
                ProxyError::Refused {
                    status: StatusCode::NOT_IMPLEMENTED,
                    why: "x",
                },
                501,
            ),
            (
                ProxyError::ClientStalled {
                    after: Duration::from_secs(1),
                },
                408,
            ),
            (ProxyError::TooLarge { limit: 1 }, 413),
            (
                ProxyError::Exhausted {
                    reason: "EMFILE".into(),
                },
                503,
            ),
        ];
        for (error, code) in cases {
            let text = error.to_string();
            let response = error.into_response();
            assert_eq!(response.status().as_u16(), code, "{text}");
            let closes = response.headers().get(header::CONNECTION).is_some();
            assert_eq!(closes, code == 501 || (400..500).contains(&code), "{text}");
        }
    }

    #[test]
    fn a_client_never_sees_a_worker_address() {
        let worker = SocketAddr::from(([127, 0, 0, 1], 40123));
        for error in [
            ProxyError::Connect {
                worker,
                reason: "Connection refused (os error 111)".into(),
            },
            ProxyError::Upstream {
                worker,
                reason: "reset".into(),
            },
            ProxyError::Timeout {
                worker,
                after: Duration::from_secs(1),
            },
        ] {
            assert!(error.to_string().contains("40123"), "the log names the worker");
            let text = format!("{:?}", error.into_response().into_body());
            assert!(!text.contains("127.0.0.1") && !text.contains("40123"), "{text}");
        }
    }
}
