//! 2-D TMA tensor maps of row-major bf16 matrices, encoded on the host with
//! `cuTensorMapEncodeTiled` and passed to kernels by value (`TmaMap` in tma.cuh), in the 128-byte
//! swizzle the wgmma shared-memory descriptors name. (`mla::cache_tensor_map` encodes its own
//! map; this is the general form the grouped expert kernels use.)

use half::bf16;

use crate::error::{Result, shape_err};

/// A CUtensorMap: 128 opaque bytes, 64-byte aligned, passed to a kernel by value.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct TmaMap2d(pub(crate) [u64; 16]);

// SAFETY: plain bytes the driver wrote; the kernel takes it by value as a 128-byte parameter.
unsafe impl cudarc::driver::DeviceRepr for TmaMap2d {}

/// Bytes in one swizzled row of a box: the 128-byte swizzle needs the box's inner extent to be
/// exactly one 128-byte line (64 bf16), the k step of the wgmma kernels.
pub const SWIZZLE_BYTES: usize = 128;

/// The encode arguments of a row-major bf16 matrix [rows, cols] at `addr`, read in boxes of
/// `box_cols` x `box_rows`: (global dims, the row stride in bytes, box dims), innermost first.
/// Checks the TMA rules the driver would reject less clearly: a 16-byte aligned address, a row
/// stride that is a multiple of 16 bytes, a box of one 128-byte line by 1..=256 rows, and dims
/// within 2^32.
pub fn bf16_2d_params(
    op: &'static str,
    addr: u64,
    rows: usize,
    cols: usize,
    box_cols: usize,
    box_rows: usize,
) -> Result<([u64; 2], u64, [u32; 2])> {
    params_2d(
        op,
        addr,
        rows,
        cols,
        std::mem::size_of::<bf16>(),
        box_cols,
        box_rows,
        true,
    )
}

/// The checks and encode arguments of a row-major matrix of `elem`-byte elements (see
/// [`bf16_2d_params`]); without `swizzle` a box may be any multiple of 16 bytes wide up to 256
/// elements.
#[allow(clippy::too_many_arguments)]
fn params_2d(
    op: &'static str,
    addr: u64,
    rows: usize,
    cols: usize,
    elem: usize,
    box_cols: usize,
    box_rows: usize,
    swizzle: bool,
) -> Result<([u64; 2], u64, [u32; 2])> {
    if !addr.is_multiple_of(16) {
        return Err(shape_err(
            op,
            format!("TMA base {addr:#x} is not 16-byte aligned"),
        ));
    }
    if cols == 0 || rows == 0 || !(cols * elem).is_multiple_of(16) {
        return Err(shape_err(
            op,
            format!(
                "TMA matrix [{rows}, {cols}] of {elem}-byte elements: rows must be non-empty multiples of 16 bytes"
            ),
        ));
    }
    let box_ok = if swizzle {
        box_cols * elem == SWIZZLE_BYTES
    } else {
        box_cols > 0 && box_cols <= 256 && (box_cols * elem).is_multiple_of(16)
    };
    if !box_ok || box_rows == 0 || box_rows > 256 {
        return Err(shape_err(
            op,
            format!(
                "TMA box {box_cols} x {box_rows} of {elem}-byte elements: expected {} x 1..=256 rows",
                if swizzle {
                    "one 128-byte swizzled line"
                } else {
                    "a multiple of 16 bytes up to 256 elements"
                }
            ),
        ));
    }
    if rows as u64 > u32::MAX as u64 || cols as u64 > u32::MAX as u64 {
        return Err(shape_err(
            op,
            format!("TMA matrix [{rows}, {cols}] too large"),
        ));
    }
    Ok((
        [cols as u64, rows as u64],
        (cols * elem) as u64,
        [box_cols as u32, box_rows as u32],
    ))
}

/// The map of a row-major bf16 matrix [rows, cols] at `addr` (see [`bf16_2d_params`]); boxes
/// past the matrix are zero-filled by the copy.
pub fn encode_bf16_2d(
    op: &'static str,
    addr: u64,
    rows: usize,
    cols: usize,
    box_cols: usize,
    box_rows: usize,
) -> Result<TmaMap2d> {
    encode_bf16_2d_strided(op, addr, rows, cols, cols, box_cols, box_rows)
}

/// The map of a bf16 matrix [rows, cols] whose rows are `row_stride` elements apart (a column
/// slice of a wider matrix, such as the rope columns of the gathered latent rows; `cols` for a
/// packed one), in boxes of `box_cols` (one 128-byte swizzled line) x `box_rows`.
pub fn encode_bf16_2d_strided(
    op: &'static str,
    addr: u64,
    rows: usize,
    cols: usize,
    row_stride: usize,
    box_cols: usize,
    box_rows: usize,
) -> Result<TmaMap2d> {
    use cudarc::driver::sys as cu;
    let (dims, _, boxes) = bf16_2d_params(op, addr, rows, cols, box_cols, box_rows)?;
    let stride = (row_stride * std::mem::size_of::<bf16>()) as u64;
    if row_stride < cols || !stride.is_multiple_of(16) || stride >= 1 << 40 {
        return Err(shape_err(
            op,
            format!(
                "TMA row stride {row_stride} elements for {cols} columns: expected >= the columns, a multiple of 16 bytes"
            ),
        ));
    }
    encode_2d(
        cu::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        addr,
        dims,
        stride,
        boxes,
        true,
    )
}

