//! `deckhand-agent run` settings, each declared once, on [`Settings`]: its flag, its key in the TOML file
//! (`--config`, default `/etc/deckhand/agent.toml`), its help, its default and its validation.
//!
//! The config file is read as flags of lower precedence: every key becomes its flag (`quic_listen =
//! "0.0.0.0:8641"` is `--quic-listen 0.0.0.0:8641`, `peers = ["a:1", "b:2"]` is `--peer a:1 --peer b:2`)
//! and goes through the same parser, so the file and the command line accept exactly the same values. A
//! setting given on the command line (or in its environment variable) wins over the file. An unknown
//! key, a wrong type or an invalid value is an error that names the setting and the file.
//!
//! A new setting is one field here, with its `#[arg]`, and the line of code that uses it.

use crate::origin::{OriginConfig, OriginUrl};
use crate::peer::tls::CredentialPaths;
use crate::recognizer::BackendChoice;
use clap::{Args, FromArgMatches as _};
use deckhand_protocol::PublicKey;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_CONFIG: &str = "/etc/deckhand/agent.toml";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/deckhand";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Toml {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("config file {path}: unknown setting {key:?}")]
    UnknownKey { path: PathBuf, key: String },
    #[error("config file {path}: {key}: {why}")]
    Value {
        path: PathBuf,
        key: String,
        why: &'static str,
    },
    #[error("config file {path}: {}", .source.to_string().trim())]
    FileSetting {
        path: PathBuf,
        #[source]
        source: clap::Error,
    },
    #[error("{}", .0.to_string().trim())]
    Flag(#[from] clap::Error),
    #[error("--{flag} is required (or {key} in the config file)", flag = .0.replace('_', "-"), key = .0)]
    Missing(&'static str),
    #[error("--fleet-ca, --fleet-cert and --fleet-key come together; missing {0}")]
    FleetIncomplete(String),
    #[error("--fleet-crl is given without the fleet credentials")]
    CrlWithoutFleet,
    #[error(
        "--trust and --trust-root are given together: give the keys, or the trust root that lists them"
    )]
    TrustTwice,
    #[error("--trust {path}: {why}")]
    Trust { path: PathBuf, why: String },
    #[error("--threshold {threshold} is not between 1 and the {keys} trusted key(s)")]
    Threshold { threshold: usize, keys: usize },
    #[error(
        "--webhook is given without --webhook-secret (webhook_secret): webhook bodies are signed"
    )]
    WebhookUnsigned,
    #[error("uplink budget: {0}")]
    Budget(#[from] deckhand_protocol::budget::BudgetError),
}

