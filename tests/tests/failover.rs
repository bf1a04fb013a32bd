//! Replicas and failover over the gRPC data plane: router + 4 shards on the v2 fixture, 64
//! streaming greedy requests, one shard SIGKILLed mid-run. With 2 replicas every request
//! finishes with the output of a run without the kill, and the restarted shard takes rows
//! again; with 1 replica the requests of the lost experts fail UNAVAILABLE within 1 s and
//! nothing hangs, while the requests that never need them finish with the output of a run
//! without the kill (on a copy of the fixture whose gate decides who needs them, `GatedModel`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use std::sync::Mutex;

use dsv2_core::ModelConfig;
use dsv2_core::backend::Backend;
use dsv2_core::cpu::CpuBackend;
use dsv2_core::engine::{Engine, EngineConfig, GenerateParams, SeqRequest, run_to_completion};
use dsv2_core::model::{ExpertExecutor, LocalExperts, PendingExperts};
use dsv2_core::placement::Placement;
use dsv2_core::routing::Routing;
use dsv2_core::weights::WeightStore;
use dsv2_e2e::{
    Output, Proc, bin, fixture, generate_stream, generate_stream_counting, ids_request,
    start_expert,
};
use dsv2_proto::inference::v1::GenerateRequest;
use dsv2_proto::inference::v1::inference_client::InferenceClient;
use tonic::transport::Channel;

const REQUESTS: usize = 64;
const MAX_NEW: u32 = 16;

/// Request `i`: a distinct prompt (length 3..=22), greedy.
fn request(i: usize) -> GenerateRequest {
    let len = 3 + (i * 7) % 20;
    let prompt: Vec<u32> = (0..len)
        .map(|j| 3 + ((i * 131 + j * 17) % 500) as u32)
        .collect();
    ids_request(&prompt, MAX_NEW)
}

struct Cluster {
    dir: PathBuf,
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
    /// The v2 fixture on 4 shards, its default placement with `replicas` owners per expert.
    fn start(replicas: usize) -> Cluster {
        let dir = fixture("v2");
        let cfg = ModelConfig::from_model_dir(&dir).expect("fixture config");
        let experts = Placement::default_for(&cfg, 4)
            .and_then(|p| p.replicated(replicas))
            .expect("placement")
            .shards;
        Cluster::start_with(dir, experts, None, replicas)
    }

    /// Shards hosting `experts` of `dir`; the router reads `placement_file` (which must list
    /// the same) or, without one, computes the default placement with `replicas`.
    fn start_with(
        dir: PathBuf,
        experts: Vec<Vec<usize>>,
        placement_file: Option<&Path>,
        replicas: usize,
    ) -> Cluster {
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
        if let Some(f) = placement_file {
            cmd.arg("--placement").arg(f);
        }
        for s in &shards {
            cmd.args(["--shard", &s.url()]);
        }
        let router = Proc::start("router", cmd);
        Cluster {
            dir,
            shards,
            experts,
            router,
            metrics,
        }
    }

