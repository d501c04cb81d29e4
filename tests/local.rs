//! Local hostile input: the runtime directory, the files in it, and the control socket.
//! Through the real binary.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use support::{Corral, Options, PortHold, TestResult, DEADLINE};

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
