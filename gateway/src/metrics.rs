//! Counters for `/metrics` (Prometheus text format 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use crate::pool::{Pool, Status};

/// Labelled counters and sums, keyed by metric name and label string.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<(&'static str, String), f64>>,
}

/// HELP lines of the counters.
const HELP: &[(&str, &str)] = &[
    (
        "gateway_requests_total",
        "Client requests by endpoint and HTTP status.",
    ),
    (
        "gateway_upstream_requests_total",
        "Requests sent to workers, by worker and outcome.",
    ),
    (
        "gateway_failovers_total",
        "Requests moved to another worker before their first token.",
    ),
    (
        "gateway_stream_errors_total",
        "Streams ended with an error event after their first token, by worker.",
    ),
    (
        "gateway_verifications_total",
        "Worker verifications, by worker and result.",
    ),
    (
        "gateway_sessions_total",
        "New RA-TLS sessions to workers, by worker and result.",
    ),
    (
        "gateway_request_seconds_sum",
        "Total time from request to last byte.",
    ),
    ("gateway_request_seconds_count", "Requests timed."),
    (
        "gateway_first_token_seconds_sum",
        "Total time from request to the first streamed token.",
    ),
    ("gateway_first_token_seconds_count", "Streams timed."),
];

fn labels(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl Metrics {
    /// Adds `by` to `name{labels}`.
    pub fn add(&self, name: &'static str, l: &[(&str, &str)], by: f64) {
        let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        *c.entry((name, labels(l))).or_insert(0.0) += by;
    }

    /// Adds one.
    pub fn inc(&self, name: &'static str, l: &[(&str, &str)]) {
        self.add(name, l, 1.0);
    }

    /// The value of `name{labels}` (tests).
    pub fn get(&self, name: &'static str, l: &[(&str, &str)]) -> f64 {
        let c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        c.get(&(name, labels(l))).copied().unwrap_or(0.0)
    }

    /// The text exposition, with the pool's gauges.
    pub fn render(&self, pool: &Pool) -> String {
        let mut out = String::new();
        let c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        for (name, help) in HELP {
            let _ = writeln!(out, "# HELP {name} {help}");
            let kind =
                if name.ends_with("_sum") || name.ends_with("_count") || name.ends_with("_total") {
                    "counter"
                } else {
                    "gauge"
                };
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for ((n, l), v) in c.iter() {
                if n == name {
                    if l.is_empty() {
                        let _ = writeln!(out, "{n} {v}");
                    } else {
                        let _ = writeln!(out, "{n}{{{l}}} {v}");
                    }
                }
            }
        }
        drop(c);
        let _ = writeln!(
            out,
            "# HELP gateway_worker_up Whether the worker is verified and usable (1) or not (0)."
        );
        let _ = writeln!(out, "# TYPE gateway_worker_up gauge");
        for w in &pool.workers {
            let up = u8::from(w.usable(pool.ttl) && w.state().status == Status::Up);
            let _ = writeln!(
                out,
                "gateway_worker_up{{{}}} {up}",
                labels(&[("worker", &w.url)])
            );
        }
        let _ = writeln!(
            out,
            "# HELP gateway_worker_in_flight Requests in flight per worker."
        );
        let _ = writeln!(out, "# TYPE gateway_worker_in_flight gauge");
        for w in &pool.workers {
            let _ = writeln!(
                out,
                "gateway_worker_in_flight{{{}}} {}",
                labels(&[("worker", &w.url)]),
                w.in_flight()
            );
        }
        out
    }
}
