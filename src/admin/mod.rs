//! The admin listener (`[admin] listen`): status, commands, health and events over HTTP.
//!
//! Its own socket, served on the main runtime beside the supervisor and the control socket,
//! never on a proxy shard: a slow or hostile admin client costs the proxy nothing. It is the
//! second transport over [`crate::commands`]: every change is a [`Request`] executed against
//! the supervisor, and every failure a typed error, answered as JSON
//! `{"error": {"code": ..., "message": ...}}` with the code's HTTP status. Who may ask what is
//! in [`auth`].
//!
//! Endpoints: `GET /healthz` (the front process answers), `GET /readyz` (every app has a ready
//! worker), `GET /metrics` (Prometheus text, [`crate::metrics`]; the worker gauges from a status
//! taken for the scrape), `GET /api/status` (the JSON of `corral status --json`), `GET /api/events`
//! (Server-Sent Events, [`events`]; `Last-Event-ID`, or `?last_event_id=N`, replays the kept
//! ones after N), `GET /` (the [`dashboard`]), `POST /api/reload`, `POST /api/apps/APP/start`,
//! `/restart`, `/stop`, `/scale?n=N`, `/flush` (empty its log files), and `POST /login`.
//!
//! Limits: request heads within 10 s and 16 KiB, bodies of at most 64 KiB, at most
//! [`MAX_CONNECTIONS`] connections at once (more wait in the backlog).

pub mod auth;
pub mod dashboard;
pub mod events;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request as HttpRequest, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::commands::{self, Answer, Request};
use crate::supervisor::{CommandError, ErrorCode, Handle};
use auth::{Access, Refusal};
use events::Events;

/// Admin connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Largest request body.
const MAX_BODY: usize = 64 * 1024;

/// Why the admin listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// bind(2) failed.
    #[error("cannot listen on {addr} for [admin]: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The token file could not be read (or is too short).
    #[error("admin.token_file: {0}")]
    Token(String),
}

/// The admin listener, bound.
pub struct Admin {
    listener: TcpListener,
    state: Arc<State>,
}

struct State {
    access: Access,
    supervisor: Handle,
    shutdown: CancellationToken,
    events: Arc<Events>,
    metrics: Arc<crate::metrics::Registry>,
    upgrader: Arc<crate::upgrade::Upgrader>,
}

impl Admin {
    /// Binds `config`'s address (or serves `inherited`, the listener a previous corral handed
    /// over) and reads its token (from `token_file`, else `CORRAL_ADMIN_TOKEN`).
    pub async fn bind(
        config: &crate::config::AdminConfig,
        inherited: Option<std::net::TcpListener>,
        supervisor: Handle,
        shutdown: CancellationToken,
        events: Arc<Events>,
        metrics: Arc<crate::metrics::Registry>,
        upgrader: Arc<crate::upgrade::Upgrader>,
    ) -> Result<Admin, AdminError> {
        let token = match &config.token_file {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|e| AdminError::Token(format!("{}: {e}", path.display())))?;
                Some(text.trim().to_owned())
            }
            None => std::env::var(crate::config::ADMIN_TOKEN_ENV)
                .ok()
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty()),
        };
        if token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err(AdminError::Token("the token must be at least 16 characters".into()));
        }
        let bind_error = |source| AdminError::Bind {
            addr: config.listen,
            source,
        };
        let listener = match inherited {
            Some(listener) => TcpListener::from_std(listener).map_err(bind_error)?,
            None => TcpListener::bind(config.listen).await.map_err(bind_error)?,
        };
        let listen = listener.local_addr().unwrap_or(config.listen);
        info!(%listen, token = token.is_some(), "admin listener ready");
        Ok(Admin {
            listener,
            state: Arc::new(State {
                access: Access::new(listen, token),
                supervisor,
                shutdown,
                events,
                metrics,
                upgrader,
            }),
        })
    }

    /// The listener, for a copy to hand over.
    pub fn listener(&self) -> &TcpListener {
        &self.listener
    }

    /// Serves until `stop` fires.
    pub async fn serve(self, stop: CancellationToken) {
        let addr = self
            .listener
            .local_addr()
            .unwrap_or_else(|_| ([127, 0, 0, 1], 0).into());
        let mut gate = crate::listener::Gate::new(addr, MAX_CONNECTIONS);
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10))
            .max_buf_size(16 * 1024);
        while let Some((slot, stream, peer)) = gate.next(&self.listener, &stop).await {
            let state = Arc::clone(&self.state);
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(state.answer(req).await) }
            });
            let conn = http.serve_connection(TokioIo::new(stream), service);
            let stop = stop.clone();
            tokio::spawn(async move {
                let _slot = slot;
                if let Err(e) = crate::listener::until_done(conn, |c| c.graceful_shutdown(), stop).await {
                    debug!(%peer, error = %e, "admin connection ended with an error");
                }
            });
        }
    }
}

