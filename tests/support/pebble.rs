//! A private ACME CA for a test: Debian's `pebble`, with `pebble-challtestsrv` as its DNS
//! server so that every name resolves to 127.0.0.1 and pebble validates challenges against
//! the ports the test's own listeners use.
//!
//! Every port is picked free by the OS at start (bound to port 0, read, closed), pebble's
//! config is written into a temp dir, pebble's own HTTPS certificate is made here with rcgen
//! (Debian's package ships none) and its CA is [`Pebble::ca_root`], the `ca_root` a client
//! needs. [`Pebble::start`] returns once both programs answer (polled, with a deadline). Both
//! are killed on drop. This file is shared: `tests/` includes it as `support::pebble`, and the
//! crate's own ACME tests include it by path, so it uses only std, rcgen and tempfile.

#![allow(dead_code)]

use std::error::Error;
use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long pebble and challtestsrv may take to answer (two busy cores).
const START_DEADLINE: Duration = Duration::from_secs(30);

/// What the CA validates against and how it issues.
#[derive(Clone, Debug)]
pub struct PebbleOptions {
    /// The port pebble's VA connects to for HTTP-01.
    pub http_port: u16,
    /// The port pebble's VA connects to for TLS-ALPN-01.
    pub tls_port: u16,
    /// Lifetime of issued certificates, in seconds (pebble's default when `None`).
    pub validity_secs: Option<u64>,
}

/// A running pebble and challtestsrv.
pub struct Pebble {
    /// Config, certificates and the two programs' output.
    pub dir: tempfile::TempDir,
    /// The ACME directory URL: `https://127.0.0.1:<port>/dir`.
    pub directory: String,
    /// The PEM CA that signed pebble's own HTTPS certificate.
    pub ca_root: PathBuf,
    /// pebble's management interface (HTTPS, same certificate).
    pub management: SocketAddr,
    /// challtestsrv's DNS (UDP and TCP).
    pub dns: SocketAddr,
    pub options: PebbleOptions,
    pebble: Option<Child>,
    challtestsrv: Option<Child>,
}

/// True when both programs are installed (Debian package `pebble`).
pub fn installed() -> bool {
    ["pebble", "pebble-challtestsrv"].iter().all(|name| {
        Command::new(name)
            .arg("-h")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    })
}

/// A TCP port nobody listens on now.
pub fn free_tcp_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A port free for both UDP and TCP (a DNS server binds both).
fn free_dns_port() -> Result<u16, Box<dyn Error>> {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err("no port free for both UDP and TCP".into())
}

