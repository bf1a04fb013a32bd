//! Test support for the cross-process tests: finds the built `dsv2-router`, `dsv2-expert` and
//! `dsv2` binaries, starts them as child processes on ephemeral loopback ports (each prints
//! `DSV2_READY <addr>` once it serves; a router with `--http-listen` prints
//! `DSV2_HTTP_READY <addr>` just before, and a server with `--metrics-listen`
//! `DSV2_METRICS_READY <addr>`), and kills every child when its guard drops. Also small blocking
//! HTTP/1.1 helpers and a Prometheus text parser for the metrics tests.
//!
//! Helpers panic with a message instead of returning errors: they only ever run inside tests,
//! where a panic with a clear reason is the failure report.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use dsv2_core::ModelConfig;
use dsv2_core::placement::{Placement, PlacementKind};
use dsv2_proto::inference::v1 as pb;
use dsv2_proto::inference::v1::inference_client::InferenceClient;
use tonic::transport::Channel;

/// How long a child may take to print `DSV2_READY` (debug builds on a busy 2-core machine).
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// The directory holding the workspace binaries: `$DSV2_BIN_DIR`, else the directory of the
/// running executable (a test runs from `target/<profile>/deps`, a bin from `target/<profile>`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DSV2_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("locating the running executable");
    let mut dir = exe
        .parent()
        .expect("the executable has a parent directory")
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary; panics with instructions when it has not been built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        p.exists(),
        "{} not found: the cross-process tests start the real binaries. Build them first with \
         `cargo build --workspace --bins` (scripts/test.sh does), in the same profile as the \
         tests, or point DSV2_BIN_DIR at the directory that holds them",
        p.display()
    );
    p
}

/// A golden fixture model dir (`v2`, `v2-lite`, `dense2`).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/models")
        .join(name)
}

/// The embedded tiny model (with tokenizer), written once per test process into a temp dir.
pub fn tiny_model() -> PathBuf {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().expect("creating a temp dir for the tiny model");
        let dir = dsv2_core::tiny::ensure(tmp.path()).expect("writing the tiny model");
        (tmp, dir)
    })
    .1
    .clone()
}

/// Experts per shard for a placement kind (the router computes the same with `--placement`).
pub fn placement(model_dir: &Path, shards: usize, kind: PlacementKind) -> Vec<Vec<usize>> {
    let cfg = ModelConfig::from_model_dir(model_dir).expect("reading config.json");
    Placement::build(&cfg, shards, kind)
        .expect("building the placement")
        .shards
}

/// `[0, 1, 2]` → `"0,1,2"` (the `--experts` syntax).
pub fn expert_list(ids: &[usize]) -> String {
    ids.iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Which address a `DSV2_*READY` line announced.
#[derive(Clone, Copy)]
enum Ready {
    Grpc,
    Http,
    Metrics,
}

/// One child process that announced its address; killed (SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    pub addr: SocketAddr,
    /// The HTTP API's address, for a router started with `--http-listen`.
    pub http_addr: Option<SocketAddr>,
    /// The metrics endpoint's address, for a server started with `--metrics-listen`.
    pub metrics_addr: Option<SocketAddr>,
    child: Child,
    log: tempfile::NamedTempFile,
}

