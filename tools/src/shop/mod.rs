//! A shop on one machine, for the demo, the benchmarks and the integration tests: a local S3 server
//! (`locals3`), a signing key, a fleet CA, and real `deckhand-agent` processes, each with its own store,
//! HTTP port, QUIC port on 127.0.0.1 and log file. Everything is deterministic data (`fixtures`).
//!
//! ```no_run
//! # async fn f() -> Result<(), deckhand_tools::ToolError> {
//! use deckhand_tools::shop::{Fleet, MIB};
//! let fleet = Fleet::new().agents(5).release(64 * MIB).start().await?;
//! fleet.wait_all(std::time::Duration::from_secs(120), "version 1", |s| s.active_version() == Some(1)).await?;
//! # Ok(()) }
//! ```

pub mod demo;
pub mod fixtures;
pub mod locals3;
pub mod mqtt;
pub mod netns;
pub mod onnx;
pub mod scenes;

use crate::ToolError;
use crate::fleet_ca::CaDir;
use crate::origin::Bucket;
use crate::publish::{self, PublishOptions};
use deckhand_agent::release::ReleaseFiles;
use deckhand_protocol::SecretKey;
use deckhand_protocol::layout::Name;
use deckhand_protocol::status::Status;
use fixtures::ReferenceSpec;
use locals3::LocalS3;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt as _;

