//! Local hostile input: the runtime directory, the files in it, the control socket, what
//! workers inherit, and leftover cleanup after pid reuse. Through the real binary.

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use corral::leftovers::{self, Proc, State};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use support::{alive, poll_until, Corral, Options, PortHold, TestResult, DEADLINE};

/// A front process that cannot exist: above the kernel's largest `pid_max` (2^22).
const GONE: Proc = Proc {
    pid: 4_194_305,
    start: 1,
};

/// A harness whose `corral run` has not been started yet, on a held port.
fn prepared(options: &Options) -> Result<(Corral, PortHold), Box<dyn std::error::Error>> {
    support::require_node();
    let hold = PortHold::new()?;
    let corral = Corral::prepare(&options.config_text(hold.addr), hold.addr)?;
    Ok((corral, hold))
}

/// The control socket and state file paths corral uses for this harness.
fn socket_of(corral: &Corral) -> PathBuf {
    corral::control::socket_path_in(&corral.runtime_dir(), &corral.config)
}

fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs `corral run` (expected to refuse) and `corral status`, and checks both name `dir` and
/// `why`, and that no worker was started.
fn assert_refused(corral: &mut Corral, dir: &Path, why: &str) -> TestResult {
    corral.launch(&[], &[])?;
    let exit = corral.wait_exit(DEADLINE)?;
    let logs = corral.logs();
    assert!(!exit.success(), "corral run accepted the runtime dir:\n{logs}");
    let expected = format!("runtime directory {} {why}: refusing to use it", dir.display());
    assert!(logs.contains(&expected), "{expected:?} missing:\n{logs}");
    assert!(!logs.contains("starting workers"), "workers started:\n{logs}");
    assert!(!logs.contains("panicked"), "{logs}");

    let status = corral.cli(&["status"])?;
    let stderr = stderr_of(&status);
    assert_eq!(status.status.code(), Some(1), "status did not refuse: {stderr}");
    assert!(
        stderr.contains(&expected),
        "{expected:?} missing from status:\n{stderr}"
    );
    Ok(())
}

#[test]
fn a_runtime_dir_with_mode_0755_is_refused_by_run_and_status() -> TestResult {
    let (mut corral, _hold) = prepared(&Options::default().instances(1))?;
    let dir = corral.runtime_dir();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    assert_refused(&mut corral, &dir, "has mode 0755, not 0700")?;
    assert_eq!(
        std::fs::metadata(&dir)?.permissions().mode() & 0o7777,
        0o755,
        "corral changed a directory it did not create"
    );
    Ok(())
}

#[test]
fn a_symlinked_runtime_dir_is_refused() -> TestResult {
    let (mut corral, _hold) = prepared(&Options::default().instances(1))?;
    let dir = corral.runtime_dir();
    let real = corral.dir.path().join("elsewhere");
    std::fs::rename(&dir, &real)?;
    std::os::unix::fs::symlink(&real, &dir)?;
    assert_refused(&mut corral, &dir, "is a symbolic link")?;
    assert_eq!(
        std::fs::read_dir(&real)?.count(),
        0,
        "something was written through the link"
    );
    Ok(())
}

#[test]
fn a_runtime_dir_owned_by_another_uid_is_refused() -> TestResult {
    let euid = nix::unistd::geteuid().as_raw();
    if euid != 0 {
        eprintln!("SKIPPED: giving a directory to another uid needs root");
        return Ok(());
    }
    let (mut corral, _hold) = prepared(&Options::default().instances(1))?;
    let dir = corral.runtime_dir();
    nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(65534)), None)?;
    assert_refused(&mut corral, &dir, "is owned by uid 65534, not 0")
}

#[test]
fn a_control_socket_that_accepts_but_never_answers_makes_run_fail_not_hang() -> TestResult {
    let (mut corral, _hold) = prepared(&Options::default().instances(1))?;
    let socket = socket_of(&corral);
    // Listens (the kernel completes connections into the backlog) but never accepts or reads.
    let wedged = std::os::unix::net::UnixListener::bind(&socket)?;
    corral.launch(&[], &[])?;
    let exit = corral.wait_exit(DEADLINE)?;
    let logs = corral.logs();
    assert!(!exit.success(), "{logs}");
    let expected = format!(
        "another instance seems to be running but does not answer: {}",
        socket.display()
    );
    assert!(logs.contains(&expected), "{expected:?} missing:\n{logs}");
    assert!(!logs.contains("starting workers"), "{logs}");
    assert!(socket.exists(), "the socket someone listens on was removed");
    std::os::unix::net::UnixStream::connect(&socket)?;
    drop(wedged);
    Ok(())
}

