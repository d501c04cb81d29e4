//! A guard in front of hyper's HTTP/1 parser that refuses requests with ambiguous framing.
//!
//! A request that carries both `Content-Length` and `Transfer-Encoding` is the classic request
//! smuggling vector. hyper resolves it the lenient way RFC 9112 §6.3 allows (the
//! Transfer-Encoding wins, Content-Length is dropped, the connection closes after the
//! response), and the request still reaches the app. corral refuses it outright with 400, as
//! Node's own parser does, so no app ever sees such a request.
//!
//! [`FramingGuard`] wraps the client's socket and follows the byte stream the way the parser
//! will: it holds each request head back until it is complete, checks it, and then lets the
//! body pass (counted for Content-Length, followed chunk by chunk for chunked) so it knows where
//! the next pipelined head starts. For a head with both framings (whatever the Content-Length
//! value says) it rewrites the Transfer-Encoding value to a coding that is not `chunked`, and
//! for a Content-Length that is not one plain number it breaks the request line; hyper answers
//! both with 400 and a closed connection.
//!
//! Why a second reader of the stream at all, when hyper parses it and corral writes its own
//! framing to the workers (so nothing a client sends can smuggle a request past corral)? hyper
//! 1.x accepts CL+TE (the lenient reading RFC 9112 §6.1 allows: TE wins, the connection closes
//! after the response) and leaves no trace of the Content-Length in the request it hands over,
//! so it cannot be refused later; and a front end that reads such a request one way while a
//! proxy in front of corral read it the other is how desyncs start. The guard is kept small and
//! never the more lenient of the two: wherever it could disagree with hyper, the stream ends
//! with an error there (a chunk-size line it cannot read: [`Scan::Failed`], which hyper sees as
//! a broken body, 400) or the request cannot continue the connection: it stops looking only
//! after a head too large for hyper (431, connection closed), and when the connection becomes
//! a tunnel: [`FramingGuard::stop`] is called by the tunnel once hyper has handed the upgraded
//! connection over. A request that asks for an upgrade is followed like any other, so one the
//! worker declines (a `200` to `Upgrade: h2c`) leaves the connection guarded.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Where the guard is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Collecting a request head.
    Head,
    /// Passing this many bytes of a Content-Length body.
    Fixed(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Passing this many bytes of chunk data plus its CRLF.
    ChunkData(u64),
    /// Reading trailer lines after the last chunk.
    Trailers,
    /// No longer looking: the connection is a tunnel, or hyper refuses the head itself.
    Off,
    /// The stream cannot be followed (an unreadable chunk-size line): what came before is
    /// delivered, then reads fail and the connection ends.
    Failed,
}

/// A client connection whose request heads are checked before hyper parses them.
#[derive(Debug)]
pub struct FramingGuard<IO> {
    io: IO,
    scan: Scan,
    /// The current chunk-size or trailer line (reused, so steady state allocates nothing).
    line: Vec<u8>,
    /// Bytes waiting for hyper to read them; from `head_start` on, an incomplete request head
    /// that is held back until it is complete and checked.
    ready: BytesMut,
    head_start: Option<usize>,
    /// A head longer than this is hyper's to refuse (431); we stop holding it back.
    max_head: usize,
}

impl<IO> FramingGuard<IO> {
    /// Guards `io`; `max_head` is the largest head hyper accepts.
    pub fn new(io: IO, max_head: usize) -> FramingGuard<IO> {
        FramingGuard {
            io,
            scan: Scan::Head,
            line: Vec::new(),
            ready: BytesMut::new(),
            head_start: None,
            max_head,
        }
    }

