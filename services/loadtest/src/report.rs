//! The load test report: ghz's statistics (same percentile and histogram rules), its text
//! summary, its JSON report format, plus generated tokens/s and time to first token.
//!
//! The statistics follow ghz's runner/reporter.go: the average is over every result, errors
//! included; fastest, slowest, the histogram and the latency distribution are over successful
//! results only; percentiles are nearest-rank on the sorted successful latencies.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::time::{Duration, SystemTime};

use serde_json::json;

use crate::LoadtestError;

/// Percentiles ghz reports, in order.
pub const PERCENTILES: [u32; 7] = [10, 25, 50, 75, 90, 95, 99];

/// Number of histogram buckets ghz uses (the bucket marks are 10 equal steps plus the slowest).
pub const HISTOGRAM_STEPS: usize = 10;

/// What ended the run (ghz `endReason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The request count was reached.
    Normal,
    /// The duration limit was reached.
    Timeout,
    /// The caller cancelled the run.
    Cancel,
}

impl EndReason {
    /// ghz's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Normal => "normal",
            EndReason::Timeout => "timeout",
            EndReason::Cancel => "cancel",
        }
    }
}

/// Where the time-to-first-token samples come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TtftSource {
    /// `GenerateResponse.time_to_first_token_ns` as the server reported it (unary calls).
    ServerReported,
    /// Measured by the client: request start to the first stream message carrying a token.
    ClientMeasured,
}

/// The outcome of one request, as the runner records it.
#[derive(Debug, Clone, PartialEq)]
pub struct CallResult {
    /// Wall-clock time the request started.
    pub timestamp: SystemTime,
    /// Request start to the end of the response (the last stream message for streams).
    pub latency: Duration,
    /// gRPC status name in Go's spelling, as ghz prints it ("OK", "Unavailable", ...).
    pub status: String,
    /// ghz-style error text (`rpc error: code = X desc = Y`), None on success.
    pub error: Option<String>,
    /// Generated tokens in the response (0 on error).
    pub completion_tokens: u64,
    /// Time to first token, when the response told it.
    pub time_to_first_token: Option<Duration>,
    /// A stream that ended OK without its final summary message (a server bug worth seeing).
    pub missing_summary: bool,
    /// Streams: the tokens after the first message's and the time from the first token's
    /// arrival to the last one's (None for unary calls and streams of fewer than two token
    /// messages).
    pub decode: Option<DecodeSpan>,
}

/// The decode phase of one stream, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeSpan {
    pub tokens: u64,
    pub time: Duration,
}

/// Decode rate over every successful stream: what an in-process decode benchmark measures
/// (steps after the first token), without the prefill, the request's set-up and the gaps between
/// requests that `tokens_per_sec` includes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeStats {
    /// Streams that contributed.
    pub samples: u64,
    /// Tokens after each stream's first, summed.
    pub tokens: u64,
    /// Their decode times, summed.
    pub time: Duration,
}

impl DecodeStats {
    /// Mean time between tokens within a stream.
    pub fn time_per_output_token(&self) -> Duration {
        if self.tokens == 0 {
            return Duration::ZERO;
        }
        self.time.div_f64(self.tokens as f64)
    }

    /// Tokens per second of one stream while it decodes (at concurrency 1, comparable with an
    /// in-process batch-1 decode rate; at concurrency C, C streams run at about this rate each).
    pub fn tokens_per_sec_per_stream(&self) -> f64 {
        let s = self.time.as_secs_f64();
        if s > 0.0 { self.tokens as f64 / s } else { 0.0 }
    }
}

/// One histogram bucket (ghz `runner.Bucket`).
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    /// Upper edge of the bucket, in seconds.
    pub mark: f64,
    /// Successful requests in the bucket.
    pub count: u64,
    /// count / successful requests.
    pub frequency: f64,
}

/// One latency percentile (ghz `runner.LatencyDistribution`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencyPercentile {
    /// The percentile, e.g. 99.
    pub percentage: u32,
    /// Latency at that percentile.
    pub latency: Duration,
}