/// Every setting of `deckhand-agent run`. The field's id is the TOML key, its `long` the flag.
#[derive(Args, Clone, Debug)]
pub struct Settings {
    /// A TOML config file [default: /etc/deckhand/agent.toml, if present].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The agent's data directory.
    #[arg(long, env = "DECKHAND_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// The deployment this agent follows.
    #[arg(long, value_parser = deployment)]
    pub deployment: Option<String>,
    /// A trusted release-signing public key (NAME.pub); repeatable.
    #[arg(long)]
    pub trust: Vec<PathBuf>,
    /// The deployment's signed trust root this agent is installed with (`deckhand keys root`), instead
    /// of --trust: the agent follows newer roots published in the bucket (`deckhand keys rotate`).
    #[arg(long)]
    pub trust_root: Option<PathBuf>,
    /// How many distinct trusted keys must sign a manifest.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub threshold: u16,
    /// Whether the system clock is synchronised, so that a manifest created over an hour ahead of it is
    /// refused (a leaked key fast-forwarding the fleet): auto (the kernel's NTP status, which
    /// systemd-timesyncd, chrony and ntpd set), yes, or no (the clock never judges a manifest).
    #[arg(long, default_value = "auto")]
    pub clock_synchronised: crate::systemd::ClockSync,
    /// auto (Hailo if built with it and a device answers, else CPU), cpu (XNNPACK where libxnnpack0
    /// is installed and runs the model, else tract), tract (the CPU on tract alone) or hailo.
    #[arg(long, default_value = "auto")]
    pub backend: BackendChoice,
    /// Cores the CPU backend runs one image on (a thread pool used by the inference thread only;
    /// shadow evaluation and the camera's finder stay on one): 0 for every core the agent may use, 1
    /// for none beside the inference thread.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=256))]
    pub cpu_threads: u16,
    /// Where the HTTP API listens.
    #[arg(long, default_value = "127.0.0.1:8640")]
    pub http_listen: SocketAddr,
    /// A bearer token the HTTP API asks for on everything but the shop page itself (`GET /`), at
    /// least 16 characters; the page asks its user for it once. Prefer this file or
    /// DECKHAND_HTTP_TOKEN to the command line, where `ps` shows it [default: none].
    #[arg(long, env = "DECKHAND_HTTP_TOKEN", hide_env_values = true, value_parser = token)]
    pub http_token: Option<String>,
    /// HTTP connections held at once; beyond it the quietest connection is closed for a newcomer, and
    /// a newcomer is refused only when every connection is at work.
    #[arg(long, default_value = "512", value_parser = clap::value_parser!(u32).range(8..=65_536))]
    pub http_max_connections: u32,
    /// HTTP connections held at once from one address, with the same rule.
    #[arg(long, default_value = "64", value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub http_max_per_address: u32,
    /// Where QUIC listens for fleet peers.
    #[arg(long, default_value = "0.0.0.0:8641")]
    pub quic_listen: SocketAddr,
    /// A peer to dial (host:port); repeatable. mDNS finds the others.
    #[arg(long = "peer", value_parser = host_port)]
    pub peers: Vec<String>,
    /// LAN discovery with mDNS: on or off.
    #[arg(long, default_value = "on", value_parser = on_off, action = clap::ArgAction::Set)]
    pub mdns: bool,
    /// A directory to watch for images; answers go to --outbox.
    #[arg(long)]
    pub inbox: Option<PathBuf>,
    /// Where inbox answers go (default: "outbox" beside the inbox).
    #[arg(long)]
    pub outbox: Option<PathBuf>,
    /// A directory watched for release bundles (`deckhand bundle export`, e.g. a USB stick).
    #[arg(long, value_parser = existing_dir)]
    pub bundle_dir: Option<PathBuf>,
    /// The most the store may hold: bytes, or a size such as 2G, 500MiB or 1.5GB [default: no limit].
    #[arg(long, value_parser = size)]
    pub store_budget: Option<u64>,
    /// Where releases are published: s3://bucket/prefix or file:///dir. Without it the agent syncs from
    /// peers and bundles only.
    #[arg(long)]
    pub origin: Option<OriginUrl>,
    /// An S3-compatible endpoint (path-style addressing is used with it).
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub endpoint_url: Option<String>,
    /// Seconds one S3 request may take until its answer begins before it is tried again (at most 4
    /// attempts, with backoff).
    #[arg(long = "origin-attempt-secs", id = "origin_attempt_secs", default_value = "60", value_parser = secs(1, 3_600))]
    pub origin_attempt: Duration,
    /// Seconds in which an S3 download must deliver 64 KiB (or the rest of it): a slower one, a source
    /// that drips, is abandoned and fetched again.
    #[arg(long = "origin-stall-secs", id = "origin_stall_secs", default_value = "20", value_parser = secs(1, 3_600))]
    pub origin_stall: Duration,
    /// Seconds between polls of the deployment's current.json.
    #[arg(long = "poll-secs", id = "poll_secs", default_value = "30", value_parser = secs(1, 86_400))]
    pub poll: Duration,
    /// The fleet CA certificate (`deckhand fleet init`).
    #[arg(long)]
    pub fleet_ca: Option<PathBuf>,
    /// This agent's fleet certificate (`deckhand fleet enroll`); its name is the agent id.
    #[arg(long)]
    pub fleet_cert: Option<PathBuf>,
    /// This agent's fleet private key.
    #[arg(long)]
    pub fleet_key: Option<PathBuf>,
    /// A fleet revocation list installed by hand (optional: `deckhand fleet revoke --origin` reaches
    /// agents through the bucket, their peers or a stick, with renewed certificates and CA rotations).
    #[arg(long)]
    pub fleet_crl: Option<PathBuf>,
    /// The background scrub's budget: bytes of the active and previous releases re-hashed per hour, at
    /// the idle I/O priority (a size such as 512MiB; 0 turns it off). A blob found rotten is
    /// quarantined and fetched again.
    #[arg(long, default_value = "512MiB", value_parser = size)]
    pub scrub_per_hour: u64,
    /// Cap on bytes per second served to peers [default: none].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub serve_bytes_per_sec: Option<u64>,
    /// Seconds to wait for a chunk's designated origin fetcher while it makes no progress.
    #[arg(long = "max-wait-secs", id = "max_wait_secs", default_value = "20", value_parser = secs(1, 3_600))]
    pub max_wait: Duration,
    /// The most all agents of the shop together take from the origin, e.g. 30Mbit or 4MB (per second);
    /// the agents fetching share it equally [default: no limit].
    #[arg(long, value_parser = rate)]
    pub uplink_budget: Option<u64>,
    /// A time-of-day budget overriding --uplink-budget, as HH:MM-HH:MM=RATE in local time (e.g.
    /// 08:00-20:00=10Mbit); repeatable, windows may wrap past midnight and must not overlap.
    #[arg(long = "uplink-window", id = "uplink_schedule", value_parser = window)]
    pub uplink_schedule: Vec<deckhand_protocol::budget::Window>,
    /// Milliseconds after a download starts in which nothing is taken from the origin, so the peers
    /// booting at the same time (mDNS, static peers) are known before origin fetches are shared out.
    #[arg(long = "gather-ms", id = "gather_ms", default_value = "2000", value_parser = millis(0, 60_000))]
    pub gather: Duration,
    /// How a ready release goes live when its manifest does not say: at-once, or together (announce
    /// "ready" and switch when every live agent of the shop is ready, or when --activate-deadline-secs
    /// have passed).
    #[arg(long, default_value = "at-once")]
    pub activate: deckhand_protocol::switch::Mode,
    /// Seconds a ready agent waits for the rest of the shop when switching together.
    #[arg(long = "activate-deadline-secs", id = "activate_deadline_secs", default_value = "600", value_parser = secs(1, 86_400))]
    pub activate_deadline: Duration,
    /// A maintenance window, HH:MM-HH:MM in local time (it may wrap past midnight): a verified release
    /// goes live only inside one (or after --activate-when-idle); repeatable. Downloading is never
    /// held; an urgent release (deckhand publish --urgent, or a rollback) and an agent's first release
    /// are not held [default: no window].
    #[arg(long = "activate-window", id = "activate_window", value_parser = day_span)]
    pub activate_window: Vec<deckhand_protocol::daily::Span>,
    /// A verified release also goes live once nothing was recognised for this long: 90s, 5m, 1h
    /// [default: not used].
    #[arg(long, value_parser = duration)]
    pub activate_when_idle: Option<Duration>,
    /// A release that goes live and then sees the agent end uncleanly (killed, crashed, stopped by the
    /// watchdog) more than this many times within --crash-loop-minutes is left: the next start serves
    /// the release before it, and the one left is not taken again until a newer one is published. 0
    /// turns this off.
    #[arg(long, default_value = "3", value_parser = clap::value_parser!(u32).range(0..=100))]
    pub crash_loop_restarts: u32,
    /// Minutes after a release goes live in which unclean ends count towards a crash loop.
    #[arg(long = "crash-loop-minutes", id = "crash_loop_minutes", default_value = "10", value_parser = mins(1, 1_440))]
    pub crash_loop_within: Duration,
    /// A verified release is run on the agent's recent inputs beside the active release before it may
    /// go live, and held below this policy when its manifest has none:
    /// min-agreement=0..1,min-samples=N,too-few=wait|canaries [default: no shadow evaluation unless the
    /// release asks for one].
    #[arg(long)]
    pub shadow: Option<deckhand_protocol::shadow::Policy>,
    /// How many of the latest recognised inputs (camera crops, photos posted) the agent keeps in memory
    /// for shadow evaluations (JPEG, a few kB each; never sent off the Pi). 0 keeps none.
    #[arg(long, default_value = "300", value_parser = clap::value_parser!(u32).range(0..=5_000))]
    pub shadow_samples: u32,
    /// After a release goes live it is on probation, when its manifest has no policy of its own: once
    /// it answered `answers` requests, a release that fails more of them, answers more without a card,
    /// or has a p99 latency over `p99` times the release before's is rolled back to that release by the
    /// agent, and its peers do not take it: probation=DURATION,answers=N,p99=RATIO,errors=0..1,
    /// uncertain=0..1 (probation=0: none). Urgent releases (and rollbacks) are not on probation.
    #[arg(
        long,
        default_value = "probation=10m,answers=100,p99=3,errors=0.05,uncertain=0.2"
    )]
    pub rollout: deckhand_protocol::probation::Rollout,
    /// An MQTT broker recognitions are published to: mqtt://[user[:password]@]host[:port] or mqtts://
    /// (QoS 1 to deckhand/DEPLOYMENT/AGENT/SOURCE/recognitions; online/offline retained at
    /// deckhand/DEPLOYMENT/AGENT/status).
    #[arg(long, env = "DECKHAND_MQTT")]
    pub mqtt: Option<crate::events::mqtt::MqttUrl>,
    /// The CA certificate(s) (PEM) an mqtts:// broker's certificate is checked against [default: the
    /// system's].
    #[arg(long)]
    pub mqtt_ca: Option<PathBuf>,
    /// A URL recognitions are POSTed to as JSON, signed with webhook_secret; repeatable.
    #[arg(long = "webhook", id = "webhook", value_parser = webhook_url)]
    pub webhooks: Vec<hyper::Uri>,
    /// The secret webhook bodies are signed with (X-Deckhand-Signature: sha256=HMAC); at least 16
    /// characters.
    #[arg(long, env = "DECKHAND_WEBHOOK_SECRET", value_parser = token, hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// The CA certificate(s) (PEM) an https:// webhook's certificate is checked against [default: the
    /// system's].
    #[arg(long)]
    pub webhook_ca: Option<PathBuf>,
    /// The most recognition events the event log keeps for its sinks and for /v1/events.
    #[arg(long, default_value = "10000", value_parser = clap::value_parser!(u64).range(16..=1_000_000))]
    pub events_keep: u64,
    /// Hours an undelivered recognition event is kept before it is dropped.
    #[arg(long = "events-max-age-hours", id = "events_max_age_hours", default_value = "168", value_parser = hours(1, 24 * 365))]
    pub events_max_age: Duration,
    /// A best card that leads the next-best card by less than this is an uncertain event, not a card
    /// (0 takes every margin).
    #[arg(long, default_value = "0", value_parser = fraction)]
    pub min_margin: f32,
    /// A camera watching the counter, NAME=SOURCE; repeatable. SOURCE is exec:COMMAND (MJPEG on its
    /// stdout, e.g. exec:rpicam-vid -t 0 --codec mjpeg --width 1280 --height 960 --framerate 10 -o -),
    /// v4l2:/dev/videoN (a USB camera: MJPEG or YUYV, up to 1280x960), http://HOST/PATH (an IP
    /// camera's MJPEG stream) or dir:PATH (images replayed in name order).
    #[arg(long = "camera", id = "camera")]
    pub cameras: Vec<crate::camera::CameraSpec>,
    /// The most frames a second a camera's frames are analysed (and a dir: source's replay rate).
    #[arg(long, default_value = "10", value_parser = clap::value_parser!(u32).range(1..=60))]
    pub camera_fps: u32,
    /// Analysed frames a card must lie still before it is recognised (5 at 10 a second is 0.5 s).
    #[arg(long, default_value = "5", value_parser = clap::value_parser!(u32).range(2..=100))]
    pub still_frames: u32,
}

