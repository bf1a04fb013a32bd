//! Generation ends at the config's EOS (issue 2, item 6: "stop token ids (EOS from config)"):
//! finish reason EOS, the EOS token is the last output; `ignore_eos` runs past it; a request's
//! own stop token ids end it with reason STOP.

use std::path::Path;
use std::sync::Arc;

use dsv2_core::cpu::CpuBackend;
use dsv2_core::engine::{
    Completion, Engine, EngineConfig, FinishReason, GenerateParams, SeqRequest, run_to_completion,
};
use dsv2_core::model::load_local;

const PROMPT: [u32; 5] = [7, 99, 3, 250, 41];

fn run(dir: &Path, params: GenerateParams) -> Completion {
    let (model, experts) = load_local(Arc::new(CpuBackend), dir).unwrap();
    let mut e = Engine::new(
        Arc::new(model),
        Arc::new(experts),
        None,
        EngineConfig::default(),
    )
    .unwrap();
    let req = SeqRequest {
        id: 1,
        prompt: PROMPT.to_vec(),
        params,
    };
    run_to_completion(&mut e, vec![req]).unwrap().remove(0)
}

/// A copy of the v2 fixture (sharded) whose config.json says `eos_token_id = eos`.
fn with_eos(dir: &Path, eos: u32) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/v2");
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["eos_token_id"] = eos.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

#[test]
fn config_eos_and_request_stop_ids_end_generation() {
    let n = 12;
    let params = |ignore_eos: bool, stop: Vec<u32>| GenerateParams {
        max_new_tokens: n,
        ignore_eos,
        stop_token_ids: stop,
        ..Default::default()
    };
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/v2");
    let free = run(&fixture, params(true, vec![]));
    assert_eq!(free.output_ids.len(), n);
    // The first greedy token that did not appear before it: generation must stop exactly there.
    let k = (1..n)
        .find(|&k| !free.output_ids[..k].contains(&free.output_ids[k]))
        .expect("a greedy continuation with a fresh token after the first");
    let t = free.output_ids[k];

    let tmp = tempfile::tempdir().unwrap();
    with_eos(tmp.path(), t);
    let eos = run(tmp.path(), params(false, vec![]));
    assert_eq!(eos.finish_reason, FinishReason::Eos);
    assert_eq!(eos.output_ids, free.output_ids[..=k], "stops at the EOS");
    let ignored = run(tmp.path(), params(true, vec![]));
    assert_eq!(ignored.finish_reason, FinishReason::Length);
    assert_eq!(ignored.output_ids, free.output_ids, "ignore_eos runs on");

    let stopped = run(&fixture, params(true, vec![t]));
    assert_eq!(stopped.finish_reason, FinishReason::Stop);
    assert_eq!(stopped.output_ids, free.output_ids[..=k]);
}
