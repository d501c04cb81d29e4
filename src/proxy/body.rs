//! The response body corral sends: a worker's body streamed through, or a short message of its own.
//!
//! The body is also where a response ends, for the books: it counts the bytes hyper took from
//! it, holds the request's in-flight count ([`Flight`]), and writes its access log line
//! ([`Pending`]) when it is dropped, which hyper does once the last frame has been written or
//! the client has gone away.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::client::Client;
use super::upstream::ResponseBody;
use crate::balancer::InFlight;
use crate::logs::access::Pending;
use crate::metrics::Flight;

/// A response body: streamed from a worker, or a message from corral.
#[derive(Debug)]
pub struct ProxyBody {
    kind: Kind,
    /// The client connection's books: this stream is open until the body is dropped, and it
    /// reports when it waits on the client ([`super::client::Stall`]).
    client: Option<Arc<Client>>,
    /// A frame was handed to hyper and the next has not been asked for.
    handed: bool,
    /// The share of the client connection's worker connections this response holds (HTTP/2).
    share: Option<OwnedSemaphorePermit>,
    /// Body bytes handed to hyper so far.
    sent: u64,
    /// The slot of the worker that answered, if one did.
    slot: Option<usize>,
    /// Counts the request in flight on its shard until the body is dropped.
    flight: Option<Flight>,
    /// The access log line, written when the body is dropped.
    log: Option<Box<Pending>>,
}

#[derive(Debug)]
enum Kind {
    /// The worker's body, frame by frame as it arrives. The guard keeps the request counted
    /// in flight until the body ends or the client goes away (the body is dropped).
    Upstream {
        /// The worker's response body; it holds the connection, which goes back to the
        /// worker's pool once the body has been read to its end.
        body: ResponseBody,
        /// Counts this response against its worker.
        guard: InFlight,
        /// Resolves when the worker's drain deadline passes; set up the first time the body
        /// has to wait for data, so quick responses never pay for it.
        cut: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    },
    /// A complete body (error pages); `None` once sent.
    Message(Option<Bytes>),
}

impl ProxyBody {
    /// Streams `body` while holding `guard`.
    pub fn upstream(body: ResponseBody, guard: InFlight) -> ProxyBody {
        let slot = Some(guard.upstream().slot);
        ProxyBody::of(Kind::Upstream { body, guard, cut: None }, slot)
    }

    /// A body of corral's own.
    pub fn message(text: impl Into<Bytes>) -> ProxyBody {
        ProxyBody::of(Kind::Message(Some(text.into())), None)
    }

    /// The empty body of a `101` from the worker in `slot` (the tunnel carries the rest).
    pub fn switched(slot: usize) -> ProxyBody {
        ProxyBody::of(Kind::Message(Some(Bytes::new())), Some(slot))
    }

    fn of(kind: Kind, slot: Option<usize>) -> ProxyBody {
        ProxyBody {
            kind,
            client: None,
            handed: false,
            share: None,
            sent: 0,
            slot,
            flight: None,
            log: None,
        }
    }

    /// Holds `flight` until the body ends, and writes `log` then.
    pub fn track(&mut self, flight: Flight, log: Option<Box<Pending>>) {
        self.flight = Some(flight);
        self.log = log;
    }

    /// Holds `share` of the client connection's worker connections until the body ends.
    pub fn hold(&mut self, share: Option<OwnedSemaphorePermit>) {
        self.share = share;
    }

    /// Counts this stream open in `client`'s books (which counted it opened) until the body is
    /// dropped, and reports there when it waits on the client.
    pub fn watch(&mut self, client: Arc<Client>) {
        // Waiting on the client until hyper first asks for a frame: a body hyper never polls
        // (an HTTP/2 window that never opens, were hyper to wait for it before polling) is
        // waiting on the client too.
        client.handed();
        self.handed = true;
        self.client = Some(client);
    }

    /// The slot of the worker that answered.
    pub fn slot(&self) -> Option<usize> {
        self.slot
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if let Some(client) = &this.client {
            client.polled(std::mem::take(&mut this.handed));
        }
        let polled = match &mut this.kind {
            Kind::Upstream { body, guard, cut } => {
                if let Poll::Ready(frame) = Pin::new(&mut *body).poll_frame(cx) {
                    if frame.is_none() {
                        if let Some(conn) = body.take_reusable() {
                            guard.upstream().pool.put(conn);
                        }
                    }
                    frame
                } else {
                    let cut = cut.get_or_insert_with(|| Box::pin(guard.upstream().cut.clone().cancelled_owned()));
                    match cut.as_mut().poll(cx) {
                        // The worker is being retired and its drain time is up: end the body
                        // here. A chunked stream (SSE) ends cleanly; a body with a
                        // Content-Length is cut short, which the client sees as an error, as it
                        // should.
                        Poll::Ready(()) => None,
                        Poll::Pending => return Poll::Pending,
                    }
                }
            }
            Kind::Message(text) => text.take().map(|t| Ok(Frame::data(t))),
        };
        if let Some(Ok(frame)) = &polled {
            if let Some(data) = frame.data_ref() {
                this.sent += data.len() as u64;
            }
            if let Some(client) = &this.client {
                this.handed = true;
                client.handed();
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream { body, .. } => body.is_end_stream(),
            Kind::Message(text) => text.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream { body, .. } => body.size_hint(),
            Kind::Message(text) => SizeHint::with_exact(text.as_ref().map_or(0, |t| t.len() as u64)),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // Bodies hyper never polls (HEAD, 204, 304) end here; their connection is reusable.
        if let Kind::Upstream { body, guard, .. } = &mut self.kind {
            if let Some(conn) = body.take_reusable() {
                guard.upstream().pool.put(conn);
            }
        }
        if let Some(log) = self.log.take() {
            log.finish(self.sent, self.slot);
        }
        if let Some(client) = &self.client {
            if self.handed {
                client.gone_waiting();
            }
            client.closed();
        }
    }
}
