//! Checkpoint access: finds the safetensors files of a model dir (single file or sharded with
//! `model.safetensors.index.json`), memory-maps only the files holding tensors this process needs,
//! and hands out checked views of tensors in their stored dtype.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::SafeTensors;

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
    fn from_safetensors(d: safetensors::Dtype) -> Option<Self> {
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
    map: Arc<Mmap>,
    start: usize,
    end: usize,
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
    /// The raw little-endian bytes as stored.
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.start..self.end]
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// The mapping and byte range, for backends that keep weights in the page cache.
    pub fn mapping(&self) -> (Arc<Mmap>, usize, usize) {
        (self.map.clone(), self.start, self.end)
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
}

impl WeightStore {
    /// Opens the checkpoint in `dir`, mapping only files that hold at least one tensor for which
    /// `wanted(name)` is true, and exposing only those tensors.
    pub fn open(dir: &Path, wanted: impl Fn(&str) -> bool) -> Result<Self> {
        let files = checkpoint_files(dir, &wanted)?;
        let mut tensors = HashMap::new();
        for file in files {
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
                        map: map.clone(),
                        start: data_start + s,
                        end: data_start + e,
                    },
                );
            }
        }
        Ok(WeightStore {
            dir: dir.to_path_buf(),
            tensors,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
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
