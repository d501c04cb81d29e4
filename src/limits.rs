//! Resource limits: corral's file-descriptor budget.
//!
//! Every proxied connection holds two descriptors (client and worker), so the default soft
//! `RLIMIT_NOFILE` (1,024 under systemd) is far too small for the edge. [`raise`] runs first
//! thing in `corral run` and lifts the soft limit to the hard one; [`fd_limit`] is what corral
//! may then use. Workers get the original soft limit back ([`for_workers`], applied in the
//! pre-exec hook of `supervisor::spawn`): Node does not need a million descriptors, and some
//! programs misbehave with huge limits (loops that close every possible fd, `select()` users).

use std::sync::OnceLock;

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use tracing::{debug, warn};

/// (soft, hard) `RLIMIT_NOFILE` as corral found it, and the soft limit it runs with.
#[derive(Debug, Clone, Copy)]
struct Limits {
    original: (u64, u64),
    raised: u64,
}

static LIMITS: OnceLock<Limits> = OnceLock::new();

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (once; later calls do nothing). Returns
/// the soft limit now in force.
pub fn raise() -> u64 {
    LIMITS
        .get_or_init(|| {
            let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
                Ok(limits) => limits,
                Err(e) => {
                    warn!(error = %e, "cannot read RLIMIT_NOFILE");
                    return Limits {
                        original: (1024, 1024),
                        raised: 1024,
                    };
                }
            };
            let raised = if soft < hard {
                match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                    Ok(()) => hard,
                    Err(e) => {
                        warn!(error = %e, soft, hard, "cannot raise RLIMIT_NOFILE; keeping the soft limit");
                        soft
                    }
                }
            } else {
                soft
            };
            debug!(soft = raised, hard, was = soft, "file descriptor limit");
            Limits {
                original: (soft, hard),
                raised,
            }
        })
        .raised
}

/// The soft `RLIMIT_NOFILE` corral runs with: the raised one after [`raise`], else the current
/// soft limit.
pub fn fd_limit() -> u64 {
    match LIMITS.get() {
        Some(limits) => limits.raised,
        None => getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft),
    }
}

/// The (soft, hard) `RLIMIT_NOFILE` to restore in a worker before exec, if [`raise`] changed it.
pub fn for_workers() -> Option<(u64, u64)> {
    LIMITS.get().filter(|l| l.raised != l.original.0).map(|l| l.original)
}

/// True for the errors that say corral itself ran out of something (file descriptors, memory
/// for socket buffers, local ports): no peer is to blame, and the right answer is to back off
/// or answer 503, never to mark a worker down.
pub fn is_exhausted(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    e.raw_os_error().is_some_and(|code| {
        [
            Errno::EMFILE,
            Errno::ENFILE,
            Errno::ENOBUFS,
            Errno::ENOMEM,
            Errno::EADDRNOTAVAIL,
        ]
        .iter()
        .any(|errno| *errno as i32 == code)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_reaches_the_hard_limit_and_remembers_the_original() -> nix::Result<()> {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
        assert_eq!(raise(), hard);
        assert_eq!(fd_limit(), hard);
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE)?.0, hard);
        if let Some((soft, h)) = for_workers() {
            assert!(soft < hard && h == hard);
        }
        Ok(())
    }
}
