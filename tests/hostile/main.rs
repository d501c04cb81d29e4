//! Hostile input at the edge (SPEC.md "Hostile input (the edge)", issue 11): each test sends
//! what an attacker would, through the real corral, to a real Node worker that records every
//! byte it receives (`tests/fixtures/capture.js`), and asserts what the worker received, not
//! only what the client saw.
//!
//! - [`smuggling`]: `Connection` naming framing headers (issue 11 item 1), the CL+TE guard
//!   (item 8), pipelining and `Expect: 100-continue`.
//! - [`catalogue`]: the usual smuggling catalogue (Transfer-Encoding, Content-Length and
//!   chunk-size forms, header syntax), each case with the outcome RFC 9112 asks of a strict
//!   edge and why; broken chunk sizes (item 3).
//! - [`bodies`]: a client that goes away (item 2), uploads longer than `upstream_timeout` and
//!   `client_body_timeout` (item 4), early answers and `max_body_size` (item 10).
//! - [`host`]: `Host` ambiguity (item 7) and trusted proxies (item 9).
//! - [`edges`]: what corral tells clients and workers (item 10): error bodies, `Proxy-*`,
//!   transfer codings, WebSocket half-close and idle tunnels.

#[path = "../support/mod.rs"]
mod support;

mod bodies;
mod catalogue;
mod edges;
mod host;
mod smuggling;

use std::error::Error;
use std::io::ErrorKind;
use std::time::{Duration, Instant};

use support::capture::{Capture, Framing, Received};
use support::http::{Conn, Response};
use support::Options;

/// "At once": far shorter than the 60 s `upstream_timeout` these tests configure, and
/// generous for two busy cores. Never a speed assertion: a bound on a wait.
pub const AT_ONCE: Duration = Duration::from_secs(15);

/// corral with one capture worker, `upstream_timeout = "60s"` unless `keys` set it.
pub fn capture(keys: &[&str]) -> Result<Capture, Box<dyn Error>> {
    let mut options = Options::default().instances(1);
    if !keys.iter().any(|k| k.starts_with("upstream_timeout")) {
        options = options.key("upstream_timeout = \"60s\"");
    }
    for key in keys {
        options = options.key(key);
    }
    Capture::start(options)
}

/// How a connection's reading ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// We stopped reading after the expected responses; the connection may still be open.
    Open,
    /// The peer closed.
    Closed,
    /// Nothing arrived within [`AT_ONCE`].
    TimedOut,
    /// Reset, or another read error.
    Broken(String),
}

/// What came back on a connection.
#[derive(Debug)]
pub struct Reply {
    pub responses: Vec<Response>,
    pub end: End,
}

impl Reply {
    /// The status of the first response, if one came.
    pub fn status(&self) -> Option<u16> {
        self.responses.first().map(|r| r.status)
    }
}

/// Classifies a read error.
pub fn end_of(e: &std::io::Error) -> End {
    match e.kind() {
        ErrorKind::UnexpectedEof => End::Closed,
        ErrorKind::WouldBlock | ErrorKind::TimedOut => End::TimedOut,
        _ => End::Broken(e.to_string()),
    }
}

/// Opens a connection whose reads give up after `within`.
pub fn open(capture: &Capture, within: Duration) -> Result<Conn, Box<dyn Error>> {
    let conn = Conn::open(capture.addr())?;
    conn.try_clone_stream()?.set_read_timeout(Some(within))?;
    Ok(conn)
}

/// Reads up to `expect` responses from `conn`.
pub fn read_replies(conn: &mut Conn, expect: usize) -> Reply {
    let mut responses = Vec::new();
    while responses.len() < expect {
        match conn.read_response() {
            Ok(response) => responses.push(response),
            Err(e) => {
                return Reply {
                    responses,
                    end: end_of(&e),
                }
            }
        }
    }
    Reply {
        responses,
        end: End::Open,
    }
}

/// Sends `bytes` on a fresh connection and reads up to `expect` responses, each within
/// [`AT_ONCE`].
/// The first response of `reply`; without one, an error showing corral's and the worker's side.
pub fn first(capture: &Capture, reply: &Reply) -> Result<Response, Box<dyn Error>> {
    reply
        .responses
        .first()
        .cloned()
        .ok_or_else(|| capture.explain(format!("{reply:?}")))
}

/// Waits until every worker connection that carried a request for `target` has closed.
pub fn worker_connections_closed(capture: &Capture, target: &str, what: &str) -> Result<(), Box<dyn Error>> {
    capture.wait_for(AT_ONCE, what, |conns| {
        conns
            .iter()
            .filter(|c| c.carried(target))
            .all(|c| c.closed)
            .then_some(())
    })
}

pub fn send(capture: &Capture, bytes: &[u8], expect: usize) -> Result<Reply, Box<dyn Error>> {
    let mut conn = open(capture, AT_ONCE)?;
    conn.send_raw(bytes)?;
    Ok(read_replies(&mut conn, expect))
}

/// After a refusal the connection must close: where the next request would start is unknown.
pub fn closes(conn: &mut Conn) -> End {
    match conn.read_to_close() {
        Ok(_) => End::Closed,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => End::Closed,
        Err(e) => end_of(&e),
    }
}

/// Checks that corral, not the client, framed `request`: exactly one of Content-Length (equal
/// to the body's length) or `Transfer-Encoding: chunked`, or neither for an empty body.
pub fn framed_by_corral(request: &Received) -> Result<(), String> {
    let cl = request.all("content-length");
    let te = request.all("transfer-encoding");
    let ok = match (cl.as_slice(), te.as_slice(), request.framing) {
        ([len], [], Framing::Length(n)) => len.parse::<u64>() == Ok(n) && n == request.body.len() as u64,
        ([], [te], Framing::Chunked) => te.eq_ignore_ascii_case("chunked"),
        ([], [], Framing::None) => request.body.is_empty(),
        _ => false,
    };
    if ok && request.complete {
        Ok(())
    } else {
        Err(format!(
            "the worker got {} {} framed by Content-Length {cl:?} / Transfer-Encoding {te:?} (complete: {}, {} body bytes)",
            request.method,
            request.target,
            request.complete,
            request.body.len()
        ))
    }
}

/// Asserts that the worker received nothing whose target contains `needle`, neither in the
/// raw bytes (parsed with httparse) nor in what Node's parser made of them.
pub fn never_received(capture: &Capture, needle: &str) -> Result<(), Box<dyn Error>> {
    capture.barrier()?;
    let raw: Vec<String> = capture
        .received()
        .into_iter()
        .filter(|r| r.target.contains(needle))
        .map(|r| format!("{} {}", r.method, r.target))
        .collect();
    let node: Vec<String> = capture
        .seen_heads()
        .into_iter()
        .filter(|s| s.url.contains(needle))
        .map(|s| format!("{} {}", s.method, s.url))
        .collect();
    if raw.is_empty() && node.is_empty() {
        Ok(())
    } else {
        Err(capture.explain(format!(
            "the worker received {needle}: on the wire {raw:?}, as Node parsed it {node:?}"
        )))
    }
}

/// Waits until `at`, re-checking in short pauses: pacing for uploads that must really take a
/// given time (the pause is bounded by `at`, which the caller chose).
pub fn wait_until(at: Instant) {
    loop {
        let now = Instant::now();
        if now >= at {
            return;
        }
        std::thread::park_timeout(at - now);
    }
}
