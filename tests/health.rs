//! Health: passive (a worker refusing connections) and active (`health_check`).

mod support;

use std::net::SocketAddr;

use support::http::get;
use support::load::Load;
use support::{alive, poll_until, Corral, Options, TestResult, DEADLINE};

fn worker_addr(worker: &serde_json::Value) -> Result<SocketAddr, Box<dyn std::error::Error>> {
    let port = worker["port"].as_u64().ok_or("worker port")? as u16;
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

fn state_of(corral: &Corral, pid: u64) -> Option<String> {
    let workers = corral.workers().ok()?;
    workers
        .iter()
        .find(|w| w["pid"] == pid)
        .and_then(|w| w["state"].as_str().map(str::to_owned))
}

#[test]
fn a_worker_that_refuses_connections_leaves_rotation_and_returns() -> TestResult {
    let corral = Corral::start(Options::default().instances(2).key("listen_timeout = \"20s\""))?;
    let workers = corral.workers()?;
    let (victim, other) = (&workers[0], &workers[1]);
    let victim_pid = victim["pid"].as_u64().ok_or("pid")?;
    let load = Load::start(corral.addr, 2, 1);
    assert_eq!(get(worker_addr(victim)?, "/stop-listening?ms=3000")?.status, 200);

    poll_until(DEADLINE, "the refusing worker to leave rotation", || {
        (state_of(&corral, victim_pid)? == "unreachable").then_some(())
    })
    .map_err(|e| corral.explain(e))?;
    for _ in 0..6 {
        assert_eq!(get(corral.addr, "/whoami")?.json()["pid"], other["pid"]);
    }
    poll_until(DEADLINE, "the worker to return", || {
        (state_of(&corral, victim_pid)? == "online").then_some(())
    })?;
    let tally = load.finish();
    assert_eq!(tally.failed, 0, "failed requests: {:?}", tally.failures);
    assert!(corral.logs().contains("out of rotation until it accepts again"));
    Ok(())
}

#[test]
fn a_failing_health_check_takes_a_worker_out_and_a_passing_one_brings_it_back() -> TestResult {
    let check =
        "health_check = { path = \"/health\", interval = \"100ms\", timeout = \"1s\", unhealthy_threshold = 100 }";
    let corral = Corral::start(Options::default().instances(2).key(check))?;
    let workers = corral.workers()?;
    let (sick, other) = (&workers[0], &workers[1]);
    let sick_pid = sick["pid"].as_u64().ok_or("pid")?;
    get(worker_addr(sick)?, "/make-unhealthy")?;
    poll_until(DEADLINE, "the worker to be marked unhealthy", || {
        (state_of(&corral, sick_pid)? == "unhealthy").then_some(())
    })?;
    for _ in 0..6 {
        assert_eq!(
            get(corral.addr, "/whoami")?.json()["pid"],
            other["pid"],
            "an unhealthy worker got a request"
        );
    }
    get(worker_addr(sick)?, "/make-healthy")?;
    poll_until(DEADLINE, "the worker back in rotation", || {
        (state_of(&corral, sick_pid)? == "online").then_some(())
    })?;
    Ok(())
}

#[test]
fn a_worker_past_the_unhealthy_threshold_is_replaced_without_failing_a_request() -> TestResult {
    let check =
        "health_check = { path = \"/health\", interval = \"100ms\", timeout = \"1s\", unhealthy_threshold = 3 }";
    let corral = Corral::start(Options::default().instances(2).key(check))?;
    let workers = corral.workers()?;
    let sick = &workers[0];
    let (sick_pid, sick_slot) = (sick["pid"].as_u64().ok_or("pid")?, sick["slot"].clone());
    let load = Load::start(corral.addr, 2, 1);
    get(worker_addr(sick)?, "/make-unhealthy")?;
    let replacement = poll_until(DEADLINE, "a replacement in the slot", || {
        let workers = corral.workers().ok()?;
        let new = workers
            .iter()
            .find(|w| w["slot"] == sick_slot && w["state"] == "online" && w["pid"] != sick_pid)?;
        new["pid"].as_u64()
    })
    .map_err(|e| corral.explain(e))?;
    poll_until(DEADLINE, "the unhealthy worker to stop", || {
        (!alive(sick_pid as u32)).then_some(())
    })?;
    let tally = load.finish();
    assert_eq!(tally.failed, 0, "failed requests: {:?}", tally.failures);
    assert!(corral.online_pids()?.contains(&(replacement as u32)));
    assert!(corral.logs().contains("health checks in a row; replacing it"));
    Ok(())
}
