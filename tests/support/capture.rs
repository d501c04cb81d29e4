//! corral in front of the capturing worker (`tests/fixtures/capture.js`), and what the worker
//! received.
//!
//! The worker writes every byte of every connection to `<pid>-<conn>.raw` in a capture
//! directory, and a JSON line per request that Node's own parser made of them to `<pid>.log`.
//! [`Capture::connections`] parses the raw bytes here with httparse, de-framing each body by
//! its Content-Length or chunked coding, so a test can assert "the worker received exactly
//! these requests"; [`Capture::seen`] is Node's view of the same bytes (what an app would do).
//!
//! A test that asserts that nothing reached the worker first passes a [`Capture::barrier`]: a
//! request on a fresh connection that the worker must have answered. corral writes a request
//! head to the worker before it answers the client, so anything a hostile request made corral
//! send is in the capture by then.

use std::cell::Cell;
use std::error::Error;
use std::net::SocketAddr;
use std::path::Path;

use serde_json::Value;

use super::http::Conn;
use super::{poll_until, Corral, Options, DEADLINE};

/// The prefix of the barrier requests' targets, left out of [`Capture::received`].
pub const BARRIER: &str = "/__barrier/";

/// corral running the capture worker.
pub struct Capture {
    pub corral: Corral,
    dir: tempfile::TempDir,
    barriers: Cell<u32>,
}

/// How a received request's body was framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Neither Content-Length nor Transfer-Encoding: no body.
    None,
    Length(u64),
    Chunked,
}

/// One request as the worker's socket received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub target: String,
    /// The minor version: 1 for HTTP/1.1.
    pub version: u8,
    pub headers: Vec<(String, Vec<u8>)>,
    pub framing: Framing,
    /// The body, de-framed.
    pub body: Vec<u8>,
    /// Trailer fields of a chunked body.
    pub trailers: Vec<(String, Vec<u8>)>,
    /// False when the connection ended (or the capture stops) inside this request's body.
    pub complete: bool,
}

impl Received {
    /// Every value of the header `name` (case-insensitive), as text.
    pub fn all(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    /// The value of the header `name` when it is there exactly once.
    pub fn one(&self, name: &str) -> Option<String> {
        let all = self.all(name);
        (all.len() == 1).then(|| all[0].clone())
    }

    pub fn has(&self, name: &str) -> bool {
        !self.all(name).is_empty()
    }
}

/// What followed the last complete request on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rest {
    /// Nothing: the bytes ended on a request boundary.
    Nothing,
    /// The start of a request head that never completed.
    PartialHead(Vec<u8>),
    /// Bytes after an upgrade request (a tunnel's, not HTTP).
    Tunnel(Vec<u8>),
    /// Bytes that are not HTTP, with httparse's (or the body de-framer's) complaint.
    Garbage { error: String, bytes: Vec<u8> },
}

/// One worker connection.
#[derive(Debug, Clone)]
pub struct Connection {
    pub pid: u32,
    /// The worker's connection number, from 1.
    pub id: u32,
    pub raw: Vec<u8>,
    pub requests: Vec<Received>,
    pub rest: Rest,
    /// The worker saw this connection close.
    pub closed: bool,
}

impl Connection {
    /// True when this connection carried a request for `target`.
    pub fn carried(&self, target: &str) -> bool {
        self.requests.iter().any(|r| r.target == target)
    }
}

/// One event of Node's own parser, from the worker's log.
#[derive(Debug, Clone)]
pub struct Seen {
    pub pid: u32,
    /// "head", "end", "aborted", "upgrade", "ws-end", "parse-error".
    pub ev: String,
    pub conn: u32,
    pub method: String,
    pub url: String,
    pub version: String,
    /// Name, value, name, value... as Node's `rawHeaders`.
    pub raw_headers: Vec<String>,
    /// The body (for "end").
    pub body: Vec<u8>,
}

