//! Request bodies from clients that stall, go away, send too much or take their time (issue 11
//! items 2, 4 and 10).

use std::io::Write;
use std::time::{Duration, Instant};

use crate::support::http::Conn;
use crate::support::{poll_until, TestResult, DEADLINE};
use crate::{capture, first, never_received, open, read_replies, wait_until, worker_connections_closed, End, AT_ONCE};

#[test]
fn a_client_that_aborts_its_upload_releases_the_worker_connection_at_once() -> TestResult {
    // Issue 11 item 2: each of these held a client socket and a worker socket until
    // upstream_timeout (60 s here); 700 of them pinned a 1,024-fd instance. A body larger than
    // client_body_buffer_size is streamed, so the worker has the head when the client leaves.
    let capture = capture(&[])?;
    let mut conn = open(&capture, AT_ONCE)?;
    conn.send_raw(b"POST /abort HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000\r\n\r\nxx")?;
    capture.wait_for(AT_ONCE, "the worker to get the head", |conns| {
        conns.iter().any(|c| c.carried("/abort")).then_some(())
    })?;
    drop(conn);
    worker_connections_closed(
        &capture,
        "/abort",
        "the worker connection to close after the client left",
    )?;
    poll_until(AT_ONCE, "no request in flight", || {
        (capture.corral.total("in_flight")? == 0).then_some(())
    })
    .map_err(|e| capture.explain(e))?;
    let aborted = capture
        .seen()
        .into_iter()
        .any(|s| s.ev == "aborted" && s.url == "/abort");
    assert!(
        aborted,
        "Node saw the request end without its body:\n{}",
        capture.describe()
    );
    Ok(())
}

#[test]
fn an_abandoned_small_upload_never_reaches_a_worker() -> TestResult {
    // The exact reproducer: a body within client_body_buffer_size (16 KiB) is read whole
    // before a worker is chosen, so the worker never sees the request, and corral lets go of
    // the client at once.
    let capture = capture(&[])?;
    let pid = capture.corral.pid();
    let before = open_fds(pid);
    for _ in 0..20 {
        let mut conn = open(&capture, AT_ONCE)?;
        conn.send_raw(b"POST /abort HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\nxx")?;
    }
    poll_until(AT_ONCE, "corral to let go of the abandoned uploads", || {
        (open_fds(pid) <= before).then_some(())
    })
    .map_err(|e| capture.explain(e))?;
    never_received(&capture, "/abort")
}

/// How many descriptors `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn running_out_of_descriptors_never_marks_a_worker_down() -> TestResult {
    // Issue 11 item 2: EMFILE on connecting to a worker was read as "worker refused" and took
    // it out of rotation. corral's fd limit is lowered (prlimit) to what it holds plus 12, and
    // idle clients take descriptors until corral can accept no more (its log says so); the
    // last client waits in the backlog with a request written. One idle client leaves: corral
    // accepts the waiting one with the freed descriptor, and connecting to the worker for its
    // request finds none. Once the clients leave, corral must answer again, with the worker
    // never reported as refusing.
    let capture = capture(&["header_read_timeout = \"60s\""])?;
    let pid = capture.corral.pid();
    let limit = open_fds(pid) + 12;
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()?;
    assert!(status.success(), "prlimit failed: {status}");
    let mut idle = Vec::new();
    let mut waiting = loop {
        let before = open_fds(pid);
        let mut conn = open(&capture, Duration::from_secs(5))?;
        let accepted = poll_until(DEADLINE, "corral to accept a client or run out of descriptors", || {
            if open_fds(pid) > before {
                Some(true)
            } else {
                capture.corral.logs().contains("accept failed").then_some(false)
            }
        })
        .map_err(|e| capture.explain(e))?;
        if !accepted {
            conn.send_raw(b"GET /under-pressure HTTP/1.1\r\nHost: h\r\n\r\n")?;
            break conn;
        }
        idle.push(conn);
        if idle.len() > 64 {
            return Err(capture.explain("corral never ran out of descriptors"));
        }
    };
    drop(idle.pop());
    // Whatever corral answers now (an error, or nothing until descriptors free up) is its
    // choice; what matters is what it concludes about the worker.
    let under_pressure = read_replies(&mut waiting, 1);
    drop(idle);
    let after = read_replies(&mut waiting, 1);
    eprintln!("under pressure: {under_pressure:?}; after: {after:?}");
    let response = poll_until(DEADLINE, "a 200 once the pressure is gone", || {
        let r = crate::support::http::get(capture.addr(), "/fixed").ok()?;
        (r.status == 200).then_some(r)
    })
    .map_err(|e| capture.explain(e))?;
    assert_eq!(response.header("x-request"), Some("GET /fixed"));
    let logs = capture.corral.logs();
    assert!(
        !logs.contains("refused a connection"),
        "EMFILE was taken for a worker failure:\n{logs}"
    );
    let workers = capture.corral.workers()?;
    assert!(workers.iter().all(|w| w["state"] == "online"), "{workers:?}");
    Ok(())
}

