//! What `dsv2-router` and `dsv2-expert` (and the `dsv2` CLI) share at their edges: logs and
//! traces (`telemetry`), Prometheus metrics (`metrics`), model-dir resolution from the
//! environment, gRPC reflection and shutdown signals. Binaries read the environment; the
//! libraries below them do not.

pub mod metrics;
pub mod telemetry;

use std::path::PathBuf;

use clap::ValueEnum;
use dsv2_core::{CoreError, tiny};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

/// Data plane between router and shards.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    Nccl,
}

/// Structured logs on stderr; `level` uses RUST_LOG syntax (an invalid filter falls back to
/// `fallback`).
pub fn init_logging(level: &str, format: LogFormat, fallback: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(fallback));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => b.json().try_init(),
        LogFormat::Human => b.try_init(),
    };
}

/// `tiny` (the embedded tiny model, created on first use under $DSV2_CACHE_DIR, else
/// $XDG_CACHE_HOME/dsv2, else ~/.cache/dsv2) or a model dir path.
pub fn resolve_model_dir(arg: &str) -> Result<PathBuf, CoreError> {
    let root = tiny::cache_root(
        std::env::var("DSV2_CACHE_DIR").ok(),
        std::env::var("XDG_CACHE_HOME").ok(),
        std::env::var("HOME").ok(),
    );
    tiny::resolve_model_dir(arg, &root)
}

/// Server reflection, v1 (grpcurl) and v1alpha (older ghz builds), over our protos and health.
#[allow(clippy::type_complexity)]
pub fn reflection_services() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(dsv2_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

/// Resolves on Ctrl-C or SIGTERM (what Kubernetes sends).
pub async fn shutdown_signal() {
    let term = async {
        #[cfg(unix)]
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
            return;
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
