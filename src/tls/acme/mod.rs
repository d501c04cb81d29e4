//! Automatic certificates (ACME, RFC 8555) for an app with `[app.tls.acme]`.
//!
//! # What this owns
//!
//! One task per app, [`run`], spawned on the main runtime (never on a proxy shard): it keeps
//! the app's certificate for `domains` issued and fresh, and tells the TLS core about it
//! through two narrow doors: [`CertStore::install_acme`] (serve this certificate to new
//! handshakes) and [`CertStore::set_problem`] (why there is none, or why renewal fails, for
//! `corral status` and the log). The challenge answers go into the shared [`Challenges`],
//! which the TLS resolver (TLS-ALPN-01, ALPN `acme-tls/1`) and the `http_redirect` listener
//! (HTTP-01, `/.well-known/acme-challenge/<token>`) read. This module owns no socket.
//!
//! # The loop
//!
//! 1. At start, a cached, unexpired certificate for the same directory and domains is
//!    installed at once, before the directory is contacted ([`cache`]).
//! 2. When there is none, or a third of its lifetime is left ([`timing`]), an order runs
//!    ([`issue`]): TLS-ALPN-01 is always offered, HTTP-01 too when the app has
//!    `http_redirect`, and each name is answered with the first of those the CA offers.
//!    HTTP-01 goes first when it is there: it needs nothing from the TLS listener and is what
//!    most CAs and setups expect; after a failed validation the next attempt starts with the
//!    other type, so a blocked port 80 (or a TLS-terminating box in front of 443) costs one
//!    retry, not every retry.
//! 3. A new certificate is cached (0600, atomic) and installed; the problem is cleared.
//! 4. Any failure (directory unreachable, refused, validation failed) is logged as a warning
//!    with its reason, shown as the app's problem, and retried after 10 s, doubling to 1 h.
//!    A certificate that is still being served keeps being served meanwhile.
//!
//! The task ends promptly on `shutdown`: every wait and every request is a future dropped by
//! the `select!` in [`run`], and dropping an order takes its challenge answers down.
//!
//! # Why instant-acme
//!
//! `instant-acme` is an ACME protocol client and nothing more: accounts, orders,
//! authorizations, JWS signing (with aws-lc-rs, the provider corral's rustls uses), and a
//! pluggable HTTP client. Which challenge to answer, where answers are served, how
//! certificates are cached and when they are renewed stay here, written against corral's own
//! resolver and listeners. `rustls-acme` was the other candidate: it bundles all of those
//! decisions behind its own acceptor, resolver and cache, on futures-rustls and its own HTTP
//! client (async-io), so using it would mean a second TLS stack beside tokio-rustls and a
//! resolver competing with the TLS core's. instant-acme is used without its default
//! hyper-rustls client: [`client`] is a small HTTPS client on the hyper 1 and rustls corral
//! already builds, which also gives every request a deadline and honours `ca_root`.
//! Certificate keys and CSRs are made with `rcgen` (ECDSA P-256), which instant-acme's
//! aws-lc-rs feature already builds.

mod cache;
mod client;
mod issue;
mod timing;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::SystemTime;

use instant_acme::ChallengeType;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::events::{Draft, Events, Kind};
use crate::config::AcmeConfig;
use crate::tls::{CertStore, Challenges};
use cache::{Cache, Issued};

/// Keeps `store`'s ACME certificate for `config.domains` issued and renewed until `shutdown`.
///
/// `http01` says whether the app has an `http_redirect` listener that serves `challenges`'
/// HTTP-01 answers. Never returns an error: every failure is reported through
/// [`CertStore::set_problem`] and the log, and retried.
pub async fn run(
    app: String,
    config: AcmeConfig,
    store: Arc<CertStore>,
    challenges: Arc<Challenges>,
    http01: bool,
    events: Arc<Events>,
    shutdown: CancellationToken,
) {
    let manager = Manager {
        cache: Arc::new(Cache::new(&config)),
        app,
        config,
        store,
        challenges,
        http01,
        events,
    };
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = manager.run() => {}
    }
}

/// The state of one app's certificate task.
struct Manager {
    app: String,
    config: AcmeConfig,
    cache: Arc<Cache>,
    store: Arc<CertStore>,
    challenges: Arc<Challenges>,
    http01: bool,
    /// `certificate_renewed` goes here.
    events: Arc<Events>,
}

