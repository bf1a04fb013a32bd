//! Streaming safetensors writer. The header (every name, dtype, shape and offset) is computed up
//! front from the plan, then tensor data is written sequentially, piece by piece, in bounded
//! chunks: from a source file by positioned reads (`pread`, not the memory map: touched mmap
//! pages would count in our RSS and stay mapped until unmapped), or from a seeded RNG. Dtype
//! conversion happens chunk-wise. Bytes go through `crate::pipeline`, which overlaps reading,
//! hashing and O_DIRECT writing. Files are written as `NAME.tmp`, fsynced and renamed, so a
//! half-written file never carries the final name. Hand-written because the `safetensors` crate
//! serializes only from in-memory buffers.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dsv2_core::weights::{DType, hex};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use sha2::{Digest, Sha256};

use crate::Progress;
use crate::error::{ConvertError, Result};
use crate::pipeline::{self, Sink};

/// Elements per chunk: 4 Mi elements = 16 MiB of f32 staging per writer thread.
pub const CHUNK_ELEMS: usize = 4 << 20;

/// Where a piece's values come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// `numel` values of `dtype` at absolute byte `offset` of `path`.
    File {
        path: Arc<PathBuf>,
        offset: u64,
        dtype: DType,
        numel: usize,
    },
    /// `numel` values drawn from N(mean, std) by ChaCha8 seeded with `seed`.
    Random {
        seed: u64,
        mean: f32,
        std: f32,
        numel: usize,
    },
}

impl Source {
    pub fn numel(&self) -> usize {
        match self {
            Source::File { numel, .. } | Source::Random { numel, .. } => *numel,
        }
    }
}

/// One original tensor inside an output tensor (an expert's gate inside a stacked gate_up).
#[derive(Debug, Clone)]
pub struct Piece {
    pub name: String,
    pub shape: Vec<usize>,
    pub source: Source,
}

#[derive(Debug, Clone)]
pub struct OutTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Concatenated in order; their element counts sum to the shape's.
    pub pieces: Vec<Piece>,
}

impl OutTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn bytes(&self) -> u64 {
        (self.numel() * self.dtype.size()) as u64
    }
}

/// One output file: relative path, tensors in data order, `__metadata__`.
#[derive(Debug, Clone)]
pub struct OutFile {
    pub rel: String,
    pub tensors: Vec<OutTensor>,
    pub metadata: BTreeMap<String, String>,
}

/// Where everything of an `OutFile` lands.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The 8-byte length prefix and the JSON header, padded to a multiple of 8.
    pub header: Vec<u8>,
    /// Absolute byte offset of each tensor's data.
    pub tensor_offsets: Vec<u64>,
    pub size: u64,
}

impl OutFile {
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes()).sum()
    }

    pub fn layout(&self) -> Result<Layout> {
        let mut header = serde_json::Map::new();
        if !self.metadata.is_empty() {
            header.insert(
                "__metadata__".into(),
                serde_json::to_value(&self.metadata).unwrap_or_default(),
            );
        }
        let mut off = 0u64;
        let mut rel_offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            let pieces: usize = t.pieces.iter().map(|p| p.source.numel()).sum();
            if pieces != t.numel() {
                return Err(ConvertError::Invalid(format!(
                    "internal: tensor `{}` of {} has shape {:?} but its pieces hold {pieces} values",
                    t.name, self.rel, t.shape
                )));
            }
            let end = off + t.bytes();
            header.insert(
                t.name.clone(),
                serde_json::json!({
                    "dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [off, end]
                }),
            );
            rel_offsets.push(off);
            off = end;
        }
        let mut json = serde_json::to_vec(&header)
            .map_err(|e| ConvertError::Invalid(format!("header of {}: {e}", self.rel)))?;
        // Pad with spaces so tensor data starts 8-byte aligned (as safetensors itself does).
        while json.len() % 8 != 0 {
            json.push(b' ');
        }
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&json);
        let data_start = bytes.len() as u64;
        Ok(Layout {
            tensor_offsets: rel_offsets.iter().map(|o| o + data_start).collect(),
            size: data_start + off,
            header: bytes,
        })
    }

    /// A digest of everything that determines this file's bytes: the header and, per piece, its
    /// source (file path, size and mtime, offset, dtype; or the RNG parameters). `--resume`
    /// keeps a finished file only when this matches.
    pub fn plan_hash(&self, layout: &Layout) -> String {
        let mut h = Sha256::new();
        h.update(&layout.header);
        for t in &self.tensors {
            for p in &t.pieces {
                match &p.source {
                    Source::File {
                        path,
                        offset,
                        dtype,
                        numel,
                    } => {
                        let (size, mtime) = std::fs::metadata(path.as_path())
                            .map(|m| {
                                let mt = m
                                    .modified()
                                    .ok()
                                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                                    .map(|d| d.as_nanos())
                                    .unwrap_or(0);
                                (m.len(), mt)
                            })
                            .unwrap_or((0, 0));
                        h.update(
                            format!(
                                "file|{}|{size}|{mtime}|{offset}|{}|{numel}|{}\n",
                                path.display(),
                                dtype.name(),
                                t.dtype.name()
                            )
                            .as_bytes(),
                        );
                    }
                    Source::Random {
                        seed,
                        mean,
                        std,
                        numel,
                    } => h.update(
                        format!("rand|{seed}|{mean}|{std}|{numel}|{}\n", t.dtype.name()).as_bytes(),
                    ),
                }
            }
        }
        hex(&h.finalize())
    }
}

