//! [`run`] against a real ACME CA (Debian's pebble), with real challenges: pebble's VA
//! connects to listeners that these tests run, which answer from [`Challenges`] as the TLS
//! core's resolver and `http_redirect` listener do.

#[path = "../../../tests/support/pebble.rs"]
mod pebble;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::cache::Cache;
use super::run;
use crate::config::AcmeConfig;
use crate::tls::{CertStatus, CertStore, Challenges};
use pebble::{Pebble, PebbleOptions};

/// Generous: two busy cores run cargo, pebble and the tests at once.
const DEADLINE: Duration = Duration::from_secs(60);

const DOMAIN: &str = "app.corral.test";

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Polls `check` every 50 ms until it returns `Some`, or fails after [`DEADLINE`].
async fn poll<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> Result<T, String> {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if start.elapsed() > DEADLINE {
            return Err(format!("timed out after {DEADLINE:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The certificate task, stopped (and checked to stop promptly) at the end of a test.
struct Task {
    store: Arc<CertStore>,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl Task {
    fn spawn(config: AcmeConfig, challenges: &Arc<Challenges>, http01: bool) -> Task {
        let store = Arc::new(CertStore::default());
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(run(
            "web".to_owned(),
            config,
            Arc::clone(&store),
            Arc::clone(challenges),
            http01,
            Arc::new(crate::admin::events::Events::default()),
            shutdown.clone(),
        ));
        Task {
            store,
            shutdown,
            handle,
        }
    }

    /// Waits until a certificate is installed whose expiry is not `previous`'s; returns the
    /// store's status then.
    async fn issued(&self, previous: Option<&CertStatus>) -> Result<CertStatus, String> {
        let store = Arc::clone(&self.store);
        poll("a certificate", || {
            let status = store.status();
            let new = status.not_after.is_some() && previous.is_none_or(|p| p.not_after != status.not_after);
            new.then_some(status)
        })
        .await
        .map_err(|e| format!("{e}; problem: {:?}", self.store.status().problem))
    }

    fn problem(&self) -> Option<String> {
        self.store.status().problem
    }

    async fn stop(self) -> TestResult {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.handle)
            .await
            .map_err(|_| "run did not stop within 5 s of shutdown")??;
        Ok(())
    }
}

fn config(pebble: &Pebble, cache: &Path) -> AcmeConfig {
    AcmeConfig {
        domains: vec![DOMAIN.to_owned()],
        email: Some("ops@corral.test".to_owned()),
        directory: pebble.directory.clone(),
        cache_dir: cache.to_owned(),
        ca_root: Some(pebble.ca_root.clone()),
    }
}

/// Answers TLS-ALPN-01 on `listener`: a ClientHello offering `acme-tls/1` gets the
/// challenge certificate for its SNI, anything else no certificate.
fn serve_tls_alpn(listener: TcpListener, challenges: Arc<Challenges>) {
    struct Resolver(Arc<Challenges>);
    impl std::fmt::Debug for Resolver {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Resolver")
        }
    }
    impl ResolvesServerCert for Resolver {
        fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            let acme = hello
                .alpn()
                .is_some_and(|mut protocols| protocols.any(|p| p == b"acme-tls/1"));
            if !acme {
                return None;
            }
            self.0.alpn(hello.server_name()?)
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("UNWRAP: the default versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver(challenges)));
    config.alpn_protocols = vec![b"acme-tls/1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // The VA closes after the handshake; a failed handshake is its verdict.
                if let Ok(mut tls) = acceptor.accept(stream).await {
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
}

/// Answers HTTP-01 on `listener`: `GET /.well-known/acme-challenge/<token>`.
fn serve_http01(listener: TcpListener, challenges: Arc<Challenges>) {
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let challenges = Arc::clone(&challenges);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let path = head.split(' ').nth(1).unwrap_or_default();
                let answer = path
                    .strip_prefix("/.well-known/acme-challenge/")
                    .and_then(|token| challenges.http(token));
                let response = match answer {
                    Some(body) => format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    ),
                    None => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned(),
                };
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
}

/// Checks that the certificate the store serves (`status`) is the one in the cache, for
/// [`DOMAIN`], and chains to pebble's issuing root.
fn check_issued(pebble: &Pebble, config: &AcmeConfig, status: &CertStatus) -> TestResult {
    let issued = Cache::new(config)
        .load_certificate()?
        .ok_or("no certificate in the cache")?;
    let not_after = issued.not_after.duration_since(UNIX_EPOCH)?.as_secs();
    assert_eq!(status.not_after, Some(not_after), "the cache holds another certificate");
    let key = &issued.key;
    let root_pem = pebble.issuing_root()?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(root_pem.as_bytes()) {
        let cert: CertificateDer<'static> = cert?;
        roots.add(cert)?;
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
    )
    .build()?;
    let (leaf, intermediates) = key.cert.split_first().ok_or("empty chain")?;
    verifier.verify_server_cert(
        leaf,
        intermediates,
        &ServerName::try_from(DOMAIN)?,
        &[],
        UnixTime::now(),
    )?;
    Ok(())
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0)
}

fn cache_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_01_issues_caches_and_a_restart_reuses_the_cache_without_the_ca() -> TestResult {
    assert!(
        pebble::installed(),
        "these tests need Debian's pebble package (pebble, pebble-challtestsrv)"
    );
    let tls = TcpListener::bind("127.0.0.1:0").await?;
    let mut pebble = Pebble::start(PebbleOptions {
        http_port: pebble::free_tcp_port()?,
        tls_port: tls.local_addr()?.port(),
        validity_secs: None,
    })?;
    let challenges = Arc::new(Challenges::default());
    serve_tls_alpn(tls, Arc::clone(&challenges));
    let tmp = tempfile::tempdir()?;
    let cache = tmp.path().join("acme");
    let config = config(&pebble, &cache);

    let task = Task::spawn(config.clone(), &challenges, false);
    let status = task.issued(None).await?;
    check_issued(&pebble, &config, &status)?;
    assert_eq!(status.problem, None);
    assert!(challenges.alpn(DOMAIN).is_none(), "the challenge answer stays up");
    task.stop().await?;

    let files = cache_files(&cache);
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(files.iter().any(|f| f.starts_with("account-")), "{files:?}");
    assert!(files.iter().any(|f| f.starts_with("cert-")), "{files:?}");
    assert_eq!(mode(&cache), 0o700);
    for file in &files {
        assert_eq!(mode(&cache.join(file)), 0o600, "{file}");
    }

    // A restart with the CA gone serves the cached certificate and reports nothing wrong.
    pebble.stop();
    let again = Task::spawn(config, &challenges, false);
    let cached = again.issued(None).await?;
    assert_eq!(cached, status);
    assert_eq!(again.problem(), None);
    again.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_01_issues_when_the_app_has_an_http_listener() -> TestResult {
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let pebble = Pebble::start(PebbleOptions {
        http_port: http.local_addr()?.port(),
        // Nothing listens there: only HTTP-01 can succeed.
        tls_port: pebble::free_tcp_port()?,
        validity_secs: None,
    })?;
    let challenges = Arc::new(Challenges::default());
    serve_http01(http, Arc::clone(&challenges));
    let tmp = tempfile::tempdir()?;
    let config = config(&pebble, tmp.path());

    let task = Task::spawn(config.clone(), &challenges, true);
    let status = task.issued(None).await?;
    check_issued(&pebble, &config, &status)?;
    task.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_validation_is_reported_and_the_next_attempt_tries_the_other_challenge() -> TestResult {
    let tls = TcpListener::bind("127.0.0.1:0").await?;
    let pebble = Pebble::start(PebbleOptions {
        // Nothing listens there: HTTP-01, tried first, fails.
        http_port: pebble::free_tcp_port()?,
        tls_port: tls.local_addr()?.port(),
        validity_secs: None,
    })?;
    let challenges = Arc::new(Challenges::default());
    serve_tls_alpn(tls, Arc::clone(&challenges));
    let tmp = tempfile::tempdir()?;
    let config = config(&pebble, tmp.path());

    let task = Task::spawn(config.clone(), &challenges, true);
    let store = Arc::clone(&task.store);
    let problem = poll("the validation failure", || {
        store.status().problem.filter(|p| p.contains("validation failed"))
    })
    .await?;
    assert!(problem.contains("http-01"), "{problem}");
    assert!(problem.contains("next attempt in 10s"), "{problem}");
    assert_eq!(store.status().not_after, None);
    // Ten seconds later, TLS-ALPN-01 succeeds.
    let status = task.issued(None).await?;
    check_issued(&pebble, &config, &status)?;
    assert_eq!(status.problem, None);
    task.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_is_renewed_in_the_background_when_a_third_of_its_life_is_left() -> TestResult {
    let tls = TcpListener::bind("127.0.0.1:0").await?;
    let pebble = Pebble::start(PebbleOptions {
        http_port: pebble::free_tcp_port()?,
        tls_port: tls.local_addr()?.port(),
        // Renewal is due 20 s after issue.
        validity_secs: Some(30),
    })?;
    let challenges = Arc::new(Challenges::default());
    serve_tls_alpn(tls, Arc::clone(&challenges));
    let tmp = tempfile::tempdir()?;
    let config = config(&pebble, tmp.path());

    let task = Task::spawn(config.clone(), &challenges, false);
    let first = task.issued(None).await?;
    let issued_at = Instant::now();
    let second = task.issued(Some(&first)).await?;
    assert!(
        issued_at.elapsed() >= Duration::from_secs(10),
        "renewed after {:?}, long before a third of 30 s was left",
        issued_at.elapsed()
    );
    check_issued(&pebble, &config, &second)?;
    task.stop().await
}

#[tokio::test]
async fn an_unreachable_directory_is_reported_and_retried_without_giving_up() -> TestResult {
    let port = pebble::free_tcp_port()?;
    let tmp = tempfile::tempdir()?;
    let challenges = Arc::new(Challenges::default());
    let config = AcmeConfig {
        domains: vec![DOMAIN.to_owned()],
        email: None,
        directory: format!("https://127.0.0.1:{port}/dir"),
        cache_dir: tmp.path().join("acme"),
        ca_root: None,
    };
    let task = Task::spawn(config, &challenges, false);
    let store = Arc::clone(&task.store);
    let problem = poll("the failure", || {
        store.status().problem.filter(|p| p.contains("next attempt"))
    })
    .await?;
    assert!(problem.contains("could not connect"), "{problem}");
    assert!(problem.contains(&format!("127.0.0.1:{port}")), "{problem}");
    assert_eq!(task.store.status().not_after, None);
    assert!(!task.handle.is_finished());
    task.stop().await
}
