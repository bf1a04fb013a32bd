//! Dialing TLS servers with tonic: the router's shard dialer (CA, client certificate, token; the
//! files re-read when they change, for the next connection) and the CLI clients' endpoints
//! (`--ca`, `--token`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::args::ShardClientArgs;
use crate::watched::Watched;
use crate::{SecurityError, pem};

/// Adds `authorization: Bearer <token>` to every call (nothing without a token).
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// `flag` names where the token came from, for the error when it cannot be a header.
    pub fn new(token: Option<&str>, flag: &'static str) -> Result<Self, SecurityError> {
        let Some(t) = token.map(str::trim) else {
            return Ok(Bearer(None));
        };
        if t.is_empty() {
            return Err(SecurityError::Config {
                flag,
                msg: "is empty".into(),
            });
        }
        let v = format!("Bearer {t}")
            .parse()
            .map_err(|_| SecurityError::Config {
                flag,
                msg: "holds characters an HTTP header cannot carry".into(),
            })?;
        Ok(Bearer(Some(v)))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Client TLS from files: a CA (else the system roots) and optionally a client identity.
fn client_tls(
    ca: Option<(&'static str, &Path)>,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientTlsConfig, SecurityError> {
    let mut cfg = ClientTlsConfig::new();
    cfg = match ca {
        Some((flag, path)) => {
            // Parsed here only to fail early with the flag's name; tonic parses it again.
            pem::roots(flag, path)?;
            cfg.ca_certificate(Certificate::from_pem(pem::read(flag, path)?))
        }
        None => cfg.with_native_roots(),
    };
    if let Some((cert, key)) = identity {
        pem::certs("--shard-client-cert", cert)?;
        pem::key("--shard-client-key", key)?;
        cfg = cfg.identity(Identity::from_pem(
            pem::read("--shard-client-cert", cert)?,
            pem::read("--shard-client-key", key)?,
        ));
    }
    Ok(cfg)
}

/// How the router dials its shards. Cheap to clone.
#[derive(Clone, Default)]
pub struct Dialer {
    tls: Option<Arc<Watched<ClientTlsConfig>>>,
    bearer: Bearer,
}

impl Dialer {
    /// Reads the files now: a missing or bad one is an error naming its flag.
    pub fn from_args(a: &ShardClientArgs) -> Result<Self, SecurityError> {
        let bearer = Bearer::new(a.shard_token.as_deref(), "--shard-token")?;
        if a.shard_ca.is_none() && a.shard_client_cert.is_none() {
            return Ok(Dialer { tls: None, bearer });
        }
        let ca = a.shard_ca.clone();
        let identity: Option<(PathBuf, PathBuf)> =
            match (a.shard_client_cert.clone(), a.shard_client_key.clone()) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                _ => {
                    return Err(SecurityError::Config {
                        flag: "--shard-client-cert",
                        msg: "--shard-client-cert and --shard-client-key go together".into(),
                    });
                }
            };
        let mut paths: Vec<PathBuf> = ca.iter().cloned().collect();
        if let Some((c, k)) = &identity {
            paths.extend([c.clone(), k.clone()]);
        }
        let tls = Watched::new(paths, move || {
            client_tls(
                ca.as_deref().map(|p| ("--shard-ca", p)),
                identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
            )
        })?;
        Ok(Dialer {
            tls: Some(Arc::new(tls)),
            bearer,
        })
    }

    /// An endpoint for `url`: https:// URLs get the current TLS settings (the system roots
    /// when no --shard-ca was given).
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, SecurityError> {
        let ep = Endpoint::from_shared(url.to_string()).map_err(|e| SecurityError::Config {
            flag: "--shard",
            msg: format!("{url}: not a valid URL: {e}"),
        })?;
        if !url.starts_with("https://") {
            return Ok(ep);
        }
        let cfg = match &self.tls {
            Some(t) => (*t.get()).clone(),
            None => ClientTlsConfig::new().with_native_roots(),
        };
        ep.tls_config(cfg).map_err(|e| SecurityError::Config {
            flag: "--shard",
            msg: format!("{url}: {e}"),
        })
    }

    /// The interceptor that sends the shard token.
    pub fn bearer(&self) -> Bearer {
        self.bearer.clone()
    }
}

/// A CLI client's endpoint: `--ca` (PEM) for https:// URLs signed by a private CA, else the
/// system roots for https://, plain HTTP/2 for http://.
pub fn client_endpoint(url: &str, ca: Option<&Path>) -> Result<Endpoint, SecurityError> {
    let ep = Endpoint::from_shared(url.to_string()).map_err(|e| SecurityError::Config {
        flag: "--endpoint",
        msg: format!("{url}: not a valid URL: {e}"),
    })?;
    if !url.starts_with("https://") {
        if ca.is_some() {
            return Err(SecurityError::Config {
                flag: "--ca",
                msg: format!("given, but {url} is not an https:// URL"),
            });
        }
        return Ok(ep);
    }
    let cfg = client_tls(ca.map(|p| ("--ca", p)), None)?;
    ep.tls_config(cfg).map_err(|e| SecurityError::Config {
        flag: "--endpoint",
        msg: format!("{url}: {e}"),
    })
}

/// The router's shard dialer, set once by `dsv2-router`'s main before the first shard is dialed.
/// Process-wide rather than threaded through every constructor so that every path to a shard
/// (the Forward streams, Info, the health probe, the NCCL bootstrap) dials through the same
/// settings without each growing a parameter; unset, shards are dialed without TLS or token.
static SHARD_DIALER: std::sync::OnceLock<Dialer> = std::sync::OnceLock::new();

/// Installs the shard dialer; a second call is an error (the settings must not change under a
/// running router).
pub fn set_shard_dialer(d: Dialer) -> Result<(), SecurityError> {
    SHARD_DIALER.set(d).map_err(|_| SecurityError::Config {
        flag: "--shard-ca",
        msg: "the shard dialer was already set".into(),
    })
}

/// The shard dialer (plain, no token, if none was set).
pub fn shard_dialer() -> &'static Dialer {
    SHARD_DIALER.get_or_init(Dialer::default)
}

/// A channel that sends the bearer token with every call.
pub type AuthChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;