impl Seen {
    /// The values of the header `name` as Node received them.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.raw_headers
            .chunks(2)
            .filter(|pair| pair.len() == 2 && pair[0].eq_ignore_ascii_case(name))
            .map(|pair| pair[1].as_str())
            .collect()
    }
}

impl Capture {
    /// Starts corral with `options` (its `fixture` replaced by the capture worker) and waits
    /// until the workers are online.
    pub fn start(options: Options) -> Result<Capture, Box<dyn Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().to_str().ok_or("capture dir is not UTF-8")?.to_owned();
        let corral = Corral::start(options.fixture("capture.js").env("CAPTURE_DIR", &path))?;
        Ok(Capture {
            corral,
            dir,
            barriers: Cell::new(0),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.corral.addr
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Every worker connection that received at least one byte, parsed, in (pid, id) order.
    pub fn connections(&self) -> Vec<Connection> {
        let mut found = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else {
            return found;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".raw") else {
                continue;
            };
            let Some((pid, id)) = stem.split_once('-') else {
                continue;
            };
            let (Ok(pid), Ok(id)) = (pid.parse::<u32>(), id.parse::<u32>()) else {
                continue;
            };
            let raw = std::fs::read(entry.path()).unwrap_or_default();
            let (requests, rest) = parse_requests(&raw);
            let closed = self.dir.path().join(format!("{stem}.closed")).exists();
            found.push(Connection {
                pid,
                id,
                raw,
                requests,
                rest,
                closed,
            });
        }
        found.sort_by_key(|c| (c.pid, c.id));
        found
    }

    /// Every request the workers received (complete or not), barriers left out.
    pub fn received(&self) -> Vec<Received> {
        self.connections()
            .into_iter()
            .flat_map(|c| c.requests)
            .filter(|r| !r.target.starts_with(BARRIER))
            .collect()
    }

    /// The received requests for `target`.
    pub fn received_for(&self, target: &str) -> Vec<Received> {
        self.received().into_iter().filter(|r| r.target == target).collect()
    }

    /// Node's view: every event its parser logged, barriers left out, in file order per pid.
    pub fn seen(&self) -> Vec<Seen> {
        let mut events = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else {
            return events;
        };
        let mut logs: Vec<_> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let pid = name.strip_suffix(".log")?.parse::<u32>().ok()?;
                Some((pid, e.path()))
            })
            .collect();
        logs.sort();
        for (pid, path) in logs {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            for line in text.lines() {
                let Ok(v) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                let text = |key: &str| v[key].as_str().unwrap_or_default().to_owned();
                let seen = Seen {
                    pid,
                    ev: text("ev"),
                    conn: v["conn"].as_u64().unwrap_or(0) as u32,
                    method: text("method"),
                    url: text("url"),
                    version: text("version"),
                    raw_headers: v["rawHeaders"]
                        .as_array()
                        .map(|a| a.iter().map(|s| s.as_str().unwrap_or_default().to_owned()).collect())
                        .unwrap_or_default(),
                    body: latin1(&text("body")),
                };
                if !seen.url.starts_with(BARRIER) {
                    events.push(seen);
                }
            }
        }
        events
    }

    /// Node's "head" events: the requests Node parsed.
    pub fn seen_heads(&self) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.ev == "head").collect()
    }

    /// Sends a GET on a fresh connection and waits until the worker has logged it: everything a
    /// request sent before made corral write to a worker has arrived by then.
    pub fn barrier(&self) -> Result<(), Box<dyn Error>> {
        let n = self.barriers.get() + 1;
        self.barriers.set(n);
        let target = format!("{BARRIER}{n}");
        let response = Conn::open(self.addr())?.get(&target)?;
        if response.status != 200 {
            return Err(self.explain(format!("barrier {target} got {}: {}", response.status, response.text())));
        }
        let dir = self.dir.path().to_owned();
        poll_until(DEADLINE, &format!("the worker to log {target}"), || {
            let logs = std::fs::read_dir(&dir).ok()?;
            logs.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
                .any(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains(&format!("\"url\":\"{target}\""))))
                .then_some(())
        })
    }

    /// Waits until `check` holds for the connections.
    pub fn wait_for<T>(
        &self,
        deadline: std::time::Duration,
        what: &str,
        mut check: impl FnMut(&[Connection]) -> Option<T>,
    ) -> Result<T, Box<dyn Error>> {
        poll_until(deadline, what, || check(&self.connections())).map_err(|e| self.explain(e.to_string()))
    }

    /// An error that carries what the workers received and corral's output.
    pub fn explain(&self, e: impl std::fmt::Display) -> Box<dyn Error> {
        self.corral.explain(format!("{e}\n{}", self.describe()).into())
    }

    /// What the workers received, for failure messages.
    pub fn describe(&self) -> String {
        let mut out = String::from("--- worker connections ---\n");
        for c in self.connections() {
            out.push_str(&format!(
                "pid {} conn {} ({} bytes, closed: {}): {:?}\n",
                c.pid,
                c.id,
                c.raw.len(),
                c.closed,
                String::from_utf8_lossy(&c.raw[..c.raw.len().min(2048)])
            ));
        }
        out.push_str("--- what Node parsed ---\n");
        for s in self.seen() {
            out.push_str(&format!(
                "pid {} conn {} {} {} {}\n",
                s.pid, s.conn, s.ev, s.method, s.url
            ));
        }
        out
    }
}

