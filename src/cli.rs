//! The command line: `corral run | check | status | stop | reload`, all taking `-c FILE`.
//!
//! Exit codes: 0 success; 1 failure; 3 no instance is running for this config (as the LSB
//! `status` convention); 78 the config is invalid (`EX_CONFIG` from sysexits.h).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{units, Config, ConfigError};
use crate::control::client::{self, ClientError};
use crate::control::{socket_path, Reply, Request};
use crate::logs::{self, LogFormat};
use crate::supervisor::status::Status;

const EXIT_NOT_RUNNING: u8 = 3;
const EXIT_CONFIG: u8 = 78;

/// Runs N copies of a web server behind one port: load balancing, supervision, zero-downtime
/// reloads.
#[derive(Debug, Parser)]
#[command(name = "corral", version, about, propagate_version = true)]
pub struct Cli {
    /// Config file; the control socket of the running instance is derived from its path.
    #[arg(short, long, global = true, default_value = crate::config::DEFAULT_PATH)]
    config: PathBuf,
    /// Format of corral's own log (stderr). Also CORRAL_LOG_FORMAT.
    #[arg(long, global = true, value_enum, env = "CORRAL_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run in the foreground: bind, start the workers, proxy; stop on SIGTERM/SIGINT.
    Run,
    /// Validate the config and print what it would run; exit non-zero naming every problem.
    Check,
    /// Show the workers of the running instance (like `pm2 ls`).
    Status {
        /// Only this app.
        app: Option<String>,
        /// Machine-readable JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop the running instance gracefully and wait until it has exited; with APP, stop only
    /// that app's workers (`corral reload APP` starts them again).
    Stop {
        /// Only this app.
        app: Option<String>,
    },
    /// Show the last lines of the worker log files (`out_file`, `error_file`), and follow them.
    Logs {
        /// Only this app.
        app: Option<String>,
        /// Lines per file.
        #[arg(short = 'n', long, default_value_t = 15)]
        lines: usize,
        /// Keep printing new lines (through rotations) until interrupted.
        #[arg(short, long)]
        follow: bool,
    },
    /// Print a systemd unit that runs this config at boot, and how to install it.
    Startup {
        /// The user the unit runs corral as (like `pm2 startup -u`); default: the current one.
        /// A normal user gets `CAP_NET_BIND_SERVICE` for ports below 1024.
        #[arg(short, long)]
        user: Option<String>,
    },
    /// Change an app's worker count without a reload: `N`, `+N` or `-N`. New workers enter
    /// rotation when ready; removed ones drain first. The next reload applies the file's
    /// `instances` again.
    Scale {
        /// The app.
        app: String,
        /// `N`, `+N` or `-N`.
        #[arg(allow_hyphen_values = true)]
        count: String,
    },
    /// Rolling reload of the running instance: re-read the config, replace every worker (or
    /// only APP's) without dropping a request; roll back if the new workers do not come up.
    Reload {
        /// Only this app.
        app: Option<String>,
    },
    /// Rolling restart: replace every worker (or only APP's) with the config it runs, without
    /// reading the file and without dropping a request (PM2's `restart`, minus its downtime).
    Restart {
        /// Only this app.
        app: Option<String>,
    },
}

/// Parses the command line, runs the command, and picks the exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("corral: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check => Ok(check(&cli.config)),
        Command::Run => {
            logs::init(cli.log_format);
            let config = match Config::load(&cli.config) {
                Ok(config) => config,
                Err(e) => return Ok(config_error(&e)),
            };
            // The supervisor, control socket and signals; the proxy runs on its own threads
            // (crate::shards).
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(crate::run::run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { app, json } => control(&cli.config, Request::Status, |reply| match reply {
            Reply::Status(mut status) => {
                if let Some(name) = &app {
                    status.apps.retain(|a| &a.name == name);
                }
                if json {
                    println!("{}", serde_json::to_string_pretty(&status).unwrap_or_default());
                } else {
                    print!("{}", table(&status));
                }
            }
            other => print_reply(other),
        }),
        Command::Stop { app: Some(app) } => control(&cli.config, Request::StopApp { app }, print_reply),
        Command::Stop { app: None } => {
            let deadline = Config::load(&cli.config)
                .map(|c| crate::run::stop_deadline(&c))
                .unwrap_or(Duration::from_secs(120));
            let code = control_with_deadline(&cli.config, Request::Stop, deadline, print_reply)?;
            if code == ExitCode::SUCCESS {
                println!("stopped");
            }
            Ok(code)
        }
        Command::Startup { user } => startup(&cli.config, user.as_deref()),
        Command::Logs { app, lines, follow } => logs(&cli.config, app.as_deref(), lines, follow),
        Command::Scale { app, count } => control(&cli.config, Request::Scale { app, count }, print_reply),
        Command::Reload { app } => control_with_deadline(
            &cli.config,
            Request::Reload { app },
            Duration::from_secs(3600),
            print_reply,
        ),
        Command::Restart { app } => control_with_deadline(
            &cli.config,
            Request::Restart { app },
            Duration::from_secs(3600),
            print_reply,
        ),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Err(e) => config_error(&e),
        Ok(config) => {
            let cpus = crate::config::usable_cpus();
            println!(
                "{}: OK ({} app{})",
                path.display(),
                config.apps.len(),
                if config.apps.len() == 1 { "" } else { "s" }
            );
            for warning in &config.warnings {
                println!(
                    "  warning: {}:{}:{}: {}",
                    path.display(),
                    warning.line,
                    warning.column,
                    warning.message
                );
            }
            for app in &config.apps {
                let n = app.instances.resolve(cpus);
                let scheme = if app.tls.is_some() { " (https)" } else { "" };
                let listen = app
                    .listen
                    .map_or_else(|| "no proxy".to_owned(), |a| format!("listening on {a}{scheme}"));
                println!(
                    "  {}: {n} worker{} of `{}`, {listen}, listen_timeout {}, kill_timeout {}",
                    app.name,
                    if n == 1 { "" } else { "s" },
                    app.command.join(" "),
                    units::format_duration(app.listen_timeout),
                    units::format_duration(app.kill_timeout),
                );
            }
            ExitCode::SUCCESS
        }
    }
}

fn logs(path: &std::path::Path, only: Option<&str>, lines: usize, follow: bool) -> anyhow::Result<ExitCode> {
    use crate::logs::files::slot_path;
    use crate::logs::tail::{self, Source};
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => return Ok(config_error(&e)),
    };
    let apps: Vec<_> = config
        .apps
        .iter()
        .filter(|a| only.is_none_or(|name| a.name == name))
        .collect();
    if apps.is_empty() {
        anyhow::bail!(
            "there is no app named {:?} in {}",
            only.unwrap_or_default(),
            path.display()
        );
    }
    let cpus = crate::config::usable_cpus();
    let mut sources = Vec::new();
    for app in apps {
        if app.logs.out_file.is_none() && app.logs.error_file.is_none() {
            // No files: what the running instance kept in memory.
            let request = Request::Logs {
                app: Some(app.name.clone()),
                lines,
            };
            let shown = control(path, request, |reply| match reply {
                Reply::Logs { lines } => {
                    println!("==> {} (recent output kept by corral) <==", app.name);
                    for line in lines {
                        println!("{}.{} {} | {}", line.app, line.slot, line.stream, line.text);
                    }
                }
                other => print_reply(other),
            });
            if !matches!(shown, Ok(code) if code == ExitCode::SUCCESS) {
                eprintln!(
                    "{}: no out_file or error_file, and no running instance to ask: its output goes to the stdout and stderr of `corral run`",
                    app.name
                );
            }
            continue;
        }
        let slots: Vec<Option<usize>> = if app.logs.merge_logs {
            vec![None]
        } else {
            (0..app.instances.resolve(cpus)).map(Some).collect()
        };
        for slot in slots {
            for (kind, file) in [("out", &app.logs.out_file), ("err", &app.logs.error_file)] {
                let Some(file) = file else { continue };
                let label = slot.map_or_else(
                    || format!("{} {kind}", app.name),
                    |s| format!("{}.{s} {kind}", app.name),
                );
                let path = slot.map_or_else(|| file.clone(), |s| slot_path(file, s, false));
                sources.push(Source { label, path });
            }
        }
    }
    for source in &sources {
        match tail::last_lines(&source.path, lines) {
            Ok(found) => {
                println!("==> {} ({}) <==", source.label, source.path.display());
                for line in found {
                    println!("{line}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                println!(
                    "==> {} ({}) <==\n(nothing written yet)",
                    source.label,
                    source.path.display()
                );
            }
            Err(e) => eprintln!("==> {} ({}): {e}", source.label, source.path.display()),
        }
    }
    if follow && !sources.is_empty() {
        tail::follow(&sources, &mut std::io::stdout().lock())?;
    }
    Ok(ExitCode::SUCCESS)
}

fn startup(path: &std::path::Path, user: Option<&str>) -> anyhow::Result<ExitCode> {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => return Ok(config_error(&e)),
    };
    let exe = std::env::current_exe().context("cannot find the corral binary")?;
    let user = match user {
        Some(name) => match nix::unistd::User::from_name(name) {
            Ok(Some(user)) => user.name,
            _ => {
                eprintln!("corral: no such user: {name}");
                return Ok(ExitCode::FAILURE);
            }
        },
        None => nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map_or_else(|| "root".into(), |u| u.name),
    };
    let path_env = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
    println!("{}", unit_text(&config, &exe, &user, &path_env));
    Ok(ExitCode::SUCCESS)
}

