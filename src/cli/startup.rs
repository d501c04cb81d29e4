//! `corral startup`: the systemd unit for this config, printed for the user to install.

use std::process::ExitCode;

use anyhow::Context;

use super::config_error;
use crate::config::Config;

pub(super) fn startup(path: &std::path::Path, user: Option<&str>) -> anyhow::Result<ExitCode> {
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
         # Upgrade:  replace {exe}, then `corral upgrade -c {config}`\n\
         #           (or systemctl kill -s USR2 --kill-whom=main {unit}): a new corral takes\n\
         #           over the sockets and tells systemd its pid (NotifyAccess=all), the old\n\
         #           one drains and exits; no connection is dropped.\n\
         {cli_hint}\
         {switch_hint}\
         [Unit]\n\
         Description=corral: {config}\n\
         After=network-online.target\n\
         Wants=network-online.target\n\
         \n\
         [Service]\n\
         Type=notify\n\
         # all: after `corral upgrade` the new process announces MAINPID= itself.\n\
         NotifyAccess=all\n\
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_has_a_private_runtime_directory() -> Result<(), Box<dyn std::error::Error>> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.example.toml");
        let config = Config::from_str(include_str!("../../proxy.example.toml"), &path)
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
            include_str!("../../proxy.example.toml").replace("listen = \"127.0.0.1:4321\"", "listen = \"0.0.0.0:443\"");
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
