//! Checkpoint access: finds the safetensors files of a model dir (single file or sharded with
//! `model.safetensors.index.json`), memory-maps only the files holding tensors this process needs,
//! and hands out checked views of tensors in their stored dtype. A dir made by `dsv2 convert`
//! (it holds `manifest.json`) is served the same way: the manifest maps every original Hugging
//! Face tensor name to a byte range of a converted file, so callers never see the difference.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// Element types we read from checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    Bf16,
    F16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 | DType::F16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::Bf16 => "BF16",
            DType::F16 => "F16",
        }
    }
    /// Parses the safetensors dtype names this crate supports ("BF16", "F16", "F32").
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "F32" => Some(DType::F32),
            "BF16" => Some(DType::Bf16),
            "F16" => Some(DType::F16),
            _ => None,
        }
    }
    pub fn to_safetensors(self) -> safetensors::Dtype {
        match self {
            DType::F32 => safetensors::Dtype::F32,
            DType::Bf16 => safetensors::Dtype::BF16,
            DType::F16 => safetensors::Dtype::F16,
        }
    }
    pub fn from_safetensors(d: safetensors::Dtype) -> Option<Self> {
        match d {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::BF16 => Some(DType::Bf16),
            safetensors::Dtype::F16 => Some(DType::F16),
            _ => None,
        }
    }
}

/// One tensor inside a memory-mapped file: its bytes stay in the page cache until read.
#[derive(Clone)]
pub struct TensorRef {
    pub name: String,
    pub file: PathBuf,
    pub dtype: DType,
    pub shape: Vec<usize>,
    data: RefData,
}

/// Where a tensor's values are.
#[derive(Clone)]
enum RefData {
    /// Bytes `start..end` of a memory-mapped file.
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        end: usize,
    },
    /// Nowhere yet: random values ([`WeightStore::random`]). The host materialises them on first
    /// use, exactly as `dsv2 init-random` writes them; a device backend generates its own.
    Random {
        init: RandomInit,
        host: std::sync::OnceLock<Vec<u8>>,
    },
}

/// N(mean, std) values from a ChaCha8 stream seeded with `seed`, stored as bf16.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandomInit {
    pub seed: u64,
    pub mean: f32,
    pub std: f32,
}

impl RandomInit {
    /// The `numel` values as little-endian bf16 bytes (`dsv2 init-random`'s exact values).
    pub fn bf16_bytes(&self, numel: usize) -> Vec<u8> {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        // A std that Normal refuses (negative, NaN) cannot come from the layout; fall back to
        // the constant mean rather than fail deep inside a backend.
        let dist = rand_distr::Normal::new(self.mean, self.std).ok();
        let mut out = Vec::with_capacity(numel * 2);
        for _ in 0..numel {
            let v = dist.as_ref().map_or(self.mean, |d| d.sample(&mut rng));
            out.extend(half::bf16::from_f32(v).to_bits().to_le_bytes());
        }
        out
    }
}

impl std::fmt::Debug for TensorRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorRef")
            .field("name", &self.name)
            .field("file", &self.file)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .finish()
    }
}

impl TensorRef {
    /// A view of bytes `start..end` of `map` as a tensor of `dtype` and `shape`, checked to lie
    /// inside the mapping and to hold exactly the shape's elements. Used for tensors that live
    /// inside a larger stacked tensor of a converted checkpoint.
    pub fn from_mapping(
        name: &str,
        file: &Path,
        dtype: DType,
        shape: Vec<usize>,
        map: Arc<Mmap>,
        start: usize,
        end: usize,
    ) -> Result<Self> {
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.size()));
        if start > end || end > map.len() || numel != Some(end - start) {
            return Err(CoreError::Tensor {
                tensor: name.to_string(),
                file: file.to_path_buf(),
                msg: format!(
                    "byte range {start}..{end} does not fit the file's {} bytes or the shape {shape:?} in {}",
                    map.len(),
                    dtype.name()
                ),
            });
        }
        Ok(TensorRef {
            name: name.to_string(),
            file: file.to_path_buf(),
            dtype,
            shape,
            data: RefData::Mapped { map, start, end },
        })
    }

    /// The raw little-endian bytes as stored (a random tensor is generated here on first use).
    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            RefData::Mapped { map, start, end } => &map[*start..*end],
            RefData::Random { init, host } => host.get_or_init(|| init.bf16_bytes(self.numel())),
        }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// The mapping and byte range, for backends that keep weights in the page cache; None for a
    /// random tensor (no file behind it).
    pub fn mapping(&self) -> Option<(Arc<Mmap>, usize, usize)> {
        match &self.data {
            RefData::Mapped { map, start, end } => Some((map.clone(), *start, *end)),
            RefData::Random { .. } => None,
        }
    }
    /// How a random tensor's values are drawn (None for a tensor read from a file): a device
    /// backend generates such a tensor where it lives instead of materialising it on the host.
    pub fn random_init(&self) -> Option<RandomInit> {
        match &self.data {
            RefData::Random { init, .. } => Some(*init),
            RefData::Mapped { .. } => None,
        }
    }
    /// Converts to f32 (for small tensors such as norms; large weights stay in their dtype).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let b = self.bytes();
        match self.dtype {
            DType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::Bf16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
        }
    }
}

