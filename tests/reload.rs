//! Rolling reload through the real binary, under load: `corral reload` and SIGHUP.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use support::http::{get, Conn};
use support::load::Load;
use support::{alive, poll_until, Corral, Options, TestResult, DEADLINE};

fn reload(corral: &Corral) -> Result<(bool, String), Box<dyn std::error::Error>> {
    let output = corral.cli(&["reload"])?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((output.status.success(), text))
}

#[test]
fn two_reloads_back_to_back_under_load_fail_no_request_and_replace_every_worker() -> TestResult {
    let corral = Corral::start(Options::default().instances(2))?;
    let first = corral.online_pids()?;
    let load = Load::start(corral.addr, 3, 1);

    let (ok, text) = reload(&corral)?;
    assert!(ok, "first reload failed:\n{text}\n{}", corral.logs());
    let second = corral.online_pids()?;
    let (ok, text) = reload(&corral)?;
    assert!(ok, "second reload failed:\n{text}\n{}", corral.logs());
    assert!(text.contains("reload done: 2 worker(s) replaced"), "{text}");
    let third = corral.online_pids()?;

    // Keep the load going a moment on the final generation before counting.
    corral.wait_for_requests(50)?;
    let tally = load.finish();
    assert_eq!(
        tally.failed,
        0,
        "failed requests during reloads: {:?}\n{}",
        tally.failures,
        corral.logs()
    );
    assert!(tally.ok > 100, "the load barely ran: {tally:?}");

    assert_eq!((first.len(), second.len(), third.len()), (2, 2, 2));
    assert!(
        first.is_disjoint(&second) && second.is_disjoint(&third) && first.is_disjoint(&third),
        "{first:?} {second:?} {third:?}"
    );
    for pid in first.iter().chain(&second) {
        assert!(!alive(*pid), "old worker {pid} is still running");
    }
    let workers = corral.workers()?;
    assert!(workers.iter().all(|w| w["generation"] == 3), "{workers:?}");
    Ok(())
}

fn assert_rolled_back(corral: &Corral, before: &BTreeSet<u32>, text: &str) -> TestResult {
    assert_eq!(
        &corral.online_pids()?,
        before,
        "the old workers must keep serving\n{text}"
    );
    let status = corral.status().ok_or("status")?;
    assert_eq!(status["reloading"], false);
    assert_eq!(status["last_reload"]["ok"], false, "{status}");
    let table = String::from_utf8_lossy(&corral.cli(&["status"])?.stdout).into_owned();
    assert!(table.contains("last reload FAILED"), "{table}");
    // No worker of the failed generation is left once the rollback settles.
    poll_until(DEADLINE, "the failed workers to be gone", || {
        corral
            .workers()
            .ok()?
            .iter()
            .all(|w| w["generation"] == 1)
            .then_some(())
    })?;
    Ok(())
}