/// Time-to-first-token statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtftStats {
    /// Where the samples come from.
    pub source: TtftSource,
    /// Number of samples (successful requests that reported a first token).
    pub samples: u64,
    /// Mean.
    pub average: Duration,
    /// Median (nearest rank).
    pub p50: Duration,
    /// 99th percentile (nearest rank).
    pub p99: Duration,
}

/// The options echoed into the JSON report (ghz `runner.Options`).
#[derive(Debug, Clone, PartialEq)]
pub struct ReportOptions {
    /// Target address.
    pub host: String,
    /// Fully-qualified method, e.g. `dsv2.v1.Inference/Generate`.
    pub call: String,
    /// Plaintext connection.
    pub insecure: bool,
    /// Request count limit (0: none).
    pub total: u64,
    /// Concurrent workers.
    pub concurrency: u64,
    /// Duration limit.
    pub duration: Option<Duration>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Connect timeout.
    pub dial_timeout: Duration,
    /// The request data as JSON.
    pub data: serde_json::Value,
    /// CPUs available to the load generator.
    pub cpus: u64,
    /// Run name.
    pub name: Option<String>,
}

/// Everything a load test measured. All fields are public so tests can assert on them.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Run name.
    pub name: Option<String>,
    /// What ended the run.
    pub end_reason: EndReason,
    /// The options of the run.
    pub options: ReportOptions,
    /// When the report was made.
    pub date: SystemTime,
    /// Requests completed (successes + errors).
    pub count: u64,
    /// Requests that ended with status OK.
    pub ok_count: u64,
    /// Requests that ended with any other status.
    pub error_count: u64,
    /// Wall time of the whole run.
    pub total: Duration,
    /// Mean latency over all requests, errors included (as ghz computes it).
    pub average: Duration,
    /// Fastest successful request.
    pub fastest: Duration,
    /// Slowest successful request.
    pub slowest: Duration,
    /// count / total.
    pub rps: f64,
    /// Latency histogram of successful requests (empty when none succeeded).
    pub histogram: Vec<Bucket>,
    /// Latency percentiles of successful requests (empty when none succeeded).
    pub latency_distribution: Vec<LatencyPercentile>,
    /// Requests per status name.
    pub status_code_distribution: BTreeMap<String, u64>,
    /// Requests per error text.
    pub error_distribution: BTreeMap<String, u64>,
    /// Every result, in completion order per worker.
    pub details: Vec<CallResult>,
    /// Generated tokens over all successful requests.
    pub completion_tokens: u64,
    /// completion_tokens / total wall time.
    pub tokens_per_sec: f64,
    /// Time to first token, when any successful response reported one.
    pub time_to_first_token: Option<TtftStats>,
    /// Streams that ended OK without their final summary message.
    pub streams_without_summary: u64,
    /// Decode rate of the successful streams that had at least two token messages.
    pub decode: Option<DecodeStats>,
}

