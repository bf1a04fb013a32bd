//! `dsv2 up`: a local cluster — N expert shards and one router as child processes on loopback —
//! on the embedded tiny model or --model-dir. Prints the gRPC endpoint (and, on stderr, the
//! OpenAI-compatible HTTP API's and every child's /metrics) and runs until Ctrl-C, or with
//! --prompt answers one request and stops (the README's one-command demo).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args as ClapArgs;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Model directory; `tiny`: the embedded tiny model trained on the Rust book; `tiny-random`:
    /// the embedded tiny model with random weights.
    #[arg(long, default_value = "tiny")]
    model_dir: String,
    /// Number of expert shards.
    #[arg(long, default_value_t = 2)]
    shards: usize,
    /// Router address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: String,
    /// Address of the router's OpenAI-compatible HTTP API (/v1/completions,
    /// /v1/chat/completions, /v1/models, /health); `off`: gRPC only.
    #[arg(long, default_value = "127.0.0.1:8000")]
    http_listen: String,
    /// Prometheus metrics (GET /metrics) of the router on this address, and of expert shard i on
    /// the next port + i (all on free ports when the port is 0, the default; the addresses are
    /// printed); `off`: none.
    #[arg(long, default_value = "127.0.0.1:0")]
    metrics_listen: String,
    /// Export the trace spans of the router and the shards over OTLP/gRPC to this collector
    /// (e.g. http://127.0.0.1:4317).
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Expert placement passed to the router (groups, contiguous or a file).
    #[arg(long)]
    placement: Option<String>,
    /// Start the router with --no-prefix-cache (every request prefills its whole prompt).
    #[arg(long)]
    no_prefix_cache: bool,
    /// The router's --host-cache-gb: GiB of host memory for cached KV blocks the device evicts
    /// (default: the router's, off on the CPU).
    #[arg(long, value_name = "GIB")]
    host_cache_gb: Option<String>,
    /// Answer this prompt once the cluster is up, print the answer, then stop everything.
    #[arg(long)]
    prompt: Option<String>,
    /// Tokens to generate for --prompt.
    #[arg(long, default_value_t = 32)]
    max_output_len: usize,
    /// Sampling temperature for --prompt; 0 is greedy. The demo default (with --top-p and
    /// --seed) reads better than greedy, which repeats itself on a small model.
    #[arg(long, default_value_t = 0.7, allow_negative_numbers = true)]
    temperature: f32,
    /// Nucleus sampling threshold for --prompt.
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
    top_p: f32,
    /// Sampling seed for --prompt: the same seed gives the same answer.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Log level of the children (RUST_LOG syntax); default info, or warn with --prompt.
    #[arg(long)]
    child_log_level: Option<String>,
}

/// Children are killed when this drops, on every exit path.
struct Cluster {
    children: Vec<(String, Child)>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (name, c) in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
            tracing::debug!(%name, "stopped");
        }
    }
}

fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the dsv2 executable")?;
    let p = exe.with_file_name(name);
    if !p.exists() {
        bail!(
            "{} not found next to {}: build the workspace (cargo build --release) so all binaries sit together",
            name,
            exe.display()
        );
    }
    Ok(p)
}

/// The addresses a child announced on stdout.
struct Ready {
    /// `DSV2_READY <addr>`: its gRPC address.
    addr: String,
    /// `DSV2_HTTP_READY <addr>` (printed before READY): the router's HTTP API, when on.
    http: Option<String>,
    /// `DSV2_METRICS_READY <addr>` (printed before READY): its /metrics, when on.
    metrics: Option<String>,
}

/// What a `DSV2_*READY` line announced.
enum Line {
    Grpc(String),
    Http(String),
    Metrics(String),
}

/// Starts a child and waits for its `DSV2_READY <addr>` line.
fn start(cluster: &mut Cluster, name: &str, mut cmd: Command, timeout: Duration) -> Result<Ready> {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .stdin(Stdio::null());
    let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    cluster.children.push((name.to_string(), child));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let sent = if let Some(addr) = line.strip_prefix("DSV2_HTTP_READY ") {
                Line::Http(addr.to_string())
            } else if let Some(addr) = line.strip_prefix("DSV2_METRICS_READY ") {
                Line::Metrics(addr.to_string())
            } else if let Some(addr) = line.strip_prefix("DSV2_READY ") {
                Line::Grpc(addr.to_string())
            } else {
                continue;
            };
            let _ = tx.send(sent);
        }
    });
    let t0 = Instant::now();
    let (mut http, mut metrics) = (None, None);
    loop {
        let left = timeout.saturating_sub(t0.elapsed());
        match rx.recv_timeout(left) {
            Ok(Line::Http(addr)) => http = Some(addr),
            Ok(Line::Metrics(addr)) => metrics = Some(addr),
            Ok(Line::Grpc(addr)) => {
                return Ok(Ready {
                    addr,
                    http,
                    metrics,
                });
            }
            Err(_) => bail!("{name} did not become ready within {timeout:?} (see its log above)"),
        }
    }
}