/// The safetensors files of one model directory, with a name → file table.
pub struct WeightStore {
    dir: PathBuf,
    tensors: HashMap<String, TensorRef>,
    /// The files this store memory-mapped, sorted.
    files: Vec<PathBuf>,
}

impl WeightStore {
    /// Opens the checkpoint in `dir`, mapping only files that hold at least one tensor for which
    /// `wanted(name)` is true, and exposing only those tensors. A converted dir (with
    /// `manifest.json`) is checked against its manifest first and refused with the reason when
    /// they disagree.
    pub fn open(dir: &Path, wanted: impl Fn(&str) -> bool) -> Result<Self> {
        if dir.join(MANIFEST_FILE).exists() {
            return Self::open_converted(dir, &wanted);
        }
        let files = checkpoint_files(dir, &wanted)?;
        let mut tensors = HashMap::new();
        for file in &files {
            let file = file.clone();
            let f = File::open(&file).map_err(|e| CoreError::io(&file, e))?;
            // SAFETY: the checkpoint is opened read-only; like every inference server we rely on
            // nobody rewriting model files underneath a running process.
            let map = unsafe { Mmap::map(&f) }.map_err(|e| CoreError::io(&file, e))?;
            let map = Arc::new(map);
            let (header_len, meta) =
                SafeTensors::read_metadata(&map[..]).map_err(|e| CoreError::File {
                    path: file.clone(),
                    msg: format!(
                        "not a valid safetensors file ({e}); it may be truncated or corrupt"
                    ),
                })?;
            let data_start = 8 + header_len;
            let data_len = map.len() - data_start;
            for (name, info) in meta.tensors() {
                if !wanted(&name) {
                    continue;
                }
                let dtype =
                    DType::from_safetensors(info.dtype).ok_or_else(|| CoreError::Tensor {
                        tensor: name.clone(),
                        file: file.clone(),
                        msg: format!(
                            "dtype {:?} is not supported (expected BF16, F16 or F32)",
                            info.dtype
                        ),
                    })?;
                let (s, e) = info.data_offsets;
                let numel: usize = info.shape.iter().product();
                if e > data_len || s > e || e - s != numel * dtype.size() {
                    return Err(CoreError::Tensor {
                        tensor: name.clone(),
                        file: file.clone(),
                        msg: format!(
                            "byte range {s}..{e} does not fit the file's {data_len} data bytes or its shape {:?}; the file is truncated or corrupt",
                            info.shape
                        ),
                    });
                }
                tensors.insert(
                    name.clone(),
                    TensorRef {
                        name: name.clone(),
                        file: file.clone(),
                        dtype,
                        shape: info.shape.clone(),
                        data: RefData::Mapped {
                            map: map.clone(),
                            start: data_start + s,
                            end: data_start + e,
                        },
                    },
                );
            }
        }
        Ok(WeightStore {
            dir: dir.to_path_buf(),
            tensors,
            files,
        })
    }

    /// [`WeightStore::random`] with `Some(seed)`, else [`WeightStore::open`].
    pub fn open_or_random(
        dir: &Path,
        random: Option<u64>,
        wanted: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        match random {
            Some(seed) => Self::random(dir, seed, wanted),
            None => Self::open(dir, wanted),
        }
    }

