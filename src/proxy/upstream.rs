//! The worker side of a request: corral's own HTTP/1.1 client, one exchange at a time per
//! connection.
//!
//! [`Conn::exchange`] writes the request head, streams the request body (if any) while watching
//! for the response head, skips interim `1xx` responses, and returns the response with a
//! [`ResponseBody`] that reads the rest straight from the socket. When that body has been read
//! to its end, the connection goes back to the worker's pool ([`super::pool`]).
//!
//! Why not hyper's client: a hyper client connection is a task of its own, fed through a
//! channel. Every request crossed an mpsc channel to that task and a oneshot back, woke two
//! tasks, and every connection carried its own 8 KiB write buffer, 8 KiB read buffer and
//! channel blocks (two of about 8 KiB each, sized for 32 queued requests although a proxy sends
//! one at a time). With 1,000 client connections in flight, those were about 35 MB of corral's
//! 68 MB heap (massif). Here the request's own future does the work on the shard's thread, the
//! only per-connection state is the socket and one read buffer that is reused from response to
//! response, and the head stays borrowed, so a retry needs no copy of it.
//!
//! The client side of corral is still hyper's server; this module only ever talks to the app's
//! own workers on loopback, and it is strict where that costs nothing: a response with an
//! unparsable head or a bad `Content-Length` fails the exchange (502) instead of being guessed
//! at. Framing follows RFC 9112 §6.3: no body for `HEAD`, `1xx`, `204` and `304`; chunked when
//! `Transfer-Encoding` ends in `chunked`; `Content-Length` otherwise; else up to the close.

use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Buf;
use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::forward::is_hop_by_hop;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head accepted from a worker.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields accepted in a response head (hyper's limit too).
const MAX_HEADERS: usize = 100;
/// Free space ensured before each read: a whole small response fits in one read.
const READ_SPACE: usize = 4 * 1024;
/// Free space ensured before each read of a body larger than what is buffered.
const BODY_READ_SPACE: usize = 16 * 1024;
/// Longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 4 * 1024;
/// How long the rest of a client's upload is read and dropped after the worker answered
/// without reading it (see [`ResponseBody`]).
const LINGER: std::time::Duration = std::time::Duration::from_secs(10);

/// The body of a request on its way to a worker.
#[derive(Debug)]
pub enum UpstreamBody {
    /// No body (most GETs); such a request can be sent again as it is.
    Empty,
    /// The client's body, streamed.
    Stream(Incoming),
}

impl UpstreamBody {
    /// Wraps a client's body; an empty one becomes [`UpstreamBody::Empty`].
    pub fn from_client(body: Incoming) -> UpstreamBody {
        if body.is_end_stream() {
            UpstreamBody::Empty
        } else {
            UpstreamBody::Stream(body)
        }
    }
}

/// Limits an exchange applies on the client's behalf.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// From the end of the request to the response head.
    pub upstream_timeout: std::time::Duration,
    /// The longest wait between two reads of the client's body.
    pub client_body_timeout: std::time::Duration,
    /// Largest body passed on.
    pub max_body_size: Option<u64>,
}

/// Why the client's side of a request failed; the worker is not to blame.
#[derive(Debug)]
pub enum ClientFault {
    /// The body is malformed (bad chunk framing) or ended early (the client went away).
    Broken(String),
    /// Nothing of the body came for `client_body_timeout`.
    Stalled,
    /// The body grew past `max_body_size`.
    TooLarge,
}

/// How an exchange failed.
#[derive(Debug)]
pub enum Failure {
    /// The client's body failed: the request is abandoned and the connection to the worker,
    /// which holds a request it cannot finish, is closed.
    Client(ClientFault),
    /// No response head within `upstream_timeout` of the end of the request.
    Timeout,
    /// Nothing of the request was written: it may be sent anywhere else, whatever it is.
    NotSent(io::Error),
    /// The request was written, and the worker closed or reset the connection without a byte
    /// of response: on a reused connection, the sign of a keep-alive connection the worker
    /// closed just as the request went out.
    Dropped(io::Error),
    /// The request was written, in part or whole, and no complete response head came back.
    Failed(io::Error),
}

/// An HTTP/1.1 connection to a worker, idle between exchanges.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    /// Bytes read and not yet used. Empty between exchanges; its allocation is reused.
    buf: BytesMut,
}

