//! The flags, shared by `dsv2-router` and `dsv2-expert` (flattened into their `Config`), each
//! with the `DSV2_*` environment variable the Helm chart sets.

use std::path::PathBuf;

/// Serving TLS and mutual TLS.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServerTlsArgs {
    /// Serve TLS with this PEM certificate chain (re-read when the file changes).
    #[arg(long, env = "DSV2_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert (re-read when the file changes).
    #[arg(long, env = "DSV2_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by a CA of this PEM file (mutual TLS; needs
    /// --tls-cert; re-read when the file changes).
    #[arg(long, env = "DSV2_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
}

/// How the router reaches its shards: TLS for `https://` shard URLs, and the shard token.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ShardClientArgs {
    /// PEM CA file that signs the shards' certificates (for https:// --shard URLs; without it
    /// the system's roots). Re-read when the file changes, for the next connection.
    #[arg(long, env = "DSV2_SHARD_CA", value_name = "FILE")]
    pub shard_ca: Option<PathBuf>,
    /// PEM client certificate the router presents to the shards (their --tls-client-ca).
    #[arg(
        long,
        env = "DSV2_SHARD_CLIENT_CERT",
        value_name = "FILE",
        requires = "shard_client_key"
    )]
    pub shard_client_cert: Option<PathBuf>,
    /// PEM private key of --shard-client-cert.
    #[arg(
        long,
        env = "DSV2_SHARD_CLIENT_KEY",
        value_name = "FILE",
        requires = "shard_client_cert"
    )]
    pub shard_client_key: Option<PathBuf>,
    /// Token sent to the shards as `authorization: Bearer` (one line of their
    /// --shard-token-file).
    #[arg(long, env = "DSV2_SHARD_TOKEN", hide_env_values = true)]
    pub shard_token: Option<String>,
}

/// A client of the public API (`dsv2 generate/loadtest/summarize/mmlu`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClientArgs {
    /// Bearer token for a router started with --auth-token-file.
    #[arg(long, env = "DSV2_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM CA file to verify an https:// endpoint with (else the system's roots).
    #[arg(long, env = "DSV2_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

impl ClientArgs {
    /// The endpoint for `url`, with TLS for https:// URLs.
    pub fn endpoint(&self, url: &str) -> Result<tonic::transport::Endpoint, crate::SecurityError> {
        crate::client::client_endpoint(url, self.ca.as_deref())
    }

    /// The interceptor that sends --token.
    pub fn bearer(&self) -> Result<crate::client::Bearer, crate::SecurityError> {
        crate::client::Bearer::new(self.token.as_deref(), "--token")
    }
}
