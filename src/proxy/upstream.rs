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
//! at. The response head is parsed and its framing decided in [`super::h1`]; the request body
//! is sent, and the client held to its body limits, by [`super::upload`].

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};

use super::h1::{framing, invalid, poll_head, State, READ_SPACE};
use super::upload::Upload;
pub use super::upload::{ClientFault, Limits, UpstreamBody};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

/// Free space ensured before each read of a body larger than what is buffered.
const BODY_READ_SPACE: usize = 16 * 1024;
/// Longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 4 * 1024;

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
    /// This connection's place in its shard's budget of worker connections (an fd each),
    /// given back when the connection closes.
    budget: Option<OwnedSemaphorePermit>,
}

impl Conn {
    /// A connection over `stream`.
    pub fn new(stream: TcpStream) -> Conn {
        Conn {
            stream,
            buf: BytesMut::new(),
            budget: None,
        }
    }

    /// The same connection, holding `budget` for as long as it is open.
    pub fn counted(mut self, budget: OwnedSemaphorePermit) -> Conn {
        self.budget = Some(budget);
        self
    }

    /// True when every place in this connection's budget is taken: kept idle, it would hold
    /// a place a request may be waiting for.
    pub fn budget_full(&self) -> bool {
        self.budget
            .as_ref()
            .is_some_and(|place| place.semaphore().available_permits() == 0)
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

/// A worker's response body, read from its connection as hyper asks for it.
///
/// When the worker answered without reading the whole request body (a 413 for an upload too
/// large, say), the rest of the upload is read from the client and dropped once this body is
/// dropped, in a task of its own, for at most 10 s (see [`Upload::discard_rest`]): closing a
/// socket with unread data makes the kernel reset the connection, and the client could lose
/// the answer it is reading. This is nginx's lingering close, done so that the client's
/// connection also stays usable. (It cannot be done inside the body: hyper stops polling a
/// body once its `Content-Length` is written, and drops it.)
#[derive(Debug)]
pub struct ResponseBody {
    conn: Option<Conn>,
    state: State,
    reusable: bool,
    /// The rest of the request body, when the response head came before its end (boxed:
    /// uploads are the rare case, and this body lives in every response).
    upload: Option<Box<Upload>>,
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
    /// the new protocol, and its place in the shard's budget (held until the tunnel closes).
    pub fn into_upgraded(mut self) -> Option<(TcpStream, Bytes, Option<OwnedSemaphorePermit>)> {
        if self.state != State::Upgraded {
            return None;
        }
        self.conn.take().map(|c| (c.stream, c.buf.freeze(), c.budget))
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

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some(upload) = self.upload.take() {
            upload.discard_rest();
        }
    }
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
                State::Done | State::Upgraded => return Poll::Ready(None),
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
        matches!(self.state, State::Done | State::Upgraded)
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
        client_body_buffer_size: 0,
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
