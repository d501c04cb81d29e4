//! The accept loops of a run: for every public address, one per socket (a shard each; a shard
//! may take two when a previous corral handed over more sockets than this one has shards),
//! each with the shard's own [`Front`] and TLS config; and the `http_redirect` listeners.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::balancer::Balancer;
use crate::config::Config;
use crate::listener::redirect::Redirect;
use crate::listener::{self, Admission, Front, PerIp, PublicSocket};
use crate::logs::access::AccessLogs;
use crate::metrics::Registry;
use crate::proxy::Proxy;
use crate::sites::Names;
use crate::tls::{CertStore, Challenges, SniResolver, Tickets};

/// What the accept loops are made of.
pub(super) struct Serving<'a> {
    pub config: &'a Config,
    /// Each public address with the indices of its apps.
    pub addresses: &'a [(SocketAddr, Vec<usize>)],
    /// Each `http_redirect` address with the indices of its apps.
    pub redirects: &'a [(SocketAddr, Vec<usize>)],
    pub balancers: &'a [Option<Arc<Balancer>>],
    pub certs: &'a [Option<Arc<CertStore>>],
    pub access_logs: Option<&'a AccessLogs>,
    pub metrics: &'a Arc<Registry>,
    pub challenges: &'a Arc<Challenges>,
    pub tickets: &'a Arc<Tickets>,
    /// The shards' runtimes.
    pub runtimes: &'a [Handle],
    pub shutdown: &'a CancellationToken,
    /// Taking over from a running corral: accept only once this is cancelled.
    pub hold: Option<&'a CancellationToken>,
}