fn webhook_url(s: &str) -> Result<hyper::Uri, String> {
    let uri: hyper::Uri = s.parse().map_err(|e| format!("not a URL: {e}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(h)) if !h.is_empty() => Ok(uri),
        _ => Err("not an http:// or https:// URL with a host".into()),
    }
}

fn hours(lo: u64, hi: u64) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync {
    move |s| in_range(s, lo, hi).map(|h| Duration::from_secs(h * 3600))
}

fn fraction(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{s:?} is not a number from 0 to 1")),
    }
}

fn deployment(s: &str) -> Result<String, deckhand_protocol::layout::LayoutError> {
    deckhand_protocol::layout::Name::deployment(s)?;
    Ok(s.to_owned())
}

fn host_port(s: &str) -> Result<String, &'static str> {
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(s.to_owned()),
        _ => Err("not host:port"),
    }
}

fn token(s: &str) -> Result<String, &'static str> {
    if s.chars().count() < 16 {
        return Err("a token needs at least 16 characters");
    }
    if !s.chars().all(|c| c.is_ascii_graphic()) {
        return Err("a token is printable ASCII without spaces");
    }
    Ok(s.to_owned())
}

fn on_off(s: &str) -> Result<bool, &'static str> {
    match s {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err("use on or off"),
    }
}