impl Conn {
    /// A connection over `stream`.
    pub fn new(stream: TcpStream) -> Conn {
        Conn {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// False when the worker has closed this idle connection (or sent something unasked).
    /// Costs no system call unless the socket was reported readable.
    pub fn is_reusable(&self) -> bool {
        let mut probe = [0u8; 1];
        self.buf.is_empty()
            && matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Sends a request (its encoded `head`, see [`super::forward::encode_request`], then its
    /// body from `body`, chunked if `chunked`) and waits for the response head, at most
    /// `limits.upstream_timeout` after the request's end. `method` decides the response's
    /// framing (no body for `HEAD`). `upgrade`: the client asked for a protocol upgrade, so a
    /// `101` answer is expected rather than an error. A client body that breaks off, stalls or
    /// grows too large ends the exchange at once ([`Failure::Client`]), never a wait for the
    /// worker to give up on a request it cannot finish.
    pub async fn exchange(
        mut self,
        head: &[u8],
        method: &Method,
        body: &mut UpstreamBody,
        chunked: bool,
        upgrade: bool,
        limits: Limits,
    ) -> Result<Response<ResponseBody>, Failure> {
        write_head(&mut self.stream, head).await?;

        // The body is sent while the response head is awaited (a worker may answer before the
        // upload ends: 413, 401) and, if the head comes first, while the response body streams
        // (an echo, a transcoder): full duplex, like a direct connection.
        let mut upload = match std::mem::replace(body, UpstreamBody::Empty) {
            UpstreamBody::Stream(client) => Some(Upload::new(client, chunked, limits)),
            UpstreamBody::Empty => None,
        };
        // upstream_timeout runs from the end of the request: an upload may take longer.
        let mut deadline = std::pin::pin!(tokio::time::sleep(limits.upstream_timeout));
        let mut armed = upload.is_none();
        let parsed = poll_fn(|cx| {
            if let Some(upload) = upload.as_mut() {
                upload.poll_progress(cx, &mut self.stream);
                if let Some(fault) = upload.fault.take() {
                    return Poll::Ready(Err(Failure::Client(fault)));
                }
                if upload.done && !armed {
                    armed = true;
                    let at = tokio::time::Instant::now() + limits.upstream_timeout;
                    deadline.as_mut().reset(at);
                }
            }
            if let Poll::Ready(head) = poll_head(cx, &mut self.stream, &mut self.buf) {
                return Poll::Ready(head.map_err(|e| classify(e, upload.as_ref(), self.buf.is_empty())));
            }
            if armed && deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(Failure::Timeout));
            }
            Poll::Pending
        })
        .await?;
        let framing = if parsed.status == StatusCode::SWITCHING_PROTOCOLS {
            if !upgrade {
                return Err(Failure::Failed(invalid(
                    "101 Switching Protocols without an upgrade request",
                )));
            }
            State::Upgraded
        } else {
            framing(method, &parsed).map_err(Failure::Failed)?
        };
        let reusable = parsed.keep_alive && !matches!(framing, State::Close);
        let mut response = Response::new(ResponseBody {
            conn: Some(self),
            state: framing,
            reusable,
            upload: upload.filter(|u| !u.ended || !u.done).map(Box::new),
            linger: None,
            trailers: None,
        });
        *response.status_mut() = parsed.status;
        *response.headers_mut() = parsed.headers;
        if let Some(reason) = parsed.reason {
            response.extensions_mut().insert(reason);
        }
        Ok(response)
    }
}

/// How a failure to read the response head counts, given what happened to the upload.
fn classify(e: io::Error, upload: Option<&Upload>, nothing_read: bool) -> Failure {
    match upload.and_then(|u| u.failed.as_ref()) {
        Some(send) => Failure::Failed(io::Error::new(e.kind(), format!("{e} (sending the body: {send})"))),
        None if nothing_read && matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset) => {
            Failure::Dropped(e)
        }
        None => Failure::Failed(e),
    }
}

/// Writes the head; a failure before the first byte left means the request was not sent.
async fn write_head(stream: &mut TcpStream, head: &[u8]) -> Result<(), Failure> {
    let mut written = 0;
    while written < head.len() {
        match stream.write(&head[written..]).await {
            Ok(0) => return Err(not_sent_if(written == 0, io::ErrorKind::WriteZero.into())),
            Ok(n) => written += n,
            Err(e) => return Err(not_sent_if(written == 0, e)),
        }
    }
    Ok(())
}

fn not_sent_if(nothing_written: bool, e: io::Error) -> Failure {
    if nothing_written {
        Failure::NotSent(e)
    } else {
        Failure::Failed(e)
    }
}

/// The client's body on its way to the worker: as it is under a `Content-Length`, else chunked.
/// Driven by polls from the exchange and then from the response body, so it needs no task.
#[derive(Debug)]
struct Upload {
    body: Incoming,
    chunked: bool,
    /// Encoded bytes not yet written: chunk-size line, data, line end.
    out: [Bytes; 3],
    /// Everything is written (or writing failed: see `failed` and `fault`).
    done: bool,
    /// All frames were taken from the client's body.
    ended: bool,
    /// Writing to the worker failed.
    failed: Option<io::Error>,
    /// The client's side failed; taken by whoever reports it.
    fault: Option<ClientFault>,
    /// Body bytes taken from the client so far.
    received: u64,
    limits: Limits,
    /// Fires `client_body_timeout` after the last frame; set up the first time the client's
    /// body makes us wait, so a body that came with its head costs no timer.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// Why an upload stopped early.
enum Stop {
    Worker(io::Error),
    Client(ClientFault),
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Stop {
        Stop::Worker(e)
    }
}

impl Upload {
    fn new(body: Incoming, chunked: bool, limits: Limits) -> Upload {
        Upload {
            body,
            chunked,
            out: Default::default(),
            done: false,
            ended: false,
            failed: None,
            fault: None,
            received: 0,
            limits,
            stall: None,
        }
    }

