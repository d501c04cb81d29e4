//! Property tests of SPEC "Hostile input": one request in, at most one request out, the same
//! body bytes; and the same for worker responses going back.
//!
//! Each test starts one corral with one capture worker (`tests/fixtures/capture.js`) and
//! sends generated requests through it, each on its own connection with its own target
//! (`/rt/<n>/...`), then checks what the worker's socket received, parsed with httparse. The
//! generated heads mix the ordinary with the hostile: duplicate headers, `Connection` listing
//! random names (framing ones and `Host` among them), odd casing, bodies framed by
//! Content-Length or chunked in random pieces (hex in either case), bodies that hold a whole
//! request, and framing mutations that make the request ambiguous. Bounded: 64 cases from a
//! fixed seed, no persistence, a bounded shrink.

mod support;

use std::cell::Cell;
use std::fmt::Write as _;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};

use support::capture::{Capture, Framing, Received};
use support::http::Conn;
use support::{Options, TestResult};

/// A request still unanswered after this is left hanging (generous for two busy cores).
const HANGING: std::time::Duration = std::time::Duration::from_secs(10);

/// The fixed seed: a failure reproduces run after run.
const SEED: [u8; 32] = *b"corral roundtrip property seed!!";

fn runner() -> TestRunner {
    let config = Config {
        cases: 64,
        failure_persistence: None,
        max_shrink_iters: 200,
        ..Config::default()
    };
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &SEED))
}

/// Runs `check` over `strategy`, reporting the minimal failing case with corral's output.
fn run_property<S: Strategy>(
    capture: &Capture,
    strategy: S,
    check: impl Fn(&S::Value) -> Result<(), String>,
) -> TestResult
where
    S::Value: std::fmt::Debug,
{
    match runner().run(&strategy, |value| check(&value).map_err(TestCaseError::fail)) {
        Ok(()) => Ok(()),
        Err(TestError::Fail(reason, value)) => {
            Err(capture.explain(format!("minimal failing case: {value:#?}\n{reason}")))
        }
        Err(e) => Err(capture.explain(e)),
    }
}

/// Headers a hop-by-hop rule removes, whatever `Connection` says (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Headers corral writes itself.
const CORRAL_OWN: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "connection",
];

#[derive(Clone)]
enum Body {
    None,
    Length(Vec<u8>),
    /// Data, chunk sizes (the last chunk takes the rest), upper-case hex, trailers.
    Chunked(Vec<u8>, Vec<usize>, bool, Vec<(String, String)>),
}

/// Bodies shown as their length and first bytes: a failing case stays readable.
fn short(data: &[u8]) -> String {
    format!(
        "{} bytes {:?}",
        data.len(),
        String::from_utf8_lossy(&data[..data.len().min(40)])
    )
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::None => write!(f, "None"),
            Body::Length(data) => write!(f, "Length({})", short(data)),
            Body::Chunked(data, sizes, upper, trailers) => write!(
                f,
                "Chunked({}, sizes {sizes:?}, upper-case hex {upper}, trailers {trailers:?})",
                short(data)
            ),
        }
    }
}

/// A change that makes the request's framing or host ambiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mutation {
    None,
    /// The same Content-Length twice: RFC 9110 §8.6 lets a recipient take it or refuse it.
    DuplicateLength,
    /// Content-Length and Transfer-Encoding: must be refused.
    LengthAndChunked,
    /// Two different Content-Lengths: must be refused.
    ConflictingLength,
    /// Two Host lines: must be refused.
    DuplicateHost,
}

#[derive(Debug, Clone)]
struct Generated {
    method: &'static str,
    path: String,
    host: &'static str,
    headers: Vec<(String, String)>,
    /// One or two `Connection` lines, each a list of tokens.
    connection: Vec<Vec<String>>,
    body: Body,
    /// Start the body with a whole request (`GET /rt-smuggled/<n>`).
    smuggle: bool,
    mutation: Mutation,
}

fn casing(name: &'static str) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<bool>(), name.len()).prop_map(move |upper| {
        name.chars()
            .zip(upper)
            .map(|(c, up)| {
                if up {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect()
    })
}

fn header_name() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "accept",
        "user-agent",
        "cookie",
        "x-custom",
        "x-dup",
        "keep-alive",
        "te",
        "trailer",
        "proxy-connection",
        "proxy-authorization",
        "x-forwarded-for",
        "via",
        "forwarded",
        "accept-encoding",
        "authorization",
    ])
    .prop_flat_map(casing)
}

fn header_value() -> impl Strategy<Value = String> {
    // Visible ASCII with inner spaces and tabs; no leading or trailing whitespace (that is
    // not part of a value, RFC 9110 §5.5).
    proptest::string::string_regex("[!-~]([!-~ \t]{0,24}[!-~])?").expect("UNWRAP: a valid regex")
}