    /// Runs the scanner over bytes read from the client, moving them to `ready`.
    fn feed(&mut self, mut input: &[u8]) {
        while !input.is_empty() {
            match self.scan {
                Scan::Off => {
                    self.ready.extend_from_slice(input);
                    return;
                }
                Scan::Failed => return,
                Scan::Fixed(n) | Scan::ChunkData(n) => {
                    let take = input.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                    self.ready.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    let left = n - take as u64;
                    self.scan = match (self.scan, left) {
                        (Scan::Fixed(_), 0) => Scan::Head,
                        (Scan::Fixed(_), _) => Scan::Fixed(left),
                        (_, 0) => Scan::ChunkSize,
                        (_, _) => Scan::ChunkData(left),
                    };
                }
                Scan::Head => {
                    let start = match self.head_start {
                        Some(start) => start,
                        None => {
                            // Blank lines before a request line are allowed (RFC 9112 §2.2).
                            let skip = input.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
                            self.ready.extend_from_slice(&input[..skip]);
                            input = &input[skip..];
                            if input.is_empty() {
                                return;
                            }
                            self.ready.len()
                        }
                    };
                    match head_end(&self.ready[start..], input) {
                        Some(end) => {
                            self.ready.extend_from_slice(&input[..end]);
                            input = &input[end..];
                            self.head_start = None;
                            self.scan = check_head(&mut self.ready[start..]);
                        }
                        None => {
                            self.ready.extend_from_slice(input);
                            self.head_start = Some(start);
                            if self.ready.len() - start > self.max_head {
                                self.give_up();
                            }
                            return;
                        }
                    }
                }
                Scan::ChunkSize | Scan::Trailers => {
                    let Some(newline) = input.iter().position(|&b| b == b'\n') else {
                        self.line.extend_from_slice(input);
                        self.ready.extend_from_slice(input);
                        if self.line.len() > 4096 {
                            self.scan = Scan::Failed;
                        }
                        return;
                    };
                    self.line.extend_from_slice(&input[..=newline]);
                    self.ready.extend_from_slice(&input[..=newline]);
                    input = &input[newline + 1..];
                    let text = trim_line(&self.line);
                    self.scan = match self.scan {
                        Scan::Trailers if text.is_empty() => Scan::Head,
                        Scan::Trailers => Scan::Trailers,
                        _ => match chunk_size(text) {
                            Some(0) => Scan::Trailers,
                            Some(size) => Scan::ChunkData(size.saturating_add(2)),
                            None => Scan::Failed,
                        },
                    };
                    self.line.clear();
                }
            }
        }
    }

    /// Stops scanning; everything held back goes to hyper as it is.
    /// Stops looking: the connection now carries another protocol (an upgrade that hyper has
    /// completed), so every byte, a held-back partial "head" included, passes as it is.
    pub fn stop(&mut self) {
        self.give_up();
    }

    fn give_up(&mut self) {
        self.head_start = None;
        self.scan = Scan::Off;
    }
}

/// Where, in `input`, the head whose first bytes are `pending` ends (just past its blank line).
fn head_end(pending: &[u8], input: &[u8]) -> Option<usize> {
    // The blank line may straddle the two: look at the last 3 pending bytes first.
    let carry = &pending[pending.len().saturating_sub(3)..];
    let mut joint = [0u8; 6];
    let n = carry.len() + input.len().min(3);
    joint[..carry.len()].copy_from_slice(carry);
    joint[carry.len()..n].copy_from_slice(&input[..input.len().min(3)]);
    if let Some(end) = blank_line_end(&joint[..n]).filter(|&end| end > carry.len()) {
        return Some(end - carry.len());
    }
    blank_line_end(input)
}

/// Just past the first empty line (`\n\n` or `\n\r\n`): jumps from line feed to line feed.
fn blank_line_end(bytes: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(offset) = bytes[from..].iter().position(|&b| b == b'\n') {
        let i = from + offset;
        match bytes.get(i + 1) {
            Some(b'\n') => return Some(i + 2),
            Some(b'\r') if bytes.get(i + 2) == Some(&b'\n') => return Some(i + 3),
            _ => {}
        }
        from = i + 1;
    }
    None
}

fn trim_line(line: &[u8]) -> &[u8] {
    let end = line.iter().rposition(|b| !b" \t\r\n".contains(b)).map_or(0, |i| i + 1);
    &line[..end]
}

/// The size of a chunk-size line (`hex [ws] [; extensions]`); `None` when it is not one.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.split(|&b| b == b';').next()?.trim_ascii();
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |size, &b| {
        let digit = char::from(b).to_digit(16)?;
        size.checked_mul(16)?.checked_add(u64::from(digit))
    })
}

