//! The agent's status documents, as served at `GET /v1/status` and `GET /v1/fleet`: one typed form that
//! the daemon builds, and `deckhand-agent status`, `deckhand fleet status`, the demo and the tests read.
//! Human renderings live here too, so every reader prints the same lines.

use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// `GET /v1/status`: one agent, as it sees itself.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub agent_id: String,
    pub deployment: String,
    /// The release recognitions are served from.
    pub active: Option<ActiveRelease>,
    /// The release being downloaded.
    pub pending: Option<Pending>,
    /// Since when the origin has been unreachable (RFC 3339); `None` while it answers.
    pub offline_since: Option<String>,
    /// The last sync error, cleared by the next success. A refusal of the credentials or permissions
    /// shows here (the origin answered), not as offline.
    pub last_error: Option<String>,
    /// Set while the disk holding the store is full (ENOSPC, not the configured budget): the pending
    /// release waits for space; the active release keeps serving.
    #[serde(default)]
    pub disk_full: Option<DiskFull>,
    /// The last release refused at activation (it did not load or failed its canaries).
    pub last_refused: Option<Refusal>,
    /// The last manifest refused as older than what this agent accepted (a replay), and from where.
    pub last_refused_manifest: Option<String>,
    /// Bytes stored since start, by source.
    pub bytes_from_peers: u64,
    pub bytes_from_origin: u64,
    pub bytes_from_bundles: u64,
    /// Bytes served to peers since start.
    pub bytes_served: u64,
    /// How the last release this agent switched to went live.
    #[serde(default)]
    pub last_switch: Option<Switch>,
    /// The agent fell back from the release it had switched to, by itself (a crash loop after it went
    /// live, or worse figures on probation); cleared when the next release goes live.
    #[serde(default)]
    pub fallback: Option<Fallback>,
    /// Polls of the origin answered since the agent started (a changed manifest or not).
    #[serde(default)]
    pub origin_polls: u64,
    /// The active release's probation ([`crate::probation`]): watched, passed, or rolled back.
    #[serde(default)]
    pub probation: Option<Probation>,
    /// The release this agent will not take: it rolled back from it, or a peer did (the operator's
    /// next release clears this).
    #[serde(default)]
    pub rejected: Option<Rejected>,
    /// The last shadow evaluation of a release before it went live ([`crate::shadow`]).
    #[serde(default)]
    pub shadow: Option<Shadow>,
    /// Set while the system clock is behind the newest `created_at` the agent verified (a Pi without an
    /// RTC before NTP): the time the agent trusts instead (RFC 3339).
    #[serde(default)]
    pub clock_behind_trusting: Option<String>,
    /// Where the QUIC endpoint listens (with fleet credentials).
    pub quic_listen: Option<String>,
    pub peers: Vec<PeerInfo>,
    /// Recognitions over the last minute.
    #[serde(default)]
    pub recognitions: Option<RecognitionStats>,
    /// The latest recognitions, newest first (a few).
    #[serde(default)]
    pub recent: Vec<RecentRecognition>,
    /// The active and previous releases, as their manifests list them.
    #[serde(default)]
    pub releases: Vec<ReleaseSummary>,
    /// Bytes the store holds, and its budget (`--store-budget`) if one is set.
    #[serde(default)]
    pub store_bytes: Option<u64>,
    #[serde(default)]
    pub store_budget: Option<u64>,
    /// What stops working on a date: this Pi's fleet certificate, the fleet CA, the trust root, the
    /// active manifest (each judged at the trusted now).
    #[serde(default)]
    pub expiries: Vec<Expiry>,
    /// The `created_at` of the newest manifest this agent verified (RFC 3339): a bucket where nothing
    /// new appears shows here as an age that keeps growing.
    #[serde(default)]
    pub newest_manifest_at: Option<String>,
    /// Why this agent is not a fleet member (QUIC off): its credentials did not load, or they do not
    /// check (another CA, revoked, expired). It serves from its store regardless.
    #[serde(default)]
    pub fleet_error: Option<String>,
    /// What the store repaired when the agent started: a damaged or missing catalog rebuilt from the
    /// blobs on disk, partial downloads dropped for a full disk.
    #[serde(default)]
    pub store_repair: Option<String>,
    /// The background scrub of the live release (`None` when it is off).
    #[serde(default)]
    pub scrub: Option<ScrubStatus>,
    /// The fleet's certificate authorities and revocations as this agent holds them (`None` without
    /// fleet credentials).
    #[serde(default)]
    pub fleet_trust: Option<FleetTrust>,
    /// The addresses this agent dials to find peers (`None` without fleet credentials).
    #[serde(default)]
    pub dial_table: Option<DialTable>,
    /// The recognition event log and its sinks (MQTT, webhooks).
    #[serde(default)]
    pub events: Option<EventsStatus>,
    /// The counter's cameras.
    #[serde(default)]
    pub cameras: Vec<CameraStatus>,
}

