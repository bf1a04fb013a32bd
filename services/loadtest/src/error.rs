//! The one error type of the load generator: bad configuration or data, or no connection.

/// Why a load test could not run. Failed *requests* are not errors: they are counted in the
/// report's status and error distributions, as ghz does.
#[derive(Debug, thiserror::Error)]
pub enum LoadtestError {
    /// A configuration value is out of range or inconsistent.
    #[error("invalid load test configuration: {field}: {reason}")]
    InvalidConfig {
        /// The offending option.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The request data file could not be read.
    #[error("cannot read request data {path}: {source}")]
    DataIo {
        /// Path of the data file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The request data is not valid JSON for a `dsv2.v1.GenerateRequest` (or a list of them).
    #[error("invalid request data: {0}")]
    Data(String),
    /// The endpoint is not a URL, or --token / --ca is unusable.
    #[error(transparent)]
    Security(#[from] dsv2_security::SecurityError),
    /// The connection to the endpoint could not be established.
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        /// The endpoint as given.
        endpoint: String,
        /// tonic's transport error.
        source: tonic::transport::Error,
    },
    /// A worker task panicked or was aborted (a bug in the load generator, not the server).
    #[error("load test worker failed: {0}")]
    Worker(String),
    /// The JSON report could not be serialized.
    #[error("cannot serialize report: {0}")]
    Json(#[from] serde_json::Error),
}
