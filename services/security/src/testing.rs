//! Test certificates made at test time (no private key is ever committed): a CA, and leaf
//! certificates it signs for 127.0.0.1/localhost, written as PEM files. Only with the
//! `testing` feature (tests of this crate and the cross-process tests).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

/// A test CA.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// PEM files of one leaf certificate.
pub struct LeafFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    pub fn new(name: &str) -> Result<Self, rcgen::Error> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ok(TestCa {
            issuer: CertifiedIssuer::self_signed(p, KeyPair::generate()?)?,
        })
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes the CA certificate to `path`.
    pub fn write(&self, path: &Path) -> std::io::Result<PathBuf> {
        std::fs::write(path, self.pem())?;
        Ok(path.to_path_buf())
    }

    /// A leaf for 127.0.0.1, ::1 and localhost (server and client use), as (cert PEM, key PEM).
    pub fn leaf(&self, name: &str) -> Result<(String, String), rcgen::Error> {
        let mut p = CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])?;
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Writes a leaf as `<dir>/<name>.crt` and `<dir>/<name>.key`.
    pub fn write_leaf(&self, dir: &Path, name: &str) -> std::io::Result<LeafFiles> {
        let (cert, key) = self.leaf(name).map_err(std::io::Error::other)?;
        let files = LeafFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, cert)?;
        std::fs::write(&files.key, key)?;
        Ok(files)
    }
}
