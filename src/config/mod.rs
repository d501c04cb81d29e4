//! Configuration: `proxy.toml` in, a validated [`Config`] out.
//!
//! # Flow
//!
//! `corral` reads `./proxy.toml`, or the file named by `-c`. The text is parsed into a TOML tree
//! that keeps the byte span of every key and value (`parse`), and each `[[app]]` table is walked
//! key by key into an [`AppConfig`]: human units (`"10s"`, `"200M"`) become `Duration`s and byte
//! counts here, once, and nothing downstream parses strings. Every problem found is collected,
//! with its line and column, and they are reported together, so one `corral check` run shows
//! everything that is wrong. Unknown keys are errors (a typo must not silently fall back to a
//! default).
//!
//! # Precedence
//!
//! Command line over file over built-in default. Today the command line only picks the file
//! (`-c`); every other setting comes from the file or from the defaults documented on each field
//! and in `proxy.example.toml`.
//!
//! This module owns no running state. The supervisor gets a fresh `Config` at start (and, later,
//! on reload) and decides what to do with it.

mod cpus;
pub mod habits;
mod parse;
pub mod pm2;
mod table;
mod tls;
mod top;
pub mod units;
mod values;

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;

pub use cpus::usable_cpus;

/// The default config file, relative to the working directory.
pub const DEFAULT_PATH: &str = "proxy.toml";

/// A validated configuration file.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from, made absolute (the control socket's path derives from it).
    pub path: PathBuf,
    /// The `[[app]]` tables, in file order.
    pub apps: Vec<AppConfig>,
    /// `[admin]`: the admin HTTP listener (metrics, API, events, dashboard). Default: off.
    pub admin: Option<AdminConfig>,
    /// `[corral]`: settings of corral itself.
    pub corral: CorralConfig,
    /// The `[app.env_NAME]` chosen with `--env NAME` (merged into the apps' `env`), if any.
    pub env_name: Option<String>,
    /// What works but is probably a mistake (an expired certificate, ...): `check` shows
    /// these, `run` and `reload` log them.
    pub warnings: Vec<Problem>,
}

/// `watch`, `ignore_watch`, `watch_delay`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchConfig {
    /// Watched files and directories (absolute).
    pub paths: Vec<PathBuf>,
    /// Names or patterns of paths not watched: a name matches any path component, `*` matches
    /// within one, and a pattern with `/` is a path under `cwd`.
    pub ignore: Vec<String>,
    /// The quiet time after the last change before the restart.
    pub delay: Duration,
}

/// The `[corral]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CorralConfig {
    /// Where `corral start` writes corral's own log. Default: beside the state file in the
    /// runtime directory (`<socket>.log`).
    pub log_file: Option<PathBuf>,
}