    /// Writes as much as can be written now. A worker-side failure stops the upload and is
    /// kept: the worker may still have answered (it closed the connection after a 413, say).
    /// A client-side one is kept in `fault` for the exchange or the response body to report.
    fn poll_progress(&mut self, cx: &mut Context<'_>, stream: &mut TcpStream) {
        if self.done {
            return;
        }
        match self.poll_write(cx, stream) {
            Poll::Ready(Ok(())) => self.done = true,
            Poll::Ready(Err(Stop::Worker(e))) => {
                self.done = true;
                self.failed = Some(e);
            }
            Poll::Ready(Err(Stop::Client(fault))) => {
                self.done = true;
                self.ended = true;
                self.fault = Some(fault);
            }
            Poll::Pending => {}
        }
    }

    /// The client's next body frame, bounded by `client_body_timeout` and `max_body_size`.
    fn poll_client(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Frame<Bytes>>, ClientFault>> {
        let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) else {
            let after = self.limits.client_body_timeout;
            let stall = self.stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
            ready!(stall.as_mut().poll(cx));
            return Poll::Ready(Err(ClientFault::Stalled));
        };
        if let Some(stall) = self.stall.as_mut() {
            stall
                .as_mut()
                .reset(tokio::time::Instant::now() + self.limits.client_body_timeout);
        }
        match frame {
            None => Poll::Ready(Ok(None)),
            Some(Err(e)) => Poll::Ready(Err(ClientFault::Broken(e.to_string()))),
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    self.received += data.len() as u64;
                    if self.limits.max_body_size.is_some_and(|max| self.received > max) {
                        return Poll::Ready(Err(ClientFault::TooLarge));
                    }
                }
                Poll::Ready(Ok(Some(frame)))
            }
        }
    }

    /// Reads the rest of the client's body and drops it; ready when it has ended.
    fn poll_discard(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while !self.ended {
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(_)) => {}
                None | Some(Err(_)) => self.ended = true,
            }
        }
        Poll::Ready(())
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, stream: &mut TcpStream) -> Poll<Result<(), Stop>> {
        loop {
            while self.out.iter().any(|b| !b.is_empty()) {
                let slices = [
                    IoSlice::new(&self.out[0]),
                    IoSlice::new(&self.out[1]),
                    IoSlice::new(&self.out[2]),
                ];
                let mut n = ready!(Pin::new(&mut *stream).poll_write_vectored(cx, &slices))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
                }
                for part in &mut self.out {
                    let step = n.min(part.len());
                    part.advance(step);
                    n -= step;
                }
            }
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.poll_client(cx)).map_err(Stop::Client)? {
                None => {
                    self.ended = true;
                    if self.chunked {
                        self.out[2] = Bytes::from_static(b"0\r\n\r\n");
                    }
                }
                // Request trailers are dropped: workers do not read them, and a
                // Content-Length body cannot carry them.
                Some(frame) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) if self.chunked => {
                        self.out = [
                            Bytes::from(format!("{:x}\r\n", data.len())),
                            data,
                            Bytes::from_static(b"\r\n"),
                        ];
                    }
                    Ok(data) => self.out[1] = data,
                    Err(_trailers) => {}
                },
            }
        }
    }
}

