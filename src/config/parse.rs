//! The walk from TOML text to [`AppConfig`]s, collecting every problem with its position.
//!
//! serde's derive stops at the first error and loses the position of most of them, so the
//! file is parsed into toml's spanned tree ([`DeTable`]) and each table is read key by key
//! through [`Table`]: `take` removes a key, and whatever is left at `finish` is unknown.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::ops::Range;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;
use toml::de::{DeString, DeTable, DeValue};
use toml::Spanned;

use super::units::{parse_duration, parse_size, DURATION_HINT, SIZE_HINT};
use super::{AppConfig, Balance, HealthCheck, HttpLimits, Instances, LogFiles, Network, Problem, Sticky};

/// Keys that PM2 users will reach for and that this version does not implement yet: they get a
/// plain "not supported yet" instead of "unknown key".
const NOT_YET: &[&str] = &["ready", "tls"];

pub(super) const APP_KEYS: &[&str] = &[
    "name",
    "command",
    "cwd",
    "listen",
    "instances",
    "env",
    "port_env",
    "listen_timeout",
    "kill_timeout",
    "kill_signal",
    "drain_timeout",
    "ready_path",
    "reload_batch",
    "balance",
    "sticky",
    "sticky_cookie",
    "trusted_proxies",
    "health_check",
    "autorestart",
    "min_uptime",
    "max_restarts",
    "restart_delay",
    "exp_backoff_restart_delay",
    "stop_exit_codes",
    "max_memory_restart",
    "wait_ready",
    "out_file",
    "error_file",
    "merge_logs",
    "log_date_format",
    "log_max_size",
    "log_retain",
    "max_header_size",
    "max_headers",
    "header_read_timeout",
    "upstream_timeout",
    "client_body_timeout",
    "max_body_size",
    "max_connections",
    "max_connections_per_ip",
    "tunnel_idle_timeout",
];

/// Parses config text; relative `cwd`s resolve against `base`.
pub(super) fn parse(text: &str, base: &Path) -> Result<Vec<AppConfig>, Vec<Problem>> {
    let lines = Lines::new(text);
    let mut problems = Vec::new();
    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(e) => {
            let at = e.span().map_or(0, |s| s.start);
            let (line, column) = lines.position(at);
            let message = format!("TOML syntax error: {}", e.message().trim_end());
            return Err(vec![Problem { line, column, message }]);
        }
    };
    let mut report = Report {
        lines: &lines,
        problems: &mut problems,
    };
    let root_span = root.span();
    let mut top = Table::new(root.into_inner(), root_span, String::new());

    let mut apps = Vec::new();
    match top.take("app") {
        None => report.at(0..0, "no [[app]] table: the file must define at least one app"),
        Some((_, value)) => {
            let span = value.span();
            match value.into_inner() {
                DeValue::Array(items) => {
                    for (index, item) in items.iter().enumerate() {
                        let span = item.span();
                        match item.get_ref() {
                            DeValue::Table(t) => {
                                let table = Table::new(t.clone(), span.clone(), format!("app #{}: ", index + 1));
                                if let Some(app) = parse_app(table, base, &mut report) {
                                    apps.push((app, span));
                                }
                            }
                            _ => report.at(span, "`app` entries must be tables ([[app]])"),
                        }
                    }
                }
                _ => report.at(span, "`app` must be an array of tables: write [[app]]"),
            }
        }
    }
    top.finish(&mut report, &[]);
    check_across_apps(&apps, &mut report);

    if problems.is_empty() {
        Ok(apps.into_iter().map(|(app, _)| app).collect())
    } else {
        problems.sort_by_key(|p| (p.line, p.column));
        Err(problems)
    }
}