impl Report {
    /// Computes the report from the results of a run.
    pub fn from_results(
        options: ReportOptions,
        end_reason: EndReason,
        total: Duration,
        ttft_source: TtftSource,
        details: Vec<CallResult>,
    ) -> Report {
        let count = details.len() as u64;
        let mut status_code_distribution = BTreeMap::new();
        let mut error_distribution = BTreeMap::new();
        let mut ok_latencies = Vec::with_capacity(details.len());
        let mut ttfts = Vec::new();
        let mut latency_sum_s = 0.0f64;
        let mut completion_tokens = 0u64;
        let mut streams_without_summary = 0u64;
        let mut decode = DecodeStats {
            samples: 0,
            tokens: 0,
            time: Duration::ZERO,
        };
        for d in &details {
            latency_sum_s += d.latency.as_secs_f64();
            *status_code_distribution
                .entry(d.status.clone())
                .or_insert(0) += 1;
            match &d.error {
                Some(e) => *error_distribution.entry(e.clone()).or_insert(0) += 1,
                None => {
                    ok_latencies.push(d.latency.as_secs_f64());
                    completion_tokens += d.completion_tokens;
                    ttfts.extend(d.time_to_first_token);
                    streams_without_summary += u64::from(d.missing_summary);
                    if let Some(span) = d.decode {
                        decode.samples += 1;
                        decode.tokens += span.tokens;
                        decode.time += span.time;
                    }
                }
            }
        }
        ok_latencies.sort_by(f64::total_cmp);
        ttfts.sort();

        let ok_count = ok_latencies.len() as u64;
        let (fastest, slowest) = match (ok_latencies.first(), ok_latencies.last()) {
            (Some(&f), Some(&s)) => (Duration::from_secs_f64(f), Duration::from_secs_f64(s)),
            _ => (Duration::ZERO, Duration::ZERO),
        };
        let total_s = total.as_secs_f64();
        let per_sec = |n: u64| {
            if total_s > 0.0 {
                n as f64 / total_s
            } else {
                0.0
            }
        };
        let average = if count > 0 {
            Duration::from_secs_f64(latency_sum_s / count as f64)
        } else {
            Duration::ZERO
        };
        let time_to_first_token = (!ttfts.is_empty()).then(|| {
            let sum: Duration = ttfts.iter().sum();
            TtftStats {
                source: ttft_source,
                samples: ttfts.len() as u64,
                average: sum / ttfts.len() as u32,
                p50: ttfts[nearest_rank(ttfts.len(), 50)],
                p99: ttfts[nearest_rank(ttfts.len(), 99)],
            }
        });
        Report {
            name: options.name.clone(),
            end_reason,
            options,
            date: SystemTime::now(),
            count,
            ok_count,
            error_count: count - ok_count,
            total,
            average,
            fastest,
            slowest,
            rps: per_sec(count),
            histogram: histogram(&ok_latencies),
            latency_distribution: latency_distribution(&ok_latencies),
            status_code_distribution,
            error_distribution,
            details,
            completion_tokens,
            tokens_per_sec: per_sec(completion_tokens),
            time_to_first_token,
            streams_without_summary,
            decode: (decode.samples > 0).then_some(decode),
        }
    }

    /// ghz's JSON report (`-O json`): date, options, count, total, average, fastest, slowest,
    /// rps, histogram, latencyDistribution, statusCodeDistribution, errorDistribution, details;
    /// durations in nanoseconds. The tokens and time-to-first-token figures, which ghz does not
    /// have, are under an extra top-level `dsv2` key that ghz-format readers ignore.
    pub fn to_ghz_json(&self) -> serde_json::Value {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let mut options = serde_json::Map::new();
        options.insert("host".into(), self.options.host.clone().into());
        options.insert("call".into(), self.options.call.clone().into());
        options.insert("insecure".into(), self.options.insecure.into());
        if self.options.total > 0 {
            options.insert("total".into(), self.options.total.into());
        }
        options.insert("concurrency".into(), self.options.concurrency.into());
        if let Some(d) = self.options.duration {
            options.insert("duration".into(), ns(d).into());
        }
        options.insert("timeout".into(), ns(self.options.timeout).into());
        options.insert("dial-timeout".into(), ns(self.options.dial_timeout).into());
        options.insert("data".into(), self.options.data.clone());
        options.insert("binary".into(), false.into());
        options.insert("CPUs".into(), self.options.cpus.into());
        if let Some(n) = &self.options.name {
            options.insert("name".into(), n.clone().into());
        }

        let mut report = serde_json::Map::new();
        if let Some(n) = &self.name {
            report.insert("name".into(), n.clone().into());
        }
        report.insert("endReason".into(), self.end_reason.as_str().into());
        report.insert("options".into(), options.into());
        report.insert("date".into(), rfc3339_seconds(self.date).into());
        report.insert("count".into(), self.count.into());
        report.insert("total".into(), ns(self.total).into());
        report.insert("average".into(), ns(self.average).into());
        report.insert("fastest".into(), ns(self.fastest).into());
        report.insert("slowest".into(), ns(self.slowest).into());
        report.insert("rps".into(), self.rps.into());
        report.insert("errorDistribution".into(), json!(self.error_distribution));
        report.insert(
            "statusCodeDistribution".into(),
            json!(self.status_code_distribution),
        );
        report.insert(
            "latencyDistribution".into(),
            self.latency_distribution
                .iter()
                .map(|l| json!({"percentage": l.percentage, "latency": ns(l.latency)}))
                .collect::<Vec<_>>()
                .into(),
        );
        report.insert(
            "histogram".into(),
            self.histogram
                .iter()
                .map(|b| json!({"mark": b.mark, "count": b.count, "frequency": b.frequency}))
                .collect::<Vec<_>>()
                .into(),
        );
        report.insert(
            "details".into(),
            self.details
                .iter()
                .map(|d| {
                    json!({
                        "timestamp": humantime::format_rfc3339_nanos(d.timestamp).to_string(),
                        "latency": ns(d.latency),
                        "error": d.error.clone().unwrap_or_default(),
                        "status": d.status,
                    })
                })
                .collect::<Vec<_>>()
                .into(),
        );
        let ttft = self.time_to_first_token.map(|t| {
            json!({
                "source": match t.source {
                    TtftSource::ServerReported => "server",
                    TtftSource::ClientMeasured => "client",
                },
                "samples": t.samples,
                "average": ns(t.average),
                "p50": ns(t.p50),
                "p99": ns(t.p99),
            })
        });
        report.insert(
            "dsv2".into(),
            json!({
                "okCount": self.ok_count,
                "errorCount": self.error_count,
                "completionTokens": self.completion_tokens,
                "tokensPerSec": self.tokens_per_sec,
                "timeToFirstToken": ttft,
                "streamsWithoutSummary": self.streams_without_summary,
                "decode": self.decode.map(|d| json!({
                    "samples": d.samples,
                    "tokens": d.tokens,
                    "timePerOutputToken": ns(d.time_per_output_token()),
                    "tokensPerSecPerStream": d.tokens_per_sec_per_stream(),
                })),
            }),
        );
        serde_json::Value::Object(report)
    }