    /// A checkpoint that exists nowhere: every tensor of the layout of `dir/config.json`, with
    /// random bf16 values from `seed` — on the host exactly what `dsv2 init-random --seed SEED`
    /// writes (same names, shapes, N(mean, std) and per-tensor streams), on a device generated
    /// where the weights live. For benchmarks at full scale without hundreds of GB of files.
    pub fn random(dir: &Path, seed: u64, wanted: impl Fn(&str) -> bool) -> Result<Self> {
        let cfg = crate::ModelConfig::from_model_dir(dir)?;
        let file = dir.join(format!("<random weights, seed {seed}>"));
        let tensors = crate::layout::expected_tensors(&cfg, crate::layout::LINEAR_STD)
            .into_iter()
            .enumerate()
            .filter(|(_, e)| wanted(&e.name))
            .map(|(i, e)| {
                let t = TensorRef {
                    name: e.name.clone(),
                    file: file.clone(),
                    dtype: DType::Bf16,
                    shape: e.shape,
                    data: RefData::Random {
                        init: RandomInit {
                            seed: crate::layout::tensor_seed(seed, i),
                            mean: e.init.mean,
                            std: e.init.std,
                        },
                        host: std::sync::OnceLock::new(),
                    },
                };
                (e.name, t)
            })
            .collect();
        Ok(WeightStore {
            dir: dir.to_path_buf(),
            tensors,
            files: Vec::new(),
        })
    }

    /// Opens a dir written by `dsv2 convert`: validates the manifest (format, version, every
    /// listed file's size, every wanted tensor's range against its file's safetensors header)
    /// and maps only the files holding wanted tensors. Checksums are not hashed here (hundreds of
    /// GB at every start); `verify_converted` does that on request.
    fn open_converted(dir: &Path, wanted: &impl Fn(&str) -> bool) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        let mpath = dir.join(MANIFEST_FILE);
        let refuse = |msg: String| CoreError::File {
            path: mpath.clone(),
            msg: format!(
                "{msg}; the converted dir does not match its manifest (re-run `dsv2 convert`)"
            ),
        };
        // Sizes of every listed file: a wrong size means the dir was changed after conversion.
        // A file that is absent is allowed unless this process needs it: a node may hold only
        // its own shard's files.
        let mut present: HashMap<&str, bool> = HashMap::new();
        for (rel, f) in &manifest.files {
            let path = manifest_path(dir, rel).map_err(&refuse)?;
            match std::fs::metadata(&path) {
                Ok(m) if m.len() == f.size => {
                    present.insert(rel.as_str(), true);
                }
                Ok(m) => {
                    return Err(refuse(format!(
                        "{} is {} bytes, the manifest says {}",
                        path.display(),
                        m.len(),
                        f.size
                    )));
                }
                Err(_) => {
                    present.insert(rel.as_str(), false);
                }
            }
        }
        // Choose one location per wanted tensor. Replicated experts have several; prefer a file
        // this process maps anyway, so a shard maps only its own shard's files.
        let chosen_files: std::collections::BTreeSet<&str> = manifest
            .tensors
            .iter()
            .filter(|(n, t)| wanted(n) && t.replicas.is_empty())
            .map(|(_, t)| t.file.as_str())
            .collect();
        let mut picks: Vec<(&str, &ManifestTensor, &str, u64)> = Vec::new();
        for (name, t) in &manifest.tensors {
            if !wanted(name) {
                continue;
            }
            let mut loc = (t.file.as_str(), t.offset);
            if !chosen_files.contains(loc.0)
                && let Some(r) = t
                    .replicas
                    .iter()
                    .find(|r| chosen_files.contains(r.file.as_str()))
            {
                loc = (r.file.as_str(), r.offset);
            }
            picks.push((name, t, loc.0, loc.1));
        }
        let mut maps: BTreeMap<&str, (PathBuf, Arc<Mmap>, TensorRanges)> = BTreeMap::new();
        let mut tensors = HashMap::new();
        for (name, t, rel, offset) in picks {
            let Some(&ok) = present.get(rel) else {
                return Err(refuse(format!(
                    "tensor `{name}` points at {rel}, which the manifest does not list"
                )));
            };
            if !ok {
                return Err(CoreError::File {
                    path: manifest_path(dir, rel).map_err(&refuse)?,
                    msg: format!("listed in {MANIFEST_FILE} (holds tensor `{name}`) but missing"),
                });
            }
            if !maps.contains_key(rel) {
                let path = manifest_path(dir, rel).map_err(&refuse)?;
                let (map, ranges) = map_safetensors(&path)?;
                maps.insert(rel, (path, map, ranges));
            }
            let (path, map, ranges) = &maps[rel];
            let dtype = DType::from_name(&t.dtype)
                .ok_or_else(|| refuse(format!("tensor `{name}` has unknown dtype {}", t.dtype)))?;
            let len = t
                .shape
                .iter()
                .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
                .ok_or_else(|| refuse(format!("tensor `{name}` shape overflows")))?;
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            let end = start.saturating_add(len);
            // The range must lie inside one tensor of the file's own header, of the same dtype.
            let inside = ranges
                .iter()
                .any(|&(s, e, d)| s <= start && end <= e && d == dtype);
            if !inside {
                return Err(refuse(format!(
                    "tensor `{name}` ({} {:?} at byte {offset}) does not lie inside a {} tensor of {}",
                    t.dtype,
                    t.shape,
                    t.dtype,
                    path.display()
                )));
            }
            let r = TensorRef::from_mapping(
                name,
                path,
                dtype,
                t.shape.clone(),
                map.clone(),
                start,
                end,
            )?;
            tensors.insert(name.to_string(), r);
        }
        let files = maps.into_values().map(|(p, _, _)| p).collect();
        Ok(WeightStore {
            dir: dir.to_path_buf(),
            tensors,
            files,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The files this store memory-mapped (only those holding wanted tensors), sorted.
    pub fn mapped_files(&self) -> &[PathBuf] {
        &self.files
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    /// The tensor `name` whatever its shape (for tools that copy tensors; loaders use `get`).
    pub fn tensor(&self, name: &str) -> Option<&TensorRef> {
        self.tensors.get(name)
    }

    /// The tensor `name`, checked to have exactly `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<&TensorRef> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| CoreError::MissingTensor {
                tensor: name.to_string(),
                msg: format!("not found in the checkpoint at {}", self.dir.display()),
            })?;
        if t.shape != shape {
            return Err(CoreError::Tensor {
                tensor: name.to_string(),
                file: t.file.clone(),
                msg: format!("expected shape {shape:?}, found {:?}", t.shape),
            });
        }
        Ok(t)
    }

