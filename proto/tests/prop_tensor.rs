//! Property tests of the shard tensor decoders (bytes a peer sends): any input decodes or fails
//! without a panic, and every failure names the field it is about.

use dsv2_proto::expert::v1::{Dtype, ForwardRequest, ForwardResponse};
use dsv2_proto::tensor::{decode_bf16, decode_f32, decode_rows_to_f32};
use proptest::prelude::*;
use prost::Message;

fn dtype() -> impl Strategy<Value = Dtype> {
    prop_oneof![
        Just(Dtype::Bf16),
        Just(Dtype::F32),
        Just(Dtype::Unspecified)
    ]
}

/// Row and column counts, small or huge (the huge ones must overflow cleanly, not allocate).
fn dim() -> impl Strategy<Value = usize> {
    prop_oneof![0usize..64, Just(usize::MAX), Just(usize::MAX / 2 + 1)]
}

/// The fields a ForwardRequest error may name (an indexed one is `gate_weights[i]`).
const REQUEST_FIELDS: &[&str] = &["hidden", "hidden_dtype", "expert_ids", "gate_weights"];

fn names_one_of(msg: &str, fields: &[&str]) -> bool {
    fields
        .iter()
        .any(|f| msg.starts_with(&format!("{f}: ")) || msg.starts_with(&format!("{f}[")))
}

proptest! {
    #[test]
    fn row_decoding_never_panics_and_names_the_field(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        dt in dtype(),
        rows in dim(),
        cols in dim(),
    ) {
        match decode_rows_to_f32("partial", dt, &bytes, rows, cols) {
            Ok(v) => prop_assert_eq!(v.len(), rows * cols),
            Err(e) => prop_assert!(e.to_string().starts_with("partial: "), "{}", e),
        }
        if let Err(e) = decode_bf16("hidden", &bytes) {
            prop_assert!(e.to_string().starts_with("hidden: "), "{}", e);
        }
        if let Err(e) = decode_f32("hidden", &bytes) {
            prop_assert!(e.to_string().starts_with("hidden: "), "{}", e);
        }
    }

    #[test]
    fn forward_request_checks_never_panic_and_name_the_field(
        hidden in proptest::collection::vec(any::<u8>(), 0..256),
        hidden_dtype in prop_oneof![0i32..3, any::<i32>()],
        num_rows in prop_oneof![0u32..8, any::<u32>()],
        hidden_size in prop_oneof![0u32..16, any::<u32>()],
        experts_per_row in prop_oneof![0u32..4, any::<u32>()],
        expert_ids in proptest::collection::vec(any::<u32>(), 0..24),
        gate_weights in proptest::collection::vec(any::<f32>(), 0..24),
    ) {
        let req = ForwardRequest {
            hidden, hidden_dtype, num_rows, hidden_size, experts_per_row, expert_ids,
            gate_weights, ..Default::default()
        };
        if let Err(e) = req.check_shape() {
            prop_assert!(names_one_of(&e.to_string(), REQUEST_FIELDS), "{}", e);
        }
    }

    #[test]
    fn arbitrary_wire_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        // What a shard or the router receives: protobuf bytes from the network.
        if let Ok(req) = ForwardRequest::decode(bytes.as_slice())
            && let Err(e) = req.check_shape()
        {
            prop_assert!(names_one_of(&e.to_string(), REQUEST_FIELDS), "{}", e);
        }
        if let Ok(resp) = ForwardResponse::decode(bytes.as_slice())
            && let Err(e) = resp.partial_f32()
        {
            prop_assert!(names_one_of(&e.to_string(), &["partial", "dtype"]), "{}", e);
        }
    }
}
