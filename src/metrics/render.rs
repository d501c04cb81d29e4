//! The Prometheus text exposition format (0.0.4) of the [`Registry`]: the request-path
//! families summed over the shards, then the worker gauges of the latest observed status.

use std::fmt::Write as _;

use super::*;

impl Registry {
    /// Writes every metric in the Prometheus text exposition format (0.0.4): the request-path
    /// counters as they are now, the worker gauges from the latest observed status.
    pub fn render(&self, out: &mut String) {
        let totals: Vec<Option<Totals>> = (0..self.apps.len())
            .map(|app| (!self.apps[app].shards.is_empty()).then(|| self.totals(app)))
            .collect();
        let proxied = || {
            self.apps
                .iter()
                .zip(&totals)
                .filter_map(|(meters, totals)| Some((meters, totals.as_ref()?)))
        };

        family(
            out,
            "corral_http_requests_total",
            "counter",
            "Responses sent, by app and status code (corral's own 4xx/5xx included).",
        );
        for (meters, totals) in proxied() {
            for (code, n) in &totals.codes {
                let _ = writeln!(
                    out,
                    "corral_http_requests_total{{app=\"{}\",code=\"{code}\"}} {n}",
                    label(&meters.name)
                );
            }
        }

        family(
            out,
            "corral_http_request_duration_seconds",
            "histogram",
            "Time from a request head's arrival to its response head (time to first byte), by app.",
        );
        for (meters, totals) in proxied() {
            let app = label(&meters.name);
            let mut cumulative = 0;
            for (bound, n) in BUCKETS.iter().zip(&totals.buckets) {
                cumulative += n;
                let _ = writeln!(
                    out,
                    "corral_http_request_duration_seconds_bucket{{app=\"{app}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "corral_http_request_duration_seconds_bucket{{app=\"{app}\",le=\"+Inf\"}} {}",
                totals.requests
            );
            let _ = writeln!(
                out,
                "corral_http_request_duration_seconds_sum{{app=\"{app}\"}} {}",
                totals.sum_nanos as f64 / 1e9
            );
            let _ = writeln!(
                out,
                "corral_http_request_duration_seconds_count{{app=\"{app}\"}} {}",
                totals.requests
            );
        }

        let simple: [(&str, &str, &str, Value); 3] = [
            (
                "corral_http_requests_in_flight",
                "gauge",
                "Requests whose response has not ended yet, by app.",
                |t| t.in_flight,
            ),
            (
                "corral_connections_open",
                "gauge",
                "Open client connections, by app.",
                |t| t.connections,
            ),
            (
                "corral_upstream_connect_errors_total",
                "counter",
                "Connections to a worker that failed (refused, reset, timed out), by app.",
                |t| t.connect_errors as i64,
            ),
        ];
        for (name, kind, help, value) in simple {
            family(out, name, kind, help);
            for (meters, totals) in proxied() {
                let _ = writeln!(out, "{name}{{app=\"{}\"}} {}", label(&meters.name), value(totals));
            }
        }

        family(
            out,
            "corral_tls_handshakes_total",
            "counter",
            "TLS handshakes, by listen address and result (ok, failed, timeout).",
        );
        for (addr, shards) in &self.listens {
            for result in Handshake::ALL {
                let n: u64 = shards.iter().map(|m| m.handshakes[result as usize].get()).sum();
                let _ = writeln!(
                    out,
                    "corral_tls_handshakes_total{{listen=\"{addr}\",result=\"{}\"}} {n}",
                    result.label()
                );
            }
        }

        family(
            out,
            "corral_access_log_dropped_lines_total",
            "counter",
            "Access log lines lost because the disk could not keep up or a write failed, by app.",
        );
        for (meters, _) in proxied() {
            let _ = writeln!(
                out,
                "corral_access_log_dropped_lines_total{{app=\"{}\"}} {}",
                label(&meters.name),
                meters.log_drops.load(Ordering::Relaxed)
            );
        }

        if let Some(status) = self.latest.load_full() {
            render_workers(&status, out);
        }
    }
}

/// How a one-value-per-app family reads its value from the totals.
type Value = fn(&Totals) -> i64;

/// States a worker (or an empty slot) can be in, as `corral status` names them.
const STATES: [&str; 9] = [
    "starting",
    "online",
    "unhealthy",
    "unreachable",
    "draining",
    "stopping",
    "waiting",
    "stopped",
    "errored",
];

/// The gauges that come from the supervisor's status.
fn render_workers(status: &Status, out: &mut String) {
    family(
        out,
        "corral_workers",
        "gauge",
        "Workers (and empty slots) by app and state.",
    );
    for app in &status.apps {
        let mut states: BTreeMap<&str, u64> = STATES.iter().map(|s| (*s, 0)).collect();
        for worker in &app.workers {
            *states.entry(worker.state.as_str()).or_default() += 1;
        }
        for (state, n) in states {
            let _ = writeln!(
                out,
                "corral_workers{{app=\"{}\",state=\"{}\"}} {n}",
                label(&app.name),
                label(state)
            );
        }
    }

    family(out, "corral_worker_memory_bytes", "gauge", "Resident memory of the workers' process trees, by app and slot (a slot's old and new worker summed during a reload).");
    for app in &status.apps {
        let mut slots: BTreeMap<usize, u64> = BTreeMap::new();
        for worker in &app.workers {
            if let Some(bytes) = worker.memory_bytes {
                *slots.entry(worker.slot).or_default() += bytes;
            }
        }
        for (slot, bytes) in slots {
            let _ = writeln!(
                out,
                "corral_worker_memory_bytes{{app=\"{}\",slot=\"{slot}\"}} {bytes}",
                label(&app.name)
            );
        }
    }

    family(
        out,
        "corral_worker_restarts_total",
        "counter",
        "Workers started in place of another, by app and reason (crash, memory, health, reload).",
    );
    for app in &status.apps {
        for (reason, n) in &app.restarts_by_reason {
            let _ = writeln!(
                out,
                "corral_worker_restarts_total{{app=\"{}\",reason=\"{}\"}} {n}",
                label(&app.name),
                label(reason)
            );
        }
    }

    family(
        out,
        "corral_reloads_total",
        "counter",
        "Rolling reloads, by app and result (ok, rolled_back, refused, partial).",
    );
    for app in &status.apps {
        for (result, n) in &app.reloads {
            let _ = writeln!(
                out,
                "corral_reloads_total{{app=\"{}\",result=\"{}\"}} {n}",
                label(&app.name),
                label(result)
            );
        }
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value as the text format wants it: `\`, `"` and newlines escaped.
fn label(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return value.into();
    }
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
        .into()
}
