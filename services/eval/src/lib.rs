//! Model-quality evaluation against a running dsv2 router, through the public gRPC API:
//! summarization with ROUGE and tokens/s (TensorRT-LLM examples/summarize.py's procedure) and
//! MMLU accuracy per subject and category (hendrycks / examples/mmlu.py), scored with the
//! router's prompt log-probabilities. The `dsv2 summarize` and `dsv2 mmlu` commands are thin
//! front ends over this crate.

pub mod client;
pub mod dataset;
pub mod error;
pub mod mmlu;
pub mod summarize;

pub use client::{Client, Progress, no_progress};
pub use error::{EvalError, Result};
