//! `dsv2 convert`: plans and writes a converted dir from a Hugging Face DeepSeek-V2 checkpoint.
//!
//! Layout: `router/model-NNNNN.safetensors` (every tensor but the routed experts, original
//! names), `shard-<s>/experts-NNNNN.safetensors` (per MoE layer, the shard's experts stacked in
//! the kernel layout: `model.layers.L.mlp.experts.gate_up` [local, 2I, H] with each expert's
//! gate rows before its up rows, and `model.layers.L.mlp.experts.down` [local, H, I]),
//! config.json and tokenizer files copied, and `manifest.json` written last: every original
//! tensor name → file, byte offset, dtype, shape, plus per-file size and sha256.
//!
//! The whole plan (every source tensor checked against the config's expected shapes) is made
//! before anything is written, so a corrupt input fails fast and leaves no manifest.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use dsv2_core::ModelConfig;
use dsv2_core::placement::{Placement, PlacementKind};
use dsv2_core::weights::{
    DType, MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION, Manifest, ManifestFile,
    ManifestLocation, ManifestTensor, WeightStore, routed_expert_of, sha256_file,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::Progress;
use crate::error::{ConvertError, Result};
use crate::expected::expected_tensors;
use crate::writer::{OutFile, OutTensor, Piece, Source, write_atomic, write_file};

/// Which experts go on which shard.
#[derive(Debug, Clone)]
pub enum PlacementChoice {
    /// Groups when the routing groups divide evenly over the shards, else contiguous.
    Default,
    Kind(PlacementKind),
    File(PathBuf),
}

/// Output dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtypeChoice {
    /// Every tensor in its source dtype (bit-identical serving).
    Keep,
    Bf16,
}

#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub model_dir: PathBuf,
    pub output_dir: PathBuf,
    pub expert_shards: usize,
    pub placement: PlacementChoice,
    /// Each expert on this many shards (`Placement::replicated`): what the router's and the
    /// shards' `--replicas` expect.
    pub replicas: usize,
    pub dtype: DtypeChoice,
    /// Keep finished files whose recorded checksum and plan still match.
    pub resume: bool,
    /// Files written concurrently.
    pub threads: usize,
    /// Files are split so none exceeds this (a single larger tensor gets a file of its own).
    pub max_file_bytes: u64,
}

impl ConvertOptions {
    pub fn new(model_dir: &Path, output_dir: &Path, expert_shards: usize) -> Self {
        ConvertOptions {
            model_dir: model_dir.to_path_buf(),
            output_dir: output_dir.to_path_buf(),
            expert_shards,
            placement: PlacementChoice::Default,
            replicas: 1,
            dtype: DtypeChoice::Keep,
            resume: false,
            threads: 4,
            max_file_bytes: 1_000_000_000,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConvertReport {
    /// Tensor bytes read from the source checkpoint (each source tensor counted once per copy).
    pub bytes_written: u64,
    pub files_written: usize,
    /// Files kept by `--resume`.
    pub files_kept: usize,
    pub placement: Vec<Vec<usize>>,
}

/// The checked plan of a conversion: every output file with its tensors' sources.
pub struct Plan {
    pub cfg_json: serde_json::Value,
    pub placement: Vec<Vec<usize>>,
    pub files: Vec<OutFile>,
    pub dtype: DtypeChoice,
    /// Tensors of the source that the config does not name; copied to the router files.
    pub extras: Vec<String>,
}

/// Config, tokenizer and generation files copied verbatim.
const COPIED: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
];

/// Records finished files for `--resume` (a file is only trusted if its plan hash matches).
const STATE_FILE: &str = ".dsv2-convert-state.json";

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    files: BTreeMap<String, StateEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StateEntry {
    plan_hash: String,
    size: u64,
    sha256: String,
}

/// Checks the source against its config and lays out every output file; writes nothing.
pub fn plan(opts: &ConvertOptions) -> Result<Plan> {
    let src = &opts.model_dir;
    let cfg = ModelConfig::from_model_dir(src)?;
    let cfg_path = src.join("config.json");
    let cfg_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&cfg_path).map_err(|e| ConvertError::io(&cfg_path, e))?,
    )
    .map_err(|e| ConvertError::Invalid(format!("{}: {e}", cfg_path.display())))?;
    if src.join(MANIFEST_FILE).exists() {
        return Err(ConvertError::Invalid(format!(
            "{} is already a converted dir (it has {MANIFEST_FILE}); convert from the Hugging Face checkpoint",
            src.display()
        )));
    }
    // Opening checks the index, every file's presence and header, and every tensor's byte range.
    let store = WeightStore::open(src, |_| true)?;
    let expected = expected_tensors(&cfg);
    let mut known = HashSet::new();
    for e in &expected {
        store.get(&e.name, &e.shape)?;
        known.insert(e.name.as_str());
    }
    let mut extras: Vec<String> = store
        .names()
        .filter(|n| !known.contains(n))
        .map(str::to_string)
        .collect();
    extras.sort();
    if let Some(bad) = extras.iter().find(|n| routed_expert_of(n).is_some()) {
        return Err(ConvertError::Tensor {
            tensor: bad.clone(),
            file: store.tensor(bad).map(|t| t.file.clone()).unwrap_or_default(),
            msg: "is a routed-expert tensor the config does not expect: the checkpoint does not match its config.json".into(),
        });
    }

