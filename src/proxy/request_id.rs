//! `X-Request-Id`: the client's when it is a plausible id, else one made here.
//!
//! A client's id is kept when it is 1 to 128 characters of `A-Z a-z 0-9 . _ : -` and sent
//! once; anything else (empty, too long, spaces, quotes, two fields) is replaced, so an id that
//! reaches a worker's log or corral's access log is always one plain token.
//!
//! A made id is `PREFIX-SHARD-N`: a random 48-bit prefix drawn once per process (so two runs,
//! or two corral instances behind one balancer, never repeat each other), the shard's index,
//! and a counter of the shard's own (a thread-local: no atomic shared across CPUs), in hex:
//! `3f9ac02e11d4-1-2a`. Unique for the life of the process, and cheap: no clock, no syscall.

use std::cell::Cell;
use std::sync::OnceLock;

use http::header::{HeaderMap, HeaderName, HeaderValue};

/// The header, lower-case.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest id kept from a client.
pub const MAX_LEN: usize = 128;

thread_local! {
    /// Ids made on this thread (a shard) so far.
    static NEXT: Cell<u64> = const { Cell::new(0) };
}

/// The request's id: the client's valid one, else a new one.
pub fn pick(headers: &HeaderMap) -> HeaderValue {
    let mut sent = headers.get_all(&X_REQUEST_ID).iter();
    match (sent.next(), sent.next()) {
        (Some(id), None) if valid(id.as_bytes()) => id.clone(),
        _ => make(),
    }
}

/// True for 1..=128 characters of `[A-Za-z0-9._:-]`.
pub fn valid(id: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&id.len())
        && id
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A new id: `PREFIX-SHARD-N`.
pub fn make() -> HeaderValue {
    let n = NEXT.with(|next| {
        let n = next.get();
        next.set(n.wrapping_add(1));
        n
    });
    let mut id = [0u8; 12 + 1 + 20 + 1 + 16];
    id[..12].copy_from_slice(prefix());
    let mut len = 12;
    id[len] = b'-';
    len += 1;
    len += decimal(crate::shards::current() as u64, &mut id[len..]);
    id[len] = b'-';
    len += 1;
    len += hex(n, &mut id[len..]);
    HeaderValue::from_bytes(&id[..len]).expect("UNWRAP: hex digits and dashes are a valid header value")
}

/// Draws the process's prefix now. The first draw from the system randomness initialises
/// aws-lc's entropy source (about 70 ms of CPU on the benchmark machine), which must not fall
/// on a request: a corral taking over by upgrade, which makes no ticket key, paid it on its
/// first request, and every connection waited that long after the switch.
pub fn init() {
    prefix();
}

/// 12 hex digits, random, drawn once per process.
fn prefix() -> &'static [u8; 12] {
    static PREFIX: OnceLock<[u8; 12]> = OnceLock::new();
    PREFIX.get_or_init(|| {
        let mut random = [0u8; 8];
        if aws_lc_rs::rand::fill(&mut random).is_err() {
            // No system randomness: the pid and the clock still tell two runs apart.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64;
            random = (nanos ^ (u64::from(std::process::id()) << 40)).to_le_bytes();
        }
        let mut out = [b'0'; 12];
        let value = u64::from_le_bytes(random) & 0xffff_ffff_ffff;
        for (i, digit) in out.iter_mut().enumerate() {
            *digit = HEX[((value >> (44 - 4 * i)) & 0xf) as usize];
        }
        out
    })
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Writes `n` in hex (no leading zeros) at the start of `out`; its length.
fn hex(mut n: u64, out: &mut [u8]) -> usize {
    let mut digits = [0u8; 16];
    let mut len = 0;
    loop {
        digits[len] = HEX[(n & 0xf) as usize];
        len += 1;
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    for (i, d) in digits[..len].iter().rev().enumerate() {
        out[i] = *d;
    }
    len
}

/// Writes `n` in decimal at the start of `out`; its length.
fn decimal(mut n: u64, out: &mut [u8]) -> usize {
    let mut digits = [0u8; 20];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for (i, d) in digits[..len].iter().rev().enumerate() {
        out[i] = *d;
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(&X_REQUEST_ID, HeaderValue::from_bytes(v).expect("value"));
        }
        map
    }

    #[test]
    fn a_plausible_client_id_is_kept_and_anything_else_replaced() {
        for kept in [&b"abc-123"[..], b"a", b"Req.1_2:3-4", &[b'x'; 128]] {
            assert_eq!(pick(&headers(&[kept])).as_bytes(), kept);
        }
        let bad: [&[u8]; 7] = [
            b"",
            &[b'x'; 129],
            b"with space",
            b"quote\"d",
            b"back\\slash",
            b"caf\xc3\xa9",
            b"semi;colon",
        ];
        for bad in bad {
            let id = pick(&headers(&[bad]));
            assert_ne!(id.as_bytes(), bad);
            assert!(valid(id.as_bytes()), "{id:?}");
        }
        // Two ids: which one is meant is unclear, so neither.
        let two = pick(&headers(&[b"a", b"b"]));
        assert!(two != "a" && two != "b", "{two:?}");
        assert!(valid(pick(&HeaderMap::new()).as_bytes()));
    }

    #[test]
    fn made_ids_are_unique_and_name_the_shard() {
        let ids: std::collections::HashSet<Vec<u8>> = (0..10_000).map(|_| make().as_bytes().to_vec()).collect();
        assert_eq!(ids.len(), 10_000);
        let id = String::from_utf8(make().as_bytes().to_vec()).expect("ascii");
        let parts: Vec<&str> = id.split('-').collect();
        assert_eq!(parts.len(), 3, "{id}");
        assert_eq!(parts[0].len(), 12, "{id}");
        assert_eq!(parts[0].as_bytes(), prefix());
        assert_eq!(parts[1], "0", "tests run outside the shards: shard 0");
        assert!(u64::from_str_radix(parts[2], 16).is_ok(), "{id}");
        let mut buf = [0u8; 20];
        let n = decimal(1234567890, &mut buf);
        assert_eq!(&buf[..n], b"1234567890");
        let n = hex(0xdead_beef, &mut buf);
        assert_eq!(&buf[..n], b"deadbeef");
        let n = hex(0, &mut buf);
        assert_eq!(&buf[..n], b"0");
    }
}