/// One camera watching the counter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CameraStatus {
    pub name: String,
    /// Its source, credentials left out.
    pub source: String,
    /// `starting`, `running`, `restarting in N s` (after a failure), `ended` (a dir: source played).
    pub state: String,
    /// Frames read from the source, since start.
    pub frames_read: u64,
    /// Frames not analysed: newer ones came first, or the counter was idle (analysed at 2 a second).
    pub frames_dropped: u64,
    pub frames_analysed: u64,
    /// Frames that did not decode.
    pub frames_refused: u64,
    /// Byte runs in the stream that were not JPEG frames (garbage, frames cut short), since the source
    /// last started.
    pub refused_in_stream: u64,
    /// Bytes in the stream outside any frame (garbage, part headers), since the source last started.
    #[serde(default)]
    pub skipped_bytes: u64,
    /// Times the source was restarted after a failure.
    pub restarts: u64,
    /// Cards recognised (one per placement).
    pub placements: u64,
    /// Cards found in the newest analysed frame.
    pub cards_in_view: u32,
    /// What found them: `detector` (the live release's) or `classical` (no detector in the release);
    /// empty before the first analysed frame.
    #[serde(default)]
    pub finder: String,
    pub last_card: Option<String>,
    pub last_error: Option<String>,
}

/// The recognition event log (the outbox) and where it is delivered.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsStatus {
    /// The log's id, the first part of every event id.
    pub log: String,
    /// The newest event's sequence number.
    pub newest: u64,
    /// Events the log keeps (bounded by `events_keep` and `events_max_age`).
    pub kept: u64,
    /// Events recorded since the agent started.
    pub recorded: u64,
    /// Events dropped since start because the log's queue was full.
    pub dropped: u64,
    /// Events that aged or were pushed out of the log before every sink had them, since start.
    pub expired: u64,
    /// Events lost because the log file could not be written (after retries), since start.
    #[serde(default)]
    pub unwritten: u64,
    /// Why the log file was set aside at start (damaged), if it was.
    #[serde(default)]
    pub reset: Option<String>,
    pub sinks: Vec<EventSink>,
}

/// One place events are delivered to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventSink {
    /// `mqtt` or `webhook`.
    pub kind: String,
    /// Where (credentials left out).
    pub target: String,
    /// Whether its last attempt succeeded.
    pub connected: bool,
    /// Events delivered since start.
    pub delivered: u64,
    /// Events the receiver refused for good (a 4xx) since start, passed over.
    pub rejected: u64,
    /// Events waiting for it.
    pub backlog: u64,
    /// When the oldest of those was made (RFC 3339).
    pub oldest_undelivered: Option<String>,
    /// Why its last attempt failed (cleared by a success).
    pub last_error: Option<String>,
    /// What the receiver said when it last refused an event for good.
    #[serde(default)]
    pub last_rejected: Option<String>,
}

/// The addresses an agent dials (from mDNS, `--peer`, peers' Hellos).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DialTable {
    pub known: usize,
    /// Evicted from a full table for a newer address.
    pub evicted: u64,
    /// Forgotten after failing again and again (adverts that never connect).
    pub forgotten: u64,
    /// QUIC connections open at this agent's endpoint, whichever side dialed them: one per peer once
    /// a pair has settled on one (and any a stranger or a probe holds open).
    #[serde(default)]
    pub connections: usize,
}

