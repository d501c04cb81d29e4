//! `reload_keep_old = false` through the real binary: the worker count a reload peaks at (the
//! front process's children, sampled throughout), and a reload that a failing build stops
//! partway, with the slots it left on the old command.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use support::load::Load;
use support::{alive, poll_until, Corral, Options, TestResult, DEADLINE};

/// How many live (not zombie) processes have `parent` as their parent now.
fn children_of(parent: u32) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // After the parenthesised command name: state, ppid, ...
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let mut fields = rest.split_whitespace();
            let state = fields.next();
            let ppid = fields.next().and_then(|p| p.parse::<u32>().ok());
            ppid == Some(parent) && !matches!(state, Some("Z") | Some("X"))
        })
        .count()
}

/// Samples the number of corral's child processes (its workers) on a thread of its own, every
/// few milliseconds, and keeps the largest.
struct Peak {
    most: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    sampler: Option<JoinHandle<()>>,
}

impl Peak {
    fn start(parent: u32) -> Peak {
        let most = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (most, stop) = (Arc::clone(&most), Arc::clone(&stop));
            std::thread::spawn(move || {
                // Bounded whatever the test does.
                let started = std::time::Instant::now();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                    most.fetch_max(children_of(parent), Ordering::Relaxed);
                    // The sampling period, not a wait for anything: a worker lives far longer.
                    std::thread::park_timeout(Duration::from_millis(2));
                }
            })
        };
        Peak {
            most,
            stop,
            sampler: Some(sampler),
        }
    }

    /// The most seen since the last call, starting over.
    fn take(&self) -> usize {
        self.most.swap(0, Ordering::Relaxed)
    }
}

impl Drop for Peak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(sampler) = self.sampler.take() {
            let _panicked = sampler.join();
        }
    }
}

