//! Recognition events out: every answer (HTTP, inbox) becomes an event ([`deckhand_protocol::event`]) in
//! the durable event log ([`log`]), and the log is delivered, each sink from its own cursor, in order
//! and at least once: Server-Sent Events to whoever watches (`GET /v1/events`, in `http/`), MQTT
//! ([`mqtt`]) and webhooks ([`webhook`]). A sink that is away (a broker down, a till off) holds nothing
//! but its cursor: the events wait in the log, bounded by count and age, and go out in order when it
//! is back.

pub mod log;
pub mod mqtt;
pub mod webhook;

use crate::metrics::Via;
use crate::recognizer::Recognition;
use crate::recognizer::service::Listener;
use deckhand_protocol::event::{Event, Outcome};
use deckhand_protocol::status::{EventSink, EventsStatus};
use log::EventLog;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Events one sink reads from the log at a time.
pub const READ_BATCH: usize = 64;

/// Turns answers into events in the log (the recognizer's [`Listener`]).
pub struct Recorder {
    log: EventLog,
    agent: String,
    deployment: String,
    /// Below this margin a best card is `uncertain` (`min_margin`; 0 takes every margin).
    min_margin: f32,
}

impl Recorder {
    pub fn new(log: EventLog, agent: &str, deployment: &str, min_margin: f32) -> Self {
        Recorder {
            log,
            agent: agent.to_owned(),
            deployment: deployment.to_owned(),
            min_margin,
        }
    }
}

impl Recorder {
    /// Records an answer from `source` (a camera's name, with the card's corners in its frame).
    pub fn record(&self, answer: &Recognition, source: &str, corners: Option<[[f32; 2]; 4]>) {
        self.log.record(event_of(
            answer,
            source,
            corners,
            &self.agent,
            &self.deployment,
            self.min_margin,
        ));
    }
}

impl Listener for Recorder {
    fn answered(&self, answer: &Recognition, via: Via) {
        let source = match via {
            Via::Http => "http",
            Via::Inbox => "inbox",
            // The camera's analysis records its own (with its name and the card's corners).
            Via::Camera => return,
        };
        self.record(answer, source, None);
    }
}

/// The event for one answer (its id is given by the log).
pub fn event_of(
    r: &Recognition,
    source: &str,
    corners: Option<[[f32; 2]; 4]>,
    agent: &str,
    deployment: &str,
    min_margin: f32,
) -> Event {
    let (outcome, card_id, metadata, reason) = match (&r.card_id, r.margin) {
        (Some(card), Some(margin)) if margin < min_margin => (
            Outcome::Uncertain,
            None,
            None,
            Some(format!(
                "best match {card} leads the next card by {margin:.3}, below the minimum margin {min_margin:.3}"
            )),
        ),
        (Some(card), _) => (Outcome::Card, Some(card.clone()), r.metadata.clone(), None),
        (None, _) if r.candidates.is_empty() => (Outcome::None, None, None, r.reason.clone()),
        (None, _) => (Outcome::Uncertain, None, None, r.reason.clone()),
    };
    Event {
        id: String::new(),
        agent: agent.to_owned(),
        deployment: deployment.to_owned(),
        source: source.to_owned(),
        at: jiff::Timestamp::now().to_string(),
        outcome,
        card_id,
        score: r.score,
        margin: r.margin,
        metadata,
        candidates: r.candidates.clone(),
        reason,
        release_version: r.manifest_version,
        manifest_id: r.manifest_id.clone(),
        corners,
        latency_ms: r.latency_ms,
    }
}

/// One sink's state, for status and /metrics.
#[derive(Debug)]
pub struct SinkState {
    /// The cursor's name in the log (`mqtt`, `webhook:<url>`).
    pub key: String,
    pub kind: &'static str,
    /// Where it delivers, without credentials.
    pub target: String,
    connected: AtomicBool,
    delivered: AtomicU64,
    rejected: AtomicU64,
    last_error: Mutex<Option<String>>,
    last_rejected: Mutex<Option<String>>,
}

impl SinkState {
    pub fn new(kind: &'static str, key: String, target: String) -> Arc<Self> {
        Arc::new(SinkState {
            key,
            kind,
            target,
            connected: AtomicBool::new(false),
            delivered: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            last_error: Mutex::new(None),
            last_rejected: Mutex::new(None),
        })
    }

