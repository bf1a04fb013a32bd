//! Prometheus metrics without a client library: lock-free histograms and counters, the text
//! exposition format (version 0.0.4) they render to, and the `GET /metrics` server that both
//! `dsv2-router` and `dsv2-expert` run on `--metrics-listen`. Names follow
//! `dsv2_<component>_<what>_<unit>`.
//!
//! Hand-written because what the services need is small (fixed buckets, a few labels, one
//! scrape format) and every observation sits on a request or layer path: an observation is two
//! relaxed atomic adds and a compare-and-swap on the sum, with no registry lock.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bucket bounds for durations in seconds, from 1 ms (a decode step of a small batch) to 5 min.
pub const LATENCY_SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0,
    120.0, 300.0,
];

/// Bucket bounds for short durations in seconds (time per output token, one shard Forward).
pub const FAST_SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2,
    0.3, 0.5, 1.0, 2.5,
];

/// Powers of two up to 128K: token counts, rows, batch sizes.
pub const POWERS_OF_TWO: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
    16384.0, 32768.0, 65536.0, 131072.0,
];

/// Fractions of a capacity.
pub const RATIO: &[f64] = &[
    0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0,
];

/// A Prometheus histogram with fixed upper bounds (plus +Inf).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket, not cumulative: `buckets[i]` counts values in (bounds[i-1], bounds[i]];
    /// the last entry counts values above every bound.
    buckets: Box<[AtomicU64]>,
    /// f64 bits.
    sum: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "ascending bounds");
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub fn observe(&self, v: f64) {
        // NaN would land in +Inf and poison the sum: not an observation.
        if v.is_nan() {
            return;
        }
        let i = self.bounds.partition_point(|&b| b < v);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let mut cur = self.sum.load(Ordering::Relaxed);
        loop {
            let new = (f64::from_bits(cur) + v).to_bits();
            match self
                .sum
                .compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(c) => cur = c,
            }
        }
    }

    pub fn observe_duration(&self, d: std::time::Duration) {
        self.observe(d.as_secs_f64());
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    pub fn sum(&self) -> f64 {
        f64::from_bits(self.sum.load(Ordering::Relaxed))
    }

    /// `name_bucket`, `name_sum` and `name_count` lines; `labels` is `k="v",...` or empty.
    fn write_samples(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0u64;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(v) => format!("{v}"),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let braces = |l: &str| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{{{l}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum());
        // The count from the same bucket loads as the +Inf line, so the two always agree.
        let _ = writeln!(out, "{name}_count{} {cumulative}", braces(labels));
    }
}

/// Counters keyed by a fixed list of label names (e.g. `api`, `code`); series appear on first use.
#[derive(Debug)]
pub struct CounterVec {
    labels: &'static [&'static str],
    series: Mutex<BTreeMap<Vec<String>, u64>>,
}

impl CounterVec {
    pub fn new(labels: &'static [&'static str]) -> CounterVec {
        CounterVec {
            labels,
            series: Mutex::new(BTreeMap::new()),
        }
    }

    /// Adds `n` to the series with these label values (in the order of the label names).
    pub fn add(&self, values: &[&str], n: u64) {
        debug_assert_eq!(values.len(), self.labels.len());
        if let Ok(mut m) = self.series.lock() {
            *m.entry(values.iter().map(|v| v.to_string()).collect())
                .or_insert(0) += n;
        }
    }

    pub fn inc(&self, values: &[&str]) {
        self.add(values, 1);
    }

    /// The value of one series (0 when it never happened).
    pub fn get(&self, values: &[&str]) -> u64 {
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        self.series
            .lock()
            .ok()
            .and_then(|m| m.get(&key).copied())
            .unwrap_or(0)
    }

    fn snapshot(&self) -> Vec<(Vec<String>, u64)> {
        self.series
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default()
    }
}

/// A label value, escaped for the text format.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `k1="v1",k2="v2"`.
pub fn label_pairs(names: &[&str], values: &[impl AsRef<str>]) -> String {
    names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", escape(v.as_ref())))
        .collect::<Vec<_>>()
        .join(",")
}

