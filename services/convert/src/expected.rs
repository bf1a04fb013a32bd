//! The tensors a DeepSeek-V2 checkpoint must hold (the layout lives in `dsv2_core::layout`):
//! conversion checks every source tensor against this list and `init-random` generates it.

use dsv2_core::ModelConfig;
pub use dsv2_core::layout::{Expected, Init};

pub fn expected_tensors(c: &ModelConfig) -> Vec<Expected> {
    dsv2_core::layout::expected_tensors(c, dsv2_core::layout::LINEAR_STD)
}
