//! The walk from TOML text to [`AppConfig`]s, collecting every problem with its position.
//!
//! serde's derive stops at the first error and loses the position of most of them, so the
//! file is parsed into toml's spanned tree ([`DeTable`]) and each table is read key by key
//! through [`Table`]: `take` removes a key, and whatever is left at `finish` is unknown.
//! The tools of that walk are in [`super::table`], the readers of single values in
//! [`super::values`]; this file knows the schema: which keys an app has and their defaults.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use toml::de::{DeTable, DeValue};

use super::table::{Lines, Report, Table};
use super::values::*;
use super::{
    AccessLog, AccessLogFormat, AdminConfig, AppConfig, Balance, CorralConfig, HttpLimits, Instances, LogFiles,
    Problem, Sticky,
};

/// Keys that PM2 users will reach for and that this version does not implement yet: they get a
/// plain "not supported yet" instead of "unknown key".
const NOT_YET: &[&str] = &["ready"];

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
    "reload_keep_old",
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
    "user",
    "group",
    "wait_ready",
    "out_file",
    "error_file",
    "merge_logs",
    "log_date_format",
    "log_utc",
    "log_max_size",
    "log_rotate_interval",
    "log_retain",
    "log_compress",
    "max_header_size",
    "max_headers",
    "header_read_timeout",
    "upstream_timeout",
    "client_body_timeout",
    "max_body_size",
    "client_body_buffer_size",
    "max_connections",
    "max_connections_per_ip",
    "tunnel_idle_timeout",
    "send_timeout",
    "tls",
    "http_redirect",
    "hosts",
    "default",
    "hsts",
    "access_log",
    "access_log_format",
    "request_id",
    "watch",
    "cron_restart",
    "ignore_watch",
    "watch_delay",
];

/// The apps, the `[admin]` and `[corral]` tables, and the warnings of a valid file.
type Parsed = (Vec<AppConfig>, Option<AdminConfig>, CorralConfig, Vec<Problem>);