/// A final response head, parsed. Its hop-by-hop fields are not in `headers`: what they say
/// is kept in the other fields.
#[derive(Debug)]
struct Parsed {
    status: StatusCode,
    headers: HeaderMap,
    reason: Option<hyper::ext::ReasonPhrase>,
    keep_alive: bool,
    /// `Transfer-Encoding` was present; whether its last coding is `chunked`.
    chunked: Option<bool>,
    /// The `Content-Length` (all its values agree), or why it is unusable.
    length: Result<Option<u64>, &'static str>,
}

/// Reads until a final (non-1xx, or 101) response head is complete and takes it off `buf`.
fn poll_head(cx: &mut Context<'_>, stream: &mut TcpStream, buf: &mut BytesMut) -> Poll<io::Result<Parsed>> {
    loop {
        if !buf.is_empty() {
            if let Some(parsed) = parse_head(buf)? {
                if parsed.status.is_informational() && parsed.status != StatusCode::SWITCHING_PROTOCOLS {
                    continue; // 100 Continue, 103 Early Hints: not forwarded
                }
                return Poll::Ready(Ok(parsed));
            }
        }
        buf.reserve(READ_SPACE);
        if ready!(tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, buf))? == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                if buf.is_empty() {
                    "connection closed before a response"
                } else {
                    "connection closed in the middle of the response head"
                },
            )));
        }
    }
}

/// Parses a complete head at the start of `buf` and removes it; `None` while incomplete.
fn parse_head(buf: &mut BytesMut) -> io::Result<Option<Parsed>> {
    let mut slots = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut response, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Ok(None),
        Ok(_) => return Err(invalid("response head larger than 64 KiB")),
        Err(e) => return Err(invalid(&format!("invalid response head: {e}"))),
    };
    let status = response
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| invalid("bad status"))?;
    let http10 = response.version == Some(0);
    let base = buf.as_ptr() as usize;
    // Where each field sits in the head, so the values can share its bytes once frozen
    // (offsets fit in u32: the head is at most 64 KiB).
    let offset = |part: &[u8]| (part.as_ptr() as usize - base) as u32;
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let count = response.headers.len();
    for (span, field) in spans.iter_mut().zip(response.headers.iter()) {
        let (name, value) = (offset(field.name.as_bytes()), offset(field.value));
        *span = (
            name,
            name + field.name.len() as u32,
            value,
            value + field.value.len() as u32,
        );
    }
    let reason = response
        .reason
        .filter(|r| Some(*r) != status.canonical_reason())
        .map(|r| (offset(r.as_bytes()), offset(r.as_bytes()) + r.len() as u32));
    let head = buf.split_to(len).freeze();

    let mut parsed = Parsed {
        status,
        headers: HeaderMap::with_capacity(count),
        reason: reason
            .and_then(|(start, end)| hyper::ext::ReasonPhrase::try_from(head.slice(start as usize..end as usize)).ok()),
        keep_alive: !http10,
        chunked: None,
        length: Ok(None),
    };
    let mut listed: Option<Vec<HeaderName>> = None;
    for &(name_start, name_end, value_start, value_end) in &spans[..count] {
        let name = HeaderName::from_bytes(&head[name_start as usize..name_end as usize])
            .map_err(|_| invalid("bad header name"))?;
        let value = &head[value_start as usize..value_end as usize];
        if name == header::CONTENT_LENGTH {
            parsed.length = parsed.length.and_then(|known| content_length(known, value));
        } else if name == header::TRANSFER_ENCODING {
            let last = value
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .rfind(|t| !t.is_empty());
            parsed.chunked = Some(last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")));
            continue;
        } else if name == header::CONNECTION {
            for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    parsed.keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    parsed.keep_alive |= http10;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    // Upgrade is hop-by-hop anyway; a 101 keeps it (see below).
                } else if let Ok(other) = HeaderName::from_bytes(token) {
                    listed.get_or_insert_with(Vec::new).push(other);
                }
            }
            continue;
        }
        // Hop-by-hop fields describe the worker's connection, not the client's; a 101 keeps its
        // Upgrade (the protocol the client gets).
        if is_hop_by_hop(&name) && !(name == header::UPGRADE && status == StatusCode::SWITCHING_PROTOCOLS) {
            continue;
        }
        let value = HeaderValue::from_maybe_shared(head.slice(value_start as usize..value_end as usize))
            .map_err(|_| invalid("bad header value"))?;
        parsed.headers.append(name, value);
    }
    if parsed.chunked.is_some() {
        // Transfer-Encoding overrides Content-Length (RFC 9112 §6.3), and corral re-frames.
        parsed.headers.remove(header::CONTENT_LENGTH);
    }
    for name in listed.iter().flatten() {
        parsed.headers.remove(name);
    }
    Ok(Some(parsed))
}

