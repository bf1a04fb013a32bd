//! `dsv2-test-certs DIR`: writes a test CA and certificates it signs into DIR, for tests in
//! other languages (tests/grpc_python): ca.crt; server.crt/.key (127.0.0.1, ::1, localhost);
//! client.crt/.key; and other-ca.crt, a CA that signed none of them. Made fresh on every run
//! with rcgen: no private key is committed.

use std::path::PathBuf;

use anyhow::{Context, Result};
use dsv2_security::testing::TestCa;

fn main() -> Result<()> {
    let dir: PathBuf = std::env::args_os()
        .nth(1)
        .context("usage: dsv2-test-certs DIR")?
        .into();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = TestCa::new("dsv2 test ca")?;
    ca.write(&dir.join("ca.crt"))?;
    ca.write_leaf(&dir, "server")?;
    ca.write_leaf(&dir, "client")?;
    TestCa::new("dsv2 other ca")?.write(&dir.join("other-ca.crt"))?;
    Ok(())
}
