//! The keys of PM2's habits that drive restarts: `watch`, `ignore_watch`, `watch_delay`.
//!
//! `watch = true` watches the app's `cwd`; a list watches those paths (relative to `cwd`).
//! `ignore_watch` replaces the default (`node_modules`, `.git`); corral's own log files and
//! the config file are ignored whatever it says (see [`crate::watch`]).

use std::path::Path;
use std::time::Duration;

use toml::de::DeValue;

use super::table::{type_name, Report, Table};
use super::values::read_duration;
use super::WatchConfig;

/// `ignore_watch` when the file does not set it (PM2's habit).
pub const DEFAULT_IGNORE: &[&str] = &["node_modules", ".git"];

/// Reads `watch`, `ignore_watch` and `watch_delay` from an app's table.
pub(super) fn read_watch(t: &mut Table<'_>, cwd: &Path, r: &mut Report<'_>) -> Option<WatchConfig> {
    let roots = t.optional("watch", r, |v| read_roots(v, cwd));
    let ignore = t.optional("ignore_watch", r, read_patterns);
    let delay = t.optional("watch_delay", r, read_duration);
    let context = t.context.clone();
    match roots {
        Some(Some(paths)) => Some(WatchConfig {
            paths,
            ignore: ignore.unwrap_or_else(|| DEFAULT_IGNORE.iter().map(|s| (*s).to_owned()).collect()),
            delay: delay.unwrap_or(Duration::from_secs(1)),
        }),
        _ => {
            if ignore.is_some() || delay.is_some() {
                r.warn_at(
                    t.span.clone(),
                    format!("{context}ignore_watch and watch_delay do nothing without `watch`"),
                );
            }
            None
        }
    }
}

/// `true` (the cwd), `false`, or a list of paths: `Some(None)` when off.
fn read_roots(v: &DeValue<'_>, cwd: &Path) -> Result<Option<Vec<std::path::PathBuf>>, String> {
    match v {
        DeValue::Boolean(true) => Ok(Some(vec![cwd.to_path_buf()])),
        DeValue::Boolean(false) => Ok(None),
        DeValue::Array(items) => {
            let mut paths = Vec::new();
            for item in items {
                match item.get_ref() {
                    DeValue::String(s) if !s.is_empty() && !s.contains('\0') => paths.push(cwd.join(s.as_ref())),
                    other => {
                        return Err(format!(
                            "expected paths (strings, relative to cwd), found {}",
                            type_name(other)
                        ))
                    }
                }
            }
            if paths.is_empty() {
                return Err("an empty list watches nothing: write `watch = false`, or leave it out".into());
            }
            Ok(Some(paths))
        }
        other => Err(format!(
            "expected true, false or a list of paths, found {}",
            type_name(other)
        )),
    }
}

fn read_patterns(v: &DeValue<'_>) -> Result<Vec<String>, String> {
    let DeValue::Array(items) = v else {
        return Err(format!("expected a list of names or patterns, found {}", type_name(v)));
    };
    items
        .iter()
        .map(|item| match item.get_ref() {
            DeValue::String(s) if !s.is_empty() => Ok(s.to_string()),
            other => Err(format!(
                "expected a name or pattern (a string), found {}",
                type_name(other)
            )),
        })
        .collect()
}
