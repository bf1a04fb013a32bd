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

    /// Routed experts could not be computed (a shard or the data plane is gone): retrying later
    /// can succeed. `rows` says which rows of the step were left without a result, so that the
    /// engine fails only the requests that needed them.
    #[error("expert execution failed: {msg}")]
    Experts { msg: String, rows: ExpertRows },

    #[error("backend {backend}: {msg}")]
    Backend { backend: String, msg: String },
}

/// The rows of a step that a failure of the routed experts left without a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpertRows {
    /// Every row: the failure is not tied to rows (a lost NCCL data plane), or nothing finer is
    /// known.
    All,
    /// Only these rows of the MoE layer's input, which are the rows of the step (sorted, no
    /// repeats, never empty): every other row got its full result.
    Only(Vec<usize>),
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;

impl CoreError {
    /// An expert failure that takes every row of the step down with it.
    pub fn experts(msg: impl Into<String>) -> Self {
        CoreError::Experts {
            msg: msg.into(),
            rows: ExpertRows::All,
        }
    }

    /// An expert failure of `rows` only (any order, repeats allowed); no rows means every row,
    /// since a failure that names nobody cannot be confined.
    pub fn experts_for_rows(mut rows: Vec<usize>, msg: impl Into<String>) -> Self {
        rows.sort_unstable();
        rows.dedup();
        CoreError::Experts {
            msg: msg.into(),
            rows: if rows.is_empty() {
                ExpertRows::All
            } else {
                ExpertRows::Only(rows)
            },
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CoreError::Io {
            path: path.into(),
            source,
        }
    }
}
