//! PEM files into rustls types, each error naming the flag that pointed at the file.

use std::path::Path;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::SecurityError;

pub(crate) fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|source| SecurityError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })
}

fn invalid(flag: &'static str, path: &Path, msg: impl std::fmt::Display) -> SecurityError {
    SecurityError::Invalid {
        flag,
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

/// Every certificate of a PEM file (at least one).
pub(crate) fn certs(
    flag: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, SecurityError> {
    let bytes = read(flag, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(flag, path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(flag, path, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub(crate) fn key(
    flag: &'static str,
    path: &Path,
) -> Result<PrivateKeyDer<'static>, SecurityError> {
    let bytes = read(flag, path)?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| invalid(flag, path, format!("no PEM private key: {e}")))
}

/// The certificates of a PEM file as trust anchors.
pub(crate) fn roots(flag: &'static str, path: &Path) -> Result<RootCertStore, SecurityError> {
    let mut store = RootCertStore::empty();
    for c in certs(flag, path)? {
        store
            .add(c)
            .map_err(|e| invalid(flag, path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(store)
}
