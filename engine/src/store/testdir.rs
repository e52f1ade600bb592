//! A temporary directory for tests that open real files with O_DIRECT: under
//! `$TANDEM_TEST_DIR` or `/var/tmp` (disk-backed, unlike a tmpfs `/tmp` where O_DIRECT
//! fails), removed on drop.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// A directory removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory named after `tag`, the process and a counter.
    pub(crate) fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let base = std::env::var_os("TANDEM_TEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp"));
        let dir = base.join(format!(
            "tandem-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    /// A path inside it.
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