/// One `[[app]]`: a command run as N workers, optionally behind a public address.
#[derive(Debug, Clone, PartialEq)]
pub struct AppConfig {
    /// Unique name, used in logs, `status` and CLI commands.
    pub name: String,
    /// argv of a worker; run without a shell.
    pub command: Vec<String>,
    /// Working directory of the workers (absolute; relative paths in the file are resolved
    /// against the config file's folder). Default: that folder.
    pub cwd: PathBuf,
    /// Public address. `None` makes the app a plain supervised process with no proxy.
    pub listen: Option<SocketAddr>,
    /// How many workers. Default: 1.
    pub instances: Instances,
    /// Extra environment for the workers, in file order.
    pub env: Vec<(String, String)>,
    /// `[app.env_NAME]` tables, in file order: merged over `env` when `--env NAME` chooses one.
    pub envs: Vec<(String, Vec<(String, String)>)>,
    /// `watch`: a rolling restart when files change. Default: off.
    pub watch: Option<WatchConfig>,
    /// `cron_restart`: a rolling restart at these times (local). Default: none.
    pub cron_restart: Option<crate::cron::Schedule>,
    /// Name of the variable that carries the worker's port. Default: `PORT`.
    pub port_env: String,
    /// A new worker must accept TCP on its port within this. Default: 10 s.
    pub listen_timeout: Duration,
    /// After `kill_signal`, wait this long before SIGKILL. Default: 5 s.
    pub kill_timeout: Duration,
    /// Signal that asks a worker to stop. Default: SIGTERM.
    pub kill_signal: Signal,
    /// How long a worker leaving rotation (stop, reload) may take to finish its in-flight
    /// requests; long-lived responses (SSE) are ended cleanly at this deadline. Default: 30 s.
    pub drain_timeout: Duration,
    /// Readiness by HTTP: a new worker is ready when `GET <ready_path>` answers 2xx (instead of
    /// when its port accepts TCP). Default: none (TCP).
    pub ready_path: Option<String>,
    /// Workers replaced at once during a rolling reload. Default: 1.
    pub reload_batch: usize,
    /// `reload_keep_old`: a reload keeps the old workers it replaced until every slot runs the
    /// new generation, so a failure rolls back to them (2N workers at the peak). `false` stops
    /// each old worker once its replacement is ready (N + `reload_batch` at the peak), and a
    /// failure stops the reload where it is, without a rollback. Default: true.
    pub reload_keep_old: bool,
    /// How requests are spread over the workers. Default: round robin.
    pub balance: Balance,
    /// Session affinity. Default: none.
    pub sticky: Sticky,
    /// Name of the affinity cookie (`sticky = "cookie"`). Default: `corral_sticky`.
    pub sticky_cookie: String,
    /// Peers whose `X-Forwarded-For` is believed (`sticky = "ip"`). Default: none.
    pub trusted_proxies: Vec<Network>,
    /// Active health checks of ready workers. Default: none.
    pub health_check: Option<HealthCheck>,
    /// Restart workers that exit. Default: true.
    pub autorestart: bool,
    /// A worker that exits sooner than this after starting is an unstable restart. Default 1 s.
    pub min_uptime: Duration,
    /// Unstable restarts in a row before the slot is marked errored. Default 16.
    pub max_restarts: u32,
    /// Fixed delay before each restart. Default 0.
    pub restart_delay: Duration,
    /// First step of the exponential restart backoff (doubling, capped at 15 s, reset after
    /// 30 s of uptime); zero turns it off. Default 100 ms.
    pub exp_backoff_restart_delay: Duration,
    /// Exit codes after which a worker is not restarted. Default: none.
    pub stop_exit_codes: Vec<i32>,
    /// Worker log files.
    pub logs: LogFiles,
    /// PM2's ready message: a worker is ready when it calls `process.send('ready')` (Node IPC
    /// channel on fd 3), not when its port accepts TCP. Default: false.
    pub wait_ready: bool,
    /// RSS cap of a worker's process tree, bytes; over it the worker is replaced without
    /// downtime. Checked every 2 s. Default: none.
    pub max_memory_restart: Option<u64>,
    /// Run the workers as this user (and group) instead of corral's own (PM2's `uid`/`gid`);
    /// needs corral to run as root. Default: none.
    pub run_as: Option<RunAs>,
    /// Limits of the HTTP front end.
    pub http: HttpLimits,
    /// `[app.tls]`: the public socket speaks TLS (and HTTP/2). Default: plain HTTP.
    pub tls: Option<Tls>,
    /// A plain-HTTP listener answering 308 to the https URL (and ACME HTTP-01). Default: none.
    pub http_redirect: Option<SocketAddr>,
    /// Names this app answers on a shared `listen`, lower-case (`*.x` wildcards). Default: none.
    pub hosts: Vec<String>,
    /// This app takes the names no app of its `listen` claims. Default: false.
    pub default_host: bool,
    /// `max-age` of the Strict-Transport-Security header on TLS responses. Default: none.
    pub hsts: Option<Duration>,
    /// `access_log`, `access_log_format`: one line per response, rotated like the worker logs
    /// (`log_max_size`, `log_retain`). Default: none.
    pub access_log: Option<AccessLog>,
    /// `request_id`: keep a valid incoming `X-Request-Id` or make one, pass it to the worker,
    /// return it to the client and log it. Default: true.
    pub request_id: bool,
}

