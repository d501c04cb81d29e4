//! One request in, one request out: `Connection` cannot touch framing (issue 11 item 1), the
//! CL+TE refusal cannot be switched off (item 8), pipelining and `Expect: 100-continue`.

use crate::support::TestResult;
use crate::{capture, closes, first, framed_by_corral, never_received, open, read_replies, send, End, AT_ONCE};

/// The exact reproducer of issue 11 item 1: `Connection: content-length` used to strip the
/// Content-Length while corral still sent the body unframed, so Node read the body as a second
/// request that skipped every header rewrite.
const SMUGGLED: &[u8] = b"GET /smuggled HTTP/1.1\r\nHost: internal.example\r\n\r\n";

fn front_request() -> Vec<u8> {
    assert_eq!(SMUGGLED.len(), 50, "the reproducer's body is exactly 50 bytes");
    let mut bytes =
        b"POST /front HTTP/1.1\r\nHost: h\r\nConnection: content-length\r\nContent-Length: 50\r\n\r\n".to_vec();
    bytes.extend_from_slice(SMUGGLED);
    bytes
}

#[test]
fn connection_content_length_cannot_unframe_the_body() -> TestResult {
    let capture = capture(&[])?;
    let reply = send(&capture, &front_request(), 1)?;
    let response = reply
        .responses
        .first()
        .ok_or_else(|| capture.explain(format!("no answer: {reply:?}")))?;
    assert_eq!(
        (response.status, response.header("x-request")),
        (200, Some("POST /front")),
        "{}",
        capture.describe()
    );
    never_received(&capture, "/smuggled")?;
    let received = capture.received();
    assert_eq!(received.len(), 1, "one request in, one out:\n{}", capture.describe());
    let front = &received[0];
    assert_eq!(front.target, "/front");
    assert_eq!(
        front.body,
        SMUGGLED,
        "the body arrives as a body:\n{}",
        capture.describe()
    );
    framed_by_corral(front)?;
    let node = capture.seen();
    let ends: Vec<_> = node.iter().filter(|s| s.ev == "end").collect();
    assert_eq!(ends.len(), 1, "Node parsed one request:\n{}", capture.describe());
    assert_eq!((ends[0].url.as_str(), ends[0].body.as_slice()), ("/front", SMUGGLED));
    Ok(())
}

#[test]
fn a_smuggled_request_never_answers_another_client() -> TestResult {
    // On a pooled worker connection the smuggled request's answer used to wait for the next
    // client: the victim got the attacker's response.
    let capture = capture(&[])?;
    let attacker = send(&capture, &front_request(), 1)?;
    assert!(attacker.status().is_some(), "{attacker:?}");
    for n in 0..3 {
        let target = format!("/victim/{n}");
        let reply = send(
            &capture,
            format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes(),
            1,
        )?;
        let response = first(&capture, &reply)?;
        assert_eq!(
            response.header("x-request"),
            Some(format!("GET {target}").as_str()),
            "the victim got another request's answer:\n{}",
            capture.describe()
        );
    }
    never_received(&capture, "/smuggled")
}

#[test]
fn no_connection_token_touches_framing_or_host() -> TestResult {
    // RFC 9110 §7.6.1 makes headers named in Connection hop-by-hop, but the framing corral
    // writes is its own and Host is what the app routes on: neither may be removed by a token.
    // Each body is a request of its own: misframed, the worker would parse it as one.
    let capture = capture(&[])?;
    let cases: &[(&str, bool)] = &[
        ("content-length", false),
        ("Content-Length", false),
        ("transfer-encoding", true),
        ("content-length, transfer-encoding, host", false),
        ("keep-alive, transfer-encoding, content-length, host", true),
        ("host", false),
        ("host", true),
    ];
    for (n, (tokens, chunked)) in cases.iter().enumerate() {
        let target = format!("/conn/{n}");
        let body = format!("GET /smuggled/{n} HTTP/1.1\r\nHost: x\r\n\r\n");
        let framed = if *chunked {
            let (a, b) = body.split_at(10);
            format!(
                "Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                a.len(),
                b.len()
            )
        } else {
            format!("Content-Length: {}\r\n\r\n{body}", body.len())
        };
        let bytes = format!("POST {target} HTTP/1.1\r\nHost: app.example\r\nConnection: {tokens}\r\n{framed}");
        let mut conn = open(&capture, AT_ONCE)?;
        conn.send_raw(bytes.as_bytes())?;
        let reply = read_replies(&mut conn, 1);
        assert_eq!(reply.status(), Some(200), "Connection: {tokens}: {reply:?}");
        never_received(&capture, "/smuggled/")?;
        let received = capture.received_for(&target);
        assert_eq!(received.len(), 1, "Connection: {tokens}:\n{}", capture.describe());
        let request = &received[0];
        assert_eq!(
            request.body,
            body.as_bytes(),
            "Connection: {tokens}:\n{}",
            capture.describe()
        );
        framed_by_corral(request).map_err(|e| format!("Connection: {tokens}: {e}"))?;
        assert_eq!(
            request.all("host"),
            ["app.example"],
            "Connection: {tokens} must not strip Host"
        );
    }
    Ok(())
}