/// Folds one `Content-Length` field value into what earlier ones said.
fn content_length(known: Option<u64>, value: &[u8]) -> Result<Option<u64>, &'static str> {
    let mut length = known;
    for item in value.split(|&b| b == b',') {
        let item = item.trim_ascii();
        if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
            return Err("invalid Content-Length");
        }
        let n: u64 = std::str::from_utf8(item)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("invalid Content-Length")?;
        if length.is_some_and(|l| l != n) {
            return Err("conflicting Content-Length values");
        }
        length = Some(n);
    }
    Ok(length)
}

/// How the response body is delimited (RFC 9112 §6.3).
fn framing(method: &Method, parsed: &Parsed) -> io::Result<State> {
    let status = parsed.status;
    if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(State::Done);
    }
    Ok(match (parsed.chunked, parsed.length) {
        (Some(true), Ok(None)) => State::ChunkSize,
        // Both framings: Transfer-Encoding wins, and the connection is not reused after.
        (Some(true), _) => State::ChunkedThenClose,
        (Some(false), _) => State::Close,
        (None, Err(why)) => return Err(invalid(why)),
        (None, Ok(Some(0))) => State::Done,
        (None, Ok(Some(n))) => State::Fixed(n),
        (None, Ok(None)) => State::Close,
    })
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Where the response body reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// This many bytes of a Content-Length body are still to come.
    Fixed(u64),
    /// Expecting a chunk-size line.
    ChunkSize,
    /// First frame of a chunked body whose head also had a Content-Length: the connection is
    /// not reused after it (RFC 9112 §6.3).
    ChunkedThenClose,
    /// This many bytes of chunk data, then its CRLF.
    ChunkData(u64),
    /// The CRLF after chunk data.
    ChunkEnd,
    /// Trailer fields after the last chunk.
    Trailers,
    /// Everything until the worker closes the connection.
    Close,
    /// The body is complete.
    Done,
    /// `101`: the connection now carries another protocol; see [`ResponseBody::into_upgraded`].
    Upgraded,
}

/// A worker's response body, read from its connection as hyper asks for it.
///
/// When the worker answered without reading the whole request body (a 413 for an upload too
/// large, say), the body does not end until the rest of the upload has been read from the
/// client and dropped, for at most `LINGER` (10 s): closing a socket with unread data makes the
/// kernel reset the connection, and the client could lose the answer it is about to read.
/// This is nginx's lingering close, done before the response ends so that the client's
/// connection also stays usable.
#[derive(Debug)]
pub struct ResponseBody {
    conn: Option<Conn>,
    state: State,
    reusable: bool,
    /// The rest of the request body, when the response head came before its end (boxed:
    /// uploads are the rare case, and this body lives in every response).
    upload: Option<Box<Upload>>,
    /// Bounds the reading of an upload the worker did not want (set up only then).
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Trailer fields read so far, for a chunked body that has them.
    trailers: Option<Box<HeaderMap>>,
}

impl ResponseBody {
    /// The connection, once the body has been read to its end and the connection can carry
    /// another exchange.
    pub fn take_reusable(&mut self) -> Option<Conn> {
        let uploaded = self.upload.as_ref().is_none_or(|u| u.done && u.failed.is_none());
        if self.state == State::Done && self.reusable && uploaded {
            self.conn.take()
        } else {
            None
        }
    }