/// Where an app's access log goes, and in which format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLog {
    /// The file (absolute; relative paths in the file are relative to the config file).
    pub path: PathBuf,
    /// `access_log_format`. Default: combined.
    pub format: AccessLogFormat,
}

/// `access_log_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    /// Apache/nginx "combined", with duration, worker slot and request id appended.
    Combined,
    /// One JSON object per line.
    Json,
}

/// `[admin]`: the admin listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Its address (never an app's).
    pub listen: SocketAddr,
    /// A file holding the bearer token (absolute); `CORRAL_ADMIN_TOKEN` is the other way.
    /// Without either the listener must be on loopback.
    pub token_file: Option<PathBuf>,
}

/// The environment variable that may carry the admin token instead of `token_file`.
pub const ADMIN_TOKEN_ENV: &str = "CORRAL_ADMIN_TOKEN";

/// `[app.tls]`: certificate files, or automatic certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    /// `cert`/`key`, and `extra` certificates picked by SNI.
    Files {
        /// `cert` and `key`.
        main: CertFiles,
        /// `extra = [{ cert, key }, ...]`.
        extra: Vec<CertFiles>,
    },
    /// `[app.tls.acme]`.
    Acme(AcmeConfig),
}

/// A certificate chain file and its key file (absolute).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM chain, leaf first.
    pub cert: PathBuf,
    /// PEM key: PKCS#8, PKCS#1 or SEC1.
    pub key: PathBuf,
}

/// `[app.tls.acme]`: certificates from an ACME (RFC 8555) directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    /// Names to certify, lower-case, no wildcards.
    pub domains: Vec<String>,
    /// Contact address for the account. Default: none.
    pub email: Option<String>,
    /// Directory URL. Default: Let's Encrypt production.
    pub directory: String,
    /// Where the account key and certificates are kept (absolute). Default: `acme/` beside
    /// the config file.
    pub cache_dir: PathBuf,
    /// An extra trusted root for the directory's HTTPS (a private CA, a test server).
    pub ca_root: Option<PathBuf>,
}

/// The user a worker runs as (`user`, `group`), resolved when the config is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// The user's name, for `USER`, `LOGNAME` and messages.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// The `group` key's gid, else the user's primary group.
    pub gid: u32,
    /// The user's home directory, for `HOME`.
    pub home: PathBuf,
}

/// Where worker output is written (PM2's log keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFiles {
    /// stdout lines go here (per slot `name-N.ext` unless `merge_logs`); none: corral's stdout.
    pub out_file: Option<PathBuf>,
    /// stderr lines go here; none: corral's stderr.
    pub error_file: Option<PathBuf>,
    /// One file for all slots instead of one per slot. Default false.
    pub merge_logs: bool,
    /// Line timestamp format (moment.js tokens), in local time with its offset unless `utc`.
    /// Default `YYYY-MM-DDTHH:mm:ss.SSSZ`.
    pub date_format: String,
    /// `log_utc`: timestamps (and `rotate_interval`) in UTC instead of local time. Default false.
    pub utc: bool,
    /// Rotate a file at this size. Default: never.
    pub max_size: Option<u64>,
    /// `log_rotate_interval`: rotate at these times too (`"daily"`, `"hourly"` or cron).
    /// Default: never.
    pub rotate_interval: Option<crate::cron::Schedule>,
    /// Rotated files kept. Default 5.
    pub retain: usize,
    /// `log_compress`: gzip rotated files (`.N.gz`). Default false.
    pub compress: bool,
}

