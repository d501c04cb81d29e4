//! Orphans re-parented to corral are reaped: as a subreaper, and as PID 1 of a PID namespace
//! (as in a container). The worker leaves a process behind that exits 200 ms later.

mod support;

use support::{poll_until, Corral, Options, PortHold, TestResult, DEADLINE};

/// (parent pid, state) of every process, from /proc.
fn processes() -> Vec<(u32, u32, char)> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let parent = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        all.push((pid, parent, state));
    }
    all
}

fn zombies_of(parent: u32) -> Vec<u32> {
    processes()
        .into_iter()
        .filter(|&(_, p, state)| p == parent && state == 'Z')
        .map(|(pid, ..)| pid)
        .collect()
}

#[test]
fn a_workers_orphan_comes_to_corral_and_is_reaped() -> TestResult {
    let corral = Corral::start(Options::default().instances(1).env("FIXTURE_DOUBLE_FORK", "1"))?;
    poll_until(DEADLINE, "corral to reap the orphan", || {
        corral.logs().contains("reaped orphaned processes").then_some(())
    })
    .map_err(|e| corral.explain(e))?;
    assert_eq!(zombies_of(corral.pid()), Vec::<u32>::new());
    // The worker itself is corral's to wait for (tokio's), and still serves.
    assert_eq!(support::http::get(corral.addr, "/whoami")?.status, 200);
    Ok(())
}

#[test]
fn as_pid_1_of_a_pid_namespace_corral_reaps_every_orphan_and_stops_cleanly() -> TestResult {
    let hold = PortHold::new()?;
    let options = Options::default().instances(2).env("FIXTURE_DOUBLE_FORK", "1");
    let mut corral = Corral::prepare(&options.config_text(hold.addr), hold.addr)?;
    corral.in_own_pid_namespace();
    hold.release();
    // --kill-child: if this test dies, so does the namespace's init, and with it everything.
    corral.launch(&["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"], &[])?;
    corral.wait_online(2)?;
    assert_eq!(corral.status().ok_or("status")?["pid"], 1, "not PID 1 of its namespace");
    poll_until(DEADLINE, "the orphans to be reaped", || {
        let logs = corral.logs();
        (logs.contains("running as PID 1") && logs.contains("reaped orphaned processes")).then_some(())
    })
    .map_err(|e| corral.explain(e))?;
    // corral's real pid: the child of `unshare`.
    let unshare = corral.pid();
    let init = poll_until(DEADLINE, "corral under unshare", || {
        processes()
            .into_iter()
            .find(|&(_, p, _)| p == unshare)
            .map(|(pid, ..)| pid)
    })?;
    poll_until(DEADLINE, "no zombie under corral", || {
        zombies_of(init).is_empty().then_some(())
    })?;
    assert_eq!(support::http::get(corral.addr, "/whoami")?.status, 200);
    // An upgrade would end the container (PID 1 could never exit): refused, nothing changes.
    let upgrade = corral.cli(&["upgrade"])?;
    let text = String::from_utf8_lossy(&upgrade.stderr);
    assert!(!upgrade.status.success() && text.contains("PID 1"), "{upgrade:?}");
    assert_eq!(corral.status().ok_or("status")?["pid"], 1);
    assert_eq!(support::http::get(corral.addr, "/whoami")?.status, 200);
    // SIGTERM to the namespace's init drains and stops like anywhere else.
    let stop = corral.cli(&["stop"])?;
    assert!(stop.status.success(), "{stop:?}");
    let exit = corral.wait_exit(DEADLINE)?;
    assert!(exit.success(), "{exit:?}");
    Ok(())
}
