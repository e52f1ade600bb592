//! A temporary directory per test, removed on drop unless `TANDEM_KEEP_TMP` is set.
//!
//! Paths stay short on purpose: the management and NBD sockets live inside it and a Unix
//! socket path is limited to 107 bytes. The base is `TANDEM_TMP` or the system temp dir.

use rand::Rng;
use std::path::{Path, PathBuf};

/// A directory that exists for the lifetime of this value.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    /// Creates `<base>/tandem-<label>-<random>`; `label` is cut to 20 characters.
    pub fn new(label: &str) -> Self {
        let base = std::env::var_os("TANDEM_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let label: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(20)
            .collect();
        let mut rng = rand::thread_rng();
        for _ in 0..16 {
            let path = base.join(format!("tandem-{label}-{:08x}", rng.gen::<u32>()));
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    let keep = std::env::var_os("TANDEM_KEEP_TMP").is_some();
                    return TempDir { path, keep };
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create a temp dir under {}: {e}", base.display()),
            }
        }
        panic!("cannot find a free temp dir name under {}", base.display());
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `self.path().join(name)`.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// Keeps the directory after drop (for looking at logs and images by hand).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("harness: kept {}", self.path.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("harness: cannot remove {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_and_removed() {
        let p;
        {
            let d = TempDir::new("unit test/with spaces");
            p = d.path().to_path_buf();
            assert!(p.is_dir());
            std::fs::write(d.join("f"), b"x").expect("write into temp dir");
            assert!(p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("tandem-unit-test-with-spa")));
        }
        if std::env::var_os("TANDEM_KEEP_TMP").is_none() {
            assert!(!p.exists());
        }
    }
}