fn parse_app(mut t: Table<'_>, base: &Path, r: &mut Report<'_>) -> Option<AppConfig> {
    let name = t.required("name", r, read_name);
    if let Some(name) = &name {
        t.context = format!("app \"{name}\": ");
    }
    let command = t.required("command", r, read_argv);
    let cwd = t
        .optional("cwd", r, read_string)
        .map_or_else(|| base.to_path_buf(), |dir| base.join(dir));
    let listen = t.optional("listen", r, read_listen);
    let instances = t
        .optional("instances", r, read_instances)
        .unwrap_or(Instances::Count(NonZeroUsize::MIN));
    let env = t.optional("env", r, read_env).unwrap_or_default();
    let port_env = t
        .optional("port_env", r, read_env_name)
        .unwrap_or_else(|| "PORT".into());
    let listen_timeout = t
        .optional("listen_timeout", r, read_duration)
        .unwrap_or(Duration::from_secs(10));
    let kill_timeout = t
        .optional("kill_timeout", r, read_duration)
        .unwrap_or(Duration::from_secs(5));
    let kill_signal = t.optional("kill_signal", r, read_signal).unwrap_or(Signal::SIGTERM);
    let drain_timeout = t
        .optional("drain_timeout", r, read_duration)
        .unwrap_or(Duration::from_secs(30));
    let ready_path = t.optional("ready_path", r, read_path);
    let reload_batch = t.optional("reload_batch", r, |v| read_count(v, 1, 1024)).unwrap_or(1);
    let balance = t.optional("balance", r, read_balance).unwrap_or(Balance::RoundRobin);
    let sticky = t.optional("sticky", r, read_sticky).unwrap_or(Sticky::None);
    let sticky_cookie = t
        .optional("sticky_cookie", r, read_cookie_name)
        .unwrap_or_else(|| "corral_sticky".into());
    let trusted_proxies = t.optional("trusted_proxies", r, read_networks).unwrap_or_default();
    let health_check = t.optional("health_check", r, read_health_check);
    let autorestart = t.optional("autorestart", r, read_bool).unwrap_or(true);
    let min_uptime = t
        .optional("min_uptime", r, read_duration)
        .unwrap_or(Duration::from_secs(1));
    let max_restarts = t
        .optional("max_restarts", r, |v| read_count(v, 0, 1_000_000))
        .unwrap_or(16) as u32;
    let restart_delay = t.optional("restart_delay", r, read_duration).unwrap_or(Duration::ZERO);
    let exp_backoff_restart_delay = t
        .optional("exp_backoff_restart_delay", r, read_duration)
        .unwrap_or(Duration::from_millis(100));
    let stop_exit_codes = t.optional("stop_exit_codes", r, read_exit_codes).unwrap_or_default();
    let wait_ready = t.optional("wait_ready", r, read_bool).unwrap_or(false);
    let logs = LogFiles {
        out_file: t.optional("out_file", r, read_string).map(|p| base.join(p)),
        error_file: t.optional("error_file", r, read_string).map(|p| base.join(p)),
        merge_logs: t.optional("merge_logs", r, read_bool).unwrap_or(false),
        date_format: t
            .optional("log_date_format", r, read_string)
            .unwrap_or_else(|| "YYYY-MM-DDTHH:mm:ss.SSSZ".into()),
        max_size: t.optional("log_max_size", r, |v| match read_size(v)? {
            n if n < 1024 => Err("must be at least 1K".into()),
            n => Ok(n),
        }),
        retain: t.optional("log_retain", r, |v| read_count(v, 0, 1000)).unwrap_or(5),
    };
    let max_memory_restart = t.optional("max_memory_restart", r, |v| match read_size(v)? {
        0 => Err("must be greater than zero".into()),
        n => Ok(n),
    });
    let defaults = HttpLimits::default();
    let http = HttpLimits {
        max_header_size: t
            .optional("max_header_size", r, read_header_size)
            .unwrap_or(defaults.max_header_size),
        max_headers: t
            .optional("max_headers", r, |v| read_count(v, 1, 10_000))
            .unwrap_or(defaults.max_headers),
        header_read_timeout: t
            .optional("header_read_timeout", r, read_positive_duration)
            .unwrap_or(defaults.header_read_timeout),
        upstream_timeout: t
            .optional("upstream_timeout", r, read_positive_duration)
            .unwrap_or(defaults.upstream_timeout),
        client_body_timeout: t
            .optional("client_body_timeout", r, read_positive_duration)
            .unwrap_or(defaults.client_body_timeout),
        max_body_size: t.optional("max_body_size", r, read_size),
        max_connections: t.optional("max_connections", r, |v| read_count(v, 1, 100_000_000)),
        max_connections_per_ip: t.optional("max_connections_per_ip", r, |v| read_count(v, 1, 100_000_000)),
        tunnel_idle_timeout: t.optional("tunnel_idle_timeout", r, read_positive_duration),
    };
    let table_span = t.span.clone();
    t.finish(r, NOT_YET);

    if !cwd.is_dir() {
        r.at(
            table_span.clone(),
            format!("{}cwd: {} is not a directory", ctx(&name), cwd.display()),
        );
    } else if let Some(command) = &command {
        if let Err(message) = find_program(&command[0], &cwd) {
            r.at(table_span, format!("{}command: {message}", ctx(&name)));
        }
    }
    Some(AppConfig {
        name: name?,
        command: command?,
        cwd,
        listen,
        instances,
        env,
        port_env,
        listen_timeout,
        kill_timeout,
        kill_signal,
        drain_timeout,
        ready_path,
        reload_batch,
        balance,
        sticky,
        sticky_cookie,
        trusted_proxies,
        health_check,
        autorestart,
        min_uptime,
        max_restarts,
        restart_delay,
        exp_backoff_restart_delay,
        stop_exit_codes,
        max_memory_restart,
        wait_ready,
        logs,
        http,
    })
}

