//! `corral import`: a PM2 ecosystem file in, a commented `proxy.toml` out.
//!
//! # Flow
//!
//! 1. **Read** the file by its kind: `*.js`, `*.cjs`, `*.mjs` are run with `node` ([`eval`]:
//!    a child process with a deadline and bounded output, in the file's folder: PM2 `require`s
//!    them, so they are the user's own code); `*.json` is JSON (serde_json), and when that
//!    fails it is evaluated by `node` as a JavaScript expression, as PM2 itself reads it
//!    (comments, unquoted keys); `*.yml` / `*.yaml` are YAML (serde_norway: a small crate that
//!    reads YAML into serde types, the maintained fork of serde_yaml; PM2 reads these with
//!    js-yaml). Everything ends as a `serde_json::Value` and is treated as hostile input: wrong
//!    types are reported by key, never unwrapped.
//! 2. **Find the apps**: `apps` (or PM2's older `pm2`), else the value itself (an array of apps
//!    or one app). Other top-level keys (`deploy`, ...) are listed as not imported.
//! 3. **Map** each app ([`map`]: name, command, cwd, instances; [`env`]: environments and
//!    listen; [`policy`]: restart policy, logs, cron, watch, user): every PM2 key with a corral
//!    meaning becomes its corral key, with a comment naming the PM2 key it came from; the rest
//!    is listed with the reason.
//! 4. **Write** the TOML by hand ([`write`]), in a fixed order, so the output is deterministic.
//!
//! This module only translates: it starts nothing but `node`, and never reads or writes
//! `proxy.toml` itself (the CLI writes the text to stdout or `-o`).

mod env;
mod eval;
mod map;
mod policy;
mod write;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value as Json;

/// What can go wrong on the way from an ecosystem file to TOML text.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The name says neither JavaScript, JSON nor YAML.
    #[error("{}: not a PM2 process file (expected ecosystem.config.js, .cjs, .mjs, .json, .yml or .yaml)", path.display())]
    UnknownKind {
        /// The file.
        path: PathBuf,
    },
    /// `node` could not be started.
    #[error("cannot run `node` to evaluate the ecosystem file (is Node.js installed and on PATH?): {source}")]
    Node {
        /// Why.
        source: std::io::Error,
    },
    /// `node` ran past the deadline and was killed.
    #[error("{}: still running after {timeout:?}, so it was stopped (does the file start a server or wait for input?)", file.display())]
    Timeout {
        /// The file.
        file: PathBuf,
        /// The deadline.
        timeout: Duration,
    },
    /// `node` printed more than the bound.
    #[error("{}: node printed more than {limit} bytes; that is not an ecosystem file", file.display())]
    TooLarge {
        /// The file.
        file: PathBuf,
        /// The bound, in bytes.
        limit: u64,
    },
    /// Evaluating the file failed (a syntax error, a throw).
    #[error("{}: node could not load it ({status}):\n{stderr}", file.display())]
    Evaluation {
        /// The file.
        file: PathBuf,
        /// node's exit status.
        status: String,
        /// The end of node's stderr.
        stderr: String,
    },
    /// What came back is not the JSON document expected.
    #[error("{}: {reason}", file.display())]
    BadOutput {
        /// The file.
        file: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The file's content is not a process file: no apps, an app that is not an object, an
    /// app without `script`, ...
    #[error("{}: {reason}", file.display())]
    Invalid {
        /// The file.
        file: PathBuf,
        /// What was wrong, naming the app and key.
        reason: String,
    },
}

/// How to import.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `--env NAME`: fold `env_NAME` into `[app.env]` and leave the other `env_*` out.
    pub env: Option<String>,
    /// The folder the TOML will be written to (relative paths in it resolve from there). When
    /// it is the ecosystem file's folder, relative paths are kept as written; otherwise they
    /// become absolute.
    pub out_dir: PathBuf,
}

/// The TOML text, and what the user should hear about on stderr.
#[derive(Debug)]
pub struct Imported {
    /// The `proxy.toml` text.
    pub toml: String,
    /// Warnings (functions left out, an `--env` that some app lacks, ...).
    pub warnings: Vec<String>,
}

