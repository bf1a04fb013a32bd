//! Little-endian bf16/f32 rows <-> protobuf `bytes` fields, with typed size checks.
//!
//! Hidden rows cross the router <-> shard boundary as raw bytes (see expert.proto) because
//! protobuf's per-value varint/fixed32 encoding of `repeated float` costs more than the experts'
//! compute at small batch sizes. On little-endian hosts encoding and decoding are plain copies.

use half::bf16;

use crate::expert::v1::{Dtype, ForwardRequest, ForwardResponse};

/// Expert-slot padding value in `ForwardRequest.expert_ids` (a row with fewer than
/// `experts_per_row` experts on this shard); its gate weight must be 0.
pub const EMPTY_EXPERT_SLOT: u32 = u32::MAX;

/// Why a tensor byte field could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorCodecError {
    /// The byte length is not a whole number of elements.
    #[error(
        "{field}: {len_bytes} bytes is not a whole number of {dtype} values ({elem_bytes} bytes each)"
    )]
    RaggedBytes {
        /// Name of the offending field.
        field: &'static str,
        /// Length of the byte field.
        len_bytes: usize,
        /// Size of one element of `dtype`.
        elem_bytes: usize,
        /// Element type expected.
        dtype: &'static str,
    },
    /// The field holds a whole number of elements, but not rows x cols of them.
    #[error("{field}: expected {rows} x {cols} = {expected} values, got {actual}")]
    ShapeMismatch {
        /// Name of the offending field.
        field: &'static str,
        /// Declared number of rows.
        rows: usize,
        /// Declared number of values per row.
        cols: usize,
        /// rows x cols.
        expected: usize,
        /// Values actually present.
        actual: usize,
    },
    /// rows x cols (x element size) does not fit in usize.
    #[error("{field}: shape {rows} x {cols} is too large")]
    ShapeOverflow {
        /// Name of the offending field.
        field: &'static str,
        /// Declared number of rows.
        rows: usize,
        /// Declared number of values per row.
        cols: usize,
    },
    /// The dtype field is unset or names a dtype this build does not know.
    #[error("{field}: unsupported dtype {value}")]
    UnsupportedDtype {
        /// Name of the offending field.
        field: &'static str,
        /// The raw enum value received.
        value: i32,
    },
    /// A gate weight is not finite, or a padded expert slot carries a non-zero weight.
    #[error("{field}[{index}]: {reason}")]
    BadSlot {
        /// Name of the offending field.
        field: &'static str,
        /// Flat index of the slot (row * experts_per_row + slot).
        index: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Size in bytes of one element of `dtype`, or None for `DTYPE_UNSPECIFIED`.
pub fn dtype_size_bytes(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::Unspecified => None,
        Dtype::Bf16 => Some(2),
        Dtype::F32 => Some(4),
    }
}

/// Encodes bf16 values as little-endian bytes (2 per value).
pub fn encode_bf16(values: &[bf16]) -> Vec<u8> {
    #[cfg(target_endian = "little")]
    {
        bytemuck::cast_slice::<bf16, u8>(values).to_vec()
    }
    #[cfg(not(target_endian = "little"))]
    {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
}

/// Rounds f32 values to bf16 (round to nearest even, as `half` does) and encodes them.
pub fn encode_f32_as_bf16(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 2);
    for v in values {
        out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes());
    }
    out
}

/// Encodes f32 values as little-endian bytes (4 per value).
pub fn encode_f32(values: &[f32]) -> Vec<u8> {
    #[cfg(target_endian = "little")]
    {
        bytemuck::cast_slice::<f32, u8>(values).to_vec()
    }
    #[cfg(not(target_endian = "little"))]
    {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
}

/// Decodes little-endian bf16 bytes; rejects an odd byte count.
pub fn decode_bf16(field: &'static str, bytes: &[u8]) -> Result<Vec<bf16>, TensorCodecError> {
    check_whole(field, bytes, 2, "bf16")?;
    #[cfg(target_endian = "little")]
    {
        // pod_collect_to_vec copies, so the (possibly unaligned) input slice is fine.
        Ok(bytemuck::pod_collect_to_vec::<u8, bf16>(bytes))
    }
    #[cfg(not(target_endian = "little"))]
    {
        Ok(bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]))
            .collect())
    }
}

