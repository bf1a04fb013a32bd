//! `--random-weights SEED`: a model dir with nothing but config.json serves random weights, the
//! same in every process (router, shards, in-process CLI), so distributed runs equal the
//! in-process one and a seed reproduces a model. (Host values equal `init-random`'s: dsv2-convert
//! tests; on a GPU they are drawn on the device: scripts/gpu-check.sh.)

use std::process::Command;

use dsv2_core::placement::PlacementKind;
use dsv2_e2e::{Proc, bin, fixture, placement, reference_generate};

#[test]
fn config_only_dir_serves_the_same_random_model_everywhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        fixture("v2").join("config.json"),
        dir.path().join("config.json"),
    )
    .expect("copy config");
    let args = [
        "--input-ids",
        "5,6,7,8",
        "--max-output-len",
        "8",
        "--ignore-eos",
        "--random-weights",
        "9",
    ];
    let (want, _) = reference_generate(dir.path(), &args);
    assert_eq!(want.len(), 8);
    let (again, _) = reference_generate(dir.path(), &args);
    assert_eq!(again, want, "a seed reproduces its model");
    let mut other = args;
    other[6] = "10";
    let (diff, _) = reference_generate(dir.path(), &other);
    assert_ne!(diff, want, "another seed is another model");

    // router + 2 shards, each drawing its own part of the same random model
    let shards = placement(&fixture("v2"), 2, PlacementKind::Groups);
    let experts: Vec<Proc> = shards
        .iter()
        .enumerate()
        .map(|(i, ids)| {
            let mut cmd = Command::new(bin("dsv2-expert"));
            cmd.arg("--model-dir").arg(dir.path()).args([
                "--experts",
                &dsv2_e2e::expert_list(ids),
                "--random-weights",
                "9",
                "--listen",
                "127.0.0.1:0",
            ]);
            Proc::start(&format!("rand-expert-{i}"), cmd)
        })
        .collect();
    let mut cmd = Command::new(bin("dsv2-router"));
    cmd.arg("--model-dir").arg(dir.path()).args([
        "--random-weights",
        "9",
        "--listen",
        "127.0.0.1:0",
    ]);
    for e in &experts {
        cmd.args(["--shard", &e.url()]);
    }
    let router = Proc::start("rand-router", cmd);
    let out = Command::new(bin("dsv2"))
        .args(["generate", "--endpoint", &router.url(), "--json"])
        .args(&args[..5])
        .output()
        .expect("dsv2 generate --endpoint");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).expect("JSON");
    let got: Vec<u32> = v["output_ids"]
        .as_array()
        .expect("output_ids")
        .iter()
        .filter_map(|x| x.as_u64().map(|x| x as u32))
        .collect();
    assert_eq!(got, want, "router + shards equal the in-process run");

    // without the flag, the config-only dir is a clear error naming what is missing
    let out = Command::new(bin("dsv2"))
        .args(["generate", "--model-dir"])
        .arg(dir.path())
        .args(&args[..5])
        .output()
        .expect("dsv2 generate");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("safetensors") || err.contains("weight"),
        "{err}"
    );
}