impl State {
    /// `GET /metrics`: the counters as they are, the worker gauges from a status taken now.
    async fn metrics(&self) -> Response<AdminBody> {
        match self.supervisor.status().await {
            Ok(status) => self.metrics.observe(status),
            Err(_) => return error(CommandError::new(ErrorCode::Stopping, "corral is stopping")),
        }
        let mut out = String::with_capacity(16 * 1024);
        self.metrics.render(&mut out);
        let mut response = Response::new(AdminBody::Full(Some(Bytes::from(out))));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        response
    }

    async fn answer(&self, req: HttpRequest<Incoming>) -> Response<AdminBody> {
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or_default().to_owned();
        match (req.method(), path.as_str()) {
            (&Method::GET, "/healthz") => return text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/readyz") => return self.readyz().await,
            _ => {}
        }
        if let Err(refusal) = self.access.authenticate(req.headers()) {
            // A browser without the cookie gets the page (no data in it), which asks for the token.
            if refusal == Refusal::Unauthenticated && req.method() == Method::GET && path == "/" {
                return dashboard::page(StatusCode::UNAUTHORIZED);
            }
            // `/login` is how a browser without the cookie gets one.
            if !(path == "/login" && refusal == Refusal::Unauthenticated) {
                return refused(refusal, self.access.has_token());
            }
        }
        if req.method() == Method::POST {
            if let Err(refusal) = self.access.may_change(req.headers()) {
                return refused(refusal, self.access.has_token());
            }
        }
        let method = req.method().clone();
        let last_event = req
            .headers()
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            // EventSource cannot set the header on its first connection: the page asks by query.
            .or_else(|| query_value(&query, "last_event_id").and_then(|v| v.parse().ok()));
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (method, segments.as_slice()) {
            (Method::GET, [""]) => dashboard::page(StatusCode::OK),
            (Method::GET, ["api", "status"]) => self.run(Request::Status).await,
            (Method::GET, ["metrics"]) => self.metrics().await,
            (Method::GET, ["api", "events"]) => self.events.stream(last_event, self.shutdown.clone()),
            (Method::GET, ["api", "logs"]) => {
                let app = query_value(&query, "app").filter(|a| !a.is_empty());
                let lines = query_value(&query, "lines").and_then(|n| n.parse().ok()).unwrap_or(100);
                self.run(Request::Logs { app, lines }).await
            }
            (Method::POST, ["login"]) => self.login(req).await,
            (Method::POST, ["api", "reload"]) => match read_json(req).await {
                Err(response) => response,
                Ok(body) => {
                    let field = |name: &str| body.get(name).and_then(|a| a.as_str()).map(str::to_owned);
                    self.run(Request::Reload {
                        app: field("app"),
                        env: field("env"),
                    })
                    .await
                }
            },
            (Method::POST, ["api", "apps", app, action]) => {
                let app = percent_decode(app);
                let request = match *action {
                    "start" => Request::StartApp { app },
                    "stop" => Request::StopApp { app },
                    "restart" => Request::Restart { app: Some(app) },
                    "flush" => Request::Flush { app: Some(app) },
                    "scale" => match query_value(&query, "n") {
                        Some(count) => Request::Scale { app, count },
                        None => return error(CommandError::new(ErrorCode::BadRequest, "scale needs ?n=N (or +N, -N)")),
                    },
                    _ => return not_found(),
                };
                match read_json(req).await {
                    Err(response) => response,
                    Ok(_) => self.run(request).await,
                }
            }
            (_, ["api", ..]) | (_, ["login"]) => {
                let mut response = error(CommandError::new(ErrorCode::BadRequest, "method not allowed here"));
                *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
                response
            }
            _ => not_found(),
        }
    }

    /// Executes `request`; its answer as JSON.
    async fn run(&self, request: Request) -> Response<AdminBody> {
        // Progress lines are not streamed over HTTP: the event stream carries them.
        let (progress, _lines) = mpsc::unbounded_channel();
        match commands::execute(request, &self.supervisor, &self.shutdown, &self.upgrader, progress).await {
            Ok(Answer::Status(status)) => json_response(StatusCode::OK, &*status),
            Ok(Answer::Logs(lines)) => json_response(StatusCode::OK, &json!({ "lines": lines })),
            Ok(Answer::Done(message)) | Ok(Answer::Stopping(message)) => {
                json_response(StatusCode::OK, &json!({ "ok": true, "message": message }))
            }
            Err(e) => error(e),
        }
    }

