//! WebSocket and other `Upgrade` tunnels.
//!
//! The handshake is an ordinary request, balanced (and made sticky) like any other, with its
//! `Connection: upgrade` and `Upgrade` headers kept. If the worker answers `101 Switching
//! Protocols`, the client's hyper connection is upgraded, the worker's socket is taken off its
//! exchange, and [`splice`] copies bytes both ways until either side closes. The tunnel holds the request's in-flight guard, so it counts as in flight
//! (and shows in `corral status`), and a draining worker keeps its tunnels until
//! `drain_timeout`, when its `cut` token closes them. On stop, tunnels are waited for until the
//! drain deadline and closed then.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::balancer::InFlight;

/// The protocol a request asks to upgrade to, if it asks (`Connection: upgrade` + `Upgrade`).
pub fn requested(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(header::UPGRADE).cloned()).flatten()
}

/// Puts the upgrade headers back after hop-by-hop stripping.
pub fn restore(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// Copies bytes between the client and the worker once the client's side has upgraded;
/// `early` is what the worker sent right after its `101`. Ends when either side closes, or when
/// `cut` (worker drain deadline) or `closing` (corral stopping) fires.
pub async fn splice(
    client: OnUpgrade,
    mut worker: TcpStream,
    early: Bytes,
    guard: InFlight,
    closing: CancellationToken,
) {
    let client = match client.await {
        Ok(client) => client,
        Err(e) => {
            debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let cut = guard.upstream().cut.clone();
    let copy = async {
        client.write_all(&early).await?;
        tokio::io::copy_bidirectional(&mut client, &mut worker).await
    };
    tokio::select! {
        copied = copy => match copied {
            Ok((up, down)) => debug!(up, down, "tunnel closed"),
            Err(e) => debug!(error = %e, "tunnel ended with an error"),
        },
        _ = cut.cancelled() => debug!("tunnel closed: its worker's drain time is up"),
        _ = closing.cancelled() => debug!("tunnel closed: corral is stopping"),
    }
    drop(guard);
}