/// A written file's size and checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub size: u64,
    pub sha256: String,
}

/// Writes `f` to `dir/f.rel` atomically, hashing as it goes. Reading the sources, hashing and
/// writing overlap (`crate::pipeline`).
pub fn write_file(dir: &Path, f: &OutFile, progress: &dyn Progress) -> Result<Written> {
    let layout = f.layout()?;
    let path = dir.join(&f.rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| ConvertError::io(parent, e))?;
    }
    let tmp = tmp_path(&path);
    let (out, direct) = create_output(&tmp)?;
    let done = pipeline::run(&out, &tmp, direct, |sink| {
        sink.write(&layout.header)?;
        let mut sources: HashMap<Arc<PathBuf>, File> = HashMap::new();
        let mut stage = Stage::default();
        for t in &f.tensors {
            for p in &t.pieces {
                write_piece(sink, &mut sources, &mut stage, p, t, progress)?;
            }
        }
        Ok(())
    })?;
    if done.size != layout.size {
        return Err(ConvertError::Invalid(format!(
            "internal: wrote {} bytes to {}, planned {}",
            done.size,
            tmp.display(),
            layout.size
        )));
    }
    drop(out);
    publish(&tmp, &path)?;
    Ok(Written {
        size: layout.size,
        sha256: hex(&done.sha256),
    })
}

/// `x.safetensors` → `x.safetensors.tmp`.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Renames a finished, fsynced temporary file into place and fsyncs the directory so the
/// rename itself survives a crash.
pub fn publish(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::rename(tmp, path).map_err(|e| ConvertError::io(path, e))?;
    if let Some(parent) = path.parent()
        && let Ok(d) = File::open(parent)
    {
        // Some filesystems refuse fsync on directories; the rename is still done.
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically (tmp, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| ConvertError::io(parent, e))?;
    }
    let tmp = tmp_path(path);
    let mut f = File::create(&tmp).map_err(|e| ConvertError::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| ConvertError::io(&tmp, e))?;
    f.sync_all().map_err(|e| ConvertError::io(&tmp, e))?;
    drop(f);
    publish(&tmp, path)
}

/// Creates the output file, with O_DIRECT where the filesystem allows it: buffered writeback
/// of many GB measured 285 MB/s here against 1.1 GB/s for direct writes (bench/RESULTS.md),
/// and direct writes keep the page cache for the source. Falls back to buffered I/O.
fn create_output(path: &Path) -> Result<(File, bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    let direct = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path);
    match direct {
        Ok(f) => Ok((f, true)),
        Err(_) => File::create(path)
            .map(|f| (f, false))
            .map_err(|e| ConvertError::io(path, e)),
    }
}

/// Reusable staging buffers for dtype conversion and random values (bounded: CHUNK_ELEMS
/// values each). Same-dtype copies need none: they are read straight into the output blocks.
#[derive(Default)]
struct Stage {
    raw: Vec<u8>,
    f32s: Vec<f32>,
    out: Vec<u8>,
}

