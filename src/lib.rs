//! corral: one binary that runs N copies of a web server behind one port.
//!
//! # Layout
//!
//! One front process, a few clear owners:
//!
//! - the **listener** ([`listener`]) owns each app's public sockets: bound once with
//!   `SO_REUSEPORT` (one per shard), each served by an accept loop, drained on stop;
//! - the **shards** ([`shards`]) are the proxy's threads, one single-threaded runtime per CPU:
//!   a connection and everything its requests do stay on the shard that accepted it;
//! - the **proxy** ([`proxy`]) is the hyper service on every connection: it picks a worker from
//!   the app's [`balancer`] (a lock-free read of an immutable pool snapshot), forwards the
//!   request on a pooled connection, and streams the response back;
//! - the **supervisor** ([`supervisor`]) is one task that owns the worker table: it spawns,
//!   probes, restarts and stops workers, and publishes a new pool snapshot after each change.
//!   Everything else talks to it through a cloneable [`supervisor::Handle`];
//! - the **control socket** ([`control`]) lets the CLI ([`cli`]) reach a running instance;
//! - [`upgrade`] hands every socket (and the cookie and ticket keys) to a new corral process,
//!   for a binary upgrade or a reload that changes the listeners;
//! - [`run`] wires these together and owns the stop sequence; [`signals`] maps Unix signals to
//!   intents; [`tls`] holds each app's certificates and picks one per handshake; [`sites`]
//!   maps host names to the apps sharing an address; [`config`] turns `proxy.toml` into validated types; [`logs`] sets up tracing and
//!   carries worker output.
//!
//! Per-worker in-flight counts are RAII guards ([`balancer::InFlight`]) carried inside response
//! bodies, so draining a worker waits for exactly the responses still being sent.

#![deny(rust_2018_idioms)]
#![deny(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

// The admin HTTP listener: status, commands, health, events.
pub mod admin;
// Which worker gets the next request: pool snapshots, round robin, in-flight guards.
pub mod balancer;
// The command line and its exit codes.
pub mod cli;
// The operator commands both transports share (control socket, admin API).
pub mod commands;
// `proxy.toml` → validated [`config::Config`].
pub mod config;
// Cron expressions and their next firing (`log_rotate_interval`).
pub mod cron;
// The control socket between the CLI and a running instance.
pub mod control;
// The state file; stopping what a killed earlier run left behind.
pub mod leftovers;
// File-descriptor limit: raised for corral, restored for workers.
pub mod limits;
// Public sockets: bind once, accept, drain.
pub mod listener;
// tracing setup and worker output capture.
pub mod logs;
// Prometheus metrics: shard-local request counters summed at scrape time, worker gauges.
pub mod metrics;
// systemd's notify protocol (`Type=notify` units).
pub mod notify;
// The HTTP proxy service.
pub mod proxy;
// The front process's start and stop sequence.
pub mod run;
// The proxy's threads: one current-thread runtime per CPU.
pub mod shards;
// Unix signals mapped to intents.
pub mod signals;
// Several apps on one address: which app a host name belongs to.
pub mod sites;
// The actor that owns every worker process.
pub mod supervisor;
// TLS at the edge: certificates by SNI, ticket keys, ACME.
pub mod tls;
// `watch`: rolling restarts when an app's files change.
pub mod watch;
// `cron_restart`: rolling restarts at the times of a cron expression.
pub mod cron_restart;
// Reaping orphans re-parented to corral (subreaper, PID 1 in a container).
pub mod reaper;
// Self-upgrade: a new corral process takes over the sockets.
pub mod upgrade;
