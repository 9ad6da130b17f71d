//! Process-wide counters and histograms rendered as Prometheus text on `/metrics`.
//!
//! One [`Metrics`] value is created by the daemon and shared (`Arc`) with the parts that
//! observe something; rollouts-by-state is read from the store at scrape time instead.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bucket bounds in seconds for step durations (bake, reconcile).
const BUCKETS: [f64; 12] = [0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0];

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ =
                writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// The daemon's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    fetch_errors: AtomicU64,
    fetches: AtomicU64,
    commits_seen: AtomicU64,
    webhooks: Mutex<BTreeMap<(String, String), u64>>,
    durations: Mutex<BTreeMap<(&'static str, String), Histogram>>,
    instances_replaced: AtomicU64,
    instances_failed: AtomicU64,
}

impl Metrics {
    /// A fetch completed.
    pub fn fetch(&self) {
        self.fetches.fetch_add(1, Ordering::Relaxed);
    }

    /// A fetch failed.
    pub fn fetch_error(&self) {
        self.fetch_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// A commit was recorded.
    pub fn commit_seen(&self) {
        self.commits_seen.fetch_add(1, Ordering::Relaxed);
    }

    /// A webhook delivery was answered: `source` (gitlab, github, ...), `result` (accepted,
    /// ignored, duplicate, unauthorized, bad_request, too_large, overloaded).
    pub fn webhook(&self, source: &str, result: &str) {
        if let Ok(mut map) = self.webhooks.lock() {
            *map.entry((source.to_owned(), result.to_owned())).or_default() += 1;
        }
    }

    /// A bake stage finished (hit or not) in `seconds`.
    pub fn bake(&self, fleet: &str, seconds: f64) {
        self.observe("kiln_bake_duration_seconds", fleet, seconds);
    }

    /// A reconcile finished in `seconds`.
    pub fn reconcile(&self, fleet: &str, seconds: f64) {
        self.observe("kiln_reconcile_duration_seconds", fleet, seconds);
    }

    /// An instance was replaced.
    pub fn instance_replaced(&self) {
        self.instances_replaced.fetch_add(1, Ordering::Relaxed);
    }

    /// A new instance failed its health checks (or died before passing them) and was
    /// terminated.
    pub fn instance_failed(&self) {
        self.instances_failed.fetch_add(1, Ordering::Relaxed);
    }

    fn observe(&self, name: &'static str, fleet: &str, seconds: f64) {
        if let Ok(mut map) = self.durations.lock() {
            map.entry((name, fleet.to_owned())).or_default().observe(seconds);
        }
    }

    /// Prometheus text exposition. `rollouts` is the count per state, read from the store.
    pub fn render(&self, rollouts: &BTreeMap<String, u64>) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        };
        counter(
            &mut out,
            "kiln_fetches_total",
            "Fetches of the watched remote.",
            self.fetches.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "kiln_fetch_errors_total",
            "Failed fetches (retried with backoff).",
            self.fetch_errors.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "kiln_commits_seen_total",
            "Commits recorded.",
            self.commits_seen.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "kiln_instances_replaced_total",
            "Old instances replaced by rollouts and by the capacity keeper.",
            self.instances_replaced.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "kiln_instances_failed_total",
            "New instances that failed their health checks and were terminated.",
            self.instances_failed.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP kiln_rollouts Rollouts in the store by state.\n# TYPE kiln_rollouts gauge"
        );
        for (state, n) in rollouts {
            let _ = writeln!(out, "kiln_rollouts{{state=\"{state}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP kiln_webhook_deliveries_total Webhook deliveries by source and result.\n# TYPE kiln_webhook_deliveries_total counter"
        );
        if let Ok(map) = self.webhooks.lock() {
            for ((source, result), n) in map.iter() {
                let _ = writeln!(
                    out,
                    "kiln_webhook_deliveries_total{{source=\"{source}\",result=\"{result}\"}} {n}"
                );
            }
        }
        if let Ok(map) = self.durations.lock() {
            let mut last = "";
            for ((name, fleet), histogram) in map.iter() {
                if *name != last {
                    let _ = writeln!(out, "# TYPE {name} histogram");
                    last = name;
                }
                histogram.render(&mut out, name, &format!("fleet=\"{fleet}\""));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let metrics = Metrics::default();
        metrics.fetch_error();
        metrics.bake("web", 0.3);
        metrics.webhook("gitlab", "accepted");
        metrics.instance_failed();
        let text = metrics.render(&BTreeMap::from([("succeeded".to_owned(), 2)]));
        assert!(text.contains("kiln_fetch_errors_total 1"));
        assert!(text.contains("kiln_instances_failed_total 1"));
        assert!(text.contains("kiln_instances_replaced_total 0"));
        assert!(text.contains("kiln_rollouts{state=\"succeeded\"} 2"));
        assert!(text.contains("kiln_bake_duration_seconds_bucket{fleet=\"web\",le=\"0.5\"} 1"));
        assert!(text.contains("kiln_bake_duration_seconds_bucket{fleet=\"web\",le=\"0.1\"} 0"));
        assert!(
            text.contains("kiln_webhook_deliveries_total{source=\"gitlab\",result=\"accepted\"} 1")
        );
    }
}
