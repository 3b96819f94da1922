//! Counters and a latency histogram, rendered in the Prometheus text format at `GET /metrics`.

use deckhand_protocol::status::{RecentRecognition, RecognitionStats};
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How many recent recognitions the shop page is shown.
pub const RECENT: usize = 12;
/// The window recognitions per minute and latency percentiles are computed over.
const WINDOW: Duration = Duration::from_secs(60);
/// The most answers that window holds (a bound on memory at any rate).
const WINDOW_CAP: usize = 8192;

/// Which way a recognition request came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Http,
    Inbox,
    /// A card on the counter: counted, remembered and recorded by the camera's analysis, once per
    /// placement (it asks for both readings of a card and keeps one).
    Camera,
}

/// Latency bucket upper bounds, in seconds.
const BUCKETS: [f64; 11] = [
    0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Where synced bytes came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Peer,
    Origin,
    Local,
}

/// Why an origin range GET failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeFailure {
    /// The request failed (after the client's own retries): an error answer, a timeout, a cut body.
    Error = 0,
    /// The body delivered too little in a window (`--origin-stall-secs`): a dripping source.
    Stalled = 1,
    /// The answer was refused: short, or not hashing to the chunk map's ids.
    Bad = 2,
}

impl RangeFailure {
    pub fn label(self) -> &'static str {
        match self {
            RangeFailure::Error => "error",
            RangeFailure::Stalled => "stalled",
            RangeFailure::Bad => "bad",
        }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    recognized: AtomicU64,
    no_card: AtomicU64,
    failed: AtomicU64,
    rejected_input: AtomicU64,
    queue_full: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
    swaps: AtomicU64,
    refused: AtomicU64,
    sync_peer: AtomicU64,
    sync_origin: AtomicU64,
    sync_local: AtomicU64,
    peer_served: AtomicU64,
    peers_banned: AtomicU64,
    /// QUIC handshakes shed to make room (the oldest first), and Initials answered with a Retry.
    handshakes_shed: AtomicU64,
    handshakes_retried: AtomicU64,
    /// Origin range GETs that failed, by why: (an error, stalled, a bad answer).
    range_failed: [AtomicU64; 3],
    /// The latest answers, newest first (at most [`RECENT`]).
    recent: Mutex<VecDeque<RecentRecognition>>,
    /// (when, latency in ms) of the answers of the last [`WINDOW`] (at most [`WINDOW_CAP`]).
    window: Mutex<VecDeque<(Instant, f64)>>,
    /// When the last answer was given.
    last: Mutex<Option<Instant>>,
}

impl Metrics {
    pub fn recognition(&self, found: bool, seconds: f64) {
        if found {
            &self.recognized
        } else {
            &self.no_card
        }
        .fetch_add(1, Ordering::Relaxed);
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        {
            let mut w = crate::locks::lock(&self.window, "window");
            let now = Instant::now();
            while w.len() >= WINDOW_CAP
                || w.front()
                    .is_some_and(|(t, _)| now.duration_since(*t) > WINDOW)
            {
                w.pop_front();
            }
            w.push_back((now, seconds * 1000.0));
        }
        *crate::locks::lock(&self.last, "last answer") = Some(Instant::now());
    }

    /// How long since the last answer, if there was one.
    pub fn idle_for(&self) -> Option<Duration> {
        crate::locks::lock(&self.last, "last answer").map(|t| t.elapsed())
    }

    /// Remembers an answer for the shop page's "recent recognitions".
    /// `source` is `http`, `inbox` or a camera's name.
    pub fn remember(&self, r: &crate::recognizer::Recognition, source: &str) {
        let entry = RecentRecognition {
            card_id: r.card_id.clone(),
            name: r
                .metadata
                .as_ref()
                .and_then(|m| m.get("name"))
                .and_then(|n| n.as_str())
                .map(str::to_owned),
            score: r.score,
            margin: r.margin,
            at: jiff::Timestamp::now().to_string(),
            source: source.to_owned(),
            version: r.manifest_version,
        };
        {
            let mut recent = crate::locks::lock(&self.recent, "recent");
            recent.push_front(entry);
            recent.truncate(RECENT);
        }
    }

    /// The latest answers, newest first.
    pub fn recent(&self) -> Vec<RecentRecognition> {
        crate::locks::lock(&self.recent, "recent answers")
            .iter()
            .cloned()
            .collect()
    }

