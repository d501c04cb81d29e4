//! One issuance: account, order, challenges, CSR, certificate (RFC 8555 section 7).
//!
//! Challenge answers are published in the shared [`Challenges`] for exactly as long as the
//! order runs: a [`Published`] guard clears them on every way out, error and cancellation
//! (the future dropped on shutdown) included.

use std::sync::Arc;
use std::time::Duration;

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rcgen::{CertificateParams, CustomExtension, DistinguishedName, KeyPair};

use super::cache::{Cache, Issued};
use super::client::Https;
use crate::config::AcmeConfig;
use crate::tls::Challenges;

/// How long the CA may take to validate the challenges, and then to issue.
const ORDER_TIMEOUT: Duration = Duration::from_secs(120);

/// Why an issuance failed, by the step that failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum IssueError {
    /// The HTTPS client could not be set up (usually: `ca_root`).
    #[error("{0}")]
    Client(String),
    /// The directory did not answer or refused the account.
    #[error("ACME account at {directory}: {source}")]
    Account {
        directory: String,
        source: instant_acme::Error,
    },
    /// The CA refused the order, or a request during it failed.
    #[error("ACME order: {0}")]
    Order(instant_acme::Error),
    /// An authorization is in a state no challenge can fix.
    #[error("the authorization for {domain} is {status}")]
    Authorization { domain: String, status: String },
    /// The CA offers only challenges corral cannot answer.
    #[error("the CA offers no challenge corral can answer for {domain} (offered: {offered}; corral answers {ours})")]
    NoChallenge {
        domain: String,
        offered: String,
        ours: String,
    },
    /// The CA tried the challenges and they failed.
    #[error("validation failed: {0}")]
    Validation(String),
    /// Generating a key, a CSR or a challenge certificate failed.
    #[error("{what}: {source}")]
    Crypto { what: &'static str, source: rcgen::Error },
    /// The certificate the CA sent (or the challenge certificate) cannot be used.
    #[error("the certificate is unusable: {0}")]
    Certificate(String),
}

impl IssueError {
    /// True when the CA tried our challenge answers and they failed: the next attempt should
    /// try another challenge type.
    pub(super) fn is_validation(&self) -> bool {
        matches!(self, IssueError::Validation(_))
    }
}

/// The name of a challenge type as RFC 8555 writes it.
pub(super) fn kind_name(kind: &ChallengeType) -> String {
    match kind {
        ChallengeType::Http01 => "http-01".to_owned(),
        ChallengeType::Dns01 => "dns-01".to_owned(),
        ChallengeType::TlsAlpn01 => "tls-alpn-01".to_owned(),
        ChallengeType::DeviceAttest01 => "device-attest-01".to_owned(),
        ChallengeType::Unknown(name) => name.clone(),
        other => format!("{other:?}"),
    }
}