impl Serving<'_> {
    /// Spawns every accept loop into `accept_loops`: `sockets` in the order of `addresses`,
    /// `redirect_sockets` in that of `redirects`.
    pub fn spawn(
        &self,
        sockets: Vec<PublicSocket>,
        redirect_sockets: Vec<PublicSocket>,
        accept_loops: &mut JoinSet<()>,
    ) {
        let fd_limit = crate::limits::fd_limit();
        let proxies: Vec<Option<Arc<Proxy>>> = self
            .config
            .apps
            .iter()
            .zip(self.balancers)
            .enumerate()
            .map(|(index, (app, balancer))| {
                balancer.as_ref().map(|b| {
                    let proxy = Proxy::new(app.name.clone(), Arc::clone(b), &app.http)
                        .with_hsts(app.hsts)
                        .with_request_id(app.request_id)
                        .with_access_log(self.access_logs.and_then(|logs| logs.log(index)));
                    Arc::new(proxy)
                })
            })
            .collect();
        for ((addr, apps), socket) in self.addresses.iter().zip(sockets) {
            let first = &self.config.apps[apps[0]];
            let names =
                Arc::new(Names::new(apps.iter().map(|&i| {
                    (&self.config.apps[i].hosts[..], self.config.apps[i].default_host)
                })));
            let sites: Vec<Arc<Proxy>> = apps.iter().filter_map(|&i| proxies[i].clone()).collect();
            let resolver = first.tls.is_some().then(|| {
                let stores = apps.iter().filter_map(|&i| self.certs[i].clone()).collect();
                Arc::new(SniResolver::new(
                    Arc::clone(&names),
                    stores,
                    Arc::clone(self.challenges),
                ))
            });
            let acme = apps
                .iter()
                .any(|&i| matches!(self.config.apps[i].tls, Some(crate::config::Tls::Acme(_))));
            let (limits, drain, boot) = (first.http, first.drain_timeout, first.listen_timeout);
            // http_redirect listeners take their share of the fds too.
            let max_connections = limits.connection_limit(fd_limit, self.addresses.len() + self.redirects.len());
            debug!(%addr, max_connections, fd_limit, "connection limit");
            let admission = Admission {
                per_shard: max_connections.div_ceil(self.runtimes.len().max(1)),
                per_ip: limits.max_connections_per_ip.map(|n| Arc::new(PerIp::new(n))),
            };
            let label: Vec<&str> = apps.iter().map(|&i| self.config.apps[i].name.as_str()).collect();
            let label = label.join(", ");
            // Handed-over sockets beyond the shard count are served too (a shard may take two).
            for (index, listener) in socket.sockets.into_iter().enumerate() {
                let (shard, runtime) = (index % self.runtimes.len(), &self.runtimes[index % self.runtimes.len()]);
                let (stop, hold) = (self.shutdown.child_token(), self.hold.cloned());
                let name = label.clone();
                // Each shard has its own front (and TLS config, with its own session cache), so
                // the clones a request makes stay on its CPU.
                let front = Arc::new(Front {
                    addr: *addr,
                    names: Arc::clone(&names),
                    sites: sites.clone(),
                    meters: apps
                        .iter()
                        .map(|&i| {
                            self.metrics
                                .shard(i, shard)
                                .expect("UNWRAP: an app on an address listens")
                        })
                        .collect(),
                    tls_meter: self.metrics.listen(*addr, shard),
                    budget: Arc::new(tokio::sync::Semaphore::new(admission.per_shard)),
                });
                let tls = resolver
                    .as_ref()
                    .map(|r| crate::tls::server_config(Arc::clone(r), Arc::clone(self.tickets), acme));
                let admission = admission.clone();
                let addr = *addr;
                let accept_loop = async move {
                    match hold {
                        Some(released) => {
                            if !released_before_stop(&released, &stop).await {
                                return;
                            }
                        }
                        None => tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = async {
                                for proxy in &front.sites {
                                    proxy.balancer().wait_ready().await;
                                }
                            } => {}
                            _ = tokio::time::sleep(boot) => if shard == 0 {
                                warn!(app = %name, "no worker ready within listen_timeout; accepting anyway (clients get 503 until one is)");
                            },
                        },
                    }
                    if index == 0 {
                        info!(app = %name, %addr, tls = tls.is_some(), "accepting connections");
                    }
                    if let Err(e) = listener::serve(listener, front, tls, limits, admission, stop, drain).await {
                        error!(app = %name, %shard, error = %e, "accept loop failed");
                    }
                };
                accept_loops.spawn_on(accept_loop, runtime);
            }
        }
        for ((addr, apps), socket) in self.redirects.iter().zip(redirect_sockets) {
            let first = &self.config.apps[apps[0]];
            let redirect = Arc::new(Redirect {
                addr: *addr,
                names: Names::new(
                    apps.iter()
                        .map(|&i| (&self.config.apps[i].hosts[..], self.config.apps[i].default_host)),
                ),
                ports: apps
                    .iter()
                    .map(|&i| self.config.apps[i].listen.map_or(443, |l| l.port()))
                    .collect(),
                challenges: Arc::clone(self.challenges),
            });
            let (limits, drain) = (first.http, first.drain_timeout);
            let per_shard = limits
                .connection_limit(fd_limit, self.addresses.len() + self.redirects.len())
                .div_ceil(self.runtimes.len().max(1));
            for (index, listener) in socket.sockets.into_iter().enumerate() {
                let runtime = &self.runtimes[index % self.runtimes.len()];
                let (redirect, stop) = (Arc::clone(&redirect), self.shutdown.child_token());
                let hold = self.hold.cloned();
                accept_loops.spawn_on(
                    async move {
                        if let Some(released) = hold {
                            if !released_before_stop(&released, &stop).await {
                                return;
                            }
                        }
                        if let Err(e) =
                            listener::redirect::serve(listener, redirect, limits, per_shard, stop, drain).await
                        {
                            error!(error = %e, "http_redirect accept loop failed");
                        }
                    },
                    runtime,
                );
            }
            info!(%addr, "http_redirect: answering 308 to https");
        }
    }
}

/// Taking over: waits until the running corral has stopped accepting (true), or for `stop`
/// (false: this process gave up before the switch).
async fn released_before_stop(released: &CancellationToken, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = released.cancelled() => true,
    }
}
