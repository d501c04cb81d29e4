//! Admission, as nginx's `worker_connections` and `limit_conn`: who may open a connection.
//!
//! Each shard holds at most its share of the address's `max_connections` (a semaphore only
//! that shard's thread takes, so no state is shared across CPUs per connection); at the limit
//! it stops accepting and new clients wait in the kernel's backlog instead of starving the
//! connections already open. A TLS handshake holds a slot like any connection.
//! `max_connections_per_ip` is counted across the shards in one small table ([`PerIp`]),
//! taken once when a connection opens and once when it closes, and only when the key is set.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::WARN_EVERY;

/// Open connections per client address, across an app's shards (`max_connections_per_ip`).
#[derive(Debug)]
pub struct PerIp {
    limit: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerIp {
    /// A table that admits at most `limit` connections per address.
    pub fn new(limit: usize) -> PerIp {
        PerIp {
            limit,
            open: Mutex::default(),
        }
    }

    /// Counts a connection from `ip`, or `None` when that address is at its limit.
    pub(super) fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(ip).or_default();
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(IpSlot {
            table: Arc::clone(self),
            ip,
        })
    }
}

/// One admitted connection of an address; uncounted when dropped.
#[derive(Debug)]
pub(super) struct IpSlot {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// An app's connection limits, as one shard applies them.
#[derive(Debug, Clone)]
pub struct Admission {
    /// Connections this shard may hold open.
    pub per_shard: usize,
    /// The app's per-address table, when `max_connections_per_ip` is set.
    pub per_ip: Option<Arc<PerIp>>,
}

/// Logs a warning at most once per [`WARN_EVERY`].
#[derive(Debug, Default)]
pub(super) struct Throttle(Option<Instant>);

impl Throttle {
    pub(super) fn ready(&mut self) -> bool {
        let now = Instant::now();
        if self.0.is_some_and(|last| now.duration_since(last) < WARN_EVERY) {
            return false;
        }
        self.0 = Some(now);
        true
    }
}
