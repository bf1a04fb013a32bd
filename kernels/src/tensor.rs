//! Device tensors: an owned contiguous buffer with a shape, and borrowed (possibly strided) views
//! that launchers check for shape and contiguity. The element type is a type parameter, so a dtype
//! mismatch is a compile error rather than a run-time check.

use std::marker::PhantomData;

use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, ValidAsZeroBits};
use half::bf16;

use crate::device::Gpu;
use crate::error::{KernelError, Result, shape_err};

/// Element types the kernels use.
pub trait DType: DeviceRepr + ValidAsZeroBits + Copy + Default + Unpin + 'static {
    const NAME: &'static str;
}
impl DType for bf16 {
    const NAME: &'static str = "bf16";
}
impl DType for f32 {
    const NAME: &'static str = "f32";
}
impl DType for i32 {
    const NAME: &'static str = "i32";
}
impl DType for i64 {
    const NAME: &'static str = "i64";
}
/// Raw bytes: the FP8 latent cache (crate::fp8), whose rows mix e4m3 codes, bf16 and f32.
impl DType for u8 {
    const NAME: &'static str = "u8";
}

/// An owned, contiguous, row-major device tensor.
pub struct Tensor<T: DType> {
    buf: CudaSlice<T>,
    shape: Vec<usize>,
}

impl<T: DType> Tensor<T> {
    /// A zero-filled tensor.
    pub fn zeros(gpu: &Gpu, shape: &[usize]) -> Result<Self> {
        let n = shape.iter().product::<usize>().max(1);
        Ok(Self {
            buf: gpu.stream.alloc_zeros::<T>(n)?,
            shape: shape.to_vec(),
        })
    }

    /// A tensor with unspecified contents, for an output that a kernel or GEMM overwrites
    /// entirely before anything reads it: it saves the memset (one launch) of [`Tensor::zeros`].
    pub fn uninit(gpu: &Gpu, shape: &[usize]) -> Result<Self> {
        let n = shape.iter().product::<usize>().max(1);
        // SAFETY: T is a plain value type (DType) living in device memory, never read by the host
        // as a Rust value before a device copy; the caller's contract is that the device writes
        // every element before any is read, and stale device bytes are a wrong value at worst,
        // not undefined behaviour.
        let buf = unsafe { gpu.stream.alloc::<T>(n)? };
        Ok(Self {
            buf,
            shape: shape.to_vec(),
        })
    }

    /// Upload host data; `data.len()` must equal the shape's element count.
    pub fn from_host(gpu: &Gpu, data: &[T], shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(shape_err(
                "Tensor::from_host",
                format!(
                    "{} values for shape {:?} ({} elements)",
                    data.len(),
                    shape,
                    n
                ),
            ));
        }
        let buf = if data.is_empty() {
            gpu.stream.alloc_zeros::<T>(1)?
        } else {
            gpu.stream.clone_htod(data)?
        };
        Ok(Self {
            buf,
            shape: shape.to_vec(),
        })
    }

    /// Overwrites the tensor with host data of the same element count, in stream order (the
    /// buffer keeps its address: a captured CUDA graph that reads it sees the new values).
    pub fn write_host(&mut self, gpu: &Gpu, data: &[T]) -> Result<()> {
        if data.len() != self.len() {
            return Err(shape_err(
                "Tensor::write_host",
                format!("{} values for shape {:?}", data.len(), self.shape),
            ));
        }
        if !data.is_empty() {
            gpu.stream.memcpy_htod(data, &mut self.buf)?;
        }
        Ok(())
    }

    /// A new tensor with the same contents, copied on the device.
    pub fn clone_on_device(&self, gpu: &Gpu) -> Result<Self> {
        Ok(Self {
            buf: gpu.stream.clone_dtod(&self.buf)?,
            shape: self.shape.clone(),
        })
    }

    /// Download to the host (synchronises the stream).
    pub fn to_host(&self, gpu: &Gpu) -> Result<Vec<T>> {
        let mut v = gpu.stream.clone_dtoh(&self.buf)?;
        v.truncate(self.len());
        Ok(v)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The raw device address (valid while `self` lives).
    pub fn ptr(&self) -> u64 {
        let (p, _record) = self.buf.device_ptr(self.buf.stream());
        p
    }

    /// The underlying buffer (for copies).
    pub fn buf(&self) -> &CudaSlice<T> {
        &self.buf
    }

    pub fn buf_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.buf
    }

    pub fn view(&self) -> View<'_, T> {
        View {
            ptr: self.ptr(),
            shape: self.shape.clone(),
            strides: contiguous_strides(&self.shape),
            _p: PhantomData,
        }
    }

    pub fn view_mut(&mut self) -> ViewMut<'_, T> {
        ViewMut {
            ptr: self.ptr(),
            shape: self.shape.clone(),
            strides: contiguous_strides(&self.shape),
            _p: PhantomData,
        }
    }
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

fn is_contiguous(shape: &[usize], strides: &[usize]) -> bool {
    shape.contains(&0) || contiguous_strides(shape) == strides
}