fn write_piece(
    w: &mut Sink,
    sources: &mut HashMap<Arc<PathBuf>, File>,
    stage: &mut Stage,
    p: &Piece,
    t: &OutTensor,
    progress: &dyn Progress,
) -> Result<()> {
    let out_dtype = t.dtype;
    match &p.source {
        Source::File {
            path,
            offset,
            dtype,
            numel,
        } => {
            if !sources.contains_key(path) {
                let f =
                    File::open(path.as_path()).map_err(|e| ConvertError::io(path.as_path(), e))?;
                sources.insert(path.clone(), f);
            }
            let src = &sources[path];
            let read_err = |at: u64, n: usize, e: std::io::Error| ConvertError::Tensor {
                tensor: p.name.clone(),
                file: path.to_path_buf(),
                msg: format!("cannot read bytes {at}..{}: {e}", at + n as u64),
            };
            if *dtype == out_dtype {
                // Straight into the output blocks, a block's worth at a time.
                let nbytes = numel * dtype.size();
                let mut done = 0usize;
                while done < nbytes {
                    let n = (CHUNK_ELEMS * dtype.size()).min(nbytes - done);
                    w.read_from(src, offset + done as u64, n, &read_err)?;
                    progress.advance(n as u64);
                    done += n;
                }
                return Ok(());
            }
            let mut done = 0usize;
            while done < *numel {
                let n = CHUNK_ELEMS.min(numel - done);
                let nbytes = n * dtype.size();
                stage.raw.resize(nbytes, 0);
                let at = offset + (done * dtype.size()) as u64;
                src.read_exact_at(&mut stage.raw[..nbytes], at)
                    .map_err(|e| read_err(at, nbytes, e))?;
                to_f32(*dtype, &stage.raw[..nbytes], &mut stage.f32s);
                encode(out_dtype, &stage.f32s, &mut stage.out);
                w.write(&stage.out)?;
                progress.advance((n * out_dtype.size()) as u64);
                done += n;
            }
        }
        Source::Random {
            seed,
            mean,
            std,
            numel,
        } => {
            let mut rng = ChaCha8Rng::seed_from_u64(*seed);
            let dist = Normal::new(*mean, *std).map_err(|e| {
                ConvertError::Invalid(format!(
                    "tensor `{}`: bad init N({mean}, {std}): {e}",
                    p.name
                ))
            })?;
            let mut done = 0usize;
            while done < *numel {
                let n = CHUNK_ELEMS.min(numel - done);
                stage.f32s.clear();
                stage.f32s.extend((0..n).map(|_| dist.sample(&mut rng)));
                encode(out_dtype, &stage.f32s, &mut stage.out);
                w.write(&stage.out)?;
                progress.advance((n * out_dtype.size()) as u64);
                done += n;
            }
        }
    }
    Ok(())
}

