//! The error type of the conversion library: every failure names the file and tensor involved.

use std::path::PathBuf;

use dsv2_core::CoreError;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Core(#[from] CoreError),

    #[error("tensor `{tensor}` in {file}: {msg}")]
    Tensor {
        tensor: String,
        file: PathBuf,
        msg: String,
    },

    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = ConvertError> = std::result::Result<T, E>;

impl ConvertError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ConvertError::Io {
            path: path.into(),
            source,
        }
    }
}
