//! What corral tells about the traffic it proxies: the access log (both formats, hostile bytes,
//! rotation), `X-Request-Id`, and the last minute's req/s and p99 in `corral status`.

mod support;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::Value;
use support::http::{Conn, Response};
use support::{poll_until, Corral, Options, TestResult, DEADLINE};

/// Every line of `file` and its rotated files, oldest first.
fn all_lines(file: &Path) -> Vec<String> {
    let mut files: Vec<PathBuf> = (1..200)
        .rev()
        .map(|n| PathBuf::from(format!("{}.{n}", file.display())))
        .filter(|p| p.exists())
        .collect();
    files.push(file.to_path_buf());
    files
        .iter()
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Waits until `file` (with its rotations) holds `n` lines, and returns them.
fn wait_lines(corral: &Corral, file: &Path, n: usize) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    poll_until(DEADLINE, &format!("{n} lines in {}", file.display()), || {
        let lines = all_lines(file);
        (lines.len() >= n).then_some(lines)
    })
    .map_err(|e| corral.explain(e))
}

/// One request the tests send, and what corral answered.
struct Sent {
    method: &'static str,
    target: &'static str,
    response: Response,
}

impl Sent {
    fn id(&self) -> &str {
        self.response.header("x-request-id").unwrap_or("-")
    }

    /// The slot that answered: `/whoami` says so; corral's own answers have none.
    fn slot(&self) -> Option<String> {
        self.response.json()["slot"].as_str().map(str::to_owned)
    }
}

/// Method, target, headers and body of a request to send.
type Planned = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static [u8],
);

/// A known mix on one keep-alive connection: worker answers (200, 404, an echoed upload,
/// 1000 bytes), then corral's own 400 (which closes the connection).
fn traffic(corral: &Corral) -> Result<Vec<Sent>, Box<dyn std::error::Error>> {
    let mut conn = Conn::open(corral.addr)?;
    let mut sent = Vec::new();
    let plan: [Planned; 6] = [
        ("GET", "/whoami", &[("X-Request-Id", "first-request")], b""),
        (
            "GET",
            "/whoami",
            &[("User-Agent", "test/1.0"), ("Referer", "http://r.example/")],
            b"",
        ),
        ("GET", "/bytes?n=1000", &[], b""),
        ("GET", "/status?code=404", &[], b""),
        ("POST", "/echo", &[], b"hello"),
        ("GET", "/whoami", &[], b""),
    ];
    for (method, target, headers, body) in plan {
        let response = conn.request(method, target, headers, body)?;
        sent.push(Sent {
            method,
            target,
            response,
        });
    }
    // Two Host fields: corral refuses it itself, no worker involved.
    let mut conn = Conn::open(corral.addr)?;
    conn.send_raw(b"GET /twice HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")?;
    sent.push(Sent {
        method: "GET",
        target: "/twice",
        response: conn.read_response()?,
    });
    Ok(sent)
}

/// The lines in the order of `sent`, found by request id: lines of different connections (on
/// different shards) may land in any order. Exactly one line per request.
fn by_request(
    lines: Vec<String>,
    sent: &[Sent],
    id: impl Fn(&str) -> Option<String>,
) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    assert_eq!(lines.len(), sent.len(), "{lines:#?}");
    let mut ordered = Vec::new();
    for request in sent {
        let mut matching = lines.iter().filter(|l| id(l).as_deref() == Some(request.id()));
        let line = matching
            .next()
            .ok_or_else(|| format!("no line for {}: {lines:#?}", request.id()))?;
        assert!(matching.next().is_none(), "two lines for {}", request.id());
        ordered.push(line.clone());
    }
    Ok(ordered)
}

fn access_log_options(format: &str) -> Options {
    Options::default()
        .instances(2)
        .key("access_log = \"logs/access.log\"")
        .key(&format!("access_log_format = \"{format}\""))
}

