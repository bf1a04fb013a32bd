//! The NCCL transport's edges that a machine without GPUs can check: asking for it on the CPU is
//! a clear start-up error, and a shard that cannot join answers the router's NcclInit with the
//! reason and the fix instead of hanging it. (GPU runs: scripts/gpu-nccl.sh.)

use std::process::Command;

use dsv2_e2e::{bin, channel, fixture, start_expert};
use dsv2_proto::expert::v1::NcclInitRequest;
use dsv2_proto::expert::v1::expert_shard_client::ExpertShardClient;

fn fails_with(mut cmd: Command, needle: &str) {
    let out = cmd.output().expect("run the binary");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should refuse to start: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

#[test]
fn nccl_transport_on_the_cpu_is_refused_with_the_fix() {
    let dir = fixture("v2");
    let mut router = Command::new(bin("dsv2-router"));
    router.arg("--model-dir").arg(&dir).args([
        "--transport",
        "nccl",
        "--shard",
        "http://127.0.0.1:1",
        "--listen",
        "127.0.0.1:0",
    ]);
    fails_with(router, "--device cuda");
    let mut expert = Command::new(bin("dsv2-expert"));
    expert.arg("--model-dir").arg(&dir).args([
        "--transport",
        "nccl",
        "--experts",
        "0-3",
        "--listen",
        "127.0.0.1:0",
    ]);
    fails_with(expert, "--device cuda");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_only_shard_answers_ncclinit_with_the_fix() {
    let e = start_expert("nccl-refuse", &fixture("v2"), &[0, 1, 2, 3], "127.0.0.1:0");
    let mut client = ExpertShardClient::new(channel(&e.url()).await);
    let resp = client
        .nccl_init(NcclInitRequest {
            unique_id: vec![0; 128],
            world_size: 2,
            rank: 1,
            timeout_ms: 1000,
            hidden_size: 64,
            max_rows: 16,
            max_experts_per_row: 2,
            ..Default::default()
        })
        .await
        .expect("NcclInit is answered, not failed")
        .into_inner();
    assert!(!resp.ok);
    assert!(
        resp.error.contains("--transport nccl") && resp.error.contains("--device cuda"),
        "{}",
        resp.error
    );
}