impl Pebble {
    /// Starts challtestsrv and pebble and waits until both answer.
    pub fn start(options: PebbleOptions) -> Result<Pebble, Box<dyn Error>> {
        let dir = tempfile::tempdir()?;
        let (ca_root, cert, key) = write_https_certificate(dir.path())?;
        let dns = SocketAddr::from(([127, 0, 0, 1], free_dns_port()?));
        let challtest_management = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?));
        let listen = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?));
        let management = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?));

        let mut config = format!(
            r#"{{"pebble": {{
  "listenAddress": "{listen}",
  "managementListenAddress": "{management}",
  "certificate": {cert:?},
  "privateKey": {key:?},
  "httpPort": {http},
  "tlsPort": {tls},
  "ocspResponderURL": "",
  "externalAccountBindingRequired": false"#,
            http = options.http_port,
            tls = options.tls_port,
        );
        if let Some(secs) = options.validity_secs {
            config.push_str(&format!(",\n  \"certificateValidityPeriod\": {secs}"));
        }
        config.push_str("\n}}\n");
        let config_path = dir.path().join("pebble-config.json");
        fs::write(&config_path, config)?;

        let mut pebble = Pebble {
            directory: format!("https://{listen}/dir"),
            ca_root,
            management,
            dns,
            options,
            pebble: None,
            challtestsrv: None,
            dir,
        };
        let challtest_log = fs::File::create(pebble.dir.path().join("challtestsrv.log"))?;
        pebble.challtestsrv = Some(
            Command::new("pebble-challtestsrv")
                .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
                .args(["-dns01", &dns.to_string()])
                .args(["-management", &challtest_management.to_string()])
                // Its own challenge servers would answer in place of the test's listeners.
                .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                .stdin(Stdio::null())
                .stdout(challtest_log.try_clone()?)
                .stderr(challtest_log)
                .spawn()?,
        );
        let pebble_log = fs::File::create(pebble.dir.path().join("pebble.log"))?;
        pebble.pebble = Some(
            Command::new("pebble")
                .arg("-config")
                .arg(&config_path)
                .args(["-dnsserver", &dns.to_string()])
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .stdin(Stdio::null())
                .stdout(pebble_log.try_clone()?)
                .stderr(pebble_log)
                .spawn()?,
        );

        let start = Instant::now();
        loop {
            let up = answers_dns(dns)
                && TcpStream::connect(challtest_management).is_ok()
                && TcpStream::connect(listen).is_ok()
                && TcpStream::connect(management).is_ok();
            if up {
                return Ok(pebble);
            }
            let exited = [
                ("pebble", &mut pebble.pebble),
                ("pebble-challtestsrv", &mut pebble.challtestsrv),
            ]
            .into_iter()
            .find_map(|(name, child)| {
                let status = child.as_mut()?.try_wait().ok()??;
                Some(format!("{name} exited with {status}"))
            });
            if let Some(exited) = exited {
                return Err(format!("{exited}:\n{}", pebble.logs()).into());
            }
            if start.elapsed() > START_DEADLINE {
                return Err(format!("pebble did not answer within {START_DEADLINE:?}:\n{}", pebble.logs()).into());
            }
            // A short pause between checks; the deadline above bounds the wait.
            std::thread::park_timeout(Duration::from_millis(20));
        }
    }

    /// Both programs' output so far, for failure messages.
    pub fn logs(&self) -> String {
        let read = |name: &str| fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!(
            "--- pebble ---\n{}\n--- pebble-challtestsrv ---\n{}",
            read("pebble.log"),
            read("challtestsrv.log")
        )
    }

    /// The root that signs the certificates pebble issues (management API `/roots/0`), PEM.
    /// pebble makes a new one at every start.
    pub fn issuing_root(&self) -> Result<String, Box<dyn Error>> {
        let output = Command::new("curl")
            .args(["--silent", "--show-error", "--fail", "--max-time", "10"])
            .arg("--cacert")
            .arg(&self.ca_root)
            .arg(format!("https://{}/roots/0", self.management))
            .output()?;
        if !output.status.success() {
            return Err(format!("fetching pebble's root: {}", String::from_utf8_lossy(&output.stderr)).into());
        }
        Ok(String::from_utf8(output.stdout)?)
    }

    /// Stops both programs now (a test that needs the CA gone); idempotent.
    pub fn stop(&mut self) {
        for child in [self.pebble.take(), self.challtestsrv.take()].into_iter().flatten() {
            kill(child);
        }
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        self.stop();
    }
}

fn kill(mut child: Child) {
    if let Err(e) = child.kill() {
        eprintln!("could not kill pid {}: {e}", child.id());
    }
    if let Err(e) = child.wait() {
        eprintln!("could not reap pid {}: {e}", child.id());
    }
}

/// True when a DNS server at `addr` answers an A query (any answer).
fn answers_dns(addr: SocketAddr) -> bool {
    let Ok(socket) = UdpSocket::bind("127.0.0.1:0") else {
        return false;
    };
    if socket.set_read_timeout(Some(Duration::from_millis(200))).is_err() {
        return false;
    }
    // Header: id 0x1234, recursion desired, one question; then "probe.test." A IN.
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["probe", "test"] {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    if socket.send_to(&query, addr).is_err() {
        return false;
    }
    let mut answer = [0u8; 512];
    matches!(socket.recv(&mut answer), Ok(n) if n >= 12 && answer[..2] == [0x12, 0x34])
}

/// Makes a CA and, signed by it, a certificate for 127.0.0.1 and localhost; returns the paths
/// of the CA (PEM), the certificate and its key.
fn write_https_certificate(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf), Box<dyn Error>> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "corral test pebble CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let key = rcgen::KeyPair::generate()?;
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    let cert = params.signed_by(&key, &issuer)?;

    let ca_path = dir.join("ca.pem");
    let cert_path = dir.join("pebble-cert.pem");
    let key_path = dir.join("pebble-key.pem");
    fs::write(&ca_path, ca_cert.pem())?;
    fs::write(&cert_path, cert.pem())?;
    let mut key_file = fs::File::create(&key_path)?;
    key_file.write_all(key.serialize_pem().as_bytes())?;
    Ok((ca_path, cert_path, key_path))
}