/// Decodes little-endian f32 bytes; rejects a length that is not a multiple of 4.
pub fn decode_f32(field: &'static str, bytes: &[u8]) -> Result<Vec<f32>, TensorCodecError> {
    check_whole(field, bytes, 4, "f32")?;
    #[cfg(target_endian = "little")]
    {
        Ok(bytemuck::pod_collect_to_vec::<u8, f32>(bytes))
    }
    #[cfg(not(target_endian = "little"))]
    {
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

/// Decodes exactly `rows` x `cols` little-endian bf16 values.
pub fn decode_bf16_rows(
    field: &'static str,
    bytes: &[u8],
    rows: usize,
    cols: usize,
) -> Result<Vec<bf16>, TensorCodecError> {
    check_rows(field, bytes, rows, cols, 2, "bf16")?;
    decode_bf16(field, bytes)
}

/// Decodes exactly `rows` x `cols` values of `dtype` (bf16 or f32) and widens them to f32.
pub fn decode_rows_to_f32(
    field: &'static str,
    dtype: Dtype,
    bytes: &[u8],
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>, TensorCodecError> {
    match dtype {
        Dtype::Bf16 => {
            check_rows(field, bytes, rows, cols, 2, "bf16")?;
            Ok(bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect())
        }
        Dtype::F32 => {
            check_rows(field, bytes, rows, cols, 4, "f32")?;
            decode_f32(field, bytes)
        }
        Dtype::Unspecified => Err(TensorCodecError::UnsupportedDtype {
            field,
            value: Dtype::Unspecified as i32,
        }),
    }
}

fn check_whole(
    field: &'static str,
    bytes: &[u8],
    elem_bytes: usize,
    dtype: &'static str,
) -> Result<(), TensorCodecError> {
    if !bytes.len().is_multiple_of(elem_bytes) {
        return Err(TensorCodecError::RaggedBytes {
            field,
            len_bytes: bytes.len(),
            elem_bytes,
            dtype,
        });
    }
    Ok(())
}

fn check_rows(
    field: &'static str,
    bytes: &[u8],
    rows: usize,
    cols: usize,
    elem_bytes: usize,
    dtype: &'static str,
) -> Result<(), TensorCodecError> {
    check_whole(field, bytes, elem_bytes, dtype)?;
    let expected = checked_len(field, rows, cols)?;
    expected
        .checked_mul(elem_bytes)
        .ok_or(TensorCodecError::ShapeOverflow { field, rows, cols })?;
    let actual = bytes.len() / elem_bytes;
    if actual != expected {
        return Err(TensorCodecError::ShapeMismatch {
            field,
            rows,
            cols,
            expected,
            actual,
        });
    }
    Ok(())
}

fn checked_len(field: &'static str, rows: usize, cols: usize) -> Result<usize, TensorCodecError> {
    rows.checked_mul(cols)
        .ok_or(TensorCodecError::ShapeOverflow { field, rows, cols })
}

fn check_count(
    field: &'static str,
    actual: usize,
    rows: usize,
    cols: usize,
) -> Result<(), TensorCodecError> {
    let expected = checked_len(field, rows, cols)?;
    if actual != expected {
        return Err(TensorCodecError::ShapeMismatch {
            field,
            rows,
            cols,
            expected,
            actual,
        });
    }
    Ok(())
}

impl ForwardRequest {
    /// Checks that every field's size agrees with num_rows, hidden_size and experts_per_row,
    /// and that padded slots ([`EMPTY_EXPERT_SLOT`]) carry weight 0. It does not check which
    /// experts the shard hosts, nor the layer: only the shard knows those.
    pub fn check_shape(&self) -> Result<(), TensorCodecError> {
        let rows = self.num_rows as usize;
        let k = self.experts_per_row as usize;
        let (size, name) = match Dtype::try_from(self.hidden_dtype) {
            Ok(Dtype::F32) => (4, "f32"),
            Ok(Dtype::Bf16) | Ok(Dtype::Unspecified) => (2, "bf16"),
            Err(_) => {
                return Err(TensorCodecError::UnsupportedDtype {
                    field: "hidden_dtype",
                    value: self.hidden_dtype,
                });
            }
        };
        check_rows(
            "hidden",
            &self.hidden,
            rows,
            self.hidden_size as usize,
            size,
            name,
        )?;
        check_count("expert_ids", self.expert_ids.len(), rows, k)?;
        check_count("gate_weights", self.gate_weights.len(), rows, k)?;
        for (index, (&id, &w)) in self.expert_ids.iter().zip(&self.gate_weights).enumerate() {
            if !w.is_finite() {
                return Err(TensorCodecError::BadSlot {
                    field: "gate_weights",
                    index,
                    reason: "gate weight is not finite",
                });
            }
            if id == EMPTY_EXPERT_SLOT && w != 0.0 {
                return Err(TensorCodecError::BadSlot {
                    field: "gate_weights",
                    index,
                    reason: "padded expert slot must have gate weight 0",
                });
            }
        }
        Ok(())
    }
}

impl ForwardResponse {
    /// Decodes `partial` (bf16 or f32, as `dtype` says) into num_rows x hidden_size f32 values.
    pub fn partial_f32(&self) -> Result<Vec<f32>, TensorCodecError> {
        let dtype =
            Dtype::try_from(self.dtype).map_err(|_| TensorCodecError::UnsupportedDtype {
                field: "dtype",
                value: self.dtype,
            })?;
        decode_rows_to_f32(
            "partial",
            dtype,
            &self.partial,
            self.num_rows as usize,
            self.hidden_size as usize,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_bf16(n: usize) -> Vec<bf16> {
        // Values spread over signs and magnitudes, plus the special cases bf16 must keep.
        let mut v: Vec<bf16> = (0..n)
            .map(|i| bf16::from_f32((i as f32 - n as f32 / 2.0) * 0.37e-2 * (1 + i % 7) as f32))
            .collect();
        v.extend([
            bf16::ZERO,
            bf16::NEG_ZERO,
            bf16::MAX,
            bf16::MIN_POSITIVE_SUBNORMAL,
        ]);
        v.extend([bf16::INFINITY, bf16::NEG_INFINITY]);
        v
    }

    #[test]
    fn bf16_round_trip_is_bit_exact() {
        let values = sample_bf16(1001);
        let bytes = encode_bf16(&values);
        assert_eq!(bytes.len(), values.len() * 2);
        let back = decode_bf16("hidden", &bytes).expect("decode");
        let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&values));
    }

    #[test]
    fn bf16_bytes_are_little_endian() {
        // bf16 1.0 is 0x3F80, -2.0 is 0xC000.
        let bytes = encode_bf16(&[bf16::ONE, bf16::from_f32(-2.0)]);
        assert_eq!(bytes, vec![0x80, 0x3F, 0x00, 0xC0]);
        let back = decode_bf16("hidden", &[0x80, 0x3F]).expect("decode");
        assert_eq!(back, vec![bf16::ONE]);
    }

    #[test]
    fn odd_byte_lengths_are_rejected() {
        for len in [1usize, 3, 5, 10241] {
            let err = decode_bf16("hidden", &vec![0u8; len]).expect_err("odd length");
            assert_eq!(
                err,
                TensorCodecError::RaggedBytes {
                    field: "hidden",
                    len_bytes: len,
                    elem_bytes: 2,
                    dtype: "bf16"
                }
            );
        }
        assert!(decode_f32("partial", &[0u8; 6]).is_err());
        assert!(
            decode_bf16("hidden", &[])
                .expect("empty is fine")
                .is_empty()
        );
    }

    #[test]
    fn row_shape_is_checked() {
        let bytes = encode_bf16(&sample_bf16(10)[..12]);
        assert_eq!(
            decode_bf16_rows("hidden", &bytes, 3, 4).expect("3x4").len(),
            12
        );
        let err = decode_bf16_rows("hidden", &bytes, 2, 4).expect_err("2x4 != 12");
        assert_eq!(
            err,
            TensorCodecError::ShapeMismatch {
                field: "hidden",
                rows: 2,
                cols: 4,
                expected: 8,
                actual: 12
            }
        );
        let err = decode_bf16_rows("hidden", &bytes, usize::MAX, 2).expect_err("overflow");
        assert!(matches!(err, TensorCodecError::ShapeOverflow { .. }));
    }

    #[test]
    fn f32_round_trip_and_widening() {
        let values: Vec<f32> = (0..77).map(|i| (i as f32).sin() * 1e3).collect();
        let bytes = encode_f32(&values);
        assert_eq!(decode_f32("partial", &bytes).expect("decode"), values);
        let wide = decode_rows_to_f32("partial", Dtype::F32, &bytes, 7, 11).expect("7x11");
        assert_eq!(wide, values);
        let bf = encode_f32_as_bf16(&values);
        let wide = decode_rows_to_f32("partial", Dtype::Bf16, &bf, 11, 7).expect("11x7");
        for (a, b) in wide.iter().zip(&values) {
            // bf16 keeps 8 significant bits (7 stored): round-to-nearest is off by at most half
            // an ulp, i.e. 2^-8 relative to the value.
            assert!((a - b).abs() <= b.abs() * (1.0 / 256.0), "{a} vs {b}");
        }
        assert!(matches!(
            decode_rows_to_f32("partial", Dtype::Unspecified, &bytes, 7, 11),
            Err(TensorCodecError::UnsupportedDtype { .. })
        ));
    }

    #[test]
    fn f32_to_bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 is halfway between bf16 1.0 and 1 + 2^-7: ties go to the even mantissa (1.0).
        let bytes = encode_f32_as_bf16(&[1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0]);
        let back = decode_bf16("hidden", &bytes).expect("decode");
        assert_eq!(back[0], bf16::ONE);
        assert_eq!(back[1].to_f32(), 1.0 + 4.0 / 256.0);
    }

    fn request(rows: u32, hidden: u32, k: u32) -> ForwardRequest {
        let n = (rows * hidden) as usize;
        ForwardRequest {
            request_id: 7,
            layer: 1,
            num_rows: rows,
            hidden_size: hidden,
            hidden: encode_bf16(&vec![bf16::ONE; n]),
            experts_per_row: k,
            expert_ids: (0..rows * k).collect(),
            gate_weights: vec![0.5; (rows * k) as usize],
            partial_dtype: Dtype::F32 as i32,
            hidden_dtype: Dtype::Bf16 as i32,
            traceparents: vec![],
        }
    }

    #[test]
    fn forward_request_shape_check() {
        request(3, 8, 2).check_shape().expect("consistent request");

        let mut r = request(3, 8, 2);
        r.hidden.pop();
        assert!(matches!(
            r.check_shape(),
            Err(TensorCodecError::RaggedBytes { .. })
        ));

        let mut r = request(3, 8, 2);
        r.hidden_size = 4;
        assert!(matches!(
            r.check_shape(),
            Err(TensorCodecError::ShapeMismatch {
                field: "hidden",
                ..
            })
        ));

        let mut r = request(3, 8, 2);
        r.gate_weights.pop();
        assert!(matches!(
            r.check_shape(),
            Err(TensorCodecError::ShapeMismatch {
                field: "gate_weights",
                ..
            })
        ));

        let mut r = request(3, 8, 2);
        r.expert_ids.push(1);
        assert!(matches!(
            r.check_shape(),
            Err(TensorCodecError::ShapeMismatch {
                field: "expert_ids",
                ..
            })
        ));

        let mut r = request(3, 8, 2);
        r.expert_ids[3] = EMPTY_EXPERT_SLOT;
        assert!(matches!(
            r.check_shape(),
            Err(TensorCodecError::BadSlot { index: 3, .. })
        ));
        r.gate_weights[3] = 0.0;
        r.check_shape().expect("padding with weight 0 is fine");

        // f32 hidden rows (CPU reference path): 4 bytes per value; unset dtype means bf16.
        let mut r = request(3, 8, 2);
        r.hidden_dtype = Dtype::F32 as i32;
        assert!(matches!(
            r.check_shape(),
            Err(TensorCodecError::ShapeMismatch {
                field: "hidden",
                ..
            })
        ));
        r.hidden = encode_f32(&[1.0; 24]);
        r.check_shape().expect("3 x 8 f32 rows");
        r.hidden_dtype = Dtype::Unspecified as i32;
        assert!(
            r.check_shape().is_err(),
            "96 bytes are 48 bf16 values, not 24"
        );
        r.hidden_dtype = 42;
        assert!(matches!(
            r.check_shape(),
            Err(TensorCodecError::UnsupportedDtype {
                field: "hidden_dtype",
                value: 42
            })
        ));

        let mut r = request(3, 8, 2);
        r.gate_weights[0] = f32::NAN;
        assert!(matches!(
            r.check_shape(),
            Err(TensorCodecError::BadSlot { index: 0, .. })
        ));
    }

    #[test]
    fn forward_response_partial_decodes_by_dtype() {
        let values: Vec<f32> = (0..6).map(|i| i as f32 * 0.25).collect();
        let mut resp = ForwardResponse {
            request_id: 1,
            layer: 2,
            num_rows: 2,
            hidden_size: 3,
            dtype: Dtype::F32 as i32,
            partial: encode_f32(&values),
            compute_time_ns: 0,
            error: None,
        };
        assert_eq!(resp.partial_f32().expect("f32"), values);
        resp.dtype = Dtype::Bf16 as i32;
        resp.partial = encode_f32_as_bf16(&values);
        assert_eq!(
            resp.partial_f32().expect("bf16"),
            values,
            "quarters are exact in bf16"
        );
        resp.dtype = 99;
        assert!(matches!(
            resp.partial_f32(),
            Err(TensorCodecError::UnsupportedDtype { value: 99, .. })
        ));
    }
}