impl LogFiles {
    /// The rotation policy of one file of this app (a worker log or the access log).
    pub fn file(&self, path: PathBuf) -> crate::logs::files::LogFile {
        crate::logs::files::LogFile {
            path,
            max_size: self.max_size,
            retain: self.retain,
            compress: self.compress,
            interval: self.rotate_interval.clone(),
            zone: crate::logs::files::Zone::of(self.utc),
        }
    }
}

/// `health_check = { path, interval, timeout, unhealthy_threshold }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Requested with GET; 2xx is healthy.
    pub path: String,
    /// Time between checks of one worker. Default 5 s.
    pub interval: Duration,
    /// A check without a 2xx answer within this failed. Default 2 s.
    pub timeout: Duration,
    /// After this many failures in a row the worker is replaced. Default 3.
    pub unhealthy_threshold: u32,
}

/// How a worker is chosen for a request without affinity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Each ready worker in turn.
    RoundRobin,
    /// The ready worker with the fewest requests (and open streams, tunnels) in flight.
    LeastConn,
}

/// Session affinity: which requests must go to the same worker slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sticky {
    /// None: every request is balanced.
    None,
    /// A signed cookie names the client's slot.
    Cookie,
    /// The client address picks the slot.
    Ip,
}

/// An IP address or CIDR block (`10.0.0.0/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl Network {
    /// True if `ip` is in this block.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Network {
    type Err = ();

    fn from_str(text: &str) -> Result<Network, ()> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix.parse::<u8>().map_err(|_| ())?)),
            None => (text, None),
        };
        let addr: std::net::IpAddr = addr.parse().map_err(|_| ())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(());
        }
        Ok(Network {
            addr: addr.to_canonical(),
            prefix,
        })
    }
}

/// Limits and timeouts of the proxy, chosen on purpose (see the README's HTTP section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Largest request head (request line plus headers) in bytes; larger gets 431. Default 64 KiB.
    pub max_header_size: usize,
    /// Most header fields in a request; more gets 431. Default 100.
    pub max_headers: usize,
    /// A client must send its whole request head within this, or the connection is closed.
    /// Default 10 s (slowloris guard).
    pub header_read_timeout: Duration,
    /// How long a worker may take to start its response (status and headers) before the client
    /// gets 504. Streaming after that is not limited. Default 60 s.
    pub upstream_timeout: Duration,
    /// The longest wait between two reads of a request body; a client that stalls longer gets
    /// 408 and its worker connection is closed (nginx's `client_body_timeout`). Default 60 s.
    pub client_body_timeout: Duration,
    /// Request bodies of a declared length up to this are read whole before a worker is chosen
    /// (nginx's `client_body_buffer_size`); larger and chunked ones are streamed. Default 16 KiB.
    pub client_body_buffer_size: u64,
    /// Largest request body in bytes; a larger one gets 413 (before any of it is forwarded
    /// when its `Content-Length` says so). Default: none (nginx's `client_max_body_size`).
    pub max_body_size: Option<u64>,
    /// Open client connections per app; at the limit corral stops accepting and new clients
    /// wait in the listen backlog. Default: derived from the fd limit (see
    /// [`HttpLimits::connection_limit`]).
    pub max_connections: Option<usize>,
    /// Open client connections one client address may hold; more are answered 503 and closed.
    /// Default: none.
    pub max_connections_per_ip: Option<usize>,
    /// A tunnel (WebSocket) with no byte in either direction for this long is closed.
    /// Default: none (a half-closed tunnel still ends 60 s after its first half closed).
    pub tunnel_idle_timeout: Option<Duration>,
    /// A connection whose client takes no byte of a response for this long is closed, with
    /// every worker connection its responses held (nginx's `send_timeout`). Default 60 s.
    pub send_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_header_size: 64 * 1024,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(10),
            upstream_timeout: Duration::from_secs(60),
            client_body_timeout: Duration::from_secs(60),
            max_body_size: None,
            client_body_buffer_size: 16 * 1024,
            max_connections: None,
            max_connections_per_ip: None,
            tunnel_idle_timeout: None,
            send_timeout: Duration::from_secs(60),
        }
    }
}

