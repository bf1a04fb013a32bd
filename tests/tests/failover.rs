//! Replicas and failover over the gRPC data plane: router + 4 shards on the v2 fixture, 64
//! streaming greedy requests, one shard SIGKILLed mid-run. With 2 replicas every request
//! finishes with the output of a run without the kill, and the restarted shard takes rows
//! again; with 1 replica the requests of the lost experts fail UNAVAILABLE within 1 s and
//! nothing hangs.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dsv2_core::ModelConfig;
use dsv2_core::placement::Placement;
use dsv2_e2e::{
    Output, Proc, bin, fixture, generate_stream, generate_stream_counting, ids_request,
    start_expert,
};
use dsv2_proto::inference::v1::inference_client::InferenceClient;
use tonic::transport::Channel;

const REQUESTS: usize = 64;
const MAX_NEW: u32 = 16;

/// Request `i`: a distinct prompt (length 3..=22), greedy.
fn request(i: usize) -> dsv2_proto::inference::v1::GenerateRequest {
    let len = 3 + (i * 7) % 20;
    let prompt: Vec<u32> = (0..len)
        .map(|j| 3 + ((i * 131 + j * 17) % 500) as u32)
        .collect();
    ids_request(&prompt, MAX_NEW)
}

struct Cluster {
    shards: Vec<Proc>,
    experts: Vec<Vec<usize>>,
    router: Proc,
    metrics: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl Cluster {
    fn start(replicas: usize) -> Cluster {
        let dir = fixture("v2");
        let cfg = ModelConfig::from_model_dir(&dir).expect("fixture config");
        let experts = Placement::default_for(&cfg, 4)
            .and_then(|p| p.replicated(replicas))
            .expect("placement")
            .shards;
        let shards: Vec<Proc> = experts
            .iter()
            .enumerate()
            .map(|(i, ids)| start_expert(&format!("expert-{i}"), &dir, ids, "127.0.0.1:0"))
            .collect();
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(bin("dsv2-router"));
        cmd.arg("--model-dir").arg(&dir).args([
            "--listen",
            "127.0.0.1:0",
            "--replicas",
            &replicas.to_string(),
            "--no-prefix-cache",
            "--metrics-listen",
            &metrics,
        ]);
        for s in &shards {
            cmd.args(["--shard", &s.url()]);
        }
        let router = Proc::start("router", cmd);
        Cluster {
            shards,
            experts,
            router,
            metrics,
        }
    }

    /// Starts shard `i` again on its old address (after a kill).
    fn restart(&mut self, i: usize) {
        let addr = self.shards[i].addr.to_string();
        let dir = fixture("v2");
        self.shards[i] = start_expert(&format!("expert-{i}"), &dir, &self.experts[i], &addr);
    }

    /// The value of the metric line starting with `series` (name and labels).
    fn metric(&self, series: &str) -> f64 {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.metrics).expect("connecting to /metrics");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("sending GET /metrics");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("reading /metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
    }

    fn shard_series(&self, name: &str, i: usize) -> String {
        format!("{name}{{shard=\"{}\"}} ", self.shards[i].url())
    }
}

type RunResult = Vec<(Result<Output, tonic::Status>, Instant)>;

/// Runs the 64 requests at once, each streamed; `tokens` counts streamed tokens as they come.
async fn run_all(client: &InferenceClient<Channel>, tokens: Arc<AtomicUsize>) -> RunResult {
    let handles: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let mut c = client.clone();
            let tokens = tokens.clone();
            tokio::spawn(async move {
                let r = generate_stream_counting(&mut c, request(i), Some(&tokens)).await;
                (r, Instant::now())
            })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("request task"));
    }
    out
}