/// Sends `pieces` paced `every` apart after `head`, and returns how long the upload took.
fn paced_upload(conn: &mut Conn, head: &[u8], pieces: &[&[u8]], every: Duration) -> std::io::Result<Duration> {
    let start = Instant::now();
    conn.send_raw(head)?;
    for (n, piece) in pieces.iter().enumerate() {
        wait_until(start + every * (n as u32 + 1));
        conn.send_raw(piece)?;
    }
    Ok(start.elapsed())
}

#[test]
fn an_upload_longer_than_upstream_timeout_succeeds() -> TestResult {
    // Issue 11 item 4: upstream_timeout runs from the end of the request to the start of the
    // response. Here it is 1 s, and the body takes more than 3 s to arrive (10 pieces, 350 ms
    // apart): the worker answers at once after the last byte, so the request must succeed.
    let capture = capture(&["upstream_timeout = \"1s\""])?;
    let mut conn = open(&capture, AT_ONCE)?;
    let pieces: Vec<Vec<u8>> = (0..10).map(|n| format!("piece-{n:02}|").into_bytes()).collect();
    let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
    let total: usize = pieces.iter().map(Vec::len).sum();
    let head = format!("POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: {total}\r\n\r\n");
    let took = paced_upload(&mut conn, head.as_bytes(), &refs, Duration::from_millis(350)).map_err(|e| {
        let reply = read_replies(&mut conn, 1);
        capture.explain(format!("the upload was cut off ({e}); corral answered {reply:?}"))
    })?;
    // The honesty check: the upload really outlasted upstream_timeout.
    assert!(took > Duration::from_secs(3), "the upload took only {took:?}");
    let reply = read_replies(&mut conn, 1);
    let response = first(&capture, &reply)?;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        response.json()["body"],
        pieces.concat().iter().map(|&b| b as char).collect::<String>()
    );
    let received = capture.received_for("/echo");
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].body, pieces.concat());
    Ok(())
}

#[test]
fn a_body_that_stalls_past_client_body_timeout_is_ended() -> TestResult {
    // Issue 11 item 4: client_body_timeout bounds the wait between two reads of a body (nginx:
    // 408 and a closed connection). The worker's connection must be released too.
    let capture = capture(&["client_body_timeout = \"1s\""])?;
    let mut conn = open(&capture, AT_ONCE)?;
    conn.send_raw(b"POST /stall HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nxx")?;
    let reply = read_replies(&mut conn, 1);
    match (reply.status(), &reply.end) {
        (Some(408), _) | (None, End::Closed) | (None, End::Broken(_)) => {}
        other => return Err(capture.explain(format!("expected 408 or a close at once, got {other:?}"))),
    }
    worker_connections_closed(&capture, "/stall", "the worker connection of the stalled body to close")?;
    Ok(())
}

#[test]
fn pauses_shorter_than_client_body_timeout_are_fine() -> TestResult {
    // The other side of client_body_timeout: it bounds each pause, not the whole upload.
    let capture = capture(&["client_body_timeout = \"3s\"", "upstream_timeout = \"1s\""])?;
    let mut conn = open(&capture, AT_ONCE)?;
    let pieces: [&[u8]; 4] = [b"one|", b"two|", b"three|", b"four"];
    let head = b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 18\r\n\r\n";
    let took = paced_upload(&mut conn, head, &pieces, Duration::from_millis(1000)).map_err(|e| {
        let reply = read_replies(&mut conn, 1);
        capture.explain(format!("the upload was cut off ({e}); corral answered {reply:?}"))
    })?;
    assert!(took > Duration::from_secs(3), "the upload took only {took:?}");
    let reply = read_replies(&mut conn, 1);
    assert_eq!(reply.status(), Some(200), "{reply:?}");
    assert_eq!(capture.received_for("/echo")[0].body, b"one|two|three|four");
    Ok(())
}