#[test]
fn combined_lines_match_the_requests_exactly() -> TestResult {
    let corral = Corral::start(access_log_options("combined"))?;
    let sent = traffic(&corral)?;
    let lines = wait_lines(&corral, &corral.dir.path().join("logs/access.log"), sent.len())?;
    let lines = by_request(lines, &sent, |line| line.rsplit(" id=").next().map(str::to_owned))?;
    let statuses: Vec<u16> = sent.iter().map(|s| s.response.status).collect();
    assert_eq!(statuses, [200, 200, 200, 404, 200, 200, 400]);
    for (index, (line, sent)) in lines.iter().zip(&sent).enumerate() {
        // 127.0.0.1 - - [02/Dec/2026:08:04:06 +0000] "GET /x HTTP/1.1" 200 37 "-" "-" rt=0.001 slot=0 id=...
        let (client, rest) = line.split_once(" - - [").ok_or(line.as_str())?;
        assert_eq!(client, "127.0.0.1", "{line}");
        let (time, rest) = rest.split_once("] \"").ok_or(line.as_str())?;
        assert!(time.len() == 26 && time.ends_with(" +0000"), "{line}");
        let (request, rest) = rest.split_once("\" ").ok_or(line.as_str())?;
        assert_eq!(request, format!("{} {} HTTP/1.1", sent.method, sent.target), "{line}");
        let fields: Vec<&str> = rest.split(' ').collect();
        assert_eq!(fields[0], sent.response.status.to_string(), "{line}");
        assert_eq!(fields[1], sent.response.body.len().to_string(), "bytes sent: {line}");
        // The second request sent a referer and a user agent, no other did.
        let referer = if index == 1 {
            "\"http://r.example/\" \"test/1.0\""
        } else {
            "\"-\" \"-\""
        };
        assert!(rest.contains(&format!(" {referer} rt=")), "{line}");
        let rt: f64 = rest
            .split(" rt=")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|r| r.parse().ok())
            .ok_or(line.as_str())?;
        assert!(rt > 0.0 && rt < 30.0, "{line}");
        let slot = rest
            .split(" slot=")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .ok_or(line.as_str())?;
        match (sent.slot(), sent.response.status) {
            (Some(answered), _) => assert_eq!(slot, answered, "{line}"),
            (None, 400) => assert_eq!(slot, "-", "corral answered itself: {line}"),
            (None, _) => assert!(slot == "0" || slot == "1", "{line}"),
        }
        assert!(line.ends_with(&format!(" id={}", sent.id())), "{line}");
    }
    assert!(lines[0].ends_with(" id=first-request"), "{}", lines[0]);
    assert!(lines[1].contains("\"http://r.example/\" \"test/1.0\""), "{}", lines[1]);
    Ok(())
}

#[test]
fn json_lines_match_the_requests_exactly() -> TestResult {
    let corral = Corral::start(access_log_options("json"))?;
    let sent = traffic(&corral)?;
    let lines = wait_lines(&corral, &corral.dir.path().join("logs/access.log"), sent.len())?;
    let lines = by_request(lines, &sent, |line| {
        let entry: Value = serde_json::from_str(line).ok()?;
        entry["request_id"].as_str().map(str::to_owned)
    })?;
    for (line, sent) in lines.iter().zip(&sent) {
        let entry: Value = serde_json::from_str(line).map_err(|e| format!("{e}: {line}"))?;
        assert_eq!(entry["app"], "web", "{line}");
        assert_eq!(entry["client"], "127.0.0.1", "{line}");
        assert_eq!(entry["method"], sent.method, "{line}");
        assert_eq!(entry["target"], sent.target, "{line}");
        assert_eq!(entry["protocol"], "HTTP/1.1", "{line}");
        assert_eq!(entry["status"], sent.response.status, "{line}");
        assert_eq!(entry["bytes"], sent.response.body.len() as u64, "{line}");
        assert_eq!(entry["request_id"], sent.id(), "{line}");
        let time = entry["time"].as_str().ok_or(line.as_str())?;
        assert!(
            time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
            "{line}"
        );
        let ms = entry["duration_ms"].as_f64().ok_or(line.as_str())?;
        assert!(ms > 0.0 && ms < 30_000.0, "{line}");
        match (sent.slot(), sent.response.status) {
            (Some(answered), _) => assert_eq!(entry["slot"].to_string(), answered, "{line}"),
            (None, 400) => assert!(entry["slot"].is_null(), "{line}"),
            (None, _) => assert!(entry["slot"] == 0 || entry["slot"] == 1, "{line}"),
        }
    }
    assert_eq!(lines.len(), 7);
    let second: Value = serde_json::from_str(&lines[1])?;
    assert_eq!(second["user_agent"], "test/1.0");
    assert_eq!(second["referer"], "http://r.example/");
    let first: Value = serde_json::from_str(&lines[0])?;
    assert!(first["user_agent"].is_null() && first["referer"].is_null(), "{first}");
    assert_eq!(first["request_id"], "first-request");
    Ok(())
}

