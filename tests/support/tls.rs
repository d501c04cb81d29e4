//! TLS for the tests: a throwaway CA that issues certificates (rcgen), a blocking rustls
//! client that trusts it, and just enough HTTP/2 framing to send what curl will not (split
//! cookies, reset floods, endless CONTINUATION frames).

use std::error::Error;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};

/// A CA whose root the test clients trust.
pub struct Ca {
    cert: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, KeyPair>,
    /// The root, PEM (for curl's `--cacert`, openssl's `-CAfile`).
    pub pem: PathBuf,
}

/// A certificate and key written to files.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Ca {
    /// A new CA, its root written to `dir/ca.pem`.
    pub fn new(dir: &Path) -> Result<Ca, Box<dyn Error>> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "corral test CA");
        let cert = params.self_signed(&key)?;
        let pem = dir.join("ca.pem");
        std::fs::write(&pem, cert.pem())?;
        let issuer = rcgen::Issuer::new(params, key);
        Ok(Ca { cert, issuer, pem })
    }

    /// An ECDSA P-256 certificate for `names` (CN = the first), as `dir/<stem>.pem` and `.key`.
    pub fn issue(&self, dir: &Path, stem: &str, names: &[&str]) -> Result<Issued, Box<dyn Error>> {
        self.issue_with(dir, stem, names, |_| {})
    }

    /// Like [`Ca::issue`], with `adjust` applied to the certificate's parameters (dates).
    pub fn issue_with(
        &self,
        dir: &Path,
        stem: &str,
        names: &[&str],
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> Result<Issued, Box<dyn Error>> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, names[0]);
        adjust(&mut params);
        let cert = params.signed_by(&key, &self.issuer)?;
        let issued = Issued {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        };
        std::fs::write(&issued.cert, cert.pem())?;
        std::fs::write(&issued.key, key.serialize_pem())?;
        Ok(issued)
    }

    /// A certificate for `names` whose key is the PKCS#8 PEM `key_pem` (an RSA key, say).
    pub fn issue_rsa(&self, dir: &Path, stem: &str, names: &[&str], key_pem: &str) -> Result<Issued, Box<dyn Error>> {
        let key = KeyPair::from_pem(key_pem)?;
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, names[0]);
        let cert = params.signed_by(&key, &self.issuer)?;
        let issued = Issued {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        };
        std::fs::write(&issued.cert, cert.pem())?;
        std::fs::write(&issued.key, key_pem)?;
        Ok(issued)
    }

    /// A rustls client config trusting this CA, offering `alpn`.
    pub fn client(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.cert.der().to_vec()))
            .expect("the test CA is a valid root");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// A TLS connection to `addr` for server name `name`, handshake done.
    pub fn connect(&self, addr: SocketAddr, name: &str, alpn: &[&[u8]]) -> Result<Tls, Box<dyn Error>> {
        let tcp = TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
        tcp.set_write_timeout(Some(Duration::from_secs(30)))?;
        let conn = rustls::ClientConnection::new(self.client(alpn), ServerName::try_from(name.to_owned())?)?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        Ok(tls)
    }
}

/// A blocking TLS client connection.
pub type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// The `tls` key serving `issued`.
pub fn tls_key(issued: &Issued) -> String {
    format!("tls = {{ cert = {:?}, key = {:?} }}", issued.cert, issued.key)
}

/// corral started with `options` and `[app.tls]` for `localhost`; its CA, certificate and files.
pub fn https(options: super::Options) -> Result<(super::Corral, tempfile::TempDir, Ca, Issued), Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new(dir.path())?;
    let issued = ca.issue(dir.path(), "site", &["localhost"])?;
    let corral = super::Corral::start(options.key(&tls_key(&issued)))?;
    Ok((corral, dir, ca, issued))
}

/// Reads until the peer closes (or an error ends the connection); what arrived.
pub fn read_to_end(stream: &mut impl Read) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Minimal HTTP/2 framing (RFC 9113) for hand-made requests.
pub mod h2 {
    use super::*;

    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const GOAWAY: u8 = 0x7;
    pub const CONTINUATION: u8 = 0x9;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;