/// The deployment every shop follows.
pub const DEPLOYMENT: &str = "shop-1";
pub const MIB: u64 = 1024 * 1024;
/// How long an agent may take to start listening.
const START_LIMIT: Duration = Duration::from_secs(60);
/// How long an agent may take to stop after SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// Where the `deckhand-agent` binary is: `DECKHAND_AGENT_BIN`, else beside the running executable (or one
/// directory up, for test binaries in `target/<profile>/deps`).
pub fn agent_bin() -> Result<PathBuf, ToolError> {
    if let Some(p) = std::env::var_os("DECKHAND_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(ToolError::io("find", Path::new("current_exe")))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        let p = d.join("deckhand-agent");
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(ToolError::AgentBinary { beside: exe })
}

/// Builds a [`Fleet`]: `Fleet::new().agents(5).release(64 * MIB).start()`.
pub struct FleetBuilder {
    name: String,
    dir: Option<PathBuf>,
    agents: usize,
    release: Option<u64>,
    cold: bool,
    s3_down: bool,
    quic: bool,
    uplink: Option<u64>,
    poll_secs: u64,
    extra: Vec<String>,
    key: Option<SecretKey>,
    bin: Option<PathBuf>,
}

/// A shop: S3, a key, a fleet CA, agent processes, one directory.
pub struct Fleet {
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    s3: LocalS3,
    origin: Arc<dyn Bucket>,
    key: SecretKey,
    trust: PathBuf,
    ca: CaDir,
    bin: PathBuf,
    poll_secs: u64,
    extra: Vec<String>,
    quic: bool,
    release: Option<ReleaseFiles>,
    published: Option<publish::Prepared>,
    pub agents: Vec<Agent>,
}

/// How one agent starts.
#[derive(Clone, Debug, Default)]
pub struct AgentOptions {
    pub name: String,
    /// Give it the S3 origin (`--origin`).
    pub origin: bool,
    /// QUIC addresses to dial (`--peer`).
    pub peers: Vec<String>,
    /// Fleet credentials: a new certificate (`Enroll`), the one issued before (`Existing`), none.
    pub credentials: Credentials,
    /// More flags.
    pub extra: Vec<String>,
    /// A network namespace to run in (`ip netns exec`).
    pub netns: Option<String>,
    /// Listen on every address and find peers by mDNS (with fleet credentials), instead of 127.0.0.1
    /// and the given peers only.
    pub mdns: bool,
    /// Environment over the S3 server's (`AWS_SECRET_ACCESS_KEY`, say).
    pub env: Vec<(&'static str, String)>,
    /// Install the agent with this trust root (`--trust-root`) instead of the shop's key (`--trust`).
    pub trust_root: Option<PathBuf>,
    /// Run it with at most this many open files, soft and hard (`prlimit`), as a shell's default
    /// (1,024) would.
    pub open_files: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Credentials {
    #[default]
    Enroll,
    Existing,
    None,
}

impl Fleet {
    #[allow(clippy::new_ret_no_self)]
    pub fn new() -> FleetBuilder {
        FleetBuilder {
            name: "shop".into(),
            dir: None,
            agents: 0,
            release: None,
            cold: false,
            s3_down: false,
            quic: true,
            uplink: None,
            poll_secs: 1,
            extra: Vec::new(),
            key: None,
            bin: None,
        }
    }
}

impl FleetBuilder {
    /// Names the shop's temporary directory (`deckhand-NAME-...`).
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }

    /// Works in `dir` (kept) instead of a temporary directory.
    pub fn dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_owned());
        self
    }

    /// Starts `n` agents, `pi-0` to `pi-{n-1}`; each dials those started before it.
    pub fn agents(mut self, n: usize) -> Self {
        self.agents = n;
        self
    }

    /// Publishes a release of about `bytes` (a reference release padded with a larger HEF) once the
    /// agents have met. S3's counters count from its publication.
    pub fn release(mut self, bytes: u64) -> Self {
        self.release = Some(bytes);
        self
    }

    /// Publishes the release before any agent starts (a morning when the shop opens).
    pub fn cold(mut self) -> Self {
        self.cold = true;
        self
    }

    /// S3 refuses every connection once the release is published.
    pub fn s3_down(mut self) -> Self {
        self.s3_down = true;
        self
    }

    /// Agents without fleet credentials: no QUIC, origin only.
    pub fn without_peers(mut self) -> Self {
        self.quic = false;
        self
    }

    /// S3 sends at most `bytes_per_sec`, shared by all its connections.
    pub fn uplink(mut self, bytes_per_sec: u64) -> Self {
        self.uplink = Some(bytes_per_sec);
        self
    }

    pub fn poll_secs(mut self, secs: u64) -> Self {
        self.poll_secs = secs;
        self
    }

    /// Flags every agent gets.
    pub fn agent_args(mut self, args: &[&str]) -> Self {
        self.extra = args.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// The operator's signing key (default: a fixed test key).
    pub fn key(mut self, key: SecretKey) -> Self {
        self.key = Some(key);
        self
    }

    /// The agent binary (default: [`agent_bin`]).
    pub fn agent_binary(mut self, bin: PathBuf) -> Self {
        self.bin = Some(bin);
        self
    }

    pub async fn start(self) -> Result<Fleet, ToolError> {
        let (dir, tmp) = match &self.dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(ToolError::io("create", d))?;
                (d.clone(), None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix(&format!("deckhand-{}-", self.name))
                    .tempdir()
                    .map_err(ToolError::io(
                        "create a directory in",
                        &std::env::temp_dir(),
                    ))?;
                let keep = std::env::var_os("DECKHAND_KEEP_TEST_DIRS").is_some();
                if keep {
                    eprintln!("keeping {}", t.path().display());
                    (t.keep(), None)
                } else {
                    (t.path().to_owned(), Some(t))
                }
            }
        };
        let bin = match self.bin {
            Some(b) => b,
            None => agent_bin()?,
        };
        let s3_dir = dir.join("s3");
        let s3 = LocalS3::start(&s3_dir, "cards").map_err(ToolError::io("start S3 in", &s3_dir))?;
        let origin = crate::origin::connect(&s3.origin_url("fleet"), &s3.origin_config()).await?;
        let key = self.key.unwrap_or_else(|| SecretKey::from_seed(&[21; 32]));
        let trust = dir.join("ops.pub");
        std::fs::write(&trust, key.public().to_file_text())
            .map_err(ToolError::io("write", &trust))?;
        let ca = CaDir::new(dir.join("fleet-ca"));
        ca.init("shop")?;
        // What every Pi is installed with: a copy of the CA certificate (a rotation replaces the
        // operator's; a Pi moves over through the fleet bundle).
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs).map_err(ToolError::io("create", &certs))?;
        std::fs::copy(ca.cert_path(), certs.join("ca.crt"))
            .map_err(ToolError::io("copy the CA certificate", &certs))?;
        let mut fleet = Fleet {
            dir,
            _tmp: tmp,
            s3,
            origin,
            key,
            trust,
            ca,
            bin,
            poll_secs: self.poll_secs,
            extra: self.extra,
            quic: self.quic,
            release: None,
            published: None,
            agents: Vec::new(),
        };
        if let Some(bytes) = self.release {
            let rdir = fleet.dir.join("release-1");
            let files = tokio::task::spawn_blocking(move || {
                fixtures::write_sized_release(&rdir, &ReferenceSpec::small(40), bytes, 1)
            })
            .await
            .map_err(ToolError::Task)??;
            fleet.release = Some(files);
        }
        if self.cold {
            fleet.publish_release().await?;
        }
        for i in 0..self.agents {
            fleet.start_agent(&format!("pi-{i}")).await?;
        }
        if fleet.quic && self.agents > 1 {
            fleet
                // Connected too: a download counts a peer among the agents sharing the origin fetches
                // only while the pair's connection is up. (When each side dialed a connection of its
                // own, a peer was live over the one it opened before the dial back connected; a release
                // published then was shared out among fewer agents, and the five-agent test saw a piece
                // cross the uplink twice, one run in about fifteen.)
                .wait_all(
                    Duration::from_secs(30),
                    "every other agent live and connected",
                    |s| {
                        s.live_peers() + 1 == self.agents
                            && s.peers.iter().filter(|p| p.connected).count() + 1 == self.agents
                    },
                )
                .await?;
        }
        if let Some(uplink) = self.uplink {
            fleet.s3.stats().set_uplink(uplink);
        }
        if !self.cold {
            fleet.publish_release().await?;
        }
        if self.s3_down {
            fleet.s3.set_down(true);
        }
        Ok(fleet)
    }
}

