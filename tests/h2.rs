//! HTTP/2 on the front, held to account: hand-made frames for what no ordinary client sends
//! (split cookies, a zero flow-control window, reset floods padded with cheap requests, endless
//! CONTINUATION frames), and what each costs corral, seen from the workers' side.

mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};

use support::http::Conn;
use support::tls::{h2, Ca, Tls};
use support::{poll_until, Corral, Options, TestResult, DEADLINE};

/// corral over TLS, its files and CA, an HTTP/2 connection to it, and the `:authority` to use.
type H2Setup = (Corral, tempfile::TempDir, Ca, Tls, String);

/// corral over TLS with `keys`, and an HTTP/2 connection to it, preface sent.
fn h2_connection(keys: &[&str]) -> Result<H2Setup, Box<dyn std::error::Error>> {
    let mut options = Options::default().instances(1);
    for key in keys {
        options = options.key(key);
    }
    let (corral, dir, ca, _) = support::tls::https(options)?;
    let authority = format!("localhost:{}", corral.addr.port());
    let conn = open(&ca, &corral)?;
    Ok((corral, dir, ca, conn, authority))
}

/// A new HTTP/2 connection to `corral`, preface sent.
fn open(ca: &Ca, corral: &Corral) -> Result<Tls, Box<dyn std::error::Error>> {
    let mut conn = ca.connect(corral.addr, "localhost", &[b"h2"])?;
    conn.write_all(&h2::preface())?;
    Ok(conn)
}

/// Reads frames until GOAWAY or the end of the connection; true if either came.
fn closed_by_server(conn: &mut Tls) -> bool {
    loop {
        match h2::read_frame(conn) {
            None => return true,
            Some((h2::GOAWAY, ..)) => return true,
            Some(_) => {}
        }
    }
}

/// A GET of `/whoami` on a new HTTP/2 connection answers.
fn assert_serves(ca: &Ca, corral: &Corral) -> TestResult {
    let mut conn = open(ca, corral)?;
    let authority = format!("localhost:{}", corral.addr.port());
    conn.write_all(&h2::get(1, &authority, "/whoami", &[]))?;
    let body = h2::body_of(&mut conn, 1).ok_or("no answer")?;
    assert!(String::from_utf8_lossy(&body).contains("pid"), "{}", corral.logs());
    Ok(())
}

/// The only worker's address.
fn worker(corral: &Corral) -> Result<SocketAddr, Box<dyn std::error::Error>> {
    let port = corral.workers()?[0]["port"].as_u64().ok_or("worker port")?;
    Ok(SocketAddr::from(([127, 0, 0, 1], u16::try_from(port)?)))
}

/// The worker's `/connections`: (open now, most at once), asked on a connection of our own.
fn worker_connections(worker: SocketAddr, reset: bool) -> Result<(u64, u64), Box<dyn std::error::Error>> {
    let path = if reset { "/connections?reset=1" } else { "/connections" };
    let seen = support::http::get(worker, path)?.json();
    Ok((
        seen["open"].as_u64().ok_or("open")?,
        seen["most"].as_u64().ok_or("most")?,
    ))
}

#[test]
fn http2_requests_are_checked_and_split_cookies_arrive_as_one() -> TestResult {
    let (_corral, _dir, _ca, mut conn, authority) = h2_connection(&[])?;
    conn.write_all(&h2::get(
        1,
        &authority,
        "/headers",
        &[("cookie", "a=1"), ("cookie", "b=2")],
    ))?;
    let body = h2::body_of(&mut conn, 1).ok_or("no response to stream 1")?;
    let seen: serde_json::Value = serde_json::from_slice(&body)?;
    assert_eq!(seen["cookie"], "a=1; b=2", "{seen}");
    assert_eq!(seen["host"], authority);

    conn.write_all(&h2::get(3, &authority, "/headers", &[("host", "elsewhere.test")]))?;
    let body = h2::body_of(&mut conn, 3).ok_or("no response to stream 3")?;
    assert!(
        String::from_utf8_lossy(&body).contains("Host differs from :authority"),
        "{body:?}"
    );
    // A `:path` that is no origin-form target, and `*` outside OPTIONS, never reach a worker.
    for (stream, path) in [(5, "?x=1"), (7, "*")] {
        conn.write_all(&h2::get(stream, &authority, path, &[]))?;
        let body = h2::body_of(&mut conn, stream).ok_or("no response")?;
        assert!(
            String::from_utf8_lossy(&body).contains("invalid request target"),
            "{path}: {body:?}"
        );
    }
    // More fields than max_headers (100) get 431, as on HTTP/1.1.
    let names: Vec<String> = (0..101).map(|i| format!("x-field-{i}")).collect();
    let fields: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    conn.write_all(&h2::get(9, &authority, "/headers", &fields))?;
    let body = h2::body_of(&mut conn, 9).ok_or("no response to stream 9")?;
    assert!(
        String::from_utf8_lossy(&body).contains("too many header fields"),
        "{body:?}"
    );
    Ok(())
}