/// A `Content-Length` value: one plain decimal number (no sign, list or spaces inside).
fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Checks a complete head and returns how its body is framed. A head with both framings gets
/// its (last) Transfer-Encoding value overwritten (same length), and one whose Content-Length
/// is unreadable or given twice with different values gets its request line broken, so that
/// hyper answers 400 and closes.
fn check_head(head: &mut [u8]) -> Scan {
    let mut length: Option<u64> = None;
    let (mut length_seen, mut length_bad) = (false, false);
    let mut te_value: Option<(usize, usize)> = None;
    let mut chunked = false;
    let mut offset = 0;
    for (index, line) in head.split(|&b| b == b'\n').enumerate() {
        let start = offset;
        offset += line.len() + 1;
        if index == 0 {
            continue;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = &line[..colon];
        let leading = line[colon + 1..]
            .iter()
            .take_while(|b| **b == b' ' || **b == b'\t')
            .count();
        let value_start = start + colon + 1 + leading;
        let value = trim_line(&line[colon + 1 + leading..]);
        if name.eq_ignore_ascii_case(b"content-length") {
            length_seen = true;
            match (content_length(value), length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(known)) if n == known => {}
                _ => length_bad = true,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            te_value = Some((value_start, value_start + value.len()));
            // As hyper reads it: the last coding decides.
            chunked = value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
    }
    if let (true, Some((from, to))) = (length_seen, te_value) {
        // "x" is not a coding anyone accepts; the parser answers 400 and closes.
        head[from..to].fill(b'x');
        return Scan::Off;
    }
    if length_bad {
        // A control byte is no method token: the parser answers 400 and closes.
        head[0] = 0x01;
        return Scan::Off;
    }
    match (te_value, length) {
        (Some(_), _) if chunked => Scan::ChunkSize,
        // Not chunked last: hyper answers 400 and closes.
        (Some(_), _) => Scan::Off,
        (None, Some(0)) | (None, None) => Scan::Head,
        (None, Some(n)) => Scan::Fixed(n),
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for FramingGuard<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            let deliverable = this.head_start.unwrap_or(this.ready.len());
            if deliverable > 0 {
                let n = deliverable.min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                if let Some(start) = this.head_start.as_mut() {
                    *start -= n;
                }
                return Poll::Ready(Ok(()));
            }
            // Body bytes and unguarded streams go straight into hyper's buffer.
            if this.head_start.is_none() {
                match this.scan {
                    Scan::Failed => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "malformed chunked request body",
                        )))
                    }
                    Scan::Off => return Pin::new(&mut this.io).poll_read(cx, buf),
                    Scan::Fixed(n) => {
                        let limit = usize::try_from(n).unwrap_or(usize::MAX).min(buf.remaining());
                        let mut limited = ReadBuf::new(buf.initialize_unfilled_to(limit));
                        ready!(Pin::new(&mut this.io).poll_read(cx, &mut limited))?;
                        let read = limited.filled().len();
                        buf.advance(read);
                        if read > 0 {
                            this.scan = if n == read as u64 {
                                Scan::Head
                            } else {
                                Scan::Fixed(n - read as u64)
                            };
                        }
                        return Poll::Ready(Ok(()));
                    }
                    _ => {}
                }
            }
            let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); 8192];
            let mut chunk = ReadBuf::uninit(&mut scratch);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut chunk))?;
            if chunk.filled().is_empty() {
                // EOF: release a partial head so the parser reports it as it sees fit.
                this.give_up();
                if this.ready.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.feed(chunk.filled());
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FramingGuard<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes and returns what hyper would read.
    fn run(input: &[u8], step: usize) -> (Vec<u8>, Scan) {
        let mut guard = FramingGuard::new((), 64 * 1024);
        for piece in input.chunks(step) {
            guard.feed(piece);
        }
        // What hyper would read: everything but a head still held back.
        let deliverable = guard.head_start.unwrap_or(guard.ready.len());
        let held = guard.ready.len() - deliverable;
        assert!(held == 0 || guard.scan == Scan::Head, "bytes held back outside a head");
        (guard.ready[..deliverable].to_vec(), guard.scan)
    }

    const PIPELINE: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloPOST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nworld\r\n0\r\nX-Trailer: 1\r\n\r\nGET /c HTTP/1.1\r\nHost: x\r\n\r\n";

    #[test]
    fn well_framed_pipelines_pass_unchanged_however_they_are_split() {
        for step in [1, 2, 3, 7, 64, PIPELINE.len()] {
            let (out, scan) = run(PIPELINE, step);
            assert_eq!(out, PIPELINE, "step {step}");
            assert_eq!(scan, Scan::Head, "step {step}");
        }
    }

    #[test]
    fn both_framings_make_the_transfer_encoding_unacceptable() {
        for input in [
            &b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
            &b"POST / HTTP/1.1\r\ntransfer-encoding:  chunked\r\ncontent-length: 4\r\n\r\n0\r\n\r\n"[..],
        ] {
            for step in [1, 5, input.len()] {
                let (out, scan) = run(input, step);
                let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
                assert!(
                    text.contains("transfer-encoding: xxxxxxx\r\n") || text.contains("transfer-encoding:  xxxxxxx\r\n"),
                    "{text}"
                );
                assert_eq!(out.len(), input.len());
                assert_eq!(scan, Scan::Off);
            }
        }
    }

    #[test]
    fn a_content_length_beside_any_transfer_encoding_is_refused_whatever_its_value() {
        let input = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: abc\r\n\r\n0\r\n\r\n";
        let (out, scan) = run(input, 4);
        assert!(String::from_utf8_lossy(&out).contains("Transfer-Encoding: xxxxxxx\r\n"));
        assert_eq!(scan, Scan::Off);
    }

    #[test]
    fn an_unreadable_content_length_breaks_the_request_line() {
        for bad in ["+5", "5 5", "0x5", "5, 5", "-1", "99999999999999999999999"] {
            let input = format!("POST / HTTP/1.1\r\nContent-Length: {bad}\r\n\r\nhello");
            let (out, scan) = run(input.as_bytes(), 3);
            assert_eq!(out[0], 0x01, "{bad}: the method must no longer parse");
            assert_eq!(scan, Scan::Off, "{bad}");
        }
        let twice = b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello";
        assert_eq!(run(twice, 5).0[0], 0x01);
        let same = b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(run(same, 5), (same.to_vec(), Scan::Head));
    }

    #[test]
    fn an_unreadable_chunk_line_fails_the_stream_instead_of_turning_the_guard_off() {
        for line in ["-5", "ffffffffffffffffff", "zz", "", " "] {
            let input = format!("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{line}\r\nhello\r\n0\r\n\r\nPOST /x HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
            let (out, scan) = run(input.as_bytes(), 1);
            assert_eq!(scan, Scan::Failed, "{line:?}");
            assert!(
                !String::from_utf8_lossy(&out).contains("POST /x"),
                "{line:?}: nothing after it is delivered"
            );
        }
        // Sixteen digits and leading zeros are sizes like any other (hyper reads them so too).
        let zeros = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n00000000000000000005\r\nhello\r\n0\r\n\r\n";
        assert_eq!(run(zeros, 2), (zeros.to_vec(), Scan::Head));
        assert_eq!(chunk_size(b"ffffffffffffffff"), Some(u64::MAX));
        assert_eq!(chunk_size(b"5 ;name=value"), Some(5));
    }

    #[test]
    fn an_upgrade_request_is_followed_until_the_tunnel_stops_the_guard() {
        // Tunnel bytes after the handshake look like a partial head and are held back...
        let upgrade = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x05hello";
        let mut guard = FramingGuard::new((), 64 * 1024);
        guard.feed(upgrade);
        let deliverable = guard.head_start.unwrap_or(guard.ready.len());
        assert_eq!(&guard.ready[..deliverable], &upgrade[..upgrade.len() - 7]);
        // ...until the upgrade is done: then everything passes.
        guard.stop();
        assert_eq!((&guard.ready[..], guard.scan), (&upgrade[..], Scan::Off));
        // A declined upgrade leaves the connection guarded.
        let declined = b"GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let (out, _) = run(declined, 5);
        assert!(String::from_utf8_lossy(&out).contains("Transfer-Encoding: xxxxxxx"));
    }

    #[test]
    fn oversized_heads_are_left_to_hyper() {
        let mut big = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 70 * 1024));
        let (out, scan) = run(&big, 4096);
        assert_eq!(out, big);
        assert_eq!(scan, Scan::Off);
    }
}