    /// A fingerprint of the tensors this store exposes: names, shapes, dtypes and a sample of
    /// bytes from each (cheap to compute on hundreds of GB, still catches a different checkpoint).
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let sorted: BTreeMap<_, _> = self.tensors.iter().collect();
        let mut h = Sha256::new();
        for (name, t) in sorted {
            h.update(name.as_bytes());
            h.update(format!("{:?}{:?}", t.dtype, t.shape).as_bytes());
            if let Some(r) = t.random_init() {
                // never materialise a random tensor just to fingerprint it
                h.update(format!("random {} {} {}", r.seed, r.mean, r.std).as_bytes());
                continue;
            }
            let b = t.bytes();
            h.update(&b[..b.len().min(64)]);
            h.update(&b[b.len().saturating_sub(64)..]);
        }
        h.finalize()
            .iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// The files of a checkpoint that hold at least one wanted tensor.
fn checkpoint_files(dir: &Path, wanted: &impl Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| CoreError::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| CoreError::File {
            path: index.clone(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| CoreError::File {
                path: index.clone(),
                msg: "has no `weight_map` object".into(),
            })?;
        let mut files: Vec<PathBuf> = Vec::new();
        for (name, file) in map {
            if !wanted(name) {
                continue;
            }
            let file = file.as_str().ok_or_else(|| CoreError::File {
                path: index.clone(),
                msg: format!("weight_map entry for `{name}` is not a file name"),
            })?;
            let path = dir.join(file);
            if !files.contains(&path) {
                if !path.exists() {
                    return Err(CoreError::File {
                        path,
                        msg: format!(
                            "listed in model.safetensors.index.json (for tensor `{name}`) but missing"
                        ),
                    });
                }
                files.push(path);
            }
        }
        files.sort();
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    if !dir.exists() {
        return Err(CoreError::File {
            path: dir.to_path_buf(),
            msg: "model directory does not exist".into(),
        });
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| CoreError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(CoreError::File {
            path: dir.to_path_buf(),
            msg: "no model.safetensors, model.safetensors.index.json or *.safetensors files found"
                .into(),
        });
    }
    Ok(files)
}

/// Maps a safetensors file and returns its tensors' absolute byte ranges and dtypes.
/// Absolute (start, end, dtype) of every tensor of a safetensors file.
type TensorRanges = Vec<(usize, usize, DType)>;

fn map_safetensors(path: &Path) -> Result<(Arc<Mmap>, TensorRanges)> {
    let f = File::open(path).map_err(|e| CoreError::io(path, e))?;
    // SAFETY: read-only mapping of a model file; see `WeightStore::open`.
    let map = Arc::new(unsafe { Mmap::map(&f) }.map_err(|e| CoreError::io(path, e))?);
    let (header_len, meta) = SafeTensors::read_metadata(&map[..]).map_err(|e| CoreError::File {
        path: path.to_path_buf(),
        msg: format!("not a valid safetensors file ({e}); it may be truncated or corrupt"),
    })?;
    let data_start = 8 + header_len;
    let ranges = meta
        .tensors()
        .values()
        .filter_map(|info| {
            let d = DType::from_safetensors(info.dtype)?;
            Some((
                data_start + info.data_offsets.0,
                data_start + info.data_offsets.1,
                d,
            ))
        })
        .collect();
    Ok((map, ranges))
}

/// The name of the manifest that marks a converted dir.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The `format` value of a converted dir's manifest.
pub const MANIFEST_FORMAT: &str = "dsv2-converted";
/// The manifest layout this build reads and writes.
pub const MANIFEST_VERSION: u32 = 1;

/// `manifest.json` of a converted dir: what was converted from what, every file with its size
/// and checksum, and every original Hugging Face tensor name with the byte range that holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    /// The source checkpoint's config.json, verbatim.
    pub source_config: serde_json::Value,
    /// "keep" (source dtypes) or the dtype everything was converted to ("BF16").
    pub dtype: String,
    /// Expert ids per shard, as written (an expert may sit on several shards).
    pub placement: Vec<Vec<usize>>,
    /// Relative path ('/'-separated) → size and checksum.
    pub files: BTreeMap<String, ManifestFile>,
    /// Original tensor name → where its bytes are.
    pub tensors: BTreeMap<String, ManifestTensor>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestFile {
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestTensor {
    pub file: String,
    /// Absolute byte offset in `file` (header included).
    pub offset: u64,
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Further copies of the same bytes (replicated experts on other shards).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ManifestLocation>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestLocation {
    pub file: String,
    pub offset: u64,
}

impl Manifest {
    /// Reads and checks the format and version of `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| CoreError::io(&path, e))?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| CoreError::File {
            path: path.clone(),
            msg: format!("not a valid dsv2 manifest: {e}"),
        })?;
        if m.format != MANIFEST_FORMAT || m.format_version != MANIFEST_VERSION {
            return Err(CoreError::File {
                path,
                msg: format!(
                    "format `{}` version {} is not supported (this build reads `{MANIFEST_FORMAT}` version {MANIFEST_VERSION})",
                    m.format, m.format_version
                ),
            });
        }
        Ok(m)
    }
}

/// `dir/rel` for a manifest path, refusing absolute paths and `..` (a manifest must not point
/// outside its dir).
fn manifest_path(dir: &Path, rel: &str) -> std::result::Result<PathBuf, String> {
    let p = Path::new(rel);
    if rel.is_empty()
        || p.is_absolute()
        || p.components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(format!("file name `{rel}` leaves the dir"));
    }
    Ok(dir.join(p))
}