#[test]
fn a_client_that_never_reads_holds_a_bounded_share_of_worker_connections_until_send_timeout() -> TestResult {
    // The client opens 100 streams with a flow-control window of zero: corral may send their
    // response heads, never a byte of their bodies.
    let (corral, _dir, ca, mut conn, authority) = h2_connection(&["send_timeout = \"3s\""])?;
    let worker = worker(&corral)?;
    worker_connections(worker, true)?;
    conn.write_all(&h2::settings(&[(0x4, 0)]))?;
    let mut requests = Vec::new();
    for i in 0..100u32 {
        requests.extend(h2::get(2 * i + 1, &authority, "/bytes?n=200000", &[]));
    }
    conn.write_all(&requests)?;
    poll_until(DEADLINE, "32 requests at the worker", || {
        (corral.total("in_flight")? == 32).then_some(())
    })?;
    // The other 68 are refused (32 streams at most), never given connections of their own.
    conn.sock.set_read_timeout(Some(DEADLINE))?;
    assert!(closed_by_server(&mut conn), "the connection outlived send_timeout");
    poll_until(DEADLINE, "the worker connections to close", || {
        (corral.total("in_flight")? == 0 && worker_connections(worker, false).ok()?.0 <= 1).then_some(())
    })?;
    let (_, most) = worker_connections(worker, false)?;
    // 32 from corral, plus this test's own /connections requests.
    assert!((32..=34).contains(&most), "the worker saw {most} connections at once");
    assert!(corral.logs().contains("within send_timeout"), "{}", corral.logs());
    assert_serves(&ca, &corral)
}

#[test]
fn streams_over_the_shards_budget_of_worker_connections_wait_for_one_and_all_succeed() -> TestResult {
    // max_connections = 2: each shard may open at most 2 (one on a 2-CPU machine) worker
    // connections, however many streams an HTTP/2 connection carries.
    let (corral, _dir, _ca, mut conn, authority) = h2_connection(&["max_connections = 2"])?;
    let worker = worker(&corral)?;
    worker_connections(worker, true)?;
    let streams: Vec<u32> = (0..6).map(|i| 2 * i + 1).collect();
    let mut requests = Vec::new();
    for &stream in &streams {
        requests.extend(h2::get(stream, &authority, "/slow?ms=300", &[]));
    }
    conn.write_all(&requests)?;
    let bodies = h2::bodies(&mut conn, &streams).ok_or("the connection ended")?;
    for stream in &streams {
        let body = bodies.get(stream).map(|b| String::from_utf8_lossy(b).into_owned());
        assert_eq!(body.as_deref(), Some("slow done"), "stream {stream}: {}", corral.logs());
    }
    let (_, most) = worker_connections(worker, false)?;
    // At most 2 from corral, plus this test's own /connections request.
    assert!(most <= 3, "the worker saw {most} connections at once");
    Ok(())
}

