//! Weights as the CPU backend holds them: in their stored dtype, borrowed from the memory map
//! when the bytes are aligned for the type (no copy, no load time), copied otherwise.

use std::marker::PhantomData;
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;

use crate::weights::{DType, TensorRef};

/// A typed, shared, immutable slice backed by a memory map or an owned vector.
pub struct Slab<T: bytemuck::Pod> {
    backing: Backing<T>,
    _t: PhantomData<T>,
}

enum Backing<T> {
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
    Owned(Arc<Vec<T>>),
}

impl<T: bytemuck::Pod> Slab<T> {
    pub fn as_slice(&self) -> &[T] {
        match &self.backing {
            Backing::Mapped { map, start, len } => {
                bytemuck::cast_slice(&map[*start..*start + len * std::mem::size_of::<T>()])
            }
            Backing::Owned(v) => v,
        }
    }
    fn owned(v: Vec<T>) -> Self {
        Slab {
            backing: Backing::Owned(Arc::new(v)),
            _t: PhantomData,
        }
    }
    /// Borrows the mapped bytes when aligned for `T`, else copies them (little-endian hosts only,
    /// which is every host we build for).
    fn from_ref(t: &TensorRef, decode: impl Fn(&[u8]) -> T) -> Self {
        let (map, start, end) = t.mapping();
        let size = std::mem::size_of::<T>();
        let aligned = (map.as_ptr() as usize + start).is_multiple_of(std::mem::align_of::<T>());
        if aligned && cfg!(target_endian = "little") {
            Slab {
                backing: Backing::Mapped {
                    map,
                    start,
                    len: (end - start) / size,
                },
                _t: PhantomData,
            }
        } else {
            Slab::owned(t.bytes().chunks_exact(size).map(decode).collect())
        }
    }
}

pub enum WeightData {
    F32(Slab<f32>),
    Bf16(Slab<bf16>),
    F16(Slab<f16>),
}

/// A weight tensor (vector or [rows, cols] matrix) on the CPU.
pub struct CpuWeight {
    pub shape: Vec<usize>,
    pub data: WeightData,
}

impl CpuWeight {
    pub fn from_ref(t: &TensorRef) -> Self {
        let data = match t.dtype {
            DType::F32 => WeightData::F32(Slab::from_ref(t, |b| {
                f32::from_le_bytes([b[0], b[1], b[2], b[3]])
            })),
            DType::Bf16 => WeightData::Bf16(Slab::from_ref(t, |b| {
                bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))
            })),
            DType::F16 => WeightData::F16(Slab::from_ref(t, |b| {
                f16::from_bits(u16::from_le_bytes([b[0], b[1]]))
            })),
        };
        CpuWeight {
            shape: t.shape.clone(),
            data,
        }
    }
    pub fn from_f32(shape: Vec<usize>, v: Vec<f32>) -> Self {
        CpuWeight {
            shape,
            data: WeightData::F32(Slab::owned(v)),
        }
    }
    pub fn from_bf16(shape: Vec<usize>, v: Vec<bf16>) -> Self {
        CpuWeight {
            shape,
            data: WeightData::Bf16(Slab::owned(v)),
        }
    }
    pub fn from_f16(shape: Vec<usize>, v: Vec<f16>) -> Self {
        CpuWeight {
            shape,
            data: WeightData::F16(Slab::owned(v)),
        }
    }
    /// Output features of a matrix (first dim).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }
    /// Input features of a matrix (second dim; 1 for a vector).
    pub fn cols(&self) -> usize {
        self.shape.get(1).copied().unwrap_or(1)
    }
    /// Row `r` widened to f32.
    pub fn row_f32(&self, r: usize, out: &mut Vec<f32>) {
        let c = self.cols();
        out.clear();
        match &self.data {
            WeightData::F32(d) => out.extend_from_slice(&d.as_slice()[r * c..(r + 1) * c]),
            WeightData::Bf16(d) => {
                out.extend(d.as_slice()[r * c..(r + 1) * c].iter().map(|v| v.to_f32()))
            }
            WeightData::F16(d) => {
                out.extend(d.as_slice()[r * c..(r + 1) * c].iter().map(|v| v.to_f32()))
            }
        }
    }
    /// The whole tensor widened to f32 (small tensors: norms, per-head slices).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            WeightData::F32(d) => d.as_slice().to_vec(),
            WeightData::Bf16(d) => d.as_slice().iter().map(|v| v.to_f32()).collect(),
            WeightData::F16(d) => d.as_slice().iter().map(|v| v.to_f32()).collect(),
        }
    }
    pub fn nbytes(&self) -> usize {
        match &self.data {
            WeightData::F32(d) => d.as_slice().len() * 4,
            WeightData::Bf16(d) => d.as_slice().len() * 2,
            WeightData::F16(d) => d.as_slice().len() * 2,
        }
    }
}
