//! TLS at the edge: certificates per app, picked by SNI, served by rustls.
//!
//! Each app with `[app.tls]` has a [`CertStore`]: its certificate (`cert`/`key`), its `extra`
//! ones, or the one ACME issued ([`acme`]). The store is swapped whole (`ArcSwap`) when
//! `corral reload` re-reads the files or ACME renews; handshakes read it without a lock, and
//! open connections keep the certificate they were made with. A new set of files is loaded and
//! checked completely before it replaces the old one, so a broken file never stops a working
//! certificate from serving.
//!
//! Several apps may share one address ([`crate::sites`]): the [`SniResolver`] of that address
//! picks the app by the ClientHello's server name (exact names, then wildcards, then the
//! `default` app), then the certificate within the app: the first of `cert` and `extra` whose
//! names cover the server name, else `cert`. A ClientHello that offers only `acme-tls/1` gets
//! the TLS-ALPN-01 challenge certificate (RFC 8737) from [`Challenges`]. With no certificate
//! to give (ACME has not issued one yet) the handshake is refused with an alert: nothing wrong
//! is ever presented.
//!
//! Protocol policy: TLS 1.3 and 1.2, rustls's default suites (AEAD only, ECDHE only: no RSA key
//! exchange, no CBC, no SHA-1 MACs), ALPN `h2` and `http/1.1`, no 0-RTT (replayable). Sessions
//! resume by ticket under keys corral owns ([`tickets`]), so a self-upgrade can hand them over,
//! and by a per-shard session cache for TLS 1.2 clients without tickets.
//!
//! rustls is built without its `logging` feature: it would log a warning for things any
//! client controls (an IP address sent as the server name, on every handshake), a log flood
//! anyone could cause. Handshake failures are logged by the listener, at debug level.
//!
//! Why aws-lc-rs as the provider and not ring: it is rustls's default, it has the
//! assembly-optimised P-256 and X25519 paths the handshake benchmark measures, and it brings
//! the AEAD used for corral's own ticket keys; it builds with the C compiler the machine
//! already needs, in about a minute once.

pub mod acme;
pub mod certs;
pub mod tickets;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwapOption;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::config::{CertFiles, Tls};
use crate::sites::Names;
pub use certs::{certified_key, validity, CertError, Loaded};
pub use tickets::Tickets;

/// The ALPN protocol of TLS-ALPN-01 challenges.
pub const ACME_ALPN: &[u8] = b"acme-tls/1";

/// TLS 1.2 sessions a shard remembers for resumption by session id.
const SESSION_CACHE: usize = 4096;

/// The crypto provider of every TLS config corral makes.
pub fn provider() -> &'static Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

/// An app's certificates at one moment: `cert` first, then `extra`.
#[derive(Debug)]
pub struct CertTable {
    certs: Vec<Loaded>,
    /// An ACME certificate is withdrawn once expired (renewal kept failing): handshakes then
    /// fail with an alert, as before the first issue. Files are served as they are (`check`
    /// warns about an expired one), as nginx does.
    withdraw_expired: bool,
}

impl CertTable {
    /// Loads and checks every file of `cert`/`key` and `extra`; the first failure is returned.
    pub fn load(main: &CertFiles, extra: &[CertFiles]) -> Result<CertTable, CertError> {
        let certs = std::iter::once(main)
            .chain(extra)
            .map(|f| certs::load_files(&f.cert, &f.key))
            .collect::<Result<_, _>>()?;
        Ok(CertTable {
            certs,
            withdraw_expired: false,
        })
    }

    /// The certificate for server name `sni`: the first whose names cover it, else `cert`.
    fn pick(&self, sni: Option<&str>) -> Option<&Arc<CertifiedKey>> {
        let covering = sni.and_then(|name| {
            self.certs
                .iter()
                .find(|c| c.leaf.names.iter().any(|p| certs::name_matches(p, name)))
        });
        let chosen = covering.unwrap_or(&self.certs[0]);
        if self.withdraw_expired && chosen.leaf.not_after < std::time::SystemTime::now() {
            return None;
        }
        Some(&chosen.key)
    }