fn ctx(name: &Option<String>) -> String {
    name.as_ref().map(|n| format!("app \"{n}\": ")).unwrap_or_default()
}

fn check_across_apps(apps: &[(AppConfig, Range<usize>)], r: &mut Report<'_>) {
    for (i, (app, span)) in apps.iter().enumerate() {
        let earlier = &apps[..i];
        if earlier.iter().any(|(a, _)| a.name == app.name) {
            r.at(
                span.clone(),
                format!("app \"{}\": name: another app has this name", app.name),
            );
        }
        if let Some(addr) = app.listen {
            if earlier.iter().any(|(a, _)| a.listen.is_some_and(|b| overlaps(addr, b))) {
                r.at(
                    span.clone(),
                    format!("app \"{}\": listen: {addr} is used by another app", app.name),
                );
            }
        }
    }
}

fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Checks that the program exists: a path (relative to `cwd`) or a name on `PATH`.
fn find_program(program: &str, cwd: &Path) -> Result<(), String> {
    if program.contains('/') {
        let path = cwd.join(program);
        return if path.is_file() {
            Ok(())
        } else {
            Err(format!("{} does not exist", path.display()))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|dir| dir.join(program).is_file()) {
        Ok(())
    } else {
        Err(format!("`{program}` was not found on PATH"))
    }
}

/// Maps byte offsets to 1-based line and column.
struct Lines {
    starts: Vec<usize>,
}

impl Lines {
    fn new(text: &str) -> Lines {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Lines { starts }
    }

    fn position(&self, offset: usize) -> (usize, usize) {
        let line = self.starts.partition_point(|&s| s <= offset).max(1);
        (line, offset - self.starts[line - 1] + 1)
    }
}

struct Report<'a> {
    lines: &'a Lines,
    problems: &'a mut Vec<Problem>,
}

impl Report<'_> {
    fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = self.lines.position(span.start);
        self.problems.push(Problem {
            line,
            column,
            message: message.into(),
        });
    }
}

type Entry<'i> = (Spanned<DeString<'i>>, Spanned<DeValue<'i>>);

/// A table being read: keys are taken one by one; leftovers are unknown keys.
struct Table<'i> {
    entries: Vec<Entry<'i>>,
    span: Range<usize>,
    /// Prefix for messages, e.g. `app "web": `.
    context: String,
}

