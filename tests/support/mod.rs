//! Test harness: runs the real `corral` binary with real Node workers on 127.0.0.1.
//!
//! - [`Corral`] writes a config into a temp dir, starts `corral run` on a port the OS picked,
//!   and waits (by polling `corral status`) until every worker is online. On drop it kills
//!   corral and every worker pid it has seen, and if the test is failing it prints corral's
//!   stdout and stderr (which include the workers' output).
//! - [`poll_until`] is the only way tests wait: it re-checks a condition until it holds or a
//!   deadline passes.
//! - [`http`] is a small blocking HTTP/1.1 client that can also send malformed bytes.

#![allow(dead_code)]

pub mod capture;
pub mod http;
pub mod load;
pub mod tls;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::error::Error;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

pub type TestResult = Result<(), Box<dyn Error>>;

/// Generous: two cores run cargo, the tests and their Node workers at once.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Re-checks `check` until it returns `Some`, or fails after `deadline` naming `what`.
pub fn poll_until<T>(
    deadline: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T, Box<dyn Error>> {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if start.elapsed() > deadline {
            return Err(format!("timed out after {deadline:?} waiting for {what}").into());
        }
        // A short pause between checks; the deadline above bounds the wait.
        std::thread::park_timeout(Duration::from_millis(20));
    }
}

/// True when `node` is on PATH. Tests that need it fail loudly without it: CI installs it.
pub fn require_node() {
    let found = Command::new("node")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(found, "these tests need Node.js (`node`) on PATH");
}

/// A free port on 127.0.0.1, held until [`PortHold::release`].
///
/// The socket is bound with SO_REUSEPORT but not listening, so corral (which binds with
/// SO_REUSEPORT too) can bind the same port while nobody else can take it in between.
pub struct PortHold {
    socket: socket2::Socket,
    pub addr: SocketAddr,
}

impl PortHold {
    pub fn new() -> std::io::Result<PortHold> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
        let addr = socket
            .local_addr()?
            .as_socket()
            .ok_or("not an inet address")
            .map_err(std::io::Error::other)?;
        Ok(PortHold { socket, addr })
    }

    pub fn release(self) {
        drop(self.socket);
    }
}

/// How to run corral for a test.
#[derive(Clone)]
pub struct Options {
    pub instances: usize,
    /// Extra `key = value` lines for the `[[app]]` table.
    pub app_keys: Vec<String>,
    /// Extra `[app.env]` entries.
    pub env: Vec<(String, String)>,
    /// Wait until this many workers are online (defaults to `instances`).
    pub wait_online: Option<usize>,
    /// The worker script in `tests/fixtures/` (defaults to `app.js`).
    pub fixture: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            instances: 2,
            app_keys: Vec::new(),
            env: Vec::new(),
            wait_online: None,
            fixture: "app.js".to_owned(),
        }
    }
}

impl Options {
    pub fn instances(mut self, n: usize) -> Self {
        self.instances = n;
        self
    }

    pub fn key(mut self, line: &str) -> Self {
        self.app_keys.push(line.to_owned());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Runs `tests/fixtures/<name>` as the worker instead of `app.js`.
    pub fn fixture(mut self, name: &str) -> Self {
        self.fixture = name.to_owned();
        self
    }

    pub fn config_text(&self, addr: SocketAddr) -> String {
        let fixture = fixture(&self.fixture);
        let mut text = format!(
            "[[app]]\nname = \"web\"\ncommand = [\"node\", {:?}]\nlisten = \"{addr}\"\ninstances = {}\n",
            fixture.display(),
            self.instances
        );
        // Test defaults, unless the test sets the key itself.
        for default in ["kill_timeout = \"3s\"", "drain_timeout = \"10s\""] {
            let key = default.split(' ').next().unwrap_or_default();
            if !self.app_keys.iter().any(|line| line.starts_with(key)) {
                writeln!(text, "{default}").expect("UNWRAP: writing to a String");
            }
        }
        for line in &self.app_keys {
            writeln!(text, "{line}").expect("UNWRAP: writing to a String");
        }
        if !self.env.is_empty() {
            text.push_str("[app.env]\n");
            for (k, v) in &self.env {
                writeln!(text, "{k} = {v:?}").expect("UNWRAP: writing to a String");
            }
        }
        text
    }
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub fn corral_bin() -> &'static str {
    env!("CARGO_BIN_EXE_corral")
}

/// A running `corral run`, killed with everything it started when dropped.
pub struct Corral {
    child: RefCell<Option<Child>>,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub addr: SocketAddr,
    seen_pids: RefCell<BTreeSet<u32>>,
    /// The instance runs in a PID namespace of its own: the pids its status shows are not
    /// this namespace's, so they are neither recorded nor killed (killing its child kills it).
    own_pid_namespace: std::cell::Cell<bool>,
}

impl Corral {
    /// Starts corral and waits until the workers are online.
    pub fn start(options: Options) -> Result<Corral, Box<dyn Error>> {
        require_node();
        let hold = PortHold::new()?;
        let addr = hold.addr;
        let corral = Corral::spawn_with_config(&options.config_text(addr), addr)?;
        let online = options.wait_online.unwrap_or(options.instances);
        corral.wait_online(online)?;
        hold.release();
        Ok(corral)
    }