    /// The main certificate.
    pub fn main(&self) -> &Loaded {
        &self.certs[0]
    }

    /// Why this table must not replace `current` (what a reload found): its main certificate
    /// is outside its validity at `now` while the served one is not, or it no longer covers a
    /// name of `hosts` that the served one covers. Swapping such a table in would turn a
    /// working site into one every client refuses.
    pub fn worse_than(
        &self,
        current: Option<&CertTable>,
        hosts: &[String],
        now: std::time::SystemTime,
    ) -> Option<String> {
        let valid = |t: &CertTable| t.main().leaf.not_before <= now && now <= t.main().leaf.not_after;
        if !valid(self) && current.is_none_or(valid) {
            let leaf = &self.main().leaf;
            let day = |at| crate::logs::files::timestamp("YYYY-MM-DD", at);
            return Some(format!(
                "the new certificate ({}) is valid from {} to {}, not now",
                leaf.subject,
                day(leaf.not_before),
                day(leaf.not_after)
            ));
        }
        let covers = |t: &CertTable, host: &str| {
            t.certs
                .iter()
                .any(|c| c.leaf.names.iter().any(|p| certs::name_matches(p, host)))
        };
        hosts
            .iter()
            .find(|host| current.is_some_and(|c| covers(c, host)) && !covers(self, host))
            .map(|host| format!("the new certificates do not cover {host:?}, which the served ones do"))
    }
}

/// What `corral status` shows about an app's certificate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CertStatus {
    /// The main certificate's subject, if there is one.
    pub subject: Option<String>,
    /// Its expiry, seconds since the epoch.
    pub not_after: Option<u64>,
    /// Why there is no certificate yet (ACME), or why the last renewal failed.
    pub problem: Option<String>,
}

/// One app's certificates, swapped whole on reload or renewal.
#[derive(Debug, Default)]
pub struct CertStore {
    current: ArcSwapOption<CertTable>,
    problem: Mutex<Option<String>>,
}

impl CertStore {
    /// A store for `tls`: its files loaded, or empty until ACME issues a certificate.
    pub fn load(tls: &Tls) -> Result<Arc<CertStore>, CertError> {
        let store = Arc::new(CertStore::default());
        store.reload(tls)?;
        Ok(store)
    }

    /// Re-reads the files of `tls`; on any error the certificates in use stay. ACME
    /// certificates are not files: nothing to do for them here.
    pub fn reload(&self, tls: &Tls) -> Result<(), CertError> {
        if let Tls::Files { main, extra } = tls {
            let table = CertTable::load(main, extra)?;
            self.current.store(Some(Arc::new(table)));
        }
        Ok(())
    }

    /// Serves `table` from now on (new handshakes).
    pub fn replace(&self, table: CertTable) {
        self.current.store(Some(Arc::new(table)));
    }

    /// The table served now, if any.
    pub fn current(&self) -> Option<Arc<CertTable>> {
        self.current.load_full()
    }

    /// Serves the certificate ACME issued from now on (new handshakes).
    pub fn install_acme(&self, key: Arc<CertifiedKey>) {
        let leaf = key.cert.first().and_then(certs::describe);
        let Some(leaf) = leaf else {
            tracing::error!("an ACME certificate without a readable leaf was not installed");
            return;
        };
        self.current.store(Some(Arc::new(CertTable {
            certs: vec![Loaded { key, leaf }],
            withdraw_expired: true,
        })));
    }

    /// Why there is no certificate (or why renewal fails); `None` clears it.
    pub fn set_problem(&self, problem: Option<String>) {
        *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = problem;
    }

