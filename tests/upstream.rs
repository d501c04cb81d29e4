//! The worker side of the proxy, through the real binary: every way a worker frames a response,
//! interim responses, answers that come before the upload ends, and responses corral refuses.

mod support;

use std::io::Write;

use support::http::Conn;
use support::{Corral, Options, TestResult};

#[test]
fn bodiless_answers_keep_the_client_connection_in_step() -> TestResult {
    let corral = Corral::start(Options::default().instances(1))?;
    let mut conn = Conn::open(corral.addr)?;

    // HEAD: the worker's Content-Length arrives, its body does not.
    conn.send("HEAD", "/bytes?n=1000", &[], &[])?;
    let (status, headers) = conn.read_head()?;
    assert_eq!(status, 200);
    assert!(headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("content-length") && v == "1000"));

    for code in [204, 304] {
        let response = conn.get(&format!("/status?code={code}"))?;
        assert_eq!(response.status, code);
        assert!(response.body.is_empty());
    }
    // Had any of those left bytes behind, this answer would be out of step.
    let response = conn.get("/bytes?n=3")?;
    assert_eq!((response.status, response.body.len()), (200, 3));
    Ok(())
}

#[test]
fn a_body_delimited_by_the_close_arrives_whole() -> TestResult {
    let corral = Corral::start(Options::default().instances(1))?;
    let mut conn = Conn::open(corral.addr)?;
    let response = conn.get("/raw?kind=close")?;
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), "body until the close");
    // The client's connection is kept (corral re-frames the body); the next request is served.
    assert_eq!(conn.get("/whoami")?.status, 200);
    Ok(())
}

#[test]
fn a_chunked_body_with_extensions_and_trailers_is_decoded() -> TestResult {
    let corral = Corral::start(Options::default().instances(1))?;
    let mut conn = Conn::open(corral.addr)?;
    let response = conn.get("/raw?kind=chunked")?;
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), "hello world");
    assert_eq!(conn.get("/whoami")?.status, 200);
    Ok(())
}

#[test]
fn interim_responses_are_skipped_and_a_custom_reason_phrase_is_kept() -> TestResult {
    let corral = Corral::start(Options::default().instances(1))?;
    let mut conn = Conn::open(corral.addr)?;
    let response = conn.get("/raw?kind=interim")?;
    assert_eq!((response.status, response.text().as_str()), (200, "final"));

    let response = conn.get("/raw?kind=reason")?;
    assert_eq!((response.status, response.text().as_str()), (200, "ok"));
    assert_eq!(conn.status_line, "HTTP/1.1 200 Fine Thanks");
    Ok(())
}

#[test]
fn a_malformed_response_is_a_502_and_the_next_request_is_served() -> TestResult {
    let corral = Corral::start(Options::default().instances(1))?;
    for kind in ["bad-length", "garbage"] {
        let mut conn = Conn::open(corral.addr)?;
        let response = conn.get(&format!("/raw?kind={kind}"))?;
        assert_eq!(response.status, 502, "{kind}: {}", response.text());
        assert_eq!(Conn::open(corral.addr)?.get("/whoami")?.status, 200, "after {kind}");
    }
    Ok(())
}

#[test]
fn an_answer_before_the_upload_ends_reaches_the_client() -> TestResult {
    let corral = Corral::start(Options::default().instances(1))?;
    let mut conn = Conn::open(corral.addr)?;
    // 8 MiB is more than the socket buffers between client, corral and worker hold, and the
    // worker never reads it: the upload can only stall. The client writes from a thread, as a
    // browser does, and reads the answer meanwhile.
    let size = 8 << 20;
    let mut writer = conn.try_clone_stream()?;
    let upload = std::thread::spawn(move || {
        let head = format!("POST /reject-upload HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n\r\n");
        writer
            .write_all(head.as_bytes())
            .and_then(|()| writer.write_all(&vec![b'x'; size]))
    });
    let response = conn.read_response()?;
    assert_eq!((response.status, response.text().as_str()), (413, "too large"));
    // corral read the rest of the upload instead of resetting the connection under the
    // client: the whole body was accepted, and the connection serves the next request.
    upload.join().map_err(|_| "upload thread panicked")??;
    assert_eq!(conn.get("/whoami")?.status, 200);
    Ok(())
}
