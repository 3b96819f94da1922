//! The harness deckhand's integration tests share: deterministic data, one directory per test, and
//! helpers to run and kill real processes.

pub mod browser;
pub mod mqtt;
pub mod powerfs;
pub mod quic_flood;
pub mod v4l2cam;
pub mod webhook;

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

pub use deckhand_tools::shop::fixtures::{self, SplitMix, noise};
pub use deckhand_tools::shop::netns::NetNs;
pub use deckhand_tools::shop::{Agent, AgentOptions, Credentials, Fleet, FleetBuilder, MIB};
use std::time::Duration;

/// A shop for a test: `shop("fleet-five").agents(5).release(64 * MIB).start().await`. Its agents are
/// the real `deckhand-agent` binary of this build, in a temporary directory named after the test.
pub fn shop(name: &str) -> FleetBuilder {
    Fleet::new().name(name).agent_binary(bin("deckhand-agent"))
}

/// A shop of `agents` agents, each serving version 1 (a release of `bytes`) once this returns.
pub async fn serving_v1(name: &str, agents: usize, bytes: u64) -> Fleet {
    let fleet = shop(name)
        .agents(agents)
        .release(bytes)
        .start()
        .await
        .unwrap();
    fleet
        .wait_all(secs(60), "version 1 active", |s| {
            s.active_version() == Some(1)
        })
        .await
        .unwrap();
    fleet
}

/// `n` seconds.
pub const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

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

/// What [`unique_chunk_bytes`] come to in the blobs' packs: each distinct chunk as its pack stores it
/// (`deckhand_protocol::pack`), the bytes an agent fetches from the origin when the packs are there.
pub fn packed_chunk_bytes(files: &deckhand_agent::release::ReleaseFiles) -> u64 {
    use deckhand_protocol::pack;
    let mut unique = std::collections::HashMap::new();
    for p in files.paths() {
        let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        for c in deckhand_protocol::ChunkMap::build(&bytes).chunks() {
            unique.entry(c.id).or_insert_with(|| {
                let raw = &bytes[c.range().start as usize..c.range().end as usize];
                pack::pack_chunk(raw, pack::PACK_LEVEL).len() as u64
            });
        }
    }
    unique.values().sum()
}

/// The bytes of `blob`'s pack that hold its chunks (each chunk as the pack stores it; the header aside):
/// what fetching the whole blob from its pack costs.
pub fn packed_len(blob: &[u8]) -> u64 {
    use deckhand_protocol::pack;
    let map = deckhand_protocol::ChunkMap::build(blob);
    pack::stored(&map, blob, pack::PACK_LEVEL)
        .iter()
        .map(|s| s.len() as u64)
        .sum()
}

/// The next version of `files`: card `card` renamed to `name` in metadata.json (written as
/// `DIR/metadata-v2.json` of the fleet), everything else the same.
pub fn with_card_renamed(
    fleet: &Fleet,
    files: &deckhand_agent::release::ReleaseFiles,
    spec: &fixtures::ReferenceSpec,
    card: usize,
    name: &str,
) -> deckhand_agent::release::ReleaseFiles {
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut meta: serde_json::Value = serde_json::from_slice(&read(&files.metadata))
        .unwrap_or_else(|e| panic!("metadata.json: {e}"));
    meta[spec.card_id(card)]["name"] = serde_json::json!(name);
    let mut next = files.clone();
    next.metadata = fleet.join("metadata-v2.json");
    std::fs::write(&next.metadata, meta.to_string())
        .unwrap_or_else(|e| panic!("{}: {e}", next.metadata.display()));
    next
}

/// An agent's `/metrics` text (asserting it answered 200).
pub async fn metrics_text(agent: &deckhand_tools::shop::Agent) -> String {
    let (code, body) =
        deckhand_agent::http::request(agent.http(), "GET", "/metrics", bytes::Bytes::new())
            .await
            .unwrap_or_else(|e| panic!("GET /metrics: {e}"));
    assert_eq!(code, 200, "GET /metrics");
    String::from_utf8_lossy(&body).into_owned()
}

/// Whether the store under an agent's data directory keeps, in `quarantine/`, a file whose name starts
/// with `prefix` (a blob's hex id, or `catalog-`).
pub fn quarantined(data_dir: &Path, prefix: &str) -> bool {
    let dir = data_dir.join("store").join("quarantine");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with(prefix)))
}