impl<'i> Table<'i> {
    fn new(table: DeTable<'i>, span: Range<usize>, context: String) -> Table<'i> {
        Table {
            entries: table.into_iter().collect(),
            span,
            context,
        }
    }

    fn take(&mut self, key: &str) -> Option<(Range<usize>, Spanned<DeValue<'i>>)> {
        let index = self.entries.iter().position(|(k, _)| k.get_ref().as_ref() == key)?;
        let (k, v) = self.entries.swap_remove(index);
        Some((k.span(), v))
    }

    fn optional<T>(
        &mut self,
        key: &str,
        r: &mut Report<'_>,
        read: impl FnOnce(&DeValue<'_>) -> Result<T, String>,
    ) -> Option<T> {
        let (_, value) = self.take(key)?;
        match read(value.get_ref()) {
            Ok(v) => Some(v),
            Err(message) => {
                r.at(value.span(), format!("{}{key}: {message}", self.context));
                None
            }
        }
    }

    fn required<T>(
        &mut self,
        key: &str,
        r: &mut Report<'_>,
        read: impl FnOnce(&DeValue<'_>) -> Result<T, String>,
    ) -> Option<T> {
        if !self.entries.iter().any(|(k, _)| k.get_ref().as_ref() == key) {
            r.at(
                self.span.clone(),
                format!("{}{key}: missing (it is required)", self.context),
            );
            return None;
        }
        self.optional(key, r, read)
    }

    /// Reports every key nobody took.
    fn finish(self, r: &mut Report<'_>, not_yet: &[&str]) {
        for (key, _) in self.entries {
            let name = key.get_ref().as_ref();
            let message = if not_yet.contains(&name) {
                format!("{}{name}: not supported by this version of corral yet", self.context)
            } else {
                let hint = closest(name, APP_KEYS)
                    .map(|k| format!(" (did you mean `{k}`?)"))
                    .unwrap_or_default();
                format!("{}{name}: unknown key{hint}", self.context)
            };
            r.at(key.span(), message);
        }
    }
}

/// A known key within two edits of a misspelt one.
fn closest(key: &str, known: &'static [&'static str]) -> Option<&'static str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(previous + 1);
        }
    }
    row[b.len()]
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

fn integer(v: &DeValue<'_>) -> Option<i64> {
    v.as_integer()
        .and_then(|i| i64::from_str_radix(i.as_str(), i.radix()).ok())
}

fn read_string(v: &DeValue<'_>) -> Result<String, String> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("expected a string, found {}", type_name(v)))
}

fn read_name(v: &DeValue<'_>) -> Result<String, String> {
    let name = read_string(v)?;
    let valid =
        !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if valid {
        Ok(name)
    } else {
        Err(format!(
            "{name:?} is not a valid name (1-64 of letters, digits, '-', '_', '.')"
        ))
    }
}

fn read_path(v: &DeValue<'_>) -> Result<String, String> {
    let path = read_string(v)?;
    let valid = path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic());
    if valid {
        Ok(path)
    } else {
        Err(format!("{path:?} is not a request path such as \"/health\""))
    }
}

fn read_balance(v: &DeValue<'_>) -> Result<Balance, String> {
    match read_string(v)?.as_str() {
        "round_robin" => Ok(Balance::RoundRobin),
        "least_conn" => Ok(Balance::LeastConn),
        other => Err(format!(
            "{other:?} is not a balancing method: \"round_robin\" or \"least_conn\""
        )),
    }
}

fn read_sticky(v: &DeValue<'_>) -> Result<Sticky, String> {
    match read_string(v)?.as_str() {
        "none" => Ok(Sticky::None),
        "cookie" => Ok(Sticky::Cookie),
        "ip" => Ok(Sticky::Ip),
        other => Err(format!(
            "{other:?} is not a sticky mode: \"none\", \"cookie\" or \"ip\""
        )),
    }
}

fn read_cookie_name(v: &DeValue<'_>) -> Result<String, String> {
    let name = read_string(v)?;
    let valid =
        !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if valid {
        Ok(name)
    } else {
        Err(format!(
            "{name:?} is not a valid cookie name (letters, digits, '-', '_', '.')"
        ))
    }
}

fn read_networks(v: &DeValue<'_>) -> Result<Vec<Network>, String> {
    let DeValue::Array(items) = v else {
        return Err(format!(
            "expected an array of addresses such as [\"127.0.0.1\", \"10.0.0.0/8\"], found {}",
            type_name(v)
        ));
    };
    items
        .iter()
        .map(|item| {
            let text = item.get_ref().as_str().ok_or("expected strings")?;
            text.parse::<Network>()
                .map_err(|_| format!("{text:?} is not an IP address or CIDR block"))
        })
        .collect()
}