impl Manager {
    async fn run(self) {
        let domains = self.config.domains.join(", ");
        let mut current = self.cached().await;
        if current.is_none() {
            self.store.set_problem(Some(format!(
                "ordering a certificate for {domains} from {}",
                self.config.directory
            )));
        }
        let mut failures = 0u32;
        let mut last_issued: Option<tokio::time::Instant> = None;
        // After a failed validation, the next order starts with the other challenge type.
        let mut rotate = false;
        loop {
            if let Some(issued) = &current {
                let due = timing::renew_at(issued.not_before, issued.not_after);
                let wait = timing::sleep_before(SystemTime::now(), due);
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                    continue;
                }
                // A CA that issues certificates already due (a lifetime of seconds, a clock
                // far off) must not be asked again in a tight loop.
                let since = last_issued.map(|at| at.elapsed());
                if let Some(pause) = since.and_then(|s| timing::FIRST_RETRY.checked_sub(s)) {
                    tokio::time::sleep(pause).await;
                }
                info!(app = %self.app, %domains, expires = %when(issued.not_after), "renewing the certificate: a third of its lifetime is left");
            }
            let kinds = self.kinds(rotate);
            match issue::issue(&self.config, &self.cache, &self.challenges, &kinds).await {
                Ok(issued) => {
                    failures = 0;
                    last_issued = Some(tokio::time::Instant::now());
                    rotate = false;
                    info!(app = %self.app, %domains, expires = %when(issued.not_after), "certificate issued");
                    // Cached first (a few milliseconds): a certificate that serves is always
                    // one a restart finds.
                    let saved = issued.clone();
                    if let Err(reason) = blocking(&self.cache, move |c| c.save_certificate(&saved)).await {
                        warn!(app = %self.app, %reason, "could not cache the certificate; the next start orders another");
                    }
                    self.store.install_acme(Arc::clone(&issued.key));
                    self.store.set_problem(None);
                    self.events.emit(
                        Draft::new(Kind::CertificateRenewed, &self.app)
                            .message(format!("{domains}, expires {}", when(issued.not_after))),
                    );
                    current = Some(issued);
                }
                Err(error) => {
                    failures += 1;
                    if error.is_validation() && self.http01 {
                        rotate = !rotate;
                    }
                    let delay = timing::retry_delay(failures);
                    let next = crate::config::units::format_duration(delay);
                    let problem = match &current {
                        Some(issued) if issued.not_after > SystemTime::now() => format!(
                            "renewal failed: {error}; still serving the certificate that expires {}; next attempt in {next}",
                            when(issued.not_after),
                        ),
                        _ => format!("{error}; next attempt in {next}"),
                    };
                    warn!(app = %self.app, %domains, "no new certificate: {problem}");
                    self.store.set_problem(Some(problem));
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// The cached certificate, installed if it is still valid; `None` (with a log line) if
    /// there is none usable.
    async fn cached(&self) -> Option<Issued> {
        match blocking(&self.cache, |c| c.load_certificate()).await {
            Ok(Some(issued)) if issued.not_after > SystemTime::now() => {
                info!(app = %self.app, file = %self.cache.cert_path().display(), expires = %when(issued.not_after), "serving the cached certificate");
                self.store.install_acme(Arc::clone(&issued.key));
                Some(issued)
            }
            Ok(Some(issued)) => {
                info!(app = %self.app, file = %self.cache.cert_path().display(), expired = %when(issued.not_after), "the cached certificate has expired; ordering a new one");
                None
            }
            Ok(None) => None,
            Err(reason) => {
                warn!(app = %self.app, %reason, "ignoring the cached certificate; ordering a new one");
                None
            }
        }
    }

    /// The challenge types to answer with, in order of preference.
    fn kinds(&self, rotate: bool) -> Vec<ChallengeType> {
        let mut kinds = Vec::with_capacity(2);
        if self.http01 {
            kinds.push(ChallengeType::Http01);
        }
        kinds.push(ChallengeType::TlsAlpn01);
        if rotate {
            kinds.rotate_left(1);
        }
        kinds
    }
}

/// Runs a cache operation on tokio's blocking pool.
async fn blocking<T, F>(cache: &Arc<Cache>, f: F) -> Result<T, String>
where
    F: FnOnce(&Cache) -> Result<T, String> + Send + 'static,
    T: Send + 'static,
{
    let cache = Arc::clone(cache);
    tokio::task::spawn_blocking(move || f(&cache))
        .await
        .map_err(|e| format!("cache task failed: {e}"))?
}

/// A moment for people, in UTC.
fn when(at: SystemTime) -> String {
    crate::logs::files::timestamp("YYYY-MM-DD HH:mm:ss UTC", at)
}