/// One scrape's text: each family once, with its HELP and TYPE lines.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: impl std::fmt::Display) {
        self.header(name, "gauge", help);
        let _ = writeln!(self.out, "{name} {value}");
    }

    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.header(name, "counter", help);
        let _ = writeln!(self.out, "{name} {value}");
    }

    /// Every series of `c` (the HELP and TYPE lines even when it has none yet).
    pub fn counter_vec(&mut self, name: &str, help: &str, c: &CounterVec) {
        self.header(name, "counter", help);
        for (values, v) in c.snapshot() {
            let _ = writeln!(self.out, "{name}{{{}}} {v}", label_pairs(c.labels, &values));
        }
    }

    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.header(name, "histogram", help);
        h.write_samples(&mut self.out, name, "");
    }

    /// One histogram per value of the label `label`.
    pub fn histogram_vec<'a>(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        series: impl IntoIterator<Item = (String, &'a Histogram)>,
    ) {
        self.header(name, "histogram", help);
        for (value, h) in series {
            h.write_samples(&mut self.out, name, &label_pairs(&[label], &[value]));
        }
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// Binds `addr` and serves `GET /metrics` (the text of `render`) until the process ends;
/// returns the bound address (port 0 picks a free one).
pub async fn serve<F, Fut>(addr: SocketAddr, render: F) -> std::io::Result<SocketAddr>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                (
                    [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    render().await,
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(bound)
}

/// A histogram per index (e.g. per decoder layer), created up front: observing takes no lock.
#[derive(Debug)]
pub struct IndexedHistograms {
    slots: Vec<Option<Histogram>>,
}

impl IndexedHistograms {
    /// A histogram for each index where `present` is true.
    pub fn new(present: &[bool], bounds: &'static [f64]) -> IndexedHistograms {
        IndexedHistograms {
            slots: present
                .iter()
                .map(|&p| p.then(|| Histogram::new(bounds)))
                .collect(),
        }
    }

    pub fn get(&self, i: usize) -> Option<&Histogram> {
        self.slots.get(i).and_then(Option::as_ref)
    }

    /// (index as a label value, histogram) for every present index.
    pub fn series(&self) -> impl Iterator<Item = (String, &Histogram)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.as_ref().map(|h| (i.to_string(), h)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_renders_cumulative_buckets_sum_and_count() {
        static B: &[f64] = &[1.0, 2.0, 4.0];
        let h = Histogram::new(B);
        for v in [0.5, 1.0, 1.5, 3.0, 9.0, f64::NAN] {
            h.observe(v);
        }
        assert_eq!(h.count(), 5);
        let mut e = Exposition::new();
        e.histogram("dsv2_test_thing_seconds", "A thing.", &h);
        let text = e.finish();
        for line in [
            "# TYPE dsv2_test_thing_seconds histogram",
            "dsv2_test_thing_seconds_bucket{le=\"1\"} 2",
            "dsv2_test_thing_seconds_bucket{le=\"2\"} 3",
            "dsv2_test_thing_seconds_bucket{le=\"4\"} 4",
            "dsv2_test_thing_seconds_bucket{le=\"+Inf\"} 5",
            "dsv2_test_thing_seconds_sum 15",
            "dsv2_test_thing_seconds_count 5",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }

    #[test]
    fn labelled_series_escape_their_values() {
        let c = CounterVec::new(&["api", "code"]);
        c.inc(&["http", "OK"]);
        c.add(&["grpc", "a\"b"], 2);
        assert_eq!(c.get(&["http", "OK"]), 1);
        assert_eq!(c.get(&["http", "CANCELLED"]), 0);
        let mut e = Exposition::new();
        e.counter_vec("dsv2_test_requests_total", "Requests.", &c);
        static B: &[f64] = &[1.0];
        let h = IndexedHistograms::new(&[false, true], B);
        h.get(1).expect("slot 1").observe(1.0);
        assert!(h.get(0).is_none());
        e.histogram_vec("dsv2_test_rows", "Rows.", "layer", h.series());
        let text = e.finish();
        assert!(text.contains("dsv2_test_requests_total{api=\"grpc\",code=\"a\\\"b\"} 2"));
        assert!(text.contains("dsv2_test_requests_total{api=\"http\",code=\"OK\"} 1"));
        assert!(text.contains("dsv2_test_rows_bucket{layer=\"1\",le=\"1\"} 1"));
        assert!(text.contains("dsv2_test_rows_count{layer=\"1\"} 1"));
        assert!(!text.contains("layer=\"0\""));
    }
}
