//! Round trips: logits served from a converted dir are bit-identical to the Hugging Face dir's,
//! for every golden fixture and a random V2-shaped checkpoint, 1-3 shards, both placements and
//! replicas; shard and router processes map only their own files; corrupt inputs and tampered
//! outputs are refused with the file and tensor named; `--resume` keeps only good files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dsv2_convert::{
    ConvertOptions, DtypeChoice, InitOptions, NoProgress, PlacementChoice, Preset, convert,
    init_random,
};
use dsv2_core::ModelConfig;
use dsv2_core::backend::AttnMode;
use dsv2_core::cpu::CpuBackend;
use dsv2_core::model::{ExpertSelection, LocalExperts, Model, load_local, position_logits};
use dsv2_core::placement::PlacementKind;
use dsv2_core::weights::{Manifest, WeightStore, verify_converted};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

/// Logits at every position (prefill of 3, then decode) as f32 bits.
fn logit_bits(dir: &Path) -> Vec<u32> {
    let (model, experts) = load_local(Arc::new(CpuBackend), dir).unwrap();
    let v = model.cfg.vocab_size as u32;
    let tokens: Vec<u32> = [1u32, 17, 5, 300, 42, 9, 77]
        .iter()
        .map(|t| t % v)
        .collect();
    position_logits(&model, &experts, &tokens, Some(3), AttnMode::Auto)
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn opts(src: &Path, out: &Path, shards: usize, kind: Option<PlacementKind>) -> ConvertOptions {
    let mut o = ConvertOptions::new(src, out, shards);
    o.placement = kind.map_or(PlacementChoice::Default, PlacementChoice::Kind);
    // Small files so the split into several files per shard and router is exercised.
    o.max_file_bytes = 96 << 10;
    o
}

/// Every file a process opened for `wanted` lies under `sub`.
fn maps_only(dir: &Path, sub: &str, wanted: impl Fn(&str) -> bool) {
    let store = WeightStore::open(dir, wanted).unwrap();
    assert!(!store.mapped_files().is_empty());
    for f in store.mapped_files() {
        assert!(
            f.starts_with(dir.join(sub)),
            "{} opened outside {sub}",
            f.display()
        );
    }
}

/// The kernel layout: gate_up[j] = gate then up rows of the shard's j-th expert, down[j] its down.
fn check_stacked_layout(hf: &Path, conv: &Path, shard: usize, experts: &[usize]) {
    let cfg = ModelConfig::from_model_dir(hf).unwrap();
    let src = WeightStore::open(hf, |_| true).unwrap();
    let l = cfg.moe_layers()[0];
    let dir = conv.join(format!("shard-{shard}"));
    let blobs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    let sts: Vec<safetensors::SafeTensors<'_>> = blobs
        .iter()
        .map(|b| safetensors::SafeTensors::deserialize(b).unwrap())
        .collect();
    let find = |name: String| {
        sts.iter()
            .find_map(|st| st.tensor(&name).ok())
            .unwrap_or_else(|| panic!("{name} is in no file of shard {shard}"))
    };
    let gu = find(format!("model.layers.{l}.mlp.experts.gate_up"));
    let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
    assert_eq!(gu.shape(), &[experts.len(), 2 * i, h]);
    let down = find(format!("model.layers.{l}.mlp.experts.down"));
    assert_eq!(down.shape(), &[experts.len(), h, i]);
    let sz = gu.data().len() / (experts.len() * 2 * i * h);
    for (j, &e) in experts.iter().enumerate() {
        let p = format!("model.layers.{l}.mlp.experts.{e}");
        let g = src.get(&format!("{p}.gate_proj.weight"), &[i, h]).unwrap();
        let u = src.get(&format!("{p}.up_proj.weight"), &[i, h]).unwrap();
        let d = src.get(&format!("{p}.down_proj.weight"), &[h, i]).unwrap();
        let blk = 2 * i * h * sz;
        assert_eq!(&gu.data()[j * blk..j * blk + i * h * sz], g.bytes());
        assert_eq!(&gu.data()[j * blk + i * h * sz..(j + 1) * blk], u.bytes());
        assert_eq!(
            &down.data()[j * h * i * sz..(j + 1) * h * i * sz],
            d.bytes()
        );
    }
}

fn round_trip(hf: &Path) {
    let want = logit_bits(hf);
    let cfg = ModelConfig::from_model_dir(hf).unwrap();
    for shards in 1..=3usize {
        let mut kinds = vec![PlacementKind::Contiguous];
        if cfg.n_group > 1 && cfg.n_group.is_multiple_of(shards) {
            kinds.push(PlacementKind::Groups);
        }
        for kind in kinds {
            let out = tempfile::tempdir().unwrap();
            let rep = convert(&opts(hf, out.path(), shards, Some(kind)), &NoProgress).unwrap();
            assert_eq!(rep.placement.len(), shards);
            assert_eq!(
                logit_bits(out.path()),
                want,
                "{} with {shards} shards ({kind:?})",
                hf.display()
            );
            maps_only(out.path(), "router", Model::<CpuBackend>::wants);
            for (s, experts) in rep.placement.iter().enumerate() {
                let sel = ExpertSelection::Only(experts.clone());
                maps_only(
                    out.path(),
                    &format!("shard-{s}"),
                    LocalExperts::<CpuBackend>::wants(&sel),
                );
                check_stacked_layout(hf, out.path(), s, experts);
            }
            verify_converted(out.path(), &|_| {}).unwrap();
        }
    }
}

#[test]
fn golden_v2_round_trip() {
    round_trip(&fixture("v2"));
}

#[test]
fn golden_v2_lite_round_trip() {
    round_trip(&fixture("v2-lite"));
}

#[test]
fn golden_dense2_round_trip() {
    round_trip(&fixture("dense2"));
}

/// DeepSeek-V2's config (160 experts in 8 groups, q-LoRA, YaRN, first layer dense) at reduced
/// widths, with `layers` decoder layers.
fn small_v2_config(layers: usize) -> serde_json::Value {
    let mut cfg = Preset::DeepseekV2.config_json(layers);
    for (k, v) in [
        ("hidden_size", 64),
        ("intermediate_size", 96),
        ("moe_intermediate_size", 16),
        ("num_attention_heads", 2),
        ("num_key_value_heads", 2),
        ("q_lora_rank", 48),
        ("kv_lora_rank", 32),
        ("qk_nope_head_dim", 16),
        ("qk_rope_head_dim", 8),
        ("v_head_dim", 16),
        ("vocab_size", 640),
    ] {
        cfg[k] = serde_json::json!(v);
    }
    cfg
}

/// A random checkpoint with DeepSeek-V2's structure (160 experts in 8 groups, q-LoRA, YaRN,
/// first layer dense) at reduced widths, written by `init_random` (sharded with an index).
#[test]
fn random_v2_structure_round_trip() {
    let cfg = small_v2_config(3);
    let hf = tempfile::tempdir().unwrap();
    let rep = init_random(
        &InitOptions {
            config: cfg,
            out: hf.path().to_path_buf(),
            seed: 11,
            threads: 2,
            max_file_bytes: 512 << 10,
        },
        &NoProgress,
    )
    .unwrap();
    assert!(rep.files.len() > 1, "{:?}", rep.files);
    assert!(hf.path().join("model.safetensors.index.json").exists());
    round_trip(hf.path());
}

/// `WeightStore::random` (weights that exist nowhere, for full-scale benchmarks) holds exactly
/// what `init_random` writes with the same seed: every tensor's bytes, hence the logits.
#[test]
fn random_store_equals_the_written_random_checkpoint() {
    let cfg = small_v2_config(2);
    let hf = tempfile::tempdir().unwrap();
    init_random(
        &InitOptions {
            config: cfg.clone(),
            out: hf.path().to_path_buf(),
            seed: 23,
            threads: 2,
            max_file_bytes: 1 << 30,
        },
        &NoProgress,
    )
    .unwrap();
    // a dir with nothing but the config
    let bare = tempfile::tempdir().unwrap();
    std::fs::write(bare.path().join("config.json"), cfg.to_string()).unwrap();
    let written = WeightStore::open(hf.path(), |_| true).unwrap();
    let random = WeightStore::random(bare.path(), 23, |_| true).unwrap();
    let mut names: Vec<&str> = written.names().collect();
    names.sort_unstable();
    let mut rnames: Vec<&str> = random.names().collect();
    rnames.sort_unstable();
    assert_eq!(names, rnames);
    for n in names {
        let (a, b) = (written.tensor(n).unwrap(), random.tensor(n).unwrap());
        assert_eq!(a.shape, b.shape, "{n}");
        assert!(b.mapping().is_none() && b.random_init().is_some(), "{n}");
        assert_eq!(a.bytes(), b.bytes(), "{n}");
    }
    // another seed is another model; the filter keeps only the wanted tensors
    let other = WeightStore::random(bare.path(), 24, |n| n.contains("experts.3.")).unwrap();
    assert!(other.names().all(|n| n.contains("experts.3.")));
    assert!(other.names().count() > 0);
    let n = other.names().next().unwrap().to_string();
    assert_ne!(
        other.tensor(&n).unwrap().bytes(),
        written.tensor(&n).unwrap().bytes()
    );
}

/// Real V2-Lite widths (hidden 2048, 16 heads, experts of 1408), written as several files, with
/// 16 of its 64 experts, a 4096-token vocabulary and the one layer MoE: about 0.4 GB per copy,
/// so the input plus one converted copy stay under 1 GB of disk. CI runs this on a machine whose
/// free disk is not guaranteed (the full V2-Lite vocabulary and two layers, 4.2 GB, ran it out
/// of space).
#[test]
fn random_v2_lite_real_dims_round_trip() {
    let mut config = Preset::DeepseekV2Lite.config_json(1);
    config["vocab_size"] = serde_json::json!(4096);
    config["first_k_dense_replace"] = serde_json::json!(0);
    config["n_routed_experts"] = serde_json::json!(16);
    let hf = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let rep = init_random(
        &InitOptions {
            config,
            out: hf.path().to_path_buf(),
            seed: 5,
            threads: 2,
            max_file_bytes: 150_000_000,
        },
        &NoProgress,
    )
    .unwrap();
    assert!(rep.files.len() > 1, "{:?}", rep.files);
    let want = logit_bits(hf.path());
    for shards in [1usize, 2, 3] {
        let out = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        let mut o = ConvertOptions::new(hf.path(), out.path(), shards);
        o.placement = PlacementChoice::Kind(PlacementKind::Contiguous);
        let rep = convert(&o, &NoProgress).unwrap();
        assert_eq!(logit_bits(out.path()), want, "{shards} shards");
        let sel = ExpertSelection::Only(rep.placement[shards - 1].clone());
        maps_only(
            out.path(),
            &format!("shard-{}", shards - 1),
            LocalExperts::<CpuBackend>::wants(&sel),
        );
    }
}

#[test]
fn replicated_experts_are_written_to_each_shard() {
    let hf = fixture("v2");
    let out = tempfile::tempdir().unwrap();
    let pfile = out.path().join("placement.json");
    std::fs::write(
        &pfile,
        r#"{"shards": [[0,1,2,3,4,5,6,7], [4,5,6,7,8,9,10,11,12,13,14,15]]}"#,
    )
    .unwrap();
    let conv = out.path().join("conv");
    let mut o = opts(&hf, &conv, 2, None);
    o.placement = PlacementChoice::File(pfile);
    let rep = convert(&o, &NoProgress).unwrap();
    assert_eq!(rep.placement[1].len(), 12);
    assert_eq!(logit_bits(&conv), logit_bits(&hf));
    let m = Manifest::read(&conv).unwrap();
    let t = &m.tensors["model.layers.1.mlp.experts.5.up_proj.weight"];
    assert!(t.file.starts_with("shard-0/"));
    assert_eq!(t.replicas.len(), 1);
    assert!(t.replicas[0].file.starts_with("shard-1/"));
    // Each shard process maps only its own files, replicated experts included.
    for (s, experts) in rep.placement.iter().enumerate() {
        let sel = ExpertSelection::Only(experts.clone());
        maps_only(
            &conv,
            &format!("shard-{s}"),
            LocalExperts::<CpuBackend>::wants(&sel),
        );
        check_stacked_layout(&hf, &conv, s, experts);
    }
    // A node that holds only shard 1's files (and the router's) serves shard 1.
    std::fs::remove_dir_all(conv.join("shard-0")).unwrap();
    let sel = ExpertSelection::Only(rep.placement[1].clone());
    let store = WeightStore::open(&conv, LocalExperts::<CpuBackend>::wants(&sel)).unwrap();
    assert!(store.contains("model.layers.2.mlp.experts.4.gate_proj.weight"));
    let sel0 = ExpertSelection::Only(vec![0]);
    let err = WeightStore::open(&conv, LocalExperts::<CpuBackend>::wants(&sel0))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("shard-0") && err.contains("missing"), "{err}");
}