/// SHA-256 of a file, read in 8 MiB chunks; `progress` gets the bytes as they are hashed.
pub fn sha256_file(path: &Path, progress: &(dyn Fn(u64) + Sync)) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = File::open(path).map_err(|e| CoreError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| CoreError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        progress(n as u64);
    }
    Ok(hex(&h.finalize()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hashes every file of a converted dir (in parallel) and compares with the manifest; the error
/// lists every file that differs.
pub fn verify_converted(dir: &Path, progress: &(dyn Fn(u64) + Sync)) -> Result<()> {
    let manifest = Manifest::read(dir)?;
    let bad: Vec<String> = manifest
        .files
        .par_iter()
        .filter_map(|(rel, f)| {
            let path = match manifest_path(dir, rel) {
                Ok(p) => p,
                Err(e) => return Some(e),
            };
            match std::fs::metadata(&path) {
                Err(e) => return Some(format!("{rel}: {e}")),
                Ok(m) if m.len() != f.size => {
                    return Some(format!(
                        "{rel}: {} bytes, manifest says {}",
                        m.len(),
                        f.size
                    ));
                }
                Ok(_) => {}
            }
            match sha256_file(&path, progress) {
                Ok(h) if h == f.sha256 => None,
                Ok(h) => Some(format!("{rel}: sha256 {h}, manifest says {}", f.sha256)),
                Err(e) => Some(e.to_string()),
            }
        })
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(CoreError::File {
            path: dir.join(MANIFEST_FILE),
            msg: format!("checksum verification failed: {}", bad.join("; ")),
        })
    }
}

/// Whether a tensor belongs to a routed expert; `Some((layer, expert))` if so.
pub fn routed_expert_of(name: &str) -> Option<(usize, usize)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let rest = rest.strip_prefix("mlp.experts.")?;
    let (expert, _) = rest.split_once('.')?;
    Some((layer.parse().ok()?, expert.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn write(path: &Path, tensors: &[(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    #[test]
    fn routed_expert_names() {
        assert_eq!(
            routed_expert_of("model.layers.3.mlp.experts.17.up_proj.weight"),
            Some((3, 17))
        );
        assert_eq!(
            routed_expert_of("model.layers.3.mlp.shared_experts.up_proj.weight"),
            None
        );
        assert_eq!(routed_expert_of("model.layers.3.mlp.gate.weight"), None);
    }

    #[test]
    fn reads_dtypes_and_checks_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let f32s: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let bf: Vec<u8> = [half::bf16::from_f32(3.0)]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        write(
            &dir.path().join("model.safetensors"),
            &[
                ("a", safetensors::Dtype::F32, vec![2], f32s),
                ("b", safetensors::Dtype::BF16, vec![1, 1], bf),
            ],
        );
        let store = WeightStore::open(dir.path(), |_| true).unwrap();
        assert_eq!(store.get("a", &[2]).unwrap().to_f32_vec(), vec![1.5, -2.0]);
        assert_eq!(store.get("b", &[1, 1]).unwrap().to_f32_vec(), vec![3.0]);
        let err = store.get("a", &[3]).unwrap_err().to_string();
        assert!(
            err.contains("`a`")
                && err.contains("[3]")
                && err.contains("[2]")
                && err.contains("model.safetensors"),
            "{err}"
        );
        let err = store.get("zzz", &[1]).unwrap_err().to_string();
        assert!(err.contains("zzz") && err.contains("not found"), "{err}");
    }

    #[test]
    fn rejects_unsupported_dtype_naming_tensor_and_file() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("model.safetensors"),
            &[("ints", safetensors::Dtype::I32, vec![1], vec![0; 4])],
        );
        let err = WeightStore::open(dir.path(), |_| true)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("ints") && err.contains("I32") && err.contains("model.safetensors"),
            "{err}"
        );
    }

    #[test]
    fn truncated_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        write(
            &p,
            &[("a", safetensors::Dtype::F32, vec![64], vec![0; 256])],
        );
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        let err = WeightStore::open(dir.path(), |_| true)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("truncated"),
            "{err}"
        );
    }

    #[test]
    fn sharded_index_maps_only_wanted_files() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("a.safetensors"),
            &[("dense", safetensors::Dtype::F32, vec![1], vec![0; 4])],
        );
        write(
            &dir.path().join("b.safetensors"),
            &[(
                "model.layers.1.mlp.experts.0.up_proj.weight",
                safetensors::Dtype::F32,
                vec![1],
                vec![0; 4],
            )],
        );
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"weight_map": {"dense": "a.safetensors", "model.layers.1.mlp.experts.0.up_proj.weight": "b.safetensors"}}"#,
        )
        .unwrap();
        // Remove b: a router (no routed experts) must not even need it.
        std::fs::remove_file(dir.path().join("b.safetensors")).unwrap();
        let store = WeightStore::open(dir.path(), |n| routed_expert_of(n).is_none()).unwrap();
        assert!(store.contains("dense"));
        let err = WeightStore::open(dir.path(), |_| true)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("b.safetensors") && err.contains("missing"),
            "{err}"
        );
    }

    #[test]
    fn missing_dir_and_empty_dir() {
        let err = WeightStore::open(Path::new("/nonexistent/model"), |_| true)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let err = WeightStore::open(dir.path(), |_| true)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no model.safetensors"), "{err}");
    }
}
