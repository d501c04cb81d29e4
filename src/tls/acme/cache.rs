//! The cache directory (`cache_dir`): the ACME account and the last issued certificate, so that
//! a restart serves at once and does not order again.
//!
//! Two JSON files per app, their names keyed by a hash so that changing `directory` or
//! `domains` never reuses a certificate issued for something else:
//!
//! - `account-<hash of directory>.json`: `{ directory, credentials }`, the account key and URL
//!   (instant-acme's [`AccountCredentials`]). One account per directory, shared by every app
//!   that uses the same `cache_dir` and directory;
//! - `cert-<hash of directory and sorted domains>.json`: `{ directory, domains, chain_pem,
//!   key_pem }`. Chain and key live in one file so that one rename replaces both: a crash can
//!   never leave a new key beside an old chain.
//!
//! The directory is created 0700 and every file is written 0600, to a temporary name of its
//! own (exclusively created) and then renamed over the old one (with fsyncs), so a reader sees
//! the old file or the new one, whole. A directory that is a symlink, belongs to another user,
//! or that others may write to is refused with the reason, as is a file that is a symlink
//! (opened with `O_NOFOLLOW` and checked through its descriptor).
//! Everything read back is treated as hostile: a symlink, an oversized or malformed file, a
//! directory or domain list that does not match, a key that does not match its chain, are all
//! reported as a reason, and the caller logs it and orders a new certificate. Nothing here
//! panics on file content.
//!
//! These functions do blocking file I/O on small files; the caller runs them on tokio's
//! blocking pool.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use instant_acme::AccountCredentials;
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::AcmeConfig;

/// A cache file larger than this is not ours.
const MAX_FILE: u64 = 1 << 20;

/// A certificate and its key, parsed and checked, with the PEM they came from.
#[derive(Clone)]
pub(super) struct Issued {
    /// What the TLS resolver serves.
    pub(super) key: Arc<CertifiedKey>,
    pub(super) not_before: SystemTime,
    pub(super) not_after: SystemTime,
    chain_pem: String,
    key_pem: String,
}

impl Issued {
    /// Parses a PEM chain (leaf first) and its PEM key, checking that they match.
    pub(super) fn from_pem(chain_pem: String, key_pem: String) -> Result<Issued, String> {
        let key = crate::tls::certified_key(chain_pem.as_bytes(), key_pem.as_bytes())?;
        let leaf = key.cert.first().ok_or("the chain has no certificate")?;
        let (not_before, not_after) =
            crate::tls::validity(leaf).ok_or("the certificate's validity could not be read")?;
        Ok(Issued {
            key,
            not_before,
            not_after,
            chain_pem,
            key_pem,
        })
    }
}

/// Where one app's account and certificate live.
pub(super) struct Cache {
    dir: PathBuf,
    directory: String,
    /// Sorted and deduplicated: the same set in another order is the same certificate.
    domains: Vec<String>,
    account_file: PathBuf,
    cert_file: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct AccountFile {
    directory: String,
    credentials: AccountCredentials,
}

#[derive(Serialize, Deserialize)]
struct CertFile {
    directory: String,
    domains: Vec<String>,
    chain_pem: String,
    key_pem: String,
}

impl Cache {
    pub(super) fn new(config: &AcmeConfig) -> Cache {
        let mut domains = config.domains.clone();
        domains.sort();
        domains.dedup();
        let account = hash(&[config.directory.as_str()]);
        let mut parts = vec![config.directory.as_str()];
        parts.extend(domains.iter().map(String::as_str));
        let cert = hash(&parts);
        Cache {
            dir: config.cache_dir.clone(),
            directory: config.directory.clone(),
            domains,
            account_file: config.cache_dir.join(format!("account-{account}.json")),
            cert_file: config.cache_dir.join(format!("cert-{cert}.json")),
        }
    }

    /// The certificate file's path (for log lines and tests).
    pub(super) fn cert_path(&self) -> &Path {
        &self.cert_file
    }

    /// The cached certificate: `Ok(None)` when there is none, `Err(reason)` when the file is
    /// unusable. An expired certificate is returned; the caller decides.
    pub(super) fn load_certificate(&self) -> Result<Option<Issued>, String> {
        let Some(bytes) = read_private(&self.cert_file)? else {
            return Ok(None);
        };
        let file: CertFile = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{}: not a certificate cache file: {e}", self.cert_file.display()))?;
        if file.directory != self.directory || file.domains != self.domains {
            return Err(format!(
                "{}: issued by {} for {:?}, not by {} for {:?}",
                self.cert_file.display(),
                file.directory,
                file.domains,
                self.directory,
                self.domains
            ));
        }
        Issued::from_pem(file.chain_pem, file.key_pem)
            .map(Some)
            .map_err(|e| format!("{}: {e}", self.cert_file.display()))
    }

    pub(super) fn save_certificate(&self, issued: &Issued) -> Result<(), String> {
        let file = CertFile {
            directory: self.directory.clone(),
            domains: self.domains.clone(),
            chain_pem: issued.chain_pem.clone(),
            key_pem: issued.key_pem.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| e.to_string())?;
        write_private(&self.dir, &self.cert_file, &bytes)
            .map_err(|e| format!("could not write {}: {e}", self.cert_file.display()))
    }