    /// [`Report::to_ghz_json`] as pretty-printed text (ghz `-O pretty`).
    pub fn to_ghz_json_string(&self) -> Result<String, LoadtestError> {
        Ok(serde_json::to_string_pretty(&self.to_ghz_json())?)
    }
}

/// Index into `n` sorted samples of percentile `p`, ghz's nearest-rank rule: rank p/100 * n,
/// one lower when that lands exactly on a whole number (0-based ranks), never below 0.
pub fn nearest_rank(n: usize, p: u32) -> usize {
    if n == 0 {
        return 0;
    }
    // Integer arithmetic gives the same floor and whole-number test as ghz's float code.
    let scaled = p as usize * n;
    let mut i = scaled / 100;
    if scaled.is_multiple_of(100) {
        i = i.saturating_sub(1);
    }
    i.min(n - 1)
}

/// Latency at each of [`PERCENTILES`] over ascending latencies in seconds.
pub fn latency_distribution(sorted_s: &[f64]) -> Vec<LatencyPercentile> {
    if sorted_s.is_empty() {
        return Vec::new();
    }
    PERCENTILES
        .iter()
        .map(|&p| LatencyPercentile {
            percentage: p,
            latency: Duration::from_secs_f64(sorted_s[nearest_rank(sorted_s.len(), p)]),
        })
        .collect()
}

/// ghz's histogram over ascending latencies in seconds: marks at fastest + i * (slowest -
/// fastest) / 10 for i in 0..10, then slowest; each latency counts in the first bucket whose
/// mark is at or above it.
pub fn histogram(sorted_s: &[f64]) -> Vec<Bucket> {
    let (Some(&fastest), Some(&slowest)) = (sorted_s.first(), sorted_s.last()) else {
        return Vec::new();
    };
    let step = (slowest - fastest) / HISTOGRAM_STEPS as f64;
    let mut marks: Vec<f64> = (0..HISTOGRAM_STEPS)
        .map(|i| fastest + step * i as f64)
        .collect();
    marks.push(slowest);
    let mut counts = vec![0u64; marks.len()];
    let mut b = 0;
    for &lat in sorted_s {
        // The last mark is the slowest latency itself, so b never runs past the end.
        while lat > marks[b] && b + 1 < marks.len() {
            b += 1;
        }
        counts[b] += 1;
    }
    let n = sorted_s.len() as f64;
    marks
        .into_iter()
        .zip(counts)
        .map(|(mark, count)| Bucket {
            mark,
            count,
            frequency: count as f64 / n,
        })
        .collect()
}