impl Fleet {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.dir.join(p)
    }

    pub fn s3(&self) -> &LocalS3 {
        &self.s3
    }

    /// The deployment's origin, to write to as the operator does.
    pub fn origin(&self) -> &dyn Bucket {
        &*self.origin
    }

    /// A shared handle on the origin, for tasks of their own.
    pub fn origin_handle(&self) -> Arc<dyn Bucket> {
        self.origin.clone()
    }

    pub fn key(&self) -> &SecretKey {
        &self.key
    }

    /// The operator's public key file (`--trust`).
    pub fn trust(&self) -> &Path {
        &self.trust
    }

    pub fn ca(&self) -> &CaDir {
        &self.ca
    }

    /// The release the builder generated, if any.
    pub fn release_files(&self) -> Option<&ReleaseFiles> {
        self.release.as_ref()
    }

    pub fn agent(&self, i: usize) -> &Agent {
        &self.agents[i]
    }

    /// What publishing the generated release made (its manifest, envelope and id).
    pub fn release_published(&self) -> Option<&publish::Prepared> {
        self.published.as_ref()
    }

    /// The generated release, published as the next version (nothing when there is none). S3's counters
    /// are reset first, so they count from its publication.
    async fn publish_release(&mut self) -> Result<(), ToolError> {
        if let Some(files) = &self.release {
            self.s3.stats().reset();
            self.published = Some(self.publish(files).await?);
        }
        Ok(())
    }

    /// Publishes `files` as the next version of [`DEPLOYMENT`], valid for a day.
    pub async fn publish(&self, files: &ReleaseFiles) -> Result<publish::Prepared, ToolError> {
        self.publish_signed(files, &self.key).await
    }

    /// Publishes `files` as the next version, signed with `key` (another operator's, or a rotated one).
    pub async fn publish_signed(
        &self,
        files: &ReleaseFiles,
        key: &SecretKey,
    ) -> Result<publish::Prepared, ToolError> {
        self.publish_with(files, key, |_| {}).await
    }

    /// Publishes `files` as the next version, signed with `key`, with the options `tweak` sets (urgent,
    /// activate, not_before...).
    pub async fn publish_with(
        &self,
        files: &ReleaseFiles,
        key: &SecretKey,
        tweak: impl FnOnce(&mut PublishOptions),
    ) -> Result<publish::Prepared, ToolError> {
        let deployment = Name::deployment(DEPLOYMENT)?;
        let mut opts =
            PublishOptions::local(deployment, files, jiff::SignedDuration::from_hours(24));
        tweak(&mut opts);
        let work = self.dir.join("work");
        std::fs::create_dir_all(&work).map_err(ToolError::io("create", &work))?;
        let (prepared, _) =
            publish::publish(&*self.origin, &self.s3.origin_config(), key, &opts, &work).await?;
        Ok(prepared)
    }

    /// Publishes `files` as the next version into `dir`, a `file://` origin in the bundle layout (a USB
    /// stick the operator wrote), signed with the shop's key.
    pub async fn publish_to_dir(
        &self,
        files: &ReleaseFiles,
        dir: &Path,
    ) -> Result<publish::Prepared, ToolError> {
        std::fs::create_dir_all(dir).map_err(ToolError::io("create", dir))?;
        let cfg = crate::origin::OriginConfig::default();
        let origin = crate::origin::connect(
            &crate::origin::OriginUrl::File {
                root: dir.to_owned(),
            },
            &cfg,
        )
        .await?;
        let opts = PublishOptions::local(
            Name::deployment(DEPLOYMENT)?,
            files,
            jiff::SignedDuration::from_hours(24),
        );
        let work = self.dir.join("work");
        std::fs::create_dir_all(&work).map_err(ToolError::io("create", &work))?;
        Ok(publish::publish(&*origin, &cfg, &self.key, &opts, &work)
            .await?
            .0)
    }

    /// Starts agent `name` with the S3 origin, a new certificate, dialling every agent started before.
    pub async fn start_agent(&mut self, name: &str) -> Result<&Agent, ToolError> {
        self.start_agent_args(name, Vec::new()).await
    }

    /// [`Fleet::start_agent`] with more flags.
    pub async fn start_agent_args(
        &mut self,
        name: &str,
        extra: Vec<String>,
    ) -> Result<&Agent, ToolError> {
        let opts = AgentOptions {
            extra,
            name: name.to_owned(),
            origin: true,
            peers: self.quic_addrs(),
            credentials: if self.quic {
                Credentials::Enroll
            } else {
                Credentials::None
            },
            ..AgentOptions::default()
        };
        self.start_agent_with(opts).await
    }

    /// The QUIC addresses of the running agents.
    pub fn quic_addrs(&self) -> Vec<String> {
        self.agents
            .iter()
            .filter_map(|a| a.quic().map(str::to_owned))
            .collect()
    }

    /// The `deckhand-agent run` flags for an agent (its data directory is `DIR/NAME`).
    pub fn run_args(&self, opts: &AgentOptions) -> Result<Vec<String>, ToolError> {
        let mut args: Vec<String> = vec![
            "--data-dir".into(),
            self.dir.join(&opts.name).display().to_string(),
            "--deployment".into(),
            DEPLOYMENT.into(),
            "--backend".into(),
            "cpu".into(),
            "--poll-secs".into(),
            self.poll_secs.to_string(),
            "--http-listen".into(),
            "127.0.0.1:0".into(),
        ];
        match &opts.trust_root {
            Some(root) => args.extend(["--trust-root".into(), root.display().to_string()]),
            None => args.extend(["--trust".into(), self.trust.display().to_string()]),
        }
        if opts.origin {
            args.extend(["--origin".into(), self.s3.origin_arg("fleet")]);
        }
        for p in &opts.peers {
            args.extend(["--peer".into(), p.clone()]);
        }
        if opts.credentials == Credentials::Enroll {
            self.ca.enroll(
                &opts.name,
                crate::fleet_ca::ENROLL_DAYS,
                &self.dir.join("certs"),
            )?;
        }
        if opts.credentials != Credentials::None {
            args.extend(self.credential_args(&opts.name));
            let (listen, mdns) = if opts.mdns {
                ("0.0.0.0:0", "on")
            } else {
                ("127.0.0.1:0", "off")
            };
            args.extend(["--quic-listen", listen, "--mdns", mdns].map(String::from));
        }
        args.extend(self.extra.iter().cloned());
        args.extend(opts.extra.iter().cloned());
        Ok(args)
    }

    /// The fleet credential flags of an enrolled agent (the CA as installed, certificate, key).
    pub fn credential_args(&self, name: &str) -> Vec<String> {
        let certs = self.dir.join("certs");
        vec![
            "--fleet-ca".into(),
            certs.join("ca.crt").display().to_string(),
            "--fleet-cert".into(),
            certs.join(format!("{name}.crt")).display().to_string(),
            "--fleet-key".into(),
            certs.join(format!("{name}.key")).display().to_string(),
        ]
    }

    /// Starts an agent as `opts` says and adds it to [`Fleet::agents`].
    pub async fn start_agent_with(&mut self, opts: AgentOptions) -> Result<&Agent, ToolError> {
        let args = self.run_args(&opts)?;
        let log = self.dir.join("logs").join(format!("{}.log", opts.name));
        let mut env = self.s3.env();
        env.extend(opts.env.iter().cloned());
        let mut wrapper: Vec<String> = Vec::new();
        if let Some(ns) = &opts.netns {
            wrapper.extend(["ip".into(), "netns".into(), "exec".into(), ns.clone()]);
        }
        if let Some(n) = opts.open_files {
            wrapper.extend(["prlimit".into(), format!("--nofile={n}:{n}"), "--".into()]);
        }
        let agent = Agent::spawn(&self.bin, &opts.name, &args, &env, &wrapper, &log).await?;
        self.agents.push(agent);
        let i = self.agents.len() - 1;
        Ok(&self.agents[i])
    }

    /// Waits until `pred` holds of every agent's status.
    pub async fn wait_all(
        &self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&Status) -> bool,
    ) -> Result<Vec<Status>, ToolError> {
        let mut out = Vec::new();
        for a in &self.agents {
            out.push(a.wait_for(limit, what, &pred).await?);
        }
        Ok(out)
    }

    /// Stops every agent (SIGTERM) and checks each exited cleanly.
    pub async fn stop(mut self) -> Result<(), ToolError> {
        for a in self.agents.drain(..) {
            a.stop().await?;
        }
        Ok(())
    }
}