    let placement = if cfg.n_routed_experts == 0 {
        Vec::new()
    } else {
        let p = match &opts.placement {
            PlacementChoice::Default => Placement::default_for(&cfg, opts.expert_shards)?,
            PlacementChoice::Kind(k) => Placement::build(&cfg, opts.expert_shards, *k)?,
            PlacementChoice::File(f) => Placement::from_file(f, &cfg)?,
        }
        .replicated(opts.replicas)?;
        p.check(&cfg)?;
        p.shards
            .into_iter()
            .map(|mut s| {
                s.sort_unstable();
                s.dedup();
                s
            })
            .collect()
    };

    let out_dtype = |d: DType| match opts.dtype {
        DtypeChoice::Keep => d,
        DtypeChoice::Bf16 => DType::Bf16,
    };
    let mut paths: HashMap<PathBuf, Arc<PathBuf>> = HashMap::new();
    let mut piece = |name: &str| -> Result<Piece> {
        let t = store.tensor(name).ok_or_else(|| {
            ConvertError::Invalid(format!("internal: tensor `{name}` was checked but is gone"))
        })?;
        let path = paths
            .entry(t.file.clone())
            .or_insert_with(|| Arc::new(t.file.clone()))
            .clone();
        let (_, start, _) = t.mapping().ok_or_else(|| {
            ConvertError::Invalid(format!("tensor `{name}` has no file behind it to convert"))
        })?;
        Ok(Piece {
            name: name.to_string(),
            shape: t.shape.clone(),
            source: Source::File {
                path,
                offset: start as u64,
                dtype: t.dtype,
                numel: t.numel(),
            },
        })
    };

    let mut files = Vec::new();
    // Router: everything but routed experts, in checkpoint order, then extras.
    let mut router = Vec::new();
    for name in expected
        .iter()
        .map(|e| e.name.as_str())
        .filter(|n| routed_expert_of(n).is_none())
        .chain(extras.iter().map(|s| s.as_str()))
    {
        let p = piece(name)?;
        let dtype = match p.source {
            Source::File { dtype, .. } => dtype,
            Source::Random { .. } => DType::Bf16,
        };
        router.push(OutTensor {
            name: name.to_string(),
            dtype: out_dtype(dtype),
            shape: p.shape.clone(),
            pieces: vec![p],
        });
    }
    pack(
        &mut files,
        "router/model",
        router,
        opts.max_file_bytes,
        BTreeMap::new(),
    );