/// Reloads to a build whose workers misbehave as `boot` says, under load, and checks the
/// rollback: non-zero exit within `listen_timeout` plus a margin, nothing failed, old pids serve.
/// Returns how long the failed reload took.
fn reload_to_a_broken_build(
    boot: &str,
    listen_timeout_s: u64,
    expected: &[&str],
) -> Result<Duration, Box<dyn std::error::Error>> {
    let options = Options::default()
        .instances(2)
        .key(&format!("listen_timeout = \"{listen_timeout_s}s\""));
    let corral = Corral::start(options.clone())?;
    let before = corral.online_pids()?;
    corral.rewrite_config(&options.env("FIXTURE_BOOT", boot))?;
    let load = Load::start(corral.addr, 2, 1);

    let started = Instant::now();
    let (ok, text) = reload(&corral)?;
    let took = started.elapsed();
    let tally = load.finish();
    assert!(!ok, "a broken build ({boot}) was accepted:\n{text}");
    assert!(
        took < Duration::from_secs(listen_timeout_s + 20),
        "the reload took {took:?}"
    );
    for needle in expected.iter().chain(&["rolled back"]) {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    assert_eq!(
        tally.failed, 0,
        "failed requests during the attempt: {:?}",
        tally.failures
    );
    assert_rolled_back(&corral, &before, &text)?;
    Ok(took)
}

#[test]
fn a_build_that_crashes_at_boot_is_rolled_back_without_failing_a_request() -> TestResult {
    // The failing worker's exit status and last output lines are shown.
    reload_to_a_broken_build(
        "crash",
        5,
        &[
            "exited with code 1 before it was ready",
            "fixture: crashing at boot as asked",
        ],
    )?;
    Ok(())
}

#[test]
fn a_build_that_never_listens_is_rolled_back_at_listen_timeout() -> TestResult {
    // The report carries the worker's first output line, so listen_timeout leaves a Node
    // process on a loaded machine the time to print it (with 2 s, one could still be starting).
    let listen_timeout_s = 5;
    let started = Instant::now();
    reload_to_a_broken_build(
        "never-listen",
        listen_timeout_s,
        &["within listen_timeout", "fixture: not listening, as asked"],
    )?;
    // A timeout never counts as ready: the attempt lasted at least listen_timeout.
    assert!(started.elapsed() >= Duration::from_secs(listen_timeout_s));
    Ok(())
}

#[test]
fn a_broken_config_changes_nothing() -> TestResult {
    let corral = Corral::start(Options::default().instances(2))?;
    let before = corral.online_pids()?;
    std::fs::write(&corral.config, "[[app]]\nname = \"web\ncommand = [\n")?;
    let (ok, text) = reload(&corral)?;
    assert!(!ok);
    assert!(
        text.contains("TOML syntax error") && text.contains("nothing was changed"),
        "{text}"
    );
    assert_eq!(corral.online_pids()?, before);
    assert_eq!(get(corral.addr, "/whoami")?.status, 200);
    // (A new listen address hands over to a new corral process: tests/upgrade.rs.)
    Ok(())
}

#[test]
fn sighup_reloads_like_the_command() -> TestResult {
    let options = Options::default().instances(2);
    let corral = Corral::start(options.clone())?;
    let before = corral.online_pids()?;
    corral.rewrite_config(&options.instances(3))?;
    corral.signal(Signal::SIGHUP)?;
    let after = poll_until(DEADLINE, "the SIGHUP reload to finish", || {
        let status = corral.status()?;
        (status["last_reload"]["ok"] == true).then_some(())?;
        let pids = corral.online_pids().ok()?;
        (pids.len() == 3).then_some(pids)
    })
    .map_err(|e| corral.explain(e))?;
    assert!(before.is_disjoint(&after), "{before:?} -> {after:?}");
    for pid in before {
        poll_until(DEADLINE, "an old worker to exit", || (!alive(pid)).then_some(()))?;
    }
    Ok(())
}

#[test]
fn a_slow_request_on_an_old_worker_completes_and_a_second_reload_is_refused_meanwhile() -> TestResult {
    let corral = Corral::start(Options::default().instances(1))?;
    let old = corral.online_pids()?;
    let addr = corral.addr;
    let slow = std::thread::spawn(move || get(addr, "/slow?ms=3000"));
    poll_until(DEADLINE, "the slow request to be in flight", || {
        (corral.total("in_flight")? == 1).then_some(())
    })?;

    let first = corral
        .command(&["reload"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    poll_until(DEADLINE, "the old worker to drain", || {
        corral
            .workers()
            .ok()?
            .iter()
            .any(|w| w["state"] == "draining")
            .then_some(())
    })?;
    let (ok, text) = reload(&corral)?;
    assert!(
        !ok && text.contains("already running"),
        "a concurrent reload must be refused: {text}"
    );

    let response = slow.join().map_err(|_| "client panicked")??;
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), "slow done");
    let output = first.wait_with_output()?;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let new = corral.online_pids()?;
    assert!(old.is_disjoint(&new));
    Ok(())
}

#[test]
fn an_sse_stream_on_an_old_worker_ends_cleanly_at_drain_timeout_and_reconnects_to_a_new_one() -> TestResult {
    let corral = Corral::start(Options::default().instances(2).key("drain_timeout = \"1s\""))?;
    let old = corral.online_pids()?;
    let mut stream = Conn::open(corral.addr)?;
    stream.send("GET", "/sse", &[], &[])?;
    assert_eq!(stream.read_head()?.0, 200);
    let first = stream.read_chunk()?.ok_or("no first event")?;
    assert!(String::from_utf8_lossy(&first).contains("\"n\":0"));

    let (ok, text) = reload(&corral)?;
    assert!(ok, "{text}\n{}", corral.logs());
    // The stream ends with the terminating chunk, not a reset: EventSource reconnects.
    loop {
        match stream.read_chunk()? {
            None => break,
            Some(_event) => continue,
        }
    }
    let new = corral.online_pids()?;
    assert!(old.is_disjoint(&new));
    let mut again = Conn::open(corral.addr)?;
    again.send("GET", "/sse", &[], &[])?;
    assert_eq!(again.read_head()?.0, 200);
    let event = String::from_utf8_lossy(&again.read_chunk()?.ok_or("no event")?).into_owned();
    let pid: u32 = event
        .split("\"pid\":")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.parse().ok())
        .ok_or("pid")?;
    assert!(new.contains(&pid), "reconnected to {pid}, not one of {new:?}");
    Ok(())
}

#[test]
fn an_old_worker_that_ignores_the_stop_signal_is_killed_after_kill_timeout() -> TestResult {
    let corral = Corral::start(
        Options::default()
            .instances(1)
            .key("kill_timeout = \"1s\"")
            .env("FIXTURE_IGNORE_TERM", "1"),
    )?;
    let old = corral.online_pids()?;
    let (ok, text) = reload(&corral)?;
    assert!(ok, "{text}");
    for pid in old {
        assert!(!alive(pid), "worker {pid} survived");
    }
    let logs = corral.logs();
    assert!(logs.contains("did not exit within kill_timeout"), "{logs}");
    assert!(logs.contains("was killed by SIGKILL"), "{logs}");
    Ok(())
}

#[test]
fn restart_replaces_every_worker_with_the_running_config_under_load_and_reads_no_file() -> TestResult {
    let corral = Corral::start(Options::default().instances(2))?;
    let before = corral.online_pids()?;
    // The file is broken now: a restart does not read it.
    std::fs::write(&corral.config, "[[app]]\nname = \"web\ncommand = [\n")?;
    let load = Load::start(corral.addr, 3, 1);
    let output = corral.cli(&["restart"])?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}\n{}", corral.logs());
    assert!(text.contains("restarting 1 app(s) with the config they run"), "{text}");
    corral.wait_for_requests(20)?;
    let tally = load.finish();
    assert_eq!(
        tally.failed, 0,
        "failed requests during the restart: {:?}",
        tally.failures
    );
    let after = corral.online_pids()?;
    assert_eq!(after.len(), 2);
    assert!(before.is_disjoint(&after), "{before:?} -> {after:?}");

    let output = corral.cli(&["restart", "nope"])?;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("there is no app named \"nope\""));
    Ok(())
}
