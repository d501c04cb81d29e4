//! `Host` ambiguity (issue 11 item 7) and what trusted proxies may tell (item 9).

use crate::support::capture::{Capture, Received};
use crate::support::TestResult;
use crate::{capture, closes, never_received, send, End};

/// Sends `bytes` and returns the one request the worker received for `target`.
fn forwarded(capture: &Capture, bytes: &[u8], target: &str) -> Result<Received, Box<dyn std::error::Error>> {
    let reply = send(capture, bytes, 1)?;
    if reply.status() != Some(200) {
        return Err(capture.explain(format!("expected the worker's 200: {reply:?}")));
    }
    capture.barrier()?;
    let mut received = capture.received_for(target);
    if received.len() != 1 {
        return Err(capture.explain(format!("{} requests for {target}", received.len())));
    }
    Ok(received.remove(0))
}

/// Sends `bytes`: 400 from corral, connection closed, nothing at the worker.
fn refused(capture: &Capture, bytes: &[u8], target: &str) -> TestResult {
    let mut conn = crate::open(capture, crate::AT_ONCE)?;
    conn.send_raw(bytes)?;
    let reply = crate::read_replies(&mut conn, 1);
    assert_eq!(
        reply.status(),
        Some(400),
        "{:?}: {reply:?}",
        String::from_utf8_lossy(bytes)
    );
    assert_eq!(closes(&mut conn), End::Closed);
    never_received(capture, target)
}

#[test]
fn two_host_headers_are_refused() -> TestResult {
    // RFC 9112 §3.2: a server MUST answer 400 to a request with more than one Host line. Node
    // routed on the first, X-Forwarded-Host said the last.
    let capture = capture(&[])?;
    refused(
        &capture,
        b"GET /two-hosts HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        "/two-hosts",
    )?;
    refused(
        &capture,
        b"GET /same-twice HTTP/1.1\r\nHost: a.example\r\nhost: a.example\r\n\r\n",
        "/same-twice",
    )?;
    refused(
        &capture,
        b"GET /host-list HTTP/1.1\r\nHost: a.example, b.example\r\n\r\n",
        "/host-list",
    )
}

#[test]
fn http11_without_host_is_refused() -> TestResult {
    // RFC 9112 §3.2: an HTTP/1.1 request that lacks Host gets 400.
    let capture = capture(&[])?;
    refused(&capture, b"GET /no-host HTTP/1.1\r\nAccept: */*\r\n\r\n", "/no-host")
}

#[test]
fn an_invalid_host_value_is_refused() -> TestResult {
    // RFC 9112 §3.2: "or a Host header field with an invalid field value" (Host = uri-host
    // [ ":" port ]): what an app would build URLs or route from must be a host.
    let capture = capture(&[])?;
    for (n, host) in ["a b.example", "a.example/evil", "a@b.example", "a.example:port"]
        .iter()
        .enumerate()
    {
        let target = format!("/bad-host/{n}");
        refused(
            &capture,
            format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(),
            &target,
        )?;
    }
    Ok(())
}

#[test]
fn http10_without_host_reaches_the_worker_as_a_valid_http11_request() -> TestResult {
    // corral talks HTTP/1.1 to workers; a 1.1 head without Host is one Node refuses (400). An
    // HTTP/1.0 request may lack Host, so corral must supply one.
    let capture = capture(&[])?;
    let request = forwarded(&capture, b"GET /old HTTP/1.0\r\nAccept: */*\r\n\r\n", "/old")?;
    assert_eq!(request.version, 1, "{}", capture.describe());
    let hosts = request.all("host");
    assert!(
        hosts.len() == 1 && !hosts[0].is_empty(),
        "the worker got Host {hosts:?}"
    );
    let node = capture.seen_heads();
    assert_eq!(node.len(), 1, "{}", capture.describe());
    assert_eq!(node[0].version, "1.1");
    Ok(())
}

#[test]
fn an_absolute_form_target_gives_the_worker_its_authority_as_host() -> TestResult {
    // RFC 9112 §3.2.2: with an absolute-form target, the Host field is ignored and the target's
    // authority is the host; the worker gets origin form and that authority.
    let capture = capture(&[])?;
    let request = forwarded(
        &capture,
        b"GET http://a.example/x?q=1 HTTP/1.1\r\nHost: b.example\r\n\r\n",
        "/x?q=1",
    )?;
    assert_eq!(request.all("host"), ["a.example"], "{}", capture.describe());
    let xfh = request.all("x-forwarded-host");
    assert!(xfh.iter().all(|h| h == "a.example"), "X-Forwarded-Host {xfh:?}");
    let request = forwarded(
        &capture,
        b"GET http://a.example:8080/y HTTP/1.1\r\nHost: b.example\r\n\r\n",
        "/y",
    )?;
    assert_eq!(request.all("host"), ["a.example:8080"], "{}", capture.describe());
    Ok(())
}

#[test]
fn forwarded_proto_and_host_from_a_trusted_proxy_are_kept() -> TestResult {
    // Issue 11 item 9: behind a TLS terminator on 127.0.0.1 the app must see https and the
    // public host, or it redirects in a loop.
    let capture = capture(&["trusted_proxies = [\"127.0.0.1/32\"]"])?;
    let request = forwarded(
        &capture,
        b"GET /behind-tls HTTP/1.1\r\nHost: internal:8080\r\nX-Forwarded-Proto: https\r\n\
          X-Forwarded-Host: public.example\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n",
        "/behind-tls",
    )?;
    assert_eq!(request.all("x-forwarded-proto"), ["https"], "{}", capture.describe());
    assert_eq!(request.all("x-forwarded-host"), ["public.example"]);
    assert_eq!(request.all("x-forwarded-for"), ["203.0.113.9, 127.0.0.1"]);
    // Without the headers, corral sets them.
    let request = forwarded(
        &capture,
        b"GET /plain HTTP/1.1\r\nHost: internal:8080\r\n\r\n",
        "/plain",
    )?;
    assert_eq!(request.all("x-forwarded-proto"), ["http"]);
    assert_eq!(request.all("x-forwarded-host"), ["internal:8080"]);
    Ok(())
}

#[test]
fn forwarded_proto_and_host_from_anyone_else_are_replaced() -> TestResult {
    let capture = capture(&["trusted_proxies = [\"10.0.0.0/8\"]"])?;
    let request = forwarded(
        &capture,
        b"GET /spoofed HTTP/1.1\r\nHost: site.example\r\nX-Forwarded-Proto: https\r\n\
          X-Forwarded-Host: evil.example\r\n\r\n",
        "/spoofed",
    )?;
    assert_eq!(request.all("x-forwarded-proto"), ["http"], "{}", capture.describe());
    assert_eq!(request.all("x-forwarded-host"), ["site.example"]);
    Ok(())
}