impl HttpLimits {
    /// The app's `max_connections`, or its share of what the fd limit allows: every client
    /// connection may hold a worker connection too, and 64 fds are kept for corral's own files,
    /// pipes and sockets, so `(fd_limit - 64) / 2` over the `apps` that listen.
    pub fn connection_limit(&self, fd_limit: u64, apps: usize) -> usize {
        self.max_connections.unwrap_or_else(|| {
            let share = fd_limit.saturating_sub(64) / 2 / apps.max(1) as u64;
            usize::try_from(share).unwrap_or(usize::MAX).max(1)
        })
    }
}

/// The `instances` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instances {
    /// A fixed number.
    Count(NonZeroUsize),
    /// `"max"` less `n` (a negative number in the file), never below 1.
    MaxMinus(usize),
}

impl Instances {
    /// The worker count on a machine where `cpus` CPUs are usable.
    pub fn resolve(self, cpus: usize) -> usize {
        match self {
            Instances::Count(n) => n.get(),
            Instances::MaxMinus(n) => cpus.saturating_sub(n).max(1),
        }
    }
}

/// A config that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file was read, and has problems.
    #[error("{}", Problems { path, list: problems })]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found, in file order.
        problems: Vec<Problem>,
    },
}

/// One thing wrong with a config file, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong, naming the key.
    pub message: String,
}

struct Problems<'a> {
    path: &'a Path,
    list: &'a [Problem],
}

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.list.len();
        let noun = if count == 1 { "problem" } else { "problems" };
        write!(f, "{count} {noun} in {}:", self.path.display())?;
        for p in self.list {
            write!(f, "\n  {}:{}:{}: {}", self.path.display(), p.line, p.column, p.message)?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let text = std::fs::read_to_string(&absolute).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_str(&text, &absolute).map_err(|problems| ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
        })
    }

    /// Validates config text as if it were read from `path` (which anchors relative `cwd`s).
    pub fn from_str(text: &str, path: &Path) -> Result<Config, Vec<Problem>> {
        let base = path.parent().unwrap_or(Path::new("/"));
        let (apps, admin, corral, warnings) = parse::parse(text, base)?;
        Ok(Config {
            path: path.to_path_buf(),
            apps,
            admin,
            corral,
            env_name: None,
            warnings,
        })
    }

    /// Applies `--env NAME`: every app's `[app.env_NAME]` is merged over its `env` (a variable
    /// in both takes the `env_NAME` value; apps without the table keep their `env`), as PM2's
    /// `--env`. An error when no app has the table: a misspelt name must not pass silently.
    pub fn choose_env(&mut self, name: &str) -> Result<(), String> {
        if !self.apps.iter().any(|a| a.envs.iter().any(|(set, _)| set == name)) {
            let known: std::collections::BTreeSet<&str> = self
                .apps
                .iter()
                .flat_map(|a| a.envs.iter().map(|(s, _)| s.as_str()))
                .collect();
            let known = if known.is_empty() {
                "the file has no [app.env_NAME] table".to_owned()
            } else {
                format!(
                    "it has {}",
                    known.iter().map(|s| format!("env_{s}")).collect::<Vec<_>>().join(", ")
                )
            };
            return Err(format!("--env {name}: no app has [app.env_{name}]; {known}"));
        }
        for app in &mut self.apps {
            let Some((_, vars)) = app.envs.iter().find(|(set, _)| set == name) else {
                continue;
            };
            for (key, value) in vars.clone() {
                match app.env.iter_mut().find(|(k, _)| *k == key) {
                    Some(slot) => slot.1 = value,
                    None => app.env.push((key, value)),
                }
            }
        }
        self.env_name = Some(name.to_owned());
        Ok(())
    }

    /// The app with this name.
    pub fn app(&self, name: &str) -> Option<&AppConfig> {
        self.apps.iter().find(|a| a.name == name)
    }
}

#[cfg(test)]
mod tests;