    pub fn connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
        if up {
            *crate::locks::lock(&self.last_error, "sink error") = None;
        }
    }

    pub fn delivered(&self, n: u64) {
        self.delivered.fetch_add(n, Ordering::Relaxed);
    }

    pub fn rejected(&self, why: String) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        *crate::locks::lock(&self.last_rejected, "sink refusal") = Some(why);
    }

    pub fn failed(&self, why: String) {
        self.connected.store(false, Ordering::Relaxed);
        *crate::locks::lock(&self.last_error, "sink error") = Some(why);
    }
}

/// The event log and its sinks, as status shows them.
#[derive(Clone)]
pub struct Events {
    pub log: EventLog,
    pub sinks: Vec<Arc<SinkState>>,
}

impl Events {
    pub fn status(&self) -> EventsStatus {
        let counts = self.log.counts();
        let head = self.log.head();
        EventsStatus {
            log: self.log.id().to_owned(),
            newest: head,
            kept: head.saturating_sub(self.log.first().saturating_sub(1)),
            recorded: counts.recorded,
            dropped: counts.dropped,
            expired: counts.expired,
            unwritten: counts.unwritten,
            reset: self.log.reset().map(str::to_owned),
            sinks: self
                .sinks
                .iter()
                .map(|s| {
                    let cursor = self.log.cursor(&s.key);
                    let backlog = self.log.backlog(cursor);
                    EventSink {
                        kind: s.kind.to_owned(),
                        target: s.target.clone(),
                        connected: s.connected.load(Ordering::Relaxed),
                        delivered: s.delivered.load(Ordering::Relaxed),
                        rejected: s.rejected.load(Ordering::Relaxed),
                        backlog,
                        oldest_undelivered: (backlog > 0)
                            .then(|| self.log.made_after(cursor))
                            .flatten()
                            .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
                            .map(|t| t.to_string()),
                        last_error: crate::locks::lock(&s.last_error, "sink error").clone(),
                        last_rejected: crate::locks::lock(&s.last_rejected, "sink refusal").clone(),
                    }
                })
                .collect(),
        }
    }
}

/// Retry delays for a sink: doubling from 500 ms to 30 s.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);

    pub fn new() -> Self {
        Backoff { next: Self::FIRST }
    }

    /// The delay before the next attempt (and doubles the one after).
    pub fn delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Waits until the log holds events after `cursor`, or `stop`; `false` on stop.
pub async fn wait_for_events(
    head: &mut tokio::sync::watch::Receiver<u64>,
    cursor: u64,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    loop {
        if *stop.borrow() {
            return false;
        }
        if *head.borrow_and_update() > cursor {
            return true;
        }
        tokio::select! {
            changed = head.changed() => if changed.is_err() { return false },
            _ = stop.changed() => {}
        }
    }
}

/// Sleeps `d` unless `stop` comes first; `false` on stop.
pub async fn pause(d: Duration, stop: &mut tokio::sync::watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return false;
    }
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        _ = stop.changed() => !*stop.borrow(),
    }
}

/// Reads the next events a sink owes, off the runtime's threads.
pub async fn read_after(log: &EventLog, cursor: u64) -> Result<Vec<log::Stored>, log::LogError> {
    let log = log.clone();
    tokio::task::spawn_blocking(move || log.after(cursor, READ_BATCH))
        .await
        .map_err(|_| log::LogError::Closed)?
}

/// Moves a sink's cursor, off the runtime's threads.
pub async fn advance(log: &EventLog, sink: &str, seq: u64) -> Result<(), log::LogError> {
    let (log, sink) = (log.clone(), sink.to_owned());
    tokio::task::spawn_blocking(move || log.advance(&sink, seq))
        .await
        .map_err(|_| log::LogError::Closed)?
}

/// A TLS client configuration for a sink (mqtts://, https://): the CAs in `ca` (PEM), or the system's.
pub fn tls_client(ca: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("{} holds no PEM certificate", path.display()));
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(
                    "the system has no CA certificates (install ca-certificates, or name the CA)"
                        .into(),
                );
            }
        }
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())
    .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}