/// SIGKILLs `pid` once `tokens` reaches `after`; returns the count then and the time.
fn kill_when(
    tokens: Arc<AtomicUsize>,
    after: usize,
    pid: u32,
) -> tokio::task::JoinHandle<(usize, Instant)> {
    tokio::spawn(async move {
        while tokens.load(Ordering::SeqCst) < after {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let st = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .expect("running kill -KILL");
        assert!(st.success(), "kill -KILL {pid} failed");
        (tokens.load(Ordering::SeqCst), Instant::now())
    })
}

fn all_ok(run: RunResult, what: &str) -> Vec<Output> {
    run.into_iter()
        .enumerate()
        .map(|(i, (r, _))| r.unwrap_or_else(|e| panic!("{what}: request {i} failed: {e:?}")))
        .collect()
}

async fn wait_metric(c: &Cluster, series: &str, want: f64, within: Duration) {
    let t0 = Instant::now();
    while c.metric(series) != want {
        assert!(
            t0.elapsed() < within,
            "{series} is not {want} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_lose_no_request_when_a_shard_is_killed() {
    let mut c = Cluster::start(2);
    let client = dsv2_e2e::connect(&c.router.url()).await;
    let reference = all_ok(
        run_all(&client, Arc::new(AtomicUsize::new(0))).await,
        "run without a kill",
    );
    let total: usize = reference.iter().map(|o| o.token_ids.len()).sum();
    assert_eq!(total, REQUESTS * MAX_NEW as usize);
    for i in 0..4 {
        assert!(c.metric(&c.shard_series("dsv2_router_shard_rows_sent_total", i)) > 0.0);
    }

    // Kill shard 1 a quarter of the way through the tokens.
    let tokens = Arc::new(AtomicUsize::new(0));
    let killer = kill_when(tokens.clone(), total / 4, c.shards[1].pid());
    let run = run_all(&client, tokens.clone()).await;
    let (at_kill, _) = killer.await.expect("kill task");
    assert!(
        at_kill < total,
        "the kill came after the run ({at_kill} of {total} tokens)"
    );
    let got = all_ok(run, "run with shard 1 killed");
    for (i, (g, want)) in got.iter().zip(&reference).enumerate() {
        assert_eq!(g, want, "request {i} differs from the run without the kill");
    }
    c.shards[1].kill();
    assert!(c.metric("dsv2_router_shard_failovers_total") >= 1.0);
    assert_eq!(c.metric(&c.shard_series("dsv2_router_shard_up", 1)), 0.0);

    // Restarted on its address, it is probed back and takes rows again.
    let rows_before = c.metric(&c.shard_series("dsv2_router_shard_rows_sent_total", 1));
    c.restart(1);
    wait_metric(
        &c,
        &c.shard_series("dsv2_router_shard_up", 1),
        1.0,
        Duration::from_secs(10),
    )
    .await;
    let again = all_ok(
        run_all(&client, Arc::new(AtomicUsize::new(0))).await,
        "run after the restart",
    );
    assert_eq!(again, reference, "outputs after the restart");
    let rows_after = c.metric(&c.shard_series("dsv2_router_shard_rows_sent_total", 1));
    assert!(
        rows_after > rows_before,
        "the restarted shard got no rows ({rows_before} -> {rows_after})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_fails_unavailable_within_a_second_and_recovers() {
    let mut c = Cluster::start(1);
    let client = dsv2_e2e::connect(&c.router.url()).await;
    let total = REQUESTS * MAX_NEW as usize;
    let tokens = Arc::new(AtomicUsize::new(0));
    let killer = kill_when(tokens.clone(), total / 4, c.shards[1].pid());
    let run = tokio::time::timeout(Duration::from_secs(60), run_all(&client, tokens.clone()))
        .await
        .expect("requests hung after the kill");
    let (at_kill, killed_at) = killer.await.expect("kill task");
    assert!(at_kill < total, "the kill came after the run");
    let mut unavailable = 0;
    for (i, (r, ended)) in run.iter().enumerate() {
        match r {
            Ok(o) => assert_eq!(o.token_ids.len(), MAX_NEW as usize),
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::Unavailable, "request {i}: {e:?}");
                let after = ended.saturating_duration_since(killed_at);
                assert!(
                    after <= Duration::from_secs(1),
                    "request {i} failed {after:?} after the kill"
                );
                unavailable += 1;
            }
        }
    }
    assert!(unavailable > 0, "no request needed the killed shard");
    assert_eq!(c.metric(&c.shard_series("dsv2_router_shard_up", 1)), 0.0);

    // New requests that need the lost experts fail at once, too.
    let mut cl = client.clone();
    let mut failed = 0;
    for i in 0..4 {
        let t0 = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(5), generate_stream(&mut cl, request(i)))
            .await
            .expect("a request hung with the shard down");
        if let Err(e) = r {
            assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
            assert!(
                t0.elapsed() <= Duration::from_secs(1),
                "UNAVAILABLE took {:?}",
                t0.elapsed()
            );
            failed += 1;
        }
    }
    assert!(failed > 0, "no new request needed the killed shard");

    // Back on its address, it serves again and the requests succeed.
    c.shards[1].kill();
    c.restart(1);
    wait_metric(
        &c,
        &c.shard_series("dsv2_router_shard_up", 1),
        1.0,
        Duration::from_secs(10),
    )
    .await;
    let after = run_all(&client, Arc::new(AtomicUsize::new(0))).await;
    all_ok(after, "run after the restart");
}