#[test]
fn an_idle_http2_connection_is_closed_and_one_with_a_quiet_stream_is_not() -> TestResult {
    let (corral, _dir, ca, mut streaming, authority) = h2_connection(&["header_read_timeout = \"2s\""])?;
    let worker = worker(&corral)?;
    streaming.write_all(&h2::get(1, &authority, "/sse", &[]))?;
    read_data_containing(&mut streaming, "\"n\":0")?;

    let mut idle = open(&ca, &corral)?;
    idle.write_all(&h2::get(1, &authority, "/whoami", &[]))?;
    h2::body_of(&mut idle, 1).ok_or("no answer")?;
    idle.sock.set_read_timeout(Some(DEADLINE))?;
    assert!(h2::goaway(&mut idle), "no GOAWAY on the idle connection");

    // The event stream was quiet all along, longer than the idle connection lived: its
    // connection has an open stream, so it stays.
    support::http::get(worker, "/sse-next")?;
    read_data_containing(&mut streaming, "\"n\":1")?;
    Ok(())
}

/// Reads frames until a DATA frame containing `text`; fails on GOAWAY or the end.
fn read_data_containing(conn: &mut Tls, text: &str) -> TestResult {
    loop {
        let (kind, _, _, payload) = h2::read_frame(conn).ok_or("the connection ended")?;
        if kind == h2::GOAWAY {
            return Err("GOAWAY".into());
        }
        if kind == h2::DATA && String::from_utf8_lossy(&payload).contains(text) {
            return Ok(());
        }
    }
}

#[test]
fn an_http1_client_that_stops_reading_is_dropped_and_a_quiet_event_stream_is_not() -> TestResult {
    let corral = Corral::start(Options::default().instances(1).key("send_timeout = \"2s\""))?;
    let worker = worker(&corral)?;
    let mut events = Conn::open(corral.addr)?;
    events.send("GET", "/sse", &[], &[])?;
    assert_eq!(events.read_head()?.0, 200);
    let first = events.read_chunk()?.ok_or("no first event")?;
    assert!(String::from_utf8_lossy(&first).contains("\"n\":0"));

    // 500 MB the client never reads: corral's buffers and the sockets' fill, then nothing moves.
    let mut stalled = TcpStream::connect(corral.addr)?;
    stalled.write_all(b"GET /bytes?n=500000000 HTTP/1.1\r\nHost: x\r\n\r\n")?;
    poll_until(DEADLINE, "corral to drop the client", || {
        corral.logs().contains("within send_timeout").then_some(())
    })?;
    poll_until(DEADLINE, "the download to leave the worker", || {
        (corral.total("in_flight")? == 1).then_some(())
    })?;
    stalled.set_read_timeout(Some(DEADLINE))?;
    let received = support::tls::read_to_end(&mut stalled).len();
    assert!(received < 500_000_000, "all of it arrived");

    // The event stream had no byte to send for longer than send_timeout: it is still open.
    support::http::get(worker, "/sse-next")?;
    let next = events.read_chunk()?.ok_or("the stream ended")?;
    assert!(String::from_utf8_lossy(&next).contains("\"n\":1"));
    Ok(())
}

#[test]
fn a_rapid_reset_flood_closes_the_connection_and_corral_keeps_serving() -> TestResult {
    let (corral, _dir, ca, mut conn, authority) = h2_connection(&[])?;
    let mut flood = Vec::new();
    for i in 0..2000u32 {
        let stream = 2 * i + 1;
        flood.extend(h2::get(stream, &authority, "/slow?ms=500", &[]));
        flood.extend(h2::frame(h2::RST_STREAM, 0, stream, &8u32.to_be_bytes()));
        if flood.len() > 32 * 1024 {
            if conn.write_all(&flood).is_err() {
                break;
            }
            flood.clear();
        }
    }
    let _ = conn.write_all(&flood);
    // Without a defence the connection would stay open, answering nothing: the read would
    // time out (30 s) instead of seeing GOAWAY or the close.
    conn.sock.set_read_timeout(Some(DEADLINE))?;
    assert!(closed_by_server(&mut conn), "the connection survived the flood");
    assert_serves(&ca, &corral)
}