/// Reads `file` and translates it.
pub fn import(file: &Path, options: &Options) -> Result<Imported, ImportError> {
    let absolute = std::path::absolute(file).map_err(|source| ImportError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    let (config, functions, printed) = load(&absolute)?;
    let invalid = |reason: String| ImportError::Invalid {
        file: file.to_path_buf(),
        reason,
    };
    let file_dir = absolute.parent().unwrap_or(Path::new("/")).to_path_buf();
    let out_dir = std::path::absolute(&options.out_dir).unwrap_or_else(|_| options.out_dir.clone());
    let base = (file_dir != out_dir).then_some(file_dir.as_path());

    let file_name = file
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let mut header = vec![
        format!("Imported from the PM2 process file {file_name} by `corral import`."),
        "Check it with `corral check -c FILE`; run it with `corral run -c FILE` (or `corral start`).".to_owned(),
        "Each key says which PM2 option it came from; what has no corral meaning is listed".to_owned(),
        "under its app with the reason. PM2 resolved relative paths against the folder it was".to_owned(),
        "started in; here they are taken as relative to the ecosystem file's folder.".to_owned(),
    ];
    if let Some(name) = &options.env {
        header.push(format!(
            "--env {name}: each app's env_{name} is merged into [app.env]; other env_* are left out."
        ));
    }
    let mut warnings: Vec<String> = printed.lines().map(|l| format!("{file_name} printed: {l}")).collect();
    if !functions.is_empty() {
        header.push(String::new());
        header.push("Functions in the file do not serialise and were left out:".to_owned());
        for path in &functions {
            header.push(format!("  {path}"));
            warnings.push(format!("{path} is a function: left out (functions do not serialise)"));
        }
    }

    let (apps, others) = find_apps(config).map_err(invalid)?;
    if !others.is_empty() {
        header.push(String::new());
        header.push("Not imported (top level):".to_owned());
        for (key, value) in &others {
            header.push(format!("  {key}: {}", top_level_reason(key, value)));
        }
    }
    if apps.is_empty() {
        return Err(invalid("no apps: expected `apps: [{ name, script, ... }]`".into()));
    }
    if let Some(name) = &options.env {
        let key = format!("env_{name}");
        let missing: Vec<String> = apps
            .iter()
            .enumerate()
            .filter(|(_, a)| a.get(&key).is_none())
            .map(|(i, a)| label(i, a))
            .collect();
        if missing.len() == apps.len() {
            return Err(invalid(format!("--env {name}: no app has {key}")));
        }
        for app in missing {
            warnings.push(format!(
                "--env {name}: {app} has no {key}; its env is imported as it is"
            ));
        }
    }

    let context = map::Context {
        env: options.env.as_deref(),
        base,
        home: std::env::var("HOME").ok().filter(|h| !h.is_empty()),
        dir: &file_dir,
    };
    let mut out = Vec::new();
    let mut names = BTreeSet::new();
    for (index, app) in apps.iter().enumerate() {
        let mut mapped = map::map_app(index, app, &context).map_err(invalid)?;
        // PM2 allows two apps of one name; corral needs them unique.
        let name = mapped.name.clone();
        let mut unique = name.clone();
        let mut n = 2;
        while !names.insert(unique.clone()) {
            unique = format!("{name}-{n}");
            n += 1;
        }
        if unique != name {
            mapped.rename(
                &unique,
                "another app above has the same name (corral needs unique names)",
            );
        }
        out.push(mapped.app);
    }
    Ok(Imported {
        toml: write::render(&header, &out),
        warnings,
    })
}

/// `apps #2 ("api")`, for messages.
fn label(index: usize, app: &Json) -> String {
    match app.get("name").and_then(Json::as_str) {
        Some(name) => format!("app #{} ({name:?})", index + 1),
        None => format!("app #{}", index + 1),
    }
}

/// The file's content, the paths of the functions left out of it, and what it printed.
type Loaded = (Json, Vec<String>, String);

fn load(file: &Path) -> Result<Loaded, ImportError> {
    let name = file
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().to_lowercase());
    let read = || {
        std::fs::read_to_string(file).map_err(|source| ImportError::Read {
            path: file.to_path_buf(),
            source,
        })
    };
    let bad = |reason: String| ImportError::BadOutput {
        file: file.to_path_buf(),
        reason,
    };
    if [".js", ".cjs", ".mjs"].iter().any(|ext| name.ends_with(ext)) {
        read()?; // a clear "cannot read" before node says it its own way
        return from_node(file, "js");
    }
    if name.ends_with(".json") {
        let text = read()?;
        return match serde_json::from_str::<Json>(&text) {
            Ok(value) => Ok((value, Vec::new(), String::new())),
            // PM2 evaluates .json files as JavaScript: comments and unquoted keys pass there.
            // That runs whatever the file holds, so say so: a .json looks inert.
            Err(json_error) => {
                eprintln!(
                    "corral import: {}: not strict JSON ({json_error}); evaluating it with node as a JavaScript literal, as PM2 does (this runs the file's code)",
                    file.display()
                );
                from_node(file, "json").map_err(|node_error| match node_error {
                    ImportError::Node { .. } | ImportError::Evaluation { .. } => bad(format!(
                        "not valid JSON ({json_error}), nor a JavaScript object literal"
                    )),
                    other => other,
                })
            }
        };
    }
    if name.ends_with(".yml") || name.ends_with(".yaml") {
        let text = read()?;
        return serde_norway::from_str::<Json>(&text)
            .map(|value| (value, Vec::new(), String::new()))
            .map_err(|e| bad(format!("not valid YAML: {e}")));
    }
    Err(ImportError::UnknownKind {
        path: file.to_path_buf(),
    })
}