    /// For a `101` response: the connection's socket and the bytes the worker already sent in
    /// the new protocol.
    pub fn into_upgraded(mut self) -> Option<(TcpStream, Bytes)> {
        if self.state != State::Upgraded {
            return None;
        }
        self.conn.take().map(|c| (c.stream, c.buf.freeze()))
    }

    /// Reads more from the worker into the buffer; `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>, space: usize) -> Poll<io::Result<usize>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        conn.buf.reserve(space);
        tokio_util::io::poll_read_buf(Pin::new(&mut conn.stream), cx, &mut conn.buf)
    }

    fn buf(&mut self) -> &mut BytesMut {
        &mut self
            .conn
            .as_mut()
            .expect("UNWRAP: the connection stays until the body ends")
            .buf
    }

    /// One line (chunk size or trailer field) from the buffer, without its line ending.
    fn poll_line(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        loop {
            let buf = self.buf();
            if let Some(newline) = buf.iter().position(|&b| b == b'\n') {
                let mut line = buf.split_to(newline + 1);
                line.truncate(newline);
                if line.last() == Some(&b'\r') {
                    line.truncate(newline - 1);
                }
                return Poll::Ready(Ok(line.freeze()));
            }
            if buf.len() > MAX_LINE {
                return Poll::Ready(Err(invalid("chunked body line too long")));
            }
            if ready!(self.poll_fill(cx, READ_SPACE))? == 0 {
                return Poll::Ready(Err(cut_short()));
            }
        }
    }

    /// Up to `limit` bytes of body data, reading if nothing is buffered; `None` at the end of
    /// the stream.
    fn poll_data(&mut self, cx: &mut Context<'_>, limit: u64) -> Poll<io::Result<Option<Bytes>>> {
        if self.buf().is_empty() {
            let space = usize::try_from(limit)
                .unwrap_or(usize::MAX)
                .clamp(READ_SPACE, BODY_READ_SPACE);
            if ready!(self.poll_fill(cx, space))? == 0 {
                return Poll::Ready(Ok(None));
            }
        }
        let buf = self.buf();
        let take = usize::try_from(limit).unwrap_or(usize::MAX).min(buf.len());
        Poll::Ready(Ok(Some(buf.split_to(take).freeze())))
    }
}