fn latin1(text: &str) -> Vec<u8> {
    text.chars().map(|c| c as u32 as u8).collect()
}

/// Parses a connection's bytes as a sequence of HTTP/1.x requests.
pub fn parse_requests(mut bytes: &[u8]) -> (Vec<Received>, Rest) {
    let mut requests = Vec::new();
    loop {
        if bytes.is_empty() {
            return (requests, Rest::Nothing);
        }
        let mut fields = [httparse::EMPTY_HEADER; 128];
        let mut request = httparse::Request::new(&mut fields);
        let head_len = match request.parse(bytes) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return (requests, Rest::PartialHead(bytes.to_vec())),
            Err(e) => {
                return (
                    requests,
                    Rest::Garbage {
                        error: e.to_string(),
                        bytes: bytes.to_vec(),
                    },
                )
            }
        };
        let headers: Vec<(String, Vec<u8>)> = request
            .headers
            .iter()
            .map(|h| (h.name.to_owned(), h.value.to_vec()))
            .collect();
        let mut received = Received {
            method: request.method.unwrap_or_default().to_owned(),
            target: request.path.unwrap_or_default().to_owned(),
            version: request.version.unwrap_or(0),
            headers,
            framing: Framing::None,
            body: Vec::new(),
            trailers: Vec::new(),
            complete: true,
        };
        bytes = &bytes[head_len..];
        let upgrade = received.has("upgrade");
        match framing(&received) {
            Err(error) => {
                requests.push(received);
                return (
                    requests,
                    Rest::Garbage {
                        error,
                        bytes: bytes.to_vec(),
                    },
                );
            }
            Ok(Framing::None) => {}
            Ok(Framing::Length(n)) => {
                received.framing = Framing::Length(n);
                let take = bytes.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                received.body = bytes[..take].to_vec();
                received.complete = take as u64 == n;
                bytes = &bytes[take..];
            }
            Ok(Framing::Chunked) => {
                received.framing = Framing::Chunked;
                match dechunk(bytes) {
                    Dechunked::Done { body, trailers, used } => {
                        received.body = body;
                        received.trailers = trailers;
                        bytes = &bytes[used..];
                    }
                    Dechunked::Partial(body) => {
                        received.body = body;
                        received.complete = false;
                        requests.push(received);
                        return (requests, Rest::Nothing);
                    }
                    Dechunked::Bad(error) => {
                        requests.push(received);
                        return (
                            requests,
                            Rest::Garbage {
                                error,
                                bytes: bytes.to_vec(),
                            },
                        );
                    }
                }
            }
        }
        let incomplete = !received.complete;
        requests.push(received);
        if incomplete {
            return (requests, Rest::Nothing);
        }
        if upgrade {
            return (requests, Rest::Tunnel(bytes.to_vec()));
        }
    }
}