/// Copies a directory tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("{}: {e}", to.display()));
    for e in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{}: {e}", from.display())) {
        let e = e.unwrap_or_else(|e| panic!("{}: {e}", from.display()));
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target)
                .unwrap_or_else(|err| panic!("{}: {err}", e.path().display()));
        }
    }
}

/// Runs the `deckhand` or `deckhand-agent` binary with `args` (and `env`) and returns its output.
pub fn run(name: &str, args: &[&str], env: &[(&str, String)]) -> std::process::Output {
    let path = bin(name);
    std::process::Command::new(&path)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()))
}

/// The real `deckhand` CLI, pointed at a local S3 server through the standard AWS environment.
pub fn deckhand(
    s3: &deckhand_tools::shop::locals3::LocalS3,
    args: &[&str],
) -> std::process::Command {
    let mut cmd = std::process::Command::new(bin("deckhand"));
    cmd.args(args).envs(s3.env());
    cmd
}

/// Runs the `deckhand` CLI against a local S3 server and returns its output.
pub fn deckhand_out(
    s3: &deckhand_tools::shop::locals3::LocalS3,
    args: &[&str],
) -> std::process::Output {
    deckhand(s3, args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run deckhand: {e}"))
}

/// `deckhand publish` of `files` (with `metadata` in place of theirs) to `deployment` at `origin`,
/// signed with the key at `key`, answering in JSON: the five files every release has. Callers append
/// further flags (`--embeddings`, `--canary`, ...).
pub fn publish_args(
    origin: &str,
    deployment: &str,
    key: &Path,
    files: &deckhand_agent::release::ReleaseFiles,
    metadata: &Path,
) -> Vec<String> {
    let p = |p: &Path| p.display().to_string();
    let mut args: Vec<String> = vec![
        "publish".into(),
        "--origin".into(),
        origin.into(),
        "--deployment".into(),
        deployment.into(),
        "--key".into(),
        p(key),
    ];
    for (flag, path) in [
        ("--hef", &files.hef),
        ("--onnx", &files.onnx),
        ("--index", &files.index),
        ("--labels", &files.labels),
    ] {
        args.push(flag.into());
        args.push(p(path));
    }
    args.extend(["--metadata".into(), p(metadata), "--json".into()]);
    args
}

/// The value of an agent's `/metrics` line `name` (labels included), 0 when absent.
pub async fn metric(agent: &Agent, name: &str) -> u64 {
    let (code, body) =
        deckhand_agent::http::request(agent.http(), "GET", "/metrics", bytes::Bytes::new())
            .await
            .unwrap_or_else(|e| panic!("{}: /metrics: {e}", agent.name));
    assert_eq!(code, 200, "{}: /metrics", agent.name);
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// `deckhand-agent store verify` on a stopped agent's data directory: it succeeds and reports no
/// corrupt blob. Returns its standard output.
pub fn verify_store(dir: &Path) -> String {
    let d = dir.display().to_string();
    let out = run(
        "deckhand-agent",
        &["store", "verify", "--data-dir", &d],
        &[],
    );
    let text = stdout(&out);
    assert!(
        out.status.success() && !text.contains("CORRUPT"),
        "store verify {d}: exit {:?}\nstdout: {text}\nstderr: {}",
        out.status.code(),
        stderr(&out)
    );
    text
}

pub fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A command that succeeded, its standard output as JSON; panics with its output otherwise.
pub fn ok(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        stdout(out),
        stderr(out)
    );
    json(out)
}

/// A command's standard output as JSON (it was run with `--json`); panics with its stderr otherwise.
pub fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}); exit {:?}\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
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

/// Enrolls `name` in the shop's fleet CA and loads its credentials, for an in-process participant (a
/// peer that lies on purpose, a probe).
pub fn credentials(fleet: &Fleet, name: &str) -> deckhand_agent::peer::tls::FleetCredentials {
    let (cert, key) = fleet
        .ca()
        .enroll(name, 30, &fleet.join("certs"))
        .unwrap_or_else(|e| panic!("fleet enroll {name}: {e}"));
    deckhand_agent::peer::tls::FleetCredentials::load(&deckhand_agent::peer::tls::CredentialPaths {
        ca: fleet.ca().cert_path(),
        cert,
        key,
        crl: None,
    })
    .unwrap_or_else(|e| panic!("credentials of {name}: {e}"))
}