fn connection_token() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "close",
        "keep-alive",
        "content-length",
        "transfer-encoding",
        "host",
        "x-custom",
        "x-dup",
        "te",
        "cookie",
        "authorization",
        "x-forwarded-for",
    ])
    .prop_flat_map(casing)
}

fn body() -> impl Strategy<Value = Body> {
    let data = || prop::collection::vec(any::<u8>(), 0..1500);
    let trailers = prop::collection::vec(
        (
            prop::sample::select(vec!["x-sum", "x-trailer", "server-timing"]),
            header_value(),
        )
            .prop_map(|(k, v)| (k.to_owned(), v)),
        0..2,
    );
    prop_oneof![
        2 => Just(Body::None),
        3 => data().prop_map(Body::Length),
        3 => (data(), prop::collection::vec(1usize..400, 0..6), any::<bool>(), trailers)
            .prop_map(|(d, sizes, upper, t)| Body::Chunked(d, sizes, upper, t)),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        12 => Just(Mutation::None),
        1 => Just(Mutation::DuplicateLength),
        1 => Just(Mutation::LengthAndChunked),
        1 => Just(Mutation::ConflictingLength),
        1 => Just(Mutation::DuplicateHost),
    ]
}

fn generated() -> impl Strategy<Value = Generated> {
    (
        prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
        proptest::string::string_regex("[a-z0-9._~-]{0,12}(\\?[a-z0-9=&]{1,12})?").expect("UNWRAP: a valid regex"),
        prop::sample::select(vec!["h", "app.example", "app.example:8080", "127.0.0.1", "[::1]:3000"]),
        prop::collection::vec((header_name(), header_value()), 0..8),
        prop::collection::vec(prop::collection::vec(connection_token(), 1..4), 0..3),
        body(),
        prop::bool::weighted(0.2),
        mutation(),
    )
        .prop_map(
            |(method, path, host, headers, connection, body, smuggle, mutation)| Generated {
                method,
                path,
                host,
                headers,
                connection,
                body,
                smuggle,
                mutation,
            },
        )
}

/// The request's bytes and the body a correct reading gives.
fn render(request: &Generated, target: &str, smuggled: &str) -> (Vec<u8>, Vec<u8>) {
    let mut head = format!("{} {target} HTTP/1.1\r\nHost: {}\r\n", request.method, request.host);
    for (name, value) in &request.headers {
        writeln!(head, "{name}: {value}\r").expect("UNWRAP: writing to a String");
    }
    for tokens in &request.connection {
        writeln!(head, "Connection: {}\r", tokens.join(", ")).expect("UNWRAP: writing to a String");
    }
    if request.mutation == Mutation::DuplicateHost {
        head.push_str("host: other.example\r\n");
    }
    let with_smuggle = |data: &[u8]| {
        let mut bytes = Vec::new();
        if request.smuggle {
            bytes.extend_from_slice(format!("GET {smuggled} HTTP/1.1\r\nHost: internal\r\n\r\n").as_bytes());
        }
        bytes.extend_from_slice(data);
        bytes
    };
    let (framing, payload, body) = match &request.body {
        Body::None if !request.smuggle => (String::new(), Vec::new(), Vec::new()),
        Body::None => {
            let body = with_smuggle(b"");
            (format!("Content-Length: {}\r\n", body.len()), body.clone(), body)
        }
        Body::Length(data) => {
            let body = with_smuggle(data);
            (format!("Content-Length: {}\r\n", body.len()), body.clone(), body)
        }
        Body::Chunked(data, sizes, upper, trailers) => {
            let body = with_smuggle(data);
            let mut payload = Vec::new();
            let mut rest = body.as_slice();
            let mut sizes = sizes.iter();
            while !rest.is_empty() {
                let n = sizes.next().map_or(rest.len(), |&n| n.min(rest.len()));
                let size = if *upper { format!("{n:X}") } else { format!("{n:x}") };
                payload.extend_from_slice(format!("{size}\r\n").as_bytes());
                payload.extend_from_slice(&rest[..n]);
                payload.extend_from_slice(b"\r\n");
                rest = &rest[n..];
            }
            payload.extend_from_slice(b"0\r\n");
            for (k, v) in trailers {
                payload.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
            }
            payload.extend_from_slice(b"\r\n");
            ("Transfer-Encoding: chunked\r\n".to_owned(), payload, body)
        }
    };
    let chunked = matches!(request.body, Body::Chunked(..));
    let (framing, payload) = match request.mutation {
        Mutation::None | Mutation::DuplicateHost => (framing, payload),
        // With a chunked body there is no length to repeat.
        Mutation::DuplicateLength if chunked => (framing, payload),
        Mutation::DuplicateLength => {
            let line = format!("content-length: {}\r\n", payload.len());
            (format!("{line}{line}"), payload)
        }
        // The classic: both readings end, at different places.
        Mutation::LengthAndChunked if chunked => (format!("{framing}Content-Length: {}\r\n", body.len()), payload),
        Mutation::LengthAndChunked => {
            let mut both = b"0\r\n\r\n".to_vec();
            both.extend_from_slice(&payload);
            (
                format!("Content-Length: {}\r\nTransfer-Encoding: chunked\r\n", both.len()),
                both,
            )
        }
        Mutation::ConflictingLength => {
            let te = if chunked { framing.as_str() } else { "" };
            let n = payload.len();
            (
                format!("{te}Content-Length: {n}\r\nContent-Length: {}\r\n", n + 1),
                payload,
            )
        }
    };
    head.push_str(&framing);
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&payload);
    (bytes, body)
}