/// What the newest fleet bundle taken (`deckhand fleet renew|revoke|rotate-ca|retire-ca`) left this
/// agent trusting.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetTrust {
    /// The bundle's number (its highest revocation list number); `None` before any.
    pub bundle: Option<u64>,
    /// The fleet CAs trusted (common names), installed first.
    pub cas: Vec<String>,
    /// CAs a successor retired.
    pub retired_cas: Vec<String>,
    /// The serial number (hex) of the certificate this agent presents: the installed one, or a renewal.
    pub certificate_serial: Option<String>,
}

/// What the background scrub has done since the agent started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubStatus {
    /// Its I/O budget.
    pub bytes_per_hour: u64,
    /// Whole passes over the active and previous releases.
    pub passes: u64,
    pub bytes_checked: u64,
    /// Blobs found rotten, quarantined and fetched again.
    pub quarantined: u64,
    pub last_pass_at: Option<String>,
    /// The last blob found rotten: which, when, and why.
    pub last_found: Option<String>,
}

/// Something dated the agent depends on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expiry {
    /// `certificate`, `fleet CA`, `trust root` or `manifest`.
    pub what: String,
    /// RFC 3339.
    pub expires_at: String,
    /// Set from [`crate::clock::WARN_BEFORE`] before `expires_at` on.
    pub warning: Option<String>,
}

/// The disk is full: what the pending release still needs and what is free.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskFull {
    /// Since when (RFC 3339).
    pub since: String,
    /// Bytes of the pending release not yet stored.
    pub bytes_needed: u64,
    /// Bytes free on the store's file system when it was last checked.
    pub bytes_free: u64,
}

/// Recognitions over the last minute, for the shop page.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RecognitionStats {
    /// Answers given in the last 60 s (cards and "no card").
    pub last_minute: u64,
    /// Latency percentiles over those answers, in milliseconds (`None` without answers).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Answers since the agent started.
    pub total: u64,
}

/// One recent recognition.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RecentRecognition {
    /// The card, or `None` for "no card".
    pub card_id: Option<String>,
    /// The card's name from the release's metadata, when it has one.
    pub name: Option<String>,
    pub score: f32,
    pub margin: Option<f32>,
    /// When it was answered (RFC 3339).
    pub at: String,
    /// `http` or `inbox`.
    pub source: String,
    pub version: u64,
}

/// A release as its manifest describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseSummary {
    /// `active` or `previous`.
    pub role: String,
    pub version: u64,
    /// When it was published (the manifest's `created_at`, RFC 3339).
    pub created_at: String,
    /// When its manifest expires (RFC 3339): no agent takes it up after that; one serving it keeps on.
    #[serde(default)]
    pub expires_at: String,
    pub artifacts: Vec<ArtifactSummary>,
}

/// One artifact of a [`ReleaseSummary`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactSummary {
    pub role: String,
    pub blob: String,
    pub size: u64,
}

/// The active release.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveRelease {
    pub version: u64,
    /// The manifest's id, `b3:...`.
    pub manifest: String,
    /// `hailo` or `cpu`.
    pub backend: String,
    /// What runs the model within the backend: `xnnpack` or `tract` on the CPU, `hailo`. Absent from
    /// agents before it was reported.
    #[serde(default)]
    pub engine: Option<String>,
    /// When it went live on this agent (RFC 3339).
    #[serde(default)]
    pub activated_at: Option<String>,
}

/// A release being downloaded, and how far it got.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub version: u64,
    /// Where its manifest came from: `origin`, `peer <id>` or `bundle <dir>`.
    pub source: String,
    pub bytes_total: u64,
    pub bytes_have: u64,
    pub bytes_from_peers: u64,
    pub bytes_from_origin: u64,
    /// Held complete and checked, waiting to switch (the agent's maintenance window or idle counter,
    /// the manifest's `not_before`, or the shop switching together): what it waits for.
    #[serde(default)]
    pub waiting: Option<String>,
}

