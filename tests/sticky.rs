//! Long-lived connections: sticky sessions, WebSocket tunnels, retries, least_conn.

mod support;

use std::collections::BTreeSet;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::http::{cookie, get, ws_frame, ws_open, ws_read, Conn, Response};
use support::load::Load;
use support::{poll_until, Corral, Options, TestResult, DEADLINE};

fn session(addr: std::net::SocketAddr, cookies: &str) -> Result<Response, Box<dyn std::error::Error>> {
    let mut conn = Conn::open(addr)?;
    let headers: Vec<(&str, &str)> = if cookies.is_empty() {
        vec![]
    } else {
        vec![("Cookie", cookies)]
    };
    Ok(conn.request("GET", "/session", &headers, &[])?)
}

#[test]
fn a_sticky_cookie_keeps_a_session_on_one_worker_across_a_reload() -> TestResult {
    let corral = Corral::start(Options::default().instances(3).key("sticky = \"cookie\""))?;
    let first = session(corral.addr, "")?;
    let sticky = cookie(&first, "corral_sticky").ok_or("no affinity cookie on the first response")?;
    let sid = cookie(&first, "sid").ok_or("no session cookie")?;
    let set = first.header("set-cookie").unwrap_or_default().to_owned();
    let raw: Vec<&String> = first
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
        .map(|(_, v)| v)
        .collect();
    assert!(
        raw.iter()
            .any(|v| v.contains("HttpOnly") && v.contains("SameSite=Lax") && v.contains("Path=/")),
        "{set} {raw:?}"
    );
    let jar = format!("{sticky}; {sid}");
    let pid = first.json()["pid"].clone();

    // 30 requests on fresh connections: same worker, one session counting up.
    for n in 2..=31 {
        let response = session(corral.addr, &jar)?;
        let body = response.json();
        assert_eq!(body["pid"], pid, "request {n} left the pinned worker");
        assert_eq!(body["count"], n, "request {n}: {body}");
        assert!(
            cookie(&response, "corral_sticky").is_none(),
            "a valid cookie is not re-issued"
        );
    }
    // Two EventSource connections in a row land on the same worker.
    for _ in 0..2 {
        let mut stream = Conn::open(corral.addr)?;
        stream.send("GET", "/sse", &[("Cookie", &jar)], &[])?;
        assert_eq!(stream.read_head()?.0, 200);
        let event = String::from_utf8_lossy(&stream.read_chunk()?.ok_or("no event")?).into_owned();
        assert!(event.contains(&format!("\"pid\":{pid}")), "{event} not from {pid}");
    }

    // After a reload the cookie still works, and lands on the slot's new worker.
    let slot: u64 = first.json()["slot"].as_str().ok_or("slot")?.parse()?;
    let reload = corral.cli(&["reload"])?;
    assert!(reload.status.success(), "{}", String::from_utf8_lossy(&reload.stderr));
    let workers = corral.workers()?;
    let new_pid = workers
        .iter()
        .find(|w| w["slot"] == slot && w["state"] == "online")
        .and_then(|w| w["pid"].as_u64())
        .ok_or("no new worker for the slot")?;
    assert_ne!(serde_json::json!(new_pid), pid);
    for _ in 0..5 {
        let body = session(corral.addr, &jar)?.json();
        assert_eq!(body["pid"], new_pid, "the slot's clients follow it to its new worker");
    }
    Ok(())
}

#[test]
fn a_forged_or_garbled_cookie_is_ignored_and_replaced() -> TestResult {
    let corral = Corral::start(Options::default().instances(2).key("sticky = \"cookie\""))?;
    let genuine = cookie(&session(corral.addr, "")?, "corral_sticky").ok_or("cookie")?;
    let mac = genuine.split_once('.').map(|(_, m)| m.to_owned()).ok_or("mac")?;
    for forged in [
        "corral_sticky=1.0000000000000000".to_owned(),
        "corral_sticky=garbage".to_owned(),
        format!("corral_sticky=0.{mac}x"),
        "corral_sticky=".to_owned(),
    ] {
        let mut pids = BTreeSet::new();
        for _ in 0..4 {
            let response = session(corral.addr, &forged)?;
            assert_eq!(response.status, 200, "{forged}");
            let fresh = cookie(&response, "corral_sticky").ok_or_else(|| format!("no fresh cookie for {forged}"))?;
            assert_ne!(fresh, forged);
            pids.insert(response.json()["pid"].to_string());
        }
        assert_eq!(
            pids.len(),
            2,
            "a forged cookie {forged} must be balanced normally: {pids:?}"
        );
    }
    Ok(())
}

#[test]
fn sticky_ip_pins_a_client_address() -> TestResult {
    let corral = Corral::start(
        Options::default()
            .instances(3)
            .key("sticky = \"ip\"")
            .key("trusted_proxies = [\"127.0.0.1\"]"),
    )?;
    // The test runs on one address; a trusted peer's X-Forwarded-For stands in for clients.
    let mut seen = BTreeSet::new();
    for client in [
        "198.51.100.1",
        "198.51.100.2",
        "203.0.113.7",
        "192.0.2.99",
        "192.0.2.100",
        "192.0.2.101",
    ] {
        let mut pids = BTreeSet::new();
        for _ in 0..5 {
            let mut conn = Conn::open(corral.addr)?;
            let response = conn.request("GET", "/whoami", &[("X-Forwarded-For", client)], &[])?;
            pids.insert(response.json()["pid"].as_u64().unwrap_or(0));
        }
        assert_eq!(pids.len(), 1, "client {client} was spread over {pids:?}");
        seen.extend(pids);
    }
    assert!(
        seen.len() >= 2,
        "different clients should not all share one worker: {seen:?}"
    );
    Ok(())
}