fn read_health_check(v: &DeValue<'_>) -> Result<HealthCheck, String> {
    let DeValue::Table(table) = v else {
        return Err(format!(
            "expected a table such as {{ path = \"/health\", interval = \"5s\" }}, found {}",
            type_name(v)
        ));
    };
    let mut check = HealthCheck {
        path: String::new(),
        interval: Duration::from_secs(5),
        timeout: Duration::from_secs(2),
        unhealthy_threshold: 3,
    };
    for (key, value) in table.iter() {
        let value = value.get_ref();
        let key = key.get_ref().as_ref();
        let within = |e: String| format!("{key}: {e}");
        match key {
            "path" => check.path = read_path(value).map_err(within)?,
            "interval" => check.interval = read_positive_duration(value).map_err(within)?,
            "timeout" => check.timeout = read_positive_duration(value).map_err(within)?,
            "unhealthy_threshold" => check.unhealthy_threshold = read_count(value, 1, 100).map_err(within)? as u32,
            other => {
                return Err(format!(
                    "{other}: unknown key (path, interval, timeout, unhealthy_threshold)"
                ))
            }
        }
    }
    if check.path.is_empty() {
        return Err("path: missing (it is required)".into());
    }
    Ok(check)
}

fn read_bool(v: &DeValue<'_>) -> Result<bool, String> {
    v.as_bool()
        .ok_or_else(|| format!("expected true or false, found {}", type_name(v)))
}

fn read_exit_codes(v: &DeValue<'_>) -> Result<Vec<i32>, String> {
    let codes = match v {
        DeValue::Array(items) => items.iter().map(|i| integer(i.get_ref())).collect::<Option<Vec<i64>>>(),
        other => integer(other).map(|c| vec![c]),
    };
    let codes = codes.ok_or_else(|| {
        format!(
            "expected an exit code or an array of them such as [0], found {}",
            type_name(v)
        )
    })?;
    codes
        .into_iter()
        .map(|c| {
            if (0..=255).contains(&c) {
                Ok(c as i32)
            } else {
                Err(format!("{c} is not an exit code (0..255)"))
            }
        })
        .collect()
}

fn read_env_name(v: &DeValue<'_>) -> Result<String, String> {
    let name = read_string(v)?;
    let valid = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(name)
    } else {
        Err(format!("{name:?} is not a valid environment variable name"))
    }
}

fn read_argv(v: &DeValue<'_>) -> Result<Vec<String>, String> {
    const HINT: &str = r#"expected an array of strings such as ["node", "server.js"] (no shell)"#;
    let DeValue::Array(items) = v else {
        return Err(format!("{HINT}, found {}", type_name(v)));
    };
    let argv = items
        .iter()
        .map(|item| item.get_ref().as_str().map(str::to_owned))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| format!("{HINT}, found an array with a non-string item"))?;
    match argv.first() {
        None => Err(format!("{HINT}, found an empty array")),
        Some(program) if program.is_empty() => Err("the program name is empty".into()),
        Some(_) => Ok(argv),
    }
}

fn read_listen(v: &DeValue<'_>) -> Result<SocketAddr, String> {
    const HINT: &str = r#"expected an address such as "0.0.0.0:4321", "127.0.0.1:8080", "[::]:80" or a port number"#;
    if let Some(port) = integer(v) {
        return u16::try_from(port)
            .map(|port| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port))
            .map_err(|_| format!("{port} is not a port number"));
    }
    let text = v.as_str().ok_or_else(|| format!("{HINT}, found {}", type_name(v)))?;
    if let Some(port) = text.strip_prefix("localhost:") {
        if let Ok(port) = port.parse::<u16>() {
            return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
        }
    }
    text.parse().map_err(|_| format!("{HINT}, found {text:?}"))
}