/// The framing of a request as a strict recipient reads it (RFC 9112 §6).
fn framing(request: &Received) -> Result<Framing, String> {
    let te = request.all("transfer-encoding");
    let cl = request.all("content-length");
    if !te.is_empty() {
        if !cl.is_empty() {
            return Err("both Transfer-Encoding and Content-Length".into());
        }
        let codings: Vec<String> = te
            .iter()
            .flat_map(|v| v.split(','))
            .map(|c| c.trim().to_ascii_lowercase())
            .collect();
        return match codings.last().map(String::as_str) {
            Some("chunked") if codings.iter().filter(|c| *c == "chunked").count() == 1 => Ok(Framing::Chunked),
            _ => Err(format!("Transfer-Encoding {te:?} does not end in one chunked")),
        };
    }
    match cl.as_slice() {
        [] => Ok(Framing::None),
        [one] if !one.is_empty() && one.bytes().all(|b| b.is_ascii_digit()) => one
            .parse()
            .map(Framing::Length)
            .map_err(|e| format!("Content-Length {one:?}: {e}")),
        _ => Err(format!("Content-Length {cl:?} is not one decimal number")),
    }
}

enum Dechunked {
    Done {
        body: Vec<u8>,
        trailers: Vec<(String, Vec<u8>)>,
        used: usize,
    },
    Partial(Vec<u8>),
    Bad(String),
}

/// De-chunks a chunked body, strictly: CRLF line ends, hex sizes, extensions allowed.
fn dechunk(bytes: &[u8]) -> Dechunked {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(line_len) = find_crlf(&bytes[at..]) else {
            return if bytes[at..].contains(&b'\n') {
                Dechunked::Bad("a chunk-size line not ended by CRLF".into())
            } else {
                Dechunked::Partial(body)
            };
        };
        let line = &bytes[at..at + line_len];
        let digits = line.split(|&b| b == b';').next().unwrap_or_default();
        let size = std::str::from_utf8(digits)
            .ok()
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|d| u64::from_str_radix(d, 16).ok());
        let Some(size) = size else {
            return Dechunked::Bad(format!("bad chunk-size line {:?}", String::from_utf8_lossy(line)));
        };
        at += line_len + 2;
        if size == 0 {
            let mut trailers = Vec::new();
            loop {
                let Some(len) = find_crlf(&bytes[at..]) else {
                    return Dechunked::Partial(body);
                };
                let line = &bytes[at..at + len];
                at += len + 2;
                if line.is_empty() {
                    return Dechunked::Done {
                        body,
                        trailers,
                        used: at,
                    };
                }
                match line.iter().position(|&b| b == b':') {
                    Some(colon) => trailers.push((
                        String::from_utf8_lossy(&line[..colon]).into_owned(),
                        line[colon + 1..].trim_ascii().to_vec(),
                    )),
                    None => return Dechunked::Bad(format!("bad trailer {:?}", String::from_utf8_lossy(line))),
                }
            }
        }
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        if bytes.len() - at < size.saturating_add(2) {
            let end = bytes.len().min(at.saturating_add(size));
            body.extend_from_slice(&bytes[at..end]);
            return Dechunked::Partial(body);
        }
        body.extend_from_slice(&bytes[at..at + size]);
        at += size;
        if &bytes[at..at + 2] != b"\r\n" {
            return Dechunked::Bad("chunk data not followed by CRLF".into());
        }
        at += 2;
    }
}

fn find_crlf(bytes: &[u8]) -> Option<usize> {
    bytes.windows(2).position(|w| w == b"\r\n")
}