#[test]
fn websocket_frames_flow_both_ways_through_corral() -> TestResult {
    let corral = Corral::start(Options::default().instances(2))?;
    let mut pids = BTreeSet::new();
    let mut sockets = Vec::new();
    for _ in 0..2 {
        let mut ws = ws_open(corral.addr)?;
        let hello = ws_read(&mut ws)?;
        pids.insert(hello.clone());
        for i in 0..5 {
            ws.send_raw(&ws_frame(&format!("message {i}")))?;
            assert_eq!(ws_read(&mut ws)?, format!("echo message {i}"));
        }
        sockets.push(ws);
    }
    assert_eq!(pids.len(), 2, "two handshakes are balanced over two workers: {pids:?}");
    // Open tunnels count as in flight.
    poll_until(DEADLINE, "tunnels in status", || {
        let busy: u64 = corral.total("in_flight")?;
        (busy == 2).then_some(())
    })?;
    drop(sockets);
    poll_until(DEADLINE, "closed tunnels to leave status", || {
        let busy: u64 = corral.total("in_flight")?;
        (busy == 0).then_some(())
    })?;
    Ok(())
}

#[test]
fn a_tunnel_on_an_old_worker_is_closed_at_drain_timeout_on_reload() -> TestResult {
    let corral = Corral::start(Options::default().instances(1).key("drain_timeout = \"1s\""))?;
    let mut ws = ws_open(corral.addr)?;
    let hello = ws_read(&mut ws)?;
    let reload = corral.cli(&["reload"])?;
    assert!(reload.status.success(), "{}", String::from_utf8_lossy(&reload.stderr));
    assert!(ws.read_to_close()?.is_empty(), "the tunnel is closed, not fed");
    let mut again = ws_open(corral.addr)?;
    assert_ne!(ws_read(&mut again)?, hello, "a new handshake reaches the new worker");
    Ok(())
}

#[test]
fn a_worker_killed_under_load_fails_no_request() -> TestResult {
    let corral = Corral::start(Options::default().instances(2))?;
    let victim = *corral.online_pids()?.iter().next().ok_or("no worker")?;
    let load = Load::start(corral.addr, 3, 1);
    poll_until(DEADLINE, "the load to reach both workers", || {
        let workers = corral.workers().ok()?;
        workers
            .iter()
            .all(|w| w["requests"].as_u64().unwrap_or(0) > 20)
            .then_some(())
    })?;
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL)?;
    poll_until(DEADLINE, "a replacement worker", || {
        let pids = corral.online_pids().ok()?;
        (pids.len() == 2 && !pids.contains(&victim)).then_some(())
    })?;
    corral.wait_for_requests(50)?;
    let tally = load.finish();
    assert_eq!(
        tally.failed,
        0,
        "failed requests: {:?}\n{}",
        tally.failures,
        corral.logs()
    );
    assert!(tally.ok > 100);
    Ok(())
}

#[test]
fn least_conn_steers_new_requests_away_from_a_busy_worker() -> TestResult {
    let corral = Corral::start(Options::default().instances(2).key("balance = \"least_conn\""))?;
    // Three slow requests: least_conn puts them 2 + 1 (or spreads them), then every new
    // request avoids the worker holding more of them.
    let addr = corral.addr;
    let slow: Vec<_> = (0..3)
        .map(|_| std::thread::spawn(move || get(addr, "/slow?ms=3000")))
        .collect();
    let busy = poll_until(DEADLINE, "the slow requests in flight", || {
        let workers = corral.workers().ok()?;
        let total: u64 = workers.iter().filter_map(|w| w["in_flight"].as_u64()).sum();
        (total == 3).then_some(workers)
    })?;
    let loads: Vec<(u64, u64)> = busy
        .iter()
        .map(|w| (w["in_flight"].as_u64().unwrap_or(0), w["pid"].as_u64().unwrap_or(0)))
        .collect();
    let idler = loads.iter().min().map(|(_, pid)| *pid).ok_or("workers")?;
    let (fewest, most) = (
        loads.iter().map(|l| l.0).min().unwrap_or(0),
        loads.iter().map(|l| l.0).max().unwrap_or(0),
    );
    assert!(most - fewest <= 1, "least_conn spread the slow requests: {loads:?}");
    if fewest < most {
        for _ in 0..6 {
            assert_eq!(
                get(addr, "/whoami")?.json()["pid"],
                idler,
                "a new request went to the busier worker ({loads:?})"
            );
        }
    }
    for handle in slow {
        assert_eq!(handle.join().map_err(|_| "client panicked")??.text(), "slow done");
    }
    Ok(())
}

#[test]
fn open_tunnels_are_closed_when_corral_stops() -> TestResult {
    let mut corral = Corral::start(Options::default().instances(1).key("drain_timeout = \"5s\""))?;
    let mut ws = ws_open(corral.addr)?;
    ws_read(&mut ws)?;
    corral.signal(Signal::SIGTERM)?;
    // Until the drain deadline the tunnel still works.
    ws.send_raw(&ws_frame("still there?"))?;
    assert_eq!(ws_read(&mut ws)?, "echo still there?");
    assert_eq!(corral.wait_exit(DEADLINE)?.code(), Some(0), "{}", corral.logs());
    assert!(
        ws.read_to_close()?.is_empty(),
        "the tunnel is closed at the end of the drain"
    );
    Ok(())
}