    /// Answers and latency percentiles over the last minute.
    pub fn recognition_stats(&self) -> RecognitionStats {
        let now = Instant::now();
        let mut lat: Vec<f64> = crate::locks::lock(&self.window, "latency window")
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= WINDOW)
            .map(|(_, ms)| *ms)
            .collect();
        lat.sort_by(f64::total_cmp);
        let pick =
            |p: f64| (!lat.is_empty()).then(|| lat[((lat.len() - 1) as f64 * p).round() as usize]);
        RecognitionStats {
            last_minute: lat.len() as u64,
            p50_ms: pick(0.5),
            p99_ms: pick(0.99),
            total: self.latency_count.load(Ordering::Relaxed),
        }
    }

    pub fn failure(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn rejected_input(&self) {
        self.rejected_input.fetch_add(1, Ordering::Relaxed);
    }

    pub fn queue_full(&self) {
        self.queue_full.fetch_add(1, Ordering::Relaxed);
    }

    pub fn swap(&self) {
        self.swaps.fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused_release(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    pub fn sync_bytes(&self, source: Source, n: u64) {
        match source {
            Source::Peer => &self.sync_peer,
            Source::Origin => &self.sync_origin,
            Source::Local => &self.sync_local,
        }
        .fetch_add(n, Ordering::Relaxed);
    }

    /// Chunk bytes served to peers.
    pub fn peer_served(&self, n: u64) {
        self.peer_served.fetch_add(n, Ordering::Relaxed);
    }

    /// An origin range GET failed (it is fetched again, from a peer or the origin).
    pub fn range_failed(&self, why: RangeFailure) {
        self.range_failed[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A QUIC handshake in flight was shed to make room for a newer one.
    pub fn handshake_shed(&self) {
        self.handshakes_shed.fetch_add(1, Ordering::Relaxed);
    }

    /// A QUIC Initial was answered with a Retry (the address must prove it receives our packets).
    pub fn handshake_retried(&self) {
        self.handshakes_retried.fetch_add(1, Ordering::Relaxed);
    }

    pub fn peer_banned(&self) {
        self.peers_banned.fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes stored by source: (peer, origin, local).
    pub fn synced(&self) -> (u64, u64, u64) {
        (
            self.sync_peer.load(Ordering::Relaxed),
            self.sync_origin.load(Ordering::Relaxed),
            self.sync_local.load(Ordering::Relaxed),
        )
    }

    pub fn served(&self) -> u64 {
        self.peer_served.load(Ordering::Relaxed)
    }

    pub fn swaps(&self) -> u64 {
        self.swaps.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition.
    pub fn render(&self, active_version: Option<u64>) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP deckhand_recognitions_total Images answered, by outcome."
        );
        let _ = writeln!(s, "# TYPE deckhand_recognitions_total counter");
        for (outcome, v) in [
            ("card", g(&self.recognized)),
            ("no_card", g(&self.no_card)),
            ("error", g(&self.failed)),
            ("bad_input", g(&self.rejected_input)),
            ("queue_full", g(&self.queue_full)),
        ] {
            let _ = writeln!(
                s,
                "deckhand_recognitions_total{{outcome=\"{outcome}\"}} {v}"
            );
        }
        let _ = writeln!(
            s,
            "# HELP deckhand_recognition_latency_seconds Time from request to answer."
        );
        let _ = writeln!(s, "# TYPE deckhand_recognition_latency_seconds histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                s,
                "deckhand_recognition_latency_seconds_bucket{{le=\"{b}\"}} {}",
                g(&self.latency_buckets[i])
            );
        }
        let count = g(&self.latency_count);
        let _ = writeln!(
            s,
            "deckhand_recognition_latency_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            s,
            "deckhand_recognition_latency_seconds_sum {}",
            g(&self.latency_sum_us) as f64 / 1e6
        );
        let _ = writeln!(s, "deckhand_recognition_latency_seconds_count {count}");
        let _ = writeln!(s, "# HELP deckhand_swaps_total Releases activated.");
        let _ = writeln!(s, "# TYPE deckhand_swaps_total counter");
        let _ = writeln!(s, "deckhand_swaps_total {}", g(&self.swaps));
        let _ = writeln!(
            s,
            "# HELP deckhand_releases_refused_total Releases refused at activation."
        );
        let _ = writeln!(s, "# TYPE deckhand_releases_refused_total counter");
        let _ = writeln!(s, "deckhand_releases_refused_total {}", g(&self.refused));
        let _ = writeln!(
            s,
            "# HELP deckhand_sync_bytes_total Release bytes stored, by where they came from."
        );
        let _ = writeln!(s, "# TYPE deckhand_sync_bytes_total counter");
        for (source, v) in [
            ("peer", g(&self.sync_peer)),
            ("origin", g(&self.sync_origin)),
            ("local", g(&self.sync_local)),
        ] {
            let _ = writeln!(s, "deckhand_sync_bytes_total{{source=\"{source}\"}} {v}");
        }
        let _ = writeln!(
            s,
            "# HELP deckhand_peer_served_bytes_total Chunk bytes served to LAN peers."
        );
        let _ = writeln!(s, "# TYPE deckhand_peer_served_bytes_total counter");
        let _ = writeln!(
            s,
            "deckhand_peer_served_bytes_total {}",
            g(&self.peer_served)
        );
        let _ = writeln!(
            s,
            "# HELP deckhand_peers_banned_total Peers banned for sending chunks that failed verification."
        );
        let _ = writeln!(s, "# TYPE deckhand_peers_banned_total counter");
        let _ = writeln!(s, "deckhand_peers_banned_total {}", g(&self.peers_banned));
        let _ = writeln!(
            s,
            "# HELP deckhand_quic_handshakes_shed_total QUIC handshakes in flight shed to make room (the oldest first)."
        );
        let _ = writeln!(s, "# TYPE deckhand_quic_handshakes_shed_total counter");
        let _ = writeln!(
            s,
            "deckhand_quic_handshakes_shed_total {}",
            g(&self.handshakes_shed)
        );
        let _ = writeln!(
            s,
            "# HELP deckhand_quic_retries_total QUIC Initials answered with a Retry while handshakes were pressed."
        );
        let _ = writeln!(s, "# TYPE deckhand_quic_retries_total counter");
        let _ = writeln!(
            s,
            "deckhand_quic_retries_total {}",
            g(&self.handshakes_retried)
        );
        let _ = writeln!(
            s,
            "# HELP deckhand_origin_ranges_failed_total Origin range GETs that failed and were fetched again, by why."
        );
        let _ = writeln!(s, "# TYPE deckhand_origin_ranges_failed_total counter");
        for why in [
            RangeFailure::Error,
            RangeFailure::Stalled,
            RangeFailure::Bad,
        ] {
            let _ = writeln!(
                s,
                "deckhand_origin_ranges_failed_total{{why=\"{}\"}} {}",
                why.label(),
                g(&self.range_failed[why as usize])
            );
        }
        let _ = writeln!(
            s,
            "# HELP deckhand_active_version The manifest version serving recognitions (0: none)."
        );
        let _ = writeln!(s, "# TYPE deckhand_active_version gauge");
        let _ = writeln!(s, "deckhand_active_version {}", active_version.unwrap_or(0));
        s
    }
}

/// The gauges read from the status document: the disk, fleet membership, what expires and when, and
/// how old the newest manifest is (a bucket where nothing new appears shows as an age that grows).
pub fn render_status(
    out: &mut String,
    status: &deckhand_protocol::status::Status,
    now: jiff::Timestamp,
) {
    if let Some(e) = &status.events {
        render_events(out, e, now);
    }
    let disk = status.disk_full.as_ref();
    let _ = write!(
        out,
        "# HELP deckhand_disk_full 1 while the store's disk is full (the pending release waits for space).\n\
         # TYPE deckhand_disk_full gauge\n\
         deckhand_disk_full {}\n\
         # HELP deckhand_disk_bytes_needed Bytes the pending release still needs while the disk is full.\n\
         # TYPE deckhand_disk_bytes_needed gauge\n\
         deckhand_disk_bytes_needed {}\n\
         # HELP deckhand_fleet_credentials_ok 0 while this agent's fleet credentials do not load or check.\n\
         # TYPE deckhand_fleet_credentials_ok gauge\n\
         deckhand_fleet_credentials_ok {}\n",
        u8::from(disk.is_some()),
        disk.map_or(0, |d| d.bytes_needed),
        u8::from(status.fleet_error.is_none()),
    );
    if let Some(d) = &status.dial_table {
        let _ = write!(
            out,
            "# HELP deckhand_quic_connections QUIC connections open, dialed or accepted (one per peer once settled).\n\
             # TYPE deckhand_quic_connections gauge\n\
             deckhand_quic_connections {}\n",
            d.connections
        );
    }
    if let Some(s) = &status.scrub {
        let _ = write!(
            out,
            "# HELP deckhand_scrub_bytes_total Bytes of the live releases the background scrub re-hashed.\n\
             # TYPE deckhand_scrub_bytes_total counter\n\
             deckhand_scrub_bytes_total {}\n\
             # HELP deckhand_scrub_quarantined_total Blobs the scrub found rotten (quarantined, fetched again).\n\
             # TYPE deckhand_scrub_quarantined_total counter\n\
             deckhand_scrub_quarantined_total {}\n",
            s.bytes_checked, s.quarantined
        );
    }
    if let Some(sh) = &status.shadow {
        let f = sh.figures.clone().unwrap_or_default();
        let _ = write!(
            out,
            "# HELP deckhand_shadow_held 1 while the last release shadow-evaluated is held by it (below the policy, or waiting for samples).\n\
             # TYPE deckhand_shadow_held gauge\n\
             deckhand_shadow_held{{version=\"{v}\"}} {}\n\
             # HELP deckhand_shadow_agreement Top-1 agreement of the last release shadow-evaluated with the active release on the shop's own inputs.\n\
             # TYPE deckhand_shadow_agreement gauge\n\
             deckhand_shadow_agreement{{version=\"{v}\"}} {}\n\
             # HELP deckhand_shadow_samples Samples the last shadow evaluation ran on.\n\
             # TYPE deckhand_shadow_samples gauge\n\
             deckhand_shadow_samples{{version=\"{v}\"}} {}\n",
            u8::from(sh.outcome != "passed"),
            f.agreement(),
            f.samples,
            v = sh.version,
        );
    }
    if let Some(p) = &status.probation {
        let _ = write!(
            out,
            "# HELP deckhand_probation 1 while the active release is on probation (watched, rolled back if it serves worse than the release before).\n\
             # TYPE deckhand_probation gauge\n\
             deckhand_probation{{version=\"{v}\"}} {}\n\
             # HELP deckhand_probation_rolled_back 1 when the release on probation was rolled back.\n\
             # TYPE deckhand_probation_rolled_back gauge\n\
             deckhand_probation_rolled_back{{version=\"{v}\"}} {}\n",
            u8::from(p.outcome == "watching"),
            u8::from(p.why.is_some()),
            v = p.version,
        );
    }
    if let Some(r) = &status.rejected {
        let _ = write!(
            out,
            "# HELP deckhand_release_rejected A release this agent will not take (it or a peer rolled back from it) until a newer one is published.\n\
             # TYPE deckhand_release_rejected gauge\n\
             deckhand_release_rejected{{version=\"{}\"}} 1\n",
            r.version
        );
    }
    if let Some(t) = &status.fleet_trust {
        let _ = write!(
            out,
            "# HELP deckhand_fleet_bundle The number of the fleet bundle this agent holds (renewals, revocations, CA rotations); 0 before any.\n\
             # TYPE deckhand_fleet_bundle gauge\n\
             deckhand_fleet_bundle {}\n\
             # HELP deckhand_fleet_cas Fleet CAs this agent trusts (2 during a CA rotation).\n\
             # TYPE deckhand_fleet_cas gauge\n\
             deckhand_fleet_cas {}\n",
            t.bundle.unwrap_or(0),
            t.cas.len()
        );
    }
    let _ = write!(
        out,
        "# HELP deckhand_store_repaired 1 when the store repaired its catalog or dropped downloads at start.\n\
         # TYPE deckhand_store_repaired gauge\n\
         deckhand_store_repaired {}\n",
        u8::from(status.store_repair.is_some())
    );
    let _ = write!(
        out,
        "# HELP deckhand_expiry_timestamp_seconds When this Pi's certificate, the fleet CA, the trust root and the active manifest expire.\n\
         # TYPE deckhand_expiry_timestamp_seconds gauge\n"
    );
    for e in &status.expiries {
        if let Ok(at) = e.expires_at.parse::<jiff::Timestamp>() {
            let what = e.what.replace(' ', "_").to_lowercase();
            let _ = writeln!(
                out,
                "deckhand_expiry_timestamp_seconds{{what=\"{what}\"}} {}",
                at.as_second()
            );
        }
    }
    let _ = write!(
        out,
        "# HELP deckhand_expiry_warning 1 from 30 days before an expiry on.\n\
         # TYPE deckhand_expiry_warning gauge\n"
    );
    for e in &status.expiries {
        let what = e.what.replace(' ', "_").to_lowercase();
        let _ = writeln!(
            out,
            "deckhand_expiry_warning{{what=\"{what}\"}} {}",
            u8::from(e.warning.is_some())
        );
    }
    if let Some(newest) = status
        .newest_manifest_at
        .as_deref()
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
    {
        let _ = write!(
            out,
            "# HELP deckhand_newest_manifest_age_seconds Age of the newest manifest this agent verified.\n\
             # TYPE deckhand_newest_manifest_age_seconds gauge\n\
             deckhand_newest_manifest_age_seconds {}\n",
            now.duration_since(newest).as_secs().max(0)
        );
    }
}

/// A sink's label value: `mqtt`, or `webhook:<url>` (quotes and backslashes escaped).
fn sink_label(s: &deckhand_protocol::status::EventSink) -> String {
    let name = if s.kind == "mqtt" {
        "mqtt".to_owned()
    } else {
        format!("{}:{}", s.kind, s.target)
    };
    name.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The event log's and its sinks' metrics.
fn render_events(
    out: &mut String,
    e: &deckhand_protocol::status::EventsStatus,
    now: jiff::Timestamp,
) {
    let _ = write!(
        out,
        "# HELP deckhand_events_total Recognition events recorded since start.\n\
         # TYPE deckhand_events_total counter\n\
         deckhand_events_total {}\n\
         # HELP deckhand_events_lost_total Events lost since start: the log's queue was full, they left the log (count or age) before every sink had them, or the log could not be written.\n\
         # TYPE deckhand_events_lost_total counter\n\
         deckhand_events_lost_total{{reason=\"queue_full\"}} {}\n\
         deckhand_events_lost_total{{reason=\"expired\"}} {}\n\
         deckhand_events_lost_total{{reason=\"unwritable\"}} {}\n\
         # HELP deckhand_events_kept Events the log keeps.\n\
         # TYPE deckhand_events_kept gauge\n\
         deckhand_events_kept {}\n",
        e.recorded, e.dropped, e.expired, e.unwritten, e.kept
    );
    if e.sinks.is_empty() {
        return;
    }
    let _ = write!(
        out,
        "# HELP deckhand_event_backlog Events waiting for a sink.\n\
         # TYPE deckhand_event_backlog gauge\n"
    );
    for s in &e.sinks {
        let _ = writeln!(
            out,
            "deckhand_event_backlog{{sink=\"{}\"}} {}",
            sink_label(s),
            s.backlog
        );
    }
    let _ = write!(
        out,
        "# HELP deckhand_event_oldest_undelivered_seconds Age of the oldest event a sink has not had (0 when none waits).\n\
         # TYPE deckhand_event_oldest_undelivered_seconds gauge\n"
    );
    for s in &e.sinks {
        let age = s
            .oldest_undelivered
            .as_deref()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .map_or(0, |t| now.duration_since(t).as_secs().max(0));
        let _ = writeln!(
            out,
            "deckhand_event_oldest_undelivered_seconds{{sink=\"{}\"}} {age}",
            sink_label(s)
        );
    }
    let _ = write!(
        out,
        "# HELP deckhand_event_sink_up 1 while a sink's last attempt succeeded.\n\
         # TYPE deckhand_event_sink_up gauge\n"
    );
    for s in &e.sinks {
        let _ = writeln!(
            out,
            "deckhand_event_sink_up{{sink=\"{}\"}} {}",
            sink_label(s),
            u8::from(s.connected)
        );
    }
    let _ = write!(
        out,
        "# HELP deckhand_event_deliveries_total Events a sink took (delivered) or refused for good (rejected), since start.\n\
         # TYPE deckhand_event_deliveries_total counter\n"
    );
    for s in &e.sinks {
        let label = sink_label(s);
        let _ = writeln!(
            out,
            "deckhand_event_deliveries_total{{sink=\"{label}\",outcome=\"delivered\"}} {}\n\
             deckhand_event_deliveries_total{{sink=\"{label}\",outcome=\"rejected\"}} {}",
            s.delivered, s.rejected
        );
    }
}