fn cut_short() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "worker closed the connection in the middle of the body",
    )
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let this = &mut *self;
        if let (Some(upload), Some(conn)) = (this.upload.as_mut(), this.conn.as_mut()) {
            upload.poll_progress(cx, &mut conn.stream);
            if let Some(fault) = upload.fault.take() {
                // The client's request broke off under a streaming response: end it here, and
                // the worker's connection with it (it holds a request it cannot finish).
                this.conn = None;
                this.state = State::Done;
                return Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("the client's request body failed: {fault:?}"),
                ))));
            }
        }
        loop {
            match this.state {
                State::Done => {
                    if let Some(upload) = this.upload.as_mut().filter(|u| !u.ended) {
                        let linger = this.linger.get_or_insert_with(|| Box::pin(tokio::time::sleep(LINGER)));
                        if linger.as_mut().poll(cx).is_pending() {
                            ready!(upload.poll_discard(cx));
                        }
                    }
                    return Poll::Ready(None);
                }
                State::Upgraded => return Poll::Ready(None),
                State::Fixed(left) => {
                    let data = ready!(this.poll_data(cx, left))?.ok_or_else(cut_short)?;
                    let left = left - data.len() as u64;
                    this.state = if left == 0 { State::Done } else { State::Fixed(left) };
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::Close => match ready!(this.poll_data(cx, u64::MAX))? {
                    Some(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    None => {
                        this.state = State::Done;
                        this.reusable = false;
                    }
                },
                State::ChunkedThenClose => {
                    this.reusable = false;
                    this.state = State::ChunkSize;
                }
                State::ChunkSize => {
                    let line = ready!(this.poll_line(cx))?;
                    let digits = line.split(|&b| b == b';').next().unwrap_or_default().trim_ascii();
                    let size = std::str::from_utf8(digits)
                        .ok()
                        .filter(|d| !d.is_empty() && d.len() <= 15)
                        .and_then(|d| u64::from_str_radix(d, 16).ok())
                        .ok_or_else(|| invalid("bad chunk size"))?;
                    this.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::ChunkData(size)
                    };
                }
                State::ChunkData(left) => {
                    let data = ready!(this.poll_data(cx, left))?.ok_or_else(cut_short)?;
                    let left = left - data.len() as u64;
                    this.state = if left == 0 {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(left)
                    };
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::ChunkEnd => {
                    if !ready!(this.poll_line(cx))?.is_empty() {
                        return Poll::Ready(Some(Err(invalid("chunk data longer than its size"))));
                    }
                    this.state = State::ChunkSize;
                }
                State::Trailers => {
                    loop {
                        let line = ready!(this.poll_line(cx))?;
                        if line.is_empty() {
                            break;
                        }
                        // A trailer line that is not a valid field is dropped, not fatal.
                        if let Some(colon) = line.iter().position(|&b| b == b':') {
                            if let (Ok(name), Ok(value)) = (
                                HeaderName::from_bytes(line[..colon].trim_ascii()),
                                HeaderValue::from_maybe_shared(line.slice_ref(line[colon + 1..].trim_ascii())),
                            ) {
                                // Kept in the body, not on the stack: the next line may not
                                // have arrived yet.
                                this.trailers.get_or_insert_with(Box::default).append(name, value);
                            }
                        }
                    }
                    this.state = State::Done;
                    if let Some(trailers) = this.trailers.take() {
                        return Poll::Ready(Some(Ok(Frame::trailers(*trailers))));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Not while an unwanted upload is still to be read and dropped (see `State::Done`).
        matches!(self.state, State::Done | State::Upgraded) && self.upload.as_ref().is_none_or(|u| u.ended)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Fixed(left) => SizeHint::with_exact(left),
            State::Done | State::Upgraded => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(head: &str) -> Parsed {
        let mut buf = BytesMut::from(head);
        parse_head(&mut buf).expect("valid").expect("complete")
    }

    #[test]
    fn a_head_is_parsed_with_its_fields_and_connection_semantics() {
        let p = parsed("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nX-A: 2\r\n\r\nhello");
        assert_eq!(p.status, StatusCode::OK);
        assert!(p.keep_alive);
        assert!(p.reason.is_none());
        assert_eq!(p.headers.get_all("x-a").iter().count(), 2);
        assert_eq!(framing(&Method::GET, &p).expect("framed"), State::Fixed(5));
        assert_eq!(framing(&Method::HEAD, &p).expect("framed"), State::Done);

        assert!(!parsed("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!parsed("HTTP/1.0 200 OK\r\n\r\n").keep_alive);
        assert!(parsed("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        let hop = parsed("HTTP/1.1 200 OK\r\nConnection: keep-alive, x-private\r\nKeep-Alive: timeout=5\r\nX-Private: 1\r\nX-Kept: 2\r\n\r\n");
        assert!(hop.keep_alive);
        assert_eq!(hop.headers.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
        let custom = parsed("HTTP/1.1 200 Fine Thanks\r\n\r\n");
        assert_eq!(custom.reason.expect("non-canonical").as_bytes(), b"Fine Thanks");
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let chunked = parsed("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(framing(&Method::GET, &chunked).expect("framed"), State::ChunkSize);
        let both = parsed("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(framing(&Method::GET, &both).expect("framed"), State::ChunkedThenClose);
        assert!(
            both.headers.is_empty(),
            "re-framed: neither framing header is passed on"
        );
        let unknown = parsed("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n");
        assert_eq!(framing(&Method::GET, &unknown).expect("framed"), State::Close);
        let none = parsed("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(framing(&Method::GET, &none).expect("framed"), State::Close);
        let empty = parsed("HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n");
        assert_eq!(framing(&Method::GET, &empty).expect("framed"), State::Done);
        let same = parsed("HTTP/1.1 200 OK\r\nContent-Length: 4, 4\r\n\r\n");
        assert_eq!(framing(&Method::GET, &same).expect("framed"), State::Fixed(4));
        for bad in [
            "Content-Length: 4\r\nContent-Length: 5",
            "Content-Length: -1",
            "Content-Length: 1x",
        ] {
            let p = parsed(&format!("HTTP/1.1 200 OK\r\n{bad}\r\n\r\n"));
            assert!(framing(&Method::GET, &p).is_err(), "{bad}");
        }
    }

    #[test]
    fn partial_and_broken_heads() {
        let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\nX: ");
        assert!(parse_head(&mut buf).expect("not invalid yet").is_none());
        let mut buf = BytesMut::from("HTTP/1.1 abc\r\n\r\n");
        assert!(parse_head(&mut buf).is_err());
        let mut huge = BytesMut::from("HTTP/1.1 200 OK\r\n");
        huge.extend_from_slice(&vec![b'a'; MAX_HEAD + 1]);
        assert!(parse_head(&mut huge).is_err());
    }
}

#[cfg(test)]
mod wire_tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A worker on a local socket that reads one request head and answers `response`, one byte
    /// per write; returns the request head it read.
    async fn worker(response: &'static [u8]) -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("bound");
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                if socket.read(&mut byte).await.expect("read") == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            for byte in response {
                socket.write_all(std::slice::from_ref(byte)).await.expect("write");
                tokio::task::yield_now().await;
            }
            head
        });
        (addr, task)
    }

    async fn body_of(mut response: Response<ResponseBody>) -> (Vec<u8>, Option<HeaderMap>, Option<Conn>) {
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = poll_fn(|cx| Pin::new(response.body_mut()).poll_frame(cx)).await {
            let frame = frame.expect("body frame");
            match frame.into_data() {
                Ok(bytes) => data.extend_from_slice(&bytes),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        let conn = response.body_mut().take_reusable();
        (data, trailers, conn)
    }

    const LIMITS: Limits = Limits {
        upstream_timeout: std::time::Duration::from_secs(30),
        client_body_timeout: std::time::Duration::from_secs(30),
        max_body_size: None,
    };

    /// A GET to a worker answering `answer`.
    async fn get(answer: &'static [u8]) -> Result<Response<ResponseBody>, Failure> {
        let (addr, _worker) = worker(answer).await;
        let conn = Conn::new(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        conn.exchange(
            b"GET / HTTP/1.1\r\n\r\n",
            &Method::GET,
            &mut UpstreamBody::Empty,
            false,
            false,
            LIMITS,
        )
        .await
    }

    #[tokio::test]
    async fn a_chunked_body_arriving_byte_by_byte_is_decoded_with_its_trailers() {
        let (addr, worker) = worker(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\n1;name=value\r\n,\r\n6\r\n world\r\n0\r\nX-Sum: 42\r\n\r\n",
        )
        .await;
        let conn = Conn::new(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        let head = b"GET /x HTTP/1.1\r\nhost: w\r\n\r\n";
        let response = conn
            .exchange(head, &Method::GET, &mut UpstreamBody::Empty, false, false, LIMITS)
            .await
            .expect("exchange");
        assert_eq!(response.status(), StatusCode::OK);
        let (data, trailers, conn) = body_of(response).await;
        assert_eq!(data, b"hello, world");
        assert_eq!(trailers.expect("trailers")["x-sum"], "42");
        assert!(
            conn.is_some(),
            "a complete keep-alive exchange gives the connection back"
        );
        assert_eq!(worker.await.expect("worker"), head);
    }

    #[tokio::test]
    async fn a_content_length_body_and_a_close_delimited_one_are_read_to_their_end() {
        let response = get(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world")
            .await
            .expect("exchange");
        let (data, _, conn) = body_of(response).await;
        assert_eq!((data.as_slice(), conn.is_some()), (&b"hello world"[..], true));

        let response = get(b"HTTP/1.1 200 OK\r\n\r\nuntil the end").await.expect("exchange");
        let (data, _, conn) = body_of(response).await;
        assert_eq!((data.as_slice(), conn.is_none()), (&b"until the end"[..], true));
    }

    #[tokio::test]
    async fn a_connection_closed_without_an_answer_is_dropped_and_a_cut_body_is_an_error() {
        let failure = get(b"").await.expect_err("no answer");
        assert!(matches!(failure, Failure::Dropped(_)), "{failure:?}");

        let mut response = get(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
            .await
            .expect("head arrives");
        let mut failed = false;
        while let Some(frame) = poll_fn(|cx| Pin::new(response.body_mut()).poll_frame(cx)).await {
            if frame.is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "a body cut short must end in an error, not look complete");
    }
}
