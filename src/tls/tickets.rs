//! Session tickets under keys corral owns.
//!
//! rustls's own ticketer keeps its keys inside and never shows them, which is right for most
//! servers; corral must be able to hand its keys to the process that takes over on a binary
//! upgrade, so that clients resume their sessions across it. So the keys are ours: 32 random
//! bytes each, AES-256-GCM (aws-lc-rs, the provider rustls already uses here) with a random
//! 96-bit nonce per ticket. A ticket is `key id (4) | nonce (12) | ciphertext | tag (16)`.
//!
//! Rotation bounds what a stolen key could decrypt (forward secrecy of resumed sessions): a key
//! encrypts for [`ROTATE_EVERY`], then only decrypts for one more period, then is erased. So a
//! ticket is good for at most two periods, and clients are told one ([`ProducesTickets::lifetime`]).
//! The keys are read per handshake, never per request, through an `ArcSwap`; a task on the
//! main runtime rotates them, so making a ticket takes no lock.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use rustls::server::ProducesTickets;

/// How long one key encrypts new tickets.
pub const ROTATE_EVERY: Duration = Duration::from_secs(6 * 60 * 60);

const ID_LEN: usize = 4;
const TAG_LEN: usize = 16;

/// One ticket key.
struct Key {
    id: [u8; ID_LEN],
    secret: [u8; 32],
    aead: LessSafeKey,
}

impl Key {
    fn new(secret: [u8; 32]) -> Option<Key> {
        let mut id = [0u8; ID_LEN];
        aws_lc_rs::rand::fill(&mut id).ok()?;
        Key::with_id(id, secret)
    }

    fn with_id(id: [u8; ID_LEN], secret: [u8; 32]) -> Option<Key> {
        let aead = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &secret).ok()?);
        Some(Key { id, secret, aead })
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        // Best effort: the secret does not outlive its use in this copy.
        self.secret.fill(0);
    }
}

/// The key that encrypts and the one before it, which still decrypts.
struct Keys {
    current: Key,
    previous: Option<Key>,
}

/// corral's ticketer: shared by every shard's TLS config.
pub struct Tickets {
    keys: ArcSwap<Keys>,
}

impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tickets").finish_non_exhaustive()
    }
}

impl Tickets {
    /// A ticketer with a fresh random key; `None` if the system has no randomness to give.
    pub fn new() -> Option<Arc<Tickets>> {
        Some(Arc::new(Tickets {
            keys: ArcSwap::from_pointee(Keys {
                current: Key::new(random_secret()?)?,
                previous: None,
            }),
        }))
    }

    /// A ticketer with keys handed over by the corral this one took over from (current
    /// first), so that its clients' tickets still resume; `None` if none is usable.
    pub fn with_keys(keys: &[([u8; ID_LEN], [u8; 32])]) -> Option<Arc<Tickets>> {
        let current = keys.first().and_then(|(id, secret)| Key::with_id(*id, *secret))?;
        let previous = keys.get(1).and_then(|(id, secret)| Key::with_id(*id, *secret));
        Some(Arc::new(Tickets {
            keys: ArcSwap::from_pointee(Keys { current, previous }),
        }))
    }

    /// The keys, current first, to hand to a new corral.
    pub fn export(&self) -> Vec<([u8; ID_LEN], [u8; 32])> {
        let keys = self.keys.load();
        std::iter::once(&keys.current)
            .chain(keys.previous.as_ref())
            .map(|k| (k.id, k.secret))
            .collect()
    }

    /// Rotates the keys every [`ROTATE_EVERY`] until `shutdown` (on the main runtime, so no
    /// handshake ever waits for it).
    pub async fn rotate_every_period(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let start = tokio::time::Instant::now() + ROTATE_EVERY;
        let mut every = tokio::time::interval_at(start, ROTATE_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => self.rotate(),
            }
        }
    }

    /// A fresh key encrypts from now on; the current one only decrypts; the previous is gone.
    fn rotate(&self) {
        let Some(fresh) = random_secret().and_then(Key::new) else {
            // No randomness now: keep the current key and try at the next ticket.
            return;
        };
        let old = self.keys.load();
        let previous = Key::with_id(old.current.id, old.current.secret);
        self.keys.store(Arc::new(Keys {
            current: fresh,
            previous,
        }));
    }
}

fn random_secret() -> Option<[u8; 32]> {
    let mut secret = [0u8; 32];
    aws_lc_rs::rand::fill(&mut secret).ok()?;
    Some(secret)
}

impl ProducesTickets for Tickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        ROTATE_EVERY.as_secs() as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let keys = self.keys.load();
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(ID_LEN + NONCE_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(&keys.current.id);
        out.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        keys.current
            .aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&keys.current.id),
                &mut sealed,
            )
            .ok()?;
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < ID_LEN + NONCE_LEN + TAG_LEN {
            return None;
        }
        let (id, rest) = cipher.split_at(ID_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let keys = self.keys.load();
        let key = [Some(&keys.current), keys.previous.as_ref()]
            .into_iter()
            .flatten()
            .find(|k| k.id == id)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buffer = sealed.to_vec();
        let plain = key.aead.open_in_place(nonce, Aad::from(&key.id), &mut buffer).ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_opens_under_its_key_and_the_next_one_but_not_when_touched() {
        let tickets = Tickets::new().expect("randomness");
        let ticket = tickets.encrypt(b"session state").expect("sealed");
        assert_eq!(tickets.decrypt(&ticket).as_deref(), Some(&b"session state"[..]));
        for i in 0..ticket.len() {
            let mut bent = ticket.clone();
            bent[i] ^= 0x01;
            assert_eq!(tickets.decrypt(&bent), None, "byte {i} flipped");
        }
        assert_eq!(tickets.decrypt(&ticket[..ticket.len() - 1]), None);
        assert_eq!(tickets.decrypt(b""), None);

        // One rotation: the old key still opens; two: it is gone.
        tickets.rotate();
        let newer = tickets.encrypt(b"newer").expect("sealed");
        assert_ne!(newer[..ID_LEN], ticket[..ID_LEN]);
        assert_eq!(tickets.decrypt(&ticket).as_deref(), Some(&b"session state"[..]));
        tickets.rotate();
        assert_eq!(tickets.decrypt(&ticket), None);
        assert_eq!(tickets.decrypt(&newer).as_deref(), Some(&b"newer"[..]));
    }
}