#[test]
fn a_missing_runtime_dir_is_created_0700_and_status_says_not_running_before() -> TestResult {
    let (mut corral, hold) = prepared(&Options::default().instances(1))?;
    let dir = corral.runtime_dir();
    std::fs::remove_dir(&dir)?;
    let status = corral.cli(&["status"])?;
    assert_eq!(status.status.code(), Some(3), "{}", stderr_of(&status));
    assert!(!dir.exists(), "status created the runtime dir");

    corral.launch(&[], &[])?;
    corral.wait_online(1)?;
    hold.release();
    let mode = |p: &Path| -> std::io::Result<u32> { Ok(std::fs::symlink_metadata(p)?.permissions().mode() & 0o7777) };
    assert_eq!(mode(&dir)?, 0o700);
    assert_eq!(mode(&socket_of(&corral))?, 0o600, "control socket");
    let state = leftovers::path_for(&socket_of(&corral));
    poll_until(DEADLINE, "the state file", || state.exists().then_some(()))?;
    assert_eq!(mode(&state)?, 0o600, "state file");
    corral.signal(Signal::SIGTERM)?;
    assert_eq!(corral.wait_exit(DEADLINE)?.code(), Some(0));
    Ok(())
}

#[test]
fn a_planted_tmp_link_does_not_redirect_the_state_file_write() -> TestResult {
    let (corral, hold) = prepared(&Options::default().instances(1))?;
    let state = leftovers::path_for(&socket_of(&corral));
    let tmp = leftovers::tmp_path(&state);
    let victim = corral.dir.path().join("victim");
    std::fs::write(&victim, b"precious")?;
    std::os::unix::fs::symlink(&victim, &tmp)?;

    corral.launch(&[], &[])?;
    let workers = corral.wait_online(1)?;
    hold.release();
    let pid = workers[0]["pid"].as_u64().ok_or("no pid")? as u32;
    let saved: State = poll_until(DEADLINE, "the state file to list the worker", || {
        let saved: State = serde_json::from_slice(&std::fs::read(&state).ok()?).ok()?;
        saved.workers.iter().any(|w| w.pid == pid).then_some(saved)
    })?;
    assert_eq!(saved.front.pid, corral.pid());
    assert_eq!(std::fs::read(&victim)?, b"precious", "the link's target was written");
    assert!(
        std::fs::symlink_metadata(&tmp).is_err(),
        "the planted link is still there"
    );
    assert!(!std::fs::symlink_metadata(&state)?.file_type().is_symlink());
    Ok(())
}

#[test]
fn workers_do_not_inherit_notify_socket_and_corral_still_notifies() -> TestResult {
    let (corral, hold) = prepared(&Options::default().instances(1))?;
    let sockets = tempfile::tempdir()?;
    let notify_path = sockets.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path)?;
    notify.set_read_timeout(Some(DEADLINE))?;
    let notify_env = notify_path.to_string_lossy().into_owned();
    corral.launch(&[], &[("NOTIFY_SOCKET", &notify_env)])?;
    let mut buffer = [0u8; 512];
    let n = notify.recv(&mut buffer)?;
    let ready = String::from_utf8_lossy(&buffer[..n]).into_owned();
    assert!(ready.starts_with("READY=1"), "{ready}");
    hold.release();

    let workers = corral.wait_online(1)?;
    let pid = workers[0]["pid"].as_u64().ok_or("no pid")?;
    let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
    let entries: Vec<String> = environ
        .split(|&b| b == 0)
        .map(|e| String::from_utf8_lossy(e).into_owned())
        .collect();
    assert!(
        !entries.iter().any(|e| e.starts_with("NOTIFY_SOCKET=")),
        "the worker inherited NOTIFY_SOCKET: {entries:?}"
    );
    let marker = format!("{}={}.", leftovers::MARKER, corral.pid());
    assert!(
        entries.iter().any(|e| e.starts_with(&marker)),
        "{marker} missing: {entries:?}"
    );
    Ok(())
}

/// The soft and hard "Max open files" of `pid`.
fn nofile(pid: u32) -> Result<(u64, u64), Box<dyn std::error::Error>> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .ok_or("no Max open files line")?;
    let mut fields = line.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(soft)), Some(Ok(hard))) = (fields.next(), fields.next()) else {
        return Err(format!("unreadable limits line {line:?}").into());
    };
    Ok((soft, hard))
}

#[test]
fn corral_raises_its_fd_limit_and_workers_get_the_original_back() -> TestResult {
    let found = Command::new("prlimit")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(found, "this test needs util-linux `prlimit` on PATH");
    // Node raises its own soft limit to the hard one at boot, so the worker looked at is a
    // plain program: `sleep`, as a second app without `listen`.
    let options = Options::default().instances(1);
    let (corral, hold) = prepared(&options)?;
    let config = format!(
        "{}\n[[app]]\nname = \"plain\"\ncommand = [\"sleep\", \"600\"]\nkill_timeout = \"3s\"\n",
        options.config_text(hold.addr)
    );
    std::fs::write(&corral.config, config)?;
    corral.launch(&["prlimit", "--nofile=1024:4096"], &[])?;
    corral.wait_online(1)?;
    hold.release();
    let plain: u32 = poll_until(DEADLINE, "the plain app's worker", || {
        let status = corral.status()?;
        let worker = &status["apps"][1]["workers"][0];
        (worker["state"] == "online").then_some(worker["pid"].as_u64()? as u32)
    })
    .map_err(|e| corral.explain(e))?;
    assert_eq!(nofile(corral.pid())?, (4096, 4096), "corral's own limit");
    assert_eq!(nofile(plain)?, (1024, 4096), "the worker's limit");
    assert!(
        corral.logs().contains("file descriptor limit"),
        "the limit is logged:\n{}",
        corral.logs()
    );
    Ok(())
}