impl Proc {
    /// Spawns `cmd` (stdout piped, stderr to a log file) and waits for `DSV2_READY <addr>`.
    pub fn start(name: &str, mut cmd: Command) -> Proc {
        let log = tempfile::NamedTempFile::new().expect("creating a log file");
        let stderr = log.reopen().expect("reopening the log file");
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .stdin(Stdio::null())
            .env("DSV2_LOG", "info");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({cmd:?}): {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Keep reading after READY so the child never blocks on a full pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                for (kind, prefix) in [
                    (Ready::Http, "DSV2_HTTP_READY "),
                    (Ready::Metrics, "DSV2_METRICS_READY "),
                    (Ready::Grpc, "DSV2_READY "),
                ] {
                    if let Some(addr) = line.strip_prefix(prefix) {
                        let _ = tx.send((kind, addr.trim().to_string()));
                    }
                }
            }
        });
        let t0 = Instant::now();
        let mut proc = Proc {
            name: name.to_string(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_addr: None,
            metrics_addr: None,
            child,
            log,
        };
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok((Ready::Http, a)) => {
                    proc.http_addr = Some(
                        a.parse()
                            .unwrap_or_else(|e| panic!("{name} printed DSV2_HTTP_READY {a}: {e}")),
                    );
                }
                Ok((Ready::Metrics, a)) => {
                    proc.metrics_addr =
                        Some(a.parse().unwrap_or_else(|e| {
                            panic!("{name} printed DSV2_METRICS_READY {a}: {e}")
                        }));
                }
                Ok((Ready::Grpc, a)) => {
                    proc.addr = a
                        .parse()
                        .unwrap_or_else(|e| panic!("{name} printed DSV2_READY {a}: {e}"));
                    return proc;
                }
                Err(_) => {
                    if let Ok(Some(status)) = proc.child.try_wait() {
                        panic!(
                            "{name} exited ({status}) before it was ready; its log:\n{}",
                            proc.log_tail(4000)
                        );
                    }
                    if t0.elapsed() > READY_TIMEOUT {
                        panic!(
                            "{name} was not ready within {READY_TIMEOUT:?}; its log:\n{}",
                            proc.log_tail(4000)
                        );
                    }
                }
            }
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last `max` bytes of the child's stderr.
    pub fn log_tail(&self, max: usize) -> String {
        let mut s = String::new();
        if let Ok(mut f) = self.log.reopen() {
            let _ = f.read_to_string(&mut s);
        }
        let cut = s.len().saturating_sub(max);
        let cut = (cut..=s.len())
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(s.len());
        s[cut..].to_string()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM (through the `kill` utility, to avoid unsafe libc calls in tests).
    pub fn sigterm(&self) {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill -TERM");
        assert!(st.success(), "kill -TERM {} failed", self.child.id());
    }

    /// The child's exit status if it has exited (a crashed server), else None.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the child to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- log of {} ({}) ----\n{}",
                self.name,
                self.addr,
                self.log_tail(3000)
            );
        }
        self.kill();
    }
}

/// `dsv2-expert` hosting `experts` of `model_dir` on `listen` (use port 0 for a fresh port).
pub fn start_expert(name: &str, model_dir: &Path, experts: &[usize], listen: &str) -> Proc {
    start_expert_with(name, model_dir, experts, listen, &Extra::default())
}

/// `start_expert` with `extra.expert_args` and `extra.env`.
pub fn start_expert_with(
    name: &str,
    model_dir: &Path,
    experts: &[usize],
    listen: &str,
    extra: &Extra<'_>,
) -> Proc {
    let mut cmd = Command::new(bin("dsv2-expert"));
    cmd.arg("--model-dir").arg(model_dir).args([
        "--experts",
        &expert_list(experts),
        "--listen",
        listen,
    ]);
    cmd.args(extra.expert_args);
    cmd.envs(extra.env.iter().copied());
    Proc::start(name, cmd)
}

/// What a test adds to a cluster's children.
#[derive(Default, Clone, Copy)]
pub struct Extra<'a> {
    /// Arguments added to every expert shard's command line.
    pub expert_args: &'a [&'a str],
    /// Environment variables of every child (router and shards).
    pub env: &'a [(&'a str, &'a str)],
}

/// A router and its expert shards; every child dies when this drops.
pub struct Cluster {
    pub model_dir: PathBuf,
    pub experts: Vec<Proc>,
    pub router: Proc,
}

impl Cluster {
    /// Starts one shard per entry of `shards` (its expert ids), then the router pointed at them
    /// with `router_args` added (e.g. `--placement contiguous`, `--kv-cache-blocks 8`).
    pub fn start(model_dir: &Path, shards: &[Vec<usize>], router_args: &[&str]) -> Cluster {
        Cluster::start_with(model_dir, shards, router_args, &Extra::default())
    }