/// The systemd unit `corral startup` prints for `config`, run as `user` from `exe`.
fn unit_text(config: &Config, exe: &std::path::Path, user: &str, path_env: &str) -> String {
    let dir = config.path.parent().unwrap_or(std::path::Path::new("/"));
    let stem = config
        .path
        .file_stem()
        .map_or_else(|| "corral".into(), |s| s.to_string_lossy().into_owned());
    let unit = format!("corral-{stem}.service");
    let stop = crate::run::stop_deadline(config).as_secs();
    // As root the CLI looks in /run/corral by default; anyone else must be told where it is.
    let cli_hint = if user == "root" {
        String::new()
    } else {
        "# CLI:      export CORRAL_RUNTIME_DIR=/run/corral   (as this user, so `corral status`\n\
         #           finds the unit's instance; root looks there by default)\n"
            .to_owned()
    };
    // A normal user may still bind ports below 1024: the unit grants that one capability.
    let low_port = config.apps.iter().any(|a| a.listen.is_some_and(|l| l.port() < 1024));
    let capability = if user != "root" && low_port {
        "# Ports below 1024 without root: only this capability, and only for corral's process.\n\
         AmbientCapabilities=CAP_NET_BIND_SERVICE\n"
    } else {
        ""
    };
    let switching: Vec<&str> = config
        .apps
        .iter()
        .filter(|a| a.run_as.as_ref().is_some_and(|r| r.name != user))
        .map(|a| a.name.as_str())
        .collect();
    let switch_hint = if user != "root" && !switching.is_empty() {
        format!(
            "# Note:     {} set `user`: running workers as another user needs corral to run as\n\
             #           root (run `corral startup` as root), or remove `user` from the config.\n",
            switching.join(", ")
        )
    } else {
        String::new()
    };
    format!(
        "# {unit}: runs {config} with corral at boot.\n\
         # Install:  save this as /etc/systemd/system/{unit}, then\n\
         #           systemctl daemon-reload && systemctl enable --now {unit}\n\
         # Deploy:   systemctl reload {unit}   (a rolling reload, like `corral reload`)\n\
         {cli_hint}\
         {switch_hint}\
         [Unit]\n\
         Description=corral: {config}\n\
         After=network-online.target\n\
         Wants=network-online.target\n\
         \n\
         [Service]\n\
         Type=notify\n\
         NotifyAccess=main\n\
         User={user}\n\
         WorkingDirectory={dir}\n\
         Environment=PATH={path_env}\n\
         # The control socket and state file: /run/corral, created by systemd for {user} alone\n\
         # (corral finds it through $RUNTIME_DIRECTORY and refuses a directory that is not 0700).\n\
         RuntimeDirectory=corral\n\
         RuntimeDirectoryMode=0700\n\
         {capability}\
         ExecStart={exe} run -c {config}\n\
         ExecReload=/bin/kill -HUP $MAINPID\n\
         # Only corral gets SIGTERM: it drains connections, then stops its workers itself.\n\
         KillMode=mixed\n\
         TimeoutStopSec={stop}\n\
         Restart=on-failure\n\
         RestartSec=1\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target",
        config = config.path.display(),
        dir = dir.display(),
        exe = exe.display(),
    )
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("corral: {e}");
    match e {
        ConfigError::Read { .. } => ExitCode::FAILURE,
        ConfigError::Invalid { .. } => ExitCode::from(EXIT_CONFIG),
    }
}