    /// One frame.
    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// The client preface and an empty SETTINGS frame.
    pub fn preface() -> Vec<u8> {
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(frame(SETTINGS, 0, 0, &[]));
        out
    }

    /// A header block of literal fields (never indexed, no Huffman): simple and valid HPACK.
    pub fn block(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in fields {
            out.push(0x10);
            for text in [name, value] {
                assert!(text.len() < 127, "short fields only");
                out.push(text.len() as u8);
                out.extend_from_slice(text.as_bytes());
            }
        }
        out
    }

    /// A GET for `path` on `authority`, with `extra` fields, on `stream`.
    pub fn get(stream: u32, authority: &str, path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
        let mut fields = vec![
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", authority),
            (":path", path),
        ];
        fields.extend_from_slice(extra);
        frame(HEADERS, END_HEADERS | END_STREAM, stream, &block(&fields))
    }

    /// Reads one frame: (type, flags, stream, payload); `None` at the end of the connection.
    pub fn read_frame(stream: &mut impl Read) -> Option<(u8, u8, u32, Vec<u8>)> {
        let mut head = [0u8; 9];
        stream.read_exact(&mut head).ok()?;
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).ok()?;
        Some((head[3], head[4], id, payload))
    }

    /// The client's SETTINGS: `(identifier, value)` pairs.
    pub fn settings(pairs: &[(u16, u32)]) -> Vec<u8> {
        let payload: Vec<u8> = pairs
            .iter()
            .flat_map(|(id, value)| id.to_be_bytes().into_iter().chain(value.to_be_bytes()))
            .collect();
        frame(SETTINGS, 0, 0, &payload)
    }

    /// Reads frames until GOAWAY (true) or the end of the connection or a read timeout (false).
    pub fn goaway(conn: &mut (impl Read + Write)) -> bool {
        while let Some((kind, flags, _, _)) = read_frame(conn) {
            if kind == GOAWAY {
                return true;
            }
            if kind == SETTINGS && flags & 0x1 == 0 && conn.write_all(&frame(SETTINGS, 0x1, 0, &[])).is_err() {
                return false;
            }
        }
        false
    }

    /// The DATA of each of `streams` until all have ended (reset ones are left out).
    pub fn bodies(conn: &mut (impl Read + Write), streams: &[u32]) -> Option<std::collections::BTreeMap<u32, Vec<u8>>> {
        let mut open: std::collections::BTreeSet<u32> = streams.iter().copied().collect();
        let mut bodies = std::collections::BTreeMap::new();
        while !open.is_empty() {
            let (kind, flags, id, payload) = read_frame(conn)?;
            if kind == SETTINGS && flags & 0x1 == 0 {
                conn.write_all(&frame(SETTINGS, 0x1, 0, &[])).ok()?;
            }
            if !open.contains(&id) {
                continue;
            }
            if kind == DATA {
                bodies.entry(id).or_insert_with(Vec::new).extend_from_slice(&payload);
            }
            if kind == RST_STREAM || ((kind == DATA || kind == HEADERS) && flags & END_STREAM != 0) {
                open.remove(&id);
            }
        }
        Some(bodies)
    }

    /// The DATA of `stream` until it ends (the server's headers are not decoded).
    pub fn body_of(conn: &mut (impl Read + Write), stream: u32) -> Option<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let (kind, flags, id, payload) = read_frame(conn)?;
            if kind == SETTINGS && flags & 0x1 == 0 {
                // Acknowledge the server's settings, as a client must.
                conn.write_all(&frame(SETTINGS, 0x1, 0, &[])).ok()?;
            }
            if id != stream {
                continue;
            }
            if kind == DATA {
                body.extend_from_slice(&payload);
            }
            if kind == RST_STREAM {
                return None;
            }
            if (kind == DATA || kind == HEADERS) && flags & END_STREAM != 0 {
                return Some(body);
            }
        }
    }
}
