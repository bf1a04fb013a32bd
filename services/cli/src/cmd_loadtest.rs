//! `dsv2 loadtest`: a ghz-style load test of a running router (ghz itself is not installable on
//! our build machines); prints ghz's summary plus tokens/s and time to first token.

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use dsv2_loadtest::{CallKind, LoadtestConfig, RequestData};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Router URL, e.g. http://127.0.0.1:50051 (https:// for a router serving TLS).
    #[arg(long)]
    endpoint: String,
    #[command(flatten)]
    security: dsv2_security::args::ClientArgs,
    /// generate (unary) or stream.
    #[arg(long, default_value = "generate")]
    call: String,
    /// Concurrent workers (ghz -c).
    #[arg(long, short = 'c', default_value_t = 8)]
    concurrency: usize,
    /// Requests to send (ghz -n; 0 = until --duration).
    #[arg(long, short = 'n', default_value_t = 64)]
    total: u64,
    /// Stop after this long, e.g. 30s or 2m (ghz -z).
    #[arg(long, short = 'z')]
    duration: Option<String>,
    /// Request data file: a GenerateRequest as JSON, or a list of them used round-robin (ghz
    /// -D format).
    #[arg(long)]
    data: Option<std::path::PathBuf>,
    /// Per-request timeout, e.g. 20s.
    #[arg(long, default_value = "60s")]
    timeout: String,
    /// Also write ghz's JSON report here.
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let call: CallKind = a.call.parse()?;
    let data = match &a.data {
        Some(p) => RequestData::from_file(p)?,
        None => RequestData::from_json_str(
            r#"{"text": "The router receives a request", "max_new_tokens": 16, "temperature": 0}"#,
        )?,
    };
    let mut cfg = LoadtestConfig::new(a.endpoint.clone(), call, data);
    cfg.concurrency = a.concurrency;
    cfg.security = a.security.clone();
    cfg.total = a.total;
    cfg.duration = a
        .duration
        .as_deref()
        .map(humantime::parse_duration)
        .transpose()
        .context("--duration")?;
    cfg.timeout = humantime::parse_duration(&a.timeout).context("--timeout")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(async {
        dsv2_loadtest::run_until(cfg, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
    })?;
    println!("{report}");
    if let Some(p) = &a.json_out {
        std::fs::write(p, report.to_ghz_json_string()?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