fn existing_dir(s: &str) -> Result<PathBuf, &'static str> {
    let p = PathBuf::from(s);
    if p.is_dir() {
        Ok(p)
    } else {
        Err("not a directory")
    }
}

/// A whole number of seconds in `lo..=hi`.
fn secs(lo: u64, hi: u64) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync {
    move |s| in_range(s, lo, hi).map(Duration::from_secs)
}

/// A size: a whole number of bytes, or a number with a unit (K, M, G, T in powers of 1000 with an
/// optional B; KiB, MiB, GiB, TiB in powers of 1024).
fn size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" | "k" | "kB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "{other:?} is not a size unit (use B, K, M, G, T, KiB, MiB, GiB or TiB)"
            ));
        }
    };
    let bad = || format!("{s:?} is not a size such as 2G, 500MiB or 1000000");
    let bytes = if num.contains('.') {
        let v: f64 = num.parse().map_err(|_| bad())?;
        let b = v * mult as f64;
        if !b.is_finite() || !(1.0..1.8e19).contains(&b) {
            return Err(bad());
        }
        b as u64
    } else {
        num.parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(mult))
            .ok_or_else(bad)?
    };
    if bytes == 0 {
        return Err(bad());
    }
    Ok(bytes)
}

fn rate(s: &str) -> Result<u64, String> {
    deckhand_protocol::budget::parse_rate(s).map_err(|e| e.to_string())
}

