//! `GET /metrics` on the admin listener after known traffic: counts exact. The registry's
//! summing and rendering are unit-tested in `src/metrics/`; `corral status`'s req/s and p99 in
//! `tests/observe.rs`.

mod support;

use std::net::SocketAddr;

use support::http::Conn;
use support::{poll_until, Corral, Options, PortHold, TestResult, DEADLINE};

/// corral with `[admin] listen` on a free loopback port (no token: loopback only).
fn start(options: Options) -> Result<(Corral, SocketAddr), Box<dyn std::error::Error>> {
    let public = PortHold::new()?;
    let admin = PortHold::new()?;
    let admin_addr = admin.addr;
    let config = format!(
        "{}\n[admin]\nlisten = \"{admin_addr}\"\n",
        options.config_text(public.addr)
    );
    // The admin socket may be bound without SO_REUSEPORT: let go of it first.
    admin.release();
    let corral = Corral::spawn_with_config(&config, public.addr)?;
    corral.wait_online(options.instances)?;
    public.release();
    Ok((corral, admin_addr))
}

/// The metrics text (the Host names the loopback listener, as the admin API wants).
fn scrape(admin: SocketAddr) -> Result<String, Box<dyn std::error::Error>> {
    let host = admin.to_string();
    let response = Conn::open(admin)?.request("GET", "/metrics", &[("Host", &host)], b"")?;
    if response.status != 200 {
        return Err(format!("/metrics answered {}: {}", response.status, response.text()).into());
    }
    let kind = response.header("content-type").unwrap_or_default();
    if !kind.starts_with("text/plain") {
        return Err(format!("/metrics content-type {kind:?}").into());
    }
    Ok(response.text())
}

/// The value of one series (`name{labels}` exactly as rendered).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Scrapes until every `(series, value)` holds.
fn wait_for(corral: &Corral, admin: SocketAddr, want: &[(&str, f64)]) -> Result<String, Box<dyn std::error::Error>> {
    let mut last = String::new();
    poll_until(DEADLINE, "the metrics to show the expected values", || {
        last = scrape(admin).ok()?;
        want.iter()
            .all(|(series, v)| value(&last, series) == Some(*v))
            .then(|| last.clone())
    })
    .map_err(|e| corral.explain(format!("{e}\nwanted {want:?}\nlast scrape:\n{last}").into()))
}