    /// The certificate for `sni`, if the store has any.
    fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        self.current.load().as_ref().and_then(|t| t.pick(sni).map(Arc::clone))
    }

    /// Subject and expiry of the main certificate, and the current problem.
    pub fn status(&self) -> CertStatus {
        let current = self.current.load();
        let main = current.as_ref().map(|t| t.main().leaf.clone());
        CertStatus {
            subject: main.as_ref().map(|l| l.subject.clone()),
            not_after: main.and_then(|l| {
                l.not_after
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs())
            }),
            problem: self.problem.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

/// ACME challenge answers, shared by the TLS resolver (TLS-ALPN-01) and the `http_redirect`
/// listener (HTTP-01). Touched only while a certificate is being ordered: a lookup first reads
/// a count of its kind of answers held (an atomic load, written under that list's lock when one
/// is set or cleared), so a
/// client that asks for a challenge when none is pending never takes the locks.
#[derive(Debug, Default)]
pub struct Challenges {
    alpn: Mutex<Vec<(String, Arc<CertifiedKey>)>>,
    http: Mutex<Vec<(String, String)>>,
    /// TLS-ALPN-01 answers held, written under `alpn`'s lock...
    alpn_held: AtomicUsize,
    /// ... and HTTP-01 answers, under `http`'s: each count is its own list's length.
    http_held: AtomicUsize,
}

impl Challenges {
    /// Answers TLS-ALPN-01 for `domain` with `key` until cleared.
    pub fn set_alpn(&self, domain: &str, key: Arc<CertifiedKey>) {
        let mut alpn = self.alpn.lock().unwrap_or_else(|p| p.into_inner());
        alpn.retain(|(d, _)| !d.eq_ignore_ascii_case(domain));
        alpn.push((domain.to_ascii_lowercase(), key));
        self.alpn_held.store(alpn.len(), Ordering::Release);
    }

    /// Stops answering TLS-ALPN-01 for `domain`.
    pub fn clear_alpn(&self, domain: &str) {
        let mut alpn = self.alpn.lock().unwrap_or_else(|p| p.into_inner());
        alpn.retain(|(d, _)| !d.eq_ignore_ascii_case(domain));
        self.alpn_held.store(alpn.len(), Ordering::Release);
    }

    /// Serves `key_authorization` at `/.well-known/acme-challenge/<token>` until cleared.
    pub fn set_http(&self, token: &str, key_authorization: String) {
        let mut http = self.http.lock().unwrap_or_else(|p| p.into_inner());
        http.retain(|(t, _)| t != token);
        http.push((token.to_owned(), key_authorization));
        self.http_held.store(http.len(), Ordering::Release);
    }

    /// Stops serving the HTTP-01 answer of `token`.
    pub fn clear_http(&self, token: &str) {
        let mut http = self.http.lock().unwrap_or_else(|p| p.into_inner());
        http.retain(|(t, _)| t != token);
        self.http_held.store(http.len(), Ordering::Release);
    }

    /// The TLS-ALPN-01 certificate for `domain`.
    pub fn alpn(&self, domain: &str) -> Option<Arc<CertifiedKey>> {
        if self.alpn_held.load(Ordering::Acquire) == 0 {
            return None;
        }
        let alpn = self.alpn.lock().unwrap_or_else(|p| p.into_inner());
        alpn.iter()
            .find(|(d, _)| d.eq_ignore_ascii_case(domain))
            .map(|(_, k)| Arc::clone(k))
    }

    /// The HTTP-01 answer for `token`.
    pub fn http(&self, token: &str) -> Option<String> {
        if self.http_held.load(Ordering::Acquire) == 0 {
            return None;
        }
        let http = self.http.lock().unwrap_or_else(|p| p.into_inner());
        http.iter().find(|(t, _)| t == token).map(|(_, a)| a.clone())
    }
}

/// Picks the certificate of a handshake on one address: the app by server name, then the
/// certificate within the app.
#[derive(Debug)]
pub struct SniResolver {
    names: Arc<Names>,
    /// Indexed like `names`' sites.
    stores: Vec<Arc<CertStore>>,
    challenges: Arc<Challenges>,
}

impl SniResolver {
    /// A resolver over the apps of one address (`stores` in the order of `names`' sites).
    pub fn new(names: Arc<Names>, stores: Vec<Arc<CertStore>>, challenges: Arc<Challenges>) -> SniResolver {
        SniResolver {
            names,
            stores,
            challenges,
        }
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name();
        let acme = hello.alpn().is_some_and(|mut offered| offered.any(|p| p == ACME_ALPN));
        if acme {
            // A validation server: only the challenge certificate, or nothing.
            return self.challenges.alpn(sni?);
        }
        let site = self.names.pick_sni(sni)?;
        self.stores.get(site)?.pick(sni)
    }
}

/// A shard's TLS config for one address: its own session cache, the shared resolver and
/// ticket keys. `acme`: also offer `acme-tls/1`.
pub fn server_config(resolver: Arc<SniResolver>, tickets: Arc<Tickets>, acme: bool) -> Arc<ServerConfig> {
    let versions: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];
    let builder = ServerConfig::builder_with_provider(Arc::clone(provider()))
        .with_protocol_versions(versions)
        .expect("UNWRAP: the provider supports TLS 1.2 and 1.3");
    let mut config = builder.with_no_client_auth().with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if acme {
        config.alpn_protocols.push(ACME_ALPN.to_vec());
    }
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
    config.ticketer = tickets;
    config.max_early_data_size = 0;
    Arc::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `name` valid from `from` to `until` (years), as PEM.
    fn self_signed(name: &str, from: i32, until: i32) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).expect("params");
        params.not_before = rcgen::date_time_ymd(from, 1, 1);
        params.not_after = rcgen::date_time_ymd(until, 1, 1);
        let cert = params.self_signed(&key).expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn an_expired_acme_certificate_is_withdrawn_but_an_expired_file_is_served() {
        let (cert, key) = self_signed("old.test", 2020, 2021);
        let key = certified_key(cert.as_bytes(), key.as_bytes()).expect("a valid pair");
        let store = CertStore::default();
        store.install_acme(Arc::clone(&key));
        assert!(store.pick(Some("old.test")).is_none(), "nothing wrong is presented");
        assert!(store.status().subject.is_some(), "status still says which one expired");

        let dir = tempfile::tempdir().expect("dir");
        let (cert, key) = self_signed("old.test", 2020, 2021);
        let files = CertFiles {
            cert: dir.path().join("c.pem"),
            key: dir.path().join("k.pem"),
        };
        std::fs::write(&files.cert, cert).expect("write");
        std::fs::write(&files.key, key).expect("write");
        store
            .reload(&Tls::Files {
                main: files,
                extra: vec![],
            })
            .expect("loads");
        assert!(store.pick(Some("old.test")).is_some());

        let (cert, key) = self_signed("new.test", 2020, 2999);
        store.install_acme(certified_key(cert.as_bytes(), key.as_bytes()).expect("pair"));
        assert!(store.pick(None).is_some());
    }
    /// A table of one file-served certificate for `name` valid from `from` to `until`.
    fn table(name: &str, from: i32, until: i32) -> CertTable {
        let dir = tempfile::tempdir().expect("dir");
        let (cert, key) = self_signed(name, from, until);
        let files = CertFiles {
            cert: dir.path().join("c.pem"),
            key: dir.path().join("k.pem"),
        };
        std::fs::write(&files.cert, cert).expect("write");
        std::fs::write(&files.key, key).expect("write");
        CertTable::load(&files, &[]).expect("loads")
    }

    #[test]
    fn a_reload_may_not_swap_a_working_certificate_for_an_expired_or_narrower_one() {
        let now = std::time::SystemTime::now();
        let (served, expired) = (table("a.test", 2020, 2999), table("a.test", 2020, 2021));
        let why = expired.worse_than(Some(&served), &[], now).expect("refused");
        assert!(why.contains("not now"), "{why}");
        // Expired for expired is no loss.
        assert!(expired
            .worse_than(Some(&table("a.test", 2019, 2020)), &[], now)
            .is_none());
        let hosts = vec!["a.test".to_owned()];
        let other = table("b.test", 2020, 2999);
        let why = other.worse_than(Some(&served), &hosts, now).expect("refused");
        assert!(why.contains("\"a.test\""), "{why}");
        assert!(other.worse_than(Some(&served), &[], now).is_none());
        assert!(table("a.test", 2020, 2999)
            .worse_than(Some(&served), &hosts, now)
            .is_none());
    }
}
