//! `corral import FILE [-o OUT] [--env NAME]`: a PM2 ecosystem file to `proxy.toml`
//! ([`crate::config::pm2`] does the translation; this writes it where it was asked).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

use crate::config::pm2;

/// Imports `file` and writes the TOML to `output` (stdout without it); warnings go to stderr.
/// Exit 0 on success; 1 when the file cannot be imported.
pub(super) fn import(file: &Path, output: Option<&Path>, env: Option<&str>) -> anyhow::Result<ExitCode> {
    // Relative paths in the TOML resolve from where it will live: OUT's folder, or the
    // current directory for stdout (`corral import eco.js > proxy.toml`).
    let out_dir = match output.map(|o| o.parent().unwrap_or(Path::new(""))) {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
    };
    let options = pm2::Options {
        env: env.map(str::to_owned),
        out_dir,
    };
    let imported = match pm2::import(file, &options) {
        Ok(imported) => imported,
        Err(e) => {
            eprintln!("corral: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    for warning in &imported.warnings {
        eprintln!("corral: warning: {warning}");
    }
    match output {
        Some(path) => {
            std::fs::write(path, &imported.toml).with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!(
                "wrote {}; check it with `corral check -c {}`",
                path.display(),
                path.display()
            );
        }
        None => std::io::stdout()
            .lock()
            .write_all(imported.toml.as_bytes())
            .context("cannot write to stdout")?,
    }
    Ok(ExitCode::SUCCESS)
}