/// The encode arguments of a bf16 tensor [rows, heads, cols] at `addr` with element strides
/// (`row_stride`, `head_stride`, 1), read in boxes of 64 columns (one 128-byte swizzled line) x
/// one head x `box_rows` rows: (global dims, the two outer strides in bytes, box dims), innermost
/// first. A [T, H, d] slice of a wider buffer (k_nope and v of the decompressed kv [T, H, 256],
/// the query heads of q [n, H, 192]) is one such tensor; a box lands in shared memory as
/// [box_rows][128 B], the layout of the 2-D boxes.
#[allow(clippy::too_many_arguments)]
pub fn bf16_3d_params(
    op: &'static str,
    addr: u64,
    rows: usize,
    heads: usize,
    cols: usize,
    row_stride: usize,
    head_stride: usize,
    box_rows: usize,
) -> Result<([u64; 3], [u64; 2], [u32; 3])> {
    let elem = std::mem::size_of::<bf16>();
    let (dims2, _, boxes2) = params_2d(op, addr, rows, cols, elem, 64, box_rows, true)?;
    let (rs, hs) = ((row_stride * elem) as u64, (head_stride * elem) as u64);
    if heads == 0 || heads as u64 > u32::MAX as u64 {
        return Err(shape_err(op, format!("TMA tensor with {heads} heads")));
    }
    if !rs.is_multiple_of(16) || !hs.is_multiple_of(16) || rs >= 1 << 40 || hs >= 1 << 40 {
        return Err(shape_err(
            op,
            format!(
                "TMA strides {row_stride} / {head_stride} elements: expected multiples of 16 bytes below 2^40"
            ),
        ));
    }
    Ok((
        [dims2[0], heads as u64, dims2[1]],
        [hs, rs],
        [boxes2[0], 1, boxes2[1]],
    ))
}

/// The map of a bf16 tensor [rows, heads, cols] (see [`bf16_3d_params`]); boxes past the tensor
/// are zero-filled by the copy.
#[allow(clippy::too_many_arguments)]
pub fn encode_bf16_3d(
    op: &'static str,
    addr: u64,
    rows: usize,
    heads: usize,
    cols: usize,
    row_stride: usize,
    head_stride: usize,
    box_rows: usize,
) -> Result<TmaMap2d> {
    use cudarc::driver::sys as cu;
    let (dims, strides, boxes) = bf16_3d_params(
        op,
        addr,
        rows,
        heads,
        cols,
        row_stride,
        head_stride,
        box_rows,
    )?;
    encode_tiled(
        cu::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        addr,
        &dims,
        &strides,
        &boxes,
        true,
    )
}

/// cuTensorMapEncodeTiled of a 2-D matrix whose encode arguments were checked (by
/// [`bf16_2d_params`] or [`u8_2d_params`]): `swizzle` picks the 128-byte swizzle or none.
fn encode_2d(
    dtype: cudarc::driver::sys::CUtensorMapDataType,
    addr: u64,
    dims: [u64; 2],
    stride: u64,
    boxes: [u32; 2],
    swizzle: bool,
) -> Result<TmaMap2d> {
    encode_tiled(dtype, addr, &dims, &[stride], &boxes, swizzle)
}

/// cuTensorMapEncodeTiled of a tensor of rank dims.len() (2 or 3 here; strides: the outer
/// dims' strides in bytes, one fewer than dims) whose arguments were checked.
fn encode_tiled(
    dtype: cudarc::driver::sys::CUtensorMapDataType,
    addr: u64,
    dims: &[u64],
    strides: &[u64],
    boxes: &[u32],
    swizzle: bool,
) -> Result<TmaMap2d> {
    use cudarc::driver::sys as cu;
    debug_assert!(strides.len() + 1 == dims.len() && boxes.len() == dims.len());
    let element_strides = [1u32; 5];
    let mut map = std::mem::MaybeUninit::<cu::CUtensorMap>::zeroed();
    let swz = if swizzle {
        cu::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B
    } else {
        cu::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE
    };
    // SAFETY: every array outlives the call and has the rank (2; one stride) the call is given;
    // the address is only recorded in the map (the kernel that uses it must be given live memory).
    unsafe {
        cu::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            dtype,
            dims.len() as u32,
            addr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            cu::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swz,
            cu::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            cu::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()?;
        Ok(TmaMap2d(map.assume_init().opaque))
    }
}

