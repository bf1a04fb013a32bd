//! DeepSeek-V2 model core: configuration, checkpoint access, the backend trait with the CPU
//! reference backend, the paged latent KV cache, sampling, tokenizer, chat templates and
//! generation. No networking.

pub mod backend;
pub mod chat;
pub mod config;
pub mod cpu;
pub mod engine;
pub mod error;
pub mod kv_cache;
pub mod layout;
pub mod model;
pub mod placement;
pub mod rope;
pub mod routing;
pub mod sampling;
pub mod tiny;
pub mod tokenizer;
pub mod weights;

pub use config::ModelConfig;
pub use error::{CoreError, ExpertRows, Result};