#[test]
fn request_counters_and_the_histogram_count_known_traffic_exactly() -> TestResult {
    let (corral, admin) = start(Options::default().instances(2))?;
    let text = scrape(admin)?;
    for family in [
        "corral_http_requests_total counter",
        "corral_http_request_duration_seconds histogram",
        "corral_http_requests_in_flight gauge",
        "corral_connections_open gauge",
        "corral_upstream_connect_errors_total counter",
        "corral_tls_handshakes_total counter",
        "corral_workers gauge",
        "corral_worker_restarts_total counter",
        "corral_worker_memory_bytes gauge",
        "corral_reloads_total counter",
    ] {
        assert!(text.contains(&format!("# TYPE {family}\n")), "{family}\n{text}");
        let name = family.split(' ').next().unwrap_or_default();
        assert!(text.contains(&format!("# HELP {name} ")), "{name}\n{text}");
    }

    {
        let mut conn = Conn::open(corral.addr)?;
        for _ in 0..10 {
            assert_eq!(conn.get("/whoami")?.status, 200);
        }
        for _ in 0..3 {
            assert_eq!(conn.get("/status?code=404")?.status, 404);
        }
        assert_eq!(conn.request("POST", "/echo", &[], b"hello")?.status, 200);
        assert_eq!(conn.get("/slow?ms=300")?.status, 200);
        // corral's own answer: two Host fields.
        let mut refused = Conn::open(corral.addr)?;
        refused.send_raw(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")?;
        assert_eq!(refused.read_response()?.status, 400);
    }
    let text = wait_for(
        &corral,
        admin,
        &[
            ("corral_http_requests_total{app=\"web\",code=\"200\"}", 12.0),
            ("corral_http_requests_total{app=\"web\",code=\"404\"}", 3.0),
            ("corral_http_requests_total{app=\"web\",code=\"400\"}", 1.0),
            ("corral_http_request_duration_seconds_count{app=\"web\"}", 16.0),
            (
                "corral_http_request_duration_seconds_bucket{app=\"web\",le=\"+Inf\"}",
                16.0,
            ),
            ("corral_http_requests_in_flight{app=\"web\"}", 0.0),
            ("corral_connections_open{app=\"web\"}", 0.0),
            ("corral_upstream_connect_errors_total{app=\"web\"}", 0.0),
            ("corral_workers{app=\"web\",state=\"online\"}", 2.0),
        ],
    )?;
    // The 300 ms request is above the 250 ms bound (the others may be too, on a busy machine).
    let quick = value(
        &text,
        "corral_http_request_duration_seconds_bucket{app=\"web\",le=\"0.25\"}",
    );
    assert!(quick.is_some_and(|n| n <= 15.0), "{quick:?}\n{text}");
    let sum = value(&text, "corral_http_request_duration_seconds_sum{app=\"web\"}").ok_or("no sum")?;
    assert!((0.3..30.0).contains(&sum), "{sum}");
    for slot in 0..2 {
        let memory = value(
            &text,
            &format!("corral_worker_memory_bytes{{app=\"web\",slot=\"{slot}\"}}"),
        );
        // Sampled every 2 s: right after boot it may be a worker's first megabyte only.
        assert!(memory.is_some_and(|m| m > 0.0), "slot {slot}: {memory:?}\n{text}");
    }
    // An open connection and a request in flight show while they last.
    let mut slow = Conn::open(corral.addr)?;
    slow.send("GET", "/slow?ms=3000", &[], b"")?;
    wait_for(
        &corral,
        admin,
        &[
            ("corral_http_requests_in_flight{app=\"web\"}", 1.0),
            ("corral_connections_open{app=\"web\"}", 1.0),
        ],
    )?;
    assert_eq!(slow.read_response()?.status, 200);
    Ok(())
}

#[test]
fn restarts_and_reloads_are_counted_by_reason_and_result() -> TestResult {
    let (corral, admin) = start(Options::default().instances(2))?;
    wait_for(
        &corral,
        admin,
        &[
            ("corral_worker_restarts_total{app=\"web\",reason=\"crash\"}", 0.0),
            ("corral_worker_restarts_total{app=\"web\",reason=\"reload\"}", 0.0),
            ("corral_reloads_total{app=\"web\",result=\"ok\"}", 0.0),
        ],
    )?;
    let pid = *corral.online_pids()?.iter().next().ok_or("no worker")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    wait_for(
        &corral,
        admin,
        &[
            ("corral_worker_restarts_total{app=\"web\",reason=\"crash\"}", 1.0),
            ("corral_workers{app=\"web\",state=\"online\"}", 2.0),
        ],
    )?;
    let reload = corral.cli(&["reload"])?;
    assert!(reload.status.success(), "{}", String::from_utf8_lossy(&reload.stderr));
    wait_for(
        &corral,
        admin,
        &[
            ("corral_reloads_total{app=\"web\",result=\"ok\"}", 1.0),
            ("corral_worker_restarts_total{app=\"web\",reason=\"reload\"}", 2.0),
            ("corral_worker_restarts_total{app=\"web\",reason=\"crash\"}", 1.0),
        ],
    )?;
    // A broken config is refused, and counted so.
    std::fs::write(&corral.config, "[[app]]\nname = \"web\"\n")?;
    let refused = corral.cli(&["reload"])?;
    assert!(!refused.status.success());
    wait_for(
        &corral,
        admin,
        &[("corral_reloads_total{app=\"web\",result=\"refused\"}", 1.0)],
    )?;
    Ok(())
}