    /// `start`, with arguments for the shards and environment variables for every child.
    pub fn start_with(
        model_dir: &Path,
        shards: &[Vec<usize>],
        router_args: &[&str],
        extra: &Extra<'_>,
    ) -> Cluster {
        // Start the shards together: each loads on its own.
        let experts: Vec<Proc> = std::thread::scope(|s| {
            let hs: Vec<_> = shards
                .iter()
                .enumerate()
                .map(|(i, ids)| {
                    s.spawn(move || {
                        start_expert_with(
                            &format!("expert-{i}"),
                            model_dir,
                            ids,
                            "127.0.0.1:0",
                            extra,
                        )
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("starting an expert shard"))
                .collect()
        });
        let mut cmd = Command::new(bin("dsv2-router"));
        cmd.arg("--model-dir")
            .arg(model_dir)
            .args(["--listen", "127.0.0.1:0"]);
        for e in &experts {
            cmd.args(["--shard", &e.url()]);
        }
        cmd.args(router_args);
        cmd.envs(extra.env.iter().copied());
        let router = Proc::start("router", cmd);
        Cluster {
            model_dir: model_dir.to_path_buf(),
            experts,
            router,
        }
    }

    /// Two shards with the model's default (groups) placement.
    pub fn two_shards(model_dir: &Path, router_args: &[&str]) -> Cluster {
        let p = placement(model_dir, 2, PlacementKind::Groups);
        Cluster::start(model_dir, &p, router_args)
    }

    pub fn endpoint(&self) -> String {
        self.router.url()
    }

    pub async fn client(&self) -> InferenceClient<Channel> {
        connect(&self.endpoint()).await
    }
}

/// A channel to `url`, retried briefly (the server printed READY, but be lenient on a busy box).
pub async fn channel(url: &str) -> Channel {
    let ep = tonic::transport::Endpoint::from_shared(url.to_string()).expect("a valid URL");
    let mut last = None;
    for _ in 0..20 {
        match ep.connect().await {
            Ok(c) => return c,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cannot connect to {url}: {last:?}")
}

pub async fn connect(url: &str) -> InferenceClient<Channel> {
    InferenceClient::new(channel(url).await)
}

/// A request with token ids, greedy unless changed by the caller.
pub fn ids_request(ids: &[u32], max_new_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds {
            ids: ids.to_vec(),
        })),
        max_new_tokens: Some(max_new_tokens),
        temperature: Some(0.0),
        ignore_eos: true,
        ..Default::default()
    }
}

/// A greedy request with a text prompt.
pub fn text_request(text: &str, max_new_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(text.to_string())),
        max_new_tokens: Some(max_new_tokens),
        temperature: Some(0.0),
        ..Default::default()
    }
}

/// What a finished request produced, from either RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: i32,
    pub completion_tokens: u32,
}

pub async fn generate(
    c: &mut InferenceClient<Channel>,
    req: pb::GenerateRequest,
) -> Result<Output, tonic::Status> {
    let r = c.generate(req).await?.into_inner();
    Ok(Output {
        token_ids: r.token_ids,
        text: r.text,
        finish_reason: r.finish_reason,
        completion_tokens: r.completion_tokens,
    })
}

/// Runs GenerateStream to the end; fails if the stream ends without a summary.
pub async fn generate_stream(
    c: &mut InferenceClient<Channel>,
    req: pb::GenerateRequest,
) -> Result<Output, tonic::Status> {
    generate_stream_counting(c, req, None).await
}