    /// The cached account for this directory: `Ok(None)` when there is none.
    pub(super) fn load_account(&self) -> Result<Option<AccountCredentials>, String> {
        let Some(bytes) = read_private(&self.account_file)? else {
            return Ok(None);
        };
        let file: AccountFile = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{}: not an account cache file: {e}", self.account_file.display()))?;
        if file.directory != self.directory {
            return Err(format!(
                "{}: an account at {}, not at {}",
                self.account_file.display(),
                file.directory,
                self.directory
            ));
        }
        Ok(Some(file.credentials))
    }

    pub(super) fn save_account(&self, credentials: AccountCredentials) -> Result<(), String> {
        let file = AccountFile {
            directory: self.directory.clone(),
            credentials,
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| e.to_string())?;
        write_private(&self.dir, &self.account_file, &bytes)
            .map_err(|e| format!("could not write {}: {e}", self.account_file.display()))
    }

    /// Drops the cached account (the directory no longer knows it, or the file is bad).
    pub(super) fn forget_account(&self) -> Result<(), String> {
        match fs::remove_file(&self.account_file) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("could not remove {}: {e}", self.account_file.display())),
        }
    }
}

/// Sixteen hex digits of SHA-256 over the parts, each ended by a newline (no part holds one:
/// URLs and DNS names cannot).
fn hash(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update(b"\n");
    }
    hasher.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a cache file: `Ok(None)` if absent; an error for anything but a regular file of at
/// most [`MAX_FILE`] bytes in a private directory. The file is opened without following a
/// symlink and checked through the open descriptor, so nothing can be swapped in between the
/// check and the read.
fn read_private(path: &Path) -> Result<Option<Vec<u8>>, String> {
    use std::io::Read;
    let shown = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    if let Some(dir) = path.parent() {
        match private_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", dir.display())),
        }
    }
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            return Err(format!("{}: a symlink, not a regular file", path.display()))
        }
        Err(e) => return Err(shown(&e)),
    };
    let meta = file.metadata().map_err(|e| shown(&e))?;
    if !meta.file_type().is_file() {
        return Err(format!("{}: not a regular file", path.display()));
    }
    if meta.len() > MAX_FILE {
        return Err(format!(
            "{}: {} bytes, too large for a cache file",
            path.display(),
            meta.len()
        ));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(MAX_FILE + 1).read_to_end(&mut bytes).map_err(|e| shown(&e))?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(format!("{}: too large for a cache file", path.display()));
    }
    Ok(Some(bytes))
}