/// A running `deckhand-agent run` process. Killed when dropped; [`Agent::stop`] stops it gracefully.
pub struct Agent {
    pub name: String,
    child: tokio::process::Child,
    http: String,
    quic: Option<String>,
    netns: Option<String>,
    bin: PathBuf,
    log: PathBuf,
    /// Drains the agent's stdout so it never blocks on a full pipe; ends with the process.
    drain: tokio::task::JoinHandle<()>,
}

impl Agent {
    /// Starts `WRAPPER... BIN run ARGS` (a wrapper such as `ip netns exec NS` execs the agent), its
    /// log going to `log`, and waits for it to print where it listens.
    pub async fn spawn(
        bin: &Path,
        name: &str,
        args: &[String],
        env: &[(&str, String)],
        wrapper: &[String],
        log: &Path,
    ) -> Result<Agent, ToolError> {
        // A wrapper (`ip netns exec NS`, `prlimit ... --`) execs the agent: its pid is the agent's.
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = tokio::process::Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => tokio::process::Command::new(bin),
        };
        if let Some(d) = log.parent() {
            std::fs::create_dir_all(d).map_err(ToolError::io("create", d))?;
        }
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(ToolError::io("open", log))?;
        cmd.arg("run")
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(log_file)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(ToolError::io("start", bin))?;
        let stdout = child.stdout.take().ok_or_else(|| ToolError::AgentStart {
            name: name.to_owned(),
            why: "no stdout".into(),
            log: log.to_owned(),
        })?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let started = async {
            let mut quic = None;
            loop {
                match lines.next_line().await {
                    Ok(Some(line)) => {
                        let line = line.trim();
                        if let Some(q) = line.strip_prefix("quic listening on ") {
                            quic = Some(q.to_owned());
                        } else if let Some(a) = line.strip_prefix("listening on http://") {
                            return Ok((a.to_owned(), quic));
                        }
                    }
                    Ok(None) => return Err("it exited before listening".to_owned()),
                    Err(e) => return Err(format!("reading its output: {e}")),
                }
            }
        };
        let (http, quic) = match tokio::time::timeout(START_LIMIT, started).await {
            Ok(Ok(v)) => v,
            Ok(Err(why)) => {
                return Err(ToolError::AgentStart {
                    name: name.to_owned(),
                    why,
                    log: log.to_owned(),
                });
            }
            Err(_) => {
                return Err(ToolError::AgentStart {
                    name: name.to_owned(),
                    why: format!("not listening after {} s", START_LIMIT.as_secs()),
                    log: log.to_owned(),
                });
            }
        };
        let drain = tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Agent {
            name: name.to_owned(),
            child,
            http,
            quic,
            netns: match wrapper {
                [ip, netns, exec, ns, ..] if [ip, netns, exec] == ["ip", "netns", "exec"] => {
                    Some(ns.clone())
                }
                _ => None,
            },
            bin: bin.to_owned(),
            log: log.to_owned(),
            drain,
        })
    }

    /// Where its HTTP API listens (`host:port`).
    pub fn http(&self) -> &str {
        &self.http
    }

    /// Where its QUIC endpoint listens (with fleet credentials).
    pub fn quic(&self) -> Option<&str> {
        self.quic.as_deref()
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    fn failed(&self, e: impl std::fmt::Display) -> ToolError {
        ToolError::AgentApi {
            name: self.name.clone(),
            why: e.to_string(),
        }
    }

    /// Its status. Inside a network namespace, through `deckhand-agent status` run there.
    pub async fn status(&self) -> Result<Status, ToolError> {
        let Some(ns) = &self.netns else {
            return deckhand_agent::http::get_status(&self.http)
                .await
                .map_err(|e| self.failed(e));
        };
        let out = tokio::time::timeout(
            Duration::from_secs(15),
            tokio::process::Command::new("ip")
                .args(["netns", "exec", ns])
                .arg(&self.bin)
                .args(["status", "--json", "--http", &self.http])
                .output(),
        )
        .await
        .map_err(|_| self.failed("deckhand-agent status timed out"))?
        .map_err(|e| self.failed(format!("deckhand-agent status in {ns}: {e}")))?;
        if !out.status.success() {
            return Err(self.failed(format!(
                "deckhand-agent status in {ns}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| self.failed(e))
    }

    /// One request to its HTTP API: the status code and the JSON answer.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(u16, serde_json::Value), ToolError> {
        deckhand_agent::http::request_json(
            &self.http,
            method,
            path,
            bytes::Bytes::copy_from_slice(body),
        )
        .await
        .map_err(|e| self.failed(e))
    }

    /// Asks it to recognise an image.
    pub async fn recognize(&self, image: &[u8]) -> Result<(u16, serde_json::Value), ToolError> {
        self.request("POST", "/v1/recognize", image).await
    }

    /// Polls its status every 100 ms until `pred` holds, for at most `limit`.
    pub async fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&Status) -> bool,
    ) -> Result<Status, ToolError> {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.status().await?;
            if pred(&s) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(ToolError::Timeout {
                    name: self.name.clone(),
                    what: what.to_owned(),
                    secs: limit.as_secs(),
                    status: Box::new(s),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then waits (at most 10 s) and checks it exited cleanly.
    pub async fn stop(self) -> Result<(), ToolError> {
        self.stop_within(STOP_LIMIT).await
    }

    /// SIGTERM, then waits at most `limit` and checks it exited cleanly.
    pub async fn stop_within(mut self, limit: Duration) -> Result<(), ToolError> {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on the pid of our own child, which has not been waited for yet.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .map_err(|_| {
                self.failed(format!(
                    "still running {} ms after SIGTERM",
                    limit.as_millis()
                ))
            })?
            .map_err(|e| self.failed(e))?;
        self.drain.abort();
        if status.success() {
            Ok(())
        } else {
            Err(self.failed(format!("exited with {status}; log {}", self.log.display())))
        }
    }

    /// SIGKILL: no chance to clean up.
    pub async fn kill(mut self) -> Result<(), ToolError> {
        self.child.kill().await.map_err(|e| self.failed(e))?;
        self.drain.abort();
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.drain.abort();
        // kill_on_drop reaps nothing: make sure it is gone now.
        let _ = self.child.start_kill();
    }
}