/// The agent fell back to the release before the active one by itself (a crash loop,
/// [`crate::switch::CrashLoop`], or a release worse on probation, [`crate::probation`]): the one it
/// left is not taken again; the operator's next release clears this.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fallback {
    pub from_version: u64,
    pub to_version: u64,
    /// When (RFC 3339).
    pub at: String,
    pub why: String,
}

/// A release on probation after it went live here ([`crate::probation`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Probation {
    pub version: u64,
    /// When it went live, and when its time on probation ends (RFC 3339).
    pub since: String,
    pub until: String,
    /// `watching`, `passed` or `rolled back`.
    pub outcome: String,
    /// What it served so far, and what the release before it served while it was live (none after
    /// a restart).
    pub health: crate::probation::Health,
    pub before: Option<crate::probation::Health>,
    /// Why it was rolled back.
    #[serde(default)]
    pub why: Option<String>,
}

/// A release an agent will not take, until the operator publishes a newer one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    pub version: u64,
    /// Its manifest id (hex).
    pub manifest_id: String,
    /// The agent that rolled back from it (this one, or the peer this one learnt it from).
    pub by: String,
    pub why: String,
    /// When (RFC 3339).
    pub at: String,
}

/// A shadow evaluation of a release on the agent's own recent inputs, and what it decided.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Shadow {
    pub version: u64,
    /// `passed`, `held` or `waiting` (for samples).
    pub outcome: String,
    /// The verdict in words, with the figures.
    pub why: String,
    /// When it was decided (RFC 3339).
    pub at: String,
    /// The figures measured (none while waiting for samples).
    pub figures: Option<crate::shadow::Figures>,
}

/// How a release went live on an agent ([`crate::switch`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switch {
    pub version: u64,
    /// When it was held complete and canary-checked, and when it went live (RFC 3339).
    pub ready_at: String,
    pub switched_at: String,
    /// `at once`, `all ready`, `a member switched`, `deadline`, `in the maintenance window`, `the counter
    /// was idle`, `urgent`, `a canary`, `the canary passed its probation`, or `rolled back` (probation).
    pub why: String,
}

/// A release refused at activation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub version: u64,
    pub manifest_id: String,
    pub reason: String,
    /// When (RFC 3339).
    pub at: String,
}

/// A peer, as this agent's peer table sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub id: String,
    pub addr: String,
    pub live: bool,
    pub deployment: Option<String>,
    pub active: Option<u64>,
    pub pending: Option<u64>,
    /// The version the peer serves (its active release).
    pub version: Option<u64>,
    /// When it last answered a Hello (RFC 3339), and until when it is banned.
    pub last_seen: Option<String>,
    pub banned_until: Option<String>,
    pub banned: bool,
    pub bytes_from: u64,
    pub bytes_to: u64,
    pub last_error: Option<String>,
    /// Whether its last Hello said it can fetch from the origin.
    #[serde(default)]
    pub origin: Option<bool>,
    /// The pair's connection (whichever side dialed it) is up and the peer answered a Hello recently: a
    /// download asks it for chunks and counts it among the agents sharing the origin fetches. A peer
    /// whose connection closed stays `live`, not connected, until its last Hello is 8 s old (unless it
    /// said it left).
    #[serde(default)]
    pub connected: bool,
}

/// `GET /v1/fleet`: the shop as one agent sees it, itself first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetView {
    pub deployment: String,
    pub agents: Vec<FleetMember>,
}

/// One agent of [`FleetView`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetMember {
    pub id: String,
    /// The agent that answered.
    #[serde(rename = "self")]
    pub is_self: bool,
    pub live: bool,
    /// Its QUIC address (peers only).
    pub addr: Option<String>,
    pub active: Option<u64>,
    pub pending: Option<u64>,
    pub banned: bool,
    /// Bytes the answering agent received from it, and sent to it (peers only).
    pub bytes_from: u64,
    pub bytes_to: u64,
    /// What the answering agent stored since start, by source (itself only).
    pub bytes_from_peers: u64,
    pub bytes_from_origin: u64,
    pub last_error: Option<String>,
    /// How far its pending release got, as it last told (itself, or a live peer asked for its status).
    #[serde(default)]
    pub progress: Option<Pending>,
    /// Whether it can reach the origin (from its Hello; `None` when unknown).
    #[serde(default)]
    pub reaches_origin: Option<bool>,
    /// When it last answered (RFC 3339), and until when it is banned (peers only).
    #[serde(default)]
    pub last_seen: Option<String>,
    #[serde(default)]
    pub banned_until: Option<String>,
}

