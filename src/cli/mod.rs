//! The command line: `corral run | check | status | stop | reload | import ...`, all taking `-c FILE`.
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

mod describe;
mod import;
mod start;
mod startup;
mod table;

use startup::startup;
use table::table;

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
    Run {
        /// Merge each app's `[app.env_NAME]` over its `[app.env]` (PM2's `--env`).
        #[arg(long, value_name = "NAME")]
        env: Option<String>,
    },
    /// Validate the config and print what it would run; exit non-zero naming every problem.
    Check,
    /// Start `corral run` in the background (like `pm2 start`); return once every app is
    /// ready, printing the status table, or fail with the failing worker's report.
    Start {
        /// Merge each app's `[app.env_NAME]` over its `[app.env]` (PM2's `--env`).
        #[arg(long, value_name = "NAME")]
        env: Option<String>,
    },
    /// Everything about one app of the running instance (like `pm2 describe`): its config,
    /// workers, last exits and log files.
    Describe {
        /// The app.
        app: String,
    },
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
    /// Empty the log files of the running instance (every app's, or APP's): worker `out_file`
    /// and `error_file`, and the access log, like `pm2 flush`; rotated files are kept.
    Flush {
        /// Only this app.
        app: Option<String>,
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
        /// Use `[app.env_NAME]` from now on (default: the one in use stays).
        #[arg(long, value_name = "NAME")]
        env: Option<String>,
    },
    /// Turn a PM2 ecosystem file (ecosystem.config.js, .cjs, .mjs, .json, .yml) into a
    /// commented proxy.toml, listing every PM2 key it could not map and why.
    Import {
        /// The PM2 file; JavaScript files are run with `node` to read them.
        file: PathBuf,
        /// Write here instead of stdout.
        #[arg(short, long, value_name = "OUT")]
        output: Option<PathBuf>,
        /// Fold each app's `env_NAME` into `[app.env]` (for a file that runs one environment).
        #[arg(long, value_name = "NAME")]
        env: Option<String>,
    },
    /// Rolling restart: replace every worker (or only APP's) with the config it runs, without
    /// reading the file and without dropping a request (PM2's `restart`, minus its downtime).
    Restart {
        /// Only this app.
        app: Option<String>,
    },
    /// Zero-downtime self-upgrade: a new corral process (the binary at the path this one was
    /// started from, or --binary) takes over the sockets and starts its workers; this one then
    /// drains and exits. If the new one fails, this one serves on and the command says why.
    Upgrade {
        /// The new corral binary.
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
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
        Command::Start { env } => start::start(&cli.config, env.as_deref(), cli.log_format),
        Command::Describe { app } => describe::describe(&cli.config, &app),
        Command::Run { env } => {
            // Read before any thread starts (it removes its variable from the environment).
            let inherited = match crate::upgrade::Inherited::from_env() {
                Ok(inherited) => inherited,
                Err(e) => {
                    eprintln!("corral: {e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            logs::init(cli.log_format);
            let config = match load(&cli.config, env.as_deref()) {
                Ok(config) => config,
                Err(code) => return Ok(code),
            };
            // The supervisor, control socket and signals; the proxy runs on its own threads
            // (crate::shards).
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(crate::run::run(config, inherited))?;
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
        Command::Import { file, output, env } => import::import(&file, output.as_deref(), env.as_deref()),
        Command::Startup { user } => startup(&cli.config, user.as_deref()),
        Command::Logs { app, lines, follow } => logs(&cli.config, app.as_deref(), lines, follow),
        Command::Scale { app, count } => control(&cli.config, Request::Scale { app, count }, print_reply),
        Command::Flush { app } => control(&cli.config, Request::Flush { app }, print_reply),
        Command::Reload { app, env } => control_with_deadline(
            &cli.config,
            Request::Reload { app, env },
            Duration::from_secs(3600),
            print_reply,
        ),
        Command::Restart { app } => control_with_deadline(
            &cli.config,
            Request::Restart { app },
            Duration::from_secs(3600),
            print_reply,
        ),
        Command::Upgrade { binary } => {
            let binary = match binary.map(|b| std::path::absolute(&b).map(|a| (b, a))).transpose() {
                Ok(binary) => binary.map(|(_, absolute)| absolute),
                Err(e) => anyhow::bail!("--binary: {e}"),
            };
            let deadline = Config::load(&cli.config)
                .map(|c| crate::run::takeover_deadline(&c) + Duration::from_secs(120))
                .unwrap_or(Duration::from_secs(600));
            control_with_deadline(&cli.config, Request::Upgrade { binary }, deadline, print_reply)
        }
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

/// The config at `path` with `--env` applied, or the exit code after saying what is wrong.
fn load(path: &std::path::Path, env: Option<&str>) -> Result<Config, ExitCode> {
    let mut config = Config::load(path).map_err(|e| config_error(&e))?;
    if let Some(name) = env {
        config.choose_env(name).map_err(|why| {
            eprintln!("corral: {}: {why}", path.display());
            ExitCode::from(EXIT_CONFIG)
        })?;
    }
    Ok(config)
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
