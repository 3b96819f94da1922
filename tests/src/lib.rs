//! The harness deckhand's integration tests share: deterministic data, one directory per test, and
//! helpers to run and kill real processes.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The path of one of deckhand's real binaries (`deckhand`, `deckhand-agent`) in the profile of the
/// running test. `cargo test --workspace` builds them (the agent and tools packages have CLI tests); when
/// one is missing (this package tested alone), it is built here once.
pub fn bin(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("no current exe: {e}"));
        // target/<profile>/deps/<test> -> target/<profile>
        exe.parent()
            .and_then(Path::parent)
            .unwrap_or_else(|| panic!("odd test path {}", exe.display()))
            .to_owned()
    });
    let path = dir.join(name);
    if !path.exists() {
        static BUILT: OnceLock<()> = OnceLock::new();
        BUILT.get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .unwrap_or_else(|| panic!("no workspace root"));
            let mut cmd = std::process::Command::new(env!("CARGO"));
            cmd.current_dir(root)
                .args(["build", "-q", "--workspace", "--bins"]);
            if dir.ends_with("release") {
                cmd.arg("--release");
            }
            let status = cmd
                .status()
                .unwrap_or_else(|e| panic!("cannot run cargo to build the binaries: {e}"));
            assert!(status.success(), "building deckhand's binaries failed");
        });
    }
    assert!(path.exists(), "{} was not built", path.display());
    path
}

pub use deckhand_agent::fixtures::{SplitMix, noise};

/// Publish options for a release's files, for deployment `shop-1`, valid for a day, no progress bar.
pub fn publish_options(
    files: &deckhand_agent::release::ReleaseFiles,
) -> deckhand_tools::publish::PublishOptions {
    deckhand_tools::publish::PublishOptions::local(
        deckhand_protocol::layout::Name::deployment("shop-1").unwrap_or_else(|e| panic!("{e}")),
        files,
        jiff::SignedDuration::from_hours(24),
    )
}

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

/// A running `deckhand-agent run` process. Stopped with SIGTERM (and waited for) when dropped.
pub struct Agent {
    child: Option<std::process::Child>,
    addr: String,
    quic: Option<String>,
}

impl Agent {
    /// Starts `deckhand-agent run ARGS --http-listen 127.0.0.1:0` with extra environment, and waits for it
    /// to print its address.
    pub fn start(args: &[&str], env: &[(&str, String)]) -> Self {
        use std::io::BufRead as _;
        let mut cmd = std::process::Command::new(bin("deckhand-agent"));
        cmd.arg("run")
            .args(args)
            .args(["--http-listen", "127.0.0.1:0"]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        // DECKHAND_TEST_AGENT_LOGS=DIR keeps each agent's log in DIR (for debugging a test).
        let stderr = match std::env::var_os("DECKHAND_TEST_AGENT_LOGS") {
            Some(dir) => {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let path = Path::new(&dir).join(format!("agent-{}-{n}.log", std::process::id()));
                std::fs::File::create(&path)
                    .map(std::process::Stdio::from)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            }
            None => std::process::Stdio::null(),
        };
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start deckhand-agent: {e}"));
        let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        let mut lines = std::io::BufReader::new(stdout).lines();
        let mut quic = None;
        let addr = loop {
            let line = match lines.next() {
                Some(Ok(l)) => l,
                other => panic!("the agent stopped before listening: {other:?}"),
            };
            if let Some(q) = line.trim().strip_prefix("quic listening on ") {
                quic = Some(q.to_owned());
            } else if let Some(a) = line.trim().strip_prefix("listening on http://") {
                break a.to_owned();
            } else {
                panic!("unexpected line {line:?}");
            }
        };
        // Keep draining stdout so the agent never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self {
            child: Some(child),
            addr,
            quic,
        }
    }

    /// One HTTP/1.1 request: (status, JSON body or Null).
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, serde_json::Value) {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(&self.addr)
            .unwrap_or_else(|e| panic!("connect {}: {e}", self.addr));
        write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())
            .unwrap_or_else(|e| panic!("write: {e}"));
        let _ = s.write_all(body);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let status = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (
            status,
            serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
        )
    }

    /// Where the agent's QUIC endpoint listens (when it has fleet credentials).
    pub fn quic(&self) -> &str {
        self.quic
            .as_deref()
            .unwrap_or_else(|| panic!("the agent runs without QUIC"))
    }

    pub fn http(&self) -> &str {
        &self.addr
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn recognize(&self, image: &[u8]) -> (u16, serde_json::Value) {
        self.request("POST", "/v1/recognize", image)
    }

    pub fn status(&self) -> serde_json::Value {
        self.request("GET", "/v1/status", b"").1
    }

    /// Polls status until `pred` holds, or panics after `secs`.
    pub fn wait_for(
        &self,
        secs: u64,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}; status: {s}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Stops the agent gracefully (SIGTERM) and checks it exited cleanly.
    pub fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .arg(child.id().to_string())
                .status();
            let status = child.wait().unwrap_or_else(|e| panic!("wait: {e}"));
            assert!(status.success(), "agent exited with {status}");
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A fleet CA for a test, and the agent flags that use it.
pub struct TestFleet {
    pub ca: deckhand_agent::fleet::CaDir,
    dir: PathBuf,
}

impl TestFleet {
    pub fn new(dir: &Path) -> Self {
        let ca = deckhand_agent::fleet::CaDir::new(dir.join("ca"));
        ca.init("test")
            .unwrap_or_else(|e| panic!("fleet init: {e}"));
        Self {
            ca,
            dir: dir.join("certs"),
        }
    }

    /// Enrolls `name` and returns the flags an agent needs to use it (QUIC on a free loopback port, no
    /// mDNS).
    pub fn agent_args(&self, name: &str) -> Vec<String> {
        self.ca
            .enroll(name, 30, &self.dir)
            .unwrap_or_else(|e| panic!("fleet enroll {name}: {e}"));
        self.existing_args(name)
    }

    /// The flags for an agent enrolled before.
    pub fn existing_args(&self, name: &str) -> Vec<String> {
        let (crt, key) = (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        );
        vec![
            "--fleet-ca".into(),
            self.ca.cert_path().display().to_string(),
            "--fleet-cert".into(),
            crt.display().to_string(),
            "--fleet-key".into(),
            key.display().to_string(),
            "--quic-listen".into(),
            "127.0.0.1:0".into(),
            "--mdns".into(),
            "off".into(),
        ]
    }

    /// Credentials for an in-process participant (e.g. a peer that lies on purpose).
    pub fn credentials(&self, name: &str) -> deckhand_agent::fleet::FleetCredentials {
        let (crt, key) = self
            .ca
            .enroll(name, 30, &self.dir)
            .unwrap_or_else(|e| panic!("fleet enroll {name}: {e}"));
        deckhand_agent::fleet::FleetCredentials::load(&deckhand_agent::fleet::CredentialPaths {
            ca: self.ca.cert_path(),
            cert: crt,
            key,
            crl: None,
        })
        .unwrap_or_else(|e| panic!("credentials of {name}: {e}"))
    }
}