/// A byte count for people: `812 B`, `5.2 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_owned(), ToString::to_string)
}

impl Status {
    /// The status as lines for a person (`deckhand-agent status`).
    /// One human line, for systemd's `STATUS=`: "serving v7 (hailo); syncing v8 43% from 3 peers".
    pub fn summary_line(&self) -> String {
        let mut out = match &self.active {
            Some(a) => format!("serving v{} ({})", a.version, a.backend),
            None => "no release yet".to_owned(),
        };
        if let Some(p) = &self.pending {
            let pct = (p.bytes_have * 100).checked_div(p.bytes_total).unwrap_or(0);
            match &p.waiting {
                Some(w) => {
                    let _ = write!(out, "; v{} ready, {w}", p.version);
                }
                None => {
                    let _ = write!(
                        out,
                        "; syncing v{} {pct}% from {} peers",
                        p.version,
                        self.live_peers()
                    );
                }
            }
        }
        if let Some(t) = &self.clock_behind_trusting {
            let _ = write!(out, "; clock behind, trusting {t}");
        }
        if let Some(d) = &self.disk_full {
            let _ = write!(
                out,
                "; disk full: needs {}, {} free",
                human_bytes(d.bytes_needed),
                human_bytes(d.bytes_free)
            );
        }
        if let Some(e) = &self.fleet_error {
            let _ = write!(out, "; not a fleet member: {e}");
        }
        if let Some(r) = &self.store_repair {
            let _ = write!(out, "; store repaired: {r}");
        }
        if let Some(f) = self.scrub.as_ref().and_then(|s| s.last_found.as_ref()) {
            let _ = write!(out, "; scrub found {f}");
        }
        for w in self.expiries.iter().filter_map(|e| e.warning.as_ref()) {
            let _ = write!(out, "; {w}");
        }
        if let Some(since) = &self.offline_since {
            let _ = write!(out, "; offline since {since}");
        } else if let Some(e) = &self.last_error {
            let _ = write!(out, "; last error: {e}");
        }
        out
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "agent       {}", self.agent_id);
        let _ = writeln!(out, "deployment  {}", self.deployment);
        match &self.active {
            Some(a) => {
                let _ = match a.engine.as_deref().filter(|e| *e != a.backend) {
                    Some(engine) => writeln!(
                        out,
                        "active      version {} ({} on {engine})",
                        a.version, a.backend
                    ),
                    None => writeln!(out, "active      version {} ({})", a.version, a.backend),
                };
            }
            None => {
                let _ = writeln!(out, "active      none");
            }
        }
        if let Some(f) = &self.fallback {
            let _ = writeln!(
                out,
                "fell back   from version {} to {} at {}: {}",
                f.from_version, f.to_version, f.at, f.why
            );
        }
        if let Some(p) = &self.probation {
            let _ = match (&p.why, p.outcome.as_str()) {
                (Some(why), _) => {
                    writeln!(out, "probation   version {} rolled back: {why}", p.version)
                }
                (None, "watching") => writeln!(
                    out,
                    "probation   version {} until {}: {}",
                    p.version, p.until, p.health
                ),
                (None, outcome) => writeln!(
                    out,
                    "probation   version {} {outcome}: {}",
                    p.version, p.health
                ),
            };
        }
        if let Some(r) = &self.rejected {
            let _ = writeln!(
                out,
                "rejected    version {} (by {}): {}",
                r.version, r.by, r.why
            );
        }
        if let Some(sh) = &self.shadow {
            let _ = writeln!(out, "shadow      version {}: {}", sh.version, sh.why);
        }
        if let Some(p) = &self.pending {
            let _ = writeln!(
                out,
                "pending     version {}: {}/{} bytes ({} from peers, {} from origin)",
                p.version, p.bytes_have, p.bytes_total, p.bytes_from_peers, p.bytes_from_origin
            );
            if let Some(w) = &p.waiting {
                let _ = writeln!(out, "            ready; {w}");
            }
        }
        let _ = writeln!(
            out,
            "synced      {} bytes from peers, {} from origin, {} from bundles; served {}",
            self.bytes_from_peers,
            self.bytes_from_origin,
            self.bytes_from_bundles,
            self.bytes_served
        );
        if let Some(since) = &self.offline_since {
            let _ = writeln!(out, "offline     since {since}");
        }
        if let Some(e) = &self.last_error {
            let _ = writeln!(out, "last error  {e}");
        }
        if let Some(r) = &self.last_refused {
            let _ = writeln!(out, "refused     version {}: {}", r.version, r.reason);
        }
        if let Some(e) = &self.fleet_error {
            let _ = writeln!(out, "fleet       not a member: {e}");
        }
        if let Some(r) = &self.store_repair {
            let _ = writeln!(out, "repaired    {r}");
        }
        if let Some(s) = &self.scrub {
            let _ = writeln!(
                out,
                "scrub       {} pass(es), {} checked, {} quarantined{}",
                s.passes,
                human_bytes(s.bytes_checked),
                s.quarantined,
                s.last_found
                    .as_ref()
                    .map(|f| format!("; last: {f}"))
                    .unwrap_or_default()
            );
        }
        if let Some(e) = &self.events {
            let lost = e.dropped + e.expired + e.unwritten;
            let _ = writeln!(
                out,
                "events      {} kept, {} since start{}{}",
                e.kept,
                e.recorded,
                if lost > 0 {
                    format!(", {lost} lost")
                } else {
                    String::new()
                },
                e.reset
                    .as_ref()
                    .map(|r| format!("; log set aside: {r}"))
                    .unwrap_or_default()
            );
            for k in &e.sinks {
                let state = if k.connected { "up" } else { "DOWN" };
                let _ = write!(
                    out,
                    "  {:<9} {} {state}, {} delivered, {} waiting",
                    k.kind, k.target, k.delivered, k.backlog
                );
                if let Some(o) = &k.oldest_undelivered {
                    let _ = write!(out, " (oldest {o})");
                }
                if k.rejected > 0 {
                    let _ = write!(out, ", {} refused", k.rejected);
                }
                if let Some(err) = &k.last_error {
                    let _ = write!(out, "; {err}");
                }
                let _ = writeln!(out);
            }
        }
        for c in &self.cameras {
            let _ = write!(
                out,
                "camera      {} {} ({}): {} frames read, {} analysed, {} cards recognised",
                c.name, c.state, c.source, c.frames_read, c.frames_analysed, c.placements
            );
            if let Some(card) = &c.last_card {
                let _ = write!(out, " (last {card})");
            }
            match c.finder.as_str() {
                "" => {}
                "detector" => out.push_str(", cards found by the release's detector"),
                other => {
                    let _ = write!(out, ", cards found by the {other} finder");
                }
            }
            if c.frames_refused + c.refused_in_stream > 0 {
                let _ = write!(
                    out,
                    ", {} frames refused",
                    c.frames_refused + c.refused_in_stream
                );
            }
            if c.restarts > 0 {
                let _ = write!(out, ", {} restarts", c.restarts);
            }
            if let Some(err) = &c.last_error {
                let _ = write!(out, "; {err}");
            }
            let _ = writeln!(out);
        }
        if let Some(t) = &self.newest_manifest_at {
            let _ = writeln!(out, "newest      manifest created {t}");
        }
        for e in &self.expiries {
            let warn = e
                .warning
                .as_deref()
                .map_or(String::new(), |w| format!("  WARNING: {w}"));
            let _ = writeln!(out, "expires     {:<12} {}{warn}", e.what, e.expires_at);
        }
        for p in &self.peers {
            let _ = writeln!(
                out,
                "peer        {:<20} {:<22} live={} active={} pending={} banned={}",
                p.id,
                p.addr,
                p.live,
                opt(&p.active),
                opt(&p.pending),
                p.banned
            );
        }
        out
    }

    /// A live peer with this id.
    pub fn live_peer(&self, id: &str) -> Option<&PeerInfo> {
        self.peers.iter().find(|p| p.id == id && p.live)
    }

    /// How many peers are live.
    pub fn live_peers(&self) -> usize {
        self.peers.iter().filter(|p| p.live).count()
    }

    /// The active version, if any.
    pub fn active_version(&self) -> Option<u64> {
        self.active.as_ref().map(|a| a.version)
    }
}