/// ghz's duration format: "N ns" below 10 µs, "X.XX ms" below 1 s, else "X.XX s".
pub fn format_nano_unit(d: Duration) -> String {
    let v = d.as_nanos();
    if v < 10_000 {
        return format!("{v} ns");
    }
    let ms = v as f64 / 1e6;
    if ms < 1000.0 {
        format!("{ms:4.2} ms")
    } else {
        format!("{:4.2} s", ms / 1000.0)
    }
}

fn rfc3339_seconds(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Go's text/tabwriter with minwidth 0, padding 3, padchar ' ' over rows of cells, each cell
/// terminated by a tab in ghz's format strings (so every cell is padded, the last included).
fn tabwriter(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
                + 3
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        for (c, cell) in r.iter().enumerate() {
            let _ = write!(out, "{cell:<w$}", w = widths[c]);
        }
        out.push('\n');
    }
    out
}

fn histogram_text(buckets: &[Bucket]) -> String {
    let max_mark = buckets.iter().map(|b| b.mark).fold(0.0f64, f64::max);
    let max_count = buckets.iter().map(|b| b.count).max().unwrap_or(0);
    let mark_len = format!("{:.3}", max_mark * 1000.0).len();
    let count_len = max_count.to_string().len();
    let mut out = String::new();
    for b in buckets {
        let bar = (b.count * 40 + max_count / 2)
            .checked_div(max_count)
            .unwrap_or(0) as usize;
        // ghz pads the count after its closing bracket: "[1]  |" next to "[14] |".
        let count = b.count.to_string();
        let _ = writeln!(
            out,
            "  {:<mw$} [{count}]{} |{}",
            format!("{:.3}", b.mark * 1000.0),
            " ".repeat(count_len - count.len()),
            "∎".repeat(bar),
            mw = mark_len,
        );
    }
    out
}

