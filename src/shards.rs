//! The proxy's threads: one single-threaded tokio runtime per usable CPU, called a shard.
//!
//! Each shard accepts from its own `SO_REUSEPORT` socket (so the kernel spreads new connections
//! over the shards), serves every connection it accepted to the end, and keeps its own idle
//! connections to the workers ([`crate::proxy::pool`]). All the work of one request (the client
//! connection, the worker connection, the upstream timer) therefore happens on one thread: no
//! task is stolen or woken across threads, and the pool lock and the timer wheel are never
//! contended. The supervisor, the control socket and signals run on the main thread's own
//! runtime; they talk to the shards only through the pool snapshots, counters and tokens they
//! already share.
//!
//! Why not tokio's multi-thread runtime: on the benchmark of `benches/compare.py` (2 CPUs,
//! 64 connections), the same proxy on one current-thread runtime spent 5.1 µs user + 7.4 µs
//! system CPU per request, against 6.2 + 7.9 µs on a two-thread work-stealing runtime (task
//! hand-offs between threads, futex wake-ups, a shared timer). Shards keep the cheaper path and
//! still use every core.
//!
//! Why not fewer shards than CPUs, so that the workers keep more of them: on the same benchmark
//! (2026-11-30, AMD EPYC, 2 CPUs) one shard gave 13.0-14.5k req/s against 16.0-17.4k for two,
//! at the same CPU per request (43-46 µs), in three alternating runs of each.

use std::cell::Cell;
use std::sync::OnceLock;
use std::thread::JoinHandle;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// Shards in this process, fixed by the first [`Shards::start`].
static COUNT: OnceLock<usize> = OnceLock::new();

/// How many shards the process runs (1 before any started, as in unit tests).
pub fn count() -> usize {
    COUNT.get().copied().unwrap_or(1)
}

/// The shard the calling thread belongs to (0 outside the shards).
pub fn current() -> usize {
    CURRENT.with(Cell::get)
}

/// The running shard threads; stopped (and joined) on drop.
#[derive(Debug)]
pub struct Shards {
    shards: Vec<Shard>,
}

#[derive(Debug)]
struct Shard {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Shards {
    /// Starts `n` shard threads (at least one), each idle until given tasks.
    pub fn start(n: usize) -> std::io::Result<Shards> {
        let n = *COUNT.get_or_init(|| n.max(1));
        let mut shards = Shards { shards: Vec::new() };
        for index in 0..n {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("corral-proxy-{index}"))
                .spawn(move || {
                    CURRENT.with(|c| c.set(index));
                    // Tasks given to this shard run while it waits here; dropping the runtime
                    // afterwards cancels whatever is left (idle worker connections).
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                })?;
            shards.shards.push(Shard {
                handle,
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(shards)
    }

    /// The runtime handles, one per shard, in shard order.
    pub fn handles(&self) -> impl Iterator<Item = &Handle> {
        self.shards.iter().map(|s| &s.handle)
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// True when there is no shard (never, once started).
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        for shard in &mut self.shards {
            if let Some(stop) = shard.stop.take() {
                let _ = stop.send(());
            }
        }
        for shard in &mut self.shards {
            if let Some(thread) = shard.thread.take() {
                // A shard that panicked has already logged it through the task's JoinError.
                let _ = thread.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_their_shard_and_the_threads_stop_on_drop() {
        let shards = Shards::start(2).expect("threads start");
        let n = shards.len();
        assert_eq!(n, count());
        let runtime = Builder::new_current_thread().build().expect("runtime");
        let seen: Vec<usize> = runtime.block_on(async {
            let mut seen = Vec::new();
            for handle in shards.handles() {
                seen.push(handle.spawn(async { current() }).await.expect("task ran"));
            }
            seen
        });
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
        drop(shards);
    }
}
