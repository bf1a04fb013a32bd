//! The crate's error type: data problems name the file and the line (or row), server problems
//! name the call and the gRPC status.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A data file could not be opened or read at all.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A data file is readable but its content is wrong. `line` is 1-based: the text line for
    /// CSV and JSONL (where the record starts), the row number (1 = first data row) for parquet.
    #[error("{}:{line}: {message}", path.display())]
    Data {
        path: PathBuf,
        line: u64,
        message: String,
    },
    /// A problem with a whole file or directory (empty, unknown format, missing columns).
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    /// Bad arguments (unknown subject, zero concurrency, ...).
    #[error("{0}")]
    Usage(String),
    /// The router could not be reached.
    #[error(
        "cannot reach the router at {endpoint}: {message} (is `dsv2 up` or dsv2-router running there?)"
    )]
    Connect { endpoint: String, message: String },
    /// The router answered a call with an error status.
    #[error("router answered {call} with {code:?}: {message}")]
    Rpc {
        call: &'static str,
        code: tonic::Code,
        message: String,
    },
    /// The router answered, but not in the shape the API promises.
    #[error("unexpected answer from the router: {0}")]
    Protocol(String),
}

impl EvalError {
    pub(crate) fn data(path: &std::path::Path, line: u64, message: impl Into<String>) -> Self {
        EvalError::Data {
            path: path.to_path_buf(),
            line,
            message: message.into(),
        }
    }
    pub(crate) fn file(path: &std::path::Path, message: impl Into<String>) -> Self {
        EvalError::File {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        EvalError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub(crate) fn rpc(call: &'static str, s: tonic::Status) -> Self {
        EvalError::Rpc {
            call,
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

pub type Result<T, E = EvalError> = std::result::Result<T, E>;
