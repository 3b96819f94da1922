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

/// The distinct chunk bytes of a release's files: what must cross the uplink at least once (the HEF and
/// the ONNX carry the same weights, the index and embeddings.npy the same vectors).
pub fn unique_chunk_bytes(files: &deckhand_agent::release::ReleaseFiles) -> u64 {
    let mut unique = std::collections::HashMap::new();
    for p in files.paths() {
        let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        for c in deckhand_protocol::ChunkMap::build(&bytes).chunks() {
            unique.insert(c.id, u64::from(c.len));
        }
    }
    unique.values().sum()
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
    /// The network namespace the agent runs in (its HTTP address is only reachable from inside).
    netns: Option<String>,
}

/// A network namespace made by a test, deleted (with its interfaces) when dropped. Needs root.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(name: &str) -> Self {
        let name = format!("dh-{name}-{}", std::process::id());
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace and checks that it succeeded.
    pub fn exec(&self, cmd: &[&str]) {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(cmd);
        ip(&args);
    }

    /// Joins `self` and `other` with a veth pair, addressed `a`/`b` (CIDR), both up.
    pub fn link(&self, a: &str, other: &NetNs, b: &str) {
        let (va, vb) = (
            format!("dha{}", std::process::id() % 100_000),
            format!("dhb{}", std::process::id() % 100_000),
        );
        ip(&[
            "link",
            "add",
            &va,
            "netns",
            &self.name,
            "type",
            "veth",
            "peer",
            "name",
            &vb,
            "netns",
            &other.name,
        ]);
        for (ns, dev, addr) in [(self, &va, a), (other, &vb, b)] {
            ns.exec(&["ip", "addr", "add", addr, "dev", dev]);
            ns.exec(&["ip", "link", "set", dev, "multicast", "on", "up"]);
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth ends inside it.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip (iproute2): {e}"));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Agent {
    /// Starts `deckhand-agent run ARGS --http-listen 127.0.0.1:0` with extra environment, and waits for it
    /// to print its address.
    pub fn start(args: &[&str], env: &[(&str, String)]) -> Self {
        Self::start_in(None, args, env)
    }

    /// Starts the agent inside network namespace `netns` (through `ip netns exec`).
    pub fn start_in(netns: Option<&NetNs>, args: &[&str], env: &[(&str, String)]) -> Self {
        use std::io::BufRead as _;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", &ns.name])
                    .arg(bin("deckhand-agent"));
                c
            }
            None => std::process::Command::new(bin("deckhand-agent")),
        };
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
            netns: netns.map(|n| n.name.clone()),
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
        let Some(ns) = &self.netns else {
            return self.request("GET", "/v1/status", b"").1;
        };
        // Inside a namespace: ask with the agent's own status command, run there.
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(bin("deckhand-agent"))
            .args(["status", "--json", "--http", &self.addr])
            .output()
            .unwrap_or_else(|e| panic!("deckhand-agent status in {ns}: {e}"));
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
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
        let mut args = self.credential_args(name);
        args.extend(["--quic-listen", "127.0.0.1:0", "--mdns", "off"].map(String::from));
        args
    }

    /// Enrolls `name` and returns only its credential flags (CA, certificate, key).
    pub fn enroll_args(&self, name: &str) -> Vec<String> {
        self.ca
            .enroll(name, 30, &self.dir)
            .unwrap_or_else(|e| panic!("fleet enroll {name}: {e}"));
        self.credential_args(name)
    }

    fn credential_args(&self, name: &str) -> Vec<String> {
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
