//! Tests of the access log's lines: exact output, escaping, batching.
use super::*;

use std::path::PathBuf;
use std::sync::mpsc::{self, SyncSender};

fn log_with(format: AccessLogFormat, tx: SyncSender<Msg>) -> &'static AccessLog {
    let mut app_json = Vec::new();
    escape_json(&mut app_json, b"web");
    Box::leak(Box::new(AccessLog {
        app: "web".into(),
        app_json,
        format,
        file: 0,
        path: PathBuf::from("access.log"),
        zone: Zone::Utc,
        tx,
        drops: Arc::default(),
    }))
}

fn log(format: AccessLogFormat) -> &'static AccessLog {
    log_with(format, mpsc::sync_channel(1).0)
}

fn pending(format: AccessLogFormat, request: http::request::Builder) -> Pending {
    let req = request.body(()).expect("request");
    let peer = Peer::new(
        "[::ffff:10.1.2.3]:5555".parse().expect("addr"),
        "127.0.0.1:80".parse().expect("addr"),
        false,
    );
    let mut pending = Pending::new(
        log(format),
        &req,
        &peer,
        Instant::now(),
        Some(HeaderValue::from_static("abc-0-1")),
    );
    pending.time = UNIX_EPOCH + Duration::from_millis(1_764_000_000_123); // 2025-11-24T16:00:00.123Z
    pending.status = 200;
    pending
}

fn line(format: AccessLogFormat, request: http::request::Builder, slot: Option<usize>) -> String {
    let pending = pending(format, request);
    let mut out = Vec::new();
    let duration = Duration::from_micros(1_234_567);
    match format {
        AccessLogFormat::Combined => combined(&mut out, &mut Clock::default(), &pending, 512, slot, duration),
        AccessLogFormat::Json => json(&mut out, &mut Clock::default(), &pending, 512, slot, duration),
    }
    String::from_utf8(out).expect("the line is UTF-8")
}

#[test]
fn numbers_and_addresses_are_written_as_fmt_would() {
    let mut out = Vec::new();
    for n in [0u64, 7, 10, 999, 1_000_000, u64::MAX] {
        out.clear();
        push_u64(&mut out, n);
        assert_eq!(out, n.to_string().as_bytes());
        for width in [3, 6] {
            out.clear();
            push_padded(&mut out, n, width);
            assert_eq!(String::from_utf8_lossy(&out), format!("{n:0width$}"));
        }
    }
    for ip in [
        "0.0.0.0",
        "255.255.255.255",
        "10.1.20.3",
        "::1",
        "2001:db8::8a2e:370:7334",
    ] {
        out.clear();
        push_ip(&mut out, ip.parse().expect("ip"));
        assert_eq!(out, ip.as_bytes());
    }
}

#[test]
fn a_combined_line_has_every_field() {
    let request = http::Request::builder()
        .method("GET")
        .uri("/a?b=1")
        .header("user-agent", "curl/8.0")
        .header("referer", "https://example.com/");
    assert_eq!(
        line(AccessLogFormat::Combined, request, Some(2)),
        "10.1.2.3 - - [24/Nov/2025:16:00:00 +0000] \"GET /a?b=1 HTTP/1.1\" 200 512 \"https://example.com/\" \"curl/8.0\" rt=1.234567 slot=2 id=abc-0-1\n"
    );
    let bare = http::Request::builder().method("HEAD").uri("http://h.example/x");
    assert_eq!(
        line(AccessLogFormat::Combined, bare, None),
        "10.1.2.3 - - [24/Nov/2025:16:00:00 +0000] \"HEAD http://h.example/x HTTP/1.1\" 200 512 \"-\" \"-\" rt=1.234567 slot=- id=abc-0-1\n"
    );
}

