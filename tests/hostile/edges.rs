//! What corral tells clients and workers at the edge (issue 11 item 10): error bodies,
//! `Proxy-*` headers, transfer codings it does not apply, WebSocket half-close, idle tunnels.

use std::io::Read;
use std::net::Shutdown;

use crate::support::http::Conn;
use crate::support::TestResult;
use crate::{
    capture, closes, first, never_received, open, read_replies, send, worker_connections_closed, End, AT_ONCE,
};

#[test]
fn error_bodies_never_show_a_worker_address() -> TestResult {
    // SPEC "HTTP": errors are short bodies that name the cause, never a worker's internal
    // address (log it, don't send it).
    let capture = capture(&["upstream_timeout = \"1s\""])?;
    let port = capture.corral.workers()?[0]["port"]
        .as_u64()
        .ok_or("no worker port in status")?;
    let address = format!("127.0.0.1:{port}");
    for (target, status) in [("/drop", 502), ("/slow?ms=5000", 504)] {
        let reply = send(
            &capture,
            format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes(),
            1,
        )?;
        let response = first(&capture, &reply)?;
        assert_eq!(response.status, status, "{target}: {}", response.text());
        assert!(!response.text().is_empty(), "{target}: the body names the cause");
        for (name, value) in &response.headers {
            assert!(!value.contains(&address), "{target}: header {name}: {value}");
        }
        assert!(
            !response.text().contains(&address) && !response.text().contains(&port.to_string()),
            "{target}: the client was shown the worker's address: {:?}",
            response.text()
        );
    }
    Ok(())
}

#[test]
fn proxy_headers_are_not_forwarded() -> TestResult {
    // Proxy-Authorization holds credentials for a proxy, Proxy-Connection is the old
    // Connection of proxies: neither is meant for the app (README: `Proxy-*` removed).
    let capture = capture(&[])?;
    let reply = send(
        &capture,
        b"GET /proxy-headers HTTP/1.1\r\nHost: h\r\nProxy-Authorization: Basic c2VjcmV0\r\n\
          Proxy-Connection: keep-alive\r\nProxy-Authenticate: Basic\r\nX-Kept: yes\r\n\r\n",
        1,
    )?;
    assert_eq!(reply.status(), Some(200), "{reply:?}");
    capture.barrier()?;
    let received = capture.received_for("/proxy-headers");
    assert_eq!(received.len(), 1);
    for name in ["proxy-authorization", "proxy-connection", "proxy-authenticate"] {
        assert!(
            !received[0].has(name),
            "{name} reached the worker:\n{}",
            capture.describe()
        );
    }
    assert_eq!(received[0].all("x-kept"), ["yes"]);
    Ok(())
}

#[test]
fn a_gzip_chunked_request_is_not_forwarded_as_plain_chunked() -> TestResult {
    // corral decodes no codings but chunked; passing the body on as plain chunked silently
    // drops `gzip`, and the app reads compressed bytes as the body. RFC 9112 §6.1: 501 for a
    // coding the server does not understand (400 accepted too); nothing reaches the worker.
    let capture = capture(&[])?;
    let mut conn = open(&capture, AT_ONCE)?;
    conn.send_raw(
        b"POST /gzip HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\n\x1f\x8b\x08\x00\x00\r\n0\r\n\r\n",
    )?;
    let reply = read_replies(&mut conn, 1);
    assert!(matches!(reply.status(), Some(400 | 501)), "{reply:?}");
    assert_eq!(closes(&mut conn), End::Closed);
    never_received(&capture, "/gzip")
}

/// Opens a WebSocket on the capture worker and reads its "hello" frame.
fn websocket(capture: &crate::support::capture::Capture) -> Result<Conn, Box<dyn std::error::Error>> {
    let mut conn = open(capture, AT_ONCE)?;
    conn.send_raw(
        b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )?;
    let (status, _) = conn.read_head()?;
    assert_eq!(status, 101);
    assert_eq!(conn.read_exact_bytes(7)?, b"\x81\x05hello");
    Ok(conn)
}

#[test]
fn a_websocket_client_half_close_reaches_the_worker_and_the_tunnel_ends() -> TestResult {
    // Issue 11 item 10: the half-close is passed on; the worker answers it (a last frame, then
    // its own half-close) and the tunnel ends.
    let capture = capture(&[])?;
    let mut conn = websocket(&capture)?;
    conn.try_clone_stream()?.shutdown(Shutdown::Write)?;
    let rest = conn
        .read_to_close()
        .map_err(|e| capture.explain(format!("the tunnel did not end: {e}")))?;
    assert_eq!(rest, b"\x81\x03bye", "the worker's answer to the half-close");
    let ended = capture.seen().into_iter().any(|s| s.ev == "ws-end");
    assert!(ended, "the worker never saw the half-close:\n{}", capture.describe());
    worker_connections_closed(&capture, "/ws", "the worker's tunnel connection to close")?;
    assert_eq!(capture.corral.total("in_flight"), Some(0));
    Ok(())
}

#[test]
fn tunnel_idle_timeout_ends_an_idle_websocket() -> TestResult {
    // Issue 11 item 10: `tunnel_idle_timeout` (default none) bounds a fully idle tunnel.
    let capture = capture(&["tunnel_idle_timeout = \"2s\""])?;
    let conn = websocket(&capture)?;
    let mut rest = Vec::new();
    let read = conn
        .try_clone_stream()?
        .read_to_end(&mut rest)
        .map_err(|e| capture.explain(format!("the idle tunnel stayed open: {e}")))?;
    assert_eq!(read, rest.len());
    worker_connections_closed(&capture, "/ws", "the worker's tunnel connection to close")?;
    Ok(())
}