/// Little-endian bytes of `dtype` → f32 values (little-endian hosts only, like the rest of
/// the workspace). Casts in place when the buffer is aligned (it is, from the allocator).
pub fn to_f32(dtype: DType, raw: &[u8], out: &mut Vec<f32>) {
    out.clear();
    match dtype {
        DType::F32 => out.extend(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        DType::Bf16 => {
            out.resize(raw.len() / 2, 0.0);
            match bytemuck::try_cast_slice::<u8, bf16>(raw) {
                Ok(v) => v.convert_to_f32_slice(out),
                Err(_) => {
                    for (o, c) in out.iter_mut().zip(raw.chunks_exact(2)) {
                        *o = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                    }
                }
            }
        }
        DType::F16 => {
            out.resize(raw.len() / 2, 0.0);
            match bytemuck::try_cast_slice::<u8, f16>(raw) {
                Ok(v) => v.convert_to_f32_slice(out),
                Err(_) => {
                    for (o, c) in out.iter_mut().zip(raw.chunks_exact(2)) {
                        *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                    }
                }
            }
        }
    }
}

/// f32 values → little-endian bytes of `dtype` (round to nearest even).
pub fn encode(dtype: DType, vals: &[f32], out: &mut Vec<u8>) {
    out.clear();
    match dtype {
        DType::F32 => out.extend_from_slice(bytemuck::cast_slice(vals)),
        DType::Bf16 => {
            out.resize(vals.len() * 2, 0);
            match bytemuck::try_cast_slice_mut::<u8, bf16>(out) {
                Ok(v) => v.convert_from_f32_slice(vals),
                Err(_) => {
                    for (c, &x) in out.chunks_exact_mut(2).zip(vals) {
                        c.copy_from_slice(&bf16::from_f32(x).to_bits().to_le_bytes());
                    }
                }
            }
        }
        DType::F16 => {
            out.resize(vals.len() * 2, 0);
            match bytemuck::try_cast_slice_mut::<u8, f16>(out) {
                Ok(v) => v.convert_from_f32_slice(vals),
                Err(_) => {
                    for (c, &x) in out.chunks_exact_mut(2).zip(vals) {
                        c.copy_from_slice(&f16::from_f32(x).to_bits().to_le_bytes());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NoProgress;

    #[test]
    fn written_file_is_valid_safetensors_with_pieces_concatenated() {
        let dir = tempfile::tempdir().unwrap();
        // A source file with two f32 tensors.
        let a: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..6).map(|i| -(i as f32)).collect();
        let src = dir.path().join("src.bin");
        let mut raw: Vec<u8> = bytemuck::cast_slice(&a).to_vec();
        raw.extend_from_slice(bytemuck::cast_slice(&b));
        std::fs::write(&src, &raw).unwrap();
        let src = Arc::new(src);
        let piece = |name: &str, off: u64| Piece {
            name: name.into(),
            shape: vec![2, 3],
            source: Source::File {
                path: src.clone(),
                offset: off,
                dtype: DType::F32,
                numel: 6,
            },
        };
        let f = OutFile {
            rel: "sub/x.safetensors".into(),
            tensors: vec![
                OutTensor {
                    name: "stacked".into(),
                    dtype: DType::Bf16,
                    shape: vec![2, 2, 3],
                    pieces: vec![piece("a", 0), piece("b", 24)],
                },
                OutTensor {
                    name: "r".into(),
                    dtype: DType::F32,
                    shape: vec![5],
                    pieces: vec![Piece {
                        name: "r".into(),
                        shape: vec![5],
                        source: Source::Random {
                            seed: 3,
                            mean: 1.0,
                            std: 0.1,
                            numel: 5,
                        },
                    }],
                },
            ],
            metadata: [("k".to_string(), "v".to_string())].into(),
        };
        let w = write_file(dir.path(), &f, &NoProgress).unwrap();
        let bytes = std::fs::read(dir.path().join("sub/x.safetensors")).unwrap();
        assert_eq!(w.size, bytes.len() as u64);
        assert_eq!(w.sha256, hex(&Sha256::digest(&bytes)));
        assert!(!dir.path().join("sub/x.safetensors.tmp").exists());
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let s = st.tensor("stacked").unwrap();
        assert_eq!(s.shape(), &[2, 2, 3]);
        let vals: Vec<f32> = s
            .data()
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect();
        let want: Vec<f32> = a
            .iter()
            .chain(&b)
            .map(|&x| bf16::from_f32(x).to_f32())
            .collect();
        assert_eq!(vals, want);
        let r = st.tensor("r").unwrap();
        assert_eq!(r.data().len(), 20);
        // Layout offsets agree with the header.
        let layout = f.layout().unwrap();
        let data_start = layout.header.len();
        assert_eq!(layout.tensor_offsets[0] as usize, data_start);
        assert_eq!(layout.tensor_offsets[1] as usize, data_start + 24);
        // Same plan → same bytes (random pieces are seeded).
        let w2 = write_file(dir.path(), &f, &NoProgress).unwrap();
        assert_eq!(w, w2);
    }

    #[test]
    fn short_source_names_tensor_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let src = Arc::new(dir.path().join("short.bin"));
        std::fs::write(src.as_path(), [0u8; 10]).unwrap();
        let f = OutFile {
            rel: "o.safetensors".into(),
            tensors: vec![OutTensor {
                name: "t".into(),
                dtype: DType::F32,
                shape: vec![4],
                pieces: vec![Piece {
                    name: "orig.weight".into(),
                    shape: vec![4],
                    source: Source::File {
                        path: src,
                        offset: 0,
                        dtype: DType::F32,
                        numel: 4,
                    },
                }],
            }],
            metadata: BTreeMap::new(),
        };
        let err = write_file(dir.path(), &f, &NoProgress)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("orig.weight") && err.contains("short.bin"),
            "{err}"
        );
        assert!(!dir.path().join("o.safetensors").exists());
    }
}