pub fn run(a: Args) -> Result<()> {
    if a.shards == 0 {
        bail!("--shards must be at least 1");
    }
    let child_log = a
        .child_log_level
        .clone()
        .unwrap_or_else(|| if a.prompt.is_some() { "warn" } else { "info" }.to_string());
    let dir = crate::common::model_dir(&a.model_dir)?;
    let dir = dir.to_string_lossy().into_owned();
    let metrics: Option<SocketAddr> = match a.metrics_listen.as_str() {
        "off" => None,
        m => Some(m.parse().with_context(|| {
            format!("--metrics-listen {m}: an address like 127.0.0.1:9400, or off")
        })?),
    };
    // Shard i's metrics: the router's port + 1 + i, or a free port.
    let shard_metrics = |i: usize| {
        metrics.map(|m| {
            let port = if m.port() == 0 {
                0
            } else {
                m.port().saturating_add(1 + i as u16)
            };
            SocketAddr::new(m.ip(), port).to_string()
        })
    };
    let mut cluster = Cluster {
        children: Vec::new(),
    };
    let t0 = Instant::now();
    let mut shard_urls = Vec::new();
    let mut metrics_urls = Vec::new();
    for i in 0..a.shards {
        let mut cmd = Command::new(sibling("dsv2-expert")?);
        cmd.args([
            "--model-dir",
            &dir,
            "--listen",
            "127.0.0.1:0",
            "--shard-index",
            &i.to_string(),
            "--num-shards",
            &a.shards.to_string(),
            "--log-level",
            &child_log,
        ]);
        if let Some(m) = shard_metrics(i) {
            cmd.args(["--metrics-listen", &m]);
        }
        if let Some(o) = &a.otlp_endpoint {
            cmd.args(["--otlp-endpoint", o]);
        }
        let ready = start(
            &mut cluster,
            &format!("expert-{i}"),
            cmd,
            Duration::from_secs(600),
        )?;
        let addr = ready.addr;
        eprintln!("expert shard {i} ready at {addr}");
        shard_urls.push(format!("http://{addr}"));
        if let Some(m) = ready.metrics {
            metrics_urls.push(format!("expert-{i} http://{m}/metrics"));
        }
    }
    let mut cmd = Command::new(sibling("dsv2-router")?);
    cmd.args([
        "--model-dir",
        &dir,
        "--listen",
        &a.listen,
        "--log-level",
        &child_log,
    ]);
    for u in &shard_urls {
        cmd.args(["--shard", u]);
    }
    if let Some(p) = &a.placement {
        cmd.args(["--placement", p]);
    }
    if a.no_prefix_cache {
        cmd.arg("--no-prefix-cache");
    }
    if let Some(gb) = &a.host_cache_gb {
        cmd.args(["--host-cache-gb", gb]);
    }
    if a.http_listen != "off" {
        cmd.args(["--http-listen", &a.http_listen]);
    }
    if let Some(m) = metrics {
        cmd.args(["--metrics-listen", &m.to_string()]);
    }
    if let Some(o) = &a.otlp_endpoint {
        cmd.args(["--otlp-endpoint", o]);
    }
    let ready = start(&mut cluster, "router", cmd, Duration::from_secs(600))?;
    if let Some(m) = &ready.metrics {
        metrics_urls.insert(0, format!("router http://{m}/metrics"));
    }
    let endpoint = format!("http://{}", ready.addr);
    let http = ready.http.map(|h| format!("http://{h}"));
    eprintln!(
        "cluster up in {:.1}s: router {endpoint} (gRPC dsv2.v1.Inference){} with {} expert shards",
        t0.elapsed().as_secs_f64(),
        http.as_deref()
            .map(|h| format!(", {h}/v1 (HTTP, OpenAI-compatible)"))
            .unwrap_or_default(),
        a.shards
    );
    if !metrics_urls.is_empty() {
        eprintln!("metrics: {}", metrics_urls.join(", "));
    }
    println!("{endpoint}");
    if let Some(prompt) = &a.prompt {
        let args = crate::cmd_generate::Args {
            model_dir: a.model_dir.clone(),
            input_text: Some(prompt.clone()),
            input_ids: None,
            max_output_len: a.max_output_len,
            temperature: a.temperature,
            top_k: 0,
            top_p: a.top_p,
            seed: Some(a.seed),
            stop: vec![],
            stop_token_ids: None,
            ignore_eos: false,
            json: false,
            logprobs: 0,
            prompt_logprobs: None,
            random_weights: None,
            endpoint: Some(endpoint.clone()),
            stream: true,
            security: Default::default(),
            device: "cpu".into(),
            kv_cache_dtype: Default::default(),
        };
        crate::remote::run(&args, &endpoint)?;
        eprintln!("stopping the cluster");
        return Ok(());
    }
    eprintln!(
        "try: dsv2 generate --endpoint {endpoint} --input-text \"Hello\"   (Ctrl-C stops the cluster)"
    );
    if let Some(h) = &http {
        eprintln!(
            "  or: curl -N {h}/v1/chat/completions -d '{{\"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], \"stream\": true}}'"
        );
    }
    let (tx, rx) = std::sync::mpsc::channel();
    ctrlc_channel(tx)?;
    loop {
        if rx.recv_timeout(Duration::from_millis(500)).is_ok() {
            eprintln!("Ctrl-C: stopping the cluster");
            return Ok(());
        }
        for (name, c) in cluster.children.iter_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                bail!("{name} exited ({status}); stopping the cluster");
            }
        }
    }
}

fn ctrlc_channel(tx: std::sync::mpsc::Sender<()>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async {
            let term = async {
                #[cfg(unix)]
                if let Ok(mut s) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                {
                    s.recv().await;
                    return;
                }
                std::future::pending::<()>().await
            };
            tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term => {} }
        });
        let _ = tx.send(());
    });
    Ok(())
}
