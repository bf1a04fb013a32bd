//! Property tests of the NCCL layer header decoder (32 bytes a peer sends): any eight words
//! decode or fail without a panic, failures name the header field, and what decodes encodes back
//! to the same words.

use dsv2_nccl::header::{HEADER_BYTES, Header};
use proptest::prelude::*;

const FIELDS: &[&str] = &["magic", "command", "in_slot"];

proptest! {
    #[test]
    fn any_words_decode_or_fail_naming_the_field(
        mut w in proptest::array::uniform8(any::<u32>()),
        magic in any::<bool>(),
        small in proptest::array::uniform2(0u32..4),
    ) {
        // Half the cases carry the real magic and small command/flag words, so decoding gets
        // past the first check often.
        if magic {
            w[0] = Header::MAGIC;
            w[1] = small[0];
            w[7] = small[1];
        }
        let w: [u32; HEADER_BYTES / 4] = w;
        match Header::decode(&w) {
            Ok(h) => prop_assert_eq!(h.encode(), w),
            Err(e) => prop_assert!(
                FIELDS.iter().any(|f| e.starts_with(&format!("{f}: "))),
                "{}", e
            ),
        }
    }
}