/// Checks that `dir` is a directory (not a symlink) owned by this user that no one else may
/// write to (as sshd's StrictModes): whoever could rename files in it could have corral serve
/// their key. Reading is guarded by the files' own mode (0600).
fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(dir)?;
    if !meta.file_type().is_dir() {
        return Err(io::Error::other("not a directory (a symlink is not followed)"));
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(io::Error::other(format!(
            "owned by uid {}, not by corral's user: the cache holds private keys",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(io::Error::other(format!(
            "mode {:o}: others may replace the keys it holds; chmod 700 it",
            meta.mode() & 0o777
        )));
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically, mode 0600, creating `dir` (0700) if needed.
fn write_private(dir: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    private_dir(dir).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::other("cache file without a name"))?;
    // A name no other writer uses: this process's id, the time, and a count (create_new below
    // fails rather than open anything already there).
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let count = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temp = dir.join(format!(".{name}.{}.{nanos}.{count}.tmp", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        // The mode above is filtered by the umask; make it exactly 0600.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        // Best effort: the temporary file is garbage now; the error that matters is returned.
        if let Err(e) = fs::remove_file(&temp) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::debug!(file = %temp.display(), error = %e, "could not remove a temporary cache file");
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, domains: &[&str]) -> AcmeConfig {
        AcmeConfig {
            domains: domains.iter().map(|d| d.to_string()).collect(),
            email: None,
            directory: "https://acme.test/dir".to_owned(),
            cache_dir: dir.join("acme"),
            ca_root: None,
        }
    }

    fn self_signed(domains: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params =
            rcgen::CertificateParams::new(domains.iter().map(|d| d.to_string()).collect::<Vec<_>>()).expect("params");
        let cert = params.self_signed(&key).expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    /// Creates `dir`, mode 0700, as corral would.
    fn private(dir: &Path) {
        DirBuilder::new().recursive(true).mode(0o700).create(dir).expect("dir");
    }

    #[test]
    fn a_cache_directory_others_may_enter_or_a_symlinked_file_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("acme");
        fs::create_dir(&dir).expect("dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o775)).expect("chmod");
        let why = write_private(&dir, &dir.join("x.json"), b"key").expect_err("refused");
        assert!(why.to_string().contains("chmod 700"), "{why}");
        let why = read_private(&dir.join("x.json")).expect_err("refused");
        assert!(why.contains("chmod 700"), "{why}");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
        fs::write(tmp.path().join("elsewhere"), b"not a cache file").expect("write");
        std::os::unix::fs::symlink(tmp.path().join("elsewhere"), dir.join("x.json")).expect("symlink");
        let why = read_private(&dir.join("x.json")).expect_err("refused");
        assert!(why.contains("symlink"), "{why}");
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn a_saved_certificate_loads_back_and_its_files_are_private() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new(&config(tmp.path(), &["b.test", "a.test"]));
        assert!(cache.load_certificate().expect("no error").is_none());
        let (chain, key) = self_signed(&["a.test", "b.test"]);
        let issued = Issued::from_pem(chain.clone(), key).expect("issued");
        cache.save_certificate(&issued).expect("saved");

        assert_eq!(mode(&tmp.path().join("acme")), 0o700);
        assert_eq!(mode(cache.cert_path()), 0o600);
        let loaded = cache.load_certificate().expect("loads").expect("present");
        assert_eq!(loaded.chain_pem, chain);
        assert_eq!(loaded.not_after, issued.not_after);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(tmp.path().join("acme"))
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");

        // The same domains in another order are the same certificate.
        let reordered = Cache::new(&config(tmp.path(), &["a.test", "b.test", "a.test"]));
        assert_eq!(reordered.cert_path(), cache.cert_path());
    }

    #[test]
    fn another_directory_or_domain_set_does_not_reuse_the_certificate() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new(&config(tmp.path(), &["a.test"]));
        let (chain, key) = self_signed(&["a.test"]);
        cache
            .save_certificate(&Issued::from_pem(chain, key).expect("issued"))
            .expect("saved");

        let more = Cache::new(&config(tmp.path(), &["a.test", "b.test"]));
        assert_ne!(more.cert_path(), cache.cert_path());
        assert!(more.load_certificate().expect("no error").is_none());

        let mut other = config(tmp.path(), &["a.test"]);
        other.directory = "https://other.test/dir".to_owned();
        let other = Cache::new(&other);
        assert!(other.load_certificate().expect("no error").is_none());

        // A file copied under another key's name is refused by its content.
        fs::copy(cache.cert_path(), more.cert_path()).expect("copy");
        let err = more.load_certificate().err().expect("refused");
        assert!(err.contains("not by"), "{err}");
    }

    #[test]
    fn hostile_cache_files_are_reasons_not_panics() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new(&config(tmp.path(), &["a.test"]));
        private(&tmp.path().join("acme"));
        let (chain, key) = self_signed(&["a.test"]);
        let (_, other_key) = self_signed(&["a.test"]);
        let good = |chain: &str, key: &str| {
            serde_json::json!({
                "directory": "https://acme.test/dir",
                "domains": ["a.test"],
                "chain_pem": chain,
                "key_pem": key,
            })
            .to_string()
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("garbage", b"\x00\xff{{not json".to_vec()),
            ("wrong shape", br#"{"directory": 1}"#.to_vec()),
            (
                "bad pem",
                good("-----BEGIN CERTIFICATE-----\nAAAA\n", &key).into_bytes(),
            ),
            ("no cert", good("", &key).into_bytes()),
            ("mismatched key", good(&chain, &other_key).into_bytes()),
            ("huge", vec![b' '; (MAX_FILE + 1) as usize]),
        ];
        for (what, bytes) in cases {
            fs::write(cache.cert_path(), &bytes).expect("write");
            let result = cache.load_certificate();
            assert!(result.is_err(), "{what}: accepted");
        }

        // A symlink is not followed, even to a good file.
        let target = tmp.path().join("elsewhere.json");
        fs::write(&target, good(&chain, &key)).expect("write");
        fs::remove_file(cache.cert_path()).expect("remove");
        std::os::unix::fs::symlink(&target, cache.cert_path()).expect("symlink");
        let err = cache.load_certificate().err().expect("refused");
        assert!(err.contains("not a regular file"), "{err}");

        // Saving replaces the symlink itself, not its target.
        cache
            .save_certificate(&Issued::from_pem(chain, key).expect("issued"))
            .expect("saved");
        assert!(fs::symlink_metadata(cache.cert_path())
            .expect("meta")
            .file_type()
            .is_file());
        assert!(cache.load_certificate().expect("loads").is_some());
    }

    #[test]
    fn a_bad_account_file_is_a_reason_and_can_be_forgotten() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new(&config(tmp.path(), &["a.test"]));
        assert!(cache.load_account().expect("no error").is_none());
        private(&tmp.path().join("acme"));
        fs::write(&cache.account_file, b"{\"directory\": \"https://acme.test/dir\"}").expect("write");
        assert!(cache.load_account().is_err());
        cache.forget_account().expect("forgotten");
        assert!(cache.load_account().expect("no error").is_none());
        cache.forget_account().expect("forgetting twice is fine");
    }

    #[test]
    fn a_stale_temporary_file_does_not_block_a_write() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("acme");
        let path = dir.join("x.json");
        private(&dir);
        fs::write(dir.join(format!(".x.json.{}.tmp", std::process::id())), b"old").expect("write");
        write_private(&dir, &path, b"new").expect("written");
        assert_eq!(fs::read(&path).expect("read"), b"new");
        assert_eq!(mode(&path), 0o600);
    }
}
