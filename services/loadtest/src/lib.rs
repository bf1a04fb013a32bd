//! ghz-compatible load generator for `dsv2.v1.Inference`: runs N requests (or for a duration)
//! with C concurrent workers and reports ghz's summary and JSON report, plus generated tokens/s
//! and time to first token.
//!
//! Written by hand rather than wrapping ghz because ghz cannot be installed on our machines;
//! the statistics follow ghz's runner/reporter.go so numbers compare across the two tools.

mod config;
mod error;
mod report;
mod runner;

pub use config::{CallKind, LoadtestConfig, RequestData};
pub use error::LoadtestError;
pub use report::{
    Bucket, CallResult, DecodeSpan, DecodeStats, EndReason, HISTOGRAM_STEPS, LatencyPercentile,
    PERCENTILES, Report, ReportOptions, TtftSource, TtftStats, format_nano_unit, histogram,
    latency_distribution, nearest_rank,
};
pub use runner::{go_code_name, run, run_until};
