//! Running a JavaScript ecosystem file with `node`, the way PM2 does (it `require`s the file):
//! the file is the user's own code, so it runs as a child process of its own, in the file's
//! folder, with corral's environment (configs often read `process.env`), under a deadline and
//! with its output bounded.
//!
//! A small loader, given on `node -e`, imports the file (`import()` reads CommonJS and ES
//! modules alike), sends `console.*` to stderr so the file's own prints cannot mix with the
//! answer, and writes one JSON document after a marker line on stdout: the exported value, with
//! every function it held replaced by `null` and its path listed (functions do not serialise;
//! the caller reports them). Whatever comes back is still treated as hostile input: it is size
//! bounded here and parsed by serde_json (which has a recursion limit) by the caller.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::ImportError;

/// How long the file may take to load.
pub(super) const TIMEOUT: Duration = Duration::from_secs(10);
/// The most stdout accepted from it.
const MAX_OUTPUT: u64 = 16 << 20;
/// The stderr kept for an error message.
const MAX_STDERR: u64 = 16 << 10;
/// Precedes the JSON answer on stdout.
const MARKER: &str = "\n--corral-pm2-import--\n";

/// `argv[1]` is the file, `argv[2]` is `js` (import it) or `json` (evaluate the text as a
/// JavaScript expression, as PM2 reads its `.json` process files).
const LOADER: &str = r#"
'use strict';
const util = require('node:util');
for (const level of ['log', 'info', 'warn', 'error', 'debug', 'trace', 'dir']) {
  console[level] = (...args) => { process.stderr.write(util.format(...args) + '\n'); };
}
const [file, mode] = process.argv.slice(1);
async function load() {
  if (mode === 'json') {
    const text = require('node:fs').readFileSync(file, 'utf8');
    return require('node:vm').runInNewContext('(' + text + '\n)', {}, { filename: file, timeout: 5000 });
  }
  const ns = await import(require('node:url').pathToFileURL(file).href);
  const value = 'default' in ns ? ns.default : ns;
  return value && typeof value === 'object' && value.apps === undefined && ns.apps !== undefined ? ns : value;
}
load().then((value) => {
  const functions = [];
  const seen = new Set();
  const walk = (v, path) => {
    if (typeof v === 'function') { functions.push(path); return null; }
    if (typeof v === 'bigint') return v.toString();
    if (v === null || typeof v !== 'object') return v;
    if (seen.has(v)) throw new Error(`${path} refers back to itself (a circular structure)`);
    seen.add(v);
    let out;
    if (Array.isArray(v)) out = v.map((item, i) => walk(item, `${path}[${i}]`));
    else {
      out = {};
      for (const key of Object.keys(v)) out[key] = walk(v[key], `${path}.${key}`);
    }
    seen.delete(v);
    return out;
  };
  const config = walk(value, 'module.exports');
  const answer = 'MARKER' + JSON.stringify({ config: config === undefined ? null : config, functions });
  // Exit once everything before it (the file's own writes too) has reached the pipe.
  process.stdout.write(answer, () => process.exit(0));
}, (e) => {
  process.stderr.write(String(e && e.stack || e) + '\n');
  process.exit(1);
});
"#;

/// Runs `node` on `file` (`mode`: `js` or `json`) and returns the JSON document it printed,
/// `{"config": <the export>, "functions": [<paths>]}`, and what the file printed itself
/// (its `console.*` output, on stderr).
pub(super) fn evaluate(file: &Path, mode: &str, timeout: Duration) -> Result<(String, String), ImportError> {
    let dir = file.parent().unwrap_or(Path::new("."));
    let loader = LOADER.replace("'MARKER'", &format!("{MARKER:?}"));
    let mut child = Command::new("node")
        .arg("-e")
        .arg(loader)
        .arg("--")
        .arg(file)
        .arg(mode)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|source| ImportError::Node { source })?;
    let (out_tx, out_rx) = mpsc::channel();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(out) = stdout {
            // One byte over the bound tells that it was too large; the pipe closes here, so a
            // node still writing gets EPIPE and stops.
            if let Err(e) = out.take(MAX_OUTPUT + 1).read_to_end(&mut bytes) {
                tracing::debug!("reading node's stdout: {e}");
            }
        }
        let _receiver_gone = out_tx.send(bytes);
    });
    let (err_tx, err_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut err) = stderr {
            if let Err(e) = (&mut err).take(MAX_STDERR).read_to_end(&mut bytes) {
                tracing::debug!("reading node's stderr: {e}");
            }
            // Keep draining, so a chatty file never blocks on a full pipe.
            if let Err(e) = std::io::copy(&mut err, &mut std::io::sink()) {
                tracing::debug!("draining node's stderr: {e}");
            }
        }
        let _receiver_gone = err_tx.send(bytes);
    });

    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < timeout => {
                // A bounded poll of our own child; the deadline above ends it.
                std::thread::park_timeout(Duration::from_millis(10));
            }
            Ok(None) | Err(_) => {
                kill_group(&mut child);
                return Err(ImportError::Timeout {
                    file: file.to_path_buf(),
                    timeout,
                });
            }
        }
    };
    // Children the file left behind may hold the pipes open: the readers get a deadline. Its
    // process group is not signalled now that node is reaped (the id could be reused).
    let stdout = out_rx.recv_timeout(Duration::from_secs(2)).unwrap_or_default();
    let stderr = err_rx.recv_timeout(Duration::from_secs(2)).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&stderr).trim_end().to_owned();
    if stdout.len() as u64 > MAX_OUTPUT {
        return Err(ImportError::TooLarge {
            file: file.to_path_buf(),
            limit: MAX_OUTPUT,
        });
    }
    if !status.success() {
        return Err(ImportError::Evaluation {
            file: file.to_path_buf(),
            status: status.to_string(),
            stderr,
        });
    }
    let stdout = String::from_utf8(stdout).map_err(|_| ImportError::BadOutput {
        file: file.to_path_buf(),
        reason: "node printed bytes that are not UTF-8".into(),
    })?;
    let json = match stdout.rfind(MARKER) {
        Some(at) => stdout[at + MARKER.len()..].to_owned(),
        None => {
            return Err(ImportError::BadOutput {
                file: file.to_path_buf(),
                reason: format!("node exited 0 without printing the config (its stderr: {stderr:?})"),
            })
        }
    };
    Ok((json, stderr))
}

/// Ends node and whatever it started (its own process group), before it is reaped.
fn kill_group(child: &mut std::process::Child) {
    use nix::sys::signal::{killpg, Signal};
    use nix::unistd::Pid;
    let pid = Pid::from_raw(child.id() as i32);
    if let Err(e) = killpg(pid, Signal::SIGKILL) {
        // ESRCH: the group is already gone, the usual case after a clean exit.
        tracing::debug!("killing node's process group: {e}");
    }
    if let Err(e) = child.wait() {
        tracing::debug!("reaping node: {e}");
    }
}
