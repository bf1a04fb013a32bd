//! The one error type of the core crate: every failure says what was wrong and where.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },

    #[error("config key `{key}` = {value} is not supported: {why}")]
    Unsupported {
        key: &'static str,
        value: String,
        why: String,
    },

    #[error("tensor `{tensor}` in {file}: {msg}")]
    Tensor {
        tensor: String,
        file: PathBuf,
        msg: String,
    },

    #[error("tensor `{tensor}` is missing: {msg}")]
    MissingTensor { tensor: String, msg: String },

    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },

    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("invalid input: {0}")]
    InvalidInput(String),

    #[error("KV cache: {0}")]
    Cache(String),

    #[error("expert execution failed: {0}")]
    Experts(String),

    #[error("backend {backend}: {msg}")]
    Backend { backend: String, msg: String },
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;

impl CoreError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CoreError::Io {
            path: path.into(),
            source,
        }
    }
}