/// Gets the cached account, or creates one and caches it.
async fn account(config: &AcmeConfig, cache: &Arc<Cache>, http: &Https) -> Result<Account, IssueError> {
    let account_error = |source| IssueError::Account {
        directory: config.directory.clone(),
        source,
    };
    match super::blocking(cache, |c| c.load_account()).await {
        Ok(Some(credentials)) => {
            return Account::builder_with_http(Box::new(http.clone()))
                .from_credentials(credentials)
                .await
                .map_err(account_error);
        }
        Ok(None) => {}
        Err(reason) => {
            tracing::warn!(%reason, "ignoring the cached ACME account; creating a new one");
        }
    }
    let contact = config.email.as_ref().map(|email| format!("mailto:{email}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let (account, credentials) = Account::builder_with_http(Box::new(http.clone()))
        .create(
            &NewAccount {
                contact: &contacts,
                // Configuring `[app.tls.acme]` is the operator's agreement to the CA's terms.
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            config.directory.clone(),
            None,
        )
        .await
        .map_err(account_error)?;
    if let Err(reason) = super::blocking(cache, move |c| c.save_account(credentials)).await {
        tracing::warn!(%reason, "could not cache the ACME account; the next start creates another");
    }
    Ok(account)
}

/// True when the CA no longer knows the account (a test CA restarted, or the account was
/// removed): the cached credentials are useless. Only this problem type: re-creating the
/// account for any other refusal would open a new account at every retry.
fn account_is_gone(error: &instant_acme::Error) -> bool {
    match error {
        instant_acme::Error::Api(problem) => {
            problem.r#type.as_deref() == Some("urn:ietf:params:acme:error:accountDoesNotExist")
        }
        _ => false,
    }
}

/// Orders and fetches a certificate for `config.domains`, answering with the first type in
/// `kinds` that the CA offers for each name.
pub(super) async fn issue(
    config: &AcmeConfig,
    cache: &Arc<Cache>,
    challenges: &Challenges,
    kinds: &[ChallengeType],
) -> Result<Issued, IssueError> {
    let ca_root = config.ca_root.clone();
    let http = tokio::task::spawn_blocking(move || Https::new(ca_root.as_deref()))
        .await
        .map_err(|e| IssueError::Client(format!("TLS client setup: {e}")))?
        .map_err(IssueError::Client)?;
    let mut account = account(config, cache, &http).await?;
    match order(&account, config, challenges, kinds).await {
        Err(IssueError::Order(e)) if account_is_gone(&e) => {
            tracing::warn!(error = %e, "the CA does not know the cached ACME account; creating a new one");
            if let Err(reason) = super::blocking(cache, |c| c.forget_account()).await {
                tracing::warn!(%reason, "could not remove the stale ACME account");
            }
            account = self::account(config, cache, &http).await?;
            order(&account, config, challenges, kinds).await
        }
        result => result,
    }
}

async fn order(
    account: &Account,
    config: &AcmeConfig,
    challenges: &Challenges,
    kinds: &[ChallengeType],
) -> Result<Issued, IssueError> {
    let identifiers: Vec<Identifier> = config.domains.iter().map(|d| Identifier::Dns(d.clone())).collect();
    let mut order = account
        .new_order(&NewOrder::new(&identifiers))
        .await
        .map_err(IssueError::Order)?;
    let mut published = Published::new(challenges);

    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization.map_err(IssueError::Order)?;
        let domain = authorization.identifier().to_string();
        match authorization.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => {
                return Err(IssueError::Authorization {
                    domain,
                    status: format!("{other:?}").to_lowercase(),
                })
            }
        }
        let offered: Vec<ChallengeType> = authorization.challenges.iter().map(|c| c.r#type.clone()).collect();
        let Some(kind) = kinds.iter().find(|k| offered.contains(k)).cloned() else {
            return Err(IssueError::NoChallenge {
                domain,
                offered: names(&offered),
                ours: names(kinds),
            });
        };
        let Some(mut challenge) = authorization.challenge(kind.clone()) else {
            return Err(IssueError::Order(instant_acme::Error::Str(
                "a challenge the authorization listed is missing",
            )));
        };
        let key_authorization = challenge.key_authorization();
        match kind {
            ChallengeType::TlsAlpn01 => {
                let certificate = alpn_certificate(&domain, key_authorization.digest().as_ref())?;
                published.alpn(&domain, certificate);
            }
            ChallengeType::Http01 => {
                published.http(&challenge.token, key_authorization.as_str().to_owned());
            }
            other => {
                return Err(IssueError::NoChallenge {
                    domain,
                    offered: names(&offered),
                    ours: kind_name(&other),
                })
            }
        }
        tracing::debug!(%domain, challenge = %kind_name(&kind), "challenge answer published");
        challenge.set_ready().await.map_err(IssueError::Order)?;
    }

    let policy = RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .backoff(1.5)
        .timeout(ORDER_TIMEOUT);
    let status = order.poll_ready(&policy).await;
    if !matches!(status, Ok(OrderStatus::Ready)) {
        let mut reasons = Vec::new();
        let mut authorizations = order.authorizations();
        while let Some(Ok(mut authorization)) = authorizations.next().await {
            if authorization.refresh().await.is_err() {
                continue;
            }
            let domain = authorization.identifier().to_string();
            for challenge in &authorization.challenges {
                if let Some(error) = &challenge.error {
                    reasons.push(format!("{domain} by {}: {error}", kind_name(&challenge.r#type)));
                }
            }
        }
        return Err(match (status, reasons.is_empty()) {
            (_, false) => IssueError::Validation(reasons.join("; ")),
            (Err(e), true) => IssueError::Order(e),
            (Ok(other), true) => IssueError::Validation(format!("the order is {other:?}")),
        });
    }

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| IssueError::Crypto {
        what: "generating the certificate key",
        source,
    })?;
    let mut params = CertificateParams::new(config.domains.clone()).map_err(|source| IssueError::Crypto {
        what: "the certificate request",
        source,
    })?;
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(|source| IssueError::Crypto {
        what: "signing the certificate request",
        source,
    })?;
    order.finalize_csr(csr.der()).await.map_err(IssueError::Order)?;
    let chain = order.poll_certificate(&policy).await.map_err(IssueError::Order)?;
    drop(published);
    Issued::from_pem(chain, key.serialize_pem()).map_err(IssueError::Certificate)
}

fn names(kinds: &[ChallengeType]) -> String {
    kinds.iter().map(kind_name).collect::<Vec<_>>().join(", ")
}

/// The self-signed certificate that answers a TLS-ALPN-01 challenge (RFC 8737 section 3): the
/// name as its only SAN and the critical acmeIdentifier extension holding the SHA-256 of the
/// key authorization. A fresh P-256 key each time; it never leaves memory.
pub(super) fn alpn_certificate(domain: &str, digest: &[u8]) -> Result<Arc<rustls::sign::CertifiedKey>, IssueError> {
    let crypto = |what| move |source| IssueError::Crypto { what, source };
    if digest.len() != 32 {
        return Err(IssueError::Certificate(format!(
            "a key authorization digest of {} bytes",
            digest.len()
        )));
    }
    let key =
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(crypto("generating the tls-alpn-01 key"))?;
    let mut params = CertificateParams::new(vec![domain.to_owned()]).map_err(crypto("the tls-alpn-01 certificate"))?;
    params.distinguished_name = DistinguishedName::new();
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
    let cert = params
        .self_signed(&key)
        .map_err(crypto("signing the tls-alpn-01 certificate"))?;
    // Built directly, not through `tls::certified_key`: its key-matches-leaf check parses the
    // certificate with webpki, which (rightly, for a served certificate) refuses the unknown
    // critical acmeIdentifier extension. The key was made just above, so it matches.
    let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signer = crate::tls::provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| IssueError::Certificate(format!("the tls-alpn-01 key: {e}")))?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(
        vec![cert.der().clone()],
        signer,
    )))
}

/// The challenge answers one order has published; dropping it takes them down.
struct Published<'a> {
    challenges: &'a Challenges,
    alpn: Vec<String>,
    http: Vec<String>,
}