fn print_reply(reply: Reply) {
    match reply {
        Reply::Progress { message } => println!("{message}"),
        Reply::Done { message } => println!("{message}"),
        Reply::Error { message, .. } => eprintln!("corral: {message}"),
        Reply::Status(_) | Reply::Logs { .. } => {}
    }
}

fn control(config: &std::path::Path, request: Request, on_reply: impl FnMut(Reply)) -> anyhow::Result<ExitCode> {
    control_with_deadline(config, request, Duration::from_secs(30), on_reply)
}

/// Sends one request and feeds every reply to `on_reply` until the instance closes the
/// connection. Fails on an `Error` reply, on no instance, and at `deadline`.
fn control_with_deadline(
    config: &std::path::Path,
    request: Request,
    deadline: Duration,
    mut on_reply: impl FnMut(Reply),
) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let socket = socket_path(config);
    runtime.block_on(async {
        let conversation = async {
            let mut replies = client::request(&socket, &request).await?;
            let mut failed = false;
            while let Some(reply) = replies.next().await? {
                failed |= matches!(reply, Reply::Error { .. });
                on_reply(reply);
            }
            Ok::<bool, ClientError>(failed)
        };
        match tokio::time::timeout(deadline, conversation).await {
            Err(_) => anyhow::bail!("no answer from the running instance within {deadline:?}"),
            Ok(Err(ClientError::NotRunning { path })) => {
                eprintln!(
                    "corral: not running for {} (no control socket at {path})",
                    config.display()
                );
                Ok(ExitCode::from(EXIT_NOT_RUNNING))
            }
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(true)) => Ok(ExitCode::FAILURE),
            Ok(Ok(false)) => Ok(ExitCode::SUCCESS),
        }
    })
}

