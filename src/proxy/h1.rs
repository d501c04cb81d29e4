//! The response side of corral's HTTP/1.1 client: one strict parser of worker response heads.
//!
//! [`poll_head`] reads until a final response head is complete (interim `1xx` are skipped, a
//! `101` is final), and [`parse_head`] takes it apart with httparse into slots that are never
//! zeroed, sharing the head's bytes for the header values. Hop-by-hop fields (and those the
//! worker names in `Connection`) never reach the response's map; what they say about the
//! connection is kept in [`Parsed`]. [`framing`] then decides how the body is delimited, by
//! RFC 9112 §6.3: no body for `HEAD`, `1xx`, `204` and `304`; chunked when the last coding of
//! `Transfer-Encoding` is `chunked` (then a `Content-Length` beside it is dropped and the
//! connection not reused); `Content-Length` otherwise (all values must agree); else up to the
//! close. Anything else (an unparsable head, a bad length, a head over 64 KiB) fails the
//! exchange as a 502.
//!
//! (The client side has its own strict reader, hyper's, guarded by [`super::framing`]; the two
//! directions share no code because they trust different peers and answer errors differently.)

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use tokio::net::TcpStream;

use super::forward::is_hop_by_hop;

/// Largest response head accepted from a worker.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields accepted in a response head (hyper's limit too).
const MAX_HEADERS: usize = 100;
/// Free space ensured before each read: a whole small response fits in one read.
pub(super) const READ_SPACE: usize = 4 * 1024;

/// A final response head, parsed. Its hop-by-hop fields are not in `headers`: what they say
/// is kept in the other fields.
#[derive(Debug)]
pub(super) struct Parsed {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) reason: Option<hyper::ext::ReasonPhrase>,
    pub(super) keep_alive: bool,
    /// `Transfer-Encoding` was present; whether its last coding is `chunked`.
    chunked: Option<bool>,
    /// The `Content-Length` (all its values agree), or why it is unusable.
    length: Result<Option<u64>, &'static str>,
}

/// Reads until a final (non-1xx, or 101) response head is complete and takes it off `buf`.
pub(super) fn poll_head(cx: &mut Context<'_>, stream: &mut TcpStream, buf: &mut BytesMut) -> Poll<io::Result<Parsed>> {
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
pub(super) fn parse_head(buf: &mut BytesMut) -> io::Result<Option<Parsed>> {
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
pub(super) fn framing(method: &Method, parsed: &Parsed) -> io::Result<State> {
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

pub(super) fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Where the response body reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
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
