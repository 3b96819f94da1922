//! The harness deckhand's integration tests share: deterministic data, one directory per test, and
//! helpers to run and kill real processes.

use std::path::{Path, PathBuf};

/// Deterministic pseudo-random bytes (splitmix64): the same seed always gives the same data.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = SplitMix(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A tiny deterministic generator for test decisions (sizes, delays).
#[derive(Clone, Debug)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }
}

/// A fresh directory for one test, removed when dropped (kept if `DECKHAND_KEEP_TEST_DIRS` is set).
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("deckhand-{name}-"))
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a test directory: {e}"));
        let path = dir.path().to_owned();
        if std::env::var_os("DECKHAND_KEEP_TEST_DIRS").is_some() {
            eprintln!("keeping test directory {}", path.display());
            let _ = dir.keep();
            return Self { dir: None, path };
        }
        Self {
            dir: Some(dir),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        self.dir.take();
    }
}