/// Runs `corral reload` while polling `corral status`; returns whether it succeeded, its
/// output, and the fewest workers online in any status seen meanwhile.
fn reload_watching(corral: &Corral) -> Result<(bool, String, usize), Box<dyn std::error::Error>> {
    let mut reload = corral
        .command(&["reload"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut fewest = usize::MAX;
    let done = poll_until(Duration::from_secs(90), "the reload to finish", || {
        if let Ok(workers) = corral.workers() {
            fewest = fewest.min(workers.iter().filter(|w| w["state"] == "online").count());
        }
        reload.try_wait().ok().flatten()
    });
    if done.is_err() {
        let _already_gone = reload.kill();
    }
    let status = done.map_err(|e| corral.explain(e))?;
    let output = reload.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((status.success(), text, fewest))
}

/// The first app's online workers by slot: (pid, generation).
fn online_by_slot(corral: &Corral) -> Result<BTreeMap<u64, (u64, u64)>, Box<dyn std::error::Error>> {
    Ok(corral
        .workers()?
        .iter()
        .filter(|w| w["state"] == "online")
        .filter_map(|w| Some((w["slot"].as_u64()?, (w["pid"].as_u64()?, w["generation"].as_u64()?))))
        .collect())
}

#[test]
fn without_keep_old_a_reload_peaks_at_n_plus_reload_batch_workers_and_fails_no_request() -> TestResult {
    let n = 3;
    let options = Options::default().instances(n).key("reload_keep_old = false");
    let corral = Corral::start(options.clone())?;
    let peak = Peak::start(corral.pid());
    let load = Load::start(corral.addr, 3, 1);
    let mut figures = Vec::new();

    // reload_keep_old = false, one slot at a time, then two; and the default, which keeps all
    // the old workers until every slot is replaced: 2N.
    let rounds: [(Options, usize, &str); 3] = [
        (options.clone(), n + 1, "reload_keep_old = false, reload_batch = 1"),
        (
            options.clone().key("reload_batch = 2"),
            n + 2,
            "reload_keep_old = false, reload_batch = 2",
        ),
        (
            Options::default().instances(n),
            2 * n,
            "the default (reload_keep_old = true)",
        ),
    ];
    for (round, (config, expected, what)) in rounds.into_iter().enumerate() {
        corral.rewrite_config(&config)?;
        let before = corral.online_pids()?;
        assert_eq!(
            children_of(corral.pid()),
            n,
            "{what}: only the workers run before the reload"
        );
        peak.take();
        let (ok, text, fewest) = reload_watching(&corral)?;
        let most = peak.take();
        figures.push(format!("{what}: peak {most} workers"));
        assert!(ok, "{what}: the reload failed:\n{text}\n{}", corral.logs());
        assert!(
            most <= expected,
            "{what}: {most} workers ran at once, more than {expected}\n{text}"
        );
        // The sampler sees what it should: the peak is reached (a new worker boots beside the
        // old ones for a Node process's start-up time, far longer than a sample).
        assert_eq!(most, expected, "{what}: the peak was {most}, not {expected}\n{text}");
        assert!(
            fewest >= n,
            "{what}: only {fewest} workers were online at one point\n{text}"
        );
        let after = corral.online_pids()?;
        assert_eq!(after.len(), n);
        assert!(before.is_disjoint(&after), "{what}: {before:?} -> {after:?}");
        for pid in &before {
            assert!(!alive(*pid), "{what}: old worker {pid} is still running");
        }
        let workers = corral.workers()?;
        assert!(
            workers.iter().all(|w| w["generation"] == round as u64 + 2),
            "{what}: {workers:?}"
        );
    }

    corral.wait_for_requests(50)?;
    let tally = load.finish();
    eprintln!("observed: {}", figures.join("; "));
    assert_eq!(
        tally.failed,
        0,
        "failed requests during the reloads: {:?}\n{}",
        tally.failures,
        corral.logs()
    );
    assert!(tally.ok > 100, "the load barely ran: {tally:?}");
    Ok(())
}

/// Starts `n` workers with `reload_keep_old = false` (of `old`, the fixture script to run),
/// then reloads to `app.js` reading `crash_file`, which makes `crash_slots` crash at boot.
fn reload_to_a_build_failing_on(
    n: usize,
    old: &str,
    crash_file: &Path,
    crash_slots: &str,
) -> Result<(Corral, String), Box<dyn std::error::Error>> {
    let keys = |options: Options| options.instances(n).key("reload_keep_old = false");
    let corral = Corral::start(keys(Options::default().fixture(old)))?;
    std::fs::write(crash_file, crash_slots)?;
    let crash_file = crash_file.display().to_string();
    corral.rewrite_config(&keys(Options::default()).env("FIXTURE_CRASH_FILE", &crash_file))?;
    let (ok, text, fewest) = reload_watching(&corral)?;
    assert!(!ok, "a build failing on slots {crash_slots} was accepted:\n{text}");
    assert!(fewest >= n, "only {fewest} workers were online at one point\n{text}");
    Ok((corral, text))
}

#[test]
fn without_keep_old_a_build_failing_midway_stops_where_it_is_and_says_which_slot_runs_what() -> TestResult {
    let dir = tempfile::tempdir()?;
    let crash_file = dir.path().join("crash-slots");
    // Slot 0's new worker comes up; slot 1's crashes at boot.
    let n = 3;
    let options = Options::default().instances(n).key("reload_keep_old = false");
    let corral = Corral::start(options.clone())?;
    let before = online_by_slot(&corral)?;
    std::fs::write(&crash_file, "1 2")?;
    let broken = options
        .clone()
        .env("FIXTURE_CRASH_FILE", &crash_file.display().to_string());
    corral.rewrite_config(&broken)?;
    let load = Load::start(corral.addr, 3, 1);
    let (ok, text, fewest) = reload_watching(&corral)?;
    corral.wait_for_requests(20)?;
    let tally = load.finish();

    assert!(!ok, "a failing build was accepted:\n{text}");
    for needle in [
        "stopped where it was",
        "web:0 runs the new command (generation 2)",
        "web:1 web:2 still run the old one (generation 1)",
        // The failing worker's exit and last output lines, as with a rollback.
        "(slot 1) exited with code 1 before it was ready",
        "fixture: slot 1 crashing at boot",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    assert!(!text.contains("rolled back: the new workers"), "{text}");
    assert_eq!(
        tally.failed, 0,
        "failed requests during the reload: {:?}",
        tally.failures
    );
    assert!(fewest >= n, "only {fewest} workers were online at one point");

    // Slot 0 runs the new generation, the others the old workers they had; the replaced old
    // worker is gone, and so is the new worker that never came up.
    let after = poll_until(DEADLINE, "slot 1's failed new worker to be gone", || {
        let workers = corral.workers().ok()?;
        (workers.len() == n).then_some(())?;
        online_by_slot(&corral).ok().filter(|slots| slots.len() == n)
    })
    .map_err(|e| corral.explain(e))?;
    assert_eq!(after[&0].1, 2, "{after:?}");
    assert_ne!(after[&0].0, before[&0].0);
    assert!(!alive(before[&0].0 as u32), "the replaced old worker still runs");
    assert_eq!((after[&1], after[&2]), (before[&1], before[&2]), "{after:?}");
    let status = corral.status().ok_or("status")?;
    assert_eq!(status["reloading"], false);
    assert_eq!(status["last_reload"]["ok"], false, "{status}");
    assert_eq!(status["apps"][0]["reloads"]["partial"], 1, "{status}");

    // A crash of a slot left on the old command restarts the old command (still on disk).
    let (old_pid, _) = after[&2];
    kill(Pid::from_raw(old_pid as i32), Signal::SIGKILL)?;
    let restarted = replaced(&corral, 2, old_pid)?;
    assert_eq!(restarted.1, 1, "slot 2 must restart the old generation: {restarted:?}");

    // The fixed build goes everywhere, one generation on.
    std::fs::remove_file(&crash_file)?;
    let (ok, text, _) = reload_watching(&corral)?;
    assert!(ok, "{text}\n{}", corral.logs());
    let fixed = online_by_slot(&corral)?;
    assert!(fixed.values().all(|&(_, generation)| generation == 3), "{fixed:?}");
    assert_eq!(fixed.len(), n);
    Ok(())
}

#[test]
fn without_keep_old_a_slot_whose_old_script_is_gone_restarts_with_the_new_command() -> TestResult {
    let dir = tempfile::tempdir()?;
    let old_script = dir.path().join("old.js");
    std::fs::copy(support::fixture("app.js"), &old_script)?;
    let crash_file = dir.path().join("crash-slots");
    let (corral, text) = reload_to_a_build_failing_on(2, &old_script.display().to_string(), &crash_file, "1")?;
    assert!(
        text.contains("web:0 runs the new command (generation 2); web:1 still runs the old one (generation 1)"),
        "{text}"
    );
    let slots = poll_until(DEADLINE, "slot 0 on generation 2 and slot 1 on 1", || {
        let slots = online_by_slot(&corral).ok()?;
        (slots.get(&0)?.1 == 2 && slots.get(&1)?.1 == 1 && corral.workers().ok()?.len() == 2).then_some(slots)
    })
    .map_err(|e| corral.explain(e))?;

    // The deploy removes the old build; the new one is fixed on disk. Slot 1's old worker
    // crashes: its command cannot run again, so the slot moves to the new generation.
    std::fs::remove_file(&old_script)?;
    std::fs::remove_file(&crash_file)?;
    let (old_pid, _) = slots[&1];
    kill(Pid::from_raw(old_pid as i32), Signal::SIGKILL)?;
    let moved = replaced(&corral, 1, old_pid)?;
    assert_eq!(moved.1, 2, "{moved:?}");
    let logs = corral.logs();
    let missing = format!("{} no longer exists on disk", old_script.display());
    assert!(logs.contains(&missing), "{missing:?} not logged:\n{logs}");
    let workers = corral.workers()?;
    let slot_1: Vec<&Value> = workers.iter().filter(|w| w["slot"] == 1).collect();
    let last_exit = slot_1.first().and_then(|w| w["last_exit"].as_str()).unwrap_or_default();
    assert!(
        last_exit.contains(&missing) && last_exit.contains("runs generation 2"),
        "status does not say why slot 1 moved: {workers:?}"
    );
    Ok(())
}

#[test]
fn without_keep_old_a_build_failing_on_the_first_slot_changes_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let crash_file = dir.path().join("crash-slots");
    let (corral, text) = reload_to_a_build_failing_on(2, "app.js", &crash_file, "0")?;
    assert!(
        text.contains("stopped before any slot was replaced")
            && text.contains("web:0 web:1 still run the old command (generation 1)"),
        "{text}"
    );
    poll_until(DEADLINE, "both slots on generation 1, and nothing else", || {
        let slots = online_by_slot(&corral).ok()?;
        let both = slots.len() == 2 && slots.values().all(|&(_, generation)| generation == 1);
        (both && corral.workers().ok()?.len() == 2).then_some(())
    })
    .map_err(|e| corral.explain(e))?;
    let status = corral.status().ok_or("status")?;
    assert_eq!(status["apps"][0]["reloads"]["rolled_back"], 1, "{status}");
    // Nothing was replaced, so the next reload is generation 2.
    std::fs::remove_file(&crash_file)?;
    let (ok, text, _) = reload_watching(&corral)?;
    assert!(ok, "{text}\n{}", corral.logs());
    let fixed = online_by_slot(&corral)?;
    assert!(fixed.values().all(|&(_, generation)| generation == 2), "{fixed:?}");
    Ok(())
}

/// Waits until `slot` runs a worker other than `old_pid`: its (pid, generation).
fn replaced(corral: &Corral, slot: u64, old_pid: u64) -> Result<(u64, u64), Box<dyn std::error::Error>> {
    poll_until(DEADLINE, &format!("slot {slot} to run a new worker"), || {
        let slots = online_by_slot(corral).ok()?;
        slots.get(&slot).copied().filter(|&(pid, _)| pid != old_pid)
    })
    .map_err(|e| corral.explain(e))
}