/// The `corral status` table; coloured states on a terminal (unless `NO_COLOR` is set).
/// One app's certificate for `status`: subject and expiry, and what is wrong if anything.
fn certificate_line(tls: &crate::tls::CertStatus) -> String {
    let mut line = match (&tls.subject, tls.not_after) {
        (Some(subject), Some(not_after)) => {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(not_after);
            let day = crate::logs::files::timestamp("YYYY-MM-DD", at);
            let left = at.duration_since(std::time::SystemTime::now()).map_or_else(
                |_| "EXPIRED".to_owned(),
                |d| format!("{} days left", d.as_secs() / 86_400),
            );
            format!("certificate {subject}, expires {day} ({left})")
        }
        _ => "no certificate yet".to_owned(),
    };
    if let Some(problem) = &tls.problem {
        line.push_str(&format!("; {problem}"));
    }
    line
}

/// The last minute's traffic of an app for the status footer: `, 12.5 req/s, p99 3.2 ms`.
fn traffic(req_per_sec: Option<f64>, p99_ms: Option<f64>) -> String {
    let Some(rate) = req_per_sec else {
        return String::new();
    };
    let rate = if rate >= 100.0 {
        format!("{rate:.0}")
    } else {
        format!("{rate:.1}")
    };
    match p99_ms {
        Some(p99) if p99 >= 100.0 => format!(", {rate} req/s, p99 {p99:.0} ms (last minute)"),
        Some(p99) => format!(", {rate} req/s, p99 {p99:.1} ms (last minute)"),
        None => format!(", {rate} req/s (last minute)"),
    }
}

