//! Counters and a latency histogram, rendered in the Prometheus text format at `GET /metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

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
            "# HELP deckhand_active_version The manifest version serving recognitions (0: none)."
        );
        let _ = writeln!(s, "# TYPE deckhand_active_version gauge");
        let _ = writeln!(s, "deckhand_active_version {}", active_version.unwrap_or(0));
        s
    }
}