impl FleetView {
    /// The fleet as a table for a person (`deckhand fleet status`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "deployment {}", self.deployment);
        let _ = writeln!(
            out,
            "{:<20} {:<6} {:<8} {:<8} {:<7} {:>14} {:>14}",
            "AGENT", "LIVE", "ACTIVE", "PENDING", "BANNED", "BYTES FROM", "BYTES TO"
        );
        for a in &self.agents {
            let name = if a.is_self {
                format!("{} (self)", a.id)
            } else {
                a.id.clone()
            };
            let _ = writeln!(
                out,
                "{:<20} {:<6} {:<8} {:<8} {:<7} {:>14} {:>14}",
                name,
                a.live,
                opt(&a.active),
                opt(&a.pending),
                a.banned,
                human_bytes(a.bytes_from),
                human_bytes(a.bytes_to)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_and_renders() {
        let s = Status {
            agent_id: "pi-1".into(),
            deployment: "shop-1".into(),
            active: Some(ActiveRelease {
                version: 7,
                manifest: "b3:00".into(),
                backend: "cpu".into(),
                engine: Some("xnnpack".into()),
                activated_at: None,
            }),
            pending: Some(Pending {
                version: 8,
                bytes_total: 200,
                bytes_have: 86,
                ..Default::default()
            }),
            peers: vec![PeerInfo {
                id: "pi-2".into(),
                live: true,
                active: Some(7),
                ..Default::default()
            }],
            cameras: vec![CameraStatus {
                name: "counter".into(),
                source: "exec:rpicam-vid".into(),
                state: "restarting in 2 s".into(),
                frames_read: 120,
                frames_analysed: 80,
                placements: 3,
                last_card: Some("c-7".into()),
                finder: "detector".into(),
                restarts: 1,
                last_error: Some("the command exited with status 1".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Status>(&json).unwrap(), s);
        let text = s.render();
        assert!(
            text.contains("active      version 7 (cpu on xnnpack)"),
            "{text}"
        );
        assert!(text.contains("pi-2"), "{text}");
        assert!(
            text.contains(
                "camera      counter restarting in 2 s (exec:rpicam-vid): 120 frames read, 80 \
                 analysed, 3 cards recognised (last c-7), cards found by the release's detector, 1 \
                 restarts; the command exited with status 1"
            ),
            "{text}"
        );
        assert_eq!(s.live_peers(), 1);
        assert_eq!(
            s.summary_line(),
            "serving v7 (cpu); syncing v8 43% from 1 peers"
        );
        let waiting = Status {
            active: None,
            pending: Some(Pending {
                version: 8,
                waiting: Some("switching at 03:00".into()),
                ..Default::default()
            }),
            offline_since: Some("2026-12-02T03:00:00Z".into()),
            ..s.clone()
        };
        assert_eq!(
            waiting.summary_line(),
            "no release yet; v8 ready, switching at 03:00; offline since 2026-12-02T03:00:00Z"
        );
        let f = FleetView {
            deployment: "shop-1".into(),
            agents: vec![FleetMember {
                id: "pi-1".into(),
                is_self: true,
                live: true,
                ..Default::default()
            }],
        };
        let json = serde_json::to_value(&f).unwrap();
        assert_eq!(json["agents"][0]["self"], true);
        assert!(f.render().contains("pi-1 (self)"));
        assert_eq!(human_bytes(812), "812 B");
        assert_eq!(human_bytes(5 * 1024 * 1024 + 200 * 1024), "5.2 MiB");
        assert_eq!(human_bytes(1024), "1.0 KiB");
    }
}