fn table(status: &Status) -> String {
    use std::io::IsTerminal;
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let header = [
        "APP",
        "SLOT",
        "GEN",
        "PID",
        "PORT",
        "STATE",
        "UPTIME",
        "RESTARTS",
        "CPU",
        "MEMORY",
        "REQUESTS",
        "IN FLIGHT",
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    for app in &status.apps {
        for w in &app.workers {
            let dash = || "-".to_owned();
            rows.push(vec![
                w.app.clone(),
                w.slot.to_string(),
                w.generation.map_or_else(dash, |g| g.to_string()),
                w.pid.map_or_else(dash, |p| p.to_string()),
                w.port.map_or_else(dash, |p| p.to_string()),
                w.state.clone(),
                if w.pid.is_some() { uptime(w.uptime_ms) } else { dash() },
                w.restarts.to_string(),
                w.cpu_percent.map_or_else(dash, |c| format!("{c:.0}%")),
                w.memory_bytes.map_or_else(dash, units::format_size),
                w.requests.to_string(),
                w.in_flight.to_string(),
            ]);
        }
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (index, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(column, (cell, w))| {
                let padded = format!("{cell:<w$}");
                if colour && column == 5 && index > 0 {
                    paint(cell, padded)
                } else {
                    padded
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    let apps: Vec<String> = status
        .apps
        .iter()
        .map(|a| match &a.listen {
            Some(listen) => format!(
                "{}: {}/{} ready on {listen}{}",
                a.name,
                a.ready,
                a.instances,
                traffic(a.req_per_sec, a.p99_ms)
            ),
            None => format!("{}: {}/{} running", a.name, a.ready, a.instances),
        })
        .collect();
    out.push_str(&format!(
        "corral pid {}, up {}; {}\n",
        status.pid,
        uptime(status.uptime_ms),
        apps.join("; ")
    ));
    for app in &status.apps {
        if let Some(tls) = &app.tls {
            out.push_str(&format!("{}: {}\n", app.name, certificate_line(tls)));
        }
    }
    if status.reloading {
        out.push_str("a reload is running\n");
    }
    if let Some(last) = status.last_reload.as_ref().filter(|r| !r.ok) {
        let ago = uptime(status.uptime_ms.saturating_sub(last.at_ms));
        out.push_str(&format!("last reload FAILED {ago} ago: {}\n", last.message));
    }
    out
}

/// A padded state cell in its colour: green serving, yellow in transition, red failing.
fn paint(state: &str, padded: String) -> String {
    let code = match state {
        "online" => "32",
        "starting" | "draining" | "stopping" | "waiting" => "33",
        "errored" | "unhealthy" | "unreachable" => "31",
        _ => "2",
    };
    format!("\x1b[{code}m{padded}\x1b[0m")
}

fn uptime(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_has_a_private_runtime_directory() -> Result<(), Box<dyn std::error::Error>> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.example.toml");
        let config = Config::from_str(include_str!("../proxy.example.toml"), &path)
            .map_err(|problems| format!("{problems:?}"))?;
        let exe = std::path::Path::new("/usr/local/bin/corral");
        let unit = unit_text(&config, exe, "root", "/usr/bin");
        for line in [
            "RuntimeDirectory=corral",
            "RuntimeDirectoryMode=0700",
            "Type=notify",
            "User=root",
        ] {
            assert!(unit.lines().any(|l| l == line), "{line} missing:\n{unit}");
        }
        let exec = format!("ExecStart=/usr/local/bin/corral run -c {}", path.display());
        assert!(unit.lines().any(|l| l == exec), "{exec} missing:\n{unit}");
        assert!(!unit.contains("CORRAL_RUNTIME_DIR"), "root needs no hint:\n{unit}");
        let unit = unit_text(&config, exe, "app", "/usr/bin");
        assert!(unit.contains("export CORRAL_RUNTIME_DIR=/run/corral"), "{unit}");
        assert!(unit.lines().any(|l| l == "User=app"), "{unit}");
        assert!(
            !unit.contains("AmbientCapabilities"),
            "port 4321 needs no capability:\n{unit}"
        );
        Ok(())
    }

    #[test]
    fn a_normal_user_gets_the_capability_for_a_low_port_only() -> Result<(), Box<dyn std::error::Error>> {
        let text =
            include_str!("../proxy.example.toml").replace("listen = \"127.0.0.1:4321\"", "listen = \"0.0.0.0:443\"");
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.example.toml");
        let config = Config::from_str(&text, &path).map_err(|problems| format!("{problems:?}"))?;
        let exe = std::path::Path::new("/usr/local/bin/corral");
        let line = "AmbientCapabilities=CAP_NET_BIND_SERVICE";
        let unit = unit_text(&config, exe, "app", "/usr/bin");
        assert!(unit.lines().any(|l| l == line), "{line} missing:\n{unit}");
        let unit = unit_text(&config, exe, "root", "/usr/bin");
        assert!(!unit.contains("AmbientCapabilities"), "root needs none:\n{unit}");
        Ok(())
    }
}
