//! Session affinity: which slot a request is pinned to, and the cookie that says so.
//!
//! `sticky = "cookie"`: the cookie names a worker *slot* (not an address), so it survives
//! restarts and rolling reloads (the slot's new worker takes over its clients). Its value is
//! `<slot>.<mac>`, where `mac` is an HMAC-SHA256 of the app name and slot under a key made at
//! start: a client cannot pick a worker by writing its own cookie, and a cookie from another
//! corral process (or app) is simply not valid. A missing, forged or garbled cookie, or one
//! naming a slot that is not serving, never causes an error: the request is balanced normally
//! and a fresh cookie is set.
//!
//! `sticky = "ip"`: the client address picks the slot (a hash, modulo the configured worker
//! count). The address is the TCP peer's, or, when the peer is one of `trusted_proxies`, the
//! last address in `X-Forwarded-For` that is not itself a trusted proxy.

use std::hash::{BuildHasher, Hasher};
use std::io::Read;
use std::net::IpAddr;

use hmac::{Hmac, Mac};
use http::header::{self, HeaderMap, HeaderValue};
use sha2::Sha256;

use crate::config::Network;

/// Hex digits of the MAC kept in the cookie (64 bits of it).
const MAC_HEX: usize = 16;

/// The key every app's cookies are signed under (the app name is part of the MAC): made at
/// start, or handed over by the corral this one took over from, so cookies stay valid across
/// an upgrade.
static PROCESS_KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();

/// The process's cookie key (made on first use).
pub fn process_key() -> [u8; 32] {
    *PROCESS_KEY.get_or_init(random_key)
}

/// Takes over the cookie key of the previous corral; false if a key was already in use.
pub fn adopt_process_key(key: [u8; 32]) -> bool {
    PROCESS_KEY.set(key).is_ok()
}

/// Signs and checks affinity cookies for one app.
#[derive(Debug)]
pub struct CookieSigner {
    key: [u8; 32],
    app: String,
}

impl CookieSigner {
    /// A signer under the process's key ([`process_key`]).
    pub fn new(app: &str) -> CookieSigner {
        CookieSigner::with_key(app, process_key())
    }

    /// A signer under `key`.
    pub fn with_key(app: &str, key: [u8; 32]) -> CookieSigner {
        CookieSigner {
            key,
            app: app.to_owned(),
        }
    }

    fn mac(&self, slot: usize) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("UNWRAP: HMAC takes keys of any length");
        mac.update(self.app.as_bytes());
        mac.update(b":");
        mac.update(slot.to_string().as_bytes());
        let digest = mac.finalize().into_bytes();
        digest.iter().take(MAC_HEX / 2).map(|b| format!("{b:02x}")).collect()
    }

    /// The cookie value that pins a client to `slot`.
    pub fn value(&self, slot: usize) -> String {
        format!("{slot}.{}", self.mac(slot))
    }

    /// The slot a valid cookie value names.
    pub fn verify(&self, value: &str) -> Option<usize> {
        let (slot, mac) = value.split_once('.')?;
        let slot: usize = slot.parse().ok().filter(|&s| s < 4096)?;
        constant_time_eq(mac.as_bytes(), self.mac(slot).as_bytes()).then_some(slot)
    }

    /// The slot named by a valid `name` cookie among the request's `Cookie` headers.
    pub fn slot_from(&self, headers: &HeaderMap, name: &str) -> Option<usize> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .filter(|(k, _)| *k == name)
            .find_map(|(_, v)| self.verify(v.trim()))
    }

    /// A `Set-Cookie` value pinning the client to `slot`.
    pub fn set_cookie(&self, name: &str, slot: usize, secure: bool) -> HeaderValue {
        let secure = if secure { "; Secure" } else { "" };
        let text = format!("{name}={}; Path=/; HttpOnly; SameSite=Lax{secure}", self.value(slot));
        HeaderValue::try_from(text).expect("UNWRAP: cookie names are validated, values are digits and hex")
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 32 random bytes from the OS; falls back to the std hasher's random seed if /dev/urandom
/// cannot be read.
fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut key));
    if read.is_err() {
        for chunk in key.chunks_mut(8) {
            let seed = std::collections::hash_map::RandomState::new().build_hasher().finish();
            chunk.copy_from_slice(&seed.to_le_bytes());
        }
    }
    key
}

/// The client address for `sticky = "ip"`.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[Network]) -> IpAddr {
    let peer = peer.to_canonical();
    if !trusted.iter().any(|n| n.contains(peer)) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse::<IpAddr>().ok())
        .collect();
    forwarded
        .into_iter()
        .rev()
        .map(|ip| ip.to_canonical())
        .find(|ip| !trusted.iter().any(|n| n.contains(*ip)))
        .unwrap_or(peer)
}

/// The slot a client address maps to, out of `instances`.
pub fn ip_slot(ip: IpAddr, instances: usize) -> usize {
    // FNV-1a: stable for the life of the process and across processes, unlike RandomState.
    let bytes: Vec<u8> = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % instances.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_round_trip_and_forgeries_fail() {
        let signer = CookieSigner::new("web");
        let value = signer.value(3);
        assert_eq!(signer.verify(&value), Some(3));
        // Another slot with this MAC, another key, garbage: all invalid.
        let mac = value.split_once('.').map(|(_, m)| m).unwrap_or_default();
        assert_eq!(signer.verify(&format!("2.{mac}")), None);
        assert_eq!(CookieSigner::with_key("web", random_key()).verify(&value), None);
        // The same key signs for one app only.
        assert_eq!(CookieSigner::new("api").verify(&value), None);
        for garbage in ["", "3", "3.", ".abc", "x.y", "99999999999999999999.00", "3.zz"] {
            assert_eq!(signer.verify(garbage), None, "{garbage:?}");
        }
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1; corral_sticky=bogus"));
        headers.append(
            header::COOKIE,
            HeaderValue::try_from(format!("theme=dark; corral_sticky={value}")).expect("value"),
        );
        assert_eq!(signer.slot_from(&headers, "corral_sticky"), Some(3));
        let set = signer.set_cookie("corral_sticky", 1, false);
        let set = set.to_str().expect("ascii");
        assert!(
            set.starts_with("corral_sticky=1.") && set.ends_with("; Path=/; HttpOnly; SameSite=Lax"),
            "{set}"
        );
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_peers() {
        let trusted: Vec<Network> = ["127.0.0.1", "10.0.0.0/8"]
            .iter()
            .map(|t| t.parse().expect("net"))
            .collect();
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9, 10.1.2.3"));
        let ip = |peer: &str| client_ip(peer.parse().expect("ip"), &headers, &trusted).to_string();
        assert_eq!(ip("127.0.0.1"), "203.0.113.9");
        assert_eq!(ip("::ffff:127.0.0.1"), "203.0.113.9");
        assert_eq!(ip("198.51.100.1"), "198.51.100.1");
        assert_eq!(
            client_ip("127.0.0.1".parse().expect("ip"), &HeaderMap::new(), &trusted).to_string(),
            "127.0.0.1"
        );
    }

    #[test]
    fn ip_slots_are_stable_and_in_range() {
        let ip: IpAddr = "192.0.2.44".parse().expect("ip");
        assert_eq!(ip_slot(ip, 4), ip_slot(ip, 4));
        let slots: std::collections::BTreeSet<usize> =
            (0..=255u8).map(|i| ip_slot(IpAddr::from([192, 0, 2, i]), 4)).collect();
        assert_eq!(slots.len(), 4, "addresses spread over every slot");
        assert!(slots.iter().all(|&s| s < 4));
    }
}