/// What the generated request must come to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owed {
    /// Valid: the worker's answer.
    Forwarded,
    /// Ambiguous: refused, nothing at the worker.
    Refused,
    /// Either, and if forwarded, forwarded right.
    Either,
}

fn owed(request: &Generated) -> Owed {
    match request.mutation {
        Mutation::None => Owed::Forwarded,
        // With a chunked body this mutation adds nothing.
        Mutation::DuplicateLength if matches!(request.body, Body::Chunked(..)) => Owed::Forwarded,
        Mutation::DuplicateLength => Owed::Either,
        Mutation::LengthAndChunked | Mutation::ConflictingLength | Mutation::DuplicateHost => Owed::Refused,
    }
}

/// The names a client listed in `Connection`, lower case.
fn listed(request: &Generated) -> Vec<String> {
    request
        .connection
        .iter()
        .flatten()
        .map(|t| t.to_ascii_lowercase())
        .collect()
}

/// Checks one forwarded request against what the client sent.
fn check_forwarded(request: &Generated, got: &Received, body: &[u8]) -> Result<(), String> {
    if !got.complete {
        return Err("the worker's request is incomplete".into());
    }
    let cl = got.all("content-length");
    let te = got.all("transfer-encoding");
    let framing_ok = match (cl.as_slice(), te.as_slice(), got.framing) {
        ([len], [], Framing::Length(n)) => len.parse::<u64>() == Ok(n),
        ([], [te], Framing::Chunked) => te.eq_ignore_ascii_case("chunked"),
        ([], [], Framing::None) => true,
        _ => false,
    };
    if !framing_ok {
        return Err(format!(
            "framing not corral's own: Content-Length {cl:?}, Transfer-Encoding {te:?}"
        ));
    }
    if got.body != body {
        return Err(format!(
            "body differs: the worker got {} bytes {:?}, the client sent {} bytes {:?}",
            got.body.len(),
            String::from_utf8_lossy(&got.body[..got.body.len().min(80)]),
            body.len(),
            String::from_utf8_lossy(&body[..body.len().min(80)])
        ));
    }
    if got.all("host") != [request.host] {
        return Err(format!(
            "Host {:?}, the client sent {:?}",
            got.all("host"),
            request.host
        ));
    }
    // (Transfer-Encoding is corral's framing, checked above.)
    for name in HOP_BY_HOP
        .iter()
        .filter(|&&n| n != "connection" && n != "transfer-encoding")
    {
        if got.has(name) {
            return Err(format!("hop-by-hop {name} reached the worker"));
        }
    }
    // corral may say keep-alive or close to its worker; nothing the client listed.
    for value in got.all("connection") {
        let own = value
            .split(',')
            .map(str::trim)
            .all(|t| t.eq_ignore_ascii_case("keep-alive") || t.eq_ignore_ascii_case("close"));
        if !own {
            return Err(format!("Connection: {value} reached the worker"));
        }
    }
    let listed = listed(request);
    for name in &listed {
        if !CORRAL_OWN.contains(&name.as_str()) && got.has(name) {
            return Err(format!("{name}, listed in Connection, reached the worker"));
        }
    }
    // Everything else the client sent arrives as sent, in order.
    for (name, _) in &request.headers {
        let lower = name.to_ascii_lowercase();
        if HOP_BY_HOP.contains(&lower.as_str()) || CORRAL_OWN.contains(&lower.as_str()) || listed.contains(&lower) {
            continue;
        }
        let sent: Vec<&str> = request
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect();
        if got.all(name) != sent {
            return Err(format!(
                "{name}: the worker got {:?}, the client sent {sent:?}",
                got.all(name)
            ));
        }
    }
    Ok(())
}

