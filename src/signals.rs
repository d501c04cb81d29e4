//! Unix signals to the front process, mapped to what they mean for corral in one place.
//!
//! | signal            | meaning                                                   |
//! |-------------------|-----------------------------------------------------------|
//! | SIGTERM, SIGINT   | graceful stop; a second one while stopping kills at once  |
//! | SIGHUP            | rolling reload of every app (progress in the log)         |
//! | SIGUSR2           | self-upgrade: the binary at the same path takes over      |

use tokio::signal::unix::{signal, Signal as Stream, SignalKind};

/// What a received signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// SIGTERM or SIGINT.
    Stop(&'static str),
    /// SIGHUP.
    Reload,
    /// SIGUSR2.
    Upgrade,
}

/// The signals corral listens to. Creating it replaces their default actions (which would kill
/// the process), so create it before anything else can deliver them.
#[derive(Debug)]
pub struct Signals {
    term: Stream,
    int: Stream,
    hup: Stream,
    usr2: Stream,
}

impl Signals {
    /// Installs the handlers.
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    /// The next signal received.
    pub async fn next(&mut self) -> Intent {
        tokio::select! {
            _ = self.term.recv() => Intent::Stop("SIGTERM"),
            _ = self.int.recv() => Intent::Stop("SIGINT"),
            _ = self.hup.recv() => Intent::Reload,
            _ = self.usr2.recv() => Intent::Upgrade,
        }
    }
}