impl<'a> Published<'a> {
    fn new(challenges: &'a Challenges) -> Self {
        Published {
            challenges,
            alpn: Vec::new(),
            http: Vec::new(),
        }
    }

    fn alpn(&mut self, domain: &str, key: Arc<rustls::sign::CertifiedKey>) {
        self.challenges.set_alpn(domain, key);
        self.alpn.push(domain.to_owned());
    }

    fn http(&mut self, token: &str, key_authorization: String) {
        self.challenges.set_http(token, key_authorization);
        self.http.push(token.to_owned());
    }
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        for domain in &self.alpn {
            self.challenges.clear_alpn(domain);
        }
        for token in &self.http {
            self.challenges.clear_http(token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alpn_certificate_carries_the_name_and_a_critical_acme_identifier() {
        let digest = [7u8; 32];
        let key = alpn_certificate("a.test", &digest).expect("certificate");
        let (_, cert) = x509_parser::parse_x509_certificate(key.cert[0].as_ref()).expect("x509");
        let san = cert.subject_alternative_name().expect("parses").expect("present");
        assert_eq!(format!("{:?}", san.value.general_names), r#"[DNSName("a.test")]"#);
        // id-pe-acmeIdentifier, 1.3.6.1.5.5.7.1.31: an OCTET STRING of the digest.
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier");
        assert!(ext.critical);
        let mut expected = vec![0x04, 32];
        expected.extend_from_slice(&digest);
        assert_eq!(ext.value, expected.as_slice());
        assert!(alpn_certificate("a.test", &[0u8; 5]).is_err());
    }

    #[test]
    fn published_answers_are_taken_down_when_dropped() {
        let challenges = Challenges::default();
        let key = alpn_certificate("a.test", &[1u8; 32]).expect("certificate");
        {
            let mut published = Published::new(&challenges);
            published.alpn("a.test", key);
            published.http("tok", "tok.thumb".to_owned());
            assert!(challenges.alpn("a.test").is_some());
            assert_eq!(challenges.http("tok").as_deref(), Some("tok.thumb"));
        }
        assert!(challenges.alpn("a.test").is_none());
        assert!(challenges.http("tok").is_none());
    }
}