#[test]
fn replicas_chain_the_placement_over_the_shards() {
    let hf = fixture("v2");
    let out = tempfile::tempdir().unwrap();
    let conv = out.path().join("conv");
    let mut o = opts(&hf, &conv, 4, None);
    o.replicas = 2;
    let rep = convert(&o, &NoProgress).unwrap();
    let cfg = dsv2_core::ModelConfig::from_model_dir(&hf).unwrap();
    let want = dsv2_core::placement::Placement::default_for(&cfg, 4)
        .unwrap()
        .replicated(2)
        .unwrap();
    assert_eq!(rep.placement, want.shards);
    // 16 experts in 4 groups: shard 3 holds group 3 and, as the replica, group 0.
    assert_eq!(rep.placement[3], vec![0, 1, 2, 3, 12, 13, 14, 15]);
    // Every shard dir holds a copy of each of its experts.
    let m = Manifest::read(&conv).unwrap();
    for (s, experts) in rep.placement.iter().enumerate() {
        for e in experts {
            let t = &m.tensors[&format!("model.layers.1.mlp.experts.{e}.up_proj.weight")];
            let dir = format!("shard-{s}/");
            assert!(
                t.file.starts_with(&dir) || t.replicas.iter().any(|r| r.file.starts_with(&dir)),
                "expert {e} has no copy in {dir}"
            );
        }
    }
    o.replicas = 5;
    let err = convert(&o, &NoProgress).unwrap_err().to_string();
    assert!(err.contains("--replicas 5"), "{err}");
}