    /// Writes `config` and runs `corral run` on it, without waiting for anything.
    pub fn spawn_with_config(config: &str, addr: SocketAddr) -> Result<Corral, Box<dyn Error>> {
        Corral::spawn_with_env(config, addr, &[])
    }

    /// Like [`Corral::spawn_with_config`], with extra environment for `corral run`.
    pub fn spawn_with_env(config: &str, addr: SocketAddr, env: &[(&str, &str)]) -> Result<Corral, Box<dyn Error>> {
        let corral = Corral::prepare(config, addr)?;
        corral.launch(&[], env)?;
        Ok(corral)
    }

    /// Like [`Corral::spawn_with_config`], with `setup` applied to the `corral run` command
    /// (resource limits or CPU affinity set in `pre_exec`, say).
    pub fn spawn_with(
        config: &str,
        addr: SocketAddr,
        setup: impl FnOnce(&mut Command),
    ) -> Result<Corral, Box<dyn Error>> {
        let corral = Corral::prepare(config, addr)?;
        let mut command = corral.command(&["run"]);
        setup(&mut command);
        corral.run_command(command)?;
        Ok(corral)
    }

    /// Writes `config` into a new temp dir with an empty runtime dir (`run`, mode 0700, as
    /// corral requires), without starting anything: [`Corral::launch`] does.
    pub fn prepare(config: &str, addr: SocketAddr) -> Result<Corral, Box<dyn Error>> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, config)?;
        std::fs::DirBuilder::new().mode(0o700).create(dir.path().join("run"))?;
        Ok(Corral {
            child: RefCell::new(None),
            dir,
            config: path,
            addr,
            seen_pids: RefCell::default(),
            own_pid_namespace: std::cell::Cell::new(false),
        })
    }

    /// The runtime dir (`CORRAL_RUNTIME_DIR`) of this instance.
    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// Starts `corral run` on the config, through `wrapper` (a program and its arguments that
    /// exec the rest, like `prlimit --nofile=1024:4096`; empty for none), with extra
    /// environment. Its output is appended to `stdout.log` and `stderr.log`. A previous
    /// `corral run` of this harness is killed first.
    pub fn launch(&self, wrapper: &[&str], env: &[(&str, &str)]) -> std::io::Result<()> {
        let mut command = match wrapper.split_first() {
            None => self.command(&["run"]),
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(corral_bin());
                self.with_args(&mut command, &["run"]);
                command
            }
        };
        command.envs(env.iter().copied());
        self.run_command(command)
    }

    /// Runs `command` (a `corral run`) as this harness's instance, its output appended to
    /// `stdout.log` and `stderr.log`; a previous one is killed first.
    fn run_command(&self, mut command: Command) -> std::io::Result<()> {
        let log = |name: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join(name))
        };
        let child = command
            .stdout(log("stdout.log")?)
            .stderr(log("stderr.log")?)
            .stdin(Stdio::null())
            .spawn()?;
        if let Some(mut old) = self.child.replace(Some(child)) {
            let _already_gone = old.kill();
            let _reaped = old.wait();
        }
        Ok(())
    }

    /// Marks the instance as running in a PID namespace of its own (see the field).
    pub fn in_own_pid_namespace(&self) {
        self.own_pid_namespace.set(true);
    }

    /// Starts `corral run` again on the same config (after the previous one exited).
    pub fn respawn(&self) -> std::io::Result<()> {
        self.launch(&[], &[])
    }

    /// A `corral` command for this instance's config and control-socket dir.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(corral_bin());
        self.with_args(&mut command, args);
        command
    }

    fn with_args(&self, command: &mut Command, args: &[&str]) {
        command
            .args(args)
            .arg("-c")
            .arg(&self.config)
            .env("CORRAL_RUNTIME_DIR", self.runtime_dir())
            .env("CORRAL_LOG", "info,corral=debug")
            // Log timestamps are in local time: tests do not depend on the machine's zone (a
            // test that wants another passes its own TZ, which comes later and wins).
            .env("TZ", "UTC");
    }

    /// Rewrites the config file (for reload tests).
    pub fn rewrite_config(&self, options: &Options) -> std::io::Result<()> {
        std::fs::write(&self.config, options.config_text(self.addr))
    }

    /// Runs a CLI command (status, stop, ...) to completion.
    pub fn cli(&self, args: &[&str]) -> std::io::Result<Output> {
        self.command(args).stdin(Stdio::null()).output()
    }

    pub fn pid(&self) -> u32 {
        self.child.borrow().as_ref().map_or(0, Child::id)
    }

    /// `corral status --json`, parsed; `None` while the control socket is not up yet.
    pub fn status(&self) -> Option<Value> {
        let output = self.cli(&["status", "--json"]).ok()?;
        if !output.status.success() {
            return None;
        }
        let status: Value = serde_json::from_slice(&output.stdout).ok()?;
        if !self.own_pid_namespace.get() {
            for pid in pids_in(&status) {
                self.seen_pids.borrow_mut().insert(pid);
            }
        }
        Some(status)
    }

    /// The workers of the first app, as JSON objects.
    pub fn workers(&self) -> Result<Vec<Value>, Box<dyn Error>> {
        let status = self.status().ok_or("corral status failed")?;
        Ok(status["apps"][0]["workers"].as_array().cloned().unwrap_or_default())
    }

    /// The sum of a numeric field (`requests`, `in_flight`, ...) over the first app's workers.
    pub fn total(&self, field: &str) -> Option<u64> {
        Some(self.workers().ok()?.iter().filter_map(|w| w[field].as_u64()).sum())
    }

    /// Waits until the workers have served more than `n` further requests (under a load, on
    /// the workers now in the pool).
    pub fn wait_for_requests(&self, n: u64) -> Result<(), Box<dyn Error>> {
        let seen = self.total("requests").ok_or("status")?;
        poll_until(DEADLINE, &format!("{n} more requests"), || {
            (self.total("requests")? > seen + n).then_some(())
        })
        .map_err(|e| self.explain(e))
    }

    /// Waits until `n` workers are online.
    pub fn wait_online(&self, n: usize) -> Result<Vec<Value>, Box<dyn Error>> {
        poll_until(DEADLINE, &format!("{n} workers online"), || {
            if let Some(exit) = self.exited() {
                panic!("corral exited early ({exit})\n{}", self.logs());
            }
            let status = self.status()?;
            let workers = status["apps"][0]["workers"].as_array()?.clone();
            let online: Vec<Value> = workers.into_iter().filter(|w| w["state"] == "online").collect();
            (online.len() == n).then_some(online)
        })
        .map_err(|e| self.explain(e))
    }

    /// Pids of the online workers.
    pub fn online_pids(&self) -> Result<BTreeSet<u32>, Box<dyn Error>> {
        Ok(self
            .workers()?
            .iter()
            .filter(|w| w["state"] == "online")
            .filter_map(|w| w["pid"].as_u64().map(|p| p as u32))
            .collect())
    }

    pub fn signal(&self, signal: Signal) -> nix::Result<()> {
        kill(Pid::from_raw(self.pid() as i32), signal)
    }

    /// Waits for corral to exit.
    pub fn wait_exit(&mut self, deadline: Duration) -> Result<ExitStatus, Box<dyn Error>> {
        let status = poll_until(deadline, "corral to exit", || self.exited());
        status.map_err(|e| self.explain(e))
    }

    /// corral's exit status, once it has exited.
    pub fn exited(&self) -> Option<ExitStatus> {
        self.child
            .borrow_mut()
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Every worker pid seen in any status so far.
    pub fn seen_pids(&self) -> BTreeSet<u32> {
        self.seen_pids.borrow().clone()
    }

    /// corral's stdout and stderr so far.
    pub fn logs(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!(
            "--- corral stderr ---\n{}--- corral stdout ---\n{}",
            read("stderr.log"),
            read("stdout.log")
        )
    }

    /// Adds corral's output to an error.
    pub fn explain(&self, e: Box<dyn Error>) -> Box<dyn Error> {
        format!("{e}\n{}", self.logs()).into()
    }
}

impl Drop for Corral {
    fn drop(&mut self) {
        if let Some(child) = self.child.get_mut().as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                let _already_gone = child.kill();
                let _reaped = child.wait();
            }
        }
        // Workers lead their own process groups: kill the groups, so whatever a worker forked
        // goes too.
        for pid in self.seen_pids.borrow().iter() {
            let _already_gone = nix::sys::signal::killpg(Pid::from_raw(*pid as i32), Signal::SIGKILL);
            let _already_gone = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// The front process and every worker a status shows (a front started by `corral start` is
/// not the harness's child: it is killed on drop through this list too).
fn pids_in(status: &Value) -> Vec<u32> {
    let mut pids: Vec<u32> = status["pid"].as_u64().map(|p| p as u32).into_iter().collect();
    // The other corral during a self-upgrade (a new one starting, or the previous draining).
    pids.extend(status["upgrade"]["pid"].as_u64().map(|p| p as u32).filter(|&p| p > 1));
    for app in status["apps"].as_array().into_iter().flatten() {
        for worker in app["workers"].as_array().into_iter().flatten() {
            if let Some(pid) = worker["pid"].as_u64() {
                pids.push(pid as u32);
            }
        }
    }
    pids
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            // The state letter follows the parenthesised command name.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
    }
}