fn from_node(file: &Path, mode: &str) -> Result<Loaded, ImportError> {
    let (text, printed) = eval::evaluate(file, mode, eval::TIMEOUT)?;
    let bad = |reason: String| ImportError::BadOutput {
        file: file.to_path_buf(),
        reason,
    };
    let mut doc: Json = serde_json::from_str(&text).map_err(|e| bad(format!("node's answer is not JSON: {e}")))?;
    let functions = doc
        .get("functions")
        .and_then(Json::as_array)
        .map(|list| list.iter().filter_map(|p| p.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    let config = doc.get_mut("config").map(Json::take).unwrap_or(Json::Null);
    Ok((config, functions, printed))
}

/// The app objects, and the other top-level keys.
type Found = (Vec<Json>, Vec<(String, Json)>);

fn find_apps(config: Json) -> Result<Found, String> {
    match config {
        Json::Object(mut top) => {
            let apps = match top.remove("apps").or_else(|| top.remove("pm2")) {
                Some(apps) => apps,
                None if top.contains_key("script") => return Ok((vec![Json::Object(top)], Vec::new())),
                None => {
                    let keys: Vec<&String> = top.keys().collect();
                    return Err(format!("no `apps` array (top-level keys: {keys:?})"));
                }
            };
            let apps = match apps {
                Json::Array(list) => list,
                one @ Json::Object(_) => vec![one],
                other => return Err(format!("`apps` must be an array of objects, found {}", kind(&other))),
            };
            Ok((apps, top.into_iter().collect()))
        }
        Json::Array(list) => Ok((list, Vec::new())),
        Json::Null => Err("the file exports nothing (module.exports is undefined or null)".into()),
        other => Err(format!("expected an object with `apps`, found {}", kind(&other))),
    }
}

fn top_level_reason(key: &str, _value: &Json) -> &'static str {
    match key {
        "deploy" => "PM2's deploy (git pull over ssh, post-deploy hooks); corral does not deploy: ship the build your own way, then run `corral reload`",
        "module_conf" | "modules" => "PM2 modules are not part of corral",
        _ => "not a PM2 top-level key this import knows (only `apps` is read)",
    }
}

/// A JSON value's kind, for messages.
pub(super) fn kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}
