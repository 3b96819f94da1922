//! The agent daemon (`deckhand-agent run`) and the manual sideload (`deckhand-agent import`).
//!
//! At start the daemon opens the store, loads the active release recorded there (signatures re-checked;
//! an expired manifest keeps serving, since recognition must never stop), and serves recognitions over
//! HTTP and the inbox. It needs no network to do so.

use crate::http::AppState;
use crate::metrics::Metrics;
use crate::peer::PeerNode;
use crate::peer::statuses::PeerStatuses;
use crate::recognizer::BackendChoice;
use crate::recognizer::inbox::Inbox;
use crate::recognizer::service::{Service, check_canaries};
use crate::sync::activation::{self, ActivationError};
use deckhand_protocol::{PublicKey, TrustPolicy};
use deckhand_store::{Options, Store, StoreError};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::mpsc::Receiver;
use tracing::Instrument as _;

/// How long the daemon's tasks get to stop after the HTTP API stopped, before they are aborted.
const TASKS_STOP: std::time::Duration = std::time::Duration::from_secs(1);

pub use crate::config::RunConfig;

/// The agent's id: its certificate's name when it has fleet credentials, else one made up at first
/// start and kept in the store.
pub fn agent_id(
    store: &Store,
    creds: Option<&crate::peer::tls::FleetCredentials>,
) -> Result<String, StoreError> {
    let ledger = crate::ledger::Ledger::new(store);
    if let Some(c) = creds {
        ledger.set_agent_id(&c.agent_id)?;
        return Ok(c.agent_id.clone());
    }
    if let Some(id) = ledger.agent_id()? {
        return Ok(id);
    }
    let mut b = [0u8; 4];
    if getrandom::fill(&mut b).is_err() {
        // No randomness from the OS (Linux has it once booted): the id only has to differ between the
        // shop's agents, so the clock and the process id make it.
        let seed = format!("{:?} {}", std::time::SystemTime::now(), std::process::id());
        b.copy_from_slice(&blake3::hash(seed.as_bytes()).as_bytes()[..4]);
    }
    let id = format!("agent-{}", hex::encode(b));
    ledger.set_agent_id(&id)?;
    Ok(id)
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("--trust/--threshold: {0}")]
    Trust(#[source] deckhand_protocol::VerifyError),
    #[error("--trust-root: {0}")]
    TrustRoot(#[source] deckhand_protocol::root::RootError),
    #[error("--deployment: {0}")]
    Deployment(#[source] deckhand_protocol::layout::LayoutError),
    #[error("--peer needs fleet credentials (--fleet-ca, --fleet-cert, --fleet-key)")]
    PeersWithoutCredentials,
    #[error("bundle {path}: {source}")]
    BundleRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a loader task stopped: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Activation(#[from] ActivationError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Inbox(#[from] crate::recognizer::inbox::InboxError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Origin(#[from] crate::origin::OriginError),
    #[error("fleet credentials: {0}")]
    Fleet(#[from] crate::peer::tls::FleetError),
    #[error(transparent)]
    Peer(#[from] crate::peer::PeerError),
    #[error(transparent)]
    Discovery(#[from] crate::peer::discovery::DiscoveryError),
    #[error(transparent)]
    Bundle(#[from] crate::sync::bundle::BundleError),
    #[error(transparent)]
    Sync(#[from] crate::sync::SyncError),
}

pub fn open_store(data_dir: &std::path::Path, budget: Option<u64>) -> Result<Store, StoreError> {
    Store::open(data_dir.join("store"), Options { budget })
}

/// What this agent trusts: the keys given, or the trust root it was installed with, or the newer one
/// it followed to and kept in the store.
fn trust(cfg: &RunConfig, store: &Store) -> Result<crate::sync::trust::Trust, DaemonError> {
    load_trust(
        &cfg.deployment,
        &cfg.trust,
        usize::from(cfg.settings.threshold),
        cfg.trust_root.as_deref(),
        store,
    )
}

/// [`trust`] for `run` and `import` alike: `keys` at `threshold`, or the root `trust_root` (an envelope)
/// and the newer one kept in the store.
fn load_trust(
    deployment: &str,
    keys: &[deckhand_protocol::PublicKey],
    threshold: usize,
    trust_root: Option<&[u8]>,
    store: &Store,
) -> Result<crate::sync::trust::Trust, DaemonError> {
    use crate::sync::trust::Trust;
    use deckhand_protocol::root::TrustedRoot;
    let Some(installed) = trust_root else {
        let policy = TrustPolicy::new(keys.to_vec(), threshold).map_err(DaemonError::Trust)?;
        return Ok(Trust::keys(policy));
    };
    let installed =
        TrustedRoot::installed(installed, deployment).map_err(DaemonError::TrustRoot)?;
    // The store's root was reached from an installed one by the chain's rules; it is used if it is
    // newer (a root installed later than the store's wins).
    let ledger = crate::ledger::Ledger::new(store);
    let kept = ledger
        .followed_root()?
        .and_then(|b| TrustedRoot::installed(&b, deployment).ok())
        .filter(|k| k.version() > installed.version());
    // Every root held is kept by version, to pass on to peers that are behind.
    ledger.keep_root(installed.version(), installed.envelope())?;
    let root = kept.unwrap_or(installed);
    tracing::info!(version = root.version(), "trusting the deployment's root");
    Ok(Trust::root(root))
}

/// Loads the active release recorded in the store into the service. Returns its version, or `None`.
pub async fn restore_active(
    store: &Store,
    service: &Service,
    policy: &TrustPolicy,
    backend: BackendChoice,
) -> Result<Option<u64>, DaemonError> {
    let Some(envelope) = crate::ledger::Ledger::new(store).active()? else {
        return Ok(None);
    };
    // Signatures are checked again; expiry is not: a release that was valid when it went live keeps
    // serving until a newer one arrives.
    let verified = policy
        .verify_ignoring_expiry(&envelope)
        .map_err(ActivationError::from)?;
    let (store2, v2) = (store.clone(), verified.clone());
    let (recognizer, canaries) = tokio::task::spawn_blocking(move || {
        let r = activation::load_recognizer(&store2, &v2, backend)?;
        let c = activation::canaries(&store2, &v2.manifest)?;
        Ok::<_, ActivationError>((r, c))
    })
    .await??;
    let version = recognizer.version;
    if let Err(e) = service.activate(recognizer, &canaries) {
        return Err(DaemonError::Activation(ActivationError::Release {
            version,
            why: e.to_string(),
        }));
    }
    Ok(Some(version))
}

/// Runs until `shutdown` resolves. Prints where it listens on stdout (`quic listening on ADDR`, then
/// `listening on http://ADDR`), once serving: the shop's `Fleet` and anyone supervising the process read
/// those lines. Wiring only: each part starts in its own function, every task is owned by `tasks` (the
/// peer node owns its own) and stops on `stop`.
pub async fn run(
    cfg: RunConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let store = open_store(&cfg.settings.data_dir, cfg.settings.store_budget)?;
    let trust = Arc::new(trust(&cfg, &store)?);
    let fleet = fleet_credentials(&cfg, &store);
    let creds = fleet.clone().ok().flatten();
    let me = agent_id(&store, creds.as_ref().map(|f| f.current()).as_deref())?;
    note_start(&store, &cfg, &me);
    let (cores, refused) = crate::recognizer::cpu::Cores::new(cfg.settings.cpu_threads.into());
    if let Some(e) = refused {
        tracing::warn!(error = %e, "the CPU backend's thread pool could not start: one image runs on one core");
    }
    tracing::debug!(threads = cores.threads(), "CPU backend cores for one image");
    let service = Service::start(Arc::new(Metrics::default()), cores)?;
    if cfg.settings.shadow_samples > 0 {
        service.keep_samples(crate::recognizer::shadow::Samples::start(
            cfg.settings.shadow_samples as usize,
        )?);
    }
    serve_from_store(&store, &service, &trust.policy(), cfg.settings.backend).await;
    let span = tracing::info_span!("agent", agent = %me, deployment = %cfg.deployment);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let (peers, hints) = start_peers(&cfg, creds, &store, &service, &stop).await?;
    let _mdns = start_discovery(&cfg, peers.as_ref(), &stop, &mut tasks, &span);
    let (bundle_tx, bundles) = tokio::sync::mpsc::channel(4);
    let _bundles = match &cfg.settings.bundle_dir {
        Some(dir) => {
            let (watcher, debounce) =
                crate::sync::bundle::BundleWatcher::start(dir.clone(), bundle_tx, stop.clone())?;
            tasks.spawn(debounce.instrument(span.clone()));
            Some(watcher)
        }
        None => None,
    };
    let engine = engine(&cfg, &me, trust.clone(), &store, &service, &peers).await?;
    let sync_beat = engine.beat();
    let engine_status = engine.status();
    let (scrubber, repairs) = start_scrub(&cfg, &store)?;
    let (events, recorder) = start_events(&cfg, &me, &service, &stop, &mut tasks, &span);
    let cameras = start_cameras(&cfg, &service, recorder, &stop, &mut tasks, &span);
    let inputs = crate::sync::Inputs {
        hints,
        haves: peers.as_ref().and_then(|p| p.take_haves()),
        bundles: Some(bundles),
        repairs,
    };
    tasks.spawn(engine.run(inputs, stop.clone()).instrument(span.clone()));
    let sources = crate::report::Sources {
        agent_id: me,
        deployment: cfg.deployment.clone(),
        sync: engine_status,
        service: service.clone(),
        peers: peers.clone(),
        store: store.clone(),
        trust: trust.clone(),
        fleet,
        scrub: scrubber.as_ref().map(|s| s.status_handle()),
        events: events.clone(),
        cameras: cameras.iter().map(|c| c.state.clone()).collect(),
    };
    let peer_statuses = PeerStatuses::default();
    if let Some(node) = &peers {
        let sources = sources.clone();
        node.set_status_source(Arc::new(move || {
            serde_json::to_vec(&sources.status()).unwrap_or_default()
        }));
        let watch = crate::peer::statuses::watch(node.clone(), peer_statuses.clone(), stop.clone());
        tasks.spawn(watch.instrument(span.clone()));
    }
    let listener = tokio::net::TcpListener::bind(cfg.settings.http_listen)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: cfg.settings.http_listen,
            source,
        })?;
    let addr = listener.local_addr()?;
    if let Some(node) = &peers {
        println!("quic listening on {}", node.listen_addr());
    }
    println!("listening on http://{addr}");
    crate::systemd::ready();
    let watchdog = watchdog(sources.clone(), service.clone(), sync_beat, stop);
    tasks.spawn(watchdog.instrument(span));
    let _inbox = start_inbox(&cfg, &service)?;
    // Streams (/v1/events) end as soon as the server begins to stop, not after its grace period.
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = closing_tx.send(true);
    };
    let app = crate::http::router(AppState {
        service: service.clone(),
        status: {
            let sources = sources.clone();
            Arc::new(move || sources.status())
        },
        fleet: Arc::new(move || sources.fleet(&peer_statuses)),
        token: cfg.settings.http_token.as_deref().map(Arc::from),
        events: events.as_ref().map(|e| e.log.clone()),
        closing,
        cameras: cameras.iter().map(|c| c.state.clone()).collect(),
    });
    let limits = crate::http::gate::Limits {
        max_connections: cfg.settings.http_max_connections as usize,
        per_address: cfg.settings.http_max_per_address as usize,
        ..crate::http::gate::Limits::default()
    };
    crate::http::serve(listener, app, limits, shutdown).await?;
    crate::systemd::stopping();
    tracing::debug!("the HTTP API stopped");
    let _ = stop_tx.send(true);
    if let Some(s) = scrubber {
        tokio::task::spawn_blocking(move || s.stop()).await?;
    }
    tokio::task::spawn_blocking(move || cameras.into_iter().for_each(crate::camera::Camera::stop))
        .await?;
    stop_all(tasks, peers, service).await;
    if let Some(events) = events {
        tokio::task::spawn_blocking(move || events.log.close()).await?;
    }
    if let Err(e) = crate::ledger::Ledger::new(&store).note_clean_stop() {
        tracing::warn!(cause = %e, "could not note the clean stop; the next start counts this run as a crash");
    }
    store.close();
    Ok(())
}

/// Notes the start in the ledger; after a crash loop that follows a release going live, the previous
/// release is made active again here, before anything is served.
fn note_start(store: &Store, cfg: &RunConfig, me: &str) {
    let rule = deckhand_protocol::switch::CrashLoop {
        restarts: cfg.settings.crash_loop_restarts,
        within: cfg.settings.crash_loop_within,
    };
    let ledger = crate::ledger::Ledger::new(store);
    let noted = ledger
        .trusted_now(jiff::Timestamp::now())
        .and_then(|now| ledger.note_start(now, &rule, me));
    match noted {
        Ok(Some(f)) => tracing::error!(
            from = f.from_version,
            to = f.to_version,
            why = %f.why,
            "crash loop after a release went live: serving the release before it"
        ),
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(cause = %e, "could not note the start; crash loops are not counted")
        }
    }
}

/// The recognition event log (`events.sqlite` in the data directory), told of every answer, and its
/// sinks (MQTT, webhooks), each a task until `stop`. A log that cannot be opened is logged and the agent
/// serves without events: recognitions never stop for it.
fn start_events(
    cfg: &RunConfig,
    me: &str,
    service: &Service,
    stop: &tokio::sync::watch::Receiver<bool>,
    tasks: &mut tokio::task::JoinSet<()>,
    span: &tracing::Span,
) -> (
    Option<crate::events::Events>,
    Option<Arc<crate::events::Recorder>>,
) {
    use crate::events::{Recorder, SinkState, log, mqtt, webhook};
    let s = &cfg.settings;
    let mqtt = s.mqtt.clone().map(|url| mqtt::MqttConfig {
        url,
        ca: s.mqtt_ca.clone(),
        deployment: cfg.deployment.clone(),
        agent: me.to_owned(),
    });
    let secret: Arc<[u8]> = Arc::from(s.webhook_secret.as_deref().unwrap_or_default().as_bytes());
    let hooks: Vec<webhook::WebhookConfig> = s
        .webhooks
        .iter()
        .map(|url| webhook::WebhookConfig {
            url: url.clone(),
            secret: secret.clone(),
            ca: s.webhook_ca.clone(),
        })
        .collect();
    let mut keys: Vec<String> = hooks.iter().map(|h| h.sink()).collect();
    if mqtt.is_some() {
        keys.push(mqtt::SINK.to_owned());
    }
    let limits = log::Limits {
        keep: s.events_keep,
        max_age: s.events_max_age,
    };
    let log = match log::EventLog::open(&s.data_dir.join(log::FILE), limits, &keys) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(cause = %e, "no event log: recognitions are served, but no events are kept or sent");
            return (None, None);
        }
    };
    let recorder = Arc::new(Recorder::new(
        log.clone(),
        me,
        &cfg.deployment,
        s.min_margin,
    ));
    service.listen(recorder.clone());
    let mut sinks = Vec::new();
    if let Some(m) = mqtt {
        let state = SinkState::new("mqtt", mqtt::SINK.to_owned(), m.url.to_string());
        sinks.push(state.clone());
        let run = mqtt::run(m, log.clone(), state, stop.clone());
        tasks.spawn(run.instrument(tracing::info_span!(parent: span, "mqtt")));
    }
    for hook in hooks {
        let state = SinkState::new("webhook", hook.sink(), hook.url.to_string());
        sinks.push(state.clone());
        let run = webhook::run(hook, log.clone(), state, stop.clone());
        tasks.spawn(run.instrument(tracing::info_span!(parent: span, "webhook")));
    }
    (Some(crate::events::Events { log, sinks }), Some(recorder))
}

/// The counter's cameras, each reading on `tasks` and analysing on its own thread. A camera that
/// cannot start its thread is logged and left out; the agent serves without it.
fn start_cameras(
    cfg: &RunConfig,
    service: &Service,
    recorder: Option<Arc<crate::events::Recorder>>,
    stop: &tokio::sync::watch::Receiver<bool>,
    tasks: &mut tokio::task::JoinSet<()>,
    span: &tracing::Span,
) -> Vec<crate::camera::Camera> {
    let s = &cfg.settings;
    let counter = crate::camera::Counter {
        service: service.clone(),
        recorder,
        fps: s.camera_fps,
        stillness: crate::camera::tracker::Stillness {
            frames: s.still_frames,
            ..Default::default()
        },
    };
    s.cameras
        .iter()
        .filter_map(|spec| {
            crate::camera::Camera::start(spec.clone(), counter.clone(), stop.clone(), tasks, span)
                .inspect_err(
                    |e| tracing::error!(camera = %spec.name, cause = %e, "camera not started"),
                )
                .ok()
        })
        .collect()
}

/// The background scrub ([`crate::maintenance::scrub`]), unless `scrub_per_hour` is 0, and the channel
/// on which it tells the sync engine of a blob it quarantined.
#[allow(clippy::type_complexity)]
fn start_scrub(
    cfg: &RunConfig,
    store: &Store,
) -> Result<
    (
        Option<crate::maintenance::scrub::Scrubber>,
        Option<tokio::sync::mpsc::Receiver<()>>,
    ),
    DaemonError,
> {
    if cfg.settings.scrub_per_hour == 0 {
        return Ok((None, None));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let scrubber =
        crate::maintenance::scrub::Scrubber::start(store.clone(), cfg.settings.scrub_per_hour, tx)?;
    Ok((Some(scrubber), Some(rx)))
}

/// Loads the active release recorded in the store into the service, and collects what an interrupted
/// activation left. Neither failing stops the daemon: a release that does not load is shown refused
/// (recognitions answer 503 until one arrives).
async fn serve_from_store(
    store: &Store,
    service: &Service,
    policy: &TrustPolicy,
    backend: BackendChoice,
) {
    match restore_active(store, service, policy, backend).await {
        Ok(Some(v)) => tracing::info!(version = v, "serving the active release from the store"),
        Ok(None) => {
            tracing::warn!("no release in the store yet; recognitions answer 503 until one arrives")
        }
        Err(e) => {
            tracing::error!(cause = %e, "the recorded active release does not load");
            service.refuse(0, "", &e.to_string());
        }
    }
    let store = store.clone();
    match tokio::task::spawn_blocking(move || activation::collect_at_start(&store)).await {
        Ok(Ok(Some(gc))) if gc.blobs_removed > 0 => {
            tracing::info!(
                blobs = gc.blobs_removed,
                freed = gc.bytes_freed,
                "collected what an interrupted activation left"
            );
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(cause = %e, "collecting at start failed"),
        Err(e) => tracing::warn!(cause = %e, "collecting at start failed"),
    }
}

/// The fleet credentials (`Ok(None)` without `--fleet-*`), judging certificates at the trusted clock.
/// Credentials that do not load never stop the agent: it serves from its store without QUIC, and
/// status shows why (`Err`). Credentials that load but do not check now (expired, revoked) are used:
/// peers judge them, and a renewal may arrive.
fn fleet_credentials(
    cfg: &RunConfig,
    store: &Store,
) -> Result<Option<Arc<crate::peer::renewal::Fleet>>, String> {
    use crate::peer::tls::FleetCredentials;
    let Some(paths) = &cfg.fleet else {
        return Ok(None);
    };
    let floor_store = store.clone();
    let floor = Box::new(move || {
        crate::ledger::Ledger::new(&floor_store)
            .time_floor()
            .ok()
            .flatten()
    });
    match FleetCredentials::load(paths) {
        Ok(creds) => {
            let fleet =
                crate::peer::renewal::Fleet::new(creds.with_floor(Some(floor)), store.clone());
            if let Err(e) = fleet.current().check() {
                tracing::error!(cause = %e, "this agent's fleet certificate does not check; peers will refuse it");
            }
            Ok(Some(fleet))
        }
        Err(e) => {
            tracing::error!(cause = %e, "fleet credentials do not load; serving from the store without peers");
            Err(format!("fleet credentials: {e}"))
        }
    }
}

/// The QUIC peer node, when the agent has fleet credentials, and the receiver of its hints.
async fn start_peers(
    cfg: &RunConfig,
    creds: Option<Arc<crate::peer::renewal::Fleet>>,
    store: &Store,
    service: &Service,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<(Option<PeerNode>, Option<Receiver<crate::peer::Hint>>), DaemonError> {
    let Some(creds) = creds else {
        // Peers named without any credentials is a wrong setting; credentials that did not load are
        // shown in status, and the agent serves without peers.
        if !cfg.settings.peers.is_empty() && cfg.fleet.is_none() {
            return Err(DaemonError::PeersWithoutCredentials);
        }
        return Ok((None, None));
    };
    let peer_cfg = crate::peer::PeerConfig {
        fleet: creds,
        deployment: cfg.deployment.clone(),
        listen: cfg.settings.quic_listen,
        static_peers: cfg.settings.peers.clone(),
        streams_per_peer: 8,
        serve_bytes_per_sec: cfg.settings.serve_bytes_per_sec,
    };
    let metrics = service.metrics().clone();
    let (node, hints) = PeerNode::start(peer_cfg, store.clone(), metrics, stop.clone()).await?;
    Ok((Some(node), Some(hints)))
}

/// mDNS discovery of the shop's peers; a LAN without multicast is no reason not to serve (static peers
/// still work), so failing to start it is logged, not fatal.
fn start_discovery(
    cfg: &RunConfig,
    peers: Option<&PeerNode>,
    stop: &tokio::sync::watch::Receiver<bool>,
    tasks: &mut tokio::task::JoinSet<()>,
    span: &tracing::Span,
) -> Option<crate::peer::discovery::Mdns> {
    let node = peers.filter(|_| cfg.settings.mdns)?;
    match crate::peer::discovery::Mdns::start(node.clone(), &cfg.deployment, stop.clone()) {
        Ok((m, browse)) => {
            tasks.spawn(browse.instrument(span.clone()));
            Some(m)
        }
        Err(e) => {
            tracing::warn!(cause = %e, "mdns discovery is off");
            None
        }
    }
}

async fn engine(
    cfg: &RunConfig,
    me: &str,
    trust: Arc<crate::sync::trust::Trust>,
    store: &Store,
    service: &Service,
    peers: &Option<PeerNode>,
) -> Result<crate::sync::Engine, DaemonError> {
    let origin = match &cfg.origin {
        Some((url, origin_cfg)) => Some(crate::origin::connect(url, origin_cfg).await?),
        None => None,
    };
    let deployment = deckhand_protocol::layout::Name::deployment(&cfg.deployment)
        .map_err(DaemonError::Deployment)?;
    let sync_cfg = crate::sync::SyncConfig {
        agent_id: me.to_owned(),
        origin,
        deployment,
        trust,
        clock: cfg.settings.clock_synchronised,
        backend: cfg.settings.backend,
        poll: cfg.settings.poll,
        max_backoff: cfg.settings.poll.max(std::time::Duration::from_secs(60)),
        max_wait: cfg.settings.max_wait,
        gather: cfg.settings.gather,
        budget: cfg.budget.clone(),
        activate: cfg.settings.activate,
        activate_deadline: cfg.settings.activate_deadline,
        gate: deckhand_protocol::switch::Gate {
            windows: cfg.settings.activate_window.clone(),
            when_idle: cfg.settings.activate_when_idle,
        },
        shadow: cfg.settings.shadow,
        rollout: cfg.settings.rollout,
    };
    Ok(crate::sync::Engine::new(
        sync_cfg,
        store.clone(),
        service.clone(),
        peers.clone(),
    ))
}

/// The systemd watchdog: pings while inference answers and the sync loop goes round.
fn watchdog(
    sources: crate::report::Sources,
    service: Service,
    sync_beat: crate::systemd::Beat,
    stop: tokio::sync::watch::Receiver<bool>,
) -> impl Future<Output = ()> + Send + 'static {
    crate::systemd::run(
        move || sources.status().summary_line(),
        move || {
            service.inference_alive(crate::systemd::INFERENCE_LIMIT)?;
            let quiet = sync_beat.since();
            if quiet > crate::systemd::SYNC_LIMIT {
                return Err(format!(
                    "the sync loop has not gone round for {:.0} s",
                    quiet.as_secs_f64()
                ));
            }
            Ok(())
        },
        stop,
    )
}

fn start_inbox(cfg: &RunConfig, service: &Service) -> Result<Option<Inbox>, DaemonError> {
    let Some(inbox) = &cfg.settings.inbox else {
        return Ok(None);
    };
    let outbox = cfg
        .settings
        .outbox
        .clone()
        .unwrap_or_else(|| inbox.with_file_name("outbox"));
    Ok(Some(Inbox::start(service.clone(), inbox.clone(), outbox)?))
}

/// After `stop` was sent: each task drops its work at once; one that does not within [`TASKS_STOP`]
/// is aborted. Then the node leaves the fleet and the recognizer stops.
async fn stop_all(mut tasks: tokio::task::JoinSet<()>, peers: Option<PeerNode>, service: Service) {
    if tokio::time::timeout(TASKS_STOP, async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(
            left = tasks.len(),
            "tasks still running at shutdown; aborted"
        );
        tasks.abort_all();
    }
    tracing::debug!("the sync engine stopped");
    if let Some(node) = &peers {
        node.shutdown(std::time::Duration::from_secs(1)).await;
    }
    service.shutdown();
}

/// A settled configuration for `import`.
#[derive(Clone, Debug)]
pub struct ImportConfig {
    pub data_dir: PathBuf,
    pub deployment: String,
    pub trust: Vec<PublicKey>,
    pub threshold: usize,
    /// The deployment's trust root envelope (`--trust-root`), instead of `trust` and `threshold`.
    pub trust_root: Option<Vec<u8>>,
    pub bundle: PathBuf,
    pub backend: BackendChoice,
}

/// Sideloads the newest release of a bundle directory into the store and makes it the active one: the
/// manifest is verified and must be newer than anything accepted; every blob is imported and checked;
/// the release must load and pass its canaries. Returns the version.
pub async fn import(cfg: &ImportConfig) -> Result<u64, DaemonError> {
    let store = open_store(&cfg.data_dir, None)?;
    let name = deckhand_protocol::layout::Name::deployment(&cfg.deployment)
        .map_err(DaemonError::Deployment)?;
    let trust = load_trust(
        &cfg.deployment,
        &cfg.trust,
        cfg.threshold,
        cfg.trust_root.as_deref(),
        &store,
    )?;
    // The same reading of a stick as the engine's; a root that does not verify is an error here: the
    // operator is at the Pi, and must know.
    let bundle = crate::sync::bundle::Bundle::open(&cfg.bundle).await?;
    let followed = bundle.follow_roots(&trust, &store, &name).await?;
    if let Some(e) = followed.refused {
        return Err(DaemonError::TrustRoot(e));
    }
    let Some(envelope) = bundle.envelope(&name).await? else {
        let layout = deckhand_protocol::layout::Layout::new("").map_err(DaemonError::Deployment)?;
        return Err(DaemonError::BundleRead {
            path: cfg.bundle.join(layout.current(&name)),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    };
    let now = crate::ledger::Ledger::new(&store).trusted_now(jiff::Timestamp::now())?;
    let policy = trust.admit_policy(now).map_err(DaemonError::TrustRoot)?;
    let verified = activation::accept(
        &store,
        &policy,
        &cfg.deployment,
        &envelope,
        crate::systemd::ClockSync::Auto.now(),
    )?;
    bundle.import_blobs(&store, &verified.manifest).await?;
    let (store, backend) = (store.clone(), cfg.backend);
    tokio::task::spawn_blocking(move || {
        let recognizer = activation::load_recognizer(&store, &verified, backend)?;
        let canaries = activation::canaries(&store, &verified.manifest)?;
        check_canaries(&recognizer, &canaries).map_err(|e| ActivationError::Release {
            version: verified.manifest.version,
            why: e.to_string(),
        })?;
        activation::record_active(&store, &verified)?;
        Ok::<_, DaemonError>(verified.manifest.version)
    })
    .await?
}