#[test]
fn a_json_line_is_one_object_with_every_field() {
    let request = http::Request::builder()
        .method("POST")
        .uri("/p")
        .version(Version::HTTP_2)
        .header("user-agent", "Mozilla/5.0 (X11; Linux) \"quoted\" ünï");
    let text = line(AccessLogFormat::Json, request, Some(0));
    assert!(text.ends_with("}\n") && text.matches('\n').count() == 1, "{text}");
    let value: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(value["time"], "2025-11-24T16:00:00.123Z");
    assert_eq!(value["app"], "web");
    assert_eq!(value["client"], "10.1.2.3");
    assert_eq!(value["method"], "POST");
    assert_eq!(value["target"], "/p");
    assert_eq!(value["protocol"], "HTTP/2.0");
    assert_eq!(value["status"], 200);
    assert_eq!(value["bytes"], 512);
    assert_eq!(value["duration_ms"], 1234.567);
    assert_eq!(value["slot"], 0);
    assert_eq!(value["request_id"], "abc-0-1");
    assert_eq!(value["user_agent"], "Mozilla/5.0 (X11; Linux) \"quoted\" ünï");
    assert!(value["referer"].is_null());
}

#[test]
fn hostile_bytes_cannot_split_or_forge_a_line() {
    // What hyper lets through in a header value: quotes, backslashes, tabs, obs-text.
    let hostile: &[u8] = b"x\" 200 1 \"-\" \"forged\\\x09\xff\xfe";
    let request = || {
        http::Request::builder()
            .method("GET")
            .uri("/")
            .header(
                "user-agent",
                HeaderValue::from_bytes(hostile).expect("obs-text is a valid value"),
            )
            .header(
                "referer",
                HeaderValue::from_bytes(b"\xe2\x80\xa8line separator").expect("value"),
            )
    };
    let text = line(AccessLogFormat::Combined, request(), None);
    assert!(
        text.contains(
            "\"\\xe2\\x80\\xa8line separator\" \"x\\x22 200 1 \\x22-\\x22 \\x22forged\\x5c\\x09\\xff\\xfe\" rt="
        ),
        "{text}"
    );
    // Exactly the six quotes corral writes, one newline at the end, all ASCII.
    assert_eq!(text.matches('"').count(), 6, "{text}");
    assert_eq!(text.matches('\n').count(), 1);
    assert!(text.is_ascii());

    let text = line(AccessLogFormat::Json, request(), None);
    assert_eq!(text.matches('\n').count(), 1);
    let value: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    // Not UTF-8: every byte is kept, as Latin-1 code points.
    let ua: Vec<u32> = value["user_agent"]
        .as_str()
        .expect("string")
        .chars()
        .map(|c| c as u32)
        .collect();
    assert_eq!(ua, hostile.iter().map(|&b| u32::from(b)).collect::<Vec<u32>>());
    assert_eq!(value["referer"], "\u{2028}line separator");
    assert!(text.contains("\\u2028"), "{text}");
    assert_eq!(value.as_object().map(|o| o.len()), Some(13), "{text}");

    // Controls never get this far (hyper refuses them), and are escaped all the same.
    let mut out = Vec::new();
    escape_combined(&mut out, b"a\nb\r\x00\x7f");
    assert_eq!(out, b"a\\x0ab\\x0d\\x00\\x7f");
    out.clear();
    escape_json(&mut out, b"a\nb\x00\x7f\xc3\xa9");
    assert_eq!(String::from_utf8_lossy(&out), "\"a\\nb\\u0000\\u007f\u{e9}\"");
}

#[test]
fn lines_are_batched_per_thread_and_counted_lost_when_the_writer_is_full() {
    // A channel of one batch that nobody reads: the second batch is dropped.
    let (tx, rx) = mpsc::sync_channel(1);
    let log = log_with(AccessLogFormat::Combined, tx);
    let thread = std::thread::spawn(move || {
        for _ in 0..3 {
            let mut pending = pending(AccessLogFormat::Combined, http::Request::builder().uri("/"));
            pending.log = log;
            Box::new(pending).finish(10, Some(0));
        }
        flush_local();
        assert_eq!(log.drops.load(Ordering::Relaxed), 0, "the first batch fits");
        let mut pending = pending(AccessLogFormat::Combined, http::Request::builder().uri("/"));
        pending.log = log;
        Box::new(pending).finish(10, Some(0));
        flush_local();
        assert_eq!(log.drops.load(Ordering::Relaxed), 1, "the second is lost, and counted");
    });
    thread.join().expect("the thread ran");
    match rx.try_recv() {
        Ok(Msg::Batch { lines, count, .. }) => {
            assert_eq!(count, 3);
            assert_eq!(lines.iter().filter(|&&b| b == b'\n').count(), 3);
        }
        other => panic!("one batch of three lines, not {other:?}"),
    }
}
