//! Proxying through the real binary: balancing, headers, bodies, streaming.

mod support;

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use support::http::{get, Conn};
use support::{poll_until, Corral, Options, TestResult, DEADLINE};

fn pid_of(response: &support::http::Response) -> u64 {
    response.json()["pid"].as_u64().unwrap_or(0)
}

#[test]
fn requests_spread_evenly_on_new_and_kept_alive_connections() -> TestResult {
    let corral = Corral::start(Options::default().instances(2))?;
    let pids = corral.online_pids()?;
    assert_eq!(pids.len(), 2);

    let mut fresh: BTreeMap<u64, usize> = BTreeMap::new();
    for _ in 0..20 {
        let response = get(corral.addr, "/whoami")?;
        assert_eq!(response.status, 200);
        *fresh.entry(pid_of(&response)).or_default() += 1;
    }
    assert_eq!(
        fresh.values().copied().collect::<Vec<_>>(),
        [10, 10],
        "new connections: {fresh:?}"
    );

    let mut conn = Conn::open(corral.addr)?;
    let mut kept: BTreeMap<u64, usize> = BTreeMap::new();
    for _ in 0..20 {
        let response = conn.get("/whoami")?;
        assert_eq!(response.status, 200);
        *kept.entry(pid_of(&response)).or_default() += 1;
    }
    assert_eq!(
        kept.values().copied().collect::<Vec<_>>(),
        [10, 10],
        "one keep-alive connection: {kept:?}"
    );
    assert!(kept.keys().all(|pid| pids.contains(&(*pid as u32))));
    Ok(())
}

#[test]
fn forwarding_headers_are_set_and_hop_by_hop_headers_removed() -> TestResult {
    let corral = Corral::start(Options::default().instances(1))?;
    let mut conn = Conn::open(corral.addr)?;
    let response = conn.request(
        "GET",
        "/headers",
        &[
            ("Host", "shop.example:8080"),
            ("X-Forwarded-For", "203.0.113.7"),
            ("Connection", "keep-alive, X-Private"),
            ("X-Private", "secret"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authorization", "Basic Zm9v"),
            ("X-Custom", "kept"),
        ],
        &[],
    )?;
    assert_eq!(response.status, 200);
    let seen = response.json();
    assert_eq!(seen["host"], "shop.example:8080");
    assert_eq!(seen["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "shop.example:8080");
    assert_eq!(seen["x-custom"], "kept");
    for gone in ["x-private", "keep-alive", "proxy-authorization"] {
        assert!(seen.get(gone).is_none(), "{gone} reached the worker: {seen}");
    }
    // The connection stays usable for the next request.
    assert_eq!(conn.get("/whoami")?.status, 200);
    Ok(())
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn a_5_mib_upload_is_echoed_intact_with_content_length_and_chunked() -> TestResult {
    let corral = Corral::start(Options::default().instances(1))?;
    let body = pattern(5 << 20, 7);

    let mut conn = Conn::open(corral.addr)?;
    let response = conn.request("POST", "/echo", &[], &body)?;
    assert_eq!(response.status, 200);
    assert_eq!(response.body.len(), body.len());
    assert!(response.body == body, "echoed body differs");

    // The same body, chunked, on the same connection.
    conn.send_raw(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")?;
    for piece in body.chunks(300_000) {
        conn.send_raw(format!("{:x}\r\n", piece.len()).as_bytes())?;
        conn.send_raw(piece)?;
        conn.send_raw(b"\r\n")?;
    }
    conn.send_raw(b"0\r\n\r\n")?;
    let response = conn.read_response()?;
    assert_eq!(response.status, 200);
    assert!(
        response.body == body,
        "chunked echo differs ({} bytes back)",
        response.body.len()
    );
    Ok(())
}

#[test]
fn a_10_mib_response_arrives_intact() -> TestResult {
    let corral = Corral::start(Options::default().instances(1))?;
    let n = 10 << 20;
    let response = get(corral.addr, &format!("/bytes?n={n}"))?;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-length"), Some(n.to_string().as_str()));
    assert_eq!(response.body.len(), n);
    assert!(
        response.body.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8),
        "content differs"
    );
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Reads decoded body chunks until one whole SSE event (ending in a blank line) is buffered.
fn next_event(conn: &mut Conn, buffer: &mut String) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    loop {
        if let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let data = event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .ok_or("event without data")?;
            return Ok(serde_json::from_str(data)?);
        }
        let chunk = conn.read_chunk()?.ok_or("stream ended")?;
        buffer.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[test]
fn sse_events_arrive_as_soon_as_they_are_written() -> TestResult {
    let corral = Corral::start(Options::default().instances(1))?;
    let worker_port = corral.workers()?[0]["port"].as_u64().ok_or("worker port")? as u16;
    let worker = std::net::SocketAddr::from(([127, 0, 0, 1], worker_port));

    let mut stream = Conn::open(corral.addr)?;
    stream.send("GET", "/sse", &[("Accept", "text/event-stream")], &[])?;
    let (status, headers) = stream.read_head()?;
    assert_eq!(status, 200);
    assert!(headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("content-type") && v == "text/event-stream"));

    // Event n+1 is only written when the test asks the worker for it (straight to its port),
    // so every event read here proves that the previous one was not held back waiting for more.
    let mut buffer = String::new();
    let mut delays = Vec::new();
    for n in 0..6u64 {
        if n > 0 {
            assert_eq!(get(worker, "/sse-next")?.status, 200);
        }
        let event = next_event(&mut stream, &mut buffer)?;
        let received = now_ms();
        assert_eq!(event["n"], n, "events out of order");
        delays.push(received.saturating_sub(event["sent"].as_u64().ok_or("sent stamp")?));
        assert!(buffer.is_empty(), "a later event arrived batched with event {n}");
    }
    delays.sort_unstable();
    let median = delays[delays.len() / 2];
    eprintln!("SSE delivery delays (ms, worker write to client read): {delays:?}");
    assert!(median < 100, "median SSE delivery delay {median} ms (all: {delays:?})");
    Ok(())
}

#[test]
fn status_reports_every_worker() -> TestResult {
    let corral = Corral::start(Options::default().instances(2))?;
    for _ in 0..5 {
        assert_eq!(get(corral.addr, "/whoami")?.status, 200);
    }
    let workers = poll_until(DEADLINE, "request counts in status", || {
        let workers = corral.workers().ok()?;
        let total: u64 = workers.iter().filter_map(|w| w["requests"].as_u64()).sum();
        (total == 5).then_some(workers)
    })?;
    for (slot, w) in workers.iter().enumerate() {
        assert_eq!(w["slot"], slot as u64);
        assert_eq!(w["state"], "online");
        assert!(w["pid"].as_u64().is_some() && w["port"].as_u64().is_some(), "{w}");
        assert_eq!(w["in_flight"], 0);
        assert_eq!(w["restarts"], 0);
    }
    let table = corral.cli(&["status"])?;
    assert!(table.status.success());
    let text = String::from_utf8_lossy(&table.stdout);
    for column in [
        "APP",
        "SLOT",
        "PID",
        "PORT",
        "STATE",
        "UPTIME",
        "RESTARTS",
        "REQUESTS",
        "IN FLIGHT",
    ] {
        assert!(text.contains(column), "status table lacks {column}:\n{text}");
    }
    assert_eq!(text.lines().filter(|l| l.starts_with("web ")).count(), 2, "{text}");
    Ok(())
}
