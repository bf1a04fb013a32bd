//! `dsv2-convert`: turns a Hugging Face DeepSeek-V2 checkpoint into a converted dir (router
//! files, per-shard files with each shard's experts stacked per layer in the kernel layout, and a
//! manifest mapping every original tensor name to its bytes), and writes random checkpoints with
//! real dims. Both stream tensor data chunk by chunk, so memory stays bounded whatever the model
//! size. `dsv2_core::weights::WeightStore` serves converted dirs transparently.

// The preset config.json literals in init_random nest deeper than serde_json's json! default.
#![recursion_limit = "256"]

pub mod convert;
pub mod error;
pub mod expected;
pub mod init_random;
pub mod pipeline;
pub mod writer;

pub use convert::{ConvertOptions, ConvertReport, DtypeChoice, PlacementChoice, convert};
pub use error::{ConvertError, Result};
pub use init_random::{InitOptions, Preset, init_random};

/// Progress callbacks for long runs (the CLI draws a progress bar from them).
pub trait Progress: Sync {
    /// Total bytes that will be processed.
    fn start(&self, _total_bytes: u64) {}
    /// `bytes` more were processed.
    fn advance(&self, _bytes: u64) {}
    /// A short status line.
    fn message(&self, _msg: &str) {}
}

/// A `Progress` that reports nothing.
pub struct NoProgress;
impl Progress for NoProgress {}