#[test]
fn bf16_output_rounds_each_value() {
    let hf = fixture("v2-lite"); // stored f32
    let out = tempfile::tempdir().unwrap();
    let mut o = opts(&hf, out.path(), 2, None);
    o.dtype = DtypeChoice::Bf16;
    convert(&o, &NoProgress).unwrap();
    let a = WeightStore::open(&hf, |_| true).unwrap();
    let b = WeightStore::open(out.path(), |_| true).unwrap();
    let mut n = 0;
    for name in a.names() {
        let (ta, tb) = (a.tensor(name).unwrap(), b.tensor(name).unwrap());
        assert_eq!(tb.dtype, dsv2_core::weights::DType::Bf16);
        assert_eq!(ta.shape, tb.shape);
        let want: Vec<f32> = ta
            .to_f32_vec()
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect();
        assert_eq!(tb.to_f32_vec(), want, "{name}");
        n += 1;
    }
    assert_eq!(n, b.names().count());
    // And it still serves.
    load_local(Arc::new(CpuBackend), out.path()).unwrap();
}

/// Copies a fixture into a temp dir so a test can damage it.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, d.path().join(p.file_name().unwrap())).unwrap();
    }
    d
}

fn convert_err(src: &Path) -> (String, tempfile::TempDir) {
    let out = tempfile::tempdir().unwrap();
    let err = convert(&opts(src, out.path(), 2, None), &NoProgress)
        .expect_err("conversion must fail")
        .to_string();
    assert!(
        !out.path().join("manifest.json").exists(),
        "a failed conversion left a manifest"
    );
    (err, out)
}