#[test]
fn what_corral_forwards_is_exactly_the_request_it_accepted() -> TestResult {
    let capture = Capture::start(Options::default().instances(1))?;
    let counter = Cell::new(0u32);
    run_property(&capture, generated(), |request| {
        let n = counter.get() + 1;
        counter.set(n);
        let target = format!("/rt/{n}/{}", request.path);
        let smuggled = format!("/rt-smuggled/{n}");
        let (bytes, body) = render(request, &target, &smuggled);
        let mut conn = Conn::open(capture.addr()).map_err(|e| e.to_string())?;
        // An answer that takes this long is no answer: a request left hanging.
        let within = conn.try_clone_stream().and_then(|s| s.set_read_timeout(Some(HANGING)));
        within.map_err(|e| e.to_string())?;
        conn.send_raw(&bytes).map_err(|e| format!("sending: {e}"))?;
        let response = conn.read_response();
        capture.barrier().map_err(|e| e.to_string())?;
        let from_worker = response
            .as_ref()
            .ok()
            .and_then(|r| r.header("x-request"))
            .map(str::to_owned);
        let received = capture.received_for(&target);
        let smuggled_seen = capture.received().iter().any(|r| r.target.starts_with(&smuggled))
            || capture.seen_heads().iter().any(|s| s.url.starts_with(&smuggled));
        if smuggled_seen {
            return Err(format!("a body became a request: {smuggled} reached the worker"));
        }
        let owed = owed(request);
        let status = response.as_ref().map(|r| r.status).map_err(|e| e.to_string());
        match (owed, &from_worker) {
            (Owed::Refused, Some(_)) => Err(format!("an ambiguous request was forwarded ({status:?})")),
            (Owed::Refused, None) | (Owed::Either, None) => {
                if received.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "refused ({status:?}) but {} request(s) reached the worker",
                        received.len()
                    ))
                }
            }
            (Owed::Forwarded, None) => Err(format!("a valid request was not answered by the worker: {status:?}")),
            (_, Some(answered)) => {
                if *answered != format!("{} {target}", request.method) {
                    return Err(format!("the client got the answer to {answered:?}"));
                }
                let ok = status.as_ref().is_ok_and(|s| (200..300).contains(s));
                if !ok {
                    return Err(format!("the worker answered {status:?}"));
                }
                match received.as_slice() {
                    [one] => check_forwarded(request, one, &body),
                    other => Err(format!("{} requests for {target} reached the worker", other.len())),
                }
            }
        }
    })
}

#[derive(Clone)]
struct Answer {
    mode: &'static str,
    body: Vec<u8>,
    pieces: Vec<usize>,
    trailers: bool,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Answer {{ mode: {}, body: {}, pieces: {:?}, trailers: {} }}",
            self.mode,
            short(&self.body),
            self.pieces,
            self.trailers
        )
    }
}

fn answer() -> impl Strategy<Value = Answer> {
    (
        prop::sample::select(vec!["cl", "chunked", "close"]),
        prop::collection::vec(any::<u8>(), 0..3000),
        prop::collection::vec(1usize..700, 0..6),
        any::<bool>(),
    )
        .prop_map(|(mode, body, pieces, trailers)| Answer {
            mode,
            body,
            pieces,
            trailers,
        })
}

#[test]
fn what_the_client_gets_is_exactly_the_body_the_worker_sent() -> TestResult {
    // The response direction: the worker frames its answer by Content-Length, chunked in
    // random pieces (with a trailer or not) or by closing; the client must get exactly the
    // bytes, in one consistently framed response.
    let capture = Capture::start(Options::default().instances(1))?;
    run_property(&capture, answer(), |answer| {
        let pieces: Vec<String> = answer.pieces.iter().map(usize::to_string).collect();
        let target = format!(
            "/respond?mode={}&pieces={}&trailers={}",
            answer.mode,
            pieces.join(","),
            u8::from(answer.trailers)
        );
        let mut conn = Conn::open(capture.addr()).map_err(|e| e.to_string())?;
        let response = conn
            .request("POST", &target, &[], &answer.body)
            .map_err(|e| format!("reading the answer: {e}"))?;
        if response.status != 200 {
            return Err(format!("status {}: {}", response.status, response.text()));
        }
        let framings = usize::from(response.header("content-length").is_some())
            + usize::from(response.header("transfer-encoding").is_some());
        if framings > 1 {
            return Err(format!("both framings in the response: {:?}", response.headers));
        }
        if response.body != answer.body {
            return Err(format!(
                "the client got {} bytes, the worker sent {}",
                response.body.len(),
                answer.body.len()
            ));
        }
        Ok(())
    })
}
