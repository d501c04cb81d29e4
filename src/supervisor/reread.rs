//! What a reload reads: the config file, checked against what a reload can change (the
//! listeners, `[admin]` and the edge keys are bound once), and the certificate files, loaded
//! whole before any is swapped in. Kept apart from the rolling replacement in `reload.rs`.

use std::collections::HashSet;

use tracing::{info, warn};

use super::{ErrorCode, Supervisor};
use crate::admin::events::{Draft, Kind};
use crate::config::{Config, Tls};
use crate::tls::CertTable;

impl Supervisor {
    /// The config file, read and checked against what a reload can change, with `env` (else
    /// the environment in use) merged in; its certificates are loaded and swapped in.
    pub(super) fn fresh_config(&self, only: Option<&str>, env: Option<&str>) -> Result<Config, (ErrorCode, String)> {
        let mut config = match Config::load(&self.config_path) {
            Ok(config) => config,
            Err(e) => {
                return Err((
                    ErrorCode::InvalidConfig,
                    format!("{e}\nnothing was changed: the running workers keep serving"),
                ))
            }
        };
        if let Some(name) = env.or(self.env_name.as_deref()) {
            if let Err(why) = config.choose_env(name) {
                return Err((
                    ErrorCode::InvalidConfig,
                    format!("{why}\nnothing was changed: the running workers keep serving"),
                ));
            }
        }
        if let Err(why) = self.compatible(&config) {
            return Err((ErrorCode::Topology, why));
        }
        for app in &self.apps {
            if config
                .app(&app.config.name)
                .is_some_and(|fresh| fresh.watch != app.config.watch || fresh.cron_restart != app.config.cron_restart)
            {
                warn!(app = %app.config.name, "watch, ignore_watch, watch_delay and cron_restart are read at start: the change applies at the next start of corral");
            }
        }
        for warning in &config.warnings {
            warn!("{}:{}: {}", self.config_path.display(), warning.line, warning.message);
        }
        if let Err(why) = self.reload_certificates(&config, only) {
            return Err((
                ErrorCode::InvalidConfig,
                format!("{why}\nnothing was changed: the running workers and certificates keep serving"),
            ));
        }
        Ok(config)
    }

    /// Re-reads the certificate files of every app (or `only` that one) with `[app.tls]`: all
    /// are loaded and checked first, then swapped in together, so one broken file changes
    /// nothing. New handshakes get the new certificates; open connections keep theirs.
    fn reload_certificates(&self, config: &Config, only: Option<&str>) -> Result<(), String> {
        let mut loaded = Vec::new();
        for app in self
            .apps
            .iter()
            .filter(|a| only.is_none_or(|name| a.config.name == name))
        {
            let (Some(store), Some(Tls::Files { main, extra })) =
                (&app.certs, config.app(&app.config.name).and_then(|a| a.tls.as_ref()))
            else {
                continue;
            };
            let table = CertTable::load(main, extra).map_err(|e| format!("app {:?}: tls.{e}", app.config.name))?;
            let hosts = config.app(&app.config.name).map_or(&[][..], |a| &a.hosts[..]);
            if let Some(why) = table.worse_than(store.current().as_deref(), hosts, std::time::SystemTime::now()) {
                return Err(format!(
                    "app {:?}: tls.cert {}: {why}",
                    app.config.name,
                    main.cert.display()
                ));
            }
            loaded.push((&app.config.name, store, table));
        }
        for (name, store, table) in loaded {
            let subject = table.main().leaf.subject.clone();
            let expires = crate::logs::files::timestamp("YYYY-MM-DD", table.main().leaf.not_after);
            store.replace(table);
            info!(app = %name, %subject, "certificates re-read");
            self.emit(Draft::new(Kind::CertificateReloaded, name).message(format!("{subject}, expires {expires}")));
        }
        Ok(())
    }

    /// What a rolling reload cannot change: the listeners and the set of apps (a hand-over to
    /// a new process does it, [`crate::upgrade`]).
    fn compatible(&self, config: &Config) -> Result<(), String> {
        if config.admin != self.admin {
            return Err("[admin] changed".into());
        }
        let old: Vec<&str> = self.apps.iter().map(|a| a.config.name.as_str()).collect();
        let new: Vec<&str> = config.apps.iter().map(|a| a.name.as_str()).collect();
        if old.iter().collect::<HashSet<_>>() != new.iter().collect::<HashSet<_>>() {
            return Err(format!("the config now has apps {new:?} instead of {old:?}"));
        }
        for app in &self.apps {
            let fresh = config.app(&app.config.name).map(|a| a.listen);
            if fresh != Some(app.config.listen) {
                let show = |l: Option<std::net::SocketAddr>| l.map_or_else(|| "none".to_owned(), |a| a.to_string());
                return Err(format!(
                    "app {:?}: listen changed from {} to {}",
                    app.config.name,
                    show(app.config.listen),
                    show(fresh.flatten())
                ));
            }
            if let Some(fresh) = config.app(&app.config.name) {
                let old = &app.config;
                let edge = |a: &crate::config::AppConfig| {
                    let acme = match &a.tls {
                        Some(Tls::Acme(acme)) => Some(acme.clone()),
                        _ => None,
                    };
                    (
                        a.tls.is_some(),
                        acme,
                        a.http_redirect,
                        a.hosts.clone(),
                        a.default_host,
                        a.hsts,
                    )
                };
                if edge(old) != edge(fresh) {
                    return Err(format!(
                        "app {:?}: tls on/off, [app.tls.acme], http_redirect, hosts, default or hsts changed (they shape the public listeners)",
                        app.config.name
                    ));
                }
            }
        }
        Ok(())
    }
}