#[test]
fn missing_shard_file_is_named() {
    let src = copy_fixture("v2");
    std::fs::remove_file(src.path().join("model-00002-of-00002.safetensors")).unwrap();
    let (err, _out) = convert_err(src.path());
    assert!(
        err.contains("model-00002-of-00002.safetensors")
            && err.contains("missing")
            && err.contains("model."),
        "{err}"
    );
}

#[test]
fn truncated_safetensors_is_named() {
    let src = copy_fixture("v2");
    let p = src.path().join("model-00001-of-00002.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    let (err, _out) = convert_err(src.path());
    assert!(
        err.contains("model-00001-of-00002.safetensors") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn wrong_shape_is_named() {
    // The config says the experts are wider than the checkpoint's.
    let src = copy_fixture("v2-lite");
    let p = src.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["moe_intermediate_size"] = serde_json::json!(40);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let (err, _out) = convert_err(src.path());
    assert!(
        err.contains("model.layers.1.mlp.experts.0.gate_proj.weight")
            && err.contains("model.safetensors")
            && err.contains("[40, 64]")
            && err.contains("[32, 64]"),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_named() {
    // Rewrite the single-file fixture without one expert tensor.
    let src = copy_fixture("v2-lite");
    let p = src.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let drop = "model.layers.2.mlp.experts.3.down_proj.weight";
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != drop)
        .collect();
    safetensors::serialize_to_file(kept, None, &p).unwrap();
    let (err, _out) = convert_err(src.path());
    assert!(err.contains(drop) && err.contains("missing"), "{err}");
}

#[test]
fn tampered_converted_dir_is_refused() {
    let hf = fixture("v2");
    let out = tempfile::tempdir().unwrap();
    let conv = out.path();
    let rep = convert(&opts(&hf, conv, 2, None), &NoProgress).unwrap();
    let m = Manifest::read(conv).unwrap();
    let shard_file = m
        .files
        .keys()
        .find(|f| f.starts_with("shard-1/"))
        .unwrap()
        .clone();
    let p = conv.join(&shard_file);
    let good = std::fs::read(&p).unwrap();

    // Same size, one byte flipped: opening (sizes only) succeeds, --verify catches it.
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40;
    std::fs::write(&p, &flipped).unwrap();
    WeightStore::open(conv, |_| true).unwrap();
    let err = verify_converted(conv, &|_| {}).unwrap_err().to_string();
    assert!(err.contains(&shard_file) && err.contains("sha256"), "{err}");

    // Truncated: refused at open with the file and the sizes.
    std::fs::write(&p, &good[..good.len() - 8]).unwrap();
    let err = WeightStore::open(conv, |_| true).err().unwrap().to_string();
    assert!(
        err.contains(&shard_file) && err.contains("manifest says"),
        "{err}"
    );
    std::fs::write(&p, &good).unwrap();
    WeightStore::open(conv, |_| true).unwrap();

    // A manifest from a newer format version.
    let mp = conv.join("manifest.json");
    let text = std::fs::read_to_string(&mp).unwrap();
    std::fs::write(
        &mp,
        text.replace("\"format_version\": 1", "\"format_version\": 99"),
    )
    .unwrap();
    let err = WeightStore::open(conv, |_| true).err().unwrap().to_string();
    assert!(err.contains("version 99"), "{err}");
    std::fs::write(&mp, &text).unwrap();

    // A tensor pointed at the wrong place (a different dtype region is caught; so is a range
    // past the tensor data).
    let mut m2: serde_json::Value = serde_json::from_str(&text).unwrap();
    m2["tensors"]["model.norm.weight"]["offset"] = serde_json::json!(1u64 << 40);
    std::fs::write(&mp, m2.to_string()).unwrap();
    let err = WeightStore::open(conv, |_| true).err().unwrap().to_string();
    assert!(
        err.contains("model.norm.weight") && err.contains("does not lie inside"),
        "{err}"
    );
    std::fs::write(&mp, &text).unwrap();
    assert_eq!(rep.placement.len(), 2);
}

#[test]
fn resume_keeps_only_good_finished_files() {
    let hf = fixture("v2");
    let out = tempfile::tempdir().unwrap();
    let conv = out.path();
    let mut o = opts(&hf, conv, 2, None);
    o.threads = 1;
    let first = convert(&o, &NoProgress).unwrap();
    let m = Manifest::read(conv).unwrap();
    let n = m.files.len();
    assert_eq!((first.files_written, first.files_kept), (n, 0));
    let want = logit_bits(&hf);

    // Interrupted run: a file cannot be written (its temp name is blocked by a directory).
    let victim = m
        .files
        .keys()
        .find(|f| f.starts_with("shard-0/"))
        .unwrap()
        .clone();
    std::fs::remove_file(conv.join(&victim)).unwrap();
    let blocker = PathBuf::from(format!("{}.tmp", conv.join(&victim).display()));
    std::fs::create_dir_all(&blocker).unwrap();
    o.resume = true;
    let err = convert(&o, &NoProgress).err().unwrap().to_string();
    assert!(err.contains(&victim), "{err}");
    assert!(!conv.join("manifest.json").exists());
    std::fs::remove_dir_all(&blocker).unwrap();

    // Damage another finished file (same size) behind the converter's back.
    let damaged = m
        .files
        .keys()
        .find(|f| f.starts_with("router/"))
        .unwrap()
        .clone();
    let mut bytes = std::fs::read(conv.join(&damaged)).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(conv.join(&damaged), &bytes).unwrap();

    let again = convert(&o, &NoProgress).unwrap();
    assert_eq!((again.files_written, again.files_kept), (2, n - 2));
    assert_eq!(Manifest::read(conv).unwrap(), m);
    assert_eq!(logit_bits(conv), want);
    verify_converted(conv, &|_| {}).unwrap();

    // Nothing to do on a finished dir; a changed plan (bf16) rewrites what changes.
    let idle = convert(&o, &NoProgress).unwrap();
    assert_eq!((idle.files_written, idle.files_kept), (0, n));
    o.dtype = DtypeChoice::Bf16; // the v2 fixture is bf16 already: same bytes, same plan
    let same = convert(&o, &NoProgress).unwrap();
    assert_eq!(same.files_written, 0);
    let lite = fixture("v2-lite");
    let mut o2 = opts(&lite, conv, 2, None);
    o2.resume = true;
    let other = convert(&o2, &NoProgress).unwrap();
    assert_eq!(
        other.files_kept, 0,
        "a different source must not reuse files"
    );
    assert_eq!(logit_bits(conv), logit_bits(&lite));
}