#[test]
fn hostile_bytes_in_the_request_cannot_split_or_forge_a_log_line() -> TestResult {
    for format in ["combined", "json"] {
        let corral = Corral::start(access_log_options(format).instances(1))?;
        // What hyper accepts from a client: quotes and backslashes in the target, quotes,
        // backslashes, tabs and obs-text in header values.
        let mut conn = Conn::open(corral.addr)?;
        conn.send_raw(
            b"GET /a\"b\\c HTTP/1.1\r\nHost: h\r\nUser-Agent: evil\" 200 0 \"-\" \"x\\\t\xff\r\n\
              Referer: r\" id=forged\r\n\r\n",
        )?;
        let response = conn.read_response()?;
        assert_eq!(response.status, 404);
        let lines = wait_lines(&corral, &corral.dir.path().join("logs/access.log"), 1)?;
        assert_eq!(lines.len(), 1, "one request, one line: {lines:#?}");
        let line = &lines[0];
        let id = response.header("x-request-id").ok_or("no request id")?;
        match format {
            "combined" => {
                let want = format!(
                    "\"GET /a\\x22b\\x5cc HTTP/1.1\" 404 {} \"r\\x22 id=forged\" \"evil\\x22 200 0 \\x22-\\x22 \\x22x\\x5c\\x09\\xff\" rt=",
                    response.body.len()
                );
                assert!(line.contains(&want), "{line}\nwant {want}");
                assert_eq!(line.matches('"').count(), 6, "only corral's own quotes: {line}");
                assert!(line.ends_with(&format!(" id={id}")), "{line}");
                assert!(line.is_ascii(), "{line}");
            }
            _ => {
                let entry: Value = serde_json::from_str(line).map_err(|e| format!("{e}: {line}"))?;
                assert_eq!(entry["target"], "/a\"b\\c");
                assert_eq!(entry["referer"], "r\" id=forged");
                // Not UTF-8: the bytes are kept as the code points U+0000..U+00FF.
                assert_eq!(entry["user_agent"], "evil\" 200 0 \"-\" \"x\\\t\u{ff}");
                assert_eq!(entry["request_id"], id);
                assert_eq!(entry.as_object().map(|o| o.len()), Some(13), "{line}");
            }
        }
    }
    Ok(())
}

#[test]
fn the_access_log_rotates_at_log_max_size_without_losing_or_splitting_a_line() -> TestResult {
    let options = access_log_options("combined")
        .instances(1)
        .key("log_max_size = \"1K\"")
        .key("log_retain = 100");
    let corral = Corral::start(options)?;
    let mut conn = Conn::open(corral.addr)?;
    let n = 60;
    for i in 0..n {
        let id = format!("req-{i:03}");
        let response = conn.request("GET", "/whoami", &[("X-Request-Id", &id)], b"")?;
        assert_eq!(response.header("x-request-id"), Some(id.as_str()));
    }
    let file = corral.dir.path().join("logs/access.log");
    let lines = wait_lines(&corral, &file, n)?;
    let ids: Vec<String> = lines
        .iter()
        .map(|l| l.rsplit(" id=").next().unwrap_or_default().to_owned())
        .collect();
    let want: Vec<String> = (0..n).map(|i| format!("req-{i:03}")).collect();
    assert_eq!(ids, want, "every line, in order, none split");
    assert!(
        Path::new(&format!("{}.1", file.display())).exists(),
        "no rotation at 1K"
    );
    for n in 1..200 {
        let Ok(text) = std::fs::read_to_string(format!("{}.{n}", file.display())) else {
            break;
        };
        // A rotated file holds whole lines and stops at the first line past 1 KiB.
        assert!(
            text.ends_with('\n') && text.len() < 1024 + 200,
            "{}: {} bytes",
            n,
            text.len()
        );
    }
    Ok(())
}

