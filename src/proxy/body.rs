//! The response body corral sends: a worker's body streamed through, or a short message of its own.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::upstream::ResponseBody;
use crate::balancer::InFlight;

/// A response body: streamed from a worker, or a message from corral.
#[derive(Debug)]
pub enum ProxyBody {
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
        ProxyBody::Upstream { body, guard, cut: None }
    }

    /// A body of corral's own.
    pub fn message(text: impl Into<Bytes>) -> ProxyBody {
        ProxyBody::Message(Some(text.into()))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            ProxyBody::Upstream { body, guard, cut } => {
                if let Poll::Ready(frame) = Pin::new(&mut *body).poll_frame(cx) {
                    if frame.is_none() {
                        if let Some(conn) = body.take_reusable() {
                            guard.upstream().pool.put(conn);
                        }
                    }
                    return Poll::Ready(frame);
                }
                let cut = cut.get_or_insert_with(|| Box::pin(guard.upstream().cut.clone().cancelled_owned()));
                match cut.as_mut().poll(cx) {
                    // The worker is being retired and its drain time is up: end the body here.
                    // A chunked stream (SSE) ends cleanly; a body with a Content-Length is cut
                    // short, which the client sees as an error, as it should.
                    Poll::Ready(()) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            }
            ProxyBody::Message(text) => Poll::Ready(text.take().map(|t| Ok(Frame::data(t)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
            ProxyBody::Message(text) => text.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body, .. } => body.size_hint(),
            ProxyBody::Message(text) => SizeHint::with_exact(text.as_ref().map_or(0, |t| t.len() as u64)),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // Bodies hyper never polls (HEAD, 204, 304) end here; their connection is reusable.
        if let ProxyBody::Upstream { body, guard, .. } = self {
            if let Some(conn) = body.take_reusable() {
                guard.upstream().pool.put(conn);
            }
        }
    }
}