/// A CL+TE request after `opening` on the same connection: refused, never forwarded.
fn cl_te_after(opening: &[u8], first_target: &str) -> TestResult {
    let capture = capture(&[])?;
    let mut conn = open(&capture, AT_ONCE)?;
    conn.send_raw(opening)?;
    let reply = read_replies(&mut conn, 1);
    let response = first(&capture, &reply)?;
    assert_eq!(response.status, 200, "{reply:?}");
    assert_eq!(
        response.header("x-request").map(|r| r.ends_with(first_target)),
        Some(true)
    );
    // Both framings: hyper would let Transfer-Encoding win and forward; a strict edge refuses
    // it (RFC 9112 §6.1: it "ought to be handled as an error").
    conn.send_raw(
        b"POST /clte HTTP/1.1\r\nHost: h\r\nContent-Length: 48\r\nTransfer-Encoding: chunked\r\n\r\n\
          0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: internal\r\n\r\n",
    )?;
    let reply = read_replies(&mut conn, 1);
    assert_eq!(reply.status(), Some(400), "{reply:?}\n{}", capture.describe());
    assert_eq!(closes(&mut conn), End::Closed);
    never_received(&capture, "/clte")?;
    never_received(&capture, "/smuggled")
}

#[test]
fn a_cl_te_request_is_refused() -> TestResult {
    cl_te_after(b"GET /first HTTP/1.1\r\nHost: h\r\n\r\n", "/first")
}

#[test]
fn the_cl_te_refusal_survives_an_upgrade_request_that_was_not_upgraded() -> TestResult {
    // The worker answers 200 (not 101): the connection goes on as HTTP/1.1 (RFC 9110 §7.8).
    cl_te_after(
        b"GET /not-ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n",
        "/not-ws",
    )
}

#[test]
fn the_cl_te_refusal_survives_a_16_digit_chunk_size() -> TestResult {
    // Leading zeros are valid (chunk-size = 1*HEXDIG); 16 digits turned the guard off.
    cl_te_after(
        b"POST /first HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0000000000000005\r\nhello\r\n0\r\n\r\n",
        "/first",
    )
}

#[test]
fn pipelined_requests_are_answered_in_order_and_each_reaches_the_worker_once() -> TestResult {
    let capture = capture(&[])?;
    let bytes = b"GET /p/1 HTTP/1.1\r\nHost: h\r\n\r\n\
        POST /p/2 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello\
        POST /p/3 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nwor\r\n2;x=y\r\nld\r\n0\r\nX-T: 1\r\n\r\n\
        DELETE /p/4 HTTP/1.1\r\nHost: h\r\n\r\n\
        POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nend";
    let reply = send(&capture, bytes, 5)?;
    let order: Vec<_> = reply
        .responses
        .iter()
        .map(|r| r.header("x-request").unwrap_or("?"))
        .collect();
    assert_eq!(
        order,
        ["GET /p/1", "POST /p/2", "POST /p/3", "DELETE /p/4", "POST /echo"],
        "{reply:?}"
    );
    capture.barrier()?;
    let received = capture.received();
    let targets: Vec<_> = received.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(
        targets,
        ["/p/1", "/p/2", "/p/3", "/p/4", "/echo"],
        "{}",
        capture.describe()
    );
    let bodies: Vec<_> = received.iter().map(|r| r.body.as_slice()).collect();
    assert_eq!(bodies, [&b""[..], b"hello", b"world", b"", b"end"]);
    for r in &received {
        framed_by_corral(r)?;
    }
    Ok(())
}

#[test]
fn expect_100_continue_gets_its_interim_answer_and_the_body_arrives_once() -> TestResult {
    // RFC 9110 §10.1.1: the client waits for 100 before sending the body; the edge must send it
    // (or a final answer), and the body must reach the worker exactly once.
    let capture = capture(&[])?;
    let mut conn = open(&capture, AT_ONCE)?;
    conn.send_raw(b"POST /continue HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")?;
    let (status, _) = conn
        .read_head()
        .map_err(|e| capture.explain(format!("no 100 Continue: {e}")))?;
    assert_eq!(status, 100);
    conn.send_raw(b"hello")?;
    let response = conn.read_response()?;
    assert_eq!(
        (response.status, response.header("x-request")),
        (200, Some("POST /continue"))
    );
    capture.barrier()?;
    let received = capture.received_for("/continue");
    assert_eq!(received.len(), 1, "{}", capture.describe());
    assert_eq!(received[0].body, b"hello");
    framed_by_corral(&received[0])?;
    Ok(())
}
