//! systemd's notify protocol, so a unit can use `Type=notify`: `READY=1` once the workers are
//! serving, `RELOADING=1` / `READY=1` around a reload, `STOPPING=1` when a stop begins. Messages
//! go to the datagram socket named by `NOTIFY_SOCKET` (a path, or `@name` in the abstract
//! namespace); without that variable nothing is sent.

use std::os::unix::net::UnixDatagram;

use tracing::debug;

/// Sends one notification (newline-separated `KEY=value` assignments).
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let send = || -> std::io::Result<()> {
        let datagram = UnixDatagram::unbound()?;
        let bytes = socket.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            datagram.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            datagram.send_to(state.as_bytes(), &socket)?;
        }
        Ok(())
    };
    if let Err(e) = send() {
        debug!(error = %e, "cannot notify the service manager");
    }
}

/// `READY=1` with our pid.
pub fn ready() {
    notify(&format!("READY=1\nMAINPID={}\nSTATUS=serving", std::process::id()));
}

/// `RELOADING=1` (with the monotonic time systemd asks for).
pub fn reloading() {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000);
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={now}\nSTATUS=reloading"));
}

/// `STOPPING=1`.
pub fn stopping() {
    notify("STOPPING=1\nSTATUS=stopping");
}