#[test]
fn an_early_413_reaches_the_client_and_the_rest_of_the_upload_is_drained() -> TestResult {
    // Issue 11 item 10: the worker answers 413 at once without reading a large upload. The
    // client learns of it while still sending (as most do) and goes on: corral must read and
    // drop the rest of the upload (the drain the README promises, up to 10 s) instead of
    // closing the connection under it, which resets the client's writes. The writes after the
    // answer are what shows the difference: a closed socket answers the first one with a reset.
    let capture = capture(&[])?;
    let mut conn = open(&capture, AT_ONCE)?;
    let piece = vec![b'x'; 1 << 20];
    let pieces = 8;
    let head = format!(
        "POST /reject-upload HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        (pieces + 1) * piece.len()
    );
    conn.send_raw(head.as_bytes())?;
    conn.send_raw(&piece)?;
    let response = conn
        .read_response()
        .map_err(|e| capture.explain(format!("no 413: {e}")))?;
    assert_eq!((response.status, response.text().as_str()), (413, "too large"));
    let mut writer = conn.try_clone_stream()?;
    for n in 0..pieces {
        writer
            .write_all(&piece)
            .map_err(|e| capture.explain(format!("MiB {} of the upload, after the 413, was refused: {e}", n + 2)))?;
    }
    Ok(())
}

#[test]
fn max_body_size_refuses_a_declared_large_body_before_forwarding() -> TestResult {
    // Issue 11 item 10 (nginx's client_max_body_size): a Content-Length over the limit is
    // known from the head: 413 before anything reaches a worker.
    let capture = capture(&["max_body_size = \"1K\""])?;
    let mut conn = open(&capture, AT_ONCE)?;
    let body = vec![b'b'; 4096];
    conn.send_raw(b"POST /big HTTP/1.1\r\nHost: h\r\nContent-Length: 4096\r\n\r\n")?;
    let _taken_or_not = conn.send_raw(&body);
    let reply = read_replies(&mut conn, 1);
    assert_eq!(reply.status(), Some(413), "{reply:?}");
    never_received(&capture, "/big")?;
    // At the limit is fine.
    let mut conn = open(&capture, AT_ONCE)?;
    conn.send_raw(b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 1024\r\n\r\n")?;
    conn.send_raw(&body[..1024])?;
    assert_eq!(read_replies(&mut conn, 1).status(), Some(200));
    Ok(())
}

#[test]
fn max_body_size_cuts_a_chunked_body_that_grows_past_it() -> TestResult {
    // A chunked body's size is known only as it arrives: 413 once it passes the limit; the
    // worker never gets a complete request, and no more than the limit of its body.
    let capture = capture(&["max_body_size = \"1K\""])?;
    let mut conn = open(&capture, AT_ONCE)?;
    conn.send_raw(b"POST /big-chunked HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")?;
    for _ in 0..8 {
        if conn
            .send_raw(format!("200\r\n{}\r\n", "c".repeat(512)).as_bytes())
            .is_err()
        {
            break;
        }
    }
    let _taken_or_not = conn.send_raw(b"0\r\n\r\n");
    let reply = read_replies(&mut conn, 1);
    match (reply.status(), &reply.end) {
        (Some(413), _) | (None, End::Closed) | (None, End::Broken(_)) => {}
        other => return Err(capture.explain(format!("expected 413, got {other:?}"))),
    }
    capture.barrier()?;
    let received = capture.received_for("/big-chunked");
    assert!(
        received.iter().all(|r| !r.complete && r.body.len() <= 1024),
        "{}",
        capture.describe()
    );
    let ended = capture
        .seen()
        .into_iter()
        .any(|s| s.ev == "end" && s.url == "/big-chunked");
    assert!(!ended, "the worker got the whole body:\n{}", capture.describe());
    worker_connections_closed(&capture, "/big-chunked", "the worker connection to close")?;
    Ok(())
}