macro_rules! view_common {
    ($name:ident) => {
        impl<'a, T: DType> $name<'a, T> {
            pub fn shape(&self) -> &[usize] {
                &self.shape
            }
            pub fn strides(&self) -> &[usize] {
                &self.strides
            }
            pub fn ptr(&self) -> u64 {
                self.ptr
            }
            pub fn is_contiguous(&self) -> bool {
                is_contiguous(&self.shape, &self.strides)
            }
            /// Restrict dimension `dim` to `[start, start + len)`.
            pub fn narrow(mut self, dim: usize, start: usize, len: usize) -> Result<Self> {
                if dim >= self.shape.len() || start + len > self.shape[dim] {
                    return Err(shape_err(
                        "narrow",
                        format!(
                            "dim {dim} range {start}..{} of shape {:?}",
                            start + len,
                            self.shape
                        ),
                    ));
                }
                self.ptr += (start * self.strides[dim] * std::mem::size_of::<T>()) as u64;
                self.shape[dim] = len;
                Ok(self)
            }
            /// The same contiguous elements seen with another shape of equal size.
            pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
                let n: usize = self.shape.iter().product();
                if !self.is_contiguous() || shape.iter().product::<usize>() != n {
                    return Err(shape_err(
                        "reshape",
                        format!(
                            "{:?} (strides {:?}) as {shape:?}: needs contiguous elements of the same count",
                            self.shape, self.strides
                        ),
                    ));
                }
                self.shape = shape.to_vec();
                self.strides = contiguous_strides(shape);
                Ok(self)
            }
            /// Check rank/dims (`None` = any) and contiguity for a launcher.
            pub(crate) fn expect(
                &self,
                op: &'static str,
                tensor: &'static str,
                dims: &[Option<usize>],
            ) -> Result<()> {
                let ok = dims.len() == self.shape.len()
                    && dims
                        .iter()
                        .zip(&self.shape)
                        .all(|(d, s)| d.is_none_or(|d| d == *s));
                if !ok {
                    return Err(shape_err(
                        op,
                        format!(
                            "{tensor} ({}) has shape {:?}, expected {:?}",
                            T::NAME,
                            self.shape,
                            dims
                        ),
                    ));
                }
                if !self.is_contiguous() {
                    return Err(KernelError::NotContiguous {
                        op,
                        tensor,
                        shape: self.shape.clone(),
                        strides: self.strides.clone(),
                    });
                }
                Ok(())
            }
        }
    };
}

/// A borrowed read-only view.
pub struct View<'a, T: DType> {
    ptr: u64,
    shape: Vec<usize>,
    strides: Vec<usize>,
    _p: PhantomData<&'a T>,
}

/// A borrowed writable view.
pub struct ViewMut<'a, T: DType> {
    ptr: u64,
    shape: Vec<usize>,
    strides: Vec<usize>,
    _p: PhantomData<&'a mut T>,
}

view_common!(View);
view_common!(ViewMut);

impl<'a, T: DType> ViewMut<'a, T> {
    /// Reborrow mutably for a shorter lifetime.
    pub fn reborrow(&mut self) -> ViewMut<'_, T> {
        ViewMut {
            ptr: self.ptr,
            shape: self.shape.clone(),
            strides: self.strides.clone(),
            _p: PhantomData,
        }
    }

    /// Reborrow as read-only.
    pub fn as_view(&self) -> View<'_, T> {
        View {
            ptr: self.ptr,
            shape: self.shape.clone(),
            strides: self.strides.clone(),
            _p: PhantomData,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguity() {
        assert_eq!(contiguous_strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert!(is_contiguous(&[2, 3, 4], &[12, 4, 1]));
        // a slice of the last dim is strided
        assert!(!is_contiguous(&[2, 3, 2], &[12, 4, 1]));
        // a slice of the first dim stays contiguous
        assert!(is_contiguous(&[1, 3, 4], &[12, 4, 1]));
    }

    #[test]
    fn reshape_needs_contiguous_elements_of_the_same_count() {
        let v = View::<f32> {
            ptr: 4096,
            shape: vec![12],
            strides: vec![1],
            _p: PhantomData,
        };
        let r = v.narrow(0, 0, 6).and_then(|v| v.reshape(&[2, 3]));
        let r = r.map(|v| (v.shape().to_vec(), v.strides().to_vec(), v.ptr()));
        assert_eq!(r.ok(), Some((vec![2, 3], vec![3, 1], 4096)));
        let wide = View::<f32> {
            ptr: 0,
            shape: vec![2, 3],
            strides: vec![4, 1],
            _p: PhantomData,
        };
        assert!(wide.reshape(&[6]).is_err(), "strided rows are not one run");
        let v = View::<f32> {
            ptr: 0,
            shape: vec![6],
            strides: vec![1],
            _p: PhantomData,
        };
        assert!(v.reshape(&[4, 2]).is_err(), "8 elements from 6");
    }
}
