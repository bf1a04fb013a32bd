//! A value parsed from files and parsed again when any of them changes (size, mtime or inode:
//! Kubernetes swaps a Secret volume's files by renaming a symlink, cert-manager rewrites them).
//! Checked on use: a few `stat` calls per new connection or request, no watcher thread. A
//! change that does not parse (a half-written rotation) keeps the last good value and logs why.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::SecurityError;

type Stamp = Vec<Option<(SystemTime, u64, u64)>>;

pub(crate) struct Watched<T> {
    paths: Vec<PathBuf>,
    parse: Box<dyn Fn() -> Result<T, SecurityError> + Send + Sync>,
    state: Mutex<(Stamp, Arc<T>)>,
}

fn stamp(paths: &[PathBuf]) -> Stamp {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p).ok().map(|m| {
                (
                    m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    m.len(),
                    m.ino(),
                )
            })
        })
        .collect()
}

impl<T> Watched<T> {
    /// Parses once now: a file that is missing or bad is an error at start.
    pub(crate) fn new(
        paths: Vec<PathBuf>,
        parse: impl Fn() -> Result<T, SecurityError> + Send + Sync + 'static,
    ) -> Result<Self, SecurityError> {
        let s = stamp(&paths);
        let v = parse()?;
        Ok(Watched {
            paths,
            parse: Box::new(parse),
            state: Mutex::new((s, Arc::new(v))),
        })
    }

    /// The current value, parsed again first if a file changed since the last look.
    pub(crate) fn get(&self) -> Arc<T> {
        let now = stamp(&self.paths);
        // A poisoned lock only means a parse panicked elsewhere: the value inside is still whole.
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.0 != now {
            match (self.parse)() {
                Ok(v) => {
                    tracing::info!(files = ?self.paths, "re-read after a change");
                    st.1 = Arc::new(v);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "changed file does not parse: keeping the last good one")
                }
            }
            st.0 = now;
        }
        st.1.clone()
    }
}
