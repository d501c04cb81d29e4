//! The request side of an exchange: the client's body on its way to a worker.
//!
//! [`Upload`] takes the frames hyper decoded from the client and writes them to the worker's
//! socket, as they are under a `Content-Length` or re-chunked by corral, polled by the exchange
//! and then by the response body (full duplex, no task of its own). It is also where the
//! client's side is held to its limits: a frame error (malformed chunking, a client that went
//! away mid-body), `client_body_timeout` between two frames, and `max_body_size`, each a
//! [`ClientFault`] that ends the exchange at once instead of leaving the worker waiting for a
//! body that will never come.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

/// How long the rest of a client's upload is read and dropped after the worker answered
/// without reading it.
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
    /// Bodies of a declared length up to this are read whole before a worker is chosen.
    pub client_body_buffer_size: u64,
}

/// Reads the rest of a body whose length is declared and small, appending it to `into`, with
/// at most `stall` between two frames. Such a body is read whole before any worker is chosen
/// (nginx buffers request bodies too): an upload that never completes, a slow or an aborted
/// one, then never reaches a worker nor holds a connection to it, and the head and body go out
/// in one write.
pub async fn read_whole(
    body: &mut Incoming,
    into: &mut Vec<u8>,
    stall: std::time::Duration,
) -> Result<(), ClientFault> {
    loop {
        let frame = tokio::time::timeout(stall, std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)))
            .await
            .map_err(|_| ClientFault::Stalled)?;
        match frame {
            None => return Ok(()),
            Some(Err(e)) => return Err(ClientFault::Broken(e.to_string())),
            // Trailers are dropped, as for streamed bodies.
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    into.extend_from_slice(data);
                }
            }
        }
    }
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

/// The client's body on its way to the worker: as it is under a `Content-Length`, else chunked.
/// Driven by polls from the exchange and then from the response body, so it needs no task.
#[derive(Debug)]
pub(super) struct Upload {
    body: Incoming,
    chunked: bool,
    /// Encoded bytes not yet written: chunk-size line, data, line end.
    out: [Bytes; 3],
    /// Everything is written (or writing failed: see `failed` and `fault`).
    pub(super) done: bool,
    /// All frames were taken from the client's body.
    pub(super) ended: bool,
    /// Writing to the worker failed.
    pub(super) failed: Option<io::Error>,
    /// The client's side failed; taken by whoever reports it.
    pub(super) fault: Option<ClientFault>,
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
    pub(super) fn new(body: Incoming, chunked: bool, limits: Limits) -> Upload {
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
    pub(super) fn poll_progress(&mut self, cx: &mut Context<'_>, stream: &mut TcpStream) {
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

    /// Reads the rest of the client's body and drops it, for at most [`LINGER`], in a task of
    /// its own on this shard: the worker answered without wanting it, and the client must not
    /// be reset while it reads that answer.
    pub(super) fn discard_rest(self: Box<Self>) {
        if self.ended {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut body = self.body;
        runtime.spawn(async move {
            let drain = std::future::poll_fn(|cx| loop {
                match ready!(Pin::new(&mut body).poll_frame(cx)) {
                    Some(Ok(_)) => {}
                    None | Some(Err(_)) => return Poll::Ready(()),
                }
            });
            let _over_or_timed_out = tokio::time::timeout(LINGER, drain).await;
        });
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