    async fn readyz(&self) -> Response<AdminBody> {
        let Ok(status) = self.supervisor.status().await else {
            return text(StatusCode::SERVICE_UNAVAILABLE, "the supervisor has stopped\n");
        };
        let waiting: Vec<&str> = status
            .apps
            .iter()
            .filter(|a| a.ready == 0)
            .map(|a| a.name.as_str())
            .collect();
        if status.stopping {
            text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n")
        } else if waiting.is_empty() {
            text(StatusCode::OK, "ready\n")
        } else {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("no ready worker: {}\n", waiting.join(", ")),
            )
        }
    }

    async fn login(&self, req: HttpRequest<Incoming>) -> Response<AdminBody> {
        let body = match read_json(req).await {
            Ok(body) => body,
            Err(response) => return response,
        };
        let given = body.get("token").and_then(|t| t.as_str()).unwrap_or_default();
        match self.access.login(given) {
            Some(cookie) => {
                let mut response = json_response(StatusCode::OK, &json!({ "ok": true }));
                if let Ok(cookie) = HeaderValue::try_from(cookie) {
                    response.headers_mut().insert(header::SET_COOKIE, cookie);
                }
                response
            }
            None if !self.access.has_token() => json_response(StatusCode::OK, &json!({ "ok": true })),
            None => {
                warn!("admin login with a wrong token");
                refused(Refusal::Unauthenticated, true)
            }
        }
    }
}

/// Reads a JSON body (at most [`MAX_BODY`]); an empty body is `{}`.
async fn read_json(req: HttpRequest<Incoming>) -> Result<serde_json::Value, Response<AdminBody>> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    let bytes = match limited.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Err(error(CommandError::new(
                ErrorCode::BadRequest,
                "the body is unreadable or larger than 64 KiB",
            )))
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(value) if value.is_object() => Ok(value),
        _ => Err(error(CommandError::new(
            ErrorCode::BadRequest,
            "the body must be a JSON object",
        ))),
    }
}

/// The value of `key` in a query string (`n=3`), percent-decoded.
fn query_value(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
        .map(percent_decode)
}

/// `%2B3` → `+3`; invalid escapes are kept as they are.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn text(status: StatusCode, body: &str) -> Response<AdminBody> {
    let mut response = Response::new(AdminBody::full(body.to_owned()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response<AdminBody> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(AdminBody::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error(e: CommandError) -> Response<AdminBody> {
    let status = StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &json!({ "error": { "code": e.code, "message": e.message } }))
}

fn not_found() -> Response<AdminBody> {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({ "error": { "code": "not_found", "message": "no such endpoint" } }),
    )
}

fn refused(refusal: Refusal, has_token: bool) -> Response<AdminBody> {
    let (status, code, message) = match refusal {
        Refusal::Unauthenticated => (
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "send Authorization: Bearer <token>, or log in",
        ),
        Refusal::ForeignHost => (
            StatusCode::FORBIDDEN,
            "foreign_host",
            "without a token the admin API answers only requests for its own loopback address",
        ),
        Refusal::ForeignOrigin => (
            StatusCode::FORBIDDEN,
            "foreign_origin",
            "the request comes from another site",
        ),
        Refusal::NotJson => (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not_json",
            "changes are POST requests with Content-Type: application/json",
        ),
    };
    let mut response = json_response(status, &json!({ "error": { "code": code, "message": message } }));
    if has_token && refusal == Refusal::Unauthenticated {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

/// An admin response body: a whole message, or an event stream.
pub enum AdminBody {
    /// All of it; `None` once sent.
    Full(Option<Bytes>),
    /// Frames as they come; the stream ends when the sender is dropped.
    Stream(mpsc::Receiver<Bytes>),
}

impl AdminBody {
    fn full(bytes: impl Into<Bytes>) -> AdminBody {
        AdminBody::Full(Some(bytes.into()))
    }
}

impl Body for AdminBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            AdminBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            AdminBody::Stream(rx) => rx.poll_recv(cx).map(|next| next.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, AdminBody::Full(None))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            AdminBody::Full(Some(bytes)) => http_body::SizeHint::with_exact(bytes.len() as u64),
            AdminBody::Full(None) => http_body::SizeHint::with_exact(0),
            AdminBody::Stream(_) => http_body::SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(query_value("n=3", "n").as_deref(), Some("3"));
        assert_eq!(query_value("x=1&n=%2B2", "n").as_deref(), Some("+2"));
        assert_eq!(query_value("nn=1", "n"), None);
        assert_eq!(percent_decode("a%zzb%41"), "a%zzbA");
        assert_eq!(percent_decode("%"), "%");
    }
}
