//! The harness deckhand's integration tests share: deterministic data, one directory per test, and
//! helpers to run and kill real processes.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The path of one of deckhand's real binaries (`deckhand`, `deckhand-agent`), built on first use in the
/// same profile as the running test, so integration tests run the programs users run.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("no current exe: {e}"));
        // target/<profile>/deps/<test> -> target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .unwrap_or_else(|| panic!("odd test path {}", exe.display()))
            .to_owned();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or_else(|| panic!("no workspace root"));
        let mut cmd = std::process::Command::new(env!("CARGO"));
        cmd.current_dir(root).args([
            "build",
            "-q",
            "-p",
            "deckhand-tools",
            "-p",
            "deckhand-agent",
            "--bins",
        ]);
        if profile_dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .unwrap_or_else(|e| panic!("cannot run cargo to build the binaries: {e}"));
        assert!(status.success(), "building deckhand's binaries failed");
        profile_dir
    });
    let path = dir.join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

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