#[test]
fn a_valid_request_id_is_kept_an_invalid_one_replaced_and_the_worker_and_client_get_it() -> TestResult {
    let corral = Corral::start(Options::default().instances(1))?;
    let mut conn = Conn::open(corral.addr)?;
    let worker_saw = |response: &Response| response.json()["x-request-id"].as_str().map(str::to_owned);

    let kept = "Ab9._:-xyz";
    let response = conn.request("GET", "/headers", &[("X-Request-Id", kept)], b"")?;
    assert_eq!(worker_saw(&response).as_deref(), Some(kept));
    assert_eq!(response.header("x-request-id"), Some(kept));
    let longest = "x".repeat(128);
    let response = conn.request("GET", "/headers", &[("X-Request-Id", &longest)], b"")?;
    assert_eq!(worker_saw(&response).as_deref(), Some(longest.as_str()));

    let too_long = "x".repeat(129);
    for invalid in ["has space", "quote\"d", "semi;colon", "caf\u{e9}", too_long.as_str()] {
        let response = conn.request("GET", "/headers", &[("X-Request-Id", invalid)], b"")?;
        let seen = worker_saw(&response).ok_or("the worker got no id")?;
        assert_ne!(seen, invalid);
        assert!(
            seen.len() <= 128 && seen.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b)),
            "{seen:?}"
        );
        assert_eq!(
            response.header("x-request-id"),
            Some(seen.as_str()),
            "the client gets it back"
        );
    }

    // Two ids: neither is trusted, the worker gets one of corral's.
    let response = conn.request("GET", "/headers", &[("X-Request-Id", "a"), ("X-Request-Id", "b")], b"")?;
    let seen = worker_saw(&response).ok_or("no id")?;
    assert!(seen != "a" && seen != "b" && !seen.contains(','), "{seen}");

    // None sent: a fresh one per request, the same on both sides.
    let mut made = std::collections::BTreeSet::new();
    for _ in 0..5 {
        let response = conn.get("/headers")?;
        let seen = worker_saw(&response).ok_or("no id")?;
        assert_eq!(response.header("x-request-id"), Some(seen.as_str()));
        made.insert(seen);
    }
    assert_eq!(made.len(), 5, "{made:?}");
    // corral's own answers carry one too.
    conn.send_raw(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")?;
    let refused = conn.read_response()?;
    assert_eq!(refused.status, 400);
    assert!(refused.header("x-request-id").is_some_and(|id| !id.is_empty()));
    Ok(())
}

#[test]
fn with_request_id_false_the_header_passes_untouched() -> TestResult {
    let corral = Corral::start(Options::default().instances(1).key("request_id = false"))?;
    let mut conn = Conn::open(corral.addr)?;
    let response = conn.request("GET", "/headers", &[("X-Request-Id", "not valid but not ours")], b"")?;
    assert_eq!(response.json()["x-request-id"], "not valid but not ours");
    assert_eq!(response.header("x-request-id"), None);
    let response = conn.get("/headers")?;
    assert!(response.json()["x-request-id"].is_null());
    Ok(())
}

#[test]
fn status_shows_the_last_minutes_req_per_sec_and_p99() -> TestResult {
    let started = Instant::now();
    let corral = Corral::start(Options::default().instances(2))?;
    let app = |status: &Value| status["apps"][0].clone();
    let before = app(&corral.status().ok_or("status")?);
    assert!(
        before["req_per_sec"].is_null() || before["req_per_sec"] == 0.0,
        "{before}"
    );
    assert!(before["p99_ms"].is_null(), "no response yet: {before}");
    assert_eq!(before["restarts_by_reason"]["crash"], 0, "{before}");
    assert_eq!(before["reloads"]["ok"], 0, "{before}");

    // 45 responses: 40 fast ones and 5 of 300 ms, so the slowest 1% is a slow one.
    let first = Instant::now();
    let mut conn = Conn::open(corral.addr)?;
    for _ in 0..40 {
        assert_eq!(conn.get("/whoami")?.status, 200);
    }
    for _ in 0..5 {
        assert_eq!(conn.get("/slow?ms=300")?.status, 200);
    }
    let asked = Instant::now();
    let now = app(&corral.status().ok_or("status")?);
    let total = started.elapsed().as_secs_f64();
    let rate = now["req_per_sec"].as_f64().ok_or("no req_per_sec")?;
    // The window began when corral started (before the first request, after `started`) and
    // ended after `asked`: exactly 45 responses over it.
    let (low, high) = (45.0 / total, 45.0 / asked.duration_since(first).as_secs_f64());
    assert!(rate >= low && rate <= high, "{rate} not in [{low}, {high}]: {now}");
    // In the (250 ms, 500 ms] bucket, or the next one when a slow request took longer on a
    // busy machine.
    let p99 = now["p99_ms"].as_f64().ok_or("no p99")?;
    assert!(p99 > 250.0 && p99 <= 1000.0, "{p99}");

    let table = corral.cli(&["status"])?;
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains(" req/s, p99 "), "{text}");
    assert!(text.contains(" ms (last minute)"), "{text}");
    Ok(())
}