#[test]
fn cancelling_streams_at_the_workers_is_caught_even_padded_with_answered_requests() -> TestResult {
    // The h2 crate only counts streams reset before the server took them. This client waits
    // until its requests are in flight at the workers, then cancels them, round after round,
    // and before each round sends as many requests corral answers itself (400), so that
    // cancelled streams are never more than half of its traffic.
    let (corral, _dir, _ca, mut conn, authority) = h2_connection(&[])?;
    let mut next = 1u32;
    let mut closed = false;
    for _round in 0..20 {
        let padding: Vec<u32> = (0..25).map(|i| next + 2 * i).collect();
        next += 50;
        let batch: Vec<u8> = padding
            .iter()
            .flat_map(|&s| h2::get(s, &authority, "/whoami", &[("host", "elsewhere.test")]))
            .collect();
        if conn.write_all(&batch).is_err() || h2::bodies(&mut conn, &padding).is_none() {
            closed = true;
            break;
        }
        let slow: Vec<u32> = (0..25).map(|i| next + 2 * i).collect();
        next += 50;
        let batch: Vec<u8> = slow
            .iter()
            .flat_map(|&s| h2::get(s, &authority, "/slow?ms=20000", &[]))
            .collect();
        if conn.write_all(&batch).is_err() {
            closed = true;
            break;
        }
        let at_workers = poll_until(DEADLINE, "25 requests in flight at the workers, or the close", || {
            if corral.logs().contains("rapid reset") {
                return Some(false);
            }
            (corral.total("in_flight")? >= 25).then_some(true)
        })?;
        if !at_workers {
            closed = true;
            break;
        }
        let resets: Vec<u8> = slow
            .iter()
            .flat_map(|&s| h2::frame(h2::RST_STREAM, 0, s, &8u32.to_be_bytes()))
            .collect();
        if conn.write_all(&resets).is_err() {
            closed = true;
            break;
        }
        poll_until(DEADLINE, "the cancelled requests to leave the workers", || {
            (corral.total("in_flight")? == 0).then_some(())
        })?;
    }
    conn.sock.set_read_timeout(Some(DEADLINE))?;
    assert!(closed || closed_by_server(&mut conn), "the connection survived");
    assert!(corral.logs().contains("rapid reset"), "{}", corral.logs());
    Ok(())
}

#[test]
fn a_continuation_flood_is_cut_off_long_before_it_ends() -> TestResult {
    let (corral, _dir, ca, mut conn, authority) = h2_connection(&[])?;
    let start = h2::block(&[
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", &authority),
        (":path", "/"),
    ]);
    conn.write_all(&h2::frame(h2::HEADERS, 0, 1, &start))?;
    let value = "a".repeat(100);
    let junk = h2::block(&[("x-junk", value.as_str()); 140]);
    let (mut sent, mut refused) = (0usize, false);
    // 16 MiB of header block, 250 times max_header_size: the server must stop reading it.
    while sent < 16 << 20 {
        if conn.write_all(&h2::frame(h2::CONTINUATION, 0, 1, &junk)).is_err() {
            refused = true;
            break;
        }
        sent += junk.len();
    }
    conn.sock.set_read_timeout(Some(DEADLINE))?;
    assert!(refused || closed_by_server(&mut conn), "all {sent} bytes were taken in");
    assert_serves(&ca, &corral)
}

#[test]
fn forty_large_uploads_on_one_connection_all_arrive() -> TestResult {
    // More uploads at once than a connection's streams: none may stall the others (unread
    // DATA of a waiting stream would fill the window all streams share).
    let (corral, dir, ca, _conn, _authority) = h2_connection(&[])?;
    let file = dir.path().join("upload.bin");
    std::fs::write(&file, vec![b'u'; 2 << 20])?;
    let resolve = format!("localhost:{}:127.0.0.1", corral.addr.port());
    let url = format!("https://localhost:{}/echo", corral.addr.port());
    let mut command = std::process::Command::new("curl");
    command
        .args(["-sS", "--max-time", "120", "--http2", "-Z", "--parallel-max", "40"])
        .arg("--cacert")
        .arg(&ca.pem)
        .args([
            "--resolve",
            &resolve,
            "-w",
            "%{http_code} %{size_download} %{http_version}\\n",
        ]);
    for _ in 0..40 {
        command.arg("-T").arg(&file).args(["-o", "/dev/null", &url]);
    }
    let out = command.output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 40, "{text}{}", String::from_utf8_lossy(&out.stderr));
    for line in lines {
        assert_eq!(line, format!("200 {} 2", 2 << 20), "{text}");
    }
    Ok(())
}
