//! Certificates from PEM: a chain and its key in, a checked [`CertifiedKey`] and what `check`
//! and `status` show about it (subject, names, validity) out.
//!
//! Files are read whole (they are small) and treated as hostile: anything that does not parse
//! is an error naming the file, never a panic. The key must match the leaf certificate (rustls
//! compares the public key of both). PKCS#8, PKCS#1 (RSA) and SEC1 (EC) keys are accepted, the
//! formats `openssl`, certbot and most CAs write.
//!
//! Why x509-parser: rustls and webpki check certificates but do not expose their subject,
//! names or dates; x509-parser reads them from the DER without a C library and is the parser
//! of the rcgen/rustls ecosystem.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// What a leaf certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    /// Its subject, as `CN=example.com` (or the first name when the subject is empty).
    pub subject: String,
    /// The DNS names it is valid for (subjectAltName, else the CN), lower-case; `*.x` for
    /// wildcards.
    pub names: Vec<String>,
    /// Not valid before this.
    pub not_before: SystemTime,
    /// Not valid after this.
    pub not_after: SystemTime,
}

/// A certificate with its key, ready to serve, and what it says about itself.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The chain and signing key.
    pub key: Arc<CertifiedKey>,
    /// The leaf's subject, names and dates.
    pub leaf: Leaf,
}

/// A certificate or key file that cannot be served, with the config key that named it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{key}: {}: {reason}", path.display())]
pub struct CertError {
    /// `cert` or `key`.
    pub key: &'static str,
    /// The file.
    pub path: std::path::PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

/// Reads a PEM chain (leaf first) and its PEM key from files.
pub fn load_files(cert: &Path, key: &Path) -> Result<Loaded, CertError> {
    let fail = |which: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |reason: String| CertError {
            key: which,
            path,
            reason,
        }
    };
    let cert_pem = read(cert).map_err(fail("cert", cert))?;
    let key_pem = read(key).map_err(fail("key", key))?;
    let chain = chain(&cert_pem).map_err(fail("cert", cert))?;
    let private = private_key(&key_pem).map_err(fail("key", key))?;
    let leaf =
        describe(&chain[0]).ok_or_else(|| fail("cert", cert)("the first certificate cannot be parsed".into()))?;
    let key = certified(chain, private).map_err(fail("key", key))?;
    Ok(Loaded { key, leaf })
}

/// Parses a PEM chain (leaf first) and a PEM private key into a certified key, checking that
/// the key matches the leaf.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    certified(chain(cert_pem)?, private_key(key_pem)?)
}

/// `notBefore` and `notAfter` of a DER certificate.
pub fn validity(leaf: &CertificateDer<'_>) -> Option<(SystemTime, SystemTime)> {
    describe(leaf).map(|l| (l.not_before, l.not_after))
}

/// Subject, names and dates of a DER certificate; `None` when it does not parse.
pub fn describe(der: &CertificateDer<'_>) -> Option<Leaf> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs.unsigned_abs()))
        } else {
            SystemTime::UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
        }
    };
    let mut names: Vec<String> = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    if names.is_empty() {
        // Only a certificate without subjectAltName is matched by its CN (as browsers did).
        names.extend(common_name.iter().map(|cn| cn.to_ascii_lowercase()));
    }
    let subject = match (&common_name, names.first()) {
        (Some(cn), _) => format!("CN={cn}"),
        (None, Some(first)) => first.clone(),
        (None, None) => cert.subject().to_string(),
    };
    Some(Leaf {
        subject,
        names,
        not_before: at(cert.validity().not_before)?,
        not_after: at(cert.validity().not_after)?,
    })
}

/// True if certificate name `pattern` (`example.com` or `*.example.com`) covers `host`.
/// A wildcard covers exactly one label, as RFC 6125 says.
pub fn name_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(parent) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(parent)),
        None => pattern.eq_ignore_ascii_case(host),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    // A certificate file is a few KiB; refuse to read something huge by mistake.
    const MAX: u64 = 1 << 20;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX + 1), &mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX {
        return Err("larger than 1 MiB: not a PEM certificate or key".into());
    }
    Ok(bytes)
}

fn chain(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate chain: {e}"))?;
    if chain.is_empty() {
        return Err("no certificate in it (expected -----BEGIN CERTIFICATE-----)".into());
    }
    Ok(chain)
}

fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            "no private key in it (expected PKCS#8, PKCS#1 or SEC1 PEM: -----BEGIN PRIVATE KEY-----, \
             -----BEGIN RSA PRIVATE KEY----- or -----BEGIN EC PRIVATE KEY-----)"
                .to_owned()
        }
        other => format!("not a PEM private key: {other}"),
    })
}

fn certified(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<Arc<CertifiedKey>, String> {
    let provider = super::provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("unusable private key: {e}"))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => Ok(Arc::new(certified)),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(Arc::new(certified)),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err("does not match the certificate (its public key is another one)".into())
        }
        Err(e) => Err(format!("cannot be checked against the certificate: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_covers_one_label_only() {
        assert!(name_matches("*.example.com", "a.example.com"));
        assert!(name_matches("*.example.com", "A.Example.COM"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.example.com", ".example.com"));
        assert!(name_matches("example.com", "EXAMPLE.com"));
        assert!(!name_matches("example.com", "www.example.com"));
    }

    #[test]
    fn hostile_pem_is_an_error_not_a_panic() {
        for junk in [
            &b""[..],
            b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            b"\xff\xfe\x00garbage",
        ] {
            assert!(certified_key(junk, junk).is_err());
        }
        let chain = chain(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").expect("base64 decodes");
        assert_eq!(describe(&chain[0]), None);
    }
}