/// Processes a test started outside corral, killed (with their groups) when it ends.
#[derive(Default)]
struct Strangers {
    children: Vec<Child>,
    groups: Vec<u32>,
}

impl Drop for Strangers {
    fn drop(&mut self) {
        for group in &self.groups {
            let _already_gone = killpg(Pid::from_raw(*group as i32), Signal::SIGKILL);
        }
        for child in &mut self.children {
            let _already_gone = child.kill();
            let _reaped = child.wait();
        }
    }
}

impl Strangers {
    /// `sleep 600` leading its own process group.
    fn sleeper(&mut self) -> std::io::Result<Proc> {
        let child = Command::new("sleep")
            .arg("600")
            .process_group(0)
            .stdin(Stdio::null())
            .spawn()?;
        let pid = child.id();
        self.groups.push(pid);
        self.children.push(child);
        Proc::of(pid).ok_or_else(|| std::io::Error::other("no /proc entry for sleep"))
    }

    /// A shell leading its own group that starts `sleep 600` in it, then waits for its stdin
    /// to close. Returns (the shell, the sleep's pid, the shell's stdin).
    fn group_with_member(&mut self) -> Result<(Proc, u32, std::process::ChildStdin), Box<dyn std::error::Error>> {
        let mut shell = Command::new("sh")
            .args(["-c", "sleep 600 </dev/null >/dev/null 2>&1 & echo $!; read _line"])
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let pid = shell.id();
        self.groups.push(pid);
        let stdin = shell.stdin.take().ok_or("no stdin")?;
        let mut line = String::new();
        BufReader::new(shell.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
        let member: u32 = line.trim().parse()?;
        let leader = Proc::of(pid).ok_or("no /proc entry for sh")?;
        self.children.push(shell);
        Ok((leader, member, stdin))
    }

    /// Closes `stdin` of the shell `leader` and reaps it (its group lives on without it).
    fn end_leader(&mut self, leader: Proc, stdin: std::process::ChildStdin) -> TestResult {
        drop(stdin);
        let index = self
            .children
            .iter()
            .position(|c| c.id() == leader.pid)
            .ok_or("unknown leader")?;
        let mut shell = self.children.swap_remove(index);
        shell.wait()?;
        Ok(())
    }
}

#[test]
fn leftover_cleanup_leaves_alone_processes_a_stale_state_file_names_after_pid_reuse() -> TestResult {
    let (corral, hold) = prepared(&Options::default().instances(1))?;
    let mut strangers = Strangers::default();
    // 1. A live group leader whose start time is not the recorded one: the pid was reused.
    let reused = strangers.sleeper()?;
    assert!(reused.start > 1);
    // 2. A group whose leader is gone, with a member that is not corral's (no marker): the
    //    recorded pid was reused by a process that made a group and exited.
    let (leader, member, stdin) = strangers.group_with_member()?;
    strangers.end_leader(leader, stdin)?;
    assert!(!alive(leader.pid) && alive(member));
    let member_start = Proc::of(member).ok_or("no member")?.start;
    assert!(member_start >= leader.start);

    let state = State {
        front: GONE,
        workers: vec![
            Proc {
                pid: reused.pid,
                start: reused.start - 1,
            },
            leader,
        ],
    };
    let path = leftovers::path_for(&socket_of(&corral));
    leftovers::save(&path, &state);
    assert!(path.exists());

    corral.launch(&[], &[])?;
    corral.wait_online(1)?;
    hold.release();
    let logs = corral.logs();
    assert!(
        alive(reused.pid),
        "a live process with another start time was killed:\n{logs}"
    );
    assert!(
        alive(member),
        "a member of a leaderless group without the marker was killed:\n{logs}"
    );
    assert!(!logs.contains("stopping a leftover process"), "{logs}");
    assert!(logs.contains("now belongs to another process"), "{logs}");
    assert!(
        logs.contains(&format!("lack its run's {}", leftovers::MARKER)),
        "{logs}"
    );
    Ok(())
}

#[test]
fn a_recorded_worker_still_alive_with_its_start_time_is_stopped_with_its_group() -> TestResult {
    let (corral, hold) = prepared(&Options::default().instances(1))?;
    let mut strangers = Strangers::default();
    // The shell stays alive (blocked reading this) until corral kills it.
    let (leader, member, _stdin) = strangers.group_with_member()?;
    let state = State {
        front: GONE,
        workers: vec![leader],
    };
    leftovers::save(&leftovers::path_for(&socket_of(&corral)), &state);

    corral.launch(&[], &[])?;
    corral.wait_online(1)?;
    hold.release();
    poll_until(DEADLINE, "the recorded worker and its group to be stopped", || {
        (!alive(leader.pid) && !alive(member)).then_some(())
    })
    .map_err(|e| corral.explain(e))?;
    assert!(corral.logs().contains("stopping a leftover process of a previous run"));
    Ok(())
}