/// Parses config text; relative `cwd`s resolve against `base`.
pub(super) fn parse(text: &str, base: &Path) -> Result<Parsed, Vec<Problem>> {
    let lines = Lines::new(text);
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
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
        warnings: &mut warnings,
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
    let admin = top
        .take("admin")
        .and_then(|(_, value)| super::top::read_admin(value, base, &apps, &mut report));
    let corral = top
        .take("corral")
        .map(|(_, value)| super::top::read_corral(value, base, &mut report))
        .unwrap_or_default();
    top.finish(&mut report, &[]);
    check_across_apps(&apps, &mut report);

    if problems.is_empty() {
        warnings.sort_by_key(|p| (p.line, p.column));
        Ok((apps.into_iter().map(|(app, _)| app).collect(), admin, corral, warnings))
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
    let mut envs = Vec::new();
    for (key, span, value) in t.take_prefixed("env_") {
        let set = &key["env_".len()..];
        if set.is_empty() || !set.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            r.at(
                span,
                format!(
                    "{}{key}: an environment's name is letters, digits, `_` and `-` ([app.env_production])",
                    t.context
                ),
            );
            continue;
        }
        match read_env(value.get_ref()) {
            Ok(vars) => envs.push((set.to_owned(), vars)),
            Err(message) => r.at(value.span(), format!("{}{key}: {message}", t.context)),
        }
    }
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
    let reload_keep_old = t.optional("reload_keep_old", r, read_bool).unwrap_or(true);
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
        utc: t.optional("log_utc", r, read_bool).unwrap_or(false),
        rotate_interval: t.optional("log_rotate_interval", r, read_rotate_interval),
        retain: t.optional("log_retain", r, |v| read_count(v, 0, 1000)).unwrap_or(5),
        compress: t.optional("log_compress", r, read_bool).unwrap_or(false),
    };
    let user = t.optional("user", r, read_user);
    let group = t.optional("group", r, read_group);
    let run_as = match (user, group) {
        (Some(mut user), group) => {
            if let Some(gid) = group {
                user.gid = gid;
            }
            Some(user)
        }
        (None, Some(_)) => {
            r.at(t.span.clone(), format!("{}group: needs `user` too", ctx(&name)));
            None
        }
        (None, None) => None,
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
        client_body_buffer_size: t
            .optional("client_body_buffer_size", r, |v| match read_size(v)? {
                n if n > 16 << 20 => Err("must be at most 16M".into()),
                n => Ok(n),
            })
            .unwrap_or(defaults.client_body_buffer_size),
        max_connections: t.optional("max_connections", r, |v| read_count(v, 1, 100_000_000)),
        max_connections_per_ip: t.optional("max_connections_per_ip", r, |v| read_count(v, 1, 100_000_000)),
        tunnel_idle_timeout: t.optional("tunnel_idle_timeout", r, read_positive_duration),
        send_timeout: t
            .optional("send_timeout", r, read_positive_duration)
            .unwrap_or(defaults.send_timeout),
    };
    let tls = t
        .take("tls")
        .and_then(|(_, value)| super::tls::read_tls(value, base, &ctx(&name), r));
    let http_redirect = t.optional("http_redirect", r, read_listen);
    let hosts = t.optional("hosts", r, super::tls::read_hosts).unwrap_or_default();
    let default_host = t.optional("default", r, read_bool).unwrap_or(false);
    let hsts = t.optional("hsts", r, super::tls::read_hsts);
    let access_log_path = t.optional("access_log", r, read_string).map(|p| base.join(p));
    let access_log_format = t.optional("access_log_format", r, read_access_log_format);
    let request_id = t.optional("request_id", r, read_bool).unwrap_or(true);
    let watch = super::habits::read_watch(&mut t, &cwd, r);
    let cron_restart = t.optional("cron_restart", r, |v| crate::cron::Schedule::parse(&read_string(v)?));
    let table_span = t.span.clone();
    t.finish(r, NOT_YET);

    if let Some(tls) = &tls {
        super::tls::check_files(tls, &hosts, table_span.clone(), &ctx(&name), r);
    }
    for (key, set) in [("http_redirect", http_redirect.is_some()), ("hsts", hsts.is_some())] {
        if set && tls.is_none() {
            r.at(
                table_span.clone(),
                format!("{}{key}: needs [app.tls] (it is about HTTPS)", ctx(&name)),
            );
        }
    }
    if (http_redirect.is_some() || tls.is_some() || !hosts.is_empty()) && listen.is_none() {
        r.at(
            table_span.clone(),
            format!("{}listen: needed by tls, http_redirect and hosts", ctx(&name)),
        );
    }
    if access_log_path.is_some() && listen.is_none() {
        r.at(
            table_span.clone(),
            format!(
                "{}access_log: needs listen (an app without it serves no requests)",
                ctx(&name)
            ),
        );
    }
    if access_log_format.is_some() && access_log_path.is_none() {
        r.at(
            table_span.clone(),
            format!("{}access_log_format: needs access_log", ctx(&name)),
        );
    }
    let access_log = access_log_path.map(|path| AccessLog {
        path,
        format: access_log_format.unwrap_or(AccessLogFormat::Combined),
    });

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
        envs,
        port_env,
        listen_timeout,
        kill_timeout,
        kill_signal,
        drain_timeout,
        ready_path,
        reload_batch,
        reload_keep_old,
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
        run_as,
        wait_ready,
        logs,
        http,
        tls,
        http_redirect,
        hosts,
        default_host,
        hsts,
        access_log,
        request_id,
        watch,
        cron_restart,
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
            let on_it: Vec<&AppConfig> = earlier
                .iter()
                .map(|(a, _)| a)
                .filter(|a| a.listen == Some(addr))
                .collect();
            if earlier
                .iter()
                .any(|(a, _)| a.listen.is_some_and(|b| b != addr && overlaps(addr, b)))
            {
                r.at(
                    span.clone(),
                    format!(
                        "app \"{}\": listen: {addr} overlaps the address of another app",
                        app.name
                    ),
                );
            } else if !on_it.is_empty() {
                check_shared(app, &on_it, "listen", addr, span, r);
            }
        }
        if let Some(redirect) = app.http_redirect {
            let clash = apps
                .iter()
                .any(|(a, _)| a.listen.is_some_and(|b| overlaps(redirect, b)));
            let partial = earlier
                .iter()
                .any(|(a, _)| a.http_redirect.is_some_and(|b| b != redirect && overlaps(redirect, b)));
            if clash || partial {
                r.at(
                    span.clone(),
                    format!(
                        "app \"{}\": http_redirect: {redirect} overlaps the address of another app",
                        app.name
                    ),
                );
            } else {
                let on_it: Vec<&AppConfig> = earlier
                    .iter()
                    .map(|(a, _)| a)
                    .filter(|a| a.http_redirect == Some(redirect))
                    .collect();
                if !on_it.is_empty() && app.listen.is_some_and(|l| on_it.iter().any(|a| a.listen != Some(l))) {
                    check_shared(app, &on_it, "http_redirect", redirect, span, r);
                }
            }
        }
    }
}

/// Apps on one address: each must name `hosts` (or be the one `default`), the names must be
/// distinct, and TLS must be on for all or none.
fn check_shared(
    app: &AppConfig,
    others: &[&AppConfig],
    key: &str,
    addr: SocketAddr,
    span: &Range<usize>,
    r: &mut Report<'_>,
) {
    let ctx = format!("app \"{}\": ", app.name);
    let claims = |a: &AppConfig| !a.hosts.is_empty() || a.default_host;
    if !claims(app) || others.iter().any(|a| !claims(a)) {
        r.at(span.clone(), format!("{ctx}{key}: {addr} is used by another app; apps share an address only when each names `hosts` (or is the `default`)"));
        return;
    }
    if app.default_host && others.iter().any(|a| a.default_host) {
        r.at(
            span.clone(),
            format!("{ctx}default: another app on {addr} is already the default"),
        );
    }
    for host in &app.hosts {
        if let Some(other) = others.iter().find(|a| a.hosts.contains(host)) {
            r.at(
                span.clone(),
                format!(
                    "{ctx}hosts: {host:?} is claimed by app \"{}\" on {addr} too",
                    other.name
                ),
            );
        }
    }
    if others.iter().any(|a| a.tls.is_some() != app.tls.is_some()) {
        r.at(
            span.clone(),
            format!("{ctx}tls: apps on one address are all TLS or all plain HTTP ({addr})"),
        );
    }
}

pub(super) fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
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
