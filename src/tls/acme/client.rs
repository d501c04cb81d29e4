//! The HTTPS client the ACME protocol runs on: hyper 1's HTTP/1.1 client over tokio-rustls,
//! the same hyper and rustls (aws-lc-rs provider) that serve corral's own traffic.
//!
//! instant-acme lets the caller supply the HTTP client ([`HttpClient`]); its built-in one
//! (hyper-rustls with the platform verifier) would bring a second TLS configuration path and
//! has no request deadline. This one:
//!
//! - trusts Mozilla's roots (compiled in by `webpki-roots`, so a minimal container without
//!   `/etc/ssl` still reaches Let's Encrypt) plus the app's `ca_root`, if set, in addition;
//! - speaks HTTPS only (RFC 8555 section 6.1 requires it);
//! - bounds every request, connect to last body byte, by [`REQUEST_TIMEOUT`], and every body by
//!   [`MAX_BODY`]: the directory is a remote party, and a stalled one must turn into an error
//!   that the retry loop reports, not a task that waits forever;
//! - opens one connection per request. An issuance is about a dozen requests, a few times a
//!   season; pooling would buy nothing worth its state.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::{Request, Uri};
use http_body_util::{BodyExt, Limited};
use hyper_util::rt::TokioIo;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The most one request to the directory may take, connection and TLS handshake included.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest response body accepted (a certificate chain is a few KiB).
const MAX_BODY: usize = 1 << 20;

/// An [`HttpClient`] for one directory, built per issuance attempt so that a changed `ca_root`
/// file is read again.
#[derive(Clone)]
pub(super) struct Https {
    tls: TlsConnector,
}

impl Https {
    /// A client trusting Mozilla's roots and, if given, every certificate in the PEM file
    /// `ca_root`. Reads the file (blocking, small): call it off the request path.
    pub(super) fn new(ca_root: Option<&Path>) -> Result<Https, String> {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(path) = ca_root {
            let pem = std::fs::read(path).map_err(|e| format!("could not read ca_root {}: {e}", path.display()))?;
            let mut added = 0;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("ca_root {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("ca_root {}: {e}", path.display()))?;
                added += 1;
            }
            if added == 0 {
                return Err(format!("ca_root {}: no PEM certificate in the file", path.display()));
            }
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(crate::tls::provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS client setup: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Https {
            tls: TlsConnector::from(Arc::new(config)),
        })
    }

    /// Sends `request` on a new connection and reads the whole response.
    async fn send(self, request: Request<BodyWrapper<Bytes>>) -> Result<BytesResponse, String> {
        let uri = request.uri().clone();
        if uri.scheme_str() != Some("https") {
            return Err(format!("{uri}: the ACME directory must be an https:// URL"));
        }
        let host = uri.host().ok_or_else(|| format!("{uri}: no host"))?;
        // A bracketed IPv6 literal connects and verifies without its brackets.
        let bare = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let tcp = TcpStream::connect((bare.as_str(), port))
            .await
            .map_err(|e| format!("could not connect to {host}:{port}: {e}"))?;
        let name = ServerName::try_from(bare.clone()).map_err(|e| format!("{host}: not a valid server name: {e}"))?;
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {host}:{port} failed: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP with {host}:{port} failed: {e}"))?;

        let request = origin_form(request, &uri)?;
        let target = uri.clone();
        let exchange = async move {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("request to {target} failed: {e}"))?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("reading the response from {target} failed: {e}"))?
                .to_bytes();
            Ok::<_, String>(BytesResponse {
                parts,
                body: Box::new(body),
            })
        };
        tokio::pin!(exchange, connection);
        tokio::select! {
            biased;
            result = &mut exchange => result,
            ended = &mut connection => match ended {
                // The server closed after answering: the answer is still in the exchange.
                Ok(()) => exchange.await,
                Err(e) => Err(format!("connection to {host}:{port} failed: {e}")),
            },
        }
    }
}

/// hyper's connection-level client sends the URI as given: a server expects the origin form
/// (path and query) and the authority in `Host`.
fn origin_form(request: Request<BodyWrapper<Bytes>>, uri: &Uri) -> Result<Request<BodyWrapper<Bytes>>, String> {
    let (mut parts, body) = request.into_parts();
    let authority = uri
        .authority()
        .ok_or_else(|| format!("{uri}: no host"))?
        .as_str()
        .to_owned();
    parts.uri = uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/")
        .parse()
        .map_err(|e| format!("{uri}: {e}"))?;
    parts
        .headers
        .insert(HOST, authority.parse().map_err(|e| format!("{uri}: bad host: {e}"))?);
    Ok(Request::from_parts(parts, body))
}

impl HttpClient for Https {
    fn request(
        &self,
        request: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let client = self.clone();
        Box::pin(async move {
            let uri = request.uri().clone();
            match tokio::time::timeout(REQUEST_TIMEOUT, client.send(request)).await {
                Ok(Ok(response)) => Ok(response),
                Ok(Err(reason)) => Err(instant_acme::Error::Other(reason.into())),
                Err(_) => Err(instant_acme::Error::Other(
                    format!("{uri}: no answer within {REQUEST_TIMEOUT:?}").into(),
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_ca_root_is_an_error_that_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        let err = Https::new(Some(&missing)).err().expect("an error");
        assert!(err.contains("missing.pem"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let err = Https::new(Some(&empty)).err().expect("an error");
        assert!(err.contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn requests_go_out_in_origin_form_with_host() {
        let uri: Uri = "https://acme.test:14000/dir?x=1".parse().expect("uri");
        let request = Request::builder()
            .uri(uri.clone())
            .body(BodyWrapper::default())
            .expect("request");
        let request = origin_form(request, &uri).expect("origin form");
        assert_eq!(request.uri(), "/dir?x=1");
        assert_eq!(request.headers()[HOST], "acme.test:14000");
    }

    #[tokio::test]
    async fn plain_http_is_refused() {
        let client = Https::new(None).expect("client");
        let request = Request::builder()
            .uri("http://127.0.0.1:1/dir")
            .body(BodyWrapper::default())
            .expect("request");
        let err = client.request(request).await.err().expect("an error");
        assert!(err.to_string().contains("https://"), "{err}");
    }
}