    let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
    for (s, experts) in placement.iter().enumerate() {
        let mut tensors = Vec::new();
        for l in cfg.moe_layers() {
            let mut gate_up = Vec::new();
            let mut down = Vec::new();
            for &e in experts {
                let p = format!("model.layers.{l}.mlp.experts.{e}");
                gate_up.push(piece(&format!("{p}.gate_proj.weight"))?);
                gate_up.push(piece(&format!("{p}.up_proj.weight"))?);
                down.push(piece(&format!("{p}.down_proj.weight"))?);
            }
            let n = experts.len();
            tensors.push(stacked(
                format!("model.layers.{l}.mlp.experts.gate_up"),
                vec![n, 2 * i, h],
                gate_up,
                opts.dtype,
            )?);
            tensors.push(stacked(
                format!("model.layers.{l}.mlp.experts.down"),
                vec![n, h, i],
                down,
                opts.dtype,
            )?);
        }
        let meta: BTreeMap<String, String> = [
            ("format".to_string(), "pt".to_string()),
            (
                "experts".to_string(),
                experts
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        ]
        .into();
        pack(
            &mut files,
            &format!("shard-{s}/experts"),
            tensors,
            opts.max_file_bytes,
            meta,
        );
    }
    Ok(Plan {
        cfg_json,
        placement,
        files,
        dtype: opts.dtype,
        extras,
    })
}

/// One stacked expert tensor; with `--dtype keep` its pieces must share a dtype.
fn stacked(
    name: String,
    shape: Vec<usize>,
    pieces: Vec<Piece>,
    dtype: DtypeChoice,
) -> Result<OutTensor> {
    let dtypes: Vec<(DType, &Piece)> = pieces
        .iter()
        .map(|p| match &p.source {
            Source::File { dtype, .. } => (*dtype, p),
            Source::Random { .. } => (DType::Bf16, p),
        })
        .collect();
    let out = match dtype {
        DtypeChoice::Bf16 => DType::Bf16,
        DtypeChoice::Keep => {
            let (first, fp) = dtypes.first().map(|(d, p)| (*d, *p)).ok_or_else(|| {
                ConvertError::Invalid(format!("internal: stacked tensor `{name}` has no experts"))
            })?;
            if let Some((d, p)) = dtypes.iter().find(|(d, _)| *d != first) {
                let file = match &p.source {
                    Source::File { path, .. } => path.to_path_buf(),
                    Source::Random { .. } => PathBuf::new(),
                };
                return Err(ConvertError::Tensor {
                    tensor: p.name.clone(),
                    file,
                    msg: format!(
                        "is {} but `{}` is {}; experts stacked into `{name}` need one dtype (use --dtype bf16)",
                        d.name(),
                        fp.name,
                        first.name()
                    ),
                });
            }
            first
        }
    };
    Ok(OutTensor {
        name,
        dtype: out,
        shape,
        pieces,
    })
}

/// Packs tensors in order into files `PREFIX-NNNNN.safetensors` of at most `max` bytes each.
fn pack(
    files: &mut Vec<OutFile>,
    prefix: &str,
    tensors: Vec<OutTensor>,
    max: u64,
    metadata: BTreeMap<String, String>,
) {
    let mut cur: Vec<OutTensor> = Vec::new();
    let mut cur_bytes = 0u64;
    let mut k = 0;
    let mut flush = |cur: &mut Vec<OutTensor>, k: &mut usize| {
        if !cur.is_empty() {
            files.push(OutFile {
                rel: format!("{prefix}-{k:05}.safetensors"),
                tensors: std::mem::take(cur),
                metadata: metadata.clone(),
            });
            *k += 1;
        }
    };
    for t in tensors {
        if !cur.is_empty() && cur_bytes + t.bytes() > max {
            flush(&mut cur, &mut k);
            cur_bytes = 0;
        }
        cur_bytes += t.bytes();
        cur.push(t);
    }
    flush(&mut cur, &mut k);
}

/// Builds the manifest's tensor table from the planned layouts.
fn tensor_table(
    files: &[OutFile],
    layouts: &[crate::writer::Layout],
) -> BTreeMap<String, ManifestTensor> {
    let mut table: BTreeMap<String, ManifestTensor> = BTreeMap::new();
    for (f, layout) in files.iter().zip(layouts) {
        for (t, &toff) in f.tensors.iter().zip(&layout.tensor_offsets) {
            let mut off = toff;
            for p in &t.pieces {
                match table.get_mut(&p.name) {
                    Some(existing) => existing.replicas.push(ManifestLocation {
                        file: f.rel.clone(),
                        offset: off,
                    }),
                    None => {
                        table.insert(
                            p.name.clone(),
                            ManifestTensor {
                                file: f.rel.clone(),
                                offset: off,
                                dtype: t.dtype.name().to_string(),
                                shape: p.shape.clone(),
                                replicas: Vec::new(),
                            },
                        );
                    }
                }
                off += (p.source.numel() * t.dtype.size()) as u64;
            }
        }
    }
    table
}

/// Converts `opts.model_dir` into `opts.output_dir`. On any error the output dir has no
/// manifest (it is removed before the first byte is written and written only at the end).
pub fn convert(opts: &ConvertOptions, progress: &dyn Progress) -> Result<ConvertReport> {
    if opts.expert_shards == 0 {
        return Err(ConvertError::Invalid(
            "--expert-shards must be at least 1".into(),
        ));
    }
    progress.message("checking the source checkpoint");
    let plan = plan(opts)?;
    let out = &opts.output_dir;
    std::fs::create_dir_all(out).map_err(|e| ConvertError::io(out, e))?;
    let manifest_path = out.join(MANIFEST_FILE);
    if manifest_path.exists() {
        std::fs::remove_file(&manifest_path).map_err(|e| ConvertError::io(&manifest_path, e))?;
    }
    let layouts = plan
        .files
        .iter()
        .map(|f| f.layout())
        .collect::<Result<Vec<_>>>()?;
    let hashes: Vec<String> = plan
        .files
        .iter()
        .zip(&layouts)
        .map(|(f, l)| f.plan_hash(l))
        .collect();

    let state_path = out.join(STATE_FILE);
    let old_state: State = if opts.resume {
        std::fs::read_to_string(&state_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    } else {
        State::default()
    };
    let state = Mutex::new(State::default());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.max(1))
        .build()
        .map_err(|e| ConvertError::Invalid(format!("thread pool: {e}")))?;

    // --resume: keep a file only if its plan is unchanged and its bytes still hash to what was
    // recorded when it was finished.
    progress.message("checking finished files");
    let kept: Vec<Option<StateEntry>> = pool.install(|| {
        plan.files
            .par_iter()
            .zip(&layouts)
            .zip(&hashes)
            .map(|((f, l), h)| {
                let e = old_state.files.get(&f.rel)?;
                let path = out.join(&f.rel);
                let size = std::fs::metadata(&path).ok()?.len();
                if e.plan_hash != *h || e.size != l.size || size != l.size {
                    return None;
                }
                let sha = sha256_file(&path, &|_| {}).ok()?;
                (sha == e.sha256).then(|| e.clone())
            })
            .collect()
    });
    {
        let mut st = state.lock().map_err(|_| poisoned())?;
        for (f, k) in plan.files.iter().zip(&kept) {
            if let Some(e) = k {
                st.files.insert(f.rel.clone(), e.clone());
            }
        }
        save_state(&state_path, &st)?;
    }
    let total: u64 = plan
        .files
        .iter()
        .zip(&kept)
        .filter(|(_, k)| k.is_none())
        .map(|(f, _)| f.data_bytes())
        .sum();
    progress.start(total);
    progress.message("writing");
    // Biggest files first, so the last thread does not start a big file alone.
    let mut todo: Vec<usize> = (0..plan.files.len())
        .filter(|&i| kept[i].is_none())
        .collect();
    todo.sort_by_key(|&i| std::cmp::Reverse(layouts[i].size));
    let written: Vec<Result<()>> = pool.install(|| {
        todo.par_iter()
            .map(|&i| {
                let f = &plan.files[i];
                let w = write_file(out, f, progress)?;
                let mut st = state.lock().map_err(|_| poisoned())?;
                st.files.insert(
                    f.rel.clone(),
                    StateEntry {
                        plan_hash: hashes[i].clone(),
                        size: w.size,
                        sha256: w.sha256,
                    },
                );
                save_state(&state_path, &st)
            })
            .collect()
    });
    written.into_iter().collect::<Result<Vec<()>>>()?;

    progress.message("copying config and tokenizer");
    for name in COPIED {
        let from = opts.model_dir.join(name);
        if from.exists() {
            let bytes = std::fs::read(&from).map_err(|e| ConvertError::io(&from, e))?;
            write_atomic(&out.join(name), &bytes)?;
        }
    }
    let st = state.into_inner().map_err(|_| poisoned())?;
    let mut files = BTreeMap::new();
    for f in &plan.files {
        let e = st
            .files
            .get(&f.rel)
            .ok_or_else(|| ConvertError::Invalid(format!("internal: {} was not written", f.rel)))?;
        files.insert(
            f.rel.clone(),
            ManifestFile {
                size: e.size,
                sha256: e.sha256.clone(),
            },
        );
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        format_version: MANIFEST_VERSION,
        source_config: plan.cfg_json.clone(),
        dtype: match plan.dtype {
            DtypeChoice::Keep => "keep".into(),
            DtypeChoice::Bf16 => DType::Bf16.name().into(),
        },
        placement: plan.placement.clone(),
        files,
        tensors: tensor_table(&plan.files, &layouts),
    };
    let text = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| ConvertError::Invalid(format!("manifest: {e}")))?;
    // Last step: only now does the dir claim to be a finished conversion.
    write_atomic(&manifest_path, &text)?;
    // The state file stays: a later `--resume` with the same plan keeps every file.
    clean_tmp(out);
    let files_kept = kept.iter().filter(|k| k.is_some()).count();
    Ok(ConvertReport {
        bytes_written: total,
        files_written: plan.files.len() - files_kept,
        files_kept,
        placement: plan.placement,
    })
}

fn poisoned() -> ConvertError {
    ConvertError::Invalid("a writer thread panicked".into())
}

fn save_state(path: &Path, st: &State) -> Result<()> {
    let text = serde_json::to_vec(st).map_err(|e| ConvertError::Invalid(format!("state: {e}")))?;
    write_atomic(path, &text)
}

/// Removes `*.tmp` leftovers of interrupted runs.
fn clean_tmp(out: &Path) {
    let mut dirs = vec![out.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "tmp") {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}
