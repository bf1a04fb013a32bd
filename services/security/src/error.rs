//! The crate's one error type: every variant names the flag whose file or value is wrong.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("{flag} {}: {source}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{flag} {}: {msg}", path.display())]
    Invalid {
        flag: &'static str,
        path: PathBuf,
        msg: String,
    },
    #[error("{flag}: {msg}")]
    Config { flag: &'static str, msg: String },
}