fn window(s: &str) -> Result<deckhand_protocol::budget::Window, String> {
    deckhand_protocol::budget::parse_window(s).map_err(|e| e.to_string())
}

/// A whole number of milliseconds in `lo..=hi`.
fn mins(lo: u64, hi: u64) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync {
    move |s| in_range(s, lo, hi).map(|m| Duration::from_secs(m * 60))
}

fn millis(lo: u64, hi: u64) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync {
    move |s| in_range(s, lo, hi).map(Duration::from_millis)
}

fn day_span(s: &str) -> Result<deckhand_protocol::daily::Span, String> {
    deckhand_protocol::daily::Span::parse(s).ok_or_else(|| {
        format!("{s:?} is not a window HH:MM-HH:MM of local time (for example 02:00-06:00)")
    })
}

/// A duration: a whole number with a unit, s, m or h (`90s`, `5m`, `1h`), from 1 s to a day.
fn duration(s: &str) -> Result<Duration, String> {
    match deckhand_protocol::daily::seconds(s) {
        Some(secs) if (1..=86_400).contains(&secs) => Ok(Duration::from_secs(secs)),
        _ => Err(format!(
            "{s:?} is not a duration such as 90s, 5m or 1h (1 s to 24 h)"
        )),
    }
}

fn in_range(s: &str, lo: u64, hi: u64) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if (lo..=hi).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a whole number between {lo} and {hi}")),
    }
}

/// The settings, checked, with the files they name read: what the daemon runs with.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub settings: Settings,
    /// The shop's uplink budget (`uplink_budget` with `uplink_schedule`).
    pub budget: deckhand_protocol::budget::Budget,
    pub deployment: String,
    pub trust: Vec<PublicKey>,
    /// The installed trust root envelope (`--trust-root`), when the keys come from one.
    pub trust_root: Option<Vec<u8>>,
    /// Where releases come from; `None` runs from the store, peers and bundles alone.
    pub origin: Option<(OriginUrl, OriginConfig)>,
    /// Fleet credentials; without them the agent has no peers.
    pub fleet: Option<CredentialPaths>,
}

/// The command `run`'s flags are parsed with (no binary name: the arguments after `run`).
fn command() -> clap::Command {
    Settings::augment_args(clap::Command::new("run").no_binary_name(true))
}

/// What is given on the command line or in the environment wins over the file.
fn given(m: &clap::ArgMatches, id: &str) -> bool {
    matches!(
        m.value_source(id),
        Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable)
    )
}