/// Publishes `files` as the next version into `dir`, a `file://` origin in the bundle layout (a USB stick
/// the operator wrote), signed with the shop's key.
pub async fn publish_to_dir(
    fleet: &Fleet,
    files: &deckhand_agent::release::ReleaseFiles,
    dir: &Path,
) -> deckhand_tools::publish::Prepared {
    fleet
        .publish_to_dir(files, dir)
        .await
        .unwrap_or_else(|e| panic!("publishing into {}: {e}", dir.display()))
}

/// A process's peak resident set (VmHWM in /proc/PID/status), in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status"))
}

/// How many threads of process `pid` have a name that starts with `prefix`.
pub fn threads_named(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/task: {e}"))
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
        })
        .count()
}

/// libfaketime, which the clock test runs the agent under (Debian's `libfaketime`; .ci/run installs it).
pub const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// The environment that runs a process with its system clock at what the file `clock` says, read again
/// each second (libfaketime's FAKETIME_TIMESTAMP_FILE: `+30d`, `@1970-01-02 00:00:00`): a test moves
/// the clock of running processes by rewriting the file ([`set_clock`]). Monotonic time is left alone.
pub fn clock_from(clock: &Path) -> Vec<(&'static str, String)> {
    faketime(&[
        ("FAKETIME_TIMESTAMP_FILE", clock.display().to_string()),
        ("FAKETIME_CACHE_DURATION", "1".into()),
    ])
}

/// libfaketime preloaded, with `settings`; monotonic time left alone.
fn faketime(settings: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    assert!(
        Path::new(FAKETIME).exists(),
        "{FAKETIME} is missing: apt-get install libfaketime"
    );
    let mut env = vec![
        ("LD_PRELOAD", FAKETIME.into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
    ];
    env.extend_from_slice(settings);
    env
}

/// Writes `faketime` to the clock file `clock` (atomically: a process never reads half of it).
pub fn set_clock(clock: &Path, faketime: &str) {
    let tmp = clock.with_extension("tmp");
    std::fs::write(&tmp, format!("{faketime}\n"))
        .and_then(|()| std::fs::rename(&tmp, clock))
        .unwrap_or_else(|e| panic!("{}: {e}", clock.display()));
}

/// The environment that runs the agent with its system clock at `at` (libfaketime's FAKETIME:
/// `@1970-01-02 00:00:00`, `-10d`, `+3d`); monotonic time is left alone.
pub fn clock_at(at: &str) -> Vec<(&'static str, String)> {
    faketime(&[("FAKETIME", at.into())])
}

/// How many malloc arenas process `pid` has besides glibc's main one (the `[heap]`): each is an
/// anonymous mapping of 64 MiB (glibc's `HEAP_MAX_SIZE` on 64-bit systems) aligned to its size, its
/// used part read-write and the rest reserved (`---p`), as `/proc/<pid>/maps` lists them.
pub fn malloc_arenas_besides_main(pid: u32) -> usize {
    const HEAP: u64 = 64 << 20;
    let path = format!("/proc/{pid}/maps");
    let maps = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // (start, end, permissions) of the anonymous mappings, in address order.
    let anon: Vec<(u64, u64, &str)> = maps
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (range, perms) = (f.first()?, f.get(1)?);
            if f.len() > 5 {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            let a = u64::from_str_radix(a, 16).ok()?;
            let b = u64::from_str_radix(b, 16).ok()?;
            Some((a, b, *perms))
        })
        .collect();
    anon.iter()
        .enumerate()
        .filter(|(i, (start, end, perms))| {
            if start % HEAP != 0 || !perms.starts_with("rw") {
                return false;
            }
            // The rest of the 64 MiB follows at once: reserved, or the used part reaching its end.
            let mut reached = *end;
            for (a, b, p) in &anon[i + 1..] {
                if reached >= start + HEAP || *a != reached || !p.starts_with("---") {
                    break;
                }
                reached = *b;
            }
            reached == start + HEAP
        })
        .count()
}