fn read_instances(v: &DeValue<'_>) -> Result<Instances, String> {
    const HINT: &str = r#"expected a positive integer, "max", or a negative integer (max - n)"#;
    let number = match v {
        DeValue::String(s) if s.as_ref() == "max" => return Ok(Instances::MaxMinus(0)),
        DeValue::String(s) => s.parse::<i64>().map_err(|_| format!("{HINT}, found {s:?}"))?,
        _ => integer(v).ok_or_else(|| format!("{HINT}, found {}", type_name(v)))?,
    };
    match number {
        0 => Err(format!("{HINT}, found 0")),
        n if n > 1024 => Err(format!("{n} workers is more than the limit of 1024")),
        n if n > 0 => Ok(Instances::Count(NonZeroUsize::new(n as usize).expect("UNWRAP: n > 0"))),
        n => Ok(Instances::MaxMinus(n.unsigned_abs().min(1024) as usize)),
    }
}

fn read_duration(v: &DeValue<'_>) -> Result<Duration, String> {
    if let Some(ms) = integer(v) {
        return u64::try_from(ms)
            .map(Duration::from_millis)
            .map_err(|_| format!("expected {DURATION_HINT}, found {ms}"));
    }
    let text = v
        .as_str()
        .ok_or_else(|| format!("expected {DURATION_HINT}, found {}", type_name(v)))?;
    parse_duration(text).ok_or_else(|| format!("expected {DURATION_HINT}, found {text:?}"))
}

fn read_positive_duration(v: &DeValue<'_>) -> Result<Duration, String> {
    match read_duration(v)? {
        d if d.is_zero() => Err("must be greater than zero".into()),
        d => Ok(d),
    }
}

fn read_size(v: &DeValue<'_>) -> Result<u64, String> {
    if let Some(bytes) = integer(v) {
        return u64::try_from(bytes).map_err(|_| format!("expected {SIZE_HINT}, found {bytes}"));
    }
    let text = v
        .as_str()
        .ok_or_else(|| format!("expected {SIZE_HINT}, found {}", type_name(v)))?;
    parse_size(text).ok_or_else(|| format!("expected {SIZE_HINT}, found {text:?}"))
}

fn read_header_size(v: &DeValue<'_>) -> Result<usize, String> {
    // hyper's read buffer cannot be smaller than 8 KiB; 1 MiB is already generous.
    match read_size(v)? {
        n if (8 << 10..=1 << 20).contains(&n) => Ok(n as usize),
        n => Err(format!("{n} bytes is outside the allowed range 8K..1M")),
    }
}

fn read_count(v: &DeValue<'_>, min: i64, max: i64) -> Result<usize, String> {
    match integer(v) {
        Some(n) if (min..=max).contains(&n) => Ok(n as usize),
        Some(n) => Err(format!("{n} is outside the allowed range {min}..{max}")),
        None => Err(format!("expected an integer, found {}", type_name(v))),
    }
}

fn read_signal(v: &DeValue<'_>) -> Result<Signal, String> {
    let text = read_string(v)?;
    let upper = text.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&full).map_err(|_| format!("{text:?} is not a signal name such as \"SIGTERM\" or \"SIGINT\""))
}

fn read_env(v: &DeValue<'_>) -> Result<Vec<(String, String)>, String> {
    let DeValue::Table(table) = v else {
        return Err(format!("expected a table ([app.env]), found {}", type_name(v)));
    };
    let mut env = Vec::new();
    for (key, value) in table.iter() {
        let key = key.get_ref().as_ref();
        let text = match value.get_ref() {
            DeValue::String(s) => s.to_string(),
            integer @ DeValue::Integer(_) => integer_text(integer),
            DeValue::Float(f) => f.as_str().to_owned(),
            DeValue::Boolean(b) => b.to_string(),
            other => {
                return Err(format!(
                    "{key}: expected a string, number or boolean, found {}",
                    type_name(other)
                ))
            }
        };
        if key.is_empty() || key.contains('=') || key.contains('\0') || text.contains('\0') {
            return Err(format!("{key:?} is not a valid environment variable"));
        }
        env.push((key.to_owned(), text));
    }
    Ok(env)
}

fn integer_text(v: &DeValue<'_>) -> String {
    integer(v).map_or_else(|| "0".into(), |i| i.to_string())
}