/// Parses `run`'s arguments (those after `run`) over the config file they name (or the default one, if
/// it exists).
pub fn parse(args: &[OsString]) -> Result<Settings, ConfigError> {
    let cli = command().try_get_matches_from(args)?;
    let (path, explicit) = match cli.get_one::<PathBuf>("config") {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    let mut merged = file_args(&path, explicit, &cli)?;
    merged.extend(args.iter().cloned());
    let m = command().try_get_matches_from(merged)?;
    Ok(Settings::from_arg_matches(&m)?)
}

/// The config file as flags, leaving out what `cli` gives. A missing file is an error only when it was
/// asked for by name.
fn file_args(
    path: &Path,
    explicit: bool,
    cli: &clap::ArgMatches,
) -> Result<Vec<OsString>, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => return Ok(Vec::new()),
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let table: toml::Table = toml::from_str(&text).map_err(|source| ConfigError::Toml {
        path: path.to_owned(),
        source,
    })?;
    let cmd = command();
    let mut out: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id() == key.as_str() && key != "config")
            .ok_or_else(|| ConfigError::UnknownKey {
                path: path.to_owned(),
                key: key.clone(),
            })?;
        if given(cli, key) {
            continue;
        }
        let flag = format!("--{}", arg.get_long().unwrap_or(key));
        let bad = |why| ConfigError::Value {
            path: path.to_owned(),
            key: key.clone(),
            why,
        };
        let values = match value {
            toml::Value::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        for v in values {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Float(f) => f.to_string(),
                _ => {
                    return Err(bad(
                        "expected a string, a whole number, a boolean or a list of them",
                    ));
                }
            };
            out.push(flag.clone().into());
            out.push(text.into());
        }
    }
    // The file's values alone first, so an invalid one is reported as the file's.
    command()
        .try_get_matches_from(&out)
        .map_err(|source| ConfigError::FileSetting {
            path: path.to_owned(),
            source,
        })?;
    Ok(out)
}