/// The map of a row-major byte matrix [rows, cols] at `addr` (the FP8 latent cache's rows of
/// codes, bf16 k_pe and f32 scale), read in boxes of `box_cols` bytes x `box_rows` rows: with the
/// 128-byte swizzle (`swizzle`, the box one 128-byte line: the wgmma operand layout) or without
/// (a box of a multiple of 16 bytes, at most 256). Same rules as [`bf16_2d_params`] otherwise.
pub fn encode_u8_2d(
    op: &'static str,
    addr: u64,
    rows: usize,
    cols: usize,
    box_cols: usize,
    box_rows: usize,
    swizzle: bool,
) -> Result<TmaMap2d> {
    use cudarc::driver::sys as cu;
    let (dims, stride, boxes) = u8_2d_params(op, addr, rows, cols, box_cols, box_rows, swizzle)?;
    encode_2d(
        cu::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
        addr,
        dims,
        stride,
        boxes,
        swizzle,
    )
}

/// The encode arguments of [`encode_u8_2d`]: (global dims, row stride, box dims), innermost
/// first, after the checks the driver would reject less clearly.
pub fn u8_2d_params(
    op: &'static str,
    addr: u64,
    rows: usize,
    cols: usize,
    box_cols: usize,
    box_rows: usize,
    swizzle: bool,
) -> Result<([u64; 2], u64, [u32; 2])> {
    params_2d(op, addr, rows, cols, 1, box_cols, box_rows, swizzle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_innermost_first() {
        // x [49152, 5120] in boxes of 64 k x 64 rows
        let (dims, stride, boxes) = bf16_2d_params("t", 0x1000, 49152, 5120, 64, 64).unwrap();
        assert_eq!(dims, [5120, 49152]);
        assert_eq!(stride, 10240);
        assert_eq!(boxes, [64, 64]);
        // a down weight [5120, 1536] in boxes of 64 k x 128 rows
        let (dims, stride, boxes) = bf16_2d_params("t", 0x2000, 5120, 1536, 64, 128).unwrap();
        assert_eq!((dims, stride, boxes), ([1536, 5120], 3072, [64, 128]));
        // a box may be larger than the matrix (the copy zero-fills): 40 x 72
        assert!(bf16_2d_params("t", 0x2000, 40, 72, 64, 128).is_ok());
    }

    #[test]
    fn byte_maps_take_the_fp8_cache_rows() {
        // the FP8 cache: 656-byte rows, 128-byte swizzled code/rope boxes and 16-byte scale boxes
        let (dims, stride, boxes) = u8_2d_params("t", 0x1000, 4096, 656, 128, 64, true).unwrap();
        assert_eq!((dims, stride, boxes), ([656, 4096], 656, [128, 64]));
        let (_, _, boxes) = u8_2d_params("t", 0x1000, 4096, 656, 16, 16, false).unwrap();
        assert_eq!(boxes, [16, 16]);
        // a swizzled box is one 128-byte line; an unswizzled one a multiple of 16 bytes
        assert!(u8_2d_params("t", 0x1000, 4096, 656, 64, 64, true).is_err());
        assert!(u8_2d_params("t", 0x1000, 4096, 656, 8, 64, false).is_err());
        // rows of 650 bytes cannot be strided by TMA
        assert!(u8_2d_params("t", 0x1000, 4096, 650, 16, 64, false).is_err());
        assert!(u8_2d_params("t", 0x1008, 4096, 656, 16, 64, false).is_err());
    }

    #[test]
    fn head_tensors_are_three_dimensional() {
        // k_nope of the decompressed kv [T, 128 heads, 256]: rows 65536 B apart, heads 512 B
        let (dims, strides, boxes) =
            bf16_3d_params("t", 0x1000, 4096, 128, 128, 128 * 256, 256, 128).unwrap();
        assert_eq!(dims, [128, 128, 4096]);
        assert_eq!(strides, [512, 65536]);
        assert_eq!(boxes, [64, 1, 128]);
        // q [n, 16 heads, 192]
        let (dims, strides, _) =
            bf16_3d_params("t", 0x1000, 7, 16, 192, 16 * 192, 192, 128).unwrap();
        assert_eq!((dims, strides), ([192, 16, 7], [384, 6144]));
        // a head stride that is not a multiple of 16 bytes, no heads, a misaligned base
        assert!(bf16_3d_params("t", 0x1000, 7, 16, 192, 16 * 196, 196, 128).is_err());
        assert!(bf16_3d_params("t", 0x1000, 7, 0, 192, 192, 192, 128).is_err());
        assert!(bf16_3d_params("t", 0x1004, 7, 16, 192, 16 * 192, 192, 128).is_err());
    }

    #[test]
    fn params_reject_what_tma_cannot_copy() {
        // misaligned base
        assert!(bf16_2d_params("t", 0x1008, 64, 64, 64, 64).is_err());
        // rows not a multiple of 16 bytes (an odd number of bf16 pairs)
        assert!(bf16_2d_params("t", 0x1000, 64, 36, 64, 64).is_err());
        // the 128-byte swizzle needs 64-column boxes; at most 256 rows
        assert!(bf16_2d_params("t", 0x1000, 64, 64, 32, 64).is_err());
        assert!(bf16_2d_params("t", 0x1000, 64, 64, 64, 257).is_err());
        assert!(bf16_2d_params("t", 0x1000, 64, 64, 64, 0).is_err());
        assert!(bf16_2d_params("t", 0x1000, 0, 64, 64, 64).is_err());
    }
}