/// [`generate_stream`], adding every streamed token to `tokens` as it arrives (tests that act
/// at a point of a run, e.g. kill a shard after so many tokens).
pub async fn generate_stream_counting(
    c: &mut InferenceClient<Channel>,
    req: pb::GenerateRequest,
    tokens: Option<&std::sync::atomic::AtomicUsize>,
) -> Result<Output, tonic::Status> {
    let mut s = c.generate_stream(req).await?.into_inner();
    let mut out = Output {
        token_ids: vec![],
        text: String::new(),
        finish_reason: 0,
        completion_tokens: 0,
    };
    while let Some(m) = s.message().await? {
        if let Some(t) = tokens {
            t.fetch_add(m.token_ids.len(), std::sync::atomic::Ordering::SeqCst);
        }
        out.token_ids.extend(&m.token_ids);
        out.text.push_str(&m.text);
        if let Some(sum) = m.summary {
            out.finish_reason = sum.finish_reason;
            out.completion_tokens = sum.completion_tokens;
        }
    }
    if out.finish_reason == 0 {
        return Err(tonic::Status::internal(
            "test: stream ended without a summary",
        ));
    }
    Ok(out)
}

/// The in-process reference: `dsv2 generate --json` with `args`; returns (output_ids, text).
pub fn reference_generate(model_dir: &Path, args: &[&str]) -> (Vec<u32>, String) {
    let out = Command::new(bin("dsv2"))
        .arg("generate")
        .arg("--model-dir")
        .arg(model_dir)
        .arg("--json")
        .args(args)
        .output()
        .expect("running dsv2 generate");
    assert!(
        out.status.success(),
        "dsv2 generate {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "dsv2 generate --json printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let ids = v["output_ids"]
        .as_array()
        .expect("output_ids")
        .iter()
        .map(|x| x.as_u64().expect("a token id") as u32)
        .collect();
    (ids, v["text"].as_str().expect("text").to_string())
}

/// Golden prompts of a fixture (`reference.json` cases).
pub fn fixture_prompts(name: &str) -> Vec<Vec<u32>> {
    let text = std::fs::read_to_string(fixture(name).join("reference.json"))
        .expect("reading reference.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("reference.json is JSON");
    v["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            c["input_ids"]
                .as_array()
                .expect("input_ids")
                .iter()
                .map(|x| x.as_u64().expect("id") as u32)
                .collect()
        })
        .collect()
}

/// POST a JSON body with [`http_request`] from a blocking thread (the tests' clusters run on the
/// async runtime); `extra_headers` follow the content type. The status and the body.
pub async fn post_json(
    addr: SocketAddr,
    path: &str,
    body: &serde_json::Value,
    extra_headers: &[(&str, &str)],
) -> (u16, String) {
    let (path, body) = (path.to_string(), body.to_string());
    let headers: Vec<(String, String)> = std::iter::once(("content-type", "application/json"))
        .chain(extra_headers.iter().copied())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        http_request(addr, "POST", &path, &h, &body)
    })
    .await
    .expect("HTTP task")
}

/// One blocking HTTP/1.1 exchange on a fresh connection (`Connection: close`): the status and
/// the body. For the metrics endpoints and small JSON calls; `headers` are added as given.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("a read timeout");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("sending the request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("reading the response");
    let text = String::from_utf8(raw).expect("a UTF-8 response");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "chunked answers are not decoded here: {head}"
    );
    (status, body.to_string())
}

/// GET /metrics of a server started with `--metrics-listen`.
pub fn scrape(p: &Proc) -> String {
    let addr = p
        .metrics_addr
        .unwrap_or_else(|| panic!("{} was started without --metrics-listen", p.name));
    let (status, body) = http_request(addr, "GET", "/metrics", &[], "");
    assert_eq!(status, 200, "GET /metrics of {}: {body}", p.name);
    body
}

/// One sample of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// The samples of a Prometheus text exposition (comments skipped). Panics on a malformed line:
/// what a scraper would reject is a test failure.
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|e| panic!("bad value in {line:?}: {e}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let inner = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                let mut labels = BTreeMap::new();
                // Label values here hold no commas or quotes.
                for pair in inner.split(',').filter(|p| !p.is_empty()) {
                    let (k, v) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
                    let v = v
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .unwrap_or_else(|| panic!("unquoted label {pair:?} in {line:?}"));
                    labels.insert(k.to_string(), v.to_string());
                }
                (name.to_string(), labels)
            }
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// The sum of the samples named `name` whose labels include `with`.
pub fn metric_sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| {
            s.name == name
                && with
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        })
        .map(|s| s.value)
        .sum()
}