impl Settings {
    /// Checks what no single setting can (which settings go together) and reads the trusted keys.
    pub fn resolve(self) -> Result<RunConfig, ConfigError> {
        let deployment = self
            .deployment
            .clone()
            .ok_or(ConfigError::Missing("deployment"))?;
        let fleet = match (&self.fleet_ca, &self.fleet_cert, &self.fleet_key) {
            (None, None, None) if self.fleet_crl.is_some() => {
                return Err(ConfigError::CrlWithoutFleet);
            }
            (None, None, None) => None,
            (Some(ca), Some(cert), Some(key)) => Some(CredentialPaths {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                crl: self.fleet_crl.clone(),
            }),
            (ca, cert, key) => {
                let missing: Vec<&str> = [
                    ("--fleet-ca", ca.is_none()),
                    ("--fleet-cert", cert.is_none()),
                    ("--fleet-key", key.is_none()),
                ]
                .iter()
                .filter(|(_, m)| *m)
                .map(|(n, _)| *n)
                .collect();
                return Err(ConfigError::FleetIncomplete(missing.join(", ")));
            }
        };
        let origin = self.origin.clone().map(|url| {
            (
                url,
                OriginConfig {
                    endpoint_url: self.endpoint_url.clone().filter(|e| !e.is_empty()),
                    attempt_timeout: self.origin_attempt,
                    progress_window: self.origin_stall,
                    ..Default::default()
                },
            )
        });
        let budget = deckhand_protocol::budget::Budget::new(
            self.uplink_budget,
            self.uplink_schedule.clone(),
        )?;
        if !self.webhooks.is_empty() && self.webhook_secret.is_none() {
            return Err(ConfigError::WebhookUnsigned);
        }
        match (self.trust.is_empty(), &self.trust_root) {
            (true, None) => return Err(ConfigError::Missing("trust (or trust_root)")),
            (false, Some(_)) => return Err(ConfigError::TrustTwice),
            _ => {}
        }
        let trust_root = match &self.trust_root {
            Some(p) => Some(std::fs::read(p).map_err(|e| ConfigError::Trust {
                path: p.clone(),
                why: e.to_string(),
            })?),
            None => None,
        };
        // Files are read last: every setting is checked first.
        let trust = self
            .trust
            .iter()
            .map(|p| {
                let bad = |why: String| ConfigError::Trust {
                    path: p.clone(),
                    why,
                };
                let text = std::fs::read_to_string(p).map_err(|e| bad(e.to_string()))?;
                PublicKey::from_file_text(&text).map_err(|e| bad(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if trust_root.is_none() && usize::from(self.threshold) > trust.len() {
            return Err(ConfigError::Threshold {
                threshold: self.threshold.into(),
                keys: trust.len(),
            });
        }
        Ok(RunConfig {
            settings: self,
            budget,
            deployment,
            trust,
            trust_root,
            origin,
            fleet,
        })
    }
}

/// The settings as a commented TOML file: every key with its help and default (for packaging).
pub fn example_file() -> String {
    let mut out = String::from(
        "# deckhand-agent settings. Every key is also a flag of `deckhand-agent run` (with - for _);\n\
         # a flag wins over this file. Lists are TOML arrays.\n",
    );
    for a in command().get_arguments() {
        let id = a.get_id().as_str();
        if id == "config" || id == "help" {
            continue;
        }
        let help = a.get_help().map(ToString::to_string).unwrap_or_default();
        out.push_str(&format!("\n# {help}\n"));
        match a.get_default_values().first() {
            Some(d) => out.push_str(&format!("# {id} = {:?}\n", d.to_string_lossy())),
            None => out.push_str(&format!("# {id} =\n")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packaged /etc/deckhand/agent.toml is this crate's example file, regenerated with
    /// `deckhand-agent example-config > packaging/agent.toml` when a setting changes.
    #[test]
    fn the_packaged_config_file_lists_every_setting_as_it_is_now() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/agent.toml");
        let packaged = std::fs::read_to_string(&path).unwrap();
        assert!(
            packaged == example_file(),
            "{} is out of date: run `deckhand-agent example-config > packaging/agent.toml`",
            path.display()
        );
    }

    #[test]
    fn sizes_take_decimal_and_binary_units() {
        assert_eq!(size("2000000000"), Ok(2_000_000_000));
        assert_eq!(size("2G"), Ok(2_000_000_000));
        assert_eq!(size("2GB"), Ok(2_000_000_000));
        assert_eq!(size("500MiB"), Ok(500 << 20));
        assert_eq!(size("1.5GiB"), Ok(3 << 29));
        assert_eq!(size("64 KiB"), Ok(64 << 10));
        for bad in ["", "0", "G", "2 parsecs", "-1G", "99999999999T", "1.2.3M"] {
            assert!(size(bad).is_err(), "{bad:?}");
        }
    }

    fn key_file(dir: &Path) -> PathBuf {
        let sk = deckhand_protocol::SecretKey::from_seed(&[7; 32]);
        let p = dir.join("k.pub");
        std::fs::write(&p, sk.public().to_file_text()).unwrap();
        p
    }

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn keys_or_a_trust_root_are_needed_and_not_both() {
        let tmp = tempfile::tempdir().unwrap();
        let k = key_file(tmp.path());
        let k = k.to_str().unwrap();
        let root = tmp.path().join("root.json");
        std::fs::write(&root, b"{}").unwrap();
        let root = root.to_str().unwrap();
        let resolve = |v: &[&str]| {
            let mut a = vec!["--deployment", "shop-1"];
            a.extend_from_slice(v);
            parse(&args(&a)).unwrap().resolve()
        };
        let err = resolve(&[]).unwrap_err().to_string();
        assert!(err.contains("trust"), "{err}");
        let err = resolve(&["--trust", k, "--trust-root", root])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--trust and --trust-root"), "{err}");
        // The root's bytes are read here and checked by the daemon against the deployment.
        let run = resolve(&["--trust-root", root]).unwrap();
        assert_eq!(run.trust_root.as_deref(), Some(&b"{}"[..]));
        assert!(run.trust.is_empty());
    }

    #[test]
    fn flags_win_over_the_file_and_errors_name_the_setting() {
        let tmp = tempfile::tempdir().unwrap();
        let k = key_file(tmp.path());
        let cfg = tmp.path().join("agent.toml");
        let c = cfg.to_str().unwrap();
        std::fs::write(
            &cfg,
            format!(
                "deployment = \"shop-1\"\ntrust = [{k:?}]\nhttp_listen = \"127.0.0.1:9000\"\nmdns = \"off\"\npeers = [\"10.0.0.2:8641\"]\nmax_wait_secs = 7\n"
            ),
        )
        .unwrap();
        let run = parse(&args(&["--config", c, "--http-listen", "127.0.0.1:9001"]))
            .unwrap()
            .resolve()
            .unwrap();
        let s = &run.settings;
        assert_eq!(s.http_listen.port(), 9001, "the flag wins");
        assert!(!s.mdns);
        assert_eq!(s.peers, vec!["10.0.0.2:8641".to_owned()]);
        assert_eq!(s.max_wait, Duration::from_secs(7));
        assert_eq!(s.poll, Duration::from_secs(30), "the default");
        assert_eq!(run.deployment, "shop-1");
        // A repeatable flag on the command line replaces the file's list.
        let run = parse(&args(&["--config", c, "--peer", "10.0.0.9:1"]))
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(run.settings.peers, vec!["10.0.0.9:1".to_owned()]);

        std::fs::write(&cfg, "deploymnet = \"x\"\n").unwrap();
        let err = parse(&args(&["--config", c])).unwrap_err().to_string();
        assert!(err.contains("unknown setting \"deploymnet\""), "{err}");
        assert!(
            parse(&args(&[
                "--config",
                tmp.path().join("none.toml").to_str().unwrap()
            ]))
            .is_err(),
            "an explicit missing file is an error"
        );

        std::fs::write(&cfg, "poll_secs = 0\n").unwrap();
        let err = parse(&args(&["--config", c])).unwrap_err().to_string();
        assert!(
            err.contains(c) && err.contains("--poll-secs") && err.contains("between 1 and 86400"),
            "{err}"
        );
        let err = parse(&args(&["--quic-listen", "nowhere"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--quic-listen"), "{err}");
        let err = parse(&args(&["--mdns", "maybe"])).unwrap_err().to_string();
        assert!(err.contains("--mdns") && err.contains("on or off"), "{err}");

        std::fs::write(&cfg, format!("trust = [{k:?}]\nfleet_ca = \"ca.crt\"\n")).unwrap();
        let with_dep = |extra: &[&str]| {
            let mut a = args(&["--config", c, "--deployment", "shop-1"]);
            a.extend(args(extra));
            parse(&a).unwrap().resolve().unwrap_err().to_string()
        };
        let err = with_dep(&[]);
        assert!(
            err.contains("--fleet-cert") && err.contains("--fleet-key"),
            "{err}"
        );
        let err = parse(&args(&["--config", c]))
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(err.contains("--deployment is required"), "{err}");
    }

    #[test]
    fn maintenance_windows_and_the_idle_time_are_read_from_the_file_and_bad_ones_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let k = key_file(tmp.path());
        let cfg = tmp.path().join("agent.toml");
        let c = cfg.to_str().unwrap();
        std::fs::write(
            &cfg,
            format!(
                "deployment = \"shop-1\"\ntrust = [{k:?}]\nactivate_window = [\"02:00-06:00\", \"22:30-23:00\"]\nactivate_when_idle = \"5m\"\n"
            ),
        )
        .unwrap();
        let run = parse(&args(&["--config", c])).unwrap().resolve().unwrap();
        let windows: Vec<String> = run
            .settings
            .activate_window
            .iter()
            .map(|w| w.to_string())
            .collect();
        assert_eq!(windows, ["02:00-06:00", "22:30-23:00"]);
        assert_eq!(
            run.settings.activate_when_idle,
            Some(Duration::from_secs(300))
        );
        for (flag, bad, says) in [
            ("--activate-window", "2-6", "HH:MM-HH:MM"),
            ("--activate-window", "03:00-03:00", "HH:MM-HH:MM"),
            ("--activate-when-idle", "5 minutes", "90s, 5m or 1h"),
            ("--activate-when-idle", "0s", "1 s to 24 h"),
        ] {
            let err = parse(&args(&["--config", c, flag, bad]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(flag) && err.contains(says), "{err}");
        }
    }

    #[test]
    fn an_uplink_budget_with_a_schedule_is_read_from_the_file_and_bad_ones_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let k = key_file(tmp.path());
        let cfg = tmp.path().join("agent.toml");
        let c = cfg.to_str().unwrap();
        std::fs::write(
            &cfg,
            format!(
                "deployment = \"shop-1\"\ntrust = [{k:?}]\nuplink_budget = \"30Mbit\"\nuplink_schedule = [\"08:00-20:00=10Mbit\"]\n"
            ),
        )
        .unwrap();
        let run = parse(&args(&["--config", c])).unwrap().resolve().unwrap();
        assert_eq!(run.budget.at(7 * 60), Some(3_750_000));
        assert_eq!(run.budget.at(12 * 60), Some(1_250_000));
        let err = parse(&args(&["--config", c, "--uplink-budget", "fast"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--uplink-budget") && err.contains("unit"),
            "{err}"
        );
        let err = parse(&args(&[
            "--config",
            c,
            "--uplink-window",
            "08:00-20:00=1Mbit",
            "--uplink-window",
            "19:00-21:00=2Mbit",
        ]))
        .unwrap()
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.contains("overlap"), "{err}");
    }

    #[test]
    fn the_example_file_lists_every_setting_with_its_default() {
        let text = example_file();
        for key in [
            "data_dir",
            "poll_secs",
            "max_wait_secs",
            "peers",
            "mdns",
            "origin",
            "origin_attempt_secs",
            "origin_stall_secs",
        ] {
            assert!(text.contains(&format!("# {key} =")), "{key}:\n{text}");
        }
        assert!(text.contains("# poll_secs = \"30\""), "{text}");
    }
}