    /// Starts shard `i` again on its old address (after a kill).
    fn restart(&mut self, i: usize) {
        let addr = self.shards[i].addr.to_string();
        self.shards[i] = start_expert(&format!("expert-{i}"), &self.dir, &self.experts[i], &addr);
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
    let reqs: Vec<_> = (0..REQUESTS).map(request).collect();
    run_reqs(client, &reqs, tokens).await
}

/// Runs `reqs` at once, each streamed; `tokens` counts streamed tokens as they come.
async fn run_reqs(
    client: &InferenceClient<Channel>,
    reqs: &[GenerateRequest],
    tokens: Arc<AtomicUsize>,
) -> RunResult {
    let handles: Vec<_> = reqs
        .iter()
        .map(|req| {
            let mut c = client.clone();
            let tokens = tokens.clone();
            let req = req.clone();
            tokio::spawn(async move {
                let r = generate_stream_counting(&mut c, req, Some(&tokens)).await;
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

/// The routed expert that `GatedModel` gives a shard of its own.
const EXPERT: usize = 15;
/// The tokens whose rows, and only theirs, choose `EXPERT`.
const TRIGGERS: std::ops::Range<u32> = 500..512;
/// Two channels of the residual stream that only the embedding writes.
const BIAS: usize = 62;
const TRIG: usize = 63;

/// A copy of the v2 fixture whose gate decides who needs routed expert `EXPERT`: exactly the
/// rows whose token is one of `TRIGGERS`, and a trigger row always generates a trigger. So a
/// request whose prompt ends with a trigger needs `EXPERT` at every step, prefill and each
/// decode step, and a request with no trigger never does (the fixture's own routing spreads
/// every request over all 16 experts, so no placement of it could leave a request unaffected).
///
/// How: channels `BIAS` and `TRIG` of the residual stream are written by the embedding only
/// (their rows of every o_proj and down_proj are zero), so they reach every layer unchanged:
/// `BIAS` is 1 for every token, `TRIG` is 4 for the triggers and 0 for the others (whose
/// other channels are ~N(0, 1)). With their norm weights set to 1, `EXPERT`'s gate row is
/// 64 x (TRIG - BIAS) of the normed row: about -60 on any other row, far below the fixture's
/// gate logits (|logit| < 6), and about +170 on a trigger row, far above them. The triggers'
/// lm_head rows are the same, so no other row ever generates a trigger and a trigger row
/// generates one (the lowest: argmax takes the first of equal logits).
/// `check_routing` verifies all of this on the CPU model before the cluster test relies on it.
struct GatedModel {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl GatedModel {
    fn write() -> GatedModel {
        let src = fixture("v2");
        let cfg = ModelConfig::from_model_dir(&src).expect("fixture config");
        let h = cfg.hidden_size;
        assert!(TRIG < h && (TRIGGERS.end as usize) <= cfg.vocab_size);
        assert!(EXPERT < cfg.n_routed_experts && !cfg.tie_word_embeddings);
        let store = WeightStore::open(&src, |_| true).expect("opening the v2 fixture");
        let gate_row = |row: &mut [f32]| {
            row.fill(0.0);
            row[BIAS] = -64.0;
            row[TRIG] = 64.0;
        };
        let mut tensors = Vec::new();
        for name in store.names() {
            let t = store.tensor(name).expect("a listed tensor");
            let shape = t.shape.clone();
            let cols = shape.last().copied().unwrap_or(1);
            let mut v = t.to_f32_vec();
            if name == "model.embed_tokens.weight" {
                for (tok, row) in v.chunks_mut(h).enumerate() {
                    row[BIAS] = 1.0;
                    row[TRIG] = if TRIGGERS.contains(&(tok as u32)) {
                        4.0
                    } else {
                        0.0
                    };
                }
            } else if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
                // [hidden, in]: these rows are what a layer adds to the two channels.
                for r in [BIAS, TRIG] {
                    v[r * cols..(r + 1) * cols].fill(0.0);
                }
            } else if name.ends_with("post_attention_layernorm.weight")
                || name == "model.norm.weight"
            {
                v[BIAS] = 1.0;
                v[TRIG] = 1.0;
            } else if name.ends_with("mlp.gate.weight") {
                gate_row(&mut v[EXPERT * h..(EXPERT + 1) * h]);
            } else if name == "lm_head.weight" {
                for tok in TRIGGERS {
                    gate_row(&mut v[tok as usize * h..(tok as usize + 1) * h]);
                }
            }
            tensors.push((name.to_string(), shape, v));
        }
        let tmp = tempfile::tempdir().expect("a temp dir for the gated model");
        let dir = tmp.path().to_path_buf();
        std::fs::copy(src.join("config.json"), dir.join("config.json"))
            .expect("copying config.json");
        dsv2_core::tiny::write_bf16_tensors(tensors, &dir.join("model.safetensors"))
            .expect("writing the gated model");
        GatedModel { _tmp: tmp, dir }
    }

    /// The routing dump: runs each prompt alone on the CPU model, with every expert in this
    /// process, and checks what the struct's comment promises: a prompt that ends with a
    /// trigger has a row that chooses `EXPERT` in every MoE layer of every step and generates
    /// only triggers; any other prompt never chooses it and never generates a trigger.
    fn check_routing(&self, prompts: &[(Vec<u32>, bool)]) {
        let (model, local) =
            dsv2_core::model::load_local(Arc::new(CpuBackend), &self.dir).expect("loading");
        let model = Arc::new(model);
        let dump = Arc::new(RoutingDump {
            inner: local,
            layers: Mutex::new(Vec::new()),
        });
        for (i, (prompt, needs)) in prompts.iter().enumerate() {
            dump.layers.lock().expect("dump").clear();
            let mut engine = Engine::new(
                model.clone(),
                dump.clone(),
                None,
                EngineConfig {
                    num_blocks: 16,
                    ..EngineConfig::default()
                },
            )
            .expect("engine");
            let out = run_to_completion(
                &mut engine,
                vec![SeqRequest {
                    id: 0,
                    prompt: prompt.clone(),
                    params: GenerateParams {
                        max_new_tokens: MAX_NEW as usize,
                        ignore_eos: true,
                        ..GenerateParams::default()
                    },
                }],
            )
            .expect("in-process generation");
            let layers = std::mem::take(&mut *dump.layers.lock().expect("dump"));
            // 2 MoE layers x (1 prefill + MAX_NEW - 1 decode steps).
            assert_eq!(
                layers.len(),
                2 * MAX_NEW as usize,
                "prompt {i}: MoE layers run"
            );
            let generated = &out[0].output_ids;
            if *needs {
                assert!(
                    layers.iter().all(|&n| n >= 1),
                    "prompt {i} ends with a trigger, yet a layer did not choose expert {EXPERT}: {layers:?}"
                );
                assert!(
                    generated.iter().all(|t| TRIGGERS.contains(t)),
                    "prompt {i}: {generated:?}"
                );
            } else {
                assert!(
                    layers.iter().all(|&n| n == 0),
                    "prompt {i} has no trigger, yet rows chose expert {EXPERT}: {layers:?}"
                );
                assert!(
                    !generated.iter().any(|t| TRIGGERS.contains(t)),
                    "prompt {i}: {generated:?}"
                );
            }
        }
    }
}

/// Routed experts in this process that count, for each MoE layer run, the rows choosing
/// `EXPERT`.
struct RoutingDump {
    inner: LocalExperts<CpuBackend>,
    layers: Mutex<Vec<usize>>,
}

impl ExpertExecutor<CpuBackend> for RoutingDump {
    fn dispatch(
        &self,
        layer: usize,
        x: &<CpuBackend as Backend>::Act,
        routing: &Routing,
    ) -> dsv2_core::Result<PendingExperts<CpuBackend>> {
        let choosing = (0..routing.rows())
            .filter(|&r| routing.row(r).0.contains(&(EXPERT as u32)))
            .count();
        self.layers.lock().expect("dump").push(choosing);
        self.inner.dispatch(layer, x, routing)
    }
}

/// 64 prompts without triggers (tokens 3..493); the odd ones end with a trigger instead, and
/// so need `EXPERT` at every step.
fn gated_prompts() -> Vec<(Vec<u32>, bool)> {
    (0..REQUESTS)
        .map(|i| {
            let len = 3 + (i * 7) % 12;
            let mut prompt: Vec<u32> = (0..len)
                .map(|j| 3 + ((i * 131 + j * 17) % 490) as u32)
                .collect();
            let needs = i % 2 == 1;
            if needs {
                prompt[len - 1] = TRIGGERS.start + (i % TRIGGERS.len()) as u32;
            }
            (prompt, needs)
        })
        .collect()
}

/// Replicas 1, and shard 3 holds only `EXPERT` (`GatedModel`: needed at every step by the
/// requests whose prompt ends with a trigger, never by the others). SIGKILLed mid-run: the
/// requests that need it fail UNAVAILABLE within 1 s, every other request finishes with the
/// output of the run without the kill. While it is down, the same holds for requests that
/// start then; restarted, it serves them all again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_fails_only_the_requests_that_need_the_lost_shard() {
    let model = GatedModel::write();
    let prompts = gated_prompts();
    model.check_routing(&prompts);
    let needs: Vec<bool> = prompts.iter().map(|p| p.1).collect();
    let reqs: Vec<GenerateRequest> = prompts
        .iter()
        .map(|(p, _)| ids_request(p, MAX_NEW))
        .collect();
    let others: Vec<usize> = (0..16).filter(|&e| e != EXPERT).collect();
    let experts = vec![
        others[..5].to_vec(),
        others[5..10].to_vec(),
        others[10..].to_vec(),
        vec![EXPERT],
    ];
    let placement = model.dir.join("placement.json");
    std::fs::write(
        &placement,
        serde_json::json!({ "shards": experts }).to_string(),
    )
    .expect("writing the placement");
    let mut c = Cluster::start_with(model.dir.clone(), experts, Some(&placement), 1);
    let client = dsv2_e2e::connect(&c.router.url()).await;

    let reference = all_ok(
        run_reqs(&client, &reqs, Arc::new(AtomicUsize::new(0))).await,
        "run without a kill",
    );
    let total: usize = reference.iter().map(|o| o.token_ids.len()).sum();
    assert_eq!(total, REQUESTS * MAX_NEW as usize);
    assert!(c.metric(&c.shard_series("dsv2_router_shard_rows_sent_total", 3)) > 0.0);

    // Kill shard 3 a quarter of the way through the tokens: every request is decoding then.
    let tokens = Arc::new(AtomicUsize::new(0));
    let killer = kill_when(tokens.clone(), total / 4, c.shards[3].pid());
    let run = tokio::time::timeout(
        Duration::from_secs(60),
        run_reqs(&client, &reqs, tokens.clone()),
    )
    .await
    .expect("requests hung after the kill");
    let (at_kill, killed_at) = killer.await.expect("kill task");
    assert!(at_kill < total, "the kill came after the run");
    let mut unavailable = 0;
    for (i, (r, ended)) in run.iter().enumerate() {
        match (needs[i], r) {
            (_, Ok(o)) => assert_eq!(
                o, &reference[i],
                "request {i} (needs expert {EXPERT}: {}) differs from the run without the kill",
                needs[i]
            ),
            (false, Err(e)) => {
                panic!("request {i} never needs expert {EXPERT}, yet it failed: {e:?}")
            }
            (true, Err(e)) => {
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
    assert!(
        unavailable > 0,
        "no request that needs expert {EXPERT} failed"
    );
    c.shards[3].kill();
    assert_eq!(c.metric(&c.shard_series("dsv2_router_shard_up", 3)), 0.0);

    // With the shard down from the start: all 64 at once, and then one at a time.
    let t0 = Instant::now();
    let down = tokio::time::timeout(
        Duration::from_secs(60),
        run_reqs(&client, &reqs, Arc::new(AtomicUsize::new(0))),
    )
    .await
    .expect("requests hung with the shard down");
    for (i, (r, ended)) in down.iter().enumerate() {
        if needs[i] {
            let e = r
                .as_ref()
                .expect_err("a request that needs the lost shard finished");
            assert_eq!(e.code(), tonic::Code::Unavailable, "request {i}: {e:?}");
            assert!(
                ended.saturating_duration_since(t0) <= Duration::from_secs(1),
                "request {i}: UNAVAILABLE took {:?}",
                ended.saturating_duration_since(t0)
            );
        } else {
            let o = r
                .as_ref()
                .unwrap_or_else(|e| panic!("request {i} with the shard down: {e:?}"));
            assert_eq!(o, &reference[i], "request {i} with the shard down");
        }
    }
    let mut cl = client.clone();
    for (i, req) in reqs.iter().enumerate().take(6) {
        let t0 = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            generate_stream(&mut cl, req.clone()),
        )
        .await
        .expect("a request hung with the shard down");
        match (needs[i], r) {
            (true, Err(e)) => {
                assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
                assert!(
                    t0.elapsed() <= Duration::from_secs(1),
                    "UNAVAILABLE took {:?}",
                    t0.elapsed()
                );
            }
            (false, Ok(o)) => assert_eq!(o, reference[i], "request {i} alone"),
            (n, r) => panic!("request {i} (needs the lost shard: {n}) alone: {r:?}"),
        }
    }

    // Back on its address, it serves them all again.
    c.restart(3);
    wait_metric(
        &c,
        &c.shard_series("dsv2_router_shard_up", 3),
        1.0,
        Duration::from_secs(10),
    )
    .await;
    let again = all_ok(
        run_reqs(&client, &reqs, Arc::new(AtomicUsize::new(0))).await,
        "run after the restart",
    );
    assert_eq!(again, reference, "outputs after the restart");
}
