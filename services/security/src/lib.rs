//! Who may talk to the dsv2 servers: TLS and mutual TLS whose certificates are re-read when
//! their files change (cert-manager rotates them under a running pod), bearer tokens read from a
//! file that is re-read the same way, and the router's dialer for `https://` shards. The
//! binaries own the flags (`args`); this crate reads no environment itself.

pub mod args;
pub mod auth;
pub mod client;
mod error;
mod pem;
pub mod server;
#[cfg(feature = "testing")]
pub mod testing;
mod watched;

pub use error::SecurityError;

/// The one crypto provider of every TLS config here: ring (no C toolchain needed), chosen
/// explicitly so no process-wide default has to be installed. rustls deprecated ring's provider
/// for lacking post-quantum key exchange; tonic's own `tls-ring` uses the same one.
#[allow(deprecated)]
fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
