//! The router's start-up check of its shards (issue 3, item 3): a shard serving another model,
//! or one that does not host the experts the placement gives it, makes the router refuse to
//! serve with a message naming the shard and what is wrong, instead of serving wrong answers.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dsv2_core::placement::PlacementKind;
use dsv2_e2e::{Proc, bin, fixture, placement, start_expert};

/// Runs `dsv2-router` on the v2 fixture against `shards`; it must exit non-zero within a minute
/// (a router that starts serving instead is killed and the test fails). Returns its stderr.
fn router_refuses(shards: &[&Proc]) -> String {
    let mut cmd = Command::new(bin("dsv2-router"));
    cmd.arg("--model-dir").arg(fixture("v2")).args([
        "--listen",
        "127.0.0.1:0",
        "--shard-wait-s",
        "5",
    ]);
    for s in shards {
        cmd.args(["--shard", &s.url()]);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting dsv2-router");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for the router") {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the router kept running with mismatched shards: {}",
                reader.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = reader.join().expect("stderr reader");
    assert!(!status.success(), "router exited successfully: {err}");
    assert!(err.contains("refusing to serve"), "{err}");
    err
}

#[test]
fn router_refuses_a_shard_of_another_model() {
    let p = placement(&fixture("v2"), 2, PlacementKind::Groups);
    let good = start_expert("expert-0 (v2)", &fixture("v2"), &p[0], "127.0.0.1:0");
    // Same shapes and expert count, different config (no q-LoRA, greedy routing).
    let other = start_expert(
        "expert-1 (v2-lite)",
        &fixture("v2-lite"),
        &p[1],
        "127.0.0.1:0",
    );
    let err = router_refuses(&[&good, &other]);
    assert!(
        err.contains(&other.url()) && err.contains("different model"),
        "{err}"
    );
}

#[test]
fn router_refuses_shards_that_leave_experts_uncovered() {
    let p = placement(&fixture("v2"), 2, PlacementKind::Groups);
    // Both shards host the first half: the second half of the experts has no home.
    let a = start_expert("expert-0", &fixture("v2"), &p[0], "127.0.0.1:0");
    let b = start_expert(
        "expert-1 (wrong experts)",
        &fixture("v2"),
        &p[0],
        "127.0.0.1:0",
    );
    let err = router_refuses(&[&a, &b]);
    assert!(
        err.contains(&b.url()) && err.contains("does not host") && err.contains("8-15"),
        "{err}"
    );
}

/// `--kv-cache-dtype fp8` on the CPU: the router exits at once saying it needs a GPU (the CPU
/// backend keeps its cache in f32 and has no FP8 cache), before loading anything.
#[test]
fn router_refuses_an_fp8_cache_on_the_cpu() {
    let out = Command::new(bin("dsv2-router"))
        .arg("--model-dir")
        .arg(fixture("v2"))
        .args(["--listen", "127.0.0.1:0", "--kv-cache-dtype", "fp8"])
        .stdin(Stdio::null())
        .output()
        .expect("running dsv2-router");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--kv-cache-dtype fp8 needs a GPU (--device cuda:N)"),
        "{err}"
    );
    // and a dtype it does not know is a usage error naming the accepted ones
    let out = Command::new(bin("dsv2-router"))
        .args(["--kv-cache-dtype", "int8"])
        .stdin(Stdio::null())
        .output()
        .expect("running dsv2-router");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("bf16 or fp8"),
        "{err}"
    );
}