/// The summary exactly as ghz prints it (its default `summary` format; status names and errors
/// sorted, where ghz prints them in map order), followed by the generated tokens and time to
/// first token.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f)?;
        writeln!(f, "Summary:")?;
        if let Some(name) = &self.name {
            writeln!(f, "  Name:\t\t{name}")?;
        }
        writeln!(f, "  Count:\t{}", self.count)?;
        writeln!(f, "  Total:\t{}", format_nano_unit(self.total))?;
        writeln!(f, "  Slowest:\t{}", format_nano_unit(self.slowest))?;
        writeln!(f, "  Fastest:\t{}", format_nano_unit(self.fastest))?;
        writeln!(f, "  Average:\t{}", format_nano_unit(self.average))?;
        writeln!(f, "  Requests/sec:\t{:4.2}", self.rps)?;
        writeln!(f)?;
        writeln!(f, "Response time histogram:")?;
        write!(f, "{}", histogram_text(&self.histogram))?;
        write!(f, "\nLatency distribution:")?;
        for l in &self.latency_distribution {
            write!(
                f,
                "\n  {} % in {} ",
                l.percentage,
                format_nano_unit(l.latency)
            )?;
        }
        writeln!(f)?;
        writeln!(f)?;
        if !self.status_code_distribution.is_empty() {
            writeln!(f, "Status code distribution:")?;
            let rows: Vec<Vec<String>> = self
                .status_code_distribution
                .iter()
                .map(|(s, n)| vec![format!("  [{s}]"), format!("{n} responses")])
                .collect();
            write!(f, "{}", tabwriter(&rows))?;
        }
        writeln!(f)?;
        if !self.error_distribution.is_empty() {
            writeln!(f, "Error distribution:")?;
            let rows: Vec<Vec<String>> = self
                .error_distribution
                .iter()
                .map(|(e, n)| vec![format!("  [{n}]"), e.clone()])
                .collect();
            write!(f, "{}", tabwriter(&rows))?;
            writeln!(f)?;
        }
        writeln!(f, "Tokens:")?;
        writeln!(f, "  Generated:\t{} tokens", self.completion_tokens)?;
        writeln!(f, "  Tokens/sec:\t{:4.2}", self.tokens_per_sec)?;
        if self.streams_without_summary > 0 {
            writeln!(
                f,
                "  Streams without a final summary message: {}",
                self.streams_without_summary
            )?;
        }
        writeln!(f)?;
        match &self.time_to_first_token {
            Some(t) => {
                let source = match t.source {
                    TtftSource::ServerReported => "server-reported",
                    TtftSource::ClientMeasured => "client-measured",
                };
                writeln!(f, "Time to first token ({source}, {} samples):", t.samples)?;
                writeln!(f, "  Average:\t{}", format_nano_unit(t.average))?;
                writeln!(f, "  p50:\t\t{}", format_nano_unit(t.p50))?;
                writeln!(f, "  p99:\t\t{}", format_nano_unit(t.p99))?;
            }
            None => writeln!(f, "Time to first token: no samples")?,
        }
        if let Some(d) = &self.decode {
            writeln!(f)?;
            writeln!(
                f,
                "Decode (client-measured, first to last token of each stream, {} samples):",
                d.samples
            )?;
            writeln!(
                f,
                "  Time per output token:\t{}",
                format_nano_unit(d.time_per_output_token())
            )?;
            writeln!(
                f,
                "  Tokens/sec per stream:\t{:4.2}",
                d.tokens_per_sec_per_stream()
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random generator (SplitMix64) so the synthetic samples need no
    /// dependency and are the same on every run.
    struct SplitMix(u64);
    impl SplitMix {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    fn options() -> ReportOptions {
        ReportOptions {
            host: "127.0.0.1:50051".into(),
            call: "dsv2.v1.Inference/Generate".into(),
            insecure: true,
            total: 0,
            concurrency: 4,
            duration: None,
            timeout: Duration::from_secs(20),
            dial_timeout: Duration::from_secs(10),
            data: json!({"text": "hi"}),
            cpus: 2,
            name: None,
        }
    }

    /// `n` results with log-normal-ish latencies; every `err_every`-th one failed.
    fn synthetic(n: usize, err_every: usize, seed: u64) -> Vec<CallResult> {
        let mut rng = SplitMix(seed);
        (0..n)
            .map(|i| {
                let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
                let latency = Duration::from_micros((2_000.0 * (3.0 * u).exp()) as u64 + 50);
                let failed = err_every > 0 && i % err_every == err_every - 1;
                CallResult {
                    timestamp: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
                    latency,
                    status: if failed { "Unavailable" } else { "OK" }.into(),
                    error: failed.then(|| {
                        "rpc error: code = Unavailable desc = shard 1 is down".to_string()
                    }),
                    completion_tokens: if failed { 0 } else { 16 },
                    time_to_first_token: (!failed).then(|| latency / 4),
                    missing_summary: false,
                    decode: None,
                }
            })
            .collect()
    }

    fn report(details: Vec<CallResult>) -> Report {
        Report::from_results(
            options(),
            EndReason::Normal,
            Duration::from_secs(2),
            TtftSource::ServerReported,
            details,
        )
    }

    #[test]
    fn counts_add_up() {
        for (n, err_every) in [(1, 0), (7, 3), (100, 10), (1000, 7), (12, 1)] {
            let r = report(synthetic(n, err_every, n as u64));
            assert_eq!(r.count, n as u64);
            assert_eq!(r.count, r.ok_count + r.error_count, "n={n}");
            assert_eq!(r.status_code_distribution.values().sum::<u64>(), r.count);
            assert_eq!(r.error_distribution.values().sum::<u64>(), r.error_count);
            assert_eq!(
                r.status_code_distribution.get("OK").copied().unwrap_or(0),
                r.ok_count
            );
            assert_eq!(r.completion_tokens, 16 * r.ok_count);
            assert!((r.rps - n as f64 / 2.0).abs() < 1e-9);
            assert!((r.tokens_per_sec - r.completion_tokens as f64 / 2.0).abs() < 1e-9);
        }
    }

    #[test]
    fn histogram_sums_to_successes() {
        for (n, err_every) in [(1, 0), (2, 0), (7, 3), (100, 10), (1000, 7)] {
            let r = report(synthetic(n, err_every, 99 + n as u64));
            assert_eq!(r.histogram.len(), HISTOGRAM_STEPS + 1);
            assert_eq!(
                r.histogram.iter().map(|b| b.count).sum::<u64>(),
                r.ok_count,
                "n={n}"
            );
            let freq: f64 = r.histogram.iter().map(|b| b.frequency).sum();
            assert!((freq - 1.0).abs() < 1e-9);
            assert!(r.histogram.windows(2).all(|w| w[0].mark <= w[1].mark));
            let last = r.histogram.last().expect("buckets");
            assert!((last.mark - r.slowest.as_secs_f64()).abs() < 1e-9);
        }
        // All failed: no successful latencies, no histogram, no percentiles.
        let r = report(synthetic(5, 1, 3));
        assert_eq!(r.ok_count, 0);
        assert!(r.histogram.is_empty() && r.latency_distribution.is_empty());
        assert_eq!(r.error_count, 5);
    }

    #[test]
    fn percentiles_are_ordered_and_bounded() {
        for (n, err_every) in [(1, 0), (3, 0), (10, 0), (101, 4), (1000, 0)] {
            let r = report(synthetic(n, err_every, 7 * n as u64));
            let pcts: Vec<u32> = r
                .latency_distribution
                .iter()
                .map(|l| l.percentage)
                .collect();
            assert_eq!(pcts, PERCENTILES.to_vec());
            let lats: Vec<Duration> = r.latency_distribution.iter().map(|l| l.latency).collect();
            assert!(lats.windows(2).all(|w| w[0] <= w[1]), "n={n}: {lats:?}");
            assert!(r.fastest <= lats[0] && lats[6] <= r.slowest);
            let t = r.time_to_first_token.expect("ttft");
            assert!(t.p50 <= t.p99);
            assert_eq!(t.samples, r.ok_count);
        }
    }

    #[test]
    fn nearest_rank_matches_ghz() {
        // ghz: ip = p/100*n; di = floor(ip); if ip is whole, di -= 1; clamp at 0.
        let ghz = |n: usize, p: u32| {
            let ip = p as f64 / 100.0 * n as f64;
            let mut di = ip as i64;
            if ip == di as f64 {
                di -= 1;
            }
            di.max(0) as usize
        };
        for n in 1..300 {
            for p in PERCENTILES {
                assert_eq!(nearest_rank(n, p), ghz(n, p), "n={n} p={p}");
            }
        }
        // 1..=100 ms: p50 is the 50th value, p99 the 99th.
        let sorted: Vec<f64> = (1..=100).map(|i| i as f64 / 1000.0).collect();
        let d = latency_distribution(&sorted);
        assert_eq!(d[2].latency, Duration::from_millis(50));
        assert_eq!(d[6].latency, Duration::from_millis(99));
    }

    #[test]
    fn histogram_matches_hand_computed_buckets() {
        // Latencies i/1024 s for i in 1..=11 (exact in binary, so no rounding at the edges):
        // marks fall on the same values, one latency in each bucket.
        let sorted: Vec<f64> = (1..=11).map(|i| i as f64 / 1024.0).collect();
        let h = histogram(&sorted);
        assert_eq!(h.iter().map(|b| b.count).collect::<Vec<_>>(), vec![1; 11]);
        // All equal: every sample lands in the first bucket.
        let h = histogram(&[0.005; 4]);
        assert_eq!(h[0].count, 4);
        assert_eq!(h.iter().map(|b| b.count).sum::<u64>(), 4);
    }

    #[test]
    fn average_includes_errors_as_ghz_does() {
        let mut d = synthetic(2, 0, 1);
        d[0].latency = Duration::from_millis(10);
        d[1].latency = Duration::from_millis(30);
        d[1].error = Some("rpc error: code = Internal desc = x".into());
        d[1].status = "Internal".into();
        let r = report(d);
        assert_eq!(r.average, Duration::from_millis(20));
        assert_eq!(r.fastest, Duration::from_millis(10));
        assert_eq!(r.slowest, Duration::from_millis(10));
    }

    #[test]
    fn summary_text_has_ghz_sections() {
        let r = report(synthetic(50, 10, 5));
        let text = r.to_string();
        for needle in [
            "Summary:\n  Count:\t50\n  Total:\t2.00 s\n",
            "  Requests/sec:\t25.00\n",
            "Response time histogram:\n  ",
            "Latency distribution:\n  10 % in ",
            "\n  99 % in ",
            "Status code distribution:\n  [OK]            45 responses   \n  [Unavailable]   5 responses    \n",
            "Error distribution:\n  [5]   rpc error: code = Unavailable desc = shard 1 is down   \n",
            "Generated:\t720 tokens",
            "Time to first token (server-reported, 45 samples):",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        assert_eq!(format_nano_unit(Duration::from_nanos(9_999)), "9999 ns");
        assert_eq!(format_nano_unit(Duration::from_micros(1_500)), "1.50 ms");
        assert_eq!(format_nano_unit(Duration::from_millis(2_345)), "2.35 s");
    }

    #[test]
    fn histogram_lines_are_aligned_like_ghz() {
        let b = |mark: f64, count: u64| Bucket {
            mark,
            count,
            frequency: 0.0,
        };
        let text = histogram_text(&[b(0.003285, 1), b(0.012167, 14), b(0.0125, 0)]);
        let expected = format!(
            "  3.285  [1]  |{}\n  12.167 [14] |{}\n  12.500 [0]  |\n",
            "∎".repeat(3),
            "∎".repeat(40)
        );
        assert_eq!(text, expected);
    }

    #[test]
    fn ghz_json_has_ghz_keys_and_units() {
        let r = report(synthetic(20, 5, 11));
        let j = r.to_ghz_json();
        for key in [
            "date",
            "options",
            "count",
            "total",
            "average",
            "fastest",
            "slowest",
            "rps",
            "histogram",
            "latencyDistribution",
            "statusCodeDistribution",
            "errorDistribution",
            "details",
            "endReason",
        ] {
            assert!(j.get(key).is_some(), "missing {key}");
        }
        assert_eq!(j["count"], 20);
        assert_eq!(j["total"], 2_000_000_000u64, "durations are ns");
        assert_eq!(j["statusCodeDistribution"]["OK"], 16);
        assert_eq!(j["statusCodeDistribution"]["Unavailable"], 4);
        assert_eq!(j["details"].as_array().map(Vec::len), Some(20));
        assert_eq!(j["latencyDistribution"][6]["percentage"], 99);
        assert_eq!(
            j["latencyDistribution"][6]["latency"],
            u64::try_from(r.latency_distribution[6].latency.as_nanos()).expect("fits")
        );
        assert_eq!(j["options"]["call"], "dsv2.v1.Inference/Generate");
        assert_eq!(j["options"]["timeout"], 20_000_000_000u64);
        assert_eq!(j["options"]["data"]["text"], "hi");
        assert_eq!(
            j["details"][0]["timestamp"],
            "2023-11-14T22:13:20.000000000Z"
        );
        let date = j["date"].as_str().expect("date string");
        assert!(humantime::parse_rfc3339(date).is_ok(), "{date}");
        assert_eq!(j["dsv2"]["completionTokens"], 16 * 16);
        r.to_ghz_json_string().expect("serializes");
    }

    #[test]
    fn decode_rate_sums_streams_and_leaves_out_failures_and_unary_calls() {
        let mut details = synthetic(4, 0, 3);
        details[0].decode = Some(DecodeSpan {
            tokens: 127,
            time: Duration::from_millis(254),
        });
        details[1].decode = Some(DecodeSpan {
            tokens: 127,
            time: Duration::from_millis(127),
        });
        details[2].error = Some("rpc error: code = Unavailable desc = gone".into());
        details[2].decode = Some(DecodeSpan {
            tokens: 1000,
            time: Duration::from_millis(1),
        });
        let r = report(details);
        let d = r.decode.expect("two streams decoded");
        assert_eq!((d.samples, d.tokens), (2, 254));
        assert_eq!(d.time_per_output_token(), Duration::from_micros(1500));
        assert!((d.tokens_per_sec_per_stream() - 254.0 / 0.381).abs() < 1e-6);
        assert!(r.to_string().contains("Time per output token:"));
        assert_eq!(r.to_ghz_json()["dsv2"]["decode"]["tokens"], 254);
        assert!(report(synthetic(3, 0, 1)).decode.is_none());
    }
}
